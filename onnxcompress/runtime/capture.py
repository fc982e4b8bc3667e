"""A weight's layer seen as a matrix product, and the statistics of its input rows.

The model runs in :mod:`onnxcompress.runtime.statistics` (one collector, sessions cached per graph);
`capture` yields chosen tensors chunk by chunk, holding nothing but the current chunk. `LinearLayer` views Gemm/MatMul/Conv as

    out[r, j] = rows_g[r] . W_mat[j]        (g = the group of output channel j)

where rows are the layer's input samples (im2col patches for Conv) and W_mat is the weight
reshaped to (output channels, K). `LayerInputs` accumulates, batch by batch, the Gram matrix
H_g = sum rows_g^T rows_g (the Hessian of the layer's squared output error) and a bounded
uniform sample of rows, which is what pruning compensation and centroid refinement need.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxcompress.errors import ModelError
from onnxcompress.graph.data import Dataset
from onnxcompress.graph.edit import find_graph
from onnxcompress.graph.weights import WeightInfo
from onnxcompress.numerics.row_blocks import RowBlocks
from onnxcompress.runtime.statistics import Chunk, Collector


def capture(model: onnx.ModelProto, data: Dataset, names: Sequence[str], *, max_batch: int = 64,
            collector: Collector | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Yield, per chunk of `data`, the values of the main-graph tensors `names` (through `collector`'s
    cached sessions; a fresh collector when none is given)."""
    yield from (collector or Collector()).stream(model, data, names, max_batch=max_batch)


@dataclass
class LinearLayer:
    """The consumer of a weight, as a matrix product over rows of its input."""

    weight: str
    node: onnx.NodeProto
    input_name: str
    kind: str  # "gemm" | "matmul" | "conv"
    weight_shape: tuple[int, ...]
    groups: int = 1
    transposed: bool = False  # weight stored (K, out) rather than (out, K)
    conv: dict = field(default_factory=dict)

    @property
    def out_channels(self) -> int:
        if self.kind == "conv":
            return self.weight_shape[0]
        return self.weight_shape[1] if self.transposed else self.weight_shape[0]

    def weight_matrix(self, weight: np.ndarray) -> np.ndarray:
        """(out channels, K) view of the weight; row j multiplies group(j)'s input rows."""
        if self.kind == "conv":
            return weight.reshape(weight.shape[0], -1)
        return weight.T if self.transposed else weight

    def weight_from_matrix(self, matrix: np.ndarray) -> np.ndarray:
        if self.kind == "conv":
            return matrix.reshape(self.weight_shape)
        return matrix.T if self.transposed else matrix

    def group_of_channels(self) -> np.ndarray:
        return np.arange(self.out_channels) // (self.out_channels // self.groups)

    def input_rows(self, x: np.ndarray, max_rows: int | None = None, rng: np.random.Generator | None = None,
                   dtype: type | None = np.float64) -> list[np.ndarray]:
        """Per group, (rows, K) samples of the input, at most `max_rows` (random) each (picked in the input's
        own precision, then widened to `dtype`, None: kept: the same rows, without a float64 copy of the whole
        input)."""
        if self.kind == "gemm":
            rows = x.T if self.conv.get("transA") else x
            picked = [_subsample(rows.reshape(-1, rows.shape[-1]), max_rows, rng)]
        elif self.kind == "matmul":
            picked = [_subsample(x.reshape(-1, x.shape[-1]), max_rows, rng)]
        else:
            picked = _im2col(x, self, max_rows, rng)
        return picked if dtype is None else [np.asarray(rows, dtype=dtype) for rows in picked]


def _subsample(rows: np.ndarray, max_rows: int | None, rng) -> np.ndarray:
    if max_rows is None or rows.shape[0] <= max_rows:
        return rows
    pick = (rng or np.random.default_rng(0)).choice(rows.shape[0], max_rows, replace=False)
    return rows[np.sort(pick)]


def _im2col(x: np.ndarray, layer: LinearLayer, max_rows: int | None, rng) -> list[np.ndarray]:
    """Patches of a 1-D or 2-D convolution's input, ordered (channel, kernel...) like W.reshape(M, -1)."""
    c = layer.conv
    spatial = x.ndim - 2
    if spatial == 1:
        x = x[:, :, None, :]
    elif spatial != 2:
        raise ModelError(f"layer inputs of {spatial}-D convolutions are not supported ({layer.node.name})")
    kernel = tuple(layer.weight_shape[2:]) if spatial == 2 else (1, layer.weight_shape[2])
    strides = _two(c.get("strides"), spatial, 1)
    dilations = _two(c.get("dilations"), spatial, 1)
    pads = _pads(c, x.shape[2:], kernel, strides, dilations, spatial)
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    windows = np.lib.stride_tricks.sliding_window_view(x, span, axis=(2, 3))
    windows = windows[:, :, ::strides[0], ::strides[1], ::dilations[0], ::dilations[1]]
    n, channels, oh, ow = windows.shape[:4]
    positions = n * oh * ow
    pick = np.arange(positions)
    if max_rows is not None and positions > max_rows:
        pick = np.sort((rng or np.random.default_rng(0)).choice(positions, max_rows, replace=False))
    b, i, j = np.unravel_index(pick, (n, oh, ow))
    patches = windows[b, :, i, j]  # (rows, C, kh, kw)
    per_group = channels // layer.groups
    return [np.ascontiguousarray(patches[:, g * per_group:(g + 1) * per_group].reshape(len(pick), -1))
            for g in range(layer.groups)]


def _two(values, spatial: int, default: int) -> tuple[int, int]:
    values = list(values) if values else [default] * spatial
    return (1, values[0]) if spatial == 1 else (values[0], values[1])


def _pads(c: dict, size, kernel, strides, dilations, spatial: int) -> tuple[int, int, int, int]:
    auto = c.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for dim, k, s, d in zip(size, kernel, strides, dilations):
            out = -(-dim // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - dim, 0)
            small = total // 2
            pads.append((total - small, small) if auto == "SAME_LOWER" else (small, total - small))
        return pads[0][0], pads[1][0], pads[0][1], pads[1][1]
    p = list(c.get("pads") or [0] * (2 * spatial))
    return (0, p[0], 0, p[1]) if spatial == 1 else (p[0], p[1], p[2], p[3])


# a layer whose input rows are longer than this (per group) gets no Gram matrix: one would take
# K^2 float64 (512 MB at 8192; VGG's fc6 has K = 25088, 5 GB) and the solves on it K^3
MAX_ROW_LENGTH = 8192


def linear_layer(model: onnx.ModelProto, info: WeightInfo) -> LinearLayer | None:
    """The weight's consumer as a LinearLayer, or None when it is not a single direct Gemm/MatMul/Conv
    or its input rows are longer than MAX_ROW_LENGTH (the fits on data then leave it out)."""
    if info.graph != "main" or len(info.consumers) != 1 or info.consumers[0].via:
        return None
    layer = _linear_layer(model, info)
    if layer is None or row_length(layer) > MAX_ROW_LENGTH:
        return None
    return layer


def _linear_layer(model: onnx.ModelProto, info: WeightInfo) -> LinearLayer | None:
    consumer = info.consumers[0]
    graph = find_graph(model, info.graph)
    node = next((n for n in graph.node if (n.name or n.op_type) == consumer.node
                 and info.name in n.input), None)
    if node is None:
        return None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    shape = tuple(info.shape)
    if node.op_type == "Gemm" and consumer.input_index == 1 and len(shape) == 2:
        return LinearLayer(info.name, node, node.input[0], "gemm", shape, transposed=not attrs.get("transB", 0),
                           conv={"transA": attrs.get("transA", 0)})
    if node.op_type == "MatMul" and consumer.input_index == 1 and len(shape) == 2:
        return LinearLayer(info.name, node, node.input[0], "matmul", shape, transposed=True)
    if node.op_type == "Conv" and consumer.input_index == 1 and len(shape) in (3, 4):
        return LinearLayer(info.name, node, node.input[0], "conv", shape, groups=int(attrs.get("group", 1)), conv=attrs)
    return None


class LayerInputs:
    """Streaming statistics of a layer's input rows: Gram matrices, the sum of the rows (mean), folds
    and a bounded uniform sample; a reducer of the statistics collector."""

    wants_values = True
    wants_extremes = False

    def __init__(self, layer: LinearLayer, *, max_rows: int = 4096, rows_per_chunk: int = 2048, seed: int = 0,
                 folds: int = 0):
        self.layer = layer
        # with folds >= 2, the Gram matrices of the updates (data chunks) are also summed per fold,
        # update i into fold i % folds (see fold_hessians, heldout_hessians)
        self.folds = int(folds)
        self._fold_grams: list[list[np.ndarray]] | None = None
        self._fold_counts = [0] * self.folds
        self._updates = 0
        self.max_rows, self.rows_per_chunk = max_rows, rows_per_chunk
        self.rng = np.random.default_rng(seed)
        self._gram: list[np.ndarray] | None = None
        self._blocks: dict[int | None, RowBlocks] = {}  # per fold (None: no folds), rows held for a product
        self.sums: list[np.ndarray] | None = None  # per group, the sum of the rows the Gram matrices add up
        self.count = 0
        self._sample: list[np.ndarray] | None = None
        self._keys: np.ndarray | None = None

    @property
    def tensor(self) -> str:
        return self.layer.input_name

    @property
    def nbytes(self) -> int:
        return _stats_bytes(self.layer, self.max_rows, self.folds)

    def add(self, chunk: Chunk) -> None:
        self.update(chunk.values[self.tensor])

    def update(self, x: np.ndarray) -> None:
        groups = self.layer.input_rows(np.asarray(x), self.rows_per_chunk, self.rng)
        sums = [g.sum(axis=0) for g in groups]
        self.sums = sums if self.sums is None else [a + b for a, b in zip(self.sums, sums)]
        if self._gram is None:
            self._gram = [np.zeros((g.shape[1], g.shape[1])) for g in groups]
            self._sample = [np.zeros((0, g.shape[1])) for g in groups]
            self._keys = np.zeros(0)
            if self.folds >= 2:
                self._fold_grams = [[np.zeros_like(g) for g in self._gram] for _ in range(self.folds)]
        fold = self._updates % self.folds if self.folds >= 2 else None
        if fold not in self._blocks:
            self._blocks[fold] = RowBlocks(lambda *rows, fold=fold: self._add_products(rows, fold))
        self._blocks[fold].add(*groups)
        if fold is not None:
            self._fold_counts[fold] += groups[0].shape[0]
        self._updates += 1
        self.count += groups[0].shape[0]
        # reservoir by random keys: keep the rows with the smallest keys seen so far
        keys = np.concatenate([self._keys, self.rng.random(groups[0].shape[0])])
        keep = np.argsort(keys, kind="stable")[: self.max_rows]
        self._keys = keys[keep]
        self._sample = [np.concatenate([old, new])[keep] for old, new in zip(self._sample, groups)]

    def _add_products(self, groups: tuple[np.ndarray, ...], fold: int | None) -> None:
        for k, rows in enumerate(groups):
            product = rows.T @ rows
            self._gram[k] += product
            if fold is not None:
                self._fold_grams[fold][k] += product

    @property
    def gram(self) -> list[np.ndarray] | None:
        """Per group, the sum of x x^T over the rows taken."""
        self._flush()
        return self._gram

    def _flush(self) -> None:
        for blocks in self._blocks.values():
            blocks.flush()

    @property
    def rows(self) -> list[np.ndarray]:
        """Per group, the sampled input rows (at most max_rows)."""
        return self._sample or []

    def hessian(self, group: int = 0) -> np.ndarray:
        """H = (1/n) sum x x^T of the sampled rows of `group`."""
        return self.gram[group] / max(self.count, 1)

    def means(self) -> list[np.ndarray]:
        """Per group, E[x] of the rows the Gram matrices add up."""
        return [s / max(self.count, 1) for s in self.sums or []]

    @property
    def fold_count(self) -> int:
        """`folds` once two updates went into different folds, else 0 (a fold may still be empty)."""
        return self.folds if self.folds >= 2 and self._updates >= 2 else 0

    def fold_hessians(self, group: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
        """H of the even and of the odd folds apart (None: folds off, odd in number, or too few updates)."""
        if not self.fold_count or self.folds % 2:
            return None
        self._flush()
        halves = []
        for parity in (0, 1):
            members = range(parity, self.folds, 2)
            gram = sum(self._fold_grams[f][group] for f in members)
            halves.append(gram / max(sum(self._fold_counts[f] for f in members), 1))
        return halves[0], halves[1]

    def heldout_hessians(self, group: int = 0) -> list[np.ndarray] | None:
        """Per fold f, H of every update outside fold f: the data a fit scored on fold f may learn from."""
        if not self.fold_count:
            return None
        return [self.heldout_hessian(f, group) for f in range(self.folds)]

    def heldout_hessian(self, fold: int, group: int = 0) -> np.ndarray:
        """heldout_hessians' one of fold `fold` (folds on): one K x K made, not `folds` at once."""
        return (self.gram[group] - self._fold_grams[fold][group]) / max(self.count - self._fold_counts[fold], 1)


def collect_layer_inputs(model: onnx.ModelProto, data: Dataset, layers: Sequence[LinearLayer], *,
                         max_rows: int = 4096, max_batch: int = 64, seed: int = 0, folds: int = 0,
                         collector: Collector | None = None) -> dict[str, LayerInputs]:
    """LayerInputs for each layer (keyed by weight name), gathered by `collector` (one run over `data`
    when all their statistics fit in its memory bound, else one run per cut of them that does: the same
    results); `folds` as LayerInputs (update i is data chunk i of `max_batch` samples)."""
    stats = {layer.weight: LayerInputs(layer, max_rows=max_rows, seed=seed, folds=folds) for layer in layers}
    (collector or Collector()).gather(model, data, list(stats.values()), max_batch=max_batch)
    return stats


def _stats_bytes(layer: LinearLayer, max_rows: int, folds: int) -> int:
    """About the float64 bytes of a layer's LayerInputs: a Gram matrix per group (and per fold), and
    the row sample."""
    row = int(np.prod(layer.weight_shape)) // max(layer.out_channels, 1)
    return 8 * layer.groups * (row * row * (1 + (folds if folds >= 2 else 0)) + max_rows * row)


def row_length(layer: LinearLayer) -> int:
    """K: the entries of one input row of the layer (per group)."""
    return int(np.prod(layer.weight_shape)) // max(layer.out_channels, 1)


def graph_position(model: onnx.ModelProto, layer: LinearLayer) -> int:
    """Index of the layer's node in the main graph (for processing layers in graph order)."""
    for i, node in enumerate(model.graph.node):
        if node is layer.node or (node.name == layer.node.name and list(node.output) == list(layer.node.output)):
            return i
    return len(model.graph.node)
