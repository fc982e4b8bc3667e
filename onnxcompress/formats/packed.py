"""The packed form: one entropy-coded byte blob per shared weight, decoded by our DecodeWeight op.

Blob = a CRC'd frame (codecs.frame) of short-named streams::

    h  header, LEB128 varints: version, ONNX elem type, rank, dims..., bits, layout
       (0 dense, 1 csr), index_bits (0 for dense), zero_code + 1 (0 = none), channel_axis + 1
    b  codebook, float32 little endian
    c  layout dense: the codes, a tagged entropy-coded stream (codecs.encode_best)
    i  layout csr: relative-index gaps minus 1, tagged stream over 2**index_bits symbols
    v  layout csr: the stored codes (0 for filler entries), tagged stream over 2**bits symbols
    g  optional group offsets (one per output channel), tagged stream
    s  optional per-channel scales, float32
    o  optional outlier flat indices: varint count, u8 width, sorted deltas bit-packed
    u  optional outlier values, float32

The symbols coded are the codes with ``zero_code`` and 0 swapped, so the pruned entries are
symbol 0, which the relative-index form (codecs.relidx) leaves out. :func:`read_blob` returns
the exact :class:`SharedWeight` that was written, whose ``decode()`` is the reference weight.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from onnx import TensorProto, helper

from onnxcompress.formats.codebook import SharedWeight
from onnxcompress.formats.codecs import bitpack, encode_best, entropy_bits, relidx
from onnxcompress.formats.codecs.choice import METHODS, declared_count, decode_any, estimated_ans_size
from onnxcompress.formats.codecs.frame import framed_size, pack_streams, unpack_streams
from onnxcompress.formats.codecs._wire import Reader, uvarint, bit_length
from onnxcompress.errors import CodecError
from onnxcompress.numerics.limits import MAX_TENSOR_ELEMENTS, element_count

log = logging.getLogger(__name__)

OP_TYPE = "DecodeWeight"
FORMAT_VERSION = 1
MAX_ELEMENTS = MAX_TENSOR_ELEMENTS  # a header declaring more is refused before any allocation
INDEX_BITS_CANDIDATES = tuple(range(1, 13))
#: element types a blob may decode to (DecodeWeight computes float32; a Cast after it restores the others)
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)


@dataclass
class Layout:
    """How a shared weight's codes are stored in the packed form (sparse pass -> entropy pass)."""

    kind: Literal["dense", "csr"] = "dense"
    index_bits: int = 0  # csr only: bits of a relative index (the paper: 5 for fc, 8 for conv)
    sizes: dict[str, int] = field(default_factory=dict)  # measured candidate bytes, for the report


@dataclass
class StreamStat:
    method: str  # raw | huffman | ans | float32
    nbytes: int  # bytes of the tagged stream
    symbols: int  # symbols coded
    entropy: float = 0.0  # empirical entropy, bits per symbol (the limit of a memoryless coder)


@dataclass
class PackedWeight:
    name: str
    blob: bytes | np.ndarray  # the frame; a uint8 array where a streamed model's context keeps it on disk
    layout: Layout
    streams: dict[str, StreamStat]
    numel: int

    def bits_per_weight(self, *streams: str) -> float:
        """Stored bits of the given streams divided by the weight's element count."""
        return 8.0 * sum(self.streams[s].nbytes for s in streams if s in self.streams) / max(self.numel, 1)


# ---------------------------------------------------------------- encoding one weight

def symbols_of(shared: SharedWeight) -> np.ndarray:
    """Flat codes with ``zero_code`` swapped with 0 (an involution: also the inverse)."""
    return _swap(np.asarray(shared.codes).reshape(-1), shared.zero_code)


def _swap(codes: np.ndarray, zero_code: int | None) -> np.ndarray:
    if not zero_code:
        return codes
    out = codes.copy()
    out[codes == 0] = zero_code
    out[codes == zero_code] = 0
    return out


def _coded(symbols: np.ndarray, alphabet: int, methods) -> tuple[bytes, StreamStat]:
    method, data = encode_best(symbols, alphabet, methods=methods)
    return data, StreamStat(method, len(data), int(symbols.size), entropy_bits(symbols))


def csr_streams(symbols: np.ndarray, bits: int, index_bits: int, methods=METHODS
                ) -> dict[str, tuple[bytes, StreamStat]]:
    gaps, values = relidx.encode(symbols, index_bits)
    return {"i": _coded(gaps.astype(np.int64) - 1, 1 << index_bits, methods),
            "v": _coded(values, 1 << bits, methods)}


def choose_layout(shared: SharedWeight, *, index_bits: int | None = None, methods=METHODS,
                  candidates=INDEX_BITS_CANDIDATES) -> Layout:
    """Dense codes or CSR with relative indices, whichever is smaller once entropy coded.

    With ``index_bits`` given only that width is tried for CSR; otherwise every width in
    ``candidates`` is measured (encoded bytes of gaps plus values) and the smallest kept.
    """
    symbols = symbols_of(shared)
    sizes = {"dense": len(encode_best(symbols, 1 << shared.bits, methods=methods)[1])}
    if symbols.size and np.count_nonzero(symbols) < symbols.size:
        for b in ([index_bits] if index_bits else candidates):
            streams = csr_streams(symbols, shared.bits, b, methods)
            sizes[f"csr{b}"] = sum(len(d) for d, _ in streams.values())
    best = min(sizes, key=lambda k: (sizes[k], k != "dense"))
    if best == "dense":
        return Layout("dense", 0, sizes)
    return Layout("csr", int(best[3:]), sizes)


def write_blob(shared: SharedWeight, layout: Layout | None = None, *, methods=METHODS) -> PackedWeight:
    """Encode one shared weight into a packed blob (format in the module docstring)."""
    layout = layout or Layout()
    numel = int(np.prod(shared.shape, dtype=np.int64))
    streams: dict[str, tuple[bytes, StreamStat]] = {"h": (_header(shared, layout), None)}
    book = np.asarray(shared.codebook, "<f4").reshape(-1)
    streams["b"] = (book.tobytes(), StreamStat("float32", book.nbytes, book.size))
    symbols = symbols_of(shared)
    if layout.kind == "csr":
        streams.update(csr_streams(symbols, shared.bits, layout.index_bits, methods))
    else:
        streams["c"] = _coded(symbols, 1 << shared.bits, methods)
    if shared.group_offsets is not None:
        offsets = np.asarray(shared.group_offsets, np.int64).reshape(-1)
        streams["g"] = _coded(offsets, max(int(book.size), 1), methods)
    if shared.scale is not None:
        scale = np.asarray(shared.scale, "<f4").reshape(-1)
        streams["s"] = (scale.tobytes(), StreamStat("float32", scale.nbytes, scale.size))
    if shared.outlier_index is not None and shared.outlier_index.size:
        index = np.asarray(shared.outlier_index, np.int64).reshape(-1)
        order = np.argsort(index, kind="stable")
        index, value = index[order], np.asarray(shared.outlier_value, "<f4").reshape(-1)[order]
        # duplicates: the last written wins in decode(); keep the last of each run
        last = np.append(index[1:] != index[:-1], True)
        index, value = index[last], value[last]
        deltas = np.diff(index, prepend=0)
        width = bit_length(int(deltas.max()))
        data = uvarint(index.size) + bytes([width]) + bitpack.pack(deltas, width)
        streams["o"] = (data, StreamStat("bitpack", len(data), index.size))
        streams["u"] = (value.tobytes(), StreamStat("float32", value.nbytes, value.size))
    blob = pack_streams({k: d for k, (d, _) in streams.items()})
    stats = {k: s for k, (_, s) in streams.items() if s is not None}
    return PackedWeight(shared.name, blob, layout, stats, numel)


def _header(shared: SharedWeight, layout: Layout) -> bytes:
    """The blob's header stream (module docstring)."""
    shape = tuple(int(d) for d in shared.shape)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(shared.dtype))
    head = [FORMAT_VERSION, elem, len(shape), *shape, shared.bits, 1 if layout.kind == "csr" else 0,
            layout.index_bits if layout.kind == "csr" else 0,
            0 if shared.zero_code is None else shared.zero_code + 1,
            0 if shared.channel_axis is None else shared.channel_axis + 1]
    return b"".join(uvarint(int(v)) for v in head)


def estimated_ans_bytes(shared: SharedWeight, *, candidates=INDEX_BITS_CANDIDATES) -> int:
    """Bytes of ``write_blob(shared, choose_layout(shared, candidates=candidates, methods=("ans",)),
    methods=("ans",))`` from the symbols' counts alone, without coding: dense codes, or CSR at each
    index width (relidx: a gap d > M = 2**b stores (d - 1) // M fillers of gap M and value 0, then gap
    d - fillers * M), each stream priced by ``estimated_ans_size`` (exact or 4 bytes above), the
    frame and the other streams exactly. For pricing many candidates; a weight with channel scales,
    group offsets or outliers is coded exactly."""
    if shared.group_offsets is not None or shared.scale is not None or shared.outlier_index is not None:
        return len(write_blob(shared, choose_layout(shared, candidates=candidates, methods=("ans",)),
                              methods=("ans",)).blob)
    symbols = symbols_of(shared)
    alphabet = 1 << shared.bits
    sizes = {"dense": [estimated_ans_size(np.bincount(symbols, minlength=alphabet))]}
    pos = np.flatnonzero(symbols)
    if symbols.size and pos.size < symbols.size:
        gaps = np.diff(pos, prepend=-1)
        values = np.bincount(symbols[pos], minlength=alphabet)
        for b in candidates:
            m = 1 << b
            fillers = (gaps - 1) >> b
            count = int(fillers.sum())
            gap_counts = np.bincount(gaps - fillers * m - 1, minlength=m)
            gap_counts[m - 1] += count
            value_counts = values.copy()
            value_counts[0] += count
            sizes[f"csr{b}"] = [estimated_ans_size(gap_counts), estimated_ans_size(value_counts)]
    best = min(sizes, key=lambda k: (sum(sizes[k]), k != "dense"))
    layout = Layout("dense", 0) if best == "dense" else Layout("csr", int(best[3:]))
    lengths = {"h": len(_header(shared, layout)), "b": 4 * int(np.size(shared.codebook))}
    lengths.update(zip(("c",) if best == "dense" else ("i", "v"), sizes[best]))
    return framed_size(lengths)


# ---------------------------------------------------------------- decoding one weight

@dataclass(frozen=True)
class _Header:
    """The fixed fields of a blob's header stream, checked against the limits."""

    dtype: np.dtype
    shape: tuple[int, ...]
    numel: int
    bits: int
    kind: int  # 0 dense, 1 csr
    index_bits: int
    zero_code: int  # -1: none
    channel_axis: int  # -1: none


def read_blob(blob: bytes | np.ndarray, name: str = "weight") -> SharedWeight:
    """The SharedWeight stored in a blob; CodecError on any corrupt or inconsistent field."""
    data = blob.tobytes() if isinstance(blob, np.ndarray) else bytes(blob)
    streams = unpack_streams(data)
    if "h" not in streams or "b" not in streams:
        raise CodecError(f"packed weight '{name}' lacks its header or codebook stream.")
    r = Reader(streams["h"], f"header of packed weight '{name}'")
    h = _read_header(r)
    if len(streams["b"]) % 4:
        raise CodecError(f"codebook of packed weight '{name}' is not a whole number of float32 values.")
    codebook = np.frombuffer(streams["b"], "<f4").astype(np.float32)
    symbols = _read_symbols(streams, h, r, name)
    top = int(symbols.max()) if symbols.size else -1
    if top >= (1 << h.bits):
        raise CodecError(f"codes of packed weight '{name}' do not fit {h.bits} bits.")
    if h.zero_code >= (1 << h.bits):
        raise r.fail(f"zero code {h.zero_code} does not fit {h.bits} bits")
    codes = _swap(symbols, h.zero_code if h.zero_code >= 0 else None).reshape(h.shape)
    group_offsets, scale = _read_channel_streams(streams, h, r, name)
    outlier_index, outlier_value = _read_outliers(streams, h.numel, name)
    shared = SharedWeight(name=name, shape=h.shape, dtype=h.dtype, codes=codes, codebook=codebook, bits=h.bits,
                          channel_axis=h.channel_axis if h.channel_axis >= 0 else None, group_offsets=group_offsets,
                          scale=scale, outlier_index=outlier_index, outlier_value=outlier_value,
                          zero_code=h.zero_code if h.zero_code >= 0 else None)
    if group_offsets is not None and h.numel:  # codes + offsets must index the codebook
        index = shared.indices()
        bad = int(index.max()) >= codebook.size or int(index.min()) < 0
    else:  # the largest code (zero_code is swapped back, so take the larger of the two)
        bad = max(top, h.zero_code) >= codebook.size and h.numel > 0
    if bad:
        raise CodecError(f"codes of packed weight '{name}' point outside its codebook of {codebook.size} entries.")
    return shared


def _read_header(r: Reader) -> _Header:
    version = r.varint("version", 255)
    if version != FORMAT_VERSION:
        raise CodecError(f"{r.what} has format version {version}; this onnxcompress reads "
                         f"version {FORMAT_VERSION}: upgrade onnxcompress.")
    elem = r.varint("element type", 64)
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem))
    except (KeyError, TypeError, ValueError) as e:
        raise r.fail(f"element type {elem} is unknown") from e
    if elem not in FLOAT_TYPES:
        raise r.fail(f"element type {helper.tensor_dtype_to_string(elem)} is not a float type")
    rank = r.varint("rank", 16)
    shape = tuple(r.varint(f"dim {k}", MAX_ELEMENTS) for k in range(rank))
    numel = element_count(shape)
    if numel > MAX_ELEMENTS:
        raise r.fail(f"the shape {list(shape)} declares {numel} elements, more than the {MAX_ELEMENTS} "
                     "onnxcompress allocates")
    bits = r.varint("bits", 16)
    kind = r.varint("layout", 1)
    index_bits = r.varint("index bits", 16)
    zero_code = r.varint("zero code", 1 << 16) - 1
    channel_axis = r.varint("channel axis", rank) - 1
    r.done()
    if bits < 1:
        raise r.fail("bits is 0")
    return _Header(dtype, shape, numel, bits, kind, index_bits, zero_code, channel_axis)


def _read_symbols(streams: dict[str, bytes], h: _Header, r: Reader, name: str) -> np.ndarray:
    """Every entry's code (pruned entries: the zero code's symbol 0), from the csr or the dense layout."""
    if h.kind == 1:
        if not 1 <= h.index_bits <= 16 or "i" not in streams or "v" not in streams:
            raise r.fail("the csr layout lacks its index bits or streams")
        entries = {k: declared_count(streams[k]) for k in "iv"}
        if entries["i"] != entries["v"] or entries["i"] > h.numel:
            raise CodecError(f"packed weight '{name}' declares {entries['i']} relative indices and {entries['v']} "
                             f"sparse codes for a tensor of {h.numel} entries.")
        gaps = decode_any(streams["i"]).astype(np.int64) + 1
        values = decode_any(streams["v"])
        if gaps.size and int(gaps.max()) > (1 << h.index_bits):
            raise CodecError(f"relative indices of packed weight '{name}' exceed {h.index_bits} bits.")
        return relidx.decode(gaps, values, h.numel)
    if "c" not in streams:
        raise r.fail("the dense layout lacks its code stream")
    count = declared_count(streams["c"])
    if count != h.numel:
        raise CodecError(f"packed weight '{name}' declares {count} codes for its {h.numel} entries.")
    symbols = decode_any(streams["c"])
    if symbols.size != h.numel:
        raise CodecError(f"packed weight '{name}' holds {symbols.size} codes for {h.numel} entries.")
    return symbols


def _read_channel_streams(streams: dict[str, bytes], h: _Header, r: Reader, name: str
                          ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(group offsets, scales), one per output channel, where the blob has them."""
    channels = h.shape[h.channel_axis] if h.channel_axis >= 0 else None
    group_offsets = scale = None
    if ("g" in streams or "s" in streams) and channels is None:
        raise r.fail("per-channel streams need a channel axis")
    if "g" in streams:
        if declared_count(streams["g"]) != channels:
            raise CodecError(f"packed weight '{name}' declares {declared_count(streams['g'])} group offsets "
                             f"for {channels} channels.")
        group_offsets = decode_any(streams["g"]).astype(np.int32)
        if group_offsets.size != channels:
            raise CodecError(f"packed weight '{name}' has {group_offsets.size} group offsets for {channels} channels.")
    if "s" in streams:
        if len(streams["s"]) != 4 * channels:
            raise CodecError(f"packed weight '{name}' has a scale stream of the wrong length.")
        scale = np.frombuffer(streams["s"], "<f4").astype(np.float32)
    return group_offsets, scale


def _read_outliers(streams: dict[str, bytes], numel: int, name: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(flat indices, values) of the entries stored exactly, where the blob has them."""
    if "o" not in streams:
        return None, None
    ro = Reader(streams["o"], f"outliers of packed weight '{name}'")
    count = ro.varint("outlier count", numel)
    width = ro.u8("delta width")
    if not 1 <= width <= 32:
        raise ro.fail(f"delta width {width} is outside 1..32")
    deltas = ro.packed(count, width, "deltas").astype(np.int64)
    ro.done()
    outlier_index = np.cumsum(deltas)
    if count and int(outlier_index[-1]) >= numel:
        raise CodecError(f"an outlier of packed weight '{name}' lies outside the tensor.")
    raw = streams.get("u", b"")
    if len(raw) != 4 * count:
        raise CodecError(f"packed weight '{name}' has {len(raw) // 4} outlier values for {count} indices.")
    return outlier_index, np.frombuffer(raw, "<f4").astype(np.float32)


def decode_blob(blob: bytes | np.ndarray) -> np.ndarray:
    """THE numpy kernel of DecodeWeight: the float32 weight stored in a blob."""
    return read_blob(blob).decode().astype(np.float32, copy=False)
