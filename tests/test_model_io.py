"""Model I/O: clear one-line errors for bad input, atomic writes, external data."""
import os

import numpy as np
import onnx
import pytest

from onnxcompress.errors import ModelError, OutputError
from onnxcompress.graph.model import file_bytes, load_model, save_model
from onnxcompress.runtime.sessions import max_runnable_opset
from tiny import cli_error, gemm, random_feeds, run

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "samples", "lenet300.onnx")


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.fixture
def model_bytes():
    return gemm(k=64, n=32).SerializeToString()


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "nope.onnx")


def test_empty_random_truncated(tmp_path, model_bytes):
    with pytest.raises(ModelError, match="empty"):
        load_model(_write(tmp_path / "empty.onnx", b""))
    rng = np.random.default_rng(0)
    with pytest.raises(ModelError):
        load_model(_write(tmp_path / "random.onnx", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()))
    for cut in (10, len(model_bytes) // 2, len(model_bytes) - 3):
        with pytest.raises(ModelError):
            load_model(_write(tmp_path / f"cut{cut}.onnx", model_bytes[:cut]))


def test_unrunnable_opset(tmp_path):
    model = gemm()
    model.opset_import[0].version = 99
    path = tmp_path / "future.onnx"
    onnx.save(model, path)
    with pytest.raises(ModelError, match="opset 99"):
        load_model(path, max_opset=max_runnable_opset())
    assert load_model(path, load_external_data=False) is not None  # the graph layer alone sets no upper bound


def test_external_data_round_trip_and_missing_file(tmp_path):
    model = gemm(k=256, n=64)
    path = tmp_path / "ext.onnx"
    save_model(model, path, external_data=True)
    assert (tmp_path / "ext.onnx.data").exists()
    assert file_bytes(path) > path.stat().st_size
    loaded = load_model(path)
    feeds = {"x": random_feeds(model)["x"]}
    np.testing.assert_array_equal(run(loaded, feeds)[0], run(model, feeds)[0])
    data = (tmp_path / "ext.onnx.data").read_bytes()
    (tmp_path / "ext.onnx.data").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="truncated"):
        load_model(path)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(ModelError, match="missing"):
        load_model(path)


def test_save_is_atomic_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    model = gemm()
    target = tmp_path / "out.onnx"

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(onnx.ModelProto, "SerializeToString", boom)
    with pytest.raises(OutputError, match="cannot write .*disk full"):  # one sentence, not a traceback
        save_model(model, target)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_output_path_errors(tmp_path):
    model_path = tmp_path / "m.onnx"
    onnx.save(gemm(), model_path)
    with pytest.raises(OutputError, match="does not exist"):
        save_model(gemm(), tmp_path / "missing" / "out.onnx")


@pytest.mark.parametrize("case", ["missing", "empty", "random", "truncated", "opset", "ext-missing"])
def test_cli_bad_models_exit_2_and_write_nothing(tmp_path, capsys, model_bytes, case):
    path = tmp_path / "bad.onnx"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "random":
        path.write_bytes(np.random.default_rng(1).integers(0, 256, 999, dtype=np.uint8).tobytes())
    elif case == "truncated":
        path.write_bytes(model_bytes[: len(model_bytes) // 3])
    elif case == "opset":
        model = gemm()
        model.opset_import[0].version = 99
        onnx.save(model, path)
    elif case == "ext-missing":
        save_model(gemm(k=256, n=64), path, external_data=True)
        (tmp_path / "bad.onnx.data").unlink()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    out = tmp_path / "out.onnx"
    cli_error(capsys, ["compress", str(path), "-o", str(out), "--recipe", "share"])
    assert not out.exists()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # input untouched, no leftovers


def test_cli_output_equal_to_input_or_in_missing_folder(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(gemm(k=64, n=32), path)
    original = path.read_bytes()
    assert "is the input" in cli_error(capsys, ["compress", str(path), "-o", str(path)])
    assert "does not exist" in cli_error(capsys, ["compress", str(path), "-o", str(tmp_path / "no" / "o.onnx")])
    assert path.read_bytes() == original


def test_detached_session_runs_the_weights_without_holding_their_bytes_twice():
    from onnxcompress.runtime.sessions import IN_MEMORY, detached, make_session

    model = gemm(k=256, n=64)  # W holds 64 KB; the bias stays inline
    light, arrays = detached(model)
    assert set(arrays) == {"W"} and light.ByteSize() < 2048 < model.ByteSize()
    (placeholder,) = [t for t in light.graph.initializer if t.name == "W"]
    assert not placeholder.raw_data and {e.key: e.value for e in placeholder.external_data}["location"] == IN_MEMORY
    assert len(model.graph.initializer[0].raw_data) > 0  # the model itself is untouched
    feeds = random_feeds(model, n=8)
    (want,) = run(model, feeds)
    (got,) = make_session(light, arrays=arrays).run(None, feeds)
    np.testing.assert_array_equal(got, want)


def test_detached_session_takes_views_and_keeps_its_buffers_alive():
    import gc

    from onnxcompress.runtime.sessions import detached, make_session

    model = gemm(k=256, n=64)
    light, arrays = detached(model, also={"b"}, min_bytes=1 << 20)  # only the named tensor is detached
    assert set(arrays) == {"b"}
    light, arrays = detached(model)
    feeds = random_feeds(model, n=8)
    (want,) = run(model, feeds)
    arrays = {"W": np.asfortranarray(arrays["W"]).T.T}  # a view onnxruntime cannot take as it is
    session = make_session(light, arrays=arrays)
    del arrays
    gc.collect()
    (got,) = session.run(None, feeds)
    np.testing.assert_array_equal(got, want)
