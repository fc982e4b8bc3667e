"""The Python API: compress, validate and inspect, on models in memory or on disk."""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxcompress.formats.blobs import packed_weights, unpack as unpack_model
from onnxcompress.graph.data import DATA_SUFFIXES, MAX_SAMPLES, Dataset, load_data, model_inputs
from onnxcompress.graph.model import checked_model, file_bytes, load_model, model_files, output_roles, save_model
from onnxcompress.graph.outputs import OutputPlan, Role
from onnxcompress.graph.spill import release_spill
from onnxcompress.graph.weights import find_weights, get_arrays
from onnxcompress.pipeline.artifacts import Artifact
from onnxcompress.formats.forms import Form
from onnxcompress.pipeline.manager import PassManager
from onnxcompress.pipeline.outcome import Report
from onnxcompress.recipes import load_recipe, Recipe
from onnxcompress.runtime.metrics import compare_models, Comparison
from onnxcompress.runtime.sessions import check_runnable, max_runnable_opset, uses_domain
from onnxcompress.runtime.shipped import ORT_FORMAT_NOTE, shipped_of_staged
from onnxcompress.runtime.streams import detect_stream
from onnxcompress.runtime.synthesis import runnable_data
from onnxcompress.runtime.tasks import is_builtin, parse_metric

log = logging.getLogger(__name__)
ModelLike = onnx.ModelProto | str | os.PathLike


@dataclasses.dataclass(frozen=True)
class _Loaded:
    """A model load_model has just read and checked (compress_file's): not checked a second time."""

    model: onnx.ModelProto


def _as_model(model: ModelLike | _Loaded) -> onnx.ModelProto:
    if isinstance(model, _Loaded):
        return model.model
    if isinstance(model, onnx.ModelProto):
        return checked_model(model, max_opset=max_runnable_opset())
    return load_model(model, max_opset=max_runnable_opset())


def prepare_data(model: onnx.ModelProto, data: Any, *, shapes: dict | None = None, name: str = "data",
                 synthesize_if_missing: bool = True, samples: int = MAX_SAMPLES) -> Dataset | None:
    """Load and check data against the model; synthesize inputs (with a warning) when none is given. Only the
    first `samples` samples are read (0: all; a cut stream keeps its calls in order), with a note saying so."""
    specs = model_inputs(model)
    if data is None:
        if not synthesize_if_missing:
            return None
        log.warning("no %s given: using random inputs from the model's shapes, which measure fidelity weakly", name)
        return runnable_data(model, specs, shapes=shapes)
    dataset = load_data(data, name=name, specs=specs)
    if 0 < samples < len(dataset):
        total, dataset = len(dataset), dataset.limit(samples)
        dataset.note = f"{dataset.source}: the first {samples} of its {total} samples were used (--samples N to change)"
        log.warning("%s", dataset.note)
    dataset.check(specs)
    dataset.stream = detect_stream(model, dataset)  # consecutive calls of a stateful model run as streams
    return dataset


def compress(model: ModelLike, recipe: str | Recipe = "share", data: Any = None, *, eval_data: Any = None,
             form: str | None = None, validate: str = "end", shapes: dict | None = None,
             progress: bool = False, jobs: int = 1, budget: dict | None = None,
             tolerance: tuple[float, float] | None = None, samples: int = MAX_SAMPLES
             ) -> tuple[onnx.ModelProto, Report]:
    """Run a recipe on a model; returns the compressed model and the report.

    `data` calibrates data-driven passes; `eval_data` (default: `data`, else synthesized
    inputs) measures the fidelity of the result in onnxruntime. `budget` sets the options of
    the recipe's bit-width search, e.g. {"max_drop": 0.5} or {"target_ratio": 30}. `tolerance`
    (atol, rtol): the validation also counts the values outside it (a gate.Gate's tolerance).
    """
    original = _as_model(model)
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    task = parse_metric(budget["metric"]) if budget and is_builtin(budget.get("metric")) else None
    if budget and (recipe.search_step() is not None or set(budget) != {"metric"} or task is None):
        # the given budget replaces the recipe's own (the search takes exactly one); a metric alone keeps it
        reset = {"max_drop": None, "min_sqnr": None, "target_ratio": None} if set(budget) - {"metric"} else {}
        recipe = recipe.with_budget(**{**reset, **budget})
    calib = prepare_data(original, data, shapes=shapes, name="calibration data", synthesize_if_missing=False,
                         samples=samples)
    recipe, ran_instead = recipe.for_data(calib is not None, eval_data is not None)
    if eval_data is not None:
        evaluation = prepare_data(original, eval_data, shapes=shapes, name="evaluation data", samples=samples)
    elif calib is not None or validate == "none":  # nothing to validate: no inputs synthesized, no probe session
        evaluation = calib
    else:
        evaluation = prepare_data(original, None, shapes=shapes, name="data")
    manager = PassManager(recipe.build(), recipe=recipe.name, validate=validate, form=form or recipe.form,
                          jobs=jobs, progress=progress, tolerance=tolerance, task=task, ours=recipe.builtin)
    compressed, report = manager.run(original, calib, evaluation)
    if ran_instead:
        report.notes.append(ran_instead)
    report.notes += [d.note for d in dict.fromkeys((calib, evaluation)) if d is not None and d.note]
    for dataset in dict.fromkeys(d for d in (calib, evaluation) if d is not None and d.stream is not None):
        report.notes.append(f"{dataset.source}: {dataset.stream.describe()}")
    report.input_bytes = original.ByteSize()
    report.output_bytes = compressed.ByteSize()
    _note_if_not_smaller(report)
    return compressed, report


def _note_if_not_smaller(report) -> None:
    """A warning (and a report note) when the output is not smaller than the input; the per-weight
    lines of the report say why each weight was left as it was."""
    text = (f"the output ({report.output_bytes} bytes) is not smaller than the input ({report.input_bytes} bytes): "
            "see the report's per-weight lines for what was left float and why")
    said = any(n.startswith("the output (") for n in report.notes)  # compress_file says it again, on disk
    report.notes = [n for n in report.notes if not n.startswith("the output (")]
    if report.output_bytes >= report.input_bytes:
        if not said:
            log.warning("%s", text)
        report.notes.append(text)


def input_roles(model: str | os.PathLike, *, data: Any = None, eval_data: Any = None,
                recipe: str | Recipe | None = None) -> list[Role]:
    """Every file a command reads that names a path: the model and its external data, the data, the recipe."""
    path, *external_files = model_files(model)
    roles = [Role("the input model", path)] + [Role("the input model's external data", f) for f in external_files]
    roles += [Role(what, Path(value), DATA_SUFFIXES) for what, value in (("--data", data), ("--eval-data", eval_data))
              if isinstance(value, (str, os.PathLike))]
    if isinstance(recipe, (str, os.PathLike)) and Path(recipe).suffix.lower() in (".yaml", ".yml"):
        roles.append(Role("the recipe", Path(recipe)))
    return roles


def compress_file(source: str | os.PathLike, output: str | os.PathLike, recipe: str | Recipe = "share", *,
                  data: Any = None, eval_data: Any = None, plan: OutputPlan | None = None, **options) -> Report:
    """Compress a model file into `output` (written atomically; the source is only read).

    With `plan` (an OutputPlan holding `output` and its data file, checked by the caller) the
    output is staged and the caller commits; without, every output is checked against every
    input before any work and the file is in place when this returns.
    """
    if plan is None:
        own = OutputPlan(output_roles(output), input_roles(source, data=data, eval_data=eval_data, recipe=recipe))
        with own.check():
            report = compress_file(source, output, recipe, data=data, eval_data=eval_data, plan=own, **options)
            own.commit()
        return report
    compressed, report = compress(_Loaded(load_model(source, max_opset=max_runnable_opset())), recipe, data,
                                  eval_data=eval_data, **options)
    try:
        save_model(compressed, output, plan=plan)
    finally:
        release_spill(compressed)  # a streamed model's temporary tensors
    report.input_bytes = file_bytes(source)
    report.output_bytes = plan.staged_bytes(*(role.path for role in output_roles(output)))
    _note_if_not_smaller(report)
    report.shipped = shipped_of_staged(plan, output, float_bytes=report.input_bytes)
    if report.form == Form.PORTABLE and Artifact.SHARED in report.artifacts:
        report.notes.append(ORT_FORMAT_NOTE)
    return report


def validate(reference: ModelLike, candidate: ModelLike, data: Any = None, *, shapes: dict | None = None,
             latency: bool = False, tolerance: tuple[float, float] | None = None,
             metric: str | None = None, samples: int = MAX_SAMPLES) -> Comparison:
    """Compare two models' outputs on the same data (synthesized from shapes when none is given);
    tolerance (atol, rtol): also count the values outside it; `metric` names the task kind (e.g.
    'probability:0.5', see tasks.py), else each output's is detected."""
    ref, cand = _as_model(reference), _as_model(candidate)
    task = parse_metric(metric) if metric else None
    comparison = compare_models(ref, cand, prepare_data(ref, data, shapes=shapes, samples=samples), latency=latency,
                                tolerance=tolerance, task=task)
    for which, model in (("reference", reference), ("candidate", candidate)):
        if not isinstance(model, onnx.ModelProto):
            setattr(comparison, f"{which}_bytes", file_bytes(model))
    return comparison


def unpack(model: ModelLike) -> onnx.ModelProto:
    """The portable form of a packed model: bit-packed codes + unpacking ops + Gather(codebook) per packed weight."""
    out = unpack_model(_as_model(model))
    check_runnable(out, "the unpacked model")
    return out


def unpack_file(source: str | os.PathLike, output: str | os.PathLike) -> tuple[int, int]:
    """Unpack a packed model file into `output` (atomically); returns (bytes before, bytes after)."""
    with OutputPlan(output_roles(output), input_roles(source)).check() as plan:
        model = load_model(source, max_opset=max_runnable_opset())
        if not uses_domain(model):
            log.warning("'%s' holds no packed weights; writing it unchanged", source)
        save_model(unpack(model), output, plan=plan)
        after = plan.staged_bytes(*(role.path for role in output_roles(output)))
        plan.commit()
    return file_bytes(source), after


DISTINCT_LIMIT = 1 << 24


def _zero_fraction(array: np.ndarray, chunk: int = 1 << 22) -> float:
    """The fraction of zeros, counted by chunks (no array-sized mask)."""
    flat = array.reshape(-1)
    nonzero = sum(int(np.count_nonzero(flat[i:i + chunk])) for i in range(0, flat.size, chunk))
    zeros = flat.size - nonzero
    return zeros / flat.size if flat.size else 0.0


def inspect(model: ModelLike, *, min_elements: int = 256) -> dict:
    """File size, opsets and one entry per weight (with sparsity and distinct values)."""
    proto = _as_model(model)
    rows = []
    weights = find_weights(proto, min_elements=min_elements)
    for info, array in zip(weights, get_arrays(proto, weights)):
        row = info.as_dict()
        row["sparsity"] = _zero_fraction(array)
        # distinct values need a sorted copy: counted up to DISTINCT_LIMIT elements (a 3 GB weight took a minute
        # and 7.7 GB), None above
        row["distinct"] = int(np.unique(array).size) if array.size <= DISTINCT_LIMIT else None
        rows.append(row)

    floats = [r for r in rows if r["dtype"] in ("float32", "float16", "bfloat16", "float64")]
    return {
        "path": None if isinstance(model, onnx.ModelProto) else str(model),
        "file_bytes": proto.ByteSize() if isinstance(model, onnx.ModelProto) else file_bytes(model),
        "opsets": {(e.domain or "ai.onnx"): e.version for e in proto.opset_import},
        "ir_version": proto.ir_version,
        "packed": uses_domain(proto),
        "total_params": int(sum(int(np.prod(r["shape"], dtype=np.int64)) for r in floats)),
        "float_weight_bytes": int(sum(r["bytes"] for r in floats)),
        "weights": rows,
        "packed_weights": _packed_rows(proto),
    }


def _packed_rows(proto: onnx.ModelProto) -> list[dict]:
    """Per packed weight: stored bytes and bits per weight of each stream (empty for portable models)."""

    return packed_weights(proto)
