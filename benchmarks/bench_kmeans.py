"""onnxcompress.numerics.kmeans.kmeans_1d against scikit-learn's KMeans on weight-like data.

Data: a seeded float32 mixture, 90% normal(0, 0.05) + 10% laplace(0, 0.1), of 1M and 10M
values.  Both sides start from the same linear init (k points evenly spaced between min and max)
and run plain Lloyd (scikit-learn: n_init=1, algorithm="lloyd", default tol and max_iter) on the
same data.  Reports wall time, the time ratio sklearn/ours, the MSE of each and ours/sklearn.

    python benchmarks/bench_kmeans.py            # 1M and 10M values, k in {16, 32, 256}
    python benchmarks/bench_kmeans.py --quick    # 1M values only
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from onnxcompress.numerics.kmeans import kmeans_1d, quantization_mse  # noqa: E402

# scikit-learn cells whose projected time exceeds this are skipped with a note.
SKLEARN_BUDGET_S = 300.0


def weight_like(n: int, seed: int = 0) -> np.ndarray:
    """Seeded mixture: 90% normal(0, 0.05) + 10% laplace(0, 0.1), float32."""
    rng = np.random.default_rng(seed)
    pick = rng.random(n) < 0.9
    x = np.where(pick, rng.normal(0.0, 0.05, n), rng.laplace(0.0, 0.1, n))
    return x.astype(np.float32)


def linear_init(x: np.ndarray, k: int) -> np.ndarray:
    """Han et al.'s linear init: k points evenly spaced in [min, max] (what kmeans_1d uses)."""
    return np.linspace(float(x.min()), float(x.max()), k)


def run_ours(x: np.ndarray, k: int, repeat: int = 3) -> tuple[float, float, int]:
    """Best-of-``repeat`` wall time, MSE and iterations of kmeans_1d."""
    best = np.inf
    for _ in range(repeat):
        t = time.perf_counter()
        r = kmeans_1d(x, k, init="linear")
        best = min(best, time.perf_counter() - t)
    return best, quantization_mse(x, r.centroids, r.labels), r.n_iter


def run_sklearn(x: np.ndarray, k: int, max_iter: int = 300) -> tuple[float, float, int]:
    """Wall time, MSE (recomputed in float64) and iterations of sklearn KMeans, same init."""
    from sklearn.cluster import KMeans

    init = linear_init(x, k).astype(x.dtype).reshape(k, 1)
    km = KMeans(n_clusters=k, init=init, n_init=1, algorithm="lloyd", max_iter=max_iter,
                random_state=0)
    t = time.perf_counter()
    km.fit(x.reshape(-1, 1))
    dt = time.perf_counter() - t
    mse = quantization_mse(x, km.cluster_centers_.ravel(), km.labels_)
    return dt, mse, int(km.n_iter_)


def print_header() -> None:
    import sklearn
    from threadpoolctl import threadpool_info

    print(f"python {platform.python_version()}, numpy {np.__version__}, "
          f"scikit-learn {sklearn.__version__}, {platform.machine()}, {os.cpu_count()} CPUs")
    if hasattr(os, "getloadavg"):  # other processes skew both timings
        print("load average at start: " + ", ".join(f"{v:.1f}" for v in os.getloadavg()))
    for pool in threadpool_info():
        print(f"threadpool: {pool.get('user_api')} {pool.get('internal_api')} "
              f"num_threads={pool.get('num_threads')} {pool.get('version') or ''}")
    print()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1M values only")
    args = ap.parse_args(argv)
    sizes = [1_000_000] if args.quick else [1_000_000, 10_000_000]
    ks = [16, 32, 256]
    print_header()
    rows, notes = [], []
    iters_at = {}  # (k) -> sklearn iterations at the smallest size, to project larger ones
    for n in sizes:
        x = weight_like(n)
        for k in ks:
            ours_t, ours_mse, ours_it = run_ours(x, k)
            sk = None
            if k in iters_at:  # project from the iteration count at the smaller size
                per_iter = (run_sklearn(x, k, max_iter=3)[0] - run_sklearn(x, k, max_iter=1)[0]) / 2
                projected = max(per_iter, 0.0) * iters_at[k]
                if projected > SKLEARN_BUDGET_S:
                    notes.append(f"n={n:,} k={k}: scikit-learn skipped, projected "
                                 f"{projected:.0f} s ({iters_at[k]} iterations at n=1M x "
                                 f"{per_iter:.2f} s per iteration)")
            if not any(note.startswith(f"n={n:,} k={k}:") for note in notes):
                sk = run_sklearn(x, k)
                iters_at.setdefault(k, sk[2])
            rows.append((n, k, ours_t, ours_it, ours_mse, sk))
            print(f"done n={n:,} k={k}", file=sys.stderr, flush=True)
    print("| n | k | ours (s) | iters | sklearn (s) | iters | time ratio sklearn/ours "
          "| MSE ours | MSE sklearn | MSE ratio ours/sklearn |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, k, t, it, mse, sk in rows:
        if sk is None:
            print(f"| {n:,} | {k} | {t:.3f} | {it} | skipped | - | - | {mse:.4e} | - | - |")
        else:
            st, smse, sit = sk
            print(f"| {n:,} | {k} | {t:.3f} | {it} | {st:.2f} | {sit} | {st / t:.0f}x "
                  f"| {mse:.4e} | {smse:.4e} | {mse / smse:.4f} |")
    for note in notes:
        print(f"\nnote: {note}")
    if hasattr(os, "getloadavg"):
        print("\nload average at end: " + ", ".join(f"{v:.1f}" for v in os.getloadavg()))


if __name__ == "__main__":
    main()
