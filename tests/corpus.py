"""Real architectures with seeded random weights, from the onnx package's weightless test models.

``onnx/backend/test/data/light/*.onnx`` (AlexNet, VGG-19, ResNet-50, DenseNet-121, Inception v1
and v2, ShuffleNet, SqueezeNet, ZFNet-512) keep their graphs but replace every weight by a
ConstantOfShape node. :func:`materialize` turns each such node into an initializer of the same
shape filled with seeded random values scaled so activations stay in range through the depth:

- Conv / Gemm weights: He init, N(0, 2 / fan_in);
- biases and additive terms: N(0, 0.01^2);
- BatchNormalization: scale 1 + N(0, 0.1^2), bias and mean N(0, 0.1^2), variance 1 + |N(0, 0.1^2)|;
- multiplicative terms (Mul): 1 + N(0, 0.1^2).

Initializers are removed from the graph inputs (IR 3 listed them there) so tools treat them
as constants; a final Softmax is dropped so outputs are logits (random weights saturate it);
the graph is converted to opset 21 (OPSET) unless asked to keep opset 9; the IR version is
raised to at least 7.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
from onnx import numpy_helper

LIGHT = Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data" / "light"
NAMES = ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet", "squeezenet",
         "vgg19", "zfnet512"]
OPSET = 21  # the models ship at opset 9, below what QuantizeLinear (10) and ScatterElements (11) need
_PASS_THROUGH = {"Unsqueeze", "Reshape", "Identity", "Transpose", "Squeeze", "Flatten", "Cast"}


def light_path(name: str) -> Path:
    return LIGHT / f"light_{name}.onnx"


def _consumer(graph: onnx.GraphProto, name: str) -> tuple[onnx.NodeProto | None, int]:
    """The first real consumer of `name` (through pass-through ops) and the input index it feeds."""
    for _ in range(8):
        found = next(((n, i) for n in graph.node for i, x in enumerate(n.input) if x == name), None)
        if found is None:
            return None, -1
        node, index = found
        if node.op_type not in _PASS_THROUGH:
            return node, index
        name = node.output[0]
    return None, -1


def _values(rng: np.random.Generator, shape: tuple[int, ...], node: onnx.NodeProto | None, index: int
            ) -> np.ndarray:
    n = rng.standard_normal(shape)
    op = node.op_type if node is not None else ""
    if op in ("Conv", "Gemm") and index == 1:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if op == "Conv":
            fan_in = int(np.prod(shape[1:]))
        else:
            fan_in = shape[1] if attrs.get("transB", 0) else shape[0]
        return n * np.sqrt(2.0 / max(fan_in, 1))
    if op == "BatchNormalization":
        return {1: 1 + 0.1 * n, 2: 0.1 * n, 3: 0.1 * n, 4: 1 + np.abs(0.1 * n)}.get(index, 0.1 * n)
    if op == "Mul":
        return 1 + 0.1 * n
    return 0.01 * n


def materialize(name: str, seed: int = 0, opset: int | None = OPSET) -> onnx.ModelProto:
    """The light model `name` with seeded random weights instead of its ConstantOfShape placeholders.

    opset: convert the graph (opset 9 as shipped) to this opset first; None keeps opset 9.
    """
    model = onnx.load(str(light_path(name)))
    if opset is not None:
        model = onnx.version_converter.convert_version(model, opset)
    graph = model.graph
    rng = np.random.default_rng(seed)
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    placeholders = [n for n in graph.node if n.op_type == "ConstantOfShape"]
    shape_names = set()
    new = []
    for node in placeholders:
        shape = tuple(int(d) for d in consts[node.input[0]])
        shape_names.add(node.input[0])
        value = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "value"), None)
        dtype = numpy_helper.to_array(value).dtype if value is not None else np.dtype(np.float32)
        consumer, index = _consumer(graph, node.output[0])
        array = _values(rng, shape, consumer, index)
        new.append(numpy_helper.from_array(array.astype(dtype), node.output[0]))
    keep_nodes = [n for n in graph.node if n.op_type != "ConstantOfShape"]
    del graph.node[:]
    graph.node.extend(keep_nodes)
    used = {x for n in graph.node for x in n.input}
    keep_inits = [t for t in graph.initializer if t.name not in shape_names or t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep_inits + new)
    constants = {t.name for t in graph.initializer}
    keep_inputs = [i for i in graph.input if i.name not in constants | shape_names]
    del graph.input[:]
    graph.input.extend(keep_inputs)
    _drop_final_softmax(graph)
    model.ir_version = max(model.ir_version, 7, onnx.helper.find_min_ir_version_for(list(model.opset_import)))
    onnx.checker.check_model(model, full_check=True)
    return model


def _drop_final_softmax(graph: onnx.GraphProto) -> None:
    """Output the logits: fidelity of saturated softmax probabilities says little."""
    for out in graph.output:
        producer = next((n for n in graph.node if out.name in n.output), None)
        if producer is not None and producer.op_type == "Softmax":
            out.name = producer.input[0]
            graph.node.remove(producer)


def input_data(model: onnx.ModelProto, n: int, seed: int) -> dict[str, np.ndarray]:
    """`n` stacked samples per graph input (N(0, 1) floats; the batch axis is 1 in these models)."""
    rng = np.random.default_rng(seed)
    data = {}
    for inp in model.graph.input:
        dims = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        data[inp.name] = rng.standard_normal([n] + dims[1:]).astype(dtype) if dims else rng.standard_normal(n)
    return data


def param_count(model: onnx.ModelProto) -> int:
    return int(sum(np.prod(t.dims, dtype=np.int64) for t in model.graph.initializer))
