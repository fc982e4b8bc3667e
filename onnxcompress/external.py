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

import atexit
import copy
import dataclasses
import logging
import os
import shutil
import signal
import tempfile
import threading
import uuid
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import ModelError
from .graphs import all_tensors
from .parallel import Lazy

log = logging.getLogger(__name__)

BOOKKEEPING_PREFIX = "onnxcompress.stream."
_STREAM_KEY = BOOKKEEPING_PREFIX + uuid.uuid4().hex  # this process's key: no model file can hold it
# keys older versions kept paths under; a file holding them is hostile or stale, never ours
LEGACY_KEYS = ("onnxcompress.external_data_dirs", "onnxcompress.spill_location")
SPILL_MIN_BYTES = 256 * 1024  # tensors and arrays at least this big leave memory for the spill file
COPY_CHUNK = 64 * 1024 * 1024
ALIGN_MIN_BYTES = 1024 * 1024  # tensors at least this big start at a multiple of ALIGNMENT (mmap-friendly)
ALIGNMENT = 4096
# numpy reads these straight from the file; other types (4-bit, float8, bfloat16, strings) go via onnx
_PLAIN = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
          onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT32,
          onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL}

_spill_root: Path | None = None


def _spill_dir() -> Path:
    """The process's private spill folder, removed at exit, also when ended by SIGTERM or SIGHUP."""
    global _spill_root
    if _spill_root is None or not _spill_root.is_dir():
        _spill_root = Path(tempfile.mkdtemp(prefix="onnxcompress-spill-"))
        atexit.register(shutil.rmtree, _spill_root, True)
        exit_on_termination()
    return _spill_root


def exit_on_termination() -> None:
    """Turn SIGTERM and SIGHUP into SystemExit(128 + signal) in this process, so that atexit and
    `finally` blocks run (spill folder and half-written outputs removed). SIGINT already raises
    KeyboardInterrupt. Only default handlers are replaced, and only from the main thread; forked
    workers that inherit the handler die by the signal as before, leaving the folder to its owner.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        log.warning("ended by signal %s: removing temporary files", signum)
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, handler)


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


# ---- spilling -----------------------------------------------------------------------------------

def _spill_file(model: onnx.ModelProto) -> tuple[str, Path]:
    load = _load_of(model)
    if load is None:
        raise ValueError("only a streamed model has a spill file")
    if load.spill is None:
        load.spill = f"spill-{uuid.uuid4().hex[:12]}.data"
        load.dirs[load.spill] = _spill_dir().resolve()
    return load.spill, _spill_dir() / load.spill


def _append(path: Path, data) -> int:
    with open(path, "ab") as f:
        offset = f.tell()
        pad = (-offset) % ALIGNMENT
        if pad:
            f.write(b"\0" * pad)
            offset += pad
        f.write(memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else data)
    return offset


def spill_tensor(model: onnx.ModelProto, tensor: onnx.TensorProto) -> bool:
    """Move a big inline tensor of a streamed model to the spill file; True if moved."""
    if not is_streamed(model) or tensor.data_location == onnx.TensorProto.EXTERNAL:
        return False
    if not tensor.HasField("raw_data") or len(tensor.raw_data) < SPILL_MIN_BYTES:
        return False
    location, path = _spill_file(model)
    raw = tensor.raw_data
    offset = _append(path, raw)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return True


@dataclasses.dataclass(frozen=True)
class SpilledArray:
    """Where spill_array put an array: map it again with :meth:`load`."""

    path: Path
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]

    def load(self) -> np.ndarray:
        """A copy-on-write memory map: pages are read on touch and let go with the array."""
        if int(np.prod(self.shape, dtype=np.int64)) == 0:
            return np.zeros(self.shape, self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="c", offset=self.offset, shape=self.shape)


def spill_array(model: onnx.ModelProto, array: np.ndarray) -> SpilledArray | np.ndarray:
    """Write a big array of a streamed model to the spill file (small arrays and other models: unchanged)."""
    if not isinstance(array, np.ndarray) or isinstance(array, np.memmap) or array.nbytes < SPILL_MIN_BYTES \
            or not is_streamed(model) or array.dtype.hasobject:
        return array
    _, path = _spill_file(model)
    contiguous = np.ascontiguousarray(array)
    offset = _append(path, contiguous.reshape(-1).view(np.uint8))
    return SpilledArray(path, offset, array.dtype, tuple(array.shape))


class SpillingDict(dict):
    """A dict whose big array values (or big array fields of dataclass values) live in the spill file.

    Each read maps them again, so a value's pages stay resident only while the caller holds it:
    memory does not grow with the number of entries read (say, a pass checking every entry).
    """

    def __init__(self, model: onnx.ModelProto):
        super().__init__()
        self._model = model

    def __setitem__(self, key, value):
        if isinstance(value, np.ndarray):
            value = spill_array(self._model, value)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            moved = {f.name: spill_array(self._model, getattr(value, f.name)) for f in dataclasses.fields(value)
                     if f.init and isinstance(getattr(value, f.name), np.ndarray)
                     and getattr(value, f.name).nbytes >= SPILL_MIN_BYTES}
            if moved:
                template = copy.copy(value)
                for name in moved:  # the template must not keep the arrays alive
                    object.__setattr__(template, name, None)
                value = _Spilled(template, moved)
        super().__setitem__(key, value)

    @staticmethod
    def _load(value):
        if isinstance(value, SpilledArray):
            return value.load()
        if isinstance(value, _Spilled):
            return dataclasses.replace(value.template, **{k: v.load() for k, v in value.fields.items()})
        return value

    def __getitem__(self, key):
        return self._load(super().__getitem__(key))

    def get(self, key, default=None):
        return self[key] if key in self else default

    def values(self):
        return _LazyView(self, lambda k: self[k])

    def items(self):
        return _LazyView(self, lambda k: (k, self[k]))

    def pop(self, key, *default):
        value = super().pop(key, *default)
        return self._load(value)

    def copy(self):
        return {k: self[k] for k in self}


class _LazyView:
    """values()/items() of a SpillingDict: each entry is mapped when iteration reaches it, and let go after."""

    def __init__(self, owner: dict, get):
        self._owner, self._get = owner, get

    def __len__(self) -> int:
        return len(self._owner)

    def __iter__(self):
        return (self._get(k) for k in list(dict.keys(self._owner)))


@dataclasses.dataclass
class _Spilled:
    """A dataclass value whose big array fields are in the spill file (the template holds them empty)."""

    template: object
    fields: dict


def release_spill(model: onnx.ModelProto) -> None:
    """Delete the spill file of a streamed model (and of every copy made from the same load)."""
    load = _load_of(model)
    if load is not None and load.spill:
        (_spill_dir() / load.spill).unlink(missing_ok=True)


# ---- writing ------------------------------------------------------------------------------------

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
    from .graphs import iter_graphs

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
                    if tensor.HasField("raw_data"):
                        raw = tensor.raw_data
                        undo.append((tensor, "raw", raw))
                        tensor.ClearField("raw_data")
                    else:
                        copy = onnx.TensorProto()
                        copy.CopyFrom(tensor)
                        undo.append((tensor, "proto", copy))
                        raw = numpy_helper.to_array(tensor).tobytes()
                        for field in ("float_data", "int32_data", "string_data", "int64_data", "double_data",
                                      "uint64_data"):
                            tensor.ClearField(field)
                    length = len(raw)
                    new_offset = _aligned(out, length)
                    out.write(raw)
                    del raw
                    tensor.data_location = onnx.TensorProto.EXTERNAL
                del tensor.external_data[:]
                for key, value in (("location", location), ("offset", str(new_offset)), ("length", str(length))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
        except BaseException:
            undo_writes(undo)
            raise
    return undo


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
    """
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


def source_files(model: onnx.ModelProto) -> set[Path]:
    """Resolved paths of every external file a streamed model reads from."""
    return {(folder / location).resolve() for location, folder in external_dirs(model).items()}
