"""Portable outputs run at the original's speed: onnxruntime folds their decode chains at load.

For each sample and portable recipe (run with the calibration split as `--data`, the sample declared
at `--opset`, 13 by default, as exporters write them), in one process, one intra-op thread:
- inference latency of the original and of each output, interleaved round by round (original,
  output, original, output, ...), the median per call in each round, the ratio output/original
  taken round by round and its median quoted (so drifts of the shared machine cancel);
- session creation time (which includes folding) of each, interleaved the same way;
- the output's shipped sizes (disk, gzip -9) for reference;
- with --layout, the streams of each pruned shared weight of `deep-compression-portable`: bytes
  raw and gzip -9 with relative indices packed at each gap width, as bytes (gaps and codes one a
  byte), and interleaved (gap, code) byte pairs, against the packed form's entropy coder on the
  same codes (what layout a general-purpose compressor models best);
- with --ort, each output converted to ORT format (.ort) at optimization levels all, basic and
  disable: the .ort file's size and its latency (batch 1) against the .onnx it came from.

    python benchmarks/bench_portable.py [--models lenet300 lenet5] [--recipes share share-4bit ...]
                                        [--rounds 9] [--opset 13]
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_table import DATA, SAMPLES, at_opset  # noqa: E402

from onnxcompress import api  # noqa: E402
from onnxcompress.runtime.sessions import median_latency  # noqa: E402
from onnxcompress.runtime.shipped import shipped_size  # noqa: E402


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def paired(original: Path, output: Path, feed: dict, rounds: int, calls: int) -> tuple[float, float, float]:
    """(median ms original, median ms output, median of the per-round ratios output/original)."""
    sessions = [session(original), session(output)]
    ref, got = [], []  # median_latency warms each session up before it times
    for _ in range(rounds):
        ref.append(median_latency(sessions[0], feed, calls))
        got.append(median_latency(sessions[1], feed, calls))
    ratio = float(np.median(np.array(got) / np.array(ref)))
    return 1e3 * float(np.median(ref)), 1e3 * float(np.median(got)), ratio


def load_times(original: Path, output: Path, rounds: int) -> tuple[float, float]:
    ref, got = [], []
    for _ in range(rounds):
        for path, into in ((original, ref), (output, got)):
            start = time.perf_counter()
            session(path)
            into.append(time.perf_counter() - start)
    return 1e3 * float(np.median(ref)), 1e3 * float(np.median(got))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["lenet300", "lenet5"])
    parser.add_argument("--recipes", nargs="+", default=["share", "share-4bit", "deep-compression-portable"])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--opset", type=int, default=13)
    parser.add_argument("--layout", action="store_true", help="only the stream layout table (see above)")
    parser.add_argument("--ort", action="store_true", help="only the ORT-format conversion table (see above)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.layout:
        return layout_table(args.models, args.opset)
    if args.ort:
        return ort_table(args.models, args.recipes, args.opset, args.rounds)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            calib, test = DATA.get(model, ("mnist_calib.npz", "mnist_test.npz"))
            source = at_opset(SAMPLES / f"{model}.onnx", args.opset, Path(tmp), SAMPLES / calib)
            x = np.load(SAMPLES / test)["input"]
            for recipe in args.recipes:
                out = Path(tmp) / f"{model}.{recipe}.onnx"
                api.compress_file(source, out, recipe, data=SAMPLES / calib, validate="none")
                shipped = shipped_size(out, resident=False)
                load_ref, load_out = load_times(source, out, args.rounds)
                for batch, calls in ((1, 400), (64, 40)):
                    ref, got, ratio = paired(source, out, {"input": x[:batch]}, args.rounds, calls)
                    rows.append((model, recipe, batch, shipped, ref, got, ratio, load_ref, load_out))
                    print(f"{model} {recipe} batch {batch}: {ref:.3f} -> {got:.3f} ms (x{ratio:.3f}); "
                          f"load {load_ref:.1f} -> {load_out:.1f} ms", flush=True)
    print(f"\n| model | recipe | disk | gzip -9 | batch | original ms | portable ms | ratio (median of {args.rounds} "
          "paired rounds) | session creation ms (original -> portable) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model, recipe, batch, shipped, ref, got, ratio, load_ref, load_out in rows:
        print(f"| {model} | `{recipe}` | {shipped.disk / 1024:.1f} KB | {shipped.gzip / 1024:.1f} KB | {batch} | "
              f"{ref:.3f} | {got:.3f} | {ratio:.3f} | {load_ref:.1f} -> {load_out:.1f} |")


def ort_table(models: list[str], recipes: list[str], opset: int, rounds: int) -> None:
    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
    print("| model | recipe | .onnx bytes | .ort level | .ort bytes | .onnx ms | .ort ms | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            calib, test = DATA.get(model, ("mnist_calib.npz", "mnist_test.npz"))
            source = at_opset(SAMPLES / f"{model}.onnx", opset, Path(tmp), SAMPLES / calib)
            feed = {"input": np.load(SAMPLES / test)["input"][:1]}
            for recipe in recipes:
                out = Path(tmp) / f"{model}.{recipe}.onnx"
                api.compress_file(source, out, recipe, data=SAMPLES / calib, validate="none")
                for name, level in levels.items():
                    options = ort.SessionOptions()
                    options.log_severity_level = 3
                    options.graph_optimization_level = level
                    options.optimized_model_filepath = str(Path(tmp) / f"{model}.{recipe}.{name}.ort")
                    options.add_session_config_entry("session.save_model_format", "ORT")
                    ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
                    converted = Path(options.optimized_model_filepath)
                    ref, got, ratio = paired(out, converted, feed, rounds, 50)
                    print(f"| {model} | `{recipe}` | {out.stat().st_size:,} | {name} | {converted.stat().st_size:,} | "
                          f"{ref:.3f} | {got:.3f} | {ratio:.2f} |", flush=True)


def shared_codes(path: Path) -> dict:
    """Each shared weight of a portable file, read back: the folded dense weight and its codebook."""
    import onnx
    from onnx import numpy_helper

    from onnxcompress.formats.codebook import SharedWeight

    model = onnx.load(str(path))
    books = {t.name[: -len("__codebook")]: numpy_helper.to_array(t) for t in model.graph.initializer
             if t.name.endswith("__codebook")}
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(Path(tmp) / "o.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        dense = {t.name: numpy_helper.to_array(t) for t in onnx.load(options.optimized_model_filepath).graph.initializer}
    out = {}
    for name, book in books.items():
        codes = np.abs(dense[name][..., None] - book).argmin(-1)
        assert np.array_equal(book[codes], dense[name])
        bits = max(int(np.ceil(np.log2(book.size))), 1)
        out[name] = SharedWeight(name, codes.shape, np.dtype(np.float32), codes.astype(np.uint8), book, bits,
                                 zero_code=0)
    return out


def layout_table(models: list[str], opset: int) -> None:
    import gzip

    from onnxcompress.formats.codechain import pack_words, sparse_codes
    from onnxcompress.formats.packed import choose_layout, write_blob

    print("| model | weight | kept | layout | raw bytes | gzip -9 |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            calib, _ = DATA.get(model, ("mnist_calib.npz", "mnist_test.npz"))
            source = at_opset(SAMPLES / f"{model}.onnx", opset, Path(tmp), SAMPLES / calib)
            out = Path(tmp) / f"{model}.dcp.onnx"
            api.compress_file(source, out, "deep-compression-portable", data=SAMPLES / calib, validate="none")
            for name, shared in shared_codes(out).items():
                kept = float(np.mean(shared.codes != 0))
                if kept > 0.5:
                    continue
                rows = []
                for gap_bits in range(2, 9):
                    sparse = sparse_codes(shared.codes, shared.bits, gap_bits)
                    streams = pack_words(sparse.gaps, gap_bits).tobytes() + pack_words(sparse.codes, shared.bits).tobytes()
                    rows.append((f"{gap_bits}-bit gaps + {shared.bits}-bit codes, packed", len(streams),
                                 len(gzip.compress(streams, 9))))
                    if gap_bits == 8:
                        flat = sparse.gaps.astype(np.uint8).tobytes() + sparse.codes.astype(np.uint8).tobytes()
                        pairs = np.stack([sparse.gaps, sparse.codes], 1).astype(np.uint8).tobytes()
                        rows += [("8-bit gaps + codes one a byte", len(flat), len(gzip.compress(flat, 9))),
                                 ("(gap, code) byte pairs interleaved", len(pairs), len(gzip.compress(pairs, 9)))]
                blob = write_blob(shared, choose_layout(shared)).blob
                rows.append(("packed form: CSR + entropy coder (blob)", len(blob), len(gzip.compress(blob, 9))))
                for label, raw, zipped in rows:
                    print(f"| {model} | {name} | {100 * kept:.1f}% | {label} | {raw:,} | {zipped:,} |", flush=True)


if __name__ == "__main__":
    main()
