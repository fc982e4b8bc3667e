"""The bit-width search's candidate weights (runtime layer): pruned as the prune pass would (magnitude mask, kept
weights refit on the layer's input statistics, cross-fitted where the search scores on the data the refit learns
from), then k-means coded as the share pass would.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx

from onnxcompress.formats.codebook import fit_codebook
from onnxcompress.graph.data import Dataset
from onnxcompress.graph.weights import WeightInfo
from onnxcompress.numerics.measures import magnitude_mask
from onnxcompress.numerics.refine import (damping_for_all_rows, DAMPING_GRID, DEFAULT_DAMPING, heldout_damping,
                                          lstsq_cost, masked_lstsq, MAX_CV_FLOPS, sparsegpt, sparsegpt_factor)
from onnxcompress.runtime.capture import collect_layer_inputs, linear_layer
from onnxcompress.runtime.statistics import Collector

# sparsegpt's factors of one weight kept for its other sparsities, up to this many bytes: a conv of 9x12 kernels
# over 64 channels has K = 6912 inputs, 382 MB and ~25 CPU s a factor, five a sparsity where it cross-fits (all rows
# and four folds); a 1536-input layer's are 19 MB. A weight whose fold factors exceed it is fit fold by fold for all
# its sparsities at once (Pruner._fold_major), one fold's factor alive at a time
FACTOR_CACHE_BYTES = 1 << 30


class Pruner:
    """Pruned versions of a weight close to what the prune pass makes: magnitude mask, then (with
    calibration data) the kept weights refit in the metric of the layer's input Gram matrix.

    Like the prune pass, the exact per-row least squares is used where it is cheap (high
    sparsity: sum |S_j|^3 / 3 flops below `max_flops`), else the SparseGPT update, which is
    faster and no better, so simulated sensitivities lean pessimistic there.

    With `crossfit` (the search scores on the same data the refit learns from) each refit is
    made once per fold of data chunks, from the chunks outside that fold, so that every sample is
    scored by a refit that did not see it: a refit on a few hundred samples for hundreds of inputs
    fits those samples far better than new ones, and scoring it on them would plan for fidelity
    that the compressed model does not have on new data."""

    max_flops = 2e9
    folds = 4  # cross-fitting folds: each refit learns from 3/4 of the data chunks, near the final fit's all
    # a least-squares fit of p values per row on n rows matches its own rows better than new ones
    # by about a factor 1 - p/n; from n >= 20 p on (conv layers: thousands of patches) the bias is
    # under 5% and one fit on all rows is scored as it is
    rows_per_kept = 20

    def __init__(self, model: onnx.ModelProto, data: Dataset | None, weights: list[WeightInfo], *,
                 crossfit: bool = False, collector: Collector | None = None, sparsities: Sequence[float] = ()):
        layers = {w.name: linear_layer(model, w) for w in weights}
        self.layers = {name: layer for name, layer in layers.items() if layer is not None}
        # no sample of raw rows (max_rows=0): the fits read the Gram matrices only (a 22M-weight transformer's
        # 36 layers held 0.7 GB of float64 rows)
        self.stats = collect_layer_inputs(model, data, list(self.layers.values()), folds=self.folds, max_rows=0,
                                          collector=collector) if data and self.layers else {}
        self.crossfit = crossfit
        self.sparsities = tuple(sorted(s for s in sparsities if s > 0))  # the fold-major fits' (_fold_major)
        # the ridge of the measured fits chosen by held-out error (14 fits a weight and sparsity), else the default
        self.held_out_ridge = True
        self._cache: dict[tuple[str, float], _Refits] = {}
        # sparsegpt's factor per (weight, group, Gram: None for all rows or the held-out fold, damping)
        self._factors: dict[tuple, np.ndarray] = {}

    def __call__(self, array: np.ndarray, info: WeightInfo, sparsity: float, *,
                 all_rows: bool = False) -> tuple[list[np.ndarray], np.ndarray]:
        """(refit weights: one, or one per fold f fit without fold f when cross-fitting; the kept mask).

        `all_rows`: one fit on all rows at the default ridge, for the predicted sweep's layer errors: the
        held-out choice of the ridge (two folds x the damping grid: 14 fits) and the fold fits (4) are made
        only where a candidate is measured."""
        refits = self._refits(array, info, sparsity)
        if refits.stats is None:
            return refits.plain, refits.mask
        # H of all rows, made only for a fit not made yet (a 6912-input conv's is 382 MB)
        hessians = lambda: [refits.stats.hessian(g) for g in range(refits.layer.groups)]  # noqa: E731
        if all_rows:
            if refits.rough is None:
                refits.rough = self._fit(refits, array, hessians(), DEFAULT_DAMPING, (info.name, None))
            return [refits.rough], refits.mask
        self._choose_damping(refits, array)
        if not refits.crossfits:
            if refits.single is None:
                refits.single = refits.rough if refits.damping == DEFAULT_DAMPING and refits.rough is not None \
                    else self._fit(refits, array, hessians(), refits.damping, (info.name, None))
            return [refits.single], refits.mask
        if refits.folds is None:
            k = refits.layer.weight_matrix(refits.mask).shape[1]
            if refits.stats.folds * refits.layer.groups * k * k * 8 > FACTOR_CACHE_BYTES:
                self._fold_major(array, info, sparsity)
            else:
                refits.folds = self._fold_fits([refits], array, info)[0]
        return refits.folds, refits.mask

    def _refits(self, array: np.ndarray, info: WeightInfo, sparsity: float) -> "_Refits":
        key = (info.name, sparsity)
        refits = self._cache.get(key)
        if refits is None:
            refits = self._cache[key] = self._mask(array, info, sparsity)
        return refits

    def _choose_damping(self, refits: "_Refits", array: np.ndarray) -> None:
        if refits.damping is None:
            layer = refits.layer
            refits.damping = self._damping(refits.stats, layer.groups,
                                           layer.weight_matrix(np.asarray(array, dtype=np.float64)),
                                           layer.weight_matrix(refits.mask), layer.group_of_channels()) \
                if self.held_out_ridge else DEFAULT_DAMPING

    def _fold_fits(self, todo: list["_Refits"], array: np.ndarray, info: WeightInfo) -> list[list[np.ndarray]]:
        """Per refits of `todo` (one weight's), its fits on the rows outside each fold: fold by fold, each fold's
        held-out H made once for all of them (one alive at a time) and its factors dropped after it."""
        stats = todo[0].stats
        # the ridge falls about as 1 / rows (refine.damping_for_all_rows): a fit on the
        # (folds - 1) / folds of the rows outside one fold takes a little more
        scale = stats.folds / (stats.folds - 1)
        fits: list[list[np.ndarray]] = [[] for _ in todo]
        for f in range(stats.folds):
            hessians = [stats.heldout_hessian(f, g) for g in range(todo[0].layer.groups)]
            for refits, out in zip(todo, fits):
                out.append(self._fit(refits, array, hessians, refits.damping * scale, (info.name, f)))
            if len(todo) > 1:  # fold-major: no fit asks for this fold's factors again
                self._factors = {key: v for key, v in self._factors.items() if key[:2] != (info.name, f)}
        return fits

    def _fold_major(self, array: np.ndarray, info: WeightInfo, sparsity: float) -> None:
        """The cross-fits of every sparsity of the search (`sparsities`) at once, fold by fold: a wide layer's fold
        factors do not fit in FACTOR_CACHE_BYTES together (four of 382 MB at K = 6912), and made for each sparsity
        they would cost ~25 CPU s each; one fold's at a time, each made once. The same fits as one sparsity at a
        time (each reads only its mask, its fold's H and factor)."""
        todo = []
        for s in sorted({*self.sparsities, sparsity}):
            refits = self._refits(array, info, s)
            self._choose_damping(refits, array)
            if refits.crossfits and refits.folds is None:
                todo.append(refits)
        for refits, folds in zip(todo, self._fold_fits(todo, array, info)):
            refits.folds = folds

    def rows_fit(self, array: np.ndarray, info: WeightInfo, sparsity: float, rows: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
        """(rows `rows` of the weight's channel-first matrix as the one fit on all rows at the default ridge makes
        them, their kept mask), fit alone: a row's fit reads only that row and its group's Gram (masked_lstsq and
        sparsegpt alike; which of the two: as for the whole group). For the predicted sweep on a sample of a large
        weight's rows; the weight must have layer statistics."""
        refits = self._refits(array, info, sparsity)
        if refits.sampled is not None and np.array_equal(refits.sampled[0], rows):  # the other widths' fit
            return refits.sampled[1], refits.sampled[2]
        layer = refits.layer
        keep = layer.weight_matrix(refits.mask)
        if refits.rough is not None:
            return layer.weight_matrix(refits.rough)[rows], keep[rows]
        target = layer.weight_matrix(np.asarray(array, dtype=np.float64))
        group = layer.group_of_channels()
        out = np.zeros((len(rows), target.shape[1]))
        for g in np.unique(group[rows]):
            picked = np.flatnonzero(group[rows] == g)
            sub = rows[picked]
            out[picked] = self._solve(target[sub], keep[sub], keep[group == g], refits.stats.hessian(g),
                                      DEFAULT_DAMPING, (info.name, None), g)
        refits.sampled = (np.array(rows), out.astype(array.dtype), keep[rows])
        return refits.sampled[1], refits.sampled[2]

    def _mask(self, array: np.ndarray, info: WeightInfo, sparsity: float) -> "_Refits":
        """The mask and whether the refits cross-fit: what every fit of (weight, sparsity) shares."""
        mask = magnitude_mask(array, sparsity)
        stats, layer = self.stats.get(info.name), self.layers.get(info.name)
        refits = _Refits(mask, None if stats is not None else [np.where(mask, array, 0).astype(array.dtype)])
        if stats is None:
            return refits
        refits.stats, refits.layer = stats, layer
        kept = float(layer.weight_matrix(mask).sum(axis=1).mean())
        refits.crossfits = bool(self.crossfit and stats.fold_count and stats.count < self.rows_per_kept * kept)
        return refits

    def _fit(self, refits: "_Refits", array: np.ndarray, hessians: list[np.ndarray], damping: float,
             gram: tuple[str, int | None]) -> np.ndarray:
        """The refit of the kept weights in `hessians`' metric; `gram` names them: (weight, None) for all rows,
        (weight, f) for the rows outside fold f."""
        layer = refits.layer
        return self._refit(layer, layer.weight_matrix(np.asarray(array, dtype=np.float64)),
                           layer.weight_matrix(refits.mask), layer.group_of_channels(), hessians,
                           damping, gram).astype(array.dtype)

    def _refit(self, layer, target: np.ndarray, keep: np.ndarray, group: np.ndarray, hessians: list[np.ndarray],
               damping: float, gram: tuple[str, int | None]) -> np.ndarray:
        refit = np.zeros_like(target)
        for g in range(layer.groups):
            rows = np.flatnonzero(group == g)
            refit[rows] = self._solve(target[rows], keep[rows], keep[rows], hessians[g], damping, gram, g)
        return layer.weight_from_matrix(refit)

    def _solve(self, target: np.ndarray, keep: np.ndarray, group_keep: np.ndarray, h: np.ndarray, damping: float,
               gram: tuple[str, int | None], g: int) -> np.ndarray:
        """Rows of group g refit in Gram h: the exact least squares where the whole group's (`group_keep`) cost
        allows, else the SparseGPT update (a row's fit reads only that row and the Gram, so rows fit alone match)."""
        if lstsq_cost(group_keep) <= self.max_flops:
            return masked_lstsq(target, keep, h, damping=damping)
        return sparsegpt(target, h, keep=keep, damping=damping, factor=self._factor(gram, g, h, damping))[0]

    def _factor(self, gram: tuple[str, int | None], g: int, h: np.ndarray, damping: float) -> np.ndarray:
        """sparsegpt's factor of Gram `h` (group g of the Gram `gram` names) at `damping`: the same for every mask, so
        made once for a weight's sparsities. Only the weight's own are kept, up to FACTOR_CACHE_BYTES: those made
        first, since the fits ask for them in the same order at every sparsity (evicting the oldest would keep none)."""
        key = (*gram, g, damping)
        found = self._factors.get(key)
        if found is None:
            found = sparsegpt_factor(h, damping)
            kept = {k: v for k, v in self._factors.items() if k[0] == gram[0]}
            if sum(v.nbytes for v in kept.values()) + found.nbytes <= FACTOR_CACHE_BYTES:
                kept[key] = found
            self._factors = kept
        return found

    @staticmethod
    def _damping(stats, groups: int, target: np.ndarray, keep: np.ndarray, group: np.ndarray) -> float:
        """As the prune pass's "auto" damping (for a fit on all rows): least two-fold held-out error where affordable
        (the folds' H made only then: two K x K a group)."""
        if lstsq_cost(keep) * 4 * len(DAMPING_GRID) > MAX_CV_FLOPS:
            return DEFAULT_DAMPING
        folds = [stats.fold_hessians(g) for g in range(groups)]
        if any(f is None for f in folds):
            return DEFAULT_DAMPING
        errors = sum(heldout_damping(target[rows], keep[rows], ((a, None, None), (b, None, None)))
                     for (a, b), rows in ((folds[g], np.flatnonzero(group == g)) for g in range(len(folds))))
        return damping_for_all_rows(errors)


@dataclass
class _Refits:
    """What the pruner made of one (weight, sparsity): the mask, the plain masked weight, and (with layer
    statistics) the fits made so far."""

    mask: np.ndarray
    plain: list[np.ndarray] | None  # the masked weight, where there is no refit (None: with layer statistics)
    stats: object = None  # the layer's input statistics (capture.LayerInputs), None: no refit
    layer: object = None
    damping: float | None = None  # the ridge chosen by held-out error (for the measured fits)
    crossfits: bool = False
    rough: np.ndarray | None = None  # on all rows at the default ridge: the prediction's
    single: np.ndarray | None = None  # on all rows at the chosen ridge: the measured one where none cross-fits
    folds: list[np.ndarray] | None = None
    sampled: tuple | None = None  # (rows, their fit on all rows, their mask): rows_fit's, made once for every width


def candidate_weights(array: np.ndarray, info: WeightInfo, sparsity: float, bits: int, seed: int,
                      pruner: Pruner | None = None, *, all_rows: bool = False) -> list:
    """Prune to `sparsity` (refit when the pruner has data), then k-means code at `bits`: one
    coded weight, or one per data fold when the pruner cross-fits (`all_rows`: the one fit on all rows)."""
    if sparsity <= 0:
        return [fit_codebook(array, info, bits, seed=seed)]
    if pruner is not None:
        refits, mask = pruner(array, info, sparsity, all_rows=all_rows)
    else:
        mask = magnitude_mask(array, sparsity)
        refits = [np.where(mask, array, 0)]
    return [fit_codebook(weight, info, bits, seed=seed, mask=mask) for weight in refits]


def sampled_candidate(array: np.ndarray, info: WeightInfo, sparsity: float, bits: int, seed: int,
                      pruner: Pruner | None, rows: np.ndarray):
    """The candidate of `candidate_weights(..., all_rows=True)` made on rows `rows` of a weight with layer
    statistics (its channel-first matrix's rows, pruned by the whole weight's mask), coded as a weight of its own."""
    layer = pruner.layers[info.name]
    sample = replace(info, shape=(len(rows), layer.weight_matrix(array).shape[1]), channel_axis=0)
    if sparsity <= 0:
        return fit_codebook(np.ascontiguousarray(layer.weight_matrix(array)[rows]), sample, bits, seed=seed)
    fit, keep = pruner.rows_fit(array, info, sparsity, rows)
    return fit_codebook(fit, sample, bits, seed=seed, mask=keep)


def predicted_candidate(array: np.ndarray, info: WeightInfo, sparsity: float, bits: int, seed: int,
                        pruner: Pruner | None, *, rows: np.ndarray | None = None, sample: np.ndarray | None = None):
    """The candidate the predicted sweep codes: on `rows` of a weight's channels (sampled_candidate), on a `sample` of
    a table's rows (pruned by its own mask: no layer statistics, no refit), else the one fit on all rows."""
    if rows is not None:
        return sampled_candidate(array, info, sparsity, bits, seed, pruner, rows)
    if sample is not None:
        return candidate_weights(sample, info, sparsity, bits, seed)[0]
    return candidate_weights(array, info, sparsity, bits, seed, pruner, all_rows=True)[0]
