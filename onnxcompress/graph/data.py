"""Calibration and validation data: a Dataset is an ordered list of feeds, one model call each.

Accepted forms (detected automatically):
- stacked ``.npz``: keys are input names, axis 0 indexes samples; optional ``labels``;
- feed-list ``.npz``: keys ``<sample>/<input>`` (``00000/input``, ``00000/sr``...), any shapes,
  scalars allowed, samples ordered by the number before the slash; optional ``labels``;
- a folder of ``.npz`` files, one feed each (keys = input names), in sorted file-name order;
- a folder of ``.npy`` files named ``<input>.npy`` (stacked) and optionally ``labels.npy``;
- a single ``.npy`` file: the stacked samples of the model's only input (or of the input it is named after);
- from Python, a dict of stacked arrays or any iterable of feed dicts.

Stacked data is the only kind ever batched, and only when the model's first axis is dynamic;
feeds of different shapes are never stacked.

Feeds of a stateful model may be a stream: consecutive calls where one call's state outputs are the
next call's state inputs (a :class:`Stream`, found by runtime.streams). Every run of such data then
goes call by call, each model feeding its own states forward (:class:`StateCarry`), so a candidate is
charged with the state errors it compounds.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxcompress.errors import DataError
from onnxcompress.graph.npz import file_kind, read_npy, read_npz
from onnxcompress.graph.stream import Stream

log = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]
Dim = int | str | None
_FEED_KEY = re.compile(r"^(\d+)/(.+)$")
# the samples a run reads of a data file or folder by default (--samples): calibration and validation gain little
# beyond it, and a folder of 10^5 files would otherwise be read whole by every pass
MAX_SAMPLES = 2048
DATA_SUFFIXES = (".npz", ".npy")  # the files a data folder is read from (_load_folder)


@dataclass(frozen=True)
class InputSpec:
    """A model input as declared: name, numpy dtype, and dims (int, symbolic name, or None)."""

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...] | None  # None: rank unknown
    optional: bool = False  # optional-typed: onnxruntime runs without it, so feeds may leave it out
    sequence: bool = False  # sequence-typed: no data file holds one, so every call gets an empty sequence

    @property
    def fed(self) -> bool:
        """Whether every feed holds this input as an array (data and synthesized inputs alike)."""
        return not (self.optional or self.sequence)

    @property
    def batch_dynamic(self) -> bool:
        return bool(self.shape) and not isinstance(self.shape[0], int)

    def describe(self) -> str:
        if self.shape is None:
            return "(any shape)"
        return "(" + ", ".join(str(d) if d is not None else "?" for d in self.shape) + ")"


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller must feed (graph inputs that are not initializers)."""
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        kind = value.type.WhichOneof("value")
        inner = value.type.optional_type.elem_type if kind == "optional_type" else value.type
        sequence = inner.WhichOneof("value") not in (None, "tensor_type")  # a sequence (or map) of tensors
        tensor_type = inner.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type) if tensor_type.elem_type else np.dtype("float32")
        shape = None
        if tensor_type.HasField("shape") and not sequence:
            shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                          for d in tensor_type.shape.dim)
        specs.append(InputSpec(value.name, np.dtype(dtype), shape, optional=kind == "optional_type",
                               sequence=sequence))
    return specs


def _filled(feed: Feed, specs: Sequence[InputSpec]) -> Feed:
    """`feed` with an empty sequence for each sequence-typed input (onnxruntime needs every one fed; the
    optional ones it runs without)."""
    fill = {s.name: [] for s in specs if s.sequence and not s.optional and s.name not in feed}
    return {**feed, **fill} if fill else feed


class Dataset:
    """Feeds for a model, with optional labels (one per sample, in feed order).

    ``stacked`` holds the arrays when the data came stacked (axis 0 = samples), which lets
    :meth:`chunks` run several samples per call where the model allows it.
    """

    def __init__(self, feeds: Sequence[Feed] | None = None, *, labels: np.ndarray | None = None,
                 stacked: Mapping[str, np.ndarray] | None = None, source: str = "data"):
        if (feeds is None) == (stacked is None):
            raise ValueError("give either feeds or stacked arrays")
        self.stacked = dict(stacked) if stacked is not None else None
        self._feeds = feeds
        self.labels = None if labels is None else np.asarray(labels)
        self.source = source
        self.synthetic = False
        self.guessed: list[str] = []  # synthesized inputs whose symbolic dims were guessed
        self.note: str | None = None  # how the guessed dims were chosen, for the report
        self.stream: Stream | None = None  # consecutive calls of a stateful model (run call by call)
        if self.stacked is not None:
            counts = {name: (a.shape[0] if a.ndim else -1) for name, a in self.stacked.items()}
            if len(set(counts.values())) > 1 or -1 in counts.values():
                raise DataError(f"{source}: stacked arrays must share their first axis (samples); got {counts}")

    def __len__(self) -> int:
        if self.stacked is not None:
            return next(iter(self.stacked.values())).shape[0] if self.stacked else 0
        return len(self._feeds)

    def limit(self, n: int | None) -> "Dataset":
        """The first n samples (all when n is None)."""
        if n is None or n >= len(self):
            return self
        return self.subset(slice(0, n))

    def subset(self, pick: slice) -> "Dataset":
        """The samples `pick` selects, in its order (stacked arrays: views; feeds read from a folder:
        only those)."""
        labels = None if self.labels is None else self.labels[pick]
        if self.stacked is not None:
            out = Dataset(stacked={k: v[pick] for k, v in self.stacked.items()}, labels=labels, source=self.source)
        else:
            out = Dataset([self._feeds[i] for i in range(len(self))[pick]], labels=labels, source=self.source)
        out.synthetic, out.guessed, out.note = self.synthetic, self.guessed, self.note
        out.stream = self.stream.subset(pick) if self.stream is not None else None
        return out

    def feed(self, index: int, specs: Sequence[InputSpec]) -> Feed:
        """Sample `index` shaped as one model call."""
        if self.stacked is None:
            return _filled(self._feeds[index], specs)
        return _filled({name: _one_sample(array, index, _spec(specs, name)) for name, array in self.stacked.items()},
                       specs)

    def chunks(self, specs: Sequence[InputSpec], max_batch: int = 64) -> Iterator[tuple[Feed, int]]:
        """Yield (feed, number of samples in it), batching stacked data where the model allows (never a
        stream: its calls run one by one, in order)."""
        if self.stream is not None:
            max_batch = 1
        if self.stacked is not None and max_batch > 1 and self._batchable(specs):
            for start in range(0, len(self), max_batch):
                stop = min(start + max_batch, len(self))
                yield _filled({k: v[start:stop] for k, v in self.stacked.items()}, specs), stop - start
            return
        if max_batch > 1 and self._uniform_singles(specs):
            # one-sample feeds of equal shapes run as batches, as the same data stacked would
            for start in range(0, len(self), max_batch):
                group = self._feeds[start:start + max_batch]
                yield _filled({k: np.concatenate([f[k] for f in group]) for k in group[0]}, specs), len(group)
            return
        for i in range(len(self)):
            yield self.feed(i, specs), 1

    def _uniform_singles(self, specs: Sequence[InputSpec]) -> bool:
        """In-memory feeds that all hold one sample (batch axis 1, dynamic in the model) of the same shapes."""
        if not isinstance(self._feeds, list) or len(self._feeds) < 2:
            return False
        first = self._feeds[0]
        for name, value in first.items():
            spec = _spec(specs, name)
            if spec is None or spec.shape is None or not spec.batch_dynamic or np.ndim(value) != len(spec.shape) \
                    or np.shape(value)[0] != 1:
                return False
        shapes = {k: np.shape(v) for k, v in first.items()}
        return all(f.keys() == shapes.keys() and all(np.shape(f[k]) == s for k, s in shapes.items())
                   for f in self._feeds)

    def _batchable(self, specs: Sequence[InputSpec]) -> bool:
        for name, array in self.stacked.items():
            spec = _spec(specs, name)
            if spec is None or spec.shape is None or not spec.batch_dynamic or array.ndim != len(spec.shape):
                return False
        return True

    def check(self, specs: Sequence[InputSpec]) -> None:
        """Raise DataError naming the sample and input for the first feed that does not fit."""
        if len(self) == 0:
            raise DataError(f"{self.source}: holds no samples")
        required = {s.name for s in specs if s.fed}
        sequences = {s.name for s in specs if s.sequence}  # fed an empty sequence by feed()
        known = {s.name for s in specs} - sequences
        n = len(self) if self.stacked is None else 1  # stacked: one check covers every sample
        for i in range(n):
            feed = self.feed(i, specs)
            where = f"{self.source}, sample {i}" if self.stacked is None else self.source
            for name in sorted(required - feed.keys()):
                raise DataError(f"{where}: input '{name}' is missing (the model needs {sorted(required)})")
            for name in sorted(k for k in feed.keys() & sequences if not isinstance(feed[k], list)):
                raise DataError(f"{where}: input '{name}' is a sequence of tensors, which data files cannot hold "
                                "(onnxcompress feeds it an empty sequence): leave it out")
            for name in sorted(feed.keys() - known - sequences):
                raise DataError(f"{where}: the model has no input '{name}' (it has {sorted(known)})")
            for spec in specs:
                if spec.name in feed.keys() & known:
                    _check_value(where, spec, feed[spec.name])
        if self.stacked is not None:
            for name, array in self.stacked.items():
                _check_finite(self.source, name, array)
        if self.labels is not None:
            _check_labels(self.source, self.labels, len(self))


def _check_labels(source: str, labels: np.ndarray, samples: int) -> None:
    """Labels are class numbers, one per sample (a row of them for sequence outputs): a scalar, strings,
    NaN or fractions matched no argmax and made the accuracy silently 0."""
    if labels.ndim == 0 or labels.shape[0] != samples:
        raise DataError(f"{source}: {labels.shape[0] if labels.ndim else 'a scalar, not'} labels for {samples} "
                        "samples")
    whole = labels.dtype.kind in "biu" or (labels.dtype.kind == "f" and bool(np.isfinite(labels).all())
                                           and bool((labels == np.round(labels)).all()))
    if not whole:
        raise DataError(f"{source}: labels must be whole class numbers, one per sample; got {labels.dtype} values "
                        "that are not (strings, fractions, NaN or Inf?)")
    if labels.size and labels.min() < 0:
        raise DataError(f"{source}: labels must be class numbers from 0; they hold {labels.min():g}")


def _spec(specs: Sequence[InputSpec], name: str) -> InputSpec | None:
    return next((s for s in specs if s.name == name), None)


def _one_sample(array: np.ndarray, index: int, spec: InputSpec | None) -> np.ndarray:
    """Row `index` of a stacked array, keeping a batch axis of 1 when the model declares one."""
    if spec is not None and spec.shape is not None and array.ndim == len(spec.shape):
        return array[index:index + 1]
    return array[index]


def _check_finite(where: str, name: str, value: np.ndarray) -> None:
    """Calibration statistics and fidelity figures mean nothing over NaN or Inf inputs."""
    if value.dtype.kind in "fc" and not np.isfinite(value).all():
        bad = value.size - int(np.isfinite(value).sum())
        first = tuple(int(i) for i in np.argwhere(~np.isfinite(value))[0])
        raise DataError(f"{where}, input '{name}': holds NaN or Inf ({bad} of {value.size} values, the first at "
                        f"index {first}); give finite data")


def _check_value(where: str, spec: InputSpec, value) -> None:
    if not isinstance(value, np.ndarray):
        raise DataError(f"{where}, input '{spec.name}': expected a numpy array, got {type(value).__name__}")
    _check_finite(where, spec.name, value)
    if value.dtype != spec.dtype:
        raise DataError(f"{where}, input '{spec.name}': dtype {value.dtype} does not match the model's {spec.dtype} "
                        f"(convert with .astype(np.{spec.dtype}))")
    if spec.shape is None:
        return
    if value.ndim != len(spec.shape):
        raise DataError(f"{where}, input '{spec.name}': expected rank {len(spec.shape)} {spec.describe()}, "
                        f"got shape {tuple(value.shape)}")
    for axis, (want, got) in enumerate(zip(spec.shape, value.shape)):
        if isinstance(want, int) and want > 0 and want != got:
            raise DataError(f"{where}, input '{spec.name}': expected shape {spec.describe()}, got {tuple(value.shape)} "
                            f"(axis {axis} must be {want})")


def load_data(source, *, name: str | None = None, specs: Sequence[InputSpec] = ()) -> Dataset:
    """A Dataset from a path (.npz or .npy file, or folder), a dict of stacked arrays, or an iterable of
    feeds. `specs` (the model's inputs) says which input a single .npy file feeds."""
    if isinstance(source, Dataset):
        return source
    if isinstance(source, (str, Path)):
        return _load_path(Path(source), specs)
    if isinstance(source, np.ndarray):  # the stacked samples of a model's only input, as a single .npy file
        if len(specs) != 1:
            raise DataError(f"{name or 'data'} is a single array, but the model has inputs {[s.name for s in specs]}: "
                            "give a dict {input name: stacked samples}")
        source = {specs[0].name: source}
    if isinstance(source, Mapping):
        arrays = {k: np.asarray(v) for k, v in source.items()}
        labels = _pop_labels(arrays, specs)
        return Dataset(stacked=arrays, labels=labels, source=name or "data")
    if isinstance(source, Iterable):
        feeds = [f for f in source]
        if not all(isinstance(f, Mapping) for f in feeds):
            odd = next(type(f).__name__ for f in feeds if not isinstance(f, Mapping))
            raise DataError(f"{name or 'data'}: each feed must be a dict {{input name: array}}, not a {odd}")
        return Dataset([dict(f) for f in feeds], source=name or "data")
    raise DataError(f"cannot read data from a {type(source).__name__}; give an .npz file, a folder, or feed dicts")


def _load_path(path: Path, specs: Sequence[InputSpec]) -> Dataset:
    if not path.exists():
        raise DataError(f"data path '{path}' does not exist")
    if path.is_dir():
        return _load_folder(path, specs)
    if not path.is_file():
        raise DataError(f"data path '{path}' is not a regular file or folder")
    if file_kind(path) == "npy":
        return _single_npy(path, specs)
    arrays = read_npz(path)
    labels = _pop_labels(arrays, specs)
    if not arrays:
        raise DataError(f"'{path}' holds no arrays")
    if any(_FEED_KEY.match(k) for k in arrays):
        return Dataset(_feed_list(arrays, path), labels=labels, source=str(path))
    return Dataset(stacked=arrays, labels=labels, source=str(path))


def _single_npy(path: Path, specs: Sequence[InputSpec]) -> Dataset:
    """One .npy file: the stacked samples of the input it is named after, else of the only input."""
    names = [s.name for s in specs]
    if path.stem in names or len(names) == 1:
        name = path.stem if path.stem in names else names[0]
        return Dataset(stacked={name: read_npy(path)}, source=str(path))
    raise DataError(f"'{path}' is a single array but the model has inputs {names}; give an .npz whose keys are "
                    "the input names, or a folder of <input>.npy files")


def _feed_list(arrays: dict[str, np.ndarray], path: Path) -> list[Feed]:
    feeds: dict[int, Feed] = {}
    for key, value in arrays.items():
        match = _FEED_KEY.match(key)
        if match is None:
            raise DataError(f"'{path}': key '{key}' is not of the form <sample>/<input> like the others")
        feeds.setdefault(int(match.group(1)), {})[match.group(2)] = value
    return [feeds[i] for i in sorted(feeds)]


def _pop_labels(arrays: dict[str, np.ndarray], specs: Sequence[InputSpec]) -> np.ndarray | None:
    """The data's `labels` array, taken out of `arrays`; none when the model has an input of that name (the
    array feeds it)."""
    return None if any(s.name == "labels" for s in specs) else arrays.pop("labels", None)


def _load_folder(path: Path, specs: Sequence[InputSpec]) -> Dataset:
    npz = sorted(path.glob("*.npz"))
    npy = sorted(path.glob("*.npy"))
    if npz and npy:
        raise DataError(f"folder '{path}' mixes .npz and .npy files; use one kind")
    root = path.resolve()
    for file in npz or npy:  # the folder's own files: a link out of it reads a file nobody named
        if file.is_symlink() and not file.resolve().is_relative_to(root):
            raise DataError(f"data file '{file}' is a link to a file outside the folder '{path}'; copy the file "
                            "in, or give it as --data itself")
    if npz:
        return Dataset(_LazyFeeds(npz), source=str(path))
    if npy:
        arrays = {}
        for file in npy:
            arrays[file.stem] = read_npy(file)
        labels = _pop_labels(arrays, specs)
        return Dataset(stacked=arrays, labels=labels, source=str(path))
    raise DataError(f"folder '{path}' holds no .npz or .npy files")


class _LazyFeeds(Sequence):
    """Feeds read from a folder of .npz files, one file at a time."""

    def __init__(self, files: list[Path]):
        self._files = files

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> Feed:
        feed = read_npz(self._files[index])
        if not feed:
            raise DataError(f"'{self._files[index]}' (sample {index}) holds no arrays")
        return feed
