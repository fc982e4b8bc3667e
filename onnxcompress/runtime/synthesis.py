"""Synthesized inputs the original model actually runs on: sizes for its symbolic dims, found up front.

Without --data or --shape, a symbolic dim is first set to 1. Many models do not run that way (a
feature axis the first MatMul or LSTM fixes, an image too small for the pooling), and finding out
after minutes of compression helps nobody. So before any pass, a model with symbolic dims (or
sizes given with --shape) runs once on one synthesized feed; where it fails, the symbolic dims are tried one at a time with each size the
model's own weights have (a contraction axis equals some weight's dim), then all together along a
ladder of common sizes (image sides). The first assignment onnxruntime runs is used, and the
report says which; when none runs (at most MAX_TRIES runs, MAX_SECONDS), the user gets one line asking
for --shape or --data before any work is done. A model whose dims are all declared is not run here.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from onnxcompress.errors import DataError
from onnxcompress.graph.data import Dataset, InputSpec
from onnxcompress.graph.synthesized import synthesis_shapes, synthesize
from onnxcompress.graph.edit import all_tensors
from onnxcompress.numerics.limits import MAX_SYNTH_ELEMENTS, element_count
from onnxcompress.runtime.sessions import first_line, foreign_domains, make_session

log = logging.getLogger(__name__)

LADDER = (8, 16, 32, 64, 128, 224, 256)  # sizes tried for every free dim at once (image sides, lengths)
MAX_WEIGHT_SIZES = 64  # the most frequent distinct weight dims tried per free dim
MAX_WEIGHT_DIM = 65536
MAX_TRIES = 400  # onnxruntime runs of one small feed each
MAX_SECONDS = 60.0  # and at most this long (a large model's runs are slow)


def runnable_data(model: onnx.ModelProto, specs: Sequence[InputSpec], *,
                  shapes: Mapping[str, tuple[int, ...]] | None = None, n: int = 8) -> Dataset:
    """Synthesized feeds (as graph.synthesized.synthesize) with symbolic dims the model runs with.

    DataError, before any work, when the model runs with none of the sizes tried."""
    sizes = synthesis_shapes(specs, shapes)
    if foreign_domains(model):  # other libraries' ops: onnxruntime cannot run it here (validation is skipped too)
        return synthesize(specs, shapes=shapes, n=n)
    free = [(s.name, axis) for s in specs if s.fed and s.name not in (shapes or {}) and s.shape is not None
            for axis, d in enumerate(s.shape) if not (isinstance(d, int) and d > 0)]
    if not free and not shapes:  # every dim declared: nothing to guess (a model that cannot run fails at validation)
        return synthesize(specs, shapes=shapes, n=n)
    session = make_session(model)
    error = _fails(session, specs, sizes)
    if error is None:
        return synthesize(specs, shapes=shapes, n=n)
    chosen = _search(session, specs, sizes, free, _weight_sizes(model)) if free else None
    if chosen is None:
        hint = (f"give the sizes of the symbolic dims of {sorted({name for name, _ in free})} with --shape "
                f"{free[0][0]}=... or give --data" if free else "check the --shape sizes, or give --data")
        raise DataError(f"the model does not run on synthesized inputs ({first_line(error)}); {hint}")
    given = {name: chosen[name] for name in {name for name, _ in free}}
    data = synthesize(specs, shapes={**(shapes or {}), **given}, n=n)
    data.guessed = sorted(given)
    data.note = ("synthesized inputs: symbolic dims set to "
                 + ", ".join(f"{name}={','.join(map(str, shape))}" for name, shape in sorted(given.items()))
                 + " (the first sizes the model ran with; give --shape or --data to choose)")
    log.warning("%s", data.note)
    return data


def _search(session, specs: Sequence[InputSpec], sizes: dict[str, tuple[int, ...]], free: list[tuple[str, int]],
            weight_sizes: list[int]) -> dict[str, tuple[int, ...]] | None:
    """Sizes that run, trying at most MAX_TRIES: for each size of the leading (batch or time) axes, 1 then the
    ladder, each other free dim alone over the weights' sizes, then all of them together along the ladder."""
    leading = [(name, axis) for name, axis in free if axis == 0]
    rest = [(name, axis) for name, axis in free if axis > 0]
    tries, deadline = 0, time.monotonic() + MAX_SECONDS
    for first in (1,) + (LADDER if leading else ()):
        base = _with(sizes, leading, first)
        if base is None:
            break
        trials = [base] + [_with(base, [dim], size) for dim in rest for size in weight_sizes] + \
                 [_with(base, rest, size) for size in LADDER if rest]
        for trial in trials:
            if trial is None:
                continue
            tries += 1
            if tries > MAX_TRIES or time.monotonic() > deadline:
                return None
            if _fails(session, specs, trial) is None:
                return trial
    return None


def _with(sizes: dict[str, tuple[int, ...]], dims: list[tuple[str, int]], size: int
          ) -> dict[str, tuple[int, ...]] | None:
    """`sizes` with each of `dims` set to `size`; None when the feeds would exceed what we synthesize."""
    out = {name: list(shape) for name, shape in sizes.items()}
    for name, axis in dims:
        out[name][axis] = size
    shaped = {name: tuple(shape) for name, shape in out.items()}
    return shaped if sum(element_count(s) for s in shaped.values()) <= MAX_SYNTH_ELEMENTS else None


def _fails(session, specs: Sequence[InputSpec], sizes: dict[str, tuple[int, ...]]) -> BaseException | None:
    """None when the session runs one synthesized feed of these sizes and no output is empty, else the error."""
    feed = synthesize(specs, shapes=sizes, n=1).feed(0, specs)
    try:
        outputs = session.run(None, feed)
    except Exception as e:  # onnxruntime raises its own exception types
        return e
    empty = [o.name for o, value in zip(session.get_outputs(), outputs) if np.asarray(value).size == 0]
    return ValueError(f"output {empty[0]} is empty at these sizes") if empty else None


def _weight_sizes(model: onnx.ModelProto) -> list[int]:
    """Distinct dims (> 1) of the model's tensors, the most frequent first."""
    counts = Counter(d for t in all_tensors(model) if t.data_type != onnx.TensorProto.STRING
                     for d in t.dims if 1 < d <= MAX_WEIGHT_DIM)
    return [size for size, _ in counts.most_common(MAX_WEIGHT_SIZES)]
