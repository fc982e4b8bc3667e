"""Dynamic int8 for MatMul/Gemm: activation ranges computed at run time, as onnxruntime's quantize_dynamic.

For y = x W (+ b) with a constant 2-D W (K, N):

    xq, s_x, z_x = DynamicQuantizeLinear(x)              uint8, range of this call's x
    acc = MatMulInteger(xq, Wq, z_x, z_w)                int32, Wq int8 per output column
    y = Cast(acc, float) * (s_x * s_w) (+ b)

which onnxruntime fuses into DynamicQuantizeMatMul / MatMulIntegerToFloat. No calibration range
can be wrong for a new input, so this is the static recipe's fallback where fixed ranges lose the
task (outlier activations, attention). The weight is stored once, int8, per column scale.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxcompress.graph.edit import NameScope, consumers, mark
from onnxcompress.numerics.quantmath import INT8, quantize_per_channel
from onnxcompress.graph.weights import get_array

log = logging.getLogger(__name__)

DYNAMIC_MIN_OPSET = 11  # DynamicQuantizeLinear


def _target(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> tuple[str, bool] | None:
    """(weight name, stored transposed) of a MatMul/plain Gemm reading a 2-D float initializer, else None."""
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
        return None
    w = inits[node.input[1]]
    if w.data_type != onnx.TensorProto.FLOAT or len(w.dims) != 2 or node.input[0] in inits:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Gemm" and (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0
                                   or attrs.get("beta", 1.0) != 1.0):
        return None
    return node.input[1], bool(node.op_type == "Gemm" and attrs.get("transB", 0))


def quantize_dynamic_matmuls(ctx, pass_name: str) -> list[str]:
    """Rewrite every eligible MatMul/Gemm of the main graph as above; returns the weights it stored.
    A weight read by anything else stays for the weight-only step."""
    graph = ctx.model.graph
    inits = {t.name: t for t in graph.initializer}
    uses = consumers(graph)
    infos = {w.name: w for w in ctx.weights(0) if w.graph == "main" and w.location == "initializer"}
    scope = NameScope(ctx.model)
    done, out_nodes = [], []
    for node in list(graph.node):
        found = _target(node, inits)
        if found is None or found[0] not in infos or len(uses.get(found[0], [])) != 1 or infos[found[0]].skip:
            out_nodes.append(node)
            continue
        name, transposed = found
        info = infos[name]
        w = get_array(ctx.model, info).astype(np.float32)
        kn = w.T if transposed else w  # (K, N)
        q, scale, zero = quantize_per_channel(kn, 1, INT8, symmetric=True)
        qn, sn, zn = scope.fresh("qdq.q"), scope.fresh("qdq.s"), scope.fresh("qdq.z")
        graph.initializer.extend([numpy_helper.from_array(q.astype(np.int8), qn),
                                  numpy_helper.from_array(scale.astype(np.float32), sn),
                                  numpy_helper.from_array(zero.astype(np.int8), zn)])
        xq, xs, xz, acc, accf, s, y = (scope.fresh(b) for b in ("qdq.xq", "qdq.xs", "qdq.xz", "qdq.acc", "qdq.accf",
                                                                "qdq.xws", "qdq.y"))
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
        made = [helper.make_node("DynamicQuantizeLinear", [node.input[0]], [xq, xs, xz], name=scope.fresh("qdq.DQL")),
                helper.make_node("MatMulInteger", [xq, qn, xz, zn], [acc], name=scope.fresh("qdq.MMI")),
                helper.make_node("Cast", [acc], [accf], to=onnx.TensorProto.FLOAT, name=scope.fresh("qdq.cast")),
                helper.make_node("Mul", [xs, sn], [s], name=scope.fresh("qdq.scale")),
                helper.make_node("Mul", [accf, s], [y if bias else node.output[0]], name=scope.fresh("qdq.mul"))]
        if bias:
            made.append(helper.make_node("Add", [y, bias], [node.output[0]], name=scope.fresh("qdq.bias")))
        out_nodes += [mark(n, pass_name) for n in made]
        ctx.record(name, pass_name, "int8 dynamic (activation range at run time)", info.nbytes,
                   q.size + scale.nbytes + zero.size, {"role": info.role.value})
        done.append(name)
    if done:
        del graph.node[:]
        graph.node.extend(out_nodes)
        for k in [k for k, t in enumerate(graph.initializer) if t.name in set(done)][::-1]:
            del graph.initializer[k]
        stale = {v.name for v in graph.value_info} & set(done)
        for k in [k for k, v in enumerate(graph.value_info) if v.name in stale][::-1]:
            del graph.value_info[k]
    log.info("qdq dynamic: %d MatMul/Gemm weights", len(done))
    return done
