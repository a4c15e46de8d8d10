#!/usr/bin/env python3
"""Decoding on the CPU from Python as an inference loop calls it: one query token over a KV
cache, in FlashAttention's [batch, seq, heads, dim] layout (ufa's own cache layout, through
`ufa.torch.flash_attn_func`) and in PyTorch's [batch, heads, seq, dim] (through
`ufa.torch.scaled_dot_product_attention`), beside PyTorch's SDPA over the same memory
(`enable_gqa=True`), and beside the machine's read bandwidth measured in the same run.

Decoding reads K and V once, so its measure is the rate at which it reads them. Each round
times every case and then the read bandwidth (a sum over a 1 GiB fp32 tensor on the same
threads: a plain stream); the table gives medians over rounds, and "of read" is the median of
each round's ufa rate over that round's bandwidth, so a machine whose bandwidth drifts (a
shared VM) is compared with itself. Caches that fit in the last-level cache are read from it
after the first call: their rate can exceed the memory's, and they are marked.

Usage: python bench/cpu_decode.py [--threads 2] [--rounds 3] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import timeit

import torch
import torch.nn.functional as F

import ufa
import ufa.torch as ut
from results_files import cpu_name

# (batch, query heads, KV heads, cache length); head_dim 128.
SHAPES = [(1, 32, 8, 1024), (1, 32, 8, 4096), (1, 32, 32, 4096), (4, 32, 8, 2048),
          (8, 32, 8, 4096), (1, 16, 2, 8192)]
LAYOUTS = ("bshd", "bhsd")
DTYPES = (torch.float32, torch.bfloat16)


def best_us(fn, calls: int) -> float:
    for _ in range(2):
        fn()
    return min(timeit.repeat(fn, number=calls, repeat=5)) / calls * 1e6


def read_gbs(x: torch.Tensor) -> float:
    """The rate of a plain read of `x` (a sum), best of 3."""
    x.sum()
    t = min(timeit.repeat(x.sum, number=2, repeat=3)) / 2
    return x.numel() * x.element_size() / t / 1e9


def llc_bytes() -> int:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            size = f.read().strip()
        return int(size[:-1]) * {"K": 1 << 10, "M": 1 << 20}[size[-1]]
    except (OSError, ValueError, KeyError):
        return 0


class Case:
    def __init__(self, layout: str, b: int, hq: int, hkv: int, s: int, dt: torch.dtype):
        d = 128
        self.name = (layout, b, hq, hkv, s, dt)
        if layout == "bshd":
            k, v = (torch.randn(b, s, hkv, d, dtype=dt) for _ in range(2))
            q = torch.randn(b, 1, hq, d, dtype=dt)
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
            self.ufa = lambda: ut.flash_attn_func(q, k, v)
        else:
            k, v = (torch.randn(b, hkv, s, d, dtype=dt) for _ in range(2))
            qt, kt, vt = torch.randn(b, hq, 1, d, dtype=dt), k, v
            self.ufa = lambda: ut.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
        self.torch = lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
        self.bytes = 2 * k.numel() * k.element_size()
        # About 20 ms a repeat at 20 GB/s.
        self.calls = max(3, int(0.02 * 20e9 / self.bytes))
        self.rows = []  # (ufa us, torch us, read GB/s) a round

    def measure(self):
        t_ufa = best_us(self.ufa, self.calls)
        t_torch = best_us(self.torch, self.calls)
        return t_ufa, t_torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None, help="write a markdown table here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("UFA_NUM_THREADS", str(args.threads))
    torch.manual_seed(0)
    cases = [Case(layout, *shape, dt) for shape in SHAPES for layout in LAYOUTS for dt in DTYPES]
    stream = torch.ones(256 << 20)  # 1 GiB
    reads = []
    for r in range(args.rounds):
        times = [c.measure() for c in cases]
        gbs = read_gbs(stream)
        reads.append(gbs)
        for c, (t_ufa, t_torch) in zip(cases, times):
            c.rows.append((t_ufa, t_torch, gbs))
        print(f"round {r + 1}/{args.rounds}: read {gbs:.1f} GB/s", flush=True)
    llc = llc_bytes()
    lines = [
        "# CPU decoding from Python: ufa vs PyTorch SDPA, and vs the machine's read bandwidth",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- machine: {cpu_name()}, {os.cpu_count()} logical CPUs, {args.threads} threads each",
        f"- software: torch {torch.__version__}, ufa {ufa.__version__} "
        f"(CPU kernels {ufa.info()['cpu_isa']})",
        f"- command: `python bench/cpu_decode.py --threads {args.threads} --rounds {args.rounds}`",
        "- method: per round, best of 5 repeats of back-to-back calls for every case, then the "
        "read bandwidth (sum of a 1 GiB fp32 tensor); medians over rounds; head_dim 128, one "
        "query token; \"of read\" = ufa's rate over the same round's read bandwidth",
        f"- read bandwidth by round (GB/s): {', '.join(f'{g:.1f}' for g in reads)}",
        "",
        "| layout | batch | heads q/kv | cache | dtype | ufa µs | torch µs | ratio | ufa GB/s "
        "| of read |",
        "| --- | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in cases:
        layout, b, hq, hkv, s, dt = c.name
        t_ufa = statistics.median(r[0] for r in c.rows)
        t_torch = statistics.median(r[1] for r in c.rows)
        gbs = c.bytes / (t_ufa * 1e-6) / 1e9
        frac = statistics.median(c.bytes / (r[0] * 1e-6) / 1e9 / r[2] for r in c.rows)
        cached = " (fits in LLC)" if c.bytes <= llc else ""
        lines.append(
            f"| {layout} | {b} | {hq}/{hkv} | {s}{cached} | {str(dt)[6:]} | {t_ufa:.1f} | "
            f"{t_torch:.1f} | {t_torch / t_ufa:.2f}x | {gbs:.1f} | {frac:.0%} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
