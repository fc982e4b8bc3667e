"""Hostile and unusual models and options met inside the passes (red team, round 8): every recipe either
handles the case or fails with one line (exit 2 for the user's mistake, exit 1 naming our bug), never a
traceback, and nothing is written.
"""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import api
from onnxcompress.cli import main
from onnxcompress.errors import PassError, RecipeError
from onnxcompress.recipes import Recipe
from tiny import conv_gemm, gemm, make_model, random_feeds, run, value, weights


def _typed_matmul(elem: int, opset: int) -> onnx.ModelProto:
    """x [N, 64] @ W [64, 32] with x, W and y all of one float type (float16 or double)."""
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    w = numpy_helper.from_array(weights(np.random.default_rng(0), 64, 32).astype(dtype), "W")
    return make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [value("x", ["N", 64], elem)],
                      [value("y", ["N", 32], elem)], [w], opset=opset)


@pytest.mark.parametrize("recipe", ["int8-weights", "int4-weights"])
@pytest.mark.parametrize("elem", [TensorProto.FLOAT16, TensorProto.DOUBLE])
@pytest.mark.parametrize("opset", [13, 21])
def test_weight_only_quantization_of_float16_and_double_weights(tmp_path, recipe, elem, opset):
    """DequantizeLinear computes float32: a float16/double weight gets a Cast back to its type (onnxruntime
    refused the output before: 'Type parameter (T) of Optype (MatMul) bound to different types')."""
    model = _typed_matmul(elem, opset)
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(model, src)
    api.compress_file(src, out, recipe, jobs=1)
    result = onnx.load(out)
    onnx.checker.check_model(result, full_check=True)
    assert "DequantizeLinear" in [n.op_type for n in result.graph.node]
    assert not [t for t in result.graph.initializer if t.data_type == elem]  # the weight is stored quantized
    x = {"x": np.random.default_rng(1).standard_normal((8, 64)).astype(helper.tensor_dtype_to_np_dtype(elem))}
    (ref,), (got,) = run(model, x), run(result, x)
    assert got.dtype == ref.dtype
    error = np.linalg.norm(got.astype(np.float64) - ref) / np.linalg.norm(ref.astype(np.float64))
    assert error < (0.1 if recipe == "int4-weights" else 0.02), error


def test_an_unexpected_exception_in_a_pass_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    """A crash inside a pass is our bug: exit 1, one line asking for a report, no traceback, nothing written."""
    from onnxcompress.passes.share import SharePass

    def broken(self, ctx):
        raise IndexError("index 7 is out of bounds")

    monkeypatch.setattr(SharePass, "call", broken)
    src = tmp_path / "m.onnx"
    onnx.save(gemm(), src)
    assert main(["compress", str(src), "-o", str(tmp_path / "o.onnx"), "--jobs", "1", "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("onnxcompress: internal error") and "report" in err[0], err
    assert "in pass 'share'" in err[0] and "IndexError: index 7" in err[0]
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_an_unexpected_exception_outside_the_passes_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    import onnxcompress.api as api_module

    def broken(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr(api_module, "inspect", broken)
    src = tmp_path / "m.onnx"
    onnx.save(gemm(), src)
    assert main(["inspect", str(src)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("onnxcompress: internal error") and "KeyError" in err[0], err


_METRICS = '''
def raises(outputs, data):
    raise ZeroDivisionError("my metric broke")

def text(outputs, data):
    return "high"

def nan(outputs, data):
    return float("nan")
'''


@pytest.mark.parametrize("function, says", [("raises", "ZeroDivisionError: my metric broke"),
                                            ("text", "could not convert string to float"),
                                            ("nan", "returned nan"),
                                            ("bad_import", "SyntaxError")])
def test_a_user_metric_that_fails_is_the_users_error(tmp_path, monkeypatch, function, says):
    """--metric module:function runs the user's code: its failure is a RecipeError naming the metric (exit 2),
    not an internal error of the search."""
    (tmp_path / "my_metrics.py").write_text(_METRICS)
    (tmp_path / "my_broken.py").write_text("def f(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = "my_broken:f" if function == "bad_import" else f"my_metrics:{function}"
    model = conv_gemm()
    data = random_feeds(model, n=32)
    recipe = Recipe("t", [("bitwidth", {"metric": spec, "max_drop": 1.0, "min_elements": 64})])
    with pytest.raises(PassError, match=says) as caught:
        api.compress(model, recipe, data, eval_data=data)
    assert isinstance(caught.value.__cause__, RecipeError)


_EVIL = "\x1b[31mRED\x1b[0m\n/../../x\r\u202e"


def _evil_named(model: onnx.ModelProto) -> onnx.ModelProto:
    """The first initializer renamed to a name holding ANSI escapes, a newline, a CR and an RTL override."""
    old = model.graph.initializer[0].name
    model.graph.initializer[0].name = _EVIL
    for node in model.graph.node:
        node.input[:] = [_EVIL if name == old else name for name in node.input]
    node.name = "node\x1b[2J"
    return model


def test_names_from_the_model_never_reach_the_terminal_raw(tmp_path, capsys):
    """inspect's table and compress's report printed a weight name's ESC sequences and newline as they are
    (a model could recolour or clear the terminal, or forge report lines); now they are shown escaped."""
    src = tmp_path / "m.onnx"
    onnx.save(_evil_named(gemm()), src)
    assert main(["inspect", str(src)]) == 0
    assert main(["-v", "compress", str(src), "-o", str(tmp_path / "o.onnx"), "--jobs", "1"]) == 0
    captured = capsys.readouterr()
    for text in (captured.out, captured.err):
        assert not {"\x1b", "\r", "\u202e"} & set(text), text
    assert "\\x1b[31mRED\\x1b[0m\\n/../../x\\r\\u202e  32x64" in captured.out


def test_an_error_quoting_a_name_is_one_printable_line(tmp_path, capsys):
    model = _evil_named(gemm())
    model.graph.initializer[1].name = _EVIL  # two initializers of one name: onnx's checker quotes it
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    assert main(["inspect", str(src)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "\\x1b[31mRED" in err and "\x1b" not in err, err


def test_scalar_inputs_are_synthesized_as_arrays(tmp_path):
    """An If on a scalar bool input: synthesis fed numpy's bool scalar, which onnxruntime refused ('Unable to
    handle object of type numpy.bool'), so every recipe without --data failed on a valid model."""
    w = numpy_helper.from_array(weights(np.random.default_rng(0), 64, 32), "W")
    branch = helper.make_graph([helper.make_node("Constant", [], ["Wc"], value=w), helper.make_node("MatMul", ["x", "Wc"], ["yb"])],
                               "branch", [], [value("yb", ["N", 32])])
    model = make_model([helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)],
                       [value("x", ["N", 64]), helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                        helper.make_tensor_value_info("k", TensorProto.INT64, []),
                        helper.make_tensor_value_info("f", TensorProto.FLOAT, [])],
                       [value("y", ["N", 32])], opset=17)
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(model, src)
    report = api.compress_file(src, out, "share", jobs=1)
    assert report.validation is not None
    onnx.checker.check_model(onnx.load(out), full_check=True)


def _sparse_constant(dims: list[int]) -> onnx.ModelProto:
    """gemm() whose bias is Constant(sparse_value): 3 stored values in a tensor of `dims`."""
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.ones(3, np.float32), "v"),
                                       numpy_helper.from_array(np.array([0, 5, 9], np.int64), "i"), dims)
    model = gemm()
    model.graph.node.insert(0, helper.make_node("Constant", [], ["c"], sparse_value=sparse))
    return model


def test_a_sparse_constant_declaring_a_huge_tensor_is_refused_before_allocating(tmp_path, capsys):
    """Constant(sparse_value) of 10^9 declared elements and 3 stored: onnxruntime allocated the dense 4 GB at
    session creation; it is now densified at load with the sparse initializers' checks."""
    src = tmp_path / "m.onnx"
    onnx.save(_sparse_constant([10**9]), src)
    assert main(["inspect", str(src)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "declares 1000000000 elements, more than the 268435456" in err, err


def test_a_small_sparse_constant_is_densified(tmp_path):
    model = _sparse_constant([2048])
    model.graph.output.append(value("c", [2048]))
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(model, src)
    api.compress_file(src, out, "share", jobs=1)
    feeds = {"x": np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)}
    dense = np.zeros(2048, np.float32)
    dense[[0, 5, 9]] = 1
    np.testing.assert_array_equal(run(onnx.load(out), feeds)[1], dense)


@pytest.mark.parametrize("flag, value", [("--max-drop", "nan"), ("--max-drop", "-1"), ("--min-sqnr", "inf")])
def test_a_search_budget_that_is_no_finite_number_is_refused(tmp_path, capsys, flag, value):
    """--max-drop nan or -1 ran the whole search against a budget every comparison fails or none can meet."""
    src = tmp_path / "m.onnx"
    onnx.save(gemm(), src)
    assert main(["compress", str(src), "-o", str(tmp_path / "o.onnx"), "--recipe", "auto", flag, value,
                 "--jobs", "1", "-q"]) == 2
    err_line = capsys.readouterr().err.strip()
    assert len(err_line.splitlines()) == 1 and "must be a finite number" in err_line, err_line
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
