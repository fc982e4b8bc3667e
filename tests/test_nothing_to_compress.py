"""A built-in recipe on a model it finds nothing to compress in (every weight below the size threshold)
finishes with the model unchanged in value and says so; its later passes do not call that a missing step
(found by benchmarks/sweep.py: deep-compression-fixed ended with 'sparse storage needs pruned weights:
run prune' on models whose weights were all small)."""
import numpy as np
import pytest

from onnxcompress.api import compress
from tiny import gemm, random_feeds, run


@pytest.mark.parametrize("recipe", ["deep-compression-fixed", "prune", "share"])
def test_a_recipe_with_nothing_to_compress_finishes(recipe):
    model = gemm(k=8, n=8)  # 64 + 8 weights: all below the passes' 256-element threshold
    compressed, report = compress(model, recipe)
    feeds = random_feeds(model)
    np.testing.assert_allclose(run(compressed, feeds)[0], run(model, feeds)[0], rtol=1e-6, atol=1e-6)
    assert report.validation is not None


def test_a_recipe_that_needs_data_says_so_before_any_pass_runs(tmp_path, capsys, monkeypatch):
    import onnx
    from onnxcompress.passes.share import SharePass
    from tiny import cli_error

    onnx.save(gemm(k=64, n=32), tmp_path / "m.onnx")
    ran = []
    monkeypatch.setattr(SharePass, "call", lambda self, ctx: ran.append(1))
    err = cli_error(capsys, ["compress", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "--recipe", "int8"])
    assert "'int8' needs calibration data" in err and "--data" in err
    assert not (tmp_path / "o.onnx").exists()
