"""The prune pass on tiny hand-built models: masks, exact zeros, compensation measured in onnxruntime."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import tiny
from onnxcompress.errors import ModelError, PreconditionError, RecipeError
from onnxcompress.graph.data import load_data
from onnxcompress.graph.weights import find_weights, get_array
from onnxcompress.numerics import refine
from onnxcompress.numerics.measures import magnitude_mask
from onnxcompress.passes import PASSES
from onnxcompress.passes.prune import PruneConfig, PrunePass
from onnxcompress.pipeline.artifacts import Budget, LayerChoice, SearchPlan
from onnxcompress.pipeline.manager import Context

SAMPLES = Path(__file__).resolve().parent.parent / "samples"

BUILDERS = {
    "gemm_transB1": lambda: tiny.gemm(trans_b=True),
    "gemm_transB0": lambda: tiny.gemm(trans_b=False),
    "matmul": tiny.matmul,
    "conv": tiny.conv,
    "conv_grouped": lambda: tiny.conv(c=8, m=16, group=2),
}


def correlated_feeds(model: onnx.ModelProto, n: int, seed: int) -> dict[str, np.ndarray]:
    """Random inputs whose features are strongly correlated (as real activations are)."""
    feeds = tiny.random_feeds(model, n=n, seed=seed)
    rng = np.random.default_rng(1234)  # the same mixing for calibration and held-out data
    out = {}
    for name, x in feeds.items():
        c = x.shape[1]
        rank = max(c // 4, 2)  # low-rank features plus a little noise
        mix = rng.standard_normal((c, rank)) @ rng.standard_normal((rank, c)) / np.sqrt(rank) + 0.1 * np.eye(c)
        y = np.moveaxis(np.moveaxis(x, 1, -1) @ mix, -1, 1)
        if y.ndim == 4:  # spatial correlation too
            y = y + 0.8 * np.roll(y, 1, axis=2) + 0.8 * np.roll(y, 1, axis=3)
        out[name] = y.astype(np.float32)
    return out


def weight_info(model: onnx.ModelProto, name: str):
    return next(w for w in find_weights(model, min_elements=0) if w.name == name)


def run_pass(model: onnx.ModelProto, data=None, **options) -> tuple[Context, PrunePass]:
    working = onnx.ModelProto()
    working.CopyFrom(model)
    ctx = Context(original=model, model=working, data=None if data is None else load_data(data), progress=False)
    p = PrunePass(**options)
    p.requires(ctx)
    result = p.call(ctx)
    p.ensures(ctx, result)
    return ctx, p


def output_error(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds) -> float:
    ref, = tiny.run(reference, feeds)
    got, = tiny.run(candidate, feeds)
    return float(np.sum((ref - got) ** 2))


def test_prune_is_registered():
    assert PASSES["prune"] is PrunePass


@pytest.mark.parametrize("builder", BUILDERS)
def test_magnitude_pruning_without_data(builder):
    model = BUILDERS[builder]()
    info = weight_info(model, "W")
    original = get_array(model, info)
    ctx, _ = run_pass(model, sparsity={info.name: 0.7})
    mask = ctx.masks[info.name]
    assert mask.shape == original.shape and mask.dtype == bool
    assert abs(mask.mean() - 0.3) < 0.01
    pruned = get_array(ctx.model, info)
    assert np.all(pruned[~mask] == 0)
    np.testing.assert_array_equal(pruned[mask], original[mask])  # no data: kept weights untouched
    assert np.abs(original[mask]).min() >= np.abs(original[~mask]).max()
    assert tiny.op_types(ctx.model) == tiny.op_types(model)
    onnx.checker.check_model(ctx.model, full_check=True)
    assert any("no calibration data" in note for note in ctx.notes)


@pytest.mark.parametrize("compensation", ["lstsq", "sparsegpt"])
@pytest.mark.parametrize("builder", BUILDERS)
def test_compensation_reduces_output_error_on_held_out_data(builder, compensation):
    model = BUILDERS[builder]()
    info = weight_info(model, "W")
    calib, held_out = correlated_feeds(model, 256, seed=1), correlated_feeds(model, 64, seed=2)
    plain, _ = run_pass(model, calib, sparsity={info.name: 0.75}, compensation="none")
    fitted, _ = run_pass(model, calib, sparsity={info.name: 0.75}, compensation=compensation, rounds=1)
    mask = fitted.masks[info.name]
    assert abs(mask.mean() - 0.25) < 0.01
    assert np.all(get_array(fitted.model, info)[~mask] == 0)
    if compensation == "lstsq":  # the same magnitude mask, only the kept values refit
        np.testing.assert_array_equal(mask, plain.masks[info.name])
    assert tiny.op_types(fitted.model) == tiny.op_types(model)
    onnx.checker.check_model(fitted.model, full_check=True)
    err_plain = output_error(model, plain.model, held_out)
    err_fitted = output_error(model, fitted.model, held_out)
    limit = 0.7 if compensation == "lstsq" else 0.85  # SparseGPT also picks a different mask
    assert err_fitted < limit * err_plain, (err_fitted, err_plain)
    record = next(r for r in fitted.records if r.name == info.name)
    assert record.details["sqnr_db"] > record.details["sqnr_db_magnitude"]


def test_layers_are_refit_in_graph_order_toward_the_original_outputs():
    model = tiny.conv_gemm()
    calib, held_out = correlated_feeds(model, 256, seed=1), correlated_feeds(model, 64, seed=2)
    options = {"min_elements": 0, "sparsity": {"conv.W": 0.5, "fc.W": 0.8}}
    plain, _ = run_pass(model, calib, compensation="none", **options)
    current, _ = run_pass(model, calib, target="current", **options)
    original, _ = run_pass(model, calib, target="original", **options)
    assert set(original.masks) == {"conv.W", "fc.W"}
    errors = [output_error(model, c.model, held_out) for c in (plain, current, original)]
    assert errors[2] < errors[1] < errors[0], errors
    onnx.checker.check_model(original.model, full_check=True)


def test_gradual_rounds_keep_the_target_fraction_and_help():
    model = tiny.gemm()
    calib, held_out = correlated_feeds(model, 256, seed=1), correlated_feeds(model, 64, seed=2)
    one, _ = run_pass(model, calib, sparsity={"W": 0.9}, rounds=1)
    three, _ = run_pass(model, calib, sparsity={"W": 0.9}, rounds=3)
    assert abs(three.masks["W"].mean() - 0.1) < 0.01
    assert np.all(get_array(three.model, weight_info(three.model, "W"))[~three.masks["W"]] == 0)
    assert output_error(model, three.model, held_out) < output_error(model, one.model, held_out)


def test_threshold_rule_prunes_below_quality_times_std():
    model = tiny.gemm()
    w = get_array(model, weight_info(model, "W"))
    ctx, _ = run_pass(model, method="threshold", quality=0.8)
    expected = np.abs(w) >= 0.8 * w.std()
    np.testing.assert_array_equal(ctx.masks["W"], expected)


def test_role_and_size_aware_defaults():
    model = tiny.conv_gemm()  # fc.W has 10 outputs: a classifier head
    ctx, _ = run_pass(model, min_elements=0)
    cfg = PruneConfig()
    assert abs(1 - ctx.masks["fc.W"].mean() - cfg.sparsity_head) < 0.01
    assert abs(1 - ctx.masks["conv.W"].mean() - cfg.sparsity_stem) < 0.02  # fan-in 9: a stem conv
    wide = tiny.gemm(k=64, n=32)
    ctx, _ = run_pass(wide)
    assert abs(1 - ctx.masks["W"].mean() - cfg.sparsity_fc) < 0.01


def test_plan_overrides_options():
    model = tiny.gemm()
    working = onnx.ModelProto()
    working.CopyFrom(model)
    ctx = Context(original=model, model=working, progress=False, plan=SearchPlan(Budget(), {"W": LayerChoice(8, 0.4)}))
    p = PrunePass(sparsity={"W": 0.9})
    p.ensures(ctx, p.call(ctx))
    assert abs(ctx.masks["W"].mean() - 0.6) < 0.01


def test_bad_options_are_recipe_errors():
    with pytest.raises(RecipeError, match="sparsity_fc"):
        PrunePass(sparsity_fc=1.5)
    with pytest.raises(RecipeError, match="compensation"):
        PrunePass(compensation="magic")
    with pytest.raises(ModelError, match="no weight"):
        run_pass(tiny.gemm(), sparsity={"not_there": 0.5})


def test_prune_after_share_is_refused():
    model = tiny.gemm()
    ctx = Context(original=model, model=model, progress=False, shared={"W": object()})
    with pytest.raises(PreconditionError):
        PrunePass().requires(ctx)


def test_magnitude_mask_exact_count():
    values = np.array([[0.1, -3.0, 0.2], [2.0, 0.0, -0.5]])
    np.testing.assert_array_equal(magnitude_mask(values, 0.5), [[False, True, False], [True, False, True]])
    assert magnitude_mask(values, 0.0).all()


@pytest.mark.slow
def test_lenet300_prune_and_share_with_data_keeps_accuracy():
    from onnxcompress.api import compress
    from onnxcompress.recipes import Recipe

    model = onnx.load(SAMPLES / "lenet300.onnx")
    recipe = Recipe("t", [("prune", {"sparsity_fc": 0.85, "rounds": 1}), ("share", {})])  # measured 96.4% (ref 96.9%)
    out, report = compress(model, recipe, SAMPLES / "mnist_calib.npz", eval_data=SAMPLES / "mnist_test.npz")
    (output,) = report.validation.outputs
    assert output.accuracy_reference - output.accuracy_candidate <= 0.010
    kept = {r.name: r.details["kept"] for r in report.weights if r.pass_name == "prune"}
    assert abs(kept["fc1.weight"] - 0.15) < 0.01
    onnx.checker.check_model(out, full_check=True)


def test_bias_refit_joins_the_least_squares():
    model = tiny.gemm()
    calib, held_out = correlated_feeds(model, 256, seed=1), correlated_feeds(model, 64, seed=2)
    calib["x"] += 1.5  # inputs with a mean: pruning shifts the mean output, which a bias absorbs
    held_out["x"] += 1.5
    options = {"sparsity": {"W": 0.9}, "rounds": 1}
    weights_only, _ = run_pass(model, calib, refit_bias=False, **options)
    with_bias, _ = run_pass(model, calib, refit_bias=True, **options)
    assert not np.array_equal(get_array(with_bias.model, weight_info(with_bias.model, "b")),
                              get_array(model, weight_info(model, "b")))
    record = next(r for r in with_bias.records if r.name == "W")
    assert record.details["bias_refit"] == "b"
    assert output_error(model, with_bias.model, held_out) <= output_error(model, weights_only.model, held_out)


def test_planned_sparsity_zero_leaves_the_weight_alone():
    """A plan (from the bit-width search) may keep a weight dense: no mask, no refit, same values."""
    from onnxcompress.graph.weights import find_weights, get_array

    model = tiny.conv_gemm()
    ctx = Context(original=model, model=onnx.ModelProto(), progress=False, plan=SearchPlan(Budget(), {"fc.W": LayerChoice(8, 0.0)}))
    ctx.model.CopyFrom(model)
    prune = PrunePass(min_elements=64)
    prune.requires(ctx)
    prune.ensures(ctx, prune.call(ctx))
    assert "fc.W" not in ctx.masks and "conv.W" in ctx.masks
    before = {w.name: get_array(model, w) for w in find_weights(model, min_elements=0)}
    after = {w.name: get_array(ctx.model, w) for w in find_weights(ctx.model, min_elements=0)}
    np.testing.assert_array_equal(after["fc.W"], before["fc.W"])


def test_auto_damping_is_chosen_per_layer_and_holds_up_on_held_out_data():
    """Few calibration samples per input: the held-out choice is recorded and no worse than a fixed ridge."""
    model = tiny.gemm(k=64, n=16)
    calib, held_out = correlated_feeds(model, 96, seed=1), correlated_feeds(model, 256, seed=2)  # two chunks
    auto, _ = run_pass(model, calib, sparsity={"W": 0.8})
    fixed, _ = run_pass(model, calib, sparsity={"W": 0.8}, damping=0.01)
    record = next(r for r in auto.records if r.name == "W")
    assert record.details["damping"] in [d / 2 for d in refine.DAMPING_GRID]
    assert "damping" not in next(r for r in fixed.records if r.name == "W").details
    assert output_error(model, auto.model, held_out) <= 1.05 * output_error(model, fixed.model, held_out)
    with pytest.raises(RecipeError, match="damping"):
        PrunePass(damping="lots")
