"""The one statistics collector: what every pass asks of the model's tensors, in as few runs as it can.

Runtime layer. A pass asks for what it needs as reducers, each a tensor name and what to keep of it
per data chunk: :class:`Extremes` (min and max, reduced inside onnxruntime so only two scalars come
back), :class:`Histogram`, :class:`ChannelMeans`, a layer's Gram matrices with their mean row, folds
and a bounded sample of raw rows (``capture.LayerInputs``). :meth:`Collector.gather` packs all the
reducers it is given into ONE run over the data when their state fits in ``max_bytes`` (2 GB), else
cuts them, in order, into runs that each do (the same results, more runs). :meth:`Collector.stream`
yields the raw values chunk by chunk for the consumers that pair two models on the same chunk (paired
Gram matrices, per-layer errors), and :meth:`Collector.runner` runs one chunk with some weights
swapped (output gains, the bit-width search).

Sessions. A model is split into its graph and its weights: every float initializer of the main graph
that is not tiny becomes a graph input fed at run time (:func:`weights_as_inputs`). So one session
serves every model with the same graph (the original, its pruned copy, a copy with one weight
swapped for a probe), and it is cached per graph for the collector's life (one compression run:
``Context.statistics``). A cached session exposes the union of the tensors asked of its graph so
far; a request for a tensor it lacks rebuilds it once with the union. ``fixed_weights=True`` keeps
the weights constant instead (onnxruntime folds and prepacks them, as a deployed session computes;
calibration uses it): such sessions are keyed by the weights' bytes too.

Weights fed as inputs take other onnxruntime kernels than constant ones: at ORT_ENABLE_ALL a Conv with a
constant weight runs in the NCHWc layout and a constant GEMM operand is prepacked, neither of which a fed
weight gets. A layer's input after them differs from the constant-weight session's by rounding (LeNet-5:
fc1's Gram matrix 1.2e-7 relative, fc2's codebook from `share --data` at the last ulp); the collector's
own arithmetic is c7d67f3's (test_statistics pins it). ``fixed_weights=True`` for the Gram matrices and
paired captures gives c7d67f3's `share` output on LeNet-5 byte for byte, at the price of a session per
distinct set of weights (share 9 -> 10 sessions; deep-compression's prune refits one per layer again).
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import numpy as np
import onnx
from onnx import TensorProto

from onnxcompress.errors import ModelError
from onnxcompress.graph.data import Dataset, model_inputs
from onnxcompress.graph.stream import StateCarry
from onnxcompress.graph.edit import NameScope
from onnxcompress.numerics.quantmath import StreamingHistogram
from onnxcompress.runtime.sessions import detached, first_line, make_session

log = logging.getLogger(__name__)

# the reducers' state in one run over the data (Gram matrices and row samples of the layers gathered
# together); more than this takes more runs
MAX_STATS_BYTES = 2 << 30
# float initializers with fewer elements stay in the graph (scalars, epsilons, small shapes)
MIN_INPUT_ELEMENTS = 16
_FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE}


@dataclass
class Chunk:
    """One chunk of data through the model: the tensors asked for, and (min, max) of those reduced."""

    values: dict[str, np.ndarray]
    extremes: dict[str, tuple[float, float]] = field(default_factory=dict)
    samples: int = 0


class Reducer(Protocol):
    """What to keep of one tensor, chunk by chunk."""

    tensor: str
    wants_values: bool  # the tensor itself comes back
    wants_extremes: bool  # its min and max, reduced in onnxruntime

    @property
    def nbytes(self) -> int:
        """About the bytes of the reducer's state (the memory bound packs runs by it)."""

    def add(self, chunk: Chunk) -> None: ...


@dataclass
class Extremes:
    """The observed range of a tensor; only two scalars per chunk leave onnxruntime."""

    tensor: str
    low: float = np.inf
    high: float = -np.inf
    wants_values: ClassVar[bool] = False
    wants_extremes: ClassVar[bool] = True
    nbytes: ClassVar[int] = 16

    def add(self, chunk: Chunk) -> None:
        lo, hi = chunk.extremes[self.tensor]
        self.low, self.high = min(self.low, lo), max(self.high, hi)


class Histogram:
    """A fixed-size histogram of a tensor (:class:`quantmath.StreamingHistogram`), with its extremes."""

    wants_values: ClassVar[bool] = True
    wants_extremes: ClassVar[bool] = True

    def __init__(self, tensor: str, bins: int = 2048):
        self.tensor, self.histogram = tensor, StreamingHistogram(bins)

    @property
    def nbytes(self) -> int:
        return 8 * self.histogram.bins

    def add(self, chunk: Chunk) -> None:
        value = chunk.values[self.tensor]
        if value.size:
            self.histogram.update(value, minmax=chunk.extremes[self.tensor])


class ChannelMeans:
    """Mean of a tensor per index of one axis (a layer input's channels)."""

    wants_values: ClassVar[bool] = True
    wants_extremes: ClassVar[bool] = False

    def __init__(self, tensor: str, axis: int):
        self.tensor, self.axis = tensor, axis
        self.sums: np.ndarray | float = 0.0
        self.count = 0

    @property
    def nbytes(self) -> int:
        return 8 * int(np.size(self.sums)) if self.count else 8 << 10

    def add(self, chunk: Chunk) -> None:
        self.sums, self.count = channel_sums(chunk.values[self.tensor], self.axis, self.sums, self.count)

    @property
    def mean(self) -> np.ndarray | None:
        return self.sums / self.count if self.count else None


def channel_sums(x: np.ndarray, axis: int, sums, count: int) -> tuple[np.ndarray, int]:
    """(sums + sum of x over every axis but `axis`, count + the rows summed), in float64."""
    moved = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    flat = moved.reshape(-1, moved.shape[-1])
    return sums + flat.sum(axis=0), count + flat.shape[0]


def pack_runs(items: Sequence, size_of, budget: int) -> list[list]:
    """`items` in order, cut into runs whose sizes add up to at most `budget` (an item larger than
    the budget runs on its own)."""
    runs, current, used = [], [], 0
    for item in items:
        size = size_of(item)
        if current and used + size > budget:
            runs.append(current)
            current, used = [], 0
        current.append(item)
        used += size
    return runs + ([current] if current else [])


def weights_as_inputs(model: onnx.ModelProto, also: Iterable[str] = ()) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A copy of `model` without its weights' bytes, each weight a main-graph input, and the weights.

    Weights: the initializers :func:`runtime.detached` takes out, every float one of at least
    MIN_INPUT_ELEMENTS entries, and those named in `also`. Subgraphs read them from the outer scope.
    """
    also = set(also) | {t.name for t in model.graph.initializer if t.data_type in _FLOATS
                        and int(np.prod(t.dims)) >= MIN_INPUT_ELEMENTS}
    light, arrays = detached(model, also=also)
    return _inputs_for(light, arrays, also), arrays


# ops whose first input is a layer's input rows (Gram matrices, mean rows, bias correction)
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN")


def layer_inputs(model: onnx.ModelProto) -> set[str]:
    """The first inputs of the main graph's layers (LAYER_OPS), what the statistics are mostly about,
    and the graph's outputs."""
    return ({n.input[0] for n in model.graph.node if n.op_type in LAYER_OPS and n.input and n.input[0]}
            | {o.name for o in model.graph.output})


@dataclass
class _Session:
    session: object
    outputs: frozenset[str]
    reduced: dict[str, tuple[str, str]]  # tensor -> (its ReduceMin output, its ReduceMax output)
    seconds: float = 0.0  # spent in its runs so far
    samples: int = 0  # run so far


class Runner:
    """One model's session in the collector and the weights to feed it (see :meth:`Collector.runner`)."""

    def __init__(self, entry: _Session, model: onnx.ModelProto, weights: dict[str, np.ndarray], names: list[str],
                 extremes: list[str]):
        self.entry, self.weights, self.names, self.extremes = entry, weights, names, extremes
        self.specs = model_inputs(model)
        self._fetch = list(names) + [r for t in extremes for r in entry.reduced[t]]

    def run(self, feed: dict[str, np.ndarray], swapped: dict[str, np.ndarray] | None = None, *,
            source: str = "the data", count: int = 0, keep: Sequence[str] = ()) -> Chunk:
        """The chunk `feed` (of `count` samples, when counted in the session's cost) through the model, with
        the weights in `swapped` replaced; graph outputs in `keep` (a stream's states) come back too."""
        start = time.perf_counter()
        kept = [k for k in keep if k not in self.names]
        try:
            out = self.entry.session.run(self._fetch + kept, {**feed, **self.weights, **(swapped or {})})
        except Exception as e:  # onnxruntime raises its own exception types
            raise ModelError(f"onnxruntime failed on {source}: {first_line(e)}") from e
        if count:
            self.entry.seconds += time.perf_counter() - start
            self.entry.samples += count
        count = len(self.names)
        values = dict(zip(self.names, out[:count]))
        values.update(zip(kept, out[len(self._fetch):]))
        lows, highs = out[count:len(self._fetch):2], out[count + 1:len(self._fetch):2]
        return Chunk(values, {t: (float(lo), float(hi)) for t, lo, hi in zip(self.extremes, lows, highs)})

    def chunks(self, data: Dataset, *, max_batch: int = 64, workers: int = 1,
               swapped: dict[str, np.ndarray] | None = None) -> Iterator[Chunk]:
        """Every chunk of `data` in order, up to `workers` of them in flight (each a single-threaded
        call: small models keep two cores busier so); memory holds at most `workers` chunks' values."""
        samples = max(1, -(-max_batch // workers))
        feeds = data.chunks(self.specs, max_batch=samples)
        source = getattr(data, "source", None) or "the data"
        if getattr(data, "stream", None) is not None:  # call by call, each carrying this model's states to the next
            carry = StateCarry(data.stream)
            for i, (feed, count) in enumerate(feeds):
                chunk = self.run(carry.feed(i, feed), swapped, source=source, count=count, keep=carry.outputs)
                carry.keep(chunk.values)
                yield _counted(chunk, count)
            return
        if workers == 1:
            for feed, count in feeds:
                yield _counted(self.run(feed, swapped, source=source, count=count), count)
            return
        with ThreadPoolExecutor(workers) as pool:
            pending: deque = deque()
            for feed, count in feeds:
                pending.append((pool.submit(self.run, feed, swapped, source=source, count=count), count))
                if len(pending) >= workers:
                    future, count = pending.popleft()
                    yield _counted(future.result(), count)
            while pending:
                future, count = pending.popleft()
                yield _counted(future.result(), count)


def _counted(chunk: Chunk, count: int) -> Chunk:
    chunk.samples = count
    return chunk


class Collector:
    """Sessions per model graph, cached for one compression run, and the runs over the data."""

    def __init__(self, *, max_bytes: int = MAX_STATS_BYTES, keep: int = 4):
        self.max_bytes = max_bytes
        self.keep = keep  # sessions cached at once (least recently used dropped)
        self._sessions: OrderedDict[tuple, _Session] = OrderedDict()
        self.built = 0  # sessions built so far
        self.runs = 0  # passes over the data by gather

    def runner(self, model: onnx.ModelProto, names: Sequence[str] = (), *, extremes: Sequence[str] = (),
               also: Iterable[str] = (), fixed_weights: bool = False, optimize: bool = True,
               threads: int | None = None) -> Runner:
        """A runner of `model` returning the main-graph tensors `names` and the (min, max) of
        `extremes`. Weights named in `also` can be swapped at run time even with fixed_weights."""
        names, extremes = list(dict.fromkeys(names)), list(dict.fromkeys(extremes))
        key, light, arrays, fed = self._key(model, also, fixed_weights, optimize, threads)
        entry = self._sessions.get(key)
        if entry is None or not (set(names) <= entry.outputs and set(extremes) <= set(entry.reduced)):
            # every layer's input, asked for or not: the passes after this one ask for them one by one
            outputs = set(names) | (entry.outputs if entry else layer_inputs(light))
            reduced = set(extremes) | set(entry.reduced if entry else ())
            if fixed_weights:  # a session with constant weights holds them: keep one such session at a time
                for stale in [k for k in self._sessions if k[1] is not None and k != key]:
                    del self._sessions[stale]
            entry = self._build(light, outputs, reduced, optimize=optimize, threads=threads, arrays=arrays)
            self._sessions[key] = entry
        self._sessions.move_to_end(key)
        while len(self._sessions) > self.keep:
            self._sessions.popitem(last=False)
        return Runner(entry, model, fed, names, extremes)

    def seconds_per_sample(self, model: onnx.ModelProto) -> float | None:
        """What a sample has cost in runs of `model`'s cached session (weights fed, as :meth:`stream` runs it);
        None before it has run."""
        entry = self._sessions.get(self._key(model, (), False, True, None)[0])
        return entry.seconds / entry.samples if entry is not None and entry.samples else None

    @staticmethod
    def _key(model: onnx.ModelProto, also: Iterable[str], fixed_weights: bool, optimize: bool, threads: int | None):
        """(the cache key of model's session, its graph as run, constant weights, weights to feed)."""
        if fixed_weights:
            light, arrays = detached(model, also=set(also))
            swappable = {n: arrays.pop(n) for n in set(also) & set(arrays)}
            light = _inputs_for(light, swappable, also)
            digest = hashlib.sha256()
            for name in sorted(arrays):
                digest.update(name.encode())
                digest.update(np.ascontiguousarray(arrays[name]).tobytes())
            weights_key, fed = digest.hexdigest(), swappable
        else:
            light, fed = weights_as_inputs(model, also)
            weights_key, arrays = None, None
        key = (hashlib.sha256(light.SerializeToString()).hexdigest(), weights_key, optimize, threads)
        return key, light, arrays, fed

    def _build(self, light: onnx.ModelProto, outputs: set[str], reduced: set[str], *, optimize: bool,
               threads: int | None, arrays) -> _Session:
        exposed = onnx.ModelProto()
        exposed.CopyFrom(light)
        scope = NameScope(exposed)
        names = {}
        for tensor in sorted(reduced):
            lo, hi = scope.fresh(f"{tensor}_calib_min"), scope.fresh(f"{tensor}_calib_max")
            exposed.graph.node.extend([
                onnx.helper.make_node("ReduceMin", [tensor], [lo], keepdims=0, name=scope.fresh(f"{tensor}_ReduceMin")),
                onnx.helper.make_node("ReduceMax", [tensor], [hi], keepdims=0, name=scope.fresh(f"{tensor}_ReduceMax"))])
            names[tensor] = (lo, hi)
        present = {o.name for o in exposed.graph.output}
        extra = sorted(outputs) + [r for pair in names.values() for r in pair]
        exposed.graph.output.extend(onnx.ValueInfoProto(name=n) for n in extra if n not in present)
        session = make_session(exposed, optimize=optimize, threads=threads, arrays=arrays)
        self.built += 1
        log.debug("statistics: session %d, %d tensors exposed, %d reduced", self.built, len(outputs), len(reduced))
        return _Session(session, frozenset(outputs), names)

    def stream(self, model: onnx.ModelProto, data: Dataset, names: Sequence[str], *, max_batch: int = 64,
               swapped: dict[str, np.ndarray] | None = None, fixed_weights: bool = False
               ) -> Iterator[dict[str, np.ndarray]]:
        """Per chunk of `data`, the values of the main-graph tensors `names` (weights in `swapped` replaced;
        fixed_weights as :meth:`runner`)."""
        runner = self.runner(model, names, also=swapped or (), fixed_weights=fixed_weights)
        for chunk in runner.chunks(data, max_batch=max_batch, swapped=swapped):
            yield chunk.values

    def gather(self, model: onnx.ModelProto, data: Dataset, reducers: Sequence[Reducer], *, max_batch: int = 64,
               fixed_weights: bool = False, optimize: bool = True, workers: int = 1, progress=None) -> None:
        """Feed every chunk of `data` to `reducers`: one run when their state fits in max_bytes, else
        one run per cut of them that does. fixed_weights, optimize: as :meth:`runner`; workers > 1
        runs that many single-threaded calls at once."""
        for cut in pack_runs(list(reducers), lambda r: r.nbytes, self.max_bytes):
            runner = self.runner(model, [r.tensor for r in cut if r.wants_values],
                                 extremes=[r.tensor for r in cut if r.wants_extremes], fixed_weights=fixed_weights,
                                 optimize=optimize, threads=1 if workers > 1 else None)
            self.runs += 1
            for chunk in runner.chunks(data, max_batch=max_batch, workers=workers):
                for reducer in cut:
                    reducer.add(chunk)
                if progress is not None:
                    progress.update(1)


def _inputs_for(light: onnx.ModelProto, arrays: dict[str, np.ndarray], also: Iterable[str] = ()) -> onnx.ModelProto:
    """`light` with the detached initializers named in `arrays` turned into graph inputs, listed with
    the inputs named in `also` after the others in name order (so one graph, whichever of its weights
    were inputs already, is one session)."""
    weights = set(arrays) | set(also)
    if not weights:
        return light
    declared = {t.name: onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                for t in light.graph.initializer if t.name in arrays}
    declared.update({i.name: i for i in light.graph.input if i.name in weights})
    kept = [t for t in light.graph.initializer if t.name not in arrays]
    inputs = [i for i in light.graph.input if i.name not in weights] + [declared[n] for n in sorted(declared)]
    del light.graph.initializer[:]
    light.graph.initializer.extend(kept)
    del light.graph.input[:]
    light.graph.input.extend(inputs)
    return light
