#!/usr/bin/env python3
"""Head dims off the tensor-core tiles, and Q/K and V of different head dims (MLA's 192/128), on
the GPU from Python: ufa.torch.flash_attn_func beside torch.nn.functional.
scaled_dot_product_attention (PyTorch's default choice, cuDNN on Hopper) in one run on one card,
forward and backward, with the nearest head dims that have a tile of their own in the same run
(issue #22: a padded head dim's forward should reach 0.8x the TFLOP/s of the nearest tiled one).

bf16, batch 4, 16 heads, seqlen --seqlen, causal and not. TFLOP/s by FlashAttention's
convention with the two head dims counted apart: the forward 2·B·H·S²·(d + d_v), halved when
causal; the backward 2.5 times that. Each call is timed with CUDA events (median of --iters);
the backward alone: one forward, then `out.backward(dout, retain_graph=True)` again and again.
ufa's output and gradients are checked against PyTorch's math backend in float64 on the first
batch entry and head, so a fast wrong answer cannot pass. Writes head_dims_<date>_<card>.{md,csv}.

Head dims above 256 (320, 384, 512: the mma.sync kernels' wide tiles) are compared with 256.
`--dims 256,320,512` keeps the shapes whose head dim is listed; `--forward-only` skips the
backward (its time and its gradients' check).

Usage: python3 bench/head_dims.py [--out DIR] [--iters N] [--seqlen S] [--dims D,...]
                                 [--forward-only]
"""

import argparse

import torch
import torch.nn.functional as F

import ufa.torch as ut
from cuda_timing import backward_ms, median_ms
from reference import attention_head, worst_error
from results_files import results_base, write_csv

# (head_dim, head_dim_v, what it is, the tile width it is compared with): head dims off
# Hopper's tile widths (64, 128, 192, 256) each beside the nearest one, which runs first.
SHAPES = [
    (64, 64, "tile", None), (16, 16, "off tile", 64), (32, 32, "off tile", 64),
    (48, 48, "off tile", 64), (80, 80, "off tile", 64),
    (128, 128, "tile", None), (96, 96, "off tile", 128),
    (192, 192, "tile", None), (192, 128, "MLA", 192),
    (256, 256, "tile", None), (320, 320, "wide", 256), (384, 384, "wide", 256),
    (512, 512, "wide", 256),
]


def flops(b, h, s, d, dv, causal):
    f = 2 * b * h * s * s * (d + dv)
    return f / 2 if causal else f


def timed(fn, args, dout, iters, backward=True):
    """(forward ms, backward ms, [output, dq, dk, dv]) of fn(*args); without `backward`, the
    backward's time is None and the list holds the output alone."""
    fwd = median_ms(lambda: fn(*args), iters)
    if not backward:
        return fwd, None, [fn(*args)]
    bwd, grads = backward_ms(fn, args, dout, iters)
    return fwd, bwd, [fn(*args), *grads]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--dims", default="", help="head dims to run (comma-separated; all if empty)")
    ap.add_argument("--forward-only", action="store_true", help="time and check the forward alone")
    args = ap.parse_args()
    keep = {int(x) for x in args.dims.split(",") if x}
    backward = not args.forward_only
    card = torch.cuda.get_device_name()
    b, h, s = 4, 16, args.seqlen
    print(f"card {card}, torch {torch.__version__}, bf16, batch {b}, heads {h}, seqlen {s}")
    print(f"{'d':>4} {'dv':>4} {'causal':>6} | {'ufa fwd':>7} {'sdpa fwd':>8} | "
          f"{'ufa bwd':>7} {'sdpa bwd':>8} | err")
    rows = []
    tiled = {}  # (head dim, causal) -> ufa's forward TFLOP/s
    for d, dv, what, near in SHAPES:
        if keep and d not in keep:
            continue
        torch.manual_seed(0)
        q, k = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        v = torch.randn(b, s, h, dv, device="cuda", dtype=torch.bfloat16)
        dout = torch.randn(b, s, h, dv, device="cuda", dtype=torch.bfloat16)
        for causal in (False, True):
            f = flops(b, h, s, d, dv, causal)
            uf, ub, got = timed(lambda q, k, v: ut.flash_attn_func(q, k, v, causal=causal),
                                (q, k, v), dout, args.iters, backward)
            sdpa = lambda q, k, v: F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                is_causal=causal).transpose(1, 2)
            tf, tb, _ = timed(sdpa, (q, k, v), dout, args.iters, backward)
            err = worst_error(got, attention_head(q, k, v, causal, dout if backward else None))
            tflops = lambda ms, scale=1.0: scale * f / ms / 1e9 if ms else None
            r = {"head_dim": d, "head_dim_v": dv, "what": what, "causal": causal,
                 "ufa_fwd": tflops(uf), "sdpa_fwd": tflops(tf),
                 "ufa_bwd": tflops(ub, 2.5), "sdpa_bwd": tflops(tb, 2.5), "err": err}
            if near is None:
                tiled[d, causal] = r["ufa_fwd"]
            near_fwd = tiled.get((near, causal)) if near else None
            r["vs_tile"] = r["ufa_fwd"] / near_fwd if near_fwd else None
            r["near"] = near
            rows.append(r)
            show = lambda x, w: f"{x:{w}.1f}" if x is not None else f"{'-':>{w}}"
            print(f"{d:>4} {dv:>4} {str(causal):>6} | {show(r['ufa_fwd'], 7)} "
                  f"{show(r['sdpa_fwd'], 8)} | {show(r['ufa_bwd'], 7)} {show(r['sdpa_bwd'], 8)} | "
                  f"{err:.1e}", flush=True)
        del q, k, v, dout
        torch.cuda.empty_cache()

    base = results_base(args.out, "head_dims")
    write_csv(base + ".csv", rows)
    with open(base + ".md", "w") as fh:
        fh.write(f"# Padded and unequal head dims, {card}, bf16\n\n"
                 f"Command: `python3 bench/head_dims.py --iters {args.iters} --seqlen {s}"
                 f"{' --dims ' + args.dims if args.dims else ''}"
                 f"{' --forward-only' if args.forward_only else ''}`; "
                 f"torch {torch.__version__}; batch {b}, {h} heads, seqlen {s}. TFLOP/s with "
                 "the two head dims counted apart (forward 2·B·H·S²·(d + d_v), halved when "
                 "causal; backward 2.5 times that), median of the iterations; `sdpa` is "
                 "PyTorch's default SDPA dispatch. `err`: the worst relative error of ufa's "
                 "output and gradients against float64 on one head.\n\n"
                 "`fwd vs tile`: ufa's forward TFLOP/s over its own at the tile width named "
                 "(issue #22 asks 0.8x or more of the nearest one).\n\n"
                 "| head_dim | head_dim_v | what | causal | ufa fwd | sdpa fwd | fwd vs tile | "
                 "ufa bwd | sdpa bwd | err |\n|---|---|---|---|---|---|---|---|---|---|\n")
        cell = lambda x: f"{x:.1f}" if x is not None else "-"
        for r in rows:
            vs = f"{r['vs_tile']:.2f}x of d{r['near']}" if r["vs_tile"] else ""
            fh.write(f"| {r['head_dim']} | {r['head_dim_v']} | {r['what']} | {r['causal']} | "
                     f"{cell(r['ufa_fwd'])} | {cell(r['sdpa_fwd'])} | {vs} | "
                     f"{cell(r['ufa_bwd'])} | {cell(r['sdpa_bwd'])} | {r['err']:.1e} |\n")
    print(f"wrote {base}.md and .csv")


if __name__ == "__main__":
    main()
