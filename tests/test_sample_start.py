"""The per-channel fit of a large weight without data starts from the codebook chosen on its sample.

share_weight chooses the option on whole sampled channels (sharing._choose_on_sample); when that is a
per-channel fit, the fit on every entry starts from the sample's codebook (granular_fit.scaled_start)
instead of a histogram k-means of w / max|w| over every entry. Not exact: its squared error must stay
within 1.01x of the k-means start's, on He-initialised, heavy-tailed, channel-scaled and trained weights,
and the option chosen is the one chosen before (the choice is made on the sample, before the start).
"""
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxcompress.fitting import sharing
from onnxcompress.fitting.granular import fit, Fitting, Option
from onnxcompress.graph.weights import find_weights, get_array, Role, WeightInfo
from onnxcompress.numerics.gptq import store_scale
from onnxcompress.numerics.granular_fit import codebook_of, fit_scaled, pick_outliers, scaled_start, ScaledFit
from onnxcompress.numerics.histogram import signal_and_error

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def _weight(kind: str) -> tuple[np.ndarray, WeightInfo]:
    rng = np.random.default_rng(11)
    if kind == "lenet5":  # its largest weight, trained
        model = onnx.load(str(SAMPLES / "lenet5.onnx"))
        info = max(find_weights(model), key=lambda i: i.numel)
        return get_array(model, info), info
    shape = (1024, 512)
    if kind == "he":
        w = rng.standard_normal(shape) * np.sqrt(2 / shape[0])
    elif kind == "student-t":
        w = rng.standard_t(3, shape) * 0.02
    else:  # channels of very different scales (a BatchNorm folded in)
        w = rng.standard_normal(shape) * np.exp(rng.standard_normal(shape[1]))[None, :] * 0.02
    w = w.astype(np.float32)
    return w, WeightInfo(name="w", shape=shape, dtype="float32", nbytes=w.nbytes, role=Role.MATMUL, channel_axis=1,
                         consumers=[], location="initializer", graph="main")


@pytest.mark.parametrize("kind, layers", [("he", 1), ("he", 180), ("student-t", 180), ("channel-scaled", 180),
                                          ("lenet5", 1), ("lenet5", 180)])
def test_started_fit_is_within_1_01x_of_the_k_means_start_with_the_same_choice(monkeypatch, kind, layers):
    w, info = _weight(kind)
    assert w.size > sharing.CHOICE_SAMPLE_ELEMENTS
    settings = sharing.ShareSettings(model_elements=w.size * layers)  # 180: priced as in a stack of such weights
    started = sharing.share_weight(w, info, 5, settings)
    monkeypatch.setattr(sharing, "START_MIN_CHANNELS", 1 << 30)  # the k-means start, as before
    before = sharing.share_weight(w, info, 5, settings)
    assert started.chosen.option == before.chosen.option
    assert [(c.option, c.bytes, c.sqnr_db) for c in started.candidates] == \
        [(c.option, c.bytes, c.sqnr_db) for c in before.candidates]
    noise = signal_and_error(w, started.chosen.shared.decode())[1]
    reference = signal_and_error(w, before.chosen.shared.decode())[1]
    if started.chosen.option.kind == "channel":
        assert noise <= 1.01 * reference, (kind, noise / reference)
    else:
        assert noise == reference


def test_the_stack_weight_takes_the_started_per_channel_fit():
    """What `share` picks on the stack's weights (per-channel scales, outliers) is the started fit."""
    w, info = _weight("he")
    choice = sharing.share_weight(w, info, 5, sharing.ShareSettings(model_elements=w.size * 180))
    assert choice.chosen.option == Option("channel", outlier_fraction=0.005)
    assert "sample" in choice.reason


def test_a_sample_of_few_channels_gives_no_start(monkeypatch):
    """Under START_MIN_CHANNELS sampled channels the full fit starts from k-means, as before."""
    w, info = _weight("he")
    monkeypatch.setattr(sharing, "CHOICE_SAMPLE_ELEMENTS", 16 * 1024)  # 16 of the 512 channels
    got = sharing.share_weight(w, info, 5, sharing.ShareSettings(granularity="channel"))
    assert got.chosen.option.kind == "channel"
    calls = []
    monkeypatch.setattr(sharing, "scaled_start", lambda *a: calls.append(a))
    sharing.share_weight(w, info, 5, sharing.ShareSettings(granularity="channel"))
    assert not calls
    exact = fit(w, 5, got.chosen.option, Fitting("w", 1))
    np.testing.assert_array_equal(got.chosen.shared.codes, exact.codes)


def test_a_start_equal_to_the_k_means_codebook_gives_the_k_means_fit():
    """fit_scaled from `start` is fit_scaled with that codebook in place of its k-means: exact."""
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((96, 200)) * rng.uniform(0.2, 3.0, (96, 1))).astype(np.float32)
    fitted = ~pick_outliers(w, np.ones(w.shape, bool), 0.01, relative=True)
    top = store_scale(np.where(fitted, np.abs(w), 0).max(axis=1).astype(np.float64), "auto")  # as fit_scaled stores it
    u = w / top.astype(np.float32)[:, None]
    book = codebook_of(u[fitted], None, 4, False, "linear", 0)
    for a, b in zip(fit_scaled(w, fitted, None, ScaledFit(4)), fit_scaled(w, fitted, None, ScaledFit(4, start=book))):
        np.testing.assert_array_equal(a, b)


def test_scaled_start_restates_a_codebook_in_units_of_each_channels_largest_entry():
    w = np.array([[1.0, -2.0, 0.5], [4.0, 1.0, -1.0], [0.0, 0.0, 0.0]], np.float32)
    fitted = np.ones(w.shape, bool)
    book = np.array([-1.0, 0.0, 1.0])
    s = np.array([3.0, 6.0, 0.0])  # 1.5 and 1.5 times each channel's max |w|; the zero channel is left out
    np.testing.assert_allclose(scaled_start(w, fitted, book, s), 1.5 * book)
    fitted[1, 0] = False  # channel 1's max over its fitted entries is 1.0
    np.testing.assert_allclose(scaled_start(w, fitted, book, s), np.median([1.5, 6.0]) * book)
    assert scaled_start(w, fitted, book, np.zeros(3)) is None


def test_a_pruned_weight_keeps_its_zeros_and_is_within_1_01x(monkeypatch):
    """A mask (zeros on code 0 of centroid 0.0): the sample's codebook starts with 0.0, kept by the start."""
    w, info = _weight("channel-scaled")
    mask = np.abs(w) > np.quantile(np.abs(w), 0.5)
    settings = sharing.ShareSettings(model_elements=w.size)
    started = sharing.share_weight(w, info, 5, settings, sharing.WeightEvidence(mask=mask))
    monkeypatch.setattr(sharing, "START_MIN_CHANNELS", 1 << 30)
    before = sharing.share_weight(w, info, 5, settings, sharing.WeightEvidence(mask=mask))
    assert started.chosen.option == before.chosen.option and started.chosen.option.kind == "channel"
    decoded = started.chosen.shared.decode()
    assert np.all(decoded[~mask] == 0)
    assert signal_and_error(w, decoded)[1] <= 1.01 * signal_and_error(w, before.chosen.shared.decode())[1]
