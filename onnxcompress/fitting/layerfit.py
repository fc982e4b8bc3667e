"""Layer-wise fitting on calibration data: the glue between the graph and :mod:`onnxcompress.numerics.refine`.

Passes that refit weights (prune's compensation, share's centroid refinement) process layers in
graph order and, for each, capture the layer's inputs from the CURRENT model (earlier layers
already compressed) and, on the same rows, from the ORIGINAL model, so that each layer is fit
to what the original network computed there and errors do not pile up from layer to layer.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import onnx

from onnxcompress.formats.codebook import SharedWeight
from onnxcompress.graph.data import Dataset
from onnxcompress.graph.weights import find_weights, get_array, WeightInfo
from onnxcompress.numerics import refine
from onnxcompress.numerics.gptq import LayerHessians
from onnxcompress.numerics.measures import nearest_codes, sqnr_db
from onnxcompress.runtime.capture import graph_position, linear_layer, LinearLayer
from onnxcompress.runtime.paired import collect_paired_grams, PairedGrams, ReferenceRows, RowCount

log = logging.getLogger(__name__)
# rows a costly capture takes for a centroid refit (original_rows): it solves for the codebook only (at most
# 2^bits unknowns, not K per output channel as prune's refits), so 2048 rows and at least K (a full-rank metric
# over the layer's input) are plenty; the paired captures' default (4096 and 2 K) ran MiniLM-like's refinement on
# all 64 sentences, this on 32 (its layers' refined SQNRs within 0.1 dB of the default's; docs/realmodels.md)
CENTROID_ROWS = RowCount(minimum=2048, per_input=1)


class FitSource(Protocol):
    """What a layer-wise fit reads (the pipeline's Context has these): the model being compressed,
    the original as exactly rewritten, the calibration data and the pruning masks."""

    model: onnx.ModelProto
    reference: onnx.ModelProto
    data: Dataset
    masks: Mapping[str, np.ndarray]


def in_layer_order(model, infos: list[WeightInfo]) -> list[WeightInfo]:
    """Weights sorted by the graph position of their Gemm/MatMul/Conv (others first, in their order)."""
    def key(info: WeightInfo) -> int:
        layer = linear_layer(model, info)
        return graph_position(model, layer) if layer is not None else -1
    return sorted(infos, key=key)


@dataclass
class LayerFit:
    """One layer's statistics and reference: fit w (rows of `reference`) as seen through X_r."""

    layer: LinearLayer
    grams: PairedGrams
    reference: np.ndarray  # (rows, K) float64 reference weights in matrix layout

    def groups(self):
        """Per group: (group, row indices, H, C or None, R or None)."""
        group = self.layer.group_of_channels()
        for g in np.unique(group):
            yield (int(g), np.flatnonzero(group == g), self.grams.current[g],
                   None if self.grams.cross is None else self.grams.cross[g],
                   None if self.grams.reference is None else self.grams.reference[g])

    def error(self, matrix: np.ndarray) -> tuple[float, float]:
        """(output error, output energy) of candidate weights (rows, K), summed over groups."""
        err = sig = 0.0
        for _, rows, h, c, r in self.groups():
            e, s = refine.output_error(matrix[rows], self.reference[rows], h, c, r)
            err, sig = err + e, sig + s
        return err, sig


def layer_fit(ctx: FitSource, info: WeightInfo, layer: LinearLayer, *, target: str = "original",
              rows_per_chunk: int = 2048, folds: bool = False, reference_rows: ReferenceRows | None = None
              ) -> LayerFit:
    """Gram matrices of the layer's inputs in ctx.model, paired with ctx.reference (the original,
    as exactly rewritten) when target == "original" (its rows from `reference_rows` where it holds them)."""
    current = np.asarray(get_array(ctx.model, info), dtype=np.float64)
    reference_model, reference = None, current
    original = _original(ctx, info, layer) if target == "original" else None
    if original is not None:
        reference_model = ctx.reference
        reference = np.asarray(get_array(ctx.reference, original), dtype=np.float64)
    if reference_model is not None and reference_rows is not None and reference_rows.reference is reference_model:
        reference_model = reference_rows
    grams = collect_paired_grams(ctx.model, reference_model, ctx.data, layer, rows_per_chunk=rows_per_chunk,
                                 folds=folds, collector=ctx.statistics)
    return LayerFit(layer, grams, layer.weight_matrix(reference))


def _original(ctx: FitSource, info: WeightInfo, layer: LinearLayer) -> WeightInfo | None:
    """The weight in ctx.reference when a fit can aim at the original's layer output, else None."""
    if not _has_tensor(ctx.reference, layer.input_name):
        return None
    original = next((w for w in find_weights(ctx.reference, min_elements=0) if w.name == info.name), None)
    return original if original is not None and tuple(original.shape) == tuple(info.shape) else None


def original_rows(ctx: FitSource, infos: list[WeightInfo], *, rows_per_chunk: int = 2048) -> ReferenceRows:
    """The original's input rows of the layers of `infos` that refine_shared aims at the original, taken
    in one run over the data on the first refinement (see ReferenceRows)."""
    layers = [layer for info in infos if (layer := linear_layer(ctx.model, info)) is not None
              and _original(ctx, info, layer) is not None]
    return ReferenceRows(ctx.reference, ctx.data, layers, rows_per_chunk=rows_per_chunk, collector=ctx.statistics,
                         enough=CENTROID_ROWS)


def refine_shared(ctx: FitSource, info: WeightInfo, shared: SharedWeight, *, target: str = "original",
                  ridge: float = 1e-3, reassign_rounds: int = 1, rows_per_chunk: int = 2048,
                  reference_rows: ReferenceRows | None = None) -> tuple[SharedWeight, dict[str, Any]]:
    """Least-squares centroids for one shared weight (call before the weight is rewritten in ctx.model);
    `reference_rows`: the original's rows of many layers at once (see original_rows).

    Returns the refined SharedWeight (or the same one, with the reason in the details) and details
    for the report: the layer-output SQNR before and after refinement.
    """
    layer = linear_layer(ctx.model, info)
    reason = _not_refinable(layer, shared)
    if reason is not None:
        return shared, {"refine": f"skipped: {reason}"}
    fit = layer_fit(ctx, info, layer, target=target, rows_per_chunk=rows_per_chunk, reference_rows=reference_rows)
    current = layer.weight_matrix(np.asarray(get_array(ctx.model, info), dtype=np.float64))
    index = layer.weight_matrix(shared.indices())
    scale = None if shared.scale is None else shared.scale.astype(np.float64)
    fixed = np.unique(shared.indices()[shared.codes == shared.zero_code]) if shared.zero_code is not None else []
    mask = ctx.masks.get(info.name)
    free_mask = None if mask is None else layer.weight_matrix(mask)

    def decode(book: np.ndarray, idx: np.ndarray) -> np.ndarray:
        w = book[idx]
        return w if scale is None else w * scale[:, None]

    book = shared.codebook.astype(np.float64)
    before, signal = fit.error(decode(book, index))
    best = (before, book, index)
    can_reassign = shared.group_offsets is None and shared.scale is None
    for round_ in range(1 + (reassign_rounds if can_reassign else 0)):
        idx = best[2]
        if round_ > 0:  # move each free entry to the nearest refined centroid, then refit
            idx = _reassigned(idx, current, best[1], fixed, free_mask)
            if idx is None:
                break
        new_book = book_fit(fit, idx, best[1], scale, fixed, ridge, free_mask)
        err, _ = fit.error(decode(new_book, idx))
        if err < best[0]:
            best = (err, new_book, idx)
        elif round_ > 0:
            break
    after, new_book, new_index = best
    details = {"refine": "least squares", "sqnr_db_kmeans": round(sqnr_db(signal, before), 2),
               "sqnr_db_refined": round(sqnr_db(signal, after), 2), "refine_rows": fit.grams.count}
    if after >= before:
        details["refine"] = "kept k-means centroids (no improvement)"
        return shared, details
    return _with_book(shared, layer, new_book, new_index, fixed), details


def _not_refinable(layer: LinearLayer | None, shared: SharedWeight) -> str | None:
    """Why the shared weight's centroids cannot be refit in its layer's output, or None."""
    if layer is None:
        return "not a single Gemm/MatMul/Conv input"
    if shared.outlier_index is not None and shared.outlier_index.size:
        return "outliers are not refined"
    if shared.scale is not None and shared.scale.size != layer.out_channels:
        return "scales are not per output channel of the layer"
    return None


def _with_book(shared: SharedWeight, layer: LinearLayer, book: np.ndarray, index: np.ndarray, fixed) -> SharedWeight:
    """`shared` with the refit codebook (fixed centroids exactly 0.0) and the codes of the (C, K) `index`
    back in the weight's layout (per group: relative to the group's offset)."""
    codes = layer.weight_from_matrix(index)
    if shared.group_offsets is not None:
        codes = codes - shared.group_offsets.astype(np.int64).reshape(shared.channel_shape())
    book32 = book.astype(np.float32)
    book32[list(fixed)] = 0.0
    return dataclasses.replace(shared, codebook=book32, codes=codes.astype(shared.codes.dtype))


def _reassigned(idx: np.ndarray, current: np.ndarray, book: np.ndarray, fixed, free_mask) -> np.ndarray | None:
    """`idx` with each free entry (not on a fixed centroid, inside `free_mask`) moved to the nearest centroid
    of `book` that is not fixed; None when every centroid is fixed."""
    allowed = np.ones(book.size, dtype=bool)
    allowed[list(fixed)] = False
    if not allowed.any():
        return None
    movable = ~np.isin(idx, fixed) if free_mask is None else free_mask & ~np.isin(idx, fixed)
    idx = idx.copy()
    idx[movable] = nearest_codes(current[movable], book, allowed=allowed)
    return idx


def book_fit(fit: LayerFit, index: np.ndarray, book: np.ndarray, scale, fixed, ridge: float,
             free_mask) -> np.ndarray:
    hessians = LayerHessians(fit.grams.current, fit.layer.group_of_channels(), crosses=fit.grams.cross)
    return refine.refine_centroids(fit.reference, index, book, hessians, scale=scale, fixed=fixed, ridge=ridge,
                                   free_mask=free_mask)


def _has_tensor(model, name: str) -> bool:
    graph = model.graph
    return any(name in n.output for n in graph.node) or any(i.name == name for i in graph.input)
