"""What the bit-width search simulates and measures (runtime layer): candidate weights pruned and coded
as the prune and share passes would, their stored bytes in the output form, and one onnxruntime
session in which the searched weights are inputs, scoring each candidate's effect at the outputs.
"""
from __future__ import annotations

import copy
import importlib
import logging
import time
from dataclasses import dataclass

import numpy as np
import onnx

from onnxcompress.errors import OnnxCompressError, RecipeError
from onnxcompress.formats.forms import Form
from onnxcompress.formats.packed import choose_layout, estimated_ans_bytes, write_blob
from onnxcompress.graph.data import Dataset, model_inputs
from onnxcompress.graph.stream import StateCarry
from onnxcompress.graph.weights import get_array, WeightInfo
from onnxcompress.pipeline.artifacts import Budget
from onnxcompress.runtime.metrics import compare_outputs
from onnxcompress.runtime.statistics import Collector
from onnxcompress.runtime.suffix import downstream, Suffix, SuffixRunner
from onnxcompress.runtime.tasks import is_builtin, parse_metric, resolve_kinds

log = logging.getLogger(__name__)
# below this many searched weight entries a whole-model run costs less than building a suffix session
SUFFIX_MIN_ELEMENTS = 1_000_000
SUFFIX_BYTES = 512 << 20  # cut values of the suffixes kept at once (each at most SuffixRunner's max_bytes)
SUFFIX_SESSIONS = 12  # suffix sessions kept at once by a sparing evaluator (orinet's 12 weights)
INDEX_WIDTHS = (4, 5, 8)  # relative-index widths a candidate's packed price tries


@dataclass
class Candidate:
    sparsity: float
    bits: int
    size: int = 0
    cost: float = 0.0
    nsr: float = 0.0  # output noise-to-signal ratio of the candidate alone
    task_nsr: float = 0.0  # the same summed over the budgeted outputs, each relative to its own signal
    error: str | None = None
    # measured in one run with other weights' candidates (bitwidth._measure_together): the weight whose candidate
    # carries that run's cost and noise (the others carry none)
    group: str | None = None


class Evaluator:
    """One session in which the searched weights are inputs (the statistics collector's); scores feeds of
    candidate weights."""

    def __init__(self, model: onnx.ModelProto, weights: list[WeightInfo], data: Dataset, score,
                 collector: Collector | None = None, *, suffix_min_elements: int = SUFFIX_MIN_ELEMENTS):
        self.data, self.score = data, score
        self.specs = model_inputs(model)
        self.model = weights_as_inputs(model, weights)
        # the same graph as the collector's other sessions of this model when every weight is an initializer
        self.names = [o.name for o in model.graph.output]
        self.runner = (collector or Collector()).runner(self.model, self.names, also=[w.name for w in weights])
        self.base = {w.name: get_array(model, w) for w in weights}
        self.collector, self.suffix_min_elements = collector, suffix_min_elements
        # the predicted sweep's: a weight's suffix only from its second run, none where it holds over half the
        # nodes, at most SUFFIX_SESSIONS kept (then the current one)
        self.sparing = False
        self._start(list(data.chunks(self.specs)), None)

    def _start(self, chunks: list[tuple[dict, int]], folds: list[int] | None) -> None:
        """Run the reference over `chunks` (chunk i scored with cross-fitted version folds[i]; default i)."""
        self.chunks, self.folds = chunks, folds or list(range(len(chunks)))
        self.suffixes: SuffixRunner | None = None
        self._suffix: dict[str, Suffix | None] = {}  # the suffixes kept (None: the whole model runs)
        self._current: tuple[str, Suffix] | None = None  # the last one built, past SUFFIX_BYTES
        self._seen: dict[str, int] = {}  # single-weight runs asked for per weight (with `sparing`)
        start = time.process_time()
        self.reference = self.outputs({})
        self.run_seconds = time.process_time() - start  # CPU s of one run of the whole model over the data
        # one weight changed (the sweep): only the nodes downstream of it run (onnxcompress.runtime.suffix),
        # where the model is large enough for the runs saved to outweigh a session per weight's suffix
        # (not for a stream: a weight's change reaches every later call through the states)
        if self.data.stream is None and sum(int(np.size(a)) for a in self.base.values()) >= self.suffix_min_elements:
            self.suffixes = SuffixRunner(self.model, [feed for feed, _ in self.chunks], self.names, self.reference,
                                         self.base, collector=self.collector, folds=self.folds)

    def part(self, samples: int) -> "Evaluator | None":
        """The same evaluator on about `samples` of its samples, for single-weight runs (the predicted sweep);
        None where it has no more (or is a stream, whose calls carry states).

        Chunks of several samples keep their first rows, chunks of one sample every k-th of them: a chunk
        keeps its position, so it is scored by the cross-fitted version that did not learn from it."""
        total = len(self.data)
        if self.data.stream is not None or total <= samples:
            return None
        starts = np.cumsum([0] + [n for _, n in self.chunks])
        if all(n == 1 for _, n in self.chunks):
            step = -(-total // samples)
            kept = [(i, self.chunks[i][0], 1) for i in range(0, len(self.chunks), step)]
        else:
            per = -(-samples // len(self.chunks))
            kept = [(i, {k: v[:per] for k, v in feed.items()}, min(per, n)) for i, (feed, n) in enumerate(self.chunks)]
        picks = np.concatenate([starts[i] + np.arange(n) for i, _, n in kept])
        labels = None if self.data.labels is None else self.data.labels[picks]
        if self.data.stacked is not None:
            data = Dataset(stacked={k: v[picks] for k, v in self.data.stacked.items()}, labels=labels)
        else:
            data = Dataset([self.data.feed(int(i), self.specs) for i in picks], labels=labels)
        fewer = copy.copy(self)
        fewer.data = data
        fewer._start([(feed, n) for _, feed, n in kept], [i for i, _, _ in kept])
        return fewer

    def outputs(self, changed: dict[str, list[np.ndarray]]) -> list[list[np.ndarray]]:
        """Outputs per data chunk with the weights in `changed` replaced.

        Each changed weight is a list: one array for every chunk, or k cross-fitted versions,
        version f fit without the chunks of fold f (chunk i is in fold i % k, as the layer
        statistics count them), so chunk i runs with version i % k and every sample is scored
        by a weight that did not learn from it."""
        if len(changed) == 1 and self.suffixes is not None:
            (name, versions), = changed.items()
            suffix = self._suffix_of(name)
            if suffix is not None:
                return suffix(versions)
        outputs = []
        carry = StateCarry(self.data.stream)  # a stream's calls run in order, each fed this version's states
        for i, (feed, _) in enumerate(self.chunks):
            fold = self.folds[i]
            weights = {**self.base, **{name: versions[fold % len(versions)] for name, versions in changed.items()}}
            values = self.runner.run(carry.feed(i, feed), weights, keep=carry.outputs).values
            carry.keep(values)
            outputs.append([values[n] for n in self.names])
        return outputs

    def _suffix_of(self, name: str) -> Suffix | None:
        """The weight's suffix runner: built on first use and kept while the kept ones' cut values fit SUFFIX_BYTES
        (first come: the sweep's rounds visit the weights in turn, where dropping the least recently used would
        drop the next one needed); past that, kept while the calls stay on this weight."""
        if name in self._suffix:
            return self._suffix[name]
        if self._current is not None and self._current[0] == name:
            return self._current[1]
        if self.sparing:  # a suffix session costs a few runs and ~100-300 MB (the MiniLM-like model's)
            self._seen[name] = self._seen.get(name, 0) + 1
            if self._seen[name] == 1:  # the whole model for a weight's first run: many are measured once only
                return None
            if self._seen[name] == 2 and 2 * len(downstream(self.model.graph, {name})[0]) > len(self.model.graph.node):
                self._suffix[name] = None  # most of the model: it would save little
                return None
        try:
            suffix = self.suffixes.for_weight(name)
        except Exception as e:  # noqa: BLE001 - the whole model still runs: the suffix only saves time
            log.debug("bitwidth: no suffix for %s (%s); the whole model runs", name, e)
            suffix = None
        held = sum(s.nbytes for s in self._suffix.values() if s is not None)
        kept = sum(s is not None for s in self._suffix.values())
        if suffix is None or held + suffix.nbytes <= SUFFIX_BYTES and not (self.sparing and kept >= SUFFIX_SESSIONS):
            self._suffix[name] = suffix
        else:
            self._current = (name, suffix)
        return suffix

    def measure(self, changed: dict[str, list[np.ndarray]]) -> dict[str, float]:
        return self.score(self.names, self.reference, self.outputs(changed), self.data)


def weights_as_inputs(model: onnx.ModelProto, weights: list[WeightInfo]) -> onnx.ModelProto:
    """A copy where each searched weight is a main-graph input (subgraphs read it from the outer scope).

    The model is copied once and the weights deleted from the copy in place: rebuilding a graph's initializer
    list per weight copied every other weight's bytes each time (a 22M-weight transformer: 2.2 GB of RSS left
    behind by 99 rebuilds of its 88 MB)."""
    from onnxcompress.graph.edit import find_graph

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    elems = {}
    for info in weights:  # the declared input type: the array's (get_array's for types numpy has no name for)
        known = {"float32": np.float32, "float16": np.float16, "float64": np.float64}.get(info.dtype)
        elems[info.name] = onnx.helper.np_dtype_to_tensor_dtype(
            np.dtype(known if known is not None else get_array(model, info).dtype))
    for path in dict.fromkeys(info.graph for info in weights):
        graph = find_graph(copy, path)
        here = [info for info in weights if info.graph == path]
        inits = {info.name for info in here if info.location == "initializer"}
        for k in reversed([k for k, t in enumerate(graph.initializer) if t.name in inits]):
            del graph.initializer[k]
        consts = {info.name for info in here if info.location != "initializer"}
        for k in reversed([k for k, n in enumerate(graph.node) if n.op_type == "Constant" and n.output[0] in consts]):
            del graph.node[k]
    for info in weights:
        copy.graph.input.append(onnx.helper.make_tensor_value_info(info.name, elems[info.name], list(info.shape)))
    return copy


def _power(arrays) -> float:
    """The summed squares of the arrays' values in float64 (bool and integer outputs too: a mask, a count)."""
    return float(sum(np.sum(np.square(np.asarray(a, np.float64))) for a in arrays))


def make_score(budget: Budget, labels_present: bool, producers: dict[str, str] | None = None):
    """The loss function: returns {"cost": additive loss for allocation, "check": budgeted quantity}.

    Decisions are counted by each output's task kind (tasks.py: the one `budget.metric` names, else
    detected): the budget holds the worst agreement over the budgeted outputs."""
    task = parse_metric(budget.metric) if is_builtin(budget.metric) else None
    user = load_metric(budget.metric) if budget.metric and task is None else None
    kinds_of: dict[int, dict] = {}  # the reference is the same list on every call of one search

    def score(names, reference, candidate, data) -> dict[str, float]:
        kinds = kinds_of.setdefault(id(reference), resolve_kinds(names, reference, producers, task))
        metrics = compare_outputs(names, reference, candidate, data.labels, kinds=kinds)
        counted = [m for m in metrics if m.budgeted and m.agreement is not None]
        if not counted and user is None and budget.min_sqnr is None:  # only numbers out (a denoiser's frames and
            # states): points of samples whose outputs leave the regression tolerance, not an NSR read as points
            counted = [m for m in metrics if m.agreement is not None and kinds[m.name].kind == "regression"]
        signals = [_power(c[k] for c in reference) for k in range(len(names))]
        noises = [_power(np.asarray(r[k], np.float64) - np.asarray(c[k], np.float64)
                         for r, c in zip(reference, candidate)) for k in range(len(names))]
        signal, noise = sum(signals), sum(noises)
        nsr = noise / signal if signal > 0 else 0.0
        out = {"nsr": nsr, "sqnr_db": 10 * np.log10(1 / nsr) if nsr > 0 else float("inf")}
        # the noise of the outputs the budget counts, each relative to its own signal (a box output is not
        # drowned by a larger unbudgeted one); noise powers of independent errors add up across weights
        budgeted = {m.name for m in counted}
        out["task_nsr"] = sum(n / s for name, s, n in zip(names, signals, noises) if name in budgeted and s > 0) \
            if budgeted else nsr
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
        elif budget.min_sqnr is not None or not counted:
            out["cost"], out["check"] = nsr, nsr
        else:  # decisions counted on the data: zero until one flips (see floor_disagreement)
            estimated = budget.unlabelled == "expected" and "expected_drop" in out
            out["cost"] = out["expected_drop"] if estimated else out["disagree"]
            out["check"] = out["drop"] if labels_present and "drop" in out else out["cost"]
            out["counted"] = True
        return out

    return score


def load_metric(spec: str):
    module, sep, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name) if sep else None
    except Exception as e:  # the user's module: not found, or failing as it is imported
        raise RecipeError(f"cannot load metric '{spec}': {type(e).__name__}: {e}") from e
    if fn is None or not callable(fn):
        raise RecipeError(f"metric '{spec}' must name a function as module:function")

    def metric(outputs, data) -> float:
        try:
            value = float(fn(outputs, data))
        except Exception as e:  # the user's function failed or returned no number: theirs to fix
            raise RecipeError(f"metric '{spec}' failed: {type(e).__name__}: {e}") from e
        if not np.isfinite(value):
            raise RecipeError(f"metric '{spec}' returned {value}; it must return a finite number")
        return value

    return metric


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


def stored_bytes(shared, form: Form) -> int:
    """Measured bytes of one candidate in the chosen form (packed: the encoded blob).

    For speed the sweep codes with ANS only and tries three relative-index widths; the entropy
    pass later tries every coder and width, so the stored size can only come out smaller.
    """
    if form == Form.PORTABLE:
        return shared.payload_bytes()
    layout = choose_layout(shared, candidates=INDEX_WIDTHS, methods=("ans",))
    return len(write_blob(shared, layout, methods=("ans",)).blob)


def predicted_bytes(shared, form: Form) -> int:
    """:func:`stored_bytes` for a candidate priced but maybe never measured: in the packed form estimated from the
    codes' counts without coding (formats.packed.estimated_ans_bytes: a few bytes above the coded size)."""
    if form == Form.PORTABLE:
        return shared.payload_bytes()
    return estimated_ans_bytes(shared, candidates=INDEX_WIDTHS)


def failed(info: WeightInfo, candidate: Candidate, error: OnnxCompressError) -> None:
    """A candidate that failed is data: its error recorded, the sweep goes on."""
    candidate.error = str(error)
    log.warning("bitwidth: %s at sparsity %.2f, %d bits failed: %s", info.name, candidate.sparsity, candidate.bits,
                error)
