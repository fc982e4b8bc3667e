"""Bit-width search: per-layer codebook bits and sparsity chosen from measured sensitivity.

1. Sensitivity: for each weight and each candidate (sparsity s, bits b), the weight is
   magnitude-pruned to s, k-means coded at b bits, and the model run on the evaluation data
   with only that weight changed. The candidate weights are turned into inputs of ONE
   evaluation session, so each candidate is a different feed, not a new session.
2. Allocation: a multiple-choice knapsack (onnxcompress.allocate) picks one candidate per weight,
   minimizing the stored bytes under the fidelity budget (or the loss under a size budget),
   treating per-layer losses as additive.
3. Verification: losses do not add up exactly, so the chosen set is applied jointly and measured
   again; the allocation is re-solved with scaled budgets and the smallest configuration whose
   measured loss meets the budget wins. Every evaluated configuration is a point of the reported
   size/fidelity front.

The plan goes to ctx.plan[name] = {"bits", "sparsity"} for the prune and share passes, which
compensate and refine on calibration data, so the final model usually does better than the
plain pruning and clustering simulated here. Its fidelity is measured again at the end.
"""
from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
from tqdm.auto import tqdm

from onnxcompress import allocate
from onnxcompress.capture import collect_layer_inputs, linear_layer
from onnxcompress.data import Dataset, model_inputs
from onnxcompress.errors import OnnxCompressError, PreconditionError, RecipeError
from onnxcompress.metrics import compare_outputs
from onnxcompress.numerics import magnitude_mask
from onnxcompress.tasks import is_builtin, output_producers, parse_metric, resolve_kinds
from onnxcompress.packed import choose_layout, write_blob
from onnxcompress.pipeline import Context, Pass, PassResult
from onnxcompress.refine import (DAMPING_GRID, damping_for_all_rows, heldout_damping, lstsq_cost, masked_lstsq,
                                 sparsegpt)
from onnxcompress.runtime import make_session
from onnxcompress.suffix import SuffixRunner
from onnxcompress.weights import WeightInfo, get_array

from .prune import DEFAULT_DAMPING, PruneConfig
from .share import fit_codebook

log = logging.getLogger(__name__)
SIZE_STEPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5)
# budget scales the allocation is solved at, each verified jointly: summed single-layer costs overstate the joint
# loss (flips counted alone overlap, noise floors add up), so budgets up to 32x are tried
SCALES = (32.0, 16.0, 8.0, 5.6, 4.0, 2.8, 2.0, 1.4, 1.0, 0.7, 0.5, 0.35, 0.25, 0.12, 0.05, 0.0)
COST_LIMIT = 8.0  # a single candidate costing over this many budgets is not allocated (nor narrower widths)
BISECTIONS = 3  # extra allocations verified between the loosest budget scale that held and the next


@dataclass(kw_only=True)
class BitWidthConfig:
    bits: list = field(default_factory=lambda: [2, 3, 4, 5, 6, 7, 8])  # codebook widths the search may choose
    # sparsities the search may choose per weight
    sparsities: list = field(default_factory=lambda: [0.0, 0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97])
    max_drop: float | None = None  # points of accuracy (with labels; estimated without, see `unlabelled`)
    min_sqnr: float | None = None  # dB, over all outputs
    target_ratio: float | None = None  # whole-file ratio to reach with the least loss
    metric: str | None = None  # "module:function"(outputs: dict, data) -> number, higher is better
    form: Literal["packed", "portable"] = "packed"  # which stored size to minimize
    # which data the sweep measures on. "auto": a max_drop budget counts accuracy points, defined
    # on labelled data, so it sweeps on the evaluation data when that has labels; other budgets
    # sweep on the calibration data and leave the evaluation data to the end-to-end check alone
    sweep_data: Literal["auto", "calibration", "evaluation"] = "auto"
    max_samples: int = 1000  # samples the sweep and the checks run on
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

    @property
    def loss_budget(self) -> float | None:
        """The budget in the units of a candidate's cost: points (max_drop) or the noise-to-signal
        ratio (min_sqnr); None for a size budget (target_ratio)."""
        if self.target_ratio is not None:
            return None
        return self.max_drop if self.min_sqnr is None else 10 ** (-self.min_sqnr / 10)


@dataclass
class Candidate:
    sparsity: float
    bits: int
    size: int = 0
    cost: float = 0.0
    nsr: float = 0.0  # output noise-to-signal ratio of the candidate alone
    error: str | None = None


class _Evaluator:
    """One session in which the searched weights are inputs; scores feeds of candidate weights."""

    def __init__(self, model: onnx.ModelProto, weights: list[WeightInfo], data: Dataset, score):
        self.data, self.score = data, score
        self.specs = model_inputs(model)
        self.model = _weights_as_inputs(model, weights)
        self.session = make_session(self.model)
        self.names = [o.name for o in self.session.get_outputs()]
        self.base = {w.name: get_array(model, w) for w in weights}
        self.chunks = list(data.chunks(self.specs))
        self.suffixes: SuffixRunner | None = None
        self.reference = self.outputs({})
        # one weight changed (the sweep): only the nodes downstream of it run (onnxcompress.suffix)
        self.suffixes = SuffixRunner(self.model, [feed for feed, _ in self.chunks], self.names, self.reference,
                                     self.base)
        self._suffix: tuple[str, object] | None = None  # the last weight's suffix: the sweep goes weight by weight

    def outputs(self, changed: dict[str, list[np.ndarray]]) -> list[list[np.ndarray]]:
        """Outputs per data chunk with the weights in `changed` replaced.

        Each changed weight is a list: one array for every chunk, or k cross-fitted versions,
        version f fit without the chunks of fold f (chunk i is in fold i % k, as the layer
        statistics count them), so chunk i runs with version i % k and every sample is scored
        by a weight that did not learn from it."""
        if len(changed) == 1 and self.suffixes is not None:
            (name, versions), = changed.items()
            if self._suffix is None or self._suffix[0] != name:
                try:
                    self._suffix = (name, self.suffixes.for_weight(name))
                except Exception as e:  # noqa: BLE001 - the whole model still runs: the suffix only saves time
                    log.debug("bitwidth: no suffix for %s (%s); the whole model runs", name, e)
                    self._suffix = (name, None)
            if self._suffix[1] is not None:
                return self._suffix[1](versions)
        outputs = []
        for i, (feed, _) in enumerate(self.chunks):
            weights = {**self.base, **{name: versions[i % len(versions)] for name, versions in changed.items()}}
            outputs.append(self.session.run(self.names, {**feed, **weights}))
        return outputs

    def measure(self, changed: dict[str, list[np.ndarray]]) -> dict[str, float]:
        return self.score(self.names, self.reference, self.outputs(changed), self.data)


def _weights_as_inputs(model: onnx.ModelProto, weights: list[WeightInfo]) -> onnx.ModelProto:
    """A copy where each searched weight is a main-graph input (subgraphs read it from the outer scope)."""
    from onnxcompress.graphs import find_graph

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for info in weights:
        graph = find_graph(copy, info.graph)
        if info.location == "initializer":
            keep = [t for t in graph.initializer if t.name != info.name]
            del graph.initializer[:]
            graph.initializer.extend(keep)
        else:
            index = next(i for i, n in enumerate(graph.node) if n.op_type == "Constant" and n.output[0] == info.name)
            del graph.node[index]
        elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(get_array(model, info).dtype))
        copy.graph.input.append(onnx.helper.make_tensor_value_info(info.name, elem, list(info.shape)))
    return copy


def make_score(cfg: BitWidthConfig, labels_present: bool, producers: dict[str, str] | None = None):
    """The loss function: returns {"cost": additive loss for allocation, "check": budgeted quantity}.

    Decisions are counted by each output's task kind (tasks.py: the one `cfg.metric` names, else
    detected): the budget holds the worst agreement over the budgeted outputs."""
    task = parse_metric(cfg.metric) if is_builtin(cfg.metric) else None
    user = _load_metric(cfg.metric) if cfg.metric and task is None else None
    kinds_of: dict[int, dict] = {}  # the reference is the same list on every call of one search

    def score(names, reference, candidate, data) -> dict[str, float]:
        kinds = kinds_of.setdefault(id(reference), resolve_kinds(names, reference, producers, task))
        metrics = compare_outputs(names, reference, candidate, data.labels, kinds=kinds)
        counted = [m for m in metrics if m.budgeted and m.agreement is not None]
        signal = sum(float(np.sum(np.square(np.concatenate([c[k].ravel() for c in reference]), dtype=np.float64)))
                     for k in range(len(names)))
        noise = sum(float(np.sum(np.square(np.concatenate([(r[k] - c[k]).ravel().astype(np.float64)
                                                           for r, c in zip(reference, candidate)]))))
                    for k in range(len(names)))
        nsr = noise / signal if signal > 0 else 0.0
        out = {"nsr": nsr, "sqnr_db": 10 * np.log10(1 / nsr) if nsr > 0 else float("inf")}
        if counted:
            out["disagree"] = 100.0 * (1.0 - min(m.agreement for m in counted))
            losses = [m.expected_loss for m in counted]
            if all(m.task.startswith("top1") for m in counted) and None not in losses:
                out["expected_drop"] = 100.0 * max(losses)
            labelled = [m for m in counted if m.accuracy_reference is not None]
            if task is None and labelled:
                out["drop"] = 100.0 * (labelled[0].accuracy_reference - labelled[0].accuracy_candidate)
        if user is not None:
            ref_value = user(dict(zip(names, zip(*reference))), data)
            out["metric_drop"] = float(ref_value - user(dict(zip(names, zip(*candidate))), data))
        if user is not None:
            out["cost"], out["check"] = max(out["metric_drop"], 0.0), out["metric_drop"]
        elif cfg.min_sqnr is not None or not counted:
            out["cost"], out["check"] = nsr, nsr
        else:  # decisions counted on the data: zero until one flips (see floor_disagreement)
            estimated = cfg.unlabelled == "expected" and "expected_drop" in out
            out["cost"] = out["expected_drop"] if estimated else out["disagree"]
            out["check"] = out["drop"] if labels_present and "drop" in out else out["cost"]
            out["counted"] = True
        return out

    return score


def _load_metric(spec: str):
    module, sep, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name) if sep else None
    except (ImportError, AttributeError) as e:
        raise RecipeError(f"cannot load metric '{spec}': {e}") from e
    if fn is None or not callable(fn):
        raise RecipeError(f"metric '{spec}' must name a function as module:function")
    return fn


class _Pruner:
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
                 crossfit: bool = False):
        layers = {w.name: linear_layer(model, w) for w in weights}
        self.layers = {name: layer for name, layer in layers.items() if layer is not None}
        self.stats = collect_layer_inputs(model, data, list(self.layers.values()), folds=self.folds) \
            if data and self.layers else {}
        self.crossfit = crossfit
        self._cache: dict[tuple[str, float], tuple[list[np.ndarray], np.ndarray]] = {}

    def __call__(self, array: np.ndarray, info: WeightInfo, sparsity: float) -> tuple[list[np.ndarray], np.ndarray]:
        """(refit weights: one, or one per fold f fit without fold f when cross-fitting; the kept mask)."""
        key = (info.name, sparsity)
        if key not in self._cache:
            mask = magnitude_mask(array, sparsity)
            versions = [np.where(mask, array, 0).astype(array.dtype)]
            stats, layer = self.stats.get(info.name), self.layers.get(info.name)
            if stats is not None:
                target = layer.weight_matrix(np.asarray(array, dtype=np.float64))
                keep = layer.weight_matrix(mask)
                group = layer.group_of_channels()
                damping = self._damping([stats.fold_hessians(g) for g in range(layer.groups)], target, keep, group)
                kept = float(keep.sum(axis=1).mean())
                if self.crossfit and stats.fold_count and stats.count < self.rows_per_kept * kept:
                    # the ridge falls about as 1 / rows (refine.damping_for_all_rows): a fit on the
                    # (folds - 1) / folds of the rows outside one fold takes a little more
                    heldout = [stats.heldout_hessians(g) for g in range(layer.groups)]
                    scale = stats.folds / (stats.folds - 1)
                    versions = [self._refit(layer, target, keep, group, [h[f] for h in heldout], damping * scale)
                                for f in range(stats.folds)]
                else:
                    versions = [self._refit(layer, target, keep, group,
                                            [stats.hessian(g) for g in range(layer.groups)], damping)]
                versions = [v.astype(array.dtype) for v in versions]
            self._cache[key] = (versions, mask)
        return self._cache[key]

    def _refit(self, layer, target: np.ndarray, keep: np.ndarray, group: np.ndarray, hessians: list[np.ndarray],
               damping: float) -> np.ndarray:
        refit = np.zeros_like(target)
        for g in range(layer.groups):
            rows = np.flatnonzero(group == g)
            if lstsq_cost(keep[rows]) <= self.max_flops:
                refit[rows] = masked_lstsq(target[rows], keep[rows], hessians[g], damping=damping)
            else:
                refit[rows] = sparsegpt(target[rows], hessians[g], keep=keep[rows], damping=damping)[0]
        return layer.weight_from_matrix(refit)

    @staticmethod
    def _damping(folds, target: np.ndarray, keep: np.ndarray, group: np.ndarray) -> float:
        """As the prune pass's "auto" damping (for a fit on all rows): least two-fold held-out error where affordable."""
        if any(f is None for f in folds) or lstsq_cost(keep) * 4 * len(DAMPING_GRID) > PruneConfig.max_cv_flops:
            return DEFAULT_DAMPING
        errors = sum(heldout_damping(target[rows], keep[rows], ((a, None, None), (b, None, None)))
                     for (a, b), rows in ((folds[g], np.flatnonzero(group == g)) for g in range(len(folds))))
        return damping_for_all_rows(errors)


def floor_disagreement(candidates: list[Candidate], resolution: float) -> None:
    """Give candidates below the count's resolution a cost from their output noise.

    Changed decisions are counted on a finite sample, so a candidate that flips none of them
    costs 0 and the allocation takes it for free, however much noise it adds; several such
    "free" layers then flip many decisions together. A decision flips when the noise exceeds the
    sample's margin, so for small noise the flipped share grows like the noise's standard
    deviation, sqrt(NSR). The factor is read off the candidates that flip enough samples to be
    counted (the median of cost / sqrt(nsr)); each cost becomes max(cost, factor * sqrt(nsr)).
    """
    counted = [c.cost / np.sqrt(c.nsr) for c in candidates if c.cost >= resolution and c.nsr > 0]
    if not counted:
        return
    factor = float(np.median(counted))
    for c in candidates:
        c.cost = max(c.cost, factor * float(np.sqrt(max(c.nsr, 0.0))))


def candidate_weights(array: np.ndarray, info: WeightInfo, sparsity: float, bits: int, seed: int,
                      pruner: _Pruner | None = None) -> list:
    """Prune to `sparsity` (refit when the pruner has data), then k-means code at `bits`: one
    coded weight, or one per data fold when the pruner cross-fits."""
    if sparsity <= 0:
        return [fit_codebook(array, info, bits, seed=seed)]
    if pruner is not None:
        versions, mask = pruner(array, info, sparsity)
    else:
        mask = magnitude_mask(array, sparsity)
        versions = [np.where(mask, array, 0)]
    return [fit_codebook(weight, info, bits, seed=seed, mask=mask) for weight in versions]


def stored_bytes(shared, form: str) -> int:
    """Measured bytes of one candidate in the chosen form (packed: the encoded blob).

    For speed the sweep codes with ANS only and tries three relative-index widths; the entropy
    pass later tries every coder and width, so the stored size can only come out smaller.
    """
    if form == "portable":
        return shared.payload_bytes()
    layout = choose_layout(shared, candidates=(4, 5, 8), methods=("ans",))
    return len(write_blob(shared, layout, methods=("ans",)).blob)


class BitWidthPass(Pass):
    name = "bitwidth"
    Config = BitWidthConfig

    def requires(self, ctx: Context) -> None:
        if (ctx.eval_data or ctx.data) is None and self.config.without_data == "error":
            raise PreconditionError("the bit-width search needs data to measure sensitivity: give --data or --eval-data")

    def call(self, ctx: Context) -> PassResult:
        cfg: BitWidthConfig = self.config
        if self.config.without_data == "skip" and ctx.data is None:
            ctx.note("bitwidth: no calibration data (--data), so no per-layer search; the fixed per-role defaults "
                     "of prune and share were used (give --data for settings measured on your model)")
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
            return PassResult(False, {"weights": 0})
        evaluator = _Evaluator(ctx.model, weights, data, make_score(cfg, data.labels is not None,
                                                                      output_producers(ctx.model)))
        # score out of fold when the refits learn from the very samples the search scores on
        self._pruner = _Pruner(ctx.model, ctx.data, weights, crossfit=source is ctx.data)
        table = self._sensitivities(ctx, evaluator, weights)
        options = [[allocate.Option(c.size, c.cost, {"bits": c.bits, "sparsity": c.sparsity})
                    for c in table[w.name] if c.error is None] for w in weights]
        if any(not o for o in options):
            raise PreconditionError("bitwidth: every candidate of some weight failed; see the log")
        fixed = ctx.original.ByteSize() - sum(w.nbytes for w in weights)
        evaluated, chosen = self._search(cfg, evaluator, weights, options, fixed)
        for w, layer, j in zip(weights, options, chosen):
            ctx.plan.setdefault(w.name, {}).update(layer[j].settings)
            ctx.record(w.name, self.name, "planned {bits} bits, sparsity {sparsity:.2f}".format(**ctx.plan[w.name]),
                       w.nbytes, int(layer[j].size), dict(ctx.plan[w.name]))
        summary = {
            "budget": {"max_drop": cfg.max_drop, "min_sqnr": cfg.min_sqnr, "target_ratio": cfg.target_ratio},
            "form": cfg.form, "samples": len(data), "original_bytes": ctx.original.ByteSize(),
            "choices": {w.name: ctx.plan[w.name] for w in weights},
            "sensitivity": {name: [c.__dict__ for c in cands] for name, cands in table.items()},
            "evaluated": evaluated,
            "front": [evaluated[i] for i in allocate.pareto_front([(e["bytes"], e["check"]) for e in evaluated])],
            "seconds": time.perf_counter() - start,
        }
        return PassResult(True, summary)

    def _sensitivities(self, ctx: Context, evaluator: _Evaluator, weights: list[WeightInfo]) -> dict:
        cfg = self.config
        # widest width first at each sparsity: once a candidate costs more than any allocation can take, the
        # narrower widths at that sparsity and above cost more still (fewer bits, more pruning) and are skipped
        grid = [(s, b) for s in sorted(cfg.sparsities) for b in sorted(cfg.bits, reverse=True)]
        table: dict[str, list[Candidate]] = {}
        # the prune pass leaves vectors (biases, scales) dense: plan no sparsity for them
        grids = {w.name: grid if len(w.shape) >= 2 else [(s, b) for s, b in grid if s == 0.0] for w in weights}
        bar = tqdm(total=sum(map(len, grids.values())), desc="sensitivity", disable=not ctx.progress, leave=False)
        counting = False  # is the cost a count of changed decisions?
        limit = self._cost_limit()
        skipped = 0
        for info in weights:
            array = evaluator.base[info.name]
            table[info.name] = []
            hopeless = 0  # widths up to this one cost more than any allocation can take at a lower sparsity
            for sparsity, bits in grids[info.name]:
                if bits <= hopeless:
                    bar.update()
                    skipped += 1
                    continue
                candidate = Candidate(sparsity, bits)
                try:
                    coded = candidate_weights(array, info, sparsity, bits, cfg.seed, self._pruner)
                    candidate.size = int(np.mean([stored_bytes(c, cfg.form) for c in coded]))
                    measured = evaluator.measure({info.name: [c.decode() for c in coded]})
                    candidate.cost, candidate.nsr = max(measured["cost"], 0.0), measured["nsr"]
                    counting |= bool(measured.get("counted"))
                except OnnxCompressError as e:  # a failed candidate is data: record it and go on
                    candidate.error = str(e)
                    log.warning("bitwidth: %s at sparsity %.2f, %d bits failed: %s", info.name, sparsity, bits, e)
                table[info.name].append(candidate)
                bar.update()
                if limit is not None and candidate.error is None and candidate.cost > limit:
                    hopeless = max(hopeless, bits)
                    log.debug("bitwidth: %s costs over %.3g at %d bits, sparsity %.2f: narrower widths and higher "
                              "sparsities from there skipped", info.name, limit, bits, sparsity)
        bar.close()
        log.info("bitwidth: %d candidates measured, %d skipped as over the cost limit",
                 sum(map(len, table.values())), skipped)
        if counting:
            resolution = 100.0 * 2 / max(len(evaluator.data), 1)
            floor_disagreement([c for cands in table.values() for c in cands if c.error is None], resolution)
        return table

    def _search(self, cfg: BitWidthConfig, evaluator: _Evaluator, weights, options, fixed: int):
        """Allocate under scaled budgets, verify each jointly; keep the best verified choice."""
        evaluated, seen = [], {}
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
            size, predicted = allocate.totals(options, choice)
            ratio = original / max(fixed + size, 1)
            point = {"bytes": int(fixed + size), "ratio": ratio,
                     "predicted": predicted, "check": measured["check"], "cost": measured["cost"],
                     "ok": self._within(cfg, measured, ratio),
                     "choice": {w.name: options[i][j].settings for i, (w, j) in enumerate(zip(weights, choice))}}
            seen[tuple(choice)] = point
            evaluated.append(point)
            return point

        points = [verify(choice) for choice in choices]
        if cfg.target_ratio is None:  # bisect between the loosest scale that held and the next that did not
            tried = sorted((scale, p["ok"]) for scale, p in zip(SCALES, points) if p is not None)
            for _ in range(BISECTIONS):
                held = [scale for scale, ok in tried if ok]
                low = max(held, default=None)
                high = min((scale for scale, ok in tried if not ok and low is not None and scale > low), default=None)
                if low is None or high is None or high / max(low, 1e-9) < 1.1:
                    break
                mid = (low * high) ** 0.5 if low > 0 else high / 2
                point = verify(allocate.min_size(options, budget * mid))
                tried = sorted(tried + [(mid, point is not None and point["ok"])])
        feasible = [p for p in evaluated if p["ok"]]
        if not feasible:
            safest = [max(range(len(o)), key=lambda j: (o[j].settings["bits"], -o[j].settings["sparsity"]))
                      for o in options]
            log.warning("bitwidth: no searched configuration met the budget; using the safest candidates")
            return evaluated, safest
        best = min(feasible, key=lambda p: (p["bytes"], p["check"]) if cfg.target_ratio is None
                   else (p["check"], p["bytes"]))
        chosen = next(c for c, p in seen.items() if p is best)
        return evaluated, list(chosen)

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
