"""Our custom ops (domain ``ai.onnxcompress``): schemas, ONE numpy kernel each, and two backends.

``DecodeWeight(blob: uint8[n]) -> float[...]`` reconstructs a shared weight from a packed blob
(format in :mod:`onnxcompress.packed`); its kernel is :func:`onnxcompress.packed.decode_blob`.

- onnx: the schema (with a shape-inference function that reads the shape from a constant
  blob's header) is registered on import, so ``onnx.checker`` full check and shape inference
  accept packed models.
- fast path: :func:`to_portable` runs the kernel once per constant blob and puts a plain
  initializer in its place; it is registered with ``runtime.register_portable_converter`` so
  every ``runtime.make_session`` of a packed model uses it.
- slow path (proof of semantics): :func:`custom_op_session` registers the same kernel as an
  onnxruntime-extensions Python op (op type ``ai.onnxcompress::DecodeWeight``, so our own
  domain, no rewriting) and lets onnxruntime execute the packed model as it is.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto

from .. import external, packed, runtime
from ..graphs import iter_graphs
from .graph import to_dense
from ..errors import CodecError, ModelError
from ..graphs import DOMAIN

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
            "codebook, optional group offsets, scales and outliers; see onnxcompress.packed.",
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
    if left:
        raise ModelError(f"{len(left)} {DOMAIN} ops have non-constant inputs and cannot be decoded before "
                         "the session; run them with onnxcompress.ops.custom_op_session")
    return out


_REGISTERED_PY_OPS = False


def register_extension_ops() -> str:
    """Register our kernels as onnxruntime-extensions Python ops (once); returns the library path."""
    global _REGISTERED_PY_OPS
    try:
        from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op
    except ImportError as e:
        raise ModelError("running packed models op by op needs onnxruntime-extensions: "
                         "pip install onnxruntime-extensions") from e
    if not _REGISTERED_PY_OPS:
        kernel = KERNELS[packed.OP_TYPE]
        onnx_op(op_type=f"{DOMAIN}::{packed.OP_TYPE}", inputs=[PyCustomOpDef.dt_uint8],
                outputs=[PyCustomOpDef.dt_float])(lambda blob: kernel(blob))
        _REGISTERED_PY_OPS = True
    return get_library_path()


def custom_op_session(model: onnx.ModelProto, *, optimize: bool = True):
    """An onnxruntime session that executes our ops itself (Python custom ops), on the packed model as is."""
    ort = runtime.ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # errors come back as exceptions; onnxruntime prints nothing itself
    options.register_custom_ops_library(register_extension_ops())
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if external.has_external(model):  # a streamed model: blobs read from its files (one folder) or copied in
        folders = external.folders_in_use(model)
        if len(folders) == 1:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                             str(folders.pop()))
        else:
            model = external.inline_copy(model)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


register_schemas()
runtime.register_portable_converter(to_portable)
