"""khmersm, a Khmer word segmenter (character transformer: embeddings, 3 attention layers with
LayerNorm, CRF emissions), khmersm.

Inputs: Khmer sentences written here: words from a list (everyday and news vocabulary) joined
without spaces, as Khmer is written; calibration and test drawn with different seeds.
Task: the segmentation, i.e. the CRF's Viterbi tag path with the package's own transitions.
"""
from __future__ import annotations

import json

import numpy as np

from . import package_file, viterbi

PACKAGE = "khmersm"
FAMILY = "transformer (char embeddings, attention, LayerNorm) + CRF"
METRIC = "sequence"
# 1000 test sentences, not 200: a whole-sentence answer flips under tiny noise here (1e-4 relative weight noise
# already changes ~0.5% of them), so agreements sit at 95-98%, where 200 samples have a standard error of
# ~1.4 points and one sentence is 0.5: too coarse to rank recipes half a point apart
SIZES = {"calibration": 128, "test": 1000}
WORDS = ("ខ្ញុំ អ្នក គាត់ យើង ពួកគេ ទៅ មក ផ្ទះ សាលារៀន ភ្នំពេញ ប្រទេស កម្ពុជា ស្រឡាញ់ ញ៉ាំ បាយ ទឹក ធ្វើការ សៀវភៅ អាន "
         "សរសេរ ភាសា ខ្មែរ ថ្ងៃនេះ ស្អែក ម្សិលមិញ ល្អ ណាស់ ធំ តូច ឡាន ផ្សារ ទិញ លក់ ត្រី សាច់ បន្លែ គ្រូ សិស្ស រៀន "
         "និយាយ ចង់ មាន នៅ ក្នុង ជាមួយ និង ដែល ជា មិន ទេ ហើយ ពេល ព្រឹក ល្ងាច រដ្ឋាភិបាល សេដ្ឋកិច្ច អភិវឌ្ឍន៍ "
         "ប្រជាជន ខេត្ត ក្រុង ផ្លូវ ស្ពាន ទន្លេ មេគង្គ អង្គរវត្ត ប្រវត្តិសាស្ត្រ វប្បធម៌ សុខភាព មន្ទីរពេទ្យ ការងារ "
         "កសិកម្ម ស្រូវ ភ្លៀង ក្តៅ ត្រជាក់ ឆ្នាំ ខែ ម៉ោង ប្រាក់ ធនាគារ ទូរស័ព្ទ កុំព្យូទ័រ បច្ចេកវិទ្យា").split()


def model_path():
    package_file("khmersm", "model.onnx.data")
    return package_file("khmersm", "model.onnx")


def _config() -> dict:
    return json.loads(package_file("khmersm", "config.json").read_text(encoding="utf-8"))


def make_split(split: str, n: int):
    rng = np.random.default_rng({"calibration": 31, "test": 32}[split])
    char2id = _config()["char2id"]
    feeds = []
    for _ in range(n):
        text = "".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), int(rng.integers(3, 12))))
        ids = np.array([[char2id.get(c, char2id["<unk>"]) for c in text]], dtype=np.int64)
        feeds.append({"x": ids, "mask": np.ones_like(ids, dtype=bool)})
    return feeds, feeds


def answers(run, items):
    c = _config()
    trans, start, end = (np.array(c[k], dtype=np.float64) for k in
                         ("crf_transitions", "crf_start_transitions", "crf_end_transitions"))
    return [viterbi(run(feed)[0][0].astype(np.float64), trans, start, end) for feed in items]


def same(a, b) -> bool:
    return a == b
