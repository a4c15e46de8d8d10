#!/usr/bin/env python3
"""One decoding shape, ufa then cuDNN, three calls each: the program to run under ncu.

    ncu --clock-control none --launch-skip 2 --launch-count 1 -k regex:decode \
        --metrics lts__t_sectors_srcunit_tex_op_read.sum,lts__t_requests_srcunit_tex_op_read.sum,\
gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed \
        python3 bench/decode_ncu_case.py BATCH KV KV_HEADS HEAD_DIM [bhsd]

32 query heads, one query token, bf16; K/V [b, kv, hkv, d] (or [b, hkv, kv, d] seen
transposed with `bhsd`). `-k regex:decode` picks ufa's decoding kernel; cuDNN's is named
otherwise (`-k regex:sdpa` for it).
"""
import sys
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import ufa.torch as ut

warnings.filterwarnings("ignore")
b, kv, hkv, d = (int(x) for x in sys.argv[1:5])
q = torch.randn(b, 1, 32, d, device="cuda", dtype=torch.bfloat16)
if sys.argv[5:6] == ["bhsd"]:
    k = torch.randn(b, hkv, kv, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    v = torch.randn(b, hkv, kv, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
else:
    k = torch.randn(b, kv, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
for _ in range(3):
    ut.flash_attn_func(q, k, v, causal=True)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=hkv < 32)
torch.cuda.synchronize()
