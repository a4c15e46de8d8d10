#!/usr/bin/env python3
"""Decoding on the CPU from Python as an inference loop calls it: one query token over a KV
cache in FlashAttention's [batch, seq, heads, dim] layout (ufa's own cache layout), through
`ufa.torch.flash_attn_func`, beside PyTorch's SDPA on [batch, heads, seq, dim] views of the same
memory (`enable_gqa=True`), in the same run. Reports microseconds per call, the ratio (PyTorch's
time over ufa's) and the rate at which ufa reads the cache (K and V once; caches that fit in the
last-level cache are read from it after the first call, so their rate can exceed the memory's).

Usage: python bench/cpu_decode.py [--threads 2] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import timeit

import torch
import torch.nn.functional as F

import ufa
import ufa.torch as ut
from results_files import cpu_name

# (batch, query heads, KV heads, cache length); head_dim 128.
SHAPES = [(1, 32, 8, 1024), (1, 32, 8, 4096), (1, 32, 32, 4096), (4, 32, 8, 2048),
          (1, 16, 2, 8192)]


def best_us(fn, calls: int) -> float:
    for _ in range(3):
        fn()
    return min(timeit.repeat(fn, number=calls, repeat=5)) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write a markdown table here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("UFA_NUM_THREADS", str(args.threads))
    d = 128
    lines = [
        "# CPU decoding from Python: ufa vs PyTorch SDPA over a [B, S, H, D] cache",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- machine: {cpu_name()}, {os.cpu_count()} logical CPUs, {args.threads} threads each",
        f"- software: torch {torch.__version__}, ufa {ufa.__version__} "
        f"(CPU kernels {ufa.info()['cpu_isa']})",
        f"- command: `python bench/cpu_decode.py --threads {args.threads}`",
        "- method: best of 5 repeats of back-to-back calls; head_dim 128, one query token",
        "",
        "| batch | heads q/kv | cache | dtype | ufa µs | torch µs | ratio | ufa GB/s |",
        "| ---: | --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for b, hq, hkv, s in SHAPES:
        for dt in (torch.float32, torch.bfloat16):
            k = torch.randn(b, s, hkv, d, dtype=dt)
            v = torch.randn(b, s, hkv, d, dtype=dt)
            q = torch.randn(b, 1, hq, d, dtype=dt)
            calls = max(10, int(2e5 / (b * s * hkv / 8)))
            t_ufa = best_us(lambda: ut.flash_attn_func(q, k, v), calls)
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
            t_torch = best_us(lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True),
                              calls)
            gbs = 2 * k.numel() * k.element_size() / (t_ufa * 1e-6) / 1e9
            row = (f"| {b} | {hq}/{hkv} | {s} | {str(dt)[6:]} | {t_ufa:.1f} | {t_torch:.1f} | "
                   f"{t_torch / t_ufa:.2f}x | {gbs:.1f} |")
            print(row, flush=True)
            lines.append(row)
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
