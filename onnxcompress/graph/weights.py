"""Find every weight of a model, wherever the exporter put it, with its consumers and role.

A weight is a constant tensor: an initializer (of the main graph or of an If/Loop/Scan body), a
sparse initializer, or the value of a Constant node anywhere. Passes decide what to do with
a weight from its role (which picks defaults such as bits and channel axis); the role never
decides whether a float weight counts.
"""
from __future__ import annotations

import enum
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnxcompress.graph import external, spill
from onnxcompress.graph.edit import consumers as consumer_map, find_graph, iter_graphs

log = logging.getLogger(__name__)

FLOAT_TYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.DOUBLE: "float64",
}
# ops that only move or relabel a constant on its way to the real consumer
PASS_THROUGH = {"Transpose", "Reshape", "Identity", "Cast", "Squeeze", "Unsqueeze", "Flatten"}
DEFAULT_MIN_ELEMENTS = 256


class Role(str, enum.Enum):
    CONV = "conv"
    CONV_TRANSPOSE = "conv_transpose"
    GEMM = "gemm"
    MATMUL = "matmul"
    GATHER = "gather"
    RECURRENT = "recurrent"
    OTHER = "other"

    @property
    def is_fully_connected(self) -> bool:
        return self in (Role.GEMM, Role.MATMUL)


_ROLE_PRIORITY = [Role.CONV, Role.CONV_TRANSPOSE, Role.GEMM, Role.MATMUL, Role.RECURRENT, Role.GATHER, Role.OTHER]


@dataclass(frozen=True)
class Consumer:
    node: str
    op_type: str
    input_index: int
    via: tuple[str, ...] = ()  # op types of the pass-through chain from the weight to the node


@dataclass
class WeightInfo:
    """One constant tensor and what uses it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    location: str  # "initializer" | "constant" | "sparse_initializer"
    graph: str  # path of the graph that holds it, e.g. "main/If_0.then_branch"
    consumers: list[Consumer] = field(default_factory=list)
    role: Role = Role.OTHER
    channel_axis: int | None = None  # output-channel axis in the stored layout
    skip: str | None = None  # why passes leave it alone

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_TYPES.values()

    @property
    def compressible(self) -> bool:
        return self.skip is None

    def as_dict(self) -> dict:
        return {
            "name": self.name, "shape": list(self.shape), "dtype": self.dtype, "bytes": self.nbytes,
            "role": self.role.value, "location": self.location, "graph": self.graph,
            "channel_axis": self.channel_axis, "skip": self.skip,
            "consumers": [{"node": c.node, "op_type": c.op_type, "input": c.input_index, "via": list(c.via)}
                          for c in self.consumers],
        }


def _dtype_name(elem_type: int) -> str:
    if elem_type in FLOAT_TYPES:
        return FLOAT_TYPES[elem_type]
    return onnx.helper.tensor_dtype_to_np_dtype(elem_type).name if elem_type else "undefined"


def _tensor_nbytes(tensor: onnx.TensorProto) -> int:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in tensor.external_data}
        return int(info.get("length", 0))
    if tensor.raw_data:
        return len(tensor.raw_data)
    numel = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize if tensor.data_type else 4
    return numel * itemsize


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    for attr in node.attribute:
        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
            return attr.t
    return None


def find_weights(model: onnx.ModelProto, *, min_elements: int = DEFAULT_MIN_ELEMENTS) -> list[WeightInfo]:
    """Every constant tensor of the model, in graph order, each listed once with all consumers."""
    found: list[WeightInfo] = []
    for graph, path in iter_graphs(model.graph):
        first = len(found)  # this graph's weights are found[first:]
        uses = consumer_map(graph)
        graph_inputs = {i.name for i in graph.input}
        for tensor in graph.initializer:
            info = _info(tensor, tensor.name, "initializer", path)
            if tensor.name in graph_inputs:
                info.skip = "also a graph input, so it may be overridden at run time"
            found.append(info)
        for sparse in graph.sparse_initializer:
            info = _info(sparse.values, sparse.values.name, "sparse_initializer", path)
            info.shape = tuple(sparse.dims)
            info.skip = "already stored sparse"
            found.append(info)
        for node in graph.node:
            if node.op_type == "Constant" and (tensor := _constant_tensor(node)) is not None:
                found.append(_info(tensor, node.output[0], "constant", path))
        graph_outputs = {o.name for o in graph.output}
        for info in found[first:]:
            _attach_consumers(info, uses)
            if info.skip is None and info.name in graph_outputs:
                info.skip = "also an output of its graph: the model returns it as it is"
    for info in found:
        if info.skip is None and not info.is_float:
            info.skip = f"not a float tensor ({info.dtype})"
        elif info.skip is None and info.numel < min_elements:
            info.skip = f"tiny ({info.numel} < {min_elements} elements)"
        elif info.skip is None and not info.consumers:
            info.skip = "unused"
    return found


QUANTIZED_DTYPES = ("int8", "uint8", "int4", "uint4")  # integer weights another tool quantized (not shapes, not indices)


def prequantized_weights(weights: list[WeightInfo], *, min_elements: int = DEFAULT_MIN_ELEMENTS) -> list[WeightInfo]:
    """Of a model's `weights` (find_weights), the used constant tensors of 8 bits or fewer of at least `min_elements`
    elements: weights quantized before us (onnxruntime's quantize_dynamic feeds MatMulInteger and DynamicQuantizeLSTM
    with them), which the passes, compressing float weights, keep as they are."""
    return [w for w in weights if w.dtype in QUANTIZED_DTYPES and w.numel >= min_elements and w.consumers]


def _info(tensor: onnx.TensorProto, name: str, location: str, path: str) -> WeightInfo:
    return WeightInfo(name=name, shape=tuple(int(d) for d in tensor.dims), dtype=_dtype_name(tensor.data_type),
                      nbytes=_tensor_nbytes(tensor), location=location, graph=path)


def _attach_consumers(info: WeightInfo, uses) -> None:
    """Follow pass-through chains to the real consumers; derive role and channel axis."""
    axis_votes: list[int | None] = []
    for node, index, via, perm in _walk(info.name, uses, (), list(range(len(info.shape)))):
        info.consumers.append(Consumer(node.name or node.op_type, node.op_type, index, tuple(via)))
        role, axis = _role_of(node, index, len(info.shape))
        known = perm is not None and axis is not None and axis < len(perm)
        axis_votes.append(perm[axis] if known else None)
        info.role = min(info.role, role, key=_ROLE_PRIORITY.index)
    if axis_votes and all(a == axis_votes[0] for a in axis_votes):
        info.channel_axis = axis_votes[0]


def _walk(name, uses, via, perm, depth=0):
    """Yield (node, input index, chain, axis map) for each real consumer of `name`.

    The axis map lists, for each axis the consumer sees, the stored tensor's axis; None once
    a Reshape, Flatten or (Un)Squeeze makes that correspondence unknowable.
    """
    for node, index in uses.get(name, []):
        if node.op_type in PASS_THROUGH and index == 0 and depth < 8 and node.output:
            yield from _walk(node.output[0], uses, via + (node.op_type,), _compose(perm, node), depth + 1)
        else:
            yield node, index, list(via), perm


def _compose(perm: list[int] | None, node: onnx.NodeProto) -> list[int] | None:
    """The axis map after `node`: Transpose output axis i is its input axis order[i]."""
    if perm is None or node.op_type in ("Identity", "Cast"):
        return perm
    if node.op_type == "Transpose":
        order = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        if order is None:
            order = list(reversed(range(len(perm))))
        return [perm[p] for p in order] if len(order) == len(perm) else None
    return None


def _role_of(node: onnx.NodeProto, index: int, rank: int) -> tuple[Role, int | None]:
    op = node.op_type
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if op == "Conv" and index == 1:
        return Role.CONV, 0
    if op == "ConvTranspose" and index == 1:
        return Role.CONV_TRANSPOSE, 1
    if op == "Gemm" and index == 1:
        return Role.GEMM, 0 if attrs.get("transB", 0) else 1
    if op == "Gemm" and index == 0:
        return Role.GEMM, 1 if attrs.get("transA", 0) else 0
    if op in ("MatMul", "FusedMatMul") and index == 1:
        return Role.MATMUL, max(rank - 1, 0)
    if op in ("MatMul", "FusedMatMul") and index == 0:
        return Role.MATMUL, max(rank - 2, 0)
    if op == "Gather" and index == 0:
        return Role.GATHER, 0
    if op in ("LSTM", "GRU", "RNN") and index in (1, 2):
        return Role.RECURRENT, 1
    return Role.OTHER, None


# (op, input index) of an operand added to every output of a layer
_BIAS_INPUTS = {("Conv", 2), ("ConvTranspose", 2), ("Gemm", 2), ("LSTM", 3), ("GRU", 3), ("RNN", 3)}


def is_bias(info: WeightInfo) -> bool:
    """Added to every output of its layers: a Conv/Gemm/recurrent bias input, or a vector added by an Add."""
    return bool(info.consumers) and all(
        (c.op_type, c.input_index) in _BIAS_INPUTS or (c.op_type == "Add" and sum(d > 1 for d in info.shape) <= 1)
        for c in info.consumers)


#: WeightInfo.skip of a float tensor holding NaN or Inf (Context.weights sets it; passes keep the tensor float)
NONFINITE = "holds NaN or Inf"


def nonfinite_weights(model: onnx.ModelProto, weights: list[WeightInfo]) -> list[str]:
    """Names of the float tensors of the model's `weights` (find_weights) holding NaN or Inf (each read once)."""
    floats = [info for info in weights if info.is_float]
    return [info.name for info, array in zip(floats, get_arrays(model, floats)) if not np.isfinite(array).all()]


def get_arrays(model: onnx.ModelProto, infos: list[WeightInfo]) -> Iterator[np.ndarray]:
    """get_array of each of `infos`, in order, from one walk of the model: a get_array a weight scans the graph
    for each, which is quadratic in the count (10^5 tiny initializers took hours)."""
    tensors: dict[tuple[str, str, str], onnx.TensorProto | onnx.SparseTensorProto] = {}
    paths = {info.graph for info in infos}
    for graph, path in iter_graphs(model.graph) if infos else ():
        if path not in paths:
            continue
        for tensor in reversed(graph.initializer):  # the first of a name wins, as in _tensor_of
            tensors[(path, "initializer", tensor.name)] = tensor
        for node in reversed(graph.node):
            if node.op_type == "Constant" and node.output and (tensor := _constant_tensor(node)) is not None:
                tensors[(path, "constant", node.output[0])] = tensor
        for sparse in reversed(graph.sparse_initializer):
            tensors[(path, "sparse_initializer", sparse.values.name)] = sparse
    for info in infos:
        tensor = tensors.get((info.graph, info.location, info.name))
        if tensor is None:
            raise KeyError(f"weight '{info.name}' not found in {info.graph}")
        if isinstance(tensor, onnx.SparseTensorProto):
            tensor = numpy_helper.from_array(_densify(tensor), info.name)
        yield external.read_tensor(model, tensor)


def get_array(model: onnx.ModelProto, info: WeightInfo) -> np.ndarray:
    """The weight's values as a numpy array (float tensors in their own dtype).

    External data of a streamed model is read from disk now (onnxcompress.graph.external).
    """
    return external.read_tensor(model, _tensor_of(model, info))


def weight_source(model: onnx.ModelProto, info: WeightInfo) -> np.ndarray | external.ArrayRef:
    """What a per-weight task is given: a reference to the weight's external data (read where the task
    runs, onnxcompress.execution.parallel), else its values."""
    tensor = _tensor_of(model, info)
    return external.array_ref(model, tensor) or external.read_tensor(model, tensor)


def _tensor_of(model: onnx.ModelProto, info: WeightInfo) -> onnx.TensorProto:
    graph = find_graph(model, info.graph)
    if info.location == "initializer":
        for tensor in graph.initializer:
            if tensor.name == info.name:
                return tensor
    elif info.location == "constant":
        for node in graph.node:
            if node.op_type == "Constant" and node.output[0] == info.name:
                return _constant_tensor(node)
    elif info.location == "sparse_initializer":
        for sparse in graph.sparse_initializer:
            if sparse.values.name == info.name:
                return numpy_helper.from_array(_densify(sparse), info.name)
    raise KeyError(f"weight '{info.name}' not found in {info.graph}")


def _densify(sparse: onnx.SparseTensorProto) -> np.ndarray:
    values = numpy_helper.to_array(sparse.values)
    indices = numpy_helper.to_array(sparse.indices)
    dense = np.zeros(int(np.prod(sparse.dims)), dtype=values.dtype)
    flat = indices if indices.ndim == 1 else np.ravel_multi_index(indices.T, tuple(sparse.dims))
    dense[flat] = values
    return dense.reshape(tuple(sparse.dims))


def set_array(model: onnx.ModelProto, info: WeightInfo, array: np.ndarray) -> None:
    """Overwrite a dense weight's values in place (same name, shape and dtype)."""
    tensor = _tensor_of(model, info)
    if info.location == "sparse_initializer":
        raise ValueError("cannot overwrite a sparse initializer in place")
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    else:
        dtype = get_array(model, info).dtype
    new = numpy_helper.from_array(np.asarray(array, dtype=dtype), tensor.name)
    spill.spill_tensor(model, new)  # a streamed model keeps big tensors on disk (spilled before the copy
    tensor.CopyFrom(new)  # into the model: protobuf arenas never give cleared bytes back)


def replace_weight(model: onnx.ModelProto, info: WeightInfo, nodes: list[onnx.NodeProto],
                   initializers: list[onnx.TensorProto]) -> None:
    """Replace a weight with a subgraph computing it: `nodes` must produce `info.name`.

    The new initializers go into the graph that held the weight; the nodes take the place of a
    Constant node, or go first in the graph for an initializer, so the order stays topological.
    """
    graph = find_graph(model, info.graph)
    if info.location == "initializer":
        # deleted in place: rebuilding the field would copy every initializer into the protobuf
        # arena, which keeps them (memory quadratic in the number of weights rewritten)
        for index in [k for k, t in enumerate(graph.initializer) if t.name == info.name][::-1]:
            del graph.initializer[index]
        position = 0
    elif info.location == "constant":
        position = next(i for i, n in enumerate(graph.node) if n.op_type == "Constant" and n.output[0] == info.name)
        del graph.node[position]
    else:
        raise ValueError(f"cannot rewrite a weight stored as {info.location}")
    for tensor in initializers:  # a streamed model keeps big tensors on disk; spilled before they are
        spill.spill_tensor(model, tensor)  # copied in, as protobuf arenas never give cleared bytes back
    graph.initializer.extend(initializers)
    for offset, node in enumerate(nodes):
        graph.node.insert(position + offset, node)
