"""The packed form executed op by op: our kernels registered as onnxruntime-extensions Python ops.

The slow path that proves the packed form's semantics: onnxruntime runs ``ai.onnxcompress::DecodeWeight``
itself with the one numpy kernel of :mod:`onnxcompress.formats.customop`, on the packed model as is.
"""
from __future__ import annotations

import onnx

from onnxcompress.errors import ModelError
from onnxcompress.formats import packed
from onnxcompress.formats.customop import KERNELS
from onnxcompress.graph import external
from onnxcompress.graph.edit import DOMAIN
from onnxcompress.runtime.sessions import ort, stoppable

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
    return stoppable(ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]))
