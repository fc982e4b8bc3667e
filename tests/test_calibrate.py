"""Calibration: the pure range math, the streaming histogram, and the calibrate pass."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tiny
from onnxcompress.runtime.capture import capture
from onnxcompress.graph.data import Dataset
from onnxcompress.errors import DataError, PassError, PreconditionError
from onnxcompress.numerics.quantmath import CalibrationResult
from onnxcompress.passes.calibrate import CalibrateConfig, CalibratePass, calibrate, derived_tensors
from onnxcompress.pipeline.manager import Context, PassManager
from onnxcompress.numerics.quantmath import (INT8, UINT8, StreamingHistogram, dequantize, entropy_threshold, mse_range,
                                    percentile_range, quantize, quantize_blocked, quantize_per_channel,
                                    scale_zero_point)


def test_scale_zero_point_maps_range_ends_to_type_ends():
    s, z = scale_zero_point(-1.0, 3.0, 0, 255)
    assert abs(float(s) * (0 - int(z)) - (-1.0)) < s and abs(float(s) * (255 - int(z)) - 3.0) < s
    s, z = scale_zero_point(-2.0, 1.0, -127, 127, symmetric=True)
    assert int(z) == 0 and np.isclose(float(s), 2.0 / 127)
    # a range without 0 is widened to contain it; a zero range stays usable
    s, z = scale_zero_point(2.0, 4.0, 0, 255)
    assert int(z) == 0
    s, z = scale_zero_point(0.0, 0.0, 0, 255)
    assert float(s) == 1.0 and quantize(np.zeros(3), s, z, 0, 255).tolist() == [0, 0, 0]


def test_quantize_round_trip_error_is_at_most_half_a_step():
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    s, z = scale_zero_point(x.min(), x.max(), 0, 255)
    err = np.abs(dequantize(quantize(x, s, z, 0, 255), s, z) - x)
    assert err.max() <= float(s) / 2 + 1e-6


def test_per_channel_and_blocked_weights():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 6)).astype(np.float32) * np.array([[1], [10], [0.1], [0]], np.float32)
    q, scale, zero = quantize_per_channel(w, 0, INT8)
    assert q.min() >= -127 and q.max() <= 127 and np.all(zero == 0) and scale.shape == (4,)
    np.testing.assert_allclose(dequantize(q, scale[:, None], 0), w, atol=float(scale.max()) / 2 + 1e-6)
    qb, sb = quantize_blocked(rng.standard_normal((40, 3)).astype(np.float32), 0, 16, INT8)
    assert sb.shape == (3, 3) and qb.shape == (40, 3)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=60), st.integers(1, 5))
def test_streaming_histogram_equals_one_shot_histogram(values, splits):
    x = np.array(values, np.float32)
    h = StreamingHistogram(64)
    for part in np.array_split(x, splits):
        h.update(part)
    assert h.count == x.size and h.min == x.min() and h.max == x.max()
    assert h.half_range >= max(abs(x.min()), abs(x.max()))
    # every value sits in the bin its final edges give it (merging on range growth is exact)
    position = (x.astype(np.float64) + h.half_range) / (2 * h.half_range / 64)
    expected = np.bincount(np.clip(np.floor(position), 0, 63).astype(int), minlength=64)
    on_edge = np.abs(position - np.rint(position)) < 1e-4  # float32 rounding may put these either side
    assert np.abs(expected - h.counts).sum() <= 2 * np.sum(on_edge)


def test_after_relu_is_the_histogram_of_relu():
    x = np.random.default_rng(2).standard_normal(5000).astype(np.float32)
    h, r = StreamingHistogram(256), StreamingHistogram(256)
    h.update(x)
    r.half_range = h.half_range
    r.update(np.maximum(x, 0))
    relu = h.after_relu()
    np.testing.assert_array_equal(relu.counts, r.counts)
    assert relu.min == 0.0 and relu.max == r.max


def test_clipping_methods_cut_outliers_but_not_the_bulk():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal(200_000), [40.0, -35.0]]).astype(np.float32)
    h = StreamingHistogram(2048)
    h.update(x)
    lo, hi = percentile_range(h, 99.99, symmetric=True)
    assert 2.5 < hi < 20 and -20 < lo < -2.5

    def mse(lo, hi):
        s, z = scale_zero_point(lo, hi, -127, 127, symmetric=True)
        return float(np.mean((dequantize(quantize(x, s, z, -127, 127), s, z) - x) ** 2))

    lo, hi = mse_range(h, -127, 127, symmetric=True)
    best = min(mse(-t, t) for t in np.linspace(0.4, 40, 100))
    assert hi < 40 and mse(lo, hi) <= 1.1 * best < mse(-40, 40)
    counts, top = h.folded()
    t = entropy_threshold(counts, top)
    assert 2.5 < t < 20
    lo, hi = percentile_range(h, 100.0, symmetric=False)
    assert lo <= x.min() + 0.1 and hi >= x.max() - 0.1


def _data(model, n=40, seed=0):
    return Dataset(stacked=tiny.random_feeds(model, n=n, seed=seed))


def test_minmax_ranges_are_the_exact_extremes_of_every_activation():
    model = tiny.conv_gemm()
    data = _data(model)
    result = calibrate(model, data, CalibrateConfig(max_batch=7))
    assert set(result.ranges) == {"x", "c", "r", "f", "y"}
    truth = {n: [np.inf, -np.inf] for n in result.ranges}
    for values in capture(model, data, list(result.ranges), max_batch=1):
        for n, v in values.items():
            truth[n] = [min(truth[n][0], v.min()), max(truth[n][1], v.max())]
    for n, r in result.ranges.items():
        assert np.isclose(r.low, truth[n][0], atol=1e-6) and np.isclose(r.high, truth[n][1], atol=1e-6)


def test_relu_and_flatten_statistics_are_derived_not_captured():
    model = tiny.conv_gemm()
    assert derived_tensors(model, ["x", "c", "r", "f", "y"]) == {"r": ("c", "relu"), "f": ("r", "same")}


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_histogram_methods_give_ranges_inside_the_observed_ones(method):
    model = tiny.conv_gemm()
    result = calibrate(model, _data(model), CalibrateConfig(method=method))
    for r in result.ranges.values():
        assert r.observed_min - 1e-6 <= r.low <= r.high <= r.observed_max + 1e-6
    assert result.ranges["r"].low == 0.0  # relu output: never below zero


def test_batching_does_not_change_the_result():
    model = tiny.conv_gemm()
    data = _data(model, n=30)
    # histograms agree up to resolution: a range grown from a small first batch has coarser bins
    for method, rtol in (("minmax", 1e-6), ("percentile", 0.05)):
        one = calibrate(model, data, CalibrateConfig(method=method, max_batch=1))
        many = calibrate(model, data, CalibrateConfig(method=method, max_batch=64))
        for n in one.ranges:
            assert np.isclose(one[n].low, many[n].low, rtol=rtol) and np.isclose(one[n].high, many[n].high, rtol=rtol)


def test_feed_list_data_of_a_fixed_batch_model_calibrates():
    model = tiny.conv_gemm()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # static batch: feeds go one by one
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 1, 8, 8)).astype(np.float32)} for i in range(5)]
    result = calibrate(model, Dataset(feeds), CalibrateConfig(method="percentile"))
    assert result.samples == 5 and "y" in result


def test_symmetric_ranges_are_balanced():
    model = tiny.conv_gemm()
    result = calibrate(model, _data(model), CalibrateConfig(symmetric=True))
    assert all(r.low == -r.high for r in result.ranges.values())


def test_pass_puts_a_typed_result_in_the_context_and_needs_data():
    model = tiny.conv_gemm()
    ctx = Context(original=model, model=model, data=_data(model))
    p = CalibratePass(method="mse")
    p.requires(ctx)
    p.ensures(ctx, p.call(ctx))
    assert isinstance(ctx.calibration, CalibrationResult) and ctx.calibration.method == "mse"
    with pytest.raises(PreconditionError):
        p.requires(Context(original=model, model=model))
    with pytest.raises(DataError, match="needs calibration data for its 'calibrate' pass"):
        PassManager([CalibratePass()]).run(model, None)  # before any pass runs
    onnx.checker.check_model(model, full_check=True)


def test_weights_of_a_large_model_are_not_taken_for_activations():
    from pathlib import Path

    from onnxcompress.passes.calibrate import float_activations

    model = onnx.load(str(Path(__file__).resolve().parent.parent / "samples" / "lenet300.onnx"))
    assert model.ByteSize() > 1 << 20  # the path that infers types without copying weights
    names = float_activations(model)
    assert not set(names) & {t.name for t in model.graph.initializer}
    assert names[0] == "input" and "logits" in names
