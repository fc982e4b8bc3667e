"""The bit-width search's allocations verified beyond its budget scales (passes/bitwidth.py): a bisection between
the loosest scale that held and the next that did not, and the ladder of summed-noise budgets. Each allocation is
verified jointly by the search's `verify`."""
from __future__ import annotations

from onnxcompress.numerics import allocate

BISECTIONS = 3  # extra allocations verified between the loosest budget scale that held and the next
NOISE_STEPS = 4  # allocations under summed-noise budgets walked up or down before bisecting (noise_ladder)


def bisect(points, verify, options, budget: float, scales) -> None:
    """Bisect between the loosest budget scale whose allocation held and the next that did not (points[i]: the
    verified allocation at scales[i], or None)."""
    tried = sorted((scale, p.ok) for scale, p in zip(scales, points) if p is not None)
    for _ in range(BISECTIONS):
        held = [scale for scale, ok in tried if ok]
        low = max(held, default=None)
        high = min((scale for scale, ok in tried if not ok and low is not None and scale > low), default=None)
        if low is None or high is None or high / max(low, 1e-9) < 1.1:
            break
        mid = (low * high) ** 0.5 if low > 0 else high / 2
        point = verify(allocate.min_size(options, budget * mid))
        tried = sorted(tried + [(mid, point is not None and point.ok)])


def noise_ladder(noise, verify, seen: dict, joint_noise: dict) -> None:
    """Allocations under budgets of summed output noise (task_nsr), each verified jointly by `verify`.

    A counted cost (changed decisions, boxes past a tolerance) does not add up: a weight alone moves no
    sample past its margin, several together move many; the noise powers of independent errors do add up,
    so the joint loss follows the summed noise. The bracket is read off the configurations verified so far:
    the noisiest one that met the budget and the quietest one that did not; the ladder walks from the
    former toward the latter (doubling when there is none above), then bisects where the outcome changes."""
    held = [joint_noise[c] for c, p in seen.items() if p.ok and joint_noise.get(c) is not None]
    missed = [joint_noise[c] for c, p in seen.items() if not p.ok and joint_noise.get(c) is not None]
    low = max(held, default=0.0)
    high = min((n for n in missed if n > low), default=None)
    if low <= 0.0 and high is None:
        return
    if low <= 0.0:  # nothing noisy held: walk down from the quietest miss
        low = high / 2 ** NOISE_STEPS
    for _ in range(NOISE_STEPS + BISECTIONS):
        level = 2.0 * low if high is None else (low * high) ** 0.5
        if high is not None and high / low < 1.1:
            break
        point = verify(allocate.min_size(noise, level))
        if point is None or point.ok:  # held, or no allocation is that quiet: go noisier
            low = level
        else:
            high = level
