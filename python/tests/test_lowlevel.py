"""The low-level ops with caller-owned outputs (ufa.torch.attention_forward_out /
attention_backward_out), as ring attention uses them: keys split across calls, partial states
merged, gradients of each key block written into slices of the full buffers and dq
accumulated; against autograd through the whole attention, eager and under torch.compile."""

from __future__ import annotations

import pytest
import torch

import ufa
import ufa.torch as ut
from conftest import rel_err


def qkv(device, requires_grad=False):
    torch.manual_seed(0)
    q = torch.randn(2, 50, 4, 32, device=device)
    k = torch.randn(2, 50, 2, 32, device=device)
    v = torch.randn(2, 50, 2, 32, device=device)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def ring_step(q, k, v, dout, blocks, causal):
    """Forward over each key block into slices of one buffer, merge, then each block's
    backward with the merged out/lse: dk/dv into slices, dq accumulated. Causal attention over
    [0, lo) and [lo, seqlen) keys: the first block aligned top-left, the last bottom-right."""
    b, sq, hq, d = q.shape
    outs = torch.empty((len(blocks), b, sq, hq, d), device=q.device)
    lses = torch.empty((len(blocks), b, hq, sq), device=q.device)
    for i, (lo, hi, top_left) in enumerate(blocks):
        ut.attention_forward_out(q, k[:, lo:hi], v[:, lo:hi], outs[i], lses[i], causal=causal,
                                 top_left=top_left)
    out = torch.empty_like(outs[0])
    lse = torch.empty_like(lses[0])
    ut.merge_states_out(list(outs.unbind(0)), list(lses.unbind(0)), out, lse)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for lo, hi, top_left in blocks:
        ut.attention_backward_out(dout, q, k[:, lo:hi], v[:, lo:hi], out, lse, dq, dk[:, lo:hi],
                                  dv[:, lo:hi], causal=causal, top_left=top_left,
                                  accumulate=True)
    return out, lse, dq, dk, dv


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_ring_attention_matches_autograd(device, compiled, causal):
    q, k, v = qkv(device, requires_grad=True)
    want, want_lse = ut._attention(q, k, v, None, causal, True, -1, -1, 0.0, None, None, False,
                                   True)
    dout = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, (q, k, v), dout)
    step = ring_step
    if compiled:
        torch._dynamo.reset()
        step = torch.compile(ring_step, fullgraph=True, backend="aot_eager")
    out, lse, dq, dk, dv = step(*(t.detach() for t in (q, k, v)), dout,
                                [(0, 17, True), (17, 50, False)], causal)
    assert rel_err(out, want) < 1e-5 and rel_err(lse, want_lse) < 1e-5
    for got, w in zip((dq, dk, dv), want_grads):
        assert rel_err(got, w) < 1e-5


def test_outputs_are_written_in_place(device):
    q, k, v = qkv(device)
    want, want_lse = ut._attention(q, k, v, None, True, False, -1, -1, 0.0, None, None, False,
                                   True)
    big = torch.full((2, 50, 4, 64), float("nan"), device=device)
    lse = torch.empty((2, 4, 50), device=device)
    assert ut.attention_forward_out(q, k, v, big[..., 16:48], lse, causal=True) is None
    assert rel_err(big[..., 16:48], want) < 1e-5 and rel_err(lse, want_lse) < 1e-5
    assert big[..., :16].isnan().all() and big[..., 48:].isnan().all()
    dout = torch.randn_like(want)
    grads = [torch.ones_like(t) for t in (q, k, v)]
    fresh = [torch.empty_like(t) for t in (q, k, v)]
    ut.attention_backward_out(dout, q, k, v, want, want_lse, *fresh, causal=True)
    ut.attention_backward_out(dout, q, k, v, want, want_lse, *grads, causal=True,
                              accumulate=True)
    for g, f in zip(grads, fresh):
        assert rel_err(g - 1, f) < 1e-5


def test_bad_buffers_are_errors(device):
    q, k, v = qkv(device)
    out, lse = torch.zeros(2, 50, 4, 32, device=device), torch.zeros(2, 4, 49, device=device)
    with pytest.raises(ValueError, match="lse"):
        ut.attention_forward_out(q, k, v, out, lse)
    assert (out == 0).all(), "nothing is written on error"
