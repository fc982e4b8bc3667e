"""Hostile inputs, issue #14 items 6-9: allocation bombs, valid but unusual inputs, data wrong in
content, packed models `unpack` cannot run. Each failure is exit 2 with one line, no traceback, the
input unchanged and nothing written (see test_hostile.py for the helpers' contract).

The bombs run in one subprocess whose address space is capped at 2 GiB (RLIMIT_AS), so an
allocation sized by a declaration fails the test as a MemoryError instead of swapping the machine.
"""
import json
import subprocess
import sys
import zipfile
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.api import compress_file
from onnxcompress.formats import packed
from onnxcompress.formats.codecs import encode
from onnxcompress.formats.codecs._wire import uvarint
from onnxcompress.formats.codecs.choice import decode_any
from onnxcompress.formats.codecs.frame import pack_streams
from onnxcompress.errors import CodecError
from onnxcompress.numerics.limits import MAX_SYNTH_ELEMENTS, MAX_TENSOR_ELEMENTS
from test_hostile import _compresses, _fails_cleanly, _snapshot
from tiny import cli_error, gemm, make_model, random_feeds, run, value, weights

# ---- helpers ------------------------------------------------------------------------------------

_DRIVER = """
import io, json, resource, sys, contextlib
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from onnxcompress.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except BaseException as e:  # the test reports it
            code = f"{type(e).__name__}: {e}"
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def _cli_under_2gib(cwd: Path, *argvs: list[str]) -> list[tuple[object, str]]:
    """Run each argv through the CLI in one subprocess capped at 2 GiB of address space."""
    proc = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(list(argvs))], cwd=cwd, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [tuple(r) for r in json.loads(proc.stdout.strip().splitlines()[-1])]


def _one_line(code, err: str) -> str:
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxcompress: error:"), err
    assert "Traceback" not in err and "MemoryError" not in err and "out of memory" not in err, err
    return lines[0]


def _tagged(method_stream: bytes, tag: int = 1) -> bytes:
    body = bytes([tag]) + method_stream
    return body + zlib.crc32(body).to_bytes(4, "little")


def _header(shape, *, elem=TensorProto.FLOAT, bits=4, csr=False, index_bits=0) -> bytes:
    head = [packed.FORMAT_VERSION, elem, len(shape), *shape, bits, int(csr), index_bits, 0, 0]
    return b"".join(uvarint(v) for v in head)


def _blob_model(blob: bytes, shape=(32, 64), *, fed_by_input: bool = False) -> onnx.ModelProto:
    """x [N, 64] -> Gemm(x, DecodeWeight(blob)^T) -> y [N, 32], the blob an initializer (or a graph input)."""
    nodes = [helper.make_node(packed.OP_TYPE, ["W~"], ["W"], domain="ai.onnxcompress"),
             helper.make_node("Gemm", ["x", "W"], ["y"], transB=1, name="fc")]
    inputs = [value("x", ["N", 64])]
    tensor = numpy_helper.from_array(np.frombuffer(blob, np.uint8).copy(), "W~")
    if fed_by_input:
        inputs.append(helper.make_tensor_value_info("W~", TensorProto.UINT8, [len(blob)]))
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, [value("y", ["N", shape[0]])],
                                                [] if fed_by_input else [tensor]),
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("ai.onnxcompress", 1)])
    model.ir_version = 10
    return model


def _good_shared(shape=(32, 64)) -> packed.SharedWeight:
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, size=shape).astype(np.uint8)
    return packed.SharedWeight(name="W", shape=shape, dtype=np.dtype(np.float32), codes=codes,
                               codebook=np.linspace(-1, 1, 16).astype(np.float32), bits=4)


# ---- 6. allocations sized by declarations -------------------------------------------------------

# a Huffman stream of 2**32 copies of symbol 0 is 9 bytes: count, alphabet, the one-symbol set
_HUGE_CONSTANT = uvarint(1 << 32) + uvarint(16) + b"\x01" + uvarint(1) + b"\x00"


def test_decoder_bombs_refused_before_allocating(tmp_path):
    """Every codec, fed a header declaring far more than its bytes hold, raises CodecError under 2 GiB."""
    script = f"""
import resource, json
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
import numpy as np
from onnxcompress.formats.codecs import huffman, ans, raw, relidx, bitpack, frame
from onnxcompress.formats.codecs.choice import decode_any
from onnxcompress.formats.codecs._wire import uvarint
from onnxcompress.formats import packed
big = 1 << 32
cases = {{
    "huffman": lambda: huffman.decode({_HUGE_CONSTANT!r}),
    "ans": lambda: ans.decode({_HUGE_CONSTANT!r}),
    "raw-one-symbol": lambda: raw.decode(uvarint(big) + uvarint(1)),
    "raw": lambda: raw.decode(uvarint(big) + uvarint(16) + b"\\x00" * 4),
    "tagged": lambda: decode_any({_tagged(_HUGE_CONSTANT)!r}),
    "relidx": lambda: relidx.decode(np.ones(3, np.uint32), np.ones(3, np.uint8), 1 << 34),
    "bitpack": lambda: bitpack.unpack(b"\\x00" * 4, 4, big),
    "frame": lambda: frame.unpack_streams(b"OXC1\\x01" + uvarint(big)),
    "blob-dense": lambda: packed.read_blob({pack_streams({"h": _header((32, 64)), "b": bytes(64), "c": _tagged(_HUGE_CONSTANT)})!r}),
    "blob-csr": lambda: packed.read_blob({pack_streams({"h": _header((131072, 131072), csr=True, index_bits=8), "b": bytes(64), "i": encode("raw", np.zeros(0, np.int64), 256), "v": encode("raw", np.zeros(0, np.int64), 16)})!r}),
}}
out = {{}}
for name, fn in cases.items():
    try:
        fn()
        out[name] = "decoded"
    except Exception as e:
        out[name] = type(e).__name__ + ": " + str(e)
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout)
    for name, outcome in results.items():
        assert outcome.startswith("CodecError"), (name, outcome)
    assert "131072" in results["blob-csr"] and str(MAX_TENSOR_ELEMENTS) in results["blob-csr"]
    assert "4294967296" in results["blob-dense"]


def _write_npz_bomb(path: Path) -> None:
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000, 64), }"
    header += b" " * (118 - len(header)) + b"\n"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + bytes(64))


def test_cli_bombs_under_2gib(tmp_path):
    """The issue's bombs through the CLI: packed code stream, CSR header, npz member, declared input, --shape."""
    onnx.save(gemm(k=64, n=32), tmp_path / "m.onnx")
    dense = pack_streams({"h": _header((32, 64)), "b": bytes(64), "c": _tagged(_HUGE_CONSTANT)})
    onnx.save(_blob_model(dense), tmp_path / "dense_bomb.onnx")
    csr = pack_streams({"h": _header((131072, 131072), csr=True, index_bits=8), "b": bytes(64),
                        "i": encode("raw", np.zeros(0, np.int64), 256), "v": encode("raw", np.zeros(0, np.int64), 16)})
    onnx.save(_blob_model(csr, (131072, 131072)), tmp_path / "csr_bomb.onnx")
    _write_npz_bomb(tmp_path / "bomb.npz")
    big_input = gemm(k=64, n=32)
    big_input.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 10**9
    onnx.save(big_input, tmp_path / "big_input.onnx")
    sparse = gemm(k=64, n=32)
    w = sparse.graph.initializer[0]
    sparse.graph.sparse_initializer.append(helper.make_sparse_tensor(
        numpy_helper.from_array(np.zeros(0, np.float32), "W"), numpy_helper.from_array(np.zeros(0, np.int64), "i"),
        [1 << 20, 1 << 20]))
    sparse.graph.initializer.remove(w)
    onnx.save(sparse, tmp_path / "sparse_bomb.onnx")
    before = _snapshot(tmp_path)
    out = ["-o", "out.onnx"]
    cases = {
        "unpack-dense": (["unpack", "dense_bomb.onnx", *out], "4294967296"),
        "inspect-dense": (["inspect", "dense_bomb.onnx"], "4294967296"),
        "unpack-csr": (["unpack", "csr_bomb.onnx", *out], "131072"),
        "compress-csr": (["compress", "csr_bomb.onnx", *out], "131072"),
        "npz": (["compress", "m.onnx", *out, "--data", "bomb.npz"], "1000000000000"),
        "validate-npz": (["validate", "m.onnx", "m.onnx", "--data", "bomb.npz"], "1000000000000"),
        "declared-input": (["compress", "big_input.onnx", *out], "give --data"),
        "shape-huge": (["compress", "m.onnx", *out, "--shape", "x=100000000,64"], "--shape x=100000000,64"),
        "shape-negative": (["compress", "m.onnx", *out, "--shape", "x=-1,64"], "at least 1"),
        "shape-zero": (["validate", "m.onnx", "m.onnx", "--shape", "x=0,64"], "at least 1"),
        "sparse-initializer": (["compress", "sparse_bomb.onnx", *out], "sparse initializer 'W'"),
    }
    results = _cli_under_2gib(tmp_path, *(argv for argv, _ in cases.values()))
    for (name, (_, expected)), (code, err) in zip(cases.items(), results):
        line = _one_line(code, err)
        assert expected in line, (name, line)
    assert _snapshot(tmp_path) == before


def test_synthesis_limit_is_per_feed_and_documented():
    from onnxcompress.graph.data import InputSpec
    from onnxcompress.graph.synthesized import synthesize
    from onnxcompress.errors import DataError

    spec = InputSpec("x", np.dtype(np.float32), ("N", 64))
    assert synthesize([spec], shapes={"x": (MAX_SYNTH_ELEMENTS // 64, 64)}, n=1).feed(0, [spec])["x"].size \
        == MAX_SYNTH_ELEMENTS
    with pytest.raises(DataError, match="--shape x=.*more than"):
        synthesize([spec], shapes={"x": (MAX_SYNTH_ELEMENTS // 64 + 1, 64)}, n=1)
    with pytest.raises(DataError, match="not an input"):
        synthesize([spec], shapes={"y": (1, 64)})
    with pytest.raises(DataError, match="does not fit"):
        synthesize([spec], shapes={"x": (1, 63)})
    readme = (Path(__file__).parents[1] / "docs" / "usage.md").read_text()  # where the README sends users for the limits
    assert str(MAX_TENSOR_ELEMENTS) in readme.replace(",", "") or "2^28" in readme
    assert "2^23" in readme


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tag=st.integers(0, 2), body=st.binary(max_size=64))
def test_any_stream_with_a_valid_crc_decodes_small_or_raises(tag, body):
    """Hostile bytes behind a valid tag and CRC: CodecError, or a result no larger than the limit."""
    try:
        out = decode_any(_tagged(body, tag))
    except CodecError:
        return
    assert out.size <= MAX_TENSOR_ELEMENTS


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(head=st.lists(st.integers(0, 1 << 40), min_size=1, max_size=12), code=st.binary(max_size=32),
       book=st.integers(0, 64))
def test_any_blob_header_with_valid_crcs_reads_or_raises(head, code, book):
    """A blob whose frame CRCs are valid but whose header and code stream are arbitrary: CodecError or a
    weight whose codes match its declared shape."""
    blob = pack_streams({"h": b"".join(uvarint(v) for v in head), "b": bytes(4 * book), "c": _tagged(code)})
    try:
        shared = packed.read_blob(blob)
    except CodecError:
        return
    assert shared.codes.shape == tuple(shared.shape)


# ---- 7. valid but unusual inputs ----------------------------------------------------------------

def test_single_npy_file_as_data(tmp_path, capsys):
    model = gemm(k=64, n=32)
    onnx.save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    np.save(tmp_path / "calib.npy", x)
    from onnxcompress.cli import main

    assert main(["compress", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "--data",
                 str(tmp_path / "calib.npy"), "--validate", "none"]) == 0
    assert (tmp_path / "o.onnx").exists()


def test_single_npy_for_a_model_with_two_inputs_names_the_choice(tmp_path, capsys):
    nodes = [helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("MatMul", ["s", "W"], ["y"])]
    model = make_model(nodes, [value("a", ["N", 64]), value("b", ["N", 64])], [value("y", ["N", 32])],
                       [numpy_helper.from_array(np.ones((64, 32), np.float32), "W")])
    onnx.save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "calib.npy", np.zeros((4, 64), np.float32))
    err = _fails_cleanly(capsys, tmp_path, tmp_path / "m.onnx", "--data", str(tmp_path / "calib.npy"))
    assert "single array" in err and "['a', 'b']" in err


@pytest.mark.parametrize("kind", ["folder", "not-utf8"])
def test_recipe_that_is_a_folder_or_not_utf8(tmp_path, capsys, kind):
    onnx.save(gemm(), tmp_path / "m.onnx")
    recipe = tmp_path / "r.yaml"
    if kind == "folder":
        recipe.mkdir()
    else:
        recipe.write_bytes(b"passes:\n  - share: {}\n# \xff\xfe\n")
    err = _fails_cleanly(capsys, tmp_path, tmp_path / "m.onnx", "--recipe", str(recipe))
    assert ("not a file" if kind == "folder" else "not UTF-8") in err


def test_sparse_initializer_is_densified_and_compressed(tmp_path):
    model = gemm(k=64, n=32)
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[np.abs(w) < 0.05] = 0
    index = np.flatnonzero(w)
    sparse = onnx.ModelProto()
    sparse.CopyFrom(model)
    del sparse.graph.initializer[0]
    sparse.graph.sparse_initializer.append(helper.make_sparse_tensor(
        numpy_helper.from_array(w.ravel()[index], "W"), numpy_helper.from_array(index.astype(np.int64), "W_i"),
        list(w.shape)))
    dense = onnx.ModelProto()
    dense.CopyFrom(model)
    dense.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W"))
    out, report = _compresses(tmp_path, sparse, "share", validate="end")
    assert not out.graph.sparse_initializer and "W" not in {t.name for t in out.graph.initializer}
    _assert_close(dense, out)


def _assert_close(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> None:
    """5-bit sharing of a Gaussian weight: ~25 dB at the output."""
    feeds = random_feeds(reference, n=8)
    ref, got = run(reference, feeds)[0], run(candidate, feeds)[0]
    assert 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2)) > 20


@pytest.mark.parametrize("opset", [1, 6])
def test_opset_below_the_supported_range_is_refused_early(tmp_path, capsys, opset):
    model = gemm(k=64, n=32)
    model.opset_import[0].version = opset
    onnx.save(model, tmp_path / "m.onnx")
    err = _fails_cleanly(capsys, tmp_path, tmp_path / "m.onnx")
    assert f"opset {opset}" in err and "supports opsets 7 to" in err


def test_lowest_supported_opset_compresses(tmp_path):
    model = gemm(k=64, n=32, opset=7)
    model.ir_version = 7
    out, _ = _compresses(tmp_path, model, "share", validate="end")
    assert out.opset_import[0].version == 7
    _assert_close(model, out)


def test_graph_output_with_a_type_but_no_shape(tmp_path):
    model = gemm(k=64, n=32)
    model.graph.output[0].type.tensor_type.ClearField("shape")
    out, report = _compresses(tmp_path, model, "share", validate="end")
    assert report.validation is not None
    assert out.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 32  # the inferred shape
    _assert_close(gemm(k=64, n=32), out)


def _unranked_input(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its input's shape and its output's shape removed: onnxruntime runs it, onnx's checker
    refuses it ("Field 'shape' of 'type' is required"), and no output shape can be inferred."""
    model.graph.input[0].type.tensor_type.ClearField("shape")
    model.graph.output[0].type.tensor_type.ClearField("shape")
    return model


@pytest.mark.parametrize("recipe", ["share", "int8", "deep-compression"])
def test_input_of_unknown_rank_compresses_with_data(tmp_path, recipe):
    model = _unranked_input(gemm(k=64, n=32))
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32))
    path, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, path)
    original = path.read_bytes()
    report = compress_file(path, out, recipe, data=str(data), validate="end")
    assert path.read_bytes() == original and report.validation is not None
    result = onnx.load(out)
    assert not result.graph.input[0].type.tensor_type.HasField("shape")  # kept as the user's model has it
    if recipe != "deep-compression":  # a packed model runs through our op backend, checked by validate above
        _assert_close(gemm(k=64, n=32), result)


def test_input_of_unknown_rank_without_data_asks_for_a_shape(tmp_path, capsys):
    onnx.save(_unranked_input(gemm(k=64, n=32)), tmp_path / "m.onnx")
    err = _fails_cleanly(capsys, tmp_path, tmp_path / "m.onnx")
    assert "input 'x' has no declared shape" in err and "--shape" in err


def test_structure_check_of_a_model_with_unranked_values():
    from onnxcompress.graph.external import check_model

    model = _unranked_input(gemm(k=64, n=32))
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    check_model(model)  # accepted: onnxruntime runs it
    broken = _unranked_input(gemm(k=64, n=32))
    broken.graph.node[0].input[0] = "nowhere"  # the rest of the structure is still checked
    with pytest.raises(onnx.checker.ValidationError):
        check_model(broken)


def _masked_models() -> dict[str, onnx.ModelProto]:
    """A scalar -inf in a Max (a file-type classifier's clamp), and a -inf causal mask added to scores."""
    base = gemm(k=64, n=32)
    w, b = base.graph.initializer
    floor = numpy_helper.from_array(np.array(-np.inf, np.float32), "floor")
    clamp = make_model([helper.make_node("Gemm", ["x", "W", "b"], ["z"], transB=1, name="fc"),
                        helper.make_node("Max", ["z", "floor"], ["y"], name="clamp")],
                       [value("x", ["N", 64])], [value("y", ["N", 32])], [w, b, floor])
    mask = np.where(np.tri(32, dtype=bool), 0, -np.inf).astype(np.float32)
    scores = make_model([helper.make_node("Gemm", ["x", "W", "b"], ["z"], transB=1, name="fc"),
                         helper.make_node("Unsqueeze", ["z", "axis"], ["z3"]),
                         helper.make_node("Add", ["z3", "mask"], ["m"]),
                         helper.make_node("Softmax", ["m"], ["y"], axis=-1)],
                        [value("x", ["N", 64])], [value("y", ["N", 32, 32])],
                        [w, b, numpy_helper.from_array(mask, "mask"),
                         numpy_helper.from_array(np.array([1], np.int64), "axis")])
    return {"floor": clamp, "mask": scores}


@pytest.mark.parametrize("recipe", ["share", "share-4bit", "int8", "int8-weights", "int4-weights", "deep-compression",
                                    "prune", "deep-compression-portable"])
@pytest.mark.parametrize("which", ["floor", "mask"])
def test_minus_inf_constants_stay_float_in_every_recipe(tmp_path, recipe, which):
    model = _masked_models()[which]
    data = {"x": np.random.default_rng(1).standard_normal((32, 64)).astype(np.float32)}
    out, report = _compresses(tmp_path, model, recipe, data=data, validate="end")
    kept = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    np.testing.assert_array_equal(kept[which], numpy_helper.to_array(
        next(t for t in model.graph.initializer if t.name == which)))
    assert any(which in note and "NaN or Inf" in note for note in report.notes)
    assert any(r.name == which and "kept float" in r.action for r in report.weights)
    from onnxcompress.runtime.sessions import to_runnable

    feeds = {"x": data["x"][:4]}
    ref, got = run(model, feeds)[0], run(to_runnable(out), feeds)[0]
    np.testing.assert_array_equal(np.isfinite(ref), np.isfinite(got))  # the -inf land where they did


# ---- 8. data wrong in content ---------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("form", ["npz", "folder-npy", "feed-folder"])
def test_nan_or_inf_in_data_is_named_at_load(tmp_path, capsys, bad, form):
    onnx.save(gemm(k=64, n=32), tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    x[5, 7] = bad
    data = tmp_path / "data"
    if form == "npz":
        data = tmp_path / "calib.npz"
        np.savez(data, x=x)
    else:
        data.mkdir()
        if form == "folder-npy":
            np.save(data / "x.npy", x)
        else:
            for i in range(8):
                np.savez(data / f"{i:03d}.npz", x=x[2 * i:2 * i + 2])
    err = _fails_cleanly(capsys, tmp_path, tmp_path / "m.onnx", "--data", str(data))
    assert "NaN or Inf" in err and "'x'" in err and "sample_weight" not in err


@pytest.mark.parametrize("where", ["file", "folder"])
@pytest.mark.parametrize("content", [b"hello, not a zip", b"", b"\x80\x04K\x01."])
def test_non_npz_named_npz_is_not_called_pickled(tmp_path, capsys, where, content):
    onnx.save(gemm(k=64, n=32), tmp_path / "m.onnx")
    if where == "file":
        data = tmp_path / "calib.npz"
    else:
        (tmp_path / "d").mkdir()
        data = tmp_path / "d"
    (data if where == "file" else data / "000.npz").write_bytes(content)
    err = _fails_cleanly(capsys, tmp_path, tmp_path / "m.onnx", "--data", str(data))
    assert "pickle" not in err.lower() and "allow_pickle" not in err
    assert "not an .npz" in err or "neither an .npz" in err


def test_object_array_in_npz_is_refused_without_unpickling(tmp_path, capsys):
    onnx.save(gemm(k=64, n=32), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=np.array([{"a": 1}], dtype=object))
    err = _fails_cleanly(capsys, tmp_path, tmp_path / "m.onnx", "--data", str(tmp_path / "calib.npz"))
    assert "Python objects" in err and "allow_pickle" not in err


def test_npz_member_shorter_than_its_header(tmp_path, capsys):
    onnx.save(gemm(k=64, n=32), tmp_path / "m.onnx")
    np.savez(tmp_path / "full.npz", x=np.zeros((16, 64), np.float32))
    with zipfile.ZipFile(tmp_path / "full.npz") as archive:
        raw = archive.read("x.npy")
    with zipfile.ZipFile(tmp_path / "calib.npz", "w") as archive:
        archive.writestr("x.npy", raw[:-100])
    (tmp_path / "full.npz").unlink()
    err = _fails_cleanly(capsys, tmp_path, tmp_path / "m.onnx", "--data", str(tmp_path / "calib.npz"))
    assert "declares shape (16, 64)" in err


def test_symbolic_dims_without_data_name_shape_and_print_nothing_else(tmp_path):
    """Run as a user would (a subprocess): a model no size runs (x feeds two MatMuls that want K=64 and
    K=48) is refused before any work; stderr holds our one line, no onnxruntime log, no warning."""
    rng = np.random.default_rng(0)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("MatMul", ["x", "w2"], ["b"]),
         helper.make_node("Add", ["a", "b"], ["y"])],
        [value("x", [1, "K"])], [value("y", [1, 8])],
        [numpy_helper.from_array(weights(rng, 64, 8), "w1"), numpy_helper.from_array(weights(rng, 48, 8), "w2")])
    onnx.save(model, tmp_path / "m.onnx")
    before = _snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "onnxcompress.cli", "compress", "m.onnx", "-o", "o.onnx"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    line = _one_line(proc.returncode, proc.stderr)
    assert "--shape x=" in line and "in pass" not in line
    assert _snapshot(tmp_path) == before


# ---- 9. unpack refuses what it cannot run -----------------------------------------------------------

def _unpack_fails(capsys, tmp_path: Path, model: onnx.ModelProto) -> str:
    path = tmp_path / "packed.onnx"
    onnx.save(model, path)
    before = _snapshot(tmp_path)
    err = cli_error(capsys, ["unpack", str(path), "-o", str(tmp_path / "out.onnx")])
    assert _snapshot(tmp_path) == before
    return err


def test_unpack_good_blob_works(tmp_path, capsys):
    from onnxcompress.cli import main

    onnx.save(_blob_model(packed.write_blob(_good_shared()).blob), tmp_path / "p.onnx")
    assert main(["unpack", str(tmp_path / "p.onnx"), "-o", str(tmp_path / "o.onnx")]) == 0
    out = onnx.load(tmp_path / "o.onnx")
    assert not any(n.domain == "ai.onnxcompress" for n in out.graph.node)
    feeds = random_feeds(out, n=4)
    want = feeds["x"] @ _good_shared().decode().T
    np.testing.assert_allclose(run(out, feeds)[0], want, rtol=1e-5, atol=1e-5)


def test_unpack_refuses_swapped_dimensions(tmp_path, capsys):
    good = _good_shared()
    swapped = replace(good, shape=(64, 32), codes=good.codes.reshape(64, 32))
    err = _unpack_fails(capsys, tmp_path, _blob_model(packed.write_blob(swapped).blob))
    assert "unpacked model" in err or "declares shape" in err


def test_unpack_refuses_a_blob_wired_to_the_wrong_node(tmp_path, capsys):
    """Two layers; the second layer's DecodeWeight reads the first layer's blob."""
    first = packed.write_blob(_good_shared()).blob
    rng = np.random.default_rng(1)
    second = packed.write_blob(replace(_good_shared((16, 32)), codes=rng.integers(0, 16, (16, 32)).astype(np.uint8)))
    nodes = [helper.make_node(packed.OP_TYPE, ["A~"], ["A"], domain="ai.onnxcompress"),
             helper.make_node(packed.OP_TYPE, ["A~"], ["B"], domain="ai.onnxcompress"),
             helper.make_node("Gemm", ["x", "A"], ["h"], transB=1),
             helper.make_node("Gemm", ["h", "B"], ["y"], transB=1)]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [value("x", ["N", 64])], [value("y", ["N", 16])],
                          [numpy_helper.from_array(np.frombuffer(first, np.uint8).copy(), "A~"),
                           numpy_helper.from_array(np.frombuffer(second.blob, np.uint8).copy(), "B~")]),
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("ai.onnxcompress", 1)])
    err = _unpack_fails(capsys, tmp_path, model)
    assert "unpacked model" in err


def test_unpack_refuses_a_non_float_element_type(tmp_path, capsys):
    blob = packed.write_blob(replace(_good_shared(), dtype=np.dtype(np.int64))).blob
    err = _unpack_fails(capsys, tmp_path, _blob_model(blob))
    assert "not a float type" in err


def test_unpack_float16_header_gives_float32_like_decode_weight(tmp_path, capsys):
    from onnxcompress.cli import main

    blob = packed.write_blob(replace(_good_shared(), dtype=np.dtype(np.float16))).blob
    onnx.save(_blob_model(blob), tmp_path / "p.onnx")
    assert main(["unpack", str(tmp_path / "p.onnx"), "-o", str(tmp_path / "o.onnx")]) == 0
    onnx.checker.check_model(str(tmp_path / "o.onnx"), full_check=True)


def test_unpack_refuses_a_decode_weight_fed_by_a_graph_input(tmp_path, capsys):
    err = _unpack_fails(capsys, tmp_path, _blob_model(packed.write_blob(_good_shared()).blob, fed_by_input=True))
    assert "constant blob" in err


def test_unpack_refuses_a_blob_shape_against_a_declared_value_info(tmp_path, capsys):
    model = _blob_model(packed.write_blob(_good_shared()).blob)
    model.graph.value_info.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [64, 32]))
    err = _unpack_fails(capsys, tmp_path, model)
    assert "declares shape [32, 64]" in err


def test_huffman_decode_table_is_bounded_by_the_stream():
    """25 symbols with code lengths 1, 2, ..., 24, 24 form a complete code whose decode table has 2**24
    entries; a few bytes declaring it are refused before the table is built."""
    from onnxcompress.formats.codecs import huffman
    from onnxcompress.formats.codecs._wire import write_symbol_set
    from onnxcompress.formats.codecs.bitpack import pack

    lengths = np.array([*range(1, 25), 24])
    stream = (uvarint(2) + uvarint(25) + write_symbol_set(np.arange(25), 25) + pack(lengths, 5) + uvarint(1)
              + uvarint(2) + uvarint(1) + b"\x01" + b"\x00" * 2)
    with pytest.raises(CodecError, match="not what the encoder writes"):
        huffman.decode(stream)


def test_npz_member_declaring_more_bytes_than_the_archive_holds(tmp_path, capsys):
    """A stored member whose zip entry and .npy header both declare 1 GiB, in a file of a few hundred bytes."""
    onnx.save(gemm(k=64, n=32), tmp_path / "m.onnx")
    header = b"{'descr': '<f8', 'fortran_order': False, 'shape': (2097152, 64), }"
    header += b" " * (118 - len(header)) + b"\n"
    raw = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + bytes(64)
    with zipfile.ZipFile(tmp_path / "calib.npz", "w") as archive:
        archive.writestr("x.npy", raw)
    data = bytearray((tmp_path / "calib.npz").read_bytes())
    declared = (len(raw) - 64 + (1 << 30)).to_bytes(4, "little")
    for at in (i for i in range(len(data) - 4) if data[i:i + 4] in (b"PK\x03\x04", b"PK\x01\x02")):
        offset = at + (18 if data[at + 2] == 3 else 20)  # compressed and uncompressed sizes
        data[offset:offset + 4] = data[offset + 4:offset + 8] = declared
    (tmp_path / "calib.npz").write_bytes(bytes(data))
    err = _fails_cleanly(capsys, tmp_path, tmp_path / "m.onnx", "--data", str(tmp_path / "calib.npz"))
    assert "array 'x' declares 1073741" in err and "stored bytes can hold" in err


def test_synthesis_limit_counts_every_input_of_a_feed():
    from onnxcompress.graph.data import InputSpec
    from onnxcompress.graph.synthesized import synthesize
    from onnxcompress.errors import DataError

    specs = [InputSpec(f"x{i}", np.dtype(np.float32), (MAX_SYNTH_ELEMENTS // 4,)) for i in range(5)]
    with pytest.raises(DataError, match="input 'x4'"):
        synthesize(specs, n=1)


def test_ans_decodes_by_chunks_exactly():
    """ANS decodes into the output by chunks of 2**20 symbols (never all int32 indices at once)."""
    from onnxcompress.formats.codecs import ans

    rng = np.random.default_rng(0)
    s = rng.integers(0, 32, (1 << 20) * 2 + 5)
    s[rng.random(s.size) < 0.9] = 0
    out = ans.decode(ans.encode(s, 32))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, s)
