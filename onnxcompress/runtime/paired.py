"""Paired captures: one layer's input rows in the model being compressed and, on the same rows, in a
reference (the original), reduced to the Gram matrices a layer-wise fit needs (:class:`PairedGrams`).

The current model changes as its layers are coded, so it runs again for every layer (on a costly model,
only the nodes between the values held from the layers before and the layer's input: runtime.segments);
the reference does not: :class:`ReferenceRows` takes the reference's rows of all the layers a pass will fit in ONE run over
the data (kept in memory up to REFERENCE_BYTES) and every layer's capture pairs with them. Layers that read
the same rows (a transformer's query, key and value) also share the current model's run and Gram matrices
while the part of the current model that computes their input is unchanged (:meth:`ReferenceRows.grams_key`).
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxcompress.errors import ModelError
from onnxcompress.graph.data import Dataset
from onnxcompress.graph.edit import upstream_model
from onnxcompress.numerics.row_blocks import RowBlocks
from onnxcompress.runtime.capture import LinearLayer, row_length
from onnxcompress.runtime.segments import SegmentValues
from onnxcompress.runtime.statistics import Collector

CUT_SECONDS = 1.0  # a pass over the data through the whole model longer than this: layers' inputs from a cut model
# and paired captures stopped at enough rows: ROWS_PER_INPUT per entry of the layer's input row (K), at least
# MIN_PAIRED_ROWS, from the first of SPREAD_PARTS interleaved parts of the data (part p: samples p, p + 16, ...;
# at least two data chunks): before, orinet's captures ran all 128 pages of 320 x 320 (up to 10^7 rows a layer) to
# keep 2048 rows from each of their two chunks, 4096 in all; now 4096-4608 rows from 16-24 pages, 2048 a chunk.
# More rows (4 K, at least 8192) cost more in Gram products (three K x K ones a chunk) than they saved in runs
ROWS_PER_INPUT = 2
MIN_PAIRED_ROWS = 4096
SPREAD_PARTS = 16
# the reference's rows kept for the layers of one pass (in the input's own precision); a layer whose rows
# would pass the bound is dropped from the pass (largest first) and captured on its own, as before
REFERENCE_BYTES = 1 << 30
# paired Gram matrices kept for the next layers reading the same rows (the most recent ones: a pass fits its
# layers in graph order, so the layers sharing an input come one after the other)
KEPT_GRAMS = 4


@dataclass
class PairedGrams:
    """Gram matrices of one layer's input rows in the current model (X_c) and a reference model (X_r).

    Per group g, averaged over rows: current[g] = X_c^T X_c, cross[g] = X_c^T X_r,
    reference[g] = X_r^T X_r. Without a reference, cross and reference are None (X_r = X_c).
    The same rows are sampled from both models (same data chunk, same random pick).
    """

    layer: LinearLayer
    current: list[np.ndarray]
    cross: list[np.ndarray] | None
    reference: list[np.ndarray] | None
    count: int
    current_mean: list[np.ndarray] | None = None  # per group, mean input row of X_c
    reference_mean: list[np.ndarray] | None = None  # per group, mean input row of X_r (None: X_r = X_c)
    # the same statistics over two disjoint halves of the rows (alternate data chunks), to choose
    # regularization by held-out error; None unless asked for and the data has two chunks or more
    folds: tuple["PairedGrams", "PairedGrams"] | None = None

    def fold_groups(self, group: int) -> tuple[tuple, tuple] | None:
        """((H, C, R) of fold A, (H, C, R) of fold B) for one group, or None without folds."""
        if self.folds is None:
            return None
        return tuple((f.current[group], None if f.cross is None else f.cross[group],
                      None if f.reference is None else f.reference[group]) for f in self.folds)


class _GramSums:
    """Running sums of X_c^T X_c, X_c^T X_r, X_r^T X_r and the mean rows, per group."""

    def __init__(self, rows: list[np.ndarray], paired: bool):
        self.h = [np.zeros((g.shape[1], g.shape[1])) for g in rows]
        self.mc = [np.zeros(g.shape[1]) for g in rows]
        self.mr = [np.zeros(g.shape[1]) for g in rows]
        self.c = [np.zeros_like(x) for x in self.h] if paired else None
        self.r = [np.zeros_like(x) for x in self.h] if paired else None
        self.count = 0
        self._blocks = RowBlocks(self._add_products)

    def add(self, current: list[np.ndarray], reference: list[np.ndarray] | None) -> None:
        for g, xc in enumerate(current):
            self.mc[g] += xc.sum(axis=0)
            if reference is not None:
                self.mr[g] += reference[g].sum(axis=0)
        self._blocks.add(*current, *(reference or ()))
        self.count += current[0].shape[0]

    def _add_products(self, *rows: np.ndarray) -> None:
        """Rows of the current model per group, then (paired) the reference's."""
        groups = len(self.h)
        for g, xc in enumerate(rows[:groups]):
            self.h[g] += xc.T @ xc
            if self.c is not None:
                xr = rows[groups + g]
                self.c[g] += xc.T @ xr
                self.r[g] += xr.T @ xr

    def minus(self, other: "_GramSums") -> "_GramSums":
        self._blocks.flush()
        other._blocks.flush()
        out = object.__new__(_GramSums)
        sub = lambda a, b: None if a is None else [x - y for x, y in zip(a, b)]  # noqa: E731
        out.h, out.mc, out.mr, out.c, out.r = (sub(self.h, other.h), sub(self.mc, other.mc),
                                               sub(self.mr, other.mr), sub(self.c, other.c), sub(self.r, other.r))
        out.count = self.count - other.count
        out._blocks = RowBlocks(out._add_products)
        return out

    def averaged(self, layer: LinearLayer, paired: bool, folds=None) -> PairedGrams:
        """The sums divided by the row count, in place: the sums are not used after (a 6912-input conv's nine paired
        K x K, 3.4 GB with folds, are not copied)."""
        self._blocks.flush()
        scale = 1.0 / max(self.count, 1)

        def norm(mats):
            for m in mats or ():
                m *= scale
            return mats
        return PairedGrams(layer, norm(self.h), norm(self.c), norm(self.r), self.count, norm(self.mc),
                           norm(self.mr) if paired else None, folds)


class ReferenceRows:
    """The reference model's sampled input rows of many layers, from one pass over the data, for
    :func:`collect_paired_grams` to pair with instead of running the reference again for every layer.

    The pass runs on the first request. It reads the data as each layer's own capture would (the same
    chunks, the same rows: chunk i sampled with the generator seeded (0, i)) and keeps, per layer, the
    chunks that capture would take (where captures stop at enough rows, up to there). Layers with the same
    input and the same row layout (a transformer's query, key and value) share their rows. Rows are kept in
    the input's own precision; past `max_bytes` the layers holding the most are dropped (captured alone).
    """

    def __init__(self, reference: onnx.ModelProto, data: Dataset, layers: Sequence[LinearLayer], *,
                 rows_per_chunk: int = 2048, max_batch: int = 64, collector: Collector | None = None,
                 max_bytes: int = REFERENCE_BYTES, enough: RowCount | None = None):
        self.reference, self.data, self.rows_per_chunk, self.max_batch = reference, data, rows_per_chunk, max_batch
        self.enough = enough or RowCount()  # where a costly capture of these layers stops, held rows and current
        self.collector = collector or Collector()
        self.max_bytes = max_bytes
        self.layers = {_rows_key(layer): layer for layer in layers}
        self.costly: bool | None = None  # whether the pass read the data as a costly capture does (set by it)
        self._rows: dict[tuple, list[list[np.ndarray]]] | None = None
        self._grams: OrderedDict[tuple, PairedGrams] = OrderedDict()  # see grams_key
        self._segments: SegmentValues | None = None  # see current_values

    @staticmethod
    def grams_key(current: onnx.ModelProto, layer: LinearLayer, folds: bool) -> tuple:
        """What a layer's paired Gram matrices depend on besides the data and the held rows: its rows' key,
        folds, and the part of `current` that computes its input (graph and weights, by digest): a layer
        fitted and rewritten since does not change it unless it lies upstream of that input."""
        upstream = upstream_model(current, [layer.input_name]).SerializeToString()
        return _rows_key(layer), bool(folds), hashlib.sha256(upstream).hexdigest()

    def current_values(self, current: onnx.ModelProto) -> SegmentValues | None:
        """The current model's values over the chunks a costly capture reads, each layer's input run from the
        values held from the layers before it (runtime.segments); None where they cannot be held."""
        if not self.costly or not SegmentValues.usable(current, self.data):
            return None
        if self._segments is None:
            self._segments = SegmentValues(_parts(self.data, True), max_batch=self.max_batch, collector=self.collector)
        return self._segments

    def kept_grams(self, key: tuple) -> PairedGrams | None:
        return self._grams.get(key)

    def keep_grams(self, key: tuple, grams: PairedGrams) -> None:
        self._grams[key] = grams
        while len(self._grams) > KEPT_GRAMS:
            self._grams.popitem(last=False)

    def rows(self, layer: LinearLayer) -> list[list[np.ndarray]] | None:
        """Per data chunk read, the layer's sampled reference rows per group; None: not held."""
        if self._rows is None:
            self._rows = self._capture()
        return self._rows.get(_rows_key(layer))

    def _capture(self) -> dict[tuple, list[list[np.ndarray]]]:
        if not self.layers:
            return {}
        self.costly = _pass_seconds(self.collector, self.reference, self.data) > CUT_SECONDS
        parts = _parts(self.data, self.costly)
        names = sorted({layer.input_name for layer in self.layers.values()})
        held = {key: [] for key in self.layers}
        counts, sizes = dict.fromkeys(held, 0), dict.fromkeys(held, 0)
        reading = set(held)
        for chunk, values in enumerate(_streamed(self.collector, self.reference, parts, names, self.max_batch)):
            for key in sorted(reading):
                layer = self.layers[key]
                rows = layer.input_rows(np.asarray(values[layer.input_name]), self.rows_per_chunk,
                                        np.random.default_rng((0, chunk)), dtype=None)
                held[key].append(rows)
                counts[key] += rows[0].shape[0]
                sizes[key] += sum(r.nbytes for r in rows)
                if self.enough.stops(layer, self.costly, counts[key], len(held[key])):
                    reading.discard(key)
            while sum(sizes.values()) > self.max_bytes:
                largest = max(sizes, key=sizes.get)
                del held[largest], sizes[largest]
                reading.discard(largest)
            if not reading:
                break
        return held


def _rows_key(layer: LinearLayer) -> tuple:
    """What a layer's sampled input rows depend on besides the data: its input and the layout of its rows."""
    conv = tuple(sorted((k, repr(v)) for k, v in layer.conv.items()))
    return layer.input_name, layer.kind, layer.groups, row_length(layer), tuple(layer.weight_shape[2:]), conv


def _parts(data: Dataset, costly: bool) -> list[Dataset]:
    """A costly capture streams interleaved parts of the data (see ROWS_PER_INPUT); others all of it."""
    return [data.subset(slice(p, None, SPREAD_PARTS)) for p in range(min(SPREAD_PARTS, len(data)))] \
        if costly else [data]


@dataclass(frozen=True)
class RowCount:
    """How many rows a costly capture takes before it stops: at least `minimum`, and `per_input` per entry
    of the layer's input row (K), from two data chunks or more. The default is what a fit of K unknowns per
    output channel needs (prune's refits; None: MIN_PAIRED_ROWS and ROWS_PER_INPUT); a fit of fewer unknowns
    (share's centroids) may ask for fewer."""

    minimum: int | None = None
    per_input: int | None = None

    def stops(self, layer: LinearLayer, costly: bool, rows: int, chunks: int) -> bool:
        """Whether a capture holding `rows` rows of `chunks` data chunks has enough (only a costly one stops)."""
        minimum = MIN_PAIRED_ROWS if self.minimum is None else self.minimum
        per_input = ROWS_PER_INPUT if self.per_input is None else self.per_input
        return costly and rows >= max(minimum, per_input * row_length(layer)) and chunks >= 2

def collect_paired_grams(current: onnx.ModelProto, reference: onnx.ModelProto | ReferenceRows | None, data: Dataset,
                         layer: LinearLayer, *, rows_per_chunk: int = 2048, max_batch: int = 64,
                         folds: bool = False, collector: Collector | None = None) -> PairedGrams:
    """One pass over `data` through `current` (and `reference`, on the same chunks) for one layer; chunk
    i's rows are sampled with the generator seeded (0, i), the same rows from both models. A reference
    given as ReferenceRows (a run for many layers at once) gives its held rows where it holds them.

    With `folds`, the statistics of the even and the odd data chunks are also returned apart
    (PairedGrams.folds), when there are at least two chunks.
    """
    name = layer.input_name
    paired = reference is not None
    collector = collector or Collector()
    held, reference_rows = None, reference if isinstance(reference, ReferenceRows) else None
    if reference_rows is not None:
        reference = reference_rows.reference
        if reference_rows.rows_per_chunk == rows_per_chunk and reference_rows.max_batch == max_batch:
            held = reference_rows.rows(layer)
    key = None
    if held is not None:  # read the data as the reference's pass did
        key = reference_rows.grams_key(current, layer, folds)
        if (kept := reference_rows.kept_grams(key)) is not None:  # a layer reading the same rows, just captured
            return dataclasses.replace(kept, layer=layer)
        costly, models, enough = reference_rows.costly, [current], reference_rows.enough
    else:
        enough = RowCount()
        models = [current, reference] if paired else [current]
        # the current model's graph changes as its layers are coded: its cost is the reference's until measured
        costly = max(_pass_seconds(collector, m, data) for m in models) > CUT_SECONDS
    segments = reference_rows.current_values(current) if held is not None else None
    if segments is not None:
        streams = [segments.stream(current, name)]
    else:
        models = [upstream_model(m, [name]) for m in models] if costly else models
        streams = [_streamed(collector, m, _parts(data, costly), [name], max_batch) for m in models]
    total = even = None
    chunks = 0
    # the held rows first: zip stops there without running the current model on one more chunk
    for chunk, values in enumerate(zip(*([iter(held)] if held is not None else []), *streams)):
        rows = [[np.asarray(r, dtype=np.float64) for r in values[0]]] if held is not None else []
        rows = [layer.input_rows(np.asarray(v[name]), rows_per_chunk, np.random.default_rng((0, chunk)))
                for v in values[len(rows):]] + rows
        if total is None:
            total = _GramSums(rows[0], paired)
            even = _GramSums(rows[0], paired) if folds else None
        total.add(rows[0], rows[1] if paired else None)
        if even is not None and chunk % 2 == 0:
            even.add(rows[0], rows[1] if paired else None)
        chunks += 1
        if enough.stops(layer, costly, total.count, chunks):
            break
    if total is None:
        raise ModelError(f"no calibration rows reached the layer of '{layer.weight}'")
    halves = None
    if even is not None and chunks >= 2:
        halves = tuple(sums.averaged(layer, paired) for sums in (even, total.minus(even)))  # odd before averaging
    grams = total.averaged(layer, paired, halves)
    if key is not None:
        reference_rows.keep_grams(key, grams)
    return grams


def _streamed(collector: Collector, model: onnx.ModelProto, parts: list[Dataset], names: list[str],
              max_batch: int) -> Iterator[dict[str, np.ndarray]]:
    """The tensors `names` of `model`, chunk by chunk over each of `parts` in turn."""
    for part in parts:
        yield from collector.stream(model, part, names, max_batch=max_batch)


def _pass_seconds(collector: Collector, model: onnx.ModelProto, data: Dataset) -> float:
    """What a pass over `data` through the whole of `model` has been measured to cost (0 before any run).

    Over CUT_SECONDS, a capture runs the model cut just after the layer's input (graph.edit.upstream_model):
    onnxruntime runs every node of a session whatever is fetched, so the nodes after it would run for
    nothing; but a cut model is a session of its own, which costs more than it saves on a model that runs
    fast (LeNet-5: a few ms a pass)."""
    cost = collector.seconds_per_sample(model)
    return 0.0 if cost is None else cost * len(data)
