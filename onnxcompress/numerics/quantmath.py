"""Pure numeric kernels of uniform quantization: scales, zero points, streaming histograms, ranges.

The quantization relation is r = s (q - z): a real value r is stored as the integer
q = clamp(round_half_even(r / s) + z, qmin, qmax) (what ONNX QuantizeLinear computes), and read
back as s (q - z) (DequantizeLinear). Every function here works on numpy arrays only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class IntType:
    """An integer storage type: its numpy dtype, ONNX element type and representable range."""

    name: str
    qmin: int
    qmax: int
    onnx_type: int
    np_dtype: type

    def symmetric_range(self) -> tuple[int, int]:
        """[-qmax, qmax] for signed types (so zero is exact and the range is balanced), else the full range."""
        return (-self.qmax, self.qmax) if self.qmin < 0 else (self.qmin, self.qmax)


# ONNX TensorProto element types: UINT8 2, INT8 3, INT32 6, INT4 22, UINT4 21
UINT8 = IntType("uint8", 0, 255, 2, np.uint8)
INT8 = IntType("int8", -128, 127, 3, np.int8)
INT4 = IntType("int4", -8, 7, 22, np.int8)
INT32 = IntType("int32", -(2**31), 2**31 - 1, 6, np.int32)
TYPES = {t.name: t for t in (UINT8, INT8, INT4, INT32)}


def scale_zero_point(rmin, rmax, qmin: int, qmax: int, *, symmetric: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Scale s and zero point z such that [rmin, rmax] maps onto [qmin, qmax] with r = s (q - z).

    The range is first widened to contain 0 (so 0 is exactly representable, which padding and
    ReLU need). Symmetric: [-a, a] with a = max(|rmin|, |rmax|), z = round((qmin + qmax) / 2);
    otherwise s = (rmax - rmin) / (qmax - qmin), z = round(qmin - rmin / s). A zero range gives
    s = 1, z = (symmetric midpoint or qmin), which quantizes zeros exactly. Works elementwise.
    """
    rmin = np.minimum(np.asarray(rmin, dtype=np.float64), 0.0)
    rmax = np.maximum(np.asarray(rmax, dtype=np.float64), 0.0)
    if symmetric:
        absmax = np.maximum(-rmin, rmax)
        rmin, rmax = -absmax, absmax
    scale = (rmax - rmin) / float(qmax - qmin)
    tiny = scale < np.finfo(np.float32).tiny
    scale = np.where(tiny, 1.0, scale)
    if symmetric:
        zero = np.full(scale.shape, round((qmin + qmax) / 2.0))
    else:
        zero = np.clip(np.rint(qmin - rmin / scale), qmin, qmax)
        zero = np.where(tiny, qmin if qmin >= 0 else 0, zero)
    return scale.astype(np.float32), zero.astype(np.int64)


def quantize(x: np.ndarray, scale, zero, qmin: int, qmax: int) -> np.ndarray:
    """q = clamp(round_half_even(x / s) + z, qmin, qmax), broadcasting s and z (int64 result)."""
    q = np.rint(np.asarray(x, dtype=np.float32) / np.asarray(scale, dtype=np.float32)) + np.asarray(zero)
    return np.clip(q, qmin, qmax).astype(np.int64)


def dequantize(q: np.ndarray, scale, zero) -> np.ndarray:
    """r = s (q - z)."""
    return (np.asarray(scale, dtype=np.float32) * (np.asarray(q, dtype=np.int64) - np.asarray(zero))).astype(np.float32)


def channel_shape(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector along `axis` of a tensor of `shape`."""
    return tuple(d if i == axis else 1 for i, d in enumerate(shape))


def quantize_per_channel(w: np.ndarray, axis: int | None, itype: IntType, *, symmetric: bool = True
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weight quantization with one (s, z) per slice along `axis` (per tensor when axis is None).

    Symmetric uses [-qmax, qmax] with z = 0 for signed types. Returns (q, scale, zero) where
    scale and zero are 1-D (length of the axis) or 0-D (per tensor).
    """
    w = np.asarray(w, dtype=np.float32)
    qmin, qmax = itype.symmetric_range() if symmetric else (itype.qmin, itype.qmax)
    if axis is None or w.ndim == 0:
        scale, zero = scale_zero_point(w.min(initial=0.0), w.max(initial=0.0), qmin, qmax, symmetric=symmetric)
        return quantize(w, scale, zero, qmin, qmax), scale, zero
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    scale, zero = scale_zero_point(moved.min(axis=1, initial=0.0), moved.max(axis=1, initial=0.0),
                                   qmin, qmax, symmetric=symmetric)
    shape = channel_shape(w.shape, axis)
    return quantize(w, scale.reshape(shape), zero.reshape(shape), qmin, qmax), scale, zero


def quantize_blocked(w: np.ndarray, axis: int, block: int, itype: IntType) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric blocked quantization along `axis`: one scale per `block` consecutive entries.

    The scale tensor has w's shape with dim `axis` replaced by ceil(n / block), the layout of
    ONNX DequantizeLinear with `block_size` (opset 21); z = 0, q in [-qmax, qmax].
    Returns (q, scale).
    """
    w = np.asarray(w, dtype=np.float32)
    n = w.shape[axis]
    blocks = -(-n // block)
    moved = np.moveaxis(w, axis, 0)
    padded = np.zeros((blocks * block,) + moved.shape[1:], dtype=np.float32)
    padded[:n] = moved
    absmax = np.abs(padded.reshape((blocks, block) + moved.shape[1:])).max(axis=1)
    qmax = itype.symmetric_range()[1]
    scale = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)
    expanded = np.repeat(scale, block, axis=0)[:n]
    q = np.clip(np.rint(moved / expanded), -qmax, qmax).astype(np.int64)
    return np.moveaxis(q, 0, axis), np.moveaxis(scale, 0, axis)


def output_shift(delta_w: np.ndarray, mean: np.ndarray, kind: str, *, groups: int = 1) -> np.ndarray:
    """Mean change of each output channel when a layer's weight changes by `delta_w`.

    For y = W x + b the expected output moves by E[dW x] = dW E[x]; subtracting it from b is
    (empirical) bias correction (Nagel et al. 2019, NNCF). `mean` is E[x] per input channel:
    - "gemm": dW stored (out, K), mean (K,) -> dW @ mean;
    - "gemm_t": dW stored (K, out) (Gemm transB=0, MatMul), mean (K,) -> mean @ dW;
    - "conv": dW (M, C/groups, k...), mean (C,); each kernel tap sees E[x_c] (exact away from
      the padded border): shift_m = sum_{c, taps} dW[m, c, taps] mean[group(m) * C/groups + c].
    """
    if kind == "gemm":
        return delta_w @ mean
    if kind == "gemm_t":
        return mean @ delta_w
    per_tap = delta_w.reshape(delta_w.shape[0], delta_w.shape[1], -1).sum(axis=2)  # (M, C/groups)
    group_of = np.arange(delta_w.shape[0]) // (delta_w.shape[0] // groups)
    return (per_tap * mean.reshape(groups, -1)[group_of]).sum(axis=1)


class StreamingHistogram:
    """A fixed-size histogram over [-R, R] updated batch by batch, with the running min and max.

    Memory is `bins` counters whatever the number of samples. When a batch falls outside
    [-R, R], the range doubles until it fits and the old counts are merged pairwise into the
    middle half of the bins: exact, since the new bin edges are every other old edge.
    """

    def __init__(self, bins: int = 2048):
        if bins < 8 or bins % 4:
            raise ValueError(f"bins must be a multiple of 4, at least 8, not {bins}")
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.int64)
        self.half_range = 0.0
        self.min = math.inf
        self.max = -math.inf

    @property
    def count(self) -> int:
        return int(self.counts.sum())

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(-self.half_range, self.half_range, self.bins + 1)

    def update(self, x: np.ndarray, *, minmax: tuple[float, float] | None = None) -> None:
        x = np.asarray(x, dtype=np.float32).ravel()
        if x.size == 0:
            return
        lo, hi = minmax if minmax is not None else (float(x.min()), float(x.max()))
        if not math.isfinite(lo + hi):
            x = x[np.isfinite(x)]
            if x.size == 0:
                return
            lo, hi = float(x.min()), float(x.max())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        need = max(abs(lo), abs(hi))
        if self.half_range == 0.0:
            self.half_range = max(need, 1e-30)  # a float32 bins / (2R) must stay finite
        while need > self.half_range:
            self._double()
        inv = self.bins / (2.0 * self.half_range)
        position = np.multiply(x, np.float32(inv), dtype=np.float32)
        position += np.float32(self.bins / 2)
        np.minimum(position, np.float32(self.bins - 1), out=position)  # x == R lands on the last bin
        np.maximum(position, np.float32(0), out=position)
        self.counts += np.bincount(position.astype(np.int32), minlength=self.bins)

    def _double(self) -> None:
        merged = self.counts.reshape(-1, 2).sum(axis=1)
        counts = np.zeros_like(self.counts)
        quarter = self.bins // 4
        counts[quarter:quarter + merged.size] = merged
        self.counts, self.half_range = counts, 2.0 * self.half_range

    def after_relu(self) -> "StreamingHistogram":
        """The histogram of max(x, 0), exactly: negative counts move to the bin that starts at 0."""
        out = StreamingHistogram(self.bins)
        out.half_range = self.half_range
        out.counts = self.counts.copy()
        half = self.bins // 2
        out.counts[half] += out.counts[:half].sum()
        out.counts[:half] = 0
        out.min, out.max = max(self.min, 0.0), max(self.max, 0.0)
        return out

    def folded(self) -> tuple[np.ndarray, float]:
        """Histogram of |x|: bins/2 counts over [0, R], and R."""
        half = self.bins // 2
        return self.counts[half:] + self.counts[:half][::-1], self.half_range


def percentile_range(hist: StreamingHistogram, percentile: float, *, symmetric: bool) -> tuple[float, float]:
    """Clip at the `percentile` of |x| (symmetric) or cut (100 - p)/2 % off each tail, within [min, max]."""
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], not {percentile}")
    if symmetric:
        counts, r = hist.folded()
        cdf = np.cumsum(counts) / max(counts.sum(), 1)
        k = int(np.searchsorted(cdf, percentile / 100.0))
        t = (k + 1) * r / counts.size
        return max(hist.min, -t), min(hist.max, t)
    cdf = np.cumsum(hist.counts) / max(hist.count, 1)
    tail = (100.0 - percentile) / 200.0
    edges = hist.edges
    lo = edges[int(np.searchsorted(cdf, tail))]
    hi = edges[min(int(np.searchsorted(cdf, 1.0 - tail)) + 1, hist.bins)]
    return max(hist.min, float(lo)), min(hist.max, float(hi))


def entropy_threshold(counts: np.ndarray, top: float, levels: int = 128, max_candidates: int = 160) -> float:
    """The clipping threshold T on |x| minimizing KL(P || Q) (TensorRT's calibration).

    For a candidate of i bins: P = counts[:i] with every count beyond added to bin i-1; Q =
    counts[:i] merged into `levels` equal chunks, each chunk's mass spread evenly over its
    non-empty bins. The first bin's count is replaced by the second's, so a spike of exact
    zeros (ReLU) does not decide the threshold. Both normalized; KL = sum p log(p / q). Evaluated for all candidates at
    once from prefix sums of h, h log h and [h > 0]: within chunk k, q is S_k / nz_k, so
    sum_j P_j log q_j = sum_k S_k log(S_k / nz_k / C_i) plus the outliers' term.
    At most `max_candidates` thresholds, evenly spaced in bins, are tried (TensorRT tries every
    bin; the stride here is a few bins of 1024, well below one quantization step).
    `counts` covers [0, top]; returns T in the same units.
    """
    counts = np.asarray(counts, dtype=np.float64).copy()
    if counts.size > 1:
        counts[0] = counts[1]  # the zero bin (ReLU's spike) would dominate chunk 0: pytorch-quantization does this
    n = counts.size
    total = counts.sum()
    if total == 0 or n <= levels:
        return float(top)
    step = max(1, (n - levels) // max_candidates)
    cand = np.arange(levels, n + 1, step)
    if cand[-1] != n:
        cand = np.append(cand, n)
    c = np.concatenate([[0.0], np.cumsum(counts)])
    z = np.concatenate([[0.0], np.cumsum(counts > 0)])
    hlogh = np.where(counts > 0, counts * np.log(np.where(counts > 0, counts, 1.0)), 0.0)
    hl = np.concatenate([[0.0], np.cumsum(hlogh)])
    k = np.arange(levels + 1)
    bounds = (k[None, :] * cand[:, None]) // levels  # (candidates, levels + 1)
    s = c[bounds[:, 1:]] - c[bounds[:, :-1]]
    nz = z[bounds[:, 1:]] - z[bounds[:, :-1]]
    ci = c[cand]
    with np.errstate(divide="ignore", invalid="ignore"):
        q_term = np.where(s > 0, s * np.log(s / np.maximum(nz, 1) / ci[:, None]), 0.0).sum(axis=1)
        last = counts[cand - 1]
        outliers = total - ci
        p_last = last + outliers
        a = hl[cand] - np.where(last > 0, last * np.log(np.where(last > 0, last, 1.0)), 0.0) \
            + np.where(p_last > 0, p_last * np.log(np.where(p_last > 0, p_last, 1.0)), 0.0)
        # q of the last bin: its chunk's mean when the bin is non-empty, else a tiny floor
        last_q = np.where(last > 0, s[:, -1] / np.maximum(nz[:, -1], 1) / ci, 1e-12)
        out_term = np.where(outliers > 0, outliers * np.log(last_q), 0.0)
        kl = (a - total * math.log(total) - q_term - out_term) / total
    kl = np.where(np.isfinite(kl), kl, np.inf)
    best = int(cand[int(np.argmin(kl))])
    return float(top) * best / n


def entropy_range(hist: StreamingHistogram, *, levels: int = 128) -> tuple[float, float]:
    """KL-optimal symmetric clipping of |x|, intersected with the observed [min, max]."""
    counts, r = hist.folded()
    t = entropy_threshold(counts, r, levels)
    return max(hist.min, -t), min(hist.max, t)


def mse_range(hist: StreamingHistogram, qmin: int, qmax: int, *, symmetric: bool,
              candidates: int = 100) -> tuple[float, float]:
    """The range [a min, a max], a in (0, 1], minimizing the expected squared quantization error.

    Each bin's count sits at its centre c: inside the range it costs step^2 / 12 (uniform
    rounding error, step = (hi - lo) / (qmax - qmin)); outside, (c - clip(c))^2.
    """
    lo, hi = min(hist.min, 0.0), max(hist.max, 0.0)
    if symmetric:
        a = max(-lo, hi)
        lo, hi = -a, a
    if hi - lo <= 0:
        return hist.min, hist.max
    edges = hist.edges
    centres = (edges[:-1] + edges[1:]) / 2
    keep = hist.counts > 0
    centres, weight = centres[keep], hist.counts[keep].astype(np.float64)
    alphas = np.linspace(1.0 / candidates, 1.0, candidates)
    los, his = alphas * lo, alphas * hi  # (candidates,)
    steps = (his - los) / float(qmax - qmin)
    clipped = np.clip(centres[None, :], los[:, None], his[:, None])
    err = (centres[None, :] - clipped) ** 2 + (steps[:, None] ** 2 / 12.0)
    best = int(np.argmin((err * weight[None, :]).sum(axis=1)))
    return max(hist.min, float(los[best])), min(hist.max, float(his[best]))


@dataclass(frozen=True)
class TensorRange:
    """Calibrated range of one tensor, and what was observed."""

    low: float
    high: float
    observed_min: float
    observed_max: float

    def scale_zero_point(self, qtype: str, *, symmetric: bool) -> tuple[float, int]:
        """(s, z) of this range for an activation type ('uint8' or 'int8')."""
        t = TYPES[qtype]
        qmin, qmax = t.symmetric_range() if symmetric else (t.qmin, t.qmax)
        s, z = scale_zero_point(self.low, self.high, qmin, qmax, symmetric=symmetric)
        return float(s), int(z)


@dataclass
class CalibrationResult:
    """Per-tensor ranges from the calibration pass: what QDQ insertion requires."""

    method: str
    symmetric: bool
    samples: int
    ranges: dict[str, TensorRange] = field(default_factory=dict)

    def __contains__(self, name: str) -> bool:
        return name in self.ranges

    def __getitem__(self, name: str) -> TensorRange:
        return self.ranges[name]
