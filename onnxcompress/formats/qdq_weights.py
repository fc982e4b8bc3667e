"""Weight-only quantization for the qdq pass: int8 per-channel, or blocked int4 for MatMul/Gemm.

Every float weight above the size threshold becomes an integer initializer + DequantizeLinear
that outputs the weight's own name, so every consumer (whatever its op) reads it unchanged.
MatMul/Gemm weights can instead be blocked int4 (opset 21 ``block_size`` on the K axis), the
pattern onnxruntime fuses into MatMulNBits; a Gemm is rewritten to MatMul (+ Add of its bias)
for that, with its weight stored (K, N).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxcompress.graph.edit import NameScope, consumers, find_graph, mark
from onnxcompress.numerics.quantmath import INT4, INT8, quantize_blocked, quantize_per_channel
from onnxcompress.graph.weights import FLOAT_TYPES, WeightInfo, get_array, replace_weight

log = logging.getLogger(__name__)
INT4_MIN_OPSET = 21
DQ_MIN_OPSET = 10  # DequantizeLinear (and QuantizeLinear)
DQ_AXIS_MIN_OPSET = 13  # their per-channel axis


@dataclass(frozen=True)
class _Names:
    """Short bases for the names the qdq pass makes (the DQ output keeps the weight's own name, the
    metadata_props name the pass): exporters' long tensor names repeated in every generated name
    took ~15% of a small int8 file."""

    quantized: str = "qdq.q"
    scale: str = "qdq.s"
    zero_point: str = "qdq.z"
    q_node: str = "qdq.Q"
    dq_node: str = "qdq.DQ"


NAMES = _Names()


def int4_tensor(name: str, q: np.ndarray) -> onnx.TensorProto:
    """An INT4 initializer: two values a byte, the first in the low nibble (ONNX packing)."""
    flat = (np.asarray(q, dtype=np.int8).ravel() & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
    return helper.make_tensor(name, onnx.TensorProto.INT4, list(q.shape), packed.tobytes(), raw=True)


def dq_nodes(output: str, q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, axis: int | None,
             scope: NameScope, pass_name: str, *, block_size: int | None = None
             ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """DequantizeLinear(q, scale[, zero]) -> `output`, with its initializers. An int32 bias's zero
    point of 0 is left out (the default; onnxruntime still fuses QGemm/QLinearConv). An int8
    weight keeps its zero point: without it onnxruntime 1.32 no longer fuses QGemm."""
    q_name, s_name = scope.fresh(NAMES.quantized), scope.fresh(NAMES.scale)
    q_tensor = int4_tensor(q_name, q) if block_size else numpy_helper.from_array(q, q_name)
    inits = [q_tensor, numpy_helper.from_array(np.asarray(scale, dtype=np.float32), s_name)]
    inputs = [q_name, s_name]
    if zero is not None and not (np.asarray(q).dtype == np.int32 and not np.any(zero)):
        z_name = scope.fresh(NAMES.zero_point)
        inits.append(numpy_helper.from_array(np.asarray(zero), z_name))
        inputs.append(z_name)
    attrs = {}
    if axis is not None and (np.ndim(scale) > 0):
        attrs["axis"] = axis
    if block_size:
        attrs["block_size"] = block_size
    node = helper.make_node("DequantizeLinear", inputs, [output], name=scope.fresh(NAMES.dq_node), **attrs)
    return [mark(node, pass_name)], inits


def cast_nodes(output: str, q: np.ndarray, scale: np.ndarray, axis: int | None, scope: NameScope, pass_name: str
               ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Mul(Cast(q, float), scale) -> `output`: a symmetric weight's dequantization in ops every opset has
    (DequantizeLinear needs opset 10, its per-channel axis 13). onnxruntime folds the pair at load, so
    the weight runs as float at the original speed; the file holds the int8 codes and the scales."""
    q_name, s_name, f_name = scope.fresh(NAMES.quantized), scope.fresh(NAMES.scale), scope.fresh(NAMES.quantized + "f")
    scale = np.asarray(scale, dtype=np.float32)
    if axis is not None and scale.ndim > 0:
        shape = [1] * q.ndim
        shape[axis] = q.shape[axis]
        scale = scale.reshape(shape)
    inits = [numpy_helper.from_array(q, q_name), numpy_helper.from_array(scale, s_name)]
    nodes = [helper.make_node("Cast", [q_name], [f_name], name=scope.fresh(NAMES.dq_node), to=onnx.TensorProto.FLOAT),
             helper.make_node("Mul", [f_name, s_name], [output], name=scope.fresh(NAMES.dq_node))]
    return [mark(n, pass_name) for n in nodes], inits


def _excluded(info: WeightInfo, excluded: set[str]) -> bool:
    return info.name in excluded or any({c.node, c.op_type} & excluded for c in info.consumers)


def _matmul_like(model: onnx.ModelProto, info: WeightInfo) -> onnx.NodeProto | None:
    """The single direct MatMul (input 1) or plain Gemm (input 1, no transA/alpha/beta) using a 2-D weight."""
    if len(info.consumers) != 1 or info.consumers[0].via or info.consumers[0].input_index != 1 or len(info.shape) != 2:
        return None
    graph = find_graph(model, info.graph)
    node = next((n for n in graph.node if len(n.input) > 1 and n.input[1] == info.name), None)
    if node is None or node.op_type not in ("MatMul", "Gemm"):
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Gemm" and (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0
                                   or attrs.get("beta", 1.0) != 1.0):
        return None
    return node


def _gemm_to_matmul(model: onnx.ModelProto, info: WeightInfo, node: onnx.NodeProto, scope: NameScope,
                    pass_name: str) -> None:
    """Gemm(x, W, b) -> MatMul(x, W) [+ Add(., b)]; W already holds the (K, N) layout.

    A value_info recorded for W (its old (N, K) shape under transB) is dropped: shape inference
    would find it contradicting the DequantizeLinear output."""
    graph = find_graph(model, info.graph)
    stale = [k for k, v in enumerate(graph.value_info) if v.name == info.name]
    for k in reversed(stale):
        del graph.value_info[k]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    out = node.output[0]
    node.op_type = "MatMul"
    del node.attribute[:]
    del node.input[2:]
    if bias is not None:
        mm_out = scope.fresh(f"{out}_matmul")
        node.output[0] = mm_out
        add = mark(helper.make_node("Add", [mm_out, bias], [out], name=scope.fresh(f"{node.name or 'gemm'}_bias")),
                   pass_name)
        position = next(k for k, n in enumerate(graph.node) if n is node or n.output[0] == mm_out)
        graph.node.insert(position + 1, add)


QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


def hoist_constants(model: onnx.ModelProto) -> int:
    """Main-graph Constant nodes holding a float tensor become initializers of the same name (what
    onnxruntime does at load), so that a node reading one is planned like one reading an
    initializer; returns how many moved."""
    graph = model.graph
    moved = [n for n in graph.node if n.op_type == "Constant" and len(n.attribute) == 1
             and n.attribute[0].name == "value" and n.attribute[0].t.data_type == onnx.TensorProto.FLOAT]
    for node in moved:
        tensor = onnx.TensorProto()
        tensor.CopyFrom(node.attribute[0].t)
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        graph.node.remove(node)
    return len(moved)


def _skip_reason(info: WeightInfo) -> str | None:
    """Why weight-only quantization leaves `info` alone (None: it quantizes it)."""
    if info.consumers and all(c.op_type in QDQ_OPS and c.input_index > 0 for c in info.consumers):
        return "a scale or zero point"
    if info.location == "sparse_initializer":
        return "already stored sparse"
    return info.skip


def quantize_weights_only(ctx, cfg, per_channel: bool, opset: int, pass_name: str, *,
                          keep: dict[str, str] | None = None, cast: bool = False) -> dict:
    """Weight-only quantization of every eligible float weight of every graph (initializers,
    Constant nodes, If/Loop/Scan bodies; a weight shared by several nodes gets one DequantizeLinear
    that all of them read); `keep` names weights to leave float, with the reason. Every float
    weight left float above the size threshold gets a report line saying why; returns the summary.
    `cast`: dequantize by Cast + Mul (:func:`cast_nodes`) instead of DequantizeLinear (float32 weights only)."""
    scope = NameScope(ctx.model)
    excluded = set(map(str, cfg.exclude))
    keep = keep or {}
    int4 = cfg.int4_matmul
    if int4 and opset < INT4_MIN_OPSET:
        ctx.note(f"qdq: int4 weights need opset >= {INT4_MIN_OPSET} (model has {opset}); using int8 instead")
        int4 = False
    counts = {"weights": 0, "int4": 0, "int8": 0, "bytes_before": 0, "bytes_after": 0, "tiny_float": 0}
    for info in ctx.weights(cfg.min_elements):
        reason = _skip_reason(info) or keep.get(info.name)
        if reason is None and _excluded(info, excluded):
            reason = "excluded by the user"
        if reason is None and opset < DQ_MIN_OPSET and info.dtype != "float32":
            reason = f"{info.dtype}: DequantizeLinear needs opset {DQ_MIN_OPSET} (the model has {opset})"
        if reason is not None:
            log.debug("qdq: %s left alone: %s", info.name, reason)
            if info.is_float and info.skip is not None and info.skip.startswith("tiny"):
                counts["tiny_float"] += info.nbytes
            elif info.is_float and reason != "a scale or zero point":
                ctx.record(info.name, pass_name, f"kept float: {reason}", info.nbytes, info.nbytes)
            continue
        w = get_array(ctx.model, info).astype(np.float32)
        node = _matmul_like(ctx.model, info) if int4 else None
        if node is not None:
            after, action, kind = _int4_blocked(ctx.model, info, node, w, cfg.block_size, scope, pass_name)
        else:
            use_cast = cast and info.dtype == "float32"
            # per channel by Cast + Mul at any opset, by DequantizeLinear's axis from its opset on
            axis = info.channel_axis if per_channel and (use_cast or opset >= DQ_AXIS_MIN_OPSET) else None
            after, action, kind = _int8(ctx.model, info, w, axis, use_cast, scope, pass_name)
        ctx.record(info.name, pass_name, action, info.nbytes, after, {"role": info.role.value})
        counts["weights"] += 1
        counts[kind] += 1
        counts["bytes_before"] += info.nbytes
        counts["bytes_after"] += after
    log.info("qdq weight-only: %d weights, %d -> %d bytes", counts["weights"], counts["bytes_before"],
             counts["bytes_after"])
    return counts


def _cast_back(info: WeightInfo, dequantize, scope: NameScope, pass_name: str
               ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """`dequantize(output)`'s nodes writing `info.name`; DequantizeLinear computes float32, so a float16,
    bfloat16 or double weight gets a Cast back to its dtype (its consumers are typed by it)."""
    if info.dtype == "float32":
        return dequantize(info.name)
    dequantized = scope.fresh(NAMES.quantized + "f")
    nodes, inits = dequantize(dequantized)
    to = next(elem for elem, name in FLOAT_TYPES.items() if name == info.dtype)
    cast = helper.make_node("Cast", [dequantized], [info.name], name=scope.fresh(NAMES.dq_node), to=to)
    return nodes + [mark(cast, pass_name)], inits


def _int4_blocked(model: onnx.ModelProto, info: WeightInfo, node: onnx.NodeProto, w: np.ndarray, block_size: int,
                  scope: NameScope, pass_name: str) -> tuple[int, str, str]:
    """Blocked int4 + DQ of a MatMul/Gemm weight stored (K, N) (a Gemm becomes MatMul + Add);
    returns (bytes after, report action, kind)."""
    transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
    kn = w.T if transposed else w
    q, scale = quantize_blocked(kn, 0, block_size, INT4)
    nodes, inits = _cast_back(info, lambda out: dq_nodes(out, q, scale, None, 0, scope, pass_name,
                                                         block_size=block_size), scope, pass_name)
    replace_weight(model, info, nodes, inits)
    if node.op_type == "Gemm":
        _gemm_to_matmul(model, info, node, scope, pass_name)
    return (q.size + 1) // 2 + scale.nbytes, f"int4 blocked ({block_size})", "int4"


def _int8(model: onnx.ModelProto, info: WeightInfo, w: np.ndarray, axis: int | None, use_cast: bool,
          scope: NameScope, pass_name: str) -> tuple[int, str, str]:
    """Symmetric int8 (per channel along `axis`, else per tensor), dequantized by DQ or by Cast + Mul;
    returns (bytes after, report action, kind)."""
    q, scale, zero = quantize_per_channel(w, axis, INT8, symmetric=True)
    if use_cast:
        nodes, inits = cast_nodes(info.name, q.astype(np.int8), scale, axis, scope, pass_name)
    else:
        nodes, inits = _cast_back(info, lambda out: dq_nodes(out, q.astype(np.int8), scale, zero.astype(np.int8),
                                                             axis, scope, pass_name), scope, pass_name)
    replace_weight(model, info, nodes, inits)
    return q.size + scale.nbytes, "int8 " + ("per-channel" if axis is not None else "per-tensor"), "int8"


def gather_before_dequantize(model: onnx.ModelProto, pass_name: str) -> int:
    """Dequantize only the rows a Gather reads, not the whole table at every inference.

    onnxruntime does not fold DequantizeLinear of a constant, so DQ(table) -> Gather dequantizes a
    whole embedding table per call (an 8.6x slower run on a 58k-row table). Where a main-graph DQ of
    constant inputs feeds only Gathers on axis 0, each becomes Gather(q_table, idx) -> dequantize,
    with the same values: a per-tensor scale by DequantizeLinear; a per-row scale (DQ axis 0) by
    Cast -> Sub(Gather(zero)) -> Mul(Gather(scale)), the scale and zero point stored as [rows, 1, ...]
    so the gathered ones broadcast. Returns how many tables were rewritten."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers = consumers(graph)  # a subgraph reading a name counts as a reader (input index -1)
    outputs = {o.name for o in graph.output}
    scope = NameScope(model)
    done = 0
    for name in [n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"]:
        # found again by name: a rewrite rebuilds the node list, whose messages are then new objects
        dq = next(n for n in graph.node if n.op_type == "DequantizeLinear" and n.output[0] == name)
        users = _gathered_table(dq, readers.get(dq.output[0], []), inits, outputs)
        if users is None:
            continue
        rank = len(inits[dq.input[0]].dims)
        scale = numpy_helper.to_array(inits[dq.input[1]])
        zero = numpy_helper.to_array(inits[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] else None
        if zero is not None and scale.ndim and not np.any(zero):
            zero = None  # symmetric: no Sub, and no float copy of the zero points
        attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        if "block_size" in attrs or rank < 1 or (scale.ndim and attrs.get("axis", 1) % rank != 0):
            continue  # blocked, or per-channel along another axis: rows do not carry their own scale
        new_inits, rows = [], None
        if scale.ndim:  # one scale per row: stored [rows, 1, ...] so the gathered ones broadcast
            shape = (-1,) + (1,) * (rank - 1)
            rows = (scope.fresh(NAMES.scale), scope.fresh(NAMES.zero_point) if zero is not None else None)
            new_inits.append(numpy_helper.from_array(scale.reshape(shape).astype(np.float32), rows[0]))
            if zero is not None:
                new_inits.append(numpy_helper.from_array(zero.reshape(shape).astype(np.float32), rows[1]))
        new_nodes = {id(user): [mark(n, pass_name) for n in _gather_rows(dq, user, rows, scope)] for user in users}
        kept = []
        for node in graph.node:
            if node is dq:
                continue
            kept += new_nodes.get(id(node), [node])
        del graph.node[:]
        graph.node.extend(kept)
        graph.initializer.extend(new_inits)
        readers = consumers(graph)
        for used in dq.input[1:]:
            if used and used not in readers and used in inits:
                graph.initializer.remove(inits.pop(used))
        done += 1
    return done


def _gathered_table(dq: onnx.NodeProto, uses: list, inits: dict, outputs: set[str]) -> list[onnx.NodeProto] | None:
    """The Gathers reading the DQ of constant inputs as their table on axis 0, when nothing else reads it."""
    if (dq.output[0] in outputs or not uses or not all(x in inits for x in dq.input if x)
            or any(u.op_type != "Gather" or index != 0 or any(a.name == "axis" and a.i != 0 for a in u.attribute)
                   for u, index in uses)):
        return None
    return [u for u, _ in uses]  # each reads it once, as its table (index 0)


def _gather_rows(dq: onnx.NodeProto, user: onnx.NodeProto, rows: tuple[str, str | None] | None,
                 scope: NameScope) -> list[onnx.NodeProto]:
    """Gather(q_table, idx) then dequantize into the Gather's output: by the DQ's own scale (per tensor,
    `rows` None) or by the gathered per-row (scale, zero point or None) initializers `rows`."""
    picked = scope.fresh(NAMES.quantized)
    chain = [helper.make_node("Gather", [dq.input[0], user.input[1]], [picked], name=scope.fresh("qdq.G"))]
    if rows is None:
        chain.append(helper.make_node("DequantizeLinear", [picked, *dq.input[1:]], [user.output[0]],
                                      name=scope.fresh(NAMES.dq_node)))
        return chain
    value = scope.fresh(NAMES.quantized)
    chain.append(helper.make_node("Cast", [picked], [value], to=onnx.TensorProto.FLOAT))
    if rows[1] is not None:
        z, centred = scope.fresh(NAMES.zero_point), scope.fresh(NAMES.quantized)
        chain += [helper.make_node("Gather", [rows[1], user.input[1]], [z]),
                  helper.make_node("Sub", [value, z], [centred])]
        value = centred
    s = scope.fresh(NAMES.scale)
    chain += [helper.make_node("Gather", [rows[0], user.input[1]], [s]),
              helper.make_node("Mul", [value, s], [user.output[0]], name=scope.fresh(NAMES.dq_node))]
    return chain
