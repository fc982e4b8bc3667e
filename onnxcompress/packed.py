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
import onnx
from onnx import TensorProto, helper, numpy_helper

from .codebook import SharedWeight, portable_nodes
from .codecs import bitpack, encode_best, entropy_bits, relidx
from .codecs.choice import METHODS, decode_any
from .codecs.frame import pack_streams, unpack_streams
from .codecs._wire import Reader, uvarint, bit_length
from .errors import CodecError, ModelError
from .graphs import DOMAIN, NameScope, consumers, iter_graphs, mark, producers

log = logging.getLogger(__name__)

OP_TYPE = "DecodeWeight"
FORMAT_VERSION = 1
MAX_ELEMENTS = 1 << 34  # a header declaring more is corrupt (guards the allocation)
INDEX_BITS_CANDIDATES = tuple(range(1, 13))


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
    blob: bytes
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
    shape = tuple(int(d) for d in shared.shape)
    numel = int(np.prod(shape, dtype=np.int64))
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(shared.dtype))
    head = [FORMAT_VERSION, elem, len(shape), *shape, shared.bits, 1 if layout.kind == "csr" else 0,
            layout.index_bits if layout.kind == "csr" else 0,
            0 if shared.zero_code is None else shared.zero_code + 1,
            0 if shared.channel_axis is None else shared.channel_axis + 1]
    streams: dict[str, tuple[bytes, StreamStat]] = {"h": (b"".join(uvarint(int(v)) for v in head), None)}
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


# ---------------------------------------------------------------- decoding one weight

def read_blob(blob: bytes | np.ndarray, name: str = "weight") -> SharedWeight:
    """The SharedWeight stored in a blob; CodecError on any corrupt or inconsistent field."""
    data = blob.tobytes() if isinstance(blob, np.ndarray) else bytes(blob)
    streams = unpack_streams(data)
    if "h" not in streams or "b" not in streams:
        raise CodecError(f"packed weight '{name}' lacks its header or codebook stream.")
    r = Reader(streams["h"], f"header of packed weight '{name}'")
    version = r.varint("version", 255)
    if version != FORMAT_VERSION:
        raise CodecError(f"packed weight '{name}' has format version {version}; this onnxcompress reads "
                         f"version {FORMAT_VERSION}: upgrade onnxcompress.")
    elem = r.varint("element type", 64)
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem))
    except (KeyError, TypeError, ValueError) as e:
        raise r.fail(f"element type {elem} is unknown") from e
    rank = r.varint("rank", 16)
    shape = tuple(r.varint(f"dim {k}", MAX_ELEMENTS) for k in range(rank))
    numel = int(np.prod(shape, dtype=np.int64))
    if numel > MAX_ELEMENTS:
        raise r.fail(f"{numel} elements exceed the limit")
    bits = r.varint("bits", 16)
    kind = r.varint("layout", 1)
    index_bits = r.varint("index bits", 16)
    zero_code = r.varint("zero code", 1 << 16) - 1
    channel_axis = r.varint("channel axis", rank) - 1
    r.done()
    if bits < 1:
        raise r.fail("bits is 0")
    if len(streams["b"]) % 4:
        raise CodecError(f"codebook of packed weight '{name}' is not a whole number of float32 values.")
    codebook = np.frombuffer(streams["b"], "<f4").astype(np.float32)
    if kind == 1:
        if not 1 <= index_bits <= 16 or "i" not in streams or "v" not in streams:
            raise r.fail("the csr layout lacks its index bits or streams")
        gaps = decode_any(streams["i"]).astype(np.int64) + 1
        values = decode_any(streams["v"])
        if gaps.size and int(gaps.max()) > (1 << index_bits):
            raise CodecError(f"relative indices of packed weight '{name}' exceed {index_bits} bits.")
        symbols = relidx.decode(gaps, values, numel)
    else:
        if "c" not in streams:
            raise r.fail("the dense layout lacks its code stream")
        symbols = decode_any(streams["c"])
        if symbols.size != numel:
            raise CodecError(f"packed weight '{name}' holds {symbols.size} codes for {numel} entries.")
    top = int(symbols.max()) if symbols.size else -1
    if top >= (1 << bits):
        raise CodecError(f"codes of packed weight '{name}' do not fit {bits} bits.")
    if zero_code >= (1 << bits):
        raise r.fail(f"zero code {zero_code} does not fit {bits} bits")
    codes = _swap(symbols, zero_code if zero_code >= 0 else None).reshape(shape)
    channels = shape[channel_axis] if channel_axis >= 0 else None
    group_offsets = scale = outlier_index = outlier_value = None
    if "g" in streams or "s" in streams:
        if channels is None:
            raise r.fail("per-channel streams need a channel axis")
    if "g" in streams:
        group_offsets = decode_any(streams["g"]).astype(np.int32)
        if group_offsets.size != channels:
            raise CodecError(f"packed weight '{name}' has {group_offsets.size} group offsets for {channels} channels.")
    if "s" in streams:
        if len(streams["s"]) != 4 * channels:
            raise CodecError(f"packed weight '{name}' has a scale stream of the wrong length.")
        scale = np.frombuffer(streams["s"], "<f4").astype(np.float32)
    if "o" in streams:
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
        outlier_value = np.frombuffer(raw, "<f4").astype(np.float32)
    shared = SharedWeight(name=name, shape=shape, dtype=dtype, codes=codes, codebook=codebook, bits=bits,
                          channel_axis=channel_axis if channel_axis >= 0 else None, group_offsets=group_offsets,
                          scale=scale, outlier_index=outlier_index, outlier_value=outlier_value,
                          zero_code=zero_code if zero_code >= 0 else None)
    if group_offsets is not None and numel:  # codes + offsets must index the codebook
        index = shared.indices()
        bad = int(index.max()) >= codebook.size or int(index.min()) < 0
    else:  # the largest code (zero_code is swapped back, so take the larger of the two)
        bad = max(top, zero_code) >= codebook.size and numel > 0
    if bad:
        raise CodecError(f"codes of packed weight '{name}' point outside its codebook of {codebook.size} entries.")
    return shared


def decode_blob(blob: bytes | np.ndarray) -> np.ndarray:
    """THE numpy kernel of DecodeWeight: the float32 weight stored in a blob."""
    return read_blob(blob).decode().astype(np.float32, copy=False)


# ---------------------------------------------------------------- graph rewriting

def constant_subgraph(graph: onnx.GraphProto, name: str) -> tuple[list[onnx.NodeProto], list[str]]:
    """Nodes and initializers that compute `name` from constants only and feed nothing else."""
    made_by = producers(graph)
    used_by = consumers(graph)
    inits = {t.name for t in graph.initializer} | {s.values.name for s in graph.sparse_initializer}
    nodes: list[onnx.NodeProto] = []
    tensors: list[str] = []
    todo = [name]
    chosen: set[int] = set()
    while todo:
        tensor = todo.pop()
        node = made_by.get(tensor)
        if node is None:
            if tensor in inits and all(id(n) in chosen for n, _ in used_by.get(tensor, [])):
                tensors.append(tensor)
            continue
        if id(node) in chosen:
            continue
        outs_used = [n for out in node.output for n, _ in used_by.get(out, [])]
        if tensor != name and not all(id(n) in chosen for n in outs_used):
            continue
        chosen.add(id(node))
        nodes.append(node)
        todo.extend(i for i in node.input if i)
    return nodes, tensors


def replace_constant_subgraph(model: onnx.ModelProto, name: str, nodes: list[onnx.NodeProto],
                              inits: list[onnx.TensorProto]) -> int:
    """Swap what computes tensor `name` from constants only (a portable subgraph, a plain
    initializer or Constant) for `nodes` and `inits`, inserted first in the same graph.

    Returns the serialized bytes of the initializers removed.
    """
    for graph, _ in iter_graphs(model.graph):
        initial = {t.name for t in graph.initializer}
        if name in producers(graph) or name in initial:
            break
    else:
        raise ModelError(f"weight '{name}' is not produced in any graph of the model")
    old_nodes, tensors = constant_subgraph(graph, name)
    drop = set(tensors) | ({name} if name in initial else set())
    removed = sum(t.ByteSize() for t in graph.initializer if t.name in drop)
    removed += sum(s.ByteSize() for s in graph.sparse_initializer if s.values.name in drop)
    keep = [t for t in graph.initializer if t.name not in drop]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    keep_sparse = [s for s in graph.sparse_initializer if s.values.name not in drop]
    del graph.sparse_initializer[:]
    graph.sparse_initializer.extend(keep_sparse)
    ids = {id(n) for n in old_nodes}
    keep_nodes = [n for n in graph.node if id(n) not in ids]
    del graph.node[:]
    graph.node.extend(list(nodes) + keep_nodes)
    graph.initializer.extend(inits)
    return removed


def replace_with_blob(model: onnx.ModelProto, packed: PackedWeight, scope: NameScope, pass_name: str) -> int:
    """Swap the portable subgraph (or plain tensor) computing `packed.name` for one DecodeWeight node
    reading a uint8 initializer that holds the blob. Returns the bytes of tensor data removed."""
    blob_name = scope.fresh(f"{packed.name}~")
    new = [helper.make_node(OP_TYPE, [blob_name], [packed.name], domain=DOMAIN)]
    dtype = read_dtype(packed.blob)
    if dtype != np.float32:
        decoded = scope.fresh(f"{packed.name}~f")
        new[0].output[0] = decoded
        new.append(helper.make_node("Cast", [decoded], [packed.name], to=helper.np_dtype_to_tensor_dtype(dtype)))
    for node in new:
        mark(node, pass_name)
    blob = numpy_helper.from_array(np.frombuffer(packed.blob, np.uint8), blob_name)
    removed = replace_constant_subgraph(model, packed.name, new, [blob])
    ensure_domain(model)
    return removed


def read_dtype(blob: bytes) -> np.dtype:
    head = Reader(unpack_streams(blob)["h"], "header")
    head.varint("version", 255)
    return np.dtype(helper.tensor_dtype_to_np_dtype(head.varint("element type", 64)))


def ensure_domain(model: onnx.ModelProto) -> None:
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))


def _drop_domain_if_unused(model: onnx.ModelProto) -> None:
    if any(n.domain == DOMAIN for g, _ in iter_graphs(model.graph) for n in g.node):
        return
    keep = [o for o in model.opset_import if o.domain != DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def decode_nodes(model: onnx.ModelProto, rewrite) -> onnx.ModelProto:
    """A copy of `model` where every DecodeWeight node with a constant blob is replaced by
    ``rewrite(graph, node, blob array, scope)`` (which inserts what computes the output)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    scope = NameScope(out)
    for graph, _ in iter_graphs(out.graph):
        inits = {t.name: t for t in graph.initializer}
        targets = [n for n in graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE and n.input[0] in inits]
        if not targets:
            continue
        blobs = set()
        for node in targets:
            blob = numpy_helper.to_array(inits[node.input[0]])
            position = list(graph.node).index(node)
            del graph.node[position]
            new_nodes, new_inits = rewrite(node, blob, scope)
            for k, n in enumerate(new_nodes):
                graph.node.insert(position + k, n)
            graph.initializer.extend(new_inits)
            blobs.add(node.input[0])
        still_used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        keep = [t for t in graph.initializer if t.name not in blobs or t.name in still_used]
        del graph.initializer[:]
        graph.initializer.extend(keep)
    _drop_domain_if_unused(out)
    return out


def to_dense(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fast path: every constant DecodeWeight becomes a plain dense initializer (numpy kernel)."""
    def rewrite(node, blob, scope):
        return [], [numpy_helper.from_array(decode_blob(blob), node.output[0])]
    return decode_nodes(model, rewrite)


def unpack(model: onnx.ModelProto, *, pass_name: str = "unpack") -> onnx.ModelProto:
    """The portable form of a packed model: each weight as uint codes + Cast + Gather(codebook)
    (standard ONNX, small on disk), exactly the SharedWeight the blob stores."""
    from .model import opset_of

    opset = opset_of(model)

    def rewrite(node, blob, scope):
        shared = read_blob(blob, node.output[0])
        nodes, inits = portable_nodes(shared, scope, opset, pass_name)
        return nodes, inits
    return decode_nodes(model, rewrite)


def packed_weights(model: onnx.ModelProto) -> list[dict]:
    """Per DecodeWeight node: the weight, its shape, stored bytes and bits per weight of each stream."""
    rows = []
    for graph, path in iter_graphs(model.graph):
        inits = {t.name: t for t in graph.initializer}
        for node in graph.node:
            if node.domain != DOMAIN or node.op_type != OP_TYPE or node.input[0] not in inits:
                continue
            blob = numpy_helper.to_array(inits[node.input[0]]).tobytes()
            shared = read_blob(blob, node.output[0])
            numel = max(int(np.prod(shared.shape, dtype=np.int64)), 1)
            streams = unpack_streams(blob)
            methods = {k: (METHODS[v[0]] if k in "civg" and v and v[0] < len(METHODS) else "float32")
                       for k, v in streams.items() if k != "h"}
            rows.append({"name": node.output[0], "graph": path, "shape": list(shared.shape), "bits": shared.bits,
                         "stored_bytes": len(blob), "bits_per_weight": 8.0 * len(blob) / numel,
                         "layout": "csr" if "i" in streams else "dense",
                         "streams": {k: {"bytes": len(v), "bits_per_weight": 8.0 * len(v) / numel,
                                         "method": methods[k]} for k, v in streams.items() if k != "h"},
                         "nonzero": float(np.mean(shared.decode() != 0))})
    return rows
