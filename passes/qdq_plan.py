"""Planning static QDQ insertion: which nodes get integer kernels, which stay float and why, and the
(scale, zero point) of every quantized activation (a helper of the qdq pass, not a pass)."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import onnx

from onnxcompress.formats.qdq_ops import (activation_inputs, ELEMENTWISE, FUSED_ACTIVATIONS, LINEAR, SAME_SCALE,
                                          SILENT, unsupported)
from onnxcompress.graph.edit import consumers
from onnxcompress.numerics.quantmath import CalibrationResult



@dataclass
class StaticPlan:
    """What static quantization does to each node and activation of the main graph."""

    nodes: dict[int, str] = field(default_factory=dict)  # node index -> "linear" | "elementwise" | ...
    tensors: dict[str, tuple[float, int]] = field(default_factory=dict)  # activation -> (scale, zero)
    fused: set[int] = field(default_factory=set)  # Relu/Clip node indices whose output takes the Q
    floats: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # reason -> node labels


def plan_static(graph: onnx.GraphProto, calib: CalibrationResult, keep_float: set[str], *, exclude: list,
                activation_type: str, symmetric: bool) -> StaticPlan:
    """Which nodes get integer kernels (and why the others stay float), and each quantized activation's
    (scale, zero point) from its calibrated range; same-scale ops carry their input's through."""
    inits = {t.name: t for t in graph.initializer}
    uses = consumers(graph)
    excluded = set(map(str, exclude))
    plan = StaticPlan()
    _choose_nodes(plan, graph, calib, keep_float, excluded, inits, uses)
    for name in _activations(plan, graph, calib, excluded, inits, uses, symmetric):
        plan.tensors[name] = calib[name].scale_zero_point(activation_type, symmetric=symmetric)
    # same-scale ops (pooling, reshapes) carry their input's quantization through, in graph order
    for i, node in enumerate(graph.node):
        if (node.op_type in SAME_SCALE and len(node.output) == 1 and node.input[0] in plan.tensors
                and not excluded & {node.name, node.op_type} and node.output[0] not in keep_float):
            plan.tensors[node.output[0]] = plan.tensors[node.input[0]]
            plan.nodes[i] = "same_scale"
    return plan


def _choose_nodes(plan: StaticPlan, graph: onnx.GraphProto, calib: CalibrationResult, keep_float: set[str],
                  excluded: set[str], inits: dict, uses: dict) -> None:
    """plan.nodes: each node with an integer kernel and its kind; plan.floats: why each other node stays float."""
    for i, node in enumerate(graph.node):
        label = node.name or f"{node.op_type}_{i}"
        if node.op_type in SILENT and not (excluded & {label, node.op_type}):
            continue
        if excluded & ({label, node.op_type} | set(node.output)):
            plan.floats["excluded by the user"].append(label)
            continue
        follow = uses.get(node.output[0], []) if node.output else []
        fused = {follow[0][0].output[0]} if len(follow) == 1 and follow[0][0].op_type in FUSED_ACTIVATIONS else set()
        if keep_float & (set(activation_inputs(node, inits)) | set(node.output) | fused):
            plan.floats["an activation it reads or writes breaks the model in int8"].append(label)
            continue
        reason = unsupported(node, inits, calib)
        if reason:
            plan.floats[reason].append(label)
            continue
        plan.nodes[i] = ("linear" if node.op_type in LINEAR else "elementwise" if node.op_type in ELEMENTWISE
                         else node.op_type if node.op_type == "Gather" else "own_scale")


def _activations(plan: StaticPlan, graph: onnx.GraphProto, calib: CalibrationResult, excluded: set[str],
                 inits: dict, uses: dict, symmetric: bool) -> list[str]:
    """The calibrated activations the planned nodes read and write, in order, once each; a Relu/Clip right
    after a node takes its output's Q (the fusion boundary, recorded in plan.fused)."""
    outputs = {o.name for o in graph.output}
    index_of = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    wanted: list[str] = []
    for i, kind in plan.nodes.items():
        node = graph.node[i]
        if kind == "Gather":
            continue
        wanted += [x for x in activation_inputs(node, inits)]
        out = node.output[0]
        if node.op_type in ("Gemm", "MatMul") and out in outputs:
            continue  # QGemm / MatMulIntegerToFloat give a float output directly
        follow = uses.get(out, [])
        if (len(follow) == 1 and follow[0][0].op_type in FUSED_ACTIVATIONS and out not in outputs
                and not symmetric and follow[0][0].output[0] in calib
                and not excluded & {follow[0][0].name, follow[0][0].op_type}):
            plan.fused.add(index_of[follow[0][0].output[0]])
            out = follow[0][0].output[0]
        wanted.append(out)
    return list(dict.fromkeys(w for w in wanted if w in calib))
