"""The granularity kernels (onnxcompress.numerics.granular_fit) against brute force, and the per-channel fit in
float32 against the same fit in float64."""
import numpy as np
import pytest

from onnxcompress.numerics import granular_fit
from onnxcompress.fitting.granular import Fitting, Option, fit, measure
from onnxcompress.numerics.granular_fit import _code_sums, fit_scaled, pick_outliers, ScaledFit


def _brute_outliers(w, kept, fraction, relative):
    w = np.asarray(w, np.float64)
    count = int(round(fraction * int(kept.sum())))
    score = np.abs(w)
    if relative:
        rms = np.sqrt((np.square(w) * kept).sum(1, keepdims=True) / np.maximum(kept.sum(1, keepdims=True), 1))
        score = np.divide(score, rms, out=np.zeros_like(score), where=rms > 0)
    score = np.where(kept, score, -1.0).ravel()
    picked = np.zeros(w.size, bool)
    picked[np.argsort(-score, kind="stable")[:count]] = True
    return picked.reshape(w.shape)


@pytest.mark.parametrize("relative", [True, False])
@pytest.mark.parametrize("masked", [True, False])
def test_outliers_are_the_top_scores_on_a_weight_large_enough_for_the_estimated_cut(relative, masked):
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((1200, 1000)) * rng.uniform(0.01, 5.0, (1200, 1))).astype(np.float32)
    w[7] = 0.0  # a channel of zeros: rms 0, score 0
    kept = rng.random(w.shape) > 0.4 if masked else np.ones(w.shape, bool)
    got = pick_outliers(w, kept, 0.005, relative=relative)
    np.testing.assert_array_equal(got, _brute_outliers(w, kept, 0.005, relative))
    assert not (got & ~kept).any()


def test_top_falls_back_to_every_exact_score_when_the_estimate_does_not_bound_them():
    """An exact score far from its estimate (here: the reverse order) sends _top to a full partition."""
    from onnxcompress.numerics.granular_fit import _top

    rng = np.random.default_rng(4)
    w = rng.standard_normal((1100, 1000)).astype(np.float32)
    reverse = lambda index: -np.abs(w.reshape(-1)[index].astype(np.float64))  # noqa: E731
    got = np.sort(_top(w, None, None, reverse, 500))
    np.testing.assert_array_equal(got, np.sort(np.argsort(np.abs(w).reshape(-1), kind="stable")[:500]))


def _brute_sums(w, s, book, fitted, a, keep_zero):
    from onnxcompress.numerics.gptq import normalize
    from onnxcompress.numerics.measures import nearest_codes

    codes = nearest_codes(normalize(np.asarray(w, np.float64), s), book, keep_zero=keep_zero)
    weight = np.ones(w.shape) if a is None else a
    weight = weight if fitted is None else weight * fitted
    sums, counts = np.zeros((w.shape[0], book.size)), np.zeros((w.shape[0], book.size))
    rows = np.repeat(np.arange(w.shape[0]), w.shape[1])
    np.add.at(sums, (rows, codes.ravel()), (weight * w).ravel())
    np.add.at(counts, (rows, codes.ravel()), weight.ravel())
    return codes, sums, counts


@pytest.mark.parametrize("keep_zero", [False, True])
@pytest.mark.parametrize("case", ["plain", "masked", "weighted"])
def test_code_sums_match_brute_force_over_several_blocks(monkeypatch, keep_zero, case):
    monkeypatch.setattr(granular_fit, "CHUNK", 256)  # blocks of 4 channels, the last one short
    rng = np.random.default_rng(5)
    w = rng.standard_normal((30, 64))
    if keep_zero:
        w[rng.random(w.shape) < 0.3] = 0.0
    s = np.abs(w).max(1)
    book = np.concatenate(([0.0], np.linspace(-0.9, 0.9, 15))) if keep_zero else np.linspace(-0.9, 0.9, 16)
    fitted = rng.random(w.shape) > 0.2 if case == "masked" else None
    a = rng.uniform(0.0, 2.0, w.shape) if case == "weighted" else None
    codes, sums, counts = _code_sums(w, s, book, fitted, a, keep_zero)
    ref_codes, ref_sums, ref_counts = _brute_sums(w, s, book, fitted, a, keep_zero)
    np.testing.assert_array_equal(codes, ref_codes)
    assert codes.dtype == np.uint8
    np.testing.assert_allclose(sums, ref_sums, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(counts, ref_counts, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("outliers", [0.0, 0.005])
def test_per_channel_fit_in_float32_is_as_good_as_in_float64(outliers):
    rng = np.random.default_rng(6)
    w = (rng.standard_normal((256, 512)) * rng.uniform(0.2, 3.0, (1, 512))).astype(np.float32)
    option = Option("channel", outlier_fraction=outliers)
    narrow = fit(w, 5, option, Fitting(channel_axis=1))
    wide = fit(w.astype(np.float64), 5, option, Fitting(channel_axis=1))  # the same values, fitted in float64
    assert narrow.scale.dtype == wide.scale.dtype
    assert abs(measure(w, narrow, None) - measure(w, wide, None)) < 0.01
    assert np.mean(narrow.codes == wide.codes) > 0.999


def test_per_channel_descent_never_raises_the_error_of_its_start():
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((64, 300)) * rng.uniform(0.1, 4.0, (64, 1))).astype(np.float32)
    fitted = np.ones(w.shape, bool)
    errors = []
    for rounds in range(5):
        codes, book, s = fit_scaled(w, fitted, None, ScaledFit(4, iterations=rounds, scale_dtype="float32"))
        errors.append(float(np.sum((w - book[codes] * s[:, None].astype(np.float64)) ** 2)))
    assert all(b <= a * (1 + 1e-9) for a, b in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("case", ["plain", "outliers", "ties", "zero channel", "one centroid"])
@pytest.mark.parametrize("search", ["per channel", "int64 keys"])
def test_sorted_rows_give_the_sums_of_a_pass_over_the_weight(monkeypatch, case, search):
    """SortedRows.sums (binary searches in the sorted channels) against _code_sums (a pass): the same
    counts exactly, the same sums up to the order of float64 additions."""
    from onnxcompress.numerics import sorted_rows
    from onnxcompress.numerics.sorted_rows import SortedRows

    rng = np.random.default_rng({"plain": 1, "outliers": 2, "ties": 3, "zero channel": 4, "one centroid": 5}[case])
    w = (rng.standard_normal((40, 300)) * rng.uniform(0.01, 3.0, (40, 1))).astype(np.float32)
    if case == "ties":
        w = np.round(w * 4) / np.float32(4)  # many entries on a boundary
    if case == "zero channel":
        w[3] = 0.0
    fitted = ~pick_outliers(w, np.ones(w.shape, bool), 0.02 if case == "outliers" else 0.0, relative=True)
    s = (np.abs(w).max(1) * rng.uniform(0.5, 1.5, 40)).astype(np.float32).astype(np.float64)
    if case == "zero channel":
        s[3] = 0.0
    book = np.array([0.1]) if case == "one centroid" else np.sort(rng.uniform(-1.2, 1.2, 32))
    if case == "ties":
        book = np.linspace(-1.0, 1.0, 16)
    if search == "int64 keys":  # the search of every channel at once, as for more than LOOP_MAX_ROWS channels
        monkeypatch.setattr(sorted_rows, "LOOP_MAX_ROWS", 0)
    rows = SortedRows.of(w, fitted)
    assert (rows.keys is None) == (search == "per channel")
    sums, counts = rows.sums(s, book)
    _, ref_sums, ref_counts = _code_sums(w, s, book, None if fitted.all() else fitted, None, False)
    np.testing.assert_array_equal(counts, ref_counts)
    np.testing.assert_allclose(sums, ref_sums, rtol=1e-12, atol=1e-12)


def test_sorted_rows_refuse_what_they_cannot_sum():
    """Unfitted entries inside a channel's run, float64 weights, a negative scale: the caller's pass instead."""
    from onnxcompress.numerics.sorted_rows import SortedRows

    w = np.random.default_rng(6).standard_normal((8, 50)).astype(np.float32)
    inner = np.ones(w.shape, bool)
    inner[2, np.argsort(np.abs(w[2]))[0]] = False  # the entry nearest 0 left out: not at an end
    assert SortedRows.of(w, inner) is None
    assert SortedRows.of(w.astype(np.float64), np.ones(w.shape, bool)) is None
    rows = SortedRows.of(w, np.ones(w.shape, bool))
    assert rows.sums(-np.ones(8), np.linspace(-1, 1, 4)) is None


@pytest.mark.parametrize("outliers", [0.0, 0.005])
def test_per_channel_fit_is_the_same_with_sorted_rows_as_with_passes(monkeypatch, outliers):
    """fit_scaled's rounds from SortedRows give the codes, codebook and scales of its rounds by passes."""
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((256, 384)) * rng.uniform(0.1, 2.0, (256, 1))).astype(np.float32)
    fitted = ~pick_outliers(w, np.ones(w.shape, bool), outliers, relative=True)
    fast = fit_scaled(w, fitted, None, ScaledFit(5))
    monkeypatch.setattr(granular_fit.SortedRows, "of", classmethod(lambda cls, w, fitted: None))
    slow = fit_scaled(w, fitted, None, ScaledFit(5))
    for a, b in zip(fast, slow):
        np.testing.assert_array_equal(a, b)


def test_groups_fitted_together_match_each_group_fitted_alone():
    """fit_groups' batched k-means (unweighted, no kept zeros) gives every group fit_tensor's codebook and codes."""
    from onnxcompress.numerics.granular_fit import fit_groups, fit_tensor

    rng = np.random.default_rng(8)
    w = (rng.standard_normal((61, 500)) * rng.uniform(0.1, 2.0, (61, 1))).astype(np.float32)
    fitted = ~pick_outliers(w, np.ones(w.shape, bool), 0.01, relative=False)
    codes, books, offsets = fit_groups(w, fitted, None, 5, 8, False, "linear", 0)
    for lo in range(0, 61, 8):
        ref_codes, ref_book = fit_tensor(w[lo:lo + 8], fitted[lo:lo + 8], None, 5, False, "linear", 0)
        np.testing.assert_array_equal(books[offsets[lo]:offsets[lo] + ref_book.size], ref_book)
        np.testing.assert_array_equal(codes[lo:lo + 8], ref_codes)


@pytest.mark.parametrize("shape, axis", [((30, 40), 1), ((30, 40), 0), ((4, 5, 6, 7), 1), ((4, 5, 6, 7), 3),
                                         ((4, 5, 6, 7), 0), ((12,), None), ((6, 7), None)])
def test_flat_indices_are_flatnonzero_in_the_weights_layout(shape, axis):
    from onnxcompress.numerics.granular_fit import flat_indices, from_matrix, to_matrix

    mask = to_matrix(np.random.default_rng(9).random(shape) < 0.2, axis)
    expected = np.flatnonzero(from_matrix(mask, shape, axis))
    got = flat_indices(mask, shape, axis)
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == expected.dtype


@pytest.mark.parametrize("shape, axis", [((37, 40), 1), ((30, 40), 0), ((4, 5, 6, 7), 1), ((40, 5, 6, 7), 2),
                                         ((4, 5, 6, 7), 3), ((12,), None), ((6, 7), None), ((), None)])
def test_layout_changes_copied_by_blocks_match_numpy(shape, axis):
    from onnxcompress.numerics.granular_fit import channel_first, from_matrix, to_matrix, weight_layout

    array = np.random.default_rng(3).standard_normal(shape).astype(np.float16)
    for dtype in (None, np.float32, np.float64):
        got = channel_first(array, axis, dtype)
        expected = np.ascontiguousarray(to_matrix(array, axis), dtype)
        assert got.flags.c_contiguous and got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)
    codes = (np.arange(array.size) % 251).astype(np.uint8).reshape(to_matrix(array, axis).shape)
    back = weight_layout(codes, shape, axis)
    assert back.flags.c_contiguous and back.shape == shape
    np.testing.assert_array_equal(back, from_matrix(codes, shape, axis))
