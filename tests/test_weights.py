"""Weight discovery: every float weight wherever the exporter put it."""
import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.cli import main
from onnxcompress.graph.weights import Role, find_weights, get_array
from tiny import conv, gemm, make_model, matmul, value


def branchy_model() -> onnx.ModelProto:
    """x -> If(cond): then = MatMul(x, Constant W1); else = MatMul(x, Transpose(Constant W2)).

    Plus a main-graph initializer shared by two MatMuls, and a weight reaching its Gemm
    through Transpose -> Reshape.
    """
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((32, 32)).astype(np.float32)
    w2 = rng.standard_normal((32, 32)).astype(np.float32)
    then_graph = helper.make_graph(
        [helper.make_node("Constant", [], ["W1"], value=numpy_helper.from_array(w1, "W1")),
         helper.make_node("MatMul", ["x", "W1"], ["t_out"], name="then_mm")],
        "then", [], [value("t_out", ["N", 32])])
    else_graph = helper.make_graph(
        [helper.make_node("Constant", [], ["W2"], value=numpy_helper.from_array(w2, "W2")),
         helper.make_node("Transpose", ["W2"], ["W2t"], perm=[1, 0], name="else_t"),
         helper.make_node("MatMul", ["x", "W2t"], ["e_out"], name="else_mm")],
        "else", [], [value("e_out", ["N", 32])])
    shared = numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), "S")
    behind = numpy_helper.from_array(rng.standard_normal((32, 16, 2)).astype(np.float32), "B")  # -> (16,2,32)->(32,32)^T
    shape = numpy_helper.from_array(np.array([32, 32], dtype=np.int64), "shape")
    nodes = [
        helper.make_node("If", ["cond"], ["h"], then_branch=then_graph, else_branch=else_graph, name="branch"),
        helper.make_node("MatMul", ["h", "S"], ["a"], name="mm_a"),
        helper.make_node("MatMul", ["a", "S"], ["b"], name="mm_b"),
        helper.make_node("Transpose", ["B"], ["Bt"], perm=[1, 2, 0], name="bt"),
        helper.make_node("Reshape", ["Bt", "shape"], ["Br"], name="br"),
        helper.make_node("Gemm", ["b", "Br"], ["y"], transB=1, name="fc"),
    ]
    return make_model(nodes, [value("x", ["N", 32]), value("cond", [], TensorProto.BOOL)], [value("y", ["N", 32])],
                      [shared, behind, shape])


def test_finds_constants_in_if_branches_and_behind_chains():
    model = branchy_model()
    found = {w.name: w for w in find_weights(model, min_elements=16)}
    assert {"W1", "W2", "S", "B", "shape"} <= found.keys()
    assert found["W1"].location == "constant" and found["W1"].graph == "main/branch.then_branch"
    assert found["W2"].graph == "main/branch.else_branch"
    assert found["W2"].consumers[0].via == ("Transpose",)
    assert found["W2"].role is Role.MATMUL
    # W2 reaches MatMul as its B after a transpose: output channels are the stored axis 0
    assert found["W2"].channel_axis == 0
    assert [c.node for c in found["S"].consumers] == ["mm_a", "mm_b"]
    assert found["B"].consumers[0].via == ("Transpose", "Reshape") and found["B"].role is Role.GEMM
    assert found["B"].channel_axis is None  # Reshape regroups axes
    assert found["shape"].skip.startswith("not a float")
    assert np.array_equal(get_array(model, found["W1"]).shape, (32, 32))


def test_inspect_json_counts_every_float_weight(tmp_path, capsys):
    model = branchy_model()
    path = tmp_path / "branchy.onnx"
    onnx.save(model, path)
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["total_params"] == 32 * 32 * 4  # W1, W2, S, B
    names = {w["name"] for w in info["weights"]}
    assert {"W1", "W2", "S", "B"} <= names
    for w in info["weights"]:
        assert {"name", "shape", "dtype", "bytes", "role"} <= w.keys()
    assert info["file_bytes"] == path.stat().st_size


def test_roles_and_channel_axes():
    cases = [(gemm(trans_b=True), Role.GEMM, 0), (gemm(trans_b=False), Role.GEMM, 1),
             (matmul(), Role.MATMUL, 1), (conv(), Role.CONV, 0)]
    for model, role, axis in cases:
        w = next(w for w in find_weights(model) if w.name == "W")
        assert (w.role, w.channel_axis) == (role, axis)


def test_tiny_and_non_float_tensors_are_listed_but_left_alone():
    found = {w.name: w for w in find_weights(gemm(k=8, n=4))}
    assert found["W"].skip.startswith("tiny") and found["b"].skip.startswith("tiny")
    found = {w.name: w for w in find_weights(gemm(k=8, n=4), min_elements=1)}
    assert found["W"].skip is None
