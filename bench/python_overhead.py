#!/usr/bin/env python3
"""Per-call overhead of ufa's Python layer on a tiny problem, against PyTorch's SDPA.

The problem (batch 1, heads 1, seqlen 16, head_dim 64, float32, CPU) is so small that the
attention itself costs well under a microsecond per row block: what is measured is the cost of a
call — argument checks, DLPack import, output allocation, releasing the GIL, dispatch — next to
calling torch.nn.functional.scaled_dot_product_attention on the same tensors. The aim (#21):
ufa's SDPA within 1.2x of PyTorch's time, with and without inputs that require grad.

Each variant is timed as the median over --repeats of the mean of --calls back-to-back calls;
the variants are interleaved round by round so that machine noise hits them alike.

With --device cuda the same calls run on CUDA tensors (float16, the GPU kernels' dtype); the
problem is launch-bound there, so the table shows the host-side cost of each call; each round
ends with a synchronisation so queued work is counted.

Usage: python bench/python_overhead.py [--calls 2000] [--repeats 15] [--device cpu|cuda]
                                       [--out FILE.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import ufa
import ufa.torch as ut
from results_files import cpu_name
from ufa import _ufa


def _timed_core(q, k, v, out, calls, sync) -> float:
    t0 = time.perf_counter()
    _ufa._bench_core(q, k, v, out, calls)
    sync()
    return (time.perf_counter() - t0) / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=None, help="write a markdown table here")
    args = ap.parse_args()

    b, h, s, d = 1, 1, 16, 64
    dev = args.device
    dtype = torch.float32 if dev == "cpu" else torch.float16
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, device=dev, dtype=dtype) for _ in range(3))  # [B,H,S,D]
    qb, kb, vb = (t.transpose(1, 2) for t in (q, k, v))  # ufa layout views [B, S, H, D]
    qn, kn, vn = (t.contiguous().cpu().numpy() for t in (qb, kb, vb))
    out_t = torch.empty(b, s, h, d, device=dev, dtype=dtype)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    go = torch.randn_like(q)  # the output's gradient for the forward + backward rows

    variants = {
        "torch F.scaled_dot_product_attention": lambda: F.scaled_dot_product_attention(q, k, v),
        "ufa.torch.scaled_dot_product_attention": lambda: ut.scaled_dot_product_attention(q, k, v),
        "ufa.torch.flash_attn_func": lambda: ut.flash_attn_func(qb, kb, vb),
        "ufa.attention (torch)": lambda: ufa.attention(qb, kb, vb),
        "ufa.attention (torch, out=)": lambda: ufa.attention(qb, kb, vb, out=out_t),
        "ufa._ufa.forward (raw, out given)": lambda: _ufa.forward(qb, kb, vb, out_t),
        "torch SDPA, inputs require grad": lambda: F.scaled_dot_product_attention(qg, kg, vg),
        "ufa SDPA, inputs require grad (autograd.Function)":
            lambda: ut.scaled_dot_product_attention(qg, kg, vg),
        "torch SDPA forward + backward": lambda: F.scaled_dot_product_attention(
            qg, kg, vg).backward(go),
        "ufa SDPA forward + backward": lambda: ut.scaled_dot_product_attention(
            qg, kg, vg).backward(go),
    }
    if dev == "cpu":
        variants["ufa.attention (NumPy)"] = lambda: ufa.attention(qn, kn, vn)
    for fn in variants.values():  # warm up (thread pools, op registration, caches)
        for _ in range(200):
            fn()

    samples = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            for _ in range(args.calls):
                fn()
            sync()
            samples[name].append((time.perf_counter() - t0) / args.calls)
    med = {name: statistics.median(x) for name, x in samples.items()}
    core = statistics.median(_timed_core(qb, kb, vb, out_t, args.calls, sync)
                             for _ in range(args.repeats))
    imp_t = statistics.median(_ufa._bench_import(q, args.calls * 10) for _ in range(5))
    imp_n = statistics.median(_ufa._bench_import(qn, args.calls * 10) for _ in range(5))
    sync()
    base = med["torch F.scaled_dot_product_attention"]
    base_grad = med["torch SDPA, inputs require grad"]

    info = ufa.info()
    lines = [
        "# Python per-call overhead: ufa vs PyTorch SDPA",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- machine: {cpu_name()}, {os.cpu_count()} logical CPUs; {platform.system()} "
        f"{platform.machine()}",
        f"- software: Python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} intra-op threads), numpy {np.__version__}, ufa "
        f"{ufa.__version__} (CPU kernels {info['cpu_isa']}, {info['num_threads']} threads)",
        f"- problem: batch {b}, heads {h}, seqlen {s}, head_dim {d}, {str(dtype)[6:]}, "
        f"{dev.upper()}{' (' + torch.cuda.get_device_name() + ')' if dev == 'cuda' else ''}, "
        "not causal",
        f"- command: `python bench/python_overhead.py --calls {args.calls} --repeats "
        f"{args.repeats} --device {dev}`",
        f"- method: median over {args.repeats} rounds of the mean time of {args.calls} "
        "back-to-back calls; variants interleaved",
        f"- load: {os.getloadavg()[0]:.1f} (1-minute load average at the end; the machine is "
        "shared, so absolute times are noisy, ratios less so)",
        "",
        "| call | µs per call | vs torch SDPA |",
        "| --- | ---: | ---: |",
    ]
    for name, t in med.items():
        ref = (med["torch SDPA forward + backward"] if "backward" in name
               else base_grad if "require grad" in name else base)
        lines.append(f"| {name} | {t * 1e6:.2f} | {t / ref:.2f}x |")
    lines += [
        "",
        "Rows with inputs that require grad compare against PyTorch's SDPA with inputs that "
        "require grad (autograd graph recording on both sides; ufa goes through its "
        "autograd.Function in eager mode; the `torch.library` custom ops are what torch.compile "
        "traces). The forward + backward rows call `.backward()` on the output each time "
        "(the inputs' gradients accumulate alike on both sides).",
        "",
        "Where the time goes (timed inside the extension, no Python in the loop):",
        "",
        "| part | µs per call |",
        "| --- | ---: |",
        f"| core alone: `Context::forward` on imported views (default stream) | {core * 1e6:.2f} |",
        f"| DLPack import of one torch tensor (C exchange API) | {imp_t * 1e6:.3f} |",
        f"| DLPack import of one NumPy array (`__dlpack__` capsule) | {imp_n * 1e6:.3f} |",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    ratio = med["ufa.torch.scaled_dot_product_attention"] / base
    ratio_grad = med["ufa SDPA, inputs require grad (autograd.Function)"] / base_grad
    print(f"ufa SDPA / torch SDPA = {ratio:.2f}x, with grad {ratio_grad:.2f}x (aim: <= 1.2x)",
          file=sys.stderr)


if __name__ == "__main__":
    main()
