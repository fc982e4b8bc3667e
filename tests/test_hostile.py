"""Hostile and odd input: each case gives a one-line error (CLI exit code 2) or a correct result,
leaves the input untouched and writes no partial output.

Already covered in test_model_io.py (not repeated here): missing, empty, random-bytes and
truncated model files, an opset newer than onnxruntime runs, a missing external-data file, an
output in a missing folder or equal to the input.
"""
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.api import compress_file
from onnxcompress.cli import main
from onnxcompress.errors import OutputError
from onnxcompress.graph.model import save_model
from tiny import assert_valid_and_close, cli_error, gemm, make_model, random_feeds, run, value


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _fails_cleanly(capsys, tmp_path: Path, model_path: Path, *extra: str) -> str:
    """Compress via the CLI: one-line error, the folder exactly as before (input untouched, no output)."""
    before = _snapshot(tmp_path)
    out = tmp_path / "out.onnx"
    err = cli_error(capsys, ["compress", str(model_path), "-o", str(out), "--jobs", "1", *extra])
    assert _snapshot(tmp_path) == before
    return err


def _compresses(tmp_path: Path, model: onnx.ModelProto, recipe: str = "share", **options):
    path = tmp_path / "in.onnx"
    onnx.save(model, path)
    original = path.read_bytes()
    out = tmp_path / "out.onnx"
    report = compress_file(path, out, recipe, **options)
    assert path.read_bytes() == original
    onnx.checker.check_model(str(out), full_check=True)
    return onnx.load(out), report


# ---- files --------------------------------------------------------------------------------------

def test_external_data_shorter_than_declared_cli(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    save_model(gemm(k=256, n=64), path, external_data=True)
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    assert "truncated" in _fails_cleanly(capsys, tmp_path, path)


def test_output_data_file_would_overwrite_the_inputs_data(tmp_path):
    """Input a.onnx keeps its weights in 'out.onnx.data': writing out.onnx must not clobber them."""
    model = gemm(k=256, n=64)
    path = tmp_path / "a.onnx"
    save_model(model, path, external_data=True)
    os.replace(tmp_path / "a.onnx.data", tmp_path / "out.onnx.data")
    proto = onnx.load(path, load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "out.onnx.data"
    path.write_bytes(proto.SerializeToString())
    from onnxcompress.graph.model import load_model

    streamed = load_model(path, stream=True)
    before = _snapshot(tmp_path)
    with pytest.raises(OutputError, match="overwrite"):
        save_model(streamed, tmp_path / "out.onnx")
    assert _snapshot(tmp_path) == before


def test_output_equal_to_input_through_another_spelling(tmp_path, capsys, monkeypatch):
    path = tmp_path / "m.onnx"
    onnx.save(gemm(), path)
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    assert "is the input" in cli_error(capsys, ["compress", str(path), "-o", "./m.onnx"])
    assert _snapshot(tmp_path) == before


# ---- odd but valid models: a correct result -------------------------------------------------

def test_model_without_float_weights(tmp_path):
    """Only integer constants: nothing to compress, the model comes back working and says so."""
    table = numpy_helper.from_array(np.arange(1024, dtype=np.int64).reshape(256, 4), "table")
    node = helper.make_node("Gather", ["table", "idx"], ["y"], axis=0, name="lookup")
    model = make_model([node], [value("idx", ["N"], TensorProto.INT64)], [value("y", ["N", 4], TensorProto.INT64)],
                       [table])
    out, report = _compresses(tmp_path, model, eval_data={"idx": np.arange(8, dtype=np.int64)})
    feeds = {"idx": np.array([0, 5, 255], dtype=np.int64)}
    np.testing.assert_array_equal(run(out, feeds)[0], run(model, feeds)[0])
    assert not any(r.action.startswith("shared") for r in report.weights)


def _conv_and_matmul_sharing_a_weight() -> onnx.ModelProto:
    """W [64, 16, 1, 1] feeds a 1x1 Conv directly and, reshaped to [64, 16], a MatMul."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((64, 16, 1, 1)) * 0.3).astype(np.float32)
    shape = numpy_helper.from_array(np.array([64, 16], dtype=np.int64), "shape2d")
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             helper.make_node("GlobalAveragePool", ["c"], ["g"], name="pool"),
             helper.make_node("Flatten", ["g"], ["f"], axis=1, name="flat"),
             helper.make_node("Reshape", ["W", "shape2d"], ["W2"], name="reshape"),
             helper.make_node("MatMul", ["f", "W2"], ["y"], name="mm")]
    return make_model(nodes, [value("x", ["N", 16, 6, 6])], [value("y", ["N", 16])],
                      [numpy_helper.from_array(w, "W"), shape])


def test_weight_shared_by_conv_and_matmul(tmp_path):
    model = _conv_and_matmul_sharing_a_weight()
    from onnxcompress.graph.weights import find_weights

    info = next(w for w in find_weights(model) if w.name == "W")
    assert {c.op_type for c in info.consumers} == {"Conv", "MatMul"}
    out, report = _compresses(tmp_path, model, "share", validate="none")
    feeds = random_feeds(model, n=4)
    # one codebook serves both consumers: 8-bit codes (Conv wins the role) keep the outputs close
    assert_valid_and_close(model, out, feeds, atol=2e-2)
    assert "W" not in {t.name for t in out.graph.initializer}


def test_transposed_gemm_weight_with_a_recorded_shape(tmp_path):
    """Exporters record value_info for weights too; int4 MatMul weights are stored transposed
    (K, N), so the old (N, K) entry must go (AlexNet's fc layers in the corpus)."""
    model = gemm(k=64, n=32, trans_b=True)
    model.graph.value_info.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [32, 64]))
    out, _ = _compresses(tmp_path, model, "int4-weights", validate="none")
    assert "MatMul" in {n.op_type for n in out.graph.node}
    feeds = random_feeds(model, n=4)
    (want,), (got,) = run(model, feeds), run(out, feeds)
    assert np.linalg.norm(got - want) < 0.1 * np.linalg.norm(want)  # int4: ~2-8% relative error


def test_weight_behind_transpose_and_reshape(tmp_path):
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((32, 64)) * 0.1).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0], name="t"),
             helper.make_node("Reshape", ["Wt", "shape"], ["Wr"], name="r"),
             helper.make_node("MatMul", ["x", "Wr"], ["y"], name="mm")]
    model = make_model(nodes, [value("x", ["N", 64])], [value("y", ["N", 32])],
                       [numpy_helper.from_array(w, "W"),
                        numpy_helper.from_array(np.array([64, 32], dtype=np.int64), "shape")])
    out, report = _compresses(tmp_path, model, "share", validate="none")
    assert "W" not in {t.name for t in out.graph.initializer}
    feeds = random_feeds(model, n=8)
    ref, got = run(model, feeds)[0], run(out, feeds)[0]
    sqnr = 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2))
    assert sqnr > 20, sqnr  # 5-bit codebook on a Gaussian weight: ~25 dB


def _custom_op_model() -> onnx.ModelProto:
    """Gemm, then an op of an unknown domain onnxruntime cannot run."""
    base = gemm(k=64, n=32)
    base.graph.node[0].output[0] = "z"
    base.graph.node.append(helper.make_node("Swish", ["z"], ["y"], domain="com.example", name="custom"))
    base.opset_import.append(helper.make_opsetid("com.example", 1))
    return base


def test_unknown_custom_op_compresses_and_skips_validation_with_a_note(tmp_path):
    model = _custom_op_model()
    out, report = _compresses(tmp_path, model, "share", validate="end")
    assert report.validation is None
    assert any("custom ops of ['com.example']" in note and "library" in note for note in report.notes)
    assert [n.domain for n in out.graph.node if n.op_type == "Swish"] == ["com.example"]
    assert "W" not in {t.name for t in out.graph.initializer}  # the weight was still compressed


def test_unknown_custom_op_validate_command_names_the_library(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(_custom_op_model(), path)
    err = cli_error(capsys, ["validate", str(path), str(path)])
    assert "com.example" in err and "library" in err


# ---- data ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("case,expected", [
    ("shape", "axis 1 must be 64"),
    ("dtype", "dtype float64"),
    ("name", "input 'x' is missing"),
])
def test_bad_calibration_data(tmp_path, capsys, case, expected):
    path = tmp_path / "m.onnx"
    onnx.save(gemm(k=64, n=32), path)
    x = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    arrays = {"shape": {"x": x[:, :60]}, "dtype": {"x": x.astype(np.float64)}, "name": {"image": x}}[case]
    np.savez(tmp_path / "calib.npz", **arrays)
    err = _fails_cleanly(capsys, tmp_path, path, "--data", str(tmp_path / "calib.npz"))
    assert expected in err, err


# ---- weights ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_in_a_weight_keeps_it_float(tmp_path, bad):
    """NaN or Inf may be there on purpose (masks, Max(x, -inf)): the tensor stays float, the report says so
    (more cases in test_hostile_inputs.py)."""
    model = gemm(k=64, n=32)
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[3, 5] = bad
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W"))
    out, report = _compresses(tmp_path, model, validate="none")
    kept = next(t for t in out.graph.initializer if t.name == "W")
    np.testing.assert_array_equal(numpy_helper.to_array(kept), w)
    assert any("NaN or Inf" in note and "W" in note for note in report.notes)
    assert any(r.name == "W" and "kept float" in r.action for r in report.weights)


# ---- recipes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("passes,expected", [
    ("  - shar: {bits_fc: 4}", ["unknown pass 'shar'", "did you mean 'share'"]),
    ("  - share: {bits_fcc: 4}", ["'bits_fcc'", "did you mean 'bits_fc'"]),
    ("  - share: {bits_fc: four}", ["bits_fc"]),
], ids=["unknown-pass", "misspelled-option", "wrong-type"])
def test_bad_recipe_names_the_problem(tmp_path, capsys, passes, expected):
    path = tmp_path / "m.onnx"
    onnx.save(gemm(), path)
    (tmp_path / "r.yaml").write_text(f"passes:\n{passes}\n")
    err = _fails_cleanly(capsys, tmp_path, path, "--recipe", str(tmp_path / "r.yaml"))
    assert all(text in err for text in expected), err


def test_jobs_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", "m.onnx", "-o", "o.onnx", "--jobs", "0"])
    assert exit_info.value.code == 2
    assert "--jobs" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["compress", "unpack", "validate", "inspect"])
def test_model_that_is_a_fifo_or_a_device_is_refused_without_reading_it(tmp_path, command):
    """A FIFO blocks a reader forever and /dev/zero fills memory: both are refused before being opened.
    Run in a subprocess with a timeout, since the failure this pins is a hang."""
    import subprocess
    import sys

    fifo = tmp_path / "m.onnx"
    os.mkfifo(fifo)
    good = tmp_path / "good.onnx"
    onnx.save(gemm(), good)
    for model in (fifo, Path("/dev/zero")):
        argv = {"compress": ["compress", str(model), "-o", str(tmp_path / "o.onnx"), "-q", "--jobs", "1"],
                "unpack": ["unpack", str(model), "-o", str(tmp_path / "o.onnx")],
                "validate": ["validate", str(good), str(model)], "inspect": ["inspect", str(model)]}[command]
        proc = subprocess.run([sys.executable, "-m", "onnxcompress.cli", *argv], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip() == f"onnxcompress: error: model file '{model}' is not a regular file (a FIFO, " \
                                      "socket or device?)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.onnx", "m.onnx"]
