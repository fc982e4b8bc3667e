"""Pruning (Deep Compression stage 1): drop the smallest weights, refit the survivors on data.

Per weight, a mask (True = kept) is chosen by magnitude, either at a target sparsity or by the
paper's threshold rule |w| < quality * std(w). With calibration data, each Gemm/MatMul/Conv
layer is then compensated, in graph order so that every layer sees the inputs of the already
pruned layers before it: the kept weights of each output channel are refit by least squares to
reproduce the original model's layer output (see :mod:`onnxcompress.numerics.refine`), or updated
column by column with OBS (SparseGPT), which also chooses its own mask. The weights stay dense
with exact zeros; storing them sparsely is the job of later passes (`ctx.masks` carries the
masks to them).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from tqdm.auto import tqdm

from onnxcompress.errors import BugError, ModelError, PreconditionError
from onnxcompress.fitting.layerfit import layer_fit, LayerFit
from onnxcompress.graph.weights import find_weights, get_array, Role, set_array, WeightInfo
from onnxcompress.numerics import refine
from onnxcompress.numerics.measures import magnitude_mask, sqnr_db, top_mask
from onnxcompress.pipeline.artifacts import Artifact
from onnxcompress.pipeline.manager import Context, Pass, PassResult
from onnxcompress.runtime.capture import graph_position, linear_layer, LinearLayer

log = logging.getLogger(__name__)


MAX_ROUNDS = 32  # gradual pruning steps a recipe may ask for


@dataclass(kw_only=True)
class PruneConfig:
    method: Literal["sparsity", "threshold"] = "sparsity"  # a fixed fraction per role, or |w| below quality * std(w)
    # defaults from Han et al. (LeNet-300-100 keeps 8%/9% of its hidden fc layers, AlexNet ~9-10%
    # of fc and 35-40% of conv2-5; LeNet-5 keeps 66% of conv1, AlexNet 84%)
    sparsity_fc: float = 0.91  # Gemm / MatMul
    sparsity_conv: float = 0.65  # Conv / ConvTranspose
    sparsity_head: float = 0.75  # layers with at most `head_channels` outputs (classifiers: the paper keeps 19-26%)
    head_channels: int = 16  # see sparsity_head
    sparsity_stem: float = 0.35  # convolutions with a fan-in of at most `stem_fan_in` (first layer on raw inputs)
    stem_fan_in: int = 75  # see sparsity_stem
    sparsity_other: float = 0.5  # weights of any other consumer (embeddings, recurrent, Mul/Add constants)
    quality: float = 1.0  # method "threshold": prune |w| < quality * std(w)
    sparsity: dict = field(default_factory=dict)  # weight name -> sparsity, over every default
    compensation: Literal["lstsq", "sparsegpt", "none"] = "lstsq"  # with data: how kept weights are refit
    # with data, which entries to keep: the largest |w| (the paper), or the largest |w| * ||x||, the
    # weight's contribution at the layer's input scale (Wanda, Sun et al. 2023); without data, |w|
    criterion: Literal["magnitude", "activation"] = "magnitude"
    target: Literal["original", "current"] = "original"  # refit toward the original model's layer outputs
    refit_bias: bool = False  # lstsq: refit the bias jointly (absorbs the mean shift; no gain measured on LeNet-300-100)
    rounds: int = 3  # lstsq: prune in this many steps (kept fraction geometric), re-choosing the mask from refit weights
    # ridge of the refits, relative to mean(diag H); "auto": per layer, the value of refine.DAMPING_GRID
    # with the least two-fold held-out output error on the calibration rows (0.01 where unaffordable)
    damping: float | Literal["auto"] = "auto"
    max_cv_flops: float = refine.MAX_CV_FLOPS  # "auto" damping: the held-out refits of a layer may cost this many flops
    max_lstsq_flops: float = 3e10  # above this a layer's per-channel solves give way to SparseGPT updates
    rows_per_chunk: int = 2048  # input rows sampled per data chunk for the Gram matrices
    min_elements: int = 256  # smaller tensors are left alone (unless named in `sparsity`)
    exclude: list = field(default_factory=list)  # weight names to leave alone

    def __post_init__(self):
        for name in ("sparsity_fc", "sparsity_conv", "sparsity_head", "sparsity_stem", "sparsity_other"):
            _check_fraction(name, getattr(self, name))
        for name, value in self.sparsity.items():
            _check_fraction(f"sparsity['{name}']", value)
        if self.quality < 0:
            raise ValueError(f"quality must be >= 0, not {self.quality}")
        if not 1 <= self.rounds <= MAX_ROUNDS:  # each round refits every layer: 10^9 rounds ran for hours
            raise ValueError(f"rounds must be between 1 and {MAX_ROUNDS}, not {self.rounds}")
        if self.damping != "auto" and (not isinstance(self.damping, (int, float)) or self.damping < 0):
            raise ValueError(f"damping must be 'auto' or a number >= 0, not {self.damping!r}")


def _check_fraction(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a fraction in [0, 1), not {value!r}")


@dataclass
class PruneResult(PassResult):
    """Per pruned weight: the fraction of entries kept."""

    kept: dict[str, float] = field(default_factory=dict)


class PrunePass(Pass):
    name = "prune"
    Config = PruneConfig
    produces = frozenset({Artifact.MASKS})

    def requires(self, ctx: Context) -> None:
        if ctx.shared:
            raise PreconditionError("weights are already shared; run 'prune' before 'share'")

    def call(self, ctx: Context) -> PassResult:
        cfg: PruneConfig = self.config
        self._targets: dict[str, tuple[float, float]] = {}  # name -> (target sparsity, allowed rounding)
        unknown = sorted(set(cfg.sparsity) - {w.name for w in ctx.weights(0)})
        if unknown:
            raise ModelError(f"prune: the model has no weight(s) {unknown} named in the 'sparsity' option")
        candidates = [w for w in ctx.weights(0) if (w.numel >= cfg.min_elements or w.name in cfg.sparsity)
                      and self._eligible(ctx, w)]  # a weight named in `sparsity` is pruned whatever its size
        layers = {w.name: linear_layer(ctx.model, w) for w in candidates}
        candidates.sort(key=lambda w: graph_position(ctx.model, layers[w.name]) if layers[w.name] else -1)
        compensate = cfg.compensation != "none" and ctx.data is not None
        if cfg.compensation != "none" and ctx.data is None and candidates:
            ctx.note("prune: no calibration data, so the kept weights were not refit (plain magnitude pruning); "
                     "pass --data to compensate the pruning error")
        kept: dict[str, float] = {}
        total = pruned = 0
        for info in tqdm(candidates, desc="prune", unit="weight", disable=not ctx.progress, leave=False):
            array = get_array(ctx.model, info)
            if not np.all(np.isfinite(array)):
                raise ModelError(f"weight '{info.name}' holds NaN or Inf; fix the model before compressing it")
            layer = layers[info.name]
            sparsity = self._sparsity(ctx, info, layer, array)
            if sparsity <= 0.0:  # nothing to prune: no mask, so later passes keep the weight dense
                log.debug("prune: %s kept dense (sparsity 0)", info.name)
                ctx.record(info.name, self.name, "kept dense (sparsity 0)")
                continue
            details: dict = {"sparsity_target": round(sparsity, 4)}
            if compensate and layer is not None:
                new, keep = self._compensated(ctx, info, layer, array, sparsity, details)
            else:
                if compensate:
                    details["compensation"] = "none: not a single Gemm/MatMul/Conv input"
                    log.debug("prune: %s not compensated: its consumer is not one Gemm/MatMul/Conv", info.name)
                keep = magnitude_mask(array, sparsity)
                new = np.where(keep, array, 0)
            set_array(ctx.model, info, new.astype(array.dtype))
            ctx.masks[info.name] = keep
            # one mask over the whole weight rounds once (numerics.kept_count); SparseGPT's own masks round per row block
            unit = min(refine.SPARSEGPT_BLOCK, keep.size // layer.out_channels) \
                if details.get("compensation") == "sparsegpt" else keep.size
            self._targets[info.name] = (sparsity, 0.5 / max(unit, 1))
            frac = float(keep.mean())
            kept[info.name] = frac
            total, pruned = total + keep.size, pruned + int(keep.size - keep.sum())
            details["kept"] = round(frac, 4)
            ctx.record(info.name, self.name, f"pruned {100 * (1 - frac):.0f}%", info.nbytes, info.nbytes, details)
        log.info("prune: %d weights, %d of %d entries pruned", len(kept), pruned, total)
        return PruneResult(bool(pruned), {"weights": len(kept), "pruned": pruned, "entries": total}, kept=kept)

    def _eligible(self, ctx: Context, info: WeightInfo) -> bool:
        reason = info.skip
        if reason is None and info.name in self.config.exclude:
            reason = "excluded by the recipe"
        if reason is None and len(info.shape) < 2:
            reason = "a vector (bias or scale)"
        if reason is None and info.location == "sparse_initializer":
            reason = "already a sparse initializer"
        if reason is not None:
            log.debug("prune: %s skipped: %s", info.name, reason)
            return False
        return True

    def _sparsity(self, ctx: Context, info: WeightInfo, layer: LinearLayer | None, array: np.ndarray) -> float:
        cfg: PruneConfig = self.config
        planned = ctx.plan.sparsity(info.name) if ctx.plan is not None else None
        if planned is not None:
            return float(planned)
        if info.name in cfg.sparsity:
            return float(cfg.sparsity[info.name])
        if cfg.method == "threshold":
            values = np.abs(np.asarray(array, dtype=np.float64))
            return float(np.mean(values < cfg.quality * float(np.std(array))))
        return default_sparsity(cfg, info, layer)

    def _compensated(self, ctx: Context, info: WeightInfo, layer: LinearLayer, array: np.ndarray, sparsity: float,
                     details: dict) -> tuple[np.ndarray, np.ndarray]:
        """Mask and refit one layer on inputs captured from the current (partly pruned) model."""
        cfg: PruneConfig = self.config
        fit = layer_fit(ctx, info, layer, target=cfg.target, rows_per_chunk=cfg.rows_per_chunk,
                        folds=cfg.damping == "auto")
        w_cur = layer.weight_matrix(np.asarray(array, dtype=np.float64))
        keep_m = self._first_mask(fit, layer, array, w_cur, sparsity)
        method = self._method(info, keep_m)
        damping = self._damping(fit, keep_m, method, details)
        fit.grams.folds = None  # the halves' six K x K served the damping's choice only (2.3 GB at K = 6912)
        bias = self._bias(ctx, layer) if method == "lstsq" and cfg.refit_bias else None
        refit = _LayerRefit(fit, w_cur, keep_m, bias, method, damping, sparsity, cfg.rounds)
        k = w_cur.shape[1]
        out = np.zeros_like(w_cur)
        keep_out = np.zeros(w_cur.shape, dtype=bool)
        new_bias = None if bias is None else bias[1].copy()
        err_plain = err_new = signal = 0.0
        for g, rows, h, cross, ref_gram in fit.groups():
            fitted, keep_g, e_plain, e_new, sig = refit.group(g, rows, h, cross, ref_gram)
            err_plain, err_new, signal = err_plain + e_plain, err_new + e_new, signal + sig
            out[rows], keep_out[rows] = fitted[:, :k], keep_g[:, :k]
            if bias is not None:
                new_bias[rows] = fitted[:, k]
        if bias is not None:
            set_array(ctx.model, bias[0], new_bias.astype(get_array(ctx.model, bias[0]).dtype))
            details["bias_refit"] = bias[0].name
        details.update(compensation=method, rows=fit.grams.count,
                       sqnr_db_magnitude=round(sqnr_db(signal, err_plain), 2),
                       sqnr_db=round(sqnr_db(signal, err_new), 2))
        log.debug("prune: %s layer-output SQNR %.1f dB (magnitude only) -> %.1f dB (%s)", info.name,
                  sqnr_db(signal, err_plain), sqnr_db(signal, err_new), method)
        keep_out &= out != 0  # an exact zero after the refit is a pruned entry too
        new = layer.weight_from_matrix(np.where(keep_out, out, 0.0))
        return new, layer.weight_from_matrix(keep_out)

    def _first_mask(self, fit: LayerFit, layer: LinearLayer, array: np.ndarray, w_cur: np.ndarray,
                    sparsity: float) -> np.ndarray:
        """The mask before any refit (weight-matrix layout): by |w|, or by |w| * ||x|| (criterion "activation")."""
        if self.config.criterion == "activation":
            norms = np.zeros_like(w_cur)
            for _, rows, h, _, _ in fit.groups():
                norms[rows] = np.sqrt(np.maximum(np.diag(h), 0.0))[None, :]
            return magnitude_mask(w_cur * norms, sparsity)
        return layer.weight_matrix(magnitude_mask(array, sparsity))

    def _method(self, info: WeightInfo, keep: np.ndarray) -> str:
        """The configured compensation, with lstsq giving way to SparseGPT updates where its solves cost too much."""
        cfg: PruneConfig = self.config
        if cfg.compensation == "lstsq" and refine.lstsq_cost(keep) > cfg.max_lstsq_flops:
            log.info("prune: %s: %.1e flops of per-channel solves, using SparseGPT updates instead",
                     info.name, refine.lstsq_cost(keep))
            return "sparsegpt-fixed"
        return cfg.compensation

    def _damping(self, fit, keep: np.ndarray, method: str, details: dict) -> float:
        """The configured damping, or with "auto" the grid value of least held-out error (lstsq refits)."""
        cfg: PruneConfig = self.config
        if cfg.damping != "auto":
            return float(cfg.damping)
        cost = refine.lstsq_cost(keep) * 4 * len(refine.DAMPING_GRID)
        if method != "lstsq" or fit.grams.folds is None or cost > cfg.max_cv_flops:
            return refine.DEFAULT_DAMPING
        errors = sum(refine.heldout_damping(fit.reference[rows], keep[rows], fit.grams.fold_groups(g))
                     for g, rows, *_ in fit.groups())
        chosen = refine.damping_for_all_rows(errors)
        details["damping"] = chosen
        log.debug("prune: %s damping %.3g by held-out error (grid %s)", fit.layer.weight, chosen, refine.DAMPING_GRID)
        return chosen

    def _bias(self, ctx: Context, layer: LinearLayer) -> tuple[WeightInfo, np.ndarray, np.ndarray] | None:
        """(info, current, reference values) of the layer's own bias vector, or None (no plain bias)."""
        node = layer.node
        if layer.kind not in ("gemm", "conv") or len(node.input) < 3 or not node.input[2]:
            return None
        info = next((w for w in ctx.weights(0) if w.name == node.input[2] and w.graph == "main"), None)
        if info is None or tuple(info.shape) != (layer.out_channels,) or len(info.consumers) != 1 \
                or info.location == "sparse_initializer" or not info.is_float:
            return None
        current = np.asarray(get_array(ctx.model, info), dtype=np.float64)
        reference = current
        if self.config.target == "original":
            original = next((w for w in find_weights(ctx.reference, min_elements=0) if w.name == info.name), None)
            if original is not None and tuple(original.shape) == tuple(info.shape):
                reference = np.asarray(get_array(ctx.reference, original), dtype=np.float64)
        return info, current, reference

    def ensures(self, ctx: Context, result: PassResult) -> None:
        """Each pruned weight reaches its target sparsity up to the mask's rounding (more where the
        refit left exact zeros), and its pruned entries are exactly 0; a failure is our bug."""
        infos = {w.name: w for w in ctx.weights(0)}
        for name, (target, rounding) in self._targets.items():
            keep = ctx.masks[name]
            sparsity = 1.0 - float(keep.mean())
            if sparsity < target - rounding - 1e-9:
                raise BugError(f"prune: {name} has sparsity {sparsity:.4f}, below its target {target:.4f}")
            values = get_array(ctx.model, infos[name])
            if np.any(values[~keep] != 0):
                raise BugError(f"prune: pruned entries of {name} are not exactly 0")


@dataclass(frozen=True)
class _LayerRefit:
    """One layer's compensation, shared by its channel groups: the layer's statistics, its current weight
    matrix and first mask, the bias refit jointly (info, current, reference) or None, and the solver."""

    fit: LayerFit
    w_cur: np.ndarray
    keep: np.ndarray
    bias: tuple[WeightInfo, np.ndarray, np.ndarray] | None
    method: str
    damping: float
    sparsity: float
    rounds: int

    def group(self, g: int, rows, h, cross, ref_gram) -> tuple[np.ndarray, np.ndarray, float, float, float]:
        """(refit weights, mask, plain-magnitude error, refit error, signal) of one channel group."""
        w_ref, w_now, keep_g = self.fit.reference[rows], self.w_cur[rows], self.keep[rows]
        quota = int(keep_g.sum())  # this group's share of the weight's one kept count (numerics.kept_count)
        if self.bias is not None:  # the bias joins the fit as one more, always kept, weight column
            grams = self.fit.grams
            h, cross, ref_gram = refine.with_bias(
                h, cross, ref_gram, grams.current_mean[g], None if grams.reference_mean is None else grams.reference_mean[g])
            w_ref, w_now = np.c_[w_ref, self.bias[2][rows]], np.c_[w_now, self.bias[1][rows]]
            keep_g = np.c_[keep_g, np.ones(len(rows), dtype=bool)]
        fitted, keep_g = self._solve(w_ref, keep_g, h, cross, quota)
        plain = np.where(keep_g, w_now, 0.0)
        e_plain, sig = refine.output_error(plain, w_ref, h, cross, ref_gram)
        e_new, _ = refine.output_error(fitted, w_ref, h, cross, ref_gram)
        if e_new > e_plain:  # greedy OBS can lose to plain magnitude on a fixed mask: keep the better
            fitted, e_new = plain, e_plain
        return fitted, keep_g, e_plain, e_new, sig

    def _solve(self, w_ref: np.ndarray, keep_g: np.ndarray, h, cross, quota: int) -> tuple[np.ndarray, np.ndarray]:
        """Refit one group toward its dense target: gradual lstsq rounds, or SparseGPT on a fixed or its own mask."""
        k, damping = self.w_cur.shape[1], self.damping

        def top(values, frac=None):  # magnitude mask over the weight columns; a bias column stays kept
            mask = top_mask(values[:, :k], quota) if frac is None else magnitude_mask(values[:, :k], frac)
            return mask if self.bias is None else np.c_[mask, np.ones(len(values), dtype=bool)]

        target = refine.dense_target(w_ref, h, cross, damping=damping)
        if self.method == "lstsq":
            for r in range(1, self.rounds):  # gradual: choose each mask from the previous refit
                step = 1.0 - (1.0 - self.sparsity) ** (r / self.rounds)
                fitted = refine.masked_lstsq(target, top(target if r == 1 else fitted, step), h, damping=damping)
                keep_g = top(fitted) if r == self.rounds - 1 else keep_g
            return refine.masked_lstsq(target, keep_g, h, damping=damping), keep_g
        if self.method == "sparsegpt-fixed":
            return refine.sparsegpt(target, h, keep=keep_g, damping=damping)
        return refine.sparsegpt(target, h, sparsity=self.sparsity, damping=damping)


def default_sparsity(cfg: PruneConfig, info: WeightInfo, layer: LinearLayer | None) -> float:
    """The role- and size-aware default: stem (conv of tiny fan-in), head (few outputs), else by role."""
    out_channels = layer.out_channels if layer is not None else (
        info.shape[info.channel_axis] if info.channel_axis is not None else None)
    head = out_channels is not None and out_channels <= cfg.head_channels
    if info.role in (Role.CONV, Role.CONV_TRANSPOSE):
        fan_in = int(np.prod(info.shape)) // max(out_channels or 1, 1)
        return cfg.sparsity_stem if fan_in <= cfg.stem_fan_in else cfg.sparsity_head if head else cfg.sparsity_conv
    if info.role.is_fully_connected:
        return cfg.sparsity_head if head else cfg.sparsity_fc
    return cfg.sparsity_other
