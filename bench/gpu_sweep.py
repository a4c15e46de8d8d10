#!/usr/bin/env python3
"""ufa's CUDA forward (or backward) pass beside PyTorch's scaled_dot_product_attention with
each of its backends (flash, cuDNN, efficient), in one run on one card: DESIGN.md's standard
sweep (bf16, 16k tokens in total, hidden 2048, heads = 2048 / head_dim, seqlen 512..16k,
head_dim 64/128/256, causal and not). Writes gpu_sweep_<date>.{md,csv,png} (forward) or
gpu_sweep_bwd_<date>.* (--pass backward) into --out.

ufa is timed by its Rust bench binary (bench/gpu_bench.rs, built as the `gpu_bench` example),
PyTorch here, both with CUDA events and the median of --iters calls after warm-up. The backward
times the gradient call alone (PyTorch: torch.autograd.grad on a saved graph) and counts 2.5x
the forward's flops, as FlashAttention does; ufa's deterministic mode gets its own column.
"""

import argparse
import csv
import datetime
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from cuda_timing import median_ms

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def flops(batch, heads, seqlen, head_dim, causal):
    # Two matmuls per head (S = QKᵀ and O = PV), each 2·Sq·Skv·D; half of them when causal.
    f = 4 * batch * heads * seqlen * seqlen * head_dim
    return f / 2 if causal else f


def time_torch(backend, batch, seqlen, heads, head_dim, causal, iters, backward):
    shape = (batch, heads, seqlen, head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
               for _ in range(3))
    with sdpa_kernel([BACKENDS[backend]]):
        try:
            if backward:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                grad = torch.randn_like(out)
                call = lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
            else:
                call = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            return median_ms(call, iters), ""
        except RuntimeError as e:
            return None, str(e).splitlines()[0][:80]


def time_ufa(binary, batch, seqlen, heads, head_dim, causal, iters, mode, env):
    r = subprocess.run(
        [binary, str(batch), str(seqlen), str(heads), str(head_dim), str(int(causal)), "bf16", str(iters), mode],
        capture_output=True, text=True, env={**os.environ, **env})
    if r.returncode != 0:
        return None, r.stderr.strip().splitlines()[-1][:80] if r.stderr.strip() else "failed"
    return json.loads(r.stdout.strip().splitlines()[-1])["ms"], ""


def plot(rows, columns, stem, title):
    """TFLOP/s of each column against seqlen, one panel per head_dim and causality, to
    `stem`.png (skipped without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return
    dims = sorted({r["head_dim"] for r in rows})
    fig, axes = plt.subplots(2, len(dims), figsize=(5 * len(dims), 8), squeeze=False)
    for col, d in enumerate(dims):
        for row_i, causal in enumerate((False, True)):
            ax = axes[row_i][col]
            sel = [r for r in rows if r["head_dim"] == d and r["causal"] == causal]
            xs = [r["seqlen"] for r in sel]
            for name in columns:
                ax.plot(xs, [r[name] or float("nan") for r in sel], marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_title(f"head_dim {d}, {'causal' if causal else 'non-causal'}")
            ax.set_xlabel("seqlen")
            ax.set_ylabel("TFLOP/s")
            ax.grid(True, alpha=0.3)
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=80)


def plot_only(stem):
    """Redraws `stem`.png from `stem`.csv and the card and date lines of `stem`.md."""
    with open(stem + ".csv") as f:
        raw = list(csv.DictReader(f))
    columns = [c for c in raw[0] if c not in ("head_dim", "causal", "seqlen", "batch", "heads", "notes")]
    num = lambda x: float(x) if x not in ("", "None") else None
    rows = [{**{c: num(r[c]) for c in columns}, "head_dim": int(r["head_dim"]),
             "causal": r["causal"] == "True", "seqlen": int(r["seqlen"])} for r in raw]
    meta = dict(l[2:].split(": ", 1) for l in open(stem + ".md") if l.startswith("- ") and ": " in l)
    which = "backward" if "_bwd_" in os.path.basename(stem) else "forward"
    plot(rows, columns, stem, f"ufa vs PyTorch SDPA, bf16 {which}, {meta['card'].strip()}, "
                              f"{meta['date'].strip()[:10]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ufa-bench", help="path of the gpu_bench binary (needed unless --plot-only)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--head-dims", default="64,128,256")
    ap.add_argument("--pass", dest="which", choices=["forward", "backward"], default="forward")
    ap.add_argument("--plot-only", metavar="STEM", help="redraw STEM.png from STEM.csv and STEM.md")
    args = ap.parse_args()
    if args.plot_only:
        return plot_only(args.plot_only)
    if not args.ufa_bench:
        ap.error("--ufa-bench is required")
    backward = args.which == "backward"
    # ufa's columns: mode passed to gpu_bench, and its environment. ufa_sm80 is the sm_80
    # kernel on the same card (the same as ufa on cards before Hopper); ufa_cp the Hopper
    # forward that dense batches took before the warp-specialised one (fwd_sm90.cu, cp.async
    # loads; packed and paged batches still take it).
    sm80 = {"UFA_CUDA_WGMMA": "0"}
    ufa_modes = ({"ufa": ("bwd", {}), "ufa_det": ("bwd-det", {}), "ufa_sm80": ("bwd", sm80)} if backward
                 else {"ufa": ("fwd", {}), "ufa_cp": ("fwd", {"UFA_CUDA_TMA_FWD": "0"}),
                       "ufa_sm80": ("fwd", sm80)})

    card = torch.cuda.get_device_name(0)
    now = datetime.datetime.now(datetime.timezone.utc)
    command = " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])
    rows = []
    for head_dim in [int(x) for x in args.head_dims.split(",")]:
        heads = 2048 // head_dim
        for causal in (False, True):
            for seqlen in [int(x) for x in args.seqlens.split(",")]:
                batch = max(1, 16384 // seqlen)
                fl = flops(batch, heads, seqlen, head_dim, causal) * (2.5 if backward else 1.0)
                row = {"head_dim": head_dim, "causal": causal, "seqlen": seqlen, "batch": batch, "heads": heads}
                notes = []
                for col, (mode, env) in ufa_modes.items():
                    ms, note = time_ufa(args.ufa_bench, batch, seqlen, heads, head_dim, causal, args.iters, mode, env)
                    row[col] = fl / (ms * 1e-3) / 1e12 if ms else None
                    if note:
                        notes.append(f"{col}: {note}")
                for name in BACKENDS:
                    ms_t, note = time_torch(name, batch, seqlen, heads, head_dim, causal, args.iters, backward)
                    row[name] = fl / (ms_t * 1e-3) / 1e12 if ms_t else None
                    if note:
                        notes.append(f"{name}: {note}")
                row["notes"] = "; ".join(notes)
                rows.append(row)
                fmt = lambda x: f"{x:6.1f}" if x else "   n/a"
                print(f"d{head_dim:<3} {'causal' if causal else 'full  '} s{seqlen:<6} "
                      + "  ".join(f"{n} {fmt(row[n])}" for n in [*ufa_modes, *BACKENDS]), flush=True)

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"gpu_sweep_{'bwd_' if backward else ''}{now:%Y-%m-%d}")
    fields = ["head_dim", "causal", "seqlen", "batch", "heads", *ufa_modes, *BACKENDS, "notes"]
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.2f}" if isinstance(r[k], float) else r[k]) for k in fields})

    ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "n/a"
    fmt = lambda x: f"{x:.1f}" if x else "n/a"
    with open(stem + ".md", "w") as f:
        f.write(f"# ufa CUDA {args.which} vs PyTorch SDPA (TFLOP/s, bf16)\n\n")
        f.write(f"- date: {now:%Y-%m-%d %H:%M} UTC\n- card: {card}\n- torch: {torch.__version__}\n")
        f.write(f"- command: `{command}`\n- 16k tokens in total, hidden 2048; median of {args.iters} calls\n")
        if backward:
            f.write("- backward: the gradient call alone, 2.5x the forward's flops; ufa_det = deterministic mode\n")
        f.write("- ufa_sm80: ufa's mma.sync (sm_80) kernels on the same card (UFA_CUDA_WGMMA=0)\n")
        if not backward:
            f.write("- ufa_cp: ufa's cp.async Hopper forward (UFA_CUDA_TMA_FWD=0); ufa is the "
                    "warp-specialised one on Hopper\n")
        f.write("\n")
        cols = [*ufa_modes, *BACKENDS]
        ratios = [*(["ufa_det/ufa"] if backward else []), "ufa/flash", "ufa/cudnn", "ufa/efficient"]
        f.write("| head_dim | causal | seqlen | batch | " + " | ".join(cols + ratios) + " |\n")
        f.write("|" + " --- |" * (4 + len(cols) + len(ratios)) + "\n")
        for r in rows:
            vals = [fmt(r[c]) for c in cols]
            if backward:
                vals.append(ratio(r["ufa_det"], r["ufa"]))
            vals += [ratio(r["ufa"], r[b]) for b in BACKENDS]
            f.write(f"| {r['head_dim']} | {r['causal']} | {r['seqlen']} | {r['batch']} | " + " | ".join(vals) + " |\n")
        notes = [f"- d{r['head_dim']} {'causal' if r['causal'] else 'full'} s{r['seqlen']}: {r['notes']}" for r in rows if r["notes"]]
        if notes:
            f.write("\nNotes:\n" + "\n".join(notes) + "\n")

    plot(rows, [*ufa_modes, *BACKENDS], stem, f"ufa vs PyTorch SDPA, bf16 {args.which}, {card}, {now:%Y-%m-%d}")
    print(f"wrote {stem}.md/.csv/.png")


if __name__ == "__main__":
    main()
