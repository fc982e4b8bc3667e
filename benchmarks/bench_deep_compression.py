"""Deep Compression end to end on the MNIST samples: stages, the ratio/accuracy curve, decode speed.

Run: ``python benchmarks/bench_deep_compression.py [--models lenet300 lenet5] [--no-sweep]``

1. Stages (Han et al. Table 1 style), each a whole file on disk and its accuracy on
   samples/mnist_test.npz (calibration: samples/mnist_calib.npz, never the test set), with the
   per-layer sparsity and bits the recipe's bit-width search plans on the calibration data:
   original; prune (portable, sparse float constants where smaller); + share (portable codebook
   form); + CSR raw (packed, bit-packed codes and relative indices, no entropy coder); + Huffman
   (the paper's coder); + better coder (Huffman, ANS or raw per stream, by measured size).
   The packed model's accuracy is measured through ``unpack`` and plain onnxruntime, and its
   outputs are checked identical to the packed model's fast path (numpy kernel at load); the
   onnxruntime custom-op path (our op run by onnxruntime-extensions) is compared too. A last row runs all stages with the
   paper's own per-layer sparsity and codebook bits for the network (Han et al. Tables 2-3).
2. Sweep (the paper's Figure 6): fc sparsity from 50% to 95% (conv 25 points lower, classifier
   heads at most 75%), full recipe in the packed form, with compensation and centroid refinement
   (prune compensation "lstsq", share refine) and without (plain magnitude pruning, k-means).
3. Decode speed: loading the packed models (MB/s of float32 weights made by the numpy kernel),
   a synthetic 2048x2048 weight at 10% density, and single streams by our Huffman, ANS
   (constriction) and dahuffman (pure Python) in the same run.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxcompress.formats import customop  # noqa: E402
from onnxcompress.runtime import extension_ops  # noqa: E402

from onnxcompress.formats import packed

from onnxcompress.runtime import sessions as runtime
from onnxcompress.formats.blobs import packed_weights, unpack  # noqa: E402
from onnxcompress.formats.codebook import SharedWeight  # noqa: E402
from onnxcompress.formats.codecs import ans, huffman, relidx  # noqa: E402
from onnxcompress.graph.data import load_data  # noqa: E402
from onnxcompress.numerics.kmeans import kmeans_1d  # noqa: E402
from onnxcompress.graph.model import load_model, save_model  # noqa: E402
from onnxcompress.passes import PASSES  # noqa: E402
from onnxcompress.pipeline.manager import Context  # noqa: E402
from onnxcompress.recipes import BUILTIN  # noqa: E402

try:
    from dahuffman import HuffmanCodec
except ImportError:  # pragma: no cover
    HuffmanCodec = None


def file_bytes(model: onnx.ModelProto) -> int:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.onnx"
        save_model(model, path)
        return path.stat().st_size


def accuracy(model: onnx.ModelProto, test) -> tuple[float, np.ndarray]:
    session = runtime.make_session(model)
    logits = np.concatenate([out[0] for out in runtime.run(session, test, model)])
    return float(np.mean(logits.argmax(axis=1) == test.labels)), logits


def run_steps(ctx: Context, steps) -> Context:
    for name, options in steps:
        p = PASSES[name](**options)
        p.requires(ctx)
        p.ensures(ctx, p.call(ctx))
    return ctx


def fresh(model: onnx.ModelProto, calib, form: str = "portable", plan: dict | None = None) -> Context:
    working = onnx.ModelProto()
    working.CopyFrom(model)
    ctx = Context(original=model, model=working, data=calib, form=form, progress=False)
    ctx.plan.update(copy.deepcopy(plan or {}))
    return ctx


def searched_plan(model: onnx.ModelProto, calib) -> dict:
    """The recipe's first step: per-layer sparsity and bits searched on the calibration data only."""
    ctx = run_steps(fresh(model, calib, "packed"), [("bitwidth", recipe_options("deep-compression")["bitwidth"])])
    return ctx.plan


def branch(ctx: Context, form: str) -> Context:
    out = copy.deepcopy(ctx)
    out.form = form
    return out


def recipe_options(name: str) -> dict[str, dict]:
    return {p: dict(o) for p, o in BUILTIN["deep-compression"]} if name == "deep-compression" else {}


def stages(name: str, model: onnx.ModelProto, calib, test) -> list[dict]:
    options = recipe_options("deep-compression")
    base_bytes = (ROOT / "samples" / f"{name}.onnx").stat().st_size
    base_acc, _ = accuracy(model, test)
    rows = [dict(stage="original", form="portable", bytes=base_bytes, acc=base_acc)]
    start = time.perf_counter()
    plan = searched_plan(model, calib)
    rows[0]["plan"] = plan
    t_search = time.perf_counter() - start
    start = time.perf_counter()
    pruned = run_steps(fresh(model, calib, plan=plan), [("prune", options["prune"])])
    t_prune = time.perf_counter() - start
    sparse_only = run_steps(branch(pruned, "portable"), [("sparse", options["sparse"])])
    rows.append(dict(stage="prune", form="portable", model=sparse_only.model, seconds=t_prune,
                     search_seconds=t_search))
    start = time.perf_counter()
    shared = run_steps(branch(pruned, "portable"), [("share", options["share"])])
    t_share = time.perf_counter() - start
    portable = run_steps(branch(shared, "portable"), [("sparse", options["sparse"])])
    rows.append(dict(stage="+ share", form="portable", model=portable.model, seconds=t_share))
    for stage, methods in (("+ CSR, raw bits", ["raw"]), ("+ Huffman", ["raw", "huffman"]),
                           ("+ better coder (ANS)", ["raw", "huffman", "ans"])):
        start = time.perf_counter()
        ctx = run_steps(branch(shared, "packed"), [("sparse", {**options["sparse"], "measure_with": methods}),
                                                   ("entropy", {**options["entropy"], "methods": methods})])
        rows.append(dict(stage=stage, form="packed", model=ctx.model, seconds=time.perf_counter() - start,
                         ctx=ctx))
    for row in rows[1:]:
        row["bytes"] = file_bytes(row["model"])
        if row["form"] == "packed":  # accuracy through unpack + plain onnxruntime; fast path must agree exactly
            portable_model = unpack(row["model"])
            row["acc"], logits = accuracy(portable_model, test)
            _, fast = accuracy(row["model"], test)
            assert np.array_equal(logits, fast), "unpacked and packed outputs differ"
            if row is rows[-1]:
                session = extension_ops.custom_op_session(row["model"])
                custom = np.concatenate([out[0] for out in runtime.run(session, test, row["model"])])
                row["custom_op_max_diff"] = float(np.abs(custom - logits).max())
        else:
            row["acc"], _ = accuracy(row["model"], test)
    for row in rows:
        row["ratio"] = base_bytes / row["bytes"]
        row["drop"] = 100 * (base_acc - row["acc"])
    return rows


def stage_table(name: str, rows: list[dict]) -> str:
    lines = [f"\n### {name}: stages (whole file on disk; accuracy on mnist_test.npz, 1000 samples)\n",
             "| stage | form | file bytes | ratio | test accuracy | drop (points) |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['form']} | {r['bytes']:,} | {r['ratio']:.1f}x | {100 * r['acc']:.2f}% | "
                     f"{r['drop']:+.2f} |")
    return "\n".join(lines)


def stream_table(name: str, ctx: Context) -> str:
    lines = [f"\n### {name}: per layer in the packed form (bits per weight, entropy = the memoryless limit)\n",
             "| weight | layout | nonzero | codes bits/w (coder) | codes entropy | indices bits/w (coder) | "
             "indices entropy | blob bytes |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for rec in ctx.records:
        if rec.pass_name != "entropy":
            continue
        d = rec.details
        nz = float(np.mean(ctx.shared[rec.name].decode() != 0))
        layout = d["layout"] + (f" {d['index_bits']}-bit" if d["layout"] == "csr" else "")
        idx = (f"{d['indices_bits_per_weight']:.3f} ({d['indices_coder']}) | {d['indices_entropy_bits_per_weight']:.3f}"
               if "indices_coder" in d else "- | -")
        lines.append(f"| {rec.name} | {layout} | {100 * nz:.1f}% | {d['codes_bits_per_weight']:.3f} ({d['codes_coder']}) "
                     f"| {d['codes_entropy_bits_per_weight']:.3f} | {idx} | {d['blob_bytes']:,} |")
    return "\n".join(lines)


SWEEP = (0.5, 0.8, 0.9, 0.95)

# Han et al. 2016, Tables 2-3: fraction pruned per layer and codebook bits, for the same networks
PAPER = {"lenet300": ({"fc1.weight": 0.92, "fc2.weight": 0.91, "fc3.weight": 0.74}, {"bits_fc": 6}),
         "lenet5": ({"conv1.weight": 0.34, "conv2.weight": 0.88, "fc1.weight": 0.92, "fc2.weight": 0.81},
                    {"bits_fc": 5, "bits_conv": 8})}


def fixed_row(model: onnx.ModelProto, calib, test, base: dict) -> dict:
    """All stages with the fixed per-role defaults and no search (the deep-compression-fixed recipe)."""
    ctx = run_steps(fresh(model, calib, "packed"), BUILTIN["deep-compression-fixed"])
    acc, _ = accuracy(unpack(ctx.model), test)
    size = file_bytes(ctx.model)
    return dict(stage="fixed per-role defaults, no search (`deep-compression-fixed`)", form="packed", bytes=size,
                acc=acc, ratio=base["bytes"] / size, drop=100 * (base["acc"] - acc))


def paper_row(name: str, model: onnx.ModelProto, calib, test, base: dict) -> dict:
    """The full recipe with the paper's own per-layer sparsity and bits for this network."""
    sparsity, bits = PAPER[name]
    options = recipe_options("deep-compression")
    ctx = run_steps(fresh(model, calib, "packed"), [("prune", {**options["prune"], "sparsity": sparsity}),
                                                   ("share", {**options["share"], **bits}),
                                                   ("sparse", options["sparse"]), ("entropy", options["entropy"])])
    acc, _ = accuracy(unpack(ctx.model), test)
    size = file_bytes(ctx.model)
    return dict(stage="paper's per-layer sparsity and bits, all stages", form="packed", bytes=size, acc=acc,
                ratio=base["bytes"] / size, drop=100 * (base["acc"] - acc))


def sweep(name: str, model: onnx.ModelProto, calib, test) -> str:
    base_bytes = (ROOT / "samples" / f"{name}.onnx").stat().st_size
    base_acc, _ = accuracy(model, test)
    options = recipe_options("deep-compression")
    lines = [f"\n### {name}: compression ratio vs accuracy drop (packed, whole file; cf. the paper's Fig. 6)\n",
             "| fc sparsity | conv sparsity | ratio (compensated) | drop (compensated) | ratio (plain) | drop (plain) |",
             "|---:|---:|---:|---:|---:|---:|"]
    for s in SWEEP:
        cells = []
        conv = max(0.0, s - 0.25)
        for compensated in (True, False):
            prune = {**options["prune"], "sparsity_fc": s, "sparsity_conv": conv,
                     "sparsity_head": min(s, 0.75), "sparsity_stem": min(conv, 0.35)}
            share = dict(options["share"])
            if not compensated:
                prune["compensation"] = "none"
                share["refine"] = False
            ctx = run_steps(fresh(model, calib, "packed"), [("prune", prune), ("share", share),
                                                           ("sparse", options["sparse"]), ("entropy", options["entropy"])])
            acc, _ = accuracy(ctx.model, test)
            cells.append((base_bytes / file_bytes(ctx.model), 100 * (base_acc - acc)))
        lines.append(f"| {100 * s:.0f}% | {100 * conv:.0f}% | {cells[0][0]:.1f}x | {cells[0][1]:+.2f} | "
                     f"{cells[1][0]:.1f}x | {cells[1][1]:+.2f} |")
    return "\n".join(lines)


def best_time(fn, repeat: int = 3):
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def synthetic_shared(rows: int = 2048, cols: int = 2048, keep: float = 0.1, bits: int = 5) -> SharedWeight:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[np.abs(w) < np.quantile(np.abs(w), 1 - keep)] = 0
    fit = kmeans_1d(w.astype(np.float64), 2 ** bits, keep_zero=True)
    return SharedWeight("W", w.shape, w.dtype, fit.labels.astype(np.uint8), fit.centroids.astype(np.float32), bits,
                        channel_axis=0, zero_code=0)


def decode_speed(packed_models: dict[str, onnx.ModelProto]) -> str:
    lines = ["\n### Decode throughput (MB/s of float32 weights produced; best of 3)\n",
             "| what | coder | float32 MB | seconds | MB/s |", "|---|---|---:|---:|---:|"]
    for name, model in packed_models.items():
        mb = sum(4 * int(np.prod(r["shape"])) for r in packed_weights(model)) / 1e6
        seconds, _ = best_time(lambda: customop.to_portable(model))
        lines.append(f"| {name} packed model load (all weights, fast path) | per stream | {mb:.2f} | {seconds:.4f} | "
                     f"{mb / seconds:.0f} |")
    sw = synthetic_shared()
    mb = 4 * sw.codes.size / 1e6
    for layout, label in ((packed.Layout("dense"), "dense codes"), (packed.Layout("csr", 5), "CSR 5-bit indices")):
        for methods in (["huffman"], ["ans"], ["raw"]):
            blob = packed.write_blob(sw, layout, methods=methods).blob
            seconds, out = best_time(lambda: packed.decode_blob(blob))
            assert np.array_equal(out, sw.decode())
            lines.append(f"| 2048x2048 weight, 10% nonzero, 5-bit, {label} ({8 * len(blob) / sw.codes.size:.2f} "
                         f"bits/w) | {methods[0]} | {mb:.1f} | {seconds:.4f} | {mb / seconds:.0f} |")
    symbols = packed.symbols_of(sw)
    gaps, values = relidx.encode(symbols, 5)
    stream = values.astype(np.int64)
    mb = 4 * sw.codes.size / 1e6  # the weights these values stand for
    for label, codec in (("our Huffman (vectorized)", huffman), ("ANS (constriction)", ans)):
        data = codec.encode(stream, 32)
        seconds, out = best_time(lambda: codec.decode(data))
        assert np.array_equal(out, stream)
        lines.append(f"| CSR value stream of the 2048x2048 weight ({stream.size:,} symbols) | {label} | {mb:.1f} | "
                     f"{seconds:.4f} | {mb / seconds:.0f} |")
    if HuffmanCodec is not None:
        sub = stream.tolist()
        codec = HuffmanCodec.from_data(sub)
        data = codec.encode(sub)
        start = time.perf_counter()
        out = codec.decode(data)
        seconds = time.perf_counter() - start
        assert out == sub
        lines.append(f"| same stream | dahuffman (pure Python) | {mb:.1f} | {seconds:.4f} | {mb / seconds:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["lenet300", "lenet5"])
    ap.add_argument("--no-sweep", action="store_true", help="skip the ratio/accuracy sweep (the slow part)")
    ap.add_argument("--sweep-only", action="store_true", help="run only the ratio/accuracy sweep")
    args = ap.parse_args()
    calib = load_data(ROOT / "samples" / "mnist_calib.npz", name="calibration")
    test = load_data(ROOT / "samples" / "mnist_test.npz", name="test")
    print(f"numpy {np.__version__}, onnx {onnx.__version__}, {os.cpu_count()} CPUs; recipe deep-compression = "
          f"{BUILTIN['deep-compression']}")
    packed_models = {}
    for name in args.models if not args.sweep_only else []:
        model = load_model(ROOT / "samples" / f"{name}.onnx")
        rows = stages(name, model, calib, test)
        rows.append(fixed_row(model, calib, test, rows[0]))
        if name in PAPER:
            rows.append(paper_row(name, model, calib, test, rows[0]))
        print(stage_table(name, rows))
        plan = ", ".join(f"{w} {p['sparsity']:.0%} pruned/{p['bits']} bits" for w, p in rows[0]["plan"].items())
        print(f"\nsearched plan (calibration data only, {rows[1]['search_seconds']:.0f} s): {plan}")
        diff = next(r["custom_op_max_diff"] for r in rows if "custom_op_max_diff" in r)
        print(f"\nonnxruntime custom-op path vs unpacked portable model on the test set: max |diff| = {diff:.3g}")
        recipe_row = next(r for r in reversed(rows) if "ctx" in r)
        print(stream_table(name, recipe_row["ctx"]))
        packed_models[name] = recipe_row["model"]
        times = ", ".join(f"{r['stage']} {r['seconds']:.1f} s" for r in rows[1:] if "seconds" in r)
        print(f"\npass times: {times}")
    if packed_models:
        print(decode_speed(packed_models))
    if not args.no_sweep:
        for name in args.models:
            print(sweep(name, load_model(ROOT / "samples" / f"{name}.onnx"), calib, test))


if __name__ == "__main__":
    main()
