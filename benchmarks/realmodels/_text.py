"""Text rendered here for the OCR models (seeded): words, numbers, dates and prices drawn with
Pillow's own FreeType font (it ships with Pillow, so every machine draws the same pixels), dark
ink on light paper with a little noise, as BGR uint8 arrays (the OCR packages read images with
OpenCV). Latin only: no CJK font ships with Pillow or is on a bare machine."""
from __future__ import annotations

import numpy as np

WORDS = ("the of and to in is for on with from by at invoice total amount payment date account number page "
         "section report summary table figure order customer address street city phone email price quantity "
         "item delivery receipt balance due tax discount shipping name signature office manager station hotel "
         "coffee water train ticket open closed exit entrance north south east west floor room door parking "
         "monday friday january march october london berlin paris tokyo madrid road avenue bank card cash "
         "credit service center hospital school library museum market street store pharmacy bakery").split()


def line_text(rng: np.random.Generator) -> str:
    """One line of a receipt, sign or form: words in three casings, a date, a price or a code."""
    kind = int(rng.integers(0, 6))
    if kind == 0:
        return f"{int(rng.integers(1, 29)):02d}/{int(rng.integers(1, 13)):02d}/{int(rng.integers(1990, 2030))}"
    if kind == 1:
        return f"{WORDS[int(rng.integers(len(WORDS)))].capitalize()} {int(rng.integers(1, 999))}.{int(rng.integers(0, 100)):02d}"
    if kind == 2:
        return f"No. {int(rng.integers(100, 99999))}-{''.join(chr(65 + int(c)) for c in rng.integers(0, 26, 2))}"
    words = [WORDS[int(i)] for i in rng.integers(0, len(WORDS), int(rng.integers(1, 5)))]
    if kind == 3:
        return " ".join(words).upper()
    if kind == 4:
        return " ".join(w.capitalize() for w in words)
    return " ".join(words)


def _colours(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    ink = tuple(int(v) for v in rng.integers(0, 90, 3))
    paper = tuple(int(v) for v in rng.integers(190, 256, 3))
    return ink, paper


def _finish(img, rng: np.random.Generator) -> np.ndarray:
    from PIL import ImageFilter

    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(0.6))
    a = np.asarray(img, dtype=np.float32)
    a = a + rng.normal(0.0, 4.0, a.shape)
    return np.clip(a, 0, 255).astype(np.uint8)[:, :, ::-1].copy()  # RGB -> BGR


def text_line(text: str, rng: np.random.Generator) -> np.ndarray:
    """A crop of one line of text, as a detector hands it to the recognizer (a few pixels of margin)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=int(rng.integers(18, 40)))
    left, top, right, bottom = font.getbbox(text)
    pad = int(rng.integers(2, 8))
    ink, paper = _colours(rng)
    img = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad), paper)
    ImageDraw.Draw(img).text((pad - left, pad - top), text, fill=ink, font=font)
    return _finish(img, rng)


def text_page(rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """A page (sides multiples of 32, as the detector's resize makes them) with lines of several sizes and
    indents; (BGR image, number of lines drawn)."""
    from PIL import Image, ImageDraw, ImageFont

    w, h = int(rng.integers(8, 16)) * 32, int(rng.integers(6, 14)) * 32
    ink, paper = _colours(rng)
    img = Image.new("RGB", (w, h), paper)
    draw = ImageDraw.Draw(img)
    y, lines = int(rng.integers(4, 30)), 0
    while True:
        size = int(rng.integers(14, 34))
        font = ImageFont.load_default(size=size)
        if y + size * 1.3 > h:
            break
        x = int(rng.integers(4, w // 3))
        text = line_text(rng)
        while font.getlength(text) > w - x - 4 and " " in text:
            text = text.rsplit(" ", 1)[0]
        if font.getlength(text) <= w - x - 4:
            draw.text((x, y), text, fill=ink, font=font)
            lines += 1
        y += int(size * rng.uniform(1.4, 2.6))
    return _finish(img, rng), lines
