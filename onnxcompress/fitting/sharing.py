"""Layer-input Hessians for the granularity choice, and the share pass's entry point into it.

For a weight W applied as out = W_mat @ x (Gemm, MatMul, Conv via im2col: ``capture.LinearLayer``;
LSTM/GRU/RNN: W acts on the step input x_t and R on the previous hidden state h_{t-1}), the
squared error of the layer's output caused by W_hat = W - D is sum_g tr(D_g H_g D_g^T) with
H_g = E[x x^T] over the calibration rows of group g. One pass over the calibration data
collects every H at once, with the mean input rows E[x] that a bias's coding error is measured and
cancelled with (:mod:`onnxcompress.numerics.bias_error`, :func:`bias_links`).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxcompress.errors import ModelError
from onnxcompress.fitting.granular import (Candidate, Choice, choose, Fitting, from_matrix, Judging, LayerHessians,
                                           gptq_affordable, Option, options_for, to_matrix)
from onnxcompress.formats.codebook import portable_nodes, SharedWeight
from onnxcompress.formats.codechain import UINT4_MIN_OPSET
from onnxcompress.graph.data import Dataset
from onnxcompress.graph.edit import find_graph, NameScope
from onnxcompress.graph.weights import is_bias, WeightInfo
from onnxcompress.numerics.bias_error import absorbing_target, BiasLink, mean_solutions
from onnxcompress.numerics.granular_fit import scaled_start
from onnxcompress.numerics.measures import sqnr_db
from onnxcompress.runtime.capture import LayerInputs, linear_layer
from onnxcompress.runtime.sensitivity import OutputGains
from onnxcompress.runtime.statistics import Chunk, Collector

log = logging.getLogger(__name__)
RECURRENT = ("LSTM", "GRU", "RNN")
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
SCATTER_MIN_OPSET = 11  # ScatterElements, which writes outliers back
# without data, weights larger than this choose their granularity on a seeded sample of about this
# many entries (whole channels), then fit only the chosen option on every entry
CHOICE_SAMPLE_ELEMENTS = 1 << 18
# the fit on every entry then starts from the sample's codebook when the sample holds this many channels (its
# squared error within 1.01x of the k-means start's: tests/test_sample_start.py)
START_MIN_CHANNELS = 32


def layer_hessians(model: onnx.ModelProto, data: Dataset | None, infos: Sequence[WeightInfo], *,
                   collector: Collector | None = None) -> dict[str, LayerHessians]:
    """Hessians of the weights consumed by one Gemm/MatMul/Conv or recurrent node (others: none), all
    gathered by `collector` in one run over `data` where memory allows."""
    if data is None:
        return {}
    layers = [layer for info in infos if info.channel_axis is not None
              and (layer := linear_layer(model, info)) is not None]
    # the Gram matrices and means only, no sample of raw rows: 4096 float64 rows a layer were 0.68 GB for a
    # 22M-weight transformer's 36 layers, all held during the one run, that nothing read
    linear = [LayerInputs(layer, max_rows=0) for layer in layers]
    taken = {layer.weight for layer in layers}
    exposed, recurrent = _recurrent_requests(model, [i for i in infos if i.name not in taken])
    if not linear and not recurrent:
        return {}
    (collector or Collector()).gather(exposed, data, linear + recurrent)
    found: dict[str, LayerHessians] = {}
    for s in linear:
        if s.gram is not None and s.count:
            found[s.layer.weight] = LayerHessians([s.hessian(g) for g in range(len(s.gram))],
                                                  s.layer.group_of_channels(), s.means())
    for r in recurrent:
        if r.gram is not None and r.count:
            found[r.weight] = LayerHessians([r.gram / r.count], np.zeros(r.channels, np.int64), [r.sums / r.count])
    return found


def _recurrent_uses(model: onnx.ModelProto, infos: Sequence[WeightInfo]) -> list[tuple[WeightInfo, onnx.NodeProto, int]]:
    """(weight, node, 1 for W or 2 for R) for single-direction recurrent nodes reading the weight directly."""
    uses = []
    for info in infos:
        if info.graph != "main" or len(info.consumers) != 1 or info.consumers[0].via:
            continue
        consumer = info.consumers[0]
        if consumer.op_type not in RECURRENT or consumer.input_index not in (1, 2) or info.shape[:1] != (1,):
            continue
        node = next((n for n in find_graph(model, "main").node
                     if (n.name or n.op_type) == consumer.node and info.name in n.input), None)
        if node is not None:
            uses.append((info, node, consumer.input_index))
    return uses


class _RecurrentRows:
    """A reducer of the statistics collector: E[x_t x_t^T] and E[x_t] for a recurrent node's W (its
    step inputs), or of h_{t-1} for its R (its hidden states shifted one step)."""

    wants_values = True
    wants_extremes = False

    def __init__(self, weight: str, tensor: str, index: int, layout: int, channels: int, width: int):
        self.weight, self.tensor, self.index, self.layout, self.channels = weight, tensor, index, layout, channels
        self.nbytes = 8 * width * (width + 1)
        self.gram: np.ndarray | None = None
        self.sums, self.count = 0.0, 0

    def add(self, chunk: Chunk) -> None:
        rows = _recurrent_rows(chunk.values[self.tensor], self.index, self.layout)
        self.gram = rows.T @ rows if self.gram is None else self.gram + rows.T @ rows
        self.sums = self.sums + rows.sum(axis=0)
        self.count += rows.shape[0]


def _recurrent_requests(model: onnx.ModelProto, infos: Sequence[WeightInfo]
                        ) -> tuple[onnx.ModelProto, list[_RecurrentRows]]:
    """The model (a copy naming the hidden states a recurrent R needs, when an output is unnamed) and
    a reducer per recurrent weight: H = E[x_t x_t^T] for W and E[h_{t-1} h_{t-1}^T] for R (h_{-1} = 0:
    initial states are not read)."""
    uses = _recurrent_uses(model, infos)
    if not uses:
        return model, []
    exposed = model
    if any(index == 2 and (not node.output or not node.output[0]) for _, node, index in uses):
        exposed = onnx.ModelProto()
        exposed.CopyFrom(model)
    graph = exposed.graph
    reducers = []
    for info, node, index in uses:
        live = next(n for n in graph.node if n.name == node.name and list(n.input) == list(node.input))
        if index == 1:
            tensor = live.input[0]
        else:
            if not live.output or not live.output[0]:
                if not live.output:
                    live.output.append("")
                live.output[0] = f"{info.name}__hidden_states"
            tensor = live.output[0]
        layout = int(next((a.i for a in node.attribute if a.name == "layout"), 0))
        width = int(info.shape[2])
        reducers.append(_RecurrentRows(info.name, tensor, index, layout, int(info.shape[1]), width))
    return exposed, reducers


def _recurrent_rows(value: np.ndarray, index: int, layout: int) -> np.ndarray:
    """Rows a weight multiplies: X [seq, batch, in] for W; for R, Y [seq, 1, batch, H] shifted one step."""
    x = np.asarray(value, np.float64)
    if index == 1:
        x = x if layout == 0 else np.swapaxes(x, 0, 1)
        return x.reshape(-1, x.shape[-1])
    y = x if layout == 0 else np.moveaxis(x, 0, 2)  # layout 1: [batch, seq, 1, H] -> [seq, 1, batch, H]
    if y.ndim != 4 or y.shape[1] != 1:
        raise ModelError("recurrent hidden states have an unexpected shape; only one direction is supported")
    previous = np.concatenate([np.zeros_like(y[:1]), y[:-1]])  # h_{t-1}, zero before the first step
    return previous.reshape(-1, y.shape[-1])


def bias_links(model: onnx.ModelProto, infos: Sequence[WeightInfo], hessians: dict[str, LayerHessians],
               array_of, masked: Collection[str] = ()) -> dict[str, BiasLink]:
    """The biases among `infos` added to the outputs of weights among them with measured input means.

    A Conv's B, a Gemm's 1-D C (alpha = beta = 1), a single-direction LSTM/GRU/RNN's B (not a GRU
    with linear_before_reset, whose hidden-gate bias is multiplied by the reset gate). array_of(info)
    reads a weight. The absorber is the layer's weight whose inputs reproduce a constant best; a
    pruned one (in `masked`) cannot move its zeros, so a layer with one cancels nothing (rho = 0).
    """
    by_name = {i.name: i for i in infos}
    graph = find_graph(model, "main")
    links: dict[str, BiasLink] = {}
    for info in infos:
        if info.graph != "main" or len(info.consumers) != 1 or info.consumers[0].via:
            continue
        consumer = info.consumers[0]
        node = next((n for n in graph.node if (n.name or n.op_type) == consumer.node and info.name in n.input), None)
        found = None if node is None else _bias_rows(node, consumer.input_index, tuple(info.shape))
        if found is None:
            continue
        names, rows = found
        weights = [w for w in names if w in by_name and w in hessians and hessians[w].means is not None
                   and hessians[w].group_of_channel.size > int(rows.max(initial=-1))]
        if len(weights) != len(names) or rows.size != info.numel:
            continue
        rho = {w: mean_solutions(hessians[w])[1] for w in weights}
        absorber = max(weights, key=lambda w: float(rho[w].mean()))
        if any(w in masked for w in weights):
            absorber, rho[absorber] = None, np.zeros_like(rho[absorber])
        signal = 0.0
        for w in weights:
            matrix = to_matrix(np.asarray(array_of(by_name[w]), np.float64), by_name[w].channel_axis)
            signal += hessians[w].signal_and_noise(matrix, np.zeros_like(matrix))[0]
        links[info.name] = BiasLink(absorber, rows, rho[absorber], signal, tuple(weights))
    return links


def _bias_rows(node: onnx.NodeProto, index: int, shape: tuple[int, ...]) -> tuple[list[str], np.ndarray] | None:
    """(the node's weights, the output row each bias entry adds to) when input `index` is its bias."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    size = int(np.prod(shape)) if shape else 1
    if node.op_type == "Conv" and index == 2 and len(shape) == 1:
        return [node.input[1]], np.arange(size)
    if (node.op_type == "Gemm" and index == 2 and len(shape) in (1, 2) and shape[:-1] in ((), (1,))
            and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0):
        return [node.input[1]], np.arange(size)
    if node.op_type in GATES and index == 3 and len(node.input) > 2 and node.input[2]:
        gate_rows = GATES[node.op_type] * int(attrs.get("hidden_size", 0))
        if attrs.get("linear_before_reset", 0) or shape != (1, 2 * gate_rows) or gate_rows == 0:
            return None
        return [node.input[1], node.input[2]], np.arange(size) % gate_rows
    return None


@dataclass(frozen=True)
class ShareSettings:
    """How every weight of one share run is coded: which options `granularity` allows and their target
    SQNR, the k-means start, and what prices a candidate (the model's element count, against which bytes
    trade for dB, and the opset its portable form is written at)."""

    granularity: str = "auto"
    group_size: int = 8  # output channels per codebook ("group")
    outlier_fraction: float = 0.005  # share of entries stored exactly ("outlier")
    target_db: float = 30.0
    init: str = "linear"
    seed: int = 0
    model_elements: int | None = None
    opset: int = UINT4_MIN_OPSET


@dataclass(frozen=True, eq=False)
class WeightEvidence:
    """What is known of one weight beyond its values, each optional.

    hessians: its layer's input Hessians (with data). mask: True where a pruned weight's entry is kept.
    link: a bias's link to its layer, by which it is measured in the layer's output. absorb: its bias's
    coding error per output row, which the weight is coded toward cancelling (W + e v^T). gains: how its
    error reaches the model's outputs (:mod:`onnxcompress.runtime.sensitivity`). mean_free: the layer's float bias
    takes up the weight's mean output error (bias correction), which then does not count. only: fit and
    measure this one option (a choice made elsewhere). fitted: options already fitted to this weight (the
    gains' probe), reused unless the weight is moved toward a target.
    """

    hessians: LayerHessians | None = None
    mask: np.ndarray | None = None
    link: BiasLink | None = None
    absorb: np.ndarray | None = None
    gains: OutputGains | None = None
    mean_free: bool = False
    only: Option | None = None
    fitted: dict[Option, SharedWeight] | None = None


def _options(array: np.ndarray, axis: int | None, settings: ShareSettings, evidence: WeightEvidence) -> list[Option]:
    """The options `settings.granularity` allows for this weight: outliers only where ScatterElements exists
    at `settings.opset`, weighted with Hessians, "float" for a bias measured in its layer's output."""
    outlier_fraction = settings.outlier_fraction
    if settings.opset < SCATTER_MIN_OPSET:  # outliers are written back by ScatterElements
        outlier_fraction = 0.0
    return options_for(settings.granularity, has_channel_axis=axis is not None,
                       channels=int(array.shape[axis]) if axis is not None else 1,
                       weighted=evidence.hessians is not None, group_size=settings.group_size,
                       outlier_fraction=outlier_fraction, keep_float=evidence.link is not None,
                       gptq=gptq_affordable(evidence.hessians))


def share_weight(array: np.ndarray, info: WeightInfo, bits: int, settings: ShareSettings = ShareSettings(),
                 evidence: WeightEvidence = WeightEvidence()) -> Choice:
    """The share pass's entry point: the candidates `settings.granularity` allows, measured, one chosen.

    A candidate is priced at its serialized portable form (nodes and initializers, as written at
    `settings.opset`), so the few hundred bytes of a Mul/Cast pair count on a small layer; the "float"
    option at the initializer's bytes. A bias with a link is measured by the error it leaves in
    its layer's output; a weight given `absorb` is coded toward W + e v^T, which cancels what it can of
    its bias's error (Choice.target holds it). With gains, errors are judged at the model's outputs; a
    bias's error is a constant offset, all of it carried by the mean gain.
    """
    hessians, mask, link, gains = evidence.hessians, evidence.mask, evidence.link, evidence.gains
    absorb, only = evidence.absorb, evidence.only
    granularity, target_db = settings.granularity, settings.target_db
    if not np.all(np.isfinite(array)):
        raise ModelError(f"weight '{info.name}' holds NaN or Inf; fix the model before compressing it")
    axis = info.channel_axis
    target = None
    if absorb is not None and hessians is not None and hessians.means is not None and np.any(absorb):
        matrix = absorbing_target(to_matrix(np.asarray(array, np.float64), axis), absorb, hessians)
        array = target = from_matrix(matrix, tuple(array.shape), axis).astype(array.dtype)
    measure_with = space = None
    if link is not None:
        reference = np.asarray(array, np.float64)
        mean_gain = 1.0 if gains is None else gains.mean
        measure_with = lambda shared: sqnr_db(link.signal, mean_gain * link.noise(reference - shared.decode()))  # noqa: E731
        space = "output" if gains is None else "model output"
    options = _options(array, axis, settings, evidence) if only is None else [only]
    if only is None and link is None and granularity == "auto" and is_bias(info):
        # its error lands on every output of the layer; unmeasured there (no data, or no captured layer), it
        # stays exact, for a few bytes
        return Choice(Candidate(Option("float"), None, float_size(info), math.inf), [], "weight", target_db,
                      "a bias whose error could not be measured in its layer's output (no data, or no such layer) stays "
                      "exact")
    price = lambda shared: portable_size(shared, settings.opset)  # noqa: E731
    if hessians is None and len(options) > 1 and array.size > CHOICE_SAMPLE_ELEMENTS:
        choice = _choose_on_sample(array, bits, options, info, mask, settings, price)
    else:
        fitting = Fitting(info.name, axis, hessians, mask, settings.init, settings.seed,
                          evidence.fitted if target is None else None)
        # judged at the model's outputs, the choice is made again jointly by the share pass, which fits a
        # predicted candidate it picks: the costlier options are predicted here (granular.predict)
        choice = choose(array, bits, options, fitting, Judging(target_db, settings.model_elements, price,
                                                               float_size(info), measure_with, space, gains,
                                                               evidence.mean_free,
                                                               predict=gains is not None and only is None))
    choice.target = target
    log.debug("share: %s -> %s (%s)", info.name, choice.chosen.option.label, choice.reason)
    return choice


def _choose_on_sample(array: np.ndarray, bits: int, options, info: WeightInfo, mask: np.ndarray | None,
                      settings: ShareSettings, price) -> Choice:
    """The weight-space choice of :func:`granular.choose` made on a seeded sample, then one full fit.

    The sample is whole output channels (entries when the weight has no channel axis) adding up
    to about CHOICE_SAMPLE_ELEMENTS. SQNR in weight space is a ratio of sums over entries, so the
    sample estimates it; bytes grow with the sample's share of the weight, so scaling the model's
    element count by the same share keeps the bytes-for-dB exchange rate of the full weight.
    """
    axis = info.channel_axis
    target_db, init, seed, model_elements = settings.target_db, settings.init, settings.seed, settings.model_elements
    rng = np.random.default_rng(seed)
    matrix = to_matrix(array, axis)
    kept = None if mask is None else to_matrix(np.asarray(mask, bool), axis)
    if axis is None or matrix.shape[0] < 2:  # entries
        matrix, kept = matrix.reshape(-1, 1), None if kept is None else kept.reshape(-1, 1)
        count, sample_axis = CHOICE_SAMPLE_ELEMENTS, None
    else:  # whole channels, so per-channel scales and groups are fitted as on the full weight
        count, sample_axis = min(max(2, -(-CHOICE_SAMPLE_ELEMENTS // matrix.shape[1])), matrix.shape[0]), 0
    picked = np.sort(rng.choice(matrix.shape[0], count, replace=False))
    sample = matrix[picked] if sample_axis == 0 else matrix[picked, 0]
    sample_mask = None if kept is None else (kept[picked] if sample_axis == 0 else kept[picked, 0])
    share = sample.size / array.size
    elements = int(max(model_elements or array.size, 1) * share)
    trial = choose(sample, bits, options, Fitting(info.name, sample_axis, mask=sample_mask, init=init, seed=seed),
                   Judging(target_db, elements, price))
    start = _sample_start(sample, sample_mask, trial.chosen.shared)
    full = choose(array, bits, [trial.chosen.option], Fitting(info.name, axis, mask=mask, init=init, seed=seed,
                                                              start=start), Judging(target_db, model_elements, price))
    return Choice(full.chosen, trial.candidates, "weight", target_db,
                  f"{trial.reason}, measured on a sample of {share:.1%} of the entries (no calibration data), "
                  "then fitted on all of them")


def _sample_start(sample: np.ndarray, mask: np.ndarray | None, shared: SharedWeight | None) -> np.ndarray | None:
    """The codebook a per-channel fit of the whole weight starts from: the sample's (`shared`, a per-channel
    fit of the (channels, K) `sample`) in the units of its start (granular_fit.scaled_start), replacing
    that fit's k-means of w / max|w| over every entry. None for other kinds of fit, and for a sample of
    fewer than START_MIN_CHANNELS channels, whose codebook may not stand for the others' (an embedding
    of 58224 x 128 sampled 5 of its 128 columns: 1.2x the squared error of the k-means start)."""
    if shared is None or shared.scale is None or sample.ndim != 2 or sample.shape[0] < START_MIN_CHANNELS:
        return None
    fitted = np.ones(sample.shape, bool) if mask is None else np.asarray(mask, bool).copy()
    if shared.outlier_index is not None:
        fitted.reshape(-1)[shared.outlier_index] = False
    return scaled_start(sample, fitted, shared.codebook, shared.scale)


def float_size(info: WeightInfo) -> int:
    """About the serialized bytes of the weight as an initializer: raw data, name, dims and tags."""
    return int(info.nbytes) + len(info.name.encode()) + 11 * len(info.shape) + 8


def portable_size(shared: SharedWeight, opset: int) -> int:
    """Serialized bytes of the weight's portable nodes and initializers."""
    nodes, inits = portable_nodes(shared, NameScope(onnx.ModelProto()), opset, "share")
    return sum(n.ByteSize() for n in nodes) + sum(t.ByteSize() for t in inits)
