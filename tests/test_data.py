"""Data for real models: stacked arrays, per-sample feed lists, folders, and clear errors."""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import api
from onnxcompress.cli import main
from onnxcompress.graph.data import Dataset, load_data, model_inputs
from onnxcompress.errors import DataError
from tiny import make_model, value


def stateful_model() -> onnx.ModelProto:
    """y = x @ W + sum_layers(state) * sr / 16000; state_out = 0.9 * state.

    x: (1, 64); state: (2, 1, 32) with its batch axis at 1; sr: int64 scalar.
    """
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32) * 0.1, "W"),
             numpy_helper.from_array(np.array([0], dtype=np.int64), "axis0"),
             numpy_helper.from_array(np.float32(1 / 16000), "inv_rate"),
             numpy_helper.from_array(np.float32(0.9), "decay")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"], name="mm"),
             helper.make_node("ReduceSum", ["state", "axis0"], ["s"], keepdims=0, name="sum"),
             helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Mul", ["srf", "inv_rate"], ["rate"], name="rate"),
             helper.make_node("Mul", ["s", "rate"], ["sc"], name="scale"),
             helper.make_node("Add", ["xw", "sc"], ["y"], name="add"),
             helper.make_node("Mul", ["state", "decay"], ["state_out"], name="decay")]
    return make_model(nodes, [value("x", [1, 64]), value("state", [2, 1, 32]), value("sr", [], TensorProto.INT64)],
                      [value("y", [1, 32]), value("state_out", [2, 1, 32])], inits)


def width_model() -> onnx.ModelProto:
    """Per-position class scores of a (1, 8, width) sequence: (1, width, 16)."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1], name="t"),
             helper.make_node("MatMul", ["xt", "W"], ["y"], name="mm")]
    return make_model(nodes, [value("x", [1, 8, "width"])], [value("y", [1, "width", 16])],
                      [numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "W")])


def stateful_feeds(n=6):
    rng = np.random.default_rng(2)
    return [{"x": rng.standard_normal((1, 64)).astype(np.float32),
             "state": rng.standard_normal((2, 1, 32)).astype(np.float32),
             "sr": np.array(16000 if i % 2 else 8000, dtype=np.int64)} for i in range(n)]


def width_feeds():
    rng = np.random.default_rng(3)
    return [{"x": rng.standard_normal((1, 8, w)).astype(np.float32)} for w in (5, 11, 23, 11)]


def write_feed_list(path, feeds):
    np.savez(path, **{f"{i:05d}/{k}": v for i, feed in enumerate(feeds) for k, v in feed.items()})
    return path


def write_folder(folder, feeds):
    folder.mkdir()
    for i, feed in enumerate(feeds):
        np.savez(folder / f"{i:05d}.npz", **feed)
    return folder


@pytest.mark.parametrize("builder,feeds", [(stateful_model, stateful_feeds), (width_model, width_feeds)])
def test_feed_lists_compress_and_validate_like_the_api(tmp_path, capsys, builder, feeds):
    model, samples = builder(), feeds()
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    npz = write_feed_list(tmp_path / "feeds.npz", samples)
    folder = write_folder(tmp_path / "feeds", samples)
    out = tmp_path / "small.onnx"
    config = tmp_path / "r.yaml"
    config.write_text("passes:\n  - share: {min_elements: 64, bits_fc: 4}\n")
    assert main(["compress", str(src), "-o", str(out), "--recipe", str(config), "--data", str(npz), "-q"]) == 0
    capsys.readouterr()
    from_api = api.validate(src, out, samples).as_dict()
    for source in (npz, folder):
        assert main(["validate", str(src), str(out), "--data", str(source), "--json"]) == 0
        from_cli = json.loads(capsys.readouterr().out)
        assert from_cli["samples"] == len(samples)
        for got, want in zip(from_cli["outputs"], from_api["outputs"]):
            assert got["name"] == want["name"]
            assert got["max_abs"] == pytest.approx(want["max_abs"])
            assert float(got["sqnr_db"]) == pytest.approx(want["sqnr_db"])
            assert got["top1_agreement"] == want["top1_agreement"]
    assert from_api["outputs"][0]["max_abs"] > 0  # the model really was compressed


def test_sequence_outputs_compare_every_position():
    model = width_model()
    comparison = api.validate(model, model, width_feeds())
    assert comparison.outputs[0].top1_agreement == 1.0
    assert comparison.samples == 4


def test_stacked_npz_batches_only_when_axis0_is_dynamic(tmp_path):
    from tiny import gemm

    data = load_data({"x": np.zeros((10, 64), np.float32)})
    sizes = [n for _, n in data.chunks(model_inputs(gemm()), max_batch=4)]
    assert sizes == [4, 4, 2]
    fixed = make_model([helper.make_node("Identity", ["x"], ["y"])], [value("x", [1, 3])], [value("y", [1, 3])])
    chunks = list(load_data({"x": np.zeros((5, 1, 3), np.float32)}).chunks(model_inputs(fixed), max_batch=4))
    assert [c["x"].shape for c, _ in chunks] == [(1, 3)] * 5


BAD_FEEDS = {
    "missing": ({"x": np.zeros((1, 64), np.float32), "state": np.zeros((2, 1, 32), np.float32)}, "'sr' is missing"),
    "unknown": ({"x": np.zeros((1, 64), np.float32), "state": np.zeros((2, 1, 32), np.float32),
                 "sr": np.array(1, np.int64), "extra": np.zeros(1, np.float32)}, "no input 'extra'"),
    "dtype": ({"x": np.zeros((1, 64)), "state": np.zeros((2, 1, 32), np.float32), "sr": np.array(1, np.int64)},
              "'x': dtype float64"),
    "rank": ({"x": np.zeros((64,), np.float32), "state": np.zeros((2, 1, 32), np.float32),
              "sr": np.array(1, np.int64)}, "'x': expected rank 2"),
    "shape": ({"x": np.zeros((1, 63), np.float32), "state": np.zeros((2, 1, 32), np.float32),
               "sr": np.array(1, np.int64)}, "axis 1 must be 64"),
}


@pytest.mark.parametrize("case", sorted(BAD_FEEDS))
def test_bad_feed_exits_2_naming_sample_and_input(tmp_path, capsys, case):
    src = tmp_path / "m.onnx"
    onnx.save(stateful_model(), src)
    bad, expected = BAD_FEEDS[case]
    data = write_feed_list(tmp_path / "feeds.npz", stateful_feeds(2) + [bad])
    out = tmp_path / "o.onnx"
    assert main(["compress", str(src), "-o", str(out), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sample 2" in err and expected in err, err
    assert not out.exists()
    assert main(["validate", str(src), str(src), "--data", str(data)]) == 2
    assert "sample 2" in capsys.readouterr().err


def test_empty_and_unreadable_data(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(stateful_model(), src)
    (tmp_path / "empty.npz").write_bytes(b"")
    np.savez(tmp_path / "none.npz")
    for name in ("empty.npz", "none.npz", "missing.npz"):
        assert main(["validate", str(src), str(src), "--data", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and name in err


def test_wrong_stacked_shape_names_input_expected_and_given(tmp_path):
    from tiny import gemm

    with pytest.raises(DataError, match=r"input 'x': expected shape \(N, 64\), got \(1, 65\)"):
        api.compress(gemm(), "share", {"x": np.zeros((5, 65), np.float32)})


def test_labels_must_match_samples():
    data = Dataset(stacked={"x": np.zeros((4, 64), np.float32)}, labels=np.zeros(3))
    from tiny import gemm

    with pytest.raises(DataError, match="3 labels for 4 samples"):
        data.check(model_inputs(gemm()))


def test_one_sample_feeds_of_equal_shapes_run_in_batches_like_stacked_data():
    from onnxcompress.graph.data import Dataset, model_inputs
    from tiny import gemm

    model = gemm(k=8, n=4)
    x = np.random.default_rng(0).normal(size=(70, 8)).astype(np.float32)
    specs = model_inputs(model)
    name = specs[0].name
    listed = Dataset([{name: x[i:i + 1]} for i in range(70)])
    stacked = Dataset(stacked={name: x})
    got = [(f[name].shape, n) for f, n in listed.chunks(specs)]
    assert got == [(f[name].shape, n) for f, n in stacked.chunks(specs)] == [((64, 8), 64), ((6, 8), 6)]
    assert np.array_equal(np.concatenate([f[name] for f, _ in listed.chunks(specs)]), x)
    ragged = Dataset([{name: x[:1]}, {name: x[:2]}])  # not one sample each: one call a feed
    assert [n for _, n in ragged.chunks(specs)] == [1, 1]


def test_a_large_data_folder_is_read_up_to_samples(tmp_path):
    """A folder of many files: only the first --samples are read (and said so); 0 reads them all."""
    from onnxcompress.api import compress, validate
    from tiny import gemm

    folder = tmp_path / "data"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        np.savez(folder / f"{i:03d}.npz", x=rng.standard_normal((1, 64)).astype(np.float32))
    model = gemm(k=64, n=32)
    _, report = compress(model, "int8", str(folder), samples=5)
    assert report.validation.samples == 5
    assert any("the first 5 of its 12 samples" in n for n in report.notes)
    _, report = compress(model, "int8", str(folder), samples=0)
    assert report.validation.samples == 12 and not any("samples were used" in n for n in report.notes)
    assert validate(model, model, str(folder), samples=3).samples == 3


def test_samples_must_be_a_count(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", "m.onnx", "-o", "o.onnx", "--samples", "-1"])
    assert exit_info.value.code == 2 and "--samples" in capsys.readouterr().err
