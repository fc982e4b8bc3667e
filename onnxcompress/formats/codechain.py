"""Integer codes bit-packed into uint8 initializers, and the standard ONNX ops that unpack them.

Dense packing (any width ``b`` in 1..8, any opset >= 7). Codes are the little-endian bit stream
of :func:`onnxcompress.formats.codecs.bitpack.pack` (whose ``unpack`` is the numpy decoder), padded with
zero codes to whole *words*: a word is the smallest run of bytes holding a whole number of
codes, ``m = b / gcd(b, 8)`` bytes for ``k = 8 / gcd(b, 8)`` codes (1 byte for 8, 4, 2 or 1 codes
of 1, 2, 4 or 8 bits; 3 bytes for 8 codes of 3 bits or 4 of 6; 5 bytes for 8 codes of 5 bits; 7
bytes for 8 codes of 7 bits). The initializer holds the words as a (G, m) uint8 tensor, and, in
int32 (Cast),

    m = 1:  code[g, i] = (byte[g, 0] div 2**(b*i)) mod 2**b                              (Div, Mod)
    m > 1:  code i starts at bit s = b*i, in byte l = s div 8, at bit r = s mod 8, and spills
            into byte l + 1 when r + b > 8:
            code[g, i] = (byte[g, l] div 2**r + byte[g, l+1] * 2**(8-r) [if it spills]) mod 2**b
                                                                  (Gather x2, Div, Mul, Add, Mod)

then Reshape (and Slice off the padding). Below opset 10, which has no Mod and takes Slice's bounds as
attributes, ``x mod 2**b`` is ``x - (x div 2**b) * 2**b`` (the words are non-negative) and Slice gets attributes. No intermediate exceeds 16 bits (combining whole 40- or
56-bit words would not be exact: onnxruntime's ReduceSum on int64 rounds beyond 2**53). A b-bit
code costs b/8 bytes whatever the opset, and every input is constant, so onnxruntime folds the
chain at session creation (tests/test_fold.py checks each kind).

Sparse codes (mostly zero, e.g. pruned weights): the nonzero codes' flat positions as gaps
(Deep Compression's relative indices): ``gap[0] = p[0]``, ``gap[e] = p[e] - p[e-1]``; a gap
above ``2**g - 1`` is split by filler entries of gap ``2**g - 1`` and code 0 (which writes the 0
already there). Gaps and codes are both packed as above and decoded by

    codes = Reshape(ScatterElements(ConstantOfShape([N], 0), CumSum(gaps), kept codes), shape)

The gap width ``g`` (1..8) is the one with the fewest bytes; the sparse form is used only when
its nodes and tensors serialize smaller than the dense form's. Both decode to exactly the codes
(tests/test_fold.py reads them back with ``bitpack.unpack`` and a cumulative sum).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.graph.edit import NameScope

PACK_MIN_OPSET = 7  # dense bit-packed codes: Cast, Div, Mul, Add, Sub, Gather, Reshape, Slice exist from 7 on
SPARSE_MIN_OPSET = 11  # relative indices: CumSum and ScatterElements exist from 11 on
MOD_MIN_OPSET = 10  # Mod, and Slice with inputs
UINT4_MIN_OPSET = 21  # uint4 initializers: 4-bit codes stored as such, one Cast to unpack them
MAX_BITS = 8
_STEP = "sw"  # base of the intermediate tensor names


def word_shape(bits: int) -> tuple[int, int]:
    """(codes per word k, bytes per word m) of `bits`-bit codes."""
    common = math.gcd(bits, 8)
    return 8 // common, bits // common


def pack_words(values: np.ndarray, bits: int) -> np.ndarray:
    """`values` (< 2**bits) as a (G, m) uint8 array of whole words, zero codes padding the last:
    the bytes of ``bitpack.pack`` (each word ``sum_i v[g, i] * 2**(bits*i)``, at most 56 bits,
    little-endian), computed a block of words at a time (column i of the block shifted into place: no
    full-size uint64 copy of the values)."""
    k, m = word_shape(bits)
    flat = np.asarray(values).reshape(-1)
    words, whole = -(-flat.size // k), flat.size // k
    out = np.empty((words, m), np.uint8)
    for lo in range(0, whole, _PACK_BLOCK):
        block = flat[lo * k:min(whole, lo + _PACK_BLOCK) * k].reshape(-1, k)
        word = block[:, 0].astype(np.uint64)
        for i in range(1, k):
            word |= block[:, i].astype(np.uint64) << np.uint64(bits * i)
        out[lo:lo + word.size] = word.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :m]
    if whole < words:  # the last word, padded with zero codes
        tail = np.zeros(k, np.uint64)
        tail[:flat.size - whole * k] = flat[whole * k:]
        word = np.bitwise_or.reduce(tail << (np.uint64(bits) * np.arange(k, dtype=np.uint64)))
        out[whole] = np.array([word], "<u8").view(np.uint8)[:m]
    return out


_PACK_BLOCK = 1 << 17  # words a block of pack_words


@dataclass
class SparseCodes:
    """Nonzero codes of a flat array with their positions as gaps (fillers included)."""

    gaps: np.ndarray  # int64, >= 0, < 2**gap_bits
    codes: np.ndarray  # the kept codes (0 for fillers)
    gap_bits: int

    def nbytes(self, bits: int) -> int:
        return _packed_bytes(self.gaps.size, self.gap_bits) + _packed_bytes(self.codes.size, bits)


def _packed_bytes(count: int, bits: int) -> int:
    k, m = word_shape(bits)
    return -(-count // k) * m


def sparse_codes(codes: np.ndarray, bits: int, gap_bits: int | None = None) -> SparseCodes | None:
    """The gap width of fewest bytes (or `gap_bits`) and the entries it needs; None when there is no
    nonzero code, or (width not given) too many for relative indices to be smaller."""
    flat = np.asarray(codes).reshape(-1)
    if gap_bits is None and np.count_nonzero(flat) * (bits + 1) >= flat.size * bits:
        return None  # a gap of at least 1 bit an entry: never smaller than the dense codes
    where = np.flatnonzero(flat)
    if where.size == 0:
        return None
    diff = np.diff(where, prepend=0)
    best = None
    for gap_bits in [gap_bits] if gap_bits else range(1, MAX_BITS + 1):
        step = 2 ** gap_bits - 1
        # an entry of gap d needs (d - 1) // step fillers before it (the first may have d = 0)
        fillers = int(np.sum(np.maximum(diff - 1, 0) // step))
        size = _packed_bytes(where.size + fillers, gap_bits) + _packed_bytes(where.size + fillers, bits)
        if best is None or size < best[0]:
            best = (size, gap_bits)
    gap_bits = best[1]
    step = 2 ** gap_bits - 1
    extra = np.maximum(diff - 1, 0) // step  # fillers before each entry
    total = where.size + int(extra.sum())
    slot = np.arange(where.size) + np.cumsum(extra)  # each kept entry's slot after its fillers
    gaps = np.full(total, step, np.int64)
    gaps[slot] = diff - extra * step
    kept = np.zeros(total, flat.dtype)
    kept[slot] = flat[where]
    return SparseCodes(gaps, kept, gap_bits)


def dense_code_bytes(count: int, bits: int, opset: int) -> int:
    """Tensor bytes of `count` codes written dense by :func:`codes_nodes`."""
    if opset < PACK_MIN_OPSET or bits > MAX_BITS:
        return int(count) * (1 if bits <= 8 else 2)
    return _packed_bytes(int(count), bits)


def code_bytes(codes: np.ndarray, bits: int, opset: int) -> int:
    """Tensor bytes of the codes as :func:`codes_nodes` writes them (dense or sparse)."""
    dense = dense_code_bytes(np.size(codes), bits, opset)
    sparse = _relative(codes, bits, opset)
    return dense if sparse is None else sparse.nbytes(bits)


def codes_nodes(codes: np.ndarray, bits: int, opset: int, scope: NameScope, base: str
                ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
    """Nodes and initializers computing `codes` as an int32 tensor of their shape; returns (nodes,
    initializers, name of the codes tensor). Below opset 7 or above 8 bits, the codes are one
    uint8/uint16 a code and a Cast."""
    codes = np.asarray(codes)
    if opset < PACK_MIN_OPSET or bits > MAX_BITS:
        name = scope.fresh(f"{base}__codes")
        init = numpy_helper.from_array(codes.astype(np.uint8 if bits <= 8 else np.uint16), name)
        out = scope.fresh(_STEP)
        return [helper.make_node("Cast", [name], [out], to=TensorProto.INT32)], [init], out
    sparse = _relative(codes, bits, opset)
    if sparse is None:
        return _dense_nodes(codes, bits, tuple(codes.shape), scope, f"{base}__codes", opset)
    return _sparse_nodes(codes, bits, sparse, scope, base, opset)


def _relative(codes: np.ndarray, bits: int, opset: int) -> SparseCodes | None:
    """The relative-index form of the codes when its nodes and tensors serialize smaller than the
    dense form's (the CumSum/ScatterElements chain costs a few hundred bytes), else None."""
    if opset < SPARSE_MIN_OPSET or bits > MAX_BITS:
        return None
    codes = np.asarray(codes)
    sparse = sparse_codes(codes, bits)
    if sparse is None or sparse.nbytes(bits) >= _packed_bytes(codes.size, bits):
        return None
    scope = NameScope(onnx.ModelProto())
    dense = _dense_nodes(codes, bits, tuple(codes.shape), scope, "w__codes", opset)
    relative = _sparse_nodes(codes, bits, sparse, scope, "w", opset)
    size = [sum(p.ByteSize() for p in nodes + inits) for nodes, inits, _ in (dense, relative)]
    return sparse if size[1] < size[0] else None


def _sparse_nodes(codes: np.ndarray, bits: int, sparse: SparseCodes, scope: NameScope, base: str, opset: int
                  ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
    shape = tuple(codes.shape)
    nodes, inits, gaps = _dense_nodes(sparse.gaps, sparse.gap_bits, (sparse.gaps.size,), scope, f"{base}__gaps",
                                      opset)
    more, more_inits, kept = _dense_nodes(sparse.codes, bits, (sparse.codes.size,), scope, f"{base}__codes", opset)
    axis, size, dims = scope.fresh(f"{base}__axis"), scope.fresh(f"{base}__size"), scope.fresh(f"{base}__shape")
    inits += more_inits + [numpy_helper.from_array(np.array(0, np.int32), axis),
                           numpy_helper.from_array(np.array([codes.size], np.int64), size),
                           numpy_helper.from_array(np.array(shape, np.int64), dims)]
    positions, zeros, scattered, out = (scope.fresh(_STEP) for _ in range(4))
    value = helper.make_tensor("", TensorProto.INT32, [1], [0])
    if codes.size >= 2**31:  # positions overflow int32
        wide = scope.fresh(_STEP)
        nodes.append(helper.make_node("Cast", [gaps], [wide], to=TensorProto.INT64))
        gaps = wide
    nodes += more + [helper.make_node("CumSum", [gaps, axis], [positions]),
                     helper.make_node("ConstantOfShape", [size], [zeros], value=value),
                     helper.make_node("ScatterElements", [zeros, positions, kept], [scattered], axis=0),
                     helper.make_node("Reshape", [scattered, dims], [out])]
    return nodes, inits, out


def _uint4_tensor(name: str, values: np.ndarray, shape: tuple[int, ...]) -> onnx.TensorProto:
    """uint4 data, two codes a byte, low nibble first, as ONNX specifies (:func:`pack_words` at 4 bits)."""
    tensor = TensorProto(name=name, data_type=TensorProto.UINT4, dims=list(shape))
    tensor.raw_data = pack_words(values, 4).tobytes()
    return tensor


def _dense_nodes(values: np.ndarray, bits: int, shape: tuple[int, ...], scope: NameScope, name: str,
                 opset: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
    k, m = word_shape(bits)
    stream = scope.fresh(name)
    if bits == 8:  # one code a byte: no unpacking, the bytes in the codes' shape
        out = scope.fresh(_STEP)
        init = numpy_helper.from_array(np.asarray(values).astype(np.uint8).reshape(shape), stream)
        return [helper.make_node("Cast", [stream], [out], to=TensorProto.INT32)], [init], out
    if bits == 4 and opset >= UINT4_MIN_OPSET:  # the same bytes as a standard uint4 tensor, and no unpacking
        out = scope.fresh(_STEP)
        init = _uint4_tensor(stream, values, shape)
        return [helper.make_node("Cast", [stream], [out], to=TensorProto.INT32)], [init], out
    inits = [numpy_helper.from_array(pack_words(values, bits), stream)]
    word = scope.fresh(_STEP)
    nodes = [helper.make_node("Cast", [stream], [word], to=TensorProto.INT32)]
    more_nodes, more_inits, codes = (_split_spanning if m > 1 else _split_words)(word, bits, k, scope, name, opset)
    shape_nodes, shape_inits, out = _shaped(codes, shape, k, scope, name, opset)
    return nodes + more_nodes + shape_nodes, inits + more_inits + shape_inits, out


def _split_spanning(word: str, bits: int, k: int, scope: NameScope, name: str, opset: int
                    ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
    """(G, k) codes from (G, m) int32 bytes of codes that may span two bytes: code i is its first byte
    shifted down plus its second byte (if it reaches one) shifted up, modulo 2^bits."""
    start = bits * np.arange(k)
    low, shift = start // 8, start % 8
    spills = shift + bits > 8
    names = [scope.fresh(f"{name}_{s}") for s in ("low", "high", "down", "up")]
    inits = [numpy_helper.from_array(low.astype(np.int64), names[0]),
             numpy_helper.from_array(np.where(spills, low + 1, low).astype(np.int64), names[1]),
             numpy_helper.from_array((2 ** shift).astype(np.int32), names[2]),
             numpy_helper.from_array(np.where(spills, 2 ** (8 - shift), 0).astype(np.int32), names[3])]
    first, second, down, up, joined = (scope.fresh(_STEP) for _ in range(5))
    nodes = [helper.make_node("Gather", [word, names[0]], [first], axis=1),
             helper.make_node("Gather", [word, names[1]], [second], axis=1),
             helper.make_node("Div", [first, names[2]], [down]),
             helper.make_node("Mul", [second, names[3]], [up]),
             helper.make_node("Add", [down, up], [joined])]
    modulus = scope.fresh(f"{name}_modulus")
    inits.append(numpy_helper.from_array(np.array(2 ** bits, np.int32), modulus))
    more, codes = _mod(joined, modulus, scope, opset)
    return nodes + more, inits, codes


def _split_words(word: str, bits: int, k: int, scope: NameScope, name: str, opset: int
                 ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
    """(G, k) codes from (G, 1) int32 words holding k codes each: Div by 2^(bits i), Mod 2^bits."""
    shifts, modulus = scope.fresh(f"{name}_shifts"), scope.fresh(f"{name}_modulus")
    inits = [numpy_helper.from_array((2 ** (bits * np.arange(k))).astype(np.int32), shifts),
             numpy_helper.from_array(np.array(2 ** bits, np.int32), modulus)]
    shifted = scope.fresh(_STEP)
    more, codes = _mod(shifted, modulus, scope, opset)
    return [helper.make_node("Div", [word, shifts], [shifted])] + more, inits, codes


def _mod(x: str, modulus: str, scope: NameScope, opset: int) -> tuple[list[onnx.NodeProto], str]:
    """x mod modulus for non-negative int32 x: Mod, or below opset 10 x - (x div modulus) * modulus."""
    out = scope.fresh(_STEP)
    if opset >= MOD_MIN_OPSET:
        return [helper.make_node("Mod", [x, modulus], [out])], out
    quotient, whole = scope.fresh(_STEP), scope.fresh(_STEP)
    return [helper.make_node("Div", [x, modulus], [quotient]), helper.make_node("Mul", [quotient, modulus], [whole]),
            helper.make_node("Sub", [x, whole], [out])], out


def _shaped(codes: str, shape: tuple[int, ...], k: int, scope: NameScope, name: str, opset: int
            ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
    """The (G, k) codes in the codes' shape: reshaped, or with the last word's padding sliced off first."""
    count = int(np.prod(shape, dtype=np.int64))
    if count % k == 0:  # no padding: the (G, k) codes reshaped
        dims, out = scope.fresh(f"{name}_shape"), scope.fresh(_STEP)
        return ([helper.make_node("Reshape", [codes, dims], [out])],
                [numpy_helper.from_array(np.array(shape, np.int64), dims)], out)
    flat, starts, ends = (scope.fresh(f"{name}_{s}") for s in ("flat", "start", "end"))
    flat_out, out = scope.fresh(_STEP), scope.fresh(_STEP)
    inits = [numpy_helper.from_array(np.array([-1], np.int64), flat)]
    nodes = [helper.make_node("Reshape", [codes, flat], [flat_out])]
    if opset >= MOD_MIN_OPSET:
        inits += [numpy_helper.from_array(np.array([0], np.int64), starts),
                  numpy_helper.from_array(np.array([count], np.int64), ends)]
        nodes.append(helper.make_node("Slice", [flat_out, starts, ends], [out]))
    else:  # Slice's bounds are attributes before opset 10
        nodes.append(helper.make_node("Slice", [flat_out], [out], starts=[0], ends=[count], axes=[0]))
    if len(shape) != 1:  # the padding sliced off the flat codes, then the codes' shape
        dims, shaped = scope.fresh(f"{name}_shape"), scope.fresh(_STEP)
        inits.append(numpy_helper.from_array(np.array(shape, np.int64), dims))
        nodes.append(helper.make_node("Reshape", [out, dims], [shaped]))
        out = shaped
    return nodes, inits, out
