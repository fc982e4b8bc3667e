"""The pass contract: typed artifacts checked before a pass runs, composites, the typed search plan
driving back-off, the output form decided once, and which failures are ours (exit 1) or the user's (exit 2)."""
import onnx
import pytest

from onnxcompress import api, recipes
from onnxcompress.cli import main
from onnxcompress.errors import BugError, MissingArtifactError
from onnxcompress.formats.forms import Form
from onnxcompress.graph.data import load_data
from onnxcompress.passes.calibrate import CalibratePass
from onnxcompress.passes.entropy import EntropyPass
from onnxcompress.passes.prune import PrunePass
from onnxcompress.passes.qdq import QdqPass
from onnxcompress.passes.share import SharePass
from onnxcompress.passes.sparse import SparsePass
from onnxcompress.pipeline.artifacts import Artifact, Budget, LayerChoice, SearchPlan, Verified
from onnxcompress.pipeline.manager import Context, Pass, PassManager, PassResult
from onnxcompress.pipeline.search import SearchThenVerify
from onnxcompress.recipes import Recipe
from tiny import cli_error, gemm, random_feeds


def test_passes_declare_what_they_make_and_need():
    assert CalibratePass.produces == {Artifact.CALIBRATION}
    assert QdqPass().consumes == {Artifact.CALIBRATION} and QdqPass(mode="weights").consumes == set()
    assert EntropyPass.consumes == {Artifact.SHARED} and EntropyPass.produces == {Artifact.PACKED}
    assert PrunePass.produces == {Artifact.MASKS} and SharePass.produces == {Artifact.SHARED}
    for name, steps in recipes.BUILTIN.items():  # every built-in recipe is in order
        PassManager(Recipe(name, steps).build()).check_order(set())


def test_a_pass_missing_its_artifact_is_named_with_its_producer_before_any_pass_runs():
    model = gemm(k=64, n=32)
    ran = []

    class Spy(Pass):
        name = "spy"

        def call(self, ctx):
            ran.append(True)
            return PassResult(False)

    with pytest.raises(MissingArtifactError, match="pass 'entropy' needs shared .* which pass 'share' makes"):
        PassManager([Spy(), EntropyPass()], validate="none").run(model)
    assert not ran  # checked before the first pass ran
    ctx = Context(original=model, model=model)
    with pytest.raises(MissingArtifactError, match="'prune' or 'share'"):
        SparsePass().requires(ctx)  # either artifact will do: the pass checks it itself


def test_the_user_s_misordered_recipe_exits_2_and_ours_exits_1(tmp_path, capsys, monkeypatch):
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(gemm(k=64, n=32), src)
    mine = tmp_path / "mine.yaml"
    mine.write_text("passes:\n  - entropy\n  - share: {min_elements: 64}\n")
    err = cli_error(capsys, ["compress", str(src), "-o", str(out), "--recipe", str(mine)])
    assert "pass 'entropy' needs shared (codebook) weights, which pass 'share' makes" in err
    monkeypatch.setitem(recipes.BUILTIN, "broken", [("entropy", {}), ("share", {})])
    assert main(["compress", str(src), "-o", str(out), "--recipe", "broken"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "internal error" in err and "please report" in err
    assert "built-in recipe 'broken'" in err and "'share'" in err
    assert not out.exists()


def test_a_failed_postcondition_is_our_bug_exit_1(tmp_path, capsys, monkeypatch):
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(gemm(k=64, n=32), src)

    def broken(self, ctx, result):
        raise AssertionError("codes of W do not fit 5 bits")

    monkeypatch.setattr(SharePass, "ensures", broken)
    assert main(["compress", str(src), "-o", str(out), "--recipe", "share", "--validate", "none"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "internal error" in err and "in pass 'share'" in err
    assert "codes of W do not fit 5 bits" in err and not out.exists()
    with pytest.raises(BugError, match="postcondition failed"):
        api.compress(gemm(k=64, n=32), "share", validate="none")


def test_a_manager_is_a_pass_of_passes():
    model = gemm(k=64, n=32)
    inner = PassManager([PrunePass(min_elements=64, sparsity_fc=0.5), SharePass(min_elements=64, granularity="tensor")])
    assert inner.produces == {Artifact.MASKS, Artifact.SHARED} and inner.consumes == set()
    assert PassManager([inner, EntropyPass()]).consumes == set()  # entropy's input is made inside
    assert PassManager([EntropyPass(), inner]).consumes == {Artifact.SHARED}
    outer = PassManager([inner, SparsePass(), EntropyPass()], validate="end", form="packed")
    data = load_data(random_feeds(model, n=32))
    compressed, report = outer.run(model, data)
    assert [p.name for p in report.passes] == ["prune", "share", "sparse", "entropy"]  # the leaves, timed
    assert report.form == "packed" and any(n.domain for n in compressed.graph.node)
    assert report.validation is not None and report.validation.outputs[0].sqnr_db > 10


class FixedPlan(Pass):
    """A stand-in search: 1 bit for W (far too coarse for the budget), with a verified 8-bit fallback."""

    name = "fixed-plan"
    produces = frozenset({Artifact.PLAN})

    def call(self, ctx):
        coarse, fine = {"W": LayerChoice(1, 0.0)}, {"W": LayerChoice(8, 0.0)}
        ctx.plan = SearchPlan(Budget(min_sqnr=30.0), coarse,
                              [Verified(100, 1.0, 0.0, 0.0, 0.0, False, coarse), Verified(900, 1.0, 0.0, 0.0, 0.0, True, fine)])
        return PassResult(True)


def test_the_typed_plan_drives_back_off_on_a_tiny_model():
    model = gemm(k=64, n=32)
    data = load_data(random_feeds(model, n=32))
    composite = SearchThenVerify(search=FixedPlan(), rest=PassManager([SharePass(min_elements=64, granularity="tensor")]))
    assert composite.produces == {Artifact.PLAN, Artifact.SHARED}
    compressed, report = PassManager([composite]).run(model, data)
    attempts = report.passes[0].summary["end_to_end"]
    assert [a["met"] for a in attempts] == [False, True]  # 1 bit missed 30 dB end to end; the fallback met it
    assert attempts[0]["measured"] < 30.0 <= attempts[1]["measured"]
    assert report.passes[0].summary["choices"] == {"W": {"bits": 8, "sparsity": 0.0}}
    assert [p.name for p in report.passes] == ["fixed-plan", "share"]  # the kept attempt's passes only
    (shared,) = [r for r in report.weights if r.pass_name == "share" and r.action.startswith("shared")]
    assert shared.details["bits"] == 8
    assert any("backed off 1 time" in n for n in report.notes)
    assert report.validation.outputs[0].sqnr_db >= 30.0
    onnx.checker.check_model(compressed, full_check=True)
    # without validation there is nothing to verify against: the plan as the search made it
    _, unverified = PassManager([composite], validate="none").run(model, data)
    assert "end_to_end" not in unverified.passes[0].summary
    assert [r.details["bits"] for r in unverified.weights if r.pass_name == "share" and "bits" in r.details] == [1]


@pytest.mark.parametrize("form", ["packed", "portable"])
def test_the_output_form_is_decided_once_and_every_pass_reads_it(tmp_path, form):
    model = gemm(k=128, n=64)
    data = random_feeds(model, n=64)
    recipe = Recipe("t", [("bitwidth", {"min_sqnr": 20.0, "bits": [3, 5], "sparsities": [0.0, 0.8]}),
                          ("prune", {}), ("share", {"granularity": "tensor"}), ("sparse", {}), ("entropy", {})],
                    form=Form.PACKED)
    compressed, report = api.compress(model, recipe, data, form=form)
    assert report.form == form
    assert report.passes[0].summary["form"] == form  # the search priced the form written
    assert any(n.domain for n in compressed.graph.node) == (form == "packed")
    assert report.validation.outputs[0].sqnr_db > 15


def test_the_ort_format_note_follows_the_shared_weights_artifact(tmp_path):
    from onnxcompress.runtime.shipped import ORT_FORMAT_NOTE

    src = tmp_path / "m.onnx"
    onnx.save(gemm(k=128, n=64), src)
    shared = api.compress_file(src, tmp_path / "s.onnx", "share", validate="none")
    assert Artifact.SHARED in shared.artifacts and ORT_FORMAT_NOTE in shared.notes
    quantized = api.compress_file(src, tmp_path / "q.onnx", "int8-weights", validate="none")
    assert Artifact.SHARED not in quantized.artifacts and ORT_FORMAT_NOTE not in quantized.notes
