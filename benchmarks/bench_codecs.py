"""Entropy codecs side by side: raw bit packing, our Huffman, our ANS, and dahuffman.

Run: ``python benchmarks/bench_codecs.py [--n 1000000] [--repeat 3]``

Data: seeded, like k-means codes of weights: a discretized Laplace over 32 symbols (5-bit
codes) and over 256 symbols (8-bit codes). For each codec: bits per symbol against the
empirical entropy, encode and decode time (best of ``--repeat``; dahuffman runs once), decode
throughput in MB/s of the float32 weights the codes stand for (4 bytes per symbol), and the
decode speed-up over dahuffman (pure-Python Huffman, the anchor). Our sizes include every
header byte; dahuffman's exclude its code table, which it does not serialize.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from onnxcompress.formats.codecs import ans, entropy_bits, huffman, raw  # noqa: E402

try:
    from dahuffman import HuffmanCodec
except ImportError:  # pragma: no cover
    HuffmanCodec = None


def laplace_codes(n: int, alphabet: int, scale: float, seed: int) -> np.ndarray:
    """``clip(round(Laplace(0, scale)), -A/2, A/2 - 1) + A/2``: skewed codes in [0, A)."""
    rng = np.random.default_rng(seed)
    half = alphabet // 2
    x = np.clip(np.rint(rng.laplace(0.0, scale, n)), -half, half - 1)
    return (x + half).astype(np.int64)


def best_time(fn, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def bench_ours(name, codec, s, alphabet, repeat):
    enc_t, data = best_time(lambda: codec.encode(s, alphabet), repeat)
    dec_t, out = best_time(lambda: codec.decode(data), repeat)
    assert np.array_equal(out, s), f"{name} round trip failed"
    return dict(method=name, bits=8 * len(data) / s.size, enc=enc_t, dec=dec_t, n=s.size)


def bench_dahuffman(s, n_max):
    sub = s[:n_max].tolist()
    t = time.perf_counter()
    codec = HuffmanCodec.from_data(sub)
    data = codec.encode(sub)
    enc_t = time.perf_counter() - t
    t = time.perf_counter()
    out = codec.decode(data)
    dec_t = time.perf_counter() - t
    assert out == sub, "dahuffman round trip failed"
    label = "dahuffman (pure Python)" + ("" if len(sub) == s.size else f", first {len(sub)}")
    return dict(method=label, bits=8 * len(data) / len(sub), enc=enc_t, dec=dec_t, n=len(sub))


def table(title, s, rows):
    h = entropy_bits(s)
    anchor = next((r for r in rows if r["method"].startswith("dahuffman")), None)
    lines = [f"\n### {title}: n = {s.size:,}, empirical entropy {h:.4f} bits/symbol\n",
             "| codec | bits/symbol | over entropy | encode ms | decode ms | "
             "decode MB/s (float32) | decode speed vs dahuffman |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        over = f"+{100 * (r['bits'] / h - 1):.2f}%" if h > 0 else "-"
        rate = 4 * r["n"] / r["dec"] / 1e6
        speed = "-"
        if anchor is not None:
            speed = f"{(r['n'] / r['dec']) / (anchor['n'] / anchor['dec']):.1f}x"
        lines.append(f"| {r['method']} | {r['bits']:.4f} | {over} | {1e3 * r['enc']:.1f} | "
                     f"{1e3 * r['dec']:.1f} | {rate:.1f} | {speed} |")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="symbols per stream")
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs (ours)")
    ap.add_argument("--dahuffman-max", type=int, default=1_000_000,
                    help="decode at most this many symbols with dahuffman")
    args = ap.parse_args()
    print(f"numpy {np.__version__}, {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    cases = [("5-bit codes, 32 symbols, Laplace b=2", 32, 2.0),
             ("8-bit codes, 256 symbols, Laplace b=12", 256, 12.0)]
    for i, (title, alphabet, scale) in enumerate(cases):
        s = laplace_codes(args.n, alphabet, scale, seed=i)
        rows = [bench_ours(f"raw bitpack ({raw.raw_bits(alphabet)} bits)", raw, s, alphabet,
                           args.repeat),
                bench_ours("onnxcompress Huffman", huffman, s, alphabet, args.repeat),
                bench_ours("onnxcompress ANS (constriction)", ans, s, alphabet, args.repeat)]
        if HuffmanCodec is not None:
            rows.append(bench_dahuffman(s, args.dahuffman_max))
        table(title, s, rows)
    block_sizes(args.repeat)


def block_sizes(repeat: int) -> None:
    """Huffman decode blocks: the rule in use (about sqrt(n) symbols) against sqrt(8 n), per stream length."""
    print("\n### Huffman block size: bytes and decode time, 5-bit Laplace codes\n")
    print("| symbols | rule | block | bytes | decode ms |\n|---:|---|---:|---:|---:|")
    for n in (2_000, 21_000, 200_000, 2_000_000):
        s = laplace_codes(n, 32, 2.0, seed=5)
        old = 1 << min(max(int(round(np.log2(np.sqrt(8 * n)))), 6), 10)
        for label, block in (("sqrt(8 n) (before)", old), ("sqrt(n) (auto_block_size)", huffman.auto_block_size(n))):
            data = huffman.encode(s, 32, block_size=block)
            seconds, out = best_time(lambda: huffman.decode(data), repeat)
            assert np.array_equal(out, s)
            print(f"| {n:,} | {label} | {block} | {len(data):,} | {1e3 * seconds:.2f} |")


if __name__ == "__main__":
    main()
