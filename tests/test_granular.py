"""Granularity of weight sharing: per-channel scales, per-group codebooks, outliers, the automatic choice."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.fitting import granular
from onnxcompress.fitting.granular import fit, Fitting, LayerHessians, measure, Option
from onnxcompress.graph.data import Dataset
from onnxcompress.graph.weights import find_weights
from tiny import (assert_valid_and_close, decoded_reference, gemm, make_model, op_types, random_feeds, run, run_pass,
                  value)


def run_share(model, data=None, **options):
    """The share pass alone (centroid refinement off, to test the granularity choice by itself)."""
    from onnxcompress.passes.share import SharePass

    return run_pass(SharePass(refine=False, **options), model, data)


def scaled_gemm(k=64, n=32, *, spread=100.0, outliers=0, seed=0) -> onnx.ModelProto:
    """Gemm(transB=1) whose output channels' scales span `spread` (log-spaced), with planted outliers."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)) * np.logspace(0, np.log10(spread), n)[rng.permutation(n), None] * 0.01
    if outliers:
        flat = w.reshape(-1)
        flat[rng.choice(flat.size, outliers, replace=False)] = (rng.choice([-1, 1], outliers) * w.std()
                                                                * rng.uniform(6, 15, outliers))
    node = helper.make_node("Gemm", ["x", "W"], ["y"], transB=1, name="fc")
    return make_model([node], [value("x", ["N", k])], [value("y", ["N", n])],
                      [numpy_helper.from_array(w.astype(np.float32), "W")])


def output_error(model, candidate, feeds, *, per_channel=False) -> float:
    """Squared output error over signal (1 / SQNR) of the layer's output in onnxruntime; per_channel:
    averaged over output channels each against its own signal (what a following normalisation sees)."""
    ref, got = run(model, feeds)[0], run(candidate, feeds)[0]
    axis = 0 if per_channel else None
    return float(np.mean(np.sum((ref - got) ** 2, axis=axis) / np.sum(ref ** 2, axis=axis)))


@pytest.mark.parametrize("bits", [3, 4])
def test_channel_scales_cut_output_error_against_per_tensor_on_100x_channel_spread(bits):
    model = scaled_gemm(spread=100.0)
    w = numpy_helper.to_array(model.graph.initializer[0])
    per_channel = np.abs(w).max(1)
    assert per_channel.max() / per_channel.min() > 50  # precondition: channels differ ~100x
    feeds = random_feeds(model, n=64)
    errors = {}
    for granularity in ("tensor", "channel"):
        ctx = run_share(model, granularity=granularity, bits_fc=bits, min_elements=64)
        assert_valid_and_close(decoded_reference(ctx), ctx.model, feeds, atol=1e-4)
        errors[granularity] = (output_error(model, ctx.model, feeds),
                               output_error(model, ctx.model, feeds, per_channel=True))
    assert "Mul" in op_types(run_share(model, granularity="channel", bits_fc=bits, min_elements=64).model)
    assert errors["channel"][0] < errors["tensor"][0] / 2  # whole output: at least 3 dB better at the same bits
    assert errors["channel"][1] < errors["tensor"][1] / 10  # channel by channel: at least 10 dB better


@pytest.mark.parametrize("bits", [3, 4])
def test_outliers_kept_apart_cut_output_error_against_per_tensor(bits):
    model = scaled_gemm(spread=1.0, outliers=10)  # 0.5% of 2048 entries at 6-15 standard deviations
    feeds = random_feeds(model, n=64)
    errors = {}
    for granularity in ("tensor", "outlier"):
        ctx = run_share(model, granularity=granularity, bits_fc=bits, min_elements=64, outlier_fraction=0.005)
        assert_valid_and_close(decoded_reference(ctx), ctx.model, feeds, atol=1e-4)
        errors[granularity] = output_error(model, ctx.model, feeds)
        if granularity == "outlier":
            assert "ScatterElements" in op_types(ctx.model)
            w = numpy_helper.to_array(model.graph.initializer[0])
            shared = ctx.shared["W"]
            assert shared.outlier_index.size == round(0.005 * w.size)
            np.testing.assert_array_equal(shared.decode().reshape(-1)[shared.outlier_index],
                                          w.reshape(-1)[shared.outlier_index])  # stored exactly
    assert errors["outlier"] < errors["tensor"] / 2  # at least 3 dB better at the same bits


@pytest.mark.parametrize("option", [Option("tensor"), Option("channel"), Option("group", group_size=4),
                                    Option("tensor", outlier_fraction=0.01), Option("channel", outlier_fraction=0.01)])
@pytest.mark.parametrize("axis", [0, 1])
def test_every_option_keeps_pruned_entries_exactly_zero_and_codes_in_range(option, axis):
    rng = np.random.default_rng(1)
    spread = np.logspace(-1, 1, 24 if axis else 16)
    w = (rng.standard_normal((16, 24)) * (spread[None, :] if axis else spread[:, None])).astype(np.float32)
    mask = rng.random(w.shape) > 0.6
    shared = fit(w, 3, option, Fitting("W", axis, mask=mask))
    decoded = shared.decode()
    assert decoded.shape == w.shape and decoded.dtype == w.dtype
    assert np.all(decoded[~mask] == 0) and np.all(shared.codes[~mask] == 0)
    assert int(shared.codes.max()) < 2 ** 3
    if option.kind == "group":
        assert np.all(shared.codebook[shared.group_offsets] == 0.0)  # each group's code 0 is 0.0


def test_weighted_fit_and_channel_descent_never_lose_to_their_start():
    """The scale/codebook/code descent only lowers the weighted error it minimises."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((12, 40)) * np.logspace(-1, 1, 12)[:, None]
    a = rng.random((12, 40)) + 0.1
    errors = []
    for iterations in (0, 1, 4):
        shared = fit(w, 3, Option("channel", weighted=True), Fitting(channel_axis=0), importance=a, iterations=iterations,
                     scale_dtype="float32")
        errors.append(float(np.sum(a * (w - shared.decode()) ** 2)))
    assert errors[1] <= errors[0] + 1e-12 and errors[2] <= errors[1] + 1e-12 and errors[2] < errors[0]


def test_output_space_measure_matches_the_layer_output_error():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 20)).astype(np.float32)
    x = rng.standard_normal((500, 20)) * np.linspace(0.1, 3, 20)
    hessians = LayerHessians([x.T @ x / len(x)], np.zeros(8, int))
    shared = fit(w, 3, Option("tensor"), Fitting(channel_axis=0))
    y, y_hat = x @ w.T.astype(np.float64), x @ shared.decode().T.astype(np.float64)
    expected = 10 * np.log10(np.sum(y ** 2) / np.sum((y - y_hat) ** 2))
    assert measure(w, shared, hessians) == pytest.approx(expected, rel=1e-9)


def test_float16_scales_are_written_as_float16_and_match_decode():
    model = scaled_gemm(k=128, n=64, spread=10.0)
    ctx = run_share(model, granularity="channel", bits_fc=4, min_elements=64)
    shared = ctx.shared["W"]
    assert shared.scale.dtype == np.float16
    scale = next(t for t in ctx.model.graph.initializer if t.name.startswith("W__scale"))
    assert scale.data_type == TensorProto.FLOAT16
    assert_valid_and_close(decoded_reference(ctx), ctx.model, random_feeds(model), atol=1e-5)


def test_group_codebooks_run_in_onnxruntime_like_decode():
    model = scaled_gemm(k=64, n=32, spread=30.0)
    ctx = run_share(model, granularity="group", group_size=8, bits_fc=3, min_elements=64)
    shared = ctx.shared["W"]
    assert shared.group_offsets is not None and len(np.unique(shared.group_offsets)) == 4
    assert "Add" in op_types(ctx.model)
    assert_valid_and_close(decoded_reference(ctx), ctx.model, random_feeds(model), atol=1e-5)


def test_auto_with_data_picks_channel_scales_on_spread_channels_and_says_why():
    model = scaled_gemm(k=256, n=64, spread=100.0)  # large enough that the Mul/Cast nodes' bytes are small
    data = Dataset(stacked=random_feeds(model, n=128))
    ctx = run_share(model, data=data, granularity="auto", bits_fc=4, min_elements=64)
    record = next(r for r in ctx.records if r.name == "W" and "granularity" in r.details)
    details = record.details
    assert details["error_space"] == "model output" and set(details["output_gains"]) == {"rest_db", "mean_db"}
    assert details["granularity"].startswith("channel")
    assert {"tensor", "channel", "group8"} <= set(details["candidates"])
    chosen = details["candidates"][details["granularity"]]["sqnr_db"]
    assert chosen > details["candidates"]["tensor"]["sqnr_db"] + 3
    assert details["reason"]


def test_auto_takes_the_smallest_option_once_the_target_is_met():
    model = gemm(k=64, n=32)
    ctx = run_share(model, granularity="auto", bits_fc=8, min_elements=64, target_sqnr_db=30.0)
    details = next(r for r in ctx.records if r.name == "W" and "granularity" in r.details).details
    assert details["error_space"] == "weight" and details["granularity"] == "tensor"
    assert details["sqnr_db"] >= 30.0


def lstm_model(hidden=16, inputs=8, seed=0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((1, 4 * hidden, inputs)) * 0.3).astype(np.float32)
    r = (rng.standard_normal((1, 4 * hidden, hidden)) * 0.3).astype(np.float32)
    b = (rng.standard_normal((1, 8 * hidden)) * 0.1).astype(np.float32)
    node = helper.make_node("LSTM", ["x", "W", "R", "B"], ["", "y"], hidden_size=hidden, name="lstm")
    return make_model([node], [value("x", [5, "N", inputs])], [value("y", [1, "N", hidden])],
                      [numpy_helper.from_array(w, "W"), numpy_helper.from_array(r, "R"),
                       numpy_helper.from_array(b, "B")])


def test_recurrent_weights_are_shared_per_gate_row_and_still_run_in_onnxruntime():
    model = lstm_model()
    infos = {w.name: w for w in find_weights(model, min_elements=64)}
    assert infos["W"].channel_axis == 1 and infos["R"].channel_axis == 1  # precondition: 4H gate rows
    ctx = run_share(model, granularity="channel", bits_other=4, min_elements=64)
    assert {"W", "R", "B"} <= set(ctx.shared)
    assert ctx.shared["W"].scale.shape == (64,)  # one scale per gate row
    feeds = {"x": np.random.default_rng(0).standard_normal((5, 3, 8)).astype(np.float32)}
    assert_valid_and_close(decoded_reference(ctx), ctx.model, feeds, atol=1e-5)


def test_options_need_a_channel_axis_and_unknown_granularity_is_refused():
    with pytest.raises(ValueError, match="channel axis"):
        fit(np.ones((4, 4), np.float32), 2, Option("channel"), Fitting(channel_axis=None))
    with pytest.raises(ValueError, match="granularity"):
        granular.options_for("rows", has_channel_axis=True, channels=4, weighted=False, group_size=2,
                             outlier_fraction=0.0)
    from onnxcompress.errors import RecipeError
    from onnxcompress.passes.share import SharePass

    with pytest.raises(RecipeError):
        SharePass(granularity="rows")
    with pytest.raises(RecipeError):
        SharePass(outlier_fraction=0.9)


def test_recurrent_hessians_are_the_step_inputs_and_previous_hidden_states():
    from onnxcompress.runtime.capture import capture
    from onnxcompress.fitting.sharing import layer_hessians

    model = lstm_model()
    x = np.random.default_rng(4).standard_normal((5, 3, 8)).astype(np.float32)
    data = Dataset([{"x": x}])
    infos = [w for w in find_weights(model, min_elements=64)]
    found = layer_hessians(model, data, infos)
    assert set(found) == {"W", "R"}  # B is a bias: no Hessian of its own (bias_links places it on gate rows)
    rows = x.reshape(-1, 8).astype(np.float64)
    np.testing.assert_allclose(found["W"].hessians[0], rows.T @ rows / len(rows), rtol=1e-6)
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    exposed.graph.node[0].output[0] = "Y"
    y = next(capture(exposed, data, ["Y"]))["Y"].astype(np.float64)  # [seq, 1, batch, H]
    previous = np.concatenate([np.zeros_like(y[:1]), y[:-1]]).reshape(-1, 16)
    np.testing.assert_allclose(found["R"].hessians[0], previous.T @ previous / len(previous), rtol=1e-6)


def test_gptq_codes_with_least_squares_centroids_beat_nearest_codes_in_output_space():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((16, 48)).astype(np.float32)
    mix = rng.standard_normal((48, 48)) * 0.3 + np.eye(48)
    x = rng.standard_normal((2000, 48)) @ mix  # correlated inputs: where error feedback pays
    hessians = LayerHessians([x.T @ x / len(x)], np.zeros(16, int))
    for kind in ("tensor", "channel"):
        nearest = fit(w, 3, Option(kind, weighted=True), Fitting(channel_axis=0), importance=hessians.importance())
        gptq = fit(w, 3, Option(kind, weighted=True, gptq=True), Fitting(channel_axis=0, hessians=hessians),
                   importance=hessians.importance())
        assert measure(w, gptq, hessians) > measure(w, nearest, hessians) + 1.0


def test_no_outliers_below_opset_11_where_scatternd_does_not_exist():
    from onnxcompress.fitting.sharing import ShareSettings, share_weight

    model = scaled_gemm(spread=1.0, outliers=10)
    info = next(w for w in find_weights(model) if w.name == "W")
    array = numpy_helper.to_array(model.graph.initializer[0])
    old = share_weight(array, info, 4, ShareSettings(granularity="outlier", outlier_fraction=0.01, opset=9))
    assert all(c.option.outlier_fraction == 0 for c in old.candidates)
    new = share_weight(array, info, 4, ShareSettings(granularity="outlier", outlier_fraction=0.01, opset=21))
    assert new.chosen.shared.outlier_index.size > 0


def biased_gemm(k: int = 64, n: int = 128, seed: int = 0) -> onnx.ModelProto:
    """Gemm(transB=1) with a widely spread bias (as BatchNorm folding leaves one)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    c = (rng.standard_normal(n) * 4.0).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "W", "C"], ["y"], transB=1, name="fc")
    return make_model([node], [value("x", ["N", k])], [value("y", ["N", n])],
                      [numpy_helper.from_array(w, "W"), numpy_helper.from_array(c, "C")])


def relu_rows(n: int, k: int, seed: int) -> np.ndarray:
    """Inputs after a ReLU: nonnegative, with a mean a constant can be rebuilt from."""
    return np.maximum(np.random.default_rng(seed).standard_normal((n, k)), 0).astype(np.float32)


def test_a_weight_moved_to_w_plus_e_v_leaves_exactly_the_residual_the_link_reports():
    from onnxcompress.numerics.bias_error import BiasLink, absorbing_target, mean_solutions

    rng = np.random.default_rng(6)
    x = relu_rows(4000, 24, seed=7).astype(np.float64)
    w, e = rng.standard_normal((8, 24)), rng.standard_normal(8)
    hessians = LayerHessians([x.T @ x / len(x)], np.zeros(8, int), [x.mean(axis=0)])
    moved = absorbing_target(w, e, hessians)
    link = BiasLink("W", np.arange(8), mean_solutions(hessians)[1], signal=1.0)
    actual = np.mean(np.sum((x @ (w - moved).T + e) ** 2, axis=1))  # E|(W - W') x + e|^2 on the rows
    np.testing.assert_allclose(actual, link.noise(e), rtol=1e-9)
    assert link.noise(e) < 0.1 * np.sum(e * e)  # post-ReLU inputs cancel over 10 dB of a constant error
    zero_mean = LayerHessians([np.eye(24)], np.zeros(8, int), [np.zeros(24)])
    assert np.all(mean_solutions(zero_mean)[1] == 0)  # inputs without a mean cancel nothing


def test_auto_measures_a_bias_in_its_layers_output_and_the_weight_cancels_its_coding_error():
    model = biased_gemm()
    calib = Dataset(stacked={"x": relu_rows(512, 64, seed=1)})
    ctx = run_share(model, data=calib, granularity="auto", bits_fc=8, bits_other=4, min_elements=16)
    bias = next(r for r in ctx.records if r.name == "C" and "granularity" in r.details).details
    weight = next(r for r in ctx.records if r.name == "W" and "granularity" in r.details).details
    assert bias["error_space"] == "model output" and "float" in bias["candidates"] and "C" in ctx.shared
    assert weight["cancels_coding_error_of"] == "C"
    feeds = {"x": relu_rows(256, 64, seed=2)}  # held out
    assert_valid_and_close(decoded_reference(ctx), ctx.model, feeds, atol=1e-4)
    bias_only = onnx.ModelProto()
    bias_only.CopyFrom(model)
    bias_only.graph.initializer[1].CopyFrom(numpy_helper.from_array(ctx.shared["C"].decode(), "C"))
    ref = run(model, feeds)[0]
    error_cancelled = np.sum((run(ctx.model, feeds)[0] - ref) ** 2)
    error_bias_only = np.sum((run(bias_only, feeds)[0] - ref) ** 2)
    assert error_cancelled < error_bias_only / 10  # 10 dB less, the 8-bit weight's own error included


def test_without_data_a_bias_stays_float_and_a_weight_whose_codebook_form_is_not_smaller_too():
    from tiny import conv

    model = conv(c=8, m=16)
    ctx = run_share(model, bits_conv=4, bits_other=4, min_elements=0)  # no data: the bias's error is unmeasured
    assert "b" not in ctx.shared and "W" in ctx.shared
    assert any(t.name == "b" and t.data_type == TensorProto.FLOAT for t in ctx.model.graph.initializer)
    assert any(r.name == "b" and "could not be measured" in r.action for r in ctx.records)
    tiny_weight = gemm(k=4, n=4)  # W: 16 floats, 64 bytes; codes + codebook + Cast/Gather nodes are larger
    ctx = run_share(tiny_weight, bits_fc=4, min_elements=0)
    assert "W" not in ctx.shared and any(r.name == "W" and "not smaller" in r.action for r in ctx.records)


@pytest.mark.parametrize("op", ["LSTM", "GRU-linear-before-reset"])
def test_recurrent_bias_lands_on_gate_rows_and_a_gru_reset_bias_is_not_linked(op):
    from onnxcompress.fitting.sharing import bias_links, layer_hessians

    model = lstm_model(hidden=16)
    if op != "LSTM":  # its hidden gate's Rb is multiplied by the reset gate: not a plain added bias
        rng = np.random.default_rng(1)
        inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n)
                 for n, s in (("W", (1, 48, 8)), ("R", (1, 48, 16)), ("B", (1, 96)))]
        node = helper.make_node("GRU", ["x", "W", "R", "B"], ["", "y"], hidden_size=16, linear_before_reset=1)
        model = make_model([node], [value("x", [5, "N", 8])], [value("y", [1, "N", 16])], inits)
    data = Dataset([{"x": np.abs(np.random.default_rng(3).standard_normal((5, 3, 8))).astype(np.float32)}])
    infos = find_weights(model, min_elements=64)
    hessians = layer_hessians(model, data, infos)
    links = bias_links(model, infos, hessians, lambda w: numpy_helper.to_array(
        next(t for t in model.graph.initializer if t.name == w.name)))
    if op != "LSTM":
        assert links == {}
        return
    link = links["B"]
    assert link.absorber in ("W", "R") and link.signal > 0
    np.testing.assert_array_equal(link.rows, np.arange(128) % 64)  # Wb and Rb land on the same 4H gate rows
    ctx = run_share(model, data=data, granularity="auto", bits_other=4, min_elements=64)
    feeds = {"x": np.random.default_rng(0).standard_normal((5, 3, 8)).astype(np.float32)}
    assert_valid_and_close(decoded_reference(ctx), ctx.model, feeds, atol=1e-5)


@pytest.mark.parametrize("K", [20, 300])  # rows of at most 256 coded entries (pair counts) and longer (row sums)
def test_code_normal_equations_match_the_indicator_products(K):
    from types import SimpleNamespace

    from onnxcompress.numerics.gptq import code_normal_equations

    rng = np.random.default_rng(0)
    rows, k = 9, 6
    x = rng.normal(size=(400, K))
    h = x.T @ x / 400
    hessians = SimpleNamespace(hessians=[h, 0.5 * h], group_of_channel=np.array([0] * 5 + [1] * 4))
    codes, coded = rng.integers(0, k, (rows, K)), rng.random((rows, K)) > 0.3
    s, t = rng.uniform(0.5, 2, rows), rng.normal(size=(rows, K))
    system, b = code_normal_equations(codes, coded, s, t, hessians, k)
    want_a, want_b, want_diagonal = np.zeros((k, k)), np.zeros(k), np.zeros(k)
    for j in range(rows):
        o = ((codes[j][:, None] == np.arange(k)) & coded[j][:, None]).astype(float)
        hj = hessians.hessians[hessians.group_of_channel[j]]
        want_a += s[j] ** 2 * o.T @ hj @ o
        want_b += s[j] * o.T @ hj @ t[j]
        want_diagonal += s[j] ** 2 * o.T @ np.diag(hj)
    assert np.allclose(system.matrix(), want_a) and np.allclose(b, want_b)
    c = rng.normal(size=k)
    assert np.allclose(system.times(c), want_a @ c) and np.allclose(system.entry_diagonal(), want_diagonal)


@pytest.mark.parametrize("max_codes", [64, 0])  # conjugate gradients, or the matrix formed
def test_code_system_solves_the_normal_equations_on_the_codes_asked(monkeypatch, max_codes):
    from types import SimpleNamespace

    from onnxcompress.numerics import gptq

    monkeypatch.setattr(gptq, "CG_MAX_CODES", max_codes)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 40)) @ rng.normal(size=(40, 40)) + 3 * rng.normal(size=40)  # A far from diagonal
    h = x.T @ x / 500
    hessians = SimpleNamespace(hessians=[h], group_of_channel=np.zeros(12, np.int64))
    codes = rng.integers(0, 8, (12, 40))
    system = gptq.CodeSystem(codes, rng.random((12, 40)) > 0.2, rng.uniform(0.5, 2, 12), hessians, 8)
    unknown = np.arange(8) != 3
    rhs = rng.normal(size=8)
    want = np.linalg.solve(system.matrix()[np.ix_(unknown, unknown)] + 1e-3 * np.eye(7), rhs[unknown])
    if max_codes:  # the steps never form A
        monkeypatch.setattr(gptq.CodeSystem, "matrix", lambda self: pytest.fail("A formed"))
    got = system.solve(rhs, unknown, 1e-3, start=rng.normal(size=8))
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10 * np.abs(want).max())


def _gptq_layer(seed=5):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((16, 48)) * np.logspace(0, 1, 16)[:, None]).astype(np.float32)
    x = rng.standard_normal((2000, 48)) @ (rng.standard_normal((48, 48)) * 0.3 + np.eye(48))
    return w, LayerHessians([x.T @ x / len(x)], np.zeros(16, int), [x.mean(axis=0)])


def test_gptq_options_beyond_the_tensor_one_are_predicted_from_their_twins_when_asked():
    """With predict_gptq, only the per-tensor GPTQ option is fitted among GPTQ's; the others get their weighted
    twin's bytes and its SQNR plus what GPTQ gained per tensor, marked predicted, never chosen by choose itself;
    without it, every option is fitted as before (the same measured candidates)."""
    from onnxcompress.runtime.sensitivity import OutputGains
    w, hessians = _gptq_layer()
    options = granular.options_for("auto", has_channel_axis=True, channels=16, weighted=True, group_size=8,
                                   outlier_fraction=0.02)
    fitting = Fitting(channel_axis=0, hessians=hessians)
    judging = granular.Judging(36.0, 10_000, gains=OutputGains(0.5, 2.0))
    every = granular.choose(w, 3, options, fitting, judging)
    import dataclasses
    some = granular.choose(w, 3, options, fitting, dataclasses.replace(judging, predict_gptq=True))
    assert [c.option for c in some.candidates] == [c.option for c in every.candidates] == list(options)
    predicted = [c for c in some.candidates if c.predicted]
    assert {c.option for c in predicted} == {o for o in options if o.gptq and o != granular.TENSOR_GPTQ} != set()
    by = {c.option: c for c in every.candidates}
    gain = by[granular.TENSOR_GPTQ].sqnr_db - by[Option("tensor", weighted=True)].sqnr_db
    for c in predicted:
        twin = by[Option(c.option.kind, c.option.group_size, c.option.outlier_fraction, weighted=True)]
        assert c.shared is None and c.bytes == twin.bytes and c.sqnr_db == pytest.approx(twin.sqnr_db + gain)
        assert by[c.option].shared is not None and not by[c.option].predicted
        assert abs(by[c.option].sqnr_db - c.sqnr_db) < 3.0  # the prediction is near what the fit measures
    for c in some.candidates:
        if not c.predicted:
            assert c.sqnr_db == by[c.option].sqnr_db and c.bytes == by[c.option].bytes
    assert not some.chosen.predicted and some.chosen.shared is not None
    assert some.details()["candidates"][predicted[0].option.label]["predicted"] is True
    # nothing to predict from: every option fitted
    alone = [o for o in options if o.gptq]
    assert granular.predict_gptq([], alone) is None


def test_share_with_data_fits_a_predicted_gptq_candidate_the_joint_choice_picks(monkeypatch):
    """A predicted candidate is never the final pick unmeasured: here every prediction is made to look best (one
    byte, 40 dB over its twin), the joint choice picks them, fits them, measures them, and picks again with what
    it measured until it picks only measured ones; the model matches the original in onnxruntime."""
    from onnxcompress.graph.data import load_data
    from tiny import conv_gemm
    predict = granular.predict_gptq

    def optimistic(candidates, options):
        got = predict(candidates, options)
        for c in got or []:
            c.sqnr_db, c.bytes = c.sqnr_db + 40.0, 1
        return got

    import passes.share as share
    monkeypatch.setattr(granular, "predict_gptq", optimistic)
    refits = []
    fit_ = share.SharePass._fit
    monkeypatch.setattr(share.SharePass, "_fit", lambda self, ctx, infos, bits_of, settings, known: refits.append(
        dict(known.only)) or fit_(self, ctx, infos, bits_of, settings, known))
    model = conv_gemm()
    data = load_data(random_feeds(model, n=32))
    ctx = run_pass(share.SharePass(refine=False, min_elements=64), model, data)
    chosen = [r.details for r in ctx.records if "candidates" in r.details and r.details["error_space"] == "model output"]
    assert chosen
    for d in chosen:
        assert not d["candidates"][d["granularity"]].get("predicted")
        assert d["candidates"][d["granularity"]]["sqnr_db"] == d["sqnr_db"]
    # the joint choice fitted the predicted picks (one option each), then picked again
    assert any(o.gptq and o != granular.TENSOR_GPTQ for only in refits for o in only.values())
    x = data.stacked["x"]
    (want,), (got,) = run(model, {"x": x}), run(ctx.model, {"x": x})
    onnx.checker.check_model(ctx.model, full_check=True)
    assert float(np.sum(want ** 2)) / float(np.sum((want - got) ** 2)) > 100  # over 20 dB


@pytest.mark.parametrize("shape, axis, option", [
    ((64, 48), 1, Option("channel", outlier_fraction=0.02)),
    ((48, 64), 0, Option("group", group_size=16)),
    ((6, 8, 3, 5), 1, Option("channel")),
    ((7, 9, 11), None, Option("tensor")),
    ((5, 300), 1, Option("channel", outlier_fraction=0.01)),
])
def test_decoded_blocks_are_decode_and_measure_is_the_full_decodes(shape, axis, option):
    """A block at a time (blocks of whole slices before the channel axis, here smaller than the weight) gives
    decode()'s values; measure's SQNR is the one of the full decoded copy."""
    from onnxcompress.numerics.histogram import signal_and_error
    from onnxcompress.numerics.measures import sqnr_db
    rng = np.random.default_rng(3)
    w = rng.standard_normal(shape).astype(np.float32)
    if option.kind == "tensor":
        w = w.astype(np.float64)  # decode() returns the weight's dtype
    shared = fit(w, 3, option, Fitting("w", axis))
    full = shared.decode().reshape(-1)
    for elements in (1, 37, 64 * 3, w.size, 10 * w.size):
        parts = list(shared.decoded_blocks(elements))
        assert parts[0][0].start == 0 and parts[-1][0].stop == w.size
        assert all(a[0].stop == b[0].start for a, b in zip(parts, parts[1:]))
        joined = np.concatenate([block for _, block in parts])
        assert joined.dtype == full.dtype and np.array_equal(joined, full)
    assert measure(w, shared, None) == pytest.approx(sqnr_db(*signal_and_error(w, shared.decode())), rel=1e-12)
