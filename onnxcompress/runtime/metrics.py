"""Fidelity of a compressed model against its original, on the same data, in onnxruntime."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from onnxcompress.graph.data import Dataset, model_inputs
from onnxcompress.errors import DataError, ModelError, printable
from onnxcompress.numerics.measures import sqnr_db
from onnxcompress.runtime.sessions import make_session, median_latency, run
from onnxcompress.runtime.tasks import (OutputKind, TaskMetric, agreement, batch_first, ctc_greedy, output_producers,
                                        present_rows, resolve_kinds, step_samples)


@dataclass
class OutputMetrics:
    """How one output of the candidate differs from the reference's.

    sqnr_db = 10 log10(sum ref^2 / sum (ref - cand)^2); rel_l2 = ||ref - cand|| / ||ref||.
    Class-score outputs (float, rank >= 2, last axis >= 2) also get top-1 agreement over every
    position (argmax along the last axis), and accuracy against labels when given.

    expected_loss estimates the accuracy lost without labels: taking the reference's own class
    probabilities as the distribution of the true label, a position whose top-1 moves from class
    a to class b loses p(a) - p(b) of a correct answer in expectation, and one that keeps its
    top-1 loses nothing. It is unbiased when the reference is calibrated; a changed decision on
    a confident sample costs nearly a whole sample, one between two likely classes little.
    """

    name: str
    max_abs: float
    rel_l2: float
    cosine: float
    sqnr_db: float
    top1_agreement: float | None = None
    accuracy_reference: float | None = None
    accuracy_candidate: float | None = None
    expected_loss: float | None = None
    outside_tolerance: int | None = None  # values with |cand - ref| > atol + rtol |ref|, when a tolerance is given
    task: str | None = None  # the kind it is measured by, e.g. "probability:0.5 (chosen)" (see tasks.py)
    agreement: float | None = None  # the fraction of the task's answers that stayed the same
    budgeted: bool = False  # whether a loss budget counts this output's agreement
    one_answer: bool = False  # the reference gave every input the same answer: the agreement says little


@dataclass
class Comparison:
    outputs: list[OutputMetrics]
    samples: int
    synthetic_data: bool = False
    reference_bytes: int | None = None
    candidate_bytes: int | None = None
    latency_reference_s: float | None = None
    latency_candidate_s: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def size_ratio(self) -> float | None:
        if self.reference_bytes and self.candidate_bytes:
            return self.reference_bytes / self.candidate_bytes
        return None

    @property
    def latency_ratio(self) -> float | None:
        if self.latency_reference_s and self.latency_candidate_s:
            return self.latency_candidate_s / self.latency_reference_s
        return None

    @property
    def accuracy_drop(self) -> float | None:
        """Percentage points lost on the first output that has accuracy."""
        for out in self.outputs:
            if out.accuracy_reference is not None:
                return 100.0 * (out.accuracy_reference - out.accuracy_candidate)
        return None

    @property
    def expected_drop(self) -> float | None:
        """Estimated percentage points of accuracy lost (the worst output's expected_loss), without labels;
        None when a budgeted output is measured by another kind than top-1 (its agreement counts instead)."""
        if any(o.budgeted and not (o.task or "").startswith("top1") for o in self.outputs) or self._numbers_only():
            return None
        values = [o.expected_loss for o in self.outputs if o.expected_loss is not None]
        return 100.0 * max(values) if values else None

    def worst_agreement(self) -> float | None:
        """The least task agreement over the budgeted outputs (top-1 agreement where no kind applies)."""
        values = [o.agreement for o in self.outputs if o.budgeted and o.agreement is not None]
        if not values and self._numbers_only():  # within each regression's tolerance, as the search counts them
            values = [o.agreement for o in self.outputs if o.agreement is not None]
        if not values:
            values = [o.top1_agreement for o in self.outputs if o.top1_agreement is not None]
        return min(values) if values else None

    def _numbers_only(self) -> bool:
        """No output budgeted and some measured as regression: a denoiser's frames and states, whose argmax (a
        top-1 over feature bins) means nothing."""
        return not any(o.budgeted for o in self.outputs) and any((o.task or "").startswith("regression")
                                                                 for o in self.outputs)

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(size_ratio=self.size_ratio, latency_ratio=self.latency_ratio, accuracy_drop_points=self.accuracy_drop,
                   expected_drop_points=self.expected_drop)
        return out


def _is_class_scores(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.floating) and array.ndim >= 2 and array.shape[-1] >= 2


def class_probabilities(scores: np.ndarray) -> np.ndarray | None:
    """Probabilities along the last axis: the scores themselves when every row is already a
    distribution, else their softmax (logits, log-probabilities). None for scores in [0, 1] that
    do not sum to 1 (independent sigmoids), which are not one distribution over classes."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0 or not np.all(np.isfinite(s)):
        return None
    if s.min() >= 0 and s.max() <= 1:
        return s if np.allclose(s.sum(-1), 1.0, atol=1e-3) else None
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def expected_loss(reference: list[np.ndarray], ref_top: np.ndarray, cand_top: np.ndarray) -> float | None:
    """Mean over positions of p(reference top-1) - p(candidate top-1), p the reference's probabilities
    (chunks of class scores; the top-1 classes of every position, chunks concatenated)."""
    rows = []
    for r in reference:
        p = class_probabilities(r)
        if p is None:
            return None
        rows.append(p.reshape(-1, p.shape[-1]))
    if not rows or ref_top.size == 0:
        return None
    p = np.concatenate(rows)
    index = np.arange(p.shape[0])
    return float(np.mean(p[index, ref_top] - p[index, cand_top]))


def compare_outputs(names: Sequence[str], reference: list[list[np.ndarray]], candidate: list[list[np.ndarray]],
                    labels: np.ndarray | None = None, tolerance: tuple[float, float] | None = None, *,
                    kinds: dict[str, OutputKind] | None = None) -> list[OutputMetrics]:
    """Metrics per output over all chunks; chunks may differ in shape (never stacked).
    tolerance (atol, rtol): also count the values numpy.isclose(cand, ref, rtol, atol) refuses (NaN
    matches NaN). `kinds` (default: detected from the reference's values, see tasks.resolve_kinds)
    says what agreement means per output."""
    kinds = resolve_kinds(names, reference) if kinds is None else kinds
    results, out_of_range = [], []
    for k, name in enumerate(names):
        refs = [np.asarray(chunk[k]) for chunk in reference]
        cands = [np.asarray(chunk[k]) for chunk in candidate]
        for r, c in zip(refs, cands):
            if r.shape != c.shape:
                raise ModelError(f"output '{name}' has shape {c.shape} in the candidate but {r.shape} in the reference")
        ref, cand = _flat_numbers(refs, cands)
        metric = _numeric(name, ref, cand)
        if tolerance is not None:
            atol, rtol = tolerance
            metric.outside_tolerance = int(np.count_nonzero(~np.isclose(cand, ref, rtol=rtol, atol=atol,
                                                                        equal_nan=True)))
        if refs and all(_is_class_scores(r) for r in refs):
            ref_top = np.concatenate([r.argmax(-1).ravel() for r in refs])
            cand_top = np.concatenate([c.argmax(-1).ravel() for c in cands])
            metric.top1_agreement = float(np.mean(ref_top == cand_top)) if ref_top.size else None
            metric.expected_loss = expected_loss(refs, ref_top, cand_top)
            if labels is not None and labels.size == ref_top.size:
                truth = labels.ravel()
                classes = refs[0].shape[-1]
                if truth.size and truth.max() >= classes:  # not this output's classes: no accuracy here
                    out_of_range.append(f"'{printable(name, newlines=False)}' scores {classes}")
                else:
                    metric.accuracy_reference = float(np.mean(ref_top == truth))
                    metric.accuracy_candidate = float(np.mean(cand_top == truth))
        if name in kinds:
            metric.task, metric.budgeted = kinds[name].describe(), kinds[name].budgeted
            gate = kinds[name].metric.gate if kinds[name].kind == "regression" else None
            rows = present_rows([chunk[names.index(gate)] for chunk in reference], kinds.get(gate)) if gate else None
            metric.agreement = agreement(kinds[name], refs, cands, rows)
            metric.one_answer = metric.agreement is not None and one_answer(kinds[name], refs)
        results.append(metric)
    if out_of_range and all(m.accuracy_reference is None for m in results):
        # labels of classes no output has matched no argmax: the accuracy was silently lower, --max-drop meaningless
        raise DataError(f"the labels hold class {int(labels.max())}, but output {' and '.join(out_of_range)} "
                        "classes (numbered from 0): the labels are not this model's")
    return results


def one_answer(kind: OutputKind, reference: Sequence[np.ndarray]) -> bool:
    """Whether the reference gives every input the same answer: no probability crosses its threshold (or all do),
    one class wins everywhere, one path or text for every sample. An agreement over such inputs (a text detector
    or recognizer fed noise, which holds no text) says only that the candidate gives that answer too, not that it
    keeps the task. Embeddings and regressions have no one answer: never."""
    refs = batch_first(kind, [np.asarray(r, dtype=np.float64) for r in reference if np.asarray(r).size])
    if not refs or kind.kind in ("embedding", "regression"):
        return False
    if kind.kind == "probability":
        decided = np.concatenate([(r >= kind.metric.threshold).ravel() for r in refs])
        return bool(decided.all() or not decided.any())
    if kind.kind == "top1":
        winners = np.concatenate([r.argmax(-1).ravel() for r in refs])
        return bool(np.all(winners == winners[0]))
    per_sample = [s for r in refs for s in step_samples(r)]
    if kind.kind == "ctc":
        return len({ctc_greedy(s, kind.metric.blank) for s in per_sample}) == 1
    return len({tuple(s.argmax(-1).ravel()) for s in per_sample}) == 1


def _flat_numbers(refs: list[np.ndarray], cands: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Both sides' values as flat float64 arrays; values that are no numbers (string outputs) become the
    index of their value among both sides' values, so they compare exactly as integers do."""
    ref = np.concatenate([r.ravel() for r in refs]) if refs else np.zeros(0)
    cand = np.concatenate([c.ravel() for c in cands]) if cands else np.zeros(0)
    if ref.dtype.kind in "biuf" and cand.dtype.kind in "biuf":
        return ref.astype(np.float64), cand.astype(np.float64)
    _, codes = np.unique(np.concatenate([ref.astype(str), cand.astype(str)]), return_inverse=True)
    return codes[:ref.size].astype(np.float64), codes[ref.size:].astype(np.float64)


def _numeric(name: str, ref: np.ndarray, cand: np.ndarray) -> OutputMetrics:
    finite = np.isfinite(ref) & np.isfinite(cand)
    ref, cand = ref[finite], cand[finite]
    if ref.size == 0:
        return OutputMetrics(name, 0.0, 0.0, 1.0, math.inf)
    diff = ref - cand
    signal, noise = float(ref @ ref), float(diff @ diff)
    norm = math.sqrt(signal) * math.sqrt(float(cand @ cand))
    return OutputMetrics(
        name=name,
        max_abs=float(np.max(np.abs(diff))),
        rel_l2=math.sqrt(noise / signal) if signal > 0 else (0.0 if noise == 0 else math.inf),
        cosine=float(ref @ cand) / norm if norm > 0 else (1.0 if noise == 0 else 0.0),
        sqnr_db=sqnr_db(signal, noise),
    )


def compare_models(reference: onnx.ModelProto, candidate: onnx.ModelProto, data: Dataset, *,
                   latency: bool = False, max_batch: int = 64, progress=None,
                   tolerance: tuple[float, float] | None = None, task: TaskMetric | None = None) -> Comparison:
    """Run both models on the same feeds and compare every output (tolerance: see compare_outputs);
    `task` is the kind the user chose (default: each output's kind detected)."""
    specs = model_inputs(reference)
    data.check(specs)
    ref_session, cand_session = make_session(reference), make_session(candidate)
    names = [o.name for o in ref_session.get_outputs()]
    cand_names = {o.name for o in cand_session.get_outputs()}
    if set(names) != cand_names:
        raise ModelError(f"the models have different outputs: {sorted(names)} vs {sorted(cand_names)}")
    ref_out = run(ref_session, data, reference, max_batch=max_batch, output_names=names, progress=progress)
    cand_out = run(cand_session, data, candidate, max_batch=max_batch, output_names=names, progress=progress)
    kinds = resolve_kinds(names, ref_out, output_producers(reference), task)
    comparison = Comparison(compare_outputs(names, ref_out, cand_out, data.labels, tolerance, kinds=kinds), len(data),
                            data.synthetic)
    if latency:
        feed = data.feed(0, specs)
        # interleave so both see the same machine state
        ref_times, cand_times = [], []
        for _ in range(3):
            ref_times.append(median_latency(ref_session, feed, repeat=10))
            cand_times.append(median_latency(cand_session, feed, repeat=10))
        comparison.latency_reference_s = float(np.median(ref_times))
        comparison.latency_candidate_s = float(np.median(cand_times))
    return comparison
