"""Reading .npy and .npz files without trusting their headers.

``np.load`` allocates what an .npy header declares before it reads a byte, and calls any file
that is neither zip nor .npy "pickled data". Here each array's header is read first and its
declared size compared with the bytes the file (or zip member) really holds and with
:data:`onnxcompress.numerics.limits.MAX_TENSOR_ELEMENTS`; object arrays (pickles) are never loaded.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np

from onnxcompress.errors import DataError
from onnxcompress.numerics.limits import check_elements, element_count

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"
EMPTY_ZIP = b"PK\x05\x06"
_DEFLATE_MAX_RATIO = 1032  # deflate never expands more than this (zlib's technical note)


def _regular(path: Path) -> None:
    """DataError unless `path` is a regular file: a folder, a FIFO (blocks its reader) or a device (/dev/zero
    never ends) is refused before it is opened."""
    try:
        regular = path.is_file()
    except OSError as e:
        raise DataError(f"cannot read '{path}': {e.strerror or e}") from e
    if not regular:
        raise DataError(f"data file '{path}' is not a regular file (a folder, FIFO or device?)")


def file_kind(path: Path) -> str:
    """'npy', 'npz' or 'other', from the first bytes of the file (DataError when it is no regular file)."""
    _regular(path)
    try:
        with open(path, "rb") as f:
            head = f.read(len(NPY_MAGIC))
    except OSError as e:
        raise DataError(f"cannot read '{path}': {e.strerror or e}") from e
    if head.startswith(NPY_MAGIC):
        return "npy"
    if head.startswith(ZIP_MAGIC) or head.startswith(EMPTY_ZIP):
        return "npz"
    return "other"


def read_npy(path: Path) -> np.ndarray:
    """One .npy file, refused (DataError) when its header is not backed by its bytes."""
    _regular(path)
    try:
        with open(path, "rb") as f:
            return _read_array(f, path.stat().st_size, f"'{path}'")
    except OSError as e:
        raise DataError(f"cannot read '{path}': {e.strerror or e}") from e


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz archive by key, each checked as :func:`read_npy` does."""
    kind = file_kind(path)
    if kind != "npz":
        what = "a single .npy array" if kind == "npy" else "neither an .npz archive (zip) nor an .npy array"
        raise DataError(f"'{path}' is {what}; give an .npz whose keys are the input names")
    arrays = {}
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                where = f"'{path}', array '{key}'"
                if not info.filename.endswith(".npy"):
                    raise DataError(f"{where} is not an .npy member; an .npz holds only .npy arrays")
                limit = min(info.compress_size, size) * (_DEFLATE_MAX_RATIO if info.compress_type else 1) + 1024
                if info.file_size > limit:
                    raise DataError(f"{where} declares {info.file_size} bytes, more than its "
                                    f"{min(info.compress_size, size)} stored bytes can hold (a corrupt or hostile "
                                    "archive)")
                with archive.open(info) as member:
                    arrays[key] = _read_array(member, info.file_size, where)
    except (OSError, zipfile.BadZipFile, EOFError, ValueError, NotImplementedError) as e:
        raise DataError(f"cannot read '{path}' as .npz data: {e}") from e
    return arrays


def _read_array(f: BinaryIO, size: int, where: str) -> np.ndarray:
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except (ValueError, EOFError, OSError, SyntaxError) as e:
        raise DataError(f"{where} is not a valid .npy array: {str(e).splitlines()[0] if str(e) else e}") from e
    if dtype.hasobject:
        raise DataError(f"{where} holds Python objects (pickled data), which onnxcompress never loads; "
                        "save plain numeric arrays")
    count = check_elements(element_count(shape), f"{where} (shape {tuple(shape)})", DataError)
    need = count * dtype.itemsize
    have = size - f.tell()
    if need != have:
        raise DataError(f"{where} declares shape {tuple(shape)} of {dtype} ({need} bytes) but holds {have} bytes")
    out = np.empty(count, dtype)
    got = f.readinto(memoryview(out.view(np.uint8)).cast("B")) if need else 0
    if got != need:
        raise DataError(f"{where} is truncated: {got} of its {need} bytes")
    return out.reshape(shape, order="F" if fortran else "C")
