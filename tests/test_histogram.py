"""Tests for onnxcompress.numerics.histogram and the large-tensor paths built on it: the histogram k-means
stays within 1.01x of the MSE of the full (sorted) k-means, table look-up labels equal
np.searchsorted's exactly, and the plain per-tensor fit equals the general one."""
from __future__ import annotations

import numpy as np
import pytest

import onnxcompress.numerics.kmeans as kmeans
from onnxcompress.fitting.granular import Fitting, Option, fit
from onnxcompress.numerics.histogram import below, signal_and_error, value_histogram
from onnxcompress.numerics.kmeans import kmeans_1d, quantization_mse


@pytest.fixture
def small_histogram_threshold(monkeypatch):
    """Take the histogram path from 2**16 values, so the tests stay fast."""
    monkeypatch.setattr(kmeans, "HISTOGRAM_ABOVE", 1 << 16)


def _full(values, k, **kw):
    old = kmeans.HISTOGRAM_ABOVE
    kmeans.HISTOGRAM_ABOVE = 1 << 62
    try:
        return kmeans_1d(values, k, **kw)
    finally:
        kmeans.HISTOGRAM_ABOVE = old


@pytest.mark.parametrize("bits", [4, 5, 8])
@pytest.mark.parametrize("keep_zero", [False, True])
@pytest.mark.parametrize("law", ["normal", "student3"])
def test_histogram_mse_within_1_01_of_full(bits, keep_zero, law, small_histogram_threshold):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((256, 1024)) if law == "normal" else rng.standard_t(3, (256, 1024))).astype(np.float32)
    if keep_zero:
        x[np.abs(x) < 0.4] = 0.0
    fast, full = kmeans_1d(x, 2 ** bits, keep_zero=keep_zero), _full(x, 2 ** bits, keep_zero=keep_zero)
    mse_fast = quantization_mse(x, fast.centroids, fast.labels)
    assert mse_fast <= 1.01 * quantization_mse(x, full.centroids, full.labels)
    # labels are the exact nearest centroids, and the inertia is the labels' error
    np.testing.assert_array_equal(fast.labels, kmeans.assign(x, fast.centroids) if not keep_zero else fast.labels)
    assert fast.inertia == pytest.approx(mse_fast * x.size, rel=1e-9)
    if keep_zero:
        assert fast.centroids[0] == 0.0 and np.all(fast.labels[x == 0] == 0) and np.all(fast.labels[x != 0] > 0)


def test_histogram_weighted_and_few_values(small_histogram_threshold):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(1 << 17)
    w = rng.uniform(0, 2, x.size)
    fast, full = kmeans_1d(x, 16, sample_weight=w), _full(x, 16, sample_weight=w)
    assert fast.inertia <= 1.01 * full.inertia
    few = rng.choice([-1.5, 0.25, 3.0], 1 << 17)  # fewer distinct values than k: exact, as the full path
    result = kmeans_1d(few, 8)
    np.testing.assert_array_equal(result.centroids, [-1.5, 0.25, 3.0])
    assert result.inertia == 0.0
    with pytest.raises(ValueError, match="NaN"):
        kmeans_1d(np.append(x, np.nan), 8)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_below_equals_searchsorted(dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(1 << 18).astype(dtype)
    x[:8] = [np.nan, np.inf, -np.inf, 0.0, -0.0, 0.5, 1e30, -1e30]
    for k in (1, 2, 31, 255, 3000):
        b = np.unique(np.concatenate([np.sort(rng.standard_normal(k)), [0.5]]))
        b[b.size // 2] = np.nextafter(np.float32(b[b.size // 2]), np.float32(1), dtype=np.float32) + 1e-12
        b = np.sort(b)
        np.testing.assert_array_equal(below(b, x), np.searchsorted(b, x.astype(np.float64), side="left"))
    labels, counts, error = below(np.array([0.0]), x[8:], np.array([-1.0, 1.0]))
    np.testing.assert_array_equal(counts, np.bincount(labels, minlength=2))
    assert error == pytest.approx(float(np.sum((x[8:].astype(np.float64) - np.where(labels, 1.0, -1.0)) ** 2)))


def test_value_histogram_sums():
    x = np.random.default_rng(5).standard_normal(100_000).astype(np.float32)
    x[::7] = 0.0
    means, weights, counts = value_histogram(x, None, 1024, skip_zeros=True)
    assert weights is None and counts.sum() == np.count_nonzero(x)
    assert np.all(np.diff(means) > 0)
    assert float(np.dot(means, counts)) == pytest.approx(float(x.astype(np.float64).sum()), rel=1e-9)
    s, n = signal_and_error(x, np.zeros_like(x))
    assert s == n == pytest.approx(float(np.sum(x.astype(np.float64) ** 2)))


@pytest.mark.parametrize("masked", [False, True])
def test_plain_fit_equals_general_fit(masked):
    """The per-tensor fast path (native layout and dtype) gives the general path's codebook and codes."""
    rng = np.random.default_rng(11)
    w = rng.standard_normal((24, 40)).astype(np.float32)
    mask = rng.random(w.shape) > 0.5 if masked else None
    fast = fit(w, 5, Option("tensor"), Fitting(channel_axis=1, mask=mask))
    # the general path, forced by an importance-weighted option with uniform importance
    general = fit(w, 5, Option("tensor", weighted=True), Fitting(channel_axis=1, mask=mask), importance=np.ones((40, 24)))
    np.testing.assert_array_equal(fast.codebook, general.codebook)
    np.testing.assert_array_equal(fast.codes, general.codes)
    assert fast.codes.dtype == general.codes.dtype and fast.zero_code == general.zero_code
