"""validate and compress as a CI gate (issue 14, item 10): thresholds that exit 1 with one line naming
the output and the figure, the verdict in --json, and a failed compress gate writes nothing."""
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxcompress.cli import main
from onnxcompress.runtime.gate import Gate
from onnxcompress.runtime.metrics import Comparison, OutputMetrics, compare_outputs
from tiny import cli_error, gemm, run


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def models(tmp_path):
    """The reference, an unrelated model of the same shape, and data labelled with the reference's decisions."""
    reference = gemm(k=64, n=16, seed=0)
    onnx.save(reference, tmp_path / "ref.onnx")
    onnx.save(gemm(k=64, n=16, seed=1), tmp_path / "other.onnx")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 64)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x, labels=run(reference, {"x": x})[0].argmax(-1))
    np.savez(tmp_path / "nolabels.npz", x=x)
    return tmp_path


def _gate_fails(capsys, argv) -> tuple[str, str]:
    assert main(argv) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err, captured.out


def test_unrelated_models_fail_min_agreement(models, capsys):
    err, out = _gate_fails(capsys, ["validate", str(models / "ref.onnx"), str(models / "other.onnx"),
                                    "--data", str(models / "data.npz"), "--min-agreement", "90", "--json"])
    assert "output 'y'" in err and "top-1 agreement" in err and "--min-agreement 90" in err
    verdict = json.loads(out)["verdict"]
    assert verdict["passed"] is False
    assert [(c["output"], c["figure"], c["passed"]) for c in verdict["checks"]] == [("y", "top-1 agreement", False)]


@pytest.mark.parametrize("flags", [["--min-agreement", "100"], ["--min-sqnr", "200"], ["--atol", "0"],
                                   ["--max-drop", "0"], ["--atol", "1e-9", "--rtol", "0"]])
def test_identical_models_pass_every_threshold(models, capsys, flags):
    argv = ["validate", str(models / "ref.onnx"), str(models / "ref.onnx"), "--data", str(models / "data.npz"),
            "--json", *flags]
    assert main(argv) == 0
    verdict = json.loads(capsys.readouterr().out)["verdict"]
    assert verdict["passed"] is True and verdict["checks"]


@pytest.mark.parametrize("flags, figure", [(["--min-sqnr", "10"], "SQNR"),
                                           (["--atol", "1e-3"], "differ from the reference"),
                                           (["--rtol", "0.01"], "differ from the reference"),
                                           (["--max-drop", "1"], "accuracy drop")])
def test_each_threshold_fails_on_unrelated_models(models, capsys, flags, figure):
    err, _ = _gate_fails(capsys, ["validate", str(models / "ref.onnx"), str(models / "other.onnx"),
                                  "--data", str(models / "data.npz"), *flags])
    assert "output 'y'" in err and figure in err and flags[0] in err, err


def test_max_drop_without_labels_is_a_usage_error(models, capsys):
    err = cli_error(capsys, ["validate", str(models / "ref.onnx"), str(models / "ref.onnx"),
                             "--data", str(models / "nolabels.npz"), "--max-drop", "1"])
    assert "labels" in err


def test_non_finite_threshold_is_a_usage_error(models, capsys):
    assert "finite" in cli_error(capsys, ["validate", str(models / "ref.onnx"), str(models / "ref.onnx"),
                                          "--min-sqnr", "nan"])


def test_verdict_on_a_hand_built_comparison():
    """Every output is checked; the sentence names the first failure and counts the rest."""
    comparison = Comparison([OutputMetrics("a", 0.1, 0.01, 0.99, 40.0, top1_agreement=0.95),
                             OutputMetrics("b", 0.5, 0.2, 0.9, 14.0, top1_agreement=0.70)], samples=10)
    verdict = Gate(min_agreement=90, min_sqnr=20).verdict(comparison)
    assert [c.passed for c in verdict.checks] == [True, False, True, False]
    assert verdict.sentence() == ("output 'b': top-1 agreement 70% is below --min-agreement 90 "
                                  "(and 1 more failed check(s))")
    assert Gate().verdict(comparison).passed and not Gate().active


def test_tolerance_counts_values_like_isclose():
    ref = [[np.array([[1.0, 2.0, np.nan, 100.0]], np.float32)]]
    cand = [[np.array([[1.05, 2.0, np.nan, 101.0]], np.float32)]]
    (metric,) = compare_outputs(["y"], ref, cand, tolerance=(0.1, 0.0))
    assert metric.outside_tolerance == 1  # 100 vs 101; NaN matches NaN
    (metric,) = compare_outputs(["y"], ref, cand, tolerance=(0.0, 0.02))
    assert metric.outside_tolerance == 1  # 1.05 is 5% off; 101 is 1% off
    assert compare_outputs(["y"], ref, cand)[0].outside_tolerance is None


def test_compress_gate_failure_writes_nothing(models, capsys):
    before = _files(models)
    err, out = _gate_fails(capsys, ["compress", str(models / "ref.onnx"), "-o", str(models / "out.onnx"),
                                    "--recipe", "int4-weights", "--data", str(models / "data.npz"),
                                    "--report", str(models / "r.json"), "--jobs", "1", "-q",
                                    "--gate-min-sqnr", "90", "--json"])
    assert "gate failed" in err and "output 'y'" in err and "--gate-min-sqnr 90" in err
    assert "nothing was written" in err
    assert json.loads(out)["verdict"]["passed"] is False
    assert _files(models) == before


def test_compress_gate_pass_writes_the_verdict_in_the_report(models, capsys):
    assert main(["compress", str(models / "ref.onnx"), "-o", str(models / "out.onnx"), "--recipe", "int4-weights",
                 "--data", str(models / "data.npz"), "--report", str(models / "r.json"), "--jobs", "1", "-q",
                 "--gate-min-agreement", "50", "--gate-atol", "10"]) == 0
    verdict = json.loads((models / "r.json").read_text())["verdict"]
    assert verdict["passed"] and {c["flag"] for c in verdict["checks"]} == {"--gate-min-agreement", "--gate-atol 10"}
    assert (models / "out.onnx").is_file()


def test_compress_gate_needs_the_validation(models, capsys):
    before = _files(models)
    err = cli_error(capsys, ["compress", str(models / "ref.onnx"), "-o", str(models / "out.onnx"),
                             "--validate", "none", "--gate-min-sqnr", "20"])
    assert "--validate none" in err
    assert _files(models) == before
