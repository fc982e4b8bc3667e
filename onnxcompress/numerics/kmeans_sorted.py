"""1-D k-means on sorted values: Lloyd's steps by prefix sums and the exact dynamic programme.

The algorithms of :mod:`onnxcompress.numerics.kmeans` (whose docstring states the math) on values already
sorted ascending and finite, with optional weights: :func:`lloyd_sorted` (O(k log n) a step),
:func:`optimal_sorted` (global optimum, O(k m log m) for m distinct values), :func:`fit_sorted`
(the distinct values or Lloyd from an init), :func:`boundaries` (the decision boundaries, ties
lower). Pure numpy.
"""
from __future__ import annotations

import numpy as np

from onnxcompress.numerics.histogram import float32_below

_DP_MAX_CELLS = 2**26  # largest split table of kmeans_1d_optimal (512 MB of intp)
_SCALE_ABOVE = 2.0**500  # larger magnitudes are fit at an (exact) power-of-two scale: see scaled


def boundaries(c: np.ndarray) -> np.ndarray:
    """Decision boundaries b_j = (c_j + c_{j+1}) / 2 of ascending centroids ``c``.

    Computed without overflow and nudged so that c_j <= b_j < c_{j+1} holds in floating point
    whenever c_j < c_{j+1}; a value x then belongs to cluster #{j : b_j < x} (ties go lower), and
    a value equal to a centroid always gets that centroid.
    """
    lo, hi = c[:-1], c[1:]
    if c.size and max(abs(float(c[0])), abs(float(c[-1]))) < 2.0**1000:  # ascending: no sum overflows
        b = (lo + hi) * 0.5
    else:
        with np.errstate(over="ignore"):
            b = (lo + hi) * 0.5
        bad = ~np.isfinite(b)
        if bad.any():
            b[bad] = lo[bad] * 0.5 + hi[bad] * 0.5
    return np.where(hi > lo, np.minimum(b, np.nextafter(hi, -np.inf)), b)


def cuts_of(xs: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Where each cluster of the ascending centroids `c` starts in the sorted values `xs`, framed by 0 and
    xs.size: cluster m holds xs[cuts[m]:cuts[m + 1]] (np.diff gives the clusters' sizes)."""
    return np.concatenate(([0], np.searchsorted(xs, boundaries(c), side="right"), [xs.size]))


def _init_centroids(xs, ws, k, init, seed) -> np.ndarray:
    """Initial centroids on sorted values ``xs`` (with ``> k`` distinct values), ascending and
    distinct, so fewer than k when several fall on one value (density init on tied data).

    linear:  c_j = min + j (max - min) / (k - 1)                  (Han et al.'s best)
    density: c_j = F^{-1}((j + 1/2) / k), F the (weighted) empirical CDF of the values
    random:  k distinct values drawn uniformly without replacement (Forgy), seeded
    """
    if init == "linear":
        c = np.linspace(xs[0], xs[-1], k)
    elif init == "density":
        n = xs.size
        cw = np.arange(1, n + 1, dtype=np.float64) if ws is None else np.cumsum(ws)
        if cw[-1] <= 0:  # all weights zero: fall back to the unweighted CDF
            cw = np.arange(1, n + 1, dtype=np.float64)
        targets = (np.arange(k) + 0.5) / k * cw[-1]
        c = xs[np.minimum(np.searchsorted(cw, targets, side="left"), n - 1)]
    else:
        distinct = xs[np.concatenate(([True], xs[1:] != xs[:-1]))]
        pick = np.random.default_rng(seed).choice(distinct.size, size=k, replace=False)
        c = distinct[np.sort(pick)]
    return np.unique(c)


def _farthest_values(xs, ws, first, c, cuts, m, binned=False) -> np.ndarray:
    """Up to ``m`` distinct values x_i (of positive weight) farthest from their own centroid,
    |x_i - c_{l_i}| > 0, farthest first: where scikit-learn re-seeds empty clusters. binned (the
    values are histogram bins of weight ws): ranked by ws_i (x_i - c_{l_i})^2 instead, the error
    a bin would stop adding, since one bin stands for many values."""
    d = np.abs(xs - np.repeat(c, np.diff(cuts)))
    if binned:
        d = ws * d * d
    d[~first] = -1.0
    if ws is not None:
        d[ws <= 0] = -1.0
    m = min(m, d.size)
    top = np.argpartition(d, d.size - m)[d.size - m:]
    top = top[np.argsort(-d[top], kind="stable")]
    return xs[top[d[top] > 0]]


def lloyd_sorted(xs, ws, first, c, k, max_iter, tol, binned=False) -> tuple[np.ndarray, int]:
    """Lloyd iterations for ``k`` clusters on sorted values ``xs`` (weights ``ws`` or None) from
    ascending distinct ``c`` (fewer than k when the init had duplicates: those count as empty).

    Step: cuts t_j = #{i : x_i <= b_j}, then c_j = m + (P[t_{j+1}] - P[t_j]) / (W[t_{j+1}] - W[t_j])
    for clusters of positive weight; each new c_j is clipped to its cluster's [min, max], which
    the exact mean satisfies, so the order stays strict.  Clusters of zero weight are re-seeded
    as in scikit-learn: the e empty ones (in index order, then the missing ones) move to the e
    distinct values farthest from their centroids, farthest first (``first`` marks the first of
    each run of equal values), then centroids are re-sorted.  Stops when the cuts repeat (an
    exact fixed point), when max_j |c_j' - c_j| <= tol * (max - min), or after ``max_iter``
    steps.
    """
    if ws is None:
        m, wcum, dev = float(np.mean(xs)), None, xs - float(np.mean(xs))
    else:
        total = float(np.sum(ws))
        m = float(np.sum(ws * xs) / total) if total > 0 else float(np.mean(xs))
        wcum, dev = np.concatenate(([0.0], np.cumsum(ws))), ws * (xs - m)
    p = np.concatenate(([0.0], np.cumsum(dev)))
    threshold = tol * float(xs[-1] - xs[0])
    prev = None
    n_iter = 0
    while n_iter < max_iter:
        n_iter += 1
        cuts = np.empty(c.size + 1, np.int64)  # cuts_of(xs, c), a few microseconds cheaper a step
        cuts[0], cuts[-1] = 0, xs.size
        cuts[1:-1] = np.searchsorted(xs, boundaries(c), side="right")
        if prev is not None and cuts.size == prev.size and (cuts == prev).all():
            break
        start, stop = cuts[:-1], cuts[1:]
        sw = (stop - start).astype(np.float64) if wcum is None else wcum[stop] - wcum[start]
        if c.size == k and np.minimum.reduce(sw) > 0:  # the usual step, without the masks (the same numbers)
            new = np.minimum(np.maximum(m + (p[stop] - p[start]) / sw, xs[start]), xs[stop - 1])
            c, prev, shift = new, cuts, float(np.maximum.reduce(np.abs(new - c)))
            if shift <= threshold:
                break
            continue
        full = sw > 0
        new = c.copy()
        s, e = start[full], stop[full]
        new[full] = np.clip(m + (p[e] - p[s]) / sw[full], xs[s], xs[e - 1])
        empty = np.flatnonzero(~full)
        if empty.size or c.size < k:
            far = _farthest_values(xs, ws, first, c, cuts, empty.size + k - c.size, binned)
            new[empty[:far.size]] = far[:empty.size]
            new = np.unique(np.concatenate((new, far[empty.size:])))
            shift = np.inf
        else:
            shift = float(np.max(np.abs(new - c)))
        c, prev = new, cuts
        if shift <= threshold:
            break
    return c, n_iter


def scaled(xs):
    """(xs / 2**e, e): a power-of-two scale (exact) keeping sums and midpoints of huge values
    finite; e = 0 for ordinary magnitudes."""
    big = max(abs(float(xs[0])), abs(float(xs[-1])))
    e = int(np.frexp(big)[1]) if big > _SCALE_ABOVE else 0
    return (np.ldexp(xs, -e) if e else xs), e


def fit_sorted(xs, ws, k, init, seed, max_iter, tol) -> tuple[np.ndarray, int]:
    """Ascending distinct centroids for sorted finite ``xs``: the distinct values if there are at
    most ``k`` of them (zero error), else Lloyd from ``init``."""
    if xs.size == 0:
        return np.empty(0), 0
    new_value = np.concatenate(([True], xs[1:] != xs[:-1]))
    if np.count_nonzero(new_value) <= k:
        return xs[new_value] + 0.0, 0  # + 0.0 turns -0.0 into 0.0
    xs_s, e = scaled(xs)
    c0 = _init_centroids(xs_s, ws, k, init, seed)
    c, n_iter = lloyd_sorted(xs_s, ws, new_value, c0, k, max_iter, tol)
    return (np.ldexp(c, e) if e else c), n_iter


def _dp_layer(prev, cost, m):
    """One layer of the 1-D k-means dynamic programme, D(j) = min_{0<=i<=j} prev(i) + cost(i, j)
    for j = 0..m, with its smallest argmin.  The argmin is nondecreasing in j (the cost is
    Monge), so divide and conquer over j needs O(m log m) evaluations; all subproblems of one
    recursion depth are evaluated together as flat arrays."""
    best_d, best_i = np.empty(m + 1), np.empty(m + 1, dtype=np.intp)
    jl, jr, ol, orr = (np.array([v], dtype=np.intp) for v in (0, m, 0, m))
    while jl.size:
        mid = (jl + jr) // 2
        lo, length = ol, np.minimum(orr, mid) - ol + 1
        starts = np.concatenate(([0], np.cumsum(length)[:-1]))
        seg = np.repeat(np.arange(mid.size), length)
        i = np.arange(seg.size) - starts[seg] + lo[seg]
        val = prev[i] + cost(i, mid[seg])
        low = np.minimum.reduceat(val, starts)
        hits = np.flatnonzero(val <= low[seg])
        first = hits[np.concatenate(([True], seg[hits][1:] != seg[hits][:-1]))]
        best_d[mid], best_i[mid] = low, i[first]
        arg = i[first]
        left, right = jl <= mid - 1, mid + 1 <= jr
        jl, jr, ol, orr = (np.concatenate((a[left], b[right])) for a, b in
                           ((jl, mid + 1), (mid - 1, jr), (ol, arg), (arg, orr)))
    return best_d, best_i


def optimal_sorted(xs, ws, k) -> np.ndarray:
    """Centroids of a globally optimal k-partition of sorted finite ``xs``.

    Over the m distinct values u_t with total weights W_t and prefix sums S0, S1, S2 of W_t,
    W_t d_t, W_t d_t^2 (d_t = u_t - mean), the cost of one cluster u[i:j] is
    S2[i:j] - S1[i:j]^2 / S0[i:j]; D_q(j) = min_i D_{q-1}(i) + cost(i, j), D_1(j) = cost(0, j),
    and the splits are read back from the stored argmins: O(k m log m) time, O(k m) memory.
    """
    if xs.size == 0:
        return np.empty(0)
    starts = np.flatnonzero(np.concatenate(([True], xs[1:] != xs[:-1])))
    if starts.size <= k:
        return xs[starts] + 0.0
    if (k - 1) * (starts.size + 1) > _DP_MAX_CELLS:
        raise ValueError(f"{starts.size} distinct values are too many for the exact k-means at "
                         f"k={k} (needs {k - 1} x {starts.size + 1} split table); use kmeans_1d")
    xs_s, e = scaled(xs)
    u = xs_s[starts]
    wt = np.diff(np.append(starts, xs.size)).astype(np.float64) if ws is None else \
        np.add.reduceat(ws, starts)
    total = float(wt.sum())
    mean = float(np.dot(wt, u) / total) if total > 0 else float(np.mean(u))
    d = u - mean
    s0, s1, s2 = (np.concatenate(([0.0], np.cumsum(v))) for v in (wt, wt * d, wt * d * d))

    def cost(i, j):
        w, s = s0[j] - s0[i], s1[j] - s1[i]
        return np.maximum(s2[j] - s2[i] - s * s / np.where(w > 0, w, 1.0), 0.0)

    m = u.size
    dq = cost(np.zeros(m + 1, dtype=np.intp), np.arange(m + 1))
    splits = []
    for _ in range(k - 1):
        dq, arg = _dp_layer(dq, cost, m)
        splits.append(arg)
    j, cuts = m, [m]
    for arg in reversed(splits):
        j = int(arg[j])
        cuts.append(j)
    cuts = np.array([0] + cuts[::-1])
    lo, hi = cuts[:-1], cuts[1:]
    lo, hi = lo[hi > lo], hi[hi > lo]
    w = s0[hi] - s0[lo]
    c = np.where(w > 0, mean + (s1[hi] - s1[lo]) / np.where(w > 0, w, 1.0), u[(lo + hi - 1) // 2])
    c = np.unique(np.clip(c, u[lo], u[hi - 1]))
    return np.ldexp(c, e) if e else c


def lloyd_sorted_many(xs_list, starts, k, max_iter, tol) -> list[tuple[np.ndarray, int] | None]:
    """:func:`lloyd_sorted` (unweighted, not binned) on several sorted value sets at once: every step
    is a few array operations for all of them (the boundaries, one binary search of every boundary
    in its own values, the means by prefix sums), each set stopping where it would alone, with the
    same floating-point operations on its own numbers, so the same centroids and step count. None for
    a set it does not run (a start of fewer than k centroids, or one that empties a cluster: the
    re-seeding to fewer than k distinct centroids is left to lloyd_sorted)."""
    out: list[tuple[np.ndarray, int] | None] = [None] * len(xs_list)
    run = [g for g in range(len(xs_list)) if starts[g].size == k and k > 1 and xs_list[g].size > 0]
    if not run:
        return out
    sets = _Sets(xs_list, run, tol)
    c = np.stack([starts[g] for g in run])
    prev = None
    n_iter = np.zeros(len(run), np.int64)
    live = np.ones(len(run), bool)
    failed = np.zeros(len(run), bool)
    while True:
        live &= n_iter < max_iter
        act = np.flatnonzero(live)
        if not act.size:
            break
        n_iter[act] += 1
        ca = c[act]
        cuts = sets.cuts(act, ca, k)
        if prev is not None:
            same = np.logical_and.reduce(cuts == prev[act], axis=1)
            live[act[same]] = False
            act, ca, cuts = act[~same], ca[~same], cuts[~same]
            if not act.size:
                break
        new, full = sets.means(act, ca, cuts)
        shift = np.maximum.reduce(np.abs(new - ca), axis=1)
        for i in np.flatnonzero(~np.logical_and.reduce(full, axis=1)):  # empty clusters re-seeded as lloyd_sorted does
            if not sets.reseed(act[i], new[i], ca[i], cuts[i], full[i], k):  # fewer than k: lloyd_sorted's path
                failed[act[i]], live[act[i]] = True, False
            shift[i] = np.inf
        c[act] = new
        if prev is None:
            prev = np.zeros((len(run), k + 1), np.int64)
        prev[act] = cuts
        live[act[shift <= sets.threshold[act]]] = False
    for i, g in enumerate(run):
        if not failed[i]:
            out[g] = (c[i].copy(), int(n_iter[i]))
    return out


class _Sets:
    """lloyd_sorted_many's sets laid end to end in one array, with each set's prefix sums of its values less
    their mean (starting with a 0) and, for float32 values, one int64 key per value: (set, float32 order)."""

    def __init__(self, xs_list, run, tol):
        self.sizes = np.array([xs_list[g].size for g in run], np.int64)
        self.offsets = np.concatenate(([0], np.cumsum(self.sizes + 1)[:-1]))
        self.flat = np.concatenate([xs_list[g] for g in run] + [np.zeros(1)])
        self.prefix = np.zeros(int(self.offsets[-1] + self.sizes[-1] + 1))
        self.mean = np.empty(len(run))
        for i, g in enumerate(run):  # per set, as lloyd_sorted does it (np.mean's pairwise sum, cumsum's order)
            xs = xs_list[g]
            self.mean[i] = float(np.mean(xs))
            self.prefix[self.offsets[i] + 1:self.offsets[i] + 1 + xs.size] = np.cumsum(xs - self.mean[i])
        self.value_at = self.offsets - np.arange(len(run))  # flat index of each set's first value
        last = self.flat[self.value_at + self.sizes - 1]
        self.threshold = tol * (last - self.flat[self.value_at])
        self.keys = None
        narrow = self.flat[:-1].astype(np.float32)
        if np.array_equal(narrow.astype(np.float64), self.flat[:-1]) and len(run) < 1 << 30:
            self.keys = float32_keys(narrow) + (np.repeat(np.arange(len(run), dtype=np.int64), self.sizes) << 32)

    def cuts(self, act, ca, k) -> np.ndarray:
        """Per active set, the counts of values at most each boundary of its centroids ca, framed by 0 and size."""
        lo_c, hi_c = ca[:, :-1], ca[:, 1:]
        b = (lo_c + hi_c) * 0.5
        b = np.where(hi_c > lo_c, np.minimum(b, np.nextafter(hi_c, -np.inf)), b)
        cuts = np.empty((act.size, k + 1), np.int64)
        cuts[:, 0], cuts[:, -1] = 0, self.sizes[act, None][:, 0]
        if self.keys is None:
            cuts[:, 1:-1] = _count_at_most(self.flat, self.value_at[act], self.sizes[act], b)
        else:  # x <= b exactly when x <= the largest float32 d <= b, for float32 x
            query = float32_keys(float32_below(b)) + (act.astype(np.int64) << 32)[:, None]
            cuts[:, 1:-1] = np.searchsorted(self.keys, query, side="right") - self.value_at[act, None]
        return cuts

    def means(self, act, ca, cuts) -> tuple[np.ndarray, np.ndarray]:
        """The clusters' means (clipped into their values' range; ca's centroid where a cluster is empty), and
        which clusters are not empty."""
        start, stop = cuts[:, :-1], cuts[:, 1:]
        sw = (stop - start).astype(np.float64)
        full = sw > 0
        base_p, base_x = self.offsets[act, None], self.value_at[act, None]
        mean = np.divide(self.prefix[base_p + stop] - self.prefix[base_p + start], sw, where=full, out=np.zeros(sw.shape))
        mean += self.mean[act, None]  # np.clip's numbers, by its two steps (the empty clusters keep ca's centroid)
        new = np.minimum(np.maximum(mean, self.flat[base_x + start]), self.flat[base_x + np.maximum(stop - 1, start)])
        return np.where(full, new, ca), full

    def reseed(self, g, new, ca, cuts, full, k) -> bool:
        """Set g's empty clusters take its farthest values, as lloyd_sorted does (new is changed in place);
        False when that leaves fewer than k distinct centroids."""
        xs = self.flat[self.value_at[g]:self.value_at[g] + self.sizes[g]]
        first = np.concatenate(([True], xs[1:] != xs[:-1]))
        empty = np.flatnonzero(~full)
        far = _farthest_values(xs, None, first, ca, cuts, empty.size)
        new[empty[:far.size]] = far[:empty.size]
        reseeded = np.unique(new)
        if reseeded.size < k:
            return False
        new[:] = reseeded
        return True


def _count_at_most(flat, first, sizes, b) -> np.ndarray:
    """#{i < sizes_g : flat[first_g + i] <= b_gj} for sorted runs (np.searchsorted side="right"), by one
    binary search of all (g, j) at once."""
    lo = np.zeros(b.shape, np.int64)
    hi = np.broadcast_to(sizes[:, None], b.shape).copy()
    base = first[:, None]
    while True:
        open_ = lo < hi
        if not open_.any():
            return lo
        mid = (lo + hi) >> 1
        at_most = open_ & (flat[base + np.minimum(mid, hi - 1)] <= b)
        lo = np.where(at_most, mid + 1, lo)
        hi = np.where(open_ & ~at_most, mid, hi)


FLOAT32_KEY_OFFSET = np.int64(1) << 31  # ordered_int32 + this: nonnegative int64 keys in [0, 2^32)


def ordered_int32(bits: np.ndarray) -> np.ndarray:
    """Signed int32 keys ordered as the float32 values whose bits these are (no -0.0, no NaN); its own inverse."""
    return bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))


def float32_keys(x: np.ndarray) -> np.ndarray:
    """int64 keys in [0, 2^32) ordered as the float32 values x (-0.0 as 0.0; no NaN)."""
    return ordered_int32((x + np.float32(0)).view(np.int32)).astype(np.int64) + FLOAT32_KEY_OFFSET
