"""Sparse storage of pruned weights (Deep Compression §2).

portable form: shared weights are already written by the share pass as bit-packed codes, dense or
as relative indices + the kept codes (whichever is smaller, :mod:`onnxcompress.formats.codechain`); this
pass only records which. Unshared pruned weights: the smaller (measured serialized bytes) of the
float tensor with its zeros and an ONNX sparse tensor (int64 flat indices + the nonzero values)
held by a standard ``Constant(sparse_value=...)`` node, which onnx's checker and onnxruntime both
accept (a graph ``sparse_initializer`` fails onnx shape inference in front of standard ops).
packed form: shared weights are marked for CSR with relative indices of ``index_bits`` bits and
filler zeros (codecs.relidx) when that is smaller than dense codes once entropy coded (measured
here with the coders of ``measure_with``); the entropy pass writes them. Unshared pruned weights
get the portable choice, since the packed blob needs a codebook.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxcompress.errors import MissingArtifactError
from onnxcompress.execution.parallel import map_ordered
from onnxcompress.formats.blobs import replace_constant_subgraph
from onnxcompress.formats.codebook import SharedWeight
from onnxcompress.formats.codechain import code_bytes, dense_code_bytes
from onnxcompress.formats.codecs import METHODS
from onnxcompress.formats.forms import Form
from onnxcompress.formats.packed import choose_layout
from onnxcompress.graph.edit import mark
from onnxcompress.graph.model import opset_of
from onnxcompress.graph.weights import find_weights, get_array, Role
from onnxcompress.pipeline.artifacts import Artifact
from onnxcompress.pipeline.manager import Context, Pass, PassResult, producers

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class SparseConfig:
    # relative-index bits of CSR in the packed form; None measures every width 1..12 and keeps
    # the smallest (the paper fixes 5 for fully connected and 8 for conv layers)
    index_bits_fc: int | None = None
    index_bits_conv: int | None = None  # the same for conv layers
    index_bits_other: int | None = None  # the same for any other weight
    measure_with: list = field(default_factory=lambda: list(METHODS))  # coders used to compare layouts

    def __post_init__(self):
        for name in ("index_bits_fc", "index_bits_conv", "index_bits_other"):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= 16:
                raise ValueError(f"{name} must be between 1 and 16 or None, not {value}")
        unknown = set(self.measure_with) - set(METHODS)
        if unknown or not self.measure_with:
            raise ValueError(f"measure_with must be a nonempty subset of {list(METHODS)}, not {self.measure_with}")

    def index_bits_for(self, role: Role) -> int | None:
        if role in (Role.CONV, Role.CONV_TRANSPOSE):
            return self.index_bits_conv
        return self.index_bits_fc if role.is_fully_connected else self.index_bits_other


def sparse_constant(name: str, dense: np.ndarray) -> onnx.NodeProto:
    """``Constant(sparse_value)`` producing `dense`: its nonzero values and their int64 flat indices."""
    flat = np.asarray(dense).reshape(-1)
    where = np.flatnonzero(flat).astype(np.int64)
    tensor = helper.make_sparse_tensor(numpy_helper.from_array(flat[where], ""),
                                       numpy_helper.from_array(where, ""), list(dense.shape))
    return helper.make_node("Constant", [], [name], sparse_value=tensor)


class SparsePass(Pass):
    name = "sparse"
    Config = SparseConfig
    produces = frozenset({Artifact.LAYOUTS})

    def requires(self, ctx: Context) -> None:
        if not (ctx.has(Artifact.MASKS) or ctx.has(Artifact.SHARED) or ctx.masks or ctx.shared):
            raise MissingArtifactError(self.name, f"{Artifact.MASKS.value} or {Artifact.SHARED.value}",
                                       producers(Artifact.MASKS) + producers(Artifact.SHARED))

    @staticmethod
    def _has_zero(shared: SharedWeight) -> bool:
        return shared.zero_code is not None or bool((shared.codes == 0).any())

    def call(self, ctx: Context) -> PassResult:
        cfg: SparseConfig = self.config
        ctx.layouts.clear()
        opset = opset_of(ctx.model)
        infos = {w.name: w for w in ctx.weights(0)}
        roles = {w.name: w.role for w in find_weights(ctx.original, min_elements=0)}  # roles survive rewrites
        modified, counts = False, {"csr": 0, "dense": 0, "relative_indices": 0, "sparse_constant": 0}
        names = []
        for name, shared in ctx.shared.items():
            if self._has_zero(shared):
                names.append(name)
            else:
                log.debug("sparse: %s skipped: no pruned entries", name)
        if ctx.form == Form.PACKED:  # layouts are measured per weight, independently: in ctx.jobs workers
            tasks = (((ctx.shared[name],), {"index_bits": cfg.index_bits_for(roles.get(name, Role.OTHER)),
                                            "methods": list(cfg.measure_with)}) for name in names)
            work = sum(int(ctx.shared[name].codes.size) for name in names)
            for name, layout in zip(names, map_ordered(choose_layout, tasks, jobs=ctx.jobs, work=work)):
                ctx.layouts[name] = layout
                counts[layout.kind] += 1
                ctx.record(name, self.name, f"packed {layout.kind}" + (f" {layout.index_bits}-bit relative indices"
                                                                      if layout.kind == "csr" else ""),
                           details={"measured_bytes": layout.sizes,
                                    "nonzero": float(np.mean(ctx.shared[name].codes != 0))})
        for name in names if ctx.form != Form.PACKED else []:  # portable: written by share already
            codes, bits = ctx.shared[name].codes, ctx.shared[name].bits
            dense, sparse = dense_code_bytes(codes.size, bits, opset), code_bytes(codes, bits, opset)
            counts["relative_indices" if sparse < dense else "dense"] += 1
            ctx.record(name, self.name, "relative indices + kept codes (written by share)" if sparse < dense
                       else "dense packed codes (smaller; written by share)", dense, sparse,
                       {"dense_bytes": dense, "sparse_bytes": sparse})
        for name, mask in ctx.masks.items():
            info = infos.get(name)
            if name in ctx.shared or info is None or info.location not in ("initializer", "constant"):
                continue
            array = get_array(ctx.model, info)
            node = mark(sparse_constant(name, array), self.name)
            dense_bytes = numpy_helper.from_array(array, name).ByteSize()
            if node.ByteSize() < dense_bytes:
                replace_constant_subgraph(ctx.model, name, [node], [])
                modified = True
                counts["sparse_constant"] += 1
                ctx.record(name, self.name, "sparse float", dense_bytes, node.ByteSize(),
                           {"nonzero": float(np.mean(array != 0))})
            else:
                log.debug("sparse: %s stays dense: %d <= %d bytes", name, dense_bytes, node.ByteSize())
        log.info("sparse: %s", counts)
        return PassResult(modified, counts)  # packed-form layouts only mark weights; entropy rewrites

    def ensures(self, ctx: Context, result: PassResult) -> None:
        for name, layout in ctx.layouts.items():
            if layout.kind == "csr" and not 1 <= layout.index_bits <= 16:
                raise AssertionError(f"sparse: {name} has index bits {layout.index_bits}")

