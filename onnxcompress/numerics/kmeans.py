"""1-D k-means for weight sharing (Han et al., Deep Compression, ICLR 2016, section 3).

Weight sharing replaces every weight ``x_i`` by one of ``k`` centroids ``c_j``, chosen to minimise

    J(c, S) = sum_j sum_{i in S_j} w_i (x_i - c_j)^2            (w_i = 1 unless weighted)

Lloyd's algorithm alternates the two conditions of a local minimum:

    assignment   S_j = {i : c_j is the nearest centroid to x_i}
    update       c_j = sum_{i in S_j} w_i x_i / sum_{i in S_j} w_i

In one dimension with sorted centroids ``c_0 < ... < c_{k-1}`` every cluster is an interval of
the sorted values, cut at the boundaries ``b_j = (c_j + c_{j+1}) / 2``.  So we sort once
(O(n log n)), keep prefix sums ``W[t] = sum_{i<t} w_i`` and ``P[t] = sum_{i<t} w_i (x_i - m)``
over the sorted values (``m`` the weighted mean, subtracted to limit cancellation), and one
Lloyd step is ``k - 1`` binary searches for the cuts ``t_j`` plus

    c_j = m + (P[t_{j+1}] - P[t_j]) / (W[t_{j+1}] - W[t_j])

which costs O(k log n), independent of n.  Ties (a value exactly on a boundary) go to the lower
centroid everywhere: in the Lloyd steps, in the final labels and in :func:`assign`.
:func:`kmeans_1d_optimal` finds the global minimum instead, by dynamic programming over the
distinct values (O(k m log m) for m distinct values): for small m, or to judge Lloyd.

Over HISTOGRAM_ABOVE values (2M), Lloyd runs on a histogram of HISTOGRAM_BINS bins instead of the
sorted values (:mod:`onnxcompress.numerics.histogram`): each bin is one value, its mean, weighted by its
count, so the prefix sums above still give each centroid as the exact mean of its bins' values;
only the values of a bin that a boundary cuts go to one side together. O(n) instead of
O(n log n); the final labels are exact nearest centroids, and the MSE stays within 1.01x of the
full fit (tests/test_kmeans.py measures it).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np

from onnxcompress.numerics.histogram import below, histogram_dtype, histogram_fits, value_histogram
from onnxcompress.numerics.kmeans_sorted import (_init_centroids, boundaries, cuts_of, fit_sorted, lloyd_sorted,
                                                 lloyd_sorted_many, optimal_sorted, scaled)

INITS = ("linear", "density", "random")

HISTOGRAM_ABOVE = 1 << 21  # larger inputs are fit on a histogram (module docstring)
HISTOGRAM_BINS = 1 << 16
DP_POINTS = 1 << 12  # the histogram's bins are merged to about this many for the exact k-means start


@dataclass(frozen=True)
class KMeansResult:
    """Outcome of :func:`kmeans_1d` and :func:`kmeans_1d_optimal`.

    centroids: float64, shape (k_eff,), k_eff <= k, distinct and sorted ascending; with
        ``keep_zero=True`` ``centroids[0] == 0.0`` (reserved for the zeros) and ``centroids[1:]``
        are sorted ascending.
    labels: shape of the input; index into ``centroids``; uint8 if k_eff <= 256, uint16 if
        k_eff <= 65536, else int32.
    inertia: sum_i w_i (x_i - centroids[labels_i])^2.
    n_iter: Lloyd iterations run (assignment steps); 0 when no iteration was needed.
    """

    centroids: np.ndarray
    labels: np.ndarray
    inertia: float
    n_iter: int


def label_dtype(k_eff: int) -> np.dtype:
    """Smallest label dtype for ``k_eff`` centroids: uint8 (<= 256), uint16 (<= 65536), int32."""
    if k_eff <= 256:
        return np.dtype(np.uint8)
    if k_eff <= 65536:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def assign(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid for each value: argmin_j |x - c_j|.

    Any centroid order is allowed; a value equidistant from two centroids gets the one with the
    lower value (among equal centroids, the first).  O(n log k) by binary search on the sorted
    boundaries.  Returns an array of the shape of ``values`` with dtype :func:`label_dtype`.
    """
    v = np.asarray(values)
    c = np.asarray(centroids, dtype=np.float64).ravel()
    if c.size == 0:
        if v.size:
            raise ValueError("assign needs at least one centroid for a non-empty array")
        return np.zeros(v.shape, dtype=np.uint8)
    order = None if np.all(c[1:] >= c[:-1]) else np.argsort(c, kind="stable")
    c = c if order is None else c[order]
    idx = below(boundaries(c), v)
    if order is not None:
        idx = order[idx]
    return idx.astype(label_dtype(c.size), copy=False)


def quantization_mse(values, centroids, labels, sample_weight=None) -> float:
    """Mean squared error of replacing each value by its centroid.

    Unweighted: (1/n) sum_i (x_i - c_{l_i})^2.  Weighted: sum_i w_i (x_i - c_{l_i})^2 / sum_i w_i
    (so ``kmeans_1d(...).inertia == mse * n`` unweighted and ``mse * sum(w)`` weighted).  0.0 for
    an empty array or a zero total weight.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return 0.0
    c = np.asarray(centroids, dtype=np.float64).ravel()
    with np.errstate(over="ignore"):
        err2 = np.square(x - c[np.asarray(labels)])
        if sample_weight is None:
            return float(np.mean(err2))
        w = np.broadcast_to(np.asarray(sample_weight, dtype=np.float64), x.shape)
        total = float(np.sum(w))
        return float(np.sum(w * err2) / total) if total > 0 else 0.0


def _validate(values, k, sample_weight, keep_zero):
    """Check the arguments; return (input array, flat values, flat float64 weights or None)."""
    k = operator.index(k)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if keep_zero and k < 2:
        raise ValueError("keep_zero=True reserves one centroid for 0.0, so k must be at least 2")
    x = np.asarray(values)
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"values must be a real numeric array, got dtype {x.dtype}")
    flat = x.ravel()
    w = None
    if sample_weight is not None:
        w = np.asarray(sample_weight, dtype=np.float64)
        if w.shape != x.shape:
            raise ValueError(f"sample_weight has shape {w.shape}, values have shape {x.shape}")
        w = w.ravel()
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError("sample_weight must be finite and nonnegative")
    return x, flat, w


def _sorted(flat, w, keep_zero):
    """Sorted float64 values to fit and their weights (or None); with ``keep_zero`` without the zeros."""
    if flat.size == 0:
        return np.empty(0), None
    if w is None:
        native = flat.dtype in (np.float16, np.float32, np.float64)
        xs = np.sort(flat if native else flat.astype(np.float64)).astype(np.float64, copy=False)
        ws = None
    else:
        order = np.argsort(flat, kind="stable")
        xs = flat[order].astype(np.float64, copy=False)
        ws = w[order]
    if not (np.isfinite(xs[0]) and np.isfinite(xs[-1])):  # sorting puts NaN last, -Inf first
        raise ValueError("values contains NaN or Inf; k-means needs finite values")
    if keep_zero:
        lo, hi = np.searchsorted(xs, 0.0, side="left"), np.searchsorted(xs, 0.0, side="right")
        xs = np.concatenate((xs[:lo], xs[hi:]))
        ws = None if ws is None else np.concatenate((ws[:lo], ws[hi:]))
    return xs, ws


def _prepare(values, k, sample_weight, keep_zero):
    """Validate; return (input array, flat values, sorted float64 values to fit, their weights
    or None).  With ``keep_zero`` the zeros are left out of the sorted values."""
    x, flat, w = _validate(values, k, sample_weight, keep_zero)
    return (x, flat, *_sorted(flat, w, keep_zero))


def _finish(x, flat, xs, ws, c, n_iter, keep_zero) -> KMeansResult:
    """Final nearest-centroid assignment against ascending distinct ``c`` (fit on ``xs``),
    dropping clusters nobody chose; inertia from the sorted values."""
    if flat.size == 0:
        return KMeansResult(np.empty(0), np.zeros(x.shape, np.uint8), 0.0, n_iter)
    b = boundaries(c)
    counts = np.diff(np.concatenate(([0], np.searchsorted(xs, b, side="right"), [xs.size])))
    if c.size and not np.all(counts > 0):
        c, counts = c[counts > 0], counts[counts > 0]
        b = boundaries(c)
    with np.errstate(over="ignore"):
        err2 = np.square(xs - np.repeat(c, counts))
        inertia = float(np.sum(err2) if ws is None else np.sum(ws * err2))
    centroids = np.concatenate(([0.0], c)) if keep_zero else c
    dtype = label_dtype(centroids.size)
    if c.size:
        labels = below(b, flat).astype(dtype, copy=False)
    else:
        labels = np.zeros(flat.shape, dtype)
    if keep_zero:
        labels += dtype.type(1)
        labels[flat == 0] = 0
    return KMeansResult(centroids, labels.reshape(x.shape), inertia, n_iter)


def kmeans_1d(values: np.ndarray, k: int, *, init: str = "linear", seed: int = 0,
              max_iter: int = 300, tol: float = 1e-8, sample_weight: np.ndarray | None = None,
              keep_zero: bool = False) -> KMeansResult:
    """Weighted 1-D k-means (Lloyd on sorted values with prefix sums; see the module docstring).

    Minimises sum_i w_i (x_i - c_{l_i})^2 from the ``init`` centroids ("linear", "density" or
    "random", see :func:`_init_centroids`).  With fewer than ``k`` distinct values those values
    are the centroids, exactly.  With ``keep_zero`` values equal to 0 take label 0 and the exact
    centroid 0.0 (always reserved, even if no value is zero) and the other k - 1 centroids are fit
    on the nonzero values only (the weights of the zeros do not matter).  Empty clusters are
    re-seeded during the iterations (see :func:`lloyd_sorted`); any left empty at the end are
    dropped, so k_eff <= k.  ``tol`` is relative to the range of the values fit.
    An empty input gives empty centroids.  Computes in float64; deterministic for a fixed seed.
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    if max_iter < 0 or not tol >= 0:
        raise ValueError(f"max_iter and tol must be nonnegative, got {max_iter} and {tol}")
    x, flat, w = _validate(values, k, sample_weight, keep_zero)
    if flat.size > HISTOGRAM_ABOVE and flat.dtype in (np.float16, np.float32, np.float64):
        found = _fit_histogram(x, flat, w, k - 1 if keep_zero else k, max_iter, tol, keep_zero)
        if found is not None:
            return found
    xs, ws = _sorted(flat, w, keep_zero)
    c, n_iter = fit_sorted(xs, ws, k - 1 if keep_zero else k, init, seed, max_iter, tol)
    return _finish(x, flat, xs, ws, c, n_iter, keep_zero)


def centroids_many(values_list, k: int, *, init: str = "linear", seed: int = 0, max_iter: int = 300,
                   tol: float = 1e-8) -> list[np.ndarray]:
    """``[kmeans_1d(v, k, init=init, seed=seed, ...).centroids for v in values_list]`` (unweighted, no
    kept zeros), with the Lloyd steps of the sets fitted on their sorted values run together
    (:func:`lloyd_sorted_many`): the same centroids, without a Python loop per set and step."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    found: list[np.ndarray | None] = [None] * len(values_list)
    batch, sorted_sets, starts = [], [], []
    for i, values in enumerate(values_list):
        x, flat, _ = _validate(values, k, None, False)
        if flat.size > HISTOGRAM_ABOVE and flat.dtype in (np.float16, np.float32, np.float64):
            found[i] = kmeans_1d(values, k, init=init, seed=seed, max_iter=max_iter, tol=tol).centroids
            continue
        xs, _ = _sorted(flat, None, False)
        new_value = None if xs.size == 0 else np.concatenate(([True], xs[1:] != xs[:-1]))
        if xs.size == 0 or np.count_nonzero(new_value) <= k or scaled(xs)[1] or max_iter == 0:
            c, _ = fit_sorted(xs, None, k, init, seed, max_iter, tol)
            found[i] = _kept_centroids(xs, c)
            continue
        batch.append(i)
        sorted_sets.append(xs)
        starts.append(_init_centroids(xs, None, k, init, seed))
    for i, xs, start, done in zip(batch, sorted_sets, starts,
                                  lloyd_sorted_many(sorted_sets, starts, k, max_iter, tol)):
        if done is None:  # re-seeding an empty cluster: the one-set path
            first = np.concatenate(([True], xs[1:] != xs[:-1]))
            done = lloyd_sorted(xs, None, first, start, k, max_iter, tol)
        found[i] = _kept_centroids(xs, done[0])
    return found


def _kept_centroids(xs, c) -> np.ndarray:
    """The centroids some sorted value is nearest to (as :func:`_finish` keeps them)."""
    if xs.size == 0 or not c.size:
        return np.empty(0) if xs.size == 0 else c
    counts = np.diff(cuts_of(xs, c))
    return c if np.all(counts > 0) else c[counts > 0]


def _coarse(xs, ws) -> tuple[np.ndarray, np.ndarray]:
    """Sorted bins ``xs`` (weights ``ws``) merged into at most about DP_POINTS runs of consecutive
    bins, cut both every 2/DP_POINTS of the total weight and every 2/DP_POINTS of the range, so
    the dense middle and the sparse tails are both resolved: (the runs' weighted means, weights)."""
    half = DP_POINTS // 2
    total = float(ws.sum()) or 1.0
    mass = np.floor((np.cumsum(ws) - ws) / total * half)
    place = np.floor((xs - xs[0]) / max(float(xs[-1] - xs[0]), np.finfo(float).tiny) * half)
    _, run = np.unique(mass + place, return_inverse=True)
    weight = np.bincount(run, ws)
    plain = np.bincount(run, xs) / np.bincount(run)
    means = np.where(weight > 0, np.bincount(run, ws * xs) / np.where(weight > 0, weight, 1.0), plain)
    return np.maximum.accumulate(means), weight


def _histogram_centroids(flat, w, k, max_iter, tol, keep_zero) -> tuple[np.ndarray, int, np.ndarray] | None:
    """(centroids, Lloyd steps, the bins' means) of the histogram fit, before clusters nobody chose are
    dropped; None where the exact path is needed (see :func:`_fit_histogram`)."""
    lo, hi = float(np.min(flat)), float(np.max(flat))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError("values contains NaN or Inf; k-means needs finite values")
    if not histogram_fits(lo, hi, HISTOGRAM_BINS, histogram_dtype(flat)):
        return None
    means, wsum, counts = value_histogram(flat, w, HISTOGRAM_BINS, skip_zeros=keep_zero)
    if means.size <= k:
        return None
    ws = counts if wsum is None else wsum
    xs, e = scaled(means)
    first = np.concatenate(([True], xs[1:] != xs[:-1]))
    c, n_iter = lloyd_sorted(xs, ws, first, optimal_sorted(*_coarse(xs, ws), k), k, max_iter, tol, binned=True)
    return (np.ldexp(c, e) if e else c), n_iter, means


def kmeans_centroids(values: np.ndarray, k: int, *, init: str = "linear", seed: int = 0,
                     sample_weight: np.ndarray | None = None, keep_zero: bool = False) -> np.ndarray:
    """``kmeans_1d(values, k, ...).centroids`` without the labels. On the histogram path (unweighted, no kept
    zeros), a cluster is known to be chosen by some value when the means of two nonempty bins fall in its
    interval (b_{m-1}, b_m]: the lower bin's largest value is above b_{m-1} (its mean is) and at most the
    upper bin's mean, so at most b_m. When every cluster is known so, no pass over the values is needed
    for the labels of :func:`_fit_histogram` (which would keep every centroid); else it is made."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    x, flat, w = _validate(values, k, sample_weight, keep_zero)
    if flat.size > HISTOGRAM_ABOVE and flat.dtype in (np.float16, np.float32, np.float64):
        found = None if w is not None or keep_zero else _histogram_centroids(flat, None, k, 300, 1e-8, False)
        if found is not None:
            c, _, means = found
            inside = np.diff(cuts_of(means, c))
            if np.all(inside >= 2):
                return c
        return kmeans_1d(values, k, init=init, seed=seed, sample_weight=sample_weight, keep_zero=keep_zero).centroids
    xs, ws = _sorted(flat, w, keep_zero)
    c, _ = fit_sorted(xs, ws, k - 1 if keep_zero else k, init, seed, 300, 1e-8)
    c = _kept_centroids(xs, c)
    return np.concatenate(([0.0], c)) if keep_zero and flat.size else c


def _fit_histogram(x, flat, w, k, max_iter, tol, keep_zero) -> KMeansResult | None:
    """kmeans_1d on a histogram of the values (module docstring), started from the optimal centroids of
    the merged bins (so kmeans_1d's init and seed do not apply); None where the exact path is needed:
    at most ``k`` nonempty bins (few distinct values, which it reproduces exactly), or a range too wide
    to bin."""
    found = _histogram_centroids(flat, w, k, max_iter, tol, keep_zero)
    if found is None:
        return None
    c, n_iter, _ = found
    zeros = int(flat.size - np.count_nonzero(flat)) if keep_zero else 0
    while True:  # exact nearest-centroid labels; clusters nobody chose are dropped
        labels, taken, inertia = below(boundaries(c), flat, c, w)
        if zeros:  # the zeros take the reserved centroid 0.0 instead, exactly
            j = np.searchsorted(boundaries(c), 0.0, side="left")
            taken[j] -= zeros
            inertia -= zeros * float(c[j]) ** 2 if w is None else float(np.sum(w[flat == 0])) * float(c[j]) ** 2
        if np.all(taken > 0):
            break
        c = c[taken > 0]
    centroids = np.concatenate(([0.0], c)) if keep_zero else c
    labels = labels.astype(label_dtype(centroids.size), copy=False).reshape(-1)
    if keep_zero:
        labels += labels.dtype.type(1)
        for start in range(0, flat.size, 1 << 20):
            part = slice(start, start + (1 << 20))
            labels[part][flat[part] == 0] = 0
    return KMeansResult(centroids, labels.reshape(x.shape), max(inertia, 0.0), n_iter)


def kmeans_1d_optimal(values: np.ndarray, k: int, *, sample_weight: np.ndarray | None = None,
                      keep_zero: bool = False) -> KMeansResult:
    """Globally optimal weighted 1-D k-means, by dynamic programming over the m distinct values
    (see :func:`optimal_sorted`): O(k m log m) time and O(k m) memory, so meant for small m
    (float16 weights, already-quantized tensors, tests).  Same result conventions as
    :func:`kmeans_1d`; ``n_iter`` is 0.
    """
    x, flat, xs, ws = _prepare(values, k, sample_weight, keep_zero)
    c = optimal_sorted(xs, ws, k - 1 if keep_zero else k)
    return _finish(x, flat, xs, ws, c, 0, keep_zero)
