"""Per-weight throughput of `share` on single large tensors, one core, without data: time per stage.

For each shape (default 4096x4096 and 4096x11008, He-initialised float32 in an external-data file in
a temporary folder), times, in this process and one thread of numpy:

  read        the worker reading its weight from the external-data file (ArrayRef.load)
  kmeans      one per-tensor codebook and its codes (kmeans_1d: histogram k-means above 4M values)
  sqnr        decoding the codebook form and its weight-space SQNR
  portable    building the portable nodes and initializers and pricing them (ByteSize)
  share auto  share_weight as the `share` recipe runs it (granularity auto: 5 options tried on a sample,
              the chosen one fitted on all values)
  share tensor  share_weight as `deep-compression` runs it (granularity tensor, no pruning mask)
  prune+share   share_weight on a 90%-pruned weight (mask, zeros kept exact), as `deep-compression` after prune

The share rows also give the task's peak allocations over the weight's float32 bytes (tracemalloc, a
separate run), the memory a worker needs per weight (benchmarks/scale_plan.py).

weights/s/core = elements / CPU seconds of that stage (one thread: set OMP_NUM_THREADS=1; CPU time,
not wall time, so that a shared machine's load does not count against it; wall seconds are shown too). With --json the rows are written for
benchmarks/scale_plan.py. With --baseline PATH, also runs `share auto` and `share tensor` with the
onnxcompress package found in PATH (e.g. the main branch's checkout) in a subprocess, alternating
with this checkout's, and prints the ratios of wall and of CPU seconds per pair (CPU: what a loaded
machine distorts least; each process times its second call, as a worker runs its later weights, with
the malloc settings of that code's workers: onnxcompress.execution.memory where it exists); --layers N prices bytes as in a model of N such weights, as the share pass
does (with N = 1 the weight is the whole model, and the choice differs from a stack's).

    OMP_NUM_THREADS=1 python benchmarks/bench_share_speed.py
    OMP_NUM_THREADS=1 python benchmarks/bench_share_speed.py --shapes 4096x4096 --repeat 3 --baseline /path/to/main
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

_ONE = r"""
import importlib, sys, time, json
import numpy as np
try:  # the layered tree, settings passed as one object
    from onnxcompress.fitting.sharing import ShareSettings, share_weight
    from onnxcompress.graph.weights import Role, WeightInfo
except ImportError:  # a baseline checkout from before both changes
    share_weight = importlib.import_module("onnxcompress." + "layer_hessians").share_weight
    weights = importlib.import_module("onnxcompress." + "weights")
    Role, WeightInfo, ShareSettings = weights.Role, weights.WeightInfo, None
try:  # as the code's own workers run (execution.memory), where it has that
    from onnxcompress.execution.memory import keep_freed_memory
    keep_freed_memory()
except ImportError:
    pass
rows, cols, granularity = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
w = np.fromfile(sys.argv[4], dtype=np.float32).reshape(rows, cols)
info = WeightInfo(name="w", shape=(rows, cols), dtype="float32", nbytes=w.nbytes, role=Role.MATMUL,
                  channel_axis=1, consumers=[], location="initializer", graph="main")
elements = w.size * int(sys.argv[5])
if ShareSettings is not None:
    run = lambda: share_weight(w, info, 5, ShareSettings(granularity=granularity, model_elements=elements))
else:
    run = lambda: share_weight(w, info, 5, granularity=granularity, model_elements=elements)
run()  # a worker's first weight, which faults its pages in; the second is what each later weight costs
start, cpu = time.perf_counter(), time.process_time()
run()
print(json.dumps([time.perf_counter() - start, time.process_time() - cpu]))
"""


def _info(shape):
    from onnxcompress.graph.weights import Role, WeightInfo

    return WeightInfo(name="w", shape=shape, dtype="float32", nbytes=int(np.prod(shape)) * 4,
                      role=Role.MATMUL, channel_axis=1, consumers=[], location="initializer", graph="main")


def _time(fn, repeat: int) -> tuple[tuple[float, float], object]:
    """((median wall s, median CPU s of this process), the last result)."""
    walls, cpus, out = [], [], None
    for _ in range(repeat):
        start, cpu = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return (statistics.median(walls), statistics.median(cpus)), out


def _peak(fn) -> int:
    """Peak bytes allocated while fn runs (numpy's buffers included), beyond what was allocated before."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def stages(path: Path, shape: tuple[int, int], repeat: int, layers: int = 1) -> list[dict]:
    from onnxcompress.formats.codebook import portable_nodes
    from onnxcompress.graph.external import ArrayRef
    from onnxcompress.fitting.granular import measure
    from onnxcompress.graph.edit import NameScope
    from onnxcompress.numerics.kmeans import kmeans_1d
    from onnxcompress.fitting.sharing import ShareSettings, WeightEvidence, share_weight
    from onnxcompress.formats.codebook import SharedWeight
    import onnx

    n = int(np.prod(shape))
    ref = ArrayRef(str(path), 0, shape, "<f4")
    info = _info(shape)
    rows = []

    def row(stage, seconds, peak=None):
        wall, cpu = seconds
        rows.append({"shape": "x".join(map(str, shape)), "elements": n, "stage": stage, "seconds": round(wall, 4),
                     "cpu_seconds": round(cpu, 4), "weights_per_s_core": round(n / max(cpu, 1e-9))})
        if peak is not None:  # the task's own peak allocations over the weight's float32 bytes (tracemalloc)
            rows[-1]["peak_over_weight"] = round(peak / (4 * n), 2)

    t, w = _time(ref.load, repeat)
    row("read", t)
    t, result = _time(lambda: kmeans_1d(w, 32), repeat)
    row("kmeans (5 bits)", t)
    shared = SharedWeight(name="w", shape=shape, dtype=w.dtype, codes=result.labels, codebook=result.centroids.astype(np.float32),
                          bits=5, channel_axis=1)
    t, _ = _time(lambda: measure(w, shared, None), repeat)
    row("sqnr", t)

    def portable():
        nodes, inits = portable_nodes(shared, NameScope(onnx.ModelProto()), 21, "share")
        return sum(x.ByteSize() for x in nodes + inits)

    t, _ = _time(portable, repeat)
    row("portable", t)
    auto = ShareSettings(granularity="auto", model_elements=n * layers)
    tensor = ShareSettings(granularity="tensor", model_elements=n)
    t, _ = _time(lambda: share_weight(w, info, 5, auto), repeat)
    row("share auto", t, _peak(lambda: share_weight(w, info, 5, auto)))
    t, _ = _time(lambda: share_weight(w, info, 5, tensor), repeat)
    row("share tensor", t, _peak(lambda: share_weight(w, info, 5, tensor)))
    mask = np.abs(w) >= np.quantile(np.abs(w[:64]), 0.9)
    t, _ = _time(lambda: share_weight(w, info, 5, tensor, WeightEvidence(mask=mask)), repeat)
    row("prune+share tensor", t)
    return rows


def baseline_pairs(path: Path, shape, granularity: str, baseline: str, repeat: int, layers: int = 1
                   ) -> list[tuple[list[float], list[float]]]:
    """(this checkout, baseline) [wall, CPU] seconds of share_weight, each in a fresh process, alternating;
    layers: the model holds this many such weights (the bytes-for-dB exchange rate of the choice)."""
    here = str(Path(__file__).resolve().parent.parent)
    pairs = []
    for _ in range(repeat):
        got = []
        for root in (here, baseline):
            env = dict(os.environ, PYTHONPATH=root)
            out = subprocess.run([sys.executable, "-c", _ONE, str(shape[0]), str(shape[1]), granularity, str(path),
                                  str(layers)],
                                 env=env, capture_output=True, text=True, check=True, cwd=root)
            got.append(json.loads(out.stdout.strip().splitlines()[-1]))
        pairs.append(tuple(got))
    return pairs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="4096x4096,4096x11008")
    parser.add_argument("--repeat", type=int, default=3, help="runs per stage (the median is shown)")
    parser.add_argument("--baseline", help="a checkout whose onnxcompress to compare share_weight with")
    parser.add_argument("--json", help="also write the rows as JSON here (for scale_plan.py)")
    parser.add_argument("--layers", type=int, default=1,
                        help="`share auto` prices bytes as in a model of this many such weights (180: the 3 GB stack)")
    args = parser.parse_args()
    from onnxcompress.execution.memory import keep_freed_memory

    keep_freed_memory()  # the stages below run in this process as in a worker
    rows, ratios = [], []
    with tempfile.TemporaryDirectory(prefix="onnxcompress-share-speed-") as folder:
        for text in args.shapes.split(","):
            shape = tuple(int(s) for s in text.split("x"))
            rng = np.random.default_rng(0)
            w = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / shape[0]))
            path = Path(folder) / f"w_{text}.bin"
            w.tofile(path)
            del w
            rows += stages(path, shape, args.repeat, args.layers)
            if args.baseline:
                for granularity in ("auto", "tensor"):
                    pairs = baseline_pairs(path, shape, granularity, args.baseline, args.repeat, args.layers)
                    ratios.append({"shape": text, "granularity": granularity,
                                   "this_s": [round(a[0], 2) for a, _ in pairs], "baseline_s": [round(b[0], 2) for _, b in pairs],
                                   "this_cpu_s": [round(a[1], 2) for a, _ in pairs],
                                   "baseline_cpu_s": [round(b[1], 2) for _, b in pairs],
                                   "speedup_median": round(statistics.median(b[0] / a[0] for a, b in pairs), 2),
                                   "cpu_speedup_median": round(statistics.median(b[1] / a[1] for a, b in pairs), 2)})
            path.unlink()
    print("| shape | stage | wall s | CPU s | weights/s/core | peak memory / weight bytes |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['stage']} | {r['seconds']} | {r['cpu_seconds']} | {r['weights_per_s_core'] / 1e6:.1f}M | "
              f"{r.get('peak_over_weight', '')} |")
    if ratios:
        print("\n| shape | granularity | this wall s | baseline wall s | this CPU s | baseline CPU s "
              "| baseline / this, wall | baseline / this, CPU (medians of pairs) |")
        print("|---|---|---|---|---|---|---|---|")
        for r in ratios:
            print(f"| {r['shape']} | {r['granularity']} | {r['this_s']} | {r['baseline_s']} | {r['this_cpu_s']} | "
                  f"{r['baseline_cpu_s']} | {r['speedup_median']}x | {r['cpu_speedup_median']}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"stages": rows, "baseline": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
