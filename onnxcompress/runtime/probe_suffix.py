"""The output gains' probes through suffixes shared by groups of weights, one group's values held at a time.

A gain probe (runtime.sensitivity) swaps one weight and runs the model over the probe samples; every node
that does not depend on that weight computes what it computed for the reference, so running it again is
wasted. Weights that come one after the other in the graph (a transformer block's query, key, value,
output and FFN weights) have suffixes (runtime.suffix.downstream) that are nearly the same nodes, so they
share one: the nodes downstream of any weight of the group, fed the values they read from upstream (the
group's cut). Groups are made in graph order, a weight joining the group before it while the group's
suffix has at most (1 + SLACK) times the nodes of the suffix of each of its weights; a group whose suffix
holds nearly the whole model (WHOLE_SHARE of its nodes) runs the whole model instead.

Groups are probed in graph order, and only the current group's cut values are held: they are computed
segment by segment from the previous group's (runtime.segments.SegmentValues), so the cuts of all groups
cost about one pass over the probe samples in all, and the memory one cut's values (session 10 held the
cuts of all weights at once, and a session per weight: 3.6 GB on a 22M-weight transformer). A probe's
noise is its suffix's outputs with the weight swapped less the same suffix's outputs with it unchanged
(the suffix's kernels, not the whole model's, on both sides); graph outputs the suffix does not compute
do not move.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import onnx

from onnxcompress.errors import ModelError
from onnxcompress.graph.data import Dataset
from onnxcompress.runtime.segments import SegmentValues
from onnxcompress.runtime.sessions import first_line, make_session
from onnxcompress.runtime.statistics import Collector, weights_as_inputs
from onnxcompress.runtime.suffix import downstream, suffix_model

log = logging.getLogger(__name__)
SLACK = 0.5  # a group's suffix runs at most this share more nodes than each of its weights' own suffix
WHOLE_SHARE = 0.9  # a group whose suffix holds this share of the model's nodes or more runs the whole model
# the cut values held for one group (over all probe samples); past it the group's probes run the whole model
HELD_BYTES = 256 << 20


def suffix_groups(graph: onnx.GraphProto, weights: Sequence[str], *, slack: float = SLACK
                  ) -> list[list[str]]:
    """`weights` (main-graph names) in groups of consecutive ones by their first reader's place in the graph,
    each group's suffix (the union of its weights') at most (1 + slack) times each weight's own in nodes."""
    place = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            place.setdefault(name, i)
    own = {w: {id(n) for n in downstream(graph, {w})[0]} for w in weights}
    groups: list[list[str]] = []
    nodes: set[int] = set()
    smallest = 0
    for w in sorted(weights, key=lambda w: (place.get(w, len(graph.node)), w)):
        union = nodes | own[w]
        least = min(smallest, len(own[w])) if groups else len(own[w])
        if groups and len(union) <= (1 + slack) * least:
            groups[-1].append(w)
            nodes, smallest = union, least
        else:
            groups.append([w])
            nodes, smallest = set(own[w]), len(own[w])
    return groups


class SuffixProbes:
    """Per chunk of the probe samples, how a model's float outputs move with one weight swapped, run through
    its group's suffix (see the module). The groups are probed in the order of `groups`; asking for a weight
    of a later group lets the earlier groups' values go."""

    def __init__(self, model: onnx.ModelProto, feeds: Dataset, outputs: Sequence[str], groups: Sequence[Sequence[str]],
                 *, chunk: int, max_bytes: int | None = None):
        self.model, self.outputs = model, list(outputs)
        self.max_bytes = HELD_BYTES if max_bytes is None else max_bytes
        self.group_of = {w: i for i, group in enumerate(groups) for w in group}
        self.groups = [list(g) for g in groups]
        # the segments' sessions are this object's: the shared collector's cache (and the cost it measured of
        # the model's session, which the refinement after reads) stays as it was
        self.segments = SegmentValues([feeds], max_batch=chunk, collector=Collector(keep=2), max_bytes=self.max_bytes)
        self.nodes = len(model.graph.node)
        self._current: int | None = None
        self._run = None  # the current group's (session, feeds per chunk, its outputs, base outputs per chunk)
        self.nodes_run = 0  # suffix nodes run over all probes' chunks (what the suffixes saved is seen here)

    @staticmethod
    def usable(model: onnx.ModelProto, feeds: Dataset) -> bool:
        return SegmentValues.usable(model, feeds)

    def moves(self, weight: str, version: np.ndarray) -> Iterator[list[np.ndarray | None]] | None:
        """Per chunk, each output's move (float64) with `weight` set to `version` (None: the output does not
        move); None where its group runs the whole model (a suffix of nearly all of it, cut values over the
        bound, or onnxruntime refusing the suffix)."""
        group = self.group_of.get(weight)
        if group is None:
            return None
        if group != self._current:
            self._current, self._run = group, None
            try:
                self._run = self._build(self.groups[group])
            except (ModelError, ValueError) as e:
                log.debug("output gains: no suffix for %s (%s); its probes run the whole model", self.groups[group], e)
        return None if self._run is None else self._moves(weight, version)

    def _moves(self, weight: str, version: np.ndarray) -> Iterator[list[np.ndarray | None]]:
        session, feeds, computed, base, nodes = self._run
        for i, feed in enumerate(feeds):
            if base[i] is None:
                base[i] = _run(session, computed, feed)
            got = dict(zip(computed, _run(session, computed, {**feed, weight: version})))
            self.nodes_run += nodes
            yield [np.asarray(got[n], np.float64) - np.asarray(base[i][computed.index(n)], np.float64)
                   if n in got else None for n in self.outputs]

    def _build(self, group: list[str]):
        """(session, feeds per chunk, the graph outputs it computes, base outputs per chunk (None: not run yet),
        its nodes), or None where the whole model runs."""
        nodes, cut = downstream(self.model.graph, set(group))
        inits = {t.name for t in self.model.graph.initializer}
        wanted = [n for n in cut if n not in inits]  # graph inputs and values computed upstream
        if len(nodes) >= WHOLE_SHARE * self.nodes or not wanted:
            log.debug("output gains: the suffix of %s holds %d of %d nodes: the whole model runs", group, len(nodes),
                      self.nodes)
            return None
        values, total = [], 0
        for chunk in self.segments.streams(self.model, wanted):
            values.append(chunk)
            total += sum(np.asarray(v).nbytes for v in chunk.values())
            if total > self.max_bytes:
                log.debug("output gains: the cut values of %s pass %d bytes: the whole model runs", group,
                          self.max_bytes)
                return None
        self.segments.release(self.model, wanted)  # the next group's cut runs from this one's
        made = {o for n in nodes for o in n.output}
        computed = [n for n in self.outputs if n in made]
        dtypes = {n: np.asarray(values[0][n]).dtype for n in wanted}
        suffix = suffix_model(self.model, wanted[0], nodes, [*wanted[1:], *group, *(n for n in cut if n in inits)],
                              dtypes, computed)
        # the group's weights (and the other float initializers it reads) are fed at run time, as probes swap them
        light, arrays = weights_as_inputs(suffix, also=group)
        session = make_session(light)
        feeds = [{**arrays, **chunk} for chunk in values]
        base = [_run(session, computed, feeds[0])] + [None] * (len(feeds) - 1)  # onnxruntime takes the suffix
        log.debug("output gains: the suffix of %s: %d of %d nodes, %d cut values (%d bytes)", group, len(nodes),
                  self.nodes, len(wanted), total)
        return session, feeds, computed, base, len(nodes)


def _run(session, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    try:
        return session.run(names, feed)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ModelError(f"onnxruntime failed on a probe's suffix: {first_line(e)}") from e
