"""How much of a layer's coding error reaches the model's outputs: two measured gains per weight.

A layer's coding error D (W_hat = W - D, channel-first) is measured in its own output under the
layer-input Hessian H = E[x x^T]: tr(D H D^T). Layers differ in how much of it survives to the
model's outputs, and so do two parts of it:

- the mean part, D mu with mu = E[x]: a constant offset per output channel, which batch norms,
  global average pools and residual sums carry to the outputs whole;
- the rest, D (x - mu), which varies from position to position and sample to sample, and which
  pools average away and ReLUs cut.

On a small ResNet the second part's gain spans 0.05 to 1.3 between layers and the first part's
1 to 23, so a layer-output SQNR misjudges the error at the outputs by up to 15 dB, and two codings
of one layer with about the same layer SQNR (plain k-means, much of its error a mean; GPTQ codes,
little) differ at the outputs by several dB. Two probes per weight measure both gains: the error of
some coding of it (the share pass uses its per-tensor GPTQ coding) split into its mean part (rank
one: (D mu) mu^T / |mu|^2) and the rest (D with D mu = 0), each scaled to the whole error's energy,
each swapped alone into the model and run on calibration samples. The relative noise at the
outputs of any coding is then predicted as

    noise_out = g_rest * (tr(D H D^T) - |D mu|^2) / signal + g_mean * |D mu|^2 / signal

(per group of channels, signal = tr(W H W^T)). The probed weights are inputs of one session (the
statistics collector's, shared with the layer statistics of the same model), run once per probe
over at most `samples` feeds, GAIN_CHUNK samples a run: a probe stops once the relative noise it has
measured is known to GAIN_TOLERANCE (its standard error over the chunks run, from MIN_GAIN_CHUNKS on),
so a model whose samples agree on a weight's gain probes it on fewer of them. Where that reference
pass is slow (SUFFIX_SECONDS), a probe runs only the nodes downstream of its weight's group
(runtime.probe_suffix), fed the values upstream of them.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from tqdm.auto import tqdm

from onnxcompress.graph.data import Dataset
from onnxcompress.numerics.gptq import LayerHessians
from onnxcompress.runtime.probe_suffix import SuffixProbes, suffix_groups
from onnxcompress.runtime.statistics import Collector, Runner

log = logging.getLogger(__name__)
GAIN_RANGE = (1e-6, 1e6)  # a probe that moves nothing (or everything) at the outputs stays finite
MIN_MEAN_SHARE = 0.2  # a mean probe whose mean part is less of its energy cannot resolve the mean gain
# probes run GAIN_CHUNK samples at a time and stop, from MIN_GAIN_CHUNKS chunks on, when the standard error of the
# relative noise measured so far (a ratio estimate over the chunks) is at most GAIN_TOLERANCE of it (0.2 dB)
GAIN_CHUNK = 4
MIN_GAIN_CHUNKS = 3
GAIN_TOLERANCE = 0.05
# a reference pass over the probe samples slower than this: the probes run suffixes of the model shared by groups of
# weights (runtime.probe_suffix), which cost sessions of their own and a pass for their cut values
SUFFIX_SECONDS = 0.5


@dataclass(frozen=True)
class OutputGains:
    """Noise at the model's outputs per unit of layer-output noise, for the two parts of an error."""

    rest: float  # of D (x - mu)
    mean: float  # of D mu

    def output_sqnr_db(self, signal: float, total: float, mean_part: float) -> float:
        """SQNR at the outputs of an error with layer-output energy `total`, `mean_part` of it D mu."""
        noise = self.rest * max(total - mean_part, 0.0) + self.mean * mean_part
        return math.inf if noise <= 0 else (-math.inf if signal <= 0 else 10.0 * math.log10(signal / noise))

    def as_dict(self) -> dict:
        return {"rest_db": round(10 * math.log10(self.rest), 2), "mean_db": round(10 * math.log10(self.mean), 2)}


@dataclass
class Probe:
    """A weight (channel-first matrix W), its Hessians, and the error D of some coding of it."""

    matrix: np.ndarray  # (C, K) channel-first view of the weight
    error: np.ndarray  # (C, K) D = W - W_hat
    hessians: LayerHessians
    to_array: Callable[[np.ndarray], np.ndarray]  # (C, K) matrix -> array in the stored layout


def mean_part(hessians: LayerHessians, d: np.ndarray) -> float:
    """sum_g |D_g mu_g|^2: the energy of the error's constant offset (0 without measured means)."""
    shift = hessians.mean_shift(d)
    return float(shift @ shift)


def measure_gains(model: onnx.ModelProto, data: Dataset, probes: Mapping[str, Probe], *, samples: int = 32,
                  progress: bool = False, collector: Collector | None = None) -> dict[str, OutputGains]:
    """{weight: OutputGains} for the probed weights that are main-graph initializers (others: none)."""
    floats = [out.name for out in model.graph.output if out.type.tensor_type.elem_type in
              (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)]
    runner = (collector or Collector()).runner(model, floats, also=set(probes))
    arrays = runner.weights  # the weights fed to the session, probed ones among them
    split = {name: _split(p) for name, p in probes.items() if name in arrays and p.matrix.size == arrays[name].size}
    split = {name: parts for name, parts in split.items() if parts is not None}
    if not split:
        return {}
    feeds = data.limit(samples)
    start = time.perf_counter()
    reference = _outputs(runner, feeds, floats)
    signals = np.array([[float(np.sum(np.square(chunk[k]))) for k in range(len(floats))] for chunk in reference])
    if not np.any(signals > 0):
        return {}
    suffixes = None  # a model whose pass over the probe samples is slow: probes run their weights' suffixes
    if time.perf_counter() - start > SUFFIX_SECONDS and SuffixProbes.usable(model, feeds):
        groups = suffix_groups(model.graph, list(split))
        suffixes = SuffixProbes(model, feeds, floats, groups, chunk=GAIN_CHUNK)
        split = {name: split[name] for group in groups for name in group}  # probed group by group

    def moves(name: str, swapped: dict[str, np.ndarray]):
        """Per chunk, each output's move with the weight swapped (None: it does not move)."""
        through = suffixes.moves(name, swapped[name]) if suffixes is not None else None
        return through if through is not None else (
            [np.asarray(chunk.values[n], np.float64) - reference[i][k] for k, n in enumerate(floats)]
            for i, chunk in enumerate(runner.chunks(feeds, max_batch=GAIN_CHUNK, swapped=swapped)))

    def relative_noise(name: str, matrix: np.ndarray) -> float:
        swapped = {name: np.asarray(probes[name].to_array(matrix), dtype=arrays[name].dtype)}
        noise = np.zeros_like(signals)
        for i, moved in enumerate(moves(name, swapped)):
            noise[i] = [0.0 if d is None else float(np.sum(np.square(d))) for d in moved]
            if settled(noise[:i + 1], signals[:i + 1]):
                break
        log.debug("output gains of %s: a probe on %d of %d chunks", name, i + 1, len(reference))
        return relative_noise_of(noise[:i + 1], signals[:i + 1])

    gains = {}
    for name, (rest, mean, mean_share, layer_signal) in tqdm(split.items(), desc="output gains", unit="weight",
                                                              disable=not progress, leave=False):
        p = probes[name]
        energy = _energy(p.hessians, rest)  # the mean probe is scaled to the same energy
        g_rest = relative_noise(name, p.matrix - rest) / (energy / layer_signal)
        g_mean = g_rest
        if mean is not None:
            out = relative_noise(name, p.matrix - mean)  # energy * (mean_share of it D mu, the rest not)
            g_mean = (out - g_rest * (1 - mean_share) * energy / layer_signal) / (mean_share * energy / layer_signal)
        gains[name] = OutputGains(*(float(np.clip(g, *GAIN_RANGE)) for g in (g_rest, g_mean)))
        log.debug("output gains of %s: %s", name, gains[name].as_dict())
    return gains


def relative_noise_of(noise: np.ndarray, signals: np.ndarray) -> float:
    """max over outputs k of sum_i noise[i, k] / sum_i signals[i, k] (chunks i; outputs with a signal)."""
    total = signals.sum(axis=0)
    return max((float(n / s) for n, s in zip(noise.sum(axis=0), total) if s > 0), default=0.0)


def settled(noise: np.ndarray, signals: np.ndarray) -> bool:
    """Whether the relative noise of chunks (rows) so far is known to GAIN_TOLERANCE on every output with a
    signal: from MIN_GAIN_CHUNKS chunks on, the ratio estimate R = sum n / sum s has the standard error
    sqrt(sum_i (n_i - R s_i)^2 / (m (m - 1))) / mean(s) over its m chunks."""
    m = noise.shape[0]
    if m < MIN_GAIN_CHUNKS or not np.any(signals.sum(axis=0) > 0):
        return False
    for n, s in zip(noise.T, signals.T):
        if s.sum() <= 0:
            continue
        ratio = n.sum() / s.sum()
        error = math.sqrt(float(np.sum(np.square(n - ratio * s))) / (m * (m - 1))) / float(s.mean())
        if error > GAIN_TOLERANCE * ratio:
            return False
    return True


def _split(p: Probe):
    """(rest probe error, mean probe error or None, the mean probe's share of D mu, layer signal); None
    when the probe's error or the layer's signal is zero."""
    layer_signal = p.hessians.signal_and_noise(p.matrix, np.zeros_like(p.matrix))[0]  # remembered for the choice
    energy = _energy(p.hessians, p.error)
    if energy <= 0 or layer_signal <= 0:
        return None
    rest, mean = p.error.copy(), np.zeros_like(p.error)
    for g, mu in enumerate(p.hessians.means or []):
        rows = p.hessians.group_of_channel == g
        norm = float(mu @ mu)
        if norm > 0:
            mean[rows] = np.outer(p.error[rows] @ mu, mu) / norm
            rest[rows] -= mean[rows]
    rest_energy, mean_energy = _energy(p.hessians, rest), _energy(p.hessians, mean)
    if rest_energy <= 0:
        return None
    rest *= math.sqrt(energy / rest_energy)
    share = mean_part(p.hessians, mean) / mean_energy if mean_energy > 0 else 0.0
    if share < MIN_MEAN_SHARE:
        return rest, None, 0.0, layer_signal
    return rest, mean * math.sqrt(energy / mean_energy), share, layer_signal


def _energy(hessians: LayerHessians, d: np.ndarray) -> float:
    return hessians.energy(d)


def _outputs(runner: Runner, data: Dataset, names: list[str]) -> list[list[np.ndarray]]:
    """Per chunk of GAIN_CHUNK samples, the outputs `names` (float64)."""
    return [[np.asarray(chunk.values[n], np.float64) for n in names]
            for chunk in runner.chunks(data, max_batch=GAIN_CHUNK)]
