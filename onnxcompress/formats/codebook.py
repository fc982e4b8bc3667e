"""A shared weight in codebook form, its one numpy decoder, and its portable ONNX rewrite.

    weight = codebook[codes + offset[group]] * scale[channel] + outliers

`codes` index a float codebook (per-group codebooks are concatenated, the group offset is
added per output channel); optional per-channel scales multiply the result; optional outliers
(flat index, exact value) are written over it. Every form we write (portable ONNX, packed
custom ops, `unpack`) computes exactly this, and :meth:`SharedWeight.decode` is the reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.errors import ModelError
from onnxcompress.formats.codechain import code_bytes, codes_nodes, SPARSE_MIN_OPSET
from onnxcompress.graph.edit import mark, NameScope
from onnxcompress.graph.weights import WeightInfo
from onnxcompress.numerics.kmeans import kmeans_1d

_STEP = "sw"  # base of the decode chains' intermediate tensor names ("sw", "sw_1", ...)


@dataclass
class SharedWeight:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype  # the original weight's dtype, which decode returns
    codes: np.ndarray  # unsigned ints, shape == shape; per-group: index within the group's codebook
    codebook: np.ndarray  # float32, (n,) ; per-group: the groups' codebooks concatenated
    bits: int  # bits a code needs: max code < 2**bits
    channel_axis: int | None = None
    group_offsets: np.ndarray | None = None  # int32, one per output channel, into `codebook`
    scale: np.ndarray | None = None  # float32 or float16 (stored as is, cast at load), one per output channel
    outlier_index: np.ndarray | None = None  # int64 flat indices
    outlier_value: np.ndarray | None = None  # float32
    zero_code: int | None = None  # the code whose centroid is exactly 0 (pruned entries)

    def channel_shape(self) -> tuple[int, ...]:
        """Shape that broadcasts one value per output channel against the weight."""
        shape = [1] * len(self.shape)
        shape[self.channel_axis] = self.shape[self.channel_axis]
        return tuple(shape)

    def indices(self) -> np.ndarray:
        """Codes with group offsets applied: direct indices into `codebook` (int32)."""
        index = self.codes.astype(np.int32)
        if self.group_offsets is not None:
            index = index + self.group_offsets.astype(np.int32).reshape(self.channel_shape())
        return index

    def decode(self) -> np.ndarray:
        """The reference reconstruction of the weight."""
        weight = self.codebook.astype(np.float32)[self.indices()]
        if self.scale is not None:
            weight = weight * self.scale.astype(np.float32).reshape(self.channel_shape())
        if self.outlier_index is not None and self.outlier_index.size:
            flat = weight.reshape(-1)
            flat[self.outlier_index] = self.outlier_value.astype(np.float32)
            weight = flat.reshape(self.shape)
        return weight.astype(self.dtype)

    def decoded_blocks(self, elements: int):
        """decode(), flat, a block at a time without the full-size copies: (the block's flat slice, its values), the
        values decode() gives there. A block is whole slices of the axes before the channel axis (the flat weight
        cut in pieces of `elements` entries without one) of about `elements` entries, at least one slice."""
        size = int(np.prod(self.shape, dtype=np.int64))
        if size == 0:
            return
        axis = self.channel_axis
        book = self.codebook.astype(np.float32)
        lead = int(np.prod(self.shape[:axis], dtype=np.int64)) if axis is not None else size
        row = size // lead
        # (slices, channels, rest): a channel's scale and group offset broadcast over its entries
        codes = self.codes.reshape(lead, 1, -1) if axis is None else self.codes.reshape(lead, self.shape[axis], -1)
        offsets = None if self.group_offsets is None else self.group_offsets.astype(np.int32).reshape(1, -1, 1)
        scale = None if self.scale is None else self.scale.astype(np.float32).reshape(1, -1, 1)
        outliers = self.outlier_index is not None and self.outlier_index.size
        step = max(1, elements // row)
        for lo in range(0, lead, step):
            hi = min(lead, lo + step)
            index = codes[lo:hi]
            if offsets is not None:
                index = index.astype(np.int32) + offsets
            block = book[index]
            if scale is not None:
                block = block * scale
            block = block.reshape(-1)
            if outliers:
                inside = (self.outlier_index >= lo * row) & (self.outlier_index < hi * row)
                block[self.outlier_index[inside] - lo * row] = self.outlier_value[inside].astype(np.float32)
            yield slice(lo * row, hi * row), block.astype(self.dtype, copy=False)

    def decodes_to_shape(self) -> bool:
        """decode() has the weight's shape: the codes have it and the per-channel parts one entry a channel (checked
        without decoding, a full-size float copy: 15 ms a 2048x2048 weight)."""
        channels = None if self.channel_axis is None else self.shape[self.channel_axis]
        return tuple(self.codes.shape) == tuple(self.shape) and all(
            part is None or (channels is not None and part.size == channels) for part in (self.scale, self.group_offsets))

    def payload_bytes(self, opset: int = SPARSE_MIN_OPSET) -> int:
        """Bytes of tensor data in the portable form written at `opset` (codes bit-packed, dense or
        sparse, see :mod:`onnxcompress.formats.codechain`)."""
        total = code_bytes(self.codes, self.bits, opset) + self.codebook.size * 4
        for extra in (self.group_offsets, self.scale, self.outlier_value):
            total += 0 if extra is None else extra.nbytes
        if self.outlier_index is not None:  # flat indices, int32 where they fit
            total += self.outlier_index.size * np.dtype(_index_dtype(self)).itemsize
        return total


def _index_dtype(weight: SharedWeight) -> type:
    """int32 flat indices when the weight has fewer than 2**31 entries, else int64."""
    return np.int32 if int(np.prod(weight.shape, dtype=np.int64)) < 2**31 else np.int64


def portable_nodes(weight: SharedWeight, scope: NameScope, opset: int, pass_name: str
                   ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Standard ONNX computing the weight under its own name: codes unpacked (bit-packed, dense or
    sparse: :func:`onnxcompress.formats.codechain.codes_nodes`) -> [Add offsets] -> Gather -> [Mul] ->
    [Reshape -> ScatterElements -> Reshape].

    Every input is constant, so onnxruntime folds the whole chain into a dense tensor at load.
    On a small model the chain weighs as much as the codes, so it is kept lean: its initializers
    are named after the weight (``W__codes``, ``W__codebook``...), the node that outputs the weight
    carries the pass's name in its metadata_props (the rest of the chain is what feeds it), and the
    other nodes carry no names or metadata, their outputs short opaque names.
    """
    base = weight.name
    nodes, inits, index = codes_nodes(weight.codes, weight.bits, opset, scope, base)
    book_name = scope.fresh(f"{base}__codebook")
    inits.append(numpy_helper.from_array(weight.codebook.astype(np.float32), book_name))
    if weight.group_offsets is not None:
        offsets_name = scope.fresh(f"{base}__group_offsets")
        inits.append(numpy_helper.from_array(
            weight.group_offsets.astype(np.int32).reshape(weight.channel_shape()), offsets_name))
        shifted = scope.fresh(_STEP)
        nodes.append(helper.make_node("Add", [index, offsets_name], [shifted]))
        index = shifted
    current = scope.fresh(_STEP)
    nodes.append(helper.make_node("Gather", [book_name, index], [current], axis=0))
    if weight.scale is not None:
        current = _scaled(weight, current, scope, nodes, inits)
    if weight.outlier_index is not None and weight.outlier_index.size:
        current = _with_outliers(weight, current, scope, nodes, inits)
    if np.dtype(weight.dtype) == np.float32:
        nodes[-1].output[0] = base
    else:  # the chain computes float32; cast back so consumers see the original dtype
        to = helper.np_dtype_to_tensor_dtype(np.dtype(weight.dtype))
        nodes.append(helper.make_node("Cast", [current], [base], to=to))
    mark(nodes[-1], pass_name)
    return nodes, inits


def _scaled(weight: SharedWeight, current: str, scope: NameScope, nodes: list, inits: list) -> str:
    """Append the Mul by the per-channel scales (float16 scales widened first) to the chain; returns its output."""
    base = weight.name
    scale_name = scope.fresh(f"{base}__scale")
    half = np.dtype(weight.scale.dtype) == np.float16
    inits.append(numpy_helper.from_array(
        weight.scale.astype(np.float16 if half else np.float32).reshape(weight.channel_shape()), scale_name))
    if half:  # float16 scales halve their bytes; decode() computes in float32 too
        widened = scope.fresh(_STEP)
        nodes.append(helper.make_node("Cast", [scale_name], [widened], to=TensorProto.FLOAT))
        scale_name = widened
    scaled = scope.fresh(_STEP)
    nodes.append(helper.make_node("Mul", [current, scale_name], [scaled]))
    return scaled


def _with_outliers(weight: SharedWeight, current: str, scope: NameScope, nodes: list, inits: list) -> str:
    """Append the outliers written over the flattened weight to the chain; returns its output. ScatterElements
    takes flat indices that may be int32 (ScatterND would take int64 coordinates, one per axis: 8x the bytes
    on a 4-D weight)."""
    base = weight.name
    flat_shape, shape = scope.fresh(f"{base}__flat_shape"), scope.fresh(f"{base}__shape")
    idx_name, val_name = scope.fresh(f"{base}__outlier_index"), scope.fresh(f"{base}__outlier_value")
    inits += [numpy_helper.from_array(np.array([-1], np.int64), flat_shape),
              numpy_helper.from_array(np.array(weight.shape, np.int64), shape),
              numpy_helper.from_array(weight.outlier_index.astype(_index_dtype(weight)), idx_name),
              numpy_helper.from_array(weight.outlier_value.astype(np.float32), val_name)]
    flat, patched, current_shaped = scope.fresh(_STEP), scope.fresh(_STEP), scope.fresh(_STEP)
    nodes += [helper.make_node("Reshape", [current, flat_shape], [flat]),
              helper.make_node("ScatterElements", [flat, idx_name, val_name], [patched], axis=0),
              helper.make_node("Reshape", [patched, shape], [current_shaped])]
    return current_shaped


def fit_codebook(array: np.ndarray, info: WeightInfo, bits: int, *, init: str = "linear", seed: int = 0,
                 mask: np.ndarray | None = None) -> SharedWeight:
    """One k-means codebook for the whole tensor; masked-out entries keep code 0 = exactly 0.0."""
    values = np.asarray(array, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ModelError(f"weight '{info.name}' holds NaN or Inf; fix the model before compressing it")
    keep_zero = mask is not None
    if keep_zero:
        values = np.where(mask, values, 0.0)
    result = kmeans_1d(values, 2 ** bits, init=init, seed=seed, keep_zero=keep_zero)
    return SharedWeight(name=info.name, shape=tuple(array.shape), dtype=array.dtype, codes=result.labels,
                        codebook=result.centroids.astype(np.float32), bits=bits, channel_axis=info.channel_axis,
                        zero_code=0 if keep_zero else None)
