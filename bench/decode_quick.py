#!/usr/bin/env python3
"""Quick decoding timings for tuning: 9 shapes (bf16, one query token, 32 query heads), each
timed eagerly (CUDA events around 30 back-to-back Python calls) and inside a CUDA graph of 20
calls (the GPU's time alone), with the fraction of the card's read bandwidth.

The experiments in bench/results/decode_notes_2026-12-04.md were run with it, on an H200:
    python3 bench/decode_quick.py --torch          # beside SDPA's cuDNN/flash/efficient
    UFA_CUDA_DECODE_TILE=8,32,2 python3 bench/decode_quick.py   # a tile of the sweep
    python3 bench/decode_quick.py --bhsd           # K/V stored [b, h, s, d]
    python3 bench/decode_quick.py --prof           # per-kernel times from torch.profiler
    python3 bench/decode_quick.py --paged 16       # ufa over a paged cache (pages of 16 rows)
    python3 bench/decode_quick.py --paged 16 --inorder  # ... its pages in order (no scatter)
Without --torch the bandwidth is taken as 4450 GB/s. The full sweep is bench/decode.py.
"""
import sys, os, warnings, torch, ufa.torch as ut
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
warnings.filterwarnings("ignore")
TORCH = "--torch" in sys.argv
PAGE = int(sys.argv[sys.argv.index("--paged") + 1]) if "--paged" in sys.argv else 0
SHAPES = [(1,8192,8,128),(8,8192,8,128),(32,8192,8,128),(32,32768,8,128),(1,131072,8,128),(8,32768,1,128),(32,1024,8,128),(128,8192,8,64),(8,8192,32,128)]
if "--few" in sys.argv: SHAPES = [SHAPES[i] for i in (0,2,4,5)]
from cuda_timing import loop_us
def t(f, it=30): return loop_us(f, it)
def tg(f, it=20):
    try:
        f(); torch.cuda.synchronize()
        g=torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(it): f()
        return t(lambda: g.replay(), 5)/it
    except Exception as ex:
        return float('nan')
if TORCH:
    x=torch.empty(4<<30, dtype=torch.uint8, device='cuda').view(torch.float32)
    bw = x.numel()*4/t(lambda: x.sum(), 10)/1e3
    print(f"read BW {bw:.0f} GB/s"); del x
else: bw=4450.
print("tile", os.environ.get("UFA_CUDA_DECODE_TILE","default"))
for (b,kv,hkv,d) in SHAPES:
    hq=32
    q=torch.randn(b,1,hq,d,device='cuda',dtype=torch.bfloat16)
    if "--bhsd" in sys.argv:
        k=torch.randn(b,hkv,kv,d,device='cuda',dtype=torch.bfloat16).transpose(1,2); v=torch.randn(b,hkv,kv,d,device='cuda',dtype=torch.bfloat16).transpose(1,2)
    else:
        k=torch.randn(b,kv,hkv,d,device='cuda',dtype=torch.bfloat16); v=torch.randn_like(k)
    byt=2*k.numel()*2
    f=lambda: ut.flash_attn_func(q,k,v,causal=True)
    if PAGE:
        # The pool in a random page order, as bench/decode.py lays it out.
        nb=kv//PAGE
        perm=(torch.arange(b*nb,device='cuda') if "--inorder" in sys.argv else torch.randperm(b*nb,device='cuda')).view(b,nb)
        kp=torch.empty(b*nb,PAGE,hkv,d,device='cuda',dtype=torch.bfloat16); vp=torch.empty_like(kp)
        kp.index_copy_(0,perm.flatten(),k.reshape(b*nb,PAGE,hkv,d)); vp.index_copy_(0,perm.flatten(),v.reshape(b*nb,PAGE,hkv,d))
        seqlens=torch.full((b,),kv,dtype=torch.int32,device='cuda'); table=perm.to(torch.int32)
        dense=f()
        f=lambda: ut.flash_attn_with_kvcache(q,kp,vp,cache_seqlens=seqlens,block_table=table,causal=True)
        perr=(f().float()-dense.float()).abs().max().item()
    tu=t(f); tug=tg(f)
    line=f"b{b} kv{kv} hkv{hkv} d{d}: ufa {tu:.1f}us graph {tug:.1f}us {byt/tug/1e3:.0f}GB/s ({byt/tug/1e3/bw*100:.0f}%)"
    if PAGE: line+=f" paged{PAGE} vs dense max diff {perr:.3g}"
    if TORCH:
        qt,kt,vt=q.transpose(1,2),k.transpose(1,2).contiguous(),v.transpose(1,2).contiguous()
        res={}
        for name,bk in [("cudnn",SDPBackend.CUDNN_ATTENTION),("flash",SDPBackend.FLASH_ATTENTION),("eff",SDPBackend.EFFICIENT_ATTENTION)]:
            try:
                with sdpa_kernel(bk):
                    g=lambda: F.scaled_dot_product_attention(qt,kt,vt,enable_gqa=hkv!=hq)
                    res[name]=(t(g), tg(g))
            except Exception as ex: res[name]=(float('nan'),)*2
        ref=F.scaled_dot_product_attention(qt.float(),kt.float(),vt.float(),enable_gqa=hkv!=hq).transpose(1,2)
        err=(f().float()-ref).abs().max().item()
        ok=[v for v in res.values() if v[0]==v[0]]
        best=min(v[0] for v in ok); bestg=min(v[1] for v in ok if v[1]==v[1])
        line+="  "+" ".join(f"{n} {v[0]:.1f}/{v[1]:.1f}" for n,v in res.items())+f"  ratio {best/tu:.2f} graph-ratio {bestg/tug:.2f} err {err:.3g}"
        del qt,kt,vt
    print(line, flush=True)
    del q,k,v
    if PAGE: del kp,vp
if "--prof" in sys.argv:
    from torch.profiler import profile, ProfilerActivity
    for (b,kv,hkv,d) in [(1,8192,8,128),(1,131072,8,128),(8,32768,1,128)]:
        q=torch.randn(b,1,32,d,device='cuda',dtype=torch.bfloat16)
        k=torch.randn(b,kv,hkv,d,device='cuda',dtype=torch.bfloat16); v=torch.randn_like(k)
        for _ in range(3): ut.flash_attn_func(q,k,v)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as pr:
            for _ in range(5): ut.flash_attn_func(q,k,v)
            torch.cuda.synchronize()
        print(f"b{b} kv{kv} hkv{hkv}:")
        for ev in pr.key_averages():
            if ev.device_type.name == "CUDA" or getattr(ev, "device_time_total", 0) > 0:
                print(f"   {ev.key[:60]:<60} n={ev.count} avg {ev.device_time_total/max(ev.count,1):.1f}us")
