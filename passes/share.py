"""Weight sharing (Deep Compression stage 2): per-weight k-means codebooks.

Each float weight above the size threshold becomes k = 2**bits centroids and one small code
per entry, written in portable ONNX as codes (uint4 or uint8) -> Cast -> Gather(codebook),
which onnxruntime folds back into a dense tensor at load. Pruned entries (a mask from the
prune pass) stay exactly zero: they get the reserved code of centroid 0.0.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from tqdm.auto import tqdm

from onnxcompress.codebook import UINT4_MIN_OPSET, SharedWeight, portable_nodes
from onnxcompress.errors import ModelError, PreconditionError
from onnxcompress.layer_hessians import layer_hessians, share_weight
from onnxcompress.graphs import NameScope
from onnxcompress.kmeans import kmeans_1d
from onnxcompress.layerfit import in_layer_order, refine_shared
from onnxcompress.model import opset_of
from onnxcompress.parallel import map_ordered
from onnxcompress.pipeline import Context, Pass, PassResult
from onnxcompress.weights import Role, WeightInfo, get_array, replace_weight

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ShareConfig:
    bits_conv: int = 8  # Conv and ConvTranspose weights (the paper: conv layers need 8)
    bits_fc: int = 5  # Gemm and MatMul weights (the paper: 5 bits, down to 2)
    bits_other: int = 8  # everything else: embeddings, recurrent, Mul/Add constants
    init: Literal["linear", "density", "random"] = "linear"
    min_elements: int = 256  # smaller tensors are left alone
    exclude: list = field(default_factory=list)  # weight names to leave alone
    seed: int = 0
    # least-squares centroids on the calibration data (onnxcompress.refine), toward the original model's
    # layer outputs; only with data and for weights of a single Gemm/MatMul/Conv
    refine: bool = True
    refine_ridge: float = 1e-3  # pull toward the k-means centroids, relative to mean(diag G)
    reassign_rounds: int = 1  # move entries to the nearest refined centroid and refit, if it helps
    # which values share a codebook (onnxcompress.granular): one per tensor, one around per-channel
    # scales, one per group of channels, outliers kept exact, or "auto": the smallest candidate whose
    # layer-output SQNR (weight-space without data) reaches target_sqnr_db, else the best SQNR net of its bytes
    granularity: Literal["tensor", "channel", "group", "outlier", "auto"] = "auto"
    group_size: int = 8  # output channels per codebook ("group")
    outlier_fraction: float = 0.005  # share of a weight's entries stored exactly ("outlier", tried by "auto")
    target_sqnr_db: float = 36.0  # per-layer SQNR target of "auto": ~27 dB at the logits after ~8 layers add up

    def __post_init__(self):
        for name in ("bits_conv", "bits_fc", "bits_other"):
            if not 1 <= getattr(self, name) <= 16:
                raise ValueError(f"{name} must be between 1 and 16, not {getattr(self, name)}")
        if self.group_size < 1 or not 0.0 <= self.outlier_fraction < 0.5:
            raise ValueError("group_size must be >= 1 and outlier_fraction in [0, 0.5)")

    def bits_for(self, role: Role) -> int:
        if role in (Role.CONV, Role.CONV_TRANSPOSE):
            return self.bits_conv
        return self.bits_fc if role.is_fully_connected else self.bits_other


class SharePass(Pass):
    name = "share"
    Config = ShareConfig

    def requires(self, ctx: Context) -> None:
        if ctx.shared:
            raise PreconditionError("weights are already shared; run 'share' once per recipe")

    def call(self, ctx: Context) -> PassResult:
        cfg: ShareConfig = self.config
        opset = opset_of(ctx.model)
        scope = NameScope(ctx.model)
        candidates = [w for w in ctx.weights(cfg.min_elements) if self._eligible(ctx, w)]
        refining = cfg.refine and ctx.data is not None
        if refining:  # each layer's inputs are captured after the layers before it are shared
            candidates = in_layer_order(ctx.model, candidates)
        before = after = 0
        wanted_uint4 = []
        hessians = layer_hessians(ctx.model, ctx.data, candidates)
        total = sum(info.numel for info in candidates)
        bits_of = {w.name: int(ctx.plan.get(w.name, {}).get("bits", cfg.bits_for(w.role))) for w in candidates}
        # the fits are independent: in ctx.jobs worker processes (onnxcompress.parallel), same results
        choices = map_ordered(share_weight, (((get_array(ctx.model, w), w, bits_of[w.name]), dict(
            granularity=cfg.granularity, group_size=cfg.group_size, outlier_fraction=cfg.outlier_fraction,
            target_db=cfg.target_sqnr_db, hessians=hessians.get(w.name), mask=ctx.masks.get(w.name),
            init=cfg.init, seed=cfg.seed, model_elements=total, opset=opset)) for w in candidates), jobs=ctx.jobs,
            work=total)
        for info, choice in tqdm(zip(candidates, choices), total=len(candidates), desc="share", unit="weight",
                                 disable=not ctx.progress, leave=False):
            bits = bits_of[info.name]
            shared = choice.chosen.shared
            if bits <= 4 and opset < UINT4_MIN_OPSET:
                wanted_uint4.append(info.name)
            if refining:
                shared, refined = refine_shared(ctx, info, shared, ridge=cfg.refine_ridge,
                                                reassign_rounds=cfg.reassign_rounds)
                ctx.record(info.name, self.name, f"centroids: {refined['refine']}", details=refined)
            if shared.payload_bytes() >= info.nbytes:
                log.debug("share: %s left alone: codebook form is not smaller", info.name)
                ctx.record(info.name, self.name, "skipped: codebook form not smaller")
                continue
            nodes, inits = portable_nodes(shared, scope, opset, self.name)
            replace_weight(ctx.model, info, nodes, inits)
            ctx.shared[info.name] = shared
            before, after = before + info.nbytes, after + shared.payload_bytes()
            ctx.record(info.name, self.name, f"shared {bits} bits, {choice.chosen.option.label}", info.nbytes,
                       shared.payload_bytes(), {"bits": bits, "centroids": int(shared.codebook.size),
                                                "role": info.role.value, **choice.details()})
        if wanted_uint4:
            ctx.note(f"share: {len(wanted_uint4)} weights use <= 4 bits but the model's opset {opset} is below "
                     f"{UINT4_MIN_OPSET}, so their codes are stored as uint8 (the opset was left unchanged)")
        log.info("share: %d weights, %d -> %d bytes", len(ctx.shared), before, after)
        return PassResult(bool(ctx.shared), {"weights": len(ctx.shared), "bytes_before": before, "bytes_after": after})

    def _eligible(self, ctx: Context, info: WeightInfo) -> bool:
        if info.skip is not None:
            log.debug("share: %s skipped: %s", info.name, info.skip)
            return False
        if info.name in self.config.exclude:
            log.debug("share: %s skipped: excluded by the recipe", info.name)
            return False
        return True

    def ensures(self, ctx: Context, result: PassResult) -> None:
        for shared in ctx.shared.values():
            if shared.codes.size and int(shared.codes.max()) >= 2 ** shared.bits:
                raise AssertionError(f"share: codes of {shared.name} do not fit {shared.bits} bits")
            if shared.decode().shape != shared.shape:
                raise AssertionError(f"share: {shared.name} decodes to the wrong shape")


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
