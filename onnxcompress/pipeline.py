"""Passes and the manager that runs them: ordered, timed, validated, reported.

A pass is a small class with a typed keyword-only ``Config`` dataclass; ``requires`` raises
PreconditionError when what it needs is missing, ``call`` rewrites ``ctx.model`` and returns a
PassResult, ``ensures`` checks the result. Passes talk to each other only through the typed
fields of :class:`Context`.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import time
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx

from . import external
from .codebook import SharedWeight
from .data import Dataset
from .graphs import drop_initializer_inputs
from .errors import BugError, OnnxCompressError, PassError, RecipeError
from .layer_errors import LayerError
from .metrics import Comparison, compare_models
from .tasks import TaskMetric
from .runtime import foreign_domains
from .statistics import Collector
from .packed import Layout, PackedWeight
from .parallel import Executor
from .weights import NONFINITE, WeightInfo, find_weights, nonfinite_weights

log = logging.getLogger(__name__)


@dataclass
class WeightRecord:
    """What one pass did to one weight, for the report."""

    name: str
    pass_name: str
    action: str  # e.g. "shared 5 bits", "pruned 92%", "skipped"
    bytes_before: int | None = None
    bytes_after: int | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """Everything passes share. Fields below `model` are filled by passes, each declared here."""

    original: onnx.ModelProto
    model: onnx.ModelProto
    data: Dataset | None = None  # calibration data (None: passes fall back to data-free methods)
    eval_data: Dataset | None = None  # validation data (searches measure fidelity on it)
    form: str = "portable"  # "portable" | "packed"
    jobs: int | Executor = 1  # cores for per-weight work, or an executor (onnxcompress.parallel)
    progress: bool = True
    # prune -> share, sparse: True where a weight entry is kept
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    # share -> sparse, entropy, packed form: the codebook form of each shared weight
    shared: dict[str, SharedWeight] = field(default_factory=dict)
    # sparse -> entropy: how each shared weight's codes are laid out in the packed form
    layouts: dict[str, Layout] = field(default_factory=dict)
    # entropy -> packed form, report: the encoded blob and stream sizes of each shared weight
    packed: dict[str, PackedWeight] = field(default_factory=dict)
    # calibrate -> qdq: activation statistics (a passes.calibrate.CalibrationResult)
    calibration: Any = None
    # qdq -> report: SQNR of every quantized tensor against the float model, worst first
    layer_errors: list[LayerError] = field(default_factory=list)
    # bitwidth -> share/prune/qdq: per-weight settings chosen by the search
    plan: dict[str, dict[str, Any]] = field(default_factory=dict)
    # a pass that rewrites the graph exactly (BatchNorm folded into its Conv) -> later layer fits:
    # the original with the same rewrite, so each layer's fit target is its own output there
    rewritten_original: onnx.ModelProto | None = None
    # the manager -> every pass: weights holding NaN or Inf on purpose (a -inf attention mask, a scalar
    # -inf in a Max); they stay float, marked skipped in weights()
    nonfinite: set[str] = field(default_factory=set)
    records: list[WeightRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # every pass's runs of the model for statistics: sessions cached per graph for the whole run
    statistics: Collector = field(default_factory=Collector)

    @property
    def reference(self) -> onnx.ModelProto:
        """The model whose layer outputs the fits aim for: the original, as exactly rewritten so far."""
        return self.rewritten_original if self.rewritten_original is not None else self.original

    def weights(self, min_elements: int = 0) -> list[WeightInfo]:
        found = find_weights(self.model, min_elements=min_elements)
        for info in found:
            if info.name in self.nonfinite and info.skip is None:
                info.skip = NONFINITE
        return found

    def record(self, *args, **kwargs) -> WeightRecord:
        rec = WeightRecord(*args, **kwargs)
        self.records.append(rec)
        return rec

    def note(self, text: str) -> None:
        log.warning("%s", text)
        self.notes.append(text)


@dataclass
class PassResult:
    modified: bool
    summary: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base class of every pass: subclass, set `name` and `Config`, implement `call`."""

    name: ClassVar[str] = "pass"

    @dataclass(kw_only=True)
    class Config:
        pass

    def __init__(self, config: Any = None, **options):
        if config is not None and options:
            raise TypeError("give a config object or keyword options, not both")
        self.config = config if config is not None else make_config(self.Config, options, self.name)

    def requires(self, ctx: Context) -> None:
        """Raise PreconditionError when the context lacks what this pass needs."""

    def call(self, ctx: Context) -> PassResult:
        raise NotImplementedError

    def ensures(self, ctx: Context, result: PassResult) -> None:
        """Raise when the result breaks this pass's invariants."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def make_config(config_type: type, options: dict[str, Any], pass_name: str):
    """Build a config dataclass from a recipe's options, naming a misspelled option's closest match."""
    fields = {f.name: f for f in dataclasses.fields(config_type)}
    hints = typing.get_type_hints(config_type)
    for key, value in options.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            suggestion = f"; did you mean '{close[0]}'?" if close else f"; options are {sorted(fields)}"
            raise RecipeError(f"pass '{pass_name}' has no option '{key}'{suggestion}")
        _check_type(pass_name, key, value, hints.get(key))
    try:
        return config_type(**options)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"pass '{pass_name}': {e}") from e


def _check_type(pass_name: str, key: str, value: Any, hint: Any) -> None:
    if hint is None:
        return
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", ())) else (hint,)
    for kind in allowed:
        kind = typing.get_origin(kind) or kind
        if kind is type(None) and value is None:
            return
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return
        if kind is typing.Literal:
            continue
        if isinstance(kind, type) and isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            return
    literal = [a for k in allowed if typing.get_origin(k) is typing.Literal for a in typing.get_args(k)]
    if value in literal:
        return
    expected = " or ".join(repr(a) for a in literal) if literal else getattr(hint, "__name__", str(hint))
    raise RecipeError(f"pass '{pass_name}': option '{key}' must be {expected}, got {value!r}")


@dataclass
class PassTiming:
    name: str
    seconds: float
    modified: bool
    summary: dict[str, Any]
    validation: Comparison | None = None


@dataclass
class Report:
    recipe: str
    passes: list[PassTiming] = field(default_factory=list)
    weights: list[WeightRecord] = field(default_factory=list)
    validation: Comparison | None = None
    notes: list[str] = field(default_factory=list)
    input_bytes: int | None = None
    output_bytes: int | None = None
    form: str = "portable"
    layer_errors: list[LayerError] = field(default_factory=list)  # per quantized tensor, worst first
    shipped: Any = None  # the output file's shipped.ShippedSize (disk, gzip, brotli, resident), when written

    @property
    def ratio(self) -> float | None:
        return self.input_bytes / self.output_bytes if self.input_bytes and self.output_bytes else None

    def as_dict(self) -> dict:
        return {
            "recipe": self.recipe, "form": self.form, "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes, "ratio": self.ratio,
            "shipped": self.shipped.as_dict() if self.shipped is not None else None,
            "passes": [{"name": p.name, "seconds": p.seconds, "modified": p.modified, "summary": p.summary,
                        "validation": p.validation.as_dict() if p.validation else None} for p in self.passes],
            "weights": [dataclasses.asdict(w) for w in self.weights],
            "validation": self.validation.as_dict() if self.validation else None,
            "notes": self.notes,
            "layer_errors": [dataclasses.asdict(e) for e in self.layer_errors],
        }


class PassManager:
    """Runs an explicit, ordered list of passes on a copy of the model.

    validate: "end" compares the result with the original in onnxruntime once, "each" after
    every pass (to find the pass that broke fidelity), "none" skips it.
    """

    def __init__(self, passes: list[Pass], *, recipe: str = "custom", validate: str = "end",
                 form: str = "portable", jobs: int = 1, progress: bool = True,
                 tolerance: tuple[float, float] | None = None, task: TaskMetric | None = None):
        if validate not in ("end", "each", "none"):
            raise ValueError(f"validate must be 'end', 'each' or 'none', not {validate!r}")
        self.passes, self.recipe, self.validate = passes, recipe, validate
        self.form, self.jobs, self.progress = form, jobs, progress
        self.tolerance = tolerance  # (atol, rtol) the validation also counts values outside of (a gate's)
        self.task = task  # the task kind the user chose for the validation (None: detected per output)

    def run(self, model: onnx.ModelProto, data: Dataset | None = None, eval_data: Dataset | None = None,
            plan: dict[str, dict[str, Any]] | None = None) -> tuple[onnx.ModelProto, Report]:
        """Run the passes on a copy of `model`; `plan` presets ctx.plan (per-weight settings)."""
        working = onnx.ModelProto()
        working.CopyFrom(model)
        ctx = Context(original=model, model=working, data=data, eval_data=eval_data, form=self.form, jobs=self.jobs,
                      progress=self.progress)
        ctx.plan = {name: dict(settings) for name, settings in (plan or {}).items()}
        if external.is_streamed(working):  # big arrays passes hand on stay on disk, like the weights
            ctx.masks, ctx.shared = external.SpillingDict(working), external.SpillingDict(working)
        ctx.nonfinite = set(nonfinite_weights(working))
        for name in sorted(ctx.nonfinite):
            ctx.record(name, "load", f"kept float: {NONFINITE}")
        if ctx.nonfinite:
            ctx.note(f"{len(ctx.nonfinite)} float tensor(s) hold NaN or Inf ({', '.join(sorted(ctx.nonfinite)[:5])}"
                     f"{', ...' if len(ctx.nonfinite) > 5 else ''}): every pass keeps them float")
        if dropped := drop_initializer_inputs(working):
            ctx.note(f"{len(dropped)} initializer(s) were also listed as graph inputs ({', '.join(dropped[:5])}"
                     f"{', ...' if len(dropped) > 5 else ''}), defaults a caller could override: they are treated as "
                     "the constants they are and are no longer inputs of the output, so they can be compressed")
        report = Report(recipe=self.recipe, form=self.form)
        done: list[str] = []
        check_data = eval_data or data
        if self.validate != "none" and check_data is not None and (custom := foreign_domains(model)):
            check_data = None  # onnxruntime cannot run these ops without the user's library
            ctx.note(f"validation skipped: the model uses custom ops of {sorted(custom)}, which onnxruntime runs "
                     "only with their library registered; compare the models yourself with it loaded")
        for p in self.passes:
            start = time.perf_counter()
            try:
                p.requires(ctx)
                result = p.call(ctx)
                p.ensures(ctx, result)
            except OnnxCompressError as e:
                raise PassError(p.name, list(done), e) from e
            except BugError as e:  # a failed postcondition: ours to fix, not the user's
                raise BugError(f"in pass '{p.name}'" + (f", after passes {done}" if done else "") + f": {e}") from e
            except Exception as e:  # a bug in a pass: keep the traceback as the cause
                raise PassError(p.name, list(done), RuntimeError(f"{type(e).__name__}: {e}")) from e
            timing = PassTiming(p.name, time.perf_counter() - start, result.modified, result.summary)
            log.info("pass %s: %.2f s, %s", p.name, timing.seconds, result.summary)
            if self.validate == "each" and check_data is not None:
                timing.validation = self._validate(ctx, check_data, p.name, done)
            report.passes.append(timing)
            done.append(p.name)
        external.check_model(ctx.model, full_check=ctx.model.ByteSize() < 2**31 - 1)
        if self.validate != "none" and check_data is not None:
            last = report.passes[-1].validation if report.passes else None
            report.validation = last or self._validate(ctx, check_data, "end", done)
        report.weights, report.notes = ctx.records, ctx.notes
        report.layer_errors = ctx.layer_errors
        return ctx.model, report

    def _validate(self, ctx: Context, data: Dataset, where: str, done: list[str]) -> Comparison:
        try:
            return compare_models(ctx.original, ctx.model, data, tolerance=self.tolerance, task=self.task)
        except OnnxCompressError as e:
            raise PassError(where, list(done), e) from e
