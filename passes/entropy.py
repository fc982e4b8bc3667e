"""Entropy coding of the code and relative-index streams (Deep Compression §4), and the packed form.

Per shared weight and per stream the coder is chosen by measured size among ``methods``
(codecs.encode_best: raw bit packing, canonical Huffman as in the paper, rANS via constriction,
which gets within a fraction of a percent of the entropy). The report gives, per weight, the
bits per weight of the codes and of the indices next to their empirical entropy
``H = -sum p log2 p`` times symbols per weight: the limit of any memoryless coder.

In the packed form (``ctx.form == Form.PACKED``) this pass also assembles the model: each shared
weight's portable subgraph is replaced by one ``ai.onnxcompress::DecodeWeight`` node reading a
uint8 initializer that holds the blob (onnxcompress.formats.packed). In the portable form the model is
left as it is and the report says what the packed form would store.

Weights are coded independently, in ``ctx.jobs`` worker processes (onnxcompress.execution.parallel). For a
streamed model each blob leaves memory as soon as it is made: the model's blob initializer and
the context's copy both go to the spill file, so the output is written with external data and
memory holds one weight's streams at a time, whatever the model's size.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np

from onnxcompress.errors import PreconditionError
from onnxcompress.execution.parallel import map_ordered
from onnxcompress.formats.blobs import replace_with_blob
from onnxcompress.formats.codebook import SharedWeight
from onnxcompress.formats.codecs import METHODS
from onnxcompress.formats.forms import Form
from onnxcompress.formats.packed import Layout, PackedWeight, read_blob, write_blob
from onnxcompress.graph.edit import NameScope
from onnxcompress.graph.external import is_streamed
from onnxcompress.graph.spill import SpillingDict
from onnxcompress.pipeline.artifacts import Artifact
from onnxcompress.pipeline.manager import Context, Pass, PassResult

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class EntropyConfig:
    # coders to choose from per stream; ["raw", "huffman"] is the paper's setting
    methods: list = field(default_factory=lambda: list(METHODS))
    verify: bool = True  # decode every blob and compare with the shared weight bit for bit

    def __post_init__(self):
        unknown = set(self.methods) - set(METHODS)
        if unknown or not self.methods:
            raise ValueError(f"methods must be a nonempty subset of {list(METHODS)}, not {self.methods}")


def stream_report(packed: PackedWeight) -> dict:
    """Bits per weight of the code and index streams, each with its entropy limit and coder."""
    per_weight = max(packed.numel, 1)
    out: dict = {"layout": packed.layout.kind, "blob_bytes": len(packed.blob),
                 "bits_per_weight": 8.0 * len(packed.blob) / per_weight}
    if packed.layout.kind == "csr":
        out["index_bits"] = packed.layout.index_bits
    for role, key in (("codes", "c" if "c" in packed.streams else "v"), ("indices", "i")):
        stat = packed.streams.get(key)
        if stat is None:
            continue
        out[f"{role}_bits_per_weight"] = 8.0 * stat.nbytes / per_weight
        out[f"{role}_entropy_bits_per_weight"] = stat.entropy * stat.symbols / per_weight
        out[f"{role}_coder"] = stat.method
    return out


def blob_matches(blob, shared: SharedWeight) -> bool:
    """Worker task: True when `blob` decodes to exactly the weight `shared` stands for, bit for bit."""
    expected = shared.decode()
    got = read_blob(blob, shared.name).decode()
    # bytes in C order: a weight coded column-wise decodes to an array whose last axis is not contiguous
    return got.shape == expected.shape and np.array_equal(np.ascontiguousarray(got).view(np.uint8),
                                                          np.ascontiguousarray(expected).view(np.uint8))


class EntropyPass(Pass):
    name = "entropy"
    Config = EntropyConfig
    produces = frozenset({Artifact.PACKED})
    consumes = frozenset({Artifact.SHARED})

    def requires(self, ctx: Context) -> None:
        if not (ctx.has(Artifact.SHARED) or ctx.shared):
            raise PreconditionError("entropy coding needs codebook weights: run 'share' before 'entropy'")

    def call(self, ctx: Context) -> PassResult:
        cfg: EntropyConfig = self.config
        # a streamed model's blobs go to its spill file as they are made (in the context and in the
        # model), so memory holds one weight's streams at a time, not the model's
        ctx.packed = SpillingDict(ctx.model) if is_streamed(ctx.model) else {}
        scope = NameScope(ctx.model)
        stored = removed = 0
        names = list(ctx.shared)
        work = sum(int(ctx.shared[name].codes.size) for name in names)
        methods = list(cfg.methods)
        tasks = (((ctx.shared[name], ctx.layouts.get(name, Layout())), {"methods": methods}) for name in names)
        for name, packed in zip(names, map_ordered(write_blob, tasks, jobs=ctx.jobs, work=work)):
            stored += len(packed.blob)
            details = stream_report(packed)
            if ctx.form == Form.PACKED:
                removed += replace_with_blob(ctx.model, packed, scope, self.name)
            ctx.record(name, self.name, f"{details['bits_per_weight']:.2f} bits/weight ({packed.layout.kind})",
                       ctx.shared[name].payload_bytes(), len(packed.blob), details)
            log.debug("entropy: %s %s", name, details)
            ctx.packed[name] = replace(packed, blob=np.frombuffer(packed.blob, np.uint8)) \
                if isinstance(ctx.packed, SpillingDict) else packed
        if ctx.form != Form.PACKED:
            ctx.note(f"entropy: the packed form would store the {len(ctx.packed)} shared weights in {stored} bytes; "
                     "this run writes the portable form, which cannot hold entropy-coded streams")
        log.info("entropy: %d weights -> %d bytes of blobs (form %s)", len(ctx.packed), stored, ctx.form)
        return PassResult(ctx.form == Form.PACKED and bool(ctx.packed),
                          {"weights": len(ctx.packed), "blob_bytes": stored, "removed_bytes": removed})

    def ensures(self, ctx: Context, result: PassResult) -> None:
        if not self.config.verify:
            return
        names = list(ctx.packed)
        tasks = (((ctx.packed[name].blob, ctx.shared[name]), {}) for name in names)
        work = sum(int(ctx.shared[name].codes.size) for name in names)
        for name, ok in zip(names, map_ordered(blob_matches, tasks, jobs=ctx.jobs, work=work)):
            if not ok:
                raise AssertionError(f"entropy: the packed blob of {name} does not decode to its shared weight")
