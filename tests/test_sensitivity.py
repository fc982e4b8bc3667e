"""Output gains (onnxcompress.runtime.sensitivity): how much of a layer's coding error reaches the model's
outputs, split into its mean part D E[x] and the rest, and the joint choice built on them."""
from functools import partial

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxcompress.graph.data import Dataset
from onnxcompress.fitting.granular import Candidate, Choice, Option, fit, Fitting, from_matrix, measure, to_matrix
from onnxcompress.fitting.joint import choose_jointly
from onnxcompress.fitting.sharing import layer_hessians
from onnxcompress.runtime.sensitivity import OutputGains, Probe, measure_gains
from onnxcompress.graph.weights import find_weights, get_array
from tiny import make_model, run, value, weights


def pooled_classifier(seed: int = 0) -> onnx.ModelProto:
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm: the pool averages a spatially varying
    error away but keeps a constant offset whole."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(weights(rng, 16, 3, 3, 3, scale=0.3), "conv.W"),
             numpy_helper.from_array(weights(rng, 16, scale=0.1), "conv.b"),
             numpy_helper.from_array(weights(rng, 10, 16, scale=0.5), "fc.W")]
    nodes = [helper.make_node("Conv", ["x", "conv.W", "conv.b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], axis=1, name="flatten"),
             helper.make_node("Gemm", ["f", "fc.W"], ["y"], transB=1, name="fc")]
    return make_model(nodes, [value("x", ["N", 3, 12, 12])], [value("y", ["N", 10])], inits)


def data_for(model, n=64, seed=1):
    x = np.abs(np.random.default_rng(seed).standard_normal((n, 3, 12, 12))).astype(np.float32)  # images: x >= 0
    return Dataset(stacked={"x": x})


def probes_for(model, data, bits=3, named=lambda name: name.endswith(".W")):
    """(weights, their Hessians, a Probe of each: the weight and its error coded per tensor at `bits`)."""
    infos = [w for w in find_weights(model, min_elements=0) if named(w.name)]
    hessians = layer_hessians(model, data, infos)
    probes = {}
    for info in infos:
        array = get_array(model, info)
        matrix = to_matrix(array.astype(np.float64), info.channel_axis)
        coded = fit(array, bits, Option("tensor"), Fitting(info.name, info.channel_axis)).decode()
        probes[info.name] = Probe(matrix, matrix - to_matrix(coded.astype(np.float64), info.channel_axis),
                                  hessians[info.name], partial(from_matrix, shape=array.shape,
                                                               channel_axis=info.channel_axis))
    return infos, hessians, probes


def output_sqnr(model, name, array, feeds):
    swapped = onnx.ModelProto()
    swapped.CopyFrom(model)
    for i, t in enumerate(swapped.graph.initializer):
        if t.name == name:
            swapped.graph.initializer[i].CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))
    ref, got = run(model, feeds)[0], run(swapped, feeds)[0]
    return 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2))


def test_a_pool_keeps_the_mean_error_and_averages_the_rest_away():
    model = pooled_classifier()
    data = data_for(model)
    _, _, probes = probes_for(model, data)
    gains = measure_gains(model, data, probes, samples=32)
    conv, fc = gains["conv.W"], gains["fc.W"]
    assert 10 * np.log10(conv.mean / conv.rest) > 10  # 144 positions averaged: the rest loses 10+ dB on the mean
    assert 0.5 < fc.rest < 2 and 0.5 < fc.mean < 2  # the last layer's error is the output error


def test_gains_predict_the_output_sqnr_of_other_codings_far_better_than_the_layer_sqnr():
    model = pooled_classifier()
    data = data_for(model)
    infos, hessians, probes = probes_for(model, data)
    gains = measure_gains(model, data, probes, samples=32)
    info = next(i for i in infos if i.name == "conv.W")
    array, h = get_array(model, info), hessians["conv.W"]
    feeds = {"x": data_for(model, n=32, seed=1).stacked["x"]}  # the samples the gains were measured on
    layer_err, output_err = [], []
    for option in (Option("tensor"), Option("channel"), Option("tensor", weighted=True, gptq=True),
                   Option("channel", weighted=True, gptq=True)):
        shared = fit(array, 3, option, Fitting("conv.W", 0, h), importance=h.importance())
        actual = output_sqnr(model, "conv.W", shared.decode(), feeds)
        layer_err.append(abs(measure(array, shared, h) - actual))
        output_err.append(abs(measure(array, shared, h, gains["conv.W"]) - actual))
    assert max(output_err) < 3.0, output_err
    assert np.mean(output_err) < np.mean(layer_err) / 2, (output_err, layer_err)


def test_weights_that_cannot_be_swapped_get_no_gain():
    model = pooled_classifier()
    data = data_for(model)
    _, _, probes = probes_for(model, data)
    as_constant = onnx.ModelProto()
    as_constant.CopyFrom(model)
    tensor = next(t for t in as_constant.graph.initializer if t.name == "conv.W")
    as_constant.graph.node.insert(0, helper.make_node("Constant", [], ["conv.W"], value=tensor))
    as_constant.graph.initializer.remove(tensor)
    gains = measure_gains(as_constant, data, probes, samples=8)
    assert "conv.W" not in gains and "fc.W" in gains


def candidate(label, size, db):
    return Candidate(Option(label), None, size, db)


def test_joint_choice_spends_bytes_where_they_buy_the_most_at_the_outputs():
    # layer a dominates the output noise (20 dB); b is already quiet (40 dB): the same 100 bytes buy
    # ~3 dB at the outputs on a and ~0 on b, so only a takes its better option
    a = Choice(candidate("tensor", 1000, 20.0), [candidate("tensor", 1000, 20.0), candidate("channel", 1100, 26.0)],
               "model output", 36.0, "")
    b = Choice(candidate("tensor", 1000, 40.0), [candidate("tensor", 1000, 40.0), candidate("channel", 1100, 46.0)],
               "model output", 36.0, "")
    picked = choose_jointly({"a": a, "b": b}, per_byte=0.01)
    assert picked["a"].option.kind == "channel" and picked["b"].option.kind == "tensor"
    # bytes priced high enough, neither upgrade pays
    picked = choose_jointly({"a": a, "b": b}, per_byte=0.1)
    assert picked["a"].option.kind == "tensor" and picked["b"].option.kind == "tensor"


def test_joint_choice_stops_at_the_model_target():
    # target 36 dB per layer over 2 layers: 33 dB at the outputs; 40 + 40 dB is 37 dB, so the cheap
    # options already meet it and nothing is bought beyond it, however cheap
    options = [candidate("tensor", 1000, 40.0), candidate("channel", 1001, 50.0)]
    layers = {n: Choice(options[1], list(options), "model output", 36.0, "") for n in "ab"}
    picked = choose_jointly(layers, per_byte=1e-6)
    assert all(c.option.kind == "tensor" for c in picked.values())


def test_output_sqnr_of_an_error_splits_into_its_two_parts():
    gains = OutputGains(rest=0.5, mean=4.0)
    # signal 100, error energy 2 of which 1 is the mean part: noise 0.5 * 1 + 4 * 1 = 4.5
    assert np.isclose(gains.output_sqnr_db(100.0, 2.0, 1.0), 10 * np.log10(100 / 4.5))
    assert gains.output_sqnr_db(100.0, 0.0, 0.0) == np.inf


def test_share_corrects_a_float_bias_for_its_weights_mean_output_error():
    from onnxcompress.passes.share import SharePass
    from tiny import run_pass

    model = pooled_classifier()
    data = data_for(model, n=64)
    ctx = run_pass(SharePass(bits_conv=3, bits_fc=3, bits_other=3, min_elements=0, refine=False), model, data)
    assert "conv.b" not in ctx.shared and "conv.W" in ctx.shared  # 16 floats stay float, and take the correction
    assert any(r.name == "conv.b" and r.action.startswith("bias corrected") for r in ctx.records)
    probe = onnx.ModelProto()  # the conv's output before the ReLU
    probe.CopyFrom(ctx.model)
    probe.graph.output.append(helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, None))
    original = onnx.ModelProto()
    original.CopyFrom(model)
    original.graph.output.append(helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, None))
    uncorrected = onnx.ModelProto()
    uncorrected.CopyFrom(probe)
    bias = next(i for i, t in enumerate(uncorrected.graph.initializer) if t.name == "conv.b")
    uncorrected.graph.initializer[bias].CopyFrom(next(t for t in model.graph.initializer if t.name == "conv.b"))
    feeds = {"x": data.stacked["x"]}
    ref = run(original, feeds)[1]
    mean_error = lambda m: np.abs((run(m, feeds)[1] - ref).mean(axis=(0, 2, 3))).max()  # noqa: E731
    assert mean_error(probe) < mean_error(uncorrected) / 5


def test_share_falls_back_to_layer_outputs_when_the_model_cannot_be_run_for_gains(monkeypatch):
    import onnxcompress.passes.share as share_module
    from onnxcompress.errors import ModelError
    from onnxcompress.passes.share import SharePass
    from tiny import run_pass

    def fail(*args, **kwargs):
        raise ModelError("onnxruntime cannot load the model: (test)")

    monkeypatch.setattr(share_module, "measure_gains", fail)
    model = pooled_classifier()
    ctx = run_pass(SharePass(bits_conv=4, bits_fc=4, min_elements=0, refine=False), model, data_for(model, n=16))
    assert "conv.W" in ctx.shared and any("could not run the model" in n for n in ctx.notes)
    record = next(r for r in ctx.records if r.name == "conv.W" and "granularity" in r.details)
    assert record.details["error_space"] == "output"


def test_joint_target_does_not_sink_with_depth():
    # 20 layers at 36 dB each add up to 23 dB at the outputs; the target stays at 27 dB (36 dB over
    # 8 layers), so cheap upgrades are bought until the outputs reach it, and not beyond
    options = [candidate("tensor", 1000, 36.0), candidate("channel", 1010, 46.0)]
    layers = {f"w{i}": Choice(options[0], list(options), "model output", 36.0, "") for i in range(20)}
    picked = choose_jointly(layers, per_byte=1e-4)
    upgraded = sum(c.option.kind == "channel" for c in picked.values())
    noise = sum(10 ** (-c.sqnr_db / 10) for c in picked.values())
    assert 0 < upgraded < 20 and -10 * np.log10(noise) >= 27.0 - 1e-9


def test_joint_choice_prefers_the_better_of_two_equal_sized_options_once_past_the_target():
    options = [candidate("tensor", 1000, 40.0), candidate("tensor/gptq", 1000, 44.0)]
    layers = {n: Choice(options[0], list(options), "model output", 36.0, "") for n in "ab"}
    picked = choose_jointly(layers, per_byte=0.01)
    assert all(c.sqnr_db == 44.0 for c in picked.values())


def test_a_probe_stops_once_its_relative_noise_is_known_to_the_tolerance():
    from onnxcompress.runtime import sensitivity
    m = sensitivity.MIN_GAIN_CHUNKS
    signals = np.ones((8, 2))
    steady = 0.01 * signals  # every chunk the same ratio: no standard error
    assert not sensitivity.settled(steady[:m - 1], signals[:m - 1]) and sensitivity.settled(steady[:m], signals[:m])
    wild = steady.copy()
    wild[1::2, 1] = 0.1  # the second output's chunks disagree by 10x
    assert not sensitivity.settled(wild[:m], signals[:m]) and not sensitivity.settled(wild, signals)
    silent = signals.copy()
    silent[:, 1] = 0.0  # an output without a signal does not count
    assert sensitivity.settled(wild[:m], silent[:m])
    assert np.isclose(sensitivity.relative_noise_of(wild[:4], signals[:4]), (0.02 + 0.2) / 4)
    late = signals.copy()
    late[:m] = 0.0  # no output has a signal in the first chunks: not known yet
    assert not sensitivity.settled(steady[:m], late[:m]) and sensitivity.relative_noise_of(steady[:m], late[:m]) == 0


def _runs(monkeypatch):
    """Per run of the session, None for an unswapped run, else (weight, digest of the probed values)."""
    import hashlib
    from onnxcompress.runtime.statistics import Runner
    runs = []
    run = Runner.run

    def counted(self, feed, swapped=None, **kwargs):
        runs.append(None if not swapped else
                    tuple((n, hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()) for n, v in swapped.items()))
        return run(self, feed, swapped, **kwargs)
    monkeypatch.setattr(Runner, "run", counted)
    return runs


def test_probes_on_samples_that_agree_stop_early_with_the_gains_of_all_samples(monkeypatch):
    """Eight chunks of the same four images: every chunk's relative noise is the same, so each probe stops at
    MIN_GAIN_CHUNKS chunks with the gains of all 32 samples, which probes that never stop find."""
    from collections import Counter
    from onnxcompress.runtime import sensitivity
    model = pooled_classifier()
    four = data_for(model, n=4).stacked["x"]
    data = Dataset(stacked={"x": np.concatenate([four] * 8)})
    _, _, probes = probes_for(model, data)
    runs = _runs(monkeypatch)
    early = measure_gains(model, data, probes, samples=32)
    per_probe = Counter(r for r in runs if r is not None)
    assert runs.count(None) == 32 // sensitivity.GAIN_CHUNK and len(per_probe) >= 2
    assert set(per_probe.values()) == {sensitivity.MIN_GAIN_CHUNKS}
    monkeypatch.setattr(sensitivity, "MIN_GAIN_CHUNKS", 32)
    runs.clear()
    full = measure_gains(model, data, probes, samples=32)
    assert set(Counter(r for r in runs if r is not None).values()) == {32 // sensitivity.GAIN_CHUNK}
    for name in full:
        assert np.isclose(full[name].rest, early[name].rest, rtol=1e-4)
        assert np.isclose(full[name].mean, early[name].mean, rtol=1e-4)


def test_probes_on_samples_that_disagree_run_them_all(monkeypatch):
    from collections import Counter
    from onnxcompress.runtime import sensitivity
    model = pooled_classifier()
    data = data_for(model, n=32)
    _, _, probes = probes_for(model, data)
    monkeypatch.setattr(sensitivity, "GAIN_TOLERANCE", 1e-9)
    runs = _runs(monkeypatch)
    measure_gains(model, data, probes, samples=32)
    assert set(Counter(r for r in runs if r is not None).values()) == {32 // sensitivity.GAIN_CHUNK}
