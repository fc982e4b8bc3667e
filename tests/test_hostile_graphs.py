"""Hostile graph structure, session 12: how nodes, names and sparse tensors are laid out. A model onnxruntime
refuses is exit 2 with one line and nothing written; a model onnxruntime runs compresses.
"""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.api import compress_file
from test_hostile import _snapshot
from tiny import cli_error, matmul, random_feeds, run, value

COMMANDS = {"compress": lambda p: ["compress", str(p), "-o", str(p.parent / "out.onnx"), "--jobs", "1"],
            "inspect": lambda p: ["inspect", str(p)],
            "validate": lambda p: ["validate", str(p), str(p)]}


def _refused(capsys, tmp_path, model: onnx.ModelProto, expected: str) -> None:
    """Every command: one line naming the problem, exit 2, nothing written."""
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    before = _snapshot(tmp_path)
    for command in COMMANDS.values():
        assert expected in cli_error(capsys, command(path))
        assert _snapshot(tmp_path) == before


def _if_model(then_weight: onnx.TensorProto | None = None, sparse: onnx.SparseTensorProto | None = None,
              name: str = "") -> onnx.ModelProto:
    """y = If(c, x @ W, x @ W2): W in the then branch (an initializer, or a sparse one), W2 in the main graph
    (compressing it inserts nodes before the If)."""
    rng = np.random.default_rng(0)
    then = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["ty"])], "then", [], [value("ty", None)])
    if then_weight is not None:
        then.initializer.append(then_weight)
    if sparse is not None:
        then.sparse_initializer.append(sparse)
    other = helper.make_graph([helper.make_node("MatMul", ["x", "W2"], ["ey"])], "else", [], [value("ey", None)])
    model = matmul(k=64, n=32)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "W2"))
    model.graph.node[0].CopyFrom(helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other, name=name))
    model.graph.node.insert(0, helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c", TensorProto.BOOL, [], [True])))
    return model


def _sparse(indices: np.ndarray, values: np.ndarray | None = None, dims=(64, 32)) -> onnx.SparseTensorProto:
    values = np.linspace(-1, 1, len(indices), dtype=np.float32) if values is None else values
    return helper.make_sparse_tensor(numpy_helper.from_array(values, "W"), numpy_helper.from_array(indices, "W_idx"),
                                     list(dims))


@pytest.mark.parametrize("form", ["dense", "sparse", "sparse-coordinates"])
def test_a_weight_in_an_unnamed_branch_compresses(tmp_path, form):
    """The then branch's path was 'main/If_1.then_branch' (the If's position): compressing W2 inserted nodes
    before the If, and finding W's graph again failed (KeyError, exit 1). Now paths name the node's output."""
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((64, 32)).astype(np.float32)
    indices = np.sort(rng.choice(64 * 32, 500, replace=False))
    if form == "dense":
        model = _if_model(numpy_helper.from_array(weight, "W"))
    elif form == "sparse":
        model = _if_model(sparse=_sparse(indices))
    else:
        model = _if_model(sparse=_sparse(np.stack(np.unravel_index(indices, (64, 32)), 1)))
    path, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(model, path)
    report = compress_file(path, out, "share")
    assert report.validation is not None and out.stat().st_size < path.stat().st_size
    feeds = {k: v[:4] for k, v in random_feeds(model, n=4).items()}
    ref, got = run(model, feeds)[0], run(onnx.load(out), feeds)[0]
    assert np.linalg.norm(got - ref) < 0.1 * np.linalg.norm(ref)


def test_two_nodes_of_one_name_are_refused(tmp_path, capsys):
    """onnxruntime refuses two nodes of one name in a graph; inspect used to find the second If's branch under the
    first's path (KeyError, exit 1)."""
    model = _if_model(numpy_helper.from_array(np.ones((64, 32), np.float32), "W"), name="same")
    second = onnx.NodeProto()
    second.CopyFrom(model.graph.node[1])
    second.output[0] = "y2"
    model.graph.node.append(second)
    model.graph.node.append(helper.make_node("Add", ["y", "y2"], ["y3"]))
    model.graph.output[0].name = "y3"
    _refused(capsys, tmp_path, model, "two nodes of main are named 'same'")


@pytest.mark.parametrize("case", ["float-indices", "values-2d", "string-values"])
def test_sparse_initializers_onnxruntime_refuses_are_refused(tmp_path, capsys, case):
    """Float indices and 2-D values were read as if valid (onnxruntime refuses both); string values were an
    internal error (NotImplementedError, exit 1)."""
    indices = np.arange(0, 64 * 32, 4, dtype=np.int64)
    sparse = _sparse(indices)
    if case == "float-indices":
        sparse.indices.CopyFrom(numpy_helper.from_array(indices.astype(np.float32), "W_idx"))
        expected = "indices of element type 1"
    elif case == "values-2d":
        sparse.values.dims[:] = [len(indices) // 2, 2]
        expected = "in 2 dimensions"
    else:
        sparse.values.CopyFrom(helper.make_tensor("W", TensorProto.STRING, [len(indices)], [b"a"] * len(indices)))
        expected = "values of type STRING"
    model = matmul(k=64, n=32)
    del model.graph.initializer[:]
    model.graph.sparse_initializer.append(sparse)
    _refused(capsys, tmp_path, model, expected)


def _compresses_close(tmp_path, model: onnx.ModelProto, recipe: str = "share") -> onnx.ModelProto:
    """compress_file succeeds, the output passes onnx's full check and computes what the input computes (close)."""
    path, out = tmp_path / "m.onnx", tmp_path / f"out-{recipe}.onnx"
    onnx.save(model, path)
    compress_file(path, out, recipe)
    result = onnx.load(out)
    onnx.checker.check_model(result, full_check=True)
    feeds = {k: v[:4] for k, v in random_feeds(matmul(k=64, n=32), n=4).items()}
    for ref, got in zip(run(model, feeds), run(result, feeds)):
        assert np.linalg.norm(got - ref) <= 0.1 * np.linalg.norm(ref)
    return result


@pytest.mark.parametrize("recipe", ["share", "int8-dynamic"])
def test_a_weight_that_is_also_a_graph_output_is_returned_as_it_is(tmp_path, recipe):
    """int8-dynamic replaced the weight W, also a graph output, by its quantized form and DequantizeLinear: the output
    named a value no longer there, and onnxruntime's refusal was reported as the user's (exit 2)."""
    model = matmul(k=64, n=32)
    model.graph.output.append(value("W", [64, 32]))
    result = _compresses_close(tmp_path, model, recipe)
    assert numpy_helper.to_array(next(t for t in result.graph.initializer if t.name == "W")).tolist() == \
        numpy_helper.to_array(model.graph.initializer[0]).tolist()


@pytest.mark.parametrize("case", ["no-onnx-domain", "untyped-output", "training-info"])
def test_models_onnxruntime_runs_compress(tmp_path, case):
    """A model importing only another domain (onnxruntime reads the ONNX domain at its latest opset) and a graph
    output declaring no type were refused (exit 2); a model with training_info kept it in the output, its bindings
    naming weights no longer there (now left out, with a warning)."""
    model = matmul(k=64, n=32)
    if case == "no-onnx-domain":
        model.opset_import[0].CopyFrom(helper.make_opsetid("com.microsoft", 1))
    elif case == "untyped-output":
        model.graph.output[0].ClearField("type")
    else:
        info = model.training_info.add()
        info.algorithm.CopyFrom(helper.make_graph([helper.make_node("Neg", ["W"], ["W_new"])], "train", [],
                                                  [value("W_new", [64, 32])]))
        info.update_binding.add(key="W", value="W_new")
    result = _compresses_close(tmp_path, model)
    assert not result.training_info
    if case == "no-onnx-domain":
        from onnxcompress.runtime.sessions import max_runnable_opset
        assert ("", max_runnable_opset()) in [(o.domain, o.version) for o in result.opset_import]
    if case == "untyped-output":
        assert result.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT


def test_no_opset_at_all_is_refused(tmp_path, capsys):
    model = matmul(k=64, n=32)
    del model.opset_import[:]
    _refused(capsys, tmp_path, model, "opset_import")
