"""Which op made each graph output, for task-kind detection (runtime.tasks): looked through ops that only move
values, with the words this module gives to outputs no single op names (a carried state, an x * sigmoid(x)), and
which outputs are declared time-major."""
from __future__ import annotations

import onnx

from onnxcompress.graph.weights import FLOAT_TYPES, PASS_THROUGH

# ops that only move, repeat or retype values: an output's producer is looked for behind them
LAYOUT_OPS = frozenset(PASS_THROUGH | {"Expand"})
SWISH = "x * sigmoid(x)"  # output_producers' word for a Mul of a value and its (Hard)Sigmoid: SiLU, hard-swish
CARRIED = "carried state"  # output_producers' word for an output shaped like an input: a state the caller feeds back


class Producers(dict):
    """output name -> the op type that made it (output_producers), and whether the model reads integer inputs."""

    reads_ids: bool = False  # token ids in: a per-step output is a tagger's, never a CTC recognizer's
    time_major: frozenset = frozenset()  # outputs declared [steps, batch, classes] (_time_major)


def output_producers(model: onnx.ModelProto) -> Producers:
    """The op type producing each graph output, for kind detection, looked through LAYOUT_OPS (a Reshape of
    a Softmax is the Softmax) and through a Concat whose non-constant inputs all come from one op type; a Concat
    joining parts made by different ops stays "Concat". An output that is a graph input behind Identity has none.
    An output whose declared shape is a float input's (the same rank, at least 3, a static dimension in common
    and none different) is CARRIED, whatever made it (an If's branches, a hand-written cell's Add): a streaming model's
    state, fed back at the next call; a Softmax or a Sigmoid stays what it is."""
    by_output = {o: n for n in model.graph.node for o in n.output}
    constants = {i.name for i in model.graph.initializer}

    looked: dict[str, str | None] = {}  # each value looked at once: Concats of Concats sharing inputs stay linear

    def source(name: str, depth: int) -> str | None:
        if name in looked:
            return looked[name]
        node = by_output.get(name)
        if node is None or depth > 64:
            return None
        if node.op_type in LAYOUT_OPS and node.input:
            inner = source(node.input[0], depth + 1)
            result = inner if inner is not None or node.op_type == "Identity" else node.op_type
        elif node.op_type == "Concat":
            parts = {source(i, depth + 1) for i in node.input if i and i not in constants
                     and getattr(by_output.get(i), "op_type", None) != "Constant"}
            result = parts.pop() if len(parts) == 1 and None not in parts else "Concat"
        elif node.op_type == "Mul" and _swish(node, by_output):
            result = SWISH
        else:
            result = node.op_type
        looked[name] = result
        return result

    inputs = [_declared(i) for i in model.graph.input if i.name not in constants]
    producers = Producers()
    producers.reads_ids = any(i.type.tensor_type.elem_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
                              for i in model.graph.input if i.name not in constants)
    producers.time_major = frozenset(o.name for o in model.graph.output if _time_major(_declared(o), inputs))
    for out in model.graph.output:
        found = source(out.name, 0)
        shape = _declared(out)
        if found not in ("Softmax", "LogSoftmax", "Sigmoid") and any(_alike(shape, i) for i in inputs):
            found = CARRIED
        if found is not None:
            producers[out.name] = found
    return producers


def _swish(node: onnx.NodeProto, by_output: dict[str, onnx.NodeProto]) -> bool:
    """Mul(x, Sigmoid(x)) or Mul(x, HardSigmoid(x)), either order: the activation exporters write for SiLU and
    hard-swish (a YOLO's mask prototypes, a MobileNetV3's features), no logit."""
    if len(node.input) != 2:
        return False
    for x, gate in (node.input, node.input[::-1]):
        made = by_output.get(gate)
        if made is not None and made.op_type in ("Sigmoid", "HardSigmoid") and made.input[:1] == [x]:
            return True
    return False


def _declared(value: onnx.ValueInfoProto) -> tuple[int | str, ...] | None:
    """A float tensor's declared dimensions (an int, or the symbol's name, "" when unnamed); None for others."""
    kind = value.type.tensor_type
    if not value.type.HasField("tensor_type") or not kind.HasField("shape") or kind.elem_type not in FLOAT_TYPES:
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in kind.shape.dim)


def _time_major(shape: tuple | None, inputs: list[tuple | None]) -> bool:
    """A rank-3 output whose axis 1, not axis 0, is the inputs' batch: its declared dimension is every input's
    first (the same symbol, or the same static size), its axis 0 another (a CTC recognizer's [T, N, C], as
    PyTorch's CTC loss takes them). Unnamed dimensions say nothing."""
    firsts = {i[0] for i in inputs if i}
    if shape is None or len(shape) != 3 or len(firsts) != 1:
        return False
    batch = firsts.pop()
    return batch not in ("", 0) and shape[1] == batch and shape[0] not in ("", 0, batch)


def _alike(a: tuple | None, b: tuple | None) -> bool:
    """The same rank (>= 3: a square [N, k] -> [N, k] classifier is no state; recurrent states are [layers, N, h]
    and the like), no two static dimensions different, at least one static dimension the same."""
    if a is None or b is None or len(a) != len(b) or len(a) < 3:
        return False
    static = [(x, y) for x, y in zip(a, b) if isinstance(x, int) and isinstance(y, int) and x > 0 and y > 0]
    return bool(static) and all(x == y for x, y in static)
