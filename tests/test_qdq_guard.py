"""Static int8 that cannot break a model silently: the layer whose activations have an outlier
range stays float, the rest stays int8, and the result keeps the bound (tiny graphs, onnxruntime)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

import tiny
from onnxcompress.graph.data import Dataset, load_data
from onnxcompress.runtime.metrics import compare_models
from onnxcompress.passes.calibrate import CalibratePass
from onnxcompress.passes.qdq import QdqPass
from onnxcompress.passes.qdq_guard import single_qdq
from onnxcompress.pipeline.manager import PassManager

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def outlier_mlp(seed: int = 0, classes: int = 4) -> onnx.ModelProto:
    """x -> Gemm -> Relu (h0) -> Gemm -> Relu (h1) -> Gemm -> Relu (h2) -> Gemm -> y. One unit of h1
    sits near 1000 (a huge bias) and the next layer gives it a tiny weight, as outlier features in
    real models: an 8-bit range over h1 rounds every other unit of h1 to zero."""
    rng = np.random.default_rng(seed)
    sizes = [(16, 16), (32, 16), (32, 32), (classes, 32)]
    inits, nodes, x = [], [], "x"
    for k, (n_out, n_in) in enumerate(sizes):
        w = (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)
        b = (0.1 * rng.standard_normal(n_out)).astype(np.float32)
        if k == 1:
            b[0] = 1000.0
        if k == 2:
            w[:, 0] = 1e-5
        inits += [numpy_helper.from_array(w, f"W{k}"), numpy_helper.from_array(b, f"b{k}")]
        out = "y" if k == len(sizes) - 1 else f"g{k}"
        nodes.append(helper.make_node("Gemm", [x, f"W{k}", f"b{k}"], [out], transB=1, name=f"gemm{k}"))
        if out != "y":
            nodes.append(helper.make_node("Relu", [out], [f"h{k}"], name=f"relu{k}"))
            x = f"h{k}"
    return tiny.make_model(nodes, [tiny.value("x", ["N", 16])], [tiny.value("y", ["N", classes])], inits)


def int8(model, data, **qdq):
    return PassManager([CalibratePass(), QdqPass(**qdq)], validate="none").run(model, data)


def agreement(reference, candidate, data) -> float:
    return compare_models(reference, candidate, data).outputs[0].top1_agreement


def test_static_int8_breaks_the_outlier_model_without_the_guard():
    model = outlier_mlp()
    calib = Dataset(stacked=tiny.random_feeds(model, n=256, seed=1))
    test = Dataset(stacked=tiny.random_feeds(model, n=512, seed=2))
    broken, _ = int8(model, calib, agreement=None)
    assert agreement(model, broken, test) < 0.8


def test_guard_keeps_the_outlier_layer_float_and_the_rest_int8():
    model = outlier_mlp()
    calib = Dataset(stacked=tiny.random_feeds(model, n=256, seed=1))
    test = Dataset(stacked=tiny.random_feeds(model, n=512, seed=2))
    quantized, report = int8(model, calib)
    onnx.checker.check_model(quantized, full_check=True)
    made = {o: n for n in quantized.graph.node for o in n.output}
    assert made["h1"].op_type == "Relu"  # h1 is not passed through Q/DQ: its layers run in float
    assert made["h2"].op_type == "DequantizeLinear"  # the layers after it stay int8
    kept = next(n for n in report.notes if n.startswith("qdq: kept float to hold"))
    assert kept.index("h1 (") < kept.index(" dB at the outputs")  # the worst alone-quantized activation first
    assert agreement(model, quantized, calib) >= 0.99  # the bound holds where it is checked
    assert agreement(model, quantized, test) >= 0.98  # held out: 0.988 measured (near-ties of a random model)
    assert quantized.ByteSize() < model.ByteSize() / 1.9


def test_guarded_int8_beats_onnxruntime_quantize_dynamic_on_the_outlier_model(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = outlier_mlp()
    calib = Dataset(stacked=tiny.random_feeds(model, n=256, seed=1))
    test = Dataset(stacked=tiny.random_feeds(model, n=512, seed=2))
    onnx.save(model, tmp_path / "m.onnx")
    quantize_dynamic(tmp_path / "m.onnx", tmp_path / "dyn.onnx", weight_type=QuantType.QInt8)
    theirs = agreement(model, onnx.load(tmp_path / "dyn.onnx"), test)  # 0.12 measured: the outlier breaks it too
    ours = agreement(model, int8(model, calib)[0], test)
    assert ours >= theirs and ours >= 0.98


def test_h1_alone_quantized_is_what_breaks_the_outputs():
    model = outlier_mlp()
    calib = Dataset(stacked=tiny.random_feeds(model, n=64, seed=1))
    ref = compare_models(model, single_qdq(model, "h1", 1000 / 255, 0, "uint8"), calib).outputs[0].sqnr_db
    other = compare_models(model, single_qdq(model, "h0", 3 / 255, 0, "uint8"), calib).outputs[0].sqnr_db
    assert ref < 10 < 25 < other


def test_guard_falls_back_to_weight_only_when_no_activation_can_be_quantized():
    model = outlier_mlp()
    calib = Dataset(stacked=tiny.random_feeds(model, n=256, seed=1))
    quantized, report = int8(model, calib, agreement=1.01)  # an unreachable bound
    assert not any(n.op_type == "QuantizeLinear" for n in quantized.graph.node)
    assert any("weight-only int8 instead" in n for n in report.notes)
    assert sum(n.op_type == "DequantizeLinear" for n in quantized.graph.node) >= 3  # weights still int8


def test_int8_recipe_on_lenet5_holds_the_bound_end_to_end():
    from onnxcompress.api import compress

    model = onnx.load(str(SAMPLES / "lenet5.onnx"))
    calib = load_data(SAMPLES / "mnist_calib.npz")
    out, report = compress(model, "int8", calib, eval_data=SAMPLES / "mnist_test.npz")
    assert report.validation.outputs[0].top1_agreement >= 0.99
    assert report.output_bytes * 3.5 <= report.input_bytes


def scale_free_mlp(seed: int = 3, classes: int = 4) -> onnx.ModelProto:
    """x[1, 16] -> MatMul -> Relu -> MatMul -> Relu -> MatMul -> y, no biases: the decision does not
    depend on the input's scale, and the model takes one sample a call (batch fixed at 1)."""
    rng = np.random.default_rng(seed)
    sizes = [(16, 32), (32, 32), (32, classes)]
    inits = [numpy_helper.from_array((rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32), f"W{k}")
             for k, s in enumerate(sizes)]
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["m0"], name="mm0"), helper.make_node("Relu", ["m0"], ["h0"]),
             helper.make_node("MatMul", ["h0", "W1"], ["m1"], name="mm1"), helper.make_node("Relu", ["m1"], ["h1"]),
             helper.make_node("MatMul", ["h1", "W2"], ["y"], name="mm2")]
    return tiny.make_model(nodes, [tiny.value("x", [1, 16])], [tiny.value("y", [1, classes])], inits)


def scaled_inputs(n: int, seed: int) -> Dataset:
    """Samples whose scale spreads over 10^4 (as raw sensor or score inputs can): no fixed range fits all."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 1, 16)) * 10 ** rng.uniform(-2, 2, size=(n, 1, 1))
    return Dataset([{"x": row.astype(np.float32)} for row in x])


def test_guard_falls_back_to_dynamic_int8_where_no_fixed_range_fits(tmp_path):
    model = scale_free_mlp()
    calib, test = scaled_inputs(128, 1), scaled_inputs(256, 2)
    static, _ = int8(model, calib, agreement=None)
    assert agreement(model, static, test) < 0.9  # one fixed range per activation loses the small samples
    quantized, report = int8(model, calib)
    onnx.checker.check_model(quantized, full_check=True)
    ops = [n.op_type for n in quantized.graph.node]
    assert ops.count("MatMulInteger") == 3 and ops.count("DynamicQuantizeLinear") == 3
    assert any("dynamic int8 (ranges at run time) for 3 MatMul/Gemm" in n for n in report.notes)
    assert agreement(model, quantized, test) >= 0.98
    assert quantized.ByteSize() < model.ByteSize() / 1.9  # tiny model: node overhead; the weights are int8
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(quantized.SerializeToString(), options, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert "MatMul" not in fused and "MatMulInteger" not in fused  # onnxruntime runs one fused integer kernel


def test_a_chosen_sequence_task_bounds_whole_sequences_not_positions():
    from onnxcompress.runtime.metrics import Comparison, OutputMetrics
    from onnxcompress.passes.qdq_guard import fidelity

    # 99.5% of positions keep their top-1 but only 90% of the sentences keep every tag
    tagger = OutputMetrics("tags", 0.1, 0.01, 0.999, 40.0, top1_agreement=0.995, task="sequence (detected)",
                           agreement=0.90, budgeted=True)
    assert not fidelity(Comparison([tagger], 100), agreement=0.99, min_sqnr=20.0).holds
    assert "agreement 0.9000" in fidelity(Comparison([tagger], 100), agreement=0.99, min_sqnr=20.0).worst
    # a probability output the user named is bounded by its decisions, not by the SQNR of its values
    prob = OutputMetrics("p", 0.1, 0.3, 0.9, 10.0, task="probability:0.5 (chosen)", agreement=1.0, budgeted=True)
    assert fidelity(Comparison([prob], 100), agreement=0.99, min_sqnr=20.0, chosen=True).holds
    assert not fidelity(Comparison([prob], 100), agreement=0.99, min_sqnr=20.0).holds  # detected: the SQNR bound


def outlier_weight_mlp(seed: int = 5, classes: int = 4) -> onnx.ModelProto:
    """x -> MatMul W0 -> Relu -> MatMul W1 -> Relu (h1) -> MatMul W2 -> y, no biases. Unit 0 of h1 is
    always 0 (W1's column 0 is negative, h0 >= 0) and W2 gives it 1000 in every column: the entry
    never matters, but int8 per column then rounds every other entry of W2 to zero. W2 is 2.7% of
    the weights."""
    rng = np.random.default_rng(seed)
    w0 = rng.standard_normal((16, 128)) / 4
    w1 = rng.standard_normal((128, 128)) / np.sqrt(128)
    w1[:, 0] = -0.1 * np.abs(w1[:, 0])
    w2 = rng.standard_normal((128, classes)) / np.sqrt(128)
    w2[0, :] = 1000.0
    inits = [numpy_helper.from_array(w.astype(np.float32), f"W{k}") for k, w in enumerate((w0, w1, w2))]
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["m0"], name="mm0"), helper.make_node("Relu", ["m0"], ["h0"]),
             helper.make_node("MatMul", ["h0", "W1"], ["m1"], name="mm1"), helper.make_node("Relu", ["m1"], ["h1"]),
             helper.make_node("MatMul", ["h1", "W2"], ["y"], name="mm2")]
    return tiny.make_model(nodes, [tiny.value("x", ["N", 16])], [tiny.value("y", ["N", classes])], inits)


def test_guard_keeps_the_weight_that_breaks_int8_float_and_the_rest_int8():
    model = outlier_weight_mlp()
    calib = Dataset(stacked=tiny.random_feeds(model, n=256, seed=1))
    test = Dataset(stacked=tiny.random_feeds(model, n=512, seed=2))
    weights_only, _ = PassManager([QdqPass(mode="weights")], validate="none").run(model, calib)
    assert agreement(model, weights_only, test) < 0.8  # int8 W2 loses the task whatever the activations do
    quantized, report = int8(model, calib)
    onnx.checker.check_model(quantized, full_check=True)
    inits = {t.name: t for t in quantized.graph.initializer}
    assert inits["W2"].data_type == onnx.TensorProto.FLOAT  # kept float, read directly by its MatMul
    assert all(inits[n.input[0]].data_type == onnx.TensorProto.INT8 for n in quantized.graph.node
               if n.op_type == "DequantizeLinear" and n.output[0] in ("W0", "W1"))
    assert any("weight(s) kept float (W2)" in n for n in report.notes)
    assert any(r.name == "W2" and r.action.startswith("kept float: in int8 alone") for r in report.weights)
    assert agreement(model, quantized, test) >= 0.98
    assert quantized.ByteSize() < model.ByteSize() / 3.3  # 3.41x measured: W2 float and the tiny model's nodes


def test_numbers_are_bounded_by_their_sqnr_not_an_argmax_over_their_features():
    """Found on DeepFilterNet3's encoder (every output a Relu feature map or an Add, detected 'regression'): the
    guard bounded its 512-wide embedding by a top-1 over feature bins (0.75) and let its 6.7 dB SNR estimate
    through. A regression output is bounded by its SQNR, whatever its shape: a spike that stays the argmax under
    8 dB of noise misses the bound, two tied bins whose 'top-1' flips under 45 dB of noise hold it."""
    from onnxcompress.passes.qdq_guard import fidelity
    from onnxcompress.runtime.metrics import Comparison, compare_outputs
    from onnxcompress.runtime.tasks import resolve_kinds

    rng = np.random.default_rng(0)
    frames = 0.1 * rng.standard_normal((32, 64))
    frames[np.arange(32), rng.integers(0, 64, 32)] = 10.0
    flat = np.zeros((32, 64))
    flat[:, :2] = 1.0  # two bins tie in every row: a tiny error moves the argmax
    kinds = resolve_kinds(["frames"], [[frames]], {"frames": "Relu"})
    noisy = Comparison(compare_outputs(["frames"], [[frames]], [[frames + 0.5 * rng.standard_normal((32, 64))]],
                                       kinds=kinds), 32)
    assert noisy.outputs[0].top1_agreement == 1.0
    result = fidelity(noisy, agreement=0.99, min_sqnr=20.0)
    assert not result.holds and "SQNR" in result.worst
    kinds = resolve_kinds(["frames"], [[flat]], {"frames": "Relu"})
    close = flat + 1e-3 * rng.standard_normal(flat.shape)
    shuffled = Comparison(compare_outputs(["frames"], [[flat]], [[close]], kinds=kinds), 32)
    assert shuffled.outputs[0].top1_agreement < 0.9 and shuffled.outputs[0].sqnr_db > 40
    assert fidelity(shuffled, agreement=0.99, min_sqnr=20.0).holds
