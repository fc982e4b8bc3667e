"""Scale benchmark: compress synthetic models of about 0.5, 1 and 3 GB of float32 weights.

Each model is a stack of MatMul+Relu layers (width --width, He-initialised random weights)
written with external data straight to disk, one weight at a time, in a temporary folder that
is deleted at the end (never committed). Every compression runs as its own `onnxcompress
compress ... --validate none` subprocess; the table reports per run:

  wall        seconds of the whole command (load, passes, save)
  CPU         user + system seconds of the command and its worker processes
  peak RSS    the largest resident set of any one process of the run (wait4 ru_maxrss)
  tree PSS    the largest sum of proportional set sizes of the command and its workers (pages
              shared after fork counted once), sampled every 0.1 s
  weights/s   weights compressed per second, and the float MB per second
  same        whether the output files are byte-identical to the output of the first --jobs value

Validation in onnxruntime (which must hold both models dense) is measured separately with
`onnxcompress validate` on the files on disk (--validate-size).

    python benchmarks/bench_scale.py                        # 0.5, 1, 3 GB; share, deep-compression; jobs 1, 2
    python benchmarks/bench_scale.py --sizes 0.5 --recipes share --jobs 1
    python benchmarks/bench_scale.py --sizes 3 --recipes share --jobs 1,2 --ray 2 --baseline /path/to/main

--ray N adds a run with `--executor ray --jobs N` (a local Ray instance of N CPUs). --repeat R runs the whole
list of runs R times in turn (A B A B ...), and with --ray prints each pair's ratio of Ray's wall time to the
--jobs N run's just before it, and their median: the machine's load drifts, pairs keep the comparison fair.

    python benchmarks/bench_scale.py --sizes 3 --recipes share --jobs 2 --ray 2 --repeat 3   # issue 18's Ray bar

--baseline PATH runs
each --jobs value a second time, right after this checkout's run, with the onnxcompress package of
PATH (e.g. the main branch's checkout): the "code" column says which, and the speedup is the ratio of
the paired wall times (the machine's load drifts; pairs keep the comparison fair).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxcompress.graph.edit import all_tensors

GB = 1e9
# the built-in recipes with one codebook per tensor (Deep Compression's k-means), which costs one
# k-means per weight instead of the several candidates granularity "auto" fits and measures
VARIANTS = {
    "share-tensor": "name: share-tensor\npasses:\n  - share: {granularity: tensor}\n",
    "deep-compression-tensor": "name: deep-compression-tensor\nform: packed\npasses:\n  - prune\n"
                               "  - share: {granularity: tensor}\n  - sparse\n  - entropy\n",
}


def build_model(path: Path, target_bytes: float, width: int, seed: int = 0) -> int:
    """Write a MatMul stack of ~target_bytes float32 weights with external data; returns the layer count."""
    layers = max(1, round(target_bytes / (width * width * 4)))
    rng = np.random.default_rng(seed)
    data_name = path.name + ".data"
    nodes, inits, current = [], [], "x"
    with open(path.parent / data_name, "wb") as data:
        for i in range(layers):
            weight = (rng.standard_normal((width, width), dtype=np.float32) * np.float32(np.sqrt(2.0 / width)))
            offset = data.tell()
            data.write(weight.tobytes())
            tensor = TensorProto(name=f"layer{i}.weight", data_type=TensorProto.FLOAT, dims=[width, width],
                                 data_location=TensorProto.EXTERNAL)
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(weight.nbytes))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            inits.append(tensor)
            out = "y" if i == layers - 1 else f"h{i}"
            nodes.append(helper.make_node("MatMul", [current, tensor.name], [out], name=f"layer{i}"))
            current = out
            if i < layers - 1:
                nodes.append(helper.make_node("Relu", [out], [f"r{i}"], name=f"relu{i}"))
                current = f"r{i}"
    graph = helper.make_graph(nodes, "scale", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    path.write_bytes(model.SerializeToString())
    return layers


def _tree_rss(pid: int) -> int:
    """Sum of the proportional set sizes (bytes; pages shared after fork counted once) of `pid` and descendants."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next((int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:")), 0)
            with open(f"/proc/{p}/task/{p}/children") as f:
                stack.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            continue
    return total


def measure(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run `cmd` (in `cwd`, so `python -m` imports the package PYTHONPATH names, not the current folder's);
    wall seconds, exit code, peak single-process RSS and peak sampled tree RSS."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    peak_tree = 0
    done = threading.Event()

    def sample():
        nonlocal peak_tree
        while not done.is_set():
            peak_tree = max(peak_tree, _tree_rss(proc.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    # the command runs under WRAPPER, which prints the ru_maxrss of its own child as JSON
    wall = time.perf_counter() - start
    result = {"wall_s": wall, "rc": proc.returncode, "peak_tree_rss_mb": peak_tree / 2**20,
              "stderr": err.strip().splitlines()[-1] if err.strip() else ""}
    try:
        result.update(json.loads(out.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        pass
    return result


WRAPPER = r"""
import json, os, resource, subprocess, sys
rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"peak_rss_mb": usage.ru_maxrss / 1024, "cpu_s": usage.ru_utime + usage.ru_stime, "child_rc": rc}))
sys.exit(rc)
"""


def digest(path: Path) -> str:
    """SHA-256 of the model (its external-data file name blanked: outputs are named per run) and its data."""
    model = onnx.load(str(path), load_external_data=False)
    for tensor in all_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "data"
    h = hashlib.sha256(model.SerializeToString(deterministic=True))
    data = path.with_name(path.name + ".data")
    if data.exists():
        with open(data, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def importable_copy(checkout: Path, dest: Path) -> Path:
    """A copy of a checkout's onnxcompress/ with its passes/ inside (onnxcompress.passes), importable from
    `dest` by PYTHONPATH whatever onnxcompress is installed; returns dest."""
    shutil.copytree(checkout / "onnxcompress", dest / "onnxcompress")
    shutil.copytree(checkout / "passes", dest / "onnxcompress" / "passes")
    return dest


def _ray_pairs(rows: list[dict]) -> None:
    """Each Ray run's wall time over that of the local run of the same --jobs just before it, and their median."""
    ratios = []
    for i, r in enumerate(rows):
        local = next((m for m in reversed(rows[:i]) if m.get("executor") == "local" and m["jobs"] == r["jobs"]
                      and (m["size_gb"], m["recipe"]) == (r["size_gb"], r["recipe"])), None)
        if r.get("executor") == "ray" and r["ok"] and local and local["ok"]:
            ratios.append(r["wall_s"] / local["wall_s"])
            print(f"pair {len(ratios)}, {r['size_gb']} GB {r['recipe']}: Ray {r['wall_s']} s / --jobs {r['jobs']} "
                  f"{local['wall_s']} s = {ratios[-1]:.3f}x")
    if ratios:
        print(f"Ray / --jobs: median {float(np.median(ratios)):.3f}x of {len(ratios)} pairs")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.5,1,3", help="GB of weights per model (comma-separated)")
    parser.add_argument("--recipes", default="share,deep-compression",
                        help="recipes (built-in names, .yaml files, or " + ", ".join(VARIANTS) + "); absent built-ins are skipped")
    parser.add_argument("--jobs", default="1,2", help="--jobs values to run")
    parser.add_argument("--width", type=int, default=2048, help="layer width: each weight is width x width float32")
    parser.add_argument("--folder", help="work folder (default: a temporary folder, deleted at the end)")
    parser.add_argument("--validate-size", type=float, default=None,
                        help="also time `onnxcompress validate` of the first recipe's output at this size")
    parser.add_argument("--json", help="also write the rows as JSON here")
    parser.add_argument("--ray", type=int, default=0, metavar="N", help="also run --executor ray --jobs N")
    parser.add_argument("--baseline", metavar="PATH", help="also run each --jobs value with the onnxcompress of PATH")
    parser.add_argument("--repeat", type=int, default=1, metavar="R", help="run the list of runs R times, in turn")
    args = parser.parse_args()

    from onnxcompress.recipes import BUILTIN

    sizes = [float(s) for s in args.sizes.split(",")]
    jobs_list = [int(j) for j in args.jobs.split(",")]
    folder = Path(args.folder or tempfile.mkdtemp(prefix="onnxcompress-scale-"))
    folder.mkdir(parents=True, exist_ok=True)
    recipes = []
    for r in args.recipes.split(","):
        if r in VARIANTS:
            path = folder / f"{r}.yaml"
            path.write_text(VARIANTS[r])
            recipes.append(str(path))
        elif r in BUILTIN or r.endswith((".yaml", ".yml")):
            recipes.append(r)
        else:
            print(f"skipping recipe '{r}': not built in", file=sys.stderr)
    free = shutil.disk_usage(folder).free
    print(f"free disk: {free / GB:.1f} GB", file=sys.stderr)
    baseline = str(importable_copy(Path(args.baseline), folder / "baseline")) if args.baseline else None
    wrapper = folder / "wrap.py"
    wrapper.write_text(WRAPPER)
    rows = []
    try:
        for size in sizes:
            model = folder / f"scale_{size:g}gb.onnx"
            start = time.perf_counter()
            layers = build_model(model, size * GB, args.width)
            weight_bytes = layers * args.width * args.width * 4
            print(f"built {model.name}: {layers} layers, {weight_bytes / GB:.2f} GB in "
                  f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
            runs = [("this", "local", j) for j in jobs_list]
            if args.baseline:  # each right after this checkout's run with the same jobs
                runs = [run for j in jobs_list for run in (("this", "local", j), ("baseline", "local", j))]
            if args.ray:
                runs.append(("this", "ray", args.ray))
            runs = runs * max(args.repeat, 1)
            for recipe in recipes:
                reference = None
                for code, executor, jobs in runs:
                    out = folder / f"out_{size:g}_{Path(recipe).stem}_j{jobs}_{code}_{executor}.onnx"
                    cmd = [sys.executable, str(wrapper), sys.executable, "-m", "onnxcompress.cli", "compress",
                           str(model), "-o", str(out), "--recipe", recipe, "--validate", "none", "--jobs", str(jobs),
                           "-q"] + (["--executor", "ray"] if executor == "ray" else [])
                    root = baseline if code == "baseline" else str(Path(__file__).resolve().parent.parent)
                    r = measure(cmd, env=dict(os.environ, PYTHONPATH=root), cwd=folder)
                    ok = r["rc"] == 0
                    this = digest(out) if ok else None
                    reference = reference or this
                    out_bytes = sum(p.stat().st_size for p in (out, out.with_name(out.name + ".data")) if p.exists())
                    row = {"size_gb": round(weight_bytes / GB, 2), "layers": layers, "recipe": recipe, "jobs": jobs,
                           "code": code, "executor": executor, "ok": ok, "wall_s": round(r["wall_s"], 1), "cpu_s": round(r.get("cpu_s", 0), 1),
                           "peak_rss_mb": round(r.get("peak_rss_mb", 0)), "tree_rss_mb": round(r["peak_tree_rss_mb"]),
                           "weights_per_s": round(layers / r["wall_s"], 2),
                           "mb_per_s": round(weight_bytes / 2**20 / r["wall_s"], 1),
                           "out_mb": round(out_bytes / 2**20, 1), "same_as_first": this == reference if ok else None,
                           "error": None if ok else r["stderr"], "digest": this}
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
                if args.validate_size == size and reference:
                    out = folder / f"out_{size:g}_{Path(recipe).stem}_j{jobs_list[0]}_this_local.onnx"
                    cmd = [sys.executable, str(wrapper), sys.executable, "-m", "onnxcompress.cli", "validate",
                           str(model), str(out)]
                    r = measure(cmd)
                    row = {"size_gb": round(weight_bytes / GB, 2), "layers": layers, "recipe": f"validate {recipe}",
                           "jobs": "-", "ok": r["rc"] == 0, "wall_s": round(r["wall_s"], 1),
                           "cpu_s": round(r.get("cpu_s", 0), 1),
                           "peak_rss_mb": round(r.get("peak_rss_mb", 0)), "tree_rss_mb": round(r["peak_tree_rss_mb"]),
                           "weights_per_s": None, "mb_per_s": None, "out_mb": None, "same_as_first": None,
                           "error": None if r["rc"] == 0 else r["stderr"]}
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
                for p in folder.glob(f"out_{size:g}_{Path(recipe).stem}_*"):
                    p.unlink()
            for p in folder.glob(f"scale_{size:g}gb.onnx*"):
                p.unlink()
    finally:
        if not args.folder:
            shutil.rmtree(folder, ignore_errors=True)
    header = ("| GB | layers | recipe | code | executor | jobs | wall s | CPU s | peak RSS MB | tree PSS MB | weights/s "
              "| MB/s | out MB | same as first run |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        status = "" if r["ok"] else f" FAILED: {r['error']}"
        print(f"| {r['size_gb']} | {r['layers']} | {r['recipe']} | {r.get('code', '-')} | {r.get('executor', '-')} | "
              f"{r['jobs']} | {r['wall_s']} | {r['cpu_s']} | "
              f"{r['peak_rss_mb']} | {r['tree_rss_mb']} | {r['weights_per_s']} | {r['mb_per_s']} | {r['out_mb']} | "
              f"{r['same_as_first']}{status} |")
    for r in rows:  # paired speedups: the baseline's wall time over this checkout's, same size, recipe and jobs
        if r.get("code") == "baseline" and r["ok"]:
            mine = next((m for m in rows if m.get("code") == "this" and m.get("executor") == "local" and m["ok"]
                         and (m["size_gb"], m["recipe"], m["jobs"]) == (r["size_gb"], r["recipe"], r["jobs"])), None)
            if mine:
                print(f"speedup {r['size_gb']} GB {r['recipe']} jobs {r['jobs']}: {r['wall_s'] / mine['wall_s']:.2f}x "
                      f"({r['wall_s']} s -> {mine['wall_s']} s)")
    _ray_pairs(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
