"""Run only what a changed weight can reach: the nodes downstream of it, fed the reference's values at the cut.

A sensitivity sweep changes one weight at a time; every node that does not depend on that weight
computes what it computed for the reference, so running it again is wasted. For weight w:

    nodes(w) = the main-graph nodes that read w, or read (directly or from a subgraph) an output of
               nodes(w), in graph order
    cut(w)   = the names nodes(w) read that none of them computes (graph inputs, other weights,
               activations computed upstream): their values are the reference's, captured once

and the suffix model of nodes(w) with inputs w + cut(w) gives, for each graph output it computes,
what the whole model gives; the other graph outputs do not depend on w. Layer: runtime (the
downstream() walk itself is graph-only).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper

from onnxcompress.graph.edit import node_reads
from onnxcompress.runtime.sessions import make_session
from onnxcompress.runtime.statistics import Collector

log = logging.getLogger(__name__)


def downstream(graph: onnx.GraphProto, sources: set[str]) -> tuple[list[onnx.NodeProto], list[str]]:
    """(the nodes depending on `sources`, in graph order; the names they read and do not compute, in
    first-read order, `sources` excluded)."""
    reached, nodes, reads = set(sources), [], []
    for node in graph.node:
        read = node_reads(node)  # subgraphs' outer-scope reads too
        if reached.intersection(read):
            nodes.append(node)
            reads.append(read)
            reached.update(o for o in node.output if o)
    made = {o for n in nodes for o in n.output}
    cut = dict.fromkeys(n for read in reads for n in read if n not in made and n not in sources)
    return nodes, list(cut)


def suffix_model(model: onnx.ModelProto, weight: str, nodes: list[onnx.NodeProto], cut: Sequence[str],
                 dtypes: dict[str, np.dtype], outputs: Sequence[str]) -> onnx.ModelProto:
    """The model of `nodes` whose inputs are `weight` and the `cut` names not held as initializers."""
    inits = {t.name: t for t in model.graph.initializer}
    graph = helper.make_graph(
        list(nodes), f"{model.graph.name}_after_{weight}",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(dtypes[n]), None)
         for n in [weight, *cut] if n not in inits],
        [onnx.ValueInfoProto(name=o) for o in outputs],
        [inits[n] for n in cut if n in inits])
    out = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    out.functions.extend(model.functions)
    return out


class SuffixRunner:
    """The outputs of `model` over `chunks` (feeds) with one weight (a model input) replaced,
    computed by the weight's suffix model; None from `for_weight` where the captured cut values
    would exceed `max_bytes` or the suffix is the whole model."""

    def __init__(self, model: onnx.ModelProto, chunks: list[dict[str, np.ndarray]], names: Sequence[str],
                 reference: list[list[np.ndarray]], base: dict[str, np.ndarray], *, max_bytes: int = 256 << 20,
                 collector: Collector | None = None, folds: Sequence[int] | None = None):
        self.model, self.chunks, self.names, self.reference, self.base = model, chunks, list(names), reference, base
        self.folds = list(folds) if folds is not None else list(range(len(chunks)))  # chunk i runs version folds[i]
        self.max_bytes = max_bytes
        self.collector = collector or Collector()

    def for_weight(self, weight: str) -> "Suffix | None":
        nodes, cut = downstream(self.model.graph, {weight})
        if len(nodes) >= len(self.model.graph.node):
            return None
        made = {o for n in nodes for o in n.output}
        outputs = [n for n in self.names if n in made]
        inits = {t.name for t in self.model.graph.initializer}
        known = set(self.chunks[0]) | set(self.base) | inits
        wanted = [n for n in cut if n not in known]
        values = self._capture(wanted) if wanted else [{} for _ in self.chunks]
        if values is None:
            return None
        feeds = [{**{n: chunk[n] for n in cut if n in chunk}, **{n: self.base[n] for n in cut if n in self.base},
                  **v} for chunk, v in zip(self.chunks, values)]
        dtypes = {n: np.asarray(feeds[0][n]).dtype for n in cut if n in feeds[0]}
        dtypes[weight] = self.base[weight].dtype
        # no arena: many suffix sessions are kept at once, each would hold its largest run's buffers
        session = make_session(suffix_model(self.model, weight, nodes, cut, dtypes, outputs), arena=False)

        # the suffix's own outputs with the weight unchanged: a candidate's outputs are the reference's plus
        # what the change moves in the suffix, so kernels fused differently there add no noise of their own
        base = [session.run(outputs, {**feed, weight: self.base[weight]}) if outputs else [] for feed in feeds]
        log.debug("suffix of %s: %d of %d nodes, %d cut values", weight, len(nodes), len(self.model.graph.node),
                  len(wanted))
        held = sum(np.asarray(a).nbytes for v in values for a in v.values())
        return Suffix(self, session, weight, feeds, outputs, base, held)

    def _capture(self, names: list[str]) -> list[dict[str, np.ndarray]] | None:
        runner = self.collector.runner(self.model, names)
        values, total = [], 0
        for i, chunk in enumerate(self.chunks):
            ran = runner.run(chunk, self.base).values
            got = {n: ran[n] for n in names}
            total += sum(np.asarray(v).nbytes for v in got.values())
            # over the bound, or bound to be at this rate (the chunks are the same size but the last): stop now
            if total > self.max_bytes or total / (i + 1) * (len(self.chunks) - 1) > self.max_bytes:
                log.debug("suffix: the cut values %s would take over %d bytes", names, self.max_bytes)
                return None
            values.append(got)
        return values


class Suffix:
    """One weight's suffix session over the data chunks: called with the weight's versions (chunk i runs version
    folds[i] % len), it gives every graph output per chunk, the ones it does not compute the reference's."""

    def __init__(self, runner: SuffixRunner, session, weight: str, feeds: list[dict], outputs: list[str],
                 base: list[list[np.ndarray]], nbytes: int):
        self.session, self.weight, self.feeds, self.outputs, self.base = session, weight, feeds, outputs, base
        self.reference, self.folds = runner.reference, runner.folds
        self.index = [outputs.index(n) if n in outputs else None for n in runner.names]  # graph output -> ours
        self.nbytes = nbytes  # the captured cut values it holds

    def __call__(self, versions: list[np.ndarray]) -> list[list[np.ndarray]]:
        result = []
        for i, feed in enumerate(self.feeds):
            version = versions[self.folds[i] % len(versions)]
            got = self.session.run(self.outputs, {**feed, self.weight: version}) if self.outputs else []
            result.append([self.reference[i][k] if j is None else _moved(self.reference[i][k], self.base[i][j], got[j])
                           for k, j in enumerate(self.index)])
        return result


def _moved(reference: np.ndarray, base: np.ndarray, got: np.ndarray) -> np.ndarray:
    """reference + (got - base) for float outputs (exactly the reference where got equals base); other types as got."""
    if not np.issubdtype(np.asarray(got).dtype, np.floating):
        return got
    return np.where(got == base, reference, reference + (got - base)).astype(got.dtype)
