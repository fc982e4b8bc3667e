"""Activation calibration: the range of every float activation, streamed batch by batch.

The statistics collector (:mod:`onnxcompress.runtime.statistics`) runs one session exposing every float
tensor of the main graph; each chunk of calibration data (batched along the model's dynamic batch
axis where it has one) updates a running min/max (reduced inside onnxruntime) and, for the
histogram methods, a fixed-size :class:`StreamingHistogram` per tensor, then is dropped. Memory therefore depends on the model
and the batch size, never on the number of samples.

Methods: ``minmax`` (observed range), ``percentile`` (clip the tails), ``entropy`` (KL
divergence, TensorRT style), ``mse`` (the clipping that minimizes expected squared error).
The result, a :class:`CalibrationResult`, goes to ``ctx.calibration`` for the qdq pass.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
from tqdm.auto import tqdm

from onnxcompress.errors import DataError, PreconditionError
from onnxcompress.formats.qdq_weights import DQ_MIN_OPSET
from onnxcompress.graph.model import opset_of
from onnxcompress.numerics.quantmath import (CalibrationResult, entropy_range, mse_range, percentile_range,
                                             TensorRange, TYPES)
from onnxcompress.pipeline.artifacts import Artifact
from onnxcompress.pipeline.manager import Context, Pass, PassResult
from onnxcompress.runtime.sessions import detached
from onnxcompress.runtime.statistics import Collector, Extremes, Histogram

log = logging.getLogger(__name__)
# QuantizeLinear reads float32 (float16/bfloat16 only from opset 19, with scales of that type, which QDQ does not
# write): ranges of other float tensors would make Q nodes onnxruntime refuses; those activations stay float
_FLOATS = {onnx.TensorProto.FLOAT}
MAX_BINS = 1 << 16  # histogram bins a recipe may ask for, per activation


@dataclass(kw_only=True)
class CalibrateConfig:
    method: Literal["minmax", "percentile", "entropy", "mse"] = "minmax"  # how a range is chosen from the activations
    symmetric: bool = False  # symmetric activation ranges ([-a, a]); asymmetric by default
    activation_type: Literal["uint8", "int8"] = "uint8"  # the type the ranges are tuned for (mse)
    percentile: float = 99.999  # method "percentile": keep this % of |x| (symmetric), else (100-p)/2 % off each tail
    bins: int = 2048  # histogram bins over [-R, R] (histogram methods)
    entropy_levels: int = 128  # quantized bins of the KL search over |x| (TensorRT: 128; doubled for x >= 0)
    max_samples: int | None = None  # use only the first N calibration samples
    max_batch: int = 64  # samples per onnxruntime call where the batch axis is dynamic
    workers: int = 2  # chunks run concurrently (each single-threaded); 1: one call at a time, all threads
    tensors: list = field(default_factory=list)  # calibrate only these tensors (default: every float activation)

    def __post_init__(self):
        if not 0 < self.percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], not {self.percentile}")
        if not 64 <= self.bins <= MAX_BINS or self.bins % 4:  # a histogram per activation: 10^12 bins each
            raise ValueError(f"bins must be a multiple of 4 between 64 and {MAX_BINS}, not {self.bins}")
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, not {self.workers}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {self.max_batch}")


def float_activations(model: onnx.ModelProto) -> list[str]:
    """Names of the main graph's float tensors that are not constants: inputs and node outputs."""
    # types only: big initializers are left as dims and types, so inference copies no weight bytes
    light = detached(model, arrays=False)[0] if model.ByteSize() >= 1 << 20 else model
    try:
        inferred = onnx.shape_inference.infer_shapes(light)
    except Exception as e:  # unknown custom ops: fall back to what the model declares
        log.debug("shape inference failed (%s); using declared types only", e)
        inferred = model
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(graph.value_info) + list(graph.input) + list(graph.output) if v.type.HasField("tensor_type")}
    constants = {t.name for t in model.graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    names = [i.name for i in graph.input if i.name not in constants]
    names += [o for n in graph.node if n.op_type != "Constant" for o in n.output if o]
    return [n for n in dict.fromkeys(names) if types.get(n) in _FLOATS]


class CalibratePass(Pass):
    name = "calibrate"
    Config = CalibrateConfig
    produces = frozenset({Artifact.CALIBRATION})
    needs_data = True
    without_data = "or use --recipe int8-dynamic, which needs none"  # its ranges are computed at run time
    measures = True

    def requires(self, ctx: Context) -> None:
        if ctx.data is None:
            raise PreconditionError("calibration needs data: pass --data with a few hundred representative inputs")

    def call(self, ctx: Context) -> PassResult:
        cfg: CalibrateConfig = self.config
        opset = opset_of(ctx.model)
        if opset < DQ_MIN_OPSET:  # no QuantizeLinear: no activation is quantized, so no range is needed
            ctx.calibration = CalibrationResult(cfg.method, cfg.symmetric, 0)
            return PassResult(False, {"method": cfg.method, "tensors": 0, "samples": 0,
                                      "skipped": f"opset {opset} has no QuantizeLinear (opset >= {DQ_MIN_OPSET})"})
        result = calibrate(ctx.model, ctx.data.limit(cfg.max_samples), cfg, progress=ctx.progress,
                           collector=ctx.statistics)
        ctx.calibration = result
        return PassResult(False, {"method": cfg.method, "tensors": len(result.ranges), "samples": result.samples})

    def ensures(self, ctx: Context, result: PassResult) -> None:
        for name, r in ctx.calibration.ranges.items():
            if not (np.isfinite(r.low) and np.isfinite(r.high) and r.low <= r.high):
                raise PreconditionError(f"calibration of '{name}' gave an invalid range [{r.low}, {r.high}]")


_SAME_VALUES = {"Identity", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose"}


def derived_tensors(model: onnx.ModelProto, names: list[str]) -> dict[str, tuple[str, str]]:
    """Tensors whose statistics follow exactly from another calibrated tensor's, in graph order.

    Reshapes and transposes hold the same values as their input ("same"); Relu's histogram is
    its input's with the negative counts moved to zero ("relu"). They need not be captured.
    """
    wanted, found = set(names), {}
    for node in model.graph.node:
        if not node.input or len(node.output) != 1 or node.output[0] not in wanted or node.input[0] not in wanted:
            continue
        if node.op_type in _SAME_VALUES:
            found[node.output[0]] = (node.input[0], "same")
        elif node.op_type == "Relu":
            found[node.output[0]] = (node.input[0], "relu")
    return found


def calibrate(model: onnx.ModelProto, data, config: CalibrateConfig | None = None, *,
              progress: bool = False, collector: Collector | None = None) -> CalibrationResult:
    """Ranges of the chosen (default: all float activation) tensors of `model` over `data`."""
    cfg = config or CalibrateConfig()
    names = list(cfg.tensors) or float_activations(model)
    missing = sorted(set(names) - set(float_activations(model))) if cfg.tensors else []
    if missing:
        raise PreconditionError(f"cannot calibrate {missing[:5]}: not float activations of the main graph")
    derived = derived_tensors(model, names)
    captured = [n for n in names if n not in derived]
    lows, highs, hists = _observe(model, data, cfg, captured, derived, progress, collector)
    result = CalibrationResult(cfg.method, cfg.symmetric, len(data))
    for name in names:
        lo, hi = lows[name], highs[name]
        if not np.isfinite(lo) or not np.isfinite(hi):
            log.debug("calibrate: %s never held a finite value; left out", name)
            continue
        low, high = _range(cfg, hists.get(name), lo, hi)
        result.ranges[name] = TensorRange(float(low), float(high), lo, hi)
    if names and not result.ranges:
        raise DataError(f"{data.source}: calibration produced no finite values for any tensor")
    log.info("calibrate: %d tensors (%d captured), %d samples, method %s", len(result.ranges), len(captured),
             len(data), cfg.method)
    return result


def _observe(model: onnx.ModelProto, data, cfg: CalibrateConfig, captured: list[str], derived: dict[str, tuple[str, str]],
             progress: bool, collector: Collector | None) -> tuple[dict, dict, dict]:
    """(lows, highs, histograms) of the captured tensors over `data` (histograms unless the method is
    minmax), and of the derived tensors from their sources (a Relu clips its source's at 0)."""
    use_hist = cfg.method != "minmax"
    extremes = {n: Extremes(n) for n in captured}
    hists = {n: Histogram(n, cfg.bins) for n in captured} if use_hist else {}
    bar = tqdm(desc="calibrate", unit="batch", disable=not progress, leave=False)
    # weights constant, as users run the model; graph optimizations would not survive the exposed outputs
    # anyway: skipping them saves load time and memory
    (collector or Collector()).gather(model, data, list(extremes.values()) + list(hists.values()),
                                      max_batch=cfg.max_batch, fixed_weights=True, optimize=False,
                                      workers=max(1, cfg.workers), progress=bar)
    bar.close()
    lows = {n: e.low for n, e in extremes.items()}
    highs = {n: e.high for n, e in extremes.items()}
    hists = {n: h.histogram for n, h in hists.items()}
    for name, (source, kind) in derived.items():  # graph order: a source is ready before its users
        relu = kind == "relu"
        lows[name] = max(lows[source], 0.0) if relu and np.isfinite(lows[source]) else lows[source]
        highs[name] = max(highs[source], 0.0) if relu and np.isfinite(highs[source]) else highs[source]
        if use_hist:
            hists[name] = hists[source].after_relu() if relu else hists[source]
    return lows, highs, hists


def _range(cfg: CalibrateConfig, hist, lo: float, hi: float) -> tuple[float, float]:
    """The quantization range of one tensor by the configured method, from its histogram or its [lo, hi]."""
    t = TYPES[cfg.activation_type]
    qmin, qmax = t.symmetric_range() if cfg.symmetric else (t.qmin, t.qmax)
    if cfg.method == "percentile":
        low, high = percentile_range(hist, cfg.percentile, symmetric=cfg.symmetric)
    elif cfg.method == "entropy":
        # one-sided data (ReLU) stored asymmetrically gets every level of the type over [0, T]
        one_sided = lo >= 0 and not cfg.symmetric
        low, high = entropy_range(hist, levels=cfg.entropy_levels * (2 if one_sided else 1))
    elif cfg.method == "mse":
        low, high = mse_range(hist, qmin, qmax, symmetric=cfg.symmetric)
    else:
        low, high = lo, hi
    if cfg.symmetric:
        a = max(abs(low), abs(high))
        low, high = -a, a
    return low, high
