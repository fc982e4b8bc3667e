"""Sparse storage of pruned weights (Deep Compression §2).

portable form: per weight, the smaller (measured serialized bytes) of
  - dense storage (shared weights: uint4/uint8 codes with the pruned entries at their code;
    unshared pruned weights: the float tensor with its zeros), and
  - an ONNX sparse tensor (int64 flat indices + the nonzero values) held by a standard
    ``Constant(sparse_value=...)`` node, which onnx's checker and onnxruntime both accept
    (a graph ``sparse_initializer`` fails onnx shape inference in front of standard ops).
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

from onnxcompress.codebook import SharedWeight, code_tensor, portable_nodes
from onnxcompress.codecs import METHODS
from onnxcompress.errors import PreconditionError
from onnxcompress.graphs import NameScope, mark
from onnxcompress.model import opset_of
from onnxcompress.ops.graph import replace_constant_subgraph
from onnxcompress.packed import Layout, choose_layout
from onnxcompress.parallel import map_ordered
from onnxcompress.pipeline import Context, Pass, PassResult
from onnxcompress.weights import Role, find_weights, get_array

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class SparseConfig:
    # relative-index bits of CSR in the packed form; None measures every width 1..12 and keeps
    # the smallest (the paper fixes 5 for fully connected and 8 for conv layers)
    index_bits_fc: int | None = None
    index_bits_conv: int | None = None
    index_bits_other: int | None = None
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


def sparse_codes_nodes(shared: SharedWeight, scope: NameScope, opset: int, pass_name: str
                       ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], int, int]:
    """The portable codebook subgraph of `shared`, with its codes as a sparse Constant when
    that is smaller. Returns (nodes, initializers, dense code bytes, sparse code bytes)."""
    nodes, inits = portable_nodes(shared, scope, opset, pass_name)
    codes_name = nodes[0].input[0]  # portable_nodes starts with Cast(codes)
    codes = next(t for t in inits if t.name == codes_name)
    sparse = sparse_constant(codes_name, shared.codes.astype(np.uint8 if shared.bits <= 8 else np.uint16))
    dense_bytes, sparse_bytes = codes.ByteSize(), sparse.ByteSize()
    if sparse_bytes < dense_bytes:
        inits = [t for t in inits if t.name != codes_name]
        nodes = [mark(sparse, pass_name)] + nodes
    return nodes, inits, dense_bytes, sparse_bytes


class SparsePass(Pass):
    name = "sparse"
    Config = SparseConfig

    def requires(self, ctx: Context) -> None:
        if not ctx.masks and not any(self._has_zero(s) for s in ctx.shared.values()):
            raise PreconditionError("sparse storage needs pruned weights: run 'prune' (and 'share') before 'sparse'")

    @staticmethod
    def _has_zero(shared: SharedWeight) -> bool:
        return shared.zero_code is not None or bool((shared.codes == 0).any())

    def call(self, ctx: Context) -> PassResult:
        cfg: SparseConfig = self.config
        ctx.layouts.clear()
        opset = opset_of(ctx.model)
        scope = NameScope(ctx.model)
        infos = {w.name: w for w in ctx.weights(0)}
        roles = {w.name: w.role for w in find_weights(ctx.original, min_elements=0)}  # roles survive rewrites
        modified, counts = False, {"csr": 0, "dense": 0, "sparse_constant": 0}
        names = []
        for name, shared in ctx.shared.items():
            if self._has_zero(shared):
                names.append(name)
            else:
                log.debug("sparse: %s skipped: no pruned entries", name)
        if ctx.form == "packed":  # layouts are measured per weight, independently: in ctx.jobs workers
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
        for name in names if ctx.form != "packed" else []:  # portable: a sparse Constant where smaller
            shared = ctx.shared[name]
            nodes, inits, dense, sparse = sparse_codes_nodes(shared, scope, opset, self.name)
            if sparse < dense:
                replace_constant_subgraph(ctx.model, name, nodes, inits)
                modified = True
                counts["sparse_constant"] += 1
            else:
                counts["dense"] += 1
            ctx.record(name, self.name, "sparse codes" if sparse < dense else "dense codes (smaller)", dense,
                       min(dense, sparse), {"dense_bytes": dense, "sparse_bytes": sparse})
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

