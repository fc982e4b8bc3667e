"""Weight-only int8 below the opsets of DequantizeLinear (10) and of its per-channel axis (13):
Cast + Mul, which every opset has and onnxruntime folds at load."""
import numpy as np
import onnx
import pytest

from onnxcompress.api import compress
from onnxcompress.passes.qdq import QdqConfig, QdqPass
from tiny import conv, gemm, op_types, random_feeds, run, run_pass


def _at(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    model.opset_import[0].version = opset
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    return model


def _error(original, candidate, feeds) -> float:
    ref, got = run(original, feeds)[0], run(candidate, feeds)[0]
    return float(np.sqrt(np.mean((ref - got) ** 2)) / np.sqrt(np.mean(ref ** 2)))


@pytest.mark.parametrize("opset", [9, 12])
def test_weight_only_int8_below_opset_13_is_cast_and_mul_per_channel(opset):
    model = _at(conv(c=8, m=16), opset)
    ctx = run_pass(QdqPass(QdqConfig(mode="weights", min_elements=64)), model)
    ops = op_types(ctx.model)
    assert "DequantizeLinear" not in ops and ops.count("Cast") == 1 and ops.count("Mul") == 1
    quantized = [t for t in ctx.model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(quantized) == 1 and list(quantized[0].dims) == [16, 8, 3, 3]
    scales = [t for t in ctx.model.graph.initializer if list(t.dims) == [16, 1, 1, 1]]
    assert scales, "one scale per output channel, broadcast along the channel axis"
    onnx.checker.check_model(ctx.model, full_check=True)
    assert _error(model, ctx.model, random_feeds(model)) < 0.01
    assert any("Cast + Mul" in note for note in ctx.notes)


def test_per_channel_cast_beats_the_per_tensor_fallback_on_uneven_channels():
    """Channels of very different magnitudes: per-tensor scales (the old fallback at opset < 13) lose the
    small channels; Cast + Mul keeps one scale per channel."""
    model = _at(gemm(k=64, n=32), 12)
    w = onnx.numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[:16] *= 100.0
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, "W"))
    feeds = random_feeds(model)
    cast = run_pass(QdqPass(QdqConfig(mode="weights", min_elements=64)), model).model
    tensor = run_pass(QdqPass(QdqConfig(mode="weights", min_elements=64, per_channel=False)), model).model
    assert "DequantizeLinear" in op_types(tensor)  # per-tensor DequantizeLinear exists at opset 12
    ref, a, b = run(model, feeds)[0], run(cast, feeds)[0], run(tensor, feeds)[0]
    small = slice(16, 32)
    assert np.abs(a[:, small] - ref[:, small]).max() < 0.2 * np.abs(b[:, small] - ref[:, small]).max()


def test_int8_weights_recipe_end_to_end_at_opset_9():
    model = _at(gemm(k=256, n=64), 9)
    compressed, report = compress(model, "int8-weights")
    assert "Cast" in op_types(compressed) and "DequantizeLinear" not in op_types(compressed)
    assert report.validation is not None
    assert compressed.ByteSize() < 0.4 * model.ByteSize()


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_activation_int8_below_opset_10_quantizes_the_weights_alone_and_says_why(mode):
    """No QuantizeLinear before opset 10: int8 still makes the weights int8 (Cast + Mul) instead of refusing the
    model, and the note names the opset and what to convert to (found by benchmarks/sweep.py --data on onnx's
    opset-9 test models, which int8 refused after calibrating)."""
    model = _at(gemm(k=256, n=64), 9)
    feeds = random_feeds(model)
    if mode == "static":  # the int8 recipe: calibrate, then qdq
        compressed, report = compress(model, "int8", [feeds] * 4)
        notes = report.notes
        calibrated = next(p for p in report.passes if p.name == "calibrate")
        assert calibrated.summary["tensors"] == 0 and "opset 9" in calibrated.summary["skipped"]  # no pass over data
    else:
        ctx = run_pass(QdqPass(QdqConfig(mode=mode, min_elements=64)), model)
        compressed, notes = ctx.model, ctx.notes
    assert "QuantizeLinear" not in op_types(compressed) and "Cast" in op_types(compressed)
    assert compressed.ByteSize() < 0.4 * model.ByteSize()
    assert any("opset 9 has no QuantizeLinear" in n and "version_converter" in n for n in notes)
    assert _error(model, compressed, feeds) < 0.01


def test_a_float16_weight_below_opset_13_gets_a_per_tensor_dequantize_not_an_invalid_axis():
    """Cast + Mul serves float32 weights; a float16 one keeps DequantizeLinear, whose axis needs opset 13."""
    model = gemm(k=64, n=32)
    w = onnx.numpy_helper.to_array(model.graph.initializer[0]).astype(np.float16)
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, "W"))
    cast = onnx.helper.make_node("Cast", ["W"], ["W32"], to=onnx.TensorProto.FLOAT)
    model.graph.node[0].input[1] = "W32"
    model.graph.node.insert(0, cast)
    model = _at(model, 12)
    ctx = run_pass(QdqPass(QdqConfig(mode="weights", min_elements=64)), model)
    onnx.checker.check_model(ctx.model, full_check=True)
    assert all(a.name != "axis" for n in ctx.model.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute)
    assert _error(model, ctx.model, random_feeds(model)) < 0.02
