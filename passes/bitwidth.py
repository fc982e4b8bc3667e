"""Bit-width search: per-layer codebook bits and sparsity chosen from measured sensitivity.

1. Sensitivity: for each weight and each candidate (sparsity s, bits b), the weight is
   magnitude-pruned to s, k-means coded at b bits, and the model run on the evaluation data
   with only that weight changed. The candidate weights are turned into inputs of ONE
   evaluation session, so each candidate is a different feed, not a new session.
2. Allocation: a multiple-choice knapsack (onnxcompress.numerics.allocate) picks one candidate per weight,
   minimizing the stored bytes under the fidelity budget (or the loss under a size budget),
   treating per-layer losses as additive.
3. Verification: losses do not add up exactly, so the chosen set is applied jointly and measured
   again; the allocation is re-solved with scaled budgets and the smallest configuration whose
   measured loss meets the budget wins. Every evaluated configuration is a point of the reported
   size/fidelity front.

The plan (a typed SearchPlan) goes to ctx.plan for the prune and share passes, which
compensate and refine on calibration data, so the final model usually does better than the
plain pruning and clustering simulated here. Its fidelity is measured again at the end.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from tqdm.auto import tqdm

from onnxcompress.errors import OnnxCompressError, PreconditionError, RecipeError
from onnxcompress.graph.weights import WeightInfo
from onnxcompress.numerics import allocate
from onnxcompress.passes import bitladder, bitpredict
from onnxcompress.passes.bitprune import candidate_weights, predicted_candidate, Pruner
from onnxcompress.passes.bitsearch import (Candidate, Evaluator, failed, floor_disagreement, make_score, predicted_bytes,
                                          stored_bytes)
from onnxcompress.pipeline.artifacts import Artifact, Budget, LayerChoice, SearchPlan, Verified
from onnxcompress.pipeline.manager import Context, Pass, PassResult
from onnxcompress.runtime.tasks import is_builtin, output_producers

log = logging.getLogger(__name__)
SIZE_STEPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5)
# budget scales the allocation is solved at, each verified jointly: summed single-layer costs overstate the joint
# loss (flips counted alone overlap, noise floors add up), so budgets up to 32x are tried
SCALES = (32.0, 16.0, 8.0, 5.6, 4.0, 2.8, 2.0, 1.4, 1.0, 0.7, 0.5, 0.35, 0.25, 0.12, 0.05, 0.0)
COST_LIMIT = 8.0  # a single candidate costing over this many budgets is not allocated (nor narrower widths)
# CPU s of runs (candidates x a whole-model run) past which the sweep predicts (bitpredict); below, coding every candidate
# costs more than the runs saved (mtcnn_onet, lac: 518 x 0.17, 504 x 0.14 CPU s; 124, 224 CPU s against 88, 119)
SWEEP_SECONDS = 300.0
# samples the predicted sweep measures single weights on, at most half of them (the joint checks: all): orinet's
# 128 pages of 1.1 CPU s, the MiniLM-like model's 64 sentences of 1.7 CPU s
SWEEP_SAMPLES = 64


@dataclass(kw_only=True)
class BitWidthConfig:
    bits: list = field(default_factory=lambda: [2, 3, 4, 5, 6, 7, 8])  # codebook widths the search may choose
    # sparsities the search may choose per weight
    sparsities: list = field(default_factory=lambda: [0.0, 0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97])
    max_drop: float | None = None  # points of accuracy (with labels; estimated without, see `unlabelled`)
    min_sqnr: float | None = None  # dB, over all outputs
    target_ratio: float | None = None  # whole-file ratio to reach with the least loss
    metric: str | None = None  # "module:function"(outputs: dict, data) -> number, higher is better
    # which data the sweep measures on. "auto": a max_drop budget counts accuracy points, defined
    # on labelled data, so it sweeps on the evaluation data when that has labels; other budgets
    # sweep on the calibration data and leave the evaluation data to the end-to-end check alone
    sweep_data: Literal["auto", "calibration", "evaluation"] = "auto"
    max_samples: int = 1000  # samples the sweep and the checks run on
    # which candidates are run through the model: "measured" all (but those past the cost limit); "predicted":
    # output noise predicted from each candidate's layer error, measured only where the allocations land
    # (passes/bitpredict.py); "auto": predicted where measuring all would take over SWEEP_SECONDS
    sweep: Literal["auto", "measured", "predicted"] = "auto"
    # what a max_drop budget bounds on data without labels: "expected" accuracy loss (the float
    # model's own class probabilities standing in for the labels: a changed decision costs
    # p(old class) - p(new class)), or "agreement" (every changed top-1 decision a whole sample)
    unlabelled: Literal["expected", "agreement"] = "expected"
    # no data at all: "error"; or "skip" whenever no calibration data is given (--data): the passes
    # after it then keep their fixed defaults, with a note (they could not refit without it anyway)
    without_data: Literal["error", "skip"] = "error"
    min_elements: int = 256  # smaller tensors are left alone
    seed: int = 0  # k-means seed of the simulated candidates

    def __post_init__(self):
        budgets = [b for b in (self.max_drop, self.min_sqnr, self.target_ratio) if b is not None]
        if len(budgets) > 1:
            raise ValueError("give one budget: max_drop, min_sqnr or target_ratio")
        if not budgets:
            self.max_drop = 0.5
        if any(not 1 <= int(b) <= 8 for b in self.bits) or not self.bits:
            raise ValueError(f"bits must be a list of widths from 1 to 8, not {self.bits}")
        if any(not 0.0 <= s < 1.0 for s in self.sparsities) or not self.sparsities:
            raise ValueError(f"sparsities must be fractions in [0, 1), not {self.sparsities}")
        if self.target_ratio is not None and self.target_ratio <= 1:
            raise ValueError(f"target_ratio must be above 1, not {self.target_ratio}")
        if self.max_drop is not None and not 0 <= self.max_drop < math.inf:  # NaN fails too
            raise ValueError(f"max_drop must be a finite number of points >= 0, not {self.max_drop}")
        if self.min_sqnr is not None and not math.isfinite(self.min_sqnr):
            raise ValueError(f"min_sqnr must be a finite number of dB, not {self.min_sqnr}")

    @property
    def budget(self) -> Budget:
        """What the result must meet, as the search plan carries it."""
        return Budget(max_drop=self.max_drop, min_sqnr=self.min_sqnr, target_ratio=self.target_ratio,
                      metric=self.metric, unlabelled=self.unlabelled)

    @property
    def loss_budget(self) -> float | None:
        """The budget in the units of a candidate's cost: points (max_drop) or the noise-to-signal
        ratio (min_sqnr); None for a size budget (target_ratio)."""
        if self.target_ratio is not None:
            return None
        return self.max_drop if self.min_sqnr is None else 10 ** (-self.min_sqnr / 10)


class BitWidthPass(Pass):
    name = "bitwidth"
    Config = BitWidthConfig
    produces = frozenset({Artifact.PLAN})
    measures = True

    def requires(self, ctx: Context) -> None:
        if (ctx.eval_data or ctx.data) is None and self.config.without_data == "error":
            raise PreconditionError("the bit-width search needs data to measure sensitivity: give --data or --eval-data")

    def call(self, ctx: Context) -> PassResult:
        cfg: BitWidthConfig = self.config
        if self.config.without_data == "skip" and ctx.data is None:
            ctx.note("bitwidth: no calibration data (--data), so no per-layer search; the fixed per-role defaults "
                     "of prune and share were used (give --data for settings measured on your model)")
            ctx.plan = SearchPlan(cfg.budget, searched=False)
            return PassResult(False, {"skipped": "no data"})
        labelled = ctx.eval_data is not None and ctx.eval_data.labels is not None
        on_eval = cfg.sweep_data == "evaluation" or (cfg.sweep_data == "auto" and cfg.max_drop is not None
                                                     and cfg.metric is None and labelled)
        preferred = (ctx.eval_data, ctx.data) if on_eval else (ctx.data, ctx.eval_data)
        source = next(d for d in preferred if d is not None)
        data = source.limit(cfg.max_samples)
        start = time.perf_counter()
        weights = [w for w in ctx.weights(cfg.min_elements) if w.skip is None]
        if not weights:
            ctx.note("bitwidth: no weight large enough to search over")
            ctx.plan = SearchPlan(cfg.budget)
            return PassResult(False, {"weights": 0})
        score = make_score(cfg.budget, data.labels is not None, output_producers(ctx.model))
        evaluator = Evaluator(ctx.model, weights, data, score, ctx.statistics)
        # score out of fold when the refits learn from the very samples the search scores on
        self._pruner = Pruner(ctx.model, ctx.data, weights, crossfit=source is ctx.data, collector=ctx.statistics,
                              sparsities=cfg.sparsities)
        table = self._sensitivities(ctx, evaluator, weights)
        measured = [[c for c in table[w.name] if c.error is None] for w in weights]
        options = [[allocate.Option(c.size, c.cost, {"bits": c.bits, "sparsity": c.sparsity}) for c in cands]
                   for cands in measured]
        # the same candidates priced by their output noise, which adds up across weights where counted changes do not
        noise = [[allocate.Option(c.size, c.task_nsr, {"bits": c.bits, "sparsity": c.sparsity}) for c in cands]
                 for cands in measured]
        if any(not o for o in options):
            raise PreconditionError("bitwidth: every candidate of some weight failed; see the log")
        fixed = ctx.original.ByteSize() - sum(w.nbytes for w in weights)
        evaluated, chosen = self._search(cfg, evaluator, weights, options, fixed, noise)
        ctx.plan = SearchPlan(cfg.budget, {w.name: LayerChoice(**layer[j].settings)
                                           for w, layer, j in zip(weights, options, chosen)}, evaluated)
        for w, layer, j in zip(weights, options, chosen):
            ctx.record(w.name, self.name, "planned {bits} bits, sparsity {sparsity:.2f}".format(**layer[j].settings),
                       w.nbytes, int(layer[j].size), dict(layer[j].settings))
        summary = {
            "budget": {"max_drop": cfg.max_drop, "min_sqnr": cfg.min_sqnr, "target_ratio": cfg.target_ratio},
            "form": ctx.form.value, "samples": len(data), "original_bytes": ctx.original.ByteSize(),
            "choices": {w.name: dict(layer[j].settings) for w, layer, j in zip(weights, options, chosen)},
            "sensitivity": {name: [c.__dict__ for c in cands] for name, cands in table.items()},
            "candidates": {"measured": sum(c.error is None for cands in table.values() for c in cands),
                           "predicted": self._predicted_only, "verified": len(evaluated)},
            "evaluated": [dataclasses.asdict(v) for v in evaluated],
            "front": [dataclasses.asdict(evaluated[i])
                      for i in allocate.pareto_front([(v.bytes, v.check) for v in evaluated])],
            "seconds": time.perf_counter() - start}
        self._pruner = None  # its layer statistics and fits: not held through the passes after the search
        return PassResult(True, summary)

    def _sensitivities(self, ctx: Context, evaluator: Evaluator, weights: list[WeightInfo]) -> dict:
        cfg = self.config
        # widest width first at each sparsity: once a candidate costs more than any allocation can take, the
        # narrower widths at that sparsity and above cost more still (fewer bits, more pruning) and are skipped
        grid = [(s, b) for s in sorted(cfg.sparsities) for b in sorted(cfg.bits, reverse=True)]
        # the prune pass leaves vectors (biases, scales) dense: plan no sparsity for them
        grids = {w.name: grid if len(w.shape) >= 2 else [(s, b) for s, b in grid if s == 0.0] for w in weights}
        self._counting, self._predicted_only = False, 0  # counted decisions? candidates predicted, never measured
        predicts = self._predicts(evaluator, sum(map(len, grids.values())))
        self._small = bitpredict.small_weights([w.nbytes for w in weights]) if predicts else set()
        for i in self._small:  # the smallest weights keep their widest least sparse candidate (bitpredict.SMALL_SHARE)
            grids[weights[i].name] = grids[weights[i].name][:1]
        log.info("bitwidth: %d candidates, a run of the model %.2f CPU s: %s", sum(map(len, grids.values())),
                 evaluator.run_seconds, "predicted sweep" if predicts else "every candidate measured")
        sweeper = evaluator
        if predicts:  # single weights measured on part of the samples (sparing suffixes); the joint checks on all
            sweeper = evaluator.part(max(1, min(SWEEP_SAMPLES, len(evaluator.data) // 2))) or evaluator
            sweeper.sparing = True
            log.info("bitwidth: the sweep measures on %d of the %d samples", len(sweeper.data), len(evaluator.data))
        resolution = 100.0 * 2 / max(len(sweeper.data), 1)
        table = (self._predicted(ctx, sweeper, weights, grids, resolution) if predicts
                 else self._measured(ctx, evaluator, weights, grids))
        if self._counting:
            floor_disagreement([c for cands in table.values() for c in cands if c.error is None], resolution)
        return table

    def _predicts(self, evaluator: Evaluator, candidates: int) -> bool:
        """Whether the sweep predicts candidates' noise (bitpredict): `sweep: auto` past SWEEP_SECONDS of runs;
        never with a user's metric (no noise predicts its value)."""
        cfg = self.config
        if cfg.metric is not None and not is_builtin(cfg.metric) or cfg.sweep == "measured":
            return False
        return cfg.sweep == "predicted" or candidates * evaluator.run_seconds > SWEEP_SECONDS

    def _code(self, ctx: Context, evaluator: Evaluator, info: WeightInfo, candidate: Candidate) -> list | None:
        """The candidate's versions of the weight, its exact bytes set (None where it failed: its error recorded)."""
        try:
            coded = candidate_weights(evaluator.base[info.name], info, candidate.sparsity, candidate.bits,
                                      self.config.seed, self._pruner)
            candidate.size = int(np.mean([stored_bytes(c, ctx.form) for c in coded]))
            return [c.decode() for c in coded]
        except OnnxCompressError as e:
            failed(info, candidate, e)
            return None

    def _measure(self, ctx: Context, evaluator: Evaluator, info: WeightInfo, candidate: Candidate) -> None:
        """Code the candidate, price its bytes and measure it with only this weight changed (a failure is data)."""
        versions = self._code(ctx, evaluator, info, candidate)
        if versions is None:
            return
        try:
            measured = evaluator.measure({info.name: versions})
            candidate.cost, candidate.nsr = max(measured["cost"], 0.0), measured["nsr"]
            candidate.task_nsr = measured.get("task_nsr", candidate.nsr)
            self._counting |= bool(measured.get("counted"))
        except RecipeError:  # the user's metric failed: no candidate can be measured
            raise
        except OnnxCompressError as e:
            failed(info, candidate, e)

    def _measure_together(self, ctx: Context, evaluator: Evaluator, weights: list[WeightInfo],
                          entries: list[list[bitpredict.Entry]], group: list[int]) -> None:
        """bitpredict.measure_together on the smallest weights' single candidates, coded and priced as _measure does."""
        measured = bitpredict.measure_together(entries, group, [w.name for w in weights], evaluator.measure,
                                               lambda i: self._code(ctx, evaluator, weights[i], entries[i][0].candidate))
        if measured is not None:
            self._counting |= bool(measured.get("counted"))
            log.info("bitwidth: the smallest weights' single candidates measured in one run")

    def _measured(self, ctx: Context, evaluator: Evaluator, weights: list[WeightInfo], grids: dict) -> dict:
        """Every candidate measured, but those past the cost limit (narrower widths, higher sparsities)."""
        table: dict[str, list[Candidate]] = {}
        bar = tqdm(total=sum(map(len, grids.values())), desc="sensitivity", disable=not ctx.progress, leave=False)
        limit = self._cost_limit()
        skipped = 0
        for info in weights:
            table[info.name] = []
            hopeless = 0  # widths up to this one cost more than any allocation can take at a lower sparsity
            for sparsity, bits in grids[info.name]:
                if bits <= hopeless:
                    bar.update()
                    skipped += 1
                    continue
                candidate = Candidate(sparsity, bits)
                self._measure(ctx, evaluator, info, candidate)
                table[info.name].append(candidate)
                bar.update()
                if limit is not None and candidate.error is None and candidate.cost > limit:
                    hopeless = max(hopeless, bits)
                    log.debug("bitwidth: %s costs over %.3g at %d bits, sparsity %.2f: narrower widths and higher "
                              "sparsities from there skipped", info.name, limit, bits, sparsity)
        bar.close()
        log.info("bitwidth: %d candidates measured, %d skipped as over the cost limit",
                 sum(map(len, table.values())), skipped)
        return table

    def _predicted(self, ctx: Context, evaluator: Evaluator, weights: list[WeightInfo], grids: dict,
                   resolution: float) -> dict:
        """Every candidate coded and priced, its layer error computed; measured only near the allocations."""
        cfg = self.config
        if self._pruner is not None:  # the default ridge: the prune pass chooses its own after the search
            self._pruner.held_out_ridge = False
        entries: list[list[bitpredict.Entry]] = []
        bar = tqdm(total=sum(map(len, grids.values())), desc="coding", disable=not ctx.progress, leave=False)
        for info in weights:
            array = evaluator.base[info.name]
            pruner = self._pruner
            layer, stats = (pruner.layers.get(info.name), pruner.stats.get(info.name)) if pruner else (None, None)
            # a large weight is predicted on a sample: of its channels' rows (with layer statistics), or of its rows'
            # blocks (a huge table without); the bytes but the codebook's scaled by the entries
            rows = bitpredict.channel_rows(layer.out_channels) if stats is not None else None
            sample = bitpredict.row_sample(array) if stats is None else None
            layer_error = bitpredict.LayerError(array if sample is None else sample, layer, stats, rows)
            row = []
            for sparsity, bits in grids[info.name]:
                candidate, error = Candidate(sparsity, bits), 0.0
                try:  # priced from the codes' counts; _measure codes and prices the measured ones exactly, whole
                    coded = predicted_candidate(array, info, sparsity, bits, cfg.seed, pruner, rows=rows, sample=sample)
                    book, coded_size = 4 * int(coded.codebook.size), int(np.size(coded.codes))
                    candidate.size = book + round((predicted_bytes(coded, ctx.form) - book) * array.size / coded_size)
                    error = layer_error(coded.decode())
                except OnnxCompressError as e:
                    failed(info, candidate, e)
                row.append(bitpredict.Entry(candidate, error))
                bar.update()
            entries.append(row)
        bar.close()
        self._measure_together(ctx, evaluator, weights, entries, sorted(self._small))
        fixed = ctx.original.ByteSize() - sum(w.nbytes for w in weights)
        rounds = bitpredict.sweep(entries, lambda i, j: self._measure(ctx, evaluator, weights[i], entries[i][j].candidate),
                                  lambda options, noise: self._landings(options, noise, fixed, weights),
                                  lambda: self._counting, resolution)
        for i, row in enumerate(entries):  # each weight's safest (first) candidate too: the plan where none meets the budget
            if row and not row[0].measured and row[0].candidate.error is None:
                self._measure(ctx, evaluator, weights[i], row[0].candidate)
                row[0].measured = True
        measured = sum(e.measured for row in entries for e in row)
        self._predicted_only = sum(map(len, entries)) - measured
        log.info("bitwidth: %d candidates measured, %d predicted from their layer error and not measured "
                 "(%d allocation rounds)", measured, self._predicted_only, rounds)
        return {w.name: [e.candidate for e in row if e.measured or e.candidate.error is not None]
                for w, row in zip(weights, entries)}

    def _landings(self, options, noise, fixed: int, weights) -> list:
        """The allocations the search will make on these options, nearest the budget first (by |log| of the
        budget's scale): every other budget scale and, under a loss budget, noise budgets around the summed
        noise of those (the noise ladder's range, near the noise of the budget's own allocation first); the size
        steps under a ratio."""
        cfg = self.config
        if cfg.target_ratio is not None:
            original = fixed + sum(w.nbytes for w in weights)
            size_budget = max(original / cfg.target_ratio - fixed, 0.0)
            return [allocate.min_cost(options, size_budget * f) for f in SIZE_STEPS]
        # every other budget scale: the search's own allocations between them land on candidates measured near
        scales = [scale for scale in SCALES[::2] if scale > 0]
        choices = [allocate.min_size(options, cfg.loss_budget * scale) for scale in scales]
        ranked = [(abs(math.log(scale)), k, choice) for k, (scale, choice) in enumerate(zip(scales, choices))]
        if cfg.min_sqnr is None:
            at_budget = choices[scales.index(1.0)]
            near = allocate.totals(noise, at_budget)[1] if at_budget is not None else 0.0
            for level in bitpredict.noise_levels(noise, choices):
                ranked.append((abs(math.log(level / near)) if near > 0 else math.inf, len(ranked),
                               allocate.min_size(noise, level)))
        return [choice for _, _, choice in sorted(ranked, key=lambda r: r[:2])]

    def _search(self, cfg: BitWidthConfig, evaluator: Evaluator, weights, options, fixed: int, noise=None):
        """Allocate under scaled budgets, verify each jointly; keep the best verified choice. With `noise` (the
        options priced by output noise) and a counted loss budget, also allocate under noise budgets (bitladder.noise_ladder)."""
        evaluated, seen, joint_noise = [], {}, {}
        original = fixed + sum(w.nbytes for w in weights)
        if cfg.target_ratio is not None:
            size_budget = max(original / cfg.target_ratio - fixed, 0.0)
            # tighter size budgets too: the passes after the search may add bytes it cannot
            # predict, and the end-to-end check steps down this ladder when the file is too large
            choices = [allocate.min_cost(options, size_budget * f) for f in SIZE_STEPS]
            if choices[0] is None:
                raise PreconditionError(f"no configuration reaches ratio {cfg.target_ratio}: the smallest candidates "
                                        "are still too large; lower --target-ratio")
        else:
            budget = cfg.loss_budget
            choices = [allocate.min_size(options, budget * scale) for scale in SCALES]

        def verify(choice) -> dict | None:
            if choice is None:
                return None
            if tuple(choice) in seen:
                return seen[tuple(choice)]
            changed = {}
            for w, layer, j in zip(weights, options, choice):
                settings = layer[j].settings
                coded = candidate_weights(evaluator.base[w.name], w, settings["sparsity"], settings["bits"],
                                          cfg.seed, self._pruner)
                changed[w.name] = [c.decode() for c in coded]
            measured = evaluator.measure(changed)
            joint_noise[tuple(choice)] = measured.get("task_nsr")
            size, predicted = allocate.totals(options, choice)
            ratio = original / max(fixed + size, 1)
            point = Verified(int(fixed + size), ratio, predicted, measured["check"], measured["cost"],
                             self._within(cfg, measured, ratio),
                             {w.name: LayerChoice(**options[i][j].settings) for i, (w, j) in enumerate(zip(weights, choice))})
            seen[tuple(choice)] = point
            evaluated.append(point)
            return point

        points = [verify(choice) for choice in choices]
        if cfg.target_ratio is None:
            bitladder.bisect(points, verify, options, budget, SCALES)
            if noise is not None and cfg.min_sqnr is None:
                bitladder.noise_ladder(noise, verify, seen, joint_noise)
        return evaluated, self._best(cfg, evaluated, seen, options)

    @staticmethod
    def _best(cfg: BitWidthConfig, evaluated, seen: dict, options) -> list[int]:
        """The smallest verified choice within the budget (the closest to it under a target ratio); else the
        safest candidates (most bits, least sparsity), with a warning."""
        feasible = [p for p in evaluated if p.ok]
        if not feasible:
            log.warning("bitwidth: no searched configuration met the budget; using the safest candidates")
            return [max(range(len(o)), key=lambda j: (o[j].settings["bits"], -o[j].settings["sparsity"]))
                    for o in options]
        best = min(feasible, key=lambda p: (p.bytes, p.check) if cfg.target_ratio is None else (p.check, p.bytes))
        return list(next(c for c, p in seen.items() if p is best))

    def _cost_limit(self) -> float | None:
        """The cost past which a weight's narrower widths and higher sparsities are not measured
        (COST_LIMIT budgets: they only cost more, and cannot fit any but the loosest allocations).
        None for a size budget, where the least-loss allocation may need any candidate."""
        budget = self.config.loss_budget
        return None if budget is None else COST_LIMIT * budget

    @staticmethod
    def _within(cfg: BitWidthConfig, measured: dict, ratio: float) -> bool:
        if cfg.target_ratio is not None:
            return ratio >= cfg.target_ratio
        if cfg.min_sqnr is not None:
            return measured["sqnr_db"] >= cfg.min_sqnr
        if cfg.max_drop is not None:  # counted on finite samples: 5 of 500 is 1.0 points, not 1.0000000000000009
            return measured["check"] <= cfg.max_drop + 1e-9
        return True

