"""Our custom ops (domain ``ai.onnxcompress``): schemas, ONE numpy kernel each, and two backends.

``DecodeWeight(blob: uint8[n]) -> float[...]`` reconstructs a shared weight from a packed blob
(format in :mod:`onnxcompress.formats.packed`); its kernel is :func:`onnxcompress.formats.packed.decode_blob`.

- onnx: the schema (with a shape-inference function that reads the shape from a constant
  blob's header) is registered on import, so ``onnx.checker`` full check and shape inference
  accept packed models.
- fast path: :func:`to_portable` runs the kernel once per constant blob and puts a plain
  initializer in its place; ``onnxcompress.runtime.sessions.make_session`` calls it for every
  packed model.
- slow path (proof of semantics): ``onnxcompress.runtime.extension_ops.custom_op_session``
  registers the same kernel as an onnxruntime-extensions Python op and lets onnxruntime execute
  the packed model as it is.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto

from onnxcompress.formats import packed

from onnxcompress.graph.edit import iter_graphs
from onnxcompress.formats.blobs import to_dense
from onnxcompress.errors import CodecError, ModelError, printable
from onnxcompress.graph.edit import DOMAIN

log = logging.getLogger(__name__)

#: op type -> its one numpy reference kernel
KERNELS: dict[str, Callable[..., np.ndarray]] = {packed.OP_TYPE: packed.decode_blob}
OPSET_VERSION = 1


def _infer_decode_weight(ctx) -> None:
    """Output: float32; shape read from the blob's header when the blob is a constant."""
    out = onnx.TypeProto()
    out.tensor_type.elem_type = TensorProto.FLOAT
    data = ctx.get_input_data(0) if ctx.has_input(0) else None
    if data is not None and data.data_location != TensorProto.EXTERNAL:  # external bytes: shape left unknown
        try:
            shape = packed.read_blob(onnx.numpy_helper.to_array(data).tobytes()).shape
        except CodecError:
            shape = None
        if shape is not None:
            for d in shape:
                out.tensor_type.shape.dim.add().dim_value = int(d)
    ctx.set_output_type(0, out)


def _schema() -> onnx.defs.OpSchema:
    schema = onnx.defs.OpSchema(
        packed.OP_TYPE, DOMAIN, OPSET_VERSION,
        doc="Decode a packed shared weight: entropy-coded codes (dense or CSR with relative indices), "
            "codebook, optional group offsets, scales and outliers; see onnxcompress.formats.packed.",
        inputs=[onnx.defs.OpSchema.FormalParameter("blob", "tensor(uint8)", "the packed weight")],
        outputs=[onnx.defs.OpSchema.FormalParameter("weight", "tensor(float)", "the decoded weight")])
    schema.set_type_and_shape_inference_function(_infer_decode_weight)
    return schema


def register_schemas() -> None:
    """Register our op schemas with onnx (once per process)."""
    try:
        onnx.defs.get_schema(packed.OP_TYPE, OPSET_VERSION, DOMAIN)
        return
    except onnx.defs.SchemaError:
        pass
    onnx.defs.register_schema(_schema())


def to_portable(model: onnx.ModelProto) -> onnx.ModelProto:
    """Decode every constant DecodeWeight with its numpy kernel into a dense initializer."""
    start = time.perf_counter()
    out = to_dense(model)
    seconds = time.perf_counter() - start
    decoded = sum(t.ByteSize() for t in out.graph.initializer) - sum(t.ByteSize() for t in model.graph.initializer)
    log.debug("decoded packed weights in %.3f s (%.1f MB/s of float32)", seconds,
              max(decoded, 0) / 1e6 / max(seconds, 1e-9))
    left = [n.op_type for g, _ in iter_graphs(out.graph) for n in g.node if n.domain == DOMAIN]
    unknown = sorted(set(left) - set(KERNELS))
    if unknown:  # not ours: written by something else, or by a later version
        raise ModelError(f"the model uses {DOMAIN} op(s) {[printable(u[:100]) for u in unknown]}, which this version "
                         f"of onnxcompress does not define (it decodes {sorted(KERNELS)})")
    if left:
        raise ModelError(f"{len(left)} {DOMAIN} ops have non-constant inputs and cannot be decoded before "
                         "the session; run them with onnxcompress.runtime.extension_ops.custom_op_session")
    return out


register_schemas()
