"""Music synthesized here for the madmom models (seeded): drums on a beat grid, a bass line and
chords of a key, at 44.1 kHz, and madmom's own feature processors."""
from __future__ import annotations

import numpy as np

RATE = 44100
MAJOR, MINOR = (0, 4, 7), (0, 3, 7)


def _tone(freq: float, length: int, rng: np.random.Generator, harmonics: int = 4) -> np.ndarray:
    t = np.arange(length) / RATE
    out = sum(np.sin(2 * np.pi * freq * k * t + rng.uniform(0, 2 * np.pi)) / k for k in range(1, harmonics + 1))
    return out * np.exp(-t * rng.uniform(0.5, 2.0))


def song(rng: np.random.Generator, seconds: float, *, tonic: int, minor: bool, tempo: float,
         drums: bool = True) -> np.ndarray:
    """A mono clip: chords I-IV-V-I (i-iv-v-i) of the key, one per bar, with optional drums."""
    n = int(seconds * RATE)
    audio = np.zeros(n)
    beat = 60.0 / tempo
    triad = MINOR if minor else MAJOR
    steps = (0, 5, 7, 0)
    bar = int(4 * beat * RATE)
    for b, start in enumerate(range(0, n, bar)):
        root = 48 + tonic + steps[b % 4]  # MIDI note
        length = min(bar, n - start)
        for note in (root - 12, *(root + i for i in triad)):
            audio[start:start + length] += 0.2 * _tone(440 * 2 ** ((note - 69) / 12), length, rng)
    if drums:
        for k, t in enumerate(np.arange(rng.uniform(0, beat), seconds, beat)):
            i = int(t * RATE)
            length = min(int(0.15 * RATE), n - i)
            tt = np.arange(length) / RATE
            kick = np.sin(2 * np.pi * (50 + 100 * np.exp(-tt * 30)) * tt) * np.exp(-tt * 25)
            audio[i:i + length] += (1.0 if k % 2 == 0 else 0.5) * kick
            length = min(int(0.05 * RATE), n - i)
            audio[i:i + length] += 0.3 * rng.normal(size=length) * np.exp(-np.arange(length) / RATE * 80)
    audio /= max(1e-9, np.abs(audio).max())
    return (0.7 * audio).astype(np.float32)


def beat_features(audio: np.ndarray) -> np.ndarray:
    """madmom's online beat features (RNNBeatProcessor(online=True)): frame 2048, 100 fps, 12 bands
    per octave 30 Hz-17 kHz, log(1 + x) and positive differences -> [frames, 162]."""
    from madmom.audio.signal import FramedSignalProcessor, Signal
    from madmom.audio.spectrogram import (FilteredSpectrogramProcessor, LogarithmicSpectrogramProcessor,
                                          SpectrogramDifferenceProcessor)
    from madmom.audio.stft import ShortTimeFourierTransformProcessor
    from madmom.processors import SequentialProcessor

    chain = SequentialProcessor((FramedSignalProcessor(frame_size=2048, fps=100), ShortTimeFourierTransformProcessor(),
                                 FilteredSpectrogramProcessor(num_bands=12, fmin=30, fmax=17000, norm_filters=True),
                                 LogarithmicSpectrogramProcessor(mul=1, add=1),
                                 SpectrogramDifferenceProcessor(diff_ratio=0.5, positive_diffs=True,
                                                                stack_diffs=np.hstack)))
    return np.asarray(chain(Signal(audio, sample_rate=RATE)), dtype=np.float32)


def key_features(audio: np.ndarray) -> np.ndarray:
    """madmom's key features (CNNKeyRecognitionProcessor): frame 8192 at 5 fps, log-filtered
    spectrogram with 24 bands per octave, 65-2100 Hz."""
    from madmom.audio.signal import FramedSignalProcessor, Signal
    from madmom.audio.spectrogram import LogarithmicFilteredSpectrogramProcessor
    from madmom.audio.stft import ShortTimeFourierTransformProcessor
    from madmom.processors import SequentialProcessor

    chain = SequentialProcessor((FramedSignalProcessor(frame_size=8192, fps=5), ShortTimeFourierTransformProcessor(),
                                 LogarithmicFilteredSpectrogramProcessor(num_bands=24, fmin=65, fmax=2100,
                                                                         unique_filters=True)))
    return np.asarray(chain(Signal(audio, sample_rate=RATE)), dtype=np.float32)
