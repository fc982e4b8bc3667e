"""Graph surgery of the packed form: swap a weight's portable subgraph for a DecodeWeight node, and
back (the dense fast path before a session, or the portable codebook form written by `unpack`)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxcompress.formats.codebook import portable_nodes
from onnxcompress.formats.codecs._wire import Reader
from onnxcompress.formats.codecs.choice import METHODS
from onnxcompress.formats.codecs.frame import unpack_streams
from onnxcompress.errors import ModelError
from onnxcompress.graph.external import read_tensor
from onnxcompress.graph.spill import spill_tensor
from onnxcompress.graph.edit import DOMAIN, NameScope, consumers, iter_graphs, mark, producers
from onnxcompress.formats.packed import OP_TYPE, PackedWeight, decode_blob, read_blob


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
    # deleted in place: rebuilding a repeated field copies every message into the protobuf arena,
    # which never gives memory back (quadratic growth over a model's weights)
    _delete_where(graph.initializer, lambda t: t.name in drop)
    _delete_where(graph.sparse_initializer, lambda s: s.values.name in drop)
    ids = {id(n) for n in old_nodes}
    _delete_where(graph.node, lambda n: id(n) in ids)
    for position, node in enumerate(nodes):
        graph.node.insert(position, node)
    for tensor in inits:  # a streamed model keeps big new tensors in its spill file, not in the arena
        spill_tensor(model, tensor)
    graph.initializer.extend(inits)
    return removed


def _delete_where(field, predicate) -> None:
    """Delete the entries of a repeated message field matching `predicate`, in place."""
    for position in [i for i, entry in enumerate(field) if predicate(entry)][::-1]:
        del field[position]


def replace_with_blob(model: onnx.ModelProto, packed: PackedWeight, scope: NameScope, pass_name: str) -> int:
    """Swap the portable subgraph (or plain tensor) computing `packed.name` for one DecodeWeight node
    reading a uint8 initializer that holds the blob. Returns the bytes of tensor data removed."""
    blob_name = scope.fresh(f"{packed.name}~")
    new = [helper.make_node(OP_TYPE, [blob_name], [packed.name], domain=DOMAIN)]
    dtype = read_dtype(bytes(packed.blob))
    if dtype != np.float32:
        decoded = scope.fresh(f"{packed.name}~f")
        new[0].output[0] = decoded
        new.append(helper.make_node("Cast", [decoded], [packed.name], to=helper.np_dtype_to_tensor_dtype(dtype)))
    for node in new:
        mark(node, pass_name)
    blob = numpy_helper.from_array(np.frombuffer(packed.blob, np.uint8).reshape(-1), blob_name)
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
            blob = read_tensor(out, inits[node.input[0]])
            position = list(graph.node).index(node)
            del graph.node[position]
            new_nodes, new_inits = rewrite(node, blob, scope)
            del blob
            for k, n in enumerate(new_nodes):
                graph.node.insert(position + k, n)
            for tensor in new_inits:  # a streamed model keeps big new tensors in its spill file
                spill_tensor(out, tensor)
            graph.initializer.extend(new_inits)
            blobs.add(node.input[0])
        still_used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        _delete_where(graph.initializer, lambda t: t.name in blobs and t.name not in still_used)
    _drop_domain_if_unused(out)
    return out


def to_dense(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fast path: every constant DecodeWeight becomes a plain dense initializer (numpy kernel)."""
    def rewrite(node, blob, scope):
        return [], [numpy_helper.from_array(decode_blob(blob), node.output[0])]
    return decode_nodes(model, rewrite)


def unpack(model: onnx.ModelProto, *, pass_name: str = "unpack") -> onnx.ModelProto:
    """The portable form of a packed model: each weight as bit-packed codes + unpacking ops +
    Gather(codebook) (standard ONNX, small on disk), exactly the SharedWeight the blob stores.

    ModelError unless the result is a model onnx and onnxruntime accept: every DecodeWeight reads a
    constant blob and each blob's shape agrees with what the model declares for its output (the caller
    checks the result loads: onnxcompress.runtime.sessions.check_runnable)."""
    from onnxcompress.graph.model import opset_of

    opset = opset_of(model)
    declared = {v.name: v for g, _ in iter_graphs(model.graph) for v in [*g.value_info, *g.output]}

    def rewrite(node, blob, scope):
        shared = read_blob(blob, node.output[0])
        _check_declared_shape(node, shared.shape, declared.get(node.output[0]))
        # DecodeWeight outputs float32 whatever dtype the header names (a Cast after it restores that)
        return portable_nodes(replace(shared, dtype=np.dtype(np.float32)), scope, opset, pass_name)
    for graph, path in iter_graphs(model.graph):
        constants = {t.name for t in graph.initializer}
        for node in graph.node:
            if node.domain == DOMAIN and (node.op_type != OP_TYPE or len(node.input) != 1
                                          or node.input[0] not in constants):
                raise ModelError(f"cannot unpack: node '{node.name or node.op_type}' ({path}) is a {DOMAIN} "
                                 f"{node.op_type} that does not read a constant blob initializer")
    return decode_nodes(model, rewrite)


def _check_declared_shape(node: onnx.NodeProto, shape: tuple[int, ...], value: onnx.ValueInfoProto | None) -> None:
    if value is None or not value.type.tensor_type.HasField("shape"):
        return
    dims = value.type.tensor_type.shape.dim
    if len(dims) != len(shape) or any(d.HasField("dim_value") and d.dim_value != n for d, n in zip(dims, shape)):
        want = [d.dim_value if d.HasField("dim_value") else d.dim_param or "?" for d in dims]
        raise ModelError(f"cannot unpack: the blob of '{node.output[0]}' declares shape {list(shape)} but the model "
                         f"declares {want} for it")


def packed_weights(model: onnx.ModelProto) -> list[dict]:
    """Per DecodeWeight node: the weight, its shape, stored bytes and bits per weight of each stream."""
    rows = []
    for graph, path in iter_graphs(model.graph):
        inits = {t.name: t for t in graph.initializer}
        for node in graph.node:
            if node.domain != DOMAIN or node.op_type != OP_TYPE or node.input[0] not in inits:
                continue
            blob = read_tensor(model, inits[node.input[0]]).tobytes()
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
