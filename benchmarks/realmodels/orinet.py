"""OriNet, a document-orientation classifier (0/90/180/270 degrees; plain CNN), occular-deskew.

Inputs: pages of English text rendered here with Pillow's FreeType default font (random words,
sizes, margins; seeded), rotated by a multiple of 90 degrees, letterboxed to 320x320 on white
as the package does, scaled to [0, 1]. Calibration and test use different seeds and word orders.
Task: the predicted orientation (top-1 of the 4 logits).
"""
from __future__ import annotations

import numpy as np

from . import package_file

PACKAGE = "occular-deskew"
FAMILY = "image classifier (CNN, 8 conv + 2 fc)"
METRIC = "top1"
SIZE = 320
WORDS = ("the of and to in is that for it as with was on be by this are from at or an which have not but "
         "their one all were we when there can been has more if will would who so what about out up into "
         "than them some could its time only new these two may first then do any like my now over such "
         "our man me even most made after also did many before must through back years where much your way "
         "well down should because each just those people how too little state good very make world still "
         "own see men work long get here between both life being under never day same another know while "
         "last might us great old year off come since against go came right used take three invoice total "
         "amount payment date account number page section chapter report summary table figure").split()


def model_path():
    return package_file("occular_deskew", "weights", "orientation_orinet_fp32.onnx")


def _page(rng: np.random.Generator) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    w, h = int(rng.integers(300, 700)), int(rng.integers(300, 900))
    size = int(rng.integers(12, 26))
    font = ImageFont.load_default(size=size)
    img = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    y, margin = int(rng.integers(5, 40)), int(rng.integers(5, 40))
    while y < h - size:
        line, x = [], margin
        while True:
            word = WORDS[int(rng.integers(len(WORDS)))]
            if x + (len(word) + 1) * size * 0.55 > w - margin:
                break
            line.append(word)
            x += (len(word) + 1) * size * 0.55
        draw.text((margin, y), " ".join(line), fill=(0, 0, 0), font=font)
        y += int(size * rng.uniform(1.2, 2.0))
    return np.asarray(img)


def _letterbox(image: np.ndarray) -> np.ndarray:
    from PIL import Image

    im = Image.fromarray(image)
    scale = SIZE / max(im.size)
    nw, nh = max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale))
    canvas = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    canvas.paste(im.resize((nw, nh), Image.BILINEAR), ((SIZE - nw) // 2, (SIZE - nh) // 2))
    return np.asarray(canvas, dtype=np.float32).transpose(2, 0, 1) / 255.0


def make_split(split: str, n: int):
    rng = np.random.default_rng({"calibration": 21, "test": 22}[split])
    feeds = []
    for i in range(n):
        page = np.rot90(_page(rng), k=i % 4).copy()
        feeds.append({"x": _letterbox(page)[None]})
    return feeds, feeds


def answers(run, items):
    return [int(run(feed)[0].argmax()) for feed in items]


def same(a, b) -> bool:
    return a == b
