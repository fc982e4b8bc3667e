"""Writing a model's external data file: every external tensor copied chunk by chunk, aligned.

Saving copies every external tensor of a streamed model chunk by chunk into the output's data
file, so peak memory is bounded by the largest single weight, not the model.
"""
from __future__ import annotations

import logging
from pathlib import Path

import onnx
from onnx import numpy_helper

from onnxcompress.errors import ModelError
from onnxcompress.graph.edit import all_tensors
from onnxcompress.graph.external import external_dirs, locate

log = logging.getLogger(__name__)

COPY_CHUNK = 64 * 1024 * 1024
ALIGN_MIN_BYTES = 1024 * 1024  # tensors at least this big start at a multiple of ALIGNMENT (mmap-friendly)
ALIGNMENT = 4096


def copy_range(src: Path, offset: int, length: int, dst) -> None:
    """Copy `length` bytes of `src` from `offset` to the open file `dst`, a chunk at a time."""
    with open(src, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            chunk = f.read(min(COPY_CHUNK, left))
            if not chunk:
                raise ModelError(f"external data file '{src}' ended early while copying")
            dst.write(chunk)
            left -= len(chunk)


def write_data_file(model: onnx.ModelProto, data_path: Path, location: str, *, size_threshold: int = 1024
                    ) -> list:
    """Write every external tensor and every inline initializer >= size_threshold bytes into `data_path`.

    The model is rewritten in place to point at `location`; the returned undo list restores it
    (:func:`undo_writes`). Memory: one tensor at a time beyond what the model already holds.
    """
    from onnxcompress.graph.edit import iter_graphs

    dirs = external_dirs(model)
    undo: list = []
    initializers = [(t, True) for g, _ in iter_graphs(model.graph) for t in g.initializer]
    others = [(t, False) for t in all_tensors(model, initializers=False)]
    with open(data_path, "wb") as out:
        try:
            for tensor, is_initializer in initializers + others:
                external = tensor.data_location == onnx.TensorProto.EXTERNAL
                if external:
                    src, offset, length = locate(model, tensor, dirs)
                elif is_initializer and tensor.ByteSize() >= size_threshold:
                    length = -1
                else:
                    continue
                saved = [(e.key, e.value) for e in tensor.external_data]
                if external:
                    new_offset = _aligned(out, length)
                    copy_range(src, offset, length, out)
                    undo.append((tensor, "external", saved))
                else:
                    new_offset, length = _write_inline(tensor, out, undo)
                del tensor.external_data[:]
                for key, value in (("location", location), ("offset", str(new_offset)), ("length", str(length))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
        except BaseException:
            undo_writes(undo)
            raise
    return undo


def _write_inline(tensor: onnx.TensorProto, out, undo: list) -> tuple[int, int]:
    """Move an inline tensor's bytes to the end of `out` (aligned), its old content saved in `undo`; the
    tensor is marked external (its entries are the caller's). Returns (offset, length) written."""
    if tensor.HasField("raw_data"):
        raw = tensor.raw_data
        undo.append((tensor, "raw", raw))
        tensor.ClearField("raw_data")
    else:
        copy = onnx.TensorProto()
        copy.CopyFrom(tensor)
        undo.append((tensor, "proto", copy))
        raw = numpy_helper.to_array(tensor).tobytes()
        for field in ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data"):
            tensor.ClearField(field)
    length = len(raw)
    offset = _aligned(out, length)
    out.write(raw)
    del raw
    tensor.data_location = onnx.TensorProto.EXTERNAL
    return offset, length


def _aligned(out, length: int) -> int:
    offset = out.tell()
    if length >= ALIGN_MIN_BYTES and offset % ALIGNMENT:
        out.write(b"\0" * (ALIGNMENT - offset % ALIGNMENT))
        offset = out.tell()
    return offset


def undo_writes(undo: list) -> None:
    """Put tensors back as they were before :func:`write_data_file`."""
    for tensor, kind, saved in reversed(undo):
        if kind == "proto":
            tensor.CopyFrom(saved)
            continue
        del tensor.external_data[:]
        if kind == "raw":
            tensor.raw_data = saved
            tensor.data_location = onnx.TensorProto.DEFAULT
        else:
            for key, value in saved:
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
