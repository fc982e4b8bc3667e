"""Every weight's candidate re-picked together, judged at the model's outputs (the share pass's joint choice).

Fitting layer: the candidates come from :func:`onnxcompress.fitting.granular.choose`, each measured where its
error lands at the outputs; this trades their summed noise there against their bytes.
"""
from __future__ import annotations

import math
from typing import Sequence

from onnxcompress.fitting.granular import Candidate, Choice

JOINT_TARGET_LAYERS = 8  # the joint choice's target at the outputs: the per-layer target over this many layers


def choose_jointly(choices: dict[str, Choice], *, per_byte: float, fixed: Sequence[Candidate] = (),
                   rounds: int = 20) -> dict[str, Candidate]:
    """Re-pick every weight's candidate together, judged at the model's outputs.

    Each candidate's SQNR is measured where its error lands at the outputs (space "model output"),
    so the errors of all layers add up there: S = sum of 10^(-SQNR/10), `fixed` (the picks of weights
    decided already, measured there too) included. Maximise min(-10 log10 S, target) - per_byte * total bytes, where the
    target is the per-layer target with every layer at it, over at most JOINT_TARGET_LAYERS layers
    (target_db - 10 log10(min(layers, 8)): 27 dB at 36 dB per layer): in a deep model, every layer at
    the per-layer target would add up to too little at the outputs (13 dB over 200 layers). By
    coordinate ascent from the layers' own choices (on ties fewer bytes, then the higher SQNR);
    deterministic.
    """
    if not choices:
        return {}
    layers = min(len(choices), JOINT_TARGET_LAYERS)
    target = min(c.target_db for c in choices.values()) - 10 * math.log10(layers)
    picked = {name: c.chosen for name, c in choices.items()}

    def noise(c: Candidate) -> float:
        return 0.0 if c.sqnr_db == math.inf else 10 ** (-c.sqnr_db / 10)

    noise_sum = sum(noise(c) for c in fixed) + sum(noise(c) for c in picked.values())
    byte_sum = sum(c.bytes for c in picked.values())

    def value(s: float, b: int) -> float:
        return (target if s <= 0 else min(-10 * math.log10(s), target)) - per_byte * b

    for _ in range(rounds):
        moved = False
        for name, choice in choices.items():
            now = picked[name]
            rest_noise, rest_bytes = noise_sum - noise(now), byte_sum - now.bytes

            def key(c: Candidate) -> tuple[float, int, float]:
                return round(value(rest_noise + noise(c), rest_bytes + c.bytes), 9), -c.bytes, c.sqnr_db

            best = max(choice.candidates, key=key)
            if best is not now and key(best) > key(now):
                picked[name], moved = best, True
                noise_sum, byte_sum = rest_noise + noise(best), rest_bytes + best.bytes
        if not moved:
            break
    return picked
