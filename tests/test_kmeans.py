"""Tests for onnxcompress.numerics.kmeans: agreement with a naive Lloyd, init rules, keep_zero,
edge cases, weights, properties (hypothesis) and MSE parity with scikit-learn."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnxcompress.numerics.kmeans import (KMeansResult, assign, kmeans_1d, kmeans_1d_optimal,
                                 quantization_mse)


def naive_lloyd(x, c, w=None, max_iter=300, tol=1e-8, k=None):
    """Textbook weighted Lloyd by brute force, with kmeans_1d's documented rules: ties go to the
    lower centroid; a zero-weight cluster is re-seeded at the distinct positive-weight values
    farthest from their centroids; stop on repeated labels or max shift <= tol * (max - min)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    w = np.ones_like(x) if w is None else np.asarray(w, dtype=np.float64).ravel()
    k = len(c) if k is None else k
    c = np.unique(np.asarray(c, dtype=np.float64))  # duplicates count as empty clusters
    threshold = tol * (x.max() - x.min())
    prev, n_iter = None, 0
    while n_iter < max_iter:
        n_iter += 1
        labels = np.argmin(np.abs(x[:, None] - c[None, :]), axis=1)  # first index = lower value
        if prev is not None and np.array_equal(labels, prev):
            break
        new = c.copy()
        sw = np.array([w[labels == j].sum() for j in range(c.size)])
        for j in np.flatnonzero(sw > 0):
            new[j] = np.sum(w[labels == j] * x[labels == j]) / sw[j]
        empty = np.flatnonzero(sw == 0)
        if empty.size or c.size < k:
            d = np.abs(x - c[labels])
            vals, first = np.unique(x, return_index=True)
            ok = (w[first] > 0) & (d[first] > 0)
            vals, dv = vals[ok], d[first][ok]
            far = vals[np.argsort(-dv, kind="stable")][: empty.size + k - c.size]
            new[empty[: far.size]] = far[: empty.size]
            new = np.unique(np.concatenate((new, far[empty.size:])))
            shift = np.inf
        else:
            shift = np.max(np.abs(new - c))
        c, prev = new, labels
        if shift <= threshold:
            break
    return c, n_iter


def initial_centroids(x, k, init, seed):
    """The documented init rules, written out independently."""
    xs = np.sort(np.ravel(x))
    if init == "linear":
        return np.linspace(xs[0], xs[-1], k)
    if init == "density":
        return xs[np.ceil((np.arange(k) + 0.5) / k * xs.size).astype(int) - 1]
    distinct = np.unique(xs)
    return distinct[np.sort(np.random.default_rng(seed).choice(distinct.size, k, replace=False))]


def check_result(x, r: KMeansResult, keep_zero=False):
    """Structural invariants of a result."""
    c = r.centroids
    assert c.dtype == np.float64
    assert r.labels.shape == np.shape(x)
    body = c[1:] if keep_zero else c
    assert np.all(np.diff(body) > 0), "centroids distinct and ascending"
    if keep_zero and c.size:
        assert c[0] == 0.0
    if np.size(x):
        assert int(r.labels.max()) < c.size


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("init", ["linear", "density", "random"])
def test_matches_naive_lloyd(seed, init):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(20, 120)), int(rng.integers(2, 9))
    x = rng.normal(0, 1, n) if seed % 2 else rng.laplace(0, 0.3, n)
    r = kmeans_1d(x, k, init=init, seed=seed)
    ref, ref_iter = naive_lloyd(x, initial_centroids(x, k, init, seed))
    ref = ref[[np.any(np.argmin(np.abs(x[:, None] - ref), axis=1) == j) for j in range(ref.size)]]
    np.testing.assert_allclose(r.centroids, ref, rtol=0, atol=1e-9)
    assert r.n_iter == ref_iter
    check_result(x, r)


@pytest.mark.parametrize("init", ["linear", "density", "random"])
def test_matches_naive_lloyd_on_tied_data(init):
    """Mostly zeros: the density init puts several centroids on 0; the duplicates are re-seeded
    like empty clusters, so all k clusters are used."""
    rng = np.random.default_rng(11)
    x = np.concatenate((np.zeros(60), rng.normal(0, 1, 12), np.full(10, 0.5)))
    k = 5
    r = kmeans_1d(x, k, init=init, seed=2)
    ref, ref_iter = naive_lloyd(x, initial_centroids(x, k, init, 2), k=k)
    np.testing.assert_allclose(r.centroids, ref, atol=1e-9)
    assert r.centroids.size == k and r.n_iter == ref_iter
    check_result(x, r)


@pytest.mark.parametrize("seed", range(4))
def test_matches_naive_weighted_lloyd(seed):
    rng = np.random.default_rng(100 + seed)
    x = rng.normal(0, 1, 80)
    w = rng.exponential(1.0, 80)
    w[:5] = 0.0
    r = kmeans_1d(x, 5, sample_weight=w)
    ref, _ = naive_lloyd(x, np.linspace(x.min(), x.max(), 5), w)
    np.testing.assert_allclose(r.centroids, ref, atol=1e-9)
    assert np.isclose(r.inertia, np.sum(w * (x - r.centroids[r.labels]) ** 2), rtol=1e-12)


def test_inits_follow_their_rules_and_differ():
    x = np.random.default_rng(1).uniform(-1, 1, 1000) ** 3
    k = 8
    lin = kmeans_1d(x, k, init="linear", max_iter=0).centroids
    den = kmeans_1d(x, k, init="density", max_iter=0).centroids
    rnd = kmeans_1d(x, k, init="random", max_iter=0, seed=3).centroids
    np.testing.assert_allclose(lin, np.linspace(x.min(), x.max(), k))
    xs = np.sort(x)
    np.testing.assert_array_equal(den, initial_centroids(x, k, "density", 0))
    np.testing.assert_array_equal(den, [xs[int(np.ceil((j + 0.5) / k * x.size)) - 1]
                                        for j in range(k)])
    assert set(rnd) <= set(x) and rnd.size == k
    assert not np.allclose(lin, den) and not np.allclose(lin, rnd) and not np.allclose(den, rnd)
    for init in ("linear", "density", "random"):
        check_result(x, kmeans_1d(x, k, init=init))


def test_random_init_deterministic_per_seed():
    x = np.random.default_rng(2).normal(size=500)
    a = kmeans_1d(x, 6, init="random", seed=7, max_iter=0)
    b = kmeans_1d(x, 6, init="random", seed=7, max_iter=0)
    c = kmeans_1d(x, 6, init="random", seed=8, max_iter=0)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.centroids, c.centroids)
    full = [kmeans_1d(x, 6, init="random", seed=7) for _ in range(2)]
    np.testing.assert_array_equal(full[0].centroids, full[1].centroids)


def test_unknown_init_names_choices():
    with pytest.raises(ValueError, match="linear, density, random"):
        kmeans_1d(np.ones(3), 2, init="kmeans++")


def test_keep_zero():
    rng = np.random.default_rng(3)
    x = rng.normal(0, 0.1, (40, 50))
    x[rng.random(x.shape) < 0.7] = 0.0
    x[0, 0] = -0.0
    x[0, 1] = 1e-9  # a tiny nonzero stays off the zero centroid
    r = kmeans_1d(x, 16, keep_zero=True)
    check_result(x, r, keep_zero=True)
    assert r.centroids[0] == 0.0 and r.centroids.size == 16
    assert np.all(r.labels[x == 0] == 0)
    assert np.all(r.labels[x != 0] > 0)
    assert r.centroids[r.labels[0, 1]] != 0.0
    # the other centroids are k-means on the nonzeros alone
    nz = kmeans_1d(x[x != 0], 15)
    np.testing.assert_array_equal(r.centroids[1:], nz.centroids)
    assert np.isclose(r.inertia, nz.inertia, rtol=1e-12)


def test_keep_zero_edge_cases():
    r = kmeans_1d(np.zeros((3, 3), np.float32), 4, keep_zero=True)
    np.testing.assert_array_equal(r.centroids, [0.0])
    assert np.all(r.labels == 0) and r.inertia == 0.0
    r = kmeans_1d(np.array([1.0, 2.0]), 4, keep_zero=True)  # no zeros: 0.0 still reserved
    np.testing.assert_array_equal(r.centroids, [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(r.labels, [1, 2])
    with pytest.raises(ValueError, match="k must be at least 2"):
        kmeans_1d(np.ones(3), 1, keep_zero=True)


def test_fewer_distinct_values_than_k_are_returned_exactly():
    x = np.array([[0.1, -3.0, 0.1], [7.25, -3.0, 0.3]], dtype=np.float32)
    r = kmeans_1d(x, 8)
    np.testing.assert_array_equal(r.centroids, np.unique(x.astype(np.float64)))
    np.testing.assert_array_equal(r.centroids[r.labels], x.astype(np.float64))
    assert r.inertia == 0.0 and r.n_iter == 0
    adjacent = np.array([1.0, np.nextafter(1.0, 2.0), np.nextafter(np.nextafter(1.0, 2.0), 2.0)])
    r = kmeans_1d(adjacent, 3)
    np.testing.assert_array_equal(r.labels, [0, 1, 2])


def test_empty_nan_and_bad_arguments():
    r = kmeans_1d(np.empty((0, 4), np.float32), 4)
    assert r.centroids.size == 0 and r.labels.shape == (0, 4) and r.inertia == 0.0
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError, match="NaN or Inf"):
            kmeans_1d(np.array([1.0, bad, 2.0]), 2)
    with pytest.raises(ValueError, match="NaN or Inf"):
        kmeans_1d(np.array([1.0, np.nan], np.float16), 2)
    with pytest.raises(ValueError):
        kmeans_1d(np.ones(3), 0)
    with pytest.raises(ValueError):
        kmeans_1d(np.ones(3), 2, sample_weight=-np.ones(3))
    with pytest.raises(ValueError):
        kmeans_1d(np.ones(3), 2, sample_weight=np.ones(4))


@pytest.mark.parametrize("n_distinct,dtype", [(256, np.uint8), (257, np.uint16),
                                              (65536, np.uint16), (65537, np.int32)])
def test_label_dtype(n_distinct, dtype):
    x = np.arange(n_distinct, dtype=np.float64)
    r = kmeans_1d(x, n_distinct)
    assert r.labels.dtype == dtype and r.centroids.size == n_distinct
    assert assign(x[:3], r.centroids).dtype == dtype


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_input_dtypes_computed_in_float64(dtype):
    x = np.random.default_rng(4).normal(size=(30, 7)).astype(dtype)
    r = kmeans_1d(x, 5)
    ref = kmeans_1d(x.astype(np.float64), 5)
    np.testing.assert_array_equal(r.centroids, ref.centroids)
    np.testing.assert_array_equal(r.labels, ref.labels)


def test_sample_weight():
    rng = np.random.default_rng(5)
    x = rng.normal(0, 1, 300)
    plain = kmeans_1d(x, 4)
    ones = kmeans_1d(x, 4, sample_weight=np.ones_like(x))
    np.testing.assert_allclose(ones.centroids, plain.centroids, atol=1e-12)
    np.testing.assert_array_equal(ones.labels, plain.labels)
    assert np.isclose(ones.inertia, plain.inertia, rtol=1e-12)
    i = int(np.argmax(x))
    w = np.ones_like(x)
    w[i] = 1e6
    heavy = kmeans_1d(x, 4, sample_weight=w)
    c_plain = plain.centroids[plain.labels[i]]
    c_heavy = heavy.centroids[heavy.labels[i]]
    assert abs(c_heavy - x[i]) < abs(c_plain - x[i]) and abs(c_heavy - x[i]) < 1e-3


def test_assign_any_order_and_ties_go_lower():
    c = np.array([2.0, -1.0, 0.0])
    v = np.array([-5.0, -0.5, -0.4, 1.0, 1.1, 9.0])
    np.testing.assert_array_equal(assign(v, c), [1, 1, 2, 2, 0, 0])
    assert assign(np.array([0.5]), np.array([1.0, 0.0]))[0] == 1  # tie -> lower value


def test_quantization_mse():
    x = np.array([1.0, 2.0, 4.0])
    c = np.array([1.0, 3.0])
    labels = np.array([0, 1, 1])
    assert quantization_mse(x, c, labels) == pytest.approx(2.0 / 3.0)
    assert quantization_mse(x, c, labels, np.array([1.0, 1.0, 2.0])) == pytest.approx(3.0 / 4.0)


def _assert_nearest(x, centroids, labels, shift=0):
    """Every value's centroid is a nearest one, up to rounding of the midpoints; ``shift``
    scales everything by 2**-shift first (exact) so huge magnitudes cannot overflow."""
    x = np.ldexp(np.asarray(x, np.float64).ravel(), -shift)
    centroids = np.ldexp(centroids, -shift)
    d = np.abs(x[:, None] - centroids[None, :])
    chosen = d[np.arange(x.size), labels.ravel()]
    scale = np.maximum(np.abs(x), np.max(np.abs(centroids)))
    assert np.all(chosen <= d.min(axis=1) + 4 * np.finfo(float).eps * scale)


finite = st.floats(-1e100, 1e100, allow_nan=False, allow_infinity=False)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(x=hnp.arrays(np.float64, hnp.array_shapes(max_dims=2, max_side=30), elements=finite),
       k=st.integers(1, 12), init=st.sampled_from(["linear", "density", "random"]))
def test_properties(x, k, init):
    r = kmeans_1d(x, k, init=init, seed=1)
    check_result(x, r)
    assert r.centroids.size <= k
    if x.size == 0:
        return
    _assert_nearest(x, r.centroids, r.labels)
    mse = quantization_mse(x, r.centroids, r.labels)
    assert r.inertia == pytest.approx(mse * x.size, rel=1e-9, abs=1e-300)


@settings(max_examples=80, deadline=None, derandomize=True)
@given(x=hnp.arrays(np.float64, st.integers(1, 60), elements=st.one_of(st.just(0.0), finite)),
       k=st.integers(2, 10))
def test_properties_keep_zero(x, k):
    r = kmeans_1d(x, k, keep_zero=True)
    check_result(x, r, keep_zero=True)
    assert np.all((r.labels == 0) == (x == 0))
    nz = x != 0
    if nz.any():
        _assert_nearest(x[nz], r.centroids[1:], r.labels[nz] - 1)


def test_extreme_magnitudes_do_not_overflow():
    x = np.array([-1.7e308, -1e308, 0.0, 1e-300, 1e300, 1.5e308, 1.7e308, 1.79e308])
    r = kmeans_1d(x, 4)
    assert np.all(np.isfinite(r.centroids)) and r.centroids.size == 4
    _assert_nearest(x, r.centroids, r.labels, shift=2)


def test_mse_matches_sklearn():
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    x = np.random.default_rng(6).normal(size=100_000)
    k = 32
    ours = kmeans_1d(x, k)
    init = np.linspace(x.min(), x.max(), k).reshape(-1, 1)
    km = sklearn_cluster.KMeans(k, init=init, n_init=1, algorithm="lloyd").fit(x.reshape(-1, 1))
    theirs = quantization_mse(x, km.cluster_centers_.ravel(), km.labels_)
    assert quantization_mse(x, ours.centroids, ours.labels) <= 1.01 * theirs


def brute_force_optimum(x, k, w):
    """Smallest weighted SSE over every partition of the sorted distinct values into k runs."""
    u = np.unique(x)
    best = np.inf
    for cuts in itertools.combinations(range(1, u.size), k - 1):
        edges, total = (0, *cuts, u.size), 0.0
        for a, b in zip(edges[:-1], edges[1:]):
            sel = (x >= u[a]) & (x <= u[b - 1])
            if w[sel].sum() > 0:
                c = np.sum(w[sel] * x[sel]) / w[sel].sum()
                total += np.sum(w[sel] * (x[sel] - c) ** 2)
        best = min(best, total)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_optimal_matches_brute_force_and_beats_lloyd(seed):
    rng = np.random.default_rng(200 + seed)
    n, k = int(rng.integers(3, 14)), int(rng.integers(1, 5))
    x = np.round(rng.normal(size=n), 1)  # ties included
    w = rng.exponential(size=n) if seed % 2 else np.ones(n)
    r = kmeans_1d_optimal(x, k, sample_weight=w)
    check_result(x, r)
    best = brute_force_optimum(x, k, w)
    assert r.inertia == pytest.approx(best, rel=1e-9, abs=1e-12)
    for init in ("linear", "density", "random"):
        assert r.inertia <= kmeans_1d(x, k, init=init, sample_weight=w).inertia + 1e-12


def test_optimal_keep_zero_and_edges():
    rng = np.random.default_rng(9)
    x = np.round(rng.laplace(0, 1, 400), 1)
    x[::3] = 0.0
    r = kmeans_1d_optimal(x, 8, keep_zero=True)
    check_result(x, r, keep_zero=True)
    assert np.all((r.labels == 0) == (x == 0)) and r.centroids.size == 8
    assert r.inertia <= kmeans_1d(x, 8, keep_zero=True).inertia
    assert kmeans_1d_optimal(np.empty(0), 3).centroids.size == 0
    np.testing.assert_array_equal(kmeans_1d_optimal(np.array([2.0, 1.0, 2.0]), 3).centroids,
                                  [1.0, 2.0])
    with pytest.raises(ValueError, match="NaN or Inf"):
        kmeans_1d_optimal(np.array([np.nan, 1.0]), 2)
    with pytest.raises(ValueError, match="use kmeans_1d"):
        kmeans_1d_optimal(np.arange(300_000.0), 256)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("init", ["linear", "density", "random"])
def test_centroids_many_are_those_of_kmeans_1d_one_set_at_a_time(dtype, init):
    """The batched Lloyd (every set's steps together) gives each set exactly kmeans_1d's centroids: sets
    that re-seed empty clusters, stop early, tie, have few distinct values, are empty or histogram-sized."""
    from onnxcompress.numerics.kmeans import centroids_many

    rng = np.random.default_rng(11)
    sets = [rng.standard_normal(n).astype(dtype) * rng.uniform(0.01, 3.0) for n in (4000, 1500, 900, 3000)]
    sets += [rng.standard_t(3, 2500).astype(dtype), np.round(rng.standard_normal(2000) * 3).astype(dtype),
             np.array([1.0, 2.0, 2.0], dtype), np.empty(0, dtype), rng.uniform(-1, 1, 7).astype(dtype)]
    for k in (2, 16, 32):
        got = centroids_many(sets, k, init=init, seed=3)
        for values, centroids in zip(sets, got):
            np.testing.assert_array_equal(centroids, kmeans_1d(values, k, init=init, seed=3).centroids)


def test_centroids_many_hands_a_histogram_sized_set_to_kmeans_1d(monkeypatch):
    from onnxcompress.numerics import kmeans
    from onnxcompress.numerics.kmeans import centroids_many

    monkeypatch.setattr(kmeans, "HISTOGRAM_ABOVE", 5000)
    values = np.random.default_rng(12).standard_normal(20000).astype(np.float32)
    small = values[:3000]
    got = centroids_many([values, small], 16)
    np.testing.assert_array_equal(got[0], kmeans_1d(values, 16).centroids)
    np.testing.assert_array_equal(got[1], kmeans_1d(small, 16).centroids)


@pytest.mark.parametrize("case", ["normal", "t3", "isolated", "weighted", "keep_zero", "small"])
def test_kmeans_centroids_are_kmeans_1d_centroids(monkeypatch, case):
    """Centroids without labels (the histogram path skips its labels pass when every cluster holds two
    bins' means) equal kmeans_1d's, including where a cluster might be empty (an isolated value)."""
    from onnxcompress.numerics import kmeans
    from onnxcompress.numerics.kmeans import kmeans_centroids

    monkeypatch.setattr(kmeans, "HISTOGRAM_ABOVE", 4000)
    rng = np.random.default_rng(13)
    values = rng.standard_t(3, 30000) if case == "t3" else rng.standard_normal(30000)
    if case == "isolated":
        values[:3] = [40.0, 41.0, -35.0]  # clusters of one bin each, far out
    if case == "keep_zero":
        values[rng.random(values.size) < 0.3] = 0.0
    if case == "small":
        values = values[:3000]
    values = values.astype(np.float32)
    weight = rng.uniform(0.0, 2.0, values.size) if case == "weighted" else None
    for k in (4, 32, 256):
        got = kmeans_centroids(values, k, sample_weight=weight, keep_zero=case == "keep_zero")
        np.testing.assert_array_equal(got, kmeans_1d(values, k, sample_weight=weight,
                                                     keep_zero=case == "keep_zero").centroids)
