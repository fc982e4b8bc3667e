"""Small numeric kernels every pass shares, defined once (pure numpy: no onnx, no onnxruntime).

- :func:`sqnr_db` / :func:`sqnr_db_of`: signal-to-quantization-noise ratio in dB.
- :func:`nearest_codes`: the nearest centroid of each value, among allowed centroids.
- :func:`magnitude_mask` / :func:`kept_count` / :func:`top_mask`: which entries pruning keeps.

The pruning mask is defined here and nowhere else, so that the prune pass and the bit-width
search's simulation of it agree entry for entry:

    kept_count(n, s) = n - floor(s * n + 1/2)

i.e. the number of PRUNED entries is s * n rounded half up (5 entries at 50%: 3 pruned, 2 kept),
and the kept entries are those of largest |w|; among equal magnitudes the entry with the lower
flat (C-order) index is kept. A sparsity of 0 keeps everything, and the count is exact for any
size, so the realised sparsity is within 1/(2n) of the target.
"""
from __future__ import annotations

import math

import numpy as np

from onnxcompress.numerics.kmeans import assign


def sqnr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise) of two energies (sums of squares); +inf when noise is 0, -inf
    when the signal is 0 and the noise is not."""
    if noise <= 0:
        return math.inf
    if signal <= 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def sqnr_db_of(ref: np.ndarray, approx: np.ndarray) -> float:
    """:func:`sqnr_db` of an approximation against its reference: signal sum ref^2, noise sum (ref - approx)^2."""
    ref = np.asarray(ref, dtype=np.float64).ravel()
    diff = ref - np.asarray(approx, dtype=np.float64).ravel()
    return sqnr_db(float(ref @ ref), float(diff @ diff))


def nearest_codes(values: np.ndarray, centroids: np.ndarray, *, allowed: np.ndarray | None = None,
                  keep_zero: bool = False) -> np.ndarray:
    """Index (int64) of the nearest centroid for every value, among the `allowed` ones (bool over
    centroids; default all). With `keep_zero`, centroid 0 is reserved for exact zeros: a value of 0
    takes code 0 and any other value the nearest of the allowed centroids 1... A value halfway
    between two centroids takes the lower one (:func:`onnxcompress.numerics.kmeans.assign`)."""
    values = np.asarray(values)
    c = np.asarray(centroids, dtype=np.float64).ravel()
    ok = np.ones(c.size, dtype=bool) if allowed is None else np.array(allowed, dtype=bool).ravel()
    if keep_zero and ok.size:
        ok[0] = False
    idx = np.flatnonzero(ok)
    if idx.size == 0:
        if keep_zero:
            return np.zeros(values.shape, dtype=np.int64)
        raise ValueError("nearest_codes needs at least one allowed centroid")
    codes = idx[assign(values, c[idx]).astype(np.int64)]
    return np.where(values == 0, 0, codes) if keep_zero else codes


def kept_count(n: int, sparsity: float) -> int:
    """Entries kept of `n` at `sparsity`: n minus the pruned count s * n rounded half up."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], not {sparsity!r}")
    return n - min(n, int(math.floor(sparsity * n + 0.5)))


def top_mask(array: np.ndarray, n_keep: int) -> np.ndarray:
    """True for the `n_keep` entries of largest |w| (equal magnitudes: the lower flat index first)."""
    flat = np.abs(np.asarray(array, dtype=np.float64)).reshape(-1)
    if n_keep <= 0 or n_keep >= flat.size:
        return np.full(np.shape(array), n_keep > 0, dtype=bool)
    if np.isnan(flat).any():  # NaN sorts last: the sort itself
        keep = np.zeros(flat.size, dtype=bool)
        keep[np.argsort(-flat, kind="stable")[:n_keep]] = True
        return keep.reshape(np.shape(array))
    # the n_keep-th largest magnitude t (a partition, not a sort): every entry above t is kept, and of those
    # equal to t the lowest flat indices, as many as are left (the order a stable sort by -|w| gives)
    threshold = np.partition(flat, flat.size - n_keep)[flat.size - n_keep]
    keep = flat > threshold
    ties = np.flatnonzero(flat == threshold)
    keep[ties[:n_keep - int(np.count_nonzero(keep))]] = True
    return keep.reshape(np.shape(array))


def magnitude_mask(array: np.ndarray, sparsity: float) -> np.ndarray:
    """The pruning mask (True = kept) of `array` at `sparsity`: :func:`top_mask` of :func:`kept_count` entries."""
    return top_mask(array, kept_count(int(np.size(array)), sparsity))
