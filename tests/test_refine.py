"""The least-squares kernels of onnxcompress.numerics.refine against brute-force references."""
from __future__ import annotations

import numpy as np
import pytest

from onnxcompress.numerics import gptq, refine
from onnxcompress.numerics.gptq import LayerHessians
from onnxcompress.numerics.measures import nearest_codes
import tiny


def correlated_rows(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """Rows with strongly correlated columns (what a Gram-based fit exploits)."""
    mix = rng.standard_normal((k, k)) * 0.5 + np.eye(k)
    return rng.standard_normal((n, k)) @ mix


def gram(x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
    return x.T @ (x if y is None else y) / x.shape[0]


def test_masked_lstsq_matches_lstsq_on_the_kept_columns():
    rng = np.random.default_rng(0)
    x = correlated_rows(rng, 200, 12)
    w = rng.standard_normal((5, 12))
    keep = rng.random((5, 12)) < 0.5
    keep[0] = keep[1]  # two rows with one kept set are solved together
    got = refine.masked_lstsq(w, keep, gram(x), damping=0.0)
    for j in range(5):
        s = np.flatnonzero(keep[j])
        ref, *_ = np.linalg.lstsq(x[:, s], x @ w[j], rcond=None)
        np.testing.assert_allclose(got[j, s], ref, rtol=1e-6, atol=1e-8)
        assert np.all(got[j, ~keep[j]] == 0)


def test_dense_target_fits_the_reference_output_through_the_current_inputs():
    rng = np.random.default_rng(1)
    xr = correlated_rows(rng, 300, 8)
    xc = xr + 0.3 * rng.standard_normal(xr.shape)  # inputs disturbed by earlier layers
    w = rng.standard_normal((4, 8))
    got = refine.dense_target(w, gram(xc), gram(xc, xr), damping=0.0)
    ref = np.linalg.lstsq(xc, xr @ w.T, rcond=None)[0].T
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(refine.dense_target(w, gram(xc), None), w)


def test_output_error_is_the_squared_output_difference():
    rng = np.random.default_rng(2)
    xr = correlated_rows(rng, 100, 6)
    xc = xr + 0.1 * rng.standard_normal(xr.shape)
    w, w2 = rng.standard_normal((3, 6)), rng.standard_normal((3, 6))
    err, sig = refine.output_error(w2, w, gram(xc), gram(xc, xr), gram(xr))
    assert err == pytest.approx(np.sum((xc @ w2.T - xr @ w.T) ** 2) / 100, rel=1e-9)
    assert sig == pytest.approx(np.sum((xr @ w.T) ** 2) / 100, rel=1e-9)


def test_sparsegpt_chooses_its_mask_prunes_exactly_and_beats_magnitude_on_that_mask():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((400, 24)) @ rng.standard_normal((24, 64)) + 0.1 * rng.standard_normal((400, 64))
    h = gram(x)
    w = rng.standard_normal((16, 64))
    got, mask = refine.sparsegpt(w, h, sparsity=0.75, damping=0.001, block=32)
    assert np.all(got[~mask] == 0)
    assert abs((1 - mask.mean()) - 0.75) < 0.01
    err_obs, _ = refine.output_error(got, w, h)
    err_mag, _ = refine.output_error(np.where(mask, w, 0.0), w, h)
    assert err_obs < 0.8 * err_mag


def test_sparsegpt_with_a_fixed_mask_is_sequential_obs():
    """Column by column: freeze column i (kept value or 0), re-optimise every later column exactly."""
    rng = np.random.default_rng(6)
    x = correlated_rows(rng, 200, 20)
    h = gram(x)
    w = rng.standard_normal((3, 20))
    keep = rng.random((3, 20)) < 0.4
    got, mask = refine.sparsegpt(w, h, keep=keep, damping=1e-12, block=8)
    np.testing.assert_array_equal(mask, keep)
    for j in range(3):
        cur = w[j].copy()
        for i in range(20):
            cur[i] = cur[i] if keep[j, i] else 0.0
            done, rest = np.arange(i + 1), np.arange(i + 1, 20)
            if rest.size:
                cur[rest] = w[j, rest] - np.linalg.solve(h[np.ix_(rest, rest)], h[np.ix_(rest, done)] @ (cur[done] - w[j, done]))
        np.testing.assert_allclose(got[j], cur, rtol=1e-6, atol=1e-8)


def brute_force_centroids(xs, w, codes, n, fixed_values, scale, groups):
    """Stack, over every row j, X_g(j) s_j E_j as the design matrix of the centroids and solve."""
    free = [c for c in range(n) if c not in fixed_values]
    design, rhs = [], []
    for j in range(w.shape[0]):
        x = xs[groups[j]]
        onehot = (codes[j][:, None] == np.arange(n)[None, :]).astype(float) * scale[j]
        d = x @ onehot
        fixed_part = sum(d[:, c] * v for c, v in fixed_values.items())
        design.append(d[:, free])
        rhs.append(x @ w[j] - fixed_part)
    sol, *_ = np.linalg.lstsq(np.concatenate(design), np.concatenate(rhs), rcond=None)
    return free, sol


def test_refine_centroids_matches_brute_force_least_squares():
    rng = np.random.default_rng(4)
    k, rows, n = 10, 6, 5
    xs = [correlated_rows(rng, 80, k), correlated_rows(rng, 80, k)]  # two groups
    groups = np.array([0, 0, 0, 1, 1, 1])
    w = rng.standard_normal((rows, k))
    codes = rng.integers(0, n, size=(rows, k))
    codes[0, :4] = 0
    centroids = np.array([0.0, -1.0, -0.3, 0.4, 1.1])
    scale = rng.uniform(0.5, 2.0, rows)
    got = refine.refine_centroids(w, codes, centroids, LayerHessians([gram(x) for x in xs], groups), scale=scale,
                                  fixed=[0], ridge=1e-12)
    free, ref = brute_force_centroids(xs, w, codes, n, {0: 0.0}, scale, groups)
    assert got[0] == 0.0
    np.testing.assert_allclose(got[free], ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("triangle_k", [None, 0])
def test_refine_centroids_sparse_and_dense_paths_agree(monkeypatch, triangle_k):
    """Dense rows summed over all of H's gathered rows, or (triangle_k 0: from any K on) over its upper triangle."""
    if triangle_k is not None:
        monkeypatch.setattr(gptq, "CODE_GRAM_TRIANGLE_K", triangle_k)
    rng = np.random.default_rng(5)
    x = correlated_rows(rng, 600, 300)
    w = rng.standard_normal((8, 300))
    codes = rng.integers(0, 6, size=(8, 300))
    codes[:4, 40:] = 0  # rows 0-3 sparse (bincount path), rows 4-7 dense (row-sum path)
    h = gram(x)
    free = codes != 0
    got = gptq.code_gram(codes, free, np.arange(1.0, 9.0), h, 6)
    ref = np.zeros((6, 6))
    for j in range(8):
        onehot = ((codes[j][:, None] == np.arange(6)) & free[j][:, None]).astype(float)
        ref += onehot.T @ h @ onehot * (j + 1.0) ** 2
    np.testing.assert_allclose(got, ref, rtol=1e-8, atol=1e-10)
    centroids = np.linspace(-1, 1, 6)
    centroids[0] = 0.0
    got = refine.refine_centroids(w, codes, centroids, LayerHessians([h], np.zeros(8, int)), fixed=[0])
    before, _ = refine.output_error(centroids[codes], w, h)
    after, _ = refine.output_error(got[codes], w, h)
    assert got[0] == 0.0 and after < before


def test_nearest_codes_skips_disallowed_centroids():
    centroids = np.array([0.0, -1.0, 1.0, 0.2])
    allowed = np.array([False, True, True, True])
    got = nearest_codes(np.array([-0.05, 0.7, -2.0, 5.0]), centroids, allowed=allowed)
    np.testing.assert_array_equal(got, [3, 2, 1, 2])


# --- centroid refinement inside the share pass (tiny models, onnxruntime) -------------------------

def _share_after_prune(model, calib, *, refine_on: bool, bits: int):
    import onnx

    from onnxcompress.graph.data import load_data
    from onnxcompress.passes.prune import PrunePass
    from onnxcompress.passes.share import SharePass
    from onnxcompress.pipeline.manager import Context

    working = onnx.ModelProto()
    working.CopyFrom(model)
    ctx = Context(original=model, model=working, data=load_data(calib), progress=False)
    # plain k-means codebooks (one per tensor), to measure the refinement alone
    one_book = {"granularity": "tensor"} if "granularity" in SharePass.Config.__dataclass_fields__ else {}
    share = SharePass(bits_fc=bits, bits_conv=bits, refine=refine_on, **one_book)
    for p in (PrunePass(sparsity={"W": 0.5}), share):
        p.requires(ctx)
        p.ensures(ctx, p.call(ctx))
    return ctx


def _pruned_context(model, calib):
    import onnx

    from onnxcompress.graph.data import load_data
    from onnxcompress.passes.prune import PrunePass
    from onnxcompress.pipeline.manager import Context

    working = onnx.ModelProto()
    working.CopyFrom(model)
    ctx = Context(original=model, model=working, data=load_data(calib), progress=False)
    p = PrunePass(sparsity={"W": 0.5})
    p.ensures(ctx, p.call(ctx))
    return ctx


@pytest.mark.parametrize("builder", ["gemm_transB1", "gemm_transB0", "matmul", "conv", "conv_grouped"])
def test_refined_centroids_beat_plain_kmeans_and_keep_zero_exact(builder):
    import onnx
    import tiny
    from test_prune import BUILDERS, correlated_feeds

    from onnxcompress.formats.codebook import SharedWeight
    from onnxcompress.numerics.kmeans import kmeans_1d
    from onnxcompress.fitting.layerfit import refine_shared
    from onnxcompress.graph.weights import find_weights, get_array, set_array

    model = BUILDERS[builder]()
    calib, held_out = correlated_feeds(model, 256, seed=1), correlated_feeds(model, 64, seed=2)
    ctx = _pruned_context(model, calib)
    info = next(w for w in find_weights(ctx.model, min_elements=0) if w.name == "W")
    values = np.where(ctx.masks["W"], get_array(ctx.model, info), 0.0)
    km = kmeans_1d(values, 8, keep_zero=True)
    plain = SharedWeight(name="W", shape=values.shape, dtype=np.dtype(np.float32), codes=km.labels,
                         codebook=km.centroids.astype(np.float32), bits=3, channel_axis=info.channel_axis, zero_code=0)
    refined, details = refine_shared(ctx, info, plain, reassign_rounds=1)
    assert refined.codebook[0] == 0.0 and refined.zero_code == 0
    assert np.all(refined.decode()[~ctx.masks["W"]] == 0)
    assert details["sqnr_db_refined"] > details["sqnr_db_kmeans"]
    errors = []
    for shared in (plain, refined):
        candidate = onnx.ModelProto()
        candidate.CopyFrom(ctx.model)
        set_array(candidate, info, shared.decode())
        onnx.checker.check_model(candidate, full_check=True)
        (ref,), (got,) = tiny.run(model, held_out), tiny.run(candidate, held_out)
        errors.append(float(np.sum((got - ref) ** 2)))
    assert errors[1] < errors[0], errors


def test_share_pass_records_refinement_and_keeps_zero_exact():
    import tiny
    from test_prune import correlated_feeds

    from onnxcompress.passes.share import SharePass

    model = tiny.gemm(trans_b=False)
    ctx = _pruned_context(model, correlated_feeds(model, 256, seed=1))
    p = SharePass(bits_fc=3)
    p.ensures(ctx, p.call(ctx))
    shared = ctx.shared["W"]
    assert shared.codebook[shared.indices()[~ctx.masks["W"]]].max() == 0.0
    assert np.all(shared.decode()[~ctx.masks["W"]] == 0)
    record = next(r for r in ctx.records if r.name == "W" and "refine" in r.details)
    assert record.details["sqnr_db_refined"] >= record.details["sqnr_db_kmeans"]


def test_share_without_data_does_not_refine():
    import onnx
    import tiny

    from onnxcompress.passes.share import SharePass
    from onnxcompress.pipeline.manager import Context

    model = tiny.gemm()
    working = onnx.ModelProto()
    working.CopyFrom(model)
    ctx = Context(original=model, model=working, progress=False)
    SharePass(bits_fc=3).call(ctx)
    assert not any("refine" in r.details for r in ctx.records)


def test_heldout_damping_prefers_more_ridge_when_rows_are_scarce():
    """Few rows per input: the least-squares refit fits noise, and the two-fold choice damps it."""
    rng = np.random.default_rng(3)
    k, out = 40, 12
    mix = rng.normal(size=(k, k)) * np.linspace(1.0, 0.05, k)  # correlated inputs, decaying spectrum
    weight = rng.normal(size=(out, k))
    keep = refine_mask(weight, 0.5)

    def grams(n, seed):
        x = np.random.default_rng(seed).normal(size=(n, k)) @ mix
        return x.T @ x / n

    def held_out_error(lam, train, test):
        fitted = refine.masked_lstsq(weight, keep, train, damping=lam)
        return refine.output_error(fitted, weight, test)[0]

    scarce = (grams(24, 1), grams(24, 2))
    errors = refine.heldout_damping(weight, keep, ((scarce[0], None, None), (scarce[1], None, None)))
    assert errors.shape == (len(refine.DAMPING_GRID),) and np.all(np.isfinite(errors))
    # each entry: fit on one fold, error on the other, both ways
    lam = refine.DAMPING_GRID[2]
    both = held_out_error(lam, scarce[0], scarce[1]) + held_out_error(lam, scarce[1], scarce[0])
    assert errors[2] == pytest.approx(both, rel=1e-9)
    chosen = refine.DAMPING_GRID[int(np.argmin(errors))]
    plenty = (grams(20000, 5), grams(20000, 6))
    errors_plenty = refine.heldout_damping(weight, keep, ((plenty[0], None, None), (plenty[1], None, None)))
    assert refine.DAMPING_GRID[int(np.argmin(errors_plenty))] < chosen


def refine_mask(weight, sparsity):
    from onnxcompress.numerics.measures import magnitude_mask
    return magnitude_mask(weight, sparsity)


def test_paired_gram_folds_average_to_the_whole():
    from onnxcompress.runtime.capture import linear_layer
    from onnxcompress.runtime.paired import collect_paired_grams
    from onnxcompress.graph.data import load_data
    from onnxcompress.graph.weights import find_weights
    model = tiny.gemm(trans_b=True)
    info = next(w for w in find_weights(model, min_elements=0) if len(w.shape) == 2)
    layer = linear_layer(model, info)
    data = load_data(tiny.random_feeds(model, n=200, seed=1))
    grams = collect_paired_grams(model, model, data, layer, max_batch=32, folds=True)
    a, b = grams.folds
    assert a.count + b.count == grams.count and a.count > 0 and b.count > 0
    whole = (a.current[0] * a.count + b.current[0] * b.count) / grams.count
    np.testing.assert_allclose(whole, grams.current[0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose((a.cross[0] * a.count + b.cross[0] * b.count) / grams.count, grams.cross[0],
                               rtol=1e-10, atol=1e-12)
    assert not np.allclose(a.current[0], b.current[0])  # disjoint rows
    assert collect_paired_grams(model, None, data, layer, max_batch=32).folds is None  # only when asked


def test_layers_with_too_long_input_rows_get_no_gram(monkeypatch):
    import onnxcompress.runtime.capture as capture
    from onnxcompress.graph.data import Dataset
    from onnxcompress.fitting.sharing import layer_hessians
    from onnxcompress.graph.weights import find_weights

    model = tiny.gemm(k=64, n=32)
    info = next(w for w in find_weights(model) if w.name == "W")
    assert capture.linear_layer(model, info) is not None
    monkeypatch.setattr(capture, "MAX_ROW_LENGTH", 63)  # K = 64: a 64 x 64 Gram would be "too large"
    assert capture.linear_layer(model, info) is None
    data = Dataset(stacked=tiny.random_feeds(model, n=16))
    assert layer_hessians(model, data, [info]) == {}


def test_the_share_passs_layer_hessians_keep_no_sample_of_input_rows(monkeypatch):
    # only the Gram matrices and means are read: a row sample per layer (4096 float64 rows) was held for nothing
    import onnxcompress.fitting.sharing as sharing
    from onnxcompress.graph.data import Dataset
    from onnxcompress.graph.weights import find_weights
    from onnxcompress.runtime.capture import collect_layer_inputs, LayerInputs

    made = []

    class Recorded(LayerInputs):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    model = tiny.gemm(k=64, n=32)
    info = next(w for w in find_weights(model) if w.name == "W")
    data = Dataset(stacked=tiny.random_feeds(model, n=64))
    monkeypatch.setattr(sharing, "LayerInputs", Recorded)
    found = sharing.layer_hessians(model, data, [info])
    assert len(made) == 1 and made[0].count == 64 and all(r.shape[0] == 0 for r in made[0].rows)
    with_rows = collect_layer_inputs(model, data, [made[0].layer])[info.name]
    assert with_rows.rows[0].shape[0] == 64  # the default keeps them
    np.testing.assert_array_equal(found[info.name].hessians[0], with_rows.hessian(0))  # the same Gram


def test_layer_statistics_over_the_budget_take_more_passes_and_the_same_values():
    import onnxcompress.runtime.capture as capture
    from onnxcompress.graph.data import Dataset
    from onnxcompress.graph.weights import find_weights

    model = tiny.conv_gemm()
    layers = [layer for w in find_weights(model) if (layer := capture.linear_layer(model, w)) is not None]
    data = Dataset(stacked=tiny.random_feeds(model, n=24))
    from onnxcompress.runtime.statistics import Collector
    one = Collector()
    one_pass = capture.collect_layer_inputs(model, data, layers, max_batch=8, folds=2, collector=one)
    assert one.runs == 1
    tight = Collector(max_bytes=1)
    per_layer = capture.collect_layer_inputs(model, data, layers, max_batch=8, folds=2, collector=tight)
    assert tight.runs == len(layers) == 2 and one_pass.keys() == per_layer.keys()
    assert tight.built == 1  # one session (exposing every layer input) serves both runs
    for name in one_pass:
        a, b = one_pass[name], per_layer[name]
        assert a.count == b.count > 0
        for ga, gb in zip(a.gram, b.gram):
            np.testing.assert_array_equal(ga, gb)


def _two_layers_and_a_branch():
    """x -> MatMul w1 -> Relu -> MatMul w2 -> y, and a side branch: an If whose branches read w3 from outside."""
    from onnx import helper, numpy_helper, TensorProto
    rng = np.random.default_rng(3)
    init = lambda name, shape: numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)  # noqa: E731
    branch = lambda name: helper.make_graph([helper.make_node("Add", ["x", "w3"], [f"{name}_out"])], name, [],  # noqa: E731
                                            [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"]),
             helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["z"], then_branch=branch("a"), else_branch=branch("b"))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
                              [init("w1", (6, 5)), init("w2", (5, 3)), init("w3", (4, 6)),
                               numpy_helper.from_array(np.array(0, np.float32), "zero")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_upstream_model_keeps_only_what_the_named_tensors_need():
    import onnx
    import onnxruntime as ort
    from onnxcompress.graph.edit import upstream_model
    model = _two_layers_and_a_branch()
    x = np.random.default_rng(4).standard_normal((4, 6)).astype(np.float32)
    full = model.SerializeToString()
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    exposed.graph.output.extend([onnx.ValueInfoProto(name="r")])
    want = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"]).run(["r", "z"], {"x": x})
    cut = upstream_model(model, ["r"])
    assert [n.op_type for n in cut.graph.node] == ["MatMul", "Relu"]
    assert [t.name for t in cut.graph.initializer] == ["w1"] and [o.name for o in cut.graph.output] == ["r"]
    got = ort.InferenceSession(cut.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(got[0], want[0])
    branch = upstream_model(model, ["z"])  # the If's branches read w3 from the outer scope: kept
    assert [n.op_type for n in branch.graph.node] == ["ReduceSum", "Greater", "If"]
    assert {t.name for t in branch.graph.initializer} == {"w3", "zero"}
    np.testing.assert_array_equal(ort.InferenceSession(branch.SerializeToString(), providers=["CPUExecutionProvider"])
                                  .run(None, {"x": x})[0], want[1])
    assert not upstream_model(model, ["x"]).graph.node  # a graph input: nothing to run
    assert model.SerializeToString() == full  # the model itself is untouched


@pytest.mark.parametrize("slow", [False, True])
def test_paired_grams_from_the_cut_models_are_the_whole_models(monkeypatch, slow):
    """The Grams of a layer's input rows are the same whether the run stops after the layer's input or not; the
    models are cut only once a pass over the data through the whole model has been measured slow (CUT_SECONDS)."""
    from onnxcompress.graph.data import load_data
    from onnxcompress.graph.weights import find_weights
    from onnxcompress.runtime import capture, paired
    from onnxcompress.runtime.statistics import Collector
    model = _two_layers_and_a_branch()
    info = next(w for w in find_weights(model, min_elements=0) if w.name == "w2")
    layer = capture.linear_layer(model, info)
    data = load_data({"x": np.random.default_rng(5).standard_normal((40, 4, 6)).astype(np.float32)})
    monkeypatch.setattr(paired, "CUT_SECONDS", -1.0 if slow else 1e9)
    collector = Collector()
    rows = []
    runner = collector.runner(model, ["r"])  # the whole model, the layer's input fetched (and its cost measured)
    for chunk in runner.chunks(data, max_batch=8):
        rows.append(np.asarray(chunk.values["r"], np.float64).reshape(-1, 5))
    x = np.concatenate(rows)
    built = collector.built
    got = paired.collect_paired_grams(model, model, data, layer, max_batch=8, collector=collector)
    assert collector.built - built == (1 if slow else 0)  # the cut model's session, one for both (same graph)
    np.testing.assert_allclose(got.current[0], x.T @ x / len(x), rtol=1e-12)
    np.testing.assert_allclose(got.cross[0], got.current[0], rtol=0)


@pytest.mark.parametrize("make", [lambda: tiny.conv(group=2), lambda: tiny.gemm(trans_b=True)])
def test_input_rows_of_a_float32_input_are_those_of_its_float64_copy(make):
    """Rows are picked in the input's precision and widened after: the same rows as from a float64 copy."""
    from onnxcompress.graph.weights import find_weights
    from onnxcompress.runtime.capture import linear_layer
    model = make()
    info = next(w for w in find_weights(model, min_elements=0) if len(w.shape) >= 2)
    layer = linear_layer(model, info)
    shape = (6, 8, 10, 10) if layer.kind == "conv" else (50, 64)
    x = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    for max_rows in (None, 40):
        narrow = layer.input_rows(x, max_rows, np.random.default_rng(1))
        wide = layer.input_rows(x.astype(np.float64), max_rows, np.random.default_rng(1))
        assert len(narrow) == len(wide) == layer.groups
        for a, b in zip(narrow, wide):
            assert a.dtype == np.float64 and a.shape == b.shape
            np.testing.assert_array_equal(a, b)


def test_a_costly_paired_capture_stops_at_enough_rows_taken_across_the_data(monkeypatch):
    """Where a pass over the data is measured slow (CUT_SECONDS), the capture streams interleaved parts of the
    data (part p: samples p, p + 16, ...) and stops once it holds MIN_PAIRED_ROWS rows (here 24: six samples of
    four rows); its Gram matrices are exactly those of the samples it took, the same from both models."""
    from onnxcompress.graph.data import load_data
    from onnxcompress.graph.weights import find_weights
    from onnxcompress.runtime import capture, paired
    from onnxcompress.runtime.statistics import Collector
    model = _two_layers_and_a_branch()
    layer = capture.linear_layer(model, next(w for w in find_weights(model, min_elements=0) if w.name == "w2"))
    data = load_data({"x": np.random.default_rng(5).standard_normal((64, 4, 6)).astype(np.float32)})
    collector = Collector()
    runner = collector.runner(model, ["r"])  # measures the whole model's cost
    x = {i: np.asarray(c.values["r"], np.float64).reshape(-1, 5) for i, c in enumerate(runner.chunks(data))}
    monkeypatch.setattr(paired, "CUT_SECONDS", -1.0)
    monkeypatch.setattr(paired, "MIN_PAIRED_ROWS", 24)
    got = paired.collect_paired_grams(model, model, data, layer, collector=collector)
    taken = np.concatenate([x[i] for i in (0, 16, 32, 48, 1, 17)])
    assert got.count == 24
    np.testing.assert_allclose(got.current[0], taken.T @ taken / 24, rtol=1e-12)
    np.testing.assert_allclose(got.cross[0], got.current[0], rtol=0)
    monkeypatch.setattr(paired, "CUT_SECONDS", 1e9)  # a fast model: every sample, as before
    assert paired.collect_paired_grams(model, model, data, layer, collector=collector).count == 64 * 4


def test_signal_and_noise_remembers_the_signal_of_weights_measured_before():
    """Every candidate of one weight has the same signal tr(W H W^T): computed once, the same number."""
    from onnxcompress.numerics.gptq import LayerHessians
    rng = np.random.default_rng(2)
    h = gram(correlated_rows(rng, 200, 12))
    hessians = LayerHessians([h, 2 * h], np.array([0, 0, 1, 1, 1]))
    w = rng.standard_normal((12, 5)).T  # a transposed view, as a MatMul weight's matrix is
    d1, d2 = 0.1 * rng.standard_normal((5, 12)), 0.2 * rng.standard_normal((5, 12))
    first = hessians.signal_and_noise(w, d1)
    second = hessians.signal_and_noise(w.copy(), d2)
    fresh = LayerHessians([h, 2 * h], np.array([0, 0, 1, 1, 1])).signal_and_noise(w, d2)
    assert first[0] == second[0] == fresh[0] and second[1] == fresh[1] and first[1] != second[1]
    assert len(hessians._signals) == 1
    expected = sum(float(np.sum((w[r] @ m) * w[r])) for r, m in [(slice(0, 2), h), (slice(2, 5), 2 * h)])
    assert first[0] == pytest.approx(expected, rel=1e-12)


def test_energy_is_the_noise_of_signal_and_noise_and_remembers_no_signal():
    rng = np.random.default_rng(6)
    xs = [correlated_rows(rng, 50, 7), correlated_rows(rng, 50, 7)]
    h = LayerHessians([gram(x) for x in xs], np.array([0, 1, 1, 0, 1]))
    d = rng.standard_normal((5, 7))
    assert h.energy(d) == h.signal_and_noise(np.ones((5, 7)), d)[1]
    h._signals.clear()
    h.energy(d)
    assert not h._signals  # the weights' signals it remembers are not pushed out by probes' errors
