"""Streamed models (weights read from external data one at a time) and --jobs: same results as in memory / jobs 1.

Streaming normally starts above model.STREAM_THRESHOLD; these tests lower it (and the spill
threshold) so tiny models take the same path as multi-GB ones.
"""
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxcompress.api import compress, compress_file
from onnxcompress.errors import ModelError, OutputError
from onnxcompress.execution import parallel
from onnxcompress.graph import datafile, external, model as model_io, spill
from onnxcompress.graph.model import load_model, save_model
from onnxcompress.graph.weights import find_weights, get_array


from tiny import mlp, conv_gemm, make_model, random_feeds, value


@pytest.fixture
def streaming(monkeypatch):
    monkeypatch.setattr(model_io, "STREAM_THRESHOLD", 0)
    monkeypatch.setattr(spill, "SPILL_MIN_BYTES", 1024)


def _outputs(path_or_model, feeds):
    from onnxcompress.runtime.sessions import make_session

    return make_session(path_or_model).run(None, feeds)


def test_streamed_load_reads_weights_lazily(tmp_path, streaming):
    model = conv_gemm()
    save_model(model, tmp_path / "m.onnx", external_data=True)
    streamed = load_model(tmp_path / "m.onnx")
    assert external.is_streamed(streamed)
    assert not any(t.HasField("raw_data") for t in streamed.graph.initializer if t.name == "fc.W")
    for info in find_weights(streamed):
        expected = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == info.name))
        np.testing.assert_array_equal(get_array(streamed, info), expected)


def test_streamed_model_with_short_data_file_fails_on_read(tmp_path, streaming):
    save_model(conv_gemm(), tmp_path / "m.onnx", external_data=True)
    streamed = load_model(tmp_path / "m.onnx")
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:100])  # shortened after loading
    info = next(w for w in find_weights(streamed) if w.name == "fc.W")
    with pytest.raises(ModelError, match="truncated"):
        get_array(streamed, info)


@pytest.mark.parametrize("recipe", ["share", "deep-compression-portable"])
def test_streamed_compression_equals_in_memory(tmp_path, streaming, recipe):
    model = conv_gemm()
    save_model(model, tmp_path / "m.onnx", external_data=True)
    source = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    report = compress_file(tmp_path / "m.onnx", tmp_path / "out.onnx", recipe, validate="end")
    assert report.validation is not None  # validated in onnxruntime with data read from the files
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name in source} == source
    written = onnx.load(tmp_path / "out.onnx", load_external_data=False)
    assert not [e.key for e in written.metadata_props if e.key.startswith("onnxcompress.")]
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)
    in_memory, _ = compress(model, recipe, validate="none")
    feeds = {"x": random_feeds(model)["x"]}
    for a, b in zip(_outputs(str(tmp_path / "out.onnx"), feeds), _outputs(in_memory, feeds)):
        np.testing.assert_array_equal(a, b)


def test_save_copies_source_tensors_and_leaves_the_model_as_it_was(tmp_path, streaming):
    model = mlp()
    (tmp_path / "src").mkdir()
    save_model(model, tmp_path / "src" / "m.onnx", external_data=True)
    streamed = load_model(tmp_path / "src" / "m.onnx")
    before = streamed.SerializeToString()
    save_model(streamed, tmp_path / "copy.onnx")
    assert streamed.SerializeToString() == before
    assert (tmp_path / "copy.onnx.data").stat().st_size >= 3 * 96 * 96 * 4
    feeds = {"x": random_feeds(model)["x"]}
    np.testing.assert_array_equal(_outputs(str(tmp_path / "copy.onnx"), feeds)[0], _outputs(model, feeds)[0])
    save_model(streamed, tmp_path / "inline.onnx", external_data=False)
    assert not (tmp_path / "inline.onnx.data").exists()
    np.testing.assert_array_equal(_outputs(str(tmp_path / "inline.onnx"), feeds)[0], _outputs(model, feeds)[0])


def test_failed_streamed_save_leaves_nothing(tmp_path, streaming, monkeypatch):
    save_model(mlp(), tmp_path / "m.onnx", external_data=True)
    streamed = load_model(tmp_path / "m.onnx")
    (tmp_path / "out").mkdir()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(datafile, "copy_range", boom)
    with pytest.raises(OutputError, match="disk full"):
        save_model(streamed, tmp_path / "out" / "o.onnx")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("recipe", ["share", "deep-compression"])
def test_jobs_give_identical_results(tmp_path, monkeypatch, recipe):
    monkeypatch.setattr(parallel, "MIN_PARALLEL_ELEMENTS", 0)  # use workers even for a tiny model
    model = mlp(layers=4, width=64)
    one, _ = compress(model, recipe, validate="none", jobs=1)
    two, _ = compress(model, recipe, validate="none", jobs=2)
    assert one.SerializeToString(deterministic=True) == two.SerializeToString(deterministic=True)


def test_map_ordered_keeps_order_and_raises_worker_errors():
    tasks = [((n,), {}) for n in range(7)]
    assert list(parallel.map_ordered(_square, tasks, jobs=2)) == [n * n for n in range(7)]
    with pytest.raises(ModelError, match="bad 3"):
        list(parallel.map_ordered(_fail_on_three, tasks, jobs=2))


def _square(n):
    return n * n


def _fail_on_three(n):
    if n == 3:
        raise ModelError("bad 3")
    return n


def test_streamed_deep_compression_writes_blobs_as_external_data(tmp_path, streaming):
    """The packed form of a streamed model: blobs spilled as made, written as external data; the file
    runs through the fast path, onnxruntime's custom-op path and `unpack` with the in-memory result's outputs."""
    from onnxcompress.runtime import extension_ops
    from onnxcompress.api import unpack_file
    from onnxcompress.runtime.sessions import uses_domain

    model = mlp(layers=3, width=128)
    save_model(model, tmp_path / "m.onnx", external_data=True)
    compress_file(tmp_path / "m.onnx", tmp_path / "p.onnx", "deep-compression", validate="none")
    written = onnx.load(tmp_path / "p.onnx", load_external_data=False)
    blobs = [t for t in written.graph.initializer if t.name.endswith("~")]
    assert len(blobs) == 3 and all(t.data_location == onnx.TensorProto.EXTERNAL for t in blobs)
    assert uses_domain(written)
    onnx.checker.check_model(str(tmp_path / "p.onnx"), full_check=True)
    in_memory, _ = compress(model, "deep-compression", validate="none")
    feeds = {"x": random_feeds(model)["x"]}
    expected = _outputs(in_memory, feeds)[0]
    streamed = load_model(tmp_path / "p.onnx")
    assert external.is_streamed(streamed)  # the blobs stay on disk
    np.testing.assert_array_equal(_outputs(str(tmp_path / "p.onnx"), feeds)[0], expected)
    np.testing.assert_array_equal(_outputs(streamed, feeds)[0], expected)
    custom = extension_ops.custom_op_session(streamed, optimize=False).run(None, feeds)[0]
    np.testing.assert_allclose(custom, expected, rtol=0, atol=1e-5)
    unpack_file(tmp_path / "p.onnx", tmp_path / "u.onnx")
    assert not uses_domain(onnx.load(tmp_path / "u.onnx", load_external_data=False))
    onnx.checker.check_model(str(tmp_path / "u.onnx"), full_check=True)
    np.testing.assert_array_equal(_outputs(str(tmp_path / "u.onnx"), feeds)[0], expected)


_INTERRUPTED_CHILD = r"""
import sys, time
from onnxcompress.graph import external, spill
from onnxcompress.graph import model as model_io
from onnxcompress.api import compress_file
from onnxcompress.passes import PASSES

model_io.STREAM_THRESHOLD, spill.SPILL_MIN_BYTES = 0, 1024

def stall(self, ctx):  # mid-compression, with the spill file written: tell the parent, then wait
    print(spill._spill_dir(), flush=True)
    time.sleep(60)

PASSES["entropy"].call = stall
compress_file(sys.argv[1], sys.argv[2], "deep-compression", validate="none")
"""


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_spill_files_and_partial_outputs_do_not_survive_a_signal(tmp_path, signum):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    save_model(mlp(layers=3, width=64), tmp_path / "m.onnx", external_data=True)
    (tmp_path / "out").mkdir()
    child = subprocess.Popen([sys.executable, "-c", _INTERRUPTED_CHILD, str(tmp_path / "m.onnx"),
                              str(tmp_path / "out" / "o.onnx")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    spill = Path(child.stdout.readline().strip())
    assert spill.is_dir() and any(spill.iterdir()), child.stderr.read()
    child.send_signal(getattr(signal, signum))
    assert child.wait(timeout=60) != 0
    assert not spill.exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_auto_granularity_without_data_chooses_on_a_sample_of_a_large_weight(monkeypatch):
    """Above CHOICE_SAMPLE_ELEMENTS, auto without data measures its candidates on whole sampled channels
    and fits only the chosen one on the weight: the same choice as measuring every candidate fully here."""
    from onnxcompress.fitting import sharing as layer_hessians
    from onnxcompress.fitting.granular import measure
    from onnxcompress.graph.weights import Role, WeightInfo

    rng = np.random.default_rng(3)
    array = (rng.standard_normal((256, 512)) * np.exp(rng.normal(0, 1.5, (256, 1)))).astype(np.float32)
    info = WeightInfo(name="W", shape=array.shape, dtype=np.dtype(np.float32), nbytes=array.nbytes,
                      location="initializer", graph="main", consumers=[], role=Role.GEMM, channel_axis=0)
    full = layer_hessians.share_weight(array, info, 4, layer_hessians.ShareSettings(target_db=36.0))
    monkeypatch.setattr(layer_hessians, "CHOICE_SAMPLE_ELEMENTS", 16384)  # 32 of the 256 channels
    sampled = layer_hessians.share_weight(array, info, 4, layer_hessians.ShareSettings(target_db=36.0))
    assert "sample" in sampled.reason and "sample" not in full.reason
    assert sampled.chosen.option == full.chosen.option and sampled.chosen.option.kind == "channel"
    assert sampled.chosen.shared.codes.shape == array.shape
    assert sampled.chosen.sqnr_db == pytest.approx(measure(array, sampled.chosen.shared, None))
    assert {c.option for c in sampled.candidates} == {c.option for c in full.candidates}
    assert all(c.bytes < full_c.bytes for c, full_c in zip(sampled.candidates, full.candidates))  # sample-sized
