"""A built-in recipe on a model it finds nothing to compress in (every weight below the size threshold)
finishes with the model unchanged in value and says so; its later passes do not call that a missing step
(found by benchmarks/sweep.py: deep-compression-fixed ended with 'sparse storage needs pruned weights:
run prune' on models whose weights were all small)."""
import numpy as np
import pytest

from onnxcompress.api import compress
from tiny import gemm, random_feeds, run


@pytest.mark.parametrize("recipe", ["deep-compression-fixed", "prune", "share"])
def test_a_recipe_with_nothing_to_compress_finishes(recipe):
    model = gemm(k=8, n=8)  # 64 + 8 weights: all below the passes' 256-element threshold
    compressed, report = compress(model, recipe)
    feeds = random_feeds(model)
    np.testing.assert_allclose(run(compressed, feeds)[0], run(model, feeds)[0], rtol=1e-6, atol=1e-6)
    assert report.validation is not None


def test_a_recipe_that_needs_data_says_so_before_any_pass_runs(tmp_path, capsys, monkeypatch):
    import onnx
    from onnxcompress.passes.share import SharePass
    from tiny import cli_error

    onnx.save(gemm(k=64, n=32), tmp_path / "m.onnx")
    (tmp_path / "static.yaml").write_text("name: static\npasses: [share, calibrate, qdq]\n")
    ran = []
    monkeypatch.setattr(SharePass, "call", lambda self, ctx: ran.append(1))
    err = cli_error(capsys, ["compress", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "--recipe",
                             str(tmp_path / "static.yaml")])
    assert "'static' needs calibration data" in err and "--data" in err
    assert not ran and not (tmp_path / "o.onnx").exists()


def test_weights_another_tool_quantized_are_named_as_the_reason_the_output_is_not_smaller():
    """Found on a trained model (a voice filter exported with onnxruntime's quantize_dynamic: int8 weights under
    DynamicQuantizeLSTM and MatMulInteger): every recipe wrote it out 1.01x smaller and the report said nothing
    of why. The report now says how many bytes of weights are already integer and that recipes keep them."""
    from onnx import TensorProto, helper, numpy_helper

    from tiny import make_model, value

    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, size=(256, 64)).astype(np.int8)
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("MatMulInteger", ["xq", "W", "xz", "wz"], ["acc"]),
             helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["xs", "ws"], ["s"]), helper.make_node("Mul", ["accf", "s"], ["y"])]
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array(0, np.int8), "wz"),
             numpy_helper.from_array(np.array(0.01, np.float32), "ws")]
    model = make_model(nodes, [value("x", ["N", 256])], [value("y", ["N", 64])], inits)
    compressed, report = compress(model, "share")
    feeds = {"x": np.random.default_rng(1).normal(size=(4, 256)).astype(np.float32)}
    np.testing.assert_array_equal(run(compressed, feeds)[0], run(model, feeds)[0])
    said = [n for n in report.notes if "already integer" in n]
    assert len(said) == 1 and "16.4 KB" in said[0] and "int8" in said[0] and "1 tensor" in said[0], report.notes


def test_a_float_model_gets_no_integer_weights_note():
    _, report = compress(gemm(k=64, n=32), "share")
    assert not [n for n in report.notes if "already integer" in n]


def test_bytes_no_pass_compresses_are_named_with_the_ratio_they_cap():
    """Found on a trained streaming denoiser (GTCRN: 275 KB of its 535 KB are int64 ScatterND indices, 199 KB float
    weights): every recipe wrote it 1.24-1.28x smaller and the report said nothing of why. The report now says how
    much of the file is float weights, integer tensors and graph, and the ratio that caps."""
    from onnx import helper, numpy_helper

    from tiny import make_model, value

    rng = np.random.default_rng(0)
    index = np.arange(40_000, dtype=np.int64).reshape(1, -1) % 256  # 320 KB of indices, a Gather's
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Gather", ["h", "I"], ["y"], axis=1)]
    inits = [numpy_helper.from_array(rng.normal(size=(256, 256)).astype(np.float32), "W"),
             numpy_helper.from_array(index, "I")]
    model = make_model(nodes, [value("x", ["N", 256])], [value("y", ["N", 1, 40_000])], inits)
    compressed, report = compress(model, "share")
    said = [n for n in report.notes if "at most" in n]
    assert len(said) == 1 and "262.1 KB of the" in said[0] and "320.0 KB are integer" in said[0], report.notes
    bound = float(said[0].rsplit("at most ", 1)[1].split("x")[0])
    assert model.ByteSize() / compressed.ByteSize() <= bound
    _, report = compress(gemm(k=512, n=256), "share")  # 512 KB of float weights: no cap worth a note
    assert not [n for n in report.notes if "at most" in n]
