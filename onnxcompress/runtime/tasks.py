"""What "the same answer" means for one output: its task kind, detected or named by the user.

A model's outputs are not all class scores. Each output gets one kind, and each kind its own
agreement between a reference and a candidate, a fraction in [0, 1]:

- top1: class scores or logits (last axis >= 2): the argmax at every position is the same.
- probability[:T]: probabilities of independent events (a sigmoid; values in [0, 1], last axis
  1 or none): the decision p >= T (default 0.5) is the same, element by element.
- embedding: float vectors (the last axis) compared by nearest neighbour: row i agrees when its
  nearest other row (cosine) is the same in both; with fewer than three rows, cosine >= 0.99.
- sequence: per-step class scores [batch, steps, classes] (a tagger): a sample agrees when its
  whole argmax sequence is the same.
- ctc[:BLANK]: per-step class scores decoded greedily (argmax, repeats merged, blank dropped;
  blank index default 0, negative counts from the end): a sample agrees when its text is the same.
  Detected for per-step scores whose class 0 or last class wins at least half the steps (a recognizer's
  blank), unless the model reads integer inputs (token ids: a tagger's). Per-step scores declared
  time-major, [steps, batch, classes] (a CTC loss's layout: the batch dimension is axis 1), are read so.
- regression[:TOL[:GATE]]: numbers: a sample (a row along the first axis) agrees when its RMS error
  is at most TOL (default 0.05) times the reference's RMS over the whole output. With GATE (another
  output's name) only the rows the reference says hold an object count, as a detector's boxes matter
  only where it detects: GATE's top-1 class is not class 0 (class scores), or its probability is at
  least its threshold (0.5 unless GATE is measured as `probability:T`).

A user names a kind as `KIND[:PARAM][@OUTPUT[+OUTPUT...]]` (e.g. `probability:0.5@activation`);
without @ it applies to every output it fits, with @ only the named outputs count toward a
budget. Several outputs of different kinds: parts joined by commas, each naming its outputs
(`top1@scores,regression:0.2@boxes`): a sample agrees on each output by that output's kind, and a
budget holds every named output. Without a name each output's kind is detected from its values
and the op producing it (looked through ops that only move values: a recurrent state or a Concat of
parts made by different ops, a detector's boxes beside its scores, is compared as numbers).
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from onnxcompress.errors import RecipeError
from onnxcompress.runtime.producers import CARRIED, SWISH, Producers, output_producers  # noqa: F401 (re-exported)

Kind = Literal["top1", "probability", "embedding", "sequence", "ctc", "regression"]
KINDS: tuple[str, ...] = ("top1", "probability", "embedding", "sequence", "ctc", "regression")
EMBEDDING_PRODUCERS = frozenset({"LayerNormalization", "ReduceMean", "ReduceSum", "ReduceL2", "Div",
                                 "LpNormalization", "GlobalAveragePool"})
# producers of states and features, never class scores: a recurrent layer's Y/Y_h/Y_c, a Tanh; and "Concat" for a
# Concat joining parts made by different ops (output_producers)
# activations no logit comes out of (non-negative, clipped or smoothed features: a mel spectrogram's Clip, an
# encoder's Relu): numbers, unless their values say probability
FEATURE_PRODUCERS = frozenset({"Relu", "LeakyRelu", "PRelu", "Clip", "Sqrt", "Pow", "Abs", "Softplus", "Elu", "Selu",
                               "Celu", "HardSwish", "Mish", "Gelu", SWISH})
STATE_PRODUCERS = frozenset({"LSTM", "GRU", "RNN", "DynamicQuantizeLSTM", "Tanh", "Concat", CARRIED})
MAX_NEIGHBOUR_ROWS = 4096  # nearest-neighbour agreement on at most this many rows (evenly spaced)


@dataclass(frozen=True)
class TaskMetric:
    """A kind named by the user (chosen) for some or all outputs."""

    kind: Kind
    threshold: float = 0.5  # probability
    blank: int = 0  # ctc
    tolerance: float = 0.05  # regression
    gate: str | None = None  # regression: the output whose reference decision selects the rows that count
    outputs: tuple[str, ...] = ()  # empty: every output the kind fits
    others: tuple["TaskMetric", ...] = ()  # the further comma-separated parts, each naming its outputs
    time_major: bool = False  # sequence, ctc: the steps are axis 0 and the batch axis 1 (output_producers)

    def describe(self) -> str:
        param = {"probability": f":{self.threshold:g}", "ctc": f":{self.blank}",
                 "regression": f":{self.tolerance:g}" + (f":{self.gate}" if self.gate else "")}.get(self.kind, "")
        own = self.kind + param + (f"@{'+'.join(self.outputs)}" if self.outputs else "")
        return ",".join([own] + [o.describe() for o in self.others])

    def parts(self) -> tuple["TaskMetric", ...]:
        return (self, *self.others)

    def for_output(self, name: str) -> "TaskMetric | None":
        """The part that names `name`, else the part naming no output (it fits any), else None."""
        parts = [p for p in self.parts() if name in p.outputs] or [p for p in self.parts() if not p.outputs]
        return parts[0] if parts else None


@dataclass(frozen=True)
class OutputKind:
    """The kind one output is measured by, and whether it counts toward a loss budget."""

    kind: Kind
    metric: TaskMetric = field(default_factory=lambda: TaskMetric("top1"))
    chosen: bool = False  # named by the user, else detected
    budgeted: bool = True

    def describe(self) -> str:
        shown = self.metric.describe() if self.chosen or self.kind == "ctc" else self.kind
        major = " time-major" if self.metric.time_major else ""
        return f"{shown}{major} ({'chosen' if self.chosen else 'detected'})"


def is_builtin(spec: str | None) -> bool:
    """True when `spec` names a built-in kind (else it may be a user's module:function)."""
    return bool(spec) and spec.split("@")[0].split(":")[0].strip() in KINDS


def parse_metric(spec: str) -> TaskMetric:
    """`KIND[:PARAM][@OUTPUT[+OUTPUT...]]`, e.g. 'probability:0.5', 'ctc:0', 'embedding@pooled'; several
    parts joined by commas, each naming its outputs ('top1@scores,regression:0.2@boxes')."""
    if "," in spec:
        parts = [_parse_part(p) for p in spec.split(",")]
        if any(not p.outputs for p in parts):
            raise RecipeError(f"metric '{spec}': with several comma-separated kinds each must name its outputs "
                              "(KIND@OUTPUT)")
        named = [o for p in parts for o in p.outputs]
        if len(named) != len(set(named)):
            raise RecipeError(f"metric '{spec}' names an output twice")
        return TaskMetric(parts[0].kind, parts[0].threshold, parts[0].blank, parts[0].tolerance, parts[0].gate,
                          parts[0].outputs, tuple(parts[1:]))
    return _parse_part(spec)


def _parse_part(spec: str) -> TaskMetric:
    head, _, where = spec.partition("@")
    kind, _, param = head.strip().partition(":")
    if kind not in KINDS:
        raise RecipeError(f"unknown metric kind '{kind}': use one of {', '.join(KINDS)} (or module:function)")
    outputs = tuple(o for o in where.split("+") if o) if where else ()
    if param and kind not in ("probability", "ctc", "regression"):
        raise RecipeError(f"metric '{kind}' takes no parameter, got '{param}'")
    try:
        if kind == "probability":
            value = float(param) if param else 0.5
            if not 0.0 < value < 1.0:
                raise ValueError("the threshold must lie strictly between 0 and 1")
            return TaskMetric(kind, threshold=value, outputs=outputs)
        if kind == "ctc":
            return TaskMetric(kind, blank=int(param) if param else 0, outputs=outputs)
        if kind == "regression":
            tolerance, _, gate = param.partition(":")
            value = float(tolerance) if tolerance else 0.05
            if not value > 0 or not math.isfinite(value):
                raise ValueError("the tolerance must be a positive number")
            return TaskMetric(kind, tolerance=value, gate=gate or None, outputs=outputs)
    except ValueError as e:
        raise RecipeError(f"metric '{spec}': {e}") from e
    return TaskMetric(kind, outputs=outputs)


def _floating(chunks: Sequence[np.ndarray]) -> bool:
    return bool(chunks) and all(np.issubdtype(np.asarray(c).dtype, np.floating) for c in chunks)


def detect_kind(chunks: Sequence[np.ndarray], producer: str | None = None) -> Kind | None:
    """The kind of an output from its reference values (chunks along the batch) and its producing op;
    None for outputs that are not floating point (compared exactly elsewhere)."""
    if not _floating(chunks):
        return None
    first = np.asarray(chunks[0])
    finite = [np.asarray(c)[np.isfinite(c)] for c in chunks]
    in_unit = all(f.size == 0 or (f.min() >= 0 and f.max() <= 1) for f in finite)
    last = first.shape[-1] if first.ndim else 1
    if producer in ("Softmax", "LogSoftmax") and last >= 2:
        return "sequence" if first.ndim == 3 else "top1"
    if producer == "Sigmoid" or (in_unit and (first.ndim <= 1 or last == 1)):
        return "probability"
    if in_unit and last >= 2 and not all(np.allclose(np.asarray(c).sum(-1), 1.0, atol=1e-3) for c in chunks):
        return "probability"  # independent sigmoids side by side, not one distribution
    if producer in STATE_PRODUCERS or producer in FEATURE_PRODUCERS:
        return "regression"  # a state, joined parts or features: no axis of it is one decision
    if producer in EMBEDDING_PRODUCERS and first.ndim >= 2 and last >= 8:
        return "embedding"
    if first.ndim == 3 and last >= 2:
        return "sequence"
    if first.ndim >= 2 and last >= 2:
        return "top1"
    return "regression"


CTC_BLANK_SHARE = 0.5  # a blank wins at least this share of the steps of a CTC recognizer's output


def ctc_blank(chunks: Sequence[np.ndarray]) -> int | None:
    """The blank of per-step class scores [batch, steps, classes] read as CTC: class 0 (else the last, as -1) when
    it is the argmax at >= CTC_BLANK_SHARE of all steps, as a recognizer's blank is between and around characters;
    None otherwise (fewer than 3 classes or 2 steps too)."""
    first = np.asarray(chunks[0])
    if first.ndim != 3 or first.shape[-1] < 3 or first.shape[1] < 2:
        return None
    winners = np.concatenate([np.asarray(c).argmax(-1).ravel() for c in chunks])
    if winners.size == 0:
        return None
    share = {0: float(np.mean(winners == 0)), -1: float(np.mean(winners == first.shape[-1] - 1))}
    blank = max(share, key=share.get)
    return blank if share[blank] >= CTC_BLANK_SHARE else None


def fits(kind: Kind, chunks: Sequence[np.ndarray]) -> bool:
    """Whether a chosen kind can measure this output."""
    if not _floating(chunks):
        return False
    first = np.asarray(chunks[0])
    if kind == "probability":
        return all(np.asarray(c).size == 0 or np.nanmin(c) >= 0 and np.nanmax(c) <= 1 for c in chunks)
    if kind in ("top1", "embedding"):
        return first.ndim >= 1 and first.shape[-1] >= 2
    if kind in ("sequence", "ctc"):
        return first.ndim >= 2 and first.shape[-1] >= 2
    return True


def resolve_kinds(names: Sequence[str], reference: list[list[np.ndarray]], producers: dict[str, str] | None = None,
                  task: TaskMetric | None = None) -> dict[str, OutputKind]:
    """One OutputKind per output that has one: the chosen kind where it applies, else the detected one.
    With a chosen kind naming outputs, only those count toward a budget."""
    producers = producers or {}
    naming = task is not None and any(p.outputs for p in task.parts())
    if naming:
        missing = sorted({o for p in task.parts() for o in p.outputs} - set(names))
        if missing:
            raise RecipeError(f"metric '{task.describe()}' names outputs the model does not have: {missing}; "
                              f"its outputs are {list(names)}")
    gates = sorted({p.gate for p in task.parts() if p.gate} - set(names)) if task is not None else []
    if gates:
        raise RecipeError(f"metric '{task.describe()}' gates rows by outputs the model does not have: {gates}; "
                          f"its outputs are {list(names)}")
    kinds = {}
    for k, name in enumerate(names):
        chunks = [np.asarray(chunk[k]) for chunk in reference]
        part = task.for_output(name) if task is not None else None
        major = name in getattr(producers, "time_major", ()) and all(c.ndim == 3 for c in chunks)
        if part is not None and fits(part.kind, chunks):
            stepped = major and part.kind in ("sequence", "ctc")
            kinds[name] = OutputKind(part.kind, replace(part, time_major=True) if stepped else part, chosen=True)
            continue
        if part is not None and part.outputs:
            raise RecipeError(f"metric '{part.kind}' cannot measure output '{name}' "
                              f"(shape {chunks[0].shape}, {chunks[0].dtype})")
        detected = detect_kind(chunks, producers.get(name))
        steps = [c.swapaxes(0, 1) for c in chunks] if major else chunks  # batch first
        blank = ctc_blank(steps) if detected == "sequence" and not getattr(producers, "reads_ids", False) else None
        if blank is not None:
            kinds[name] = OutputKind("ctc", TaskMetric("ctc", blank=blank, time_major=major), chosen=False,
                                     budgeted=not naming)
        elif detected is not None:
            # with outputs named, the others are reported but not budgeted; a detected regression is
            # budgeted by its SQNR, not by a tolerance nobody chose
            budgeted = not naming and detected != "regression"
            metric = TaskMetric(detected, time_major=major and detected == "sequence")
            kinds[name] = OutputKind(detected, metric, chosen=False, budgeted=budgeted)
    return kinds


def present_rows(gate: Sequence[np.ndarray], kind: OutputKind | None = None) -> list[np.ndarray]:
    """Per chunk, the rows (first axis) where the reference output `gate` says an object is there: its top-1
    class is not class 0 at some position (class scores), or a probability reaches the threshold."""
    threshold = kind.metric.threshold if kind is not None and kind.kind == "probability" else 0.5
    rows = []
    for chunk in gate:
        arr = np.asarray(chunk, dtype=np.float64)
        arr = arr.reshape(arr.shape[0], -1, arr.shape[-1]) if arr.ndim >= 2 else arr.reshape(-1, 1, 1)
        scores = (kind is None or kind.kind != "probability") and arr.shape[-1] >= 2
        rows.append(np.any(arr.argmax(-1) != 0, axis=1) if scores else np.any(arr >= threshold, axis=(1, 2)))
    return rows


def batch_first(kind: OutputKind, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """`arrays` with their samples along axis 0: a time-major output's [steps, batch, classes] swapped, so that a
    sample is a column of steps (TaskMetric.time_major); others as they are."""
    if kind.metric.time_major and kind.kind in ("sequence", "ctc"):
        return [a.swapaxes(0, 1) for a in arrays]
    return list(arrays)


def agreement(kind: OutputKind, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray],
              rows: Sequence[np.ndarray] | None = None) -> float | None:
    """The fraction of the task's answers that are the same (see the module docstring); None when
    there is nothing to compare. `rows` (per chunk, a regression's gate: present_rows) selects the rows that count."""
    m = kind.metric
    refs = batch_first(kind, [np.asarray(r, dtype=np.float64) for r in reference])
    cands = batch_first(kind, [np.asarray(c, dtype=np.float64) for c in candidate])
    if not refs or sum(r.size for r in refs) == 0:
        return None
    if kind.kind == "top1":
        same = [r.argmax(-1) == c.argmax(-1) for r, c in zip(refs, cands)]
    elif kind.kind == "probability":
        same = [(r >= m.threshold) == (c >= m.threshold) for r, c in zip(refs, cands)]
    elif kind.kind == "sequence":
        same = [np.all((r.argmax(-1) == c.argmax(-1)).reshape(r.shape[0], -1), axis=1) for r, c in zip(refs, cands)]
    elif kind.kind == "ctc":
        same = [np.array([ctc_greedy(a, m.blank) == ctc_greedy(b, m.blank) for a, b in zip(step_samples(r), step_samples(c))])
                for r, c in zip(refs, cands)]
    elif kind.kind == "embedding":
        return neighbour_agreement(np.concatenate([r.reshape(-1, r.shape[-1]) for r in refs]),
                                   np.concatenate([c.reshape(-1, c.shape[-1]) for c in cands]))
    else:
        scale = math.sqrt(sum(float(np.sum(r * r)) for r in refs) / sum(r.size for r in refs))
        same = []
        for i, (r, c) in enumerate(zip(refs, cands)):
            error = (r - c).reshape(r.shape[0], -1) if r.ndim >= 2 else (r - c).reshape(-1, 1)
            ok = np.sqrt(np.mean(error * error, axis=1)) <= m.tolerance * scale
            if rows is not None:
                if rows[i].shape[0] != ok.shape[0]:
                    raise RecipeError(f"metric '{m.describe()}': the gate has {rows[i].shape[0]} rows where the "
                                      f"output has {ok.shape[0]}; gate by an output with one row per sample")
                ok = ok[rows[i]]
            same.append(ok)
    flat = np.concatenate([np.asarray(s).ravel() for s in same])
    return float(np.mean(flat)) if flat.size else None


def step_samples(scores: np.ndarray) -> list[np.ndarray]:
    """[batch, steps, classes] -> one [steps, classes] per sample; [steps, classes] is one sample."""
    return [scores] if scores.ndim == 2 else list(scores.reshape(-1, *scores.shape[-2:]))


def ctc_greedy(scores: np.ndarray, blank: int = 0) -> tuple[int, ...]:
    """Greedy CTC decoding of [steps, classes]: argmax per step, repeats merged, blanks dropped."""
    path = np.asarray(scores).argmax(-1)
    blank = blank % np.asarray(scores).shape[-1]
    keep = np.ones(path.size, dtype=bool)
    keep[1:] = path[1:] != path[:-1]
    return tuple(int(p) for p in path[keep] if p != blank)


def neighbour_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Fraction of rows whose nearest other row by cosine is the same in both sets of vectors."""
    if reference.shape[0] > MAX_NEIGHBOUR_ROWS:
        pick = np.linspace(0, reference.shape[0] - 1, MAX_NEIGHBOUR_ROWS).astype(np.int64)
        reference, candidate = reference[pick], candidate[pick]
    if reference.shape[0] < 3:
        num = np.sum(reference * candidate, axis=1)
        den = np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)
        cos = np.where(den > 0, num / np.where(den > 0, den, 1), 1.0)
        return float(np.mean(cos >= 0.99))

    return float(np.mean(_nearest(reference, remember=True) == _nearest(candidate)))


_remembered: list = []  # [(digest, nearest rows)] of the last reference: a search scores many candidates against it


def _nearest(x: np.ndarray, *, remember: bool = False) -> np.ndarray:
    """Each row's nearest other row by cosine; with `remember`, kept for the next call with the same values (by a
    digest of the bytes): a rows x rows product a candidate need not pay twice."""
    if remember:
        x = np.ascontiguousarray(x)
        digest = hashlib.blake2b(memoryview(x).cast("B"), digest_size=16).digest() + repr((x.shape, x.dtype.str)).encode()
        if _remembered and _remembered[0][0] == digest:
            return _remembered[0][1]
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    found = sim.argmax(1)
    if remember:
        _remembered[:] = [(digest, found)]
    return found
