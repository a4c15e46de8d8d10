#!/usr/bin/env python3
"""Decoding calls at a few shapes, timed eager and as CUDA-graph replays, beside cuDNN.

The quick A/B companion of bench/decode.py (which sweeps the issue's grid): run it once per
build, alternating builds in one device call (`PYTHONPATH=<build> python3
bench/decode_replays.py`), so that the graph-replay column (no host cost) compares kernels.
Shapes: (batch, KV length, KV heads, head_dim) below, 32 query heads, one query token, bf16,
dense K/V [b, kv, hkv, d].

Prints, per shape, `ufa <eager µs>/<graph µs>`; with `--torch` also cuDNN's (SDPA on
[b, h, s, d] copies) and the max |ufa - cuDNN|; with DS_PAGED=<page rows> also the paged
KV-cache call over a shuffled block table, and its max difference from the dense call. The
decode tile and split overrides (UFA_CUDA_DECODE_TILE, UFA_CUDA_DECODE_SPLITS) are printed
as the tag.
"""
import os
import sys
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import ufa.torch as ut

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cuda_timing import loop_us  # noqa: E402

warnings.filterwarnings("ignore")
SHAPES = [(8, 8192, 8, 64), (8, 8192, 4, 64), (8, 8192, 8, 128), (8, 8192, 4, 128),
          (8, 32768, 4, 64), (32, 8192, 8, 128), (32, 8192, 8, 64), (1, 8192, 8, 128),
          (8, 8192, 8, 256), (32, 32768, 8, 128)]
TORCH = "--torch" in sys.argv
PAGE = int(os.environ.get("DS_PAGED", "0"))


def graph_us(f, calls=20):
    """µs per call of `calls` calls captured in one CUDA graph and replayed."""
    f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            f()
    return loop_us(lambda: g.replay(), 5) / calls


def main():
    tag = (f"splits={os.environ.get('UFA_CUDA_DECODE_SPLITS', 'auto')} "
           f"tile={os.environ.get('UFA_CUDA_DECODE_TILE', 'auto')}")
    out = []
    for (b, kv, hkv, d) in SHAPES:
        q = torch.randn(b, 1, 32, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, kv, hkv, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        f = lambda: ut.flash_attn_func(q, k, v, causal=True)  # noqa: E731
        cell = f"ufa {loop_us(f, 30):.1f}/{graph_us(f):.1f}"
        if PAGE:
            nb = kv // PAGE
            perm = torch.randperm(b * nb, device="cuda").view(b, nb)
            kp = torch.empty(b * nb, PAGE, hkv, d, device="cuda", dtype=torch.bfloat16)
            vp = torch.empty_like(kp)
            kp.index_copy_(0, perm.flatten(), k.reshape(b * nb, PAGE, hkv, d))
            vp.index_copy_(0, perm.flatten(), v.reshape(b * nb, PAGE, hkv, d))
            seqlens = torch.full((b,), kv, dtype=torch.int32, device="cuda")
            table = perm.to(torch.int32)
            fp = lambda: ut.flash_attn_with_kvcache(  # noqa: E731
                q, kp, vp, cache_seqlens=seqlens, block_table=table, causal=True)
            err = (fp().float() - f().float()).abs().max().item()
            cell += f" paged{PAGE} {graph_us(fp):.1f} (diff {err:.1e})"
            del kp, vp
        if TORCH:
            qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                g = lambda: F.scaled_dot_product_attention(  # noqa: E731
                    qt, kt, vt, enable_gqa=hkv < 32)
                cell += f" cudnn {loop_us(g, 30):.1f}/{graph_us(g):.1f}"
                err = (g().transpose(1, 2).float() - f().float()).abs().max().item()
                cell += f" diff {err:.1e}"
        out.append(f"b{b} kv{kv} hkv{hkv} d{d} ({2 * k.numel() * 2 / 1e6:.0f} MB): {cell}")
    print(tag)
    print("\n".join("  " + o for o in out), flush=True)


if __name__ == "__main__":
    main()
