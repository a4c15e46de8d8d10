#!/usr/bin/env python3
"""One attention layer of a training step as a model calls it, ufa (``ufa.torch.patched()``)
beside PyTorch's SDPA in one process: q, k and v are views of one packed projection
``[B, S, 3, H, D]`` (as GPT-style models make them), the output is reshaped back to
``[B, S, H*D]``, and the backward runs through autograd into the projection's gradient. Times
the forward alone and forward + backward (CUDA events, or wall time on the CPU), alternating
the two sides for --rounds rounds, and prints medians and ratios.

This is what a user's step pays for attention, not the kernels alone (``gpu_bench``): on an
H100 (2026-12-06, 8 x 2048, 12 heads, d64, causal, bf16) ufa's backward kernel alone ran
1.09-1.14x cuDNN's, yet the GPT step of bench/gpt_step.py, whose attention calls have this
shape, ran 0.96x PyTorch's. ``ufa.torch.patched()`` is entered once a round, outside the
timed calls, as a training loop enters it.

Usage: python3 bench/attention_step.py [--batch 8 --seqlen 2048 --heads 12 --head-dim 64]
       [--causal 1] [--dtype bf16] [--device cuda] [--iters 20] [--rounds 3] [--profile 0]

--profile N: after the timings, N forward + backward calls of each side under torch.profiler,
and each side's kernels and copies by device time (CUPTI sees ufa's own launches on PyTorch's
stream too): where the two sides' time differs, kernel by kernel.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import ufa.torch as ut


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--causal", type=int, default=1)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", type=int, default=0)
    a = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    b, s, h, d = a.batch, a.seqlen, a.heads, a.head_dim
    dev = torch.device(a.device)
    x = torch.randn(b, s, 3, h, d, device=dev, dtype=dtype, requires_grad=True)
    grad = torch.randn(b, s, h * d, device=dev, dtype=dtype)

    def layer(backward):
        q, k, v = x.permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=bool(a.causal))
        y = y.transpose(1, 2).reshape(b, s, h * d)
        if backward:
            y.backward(grad)
            x.grad = None

    def timed(use_ufa, backward):
        if use_ufa:
            with ut.patched():
                return timed_calls(backward)
        return timed_calls(backward)

    def timed_calls(backward):
        def call():
            layer(backward)
        for _ in range(3):
            call()
        times = []
        for _ in range(a.iters):
            if dev.type == "cuda":
                start, end = torch.cuda.Event(True), torch.cuda.Event(True)
                start.record()
                call()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e3)
            else:
                t0 = time.perf_counter()
                call()
                times.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(times)

    results = {}
    for _ in range(a.rounds):
        for backward in (False, True):
            for use_ufa in (True, False):
                results.setdefault((use_ufa, backward), []).append(timed(use_ufa, backward))
    ut.reset_fallback_stats()
    with ut.patched():
        layer(True)
    print(f"{dev} {a.dtype} B{b} S{s} H{h} D{d} causal {a.causal}, q/k/v views of a packed "
          f"projection; medians of {a.iters} calls, {a.rounds} alternated rounds (us); "
          f"ufa fallbacks {ut.fallback_stats()}")
    for backward, name in ((False, "forward"), (True, "forward+backward")):
        u, t = results[(True, backward)], results[(False, backward)]
        print(f"{name:17} ufa {' '.join(f'{x:.0f}' for x in u)} | torch "
              f"{' '.join(f'{x:.0f}' for x in t)} | torch/ufa "
              f"{statistics.median(t) / statistics.median(u):.3f}")
    if a.profile:
        for use_ufa, name in ((True, "ufa"), (False, "torch")):
            print(f"-- {name}: {a.profile} forward + backward calls under torch.profiler")
            print(profile_table(lambda: layer(True), use_ufa, a.profile, dev))


def profile_table(call, use_ufa, n, dev):
    """Device time by kernel (and CPU time by operator) over n calls, as torch.profiler's table."""
    from contextlib import nullcontext
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if dev.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with ut.patched() if use_ufa else nullcontext():
        for _ in range(3):
            call()
        with profile(activities=activities) as prof:
            for _ in range(n):
                call()
            if dev.type == "cuda":
                torch.cuda.synchronize()
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=60)


if __name__ == "__main__":
    main()
