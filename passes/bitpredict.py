"""Which candidates of the bit-width search are measured: output noise predicted, measured where allocations land.

Measuring every candidate (a weight pruned to s and coded at b bits, run through the model alone) costs
one model run each: 9 sparsities x 7 widths per weight. Most of them are never near an allocation under
the budget. A candidate's output noise is, to first order, its layer-output error carried to the outputs
by the weight's gain:

    task_nsr ~ g_w * e,   e = tr(D H D^T) / tr(W H W^T)

with D = W - W_hat in the layer's channel-first matrix and H = E[x x^T] of its inputs (the Gram the
pruner's refit collected; a weight without a linear layer or its statistics takes H = I). g_w is read
off the weight's measured candidates: log g interpolated linearly in log e between them, constant
beyond. The same holds for the noise over all outputs (nsr); a counted cost (changed decisions)
follows the noise's standard deviation, cost ~ k * sqrt(nsr) (passes.bitsearch.floor_disagreement),
k interpolated the same way from the weight's candidates that flip enough samples to be counted,
else the median over all of them.

The sweep measures two anchors per weight (its candidates at two quantiles of log e), then repeats:
allocate with the measured values where there are some and the predictions elsewhere (the pass's own
allocations: every budget scale, noise budgets, size steps), measure the picked candidates not yet
measured, the allocations nearest the budget first and about one candidate per weight a round, until
the allocations pick only measured candidates (or MAX_ROUNDS). Only measured candidates go on to the
search, so its allocations and joint verifications are those of a full sweep restricted to them: at
the fixed point, the allocations on measured-and-predicted candidates pick measured ones only, and
the search's allocations on the measured ones alone are the same.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from onnxcompress.errors import OnnxCompressError, RecipeError
from onnxcompress.numerics import allocate
from onnxcompress.passes.bitsearch import Candidate

log = logging.getLogger(__name__)
ANCHORS = (1 / 3, 2 / 3)  # quantiles of a weight's candidates' log layer error measured before any allocation
MEASURE_ALL = 8  # a weight with at most this many candidates has them all measured
MAX_ROUNDS = 12  # allocate-and-measure rounds before the sweep stops with what it measured
TINY = 1e-30
# a weight without layer statistics (a Gather table) over this many entries is coded for its prediction on a
# sample of its rows: SAMPLE_ENTRIES of them, in blocks of SAMPLE_BLOCK rows (a CSR gap runs along a row)
SAMPLE_ABOVE = 1 << 22
SAMPLE_ENTRIES = 1 << 20
SAMPLE_BLOCK = 64
PREDICT_ROWS = 64  # rows (output channels) a weight with layer statistics is predicted on, past twice as many
# the smallest weights whose bytes add up to at most this share of the searched bytes keep one candidate, their
# widest dense one: each of theirs measured would cost a model run for a saving of at most that share
SMALL_SHARE = 0.005


@dataclass
class Entry:
    """One candidate of one weight in the predicted sweep."""

    candidate: Candidate
    error: float  # relative layer-output error e (0: the candidate is the weight itself)
    measured: bool = False


class LayerError:
    """The layer error of one weight's candidates, e = tr(D H D^T) / tr(W H W^T) summed over the layer's channel
    groups (H = I without statistics), D the weight minus a candidate's decoded values: the weight's signal
    tr(W H W^T) computed once."""

    def __init__(self, array: np.ndarray, layer=None, stats=None, rows: np.ndarray | None = None):
        self.layer = layer if stats is not None else None
        self.rows = rows  # only these rows of the channel-first matrix (a candidate decoded to them alone)
        if self.layer is None:
            self.w = np.asarray(array, np.float64).ravel()
            self.signal = float(self.w @ self.w)
            return
        self.w = layer.weight_matrix(np.asarray(array, np.float32))
        group = layer.group_of_channels()
        if rows is not None:
            self.w, group = self.w[rows], group[rows]
        self.parts = [(group == g, np.asarray(stats.hessian(g), np.float32)) for g in np.unique(group)]
        self.signal = sum(float(np.einsum("ij,ij->", self.w[rows] @ h, self.w[rows], dtype=np.float64))
                          for rows, h in self.parts)

    def __call__(self, decoded: np.ndarray) -> float:
        if self.signal <= 0:
            return 0.0
        if self.layer is None:
            d = self.w - np.asarray(decoded, np.float64).ravel()
            return float(d @ d) / self.signal
        decoded = np.asarray(decoded, np.float32)
        d = self.w - (self.layer.weight_matrix(decoded) if self.rows is None else decoded)
        return sum(float(np.einsum("ij,ij->", d[rows] @ h, d[rows], dtype=np.float64))
                   for rows, h in self.parts) / self.signal


def row_sample(array: np.ndarray) -> np.ndarray | None:
    """Every k-th block of SAMPLE_BLOCK rows (axis 0) of a tensor over SAMPLE_ABOVE entries, about SAMPLE_ENTRIES
    entries in all (deterministic); None for a smaller one. A candidate coded on it predicts the whole one's: the
    layer error (H = I) as it is, the bytes scaled by the entries."""
    if array.size <= SAMPLE_ABOVE or array.ndim < 2:
        return None
    rows = array.shape[0]
    step = max(1, -(-array.size // SAMPLE_ENTRIES))  # one block in `step`
    starts = np.arange(0, rows, SAMPLE_BLOCK * step)
    picked = (starts[:, None] + np.arange(SAMPLE_BLOCK)).ravel()
    return np.ascontiguousarray(array[picked[picked < rows]])


def channel_rows(count: int) -> np.ndarray | None:
    """PREDICT_ROWS evenly spaced rows of a channel-first matrix of `count` rows past twice that many, else None:
    a weight with layer statistics is fit, coded and priced on them for its prediction (bitprune.sampled_candidate)."""
    if count <= 2 * PREDICT_ROWS:
        return None
    return np.unique(np.linspace(0, count - 1, PREDICT_ROWS).astype(np.int64))


def small_weights(sizes: list[int]) -> set[int]:
    """Indices of the smallest weights (by bytes, ties by index) whose bytes add up to at most SMALL_SHARE of all."""
    budget, small = SMALL_SHARE * sum(sizes), set()
    for i in sorted(range(len(sizes)), key=lambda i: (sizes[i], i)):
        budget -= sizes[i]
        if budget < 0:
            break
        small.add(i)
    return small


def anchors(entries: list[Entry]) -> list[int]:
    """Indices of the entries measured first: all of a small grid, else those at the ANCHORS quantiles of log e."""
    valid = [j for j, e in enumerate(entries) if e.candidate.error is None]
    if len(valid) <= MEASURE_ALL:
        return valid
    noisy = sorted((j for j in valid if entries[j].error > 0), key=lambda j: (entries[j].error, j))
    if not noisy:
        return valid[:1]
    return sorted({noisy[min(int(q * len(noisy)), len(noisy) - 1)] for q in ANCHORS})


def _interpolate(xs: np.ndarray, ys: np.ndarray, x: float) -> float:
    """ys at x, linear between the points (xs sorted), constant beyond them."""
    return float(np.interp(x, xs, ys))


def _log_ratio(entries: list[Entry], value: Callable[[Candidate], float], keep=lambda c: True, per_error=True):
    """(log e, log value/e, or log value) of the weight's measured candidates with e > 0 that `keep` keeps,
    sorted by e."""
    points = sorted((math.log(e.error), math.log(max(value(e.candidate), TINY) / (e.error if per_error else 1.0)))
                    for e in entries if e.measured and e.candidate.error is None and e.error > 0 and keep(e.candidate))
    if not points:
        return None
    xs, ys = zip(*points)
    return np.array(xs), np.array(ys)


def estimates(table: list[list[Entry]], counted: bool, resolution: float) -> list[list[tuple[int, Candidate]]]:
    """Per weight, (index, candidate with measured or predicted cost, nsr and task_nsr) of its valid entries.

    Measured counted costs get the floor of floor_disagreement (factor * sqrt(nsr)) as the search will."""
    ratios = [(c.cost / math.sqrt(c.nsr)) for layer in table for e in layer
              for c in [e.candidate] if e.measured and c.error is None and c.cost >= resolution and c.nsr > 0]
    factor = float(np.median(ratios)) if ratios else 0.0
    out = []
    for layer in table:
        task = _log_ratio(layer, lambda c: c.task_nsr)
        nsr = _log_ratio(layer, lambda c: c.nsr)
        flips = _log_ratio(layer, lambda c: c.cost / math.sqrt(c.nsr), lambda c: c.cost >= resolution and c.nsr > 0,
                           per_error=False) if counted else None
        rows = []
        for j, e in enumerate(layer):
            c = e.candidate
            if c.error is not None:
                continue
            if e.measured:
                est = Candidate(c.sparsity, c.bits, c.size, c.cost, c.nsr, c.task_nsr)
            else:
                x = math.log(max(e.error, TINY))
                est = Candidate(c.sparsity, c.bits, c.size)
                est.nsr = e.error * math.exp(_interpolate(*nsr, x)) if nsr and e.error > 0 else 0.0
                est.task_nsr = e.error * math.exp(_interpolate(*task, x)) if task and e.error > 0 else est.nsr
                if counted:
                    k = math.exp(_interpolate(*flips, x)) if flips else factor
                    est.cost = k * math.sqrt(est.nsr)
                else:
                    est.cost = est.nsr
            if counted:
                est.cost = max(est.cost, factor * math.sqrt(max(est.nsr, 0.0)))
            rows.append((j, est))
        out.append(rows)
    return out


def noise_levels(noise: list[list[allocate.Option]], choices: list[list[int] | None]) -> list[float]:
    """Budgets of summed task noise from half the least to twice the most noise of `choices`, a factor 4 apart:
    where the search's noise ladder walks between configurations that met the budget and ones that did not."""
    sums = [allocate.totals(noise, c)[1] for c in choices if c is not None]
    low, high = min((n for n in sums if n > 0), default=0.0), max(sums, default=0.0)
    if low <= 0:
        return []
    return list(low / 2 * 4.0 ** np.arange(int(np.ceil(np.log(4 * high / low) / np.log(4))) + 1))


def _capped(table: list[list[Entry]], rows, choices, cap: int) -> list[tuple[int, int]]:
    """The unmeasured (weight, entry) pairs the allocations pick, allocation by allocation in the given order
    (nearest the budget first), stopping after the allocation that brings them to `cap`: each round measures
    where the search will land, and the gains measured there re-aim the allocations further out."""
    new: dict[tuple[int, int], None] = {}
    for choice in choices:
        if choice is None:
            continue
        new.update(((i, r[k][0]), None) for i, (r, k) in enumerate(zip(rows, choice)) if not table[i][r[k][0]].measured)
        if len(new) >= cap:
            break
    return sorted(new)


def measure_together(table: list[list[Entry]], group: list[int], names: list[str], measure: Callable[[dict], dict],
                     code: Callable[[int], list | None]) -> dict | None:
    """The single candidates of the weights in `group` measured in ONE run with all of them changed, not a run each.
    Each allocation must take all of them, so only their sum counts: the first carries the run's cost and noise,
    the others none (a decision the group changes is counted once, its noise is the sum of theirs). `code(i)`: weight
    i's versions (None: its candidate failed); `measure(changed by name)`: the run's scores. Returns the scores, or
    None where nothing was measured (the run failed: the sweep then measures them one by one)."""
    group = [i for i in group if len(table[i]) == 1 and table[i][0].candidate.error is None]
    if len(group) < 2:
        return None
    changed = {names[i]: versions for i in group if (versions := code(i)) is not None}
    try:
        measured = measure(changed) if changed else None
    except RecipeError:  # the user's metric failed: no candidate can be measured
        raise
    except OnnxCompressError as e:
        log.debug("bitwidth: the smallest weights' joint run failed (%s); measured one by one", e)
        return None
    if measured is None:
        return None
    lead = next(i for i in group if names[i] in changed)
    for i in group:
        candidate = table[i][0].candidate
        if names[i] not in changed:  # its coding failed (its error recorded by `code`)
            continue
        first = i == lead
        candidate.cost = max(measured["cost"], 0.0) if first else 0.0
        candidate.nsr = measured["nsr"] if first else 0.0
        candidate.task_nsr = measured.get("task_nsr", measured["nsr"]) if first else 0.0
        candidate.group = names[lead]
        table[i][0].measured = True
    return measured


def sweep(table: list[list[Entry]], measure: Callable[[int, int], None],
          landings: Callable[[list, list], list[list[int] | None]], counted: Callable[[], bool],
          resolution: float) -> int:
    """Measure anchors, then every candidate the allocations pick, until they pick measured ones only.

    `measure(i, j)` measures entry j of weight i in place (its candidate's cost, nsr, task_nsr or error);
    `landings(options, noise)` returns the allocations of the pass over per-weight allocate.Options
    priced by cost and by task noise, nearest the budget first: a round measures the new picks of the
    nearest ones up to one candidate per weight (_capped); `counted()` tells whether the costs measured so
    far count decisions.
    Returns the number of rounds."""
    for i, layer in enumerate(table):
        for j in anchors(layer):
            if not layer[j].measured:  # measured already: with others in one run (bitwidth._measure_together)
                measure(i, j)
                layer[j].measured = True
    for rounds in range(1, MAX_ROUNDS + 1):
        rows = estimates(table, counted(), resolution)
        if any(not r for r in rows):
            return rounds
        options = [[allocate.Option(c.size, c.cost, {"index": j}) for j, c in r] for r in rows]
        noise = [[allocate.Option(c.size, c.task_nsr, {"index": j}) for j, c in r] for r in rows]
        new = _capped(table, rows, landings(options, noise), max(len(table), 1))
        log.debug("bitwidth: round %d of the predicted sweep measures %d picked candidates", rounds, len(new))
        if not new:
            return rounds
        for i, j in new:
            measure(i, j)
            table[i][j].measured = True
    log.info("bitwidth: the predicted sweep stopped after %d rounds with candidates still unmeasured", MAX_ROUNDS)
    return MAX_ROUNDS
