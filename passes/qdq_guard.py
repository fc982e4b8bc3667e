"""Static int8 that cannot break a model silently: check the result, find the activations that
break it, keep them float, and fall back to weight-only int8 when that is not enough.

The check runs the float and the quantized model on calibration samples: every class-score
output (see :class:`onnxcompress.metrics.OutputMetrics`) must keep `agreement` of its top-1
decisions, every other output an SQNR of at least `min_sqnr` dB.

Which activations are responsible is measured, not guessed: each quantized activation is
quantized ALONE in the float model and the outputs' SQNR measured (the per-layer table's
local SQNR, DQ(Q(t)) against t, cannot see an outlier: one huge channel carries the signal
energy while the others round to zero). The worst are kept float first, 1, 2, 4... at a time,
until the check holds.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxcompress.graphs import NameScope
from onnxcompress.data import model_inputs
from onnxcompress.metrics import Comparison, compare_models, compare_outputs
from onnxcompress.quantmath import TYPES
from onnxcompress.runtime import make_session, median_latency, run
from onnxcompress.statistics import Collector

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fidelity:
    holds: bool
    worst: str  # the output furthest from its bound, e.g. "top-1 agreement 0.812 on 'y'"


def fidelity(comparison: Comparison, *, agreement: float, min_sqnr: float) -> Fidelity:
    """Whether every output keeps its bound, and the worst output's figure."""
    worst, worst_margin = "", math.inf
    for o in comparison.outputs:
        if o.top1_agreement is not None:
            margin, text = o.top1_agreement - agreement, f"top-1 agreement {o.top1_agreement:.4f} on '{o.name}'"
        else:
            margin, text = (o.sqnr_db - min_sqnr) / 100.0, f"SQNR {o.sqnr_db:.1f} dB on '{o.name}'"
        if margin < worst_margin:
            worst, worst_margin = text, margin
    return Fidelity(worst_margin >= 0, worst)


def check(reference: onnx.ModelProto, candidate: onnx.ModelProto, data, *, agreement: float,
          min_sqnr: float) -> Fidelity:
    return fidelity(compare_models(reference, candidate, data), agreement=agreement, min_sqnr=min_sqnr)


def single_qdq(model: onnx.ModelProto, name: str, scale: float, zero: int, qtype: str) -> onnx.ModelProto:
    """A copy of the float `model` with only the activation `name` passed through Q -> DQ."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph, scope, t = out.graph, NameScope(out), TYPES[qtype]
    s_name, z_name, q_name = scope.fresh(f"{name}_scale"), scope.fresh(f"{name}_zero_point"), scope.fresh(f"{name}_q")
    graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), s_name),
                              numpy_helper.from_array(np.array(zero, t.np_dtype), z_name)])
    if name in {i.name for i in graph.input}:
        source, target = name, scope.fresh(f"{name}_dq")
        for node in graph.node:
            node.input[:] = [target if x == name else x for x in node.input]
        position = 0
    else:
        source, target = scope.fresh(f"{name}_float"), name
        position = next(k for k, n in enumerate(graph.node) if name in n.output)
        producer = graph.node[position]
        producer.output[:] = [source if x == name else x for x in producer.output]
        position += 1
    graph.node.insert(position, helper.make_node("QuantizeLinear", [source, s_name, z_name], [q_name]))
    graph.node.insert(position + 1, helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [target]))
    return out


def sensitivities(reference: onnx.ModelProto, tensors: dict[str, tuple[float, int]], qtype: str, data,
                  max_probes: int, *, collector: Collector | None = None) -> list[tuple[str, float]]:
    """(activation, worst output SQNR in dB with it alone quantized), worst first. With more than
    `max_probes` activations, the ones whose range is widest against their RMS are probed (the float
    model's statistics through `collector`; each probe is a graph of its own, one session each)."""
    collector = collector or Collector()
    names = list(tensors)
    if len(names) > max_probes:
        names = _widest(reference, names, data, collector)[:max_probes]
    outputs = [o.name for o in reference.graph.output]
    want = [[chunk[n] for n in outputs] for chunk in collector.stream(reference, data, outputs, fixed_weights=True)]  # once
    found = []
    for name in names:
        scale, zero = tensors[name]
        probe = single_qdq(reference, name, scale, zero, qtype)
        got = run(make_session(probe), data, probe, output_names=outputs)
        found.append((name, min(o.sqnr_db for o in compare_outputs(outputs, want, got))))
        log.debug("qdq: %s alone quantized: %.1f dB at the outputs", name, found[-1][1])
    found.sort(key=lambda item: item[1])
    return found


def _widest(model: onnx.ModelProto, names: list[str], data, collector: Collector) -> list[str]:
    """`names` by max |t| / rms(t) over `data`, largest first (outlier-heavy activations first)."""
    peak, energy, count = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0), dict.fromkeys(names, 0)
    for values in collector.stream(model, data, names, fixed_weights=True):
        for n in names:
            v = np.asarray(values[n], dtype=np.float64)
            peak[n] = max(peak[n], float(np.max(np.abs(v))) if v.size else 0.0)
            energy[n] += float(np.sum(v * v))
            count[n] += v.size
    crest = {n: peak[n] / math.sqrt(energy[n] / count[n]) if energy[n] > 0 else 0.0 for n in names}
    return sorted(names, key=lambda n: -crest[n])


def latency_ratio(reference: onnx.ModelProto, quantized: onnx.ModelProto, data, rounds: int = 3) -> float:
    """Median int8 / float seconds per call on the first chunk of `data`, the two sessions interleaved."""
    feed, _ = next(iter(data.chunks(model_inputs(reference), max_batch=64)))
    ref, cand = make_session(reference), make_session(quantized)
    times = [(median_latency(ref, feed, repeat=10), median_latency(cand, feed, repeat=10)) for _ in range(rounds)]
    return float(np.median([c for _, c in times]) / max(np.median([r for r, _ in times]), 1e-12))
