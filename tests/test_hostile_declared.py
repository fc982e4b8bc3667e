"""Hostile declarations, session 11: what a model declares about its tensors, shapes, functions and
outputs. A model onnxruntime refuses is exit 2 with one line and nothing written; a model onnxruntime
runs compresses, whatever onnx's stricter checks say about it.
"""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.api import compress_file
from onnxcompress.graph.model import load_model
from test_hostile import _snapshot
from tiny import cli_error, gemm, random_feeds, run, value

COMMANDS = {"compress": lambda p: ["compress", str(p), "-o", str(p.parent / "out.onnx"), "--jobs", "1"],
            "inspect": lambda p: ["inspect", str(p)],
            "validate": lambda p: ["validate", str(p), str(p)],
            "unpack": lambda p: ["unpack", str(p), "-o", str(p.parent / "out.onnx")]}


def _corrupt(case: str) -> onnx.ModelProto:
    model = gemm(k=64, n=32)
    w = model.graph.initializer[0]
    if case == "unknown-type":
        w.data_type = 99
    elif case == "raw-longer":
        w.raw_data += bytes(12)
    elif case == "values-longer":
        values = numpy_helper.to_array(w).ravel().tolist()
        w.ClearField("raw_data")
        w.float_data[:] = values + [0.5] * 3
    elif case == "constant-raw-longer":
        model.graph.initializer.remove(w)
        t = numpy_helper.from_array(np.ones((32, 64), np.float32), "W")
        t.raw_data += bytes(4)
        model.graph.node.insert(0, helper.make_node("Constant", [], ["W"], value=t))
    return model


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("case", ["unknown-type", "raw-longer", "values-longer", "constant-raw-longer"])
def test_tensor_data_that_is_not_what_it_declares_is_refused(tmp_path, capsys, case, command):
    """onnx's checker passes these and onnxruntime refuses them; inspect used to crash (KeyError, ValueError:
    exit 1, 'a bug in onnxcompress')."""
    path = tmp_path / "m.onnx"
    path.write_bytes(_corrupt(case).SerializeToString())
    before = _snapshot(tmp_path)
    err = cli_error(capsys, COMMANDS[command](path))
    assert _snapshot(tmp_path) == before
    assert "'W'" in err and ("element type 99" in err if case == "unknown-type" else "needs" in err), err


def test_segment_fields_are_ignored_as_onnxruntime_does(tmp_path):
    """A tensor with segment fields runs in onnxruntime (which ignores them); onnx cannot read it: it crashed."""
    model = gemm(k=256, n=64)
    model.graph.initializer[0].segment.begin, model.graph.initializer[0].segment.end = 0, 10
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    assert not load_model(path).graph.initializer[0].HasField("segment")
    compress_file(path, tmp_path / "out.onnx", "share")
    out = onnx.load(tmp_path / "out.onnx")
    onnx.checker.check_model(out, full_check=True)
    feeds = random_feeds(gemm(k=256, n=64), n=4)
    _close(run(out, feeds)[0], run(gemm(k=256, n=64), feeds)[0])


def _close(got: np.ndarray, ref: np.ndarray) -> None:
    """Compressed outputs near the original's: relative L2 error under 10% (8-bit sharing: ~1-5%)."""
    assert got.shape == ref.shape
    assert np.linalg.norm(got - ref) < 0.1 * np.linalg.norm(ref), np.linalg.norm(got - ref) / np.linalg.norm(ref)


def _odd_shapes(case: str) -> onnx.ModelProto:
    model = gemm(k=256, n=64)
    if case == "input-dim-negative":
        model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = -7
    else:  # an output dim that is not what the Gemm makes
        model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 1 << 40
    return model


@pytest.mark.parametrize("case", ["input-dim-negative", "output-dim-wrong"])
@pytest.mark.parametrize("recipe", ["share", "int8-dynamic"])
def test_declared_shapes_onnx_cannot_unify_still_compress(tmp_path, case, recipe):
    """onnxruntime runs such a model (it takes the shapes from the data); the end-of-compress check failed in
    onnx's strict shape inference on what was the input's own declaration (exit 1)."""
    model = _odd_shapes(case)
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    feeds = random_feeds(gemm(k=256, n=64), n=4)
    report = compress_file(path, tmp_path / "out.onnx", recipe)
    assert report.validation is not None
    out = onnx.load(tmp_path / "out.onnx")
    _close(run(out, feeds)[0], run(model, feeds)[0])


def test_a_compress_that_breaks_shapes_still_fails_its_check(tmp_path, monkeypatch):
    """The fallback is only for inputs that fail the strict check themselves: a pass producing a model with
    contradictory shapes out of a clean input is still our bug."""
    from onnxcompress.graph import external

    clean = gemm(k=256, n=64)
    broken = _odd_shapes("output-dim-wrong")
    with pytest.raises(onnx.shape_inference.InferenceError):
        external.check_result(broken, clean)
    external.check_result(broken, _odd_shapes("input-dim-negative"))  # the input fails it too: structure only


def _local_function_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = helper.make_tensor("FW", TensorProto.FLOAT, [256, 64], (rng.standard_normal(256 * 64) * 0.1).tolist())
    fn = helper.make_function("local", "Linear", ["a"], ["b"],
                              [helper.make_node("Constant", [], ["w"], value=w), helper.make_node("MatMul", ["a", "w"], ["b"])],
                              opset_imports=[helper.make_opsetid("", 21)])
    graph = helper.make_graph([helper.make_node("Linear", ["x"], ["y"], domain="local")], "g",
                              [value("x", ["N", 256])], [value("y", ["N", 64])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("local", 1)],
                             ir_version=10, functions=[fn])


def test_a_model_local_function_is_no_custom_op(tmp_path):
    """onnxruntime runs model-local functions itself: validation used to be skipped as for a custom op library."""
    path = tmp_path / "m.onnx"
    onnx.save(_local_function_model(), path)
    report = compress_file(path, tmp_path / "out.onnx", "share")
    assert report.validation is not None and not any("custom ops" in n for n in report.notes), report.notes


def test_a_string_output_is_compared_exactly(tmp_path):
    """A string output beside the float one (a label list) crashed the comparison (float('a'), exit 1)."""
    model = gemm(k=256, n=64)
    model.graph.initializer.append(helper.make_tensor("S", TensorProto.STRING, [3], [b"a", b"b", b"c"]))
    model.graph.node.append(helper.make_node("Identity", ["S"], ["labels_out"]))
    model.graph.output.append(helper.make_tensor_value_info("labels_out", TensorProto.STRING, [3]))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    report = compress_file(path, tmp_path / "out.onnx", "share")
    strings = next(m for m in report.validation.outputs if m.name == "labels_out")
    assert strings.max_abs == 0.0


def test_inspect_counts_distinct_values_only_up_to_a_limit(tmp_path, capsys, monkeypatch):
    """inspect sorted a copy of every weight for its distinct count: a 3 GB weight (a sparse data file) took a
    minute and 7.7 GB. Above the limit the count is '-' and zeros are counted by chunks."""
    import onnxcompress.api as api
    from onnxcompress.cli import main

    model = gemm(k=256, n=64)
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[:, :64] = 0
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W"))
    onnx.save(model, tmp_path / "m.onnx")
    assert api.inspect(tmp_path / "m.onnx")["weights"][0]["distinct"] == np.unique(w).size
    monkeypatch.setattr(api, "DISTINCT_LIMIT", 1000)
    row = api.inspect(tmp_path / "m.onnx")["weights"][0]
    assert row["distinct"] is None and row["sparsity"] == 0.25
    assert api._zero_fraction(w, chunk=7) == 0.25
    assert main(["inspect", str(tmp_path / "m.onnx")]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("W "))
    assert " - " in line and "None" not in line


def test_an_error_quoting_a_huge_declaration_is_a_short_line(tmp_path, capsys):
    """A .npy header declaring a 4000-digit dimension made an 8 KB error line; capped, with what was left off."""
    from onnxcompress.cli import MAX_ERROR_CHARS

    onnx.save(gemm(k=64, n=32), tmp_path / "m.onnx")
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (" + b"9" * 4000 + b", 64), }\n"
    (tmp_path / "x.npy").write_bytes(b"\x93NUMPY\x02\x00" + len(header).to_bytes(4, "little") + header)
    before = _snapshot(tmp_path)
    err = cli_error(capsys, ["compress", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "--data",
                             str(tmp_path / "x.npy")])
    assert _snapshot(tmp_path) == before
    assert len(err) < MAX_ERROR_CHARS + 100 and err.endswith("more characters)") and "x.npy" in err, err[-200:]


@pytest.mark.parametrize("case", ["unknown-type", "raw-longer", "values-longer"])
def test_an_in_memory_model_is_checked_as_a_file_is(case):
    """The Python API took a ModelProto without load_model's checks: KeyError (inspect) and ValueError
    (compress of a tensor with segments) instead of ModelError."""
    from onnxcompress import api
    from onnxcompress.errors import ModelError

    model = _corrupt(case)
    for call in (lambda: api.inspect(model), lambda: api.compress(model, "share"), lambda: api.validate(model, model)):
        with pytest.raises(ModelError, match="'W'"):
            call()


def test_an_in_memory_model_is_normalized_on_a_copy():
    """What load_model rewrites (segments, sparse initializers) is rewritten on a copy: the caller's model stays."""
    from onnxcompress import api

    model = gemm(k=256, n=64)
    model.graph.initializer[0].segment.begin = 0
    kept = model.SerializeToString()
    out, report = api.compress(model, "share")
    assert model.SerializeToString() == kept and report.validation is not None
    feeds = random_feeds(gemm(k=256, n=64), n=4)
    _close(run(out, feeds)[0], run(gemm(k=256, n=64), feeds)[0])


def test_api_data_as_one_array_or_a_list_that_is_no_feeds():
    """A bare array was a TypeError ('dictionary update sequence'); now it is the only input's samples, like a
    single .npy file; a list of arrays is a DataError naming what a feed is."""
    from onnxcompress import api
    from onnxcompress.errors import DataError

    model = gemm(k=256, n=64)
    x = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    _, report = api.compress(model, "share", x)
    assert report.validation.samples == 8
    with pytest.raises(DataError, match="each feed must be a dict"):
        api.compress(model, "share", [x[:2], x[2:4]])
    two = onnx.helper.make_model(onnx.helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])], "g", [value("a", [2]), value("b", [2])], [value("y", [2])]),
        opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    with pytest.raises(DataError, match="single array"):
        api.compress(two, "share", np.zeros((4, 2), np.float32))


def test_weight_names_in_plots_are_text_and_the_figure_is_bounded(tmp_path):
    """A weight named 'W$\\frac{1}{$x^{' made matplotlib parse TeX and fail at savefig (exit 1 after the whole
    search); a model with hundreds of searched weights made a figure 3.2 inches a weight wide."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from onnxcompress import plots

    names = ["W$\\frac{1}{$x^{", "\x1b[31m" + "n" * 300] + [f"w{i}" for i in range(plots.MAX_PANELS + 40)]
    rows = [{"bits": b, "sparsity": 0.0, "cost": 1.0 / b, "error": None} for b in (2, 4, 8)]
    summary = {"sensitivity": {n: rows for n in names}, "choices": {n: {"bits": 4, "sparsity": 0.0} for n in names}}
    path = plots._sensitivity(plt, summary, tmp_path / "s.png", lambda p: p)
    assert path.stat().st_size > 0
    from PIL import Image

    assert Image.open(path).size[0] < 400 * (plots.MAX_PANELS + 1)  # 72 panels uncapped: ~21,000 px


@pytest.mark.parametrize("command", ["compress", "validate"])
def test_an_op_of_our_domain_we_do_not_define_is_named(tmp_path, capsys, command):
    """An ai.onnxcompress op that is not ours was reported as 'ops have non-constant inputs'."""
    model = gemm(k=64, n=32)
    w = model.graph.initializer[0]
    model.graph.initializer.remove(w)
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(16, np.uint8), "blob"))
    model.graph.node.insert(0, helper.make_node("DeleteFiles", ["blob"], ["W"], domain="ai.onnxcompress"))
    model.opset_import.append(helper.make_opsetid("ai.onnxcompress", 1))
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    before = _snapshot(tmp_path)
    err = cli_error(capsys, COMMANDS[command](path))
    assert _snapshot(tmp_path) == before
    assert "['DeleteFiles']" in err and "does not define" in err, err


def _bfloat16_external(tmp_path, **entries):
    rng = np.random.default_rng(0)
    f = (rng.standard_normal(256 * 64) * 0.1).astype(np.float32)
    t = onnx.TensorProto()
    t.name, t.data_type, t.dims[:] = "W", TensorProto.BFLOAT16, [256, 64]
    t.raw_data = (f.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    nodes = [helper.make_node("Cast", ["W"], ["Wf"], to=TensorProto.FLOAT), helper.make_node("MatMul", ["x", "Wf"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [value("x", ["N", 256])], [value("y", ["N", 64])], [t]),
                              opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    path = tmp_path / "m.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    proto = onnx.load(path, load_external_data=False)
    kept = [(e.key, e.value) for e in proto.graph.initializer[0].external_data if e.key not in entries or entries[e.key]]
    del proto.graph.initializer[0].external_data[:]
    for key, text in kept:
        entry = proto.graph.initializer[0].external_data.add()
        entry.key, entry.value = key, entries.get(key) or text
    path.write_bytes(proto.SerializeToString())
    return path


@pytest.mark.parametrize("case", ["length-short", "no-length-file-longer"])
@pytest.mark.parametrize("command", ["inspect", "compress"])
def test_a_streamed_tensor_whose_bytes_do_not_fit_its_shape_is_refused(tmp_path, capsys, monkeypatch, case, command):
    """A streamed bfloat16 weight (read through onnx, not numpy) 6 bytes short was a ValueError ('cannot reshape',
    exit 1); its external length is now checked at load, and the bytes read when the length is left out."""
    from onnxcompress.graph import model as model_io

    monkeypatch.setattr(model_io, "STREAM_THRESHOLD", 0)
    if case == "length-short":
        path = _bfloat16_external(tmp_path, length="32762")
    else:
        path = _bfloat16_external(tmp_path, length=None)
        with open(tmp_path / "m.onnx.data", "ab") as f:
            f.write(bytes(6))
    before = _snapshot(tmp_path)
    err = cli_error(capsys, COMMANDS[command](path))
    assert _snapshot(tmp_path) == before
    assert "'W'" in err and "32768" in err, err
