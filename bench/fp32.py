#!/usr/bin/env python3
"""fp32 attention on the GPU from Python, as a PyTorch user calls it: ufa.torch.flash_attn_func
on float32 CUDA tensors beside torch.nn.functional.scaled_dot_product_attention with its fp32
backends (efficient, math), in one run on one card, in both precisions: fp32 accuracy (PyTorch's
default; ufa's 3xTF32 tensor-core kernel) and with PyTorch's TF32 switch on
(torch.backends.cuda.matmul.fp32_precision = "tf32"; ufa rounds to TF32 once).

DESIGN.md's sweep shape: 16k tokens in total (batch = 16384 / seqlen), hidden 2048
(heads = 2048 / head_dim), causal and not. Each call is timed with CUDA events, median of
--iters after warm-up; TFLOP/s by FlashAttention's convention (4·B·H·S²·D, halved when causal;
the backward 2.5 times that). With --backward the backward alone is timed: one forward, then
`out.backward(dout, retain_graph=True)` called again and again (the gradients' accumulation
into .grad is in both columns alike). Each configuration's error against a float64 reference
of its first batch entry and head (the output, or with --backward the worst of dQ, dK and dV)
is printed beside it, so a fast wrong answer cannot pass. Writes fp32_<date>_<card>.{md,csv}
(fp32_bwd_... with --backward) into --out.

Usage: python3 bench/fp32.py [--out DIR] [--iters N] [--seqlens 1024,2048,...] [--dims 64,128]
                             [--backward]
"""

import argparse
import csv
import datetime
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import ufa.torch as ut
from cuda_timing import backward_ms, median_ms
from reference import attention_head, worst_error

TORCH_BACKENDS = {"efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def set_tf32(on):
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):
        m.fp32_precision = "tf32" if on else "ieee"
    else:
        m.allow_tf32 = on


def flops(b, h, s, d, causal):
    f = 4 * b * h * s * s * d
    return f / 2 if causal else f


def timed(fn, args, dout, iters):
    """(milliseconds, [output] or gradients) of fn(*args): the forward, or with `dout` its
    backward alone."""
    if dout is None:
        return median_ms(lambda: fn(*args), iters), [fn(*args)]
    return backward_ms(fn, args, dout, iters)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--seqlens", default="1024,2048,4096,8192,16384")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--backward", action="store_true", help="time the backward alone")
    args = ap.parse_args()
    bwd = args.backward
    what = "backward" if bwd else "forward"
    card = torch.cuda.get_device_name()
    rows = []
    print(f"card {card}, torch {torch.__version__}")
    header = (f"{'D':>4} {'S':>6} {'causal':>6} {'mode':>5} | {'ufa':>7} {'efficient':>9} "
              f"{'math':>7} | {'vs best':>7} | err ufa / eff")
    print(header)
    for d in [int(x) for x in args.dims.split(",")]:
        for s in [int(x) for x in args.seqlens.split(",")]:
            b, h = max(1, 16384 // s), 2048 // d
            q, k, v = (torch.randn(b, s, h, d, device="cuda") for _ in range(3))
            dout = torch.randn(b, s, h, d, device="cuda") if bwd else None
            for causal in (False, True):
                want = attention_head(q, k, v, causal, dout)
                want = want[1:] if bwd else want
                for mode in ("ieee", "tf32"):
                    set_tf32(mode == "tf32")
                    f = flops(b, h, s, d, causal) * (2.5 if bwd else 1)
                    res = {"head_dim": d, "seqlen": s, "batch": b, "heads": h,
                           "causal": causal, "mode": mode}
                    ms, got = timed(lambda q, k, v: ut.flash_attn_func(q, k, v, causal=causal),
                                    (q, k, v), dout, args.iters)
                    res["err_ufa"] = worst_error(got, want)
                    res["ufa"] = f / ms / 1e9
                    for name, backend in TORCH_BACKENDS.items():
                        res[name] = None
                        if name == "math" and s > 8192:
                            continue  # materialises B·H·S² scores: 64 GB at 16k
                        try:
                            with sdpa_kernel([backend]):
                                # PyTorch's layout [B, H, S, D], viewed back as ufa's.
                                sdpa = lambda q, k, v: F.scaled_dot_product_attention(
                                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                    is_causal=causal).transpose(1, 2)
                                ms, got = timed(sdpa, (q, k, v), dout, args.iters)
                                if name == "efficient":
                                    res["err_eff"] = worst_error(got, want)
                                res[name] = f / ms / 1e9
                        except (RuntimeError, torch.OutOfMemoryError) as e:
                            print(f"  {name}: {str(e).splitlines()[0][:80]}")
                        torch.cuda.empty_cache()
                    best = max(x for x in (res["efficient"], res["math"]) if x is not None)
                    res["ratio"] = res["ufa"] / best
                    rows.append(res)
                    fmt = lambda x: f"{x:7.1f}" if x is not None else "      -"
                    print(f"{d:>4} {s:>6} {str(causal):>6} {mode:>5} | {fmt(res['ufa'])} "
                          f"{fmt(res['efficient']):>9} {fmt(res['math'])} | "
                          f"{res['ratio']:6.2f}x | {res['err_ufa']:.1e} / "
                          f"{res.get('err_eff', float('nan')):.1e}", flush=True)
            del q, k, v, dout
            torch.cuda.empty_cache()
    set_tf32(False)

    os.makedirs(args.out, exist_ok=True)
    date = datetime.date.today().isoformat()
    tag = card.split()[-1].lower() if card else "gpu"
    base = os.path.join(args.out, f"fp32_{'bwd_' if bwd else ''}{date}_{tag}")
    keys = ["head_dim", "seqlen", "batch", "heads", "causal", "mode", "ufa", "efficient", "math",
            "ratio", "err_ufa", "err_eff"]
    with open(base + ".csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with open(base + ".md", "w") as fh:
        fh.write(f"# fp32 {what} from Python, {card}, {date}\n\n"
                 f"Command: `python3 bench/fp32.py --iters {args.iters} --seqlens {args.seqlens} "
                 f"--dims {args.dims}{' --backward' if bwd else ''}`; torch {torch.__version__}. "
                 "TFLOP/s (FlashAttention convention), median of the iterations; `vs best` is "
                 "ufa over the faster PyTorch fp32 backend in the same mode; errors are relative "
                 "to float64 on one head"
                 f"{' (the worst of dQ, dK and dV)' if bwd else ''}.\n\n"
                 "| head_dim | seqlen | causal | mode | ufa | SDPA efficient | SDPA math | "
                 "vs best | ufa error | efficient error |\n"
                 "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
        for r in rows:
            cell = lambda x: f"{x:.1f}" if x is not None else "-"
            fh.write(f"| {r['head_dim']} | {r['seqlen']} | {r['causal']} | {r['mode']} | "
                     f"{cell(r['ufa'])} | {cell(r['efficient'])} | {cell(r['math'])} | "
                     f"{r['ratio']:.2f}x | {r['err_ufa']:.1e} | "
                     f"{r.get('err_eff', float('nan')):.1e} |\n")
    print(f"wrote {base}.md and .csv")


if __name__ == "__main__":
    main()
