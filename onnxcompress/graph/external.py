"""Where tensor bytes live when a model is streamed: external data read lazily, a spill file, streaming copies.

A streamed model is a ModelProto loaded without its weight data: its big tensors keep their
``data_location = EXTERNAL`` entries and are read one at a time, straight from the file, when a
pass asks for them (:func:`read_tensor`). Large tensors that passes create (codes, pruned
weights) are appended to a per-load *spill* file in a private temporary folder instead of
being held in memory (:func:`spill_tensor`), and large arrays passes keep in the context
(masks, codes) are moved there too (:func:`spill_array`, :class:`SpillingDict`). Saving copies
every external tensor chunk by chunk into the output's data file, so peak memory is bounded by
the largest single weight, not the model.

Design: ONNX external locations are relative paths, and protobuf messages take no weak
references, so which load a streamed model (and every copy of it) belongs to is recorded IN the
model, as an opaque token under a metadata key that holds a random secret of this process
(:data:`_STREAM_KEY`). The folders and the spill file live in our own registry (:data:`_LOADS`),
keyed by that token: no path is ever read from metadata, and a model file cannot name a key or a
token of ours. :func:`strip_foreign_bookkeeping` drops look-alike keys from every loaded file,
and :func:`strip_bookkeeping` removes ours from anything written to disk (model.save_model does).
The token survives ``CopyFrom`` (passes copy models freely). onnxruntime and the ONNX checker
both refuse absolute locations, so locations themselves stay relative and untouched; each was
checked at load to resolve inside its model's folder (model.check_external_data).
"""
from __future__ import annotations

import dataclasses
import logging
import tempfile
import uuid
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxcompress.errors import ModelError
from onnxcompress.graph.edit import all_tensors
from onnxcompress.execution.parallel import Lazy

log = logging.getLogger(__name__)

BOOKKEEPING_PREFIX = "onnxcompress.stream."
_STREAM_KEY = BOOKKEEPING_PREFIX + uuid.uuid4().hex  # this process's key: no model file can hold it
# keys older versions kept paths under; a file holding them is hostile or stale, never ours
LEGACY_KEYS = ("onnxcompress.external_data_dirs", "onnxcompress.spill_location")
# numpy reads these straight from the file; other types (4-bit, float8, bfloat16, strings) go via onnx
_PLAIN = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
          onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT32,
          onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL}

# ---- bookkeeping: a token in metadata_props, everything else in our registry -----------------

@dataclasses.dataclass
class _Load:
    """One streamed load: {location: folder} it reads from, and its spill file's location if any."""

    dirs: dict[str, Path]
    spill: str | None = None


_LOADS: dict[str, _Load] = {}


def _meta(model: onnx.ModelProto, key: str) -> str | None:
    return next((e.value for e in model.metadata_props if e.key == key), None)


def _set_meta(model: onnx.ModelProto, key: str, value: str) -> None:
    for entry in model.metadata_props:
        if entry.key == key:
            entry.value = value
            return
    entry = model.metadata_props.add()
    entry.key, entry.value = key, value


def _load_of(model: onnx.ModelProto) -> _Load | None:
    token = _meta(model, _STREAM_KEY)
    return _LOADS.get(token) if token else None


def external_dirs(model: onnx.ModelProto) -> dict[str, Path]:
    """{location: folder} of a streamed model (empty for any other model)."""
    load = _load_of(model)
    return dict(load.dirs) if load else {}


def attach_dirs(model: onnx.ModelProto, dirs: dict[str, Path]) -> None:
    """Record where the model's external locations live (folders we chose, never the model)."""
    load = _load_of(model)
    if load is None:
        token = uuid.uuid4().hex
        load = _LOADS[token] = _Load({})
        _set_meta(model, _STREAM_KEY, token)
    load.dirs.update({k: Path(v).resolve() for k, v in dirs.items()})


def _is_bookkeeping(key: str) -> bool:
    return key in LEGACY_KEYS or key.startswith(BOOKKEEPING_PREFIX)


def _remove_keys(model: onnx.ModelProto, drop) -> list[tuple[str, str]]:
    removed = [(e.key, e.value) for e in model.metadata_props if drop(e.key)]
    if removed:
        keep = [(e.key, e.value) for e in model.metadata_props if not drop(e.key)]
        del model.metadata_props[:]
        for key, value in keep:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
    return removed


def strip_foreign_bookkeeping(model: onnx.ModelProto, source: str = "the model") -> None:
    """Drop metadata keys that look like our bookkeeping from a model read from a file: they were
    not written by this process, so they are ignored (a hostile file could set them to any path)."""
    removed = _remove_keys(model, _is_bookkeeping)
    if removed:
        log.info("%s: ignored metadata %s (internal keys are never read from a file)", source,
                    sorted(k for k, _ in removed))


def strip_bookkeeping(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """Remove our keys from metadata_props; returns them so the caller can put them back."""
    return _remove_keys(model, _is_bookkeeping)


def restore_bookkeeping(model: onnx.ModelProto, entries: list[tuple[str, str]]) -> None:
    for key, value in entries:
        _set_meta(model, key, value)


def is_streamed(model: onnx.ModelProto) -> bool:
    return _load_of(model) is not None


# ---- reading ----------------------------------------------------------------------------------

def has_external(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in all_tensors(model))


_MAX_EXTENT = 2**62  # larger offsets or lengths than any file can have


def extent(tensor: onnx.TensorProto) -> tuple[str, int, int | None]:
    """(location, offset, length or None) an external tensor declares; ModelError when they are not
    whole numbers >= 0 (length None: up to the end of the file)."""
    info = {e.key: e.value for e in tensor.external_data}
    numbers = []
    for key in ("offset", "length"):
        text = info.get(key)
        if text is None:
            numbers.append(None)
            continue
        if not (text.isascii() and text.isdigit()) or int(text) > _MAX_EXTENT:
            raise ModelError(f"tensor '{tensor.name}' declares external {key} {text[:40]!r}, which is not a "
                             "whole number of bytes >= 0; the model is corrupt")
        numbers.append(int(text))
    return info.get("location", ""), numbers[0] or 0, numbers[1]


# element types stored several to a byte: bits per element (others: numpy's itemsize)
SUB_BYTE_BITS = {getattr(onnx.TensorProto, name): bits for name, bits in
                  (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2)) if hasattr(onnx.TensorProto, name)}


def element_count(tensor: onnx.TensorProto) -> int:
    """The elements a tensor's dims declare, as a Python int (no int64 overflow on hostile dims)."""
    count = 1
    for d in tensor.dims:
        count *= int(d)
    return count


def data_bytes(tensor: onnx.TensorProto) -> int | None:
    """The bytes of raw data a tensor's dims and element type need (None for strings: no fixed size)."""
    if tensor.data_type == onnx.TensorProto.STRING:
        return None
    count = element_count(tensor)
    bits = SUB_BYTE_BITS.get(tensor.data_type)
    return (count * bits + 7) // 8 if bits else count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def locate(model: onnx.ModelProto, tensor: onnx.TensorProto, dirs: dict[str, Path] | None = None
           ) -> tuple[Path, int, int]:
    """(file, offset, length) of an external tensor, or ModelError when its file is unknown or short."""
    location, offset, declared = extent(tensor)
    dirs = external_dirs(model) if dirs is None else dirs
    if location not in dirs:
        raise ModelError(f"tensor '{tensor.name}' keeps its data in external file '{location}', whose folder is "
                         "unknown; load the model with onnxcompress.load_model(path)")
    path = dirs[location] / location
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ModelError(f"external data file '{path}' of tensor '{tensor.name}' is missing") from e
    length = size - offset if declared is None else declared
    if offset + length > size or length < 0:
        raise ModelError(f"external data file '{path}' is truncated: tensor '{tensor.name}' needs bytes "
                         f"{offset}..{offset + length}, the file has {size}")
    return path, offset, length


def read_tensor(model: onnx.ModelProto, tensor: onnx.TensorProto) -> np.ndarray:
    """The values of any tensor; external ones are read from disk now, one tensor's worth of memory."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    path, offset, length = locate(model, tensor)
    shape = tuple(int(d) for d in tensor.dims)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if tensor.data_type in _PLAIN:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
        if length != count * dtype.itemsize:
            raise ModelError(f"tensor '{tensor.name}' declares {length} external bytes for shape {list(shape)} "
                             f"of {dtype.name}; the model is corrupt")
        array = np.fromfile(path, dtype=dtype, count=count, offset=offset)
        return array.astype(dtype.newbyteorder("="), copy=False).reshape(shape)
    if length != data_bytes(tensor):
        raise ModelError(f"tensor '{tensor.name[:200]}' declares {length} external bytes for shape {list(shape)}, "
                         f"which needs {data_bytes(tensor)}; the model is corrupt")
    with open(path, "rb") as f:
        f.seek(offset)
        raw = f.read(length)
    inline = onnx.TensorProto()
    inline.CopyFrom(tensor)
    del inline.external_data[:]
    inline.data_location = onnx.TensorProto.DEFAULT
    inline.raw_data = raw
    return numpy_helper.to_array(inline)


@dataclasses.dataclass(frozen=True)
class ArrayRef(Lazy):
    """A plain external tensor by file, offset and layout: what a worker needs to read it itself
    (on another machine, the file must be at the same path, e.g. on a shared filesystem)."""

    path: str
    offset: int
    shape: tuple[int, ...]
    dtype: str  # little-endian numpy dtype string

    def load(self) -> np.ndarray:
        dtype = np.dtype(self.dtype)
        count = int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1
        try:
            array = np.fromfile(self.path, dtype=dtype, count=count, offset=self.offset)
        except OSError as e:
            raise ModelError(f"cannot read external data file '{self.path}' here: {e}") from e
        if array.size != count:
            raise ModelError(f"external data file '{self.path}' is shorter here than when the model was loaded")
        return array.astype(dtype.newbyteorder("="), copy=False).reshape(self.shape)


def array_ref(model: onnx.ModelProto, tensor: onnx.TensorProto) -> ArrayRef | None:
    """An ArrayRef to the tensor's values when they are plain external data, else None."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL or tensor.data_type not in _PLAIN:
        return None
    path, offset, length = locate(model, tensor)
    shape = tuple(int(d) for d in tensor.dims)
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
    if length != (int(np.prod(shape, dtype=np.int64)) if shape else 1) * dtype.itemsize:
        return None  # read_tensor names the inconsistency
    return ArrayRef(str(path.resolve()), offset, shape, dtype.str)


def inline_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with every external tensor read into memory (for small models only)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    dirs = external_dirs(model)
    for tensor in all_tensors(copy):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            path, offset, length = locate(copy, tensor, dirs)
            with open(path, "rb") as f:
                f.seek(offset)
                raw = f.read(length)
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = raw
    strip_bookkeeping(copy)
    return copy


def folders_in_use(model: onnx.ModelProto) -> set[Path]:
    """The folders the model's external tensors are read from (ModelError when one is unknown)."""
    dirs = external_dirs(model)
    return {locate(model, t, dirs)[0].parent for t in all_tensors(model)
            if t.data_location == onnx.TensorProto.EXTERNAL}


def check_model(model: onnx.ModelProto, *, full_check: bool = True) -> None:
    """onnx.checker.check_model, also for a streamed model.

    The checker resolves external locations against the model file's folder (refusing links and
    absolute paths), so a streamed model is checked as a small file whose external tensors all
    point to one empty stand-in file (model.check_external_data checks the real files' extents).

    A graph input or output that declares a tensor type but no shape, not even its rank, is valid to
    onnxruntime, which runs it; onnx's checker requires the field. Such a model is checked as a copy
    with those shapes set to rank 0 and without the full check's shape inference (a rank it does not know
    would fail it), so the rest of its structure is still checked.
    """
    if unranked_values(model.graph):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        for value in unranked_values(copy.graph):
            value.type.tensor_type.shape.SetInParent()
        check_model(copy, full_check=False)
        return
    if not has_external(model):
        onnx.checker.check_model(model, full_check=full_check)
        return
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in all_tensors(copy):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = "stand-in.data"
    with tempfile.TemporaryDirectory(prefix="onnxcompress-check-") as folder:
        (Path(folder) / "stand-in.data").write_bytes(b"")
        path = Path(folder) / "model.onnx"
        path.write_bytes(copy.SerializeToString())
        onnx.checker.check_model(str(path), full_check=full_check)


def check_result(model: onnx.ModelProto, source: onnx.ModelProto) -> None:
    """check_model on a model made from `source`, with the full check's strict shape inference unless
    `source` itself fails it: a model whose declared shapes contradict what onnx infers (an input dim of
    -7, an output dim that is not what the op makes) runs in onnxruntime, which ignores such
    declarations, and a copy of it would fail the same way through no fault of ours."""
    full = model.ByteSize() < 2**31 - 1
    try:
        check_model(model, full_check=full)
    except onnx.shape_inference.InferenceError:
        try:
            check_model(source, full_check=full)
        except onnx.shape_inference.InferenceError as e:
            log.info("the input fails onnx's strict shape inference too (%s): result checked without it",
                     str(e).strip().splitlines()[-1][:200] if str(e).strip() else "")
            check_model(model, full_check=False)
            return
        raise


def unranked_values(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """The graph's inputs and outputs that declare a tensor type but no shape (rank unknown)."""
    return [v for v in list(graph.input) + list(graph.output)
            if v.type.HasField("tensor_type") and not v.type.tensor_type.HasField("shape")]


def source_files(model: onnx.ModelProto) -> set[Path]:
    """Resolved paths of every external file a streamed model reads from."""
    return {(folder / location).resolve() for location, folder in external_dirs(model).items()}
