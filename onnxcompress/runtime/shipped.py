"""What a model file costs to ship and to hold: bytes on disk, over the wire, and resident in memory.

- disk: the .onnx file and every external-data file it references (:func:`model.file_bytes`);
- gzip: those files, in that order, as one stream compressed by zlib at level 9 (what ``gzip -9``
  and HTTP ``Content-Encoding: gzip`` do, less gzip's 18 header bytes);
- brotli: the same stream at quality 11 (HTTP ``br``), when the optional ``brotli`` package is
  installed; skipped above BROTLI_MAX_BYTES, where quality 11 takes over ten seconds;
- resident: the float tensor bytes of the model onnxruntime actually runs: the session's
  optimized graph (basic level: constant folding) saved and its float initializers summed. A
  portable decode chain folds into the dense float weight, so this is the float model's size, not
  the file's: small files, original memory. Not measured for inputs above RESIDENT_MAX_BYTES:
  folding holds the dense float model and more (a 0.5 GB MatMul stack's `share` output: 6.8 GB of
  RSS and 30 s), which a multi-GB model cannot afford.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx

from onnxcompress.graph.model import external_data_files, file_bytes
from onnxcompress.runtime.sessions import ort, to_runnable, uses_domain

log = logging.getLogger(__name__)

# measured on packed codes (5-bit `share` output, one core): brotli -q 11 1.2 CPU s per MB, gzip -9 0.025 s per MB
BROTLI_MAX_BYTES = 8 << 20  # at most ~10 s (64 MB took 75 s, longer than sharing a 0.25 GB model)
MEASURE_MAX_BYTES = 256 << 20  # gzip -9 and the resident size of larger files: not measured (~7 s here at most)
RESIDENT_MAX_BYTES = 64 << 20  # float model bytes above which the resident size is not measured (memory, and
# time: onnxruntime folding the 0.25 GB stack's `share` output took 29 s, the share pass 40 s, same run)
CHUNK = 1 << 20
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
ORT_FORMAT_NOTE = ("ship the .onnx file: converting it to ORT format (.ort) with optimizations stores the folded "
                   "float weights (a 168 KB LeNet-300-100 `share` output became 1.05 MB), and without them (level "
                   "'disable') the .ort stays small but onnxruntime does not fold an .ort at load, so the decode ops "
                   "run at every inference (150 ms against 0.023 ms); see docs/usage.md: Shipped size")


@dataclass
class ShippedSize:
    disk: int
    gzip: int | None  # None: the files are larger than MEASURE_MAX_BYTES
    brotli: int | None = None  # None: the brotli package is not installed, or the files are too big
    resident: int | None = None  # None: onnxruntime could not build the model's session

    def as_dict(self) -> dict:
        return asdict(self)


def _files(path: Path) -> list[Path]:
    model = onnx.load(str(path), load_external_data=False)
    return [path] + [path.parent / name for name in external_data_files(model) if (path.parent / name).is_file()]


def _chunks(files: list[Path]) -> Iterator[bytes]:
    for file in files:
        with open(file, "rb") as handle:
            while chunk := handle.read(CHUNK):
                yield chunk


def gzip_bytes(files: list[Path]) -> int:
    """Bytes of the files' concatenation deflated at level 9 (zlib framing: 6 bytes, gzip's is 18)."""
    coder = zlib.compressobj(9, zlib.DEFLATED, 15)
    return sum(len(coder.compress(chunk)) for chunk in _chunks(files)) + len(coder.flush())


def brotli_bytes(files: list[Path], total: int) -> int | None:
    try:
        import brotli
    except ImportError:
        return None
    if total > BROTLI_MAX_BYTES:
        log.info("brotli size skipped: %d bytes is above %d", total, BROTLI_MAX_BYTES)
        return None
    return len(brotli.compress(b"".join(_chunks(files)), quality=11))


def resident_float_bytes(path: Path) -> int | None:
    """Float initializer bytes of the graph onnxruntime runs (constant folding applied). A packed
    model is decoded first (as the runtime backend does); a portable one is given as it is."""
    with tempfile.TemporaryDirectory(prefix="onnxcompress-") as folder:
        source, optimized = path, Path(folder) / "optimized.onnx"
        if uses_domain(onnx.load(str(path), load_external_data=False)):
            source = Path(folder) / "model.onnx"
            onnx.save(to_runnable(onnx.load(str(path))), str(source), save_as_external_data=True,
                      all_tensors_to_one_file=True, location="model.data", size_threshold=1024)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(optimized)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            log.info("resident size not measured: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
            return None
        folded = onnx.load(str(optimized), load_external_data=False)
    return sum(_tensor_bytes(t) for t in folded.graph.initializer if t.data_type in FLOAT_TYPES)


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    for entry in tensor.external_data:
        if entry.key == "length":
            return int(entry.value)
    if tensor.raw_data:
        return len(tensor.raw_data)
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def shipped_size(path: str | Path, *, resident: bool = True) -> ShippedSize:
    path = Path(path)
    files = _files(path)
    disk = file_bytes(path)
    if disk > MEASURE_MAX_BYTES:
        log.info("gzip and resident sizes not measured: %d bytes is above %d", disk, MEASURE_MAX_BYTES)
        return ShippedSize(disk=disk, gzip=None)
    return ShippedSize(disk=disk, gzip=gzip_bytes(files), brotli=brotli_bytes(files, disk),
                       resident=resident_float_bytes(path) if resident else None)


def shipped_of_staged(plan, output: str | Path, *, float_bytes: int | None = None) -> ShippedSize | None:
    """:func:`shipped_size` of an output still staged in an OutputPlan (not yet renamed into place).
    A model with external data has its staged files copied under their final names into a private
    temporary folder (onnx refuses external data with several hard links), so the model finds its
    external data where it will be; a single-file model is measured in place;
    above MEASURE_MAX_BYTES only the bytes on disk are given, without a copy. float_bytes: the bytes of
    the model before compression; above RESIDENT_MAX_BYTES the resident size is not measured. None
    when the copy fails."""
    from onnxcompress.graph.model import output_roles

    output = Path(output)
    staged = [(role.path.name, plan.staged(role.path)) for role in output_roles(output)]
    staged = [(name, path) for name, path in staged if path is not None]
    disk = sum(path.stat().st_size for _, path in staged)
    if disk > MEASURE_MAX_BYTES:
        log.info("gzip and resident sizes not measured: %d bytes is above %d", disk, MEASURE_MAX_BYTES)
        return ShippedSize(disk=disk, gzip=None)
    resident = float_bytes is None or float_bytes <= RESIDENT_MAX_BYTES
    if not resident:
        log.info("resident size not measured: the model's %d bytes are above %d", float_bytes, RESIDENT_MAX_BYTES)
    if len(staged) == 1:  # no external data: the staged file is measured where it is, no copy
        return shipped_size(staged[0][1], resident=resident)
    try:
        with tempfile.TemporaryDirectory(prefix="onnxcompress-ship-") as folder:
            for name, path in staged:
                shutil.copyfile(path, Path(folder) / name)
            return shipped_size(Path(folder) / output.name, resident=resident)
    except OSError as e:  # the sizes are a report figure, not the job
        log.info("shipped size not measured: %s", e)
        return None
