"""The spill file of a streamed model: large tensors and arrays that passes create leave memory.

Tensors that passes create (codes, pruned weights) are appended to a per-load spill file in a
private temporary folder (:func:`spill_tensor`), and large arrays passes keep in the context (masks,
codes) are moved there too (:func:`spill_array`, :class:`SpillingDict`). The folder is removed at
exit, also when the process is ended by SIGTERM or SIGHUP (:func:`exit_on_termination`). Which load
a spill file belongs to is recorded in :mod:`onnxcompress.graph.external`'s registry.
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

from onnxcompress.graph.datafile import ALIGNMENT
from onnxcompress.graph.external import _load_of, is_streamed

log = logging.getLogger(__name__)

SPILL_MIN_BYTES = 256 * 1024  # tensors and arrays at least this big leave memory for the spill file

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
