"""Weight sharing (Deep Compression stage 2): per-weight k-means codebooks.

Each float weight above the size threshold becomes k = 2**bits centroids and one small code
per entry, written in portable ONNX as bit-packed codes (dense, or relative indices + kept codes
when smaller: onnxcompress.formats.codechain) -> integer unpacking ops -> Gather(codebook), which
onnxruntime folds back into a dense tensor at load. Pruned entries (a mask from the
prune pass) stay exactly zero: they get the reserved code of centroid 0.0. A weight whose portable
form would not be smaller than its float initializer stays float.

With granularity "auto" and data, every option (per-tensor, per-channel scales, groups, outliers,
importance-weighted, GPTQ codes) is judged where its error lands at the model's outputs, through two
gains per weight measured by running the model with only that weight perturbed
(onnxcompress.runtime.sensitivity), and the options of all weights are chosen together there
(joint.choose_jointly). Biases are coded first, measured in their layer's output, and the layer's
weight is coded so as to cancel what it can of the bias's coding error (onnxcompress.numerics.bias_error); a
bias that stays float takes up its weight's mean output error instead (bias correction).
"""
from __future__ import annotations

import dataclasses
import logging
from functools import partial
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
from tqdm.auto import tqdm

from onnxcompress.errors import ModelError, PreconditionError
from onnxcompress.execution.parallel import map_ordered
from onnxcompress.fitting import granular
from onnxcompress.fitting.granular import (Choice, DB_PER_BIT, fit, Fitting, from_matrix,
                                          gptq_affordable, Option, to_matrix)
from onnxcompress.fitting.joint import choose_jointly
from onnxcompress.fitting.layerfit import in_layer_order, original_rows, refine_shared
from onnxcompress.fitting.sharing import (bias_links, float_size, layer_hessians, share_weight, ShareSettings,
                                          WeightEvidence)
from onnxcompress.formats.codebook import portable_nodes, SharedWeight
from onnxcompress.formats.codechain import MAX_BITS, PACK_MIN_OPSET
from onnxcompress.graph.edit import NameScope
from onnxcompress.graph.fold import fold_batch_norms
from onnxcompress.graph.model import opset_of
from onnxcompress.graph.weights import get_array, replace_weight, Role, set_array, weight_source, WeightInfo
from onnxcompress.pipeline.artifacts import Artifact
from onnxcompress.pipeline.manager import Context, Pass, PassResult
from onnxcompress.runtime.sensitivity import measure_gains, OutputGains, Probe


log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ShareConfig:
    bits_conv: int = 8  # Conv and ConvTranspose weights (the paper: conv layers need 8)
    bits_fc: int = 5  # Gemm and MatMul weights (the paper: 5 bits, down to 2)
    bits_other: int = 8  # everything else: embeddings, recurrent, Mul/Add constants
    init: Literal["linear", "density", "random"] = "linear"  # k-means start: evenly spaced, at quantiles, or random
    min_elements: int = 256  # smaller tensors are left alone
    exclude: list = field(default_factory=list)  # weight names to leave alone
    seed: int = 0  # random generator seed (init "random")
    # least-squares centroids on the calibration data (onnxcompress.numerics.refine), toward the original model's
    # layer outputs; only with data and for weights of a single Gemm/MatMul/Conv
    refine: bool = True
    refine_ridge: float = 1e-3  # pull toward the k-means centroids, relative to mean(diag G)
    reassign_rounds: int = 1  # move entries to the nearest refined centroid and refit, if it helps
    # which values share a codebook (onnxcompress.fitting.granular): one per tensor, one around per-channel
    # scales, one per group of channels, outliers kept exact, or "auto": the smallest candidate whose
    # layer-output SQNR (weight-space without data) reaches target_sqnr_db, else the best SQNR net of its bytes
    granularity: Literal["tensor", "channel", "group", "outlier", "auto"] = "auto"
    group_size: int = 8  # output channels per codebook ("group")
    outlier_fraction: float = 0.005  # share of a weight's entries stored exactly ("outlier", tried by "auto")
    target_sqnr_db: float = 36.0  # per-layer SQNR target of "auto": ~27 dB at the logits after ~8 layers add up
    # "auto" with data: judge each layer's error at the model's outputs, through two gains per weight
    # measured by running this many calibration samples with only that weight perturbed
    # (onnxcompress.runtime.sensitivity); 0: judge it in the layer's output
    gain_samples: int = 32
    # fold Conv -> BatchNormalization pairs into the Conv first (W' = k W per output channel), as
    # exporters do: the BN's four vectors and node go, and per-channel scales absorb k exactly.
    # "auto": when the granularity can give each channel its own scale (auto, channel, group); one
    # codebook per tensor ("tensor", "outlier") would have to span the k spread instead
    fold_batch_norm: Literal["auto", "always", "never"] = "auto"

    def __post_init__(self):
        for name in ("bits_conv", "bits_fc", "bits_other"):
            if not 1 <= getattr(self, name) <= 16:
                raise ValueError(f"{name} must be between 1 and 16, not {getattr(self, name)}")
        if self.group_size < 1 or not 0.0 <= self.outlier_fraction < 0.5:
            raise ValueError("group_size must be >= 1 and outlier_fraction in [0, 0.5)")

    def settings(self, model_elements: int, opset: int) -> ShareSettings:
        """How share_weight codes every weight of a model of `model_elements` elements written at `opset`."""
        return ShareSettings(granularity=self.granularity, group_size=self.group_size,
                             outlier_fraction=self.outlier_fraction, target_db=self.target_sqnr_db, init=self.init,
                             seed=self.seed, model_elements=model_elements, opset=opset)

    def bits_for(self, role: Role) -> int:
        if role in (Role.CONV, Role.CONV_TRANSPOSE):
            return self.bits_conv
        return self.bits_fc if role.is_fully_connected else self.bits_other


class SharePass(Pass):
    name = "share"
    Config = ShareConfig
    produces = frozenset({Artifact.SHARED})

    def requires(self, ctx: Context) -> None:
        if ctx.shared:
            raise PreconditionError("weights are already shared; run 'share' once per recipe")

    def call(self, ctx: Context) -> PassResult:
        cfg: ShareConfig = self.config
        opset = opset_of(ctx.model)
        folded = self._fold(ctx, cfg)
        scope = NameScope(ctx.model)
        candidates = [w for w in ctx.weights(cfg.min_elements) if self._eligible(ctx, w)]
        refining = cfg.refine and ctx.data is not None
        if refining:  # each layer's inputs are captured after the layers before it are shared
            candidates = in_layer_order(ctx.model, candidates)
        before = after = 0
        unpacked = []
        hessians = layer_hessians(ctx.model, ctx.data, candidates, collector=ctx.statistics)
        _note_no_gptq(ctx, hessians)
        bits_of = self._bits(ctx, candidates)
        # a bias is coded first, measured by the error it leaves in its layer's output, and its layer's
        # weight then cancels what it can of that error (onnxcompress.numerics.bias_error)
        links = bias_links(ctx.model, candidates, hessians, lambda w: get_array(ctx.model, w), ctx.masks) \
            if cfg.granularity == "auto" else {}
        gains, probe_fits = self._output_gains(ctx, candidates, hessians, bits_of)
        _add_bias_gains(gains, links)
        biases = [w for w in candidates if w.name in links]
        by_name = {w.name: w for w in candidates}
        settings = cfg.settings(sum(info.numel for info in candidates), opset)
        bias_choices = dict(zip([w.name for w in biases], self._fit(ctx, biases, bits_of, settings,
                                                                    _Known(hessians, links=links, gains=gains))))
        absorb, absorbed_from, corrected_by = self._bias_effects(ctx, biases, bias_choices, links, hessians, by_name)
        # the other weights' choices are consumed as they come (each holds every candidate it measured)
        known = _Known(hessians, absorb=absorb, gains=gains, mean_free=frozenset(corrected_by), fitted=probe_fits)
        others = [w for w in candidates if w.name not in links]
        rest = self._fit(ctx, others, bits_of, settings, known)
        if gains:  # choices judged at the model's outputs are made together there
            rest = iter(self._choose_jointly(ctx, others, rest, list(bias_choices.values()), bits_of, settings, known))
        # the original's layer inputs for every refinement, in one run over the data (the first refinement's)
        reference_rows = original_rows(ctx, candidates) if refining else None
        for info in tqdm(candidates, desc="share", unit="weight", disable=not ctx.progress, leave=False):
            choice, bits = bias_choices[info.name] if info.name in links else next(rest), bits_of[info.name]
            shared = choice.chosen.shared
            if _stays_float(info, choice.chosen):
                self._keep(ctx, info, choice, absorbed_from)
                continue
            if bits < MAX_BITS and opset < PACK_MIN_OPSET:
                unpacked.append(info.name)
            if refining:
                shared = self._refined(ctx, cfg, info, shared, cancels=choice.target is not None,
                                       gptq=choice.chosen.option.gptq, reference_rows=reference_rows)
            if info.name in corrected_by:
                self._correct_bias(ctx, info, shared, by_name[corrected_by[info.name]], links[corrected_by[info.name]],
                                   hessians[info.name])
            self._write(ctx, info, shared, scope, opset)
            before, after = before + info.nbytes, after + shared.payload_bytes(opset)
            self._record(ctx, info, choice, shared, bits, opset, absorbed_from)
        _note_unpacked(ctx, unpacked, opset)
        log.info("share: %d weights, %d -> %d bytes", len(ctx.shared), before, after)
        return PassResult(bool(ctx.shared) or bool(folded), {"weights": len(ctx.shared), "bytes_before": before,
                                                             "bytes_after": after, "folded_batch_norms": folded})

    def _bits(self, ctx: Context, candidates: list[WeightInfo]) -> dict[str, int]:
        """Each weight's bit width: the search plan's where it has one, else the config's for its role."""
        planned = ctx.plan.bits if ctx.plan is not None else lambda name: None
        return {w.name: int(b if (b := planned(w.name)) is not None else self.config.bits_for(w.role))
                for w in candidates}

    def _refined(self, ctx: Context, cfg: ShareConfig, info: WeightInfo, shared: SharedWeight, *, cancels: bool,
                 gptq: bool = False, reference_rows=None) -> SharedWeight:
        """Least-squares centroids on the calibration data, unless the weight cancels its bias's coding
        error (the refit fits the original layer output, which would not see that error). GPTQ's codes get
        no nearest-centroid round: it undoes their error feedback (never taken, a code Gram each)."""
        if cancels:
            ctx.record(info.name, self.name, "centroids: not refined (the weight cancels its bias's coding "
                       "error, which the least-squares refit would not see)")
            return shared
        shared, refined = refine_shared(ctx, info, shared, ridge=cfg.refine_ridge,
                                        reassign_rounds=0 if gptq else cfg.reassign_rounds,
                                        reference_rows=reference_rows)
        ctx.record(info.name, self.name, f"centroids: {refined['refine']}", details=refined)
        return shared

    def _write(self, ctx: Context, info: WeightInfo, shared: SharedWeight, scope: NameScope, opset: int) -> None:
        """The weight becomes its portable codebook chain; ctx.shared records the coding."""
        nodes, inits = portable_nodes(shared, scope, opset, self.name)
        replace_weight(ctx.model, info, nodes, inits)
        ctx.shared[info.name] = shared

    def _record(self, ctx: Context, info: WeightInfo, choice, shared: SharedWeight, bits: int, opset: int,
                absorbed_from: dict[str, str]) -> None:
        details = {"bits": bits, "centroids": int(shared.codebook.size), "role": info.role.value, **choice.details()}
        if choice.target is not None:
            details["cancels_coding_error_of"] = absorbed_from[info.name]
        ctx.record(info.name, self.name, f"shared {bits} bits, {choice.chosen.option.label}", info.nbytes,
                   shared.payload_bytes(opset), details)

    @staticmethod
    def _fold(ctx: Context, cfg: ShareConfig) -> list:
        """Fold Conv -> BatchNormalization pairs first where per-channel scales can absorb them (the
        fold_batch_norm option); the layer fits then aim at the folded original's layer outputs."""
        fold = cfg.fold_batch_norm == "always" or (cfg.fold_batch_norm == "auto"
                                                  and cfg.granularity in ("auto", "channel", "group"))
        folded = fold_batch_norms(ctx.model) if fold else []
        if folded:
            reference = onnx.ModelProto()
            reference.CopyFrom(ctx.reference)
            fold_batch_norms(reference)
            ctx.rewritten_original = reference
            ctx.note(f"share: folded {len(folded)} BatchNormalization node(s) into the convolution before each")
        return folded

    @staticmethod
    def _bias_effects(ctx: Context, biases, bias_choices, links, hessians, by_name):
        """What the biases' choices ask of their layers' weights: `absorb` (weight -> its bias's coding error
        per output row, to cancel), `absorbed_from` (weight -> that bias) and `corrected_by` (weight -> the
        float bias that takes up its mean output error: bias correction)."""
        absorb, absorbed_from = {}, {}
        for info in biases:
            chosen, absorber = bias_choices[info.name].chosen, links[info.name].absorber
            if not _stays_float(info, chosen) and absorber is not None:
                error = get_array(ctx.model, info).astype(np.float64) - chosen.shared.decode()
                absorb[absorber], absorbed_from[absorber] = links[info.name].row_error(error), info.name
        corrected_by = {link.weights[0]: bias for bias, link in links.items() if len(link.weights) == 1
                        and _stays_float(by_name[bias], bias_choices[bias].chosen)
                        and hessians[link.weights[0]].means is not None}
        return absorb, absorbed_from, corrected_by

    def _output_gains(self, ctx: Context, candidates: list[WeightInfo], hessians, bits_of
                      ) -> tuple[dict[str, OutputGains], dict[str, dict[Option, SharedWeight]]]:
        """How each weight's coding error reaches the model's outputs, probed with the error of its
        per-tensor GPTQ coding (onnxcompress.runtime.sensitivity); only "auto" chooses by it. Also returns
        those codings, one of the candidates the weight will be measured with."""
        cfg: ShareConfig = self.config
        probed = [w for w in candidates if w.name in hessians]
        if cfg.granularity != "auto" or cfg.gain_samples <= 0 or ctx.data is None or not probed:
            return {}, {}
        probes, fits = {}, {}
        options = {w.name: Option("tensor", weighted=True, gptq=gptq_affordable(hessians[w.name])) for w in probed}
        tasks = (((weight_source(ctx.model, w), bits_of[w.name], options[w.name],
                   Fitting(w.name, w.channel_axis, hessians=hessians[w.name], mask=ctx.masks.get(w.name),
                           init=cfg.init, seed=cfg.seed)), {"importance": hessians[w.name].importance()}) for w in probed)
        # the probes' fits on the executor, as the choice's (one BLAS thread each, side by side with --jobs N)
        for info, coded in zip(probed, map_ordered(fit, tasks, jobs=ctx.jobs, work=sum(w.numel for w in probed))):
            array, h, option = get_array(ctx.model, info), hessians[info.name], options[info.name]
            fits[info.name] = {option: coded}
            matrix = to_matrix(np.asarray(array, np.float64), info.channel_axis)
            probes[info.name] = Probe(matrix, matrix - to_matrix(coded.decode().astype(np.float64), info.channel_axis),
                                      h, partial(from_matrix, shape=tuple(array.shape), channel_axis=info.channel_axis))
        try:
            return measure_gains(ctx.model, ctx.data, probes, samples=cfg.gain_samples, progress=ctx.progress,
                                 collector=ctx.statistics), fits
        except ModelError as e:  # the choice still works, per layer, in each layer's output
            ctx.note(f"share: could not run the model to measure how each layer's error reaches its outputs ({e}); "
                     "options are judged in each layer's output instead")
            return {}, fits

    def _choose_jointly(self, ctx: Context, infos: list[WeightInfo], choices, decided: list[Choice], bits_of,
                        settings: ShareSettings, known: _Known) -> list[Choice]:
        """The weights' choices, those measured at the model's outputs re-picked together
        (joint.choose_jointly). While the others are measured, a weight keeps the fits of its
        candidates that no other candidate beats on both bytes and SQNR (the only ones a joint pick can
        take: a few of its dozen); a pick without its fit is fitted again (the same fit: seeded)."""
        made = []
        for choice in choices:
            for candidate in choice.candidates:
                if candidate is not choice.chosen and _dominated(candidate, choice.candidates):
                    candidate.shared = None
            made.append(choice)
        joint = {info.name: c for info, c in zip(infos, made) if c.space == "model output" and len(c.candidates) > 1}
        if not joint:
            return made
        together = {id(c) for c in joint.values()}
        fixed = [c.chosen for c in decided + made if c.space == "model output" and id(c) not in together]
        by_name = {info.name: info for info in infos}
        while True:  # a predicted candidate picked is fitted and measured, and the pick made again with it
            picked = choose_jointly(joint, per_byte=DB_PER_BIT * 8 / max(settings.model_elements, 1), fixed=fixed)
            refit = {name: pick.option for name, pick in picked.items()
                     if pick.shared is None and pick.option.kind != "float"}
            refitted = dict(zip(refit, self._fit(ctx, [by_name[n] for n in refit], bits_of, settings,
                                                 dataclasses.replace(known, only=refit))))
            again = False
            for name, got in refitted.items():
                pick, measured = picked[name], got.chosen
                pick.shared = measured.shared
                if pick.predicted:
                    pick.bytes, pick.sqnr_db, pick.predicted, again = measured.bytes, measured.sqnr_db, False, True
            if not again:
                break
        reason = (f"chosen with the {len(joint)} weights measured at the model's outputs for their best SQNR there "
                  f"together, net of their bytes at {DB_PER_BIT} dB per extra bit per weight; no gain beyond each "
                  f"layer at {self.config.target_sqnr_db:g} dB")
        for name, pick in picked.items():
            choice = joint[name]
            choice.chosen, choice.reason = pick, reason
        return made

    def _fit(self, ctx: Context, infos: list[WeightInfo], bits_of, settings: ShareSettings, known: _Known):
        """share_weight for each weight, in order; independent fits on the ctx.jobs executor (same results), each
        reading its own weight where it runs when the weight is in an external-data file."""
        return map_ordered(share_weight, (((weight_source(ctx.model, w), w, bits_of[w.name], settings,
                                            known.of(w.name, ctx.masks.get(w.name))), {}) for w in infos),
                           jobs=ctx.jobs, work=sum(w.numel for w in infos))

    def _correct_bias(self, ctx: Context, info: WeightInfo, shared, bias: WeightInfo, link, hessians) -> None:
        """Add the coded weight's mean output error D E[x] to its layer's float bias (before the
        weight is rewritten: D is against the weight as it stands)."""
        error = np.asarray(get_array(ctx.model, info), np.float64) - shared.decode().astype(np.float64)
        shift = hessians.mean_shift(to_matrix(error, info.channel_axis))
        values = get_array(ctx.model, bias)
        set_array(ctx.model, bias, (values.astype(np.float64) + shift[link.rows].reshape(values.shape))
                  .astype(values.dtype))
        ctx.record(bias.name, self.name, f"bias corrected: takes up the mean output error of {info.name}",
                   details={"bias_correction": float(np.sqrt(np.mean(np.square(shift))))})

    def _keep(self, ctx: Context, info: WeightInfo, choice, absorbed_from: dict) -> None:
        """Leave the weight a float tensor: chosen so, or its codebook form is not smaller."""
        details = choice.details()
        if choice.chosen.shared is None:
            action = f"kept float: {choice.reason}"
        else:
            action = "skipped: codebook form not smaller"
            details.update(granularity="float", reason=f"{choice.chosen.option.label}, the option chosen, is not "
                           "smaller in the portable form than the float initializer")
        if choice.target is not None:  # the float weight still cancels its bias's coding error
            set_array(ctx.model, info, choice.target)
            action += f"; set to W + e v^T, cancelling the coding error of {absorbed_from[info.name]}"
        log.debug("share: %s %s", info.name, action)
        ctx.record(info.name, self.name, action, details=details)

    def _eligible(self, ctx: Context, info: WeightInfo) -> bool:
        if info.skip is not None:
            log.debug("share: %s skipped: %s", info.name, info.skip)
            return False
        if info.name in self.config.exclude:
            log.debug("share: %s skipped: excluded by the recipe", info.name)
            return False
        if info.role is Role.OTHER and not np.all(np.isfinite(array := get_array(ctx.model, info))) \
                and not np.any(np.isnan(array)):  # an attention mask's -inf: no codebook holds it
            ctx.record(info.name, self.name, "left as it is: holds Inf (a mask constant, say)")
            return False
        return True

    def ensures(self, ctx: Context, result: PassResult) -> None:
        for shared in ctx.shared.values():
            if shared.codes.size and int(shared.codes.max()) >= 2 ** shared.bits:
                raise AssertionError(f"share: codes of {shared.name} do not fit {shared.bits} bits")
            if not shared.decodes_to_shape():
                raise AssertionError(f"share: {shared.name} decodes to the wrong shape")


@dataclass(frozen=True, eq=False)
class _Known:
    """What the pass knows of its weights so far, by weight name: each weight's WeightEvidence is read here."""

    hessians: dict
    links: dict = field(default_factory=dict)
    absorb: dict = field(default_factory=dict)
    gains: dict = field(default_factory=dict)
    mean_free: frozenset = frozenset()
    only: dict = field(default_factory=dict)
    fitted: dict = field(default_factory=dict)

    def of(self, name: str, mask) -> WeightEvidence:
        return WeightEvidence(hessians=self.hessians.get(name), mask=mask, link=self.links.get(name),
                              absorb=self.absorb.get(name), gains=self.gains.get(name), mean_free=name in self.mean_free,
                              only=self.only.get(name), fitted=self.fitted.get(name))


def _note_unpacked(ctx: Context, unpacked: list[str], opset: int) -> None:
    if unpacked:
        ctx.note(f"share: {len(unpacked)} weights use fewer than 8 bits but the model's opset {opset} is below "
                 f"{PACK_MIN_OPSET}, so their codes are stored one a byte, not bit-packed (the opset was left "
                 "unchanged)")


def _note_no_gptq(ctx: Context, hessians: dict) -> None:
    wide = {name: max(m.shape[0] for m in h.hessians) for name, h in hessians.items() if not gptq_affordable(h)}
    if wide:
        ctx.note(f"share: {len(wide)} weight(s) with input rows of {min(wide.values())} entries or more, over "
                 f"{granular.GPTQ_MAX_ROW} ({', '.join(list(wide)[:3])}"
                 f"{', ...' if len(wide) > 3 else ''}) get no GPTQ candidates (each needs a K x K inverse and refit): "
                 "importance-weighted k-means ones only")


def _add_bias_gains(gains: dict[str, OutputGains], links: dict) -> None:
    """A bias's error lands where its layer's weights' does: it takes their largest gains, when all are measured."""
    for bias, link in links.items():
        if link.weights and all(w in gains for w in link.weights):
            gains[bias] = OutputGains(max(gains[w].rest for w in link.weights),
                                      max(gains[w].mean for w in link.weights))


def _dominated(candidate, candidates) -> bool:
    """Another candidate is no larger and no worse, and better on one of the two."""
    return any(c is not candidate and c.bytes <= candidate.bytes and c.sqnr_db >= candidate.sqnr_db
               and (c.bytes < candidate.bytes or c.sqnr_db > candidate.sqnr_db) for c in candidates)


def _stays_float(info: WeightInfo, chosen) -> bool:
    """Chosen so, or its portable form (nodes and initializers) is no smaller than the float initializer."""
    return chosen.shared is None or chosen.bytes >= float_size(info)
