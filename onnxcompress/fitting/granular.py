"""Granularity of weight sharing, and its choice per layer by measured error and bytes.

Every option yields a :class:`~onnxcompress.formats.codebook.SharedWeight`, decoded as

    W_hat[j, k] = codebook[codes[j, k] + offset[group(j)]] * scale[j]     (outliers written over it)

with j the output channel and k the rest of the weight (the weight is viewed channel-first as a
(C, K) matrix; for Gemm/MatMul/Conv this is exactly ``LinearLayer.weight_matrix``):

- ``tensor``: one k-means codebook for the whole tensor (Han et al.).
- ``channel``: one codebook shared by all channels around a scale per channel. Start from
  s_j = max_k |w_jk|, fit the codebook to u = w / s, then alternate exact minimisations of
  E = sum a_jk (w_jk - s_j c[code_jk])^2: codes (nearest centroid to w_jk / s_j), centroids
  (c_m = sum a s w / sum a s^2 over the entries of m), scales (s_j = sum_k a q w / sum_k a q^2,
  q = c[code]); each step cannot increase E. Scales are stored float16 when that is exact enough.
- ``group``: one codebook per group of ``group_size`` output channels (offsets into the
  concatenated codebook).
- ``+outlier``: the ``outlier_fraction`` of entries largest in magnitude (relative to their
  channel's RMS when scaled) stored exactly and written over the decoded tensor; the codebook is
  fitted to the rest (dense-and-sparse).

Weighted k-means: ``importance`` a_jk weighs each entry's squared error. Given calibration data,
a_jk = H_g[k, k], the diagonal of the layer-input Hessian H_g = E[x x^T] of channel j's group:
the output error sum_g tr(D_g H_g D_g^T) (D = W - W_hat) with its off-diagonal terms dropped.
With the full H_g, ``gptq`` candidates choose codes column by column feeding each column's error
forward (:func:`onnxcompress.numerics.gptq.gptq_codes`), then refit centroids and scales by least squares on
that output error (:func:`onnxcompress.numerics.gptq.refit_under_hessians`).

Choice (:func:`choose`): every candidate is measured by its SQNR, in output space when the layer's
Hessians are known (signal sum_g tr(W_g H_g W_g^T), noise sum_g tr(D_g H_g D_g^T)), else in weight
space (|W|^2 / |D|^2), and by its bytes in the portable form; a bias by the error it leaves in its
layer's output (:mod:`onnxcompress.numerics.bias_error`), with leaving it unshared ("float", no error, its
initializer's bytes) as one more candidate. The smallest coded candidate reaching the SQNR target
wins, or "float" when smaller still. When none does, the one maximising min(SQNR, target) - 6.02 dB
* (8 * bytes / N) wins, N the number of weights shared in the whole model: extra bytes are priced at
what spreading them over every weight as extra bits would buy (6.02 dB a bit), and fidelity beyond
the target buys nothing. Layers are treated as contributing alike to
the model's error, so a small layer's fidelity is as precious as a large one's: per-channel scales
(2 bytes a channel) are taken for a fraction of a dB, while outliers (20-36 bytes each in the
portable form) on a large layer must earn their keep.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Callable
from typing import Literal, Sequence

import numpy as np

from onnxcompress.formats.codebook import SharedWeight
from onnxcompress.numerics.gptq import gptq_codes, Grid, LayerHessians, refit_under_hessians
from onnxcompress.numerics.granular_fit import (channel_first, fit_groups, fit_scaled, fit_tensor, flat_indices, from_matrix,
                                               pick_outliers, ScaledFit, to_matrix, weight_layout)
from onnxcompress.numerics.histogram import CHUNK, signal_and_error
from onnxcompress.numerics.kmeans import kmeans_1d
from onnxcompress.numerics.measures import sqnr_db
from onnxcompress.runtime.sensitivity import mean_part, OutputGains

Kind = Literal["tensor", "channel", "group", "float"]
GRANULARITIES = ("tensor", "channel", "group", "outlier", "auto")
DB_PER_BIT = 6.02  # what one more bit per weight buys in SQNR: the exchange rate of bytes for fidelity
# GPTQ's candidates invert each group's K x K Hessian (K^3) and their refit reads a code Gram of C K^2 entries
# (numerics.gptq.code_gram): above this input row length K (a conv of fan-in 6,912 in madmom's chord CNN: minutes
# a candidate), only the importance-weighted k-means candidates are fitted
GPTQ_MAX_ROW = 4096


def gptq_affordable(hessians: LayerHessians | None) -> bool:
    """Whether GPTQ candidates are fitted with these Hessians: every group's row length at most GPTQ_MAX_ROW."""
    return hessians is not None and max((h.shape[0] for h in hessians.hessians), default=0) <= GPTQ_MAX_ROW


@dataclass(frozen=True)
class Option:
    """One way to share a weight."""

    kind: Kind = "tensor"  # "float": not shared at all, the weight stays as it is
    group_size: int = 0  # channels per codebook (kind "group")
    outlier_fraction: float = 0.0  # of the kept entries, stored exactly
    weighted: bool = False  # k-means weighted by importance
    gptq: bool = False  # codes chosen column by column with error feedback (needs Hessians)

    @property
    def label(self) -> str:
        text = f"group{self.group_size}" if self.kind == "group" else self.kind
        if self.outlier_fraction:
            text += f"+outlier{self.outlier_fraction:g}"
        return text + ("/weighted" if self.weighted else "") + ("/gptq" if self.gptq else "")


@dataclass
class Candidate:
    option: Option
    shared: SharedWeight | None  # None for the "float" option (and for a predicted candidate, not fitted yet)
    bytes: int
    sqnr_db: float
    predicted: bool = False  # bytes and SQNR predicted, not measured (Judging.predict_gptq): fitted when picked


@dataclass
class Choice:
    """The chosen candidate, every candidate measured, and why."""

    chosen: Candidate
    candidates: list[Candidate]
    space: Literal["output", "weight", "model output"]
    target_db: float
    reason: str
    target: np.ndarray | None = None  # what the candidates approximate, when not the weight itself
    gains: OutputGains | None = None  # how the layer's error reaches the model's outputs, when measured

    def details(self) -> dict:
        gain = {} if self.gains is None else {"output_gains": self.gains.as_dict()}
        return {"granularity": self.chosen.option.label, "sqnr_db": _round(self.chosen.sqnr_db),
                "error_space": self.space, **gain, "target_sqnr_db": self.target_db, "reason": self.reason,
                "candidates": {c.option.label: {"bytes": c.bytes, "sqnr_db": _round(c.sqnr_db),
                                                **({"predicted": True} if c.predicted else {})}
                               for c in self.candidates}}


def _round(x: float) -> float | str:
    return round(x, 2) if math.isfinite(x) else str(x)


# ----------------------------------------------------------------------------- fitting

def fit(array: np.ndarray, bits: int, option: Option, fitting: Fitting | None = None, *,
        importance: np.ndarray | None = None, iterations: int = 4,
        scale_dtype: Literal["auto", "float16", "float32"] = "auto") -> SharedWeight:
    """Share `array` at `bits` the way `option` says (see the module docstring), as `fitting` says
    (name, channel axis, mask, Hessians, k-means start; its `fitted` is :func:`choose`'s business).

    importance: (C, K) nonnegative weights a_jk in the channel-first layout (used when
    option.weighted). fitting.mask: True where an entry is kept; pruned entries get code 0 of centroid
    0.0 (per group: code 0 of each group's codebook) and decode to exactly 0. fitting.hessians: the layer's
    input Hessians, which option.gptq needs (see :func:`onnxcompress.numerics.gptq.gptq_codes`).
    """
    fitting = fitting or Fitting()
    name, channel_axis, mask, hessians = fitting.name, fitting.channel_axis, fitting.mask, fitting.hessians
    shape, dtype = tuple(array.shape), array.dtype
    if option.kind != "tensor" and channel_axis is None:
        raise ValueError(f"'{option.kind}' sharing needs an output-channel axis; '{name}' has none")
    if option.gptq and (hessians is None or option.kind == "group"):
        raise ValueError("gptq codes need the layer's Hessians and one codebook for all channels")
    if option.kind == "tensor" and not option.outlier_fraction and not option.gptq and not option.weighted:
        return _fit_plain(array, bits, name=name, channel_axis=channel_axis, mask=mask, init=fitting.init,
                          seed=fitting.seed)
    axis = channel_axis
    # float32 weights are fitted in float32 (every sum in float64) unless data drives the fit
    narrow = array.dtype in (np.float16, np.float32) and not option.weighted and not option.gptq
    w = channel_first(np.asarray(array), axis, np.float32 if narrow else np.float64)
    kept = np.ones(w.shape, bool) if mask is None else to_matrix(np.asarray(mask, bool), axis)
    if mask is not None:
        w = np.where(kept, w, 0)
    a = None
    if option.weighted and importance is not None:
        a = to_matrix(from_matrix(np.asarray(importance, np.float64), shape, channel_axis), axis)
    keep_zero = mask is not None
    outliers = pick_outliers(w, kept, option.outlier_fraction, relative=option.kind != "tensor")
    codes, book, offsets, scale = _codes(w, kept & ~outliers, a, bits, option, fitting, iterations, scale_dtype)
    exact = w
    if option.gptq:
        codes, exact = gptq_codes(w, Grid(book, scale, keep_zero), kept, outliers, hessians)
        book, scale = refit_under_hessians(w, codes, Grid(book, scale, keep_zero), kept & ~outliers,
                                           np.where(outliers, exact, 0.0), hessians, scale_dtype)
    codes = (codes if mask is None else np.where(kept, codes, 0)).astype(np.uint8 if bits <= 8 else np.uint16)
    out_index = out_value = None
    if outliers.any():  # flat indices in the weight's own layout, ascending, and their exact values
        out_index = flat_indices(outliers, shape, axis)
        out_value = from_matrix(exact, shape, axis)[np.unravel_index(out_index, shape)].astype(np.float32)
    return SharedWeight(name=name, shape=shape, dtype=dtype, codes=weight_layout(codes, shape, axis),
                        codebook=book.astype(np.float32), bits=bits, channel_axis=channel_axis,
                        group_offsets=offsets, scale=scale, outlier_index=out_index, outlier_value=out_value,
                        zero_code=0 if keep_zero else None)


def _codes(w, fitted, a, bits: int, option: Option, fitting: Fitting, iterations: int, scale_dtype: str):
    """(codes, codebook, group offsets, scales) of the `fitted` entries of the (C, K) matrix `w` for
    `option`: one codebook, one per group of channels, or one around a scale per channel."""
    keep_zero, init, seed = fitting.mask is not None, fitting.init, fitting.seed
    if option.kind == "group":
        codes, book, offsets = fit_groups(w, fitted, a, bits, option.group_size, keep_zero, init, seed)
        return codes, book, offsets, None
    if option.kind == "channel":
        codes, book, scale = fit_scaled(w, fitted, a, ScaledFit(bits, keep_zero, init, seed, iterations, scale_dtype,
                                                                fitting.start))
        return codes, book, None, scale
    codes, book = fit_tensor(w, fitted, a, bits, keep_zero, init, seed)
    return codes, book, None, None


def _fit_plain(array: np.ndarray, bits: int, *, name: str, channel_axis: int | None, mask: np.ndarray | None,
               init: str, seed: int) -> SharedWeight:
    """One unweighted codebook for the whole tensor: k-means on the values in their own layout and
    precision (no channel-first or float64 copy), its labels the codes. The same codebook and codes
    as the general path: the values and their order-free fit are the same, and the labels are the
    nearest centroids with zeros on code 0 under a mask, as nearest_codes gives."""
    values = np.asarray(array)
    if values.dtype not in (np.float16, np.float32, np.float64):
        values = values.astype(np.float64)
    keep_zero = mask is not None
    if keep_zero:
        values = np.where(np.asarray(mask, bool), values, values.dtype.type(0))
    result = kmeans_1d(values, 2 ** bits, init=init, seed=seed, keep_zero=keep_zero)
    book = result.centroids if result.centroids.size else np.zeros(1)
    codes = result.labels.astype(np.uint8 if bits <= 8 else np.uint16, copy=False)
    return SharedWeight(name=name, shape=tuple(array.shape), dtype=array.dtype, codes=codes,
                        codebook=book.astype(np.float32), bits=bits, channel_axis=channel_axis,
                        zero_code=0 if keep_zero else None)


# ----------------------------------------------------------------------------- measuring

def measure(array: np.ndarray, shared: SharedWeight, hessians: LayerHessians | None,
            gains: OutputGains | None = None, *, mean_free: bool = False) -> float:
    """SQNR (dB) of the shared weight: in the layer's output with `hessians`, at the model's outputs
    with `gains` too (:mod:`onnxcompress.runtime.sensitivity`), else in weight space. mean_free: the layer's
    bias will take up the error's mean D E[x] (bias correction), so that part does not count."""
    if hessians is None and shared.scale is None and shared.group_offsets is None and shared.outlier_index is None:
        book = shared.codebook.astype(np.float32).astype(shared.dtype)  # what decode() gives, without the full copy
        return sqnr_db(*signal_and_error(array, codebook=book, codes=shared.codes))
    if hessians is None:  # a block at a time: no full-size decoded copy
        flat, signal, noise = np.asarray(array).reshape(-1), 0.0, 0.0
        for part, decoded in shared.decoded_blocks(CHUNK):
            block_signal, block_noise = signal_and_error(flat[part], decoded)
            signal, noise = signal + block_signal, noise + block_noise
        return sqnr_db(signal, noise)
    w = np.asarray(array, np.float64)
    d = w - shared.decode().astype(np.float64)
    w, d = to_matrix(w, shared.channel_axis), to_matrix(d, shared.channel_axis)
    signal, noise = hessians.signal_and_noise(w, d)
    mean = mean_part(hessians, d) if gains is not None or mean_free else 0.0
    if mean_free:
        noise, mean = max(noise - mean, 0.0), 0.0
    return sqnr_db(signal, noise) if gains is None else gains.output_sqnr_db(signal, noise, mean)


def options_for(granularity: str, *, has_channel_axis: bool, channels: int, weighted: bool,
                group_size: int, outlier_fraction: float, keep_float: bool = False, gptq: bool = True) -> list[Option]:
    """The candidates a granularity setting tries (unweighted and, with data, importance-weighted, and with
    `gptq` GPTQ's too); keep_float adds leaving the weight unshared (with "auto")."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, not {granularity!r}")
    kinds: list[Option] = []
    channel_ok = has_channel_axis and channels > 1
    if granularity in ("tensor", "auto") or not channel_ok:
        kinds.append(Option("tensor"))
    if granularity in ("channel", "auto") and channel_ok:
        kinds.append(Option("channel"))
    if granularity in ("group", "auto") and channel_ok and group_size < channels:
        kinds.append(Option("group", group_size=group_size))
    if granularity in ("outlier", "auto") and outlier_fraction > 0:
        kinds.append(Option("tensor", outlier_fraction=outlier_fraction))
        if granularity == "auto" and channel_ok:
            kinds.append(Option("channel", outlier_fraction=outlier_fraction))
    if weighted:  # with data: importance-weighted k-means, and codes with error feedback
        kinds += [Option(o.kind, o.group_size, o.outlier_fraction, weighted=True) for o in kinds] + \
                 [Option(o.kind, o.group_size, o.outlier_fraction, weighted=True, gptq=True)
                  for o in kinds if o.kind != "group" and gptq]
    if keep_float and granularity == "auto":  # leaving the weight as it is (a bias, whose error lands on every output)
        kinds.append(Option("float"))
    return kinds or [Option("tensor")]  # e.g. "group" with one group, "outlier" with a zero fraction


@dataclass(frozen=True, eq=False)
class Fitting:
    """How :func:`choose` fits its candidates to one weight: its name and channel axis, the layer's input
    Hessians (with data), the kept-entry mask of a pruned weight, the k-means start, options already
    fitted to this very array with these arguments (reused, not fitted again), and a codebook to start
    per-channel fits from instead of k-means (the chosen fit on a sample of the weight's channels,
    :func:`granular_fit.scaled_start`)."""

    name: str = "weight"
    channel_axis: int | None = None
    hessians: LayerHessians | None = None
    mask: np.ndarray | None = None
    init: str = "linear"
    seed: int = 0
    fitted: dict[Option, SharedWeight] | None = None
    start: np.ndarray | None = None  # per-channel fits start from this codebook (granular_fit.ScaledFit.start)


@dataclass(frozen=True, eq=False)
class Judging:
    """How :func:`choose` prices, measures and picks: portable_bytes(shared) -> int prices a candidate
    (default SharedWeight.payload_bytes); the "float" option costs `float_bytes` (default the array's
    bytes) and has no error. measure_with(shared) -> SQNR dB replaces :func:`measure` (a bias measured in
    its layer's output, say), in `space`. gains: how the layer's error reaches the model's outputs
    (:mod:`onnxcompress.runtime.sensitivity`); with them :func:`measure` judges every candidate there, in space
    "model output". mean_free: the error's mean will be corrected in the layer's bias (see
    :func:`measure`). model_elements: the model's size, against which bytes trade for dB."""

    target_db: float = 30.0
    model_elements: int | None = None
    portable_bytes: Callable[[SharedWeight], int] | None = None
    float_bytes: int | None = None
    measure_with: Callable[[SharedWeight], float] | None = None
    space: Literal["output", "weight", "model output"] | None = None
    gains: OutputGains | None = None
    mean_free: bool = False
    # GPTQ options other than the per-tensor one are predicted, not fitted (see predict_gptq); only for a caller
    # that fits a predicted candidate it picks (the share pass's joint choice)
    predict_gptq: bool = False


# the GPTQ option always fitted, and its importance-weighted k-means twin: their SQNR difference predicts the others'
TENSOR_GPTQ = Option("tensor", weighted=True, gptq=True)


def predict_gptq(candidates: Sequence[Candidate], options: Sequence[Option]) -> list[Candidate] | None:
    """Candidates for GPTQ `options` predicted from measured ones: the bytes of the option's weighted k-means
    twin (the same things stored), its SQNR plus what GPTQ gained per tensor (TENSOR_GPTQ over its twin): on
    MiniLM-like layers that gain was the same for every option within 0.4 dB, and each GPTQ fit costs a K x K
    inverse and a code Gram of C K^2 entries. None when a measurement is missing."""
    by = {c.option: c for c in candidates if not c.predicted}
    tensor, plain = by.get(TENSOR_GPTQ), by.get(Option("tensor", weighted=True))
    if tensor is None or plain is None or not (math.isfinite(tensor.sqnr_db) and math.isfinite(plain.sqnr_db)):
        return None
    twins = [by.get(Option(o.kind, o.group_size, o.outlier_fraction, weighted=True)) for o in options]
    if any(t is None or not math.isfinite(t.sqnr_db) for t in twins):
        return None
    gain = tensor.sqnr_db - plain.sqnr_db
    return [Candidate(o, None, t.bytes, t.sqnr_db + gain, predicted=True) for o, t in zip(options, twins)]


def choose(array: np.ndarray, bits: int, options: Sequence[Option], fitting: Fitting, judging: Judging) -> Choice:
    """Fit every option, measure SQNR and bytes, keep the smallest one good enough (module docstring).
    In the fallback, a candidate's SQNR counts up to the target only: fidelity beyond it buys nothing."""
    hessians, gains, target_db = fitting.hessians, judging.gains, judging.target_db
    price = judging.portable_bytes or (lambda s: s.payload_bytes())
    sqnr = judging.measure_with or (lambda shared: measure(array, shared, hessians, gains,
                                                           mean_free=judging.mean_free))
    importance = hessians.importance() if hessians is not None else None
    deferred = [o for o in options if o.gptq and o != TENSOR_GPTQ and not (fitting.fitted or {}).get(o)] \
        if judging.predict_gptq and TENSOR_GPTQ in options else []
    candidates = []

    def fitted(option: Option) -> Candidate:
        shared = (fitting.fitted or {}).get(option) or fit(array, bits, option, fitting, importance=importance)
        return Candidate(option, shared, int(price(shared)), sqnr(shared))

    for option in options:
        if option.kind == "float":
            size = judging.float_bytes if judging.float_bytes is not None else int(np.asarray(array).nbytes)
            candidates.append(Candidate(option, None, int(size), math.inf))
        elif option not in deferred:
            candidates.append(fitted(option))
    if deferred:
        candidates += predict_gptq(candidates, deferred) or [fitted(o) for o in deferred]
        candidates.sort(key=lambda c: options.index(c.option))
    measured = [c for c in candidates if not c.predicted]
    space = judging.space or ("weight" if hessians is None else "output" if gains is None else "model output")
    # float always reaches the target: it is taken over a coded option only when smaller, or by the rate below
    good = [c for c in measured if c.sqnr_db >= target_db and c.shared is not None]
    if len(candidates) == 1:
        chosen, reason = candidates[0], "the only option tried"
    elif good:
        chosen = min(good + [c for c in measured if c.shared is None], key=lambda c: (c.bytes, -c.sqnr_db))
        reason = f"smallest option reaching the {target_db:g} dB {space} SQNR target"
    else:
        per_byte = DB_PER_BIT * 8 / max(judging.model_elements or int(np.size(array)), 1)
        chosen = max(measured, key=lambda c: (min(c.sqnr_db, target_db) - per_byte * c.bytes, -c.bytes))
        reason = (f"no option reaches the {target_db:g} dB target: best SQNR net of its bytes, priced at "
                  f"{DB_PER_BIT} dB per extra bit per weight")
    return Choice(chosen, candidates, space, target_db, reason, gains=gains)
