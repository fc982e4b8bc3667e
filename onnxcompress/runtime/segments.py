"""A changing model's tensors over fixed data chunks, each run from the values held from earlier requests.

A pass that fits layers in graph order (share's centroid refinement) asks, layer after layer, for the
input of the next layer in the CURRENT model, whose earlier layers it has just rewritten. Running the
model up to that input every time (graph.edit.upstream_model) runs the first layers once per request:
the whole refinement of an L-layer model costs about L/2 passes over the data. :class:`SegmentValues`
keeps, per data chunk, the values a request computed that other nodes read (its segment's boundary) under
their value digests (graph.edit.value_digests: a value's digest changes exactly when what computes it
does), and runs for the next request only the nodes between what it holds and what is asked: a segment
model (runtime.suffix.suffix_model) fed the held values. Layers fitted in order so cost about one pass in
all. Held values whose digest the model no longer has are dropped; past `max_bytes` a value is not kept
(a later request then runs from further up). Values come from the one collector's sessions, weights fed
as inputs, as :meth:`Collector.stream` runs them; a segment's kernels may round differently from the
whole prefix's across the boundary (fusions do not cross it).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import onnx

from onnxcompress.graph.data import Dataset, model_inputs
from onnxcompress.graph.edit import node_reads, upstream_nodes, value_digests
from onnxcompress.runtime.statistics import Collector
from onnxcompress.runtime.suffix import suffix_model

log = logging.getLogger(__name__)
HELD_BYTES = 1 << 30  # the boundary values kept over all chunks


class SegmentValues:
    """Per chunk of `parts` (each part's chunks in turn, as Collector.stream reads them), the values of
    a model's main-graph tensors, computed from the values held from earlier requests (see the module)."""

    def __init__(self, parts: Sequence[Dataset], *, max_batch: int = 64, collector: Collector | None = None,
                 max_bytes: int = HELD_BYTES):
        self.parts, self.max_batch, self.max_bytes = list(parts), max_batch, max_bytes
        self.collector = collector or Collector()
        self._held: dict[str, dict[int, np.ndarray]] = {}  # value digest -> chunk -> value
        self._bytes = 0
        self.nodes_run = 0  # nodes run over all chunks and requests (what the segments saved is seen here)

    @staticmethod
    def usable(model: onnx.ModelProto, data: Dataset) -> bool:
        """Whether values of `model` can be held by digest (no external weights) over `data` (not a stream)."""
        return getattr(data, "stream", None) is None and all(
            t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)  # as value_digests needs

    def stream(self, model: onnx.ModelProto, name: str) -> Iterator[dict[str, np.ndarray]]:
        """Per chunk, {name: the value of main-graph tensor `name` in `model`}."""
        return self.streams(model, [name])

    def streams(self, model: onnx.ModelProto, names: Sequence[str]) -> Iterator[dict[str, np.ndarray]]:
        """Per chunk, {name: the value of main-graph tensor `name` in `model`} for each of `names` (each run
        from the values held, those the ones before it computed among them)."""
        digests = value_digests(model)
        if digests is None:
            raise ValueError("the model's weights are in external files: see SegmentValues.usable")
        self._drop_except(set(digests.values()))
        specs = model_inputs(model)
        runners: dict[tuple, tuple] = {}
        chunk = 0
        for part in self.parts:
            for feed, _ in part.chunks(specs, max_batch=self.max_batch):
                yield {name: self._value(model, digests, name, chunk, feed, runners) for name in names}
                chunk += 1

    def release(self, model: onnx.ModelProto, keep: Sequence[str]) -> None:
        """Drop the held values but those of `model`'s tensors `keep` (values no later request needs: the
        requests then run from `keep` and the feeds)."""
        digests = value_digests(model) or {}
        self._drop_except({digests[n] for n in keep if n in digests})

    def _value(self, model, digests: dict[str, str], name: str, chunk: int, feed: dict, runners: dict) -> np.ndarray:
        held = {n: values[chunk] for n, d in digests.items() if (values := self._held.get(d)) and chunk in values}
        if name in held:
            return held[name]
        if name in feed:
            return feed[name]
        available = set(held) | set(feed)
        key = tuple(sorted(n for n in available if n in digests))
        if key not in runners:
            runners[key] = self._segment(model, name, available, held, feed)
        runner, inputs, keep, nodes = runners[key]
        values = {**held, **feed}
        out = runner.run({n: values[n] for n in inputs}).values
        self.nodes_run += nodes
        for n in keep:
            self._hold(digests[n], chunk, np.asarray(out[n]))
        return out[name]

    def _segment(self, model: onnx.ModelProto, name: str, available: set[str], held: dict, feed: dict):
        """(a runner of the nodes between `available` and `name`, the names it is fed, the outputs to hold,
        how many nodes it runs)."""
        graph = model.graph
        inits = {t.name for t in graph.initializer}
        kept = upstream_nodes(graph, [name], stop=available | inits)
        made = {o for node in kept for o in node.output if o}
        reads = dict.fromkeys(x for node in kept for x in node_reads(node) if x not in made)
        fed = [n for n in reads if n not in inits]
        in_segment = {id(node) for node in kept}
        read_after = {x for node in graph.node if id(node) not in in_segment
                      for x in node_reads(node)} | {o.name for o in graph.output}
        keep = [o for node in kept for o in node.output if o and (o == name or o in read_after)]
        if not fed:  # computed from weights alone: fed a graph input it does not read (a model has one)
            fed = [next(iter(feed))]
        values = {**held, **feed}
        dtypes = {n: np.asarray(values[n]).dtype for n in fed}
        segment = suffix_model(model, fed[0], kept, [n for n in reads if n != fed[0]], dtypes, keep)
        log.debug("segment for %s: %d of %d nodes, fed %d values", name, len(kept), len(graph.node), len(fed))
        return self.collector.runner(segment, keep), fed, keep, len(kept)

    def _hold(self, digest: str, chunk: int, value: np.ndarray) -> None:
        values = self._held.setdefault(digest, {})
        if chunk in values or self._bytes + value.nbytes > self.max_bytes:
            return
        values[chunk] = value
        self._bytes += value.nbytes

    def _drop_except(self, digests: set[str]) -> None:
        for digest in [d for d in self._held if d not in digests]:
            self._bytes -= sum(v.nbytes for v in self._held.pop(digest).values())
