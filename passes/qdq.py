"""QuantizeLinear/DequantizeLinear insertion in the layout onnxruntime fuses into integer kernels.

Static mode (recipe ``int8``): every supported node gets its float activation inputs as
Q -> DQ pairs (uint8 by default, ranges from the calibrate pass), its weight as an int8
initializer -> DQ (symmetric, per output channel), its bias as int32 -> DQ with scale
s_x * s_w, and its output as Q -> DQ, so onnxruntime sees DQ -> op -> Q and runs QLinearConv,
QGemm, QLinearMatMul, QLinearAdd... A Relu/Clip right after a node is a fusion boundary: the
Q/DQ goes after the activation, never between. Pooling and reshaping ops reuse their input's
scale. Ops without an integer kernel stay in float, with the reason in the report. Every other float
weight (Constant nodes, If/Loop bodies, LSTM/GRU, float nodes) gets a weight-only int8 DQ. The
result is checked on calibration data; activations that break it stay float (:mod:`.qdq_guard`).

Weight-only mode (``int8-weights``, ``int4-weights``): each float weight becomes an int8
initializer + DQ (or, for MatMul/Gemm, blocked int4 + DQ with ``block_size``, which onnxruntime
fuses into MatMulNBits); activations stay float.
"""
from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
from onnx import numpy_helper

from onnxcompress.errors import PreconditionError
from onnxcompress.formats.qdq_dynamic import DYNAMIC_MIN_OPSET, quantize_dynamic_matmuls
from onnxcompress.formats.qdq_ops import groups, insert_activation_qdq, layout, out_channels, weight_axis
from onnxcompress.formats.qdq_weights import (DQ_AXIS_MIN_OPSET, DQ_MIN_OPSET, dq_nodes,
                                              gather_before_dequantize, hoist_constants, quantize_weights_only)
from onnxcompress.graph.edit import NameScope
from onnxcompress.graph.fold import fold_batch_norms
from onnxcompress.graph.model import opset_of
from onnxcompress.graph.weights import DEFAULT_MIN_ELEMENTS, get_array, replace_weight
from onnxcompress.numerics.quantmath import (CalibrationResult, dequantize, INT32, INT8, output_shift, quantize,
                                             quantize_per_channel, TYPES)
from onnxcompress.passes import qdq_guard as guard
from onnxcompress.passes.qdq_plan import plan_static, StaticPlan
from onnxcompress.pipeline.artifacts import Artifact
from onnxcompress.pipeline.manager import Context, missing_artifact, Pass, PassResult
from onnxcompress.runtime.layer_errors import measure_layer_errors
from onnxcompress.runtime.sessions import make_session
from onnxcompress.runtime.statistics import ChannelMeans, Collector


log = logging.getLogger(__name__)



@dataclass(kw_only=True)
class QdqConfig:
    # static: weights and activations (calibrated ranges); dynamic: MatMul/Gemm with activation ranges computed at
    # run time (no data needed) and weight-only int8 elsewhere; weights: weight-only
    mode: Literal["static", "dynamic", "weights"] = "static"
    activation_type: Literal["uint8", "int8"] = "uint8"  # static: the quantized type of activations
    symmetric_activations: bool = False  # static: activation ranges [-a, a] with a zero point of 0
    per_channel: bool = True  # weights: one scale per output channel (else one per tensor)
    int4_matmul: bool = False  # weight-only: blocked int4 for MatMul/Gemm weights (opset >= 21)
    block_size: int = 32  # int4 block along the input (K) axis
    min_elements: int = DEFAULT_MIN_ELEMENTS  # weight-only: smaller weights stay float
    exclude: list = field(default_factory=list)  # node names, op types or tensor names to keep in float
    error_samples: int = 128  # samples for the per-layer SQNR table (0: skip it)
    bias_correction: bool = True  # static: fold the mean output shift of weight rounding into the bias
    fold_batch_norm: bool = True  # static: Conv -> BatchNormalization becomes one Conv (then QLinearConv)
    latency_check: bool = True  # static: time float vs int8 on one calibration batch; note when int8 is slower
    correction_samples: int = 256  # calibration samples that estimate the layer input means
    # static: the fidelity bound on calibration data (top-1 agreement of class scores, SQNR of other outputs);
    # activations that break it stay float, else weight-only int8 (agreement None: no check)
    agreement: float | None = 0.99
    min_output_sqnr: float = 20.0  # static: the bound in dB on outputs that are not class scores
    guard_samples: int = 256  # calibration samples the bound is checked on
    guard_rounds: int = 8  # at most 2^8 - 1 activations kept float before falling back to weight-only
    max_probes: int = 32  # activations (the widest range against RMS first), then weights, quantized alone to rank them
    probe_samples: int = 64  # calibration samples each probe runs
    # where keeping activations float does not hold the bound: dynamic int8 MatMul/Gemm if that holds it, else
    # weight-only int8 ("weights": weight-only directly)
    fallback: Literal["dynamic", "weights"] = "dynamic"
    # where weight-only int8 misses the bound too: the weights that break it most stay float, at most this
    # fraction of the quantized weights' bytes (0.03 keeps a float32 model's ratio above 3.5x)
    max_float_weights: float = 0.03

    def __post_init__(self):
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, not {self.block_size}")
        if self.error_samples < 0:
            raise ValueError("error_samples must be >= 0")


class QdqPass(Pass):
    name = "qdq"
    Config = QdqConfig

    @property
    def consumes(self) -> frozenset[Artifact]:  # static quantization: the activation ranges
        return frozenset({Artifact.CALIBRATION}) if self.config.mode == "static" else frozenset()

    def requires(self, ctx: Context) -> None:
        if self.config.mode == "static" and not isinstance(ctx.calibration, CalibrationResult):
            raise missing_artifact(self, Artifact.CALIBRATION)

    def call(self, ctx: Context) -> PassResult:
        cfg: QdqConfig = self.config
        opset = opset_of(ctx.model)
        least = DYNAMIC_MIN_OPSET if cfg.mode == "dynamic" else DQ_MIN_OPSET
        if cfg.mode != "weights" and opset < least:  # no QuantizeLinear: the weights alone, still int8
            ctx.note(f"qdq: opset {opset} has no {'QuantizeLinear' if opset < DQ_MIN_OPSET else 'DynamicQuantizeLinear'}"
                     f", so the activations stay float and only the weights are int8 ({cfg.mode} int8 needs opset >= "
                     f"{least}: convert the model with onnx.version_converter to opset 13 or later for integer kernels)")
            cfg = dataclasses.replace(cfg, mode="weights")
        per_channel, cast = self._weight_form(ctx, cfg, opset)
        if cfg.mode == "weights":
            summary = quantize_weights_only(ctx, cfg, per_channel, opset, self.name, cast=cast)
            gather_before_dequantize(ctx.model, self.name)
            return PassResult(summary["weights"] > 0, summary)
        if cfg.mode == "dynamic":
            return self._dynamic(ctx, cfg, per_channel, opset)
        folded = fold_batch_norms(ctx.model) if cfg.fold_batch_norm else []
        if folded:
            ctx.note(f"qdq: folded {len(folded)} BatchNormalization node(s) into the convolution before each")
        hoist_constants(ctx.model)  # weights in main-graph Constant nodes are planned like initializers
        reference = onnx.ModelProto()
        reference.CopyFrom(ctx.model)
        self._means = self._input_means(ctx, reference)
        plan, renamed, rest = self._guarded(ctx, cfg, reference, per_channel, opset)
        gather_before_dequantize(ctx.model, self.name)  # after the guard: the same values, fewer dequantized
        for reason, labels in plan.floats.items():
            ctx.note(f"qdq: kept in float ({reason}): {', '.join(labels[:8])}"
                     + (f" and {len(labels) - 8} more" if len(labels) > 8 else ""))
        error_data = self._layer_errors(ctx, reference, renamed)
        if cfg.latency_check and ctx.data is not None and plan.nodes:
            ratio = guard.latency_ratio(reference, ctx.model, ctx.data)
            if ratio > 1.05:
                ctx.note(f"qdq: the int8 model runs {ratio:.2f}x slower than float in onnxruntime on this machine "
                         "(small convolutions favour float kernels); consider the int8-weights recipe or excluding "
                         "the slow op types")
        kinds = defaultdict(int)
        for kind in plan.nodes.values():
            kinds[kind] += 1
        return PassResult(bool(plan.nodes) or rest["weights"] > 0, {"quantized_nodes": len(plan.nodes), "activations": len(plan.tensors),
                                             "float_nodes": sum(map(len, plan.floats.values())),
                                             "weight_only": rest["weights"],
                                             "layer_errors_data": error_data, **kinds})

    def _dynamic(self, ctx: Context, cfg: QdqConfig, per_channel: bool, opset: int) -> PassResult:
        """The dynamic mode: dynamic int8 MatMul/Gemm and weight-only int8 elsewhere, with no data."""
        summary = self._without_ranges(ctx, cfg, per_channel, opset, dynamic=True, keep={})
        gather_before_dequantize(ctx.model, self.name)
        return PassResult(summary["dynamic"] > 0 or summary["weights"] > 0, summary)

    def _without_ranges(self, ctx: Context, cfg: QdqConfig, per_channel: bool, opset: int, *, dynamic: bool,
                        keep: dict[str, str]) -> dict:
        """Int8 that needs no activation range, on ctx.model: dynamic int8 for every eligible MatMul/Gemm (ranges at
        run time, as onnxruntime's quantize_dynamic) when `dynamic`, then weight-only int8 for every other float
        weight but `keep`. The dynamic mode's model, and the static guard's fallbacks."""
        matmuls = quantize_dynamic_matmuls(ctx, self.name) if dynamic else []
        rest = quantize_weights_only(ctx, dataclasses.replace(cfg, int4_matmul=False), per_channel, opset, self.name,
                                     keep=keep)
        return {**rest, "dynamic": len(matmuls), "kept_float_weights": len(keep)}

    @staticmethod
    def _weight_form(ctx: Context, cfg: QdqConfig, opset: int) -> tuple[bool, bool]:
        """(per channel, dequantize by Cast + Mul) as the model's opset allows, with a note where it changes them."""
        per_channel = cfg.per_channel
        # weight-only below the opsets of DequantizeLinear (10) or of its per-channel axis (13): Cast + Mul
        cast = cfg.mode == "weights" and (opset < DQ_MIN_OPSET or (per_channel and opset < DQ_AXIS_MIN_OPSET))
        if cast:
            ctx.note(f"qdq: opset {opset} has no {'per-channel ' if opset >= DQ_MIN_OPSET else ''}DequantizeLinear; "
                     "weights are dequantized by Cast + Mul, which onnxruntime folds at load")
        elif per_channel and opset < DQ_AXIS_MIN_OPSET:
            ctx.note(f"qdq: per-channel weights need opset >= {DQ_AXIS_MIN_OPSET} (model has {opset}); "
                     "using per-tensor scales")
            per_channel = False
        return per_channel, cast

    def _input_means(self, ctx: Context, reference: onnx.ModelProto) -> dict[str, np.ndarray]:
        """Bias correction's layer input means on calibration data (none without data or correction)."""
        cfg: QdqConfig = self.config
        if not (cfg.bias_correction and ctx.data is not None):
            return {}
        plan = self._plan(ctx, set())
        return input_means(reference, ctx.data.limit(cfg.correction_samples),
                           [ctx.model.graph.node[i] for i, k in plan.nodes.items() if k == "linear"],
                           collector=ctx.statistics)

    def _layer_errors(self, ctx: Context, reference: onnx.ModelProto, renamed: dict[str, str]) -> str | None:
        """The per-layer table, on the evaluation data when the user gave some, else on calibration data;
        returns which data it measured on (None: not measured)."""
        cfg: QdqConfig = self.config
        given = ctx.eval_data if ctx.eval_data is not None and not getattr(ctx.eval_data, "synthetic", False) \
            else ctx.data
        if not (cfg.error_samples and given is not None):
            return None
        ctx.layer_errors = measure_layer_errors(reference, ctx.model, given.limit(cfg.error_samples),
                                                renamed, _labels(reference), collector=ctx.statistics)
        return "evaluation" if given is not ctx.data else "calibration"

    def ensures(self, ctx: Context, result: PassResult) -> None:
        inits = {t.name: t for t in ctx.model.graph.initializer}
        for node in ctx.model.graph.node:
            if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.input[1] in inits:
                scale = numpy_helper.to_array(inits[node.input[1]])
                if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
                    raise PreconditionError(f"qdq made a non-positive or non-finite scale for '{node.input[0]}'")
        if result.modified and not ctx.layer_errors:  # the error table already ran the model
            make_session(ctx.model)  # raises ModelError if onnxruntime cannot load what we made

    def _quantize(self, ctx, cfg, reference, per_channel, opset, keep_float: set[str]):
        """Static QDQ of `reference` into ctx.model with `keep_float` activations float, then weight-only
        int8 for every other float weight (If/Loop bodies, LSTM/GRU, float nodes, Transpose chains)."""
        ctx.model.CopyFrom(reference)
        self._biases = defaultdict(list)
        plan = self._plan(ctx, keep_float)
        renamed = self._rewrite(ctx, cfg, plan, per_channel)
        rest = quantize_weights_only(ctx, dataclasses.replace(cfg, int4_matmul=False), per_channel, opset, self.name,
                                     keep=self._float_biases)
        return plan, renamed, rest

    def _guarded(self, ctx, cfg, reference, per_channel, opset):
        """Quantize; while the fidelity check fails, keep the activations that break it float (worst
        alone-quantized output SQNR first, 1, 2, 4... more each round); else dynamic or weight-only int8
        (guard.fall_back)."""
        data = ctx.data.limit(cfg.guard_samples) if ctx.data is not None and cfg.agreement is not None else None
        records, notes, keep_float, order = len(ctx.records), len(ctx.notes), set(), None
        bound = guard.Bound(cfg.agreement, cfg.min_output_sqnr, ctx.task)
        for _ in range(cfg.guard_rounds + 1):
            del ctx.records[records:], ctx.notes[notes:]
            plan, renamed, rest = self._quantize(ctx, cfg, reference, per_channel, opset, keep_float)
            if keep_float and not plan.tensors:  # every activation kept float: that is the weight-only model
                break
            result = bound.check(reference, ctx.model, data) if data is not None and plan.tensors else None
            if result is None or result.holds:
                if keep_float:
                    ctx.note(f"qdq: kept float to hold {result.worst} (bound: agreement >= {cfg.agreement}, other "
                             f"outputs >= {cfg.min_output_sqnr:g} dB, {len(data)} calibration samples): "
                             + ", ".join(f"{n} ({order[n]:.1f} dB at the outputs quantized alone)" for n in order if n in keep_float))
                return plan, renamed, rest
            if order is None:
                order = dict(guard.sensitivities(reference, plan.tensors, cfg.activation_type,
                                                 data.limit(cfg.probe_samples), cfg.max_probes,
                                                 collector=ctx.statistics))
            more = [n for n in order if n not in keep_float][:max(1, len(keep_float))]
            if not more:
                break
            log.info("qdq: %s after static int8; keeping %s float", result.worst, more)
            keep_float |= set(more)
        missed = (f"qdq: static int8 missed the fidelity bound ({result.worst}; agreement >= {cfg.agreement}, other "
                  f"outputs >= {cfg.min_output_sqnr:g} dB) even with {len(keep_float)} activation(s) kept float; ")

        def build(dynamic: bool, keep: dict[str, str]) -> dict:
            del ctx.records[records:], ctx.notes[notes:]
            ctx.model.CopyFrom(reference)
            return self._without_ranges(ctx, cfg, per_channel, opset, dynamic=dynamic, keep=keep)

        made = guard.Candidates(build, reference, data, bound, self.name, records)
        rest = guard.fall_back(ctx, made, cfg, missed)
        return StaticPlan(), {}, rest

    def _plan(self, ctx: Context, keep_float: set[str]) -> StaticPlan:
        cfg: QdqConfig = self.config
        return plan_static(ctx.model.graph, ctx.calibration, keep_float, exclude=cfg.exclude,
                           activation_type=cfg.activation_type, symmetric=cfg.symmetric_activations)

    # -- rewriting --------------------------------------------------------------------------
    def _rewrite(self, ctx: Context, cfg: QdqConfig, plan: StaticPlan, per_channel: bool) -> dict[str, str]:
        """Apply the plan; returns tensor name in the float model -> name of its DQ output."""
        model = ctx.model
        scope = NameScope(model)
        pending: list[tuple] = []  # (WeightInfo, DQ nodes, initializers), applied once the node list is final
        self._weights(ctx, cfg, plan, per_channel, scope, pending)
        renamed = insert_activation_qdq(model.graph, plan.tensors, TYPES[cfg.activation_type], scope, self.name)
        self._float_biases = self._shared_biases(ctx, scope, pending)
        for info, nodes, inits in pending:
            replace_weight(model, info, nodes, inits)
        return renamed

    def _weights(self, ctx: Context, cfg: QdqConfig, plan: StaticPlan, per_channel: bool, scope: NameScope,
                 pending: list[tuple]) -> None:
        """Queue the DQ of each planned node's weights into `pending` (and a linear node's bias ask)."""
        graph = ctx.model.graph
        qt = TYPES[cfg.activation_type]
        infos = {w.name: w for w in ctx.weights(0) if w.graph == "main"  # graph inputs, sparse...: left alone
                 and w.name not in ctx.nonfinite and (w.skip is None or w.skip.startswith("tiny"))}
        done_weights: dict[str, np.ndarray] = {}  # weight name -> its scale vector
        for i, kind in sorted(plan.nodes.items()):
            node = graph.node[i]
            if kind == "linear":
                self._weight_and_bias(ctx, node, plan, infos, done_weights, per_channel, scope, pending)
            elif kind == "Gather" and node.input[0] not in done_weights:
                done_weights[node.input[0]] = self._constant(ctx, infos.get(node.input[0]), INT8, scope, pending,
                                                             axis=0 if per_channel else None)
            elif kind == "elementwise":
                for name in node.input:
                    if name in infos and name not in done_weights:
                        done_weights[name] = self._constant(ctx, infos[name], qt, scope, pending, axis=None)

    def _shared_biases(self, ctx, scope, pending) -> dict[str, str]:
        """One int32 DQ for a bias several quantized layers read when they agree on its scale
        s_x * s_w (no mean-shift correction: it differs by layer); else it stays float. Returns
        the biases kept float, with the reason."""
        kept = {}
        for name, asks in self._biases.items():
            bias, b_scale, values = asks[0]
            if len(asks) > 1 and not all(np.array_equal(b, b_scale) for _, b, _ in asks):
                kept[name] = f"a bias shared by {len(asks)} layers whose input scales differ"
                ctx.record(name, self.name, f"kept float: {kept[name]}", bias.nbytes, bias.nbytes)
                continue
            q = quantize(values, b_scale, 0, INT32.qmin, INT32.qmax).astype(np.int32)
            nodes, inits = dq_nodes(name, q, b_scale, np.zeros(b_scale.shape, np.int32), 0, scope, self.name)
            pending.append((bias, nodes, inits))
            ctx.record(name, self.name, "int32 bias (scale = s_x * s_w)", bias.nbytes, q.nbytes)
        return kept

    def _weight_and_bias(self, ctx, node, plan, infos, done, per_channel, scope, pending) -> None:
        w_name = node.input[1]
        info = infos.get(w_name)
        if info is None:  # activation x activation MatMul: both inputs are already Q/DQ'd
            return
        axis = weight_axis(node, info) if per_channel else None
        if w_name not in done:
            done[w_name] = self._constant(ctx, info, INT8, scope, pending, axis=axis, symmetric=True)
        w_scale, w_dequantized = done[w_name]
        if len(node.input) < 3 or not node.input[2] or node.input[2] not in infos:
            return
        bias = infos[node.input[2]]
        x_scale = plan.tensors.get(node.input[0], (None, None))[0]
        channels = out_channels(node, info)
        if x_scale is None or len(bias.shape) != 1 or bias.shape[0] != channels:
            return
        w_scale = np.asarray(w_scale, dtype=np.float64)  # 0-d when per tensor (then so is the bias scale)
        b_scale = (x_scale * w_scale).astype(np.float32)
        b_scale = np.where(b_scale > 0, b_scale, 1.0).astype(np.float32)
        values = get_array(ctx.model, bias).astype(np.float32)
        mean = self._means.get(node.input[0])
        if mean is not None and len(bias.consumers) == 1:
            delta = w_dequantized.astype(np.float64) - get_array(ctx.model, info).astype(np.float64)
            values = (values - output_shift(delta, mean, layout(node), groups=groups(node))).astype(np.float32)
        self._biases[bias.name].append((bias, b_scale, values))  # written once per tensor by _shared_biases

    def _constant(self, ctx, info, qtype, scope, pending, *, axis, symmetric: bool = False):
        """int8/uint8 initializer + DQ producing the weight's own name; returns the scale."""
        if info is None:
            return None
        w = get_array(ctx.model, info).astype(np.float32)
        sym = symmetric or qtype.qmin < 0
        q, scale, zero = quantize_per_channel(w, axis, qtype, symmetric=sym)
        nodes, inits = dq_nodes(info.name, q.astype(qtype.np_dtype), scale, zero.astype(qtype.np_dtype), axis,
                                scope, self.name)
        pending.append((info, nodes, inits))
        ctx.record(info.name, self.name, f"{qtype.name} " + ("per-channel" if axis is not None else "per-tensor"),
                   info.nbytes, q.size * np.dtype(qtype.np_dtype).itemsize + scale.nbytes,
                   {"axis": axis, "role": info.role.value})
        shape = w.shape if axis is None else tuple(d if k == axis else 1 for k, d in enumerate(w.shape))
        return scale, dequantize(q, np.reshape(scale, shape) if axis is not None else scale,
                                 np.reshape(zero, shape) if axis is not None else zero)


def input_means(model: onnx.ModelProto, data, nodes: list[onnx.NodeProto], *,
                collector: Collector | None = None) -> dict[str, np.ndarray]:
    """Mean per input channel of each Conv/Gemm/MatMul input (axis 1 for Conv, the last otherwise)."""
    axes = {n.input[0]: 1 if n.op_type == "Conv" else -1 for n in nodes
            if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 2 and n.input[2]}
    means = [ChannelMeans(name, axis) for name, axis in axes.items()]
    (collector or Collector()).gather(model, data, means, fixed_weights=True)
    return {m.tensor: m.mean for m in means if m.count}


def _labels(model: onnx.ModelProto) -> dict[str, tuple[str, str]]:
    """Tensor name -> (producing node label, op type); graph inputs map to ('input', '')."""
    out = {i.name: ("(graph input)", "") for i in model.graph.input}
    for k, node in enumerate(model.graph.node):
        for o in node.output:
            out[o] = (node.name or f"{node.op_type}_{k}", node.op_type)
    return out


