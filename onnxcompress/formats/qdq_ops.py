"""What onnxruntime's integer kernels accept: the op sets of the QDQ layout, why a node stays float, and the
activation Q -> DQ pairs."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxcompress.formats.qdq_weights import NAMES
from onnxcompress.graph.edit import mark, NameScope
from onnxcompress.graph.weights import Role
from onnxcompress.numerics.quantmath import CalibrationResult, IntType


LINEAR = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
ELEMENTWISE = {"Add", "Mul"}
OWN_SCALE = {"Concat", "AveragePool", "GlobalAveragePool"}  # inputs and output with their own ranges
SAME_SCALE = {"MaxPool", "GlobalMaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity"}
FUSED_ACTIVATIONS = {"Relu", "Clip"}
SILENT = {"Constant", "Shape", "Size", "Cast", "ConstantOfShape", "Relu", "Clip"} | SAME_SCALE


def layout(node: onnx.NodeProto) -> str:
    if node.op_type == "Conv":
        return "conv"
    trans_b = any(a.name == "transB" and a.i for a in node.attribute)
    return "gemm" if node.op_type == "Gemm" and trans_b else "gemm_t"


def groups(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1)


def activation_inputs(node: onnx.NodeProto, inits) -> list[str]:
    if node.op_type in LINEAR:
        return [x for x in node.input[:2] if x and x not in inits]
    return [x for x in node.input if x and x not in inits]


def unsupported(node: onnx.NodeProto, inits, calib: CalibrationResult) -> str | None:
    """Why `node` stays float, or None when its integer form is supported."""
    op = node.op_type
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if op == "Gather":
        t = inits.get(node.input[0])
        return None if t is not None and t.data_type == onnx.TensorProto.FLOAT else "Gather of a non-constant table"
    if op not in LINEAR | ELEMENTWISE | OWN_SCALE:
        return f"no integer kernel for {op} in onnxruntime"
    if op in LINEAR:
        w = inits.get(node.input[1])
        if op == "Gemm" and (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            return "Gemm with transA/alpha/beta"
        if op != "MatMul" and (w is None or w.data_type != onnx.TensorProto.FLOAT):
            return f"{op} weight is not a float initializer"
        if op == "MatMul" and w is not None and (w.data_type != onnx.TensorProto.FLOAT or len(w.dims) != 2):
            return "MatMul weight is not a 2-D float initializer"
        if op == "ConvTranspose" and attrs.get("group", 1) != 1:
            return "grouped ConvTranspose"
    for x in activation_inputs(node, inits):
        if x not in calib:
            return "an input has no calibration range (not float?)"
    for x in node.input:
        if x in inits and inits[x].data_type != onnx.TensorProto.FLOAT:
            return "a non-float constant input"
    return None


def weight_axis(node: onnx.NodeProto, info) -> int | None:
    if info.channel_axis is not None and info.role in (Role.CONV, Role.CONV_TRANSPOSE, Role.GEMM, Role.MATMUL):
        return info.channel_axis
    return None


def out_channels(node: onnx.NodeProto, info) -> int:
    axis = weight_axis(node, info)
    if axis is None:
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        axis = {"Conv": 0, "ConvTranspose": 1, "MatMul": 1, "Gemm": 0 if trans_b else 1}[node.op_type]
    if node.op_type == "ConvTranspose":
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        return info.shape[1] * group
    return info.shape[axis]


def insert_activation_qdq(graph: onnx.GraphProto, tensors: dict[str, tuple], qt: IntType, scope: NameScope,
                          pass_name: str) -> dict[str, str]:
    """Q -> DQ with (scale, zero point) `tensors[name]` after each tensor's producer (graph inputs: at the
    start), the DQ name read downstream; returns tensor name -> name of its DQ output."""
    graph_inputs = {i.name for i in graph.input}
    renamed: dict[str, str] = {}
    pairs: dict[str, list[onnx.NodeProto]] = defaultdict(list)  # producer output name -> Q/DQ nodes
    head: list[onnx.NodeProto] = []
    for name, (scale, zero) in tensors.items():
        s_name, z_name = scope.fresh(NAMES.scale), scope.fresh(NAMES.zero_point)
        graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), s_name),
                                  numpy_helper.from_array(np.array(zero, qt.np_dtype), z_name)])
        q_out = scope.fresh(NAMES.quantized)
        source, target = _reroute(graph, name, name in graph_inputs, scope)
        nodes = [mark(helper.make_node("QuantizeLinear", [source, s_name, z_name], [q_out],
                                       name=scope.fresh(NAMES.q_node)), pass_name),
                 mark(helper.make_node("DequantizeLinear", [q_out, s_name, z_name], [target],
                                       name=scope.fresh(NAMES.dq_node)), pass_name)]
        (head if name in graph_inputs else pairs[source]).extend(nodes)
        renamed[name] = target
    ordered = list(head)  # graph-input Q/DQ depend on nothing but the input
    for node in graph.node:
        ordered.append(node)
        for out in node.output:
            ordered += pairs.get(out, [])
    del graph.node[:]
    graph.node.extend(ordered)
    return renamed


def _reroute(graph: onnx.GraphProto, name: str, is_input: bool, scope: NameScope) -> tuple[str, str]:
    """(Q input, DQ output) for tensor `name`: a graph input's readers read a fresh DQ name; any other
    tensor's producer writes a fresh float name and the DQ output takes the tensor's own name."""
    if is_input:
        dq_out = scope.fresh(f"{name}_dequantized")
        _rename(graph, "input", name, dq_out)
        return name, dq_out
    source = scope.fresh(f"{name}_float")
    _rename(graph, "output", name, source)
    return source, name


def _rename(graph: onnx.GraphProto, field: str, old: str, new: str) -> None:
    """Every main-graph node's `field` ("input" or "output") entry `old` becomes `new`."""
    for node in graph.node:
        names = getattr(node, field)
        for k, x in enumerate(names):
            if x == old:
                names[k] = new
