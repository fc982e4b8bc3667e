"""Streaming kernels for k-means on large tensors: a value histogram, nearest-boundary search in
the values' own precision (by table look-up), and sums of squared errors, each in one pass over
fixed-size chunks.

A tensor of n values costs O(n) here with no full-size temporary: the histogram replaces the
O(n log n) sort of :func:`onnxcompress.numerics.kmeans.kmeans_1d` when n is large. Its ``bins`` uniform
bins over [min, max] each keep their count (or total weight) and the exact (weighted) mean of
the values that fell in, so a Lloyd step on the bins computes every centroid exactly as the mean
of its values, except the values of the one bin a decision boundary cuts, which go to one side
together: with 2**16 bins that moves the boundaries by at most (max - min) / 65536.

Pure numpy; deterministic (same chunks, same order of sums, whatever the process).
"""
from __future__ import annotations

import numpy as np

CHUNK = 1 << 20  # elements per chunk: a few MB of temporaries


def chunks(flat: np.ndarray):
    """Consecutive slices of a 1-D array, CHUNK elements each (views, no copies)."""
    for start in range(0, flat.size, CHUNK):
        yield slice(start, start + CHUNK)


def histogram_dtype(flat: np.ndarray) -> type:
    """The precision bin indices are computed in: float32 for float16/32 values, else float64."""
    return np.float32 if flat.dtype in (np.float16, np.float32) else np.float64


def histogram_fits(lo: float, hi: float, bins: int, dtype: type) -> bool:
    """Whether values in [lo, hi] can be binned in ``dtype`` (finite width and scale)."""
    with np.errstate(over="ignore", divide="ignore"):
        return bool(np.isfinite(hi - lo) and (hi == lo or np.isfinite(dtype(bins / (hi - lo)))))


def value_histogram(flat: np.ndarray, weights: np.ndarray | None, bins: int, *, skip_zeros: bool
                    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """The nonempty bins of a uniform histogram of finite 1-D ``flat``: (means, total weights or
    None when unweighted, counts), ascending by value.

    A bin's mean is sum(w x) / sum(w) over its values (the plain mean where sum(w) = 0), so it lies
    inside the bin and the means ascend strictly. Bin indices are floor((x - min) * bins / (max -
    min)), a monotone function of x in the values' precision (:func:`histogram_fits` must
    hold). skip_zeros: values equal to 0 are
    left out (counted nowhere).
    """
    work = histogram_dtype(flat)
    lo, hi = float(np.min(flat)), float(np.max(flat))
    scale = work(bins / (hi - lo)) if hi > lo else work(0.0)
    count = np.zeros(bins, np.float64)
    total = np.zeros(bins, np.float64)  # sum of w x (of x when unweighted)
    plain = np.zeros(bins, np.float64) if weights is not None else None  # sum of x
    wsum = np.zeros(bins, np.float64) if weights is not None else None
    for part in chunks(flat):
        x = flat[part].astype(work, copy=False)
        with np.errstate(over="ignore", invalid="ignore"):
            index = np.clip((x - work(lo)) * scale, 0, bins - 1).astype(np.int32)
        keep = None
        if skip_zeros:
            zero = x == 0
            if zero.any():
                keep = ~zero
                index, x = index[keep], x[keep]
        count += np.bincount(index, minlength=bins)
        if weights is None:
            total += np.bincount(index, x, minlength=bins)
        else:
            w = weights[part] if keep is None else weights[part][keep]
            plain += np.bincount(index, x, minlength=bins)
            wsum += np.bincount(index, w, minlength=bins)
            total += np.bincount(index, w * x, minlength=bins)
    full = count > 0
    if weights is None:
        return total[full] / count[full], None, count[full]
    count, total, plain, wsum = count[full], total[full], plain[full], wsum[full]
    means = np.where(wsum > 0, total / np.where(wsum > 0, wsum, 1.0), plain / count)
    # a bin's weighted mean can round just outside its neighbours' order only through cancellation:
    # keep the order strict (the Lloyd steps need sorted values)
    return np.maximum.accumulate(means), wsum, count


def below(boundaries: np.ndarray, values: np.ndarray, centroids: np.ndarray | None = None,
          weights: np.ndarray | None = None):
    """#{j : boundaries_j < x} for each value (np.searchsorted side="left"), in one pass of
    chunks, without widening float32 values to float64: each float64 boundary b is replaced by
    the largest float32 d <= b, and for any float32 x, b < x exactly when d < x.

    With ``centroids`` (len(boundaries) + 1 of them), returns (labels, count of each label,
    sum_i w_i (x_i - c_{l_i})^2) from the same pass.
    """
    b = np.asarray(boundaries, np.float64)
    flat = np.asarray(values).reshape(-1)
    if flat.dtype == np.float32:
        b = float32_below(b)
    elif flat.dtype != np.float64:
        flat = flat.astype(np.float64)
    out = np.empty(flat.size, np.intp if b.size > 65535 else np.uint16 if b.size > 255 else np.uint8)
    counts, error = np.zeros(b.size + 1, np.int64), 0.0
    c = None if centroids is None else np.asarray(centroids, np.float64)
    grid = _Grid(b) if b.size and flat.size > CHUNK // 16 else None
    for part in chunks(flat):
        out[part] = np.searchsorted(b, flat[part], side="left") if grid is None else grid.below(flat[part])
        if c is not None:
            counts += np.bincount(out[part], minlength=b.size + 1)
            with np.errstate(over="ignore"):
                d = flat[part] - c[out[part]]
                error += float(np.dot(d, d)) if weights is None else float(np.dot(weights[part] * d, d))
    labels = out.reshape(np.shape(values))
    return labels if c is None else (labels, counts, error)


def float32_below(b: np.ndarray) -> np.ndarray:
    """The largest float32 d_j <= b_j of float64 boundaries: for any float32 x, b_j < x exactly when d_j < x."""
    with np.errstate(over="ignore"):
        narrow = np.asarray(b, np.float64).astype(np.float32)
    up = narrow.astype(np.float64) > b
    narrow[up] = np.nextafter(narrow[up], np.float32(-np.inf))
    return narrow


def signal_and_error(reference: np.ndarray, approx: np.ndarray | None = None, *, codebook: np.ndarray | None = None,
                     codes: np.ndarray | None = None) -> tuple[float, float]:
    """(sum x^2, sum (x - y)^2) in float64, chunk by chunk, with y = `approx`, or y = codebook[codes]
    (decoded a chunk at a time, in the codebook's precision) when `codebook` is given."""
    x = np.asarray(reference).reshape(-1)
    y = None if approx is None else np.asarray(approx).reshape(-1)
    flat_codes = None if codes is None else np.asarray(codes).reshape(-1)
    signal = noise = 0.0
    with np.errstate(over="ignore"):
        for part in chunks(x):
            a = x[part].astype(np.float64)
            d = a - (y[part] if y is not None else codebook[flat_codes[part]])
            signal, noise = signal + float(np.dot(a, a)), noise + float(np.dot(d, d))
    return signal, noise


class _Grid:
    """#{j : b_j < x} by table look-up: GRID uniform cells over [b_0, b_last] (plus one cell each
    side), cell(x) = trunc(clip((x - b_0) * scale + 1, 0, GRID + 1)), monotone in x in the
    boundaries' precision, and so exact: a boundary in a lower cell is below x, one in a higher
    cell is not, and only values sharing a cell with a boundary need a binary search."""

    def __init__(self, b: np.ndarray):
        self.b, work = b, b.dtype.type
        lo, hi = float(b[0]), float(b[-1])
        self.fits = histogram_fits(lo, hi, GRID, work)
        if not self.fits:
            return
        self.lo, self.scale = work(lo), work(GRID / (hi - lo)) if hi > lo else work(0.0)
        cell = self.cells(b)
        self.before = np.searchsorted(cell, np.arange(GRID + 2), side="left").astype(np.int32)
        self.shared = np.zeros(GRID + 2, bool)
        self.shared[cell] = True

    def cells(self, x: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):
            f = (x - self.lo) * self.scale + x.dtype.type(1)
            np.fmin(f, GRID + 1, out=f)  # NaN (fmin takes the number) sorts last, as in np.searchsorted
            np.maximum(f, 0, out=f)
        return f.astype(np.int32)

    def below(self, x: np.ndarray) -> np.ndarray:
        if not self.fits:
            return np.searchsorted(self.b, x, side="left")
        cell = self.cells(x)
        found = self.before[cell]
        near = np.flatnonzero(self.shared[cell])
        if near.size:
            found[near] = np.searchsorted(self.b, x[near], side="left")
        return found


GRID = 1 << 16  # cells of the look-up table of :func:`below`
