#!/usr/bin/env python3
"""ufa's CPU attention beside PyTorch's CPU flash kernel, in the same run.

Rounds interleave the two (ufa, then PyTorch, per workload and round), so both see the same
machine state; each round's time is the median of --iters runs, and the table reports the
median over rounds. ufa runs through `ufa bench --json` (its timer wraps only the attention
call); PyTorch through torch.nn.functional.scaled_dot_product_attention with the FLASH_ATTENTION
backend, in [batch, heads, seq, dim] layout.

FLOPs follow FlashAttention: forward 4·B·H·Sq·Skv·D (halved for causal), backward 2.5× that.
Usage: python bench/cpu_vs_torch.py [--threads 2] [--rounds 5] [--dtypes f32,bf16] [--passes forward,backward]
Writes bench/results/cpu_vs_torch.{md,csv,png}.
"""
import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UFA = os.path.join(ROOT, "target", "release", "ufa")

# name: (batch, heads, seqlen_q, seqlen_kv, head_dim, causal) -- the same as `ufa bench`
WORKLOADS = {
    "W1": (1, 8, 1024, 1024, 64, False),
    "W2": (1, 8, 4096, 4096, 64, False),
    "W2-causal": (1, 8, 4096, 4096, 64, True),
    "W3": (1, 16, 2048, 2048, 128, False),
    "W3-causal": (1, 16, 2048, 2048, 128, True),
    "W4-decode": (1, 32, 1, 4096, 128, False),
}
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def flops(w, backward):
    b, h, sq, skv, d, causal = w
    f = 4.0 * b * h * sq * skv * d  # two matmuls (QK^T, PV), 2 flops per multiply-add
    f = f / 2 if causal else f
    return f * 2.5 if backward else f


def time_ufa(ufa, name, dtype, threads, iters, backward, isa_args):
    # Same memory layout as the PyTorch side: [batch, heads, seq, dim], read in place.
    # --device cpu: on a GPU host `ufa bench` would otherwise pick cuda:0 and compare a GPU with
    # PyTorch's CPU kernels.
    cmd = [ufa, "bench", "--device", "cpu", "--workload", name, "--dtype", dtype, "--threads",
           str(threads), "--iters", str(iters), "--layout", "bhsd", "--json"] + (["--backward"] if backward else []) \
        + isa_args
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)[0]["median_ms"]


def time_torch(w, dtype, iters, backward):
    b, h, sq, skv, d, causal = w
    gen = torch.Generator().manual_seed(0)
    mk = lambda s: torch.randn(b, h, s, d, dtype=DTYPES[dtype], generator=gen).requires_grad_(backward)
    q, k, v = mk(sq), mk(skv), mk(skv)
    # PyTorch's is_causal is top-left aligned; for Sq == Skv (all causal workloads here) the
    # alignments agree.
    times = []
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        for i in range(iters + 1):
            if backward:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                g = torch.ones_like(o)
                t = time.perf_counter()
                o.backward(g)
            else:
                t = time.perf_counter()
                F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            if i:  # the first run warms up
                times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def plot(rows, out, title):
    """Bars of ufa's and PyTorch's GFLOP/s per row, to `out`.png (skipped without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot written", file=sys.stderr)
        return
    labels = [f"{r['workload']}\n{r['pass'][:3]} {r['dtype']}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.7), 4.5))
    ax.bar([i - 0.2 for i in x], [float(r["ufa_gflops"]) for r in rows], 0.4, label="ufa")
    ax.bar([i + 0.2 for i in x], [float(r["torch_gflops"]) for r in rows], 0.4, label="PyTorch flash (CPU)")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("GFLOP/s")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=110)


def plot_only(out):
    """Redraws `out`.png from `out`.csv and the date and machine lines of `out`.md."""
    with open(out + ".csv") as f:
        rows = list(csv.DictReader(f))
    meta = dict(l[2:].split(": ", 1) for l in open(out + ".md") if l.startswith("- ") and ": " in l)
    plot(rows, out, f"CPU attention, {meta['machine'].strip()} ({meta['date'].strip()})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--passes", default="forward,backward")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "cpu_vs_torch"))
    ap.add_argument("--ufa", default=UFA, help="the ufa binary (default: target/release/ufa, built if missing)")
    ap.add_argument("--cpu-isa", default=None,
                    help="ufa's CPU kernel family (default: the one `ufa info` names), e.g. amx-bf16")
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from the CSV and Markdown")
    args = ap.parse_args()
    if args.plot_only:
        return plot_only(args.out)
    ufa = os.path.abspath(args.ufa)
    isa_args = ["--cpu-isa", args.cpu_isa] if args.cpu_isa else []
    if not os.path.exists(ufa):
        subprocess.run(["cargo", "build", "--release", "-p", "ufa-cli"], cwd=ROOT, check=True)
    torch.set_num_threads(args.threads)

    load_start = os.getloadavg()[0]
    rows = []
    for backward in [p == "backward" for p in args.passes.split(",")]:
        for dtype in args.dtypes.split(","):
            for name in args.workloads.split(","):
                w = WORKLOADS[name]
                ufa_ms, torch_ms = [], []
                for _ in range(args.rounds):
                    ufa_ms.append(time_ufa(ufa, name, dtype, args.threads, args.iters, backward,
                                           isa_args))
                    torch_ms.append(time_torch(w, dtype, args.iters, backward))
                u, t = statistics.median(ufa_ms), statistics.median(torch_ms)
                row = {
                    "workload": name, "pass": "backward" if backward else "forward", "dtype": dtype,
                    "ufa_ms": round(u, 3), "torch_ms": round(t, 3),
                    "ufa_gflops": round(flops(w, backward) / u / 1e6, 1),
                    "torch_gflops": round(flops(w, backward) / t / 1e6, 1),
                    "speedup": round(t / u, 2),
                }
                rows.append(row)
                print(f"{name:<10} {row['pass']:<8} {dtype:<5} ufa {u:9.3f} ms {row['ufa_gflops']:7.1f} GF/s | "
                      f"torch {t:9.3f} ms {row['torch_gflops']:7.1f} GF/s | ufa speedup {row['speedup']:.2f}x",
                      flush=True)

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    header = (f"# ufa CPU vs PyTorch CPU flash attention\n\n"
              f"- date: {stamp}\n- machine: {cpu}, {os.cpu_count()} cores, {args.threads} threads for each\n"
              f"- torch {torch.__version__} (capability {torch.backends.cpu.get_cpu_capability()}), "
              f"ufa kernels: {json.loads(subprocess.run([ufa, 'bench', '--device', 'cpu', '--workload', 'W1', '--iters', '1', '--json', '--threads', str(args.threads)] + isa_args, capture_output=True, text=True).stdout)[0]['kernels']}\n"
              f"- command: `{command}` (medians of {args.rounds} interleaved rounds of {args.iters} runs)\n"
              f"- speedup = PyTorch time / ufa time (>1: ufa is faster)\n"
              f"- load: 1-minute load average {load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at "
              f"the end (a shared VM: jobs of others come and go, so one ratio can move by a fifth between "
              f"runs; rounds interleave the two sides to share what they meet)\n"
              f"- both sides use the [batch, heads, seq, dim] layout (ufa reads it in place through "
              f"strides)\n\n")
    cols = list(rows[0])
    with open(args.out + ".md", "w") as f:
        f.write(header + "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
        for r in rows:
            f.write("| " + " | ".join(str(r[c]) for c in cols) + " |\n")
    with open(args.out + ".csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=cols)
        wr.writeheader()
        wr.writerows(rows)
    plot(rows, args.out, f"CPU attention, {args.threads} threads, {cpu} ({stamp})")
    print(f"wrote {args.out}.md, .csv, .png")


if __name__ == "__main__":
    main()
