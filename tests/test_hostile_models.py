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
