"""Static int8 that cannot break a model silently: check the result, find the activations that
break it, keep them float, and fall back to weight-only int8 when that is not enough.

The check runs the float and the quantized model on calibration samples: every output measured
by a task (the kind the user chose with --metric, or the detected kind of a class-score output:
top-1 per position, or the whole argmax sequence of a tagger, see :mod:`onnxcompress.runtime.tasks`) must
keep `agreement` of its task's answers, every other output an SQNR of at least `min_sqnr` dB.

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
from typing import Any, Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxcompress.formats.qdq_dynamic import DYNAMIC_MIN_OPSET
from onnxcompress.graph.data import model_inputs
from onnxcompress.graph.edit import NameScope
from onnxcompress.graph.model import opset_of
from onnxcompress.numerics.quantmath import TYPES
from onnxcompress.runtime.metrics import compare_models, compare_outputs, Comparison
from onnxcompress.runtime.sessions import make_session, median_latency, run
from onnxcompress.runtime.statistics import Collector
from onnxcompress.runtime.tasks import TaskMetric

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fidelity:
    holds: bool
    worst: str  # the output furthest from its bound, e.g. "top-1 agreement 0.812 on 'y'"
    margin: float = math.inf  # the worst output's figure minus its bound (agreement; dB / 100 for SQNR)
    sqnr_db: float = math.inf  # the lowest output SQNR (ranks candidates whose agreements tie)


def fidelity(comparison: Comparison, *, agreement: float, min_sqnr: float, chosen: bool = False) -> Fidelity:
    """Whether every output keeps its bound, and the worst output's figure; `chosen`: the comparison's
    kinds come from the user's task, whose budgeted outputs are bounded by their task agreement."""
    worst, worst_margin = "", math.inf
    for o in comparison.outputs:
        if o.budgeted and o.agreement is not None and (chosen or o.top1_agreement is not None):
            margin, text = o.agreement - agreement, f"{o.task} agreement {o.agreement:.4f} on '{o.name}'"
        elif o.top1_agreement is not None and not (o.task or "").startswith("regression"):  # features: no argmax
            margin, text = o.top1_agreement - agreement, f"top-1 agreement {o.top1_agreement:.4f} on '{o.name}'"
        else:
            margin, text = (o.sqnr_db - min_sqnr) / 100.0, f"SQNR {o.sqnr_db:.1f} dB on '{o.name}'"
        if margin < worst_margin:
            worst, worst_margin = text, margin
    return Fidelity(worst_margin >= 0, worst, worst_margin, min((o.sqnr_db for o in comparison.outputs), default=math.inf))


def check(reference: onnx.ModelProto, candidate: onnx.ModelProto, data, *, agreement: float,
          min_sqnr: float, task: TaskMetric | None = None) -> Fidelity:
    """The bound on `data`; `task` is the kind the user chose (None: each output's kind detected)."""
    return fidelity(compare_models(reference, candidate, data, task=task), agreement=agreement, min_sqnr=min_sqnr,
                    chosen=task is not None)


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
    from onnxcompress.runtime.capture import capture

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


@dataclass(frozen=True)
class Bound:
    """The fidelity bound on calibration data: `agreement` of each task output's answers, `min_sqnr` dB on
    the other outputs; `task` is the kind the user chose (None: each output's kind detected)."""

    agreement: float
    min_sqnr: float
    task: TaskMetric | None = None

    def check(self, reference: onnx.ModelProto, candidate: onnx.ModelProto, data) -> Fidelity:
        return check(reference, candidate, data, agreement=self.agreement, min_sqnr=self.min_sqnr, task=self.task)


@dataclass(frozen=True)
class Candidates:
    """How fall_back makes and judges its candidates: `build(dynamic, keep) -> summary` writes one into
    ctx.model (`keep`: weight name -> why it stays float), its records are those of `pass_name` from
    `first_record` on; each is checked against `bound` on `data` (None: not checked) beside `reference`."""

    build: Callable[[bool, dict[str, str]], dict]
    reference: onnx.ModelProto
    data: Any
    bound: Bound
    pass_name: str
    first_record: int

    def check(self, ctx, data=None) -> Fidelity:
        return self.bound.check(self.reference, ctx.model, self.data if data is None else data)

    def sizes(self, ctx) -> dict[str, int]:
        """Bytes before of each weight the last candidate made smaller."""
        return {r.name: r.bytes_before for r in ctx.records[self.first_record:] if r.pass_name == self.pass_name
                and r.bytes_before and r.bytes_after is not None and r.bytes_after < r.bytes_before}


def fall_back(ctx, made: Candidates, cfg: Any, missed: str) -> dict:
    """Where static int8 misses the bound: dynamic int8 MatMul/Gemm (cfg.fallback "dynamic") if that holds it,
    else weight-only int8 with the weights that break it most kept float, 1, 2, 4... of them, while they
    hold at most cfg.max_float_weights of the quantized weights' bytes; else the candidate measured closest
    to the bound. Each weight is ranked by the outputs with it alone in int8 (the task's agreement, then the
    lowest output SQNR), smallest weights first, cfg.max_probes of them. (`cfg` is the qdq pass's QdqConfig,
    not imported: the pass imports this module.)"""
    tried: list[tuple[Fidelity, bool, dict[str, str]]] = []
    if cfg.fallback == "dynamic" and opset_of(made.reference) >= DYNAMIC_MIN_OPSET:  # DynamicQuantizeLinear exists
        rest = made.build(True, {})
        if rest["dynamic"]:
            found = made.check(ctx)
            if found.holds:
                ctx.note(missed + f"dynamic int8 (ranges at run time) for {rest['dynamic']} MatMul/Gemm instead "
                         f"({found.worst}), weight-only int8 elsewhere")
                return rest
            tried.append((found, True, {}))
    made.build(False, {})
    found = made.check(ctx) if made.data is not None else Fidelity(True, "not checked")
    tried.append((found, False, {}))
    if not found.holds:
        tried += _float_weights(ctx, made, cfg)
    best, was_dynamic, keep = max(tried, key=lambda t: (t[0].margin, t[0].sqnr_db))
    rest = made.build(was_dynamic, keep)  # ctx.model holds the last model built (a probe, or another candidate)
    how = ("dynamic int8 MatMul/Gemm and weight-only int8 elsewhere" if was_dynamic else "weight-only int8")
    kept = f" with {len(keep)} weight(s) kept float ({', '.join(keep)})" if keep else ""
    if best.holds:
        ctx.note(missed + f"{how}{kept} instead ({best.worst})")
    else:
        ctx.note(missed + f"{how}{kept} instead, the closest to the bound of {len(tried)} measured ({best.worst})")
    return rest


def _float_weights(ctx, made: Candidates, cfg: Any) -> list[tuple[Fidelity, bool, dict[str, str]]]:
    """Weight-only int8 candidates with the weights that move the outputs most alone kept float, 1, 2, 4...
    of them within the byte budget, until one holds the bound; returns them as measured."""
    sizes = made.sizes(ctx)
    budget = cfg.max_float_weights * sum(sizes.values())
    names = sorted((n for n in sizes if sizes[n] <= budget), key=lambda n: sizes[n])[:cfg.max_probes]
    probes = []
    for name in names:
        made.build(False, {other: "probe" for other in sizes if other != name})
        alone = made.check(ctx, made.data.limit(cfg.probe_samples))
        probes.append((alone.margin, alone.sqnr_db, name, alone.worst))
        log.debug("qdq: weight %s alone in int8: %s", name, alone.worst)
    probes.sort()
    tried = []
    count = 1
    for _ in range(cfg.guard_rounds):
        worst = probes[:count]
        if not worst or sum(sizes[n] for _, _, n, _ in worst) > budget:
            break
        keep = {n: f"in int8 alone it moves the outputs most ({text}, {min(cfg.probe_samples, len(made.data))} "
                   "calibration samples)" for _, _, n, text in worst}
        made.build(False, keep)
        found = made.check(ctx)
        tried.append((found, False, keep))
        if found.holds or count >= len(probes):
            break
        count *= 2
    return tried
