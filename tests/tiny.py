"""Tiny hand-built models for tests, and the checks every pass test makes.

Each builder returns a checked ModelProto at opset 21 with one float input `x` and output `y`.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 21


def make_model(nodes, inputs, outputs, initializers=(), opset: int = OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "tiny", list(inputs), list(outputs), initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


def value(name: str, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def weights(rng: np.random.Generator, *shape, scale: float = 0.1) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def gemm(k: int = 64, n: int = 32, *, trans_b: bool = True, seed: int = 0, opset: int = OPSET) -> onnx.ModelProto:
    """y = x @ W^T + b (transB=1, W stored [n, k]) or x @ W + b (transB=0, W stored [k, n])."""
    rng = np.random.default_rng(seed)
    w = weights(rng, *((n, k) if trans_b else (k, n)))
    b = weights(rng, n)
    node = helper.make_node("Gemm", ["x", "W", "b"], ["y"], transB=int(trans_b), name="fc")
    return make_model([node], [value("x", ["N", k])], [value("y", ["N", n])],
                      [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")], opset)


def matmul(k: int = 64, n: int = 32, *, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    return make_model([node], [value("x", ["N", k])], [value("y", ["N", n])],
                      [numpy_helper.from_array(weights(rng, k, n), "W")])


def conv(c: int = 8, m: int = 16, k: int = 3, *, group: int = 1, size: int = 10, seed: int = 0) -> onnx.ModelProto:
    """y = Conv(x, W[m, c/group, k, k], b), padding 1."""
    rng = np.random.default_rng(seed)
    w = weights(rng, m, c // group, k, k)
    b = weights(rng, m)
    node = helper.make_node("Conv", ["x", "W", "b"], ["y"], pads=[1, 1, 1, 1], group=group, name="conv")
    return make_model([node], [value("x", ["N", c, size, size])], [value("y", ["N", m, size, size])],
                      [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])


def conv_gemm(seed: int = 0) -> onnx.ModelProto:
    """Conv -> Relu -> Flatten -> Gemm(transB=1): a two-layer classifier on 1x8x8 inputs."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(weights(rng, 8, 1, 3, 3, scale=0.5), "conv.W"),
             numpy_helper.from_array(weights(rng, 8), "conv.b"),
             numpy_helper.from_array(weights(rng, 10, 8 * 8 * 8), "fc.W"),
             numpy_helper.from_array(weights(rng, 10), "fc.b")]
    nodes = [helper.make_node("Conv", ["x", "conv.W", "conv.b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], axis=1, name="flatten"),
             helper.make_node("Gemm", ["f", "fc.W", "fc.b"], ["y"], transB=1, name="fc")]
    return make_model(nodes, [value("x", ["N", 1, 8, 8])], [value("y", ["N", 10])], inits)


def mlp(layers: int = 3, width: int = 96, seed: int = 0) -> onnx.ModelProto:
    """A stack of square MatMul layers with Relu between, He-initialized, seeded."""
    rng = np.random.default_rng(seed)
    nodes, inits, current = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) * np.sqrt(2.0 / width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        out = "y" if i == layers - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [current, f"W{i}"], [out], name=f"mm{i}"))
        current = out
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"], name=f"relu{i}"))
            current = f"r{i}"
    return make_model(nodes, [value("x", ["N", width])], [value("y", ["N", width])], inits)


def random_feeds(model: onnx.ModelProto, n: int = 16, seed: int = 0, batch: int = 4) -> dict[str, np.ndarray]:
    """Stacked random inputs (axis 0 = samples) for the model's float inputs, dynamic dims -> `batch`."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in inp.type.tensor_type.shape.dim]
        dims[0] = n
        feeds[inp.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def assert_valid_and_close(original: onnx.ModelProto, candidate: onnx.ModelProto, feeds, *,
                           rtol: float = 0.0, atol: float = 1e-5) -> None:
    """Full checker on the candidate, then both run in onnxruntime with outputs within tolerance."""
    onnx.checker.check_model(candidate, full_check=True)
    for ref, got in zip(run(original, feeds), run(candidate, feeds)):
        np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol)


def run_pass(pass_, model: onnx.ModelProto, data=None):
    """Run one pass through a Context (requires, call, ensures) so a test sees what it recorded."""
    from onnxcompress.pipeline.manager import Context

    ctx = Context(original=model, model=onnx.ModelProto(), data=data, progress=False)
    ctx.model.CopyFrom(model)
    pass_.requires(ctx)
    result = pass_.call(ctx)
    pass_.ensures(ctx, result)
    return ctx


def decoded_reference(ctx) -> onnx.ModelProto:
    """The original with every shared weight overwritten by its SharedWeight.decode()."""
    from onnxcompress.graph.weights import find_weights, set_array

    reference = onnx.ModelProto()
    reference.CopyFrom(ctx.original)
    for info in find_weights(reference, min_elements=0):
        if info.name in ctx.shared:
            set_array(reference, info, ctx.shared[info.name].decode())
    return reference


def cli_error(capsys, argv) -> str:
    """The CLI fails with exit code 2 and exactly one line on stderr, no traceback; returns the line."""
    from onnxcompress.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("onnxcompress: error:"), err
    assert "Traceback" not in err
    return err
