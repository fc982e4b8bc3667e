"""Per-layer error of a quantized model: which tensor lost the signal.

For every quantized activation t, two numbers over the same data, streamed chunk by chunk:

- ``sqnr_db``: t in the quantized model (its DequantizeLinear output) against t in the float
  model, i.e. the error accumulated up to and including t;
- ``local_sqnr_db``: t's own Q/DQ step, DQ(Q(x)) against x in the quantized model, i.e. the
  rounding and clipping added at t alone (low: a bad range or a heavy-tailed tensor).

SQNR = 10 log10(sum ref^2 / sum (ref - approx)^2). Sorted worst first, so a user sees what to
exclude or give more bits.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from onnxcompress.numerics.measures import sqnr_db
from onnxcompress.runtime.statistics import Collector


@dataclass
class LayerError:
    """How much signal one quantized tensor kept, in dB (higher is better)."""

    tensor: str
    node: str  # the node producing the tensor in the float model
    op_type: str
    sqnr_db: float  # against the float model: error accumulated up to here
    local_sqnr_db: float | None = None  # this tensor's own quantization step only


class _Acc:
    __slots__ = ("signal", "noise")

    def __init__(self):
        self.signal = self.noise = 0.0

    def add(self, ref: np.ndarray, approx: np.ndarray) -> None:
        ref = np.asarray(ref, dtype=np.float64).ravel()
        diff = ref - np.asarray(approx, dtype=np.float64).ravel()
        finite = np.isfinite(diff)
        self.signal += float(ref[finite] @ ref[finite])
        self.noise += float(diff[finite] @ diff[finite])

    @property
    def db(self) -> float:
        return sqnr_db(self.signal, self.noise)


def _pre_quantize(model: onnx.ModelProto, names: Mapping[str, str]) -> dict[str, str]:
    """DQ output name -> the float tensor its QuantizeLinear reads."""
    made = {o: n for n in model.graph.node for o in n.output}
    found = {}
    for target in names.values():
        dq = made.get(target)
        if dq is not None and dq.op_type == "DequantizeLinear":
            q = made.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                found[target] = q.input[0]
    return found


def measure_layer_errors(reference: onnx.ModelProto, quantized: onnx.ModelProto, data,
                         renamed: Mapping[str, str], labels: Mapping[str, tuple[str, str]],
                         *, max_batch: int = 64, collector: Collector | None = None) -> list[LayerError]:
    """LayerError for every tensor in `renamed` (float name -> DQ output name), worst first; both models
    run on the same chunks through `collector`."""
    if not renamed:
        return []
    pre = _pre_quantize(quantized, renamed)
    ref_names = list(renamed)
    q_names = list(dict.fromkeys(list(renamed.values()) + list(pre.values())))
    total = {n: _Acc() for n in ref_names}
    local = {n: _Acc() for n in ref_names}
    collector = collector or Collector()
    # weights constant (folded, prepacked), as in the sessions users deploy
    for ref, cand in zip(collector.stream(reference, data, ref_names, max_batch=max_batch, fixed_weights=True),
                         collector.stream(quantized, data, q_names, max_batch=max_batch, fixed_weights=True)):
        for name in ref_names:
            target = renamed[name]
            total[name].add(ref[name], cand[target])
            if target in pre:
                local[name].add(cand[pre[target]], cand[target])
    rows = [LayerError(name, *labels.get(name, ("?", "?")), total[name].db,
                       local[name].db if renamed[name] in pre else None) for name in ref_names]
    rows.sort(key=lambda r: (r.sqnr_db, r.local_sqnr_db if r.local_sqnr_db is not None else math.inf))
    return rows
