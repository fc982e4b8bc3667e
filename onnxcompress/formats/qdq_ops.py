"""What onnxruntime's integer kernels accept: the op sets of the QDQ layout and why a node stays float."""
from __future__ import annotations

import onnx
from onnx import helper

from onnxcompress.graph.weights import Role
from onnxcompress.numerics.quantmath import CalibrationResult


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
