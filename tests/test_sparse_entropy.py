"""The sparse and entropy passes on tiny hand-built graphs (Gemm transB=1, MatMul, Conv), and the
deep-compression recipe end to end on a tiny Conv -> Gemm classifier."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import tiny
from onnxcompress import api
from onnxcompress.runtime import sessions as runtime
from onnxcompress.errors import PreconditionError
from onnxcompress.graph.edit import DOMAIN
from onnxcompress.pipeline.manager import Context
from onnxcompress.passes.entropy import EntropyPass
from onnxcompress.passes.share import SharePass
from onnxcompress.passes.sparse import SparsePass
from onnxcompress.graph.weights import get_array, set_array


def magnitude_prune(ctx: Context, keep: float) -> None:
    """Test stand-in for the prune pass: zero all but the largest `keep` fraction of each big weight."""
    for info in ctx.weights(256):
        if info.skip is None:
            w = get_array(ctx.model, info)
            mask = np.abs(w) >= np.quantile(np.abs(w), 1 - keep)
            set_array(ctx.model, info, np.where(mask, w, 0).astype(w.dtype))
            ctx.masks[info.name] = mask


def context(model: onnx.ModelProto, form: str = "portable", keep: float | None = 0.1, share: bool = True,
            **share_options) -> Context:
    working = onnx.ModelProto()
    working.CopyFrom(model)
    ctx = Context(original=model, model=working, form=form, progress=False)
    if keep is not None:
        magnitude_prune(ctx, keep)
    if share:
        p = SharePass(**{"granularity": "tensor", **share_options})
        p.requires(ctx)
        p.ensures(ctx, p.call(ctx))
    return ctx


def snapshot(ctx: Context) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(ctx.model)
    return out


def run_pass(p, ctx: Context):
    p.requires(ctx)
    result = p.call(ctx)
    p.ensures(ctx, result)
    return result


BUILDERS = {"gemm_transB": lambda: tiny.gemm(k=256, n=64, trans_b=True),
            "matmul": lambda: tiny.matmul(k=256, n=64),
            "conv": lambda: tiny.conv(c=8, m=32)}


def test_sparse_requires_pruned_weights():
    ctx = context(tiny.gemm(k=64, n=32), keep=None)
    ctx.shared.clear()
    with pytest.raises(PreconditionError):
        SparsePass().requires(ctx)


@pytest.mark.parametrize("which", sorted(BUILDERS))
def test_share_writes_very_sparse_codes_as_relative_indices_and_sparse_records_it(which):
    ctx = context(BUILDERS[which](), keep=0.02)
    assert {"CumSum", "ScatterElements"} <= set(tiny.op_types(ctx.model))
    record = next(r for r in ctx.records if r.pass_name == "share")
    shared = ctx.shared[record.name]
    assert record.bytes_after < shared.codes.size * 5 // 8 + shared.codebook.nbytes  # below dense 5-bit codes
    before = snapshot(ctx)
    result = run_pass(SparsePass(), ctx)
    assert not result.modified and result.summary["relative_indices"] == 1
    assert ctx.model.SerializeToString() == before.SerializeToString()
    tiny.assert_valid_and_close(tiny.decoded_reference(ctx), ctx.model, tiny.random_feeds(ctx.original), atol=1e-6)


def test_share_keeps_dense_codes_when_smaller():
    ctx = context(tiny.gemm(k=256, n=64), keep=0.9, bits_fc=4)  # 1-bit gaps + 4-bit codes on 90%: > 4 bits an entry
    assert not {"CumSum", "ScatterElements"} & set(tiny.op_types(ctx.model))
    before = snapshot(ctx)
    result = run_pass(SparsePass(), ctx)
    assert not result.modified and result.summary["dense"] == 1
    assert ctx.model.SerializeToString() == before.SerializeToString()


def test_sparse_portable_unshared_float_weight():
    ctx = context(tiny.conv_gemm(), keep=0.1, share=False)
    before = snapshot(ctx)
    result = run_pass(SparsePass(), ctx)
    assert set(ctx.masks) == {"fc.W"}  # conv.W has 72 < 256 entries
    assert result.modified and result.summary["sparse_constant"] == 1
    assert "fc.W" not in {t.name for t in ctx.model.graph.initializer}
    tiny.assert_valid_and_close(before, ctx.model, tiny.random_feeds(ctx.original), atol=0.0)


@pytest.mark.parametrize("which", sorted(BUILDERS))
def test_sparse_packed_marks_layouts_without_touching_the_model(which):
    ctx = context(BUILDERS[which](), form="packed", keep=0.05)
    before = snapshot(ctx)
    result = run_pass(SparsePass(index_bits_fc=5, index_bits_conv=8), ctx)
    assert not result.modified
    (layout,) = ctx.layouts.values()
    assert layout.kind in ("dense", "csr") and set(layout.sizes) == {"dense", "csr8" if which == "conv" else "csr5"}
    assert ctx.model.SerializeToString() == before.SerializeToString()


@pytest.mark.parametrize("which", sorted(BUILDERS))
def test_entropy_packed_writes_decode_weight_and_matches_the_portable_form(which):
    ctx = context(BUILDERS[which](), form="packed", keep=0.1)
    portable = snapshot(ctx)
    feeds = tiny.random_feeds(ctx.original)
    run_pass(SparsePass(), ctx)
    result = run_pass(EntropyPass(), ctx)
    assert result.modified
    assert [n.op_type for n in ctx.model.graph.node if n.domain == DOMAIN] == ["DecodeWeight"]
    assert not {"Gather", "Cast"} & set(tiny.op_types(ctx.model))
    onnx.checker.check_model(ctx.model, full_check=True)
    expected = tiny.run(portable, feeds)
    got = runtime.make_session(ctx.model).run(None, feeds)
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)
    assert ctx.model.ByteSize() < portable.ByteSize()
    (record,) = [r for r in ctx.records if r.pass_name == "entropy"]
    d = record.details
    assert d["codes_bits_per_weight"] >= d["codes_entropy_bits_per_weight"] > 0
    if d["layout"] == "csr":
        assert d["indices_bits_per_weight"] >= d["indices_entropy_bits_per_weight"] > 0


def test_entropy_portable_form_only_reports():
    ctx = context(tiny.gemm(k=256, n=64), keep=0.1)
    before = snapshot(ctx)
    result = run_pass(EntropyPass(methods=["raw", "huffman"]), ctx)
    assert not result.modified and ctx.model.SerializeToString() == before.SerializeToString()
    assert any("packed form" in note for note in ctx.notes)
    (record,) = [r for r in ctx.records if r.pass_name == "entropy"]
    assert record.details["codes_coder"] in ("raw", "huffman")


def test_entropy_requires_shared_weights():
    ctx = context(tiny.gemm(), share=False)
    with pytest.raises(PreconditionError):
        EntropyPass().requires(ctx)


def test_deep_compression_recipe_end_to_end(tmp_path):
    model = tiny.conv_gemm()
    data = tiny.random_feeds(model, n=64)
    packed_model, report = api.compress(model, "deep-compression", data, validate="none", progress=False)
    assert report.form == "packed" and runtime.uses_domain(packed_model)
    assert [p.name for p in report.passes] == ["bitwidth", "prune", "share", "sparse", "entropy"]
    onnx.checker.check_model(packed_model, full_check=True)
    portable = api.unpack(packed_model)
    assert not runtime.uses_domain(portable)
    feeds = {"x": data["x"][:8]}
    for a, b in zip(runtime.make_session(packed_model).run(None, feeds), tiny.run(portable, feeds)):
        np.testing.assert_array_equal(a, b)
    portable_run, report2 = api.compress(model, "deep-compression", data, form="portable", validate="none", progress=False)
    assert report2.form == "portable" and not runtime.uses_domain(portable_run)
    assert packed_model.ByteSize() < portable_run.ByteSize()


def test_the_round_trip_check_compares_bytes_whatever_the_memory_order_of_the_codes():
    """A weight whose codes are not C-ordered (a refit written column-wise) decodes to an array whose last
    axis is not contiguous: the bit-for-bit check compares its bytes all the same (it used to raise)."""
    from onnxcompress.formats.codebook import fit_codebook
    from onnxcompress.formats.packed import write_blob
    from onnxcompress.graph.weights import WeightInfo
    from onnxcompress.passes.entropy import blob_matches

    array = np.random.default_rng(0).standard_normal((24, 40)).astype(np.float32)
    info = WeightInfo("w", array.shape, "float32", array.nbytes, "initializer", "main")
    shared = fit_codebook(array, info, 4)
    shared.codes = np.asfortranarray(shared.codes)
    assert not shared.decode().flags.c_contiguous
    assert blob_matches(write_blob(shared).blob, shared)
    shared.codebook = shared.codebook + 1.0  # another weight: the check still sees the difference
    assert not blob_matches(write_blob(fit_codebook(array, info, 4)).blob, shared)
