"""The float64 reference the Python GPU benchmarks check their answers against (one definition
for bench/*.py): attention of one head, computed by PyTorch in float64, and relative errors."""

import math

import torch


def attention_head(q, k, v, causal, dout=None):
    """float64 attention of batch entry 0, head 0 of [B, S, H, D] tensors (ufa's layout; v may
    have its own head dim): [out], or with `dout` [out, dq, dk, dv]."""
    q64, k64, v64 = (t[0, :, 0].detach().double().requires_grad_(dout is not None)
                     for t in (q, k, v))
    s = q64 @ k64.T / math.sqrt(q.shape[-1])
    if causal:
        n = s.shape[0]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1),
                          float("-inf"))
    out = torch.softmax(s, -1) @ v64
    if dout is None:
        return [out.detach()]
    return [out.detach(), *torch.autograd.grad(out, (q64, k64, v64), dout[0, :, 0].double())]


def worst_error(got, want):
    """The largest relative error (Frobenius norms) of tensors `got` in ufa's layout, at batch
    entry 0 and head 0, against `want` from attention_head, pair by pair."""
    return max(((g[0, :, 0].double() - w).norm() / w.norm()).item() for g, w in zip(got, want))
