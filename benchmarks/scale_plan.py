"""Expected wall time of `share` on N nodes of M cores, from measured figures (docs/scale.md).

The per-weight work is independent, so the run is a pipeline of three streams, and its wall time is
that of the slowest, plus start-up:

  compute  W / (N * M * T * e)           T weights/s on one core (bench_share_speed.py), e the
                                         parallel efficiency of M workers on one node (measured
                                         jobs-2 speed-up / 2 on this machine, or given)
  read     4 W / min(N * r, R)           each worker reads its float32 weight by offset: r bytes/s
                                         a node reads, R the shared filesystem's total
  driver   b W / d + b W / w             the driver receives every encoded weight (b bytes a weight:
                                         1 for 5-8-bit codes in uint8, 0.5 for 4-bit) over its link
                                         d and writes it (w); serial, on one machine
  memory   per worker: m0 + f * (largest weight's float32 bytes), f measured with tracemalloc

    python benchmarks/scale_plan.py --stages stages.json            # T and f from bench_share_speed.py --json
    python benchmarks/scale_plan.py --throughput 6e6 --factor 9 --efficiency 0.8
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# (parameters, largest single weight in elements): LLaMA-2-7B (embeddings 32000 x 4096) and
# LLaMA-2-70B (embeddings 32000 x 8192; the FFN matrices are 8192 x 28672)
MODELS = {"7B": (6.74e9, 32000 * 4096), "70B": (68.98e9, 32000 * 8192)}
CLUSTERS = [(1, 2), (1, 16), (1, 64), (4, 16), (8, 64), (32, 64)]


def plan(weights: float, largest: int, nodes: int, cores: int, *, throughput: float, efficiency: float,
         node_read: float, fs_total: float, driver_net: float, driver_disk: float, code_bytes: float,
         startup: float, base_mb: float, factor: float) -> dict:
    compute = weights / (nodes * cores * throughput * efficiency)
    read = 4 * weights / min(nodes * node_read, fs_total)
    driver = code_bytes * weights / driver_net + code_bytes * weights / driver_disk if nodes > 1 else \
        code_bytes * weights / driver_disk
    parts = {"compute": compute, "read": read, "driver": driver}
    bottleneck = max(parts, key=parts.get)
    worker_mb = base_mb + factor * largest * 4 / 2**20
    return {"wall_s": startup + max(parts.values()), **{f"{k}_s": v for k, v in parts.items()},
            "bottleneck": bottleneck, "worker_mb": worker_mb, "node_mb": worker_mb * cores}


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", help="JSON written by bench_share_speed.py --json (T and f from its rows)")
    parser.add_argument("--stage", default="share auto", help="which stage's weights/s/core is T")
    parser.add_argument("--throughput", type=float, help="T: weights per second on one core")
    parser.add_argument("--factor", type=float, help="f: peak task memory / the weight's float32 bytes")
    parser.add_argument("--efficiency", type=float, default=0.8, help="e: throughput of M workers / (M x one)")
    parser.add_argument("--node-read", type=float, default=500e6, help="r: bytes/s one node reads (NVMe-backed NFS)")
    parser.add_argument("--fs-total", type=float, default=5e9, help="R: bytes/s of the shared filesystem in total")
    parser.add_argument("--driver-net", type=float, default=1.25e9, help="d: driver's link, bytes/s (10 GbE)")
    parser.add_argument("--driver-disk", type=float, default=1e9, help="w: driver's write, bytes/s")
    parser.add_argument("--code-bytes", type=float, default=1.0, help="b: output bytes per weight")
    parser.add_argument("--startup", type=float, default=30.0, help="s: seconds to start Ray and load the graph")
    parser.add_argument("--base-mb", type=float, default=300.0, help="m0: a worker's own resident MB")
    args = parser.parse_args()
    throughput, factor = args.throughput, args.factor
    if args.stages:
        found = json.loads(Path(args.stages).read_text())
        rows = [r for r in found["stages"] if r["stage"] == args.stage]
        if not rows:
            print(f"scale_plan: no '{args.stage}' rows in {args.stages}", file=sys.stderr)
            return 2
        largest = max(rows, key=lambda r: r["elements"])
        throughput = throughput or largest["weights_per_s_core"]
        factor = factor or largest.get("peak_over_weight")
    if not throughput or not factor:
        print("scale_plan: give --stages, or --throughput and --factor", file=sys.stderr)
        return 2
    print(f"T = {throughput / 1e6:.1f}M weights/s/core, e = {args.efficiency}, f = {factor:.1f}, "
          f"r = {args.node_read / 1e6:.0f} MB/s/node, R = {args.fs_total / 1e9:.1f} GB/s, "
          f"d = {args.driver_net / 1e9:.2f} GB/s, w = {args.driver_disk / 1e9:.1f} GB/s, b = {args.code_bytes} B/weight\n")
    print("| model | nodes x cores | wall | compute | read | driver | bottleneck | MB per worker | GB per node |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (weights, largest) in MODELS.items():
        for nodes, cores in CLUSTERS:
            p = plan(weights, largest, nodes, cores, throughput=throughput, efficiency=args.efficiency,
                     node_read=args.node_read, fs_total=args.fs_total, driver_net=args.driver_net,
                     driver_disk=args.driver_disk, code_bytes=args.code_bytes, startup=args.startup,
                     base_mb=args.base_mb, factor=factor)
            print(f"| {name} | {nodes} x {cores} | {_hours(p['wall_s'])} | {_hours(p['compute_s'])} | "
                  f"{_hours(p['read_s'])} | {_hours(p['driver_s'])} | {p['bottleneck']} | {p['worker_mb']:.0f} | "
                  f"{p['node_mb'] / 1024:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
