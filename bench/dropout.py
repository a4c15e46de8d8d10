#!/usr/bin/env python3
"""Attention dropout on the GPU from Python, as a training step calls it: ufa.torch.flash_attn_func
with dropout_p beside torch.nn.functional.scaled_dot_product_attention with the same dropout_p
on its dropping backends (flash = FlashAttention-2, cuDNN, efficient), forward alone and forward +
backward, in one run on one card; and ufa without dropout, for what dropout costs.

DESIGN.md's sweep shape: 16k tokens in total (batch = 16384 / seqlen), hidden 2048
(heads = 2048 / head_dim), bf16, causal and not. Each call is timed with CUDA events, median of
--iters after warm-up; TFLOP/s by FlashAttention's convention (4·B·H·S²·D forward, 2.5× that for
forward + backward, halved when causal). ufa's output for batch entry 0, head 0 is checked
against a float64 computation with the core's own dropout factors (seqlen ≤ 2048), so a fast
wrong answer cannot pass. Writes dropout_<date>_<card>.{md,csv} into --out.

Usage: python3 bench/dropout.py [--out DIR] [--iters N] [--seqlens 1024,...] [--dims 64,128] [--p 0.1]
"""

import argparse
import datetime
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import ufa.torch as ut
from ufa import _ufa
from cuda_timing import median_ms
from results_files import results_base, write_csv

PEERS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def flops(b, h, s, d, causal, backward):
    f = 4 * b * h * s * s * d * (3.5 if backward else 1.0)
    return f / 2 if causal else f


def check_head(q, k, v, p, causal):
    """ufa's dropout output for batch entry 0, head 0 against float64 with the core's factors."""
    s = q.shape[1]
    torch.manual_seed(11)
    seed = ut._dropout_seed(q, p)
    torch.manual_seed(11)
    out = ut.flash_attn_func(q, k, v, dropout_p=p, causal=causal)
    z = torch.tensor(_ufa._dropout_factors(p, seed, 0, 1, s, s), dtype=torch.float64,
                     device=q.device).reshape(s, s)
    q64, k64, v64 = (t[0, :, 0].double() for t in (q, k, v))
    sc = q64 @ k64.T / math.sqrt(q.shape[-1])
    if causal:
        sc = sc.masked_fill(torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1),
                            float("-inf"))
    want = (torch.softmax(sc, -1) * z) @ v64
    return ((out[0, :, 0].double() - want).norm() / want.norm()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--seqlens", default="1024,2048,4096,8192")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--p", type=float, default=0.1)
    args = ap.parse_args()
    card = torch.cuda.get_device_name()
    p = args.p
    print(f"card {card}, torch {torch.__version__}, dropout_p {p}, bf16")
    rows = []
    for d in [int(x) for x in args.dims.split(",")]:
        for s in [int(x) for x in args.seqlens.split(",")]:
            b, h = max(1, 16384 // s), 2048 // d
            q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16,
                                   requires_grad=True) for _ in range(3))
            qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
            dout = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)
            doutt = dout.transpose(1, 2)
            for causal in (False, True):
                err = check_head(q.detach(), k.detach(), v.detach(), p, causal) if s <= 2048 \
                    else float("nan")
                for backward in (False, True):
                    def ufa_call(pp):
                        def call():
                            if backward:
                                o = ut.flash_attn_func(q, k, v, dropout_p=pp, causal=causal)
                                o.backward(dout)
                            else:
                                with torch.no_grad():
                                    ut.flash_attn_func(q, k, v, dropout_p=pp, causal=causal)
                        return call

                    def peer_call(backend):
                        def call():
                            with sdpa_kernel(backend):
                                if backward:
                                    o = F.scaled_dot_product_attention(qt, kt, vt, dropout_p=p,
                                                                       is_causal=causal)
                                    o.backward(doutt)
                                else:
                                    with torch.no_grad():
                                        F.scaled_dot_product_attention(qt, kt, vt, dropout_p=p,
                                                                       is_causal=causal)
                        return call

                    f = flops(b, h, s, d, causal, backward)
                    t = {"ufa": median_ms(ufa_call(p), args.iters),
                         "ufa_p0": median_ms(ufa_call(0.0), args.iters)}
                    for name, backend in PEERS.items():
                        try:
                            t[name] = median_ms(peer_call(backend), args.iters)
                        except RuntimeError:
                            t[name] = float("nan")
                    tf = {n: f / (ms * 1e-3) / 1e12 for n, ms in t.items()}
                    peers = [tf[n] for n in PEERS if tf[n] == tf[n]]
                    best = max(peers) if peers else float("nan")
                    row = dict(head_dim=d, seqlen=s, batch=b, heads=h, causal=causal,
                               step="fwd+bwd" if backward else "fwd", err_ufa=err,
                               vs_best=tf["ufa"] / best, dropout_cost=t["ufa"] / t["ufa_p0"],
                               **{f"tflops_{n}": v for n, v in tf.items()})
                    rows.append(row)
                    print(f"d{d} s{s} {'causal' if causal else 'full':6} {row['step']:7} | "
                          + " ".join(f"{n} {v:6.1f}" for n, v in tf.items())
                          + f" | vs best {row['vs_best']:.2f} | cost of dropout "
                          f"{row['dropout_cost']:.2f}x | err {err:.1e}")
            del q, k, v, qt, kt, vt
    date = datetime.date.today().isoformat()
    base = results_base(args.out, "dropout")
    write_csv(base + ".csv", rows)
    with open(base + ".md", "w") as fh:
        fh.write(f"# Attention dropout (p = {p}), bf16, {card}, {date}\n\n")
        fh.write(f"Command: `python3 bench/dropout.py --iters {args.iters} --seqlens "
                 f"{args.seqlens} --dims {args.dims} --p {p}`; torch {torch.__version__}. "
                 "TFLOP/s (FlashAttention's convention); `vs best`: ufa with dropout over the "
                 "fastest PyTorch SDPA backend with the same dropout; `cost`: ufa's time with "
                 "dropout over its time without; `err`: ufa's batch 0, head 0 against float64 "
                 "with the core's factors.\n\n")
        fh.write("| D | S | causal | step | ufa | flash | cuDNN | efficient | vs best | "
                 "ufa p=0 | cost | err |\n|" + "---|" * 12 + "\n")
        for r in rows:
            fh.write(f"| {r['head_dim']} | {r['seqlen']} | {r['causal']} | {r['step']} | "
                     f"{r['tflops_ufa']:.1f} | {r['tflops_flash']:.1f} | {r['tflops_cudnn']:.1f} "
                     f"| {r['tflops_efficient']:.1f} | {r['vs_best']:.2f} | "
                     f"{r['tflops_ufa_p0']:.1f} | {r['dropout_cost']:.2f} | {r['err_ufa']:.1e} |\n")
    print(f"wrote {base}.md / .csv")


if __name__ == "__main__":
    main()
