"""Model-local functions (model.functions), session 12: inlined at load as onnxruntime inlines them, so the
weights inside their bodies are compressed; an expansion that would not fit (nested calls, recursion) is refused
with one line before anything is expanded.
"""
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.api import compress, compress_file
from onnxcompress.errors import ModelError
from onnxcompress.graph import functions
from onnxcompress.graph.model import checked_model, load_model
from test_hostile import _snapshot
from tiny import cli_error, random_feeds, run, value

OPSET = [helper.make_opsetid("", 21), helper.make_opsetid("local", 1)]


def _weight(rows: int, cols: int, seed: int = 0) -> onnx.TensorProto:
    rng = np.random.default_rng(seed)
    return numpy_helper.from_array((rng.standard_normal((rows, cols)) * 0.1).astype(np.float32), "FW")


def _linear(name: str = "Linear", k: int = 256, n: int = 64, opset: int = 21) -> onnx.FunctionProto:
    """b = tanh(a @ W), W a Constant of the function's body."""
    return helper.make_function("local", name, ["a"], ["b"],
                                [helper.make_node("Constant", [], ["w"], value=_weight(k, n)),
                                 helper.make_node("MatMul", ["a", "w"], ["c"]), helper.make_node("Tanh", ["c"], ["b"])],
                                opset_imports=[helper.make_opsetid("", opset)])


def _model(nodes, fns, k: int = 256, n: int = 64, opsets=OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [value("x", ["N", k])], [value("y", ["N", n])])
    return helper.make_model(graph, opset_imports=opsets, ir_version=10, functions=fns)


def _calls(count: int) -> onnx.ModelProto:
    """x -> Linear -> ... -> Linear -> y: one 64x64 weight in a function called `count` times."""
    names = ["x"] + [f"h{i}" for i in range(count - 1)] + ["y"]
    nodes = [helper.make_node("Linear", [a], [b], domain="local") for a, b in zip(names, names[1:])]
    return _model(nodes, [_linear(k=64, n=64)], k=64, n=64)


def _doubling(depth: int) -> onnx.ModelProto:
    """F0 calls F1 twice, F1 calls F2 twice, ..., F{depth} is one Relu: 2**depth nodes from a tiny file."""
    fns = [helper.make_function("local", f"F{depth}", ["x"], ["y"], [helper.make_node("Relu", ["x"], ["y"])],
                                [helper.make_opsetid("", 21)])]
    for i in range(depth - 1, -1, -1):
        body = [helper.make_node(f"F{i + 1}", ["x"], ["t"], domain="local"),
                helper.make_node(f"F{i + 1}", ["t"], ["y"], domain="local")]
        fns.append(helper.make_function("local", f"F{i}", ["x"], ["y"], body, OPSET))
    return _model([helper.make_node("F0", ["x"], ["y"], domain="local")], fns, k=8, n=8)


def _same_outputs(original: onnx.ModelProto, candidate: onnx.ModelProto, atol: float = 1e-6) -> None:
    feeds = {k: v[:4] for k, v in random_feeds(original, n=4).items()}
    for ref, got in zip(run(original, feeds), run(candidate, feeds)):
        np.testing.assert_allclose(got, ref, atol=atol)


def _close(original: onnx.ModelProto, candidate: onnx.ModelProto, rel: float = 0.1) -> None:
    """A compressed model's outputs within `rel` relative L2 error of the original's, in onnxruntime."""
    feeds = {k: v[:4] for k, v in random_feeds(original, n=4).items()}
    for ref, got in zip(run(original, feeds), run(candidate, feeds)):
        assert np.linalg.norm(got - ref) <= rel * np.linalg.norm(ref)


def test_a_weight_inside_a_function_is_compressed(tmp_path):
    """The output was as large as the input (the function's Constant copied unchanged); now smaller, its outputs
    close to the original's in onnxruntime."""
    model = _model([helper.make_node("Linear", ["x"], ["y"], domain="local")], [_linear()])
    path, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(model, path)
    report = compress_file(path, out, "share")
    assert out.stat().st_size < path.stat().st_size / 3
    result = onnx.load(out)
    assert not result.functions and "Linear" not in [n.op_type for n in result.graph.node]
    onnx.checker.check_model(result, full_check=True)
    assert report.validation is not None
    _close(model, result)


def test_a_function_called_many_times_stores_its_weight_once(tmp_path):
    """Inlining copies a function's Constant into every call: four calls made four weights, and int8-dynamic's
    output was larger than the input. The copies read one initializer now."""
    model = _calls(4)
    loaded = checked_model(model)
    assert len(loaded.graph.initializer) == 1
    assert sorted(n.op_type for n in loaded.graph.node).count("Identity") == 3
    _same_outputs(model, loaded)
    path, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(model, path)
    compress_file(path, out, "int8-dynamic")
    assert out.stat().st_size < path.stat().st_size / 2.5
    _close(model, onnx.load(out))


def _inlined_and_shared(original: onnx.ModelProto) -> None:
    """Loading inlines every function with the same outputs, and `share` on it validates and stays close."""
    loaded = checked_model(original)
    assert not loaded.functions
    _same_outputs(original, loaded)
    result, report = compress(original, "share")
    assert report.validation is not None and not result.functions
    _close(original, result)


def test_attributes_the_function_refers_to_keep_their_values():
    """A body attribute naming the caller's (ref_attr_name): the caller's value, else the function's default, else
    the op's own default, as onnxruntime computes it."""
    def model(caller: dict, default: bool) -> onnx.ModelProto:
        alpha = onnx.AttributeProto(name="alpha", ref_attr_name="slope", type=onnx.AttributeProto.FLOAT)
        leaky = helper.make_node("LeakyRelu", ["c"], ["b"])
        leaky.attribute.append(alpha)
        fn = helper.make_function("local", "Act", ["a"], ["b"],
                                  [helper.make_node("Constant", [], ["w"], value=_weight(64, 64)),
                                   helper.make_node("MatMul", ["a", "w"], ["c"]), leaky],
                                  [helper.make_opsetid("", 21)], attributes=[] if default else ["slope"])
        if default:
            fn.attribute_proto.append(helper.make_attribute("slope", 0.3))
        return _model([helper.make_node("Act", ["x"], ["y"], domain="local", **caller)], [fn], k=64, n=64)

    for caller in ({"slope": 0.7}, {}):
        for default in (True, False):
            _inlined_and_shared(model(caller, default))


def test_inlined_names_do_not_collide_with_the_graphs():
    """The graph already has values named as the function's (w, t, c): the inliner renames the function's."""
    body = [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(np.full((64, 64), 0.01, np.float32))),
            helper.make_node("MatMul", ["a", "w"], ["c"]), helper.make_node("Relu", ["c"], ["b"])]
    fn = helper.make_function("local", "F", ["a"], ["b"], body, [helper.make_opsetid("", 21)])
    nodes = [helper.make_node("Neg", ["x"], ["w"]), helper.make_node("F", ["w"], ["c"], domain="local"),
             helper.make_node("Add", ["c", "w"], ["y"])]
    original = _model(nodes, [fn], k=64, n=64)
    _same_outputs(original, checked_model(original))


def test_functions_in_subgraphs_and_nested_calls_are_inlined():
    """A call inside an If branch, a function calling another, one calling a domain it imports and the model does
    not: outputs as onnxruntime computes them, the domain imported by the model now."""
    outer = helper.make_function("local", "Outer", ["a"], ["b"],
                                 [helper.make_node("Inner", ["a"], ["t"], domain="local"),
                                  helper.make_node("Gelu", ["t"], ["b"], domain="com.microsoft")],
                                 OPSET + [helper.make_opsetid("com.microsoft", 1)])
    then = helper.make_graph([helper.make_node("Outer", ["x"], ["ty"], domain="local")], "then", [], [value("ty", None)])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["ey"])], "else", [], [value("ey", None)])
    nodes = [helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c", TensorProto.BOOL, [], [True])),
             helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)]
    original = _model(nodes, [outer, _linear("Inner", k=64, n=64)], k=64, n=64)
    loaded = checked_model(original)
    assert not loaded.functions and ("com.microsoft", 1) in [(o.domain, o.version) for o in loaded.opset_import]
    _same_outputs(original, loaded)
    result, _ = compress(original, "share")
    assert sum(t.ByteSize() for t in result.graph.initializer) < 64 * 64 * 4 / 3  # the branch's weight shared


@pytest.mark.parametrize("opset", [13, 20])
def test_a_function_at_another_opset_is_inlined(opset):
    """A function importing opset 13 in an opset-21 model (Constant and Tanh are defined differently since: its
    ops converted by onnx's version converter), or opset 20 and no Constant (MatMul and Tanh defined the same:
    inlined as it is); the weight a Constant of the body, or an initializer the graph passes."""
    if opset == 13:
        fn, inputs, weights = _linear(k=64, n=64, opset=13), ["x"], []
    else:
        fn = helper.make_function("local", "Linear", ["a", "w"], ["b"],
                                  [helper.make_node("MatMul", ["a", "w"], ["c"]), helper.make_node("Tanh", ["c"], ["b"])],
                                  [helper.make_opsetid("", 20)])
        inputs, weights = ["x", "FW"], [_weight(64, 64)]
    original = _model([helper.make_node("Linear", inputs, ["y"], domain="local")], [fn], k=64, n=64)
    original.graph.initializer.extend(weights)
    _inlined_and_shared(original)


def test_a_function_named_as_a_standard_op_is_not_called():
    """onnxruntime runs its own Relu for a local function ('', 'Relu'): inlining it would change the outputs."""
    fn = helper.make_function("", "Relu", ["a"], ["b"], [helper.make_node("Neg", ["a"], ["b"])],
                              [helper.make_opsetid("", 21)])
    original = _model([helper.make_node("Relu", ["x"], ["y"])], [fn], k=8, n=8, opsets=OPSET[:1])
    loaded = checked_model(original)
    assert [n.op_type for n in loaded.graph.node] == ["Relu"]
    _same_outputs(original, loaded)


@pytest.mark.parametrize("case", ["doubling", "doubling-inside-kept", "many-calls"])
def test_an_expansion_too_large_is_refused_before_expanding(tmp_path, capsys, case):
    """Thirty nested double calls are 2**30 nodes: check_model's shape inference ran for more than ten minutes
    and ignored SIGTERM. Now one line, at once, nothing written; so for the body of a function kept as an op
    (the inliner expands calls inside it too) and for 10**4 calls of a 200-node function."""
    if case == "doubling":
        model = _doubling(30)
    elif case == "doubling-inside-kept":
        model = _doubling(30)
        model.functions.append(helper.make_function("", "Relu", ["x"], ["y"], [
            helper.make_node("F0", ["x"], ["y"], domain="local")], OPSET))
        model.graph.node[0].CopyFrom(helper.make_node("Relu", ["x"], ["y"]))
        model.functions[0].node[0].op_type = "Abs"  # no cycle through the kept Relu
    else:
        body = [helper.make_node("Relu", ["x" if i == 0 else f"t{i}"], [f"t{i + 1}" if i < 199 else "y"]) for i in range(200)]
        fn = helper.make_function("local", "F", ["x"], ["y"], body, OPSET[:1])
        names = ["x"] + [f"h{i}" for i in range(9_999)] + ["y"]
        model = _model([helper.make_node("F", [a], [b], domain="local") for a, b in zip(names, names[1:])], [fn], k=8, n=8)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    before = _snapshot(tmp_path)
    started = time.process_time()
    for argv in (["compress", str(path), "-o", str(tmp_path / "out.onnx"), "--jobs", "1"], ["inspect", str(path)],
                 ["validate", str(path), str(path)], ["unpack", str(path), "-o", str(tmp_path / "u.onnx")]):
        assert "expand to more than" in cli_error(capsys, argv)
    assert time.process_time() - started < 30  # was unbounded; the count takes milliseconds
    assert _snapshot(tmp_path) == before
    with pytest.raises(ModelError, match="expand to more than"):
        compress(model, "share")


def test_a_moderate_expansion_is_counted_exactly():
    assert functions.expanded_nodes(_doubling(10)) == 2**10
    assert functions.expanded_nodes(_calls(5)) == 5 * 3


@pytest.mark.parametrize("case", ["self", "mutual", "duplicate", "domain-not-imported"])
def test_functions_onnxruntime_refuses_are_refused_with_one_line(tmp_path, capsys, case):
    """A function calling itself (directly or through another) would not end if expanded; onnxruntime refuses it,
    two functions of one id, and a call to a domain the caller does not import."""
    call = lambda name: helper.make_node(name, ["x"], ["y"], domain="local")
    f = lambda name, callee: helper.make_function("local", name, ["x"], ["y"], [call(callee)], OPSET)
    if case == "self":
        model, expected = _model([call("F")], [f("F", "F")], k=8, n=8), "calls itself"
    elif case == "mutual":
        model, expected = _model([call("F")], [f("F", "G"), f("G", "F")], k=8, n=8), "calls itself"
    elif case == "duplicate":
        model, expected = _model([call("Linear")], [_linear(), _linear()]), "twice"
    else:
        model, expected = _model([call("Linear")], [_linear()], opsets=OPSET[:1]), "does not import"
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    before = _snapshot(tmp_path)
    assert expected in cli_error(capsys, ["compress", str(path), "-o", str(tmp_path / "out.onnx"), "--jobs", "1"])
    assert _snapshot(tmp_path) == before
    with pytest.raises(ModelError, match=expected):
        load_model(path)


def test_the_callers_model_is_left_as_it_was():
    model = _calls(2)
    kept = model.SerializeToString()
    compress(model, "share")
    assert model.SerializeToString() == kept


@pytest.mark.parametrize("stream", [False, True])
def test_a_function_tensor_naming_a_file_outside_the_folder_is_refused(tmp_path, stream):
    """A function body's Constant keeping its data in '../secret.bin': streamed, its location was never checked
    (external data files were listed from the graph's tensors only). Functions are inlined first now."""
    (tmp_path / "secret.bin").write_bytes(np.arange(256 * 64, dtype=np.float32).tobytes())
    tensor = onnx.TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[256, 64], data_location=TensorProto.EXTERNAL)
    for key, val in (("location", "../secret.bin"), ("offset", "0"), ("length", str(256 * 64 * 4))):
        tensor.external_data.add(key=key, value=val)
    fn = _linear()
    fn.node[0].attribute[0].t.CopyFrom(tensor)
    (tmp_path / "model").mkdir()
    path = tmp_path / "model" / "m.onnx"
    path.write_bytes(_model([helper.make_node("Linear", ["x"], ["y"], domain="local")], [fn]).SerializeToString())
    with pytest.raises(ModelError, match="outside"):
        load_model(path, stream=stream)
