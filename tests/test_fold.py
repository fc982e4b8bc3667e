"""Every portable decode chain folds when onnxruntime creates a session: the optimized graph holds
only the consumer with a dense initializer, equal bit for bit to SharedWeight.decode(), at each
opset the chains support (11, 13, 17, 18, 21), for every code width, dense and sparse, with
per-channel scales, per-group codebooks and outliers."""
from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.formats.codebook import SharedWeight, portable_nodes
from onnxcompress.formats.codechain import pack_words, sparse_codes, word_shape
from onnxcompress.formats.codecs.bitpack import unpack
from onnxcompress.graph.edit import NameScope

OPSETS = [11, 13, 17, 18, 21]
SHAPE = (24, 13)  # 312 codes: not a whole number of words at 3, 5 or 7 bits (padding sliced off)
SPARSE = 0.02
SPARSE_SHAPE = (160, 125)  # 2% of 20,000: relative indices beat dense codes, their nodes included


def shape_for(density: float) -> tuple[int, int]:
    return SHAPE if density == 1 else SPARSE_SHAPE


def shared_weight(bits: int, density: float, seed: int = 0, **extra) -> SharedWeight:
    rng = np.random.default_rng(seed)
    shape = shape_for(density)
    codes = rng.integers(0, 2 ** bits, shape)
    codes = np.where(rng.random(shape) < density, codes, 0).astype(np.uint8)
    if extra.pop("long_runs", False):  # gaps longer than any width: fillers needed
        codes[:, :] = 0
        codes[0, 1], codes[20, 5], codes[23, 12] = 1, 2 ** bits - 1, 1
    return SharedWeight("W", shape, np.dtype(extra.pop("dtype", np.float32)), codes,
                        rng.normal(size=2 ** bits).astype(np.float32), bits, **extra)


def matmul_model(weight: SharedWeight, opset: int) -> onnx.ModelProto:
    nodes, inits = portable_nodes(weight, NameScope(onnx.ModelProto()), opset, "share")
    k, n = weight.shape
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(weight.dtype))
    graph = helper.make_graph(nodes + [helper.make_node("MatMul", ["X", "W"], ["Y"])], "g",
                              [helper.make_tensor_value_info("X", elem, [2, k])],
                              [helper.make_tensor_value_info("Y", elem, [2, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8 if opset < 21 else 10)


def optimized(model: onnx.ModelProto, tmp_path, level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC) -> onnx.ModelProto:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath)


def kept_nodes(model: onnx.ModelProto) -> list[str]:
    """Op types left, less the Casts onnxruntime puts around a float16 MatMul (no CPU kernel)."""
    return [n.op_type for n in model.graph.node if not n.name.startswith("InsertedPrecisionFreeCast")]


def assert_folds(weight: SharedWeight, opset: int, tmp_path) -> onnx.ModelProto:
    model = matmul_model(weight, opset)
    onnx.checker.check_model(model, full_check=True)
    folded = optimized(model, tmp_path)
    assert kept_nodes(folded) == ["MatMul"]
    (dense,) = [t for t in folded.graph.initializer if t.name == "W"]
    got, want = numpy_helper.to_array(dense), weight.decode()
    assert got.dtype == want.dtype and np.array_equal(got.view(np.uint8), want.view(np.uint8))  # bit for bit
    default = optimized(model, tmp_path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)  # the default level
    assert len(kept_nodes(default)) == 1
    return model


def stored_codes(model: onnx.ModelProto, weight: SharedWeight) -> np.ndarray:
    """The codes read back from the written initializers with the numpy decoder (bitpack.unpack)."""
    tensors = {t.name: t for t in model.graph.initializer}
    count = weight.codes.size
    if "W__gaps" in tensors:
        sparse = sparse_codes(weight.codes, weight.bits)
        gaps = unpack(tensors["W__gaps"].raw_data, sparse.gap_bits, sparse.gaps.size).astype(np.int64)
        kept = unpack(tensors["W__codes"].raw_data, weight.bits, gaps.size)
        out = np.zeros(count, np.int64)
        out[np.cumsum(gaps)] = kept
        return out.reshape(weight.shape)
    return unpack(tensors["W__codes"].raw_data, weight.bits, count).reshape(weight.shape)


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("density", [1.0, SPARSE])
def test_codes_fold_at_every_width_dense_and_sparse(opset, bits, density, tmp_path):
    weight = shared_weight(bits, density, seed=bits)
    model = assert_folds(weight, opset, tmp_path)
    ops = {n.op_type for n in model.graph.node}
    assert ("ScatterElements" in ops) == (density < 1), "sparse only where it is smaller"
    assert np.array_equal(stored_codes(model, weight), weight.codes)
    codes = next(t for t in model.graph.initializer if t.name == "W__codes")
    if density == 1 and not (bits == 4 and opset >= 21):  # b/8 bytes a code, in whole words
        k, m = word_shape(bits)
        assert codes.data_type == TensorProto.UINT8 and len(codes.raw_data) == -(-weight.codes.size // k) * m


@pytest.mark.parametrize("opset", [11, 13, 18])
@pytest.mark.parametrize("bits", [1, 3, 8])
def test_sparse_codes_with_long_runs_use_fillers(opset, bits, tmp_path):
    weight = shared_weight(bits, 1.0, long_runs=True)
    sparse = sparse_codes(weight.codes, bits)
    assert sparse.gaps.size > 3 and (sparse.codes == 0).sum() == sparse.gaps.size - 3  # fillers, code 0
    model = assert_folds(weight, opset, tmp_path)
    assert np.array_equal(stored_codes(model, weight), weight.codes)


VARIANTS = {
    "channel scale": lambda rng, n, bits: {"channel_axis": 1, "scale": rng.uniform(0.5, 2, n).astype(np.float32)},
    "float16 scale": lambda rng, n, bits: {"channel_axis": 1, "scale": rng.uniform(0.5, 2, n).astype(np.float16)},
    "group codebooks": lambda rng, n, bits: {  # three groups of channels, each its own 2**bits codebook
        "channel_axis": 1, "group_offsets": (np.arange(n) * 3 // n * 2 ** bits).astype(np.int32)},
    "outliers": lambda rng, n, bits: {"outlier_index": np.array([0, 17, 311], np.int64),
                                      "outlier_value": rng.normal(size=3).astype(np.float32)},
    "float16 weight": lambda rng, n, bits: {"dtype": np.float16},
}


@pytest.mark.parametrize(("variant", "bits", "density", "opset"),
                         list(itertools.product(sorted(VARIANTS), [3, 4, 7], [1.0, SPARSE], [11, 17, 21])))
def test_variants_fold(variant, bits, density, opset, tmp_path):
    rng = np.random.default_rng(bits)
    extra = VARIANTS[variant](rng, shape_for(density)[1], bits)
    weight = shared_weight(bits, density, seed=bits, **extra)
    if variant == "group codebooks":
        weight.codebook = rng.normal(size=3 * 2 ** bits).astype(np.float32)
    model = assert_folds(weight, opset, tmp_path)
    assert ("ScatterElements" in {n.op_type for n in model.graph.node if n.output[0] != "W"}) == (density < 1) \
        or variant == "outliers"  # outliers are written by a ScatterElements of their own


def test_pack_words_is_the_bitpack_stream_in_whole_words():
    rng = np.random.default_rng(0)
    for bits in range(1, 9):
        values = rng.integers(0, 2 ** bits, 1001)
        k, m = word_shape(bits)
        words = pack_words(values, bits)
        assert words.shape == (-(-1001 // k), m) and words.dtype == np.uint8
        assert np.array_equal(unpack(words.tobytes(), bits, 1001), values)


def test_pack_words_over_several_blocks_and_a_partial_word():
    """Blocks of _PACK_BLOCK words, then the last partial word: the bitpack stream, every word once."""
    from onnxcompress.formats import codechain

    rng = np.random.default_rng(1)
    for bits in (3, 5, 8):
        k, _ = word_shape(bits)
        n = 2 * codechain._PACK_BLOCK * k + 3 * k + 1
        values = rng.integers(0, 2 ** bits, n).astype(np.uint8)
        assert np.array_equal(unpack(pack_words(values, bits).tobytes(), bits, n), values)
    assert pack_words(np.zeros(0, np.uint8), 5).shape == (0, 5)


@pytest.mark.parametrize("opset", [7, 9, 10])
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("density", [1.0, SPARSE])
def test_dense_codes_are_bit_packed_below_opset_11(opset, bits, density, tmp_path):
    """Found on a trained model (a TF-exported ResNet-50 at opset 9): share-4bit wrote its codes one a byte, 3.92x
    where 4-bit codes give ~8x. The dense chain needs no op newer than opset 7 (Mod, from 10, is x - (x div M) * M
    on the non-negative words; Slice takes attributes below 10); the sparse one (CumSum, ScatterElements) stays 11+."""
    weight = shared_weight(bits, density, seed=bits)
    model = assert_folds(weight, opset, tmp_path)  # the full check validates every op against the opset
    assert "ScatterElements" not in {n.op_type for n in model.graph.node}
    assert np.array_equal(stored_codes(model, weight), weight.codes)
    codes = next(t for t in model.graph.initializer if t.name == "W__codes")
    k, m = word_shape(bits)
    assert codes.data_type == TensorProto.UINT8 and len(codes.raw_data) == -(-weight.codes.size // k) * m


@pytest.mark.parametrize("variant", sorted(set(VARIANTS) - {"outliers"}))
def test_variants_fold_at_opset_9(variant, tmp_path):
    rng = np.random.default_rng(3)
    weight = shared_weight(3, 1.0, seed=3, **VARIANTS[variant](rng, shape_for(1.0)[1], 3))
    if variant == "group codebooks":
        weight.codebook = rng.normal(size=3 * 2 ** 3).astype(np.float32)
    assert_folds(weight, 9, tmp_path)
