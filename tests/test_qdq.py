"""QDQ insertion: integer kernels in onnxruntime, fusion boundaries, float fallbacks, weight-only int8/int4."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import tiny
from onnxcompress.api import compress
from onnxcompress.errors import MissingArtifactError
from onnxcompress.graph.data import Dataset, load_data
from onnxcompress.numerics.measures import sqnr_db_of as sqnr_db
from onnxcompress.passes.calibrate import CalibratePass
from onnxcompress.passes.qdq import QdqPass
from onnxcompress.pipeline.manager import Context, PassManager
from onnxcompress.recipes import Recipe

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def optimized_ops(model: onnx.ModelProto, folder: Path) -> list[str]:
    """Op types of the graph onnxruntime actually runs (after its fusions)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(folder / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(folder / "optimized.onnx")).graph.node]


def quantize(model, data, **qdq):
    # these tests are about the graph onnxruntime runs: the fidelity guard (which may keep layers of
    # these random tiny models float over one flipped near-tie) is off unless a test asks for it
    qdq.setdefault("agreement", None)
    passes = [CalibratePass(), QdqPass(**qdq)] if qdq.get("mode", "static") == "static" else [QdqPass(**qdq)]
    return PassManager(passes, validate="none").run(model, data)


def residual_net(seed: int = 0, batch="N") -> onnx.ModelProto:
    """Conv-Relu, a residual Add, Mul by a constant, Concat, AveragePool, GlobalAveragePool, MatMul head."""
    rng = np.random.default_rng(seed)
    w = lambda *s: numpy_helper.from_array(tiny.weights(rng, *s, scale=0.3), f"w{len(inits)}")  # noqa: E731
    inits = []
    for shape in [(8, 4, 3, 3), (8,), (8, 8, 3, 3), (8,), (8, 1, 1), (16, 10)]:
        inits.append(w(*shape))
    n = [t.name for t in inits]
    nodes = [
        helper.make_node("Conv", ["x", n[0], n[1]], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", n[2], n[3]], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Add", ["c2", "r1"], ["s"], name="residual"),
        helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
        helper.make_node("Mul", ["r2", n[4]], ["m"], name="scale"),
        helper.make_node("Concat", ["m", "r1"], ["cat"], axis=1, name="concat"),
        helper.make_node("AveragePool", ["cat"], ["ap"], kernel_shape=[2, 2], strides=[2, 2], name="avgpool"),
        helper.make_node("GlobalAveragePool", ["ap"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], axis=1, name="flatten"),
        helper.make_node("MatMul", ["f", n[5]], ["y"], name="head"),
    ]
    return tiny.make_model(nodes, [tiny.value("x", [batch, 4, 8, 8])], [tiny.value("y", [batch, 10])], inits)


def data_for(model, n=64, seed=0):
    return Dataset(stacked=tiny.random_feeds(model, n=n, seed=seed))


def output_sqnr(original, quantized, data) -> float:
    feeds = {k: v for k, v in data.stacked.items()}
    return sqnr_db(tiny.run(original, feeds)[0], tiny.run(quantized, feeds)[0])


def test_conv_relu_gemm_becomes_integer_kernels_with_the_q_after_the_relu(tmp_path):
    model = tiny.conv_gemm()
    data = data_for(model)
    quantized, report = quantize(model, data)
    onnx.checker.check_model(quantized, full_check=True)
    made = {o: n for n in quantized.graph.node for o in n.output}
    # the Relu reads the Conv directly; its own output is what gets quantized
    relu = next(n for n in quantized.graph.node if n.op_type == "Relu")
    assert made[relu.input[0]].op_type == "Conv" and relu.output[0].endswith("_float")
    # per-channel int8 conv weight, int32 bias
    inits = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    dq_types = {n.output[0]: inits[n.input[0]].dtype for n in quantized.graph.node
                if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    assert dq_types == {"conv.W": np.int8, "conv.b": np.int32, "fc.W": np.int8, "fc.b": np.int32}
    ops = optimized_ops(quantized, tmp_path)
    assert "QLinearConv" in ops and "QGemm" in ops and "Conv" not in ops
    assert output_sqnr(model, quantized, data) > 25
    assert report.layer_errors and report.layer_errors == sorted(report.layer_errors, key=lambda e: e.sqnr_db)


def test_residual_add_concat_pools_and_matmul_all_run_in_integers(tmp_path):
    model = residual_net()
    data = data_for(model)
    quantized, _ = quantize(model, data)
    onnx.checker.check_model(quantized, full_check=True)
    ops = optimized_ops(quantized, tmp_path)
    for op in ("QLinearConv", "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearAveragePool",
               "QLinearGlobalAveragePool"):
        assert op in ops, (op, ops)
    assert not {"Conv", "Add", "Mul", "Concat"} & set(ops)
    assert output_sqnr(model, quantized, data) > 20


def test_dynamic_batch_axis_quantizes_and_runs_at_any_batch():
    model = residual_net(batch="batch")
    quantized, _ = quantize(model, data_for(model, n=50))
    for batch in (1, 3, 17):
        x = np.random.default_rng(batch).standard_normal((batch, 4, 8, 8)).astype(np.float32)
        (y,) = tiny.run(quantized, {"x": x})
        assert y.shape == (batch, 10)
        assert sqnr_db(tiny.run(model, {"x": x})[0], y) > 20


def test_op_without_integer_kernel_stays_float_with_a_reason(tmp_path):
    model = tiny.conv_gemm()
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    relu.op_type = "Softsign"  # onnxruntime has no quantized Softsign
    data = data_for(model)
    quantized, report = quantize(model, data)
    ops = optimized_ops(quantized, tmp_path)
    assert "Softsign" in ops and "QLinearConv" in ops and "QGemm" in ops
    assert any("no integer kernel for Softsign" in note and "relu" in note for note in report.notes)
    assert output_sqnr(model, quantized, data) > 25


def test_excluded_node_keeps_float_weights(tmp_path):
    model = tiny.conv_gemm()
    quantized, report = quantize(model, data_for(model), exclude=["fc"])
    gemm = next(n for n in quantized.graph.node if n.op_type == "Gemm")
    assert "fc.W" in {t.name for t in quantized.graph.initializer}
    assert gemm.input[1] == "fc.W"
    assert any("excluded by the user" in n for n in report.notes)
    assert "QLinearConv" in optimized_ops(quantized, tmp_path)


def test_conv_transpose_quantizes_and_runs():
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(tiny.weights(rng, 4, 6, 3, 3), "W"), numpy_helper.from_array(tiny.weights(rng, 6), "b")]
    node = helper.make_node("ConvTranspose", ["x", "W", "b"], ["y"], strides=[2, 2], name="up")
    model = tiny.make_model([node], [tiny.value("x", ["N", 4, 5, 5])], [tiny.value("y", ["N", 6, 11, 11])], inits)
    data = data_for(model)
    quantized, _ = quantize(model, data)
    dq = next(n for n in quantized.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == "W")
    assert next(a.i for a in dq.attribute if a.name == "axis") == 1  # output channels of ConvTranspose
    assert output_sqnr(model, quantized, data) > 25


def test_weight_only_int8_is_smaller_and_close():
    model = tiny.conv_gemm()
    quantized, report = quantize(model, None, mode="weights")
    assert quantized.ByteSize() < 0.4 * model.ByteSize()
    assert sorted(r.name for r in report.weights) == ["conv.W", "fc.W"] or any(r.name == "fc.W" for r in report.weights)
    assert "QuantizeLinear" not in tiny.op_types(quantized)
    data = data_for(model)
    assert output_sqnr(model, quantized, data) > 30


def test_gather_embedding_is_weight_only_int8():
    rng = np.random.default_rng(5)
    table = numpy_helper.from_array(tiny.weights(rng, 100, 16), "emb")
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["y"], name="lookup")]
    model = tiny.make_model(nodes, [tiny.value("ids", ["N", 7], onnx.TensorProto.INT64)],
                            [tiny.value("y", ["N", 7, 16])], [table])
    quantized, _ = quantize(model, None, mode="weights")
    ids = rng.integers(0, 100, (3, 7))
    assert sqnr_db(tiny.run(model, {"ids": ids})[0], tiny.run(quantized, {"ids": ids})[0]) > 35


@pytest.mark.parametrize("builder", [lambda: tiny.matmul(k=96, n=32), lambda: tiny.gemm(k=100, n=24, trans_b=True),
                                     lambda: tiny.gemm(k=64, n=24, trans_b=False)])
def test_int4_blocked_weights_fuse_into_matmulnbits(builder, tmp_path):
    model = builder()
    quantized, report = quantize(model, None, mode="weights", int4_matmul=True, block_size=32)
    onnx.checker.check_model(quantized, full_check=True)
    dq = next(n for n in quantized.graph.node if n.op_type == "DequantizeLinear")
    weight = next(t for t in quantized.graph.initializer if t.name == dq.input[0])
    assert weight.data_type == onnx.TensorProto.INT4 and len(weight.raw_data) == (math.prod(weight.dims) + 1) // 2
    assert "MatMulNBits" in optimized_ops(quantized, tmp_path)
    data = data_for(model)
    assert output_sqnr(model, quantized, data) > 15


def test_int4_before_opset_21_falls_back_to_int8_with_a_note():
    model = tiny.gemm(opset=17)
    quantized, report = quantize(model, None, mode="weights", int4_matmul=True)
    assert quantized.opset_import[0].version == 17
    assert any("int4" in n and "opset" in n for n in report.notes)
    dq = next(n for n in quantized.graph.node if n.op_type == "DequantizeLinear")
    assert next(t for t in quantized.graph.initializer if t.name == dq.input[0]).data_type == onnx.TensorProto.INT8


def test_old_opset_gets_per_tensor_weights_and_never_a_new_opset():
    model = tiny.conv_gemm()
    model.opset_import[0].version = 11
    onnx.checker.check_model(model, full_check=True)
    quantized, report = quantize(model, data_for(model))
    assert quantized.opset_import[0].version == 11
    assert any("per-tensor" in n for n in report.notes)
    assert not any(a.name == "axis" for n in quantized.graph.node if n.op_type == "DequantizeLinear"
                   for a in n.attribute if n.input[0].startswith("conv.W"))
    tiny.run(quantized, data_for(model).stacked)


def test_static_mode_requires_calibration():
    # a user's pass list without the producer of the ranges: their mistake (exit 2), named before any pass runs
    with pytest.raises(MissingArtifactError, match="needs activation ranges, which pass 'calibrate' makes"):
        PassManager([QdqPass()], validate="none").run(tiny.conv_gemm(), None)
    with pytest.raises(MissingArtifactError, match="'calibrate'"):  # the pass checks it when called on its own too
        QdqPass().requires(Context(original=tiny.conv_gemm(), model=tiny.conv_gemm()))


def test_lenet5_int8_recipe_keeps_accuracy_and_runs_integer_kernels(tmp_path):
    test = load_data(SAMPLES / "mnist_test.npz")
    quantized, report = compress(SAMPLES / "lenet5.onnx", "int8", SAMPLES / "mnist_calib.npz", eval_data=test)
    drop = report.validation.accuracy_drop
    assert drop is not None and drop <= 0.3
    ops = optimized_ops(quantized, tmp_path)
    assert ops.count("QLinearConv") == 2 and ops.count("QGemm") == 2
    d = report.as_dict()
    assert d["layer_errors"] and all(e["sqnr_db"] > 20 for e in d["layer_errors"])
    # no worse than onnxruntime's own quantizer fed the same data
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    calib = load_data(SAMPLES / "mnist_calib.npz").stacked["input"]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": calib[i:i + 64]} for i in range(0, len(calib), 64)])

        def get_next(self):
            return next(self.batches, None)

    theirs = tmp_path / "ort.onnx"
    quantize_static(str(SAMPLES / "lenet5.onnx"), str(theirs), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)

    def top1(model):
        session = ort.InferenceSession(model if isinstance(model, str) else model.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        return float(np.mean(session.run(None, {"input": test.stacked["input"]})[0].argmax(-1) == test.labels))

    assert top1(quantized) >= top1(str(theirs))


def test_static_embedding_then_matmul_quantizes_the_table_weight_only(tmp_path):
    rng = np.random.default_rng(6)
    inits = [numpy_helper.from_array(tiny.weights(rng, 50, 16), "emb"), numpy_helper.from_array(tiny.weights(rng, 16, 8), "W")]
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["e"], name="lookup"),
             helper.make_node("MatMul", ["e", "W"], ["y"], name="proj")]
    model = tiny.make_model(nodes, [tiny.value("ids", ["N", 5], onnx.TensorProto.INT64)],
                            [tiny.value("y", ["N", 5, 8])], inits)
    data = Dataset(stacked={"ids": rng.integers(0, 50, (40, 5))})
    quantized, _ = quantize(model, data)
    made = {o: n for n in quantized.graph.node for o in n.output}
    assert made["W"].op_type == "DequantizeLinear"
    inits = {t.name: t for t in quantized.graph.initializer}
    lookups = [n for n in quantized.graph.node if n.op_type == "Gather" and n.input[1] == "ids"
               and list(inits[n.input[0]].dims) == [50, 16]]
    # the table is int8, gathered before it is dequantized (only the rows read, not all 50 per call)
    assert [inits[n.input[0]].data_type for n in lookups] == [onnx.TensorProto.INT8]
    assert "MatMulIntegerToFloat" in optimized_ops(quantized, tmp_path)
    ids = data.stacked["ids"]
    assert sqnr_db(tiny.run(model, {"ids": ids})[0], tiny.run(quantized, {"ids": ids})[0]) > 25


@pytest.mark.parametrize("options", [{"activation_type": "int8"}, {"per_channel": False},
                                     {"activation_type": "int8", "symmetric_activations": True}])
def test_activation_and_weight_variants_run_integer_convolutions(options, tmp_path):
    model = tiny.conv_gemm()
    data = data_for(model)
    calib = CalibratePass(symmetric=options.get("symmetric_activations", False),
                          activation_type=options.get("activation_type", "uint8"))
    quantized, _ = PassManager([calib, QdqPass(**options)], validate="none", progress=False).run(model, data)
    ops = optimized_ops(quantized, tmp_path)
    assert "QLinearConv" in ops and "QGemm" in ops
    if options.get("symmetric_activations"):  # zero point is not the type minimum: the Relu stays, with a Q/DQ before it
        assert "Relu" in ops
    assert output_sqnr(model, quantized, data) > 30


def test_batch_norm_after_conv_is_folded_and_runs_as_one_integer_conv(tmp_path):
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array(tiny.weights(rng, 8, 3, 3, 3, scale=0.5), "W"),
             numpy_helper.from_array((rng.random(8) * 2 + 0.5).astype(np.float32), "gamma"),
             numpy_helper.from_array(tiny.weights(rng, 8), "beta"),
             numpy_helper.from_array(tiny.weights(rng, 8), "mean"),
             numpy_helper.from_array((rng.random(8) + 0.1).astype(np.float32), "var")]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["b"], name="bn"),
             helper.make_node("Relu", ["b"], ["y"], name="relu")]
    model = tiny.make_model(nodes, [tiny.value("x", ["N", 3, 6, 6])], [tiny.value("y", ["N", 8, 6, 6])], inits)
    data = data_for(model)
    quantized, report = quantize(model, data)
    assert "BatchNormalization" not in tiny.op_types(quantized)
    assert any("folded 1 BatchNormalization" in n for n in report.notes)
    ops = optimized_ops(quantized, tmp_path)
    assert "QLinearConv" in ops and "BatchNormalization" not in ops
    assert output_sqnr(model, quantized, data) > 30


def test_per_layer_errors_are_measured_on_the_evaluation_data_when_given():
    model = residual_net()
    calib, held_out = data_for(model, seed=0), data_for(model, n=32, seed=7)
    _, on_calib = PassManager([CalibratePass(), QdqPass()], validate="none").run(model, calib)
    _, on_eval = PassManager([CalibratePass(), QdqPass()], validate="none").run(model, calib, held_out)
    assert on_calib.passes[1].summary["layer_errors_data"] == "calibration"
    assert on_eval.passes[1].summary["layer_errors_data"] == "evaluation"
    by_tensor = {e.tensor: e.sqnr_db for e in on_calib.layer_errors}
    assert {e.tensor for e in on_eval.layer_errors} == set(by_tensor)
    assert any(e.sqnr_db != by_tensor[e.tensor] for e in on_eval.layer_errors)  # other samples, other numbers


def test_dynamic_mode_needs_no_data_and_runs_integer_matmuls(tmp_path):
    """int8-dynamic: the Gemm's activations quantized at run time (DynamicQuantizeLinear -> MatMulInteger, fused
    by onnxruntime), the conv weight weight-only int8; no calibration, no data, close to the original."""
    model = tiny.conv_gemm()
    quantized, report = quantize(model, None, mode="dynamic", min_elements=16)  # the 72-entry conv weight too
    ops = tiny.op_types(quantized)
    assert "DynamicQuantizeLinear" in ops and "MatMulInteger" in ops and "QuantizeLinear" not in ops
    assert {r.name: r.action for r in report.weights}["fc.W"].startswith("int8 dynamic")
    assert "conv.W" in {r.name for r in report.weights}  # weight-only int8
    assert quantized.ByteSize() < 0.4 * model.ByteSize()
    onnx.checker.check_model(quantized, full_check=True)
    assert output_sqnr(model, quantized, data_for(model)) > 25
    ran = optimized_ops(quantized, tmp_path)  # onnxruntime runs the Gemm on an integer kernel
    assert any(op in ran for op in ("DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger")), ran


def test_dynamic_mode_below_opset_11_is_weight_only_with_a_note():
    model = tiny.conv_gemm()
    model.opset_import[0].version = 10
    quantized, report = quantize(model, None, mode="dynamic")
    assert "DynamicQuantizeLinear" not in tiny.op_types(quantized)
    assert any("DynamicQuantizeLinear" in n and "opset 10" in n for n in report.notes)
    assert quantized.opset_import[0].version == 10
    tiny.run(quantized, data_for(model).stacked)


def test_int8_without_data_runs_the_recipe_that_needs_none_and_says_so():
    """A user who runs `int8` with no data gets dynamic int8 (the same model int8-dynamic gives) and a note saying
    so and what data would buy, not a refusal; a recipe file of the same passes still needs its data."""
    from onnxcompress.errors import DataError

    model = tiny.conv_gemm()
    quantized, report = compress(model, "int8")
    dynamic, _ = compress(model, "int8-dynamic")
    assert report.recipe == "int8-dynamic" and quantized.SerializeToString() == dynamic.SerializeToString()
    assert any(n.startswith("no --data: 'int8' ran as 'int8-dynamic'") and "static int8" in n for n in report.notes)
    static, report = compress(model, "int8", data_for(model))
    assert report.recipe == "int8" and not any(n.startswith("no --data") for n in report.notes)
    with pytest.raises(DataError, match="needs calibration data"):
        compress(model, Recipe("mine", [("calibrate", {}), ("qdq", {})]))


def test_lenet300_int8_dynamic_recipe_keeps_the_test_accuracy():
    model = onnx.load(str(SAMPLES / "lenet300.onnx"))
    test = load_data(str(SAMPLES / "mnist_test.npz"))
    quantized, report = compress(model, "int8-dynamic", eval_data=test)
    assert report.validation.worst_agreement() >= 0.99 and report.validation.accuracy_drop <= 0.5
    assert report.ratio > 3.5
    assert "MatMulInteger" in tiny.op_types(quantized)
