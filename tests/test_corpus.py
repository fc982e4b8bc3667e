"""Every built-in recipe on real architectures (the onnx package's weightless test models with
seeded random weights, see corpus.py): the result loads in plain onnxruntime, passes the full
checker, and its logits stay within the recipe's fidelity bound against the original's.

Recipes are read from BUILTIN when the tests are collected, so recipes added later are covered.
A recipe runs without calibration data; if one of its passes requires data it runs again with
synthesized inputs. Recipes whose help asks for data (DATA_RECIPES: share-4bit chooses each
layer's granularity by its measured error at the model's outputs) get the synthesized inputs from
the start, as their users are told to: without data that choice falls back to weight-space error,
which on these random-weight models says little about the logits (SqueezeNet's conv10 at 4 bits,
alone: per-channel scales 15.6 dB at the logits, per-tensor 11.2 dB, at the same 20.2-20.4 dB in
weight space). Evaluation always uses other synthesized inputs.

Bounds (on the logits, over the evaluation inputs), chosen from measured values with margin:
- SQNR >= MIN_SQNR_DB[recipe] for recipes that keep every weight (sharing, quantization);
- cosine >= MIN_COSINE for the other recipes (pruning, searches): data-free magnitude pruning of
  *random* weights (no training, so no redundancy; no data to refit on) removes real signal
  (SqueezeNet, prune: measured cosine 0.20, SQNR 0.1 dB), so only a collapse of the outputs is a
  failure there; with calibration data the refit brings prune to cosine 0.998, but costs a
  minute per model, too slow for the suite;
- and for recipes that start with a plain prune, the stages after it must keep the pruned
  model's logits: SQNR >= MIN_SQNR_AFTER_PRUNE_DB against the prune-only result.
Unlisted (new) recipes get the cosine bound.

Recipes with a bit-width search run it on a coarse grid (SEARCH_GRID: 3 bit widths x 3
sparsities instead of 7 x 6): the search measures every candidate of every weight by running the
whole model, one sample a call here (the light models' batch axis is fixed at 1), so the full grid
on ShuffleNet (183 weights, 7,687 candidates, 23,064 onnxruntime runs) took 859 CPU seconds, and
VGG-19 would take hours. The grid changes what the search can choose, not the passes that run.

Default suite: SqueezeNet with every recipe but the bit-width search (its 1.2 M weights keep
each run to seconds), and materialization of the small models. Every other architecture, and
the search, is @slow (--runslow).
"""
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from corpus import NAMES, input_data, materialize
from onnxcompress.api import compress
from onnxcompress.errors import DataError, PassError, PreconditionError
from onnxcompress.recipes import BUILTIN

# share-4bit, with the synthesized calibration inputs: 19.5 (AlexNet) to 44.5 dB (ResNet-50) measured on the
# seven architectures other than VGG-19 and ZFNet-512
MIN_SQNR_DB = {"share": 15.0, "share-4bit": 15.0, "int8": 10.0, "int8-weights": 25.0, "int4-weights": 10.0}
MIN_COSINE = 0.1
MIN_SQNR_AFTER_PRUNE_DB = 15.0
DEFAULT_MODELS = {"squeezenet"}
SLOW_RECIPES = {"auto"}  # a bit-width search: many trial compressions of the whole model
DATA_RECIPES = {"share-4bit"}
SMALL_MODELS = {"squeezenet", "shufflenet", "inception_v1"}
SEARCH_GRID = {"bits": [3, 5, 8], "sparsities": [0.0, 0.5, 0.9]}

_cache: dict[str, onnx.ModelProto] = {}


def _model(name: str) -> onnx.ModelProto:
    if name not in _cache:
        _cache.clear()  # keep one materialized model in memory at a time
        _cache[name] = materialize(name, seed=0)
    return _cache[name]


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    batch = next(iter(feeds.values())).shape[0]
    return np.concatenate([session.run(None, {k: v[i:i + 1] for k, v in feeds.items()})[0] for i in range(batch)])


def _compress(model, recipe, calib, evaluation):
    budget = SEARCH_GRID if any(step == "bitwidth" for step, _ in BUILTIN[recipe]) else None
    if recipe in DATA_RECIPES:
        return compress(model, recipe, calib, eval_data=evaluation, validate="none", budget=budget)
    try:
        return compress(model, recipe, None, eval_data=evaluation, validate="none", budget=budget)
    except DataError:  # a recipe that needs calibration data says so before any pass runs
        pass
    except PassError as e:
        if not isinstance(e.__cause__, PreconditionError) and "data" not in str(e):
            raise
    return compress(model, recipe, calib, eval_data=evaluation, validate="none", budget=budget)


def _cases():
    for name in NAMES:
        for recipe in BUILTIN:
            marks = [] if name in DEFAULT_MODELS and recipe not in SLOW_RECIPES else [pytest.mark.slow]
            yield pytest.param(name, recipe, marks=marks, id=f"{name}-{recipe}")


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n in SMALL_MODELS else [pytest.mark.slow])
                                  for n in NAMES])
def test_materialized_model_is_valid_and_finite(name):
    model = _model(name)
    assert not [n for n in model.graph.node if n.op_type == "ConstantOfShape"]
    logits = _run(model, input_data(model, 2, seed=2))
    assert np.all(np.isfinite(logits)) and logits.std() > 0


@pytest.mark.parametrize("name,recipe", list(_cases()))
def test_recipe_on_architecture(name, recipe, capsys):
    model = _model(name)
    calib, evaluation = input_data(model, 4, seed=1), input_data(model, 3, seed=2)
    start = time.perf_counter()
    compressed, report = _compress(model, recipe, calib, evaluation)
    seconds = time.perf_counter() - start
    onnx.checker.check_model(compressed, full_check=True)
    from onnxcompress.runtime.sessions import to_runnable  # packed models: our decode ops become plain tensors

    reference, got = _run(model, evaluation), _run(to_runnable(compressed), evaluation)
    assert got.shape == reference.shape and np.all(np.isfinite(got))
    noise = float(np.sum((reference - got) ** 2))
    sqnr = 10 * np.log10(float(np.sum(reference ** 2)) / noise) if noise > 0 else np.inf
    cosine = float(np.sum(reference * got) / (np.linalg.norm(reference) * np.linalg.norm(got)))
    with capsys.disabled():
        print(f"\n[corpus] {name} {recipe}: {seconds:.1f} s, SQNR {sqnr:.1f} dB, cosine {cosine:.3f}, "
              f"{compressed.ByteSize()} bytes")
    if recipe in MIN_SQNR_DB:
        assert sqnr >= MIN_SQNR_DB[recipe], f"{name} {recipe}: SQNR {sqnr:.1f} dB < {MIN_SQNR_DB[recipe]}"
    else:
        assert cosine >= MIN_COSINE, f"{name} {recipe}: cosine {cosine:.3f} < {MIN_COSINE}"
    steps = BUILTIN[recipe]
    if len(steps) > 1 and steps[0] == ("prune", {}):
        pruned, _ = compress(model, "prune", None, eval_data=evaluation, validate="none")
        base = _run(pruned, evaluation)
        after = 10 * np.log10(float(np.sum(base ** 2)) / max(float(np.sum((base - got) ** 2)), 1e-30))
        assert after >= MIN_SQNR_AFTER_PRUNE_DB, f"{name} {recipe}: {after:.1f} dB against prune alone"


def test_share_4bit_on_the_original_opset_9_graph():
    """Old opsets: no uint4 codes, no ScatterElements (opset 11) for outliers; the result must still check."""
    model = materialize("squeezenet", seed=0, opset=None)
    evaluation = input_data(model, 2, seed=2)
    compressed, _ = compress(model, "share-4bit", None, eval_data=evaluation, validate="none")
    onnx.checker.check_model(compressed, full_check=True)
