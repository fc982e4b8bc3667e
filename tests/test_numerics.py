"""The shared numeric kernels (one sqnr_db, nearest_codes, magnitude_mask) and their callers' agreement."""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import tiny
from onnxcompress.errors import BugError
from onnxcompress.graph.weights import find_weights
from onnxcompress.numerics.measures import kept_count, magnitude_mask, nearest_codes, sqnr_db, sqnr_db_of, top_mask
from onnxcompress.passes.bitprune import Pruner
from onnxcompress.passes.bitwidth import candidate_weights
from onnxcompress.passes.prune import PrunePass


def test_sqnr_db_is_signal_over_noise():
    assert sqnr_db(100.0, 1.0) == pytest.approx(20.0)
    assert sqnr_db(1.0, 100.0) == pytest.approx(-20.0)  # the order matters: signal first
    assert sqnr_db(5.0, 0.0) == math.inf and sqnr_db(0.0, 1.0) == -math.inf
    ref = np.array([3.0, 4.0])
    assert sqnr_db_of(ref, ref + [0.3, 0.4]) == pytest.approx(20.0)
    assert sqnr_db_of(ref, ref) == math.inf


def test_nearest_codes_ties_go_to_the_lower_centroid_and_keep_zero_reserves_code_0():
    book = np.array([0.0, -1.0, 1.0])
    np.testing.assert_array_equal(nearest_codes(np.array([0.5, -0.5, 0.9, -7.0]), book), [0, 1, 2, 1])
    np.testing.assert_array_equal(nearest_codes(np.array([0.0, 0.1, -0.1]), book, keep_zero=True), [0, 2, 1])
    np.testing.assert_array_equal(nearest_codes(np.array([0.0, 3.0]), np.array([0.0]), keep_zero=True), [0, 0])
    allowed = np.array([True, False, True])
    np.testing.assert_array_equal(nearest_codes(np.array([-0.9]), book, allowed=allowed), [0])


@pytest.mark.parametrize("n, sparsity, kept", [(5, 0.5, 2), (7, 0.5, 3), (4, 0.5, 2), (9, 0.5, 4), (25, 0.5, 12),
                                                (10, 0.0, 10), (3, 0.99, 0), (20, 0.35, 13), (1, 0.5, 0)])
def test_kept_count_rounds_the_pruned_count_half_up(n, sparsity, kept):
    assert kept_count(n, sparsity) == kept


def test_magnitude_mask_ties_keep_the_lower_index():
    np.testing.assert_array_equal(magnitude_mask(np.ones(5), 0.5), [True, True, False, False, False])
    np.testing.assert_array_equal(magnitude_mask(np.array([1.0, -2.0, 2.0, 1.0]), 0.5), [False, True, True, False])
    np.testing.assert_array_equal(top_mask(np.array([0.0, 0.0, 0.0]), 1), [True, False, False])


def depthwise(c: int = 6, k: int = 5, *, equal: bool = False, seed: int = 0) -> onnx.ModelProto:
    """Conv(x, W[c, 1, k, k], group=c): a depthwise convolution (all weights equal with `equal`)."""
    rng = np.random.default_rng(seed)
    w = np.full((c, 1, k, k), 0.25, np.float32) if equal else tiny.weights(rng, c, 1, k, k)
    node = helper.make_node("Conv", ["x", "W"], ["y"], pads=[k // 2] * 4, group=c, name="dw")
    return tiny.make_model([node], [tiny.value("x", ["N", c, 8, 8])], [tiny.value("y", ["N", c, 8, 8])],
                           [numpy_helper.from_array(w, "W")])


def mask_of_prune(model, sparsity, data=None, **options):
    p = PrunePass(sparsity={"W": sparsity}, **options)
    return tiny.run_pass(p, model, data).masks["W"]


def mask_of_search(model, sparsity, data=None):
    info = next(w for w in find_weights(model, min_elements=0) if w.name == "W")
    array = numpy_helper.to_array(model.graph.initializer[0])
    if data is None:
        return magnitude_mask(array, sparsity)
    return Pruner(model, data, [info])(array, info, sparsity)[1]


@pytest.mark.parametrize("build", [lambda: depthwise(), lambda: depthwise(equal=True), lambda: depthwise(c=3, k=3),
                                   lambda: tiny.gemm(k=7, n=5), lambda: tiny.matmul(k=9, n=3)],
                         ids=["depthwise5x5", "all-equal", "depthwise3x3-odd", "gemm-odd", "matmul-odd"])
@pytest.mark.parametrize("sparsity", [0.5, 0.35, 0.9])
def test_prune_pass_and_search_simulation_choose_the_same_mask(build, sparsity):
    model = build()
    want = mask_of_search(model, sparsity)
    np.testing.assert_array_equal(mask_of_prune(model, sparsity, compensation="none"), want)
    assert 1 - want.mean() == pytest.approx(1 - kept_count(want.size, sparsity) / want.size)


def test_prune_and_search_agree_with_data_on_the_first_mask():
    from onnxcompress.graph.data import load_data
    model = depthwise()
    data = load_data(tiny.random_feeds(model, n=8, seed=1))
    want = mask_of_search(model, 0.5, data)
    got = mask_of_prune(model, 0.5, data, compensation="lstsq", rounds=1)
    np.testing.assert_array_equal(got, want & (got | ~want))  # the refit may only zero more entries
    assert got.sum() <= want.sum()


@pytest.mark.parametrize("compensation, rounds", [("lstsq", 3), ("lstsq", 1), ("sparsegpt", 1), ("none", 1)])
def test_depthwise_5x5_at_half_sparsity_passes_its_postcondition(compensation, rounds):
    """The real-model crash: a depthwise 5x5 conv at 50% ended at 52% (25 entries per channel, each
    channel rounded on its own) and the check called it an error."""
    from onnxcompress.graph.data import load_data
    model = depthwise(c=16, k=5)
    data = load_data(tiny.random_feeds(model, n=8, seed=2))
    keep = mask_of_prune(model, 0.5, data, compensation=compensation, rounds=rounds)
    if compensation != "sparsegpt":
        assert keep.sum() <= kept_count(keep.size, 0.5)
        assert keep.sum() >= kept_count(keep.size, 0.5) - np.sum(numpy_helper.to_array(model.graph.initializer[0]) == 0)


def test_failed_postcondition_is_a_bug_with_exit_1(tmp_path, capsys, monkeypatch):
    from onnxcompress.cli import main

    def broken(self, ctx, result):
        raise BugError("prune: W has sparsity 0.1000, below its target 0.5000")
    monkeypatch.setattr(PrunePass, "ensures", broken)
    src = tmp_path / "m.onnx"
    onnx.save(tiny.gemm(), src)
    code = main(["compress", str(src), "-o", str(tmp_path / "out.onnx"), "--recipe", "prune"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "bug in onnxcompress" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out.onnx").exists()


def test_top_mask_by_partition_is_the_stable_sorts_mask_ties_and_nan_included():
    rng = np.random.default_rng(1)

    def by_sort(a, n_keep):
        keep = np.zeros(a.size, bool)
        keep[np.argsort(-np.abs(a.astype(np.float64)).ravel(), kind="stable")[:max(n_keep, 0)]] = True
        return keep.reshape(a.shape)

    for t in range(300):
        n = int(rng.integers(1, 40))
        a = rng.integers(-3, 4, size=n).astype(np.float32) if t % 2 else rng.standard_normal(n)
        if t % 5 == 0:
            a[rng.integers(0, n)] = np.nan if t % 10 == 0 else -0.0
        for k in range(-1, n + 2):
            np.testing.assert_array_equal(top_mask(a, k), by_sort(a, k))
    a = rng.integers(-2, 3, size=(6, 7)).astype(np.float32)
    np.testing.assert_array_equal(top_mask(a, 20), by_sort(a, 20))
