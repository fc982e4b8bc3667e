"""Sparse initializers (and Constants' sparse_value) stored dense at load, as onnxruntime densifies them: onnx's
checker and shape inference reject sparse tensors as op inputs. What onnxruntime refuses in one is refused here,
and no declared shape is allocated that its indices and values do not back.
"""
from __future__ import annotations

import logging

import onnx

from onnxcompress.errors import ModelError
from onnxcompress.graph.edit import iter_graphs

log = logging.getLogger(__name__)


def densify_sparse_initializers(model: onnx.ModelProto) -> None:
    """Every sparse_initializer becomes a dense initializer, as onnxruntime does at load (onnx's checker
    and shape inference reject sparse tensors as op inputs); ModelError for one whose declared shape or
    indices its bytes do not back."""
    for graph, path in iter_graphs(model.graph):
        dense = [_densify(sparse, path) for sparse in graph.sparse_initializer]
        if dense:
            del graph.sparse_initializer[:]
            graph.initializer.extend(dense)
            log.info("%s: %d sparse initializers stored dense (onnxruntime densifies them at load too)", path, len(dense))
        # a Constant's sparse_value likewise, checked the same way: onnxruntime densified a declared 10^9
        # elements backed by 3 values
        for node in graph.node:
            if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
                continue
            for attribute in node.attribute:
                if attribute.name == "sparse_value":
                    tensor = _densify(attribute.sparse_tensor, path)
                    attribute.Clear()
                    attribute.CopyFrom(onnx.helper.make_attribute("value", tensor))


_SPARSE_INDEX_TYPES = (onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64)


def _densify(sparse: onnx.SparseTensorProto, path: str) -> onnx.TensorProto:
    import numpy as np
    from onnx import numpy_helper

    from onnxcompress.numerics.limits import check_elements, element_count

    name = sparse.values.name
    dims = [int(d) for d in sparse.dims]
    if any(d < 0 for d in dims):
        raise ModelError(f"sparse initializer '{name}' ({path}) declares a negative dimension {dims}")
    numel = check_elements(element_count(dims), f"sparse initializer '{name}' ({path})", ModelError)
    # what onnxruntime checks at load: numeric values in one dimension, integer indices
    if sparse.values.data_type == onnx.TensorProto.STRING or len(sparse.values.dims) != 1:
        raise ModelError(f"sparse initializer '{name}' ({path}) holds values of type "
                         f"{onnx.TensorProto.DataType.Name(sparse.values.data_type)} in {len(sparse.values.dims)} "
                         "dimensions: onnxruntime takes numbers in one dimension")
    if sparse.indices.data_type not in _SPARSE_INDEX_TYPES:
        raise ModelError(f"sparse initializer '{name}' ({path}) has indices of element type {sparse.indices.data_type}: "
                         "onnxruntime takes int8, int16, int32 or int64")
    try:
        values = numpy_helper.to_array(sparse.values).reshape(-1)
        indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
    except (ValueError, TypeError) as e:
        raise ModelError(f"sparse initializer '{name}' ({path}) cannot be read: {e}") from e
    if indices.ndim == 2 and indices.shape[1] == len(dims) and dims:  # coordinates -> linear
        if indices.size and ((indices < 0).any() or (indices >= np.array(dims)).any()):
            raise ModelError(f"sparse initializer '{name}' ({path}) has an index outside its shape {dims}")
        indices = np.ravel_multi_index(indices.T, dims) if indices.size else indices.reshape(-1)
    indices = indices.reshape(-1)
    if indices.size != values.size or (indices.size and (indices.min() < 0 or indices.max() >= numel)):
        raise ModelError(f"sparse initializer '{name}' ({path}) has {indices.size} indices for {values.size} "
                         f"values, or an index outside its {numel} elements")
    out = np.zeros(numel, values.dtype)
    out[indices] = values
    return numpy_helper.from_array(out.reshape(dims), name)
