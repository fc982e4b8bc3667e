"""The bit-width search: sensitivities, allocation, end-to-end back-off, failed candidates."""
import numpy as np
import onnx
import pytest

from onnxcompress import api
from onnxcompress.errors import ModelError, PassError, RecipeError
from onnxcompress.numerics.allocate import Option
from onnxcompress.passes.bitsearch import make_score
from onnxcompress.runtime.metrics import compare_outputs
from onnxcompress.passes.bitwidth import BitWidthConfig, BitWidthPass
from onnxcompress.recipes import Recipe
from tiny import conv_gemm, gemm, random_feeds


class FakeEvaluator:
    """Joint loss is three times the sum of the per-layer costs: sensitivities do not add up."""

    def __init__(self, names):
        self.base = {name: None for name in names}

    def measure(self, changed):
        loss = 3.0 * sum(v[0] for v in changed.values())
        return {"cost": loss, "check": loss, "sqnr_db": 0.0}


def _fake_search(monkeypatch, decoded: dict, max_drop: float, layers: int = 3):
    """Three 8-byte weights whose candidate at b bits decodes to decoded[b] (what the fake evaluators read),
    and a BitWidthPass whose _search runs on them without models."""
    import onnxcompress.passes.bitwidth as bw

    class W:
        def __init__(self, name):
            self.name, self.nbytes = name, 8

    class Shared:
        def __init__(self, bits):
            self.bits = bits

        def decode(self):
            return decoded[self.bits]

    monkeypatch.setattr(bw, "candidate_weights", lambda array, w, s, b, seed, pruner=None: [Shared(b)])
    p = BitWidthPass(max_drop=max_drop)
    p._pruner = None
    return [W(f"w{i}") for i in range(layers)], p


def test_search_backs_off_when_the_joint_loss_exceeds_the_budget(monkeypatch):
    options = [[Option(8, 0.0, {"bits": 8, "sparsity": 0.0}), Option(4, 0.2, {"bits": 4, "sparsity": 0.0}),
                Option(2, 0.6, {"bits": 2, "sparsity": 0.0})] for _ in range(3)]
    cost_of = {(o.settings["bits"]): o.cost for o in options[0]}
    weights, p = _fake_search(monkeypatch, cost_of, max_drop=0.7)
    evaluated, chosen = p._search(p.config, FakeEvaluator([w.name for w in weights]), weights, options, fixed=0)
    # the additive view would allow three 4-bit layers (0.6 <= 0.7), but jointly that costs 1.8
    measured = {tuple(options[i][j].settings["bits"] for i, j in enumerate(chosen))}
    assert measured == {(4, 8, 8)} or measured == {(8, 4, 8)} or measured == {(8, 8, 4)}
    assert any(not p.ok for p in evaluated)  # the over-budget choices were measured and rejected
    assert all(p.check <= 0.7 for p in evaluated if p.ok)


def tiny_data(model, n=64, seed=0):
    return {k: v for k, v in random_feeds(model, n=n, seed=seed).items()}


def test_tiny_search_meets_an_sqnr_budget_and_plans_every_weight():
    model = conv_gemm()
    recipe = Recipe("t", [("bitwidth", {"min_sqnr": 25.0, "bits": [2, 4, 6, 8], "sparsities": [0.0, 0.5],
                                        "min_elements": 64}), ("share", {"min_elements": 64})])
    data = tiny_data(model)
    compressed, report = api.compress(model, recipe, data, eval_data=data)
    summary = report.passes[0].summary
    assert set(summary["choices"]) == {"conv.W", "fc.W"}
    chosen = min(summary["evaluated"], key=lambda p: p["bytes"] if p["ok"] else np.inf)
    assert chosen["ok"] and 10 * np.log10(1 / chosen["check"]) >= 25.0
    assert report.validation.outputs[0].sqnr_db >= 20.0  # end to end, after share with the plan
    bits = {r.name: r.details["bits"] for r in report.weights if r.pass_name == "share" and r.action.startswith("shared")}
    assert bits and all(summary["choices"][name]["bits"] == b for name, b in bits.items())
    onnx.checker.check_model(compressed, full_check=True)


def test_failed_candidates_are_recorded_and_the_search_goes_on(monkeypatch):
    import onnxcompress.passes.bitprune as bw

    real = bw.fit_codebook

    def flaky(array, info, bits, **kw):
        if bits == 2:
            raise ModelError("simulated failure at 2 bits")
        return real(array, info, bits, **kw)

    monkeypatch.setattr(bw, "fit_codebook", flaky)
    model = conv_gemm()
    recipe = Recipe("t", [("bitwidth", {"min_sqnr": 20.0, "bits": [2, 6], "sparsities": [0.0], "min_elements": 64})])
    data = tiny_data(model)
    _, report = api.compress(model, recipe, data, eval_data=data, validate="none")
    table = report.passes[0].summary["sensitivity"]
    failed = [c for cands in table.values() for c in cands if c["error"]]
    assert failed and all(c["bits"] == 2 and "simulated" in c["error"] for c in failed)
    assert all(c["bits"] == 6 for c in report.passes[0].summary["choices"].values())


def test_bad_user_input_stops_the_search():
    with pytest.raises(ValueError):
        BitWidthConfig(max_drop=0.5, target_ratio=10)
    model = conv_gemm()
    data = tiny_data(model)
    recipe = Recipe("t", [("bitwidth", {"metric": "no_such_module:f", "min_elements": 64})])
    with pytest.raises(PassError, match="cannot load metric"):
        api.compress(model, recipe, data, eval_data=data)
    with pytest.raises(RecipeError, match="no per-layer search"):
        api.compress(model, "share", data, budget={"max_drop": 0.5})


def test_end_to_end_back_off_reruns_the_passes_with_a_safer_plan(monkeypatch):
    import onnxcompress.pipeline.search as search
    from onnxcompress.pipeline.artifacts import Budget

    calls = []
    real = Budget.check

    def fails_first(budget, comparison, ratio):
        met, measured = real(budget, comparison, ratio)
        calls.append(measured)
        return (len(calls) > 1 and met), measured

    monkeypatch.setattr(Budget, "check", fails_first)
    model = conv_gemm()
    recipe = Recipe("t", [("bitwidth", {"min_sqnr": 15.0, "bits": [2, 3, 4, 6, 8], "sparsities": [0.0],
                                        "min_elements": 64}), ("share", {"min_elements": 64})])
    data = tiny_data(model)
    _, report = api.compress(model, recipe, data, eval_data=data)
    attempts = report.passes[0].summary["end_to_end"]
    assert len(attempts) == 2 and not attempts[0]["met"] and attempts[1]["met"]
    assert attempts[1]["plan"] != attempts[0]["plan"]
    assert any("backed off 1 time" in n for n in report.notes)
    assert [p.name for p in report.passes] == ["bitwidth", "share"]


def test_target_ratio_is_met_by_the_final_model():
    model = gemm(k=256, n=64)
    recipe = Recipe("t", [("bitwidth", {"target_ratio": 5.0, "bits": [2, 3, 4, 6, 8], "sparsities": [0.0, 0.5]}),
                          ("prune", {}), ("share", {}), ("sparse", {}), ("entropy", {})], form="packed")
    data = tiny_data(model)
    compressed, report = api.compress(model, recipe, data, eval_data=data)
    assert model.ByteSize() / compressed.ByteSize() >= 5.0
    assert report.passes[0].summary["end_to_end"][-1]["met"]


def test_candidates_that_flip_no_counted_decision_still_cost_their_noise():
    from onnxcompress.passes.bitsearch import Candidate, floor_disagreement

    counted = [Candidate(0.0, 2, cost=4.0, nsr=0.04), Candidate(0.0, 3, cost=2.0, nsr=0.01)]  # cost/sqrt(nsr) = 20
    silent = Candidate(0.0, 4, cost=0.0, nsr=0.0025)  # flipped none of the samples, noise not zero
    exact = Candidate(0.0, 8, cost=0.0, nsr=0.0)
    floor_disagreement(counted + [silent, exact], resolution=0.5)
    assert silent.cost == pytest.approx(20 * 0.05)
    assert exact.cost == 0.0 and counted[0].cost == 4.0 and counted[1].cost == 2.0
    lone = Candidate(0.0, 4, cost=0.0, nsr=0.01)
    floor_disagreement([lone], resolution=0.5)  # nothing counted: no factor to read, costs unchanged
    assert lone.cost == 0.0


def test_deep_compression_searches_with_data_and_runs_safe_settings_without():
    """Without data the search has nothing real to measure on (on trained models, random inputs read 100% while a
    face detector kept 56% of its real crops and a tagger 0.3%): deep-compression, auto and the portable search
    run k-means sharing at the share recipe's widths instead, and the report says so and what to give."""
    model = gemm(k=256, n=64)
    shared, _ = api.compress(model, "share", validate="none")
    for recipe, form in (("deep-compression", "packed"), ("auto", "packed"), ("deep-compression-portable", "portable")):
        compressed, report = api.compress(model, recipe, validate="none")
        assert [p.name for p in report.passes] == (["share", "sparse", "entropy"] if form == "packed" else ["share"])
        assert report.form == form and any(n.startswith(f"no --data: '{recipe}' ran as") and "--data" in n
                                           for n in report.notes)
        if form == "portable":
            assert compressed.SerializeToString() == shared.SerializeToString()
    data = tiny_data(model)
    for given in ({"data": data}, {"eval_data": data}):  # auto searches on evaluation data alone; the others do not
        _, report = api.compress(model, "auto", validate="none", **given)
        assert report.passes[0].name == "bitwidth" and not any(n.startswith("no --data") for n in report.notes)
    _, report = api.compress(model, "deep-compression", eval_data=data, validate="none")
    assert report.passes[0].name == "share"
    # a size budget needs no data to be met: the search runs on the random inputs the validation synthesizes
    compressed, report = api.compress(model, "deep-compression", budget={"target_ratio": 6.0})
    assert report.passes[0].name == "bitwidth" and model.ByteSize() / compressed.ByteSize() >= 6.0
    data = tiny_data(model)
    # a command-line budget replaces the recipe's own max_drop instead of clashing with it
    compressed, report = api.compress(model, "deep-compression", data, budget={"target_ratio": 6.0})
    assert report.passes[0].summary["budget"] == {"max_drop": None, "min_sqnr": None, "target_ratio": 6.0}
    assert model.ByteSize() / compressed.ByteSize() >= 6.0


def test_vectors_are_planned_dense_because_prune_leaves_them_dense():
    model = gemm(k=256, n=300)  # the bias has 300 entries, above min_elements
    recipe = Recipe("t", [("bitwidth", {"max_drop": 5.0, "bits": [2, 4], "sparsities": [0.0, 0.9]})])
    data = tiny_data(model)
    _, report = api.compress(model, recipe, data, validate="none")
    table = report.passes[0].summary["sensitivity"]
    assert {c["sparsity"] for c in table["b"]} == {0.0}
    assert {c["sparsity"] for c in table["W"]} == {0.0, 0.9}


def test_expected_loss_charges_a_changed_decision_by_the_reference_probabilities():
    from onnxcompress.runtime.metrics import class_probabilities, compare_outputs

    # sample 0: confident (logits 4 vs 0) and flipped; sample 1: a near tie, flipped; sample 2 kept
    reference = np.array([[4.0, 0.0], [0.1, 0.0], [0.0, 3.0]], dtype=np.float32)
    candidate = np.array([[0.0, 1.0], [0.0, 0.2], [0.0, 2.0]], dtype=np.float32)
    p = class_probabilities(reference)
    want = ((p[0, 0] - p[0, 1]) + (p[1, 0] - p[1, 1])) / 3
    metric, = compare_outputs(["y"], [[reference]], [[candidate]])
    assert metric.top1_agreement == pytest.approx(1 / 3)
    assert metric.expected_loss == pytest.approx(want)
    assert metric.expected_loss < 2 / 3  # a near tie costs far less than a whole decision
    # probabilities are taken as they are; independent sigmoids are not one distribution
    probs = np.array([[0.9, 0.1], [0.4, 0.6]])
    assert np.allclose(class_probabilities(probs), probs)
    assert class_probabilities(np.array([[0.9, 0.8], [0.1, 0.3]])) is None
    metric, = compare_outputs(["y"], [[probs]], [[probs[:, ::-1].copy()]])
    assert metric.expected_loss == pytest.approx(((0.9 - 0.1) + (0.6 - 0.4)) / 2)


def test_an_unlabelled_budget_bounds_the_expected_loss_or_the_agreement():
    class Data:
        labels = None

    reference = [[np.array([[4.0, 0.0], [0.1, 0.0], [0.0, 3.0], [2.0, 0.0]], dtype=np.float32)]]
    candidate = [[np.array([[4.0, 0.0], [0.0, 0.1], [0.0, 3.0], [2.0, 0.0]], dtype=np.float32)]]
    expected = make_score(BitWidthConfig(max_drop=1.0).budget, False)(["y"], reference, candidate, Data())
    counted = make_score(BitWidthConfig(max_drop=1.0, unlabelled="agreement").budget, False)(["y"], reference, candidate,
                                                                                      Data())
    assert counted["check"] == pytest.approx(25.0)  # one of four decisions changed
    assert expected["check"] == pytest.approx(expected["expected_drop"]) and expected["check"] < 2.5
    assert expected["counted"] and counted["counted"]


def test_layer_input_folds_hold_out_each_chunk_group():
    from onnxcompress.runtime.capture import LayerInputs, linear_layer
    from onnxcompress.graph.weights import find_weights

    model = gemm(k=16, n=8)
    info = next(w for w in find_weights(model) if len(w.shape) == 2)
    stats = LayerInputs(linear_layer(model, info), folds=4)
    chunks = [np.random.default_rng(i).standard_normal((5 + i, 16)) for i in range(6)]
    for x in chunks:
        stats.update(x)
    held = stats.heldout_hessians()
    for f in range(4):
        rows = np.concatenate([x for i, x in enumerate(chunks) if i % 4 != f])
        assert np.allclose(held[f], rows.T @ rows / len(rows))
    even = np.concatenate(chunks[0::2])
    odd = np.concatenate(chunks[1::2])
    a, b = stats.fold_hessians()
    assert np.allclose(a, even.T @ even / len(even)) and np.allclose(b, odd.T @ odd / len(odd))
    assert LayerInputs(linear_layer(model, info)).heldout_hessians() is None  # only when asked


def test_cross_fitted_versions_score_each_chunk_with_the_fit_that_did_not_see_it():
    from onnxcompress.graph.data import load_data
    from onnxcompress.passes.bitprune import Pruner
    from onnxcompress.passes.bitsearch import Evaluator
    from onnxcompress.graph.weights import find_weights, get_array

    model = gemm(k=64, n=16)
    data = load_data(tiny_data(model, n=256))  # 4 chunks of 64 samples, one per fold
    info = next(w for w in find_weights(model) if len(w.shape) == 2)
    evaluator = Evaluator(model, [info], data, make_score(BitWidthConfig(min_sqnr=20.0).budget, False))
    versions = [np.full(info.shape, float(f), dtype=np.float32) for f in range(4)]
    outputs = evaluator.outputs({info.name: versions})
    b = get_array(model, next(w for w in find_weights(model) if len(w.shape) == 1))
    for i, (chunk, (feed, _)) in enumerate(zip(outputs, evaluator.chunks)):
        x = next(iter(feed.values()))
        assert np.allclose(chunk[0], x @ versions[i % 4].T + b, atol=1e-4)
    # the pruner refits once per fold, each from the Gram matrices outside its fold
    pruner = Pruner(model, data, [info], crossfit=True)
    refits, mask = pruner(evaluator.base[info.name], info, 0.5)
    assert len(refits) == 4 and all(np.all(r[~mask] == 0) for r in refits)
    assert len({r.tobytes() for r in refits}) == 4
    single, _ = Pruner(model, data, [info])(evaluator.base[info.name], info, 0.5)
    assert len(single) == 1


def _sweep(monkeypatch, cost_of, **options):
    """The candidates BitWidthPass._sensitivities measures for one 4x4 weight whose (sparsity, bits)
    candidates cost cost_of(sparsity, bits); returns (measured in order, the table)."""
    import onnxcompress.passes.bitwidth as bw

    class Coded:
        def __init__(self, sparsity, bits):
            self.sparsity, self.bits = sparsity, bits

        def decode(self):
            return self

    measured = []

    class Evaluator:
        base = {"w": np.zeros((4, 4), np.float32)}
        data = [0] * 100
        run_seconds = 0.0

        def measure(self, changed):
            (coded,) = changed["w"]
            measured.append((coded.sparsity, coded.bits))
            cost = cost_of(coded.sparsity, coded.bits)
            return {"cost": cost, "check": cost, "nsr": 0.0}

    class W:
        name, shape = "w", (4, 4)

    monkeypatch.setattr(bw, "candidate_weights", lambda array, w, s, b, seed, pruner=None: [Coded(s, b)])
    monkeypatch.setattr(bw, "stored_bytes", lambda shared, form: 1)
    p = BitWidthPass(**options)
    p._pruner = None
    table = p._sensitivities(type("Ctx", (), {"progress": False, "form": "packed"})(), Evaluator(), [W()])
    return measured, table


def test_sparsities_past_the_first_hopeless_one_are_not_measured(monkeypatch):
    def cost(sparsity, bits):  # from 50% on every width costs over 8 x 0.5
        return 20.0 * sparsity ** 2 + 1.0 / bits

    grid = dict(bits=[2, 4], sparsities=[0.0, 0.25, 0.5, 0.7, 0.9])
    measured, table = _sweep(monkeypatch, cost, max_drop=0.5, **grid)
    assert {s for s, _ in measured} == {0.0, 0.25, 0.5}  # 0.5 costs 5.25+ at every width: 0.7, 0.9 skipped
    assert (0.5, 2) not in measured  # 4 bits already cost over the limit there: 2 bits cost more
    assert len(table["w"]) == 5
    measured, _ = _sweep(monkeypatch, cost, target_ratio=4.0, **grid)
    assert len(measured) == 10  # a size budget may need any candidate


def test_narrower_widths_past_a_hopeless_one_are_not_measured_at_higher_sparsities(monkeypatch):
    def cost(sparsity, bits):  # 2 bits: over 8 x 0.5
        return (5.0 if bits == 2 else 1.0 / bits) + sparsity

    measured, table = _sweep(monkeypatch, cost, max_drop=0.5, bits=[2, 4, 8], sparsities=[0.0, 0.5, 0.9])
    assert measured == [(0.0, 8), (0.0, 4), (0.0, 2), (0.5, 8), (0.5, 4), (0.9, 8), (0.9, 4)]
    assert len(table["w"]) == 7


def test_one_changed_weight_runs_only_its_suffix_and_gives_the_whole_models_outputs(monkeypatch):
    """x -> MatMul W0 -> Relu -> MatMul W1 -> y, and a second output z = x W2 that W1 does not reach."""
    from onnx import helper, numpy_helper

    import onnxcompress.passes.bitwidth as bw
    from onnxcompress.passes.bitsearch import Evaluator
    from onnxcompress.runtime.suffix import SuffixRunner, downstream
    import tiny
    from onnxcompress.graph.data import Dataset
    from onnxcompress.graph.weights import find_weights

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("W0", (8, 16)), ("W1", (16, 4)), ("W2", (8, 3)))]
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["m"]), helper.make_node("Relu", ["m"], ["h"]),
             helper.make_node("MatMul", ["h", "W1"], ["y"]), helper.make_node("MatMul", ["x", "W2"], ["z"])]
    model = tiny.make_model(nodes, [tiny.value("x", ["N", 8])], [tiny.value("y", ["N", 4]), tiny.value("z", ["N", 3])],
                            inits)
    suffix, cut = downstream(model.graph, {"W1"})
    assert [n.output[0] for n in suffix] == ["y"] and cut == ["h"]
    data = Dataset(stacked=tiny.random_feeds(model, n=100, seed=1))
    weights = [w for w in find_weights(model, min_elements=0) if w.name in ("W0", "W1")]
    evaluator = Evaluator(model, weights, data, lambda *a: {}, suffix_min_elements=0)
    changed = {"W1": [rng.standard_normal((16, 4)).astype(np.float32)]}
    fast = evaluator.outputs(changed)
    assert list(evaluator._suffix) == ["W1"] and evaluator._suffix["W1"] is not None
    evaluator.suffixes = None  # the whole model, as before
    whole = evaluator.outputs(changed)
    for a, b in zip(fast, whole):
        np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(a[1], b[1])
    assert not np.allclose(fast[0][0], evaluator.reference[0][0])  # the change did reach y
    evaluator.suffixes = SuffixRunner(evaluator.model, [f for f, _ in evaluator.chunks], evaluator.names,
                                      evaluator.reference, evaluator.base)
    evaluator._suffix.clear()
    same = evaluator.outputs({"W1": [evaluator.base["W1"]]})  # unchanged: exactly the reference, no kernel noise
    assert all(np.array_equal(a, b) for got, ref in zip(same, evaluator.reference) for a, b in zip(got, ref))


def test_a_suffix_that_cannot_be_made_falls_back_to_the_whole_model(monkeypatch):
    from onnxcompress.graph.data import Dataset
    from onnxcompress.graph.weights import find_weights
    from onnxcompress.passes.bitsearch import Evaluator

    model = gemm()
    data = Dataset(stacked=random_feeds(model, n=20, seed=1))
    weights = [w for w in find_weights(model, min_elements=0) if w.skip is None]
    evaluator = Evaluator(model, weights, data, lambda *a: {}, suffix_min_elements=0)
    monkeypatch.setattr(evaluator.suffixes, "for_weight", lambda name: (_ for _ in ()).throw(RuntimeError("no")))
    name = weights[0].name
    same = evaluator.outputs({name: [evaluator.base[name]]})
    assert dict(evaluator._suffix) == {name: None}
    assert all(np.allclose(a, b) for got, ref in zip(same, evaluator.reference) for a, b in zip(got, ref))


def test_a_small_model_runs_whole_instead_of_building_a_session_per_suffix():
    """Below SUFFIX_MIN_ELEMENTS searched entries a whole-model run costs less than a suffix session."""
    from onnxcompress.graph.data import Dataset
    from onnxcompress.graph.weights import find_weights
    from onnxcompress.passes.bitsearch import SUFFIX_MIN_ELEMENTS, Evaluator

    model = gemm()
    data = Dataset(stacked=random_feeds(model, n=20, seed=1))
    weights = [w for w in find_weights(model, min_elements=0) if w.skip is None]
    assert sum(w.numel for w in weights) < SUFFIX_MIN_ELEMENTS
    assert Evaluator(model, weights, data, lambda *a: {}).suffixes is None


class NoiseEvaluator:
    """Each weight alone moves no sample past its margin (a counted cost of 0), but the output noise powers
    add up and every sample flips once their sum passes 0.05: a thresholded count does not add up."""

    def __init__(self, names):
        self.base = {name: None for name in names}

    def measure(self, changed):
        noise = sum(v[0] for v in changed.values())
        check = 0.0 if noise <= 0.05 else 100.0
        return {"cost": check, "check": check, "sqnr_db": 0.0, "nsr": noise, "task_nsr": noise}


def test_the_noise_ladder_finds_what_counted_costs_cannot_when_each_weight_alone_flips_nothing(monkeypatch):
    nsr_of = {8: 0.0, 4: 0.02, 2: 0.2}
    options = [[Option(8, 0.0, {"bits": 8, "sparsity": 0.0}), Option(4, 0.0, {"bits": 4, "sparsity": 0.0}),
                Option(2, 0.0, {"bits": 2, "sparsity": 0.0})] for _ in range(3)]
    noise = [[Option(o.size, nsr_of[o.settings["bits"]], o.settings) for o in layer] for layer in options]
    weights, p = _fake_search(monkeypatch, nsr_of, max_drop=1.0)
    # counted costs alone: every option costs 0, every allocation takes 2 bits everywhere and misses the budget
    evaluated, chosen = p._search(p.config, NoiseEvaluator([w.name for w in weights]), weights, options, fixed=0)
    assert not any(v.ok for v in evaluated)
    evaluated, chosen = p._search(p.config, NoiseEvaluator([w.name for w in weights]), weights, options, fixed=0,
                                  noise=noise)
    bits = sorted(options[i][j].settings["bits"] for i, j in enumerate(chosen))
    assert bits == [4, 4, 8]  # 0.04 of noise holds; three 4-bit weights (0.06) would not
    assert all(v.check <= 1.0 for v in evaluated if v.ok) and any(not v.ok for v in evaluated)


def test_the_task_noise_counts_only_the_budgeted_outputs_each_against_its_own_signal():
    from onnxcompress.pipeline.artifacts import Budget

    class Data:
        labels = None

    rng = np.random.default_rng(0)
    scores, boxes = rng.standard_normal((32, 4)) + 5 * np.eye(4)[np.arange(32) % 4], rng.standard_normal((32, 4))
    other = 1000 * rng.standard_normal((32, 8))  # a large unbudgeted output
    reference = [[scores, boxes, other]]
    candidate = [[scores, boxes * 1.01, other + rng.standard_normal((32, 8))]]
    score = make_score(Budget(max_drop=1.0, metric="top1@scores,regression:0.5@boxes"), False)
    out = score(["scores", "boxes", "other"], reference, candidate, Data())
    assert out["task_nsr"] == pytest.approx(1e-4, rel=1e-6)  # the boxes' 1% error; the other output's noise left out
    assert out["nsr"] < 1e-5  # over every output, the large one drowns the boxes' error


def test_a_model_of_numbers_only_is_budgeted_by_samples_within_the_regression_tolerance():
    """Found on trained denoisers (DeepFilterNet3's encoder, DTLN, GTCRN: every output a frame, a feature map or a
    state, detected 'regression' and not counted): the max_drop budget compared the noise-to-signal ratio with
    points, so a candidate at 3 dB SQNR (NSR 0.5 <= 1.0 'points') was within the default budget of 1. Now, with
    nothing counted, a sample counts as changed when an output leaves its regression tolerance (5% RMS)."""
    from onnxcompress.pipeline.artifacts import Budget

    class Data:
        labels = None

    rng = np.random.default_rng(0)
    frames, state = rng.standard_normal((32, 1, 64)), rng.standard_normal((32, 2, 16))
    reference = [[frames, state]]
    noisy = [[frames + 0.7 * rng.standard_normal(frames.shape), state]]  # ~3 dB on the frames
    close = [[frames + 0.01 * rng.standard_normal(frames.shape), state]]  # 40 dB
    producers = {"frames": "Relu", "state": "LSTM"}  # as output_producers finds them: numbers
    score = make_score(Budget(max_drop=1.0), False, producers)
    out = score(["frames", "state"], reference, noisy, Data())
    assert out["sqnr_db"] < 6 and out["check"] > 1.0 and out["counted"]
    assert score(["frames", "state"], reference, close, Data())["check"] == 0.0
    # an SQNR budget stays an SQNR budget
    assert make_score(Budget(min_sqnr=20.0), False, producers)(["frames", "state"], reference, noisy, Data())["check"] < 1.0


def test_a_model_of_numbers_only_is_verified_by_its_regression_tolerance_not_an_argmax_over_features():
    """The search's final check on the same denoiser outputs: with no output budgeted it took the expected drop of
    a top-1 over feature bins (a spike that stays the argmax under 8 dB of noise: drop 0, budget met)."""
    from onnxcompress.pipeline.artifacts import Budget
    from onnxcompress.runtime.metrics import Comparison
    from onnxcompress.runtime.tasks import resolve_kinds

    rng = np.random.default_rng(0)
    frames = 0.1 * rng.standard_normal((32, 64))
    frames[np.arange(32), rng.integers(0, 64, 32)] = 10.0
    noisy = frames + 0.5 * rng.standard_normal(frames.shape)
    kinds = resolve_kinds(["frames"], [[frames]], {"frames": "Relu"})
    comparison = Comparison(compare_outputs(["frames"], [[frames]], [[noisy]], kinds=kinds), 32)
    assert comparison.outputs[0].top1_agreement == 1.0 and comparison.outputs[0].sqnr_db < 10
    met, drop = Budget(max_drop=1.0).check(comparison, 4.0)
    assert not met and drop == 100.0
    close = Comparison(compare_outputs(["frames"], [[frames]], [[frames + 1e-3]], kinds=kinds), 32)
    assert Budget(max_drop=1.0).check(close, 4.0) == (True, 0.0)


def test_a_boolean_or_integer_output_is_scored_not_a_crash():
    """A model that also outputs a mask (bool) or a count (int64): its noise is measured in float64 (numpy cannot
    subtract booleans; found by benchmarks/sweep.py --data on a GRU encoder with a mask output)."""
    class Data:
        labels = None

    scores = np.array([[4.0, 0.0], [0.0, 3.0]], dtype=np.float32)
    mask = np.array([[True, False], [True, True]])
    count = np.array([3, 1], dtype=np.int64)
    out = make_score(BitWidthConfig(max_drop=1.0).budget, False)(
        ["scores", "mask", "count"], [[scores, mask, count]], [[scores, ~mask, count + 1]], Data())
    assert out["nsr"] == pytest.approx((4 + 2) / (16 + 9 + 3 + 10))  # mask: 4 flips; count: 2 units off


def _predicted_table(gains: list[float], errors: list[list[float]]):
    """Entries of weights whose candidates' true task noise is gain * e (and nsr the same), size falling with e."""
    from onnxcompress.passes.bitpredict import Entry
    from onnxcompress.passes.bitsearch import Candidate

    table = [[Entry(Candidate(0.0, 8 - j, size=100 - 10 * j), e) for j, e in enumerate(layer)] for layer in errors]

    def measure(i, j):
        c = table[i][j].candidate
        c.nsr = c.task_nsr = c.cost = gains[i] * table[i][j].error
    return table, measure


def test_predicted_noise_is_the_layer_error_times_the_gain_read_off_the_measured_candidates():
    from onnxcompress.passes import bitpredict

    errors = [1e-4 * 4.0 ** np.arange(10), 1e-3 * 2.0 ** np.arange(10)]
    table, measure = _predicted_table([3.0, 0.5], errors)
    for i, layer in enumerate(table):
        first = bitpredict.anchors(layer)
        assert len(first) == 2 and all(0 < j < len(layer) - 1 for j in first)  # inside the range of e
        for j in first:
            measure(i, j)
            layer[j].measured = True
    rows = bitpredict.estimates(table, counted=False, resolution=1.0)
    for i, gain in enumerate((3.0, 0.5)):
        assert [j for j, _ in rows[i]] == list(range(10))
        for j, est in rows[i]:  # one gain per weight: the prediction is exact, measured or not
            assert est.task_nsr == pytest.approx(gain * errors[i][j]) and est.cost == pytest.approx(est.nsr)


def test_a_counted_cost_is_predicted_from_the_noise_deviation_of_the_counted_candidates():
    from onnxcompress.passes import bitpredict

    table, _ = _predicted_table([1.0], [[1e-4, 1e-3, 1e-2, 1e-1]])
    for j, cost in ((1, 0.0), (3, 6.0)):  # 1e-3 flips no sample (below the resolution), 1e-1 six points
        c = table[0][j].candidate
        c.nsr = c.task_nsr = table[0][j].error
        c.cost, table[0][j].measured = cost, True
    (rows,) = bitpredict.estimates(table, counted=True, resolution=1.0)
    k = 6.0 / np.sqrt(0.1)
    assert [est.cost for _, est in rows] == pytest.approx([k * np.sqrt(e) for e in (1e-4, 1e-3, 1e-2, 1e-1)])


def test_the_predicted_sweep_measures_where_the_allocations_land_and_finds_what_measuring_all_finds():
    from onnxcompress.numerics import allocate
    from onnxcompress.passes import bitpredict

    gains = [3.0, 0.5, 10.0, 1.0]
    errors = [list(1e-5 * 2.5 ** np.arange(12)) for _ in gains]
    budgets = [0.01, 0.03, 0.1]

    def landings(options, noise):
        return [allocate.min_size(options, b) for b in budgets]

    table, measure = _predicted_table(gains, errors)
    bitpredict.sweep(table, measure, landings, lambda: False, resolution=1.0)
    measured = sum(e.measured for layer in table for e in layer)
    assert measured < 0.5 * sum(map(len, table))
    full, measure_all = _predicted_table(gains, errors)
    for i, layer in enumerate(full):
        for j in range(len(layer)):
            measure_all(i, j)
    every = [[allocate.Option(e.candidate.size, e.candidate.cost) for e in layer] for layer in full]
    kept = [[allocate.Option(e.candidate.size, e.candidate.cost) for e in layer if e.measured] for layer in table]
    for b in budgets:  # on the measured candidates alone, each allocation is as small as on all of them
        assert allocate.totals(kept, allocate.min_size(kept, b))[0] == allocate.totals(every, allocate.min_size(every, b))[0]


def test_the_layer_error_is_the_layer_outputs_relative_error_on_the_data():
    from onnxcompress.passes.bitpredict import LayerError

    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 6)) + 1.0
    w, d = rng.normal(size=(4, 6)), 0.1 * rng.normal(size=(4, 6))

    class Layer:
        groups = 1

        def weight_matrix(self, a):
            return a

        def group_of_channels(self):
            return np.zeros(4, int)

    class Stats:
        def hessian(self, g):
            return x.T @ x / len(x)

    expected = np.sum((x @ d.T) ** 2) / np.sum((x @ w.T) ** 2)
    assert LayerError(w, Layer(), Stats())(w - d) == pytest.approx(expected, rel=1e-5)
    assert LayerError(w)(w - d) == pytest.approx(np.sum(d ** 2) / np.sum(w ** 2))  # no statistics: H = I


def test_a_predicted_sweep_on_a_tiny_graph_measures_fewer_candidates_and_meets_the_budget():
    model = conv_gemm()
    steps = {"max_drop": 1.0, "bits": [2, 3, 4, 5, 6, 8], "sparsities": [0.0, 0.5, 0.7, 0.9], "min_elements": 64}
    data = tiny_data(model, n=256)
    results = {}
    for sweep in ("measured", "predicted"):
        recipe = Recipe("t", [("bitwidth", {**steps, "sweep": sweep}), ("prune", {"min_elements": 64}),
                              ("share", {"min_elements": 64})])
        compressed, report = api.compress(model, recipe, data, eval_data=data)
        results[sweep] = report.passes[0].summary
        assert report.validation.worst_agreement() >= 0.99
        onnx.checker.check_model(compressed, full_check=True)
    counts = {k: sum(map(len, s["sensitivity"].values())) for k, s in results.items()}
    assert counts["predicted"] < counts["measured"]
    best = {k: min(p["bytes"] for p in s["evaluated"] if p["ok"]) for k, s in results.items()}
    assert best["predicted"] <= 1.1 * best["measured"]


def test_noise_levels_span_the_allocations_noise_a_factor_four_apart():
    from onnxcompress.numerics.allocate import Option
    from onnxcompress.passes.bitpredict import noise_levels

    noise = [[Option(8, 0.0), Option(4, 0.01), Option(2, 0.64)] for _ in range(2)]
    levels = noise_levels(noise, [[1, 0], [1, 1], [2, 2], None])  # summed noise 0.01, 0.02, 1.28
    assert levels == pytest.approx([0.005 * 4 ** k for k in range(6)])  # 0.005 ... 5.12 >= 2 * 1.28
    assert noise_levels(noise, [[0, 0]]) == []  # nothing noisy to walk from


def test_the_predicted_sweeps_fit_on_all_rows_is_made_alone_and_the_folds_only_when_measured():
    from onnxcompress.graph.data import load_data
    from onnxcompress.graph.weights import find_weights, get_array
    from onnxcompress.numerics.refine import DEFAULT_DAMPING
    from onnxcompress.passes.bitprune import candidate_weights, Pruner

    model = gemm(k=64, n=16)
    data = load_data(tiny_data(model, n=256))
    info = next(w for w in find_weights(model) if len(w.shape) == 2)
    array = get_array(model, info)
    crossfit = Pruner(model, data, [info], crossfit=True)
    (rough,), mask = crossfit(array, info, 0.5, all_rows=True)
    made = crossfit._cache[(info.name, 0.5)]
    assert made.folds is None and made.damping is None  # no fold fits, no held-out choice of the ridge
    plain = Pruner(model, data, [info])
    plain.__class__ = type("Default", (Pruner,), {"_damping": staticmethod(lambda *a: DEFAULT_DAMPING)})
    (single,), same_mask = plain(array, info, 0.5)
    np.testing.assert_array_equal(rough, single)  # a fit on all rows at the default ridge
    np.testing.assert_array_equal(mask, same_mask)
    folds, _ = crossfit(array, info, 0.5)
    assert len(folds) == 4 and not any(np.array_equal(f, rough) for f in folds) and made.damping is not None
    quick = Pruner(model, data, [info])
    quick.held_out_ridge = False  # the predicted sweep's: its measured fit is the prediction's fit
    (rough,), _ = quick(array, info, 0.5, all_rows=True)
    assert quick(array, info, 0.5)[0][0] is rough
    assert len(candidate_weights(array, info, 0.5, 4, 0, crossfit, all_rows=True)) == 1
    assert len(candidate_weights(array, info, 0.5, 4, 0, crossfit)) == 4


def _chain(n=3, width=8):
    """x -> MatMul W0 -> Relu -> MatMul W1 -> Relu -> ... -> y: each weight's suffix is a different model."""
    from onnx import helper, numpy_helper
    import tiny

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32), f"W{i}") for i in range(n)]
    nodes, last = [], "x"
    for i in range(n):
        nodes += [helper.make_node("MatMul", [last, f"W{i}"], [f"m{i}"]), helper.make_node("Relu", [f"m{i}"], [f"h{i}"])]
        last = f"h{i}"
    return tiny.make_model(nodes, [tiny.value("x", ["N", width])], [tiny.value(last, ["N", width])], inits)


def test_the_suffixes_of_several_weights_are_kept_up_to_the_bound_then_only_the_current_one(monkeypatch):
    import onnxcompress.passes.bitsearch as bs
    from onnxcompress.graph.data import Dataset
    from onnxcompress.graph.weights import find_weights

    model = _chain()
    data = Dataset(stacked=random_feeds(model, n=100, seed=1))
    weights = [w for w in find_weights(model, min_elements=0) if w.name in ("W1", "W2")]
    evaluator = bs.Evaluator(model, weights, data, lambda *a: {}, suffix_min_elements=0)
    built = []
    make = evaluator.suffixes.for_weight
    monkeypatch.setattr(evaluator.suffixes, "for_weight", lambda name: built.append(name) or make(name))
    rng = np.random.default_rng(2)
    changed = {w.name: [rng.standard_normal(w.shape).astype(np.float32)] for w in weights}
    first = {name: evaluator.outputs({name: v}) for name, v in changed.items()}
    for _ in range(2):  # the sweep's rounds come back to each weight: no suffix is built again
        for name, v in changed.items():
            again = evaluator.outputs({name: v})
            assert all(np.array_equal(a, b) for x, y in zip(again, first[name]) for a, b in zip(x, y))
    assert built == ["W1", "W2"] and all(evaluator._suffix[n] is not None for n in built)
    monkeypatch.setattr(bs, "SUFFIX_BYTES", 1)  # no room: only the last one built is kept, while the calls stay on it
    evaluator._suffix.clear()
    for name in ("W1", "W2", "W2", "W1"):
        evaluator.outputs({name: changed[name]})
    assert built == ["W1", "W2", "W1", "W2", "W1"] and not evaluator._suffix and evaluator._current[0] == "W1"


def test_a_suffix_whose_cut_values_would_pass_the_bound_is_refused_after_the_first_chunk(monkeypatch):
    from onnxcompress.graph.data import Dataset
    from onnxcompress.graph.weights import find_weights
    from onnxcompress.passes.bitsearch import Evaluator

    model = _chain()
    data = Dataset(stacked=random_feeds(model, n=256, seed=1))  # 4 chunks of 64 rows, 2 KB of cut values each
    weights = [w for w in find_weights(model, min_elements=0) if w.name == "W2"]
    evaluator = Evaluator(model, weights, data, lambda *a: {}, suffix_min_elements=0)
    runner = evaluator.suffixes
    assert len(runner.chunks) == 4
    runs = []
    real = runner.collector.runner

    def counting(model, names, **kw):
        inner = real(model, names, **kw)
        run = inner.run
        monkeypatch.setattr(inner, "run", lambda *a, **k: runs.append(1) or run(*a, **k))
        return inner

    monkeypatch.setattr(runner.collector, "runner", counting)
    runner.max_bytes = 5000  # the first chunk fits, three would not
    assert runner.for_weight("W2") is None and len(runs) == 1
    runner.max_bytes = 4 * 64 * 8 * 4
    assert runner.for_weight("W2") is not None and len(runs) == 5


def test_each_round_of_the_predicted_sweep_measures_the_allocations_nearest_the_budget_first():
    from onnxcompress.passes.bitpredict import _capped, Entry
    from onnxcompress.passes.bitsearch import Candidate

    table = [[Entry(Candidate(0.0, b), 0.1) for b in range(4)] for _ in range(3)]
    table[0][1].measured = True
    rows = [[(j, None) for j in range(4)] for _ in range(3)]
    near, far = [1, 1, 1], [3, 3, 3]
    # the nearest allocation picks two new candidates (weight 0's is measured): at the cap, the far one waits
    assert _capped(table, rows, [None, near, far], cap=2) == [(1, 1), (2, 1)]
    # under the cap, the next allocation's picks come in whole
    assert _capped(table, rows, [near, far], cap=3) == [(0, 3), (1, 1), (1, 3), (2, 1), (2, 3)]


def test_the_predicted_sweeps_landings_come_nearest_the_budget_first():
    from onnxcompress.numerics import allocate
    from onnxcompress.passes import bitpredict
    from onnxcompress.passes.bitwidth import SCALES

    options = [[Option(8 - b, 0.1 * 4 ** b, {"bits": b}) for b in range(4)] for _ in range(2)]
    landings = BitWidthPass(max_drop=1.0)._landings(options, options, fixed=0, weights=[])
    assert landings[0] == allocate.min_size(options, 1.0)  # the budget's own allocation first
    assert landings[1] in (allocate.min_size(options, 2.0), allocate.min_size(options, 0.5))
    levels = bitpredict.noise_levels(options, [allocate.min_size(options, s) for s in SCALES[::2]])
    assert len(landings) == len(SCALES[::2]) + len(levels)


def test_the_sweeps_part_of_the_samples_keeps_each_chunks_cross_fitted_version_and_labels():
    from onnxcompress.graph.data import Dataset
    from onnxcompress.graph.weights import find_weights
    from onnxcompress.passes.bitsearch import Evaluator

    model = gemm(k=16, n=4)
    feeds = random_feeds(model, n=256, seed=3)
    labels = np.arange(256) % 4
    weights = [w for w in find_weights(model, min_elements=0) if len(w.shape) == 2]
    evaluator = Evaluator(model, weights, Dataset(stacked=feeds, labels=labels), lambda *a: {})
    part = evaluator.part(64)  # 4 chunks of 64: the first 16 rows of each
    assert len(part.data) == 64 and part.folds == [0, 1, 2, 3] and [n for _, n in part.chunks] == [16] * 4
    x = next(iter(feeds))
    np.testing.assert_array_equal(part.data.stacked[x][16:32], feeds[x][64:80])
    np.testing.assert_array_equal(part.data.labels[16:32], labels[64:80])
    name = weights[0].name
    versions = [np.full(weights[0].shape, float(f), np.float32) for f in range(4)]
    whole, fewer = evaluator.outputs({name: versions}), part.outputs({name: versions})
    for i in range(4):  # chunk i of the part runs version i, as the whole chunk i does
        np.testing.assert_allclose(fewer[i][0], whole[i][0][:16], rtol=1e-6)
    assert evaluator.part(256) is None
    singles = Evaluator(model, weights, Dataset([{x: feeds[x][i:i + 1]} for i in range(8)]), lambda *a: {})
    singles._start([({x: feeds[x][i:i + 1]}, 1) for i in range(8)], None)  # one sample a chunk (sentences)
    picked = singles.part(4)  # every other chunk, each at its own position
    assert picked.folds == [0, 2, 4, 6] and len(picked.data) == 4
    np.testing.assert_array_equal(picked.chunks[1][0][x], feeds[x][2:3])


def test_a_huge_tables_row_sample_is_blocks_of_rows_and_the_smallest_weights_are_a_share_of_the_bytes(monkeypatch):
    from onnxcompress.passes import bitpredict

    monkeypatch.setattr(bitpredict, "SAMPLE_ABOVE", 1000)
    monkeypatch.setattr(bitpredict, "SAMPLE_ENTRIES", 400)
    monkeypatch.setattr(bitpredict, "SAMPLE_BLOCK", 5)
    table = np.arange(500 * 4).reshape(500, 4)
    sample = bitpredict.row_sample(table)
    rows = sample[:, 0] // 4
    assert set(np.diff(rows)) == {1, 21} and rows[0] == 0  # blocks of 5 rows, one block in 5 (2000 / 400)
    assert sample.size == 400 and np.array_equal(bitpredict.row_sample(table), sample)
    assert bitpredict.row_sample(np.zeros(1000)) is None and bitpredict.row_sample(np.zeros((10, 100))) is None
    monkeypatch.setattr(bitpredict, "SMALL_SHARE", 0.01)
    assert bitpredict.small_weights([5000, 10, 30, 10, 4000, 50]) == {1, 2, 3}  # 50 <= 1% of 9100 < 100


def gather_table(vocab: int = 600, dim: int = 16, classes: int = 8, seed: int = 0) -> onnx.ModelProto:
    """ids [N, 6] -> Gather(table [vocab, dim]) -> ReduceMean over the tokens -> MatMul W [dim, classes] + b."""
    from onnx import helper, numpy_helper, TensorProto
    from tiny import make_model, value

    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((vocab, dim)).astype(np.float32), "table"),
             numpy_helper.from_array((rng.standard_normal((dim, classes)) * 0.3).astype(np.float32), "W"),
             numpy_helper.from_array((rng.standard_normal(classes) * 0.1).astype(np.float32), "b"),
             numpy_helper.from_array(np.array([1], np.int64), "axes")]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"]),
             helper.make_node("ReduceMean", ["emb", "axes"], ["pooled"], keepdims=0),
             helper.make_node("MatMul", ["pooled", "W"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["y"])]
    return make_model(nodes, [value("ids", ["N", 6], TensorProto.INT64)], [value("y", ["N", classes])], inits)


def test_the_predicted_sweep_codes_a_huge_table_on_its_rows_sample_and_the_result_agrees(monkeypatch, caplog):
    from onnxcompress.passes import bitpredict

    monkeypatch.setattr(bitpredict, "SAMPLE_ABOVE", 4000)  # the 9,600-entry table is "huge"
    monkeypatch.setattr(bitpredict, "SAMPLE_ENTRIES", 2000)
    monkeypatch.setattr(bitpredict, "SAMPLE_BLOCK", 8)
    monkeypatch.setattr(bitpredict, "PREDICT_ROWS", 3)  # W's 8 output channels: predicted on rows 0, 3, 7
    coded = []
    real = bitpredict.LayerError.__init__
    monkeypatch.setattr(bitpredict.LayerError, "__init__",
                        lambda self, array, *a: (coded.append((np.shape(array), a[-1] is not None)),
                                                 real(self, array, *a))[1])
    model = gather_table()
    ids = np.random.default_rng(0).integers(0, 600, size=(96, 6)).astype(np.int64)
    caplog.set_level("INFO", logger="onnxcompress.passes.bitwidth")
    recipe = Recipe("t", [("bitwidth", {"max_drop": 2.0, "unlabelled": "agreement", "sweep": "predicted",
                                        "bits": [2, 3, 4, 6, 8],
                                        "sparsities": [0.0, 0.5, 0.8], "min_elements": 8}),
                          ("prune", {"min_elements": 8}), ("share", {"min_elements": 8}), ("sparse", {}), ("entropy", {})],
                    form="packed")
    compressed, report = api.compress(model, recipe, {"ids": ids}, eval_data={"ids": ids})
    summary = report.passes[0].summary
    assert "the sweep measures on 48 of the 96 samples" in caplog.text  # single weights on half of them at most
    assert ((16, 8), True) in coded  # W: on a sample of its rows
    assert ((120, 16), False) in coded  # the table coded on a sample: blocks of 8 rows, one in 5 (9,600 / 2,000 entries)
    assert len(summary["sensitivity"]["b"]) == 1  # the smallest weight: its widest dense candidate only
    assert summary["sensitivity"]["b"][0]["bits"] == 8 and summary["choices"]["b"]["sparsity"] == 0.0
    for name, cands in summary["sensitivity"].items():  # each weight's safest candidate measured: the fallback plan
        assert any(c["bits"] == 8 and c["sparsity"] == 0.0 for c in cands), name
    measured = summary["sensitivity"]["table"]
    assert 0 < len(measured) < 15 and all(c["size"] > 0 for c in measured)
    assert report.validation.worst_agreement() >= 0.98  # top-1 of the original in onnxruntime
    onnx.checker.check_model(compressed, full_check=True)


@pytest.mark.parametrize("k, n, sparsity", [(64, 40, 0.5), (64, 40, 0.9), (16, 40, 0.5)])
def test_a_sample_of_rows_is_fit_as_the_fit_on_all_rows_makes_them(k, n, sparsity):
    from onnxcompress.graph.data import load_data
    from onnxcompress.graph.weights import find_weights, get_array
    from onnxcompress.passes.bitpredict import LayerError
    from onnxcompress.passes.bitprune import Pruner, sampled_candidate

    model = gemm(k=k, n=n)
    data = load_data(tiny_data(model, n=256))
    info = next(w for w in find_weights(model) if len(w.shape) == 2)
    array = get_array(model, info)
    pruner = Pruner(model, data, [info])
    pruner.held_out_ridge = False
    if k == 16:
        pruner.max_flops = 0  # sparsegpt: also a row at a time
    rows = np.array([0, 3, 17, 39])
    sampled, keep = pruner.rows_fit(array, info, sparsity, rows)
    layer = pruner.layers[info.name]
    (whole,), mask = pruner(array, info, sparsity, all_rows=True)
    np.testing.assert_allclose(sampled, layer.weight_matrix(whole)[rows], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(keep, layer.weight_matrix(mask)[rows])
    coded = sampled_candidate(array, info, sparsity, 4, 0, pruner, rows)
    assert coded.codes.shape == (4, k) and np.all((coded.decode() == 0) == ~keep)
    stats = pruner.stats[info.name]
    full, part = LayerError(array, layer, stats), LayerError(array, layer, stats, rows)
    w = layer.weight_matrix(array)
    # the sampled rows' error: their share of the whole one's, each against its own signal
    h = stats.hessian(0)
    d = w[rows] - coded.decode()
    assert part(coded.decode()) == pytest.approx(np.einsum("ij,jk,ik->", d, h, d) / np.einsum("ij,jk,ik->", w[rows], h, w[rows]), rel=1e-4)
    assert full(array) == 0.0 and part(w[rows]) == 0.0


def test_sparsegpt_with_the_factor_made_before_is_sparsegpt():
    from onnxcompress.numerics.refine import sparsegpt, sparsegpt_factor

    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 24))
    x[:, 3] = 0.0  # a dead input
    h, w = x.T @ x / 200, rng.standard_normal((5, 24))
    keep = rng.random((5, 24)) > 0.5
    factor = sparsegpt_factor(h, 0.01)
    for k in (keep, ~keep):
        np.testing.assert_array_equal(sparsegpt(w, h, keep=k, damping=0.01, factor=factor)[0],
                                      sparsegpt(w, h, keep=k, damping=0.01)[0])


def test_a_sparing_evaluator_builds_a_suffix_from_a_weights_second_run_not_for_most_of_the_model_and_keeps_few(
        monkeypatch):
    import onnxcompress.passes.bitsearch as bs
    from onnxcompress.graph.data import Dataset
    from onnxcompress.graph.weights import find_weights

    model = _chain(n=4)  # W0's and W1's suffixes hold over half the 8 nodes, W2's and W3's not
    data = Dataset(stacked=random_feeds(model, n=100, seed=1))
    weights = find_weights(model, min_elements=0)
    evaluator = bs.Evaluator(model, weights, data, lambda *a: {}, suffix_min_elements=0)
    evaluator.sparing = True
    built = []
    make = evaluator.suffixes.for_weight
    monkeypatch.setattr(evaluator.suffixes, "for_weight", lambda name: built.append(name) or make(name))
    monkeypatch.setattr(bs, "SUFFIX_SESSIONS", 1)
    rng = np.random.default_rng(2)
    changed = {w.name: [rng.standard_normal(w.shape).astype(np.float32)] for w in weights}
    whole = {}
    for name, v in changed.items():
        whole[name] = evaluator.outputs({name: v})  # the first run: the whole model
    assert built == []
    for _ in range(2):
        for name, v in changed.items():
            again = evaluator.outputs({name: v})
            assert all(np.allclose(a, b, atol=1e-5) for x, y in zip(again, whole[name]) for a, b in zip(x, y))
    # W2 kept (the one session allowed), W3 the current one past it; W0, W1 never built
    assert built == ["W2", "W3"] and evaluator._suffix["W0"] is None and evaluator._suffix["W2"] is not None
    assert "W3" not in evaluator._suffix and evaluator._current[0] == "W3"


def test_the_predicted_sweep_measures_each_weights_safest_candidate_for_the_fallback(monkeypatch):
    from onnxcompress.passes import bitpredict

    def narrowest_only(table, measure, *rest):  # a sweep that measured each weight's last (narrowest) candidate
        for i, row in enumerate(table):
            measure(i, len(row) - 1)
            row[-1].measured = True
        return 1

    monkeypatch.setattr(bitpredict, "sweep", narrowest_only)
    model = gather_table()
    ids = np.random.default_rng(0).integers(0, 600, size=(64, 6)).astype(np.int64)
    recipe = Recipe("t", [("bitwidth", {"max_drop": 0.0, "unlabelled": "agreement", "sweep": "predicted",
                                        "bits": [2, 8], "sparsities": [0.0, 0.8], "min_elements": 8})])
    _, report = api.compress(model, recipe, {"ids": ids}, eval_data={"ids": ids})
    summary = report.passes[0].summary
    for name in ("table", "W"):
        assert {(c["sparsity"], c["bits"]) for c in summary["sensitivity"][name]} == {(0.0, 8), (0.8, 2)}
    assert summary["choices"]["table"] == {"bits": 8, "sparsity": 0.0}  # nothing met a zero budget: the safe plan
