"""Static int8 on a model whose activations are partly float16 (a half-precision export, or a Cast to float16 in
the middle): their QuantizeLinear took a float32 scale, a graph onnxruntime refuses ('Type tensor(float16) of
input parameter ... of operator QuantizeLinear is invalid'), shown to the user as their error (exit 2). Those
activations stay float; the float32 ones are quantized."""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnxcompress.api as oc
from onnxcompress.recipes import Recipe
from tiny import make_model, run, value, weights


def _half_in_the_middle(opset: int = 17) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gemm", ["x", "W1"], ["h"], transB=1, name="fc1"),
             helper.make_node("Cast", ["h"], ["h16"], to=TensorProto.FLOAT16),
             helper.make_node("Mul", ["h16", "h16"], ["sq16"], name="square"),
             helper.make_node("MatMul", ["sq16", "W16"], ["m16"], name="half_mm"),
             helper.make_node("Cast", ["m16"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("Gemm", ["m", "W2"], ["y"], transB=1, name="fc2")]
    inits = [numpy_helper.from_array(weights(rng, 32, 64), "W1"),
             numpy_helper.from_array(weights(rng, 32, 32).astype(np.float16), "W16"),
             numpy_helper.from_array(weights(rng, 10, 32), "W2")]
    return make_model(nodes, [value("x", ["N", 64])], [value("y", ["N", 10])], inits, opset=opset)


def test_int8_leaves_float16_activations_float():
    model = _half_in_the_middle()
    data = {"x": np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)}
    recipe = Recipe("t", [("calibrate", {"method": "mse"}), ("qdq", {"agreement": None})])  # no fallback: the plan
    out, _ = oc.compress(model, recipe, data)
    quantized = {n.input[0] for n in out.graph.node if n.op_type == "QuantizeLinear"}
    float16 = {"h16", "sq16", "m16"}
    assert quantized and not quantized & float16 and not any(q.startswith(tuple(float16)) for q in quantized)
    assert {n.name for n in out.graph.node if n.op_type == "Mul"} == {"square"}  # not quantized
    onnx.checker.check_model(out, full_check=True)
    ref, got = run(model, data)[0], run(out, data)[0]
    assert np.linalg.norm(got - ref) < 0.1 * np.linalg.norm(ref)
    _, report = oc.compress(model, "int8", data)  # the built-in recipe runs too (its guard may fall back)
    assert report.validation is not None
