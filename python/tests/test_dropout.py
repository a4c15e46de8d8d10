"""Attention dropout through the PyTorch API: forward and gradients against a float64
computation that applies exactly the factors the core draws (read back with the
``_dropout_factors`` hook), on CPU and CUDA tensors and under torch.compile; seeding from PyTorch's
generator, and where dropout is not served yet (CUDA graph capture)."""

from __future__ import annotations

import math

import pytest
import torch

import ufa.torch as ut
import ufa
from conftest import rel_err, tolerance
from ufa import _ufa


def _reference(q, k, v, p, seed, *, causal, top_left, bh0=0):
    """Attention in float64, ufa layout [B, S, H, D], with the core's dropout factors (from
    (batch, head) pair number ``bh0`` on: one sequence of a packed batch)."""
    b, sq, hq, d = q.shape
    skv, hkv = k.shape[1], k.shape[2]
    z = torch.tensor(_ufa._dropout_factors(p, seed, 0, bh0 + b * hq, sq, skv),
                     dtype=torch.float64)
    z = z.reshape(-1, hq, sq, skv)[bh0 // hq:]
    qh = q.permute(0, 2, 1, 3)
    kh = k.permute(0, 2, 1, 3).repeat_interleave(hq // hkv, 1)
    vh = v.permute(0, 2, 1, 3).repeat_interleave(hq // hkv, 1)
    s = qh @ kh.transpose(-1, -2) / math.sqrt(d)
    if causal:
        offset = 0 if top_left else skv - sq
        i = torch.arange(sq).unsqueeze(1)
        j = torch.arange(skv).unsqueeze(0)
        s = s.masked_fill(j > i + offset, float("-inf"))
    out = (torch.softmax(s, -1) * z) @ vh
    return out.permute(0, 2, 1, 3)


def _leaves(*shapes):
    return [torch.randn(s, dtype=torch.float32, requires_grad=True) for s in shapes]


@pytest.mark.parametrize("p", [0.1, 0.6])
def test_flash_attn_func_dropout_matches_reference(p):
    b, sq, skv, hq, hkv, d = 2, 13, 21, 4, 2, 32
    q, k, v = _leaves((b, sq, hq, d), (b, skv, hkv, d), (b, skv, hkv, d))
    torch.manual_seed(123)
    seed = ut._dropout_seed(q, 0.5)
    torch.manual_seed(123)
    out = ut.flash_attn_func(q, k, v, dropout_p=p, causal=True)
    x64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = _reference(*x64, p, seed, causal=True, top_left=False)
    assert rel_err(out, want) < 1e-5
    dout = torch.randn_like(out)
    out.backward(dout)
    want.backward(dout.double())
    for name, got, ref in zip("qkv", (q.grad, k.grad, v.grad), x64):
        assert rel_err(got, ref.grad) < 1e-4, name


def test_sdpa_dropout_is_served_and_matches_reference():
    b, h, sq, skv, d = 2, 3, 9, 9, 16
    q, k, v = _leaves((b, h, sq, d), (b, h, skv, d), (b, h, skv, d))
    ut.reset_fallback_stats()
    torch.manual_seed(5)
    seed = ut._dropout_seed(q, 0.5)
    torch.manual_seed(5)
    out = ut.scaled_dot_product_attention(q, k, v, dropout_p=0.25, is_causal=True)
    assert ut.fallback_stats() == {"ufa": 1}
    x64 = [t.detach().double().transpose(1, 2).requires_grad_() for t in (q, k, v)]
    want = _reference(*x64, 0.25, seed, causal=True, top_left=True).transpose(1, 2)
    assert rel_err(out, want) < 1e-5
    dout = torch.randn_like(out)
    out.backward(dout)
    want.backward(dout.double())
    for name, got, ref in zip("qkv", (q.grad, k.grad, v.grad), x64):
        assert rel_err(got, ref.grad.transpose(1, 2)) < 1e-4, name
    # Without grad: the same mask for the same generator state.
    with torch.no_grad():
        torch.manual_seed(5)
        again = ut.scaled_dot_product_attention(q, k, v, dropout_p=0.25, is_causal=True)
    assert torch.equal(again, out.detach())


def test_varlen_dropout_matches_reference():
    """Sequence b of a packed batch draws its mask as batch entry b; forward and gradients."""
    lq, lk, hq, hkv, d, p = [5, 9], [7, 12], 4, 2, 16, 0.4
    q, k, v = _leaves((sum(lq), hq, d), (sum(lk), hkv, d), (sum(lk), hkv, d))
    cu_q = torch.tensor([0, 5, 14], dtype=torch.int32)
    cu_k = torch.tensor([0, 7, 19], dtype=torch.int32)
    torch.manual_seed(77)
    seed = ut._dropout_seed(q, p)
    torch.manual_seed(77)
    out = ut.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 9, 12, dropout_p=p, causal=True)
    x64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    parts = []
    for b in range(2):
        qs = x64[0][cu_q[b]:cu_q[b + 1]].unsqueeze(0)
        ks, vs = (t[cu_k[b]:cu_k[b + 1]].unsqueeze(0) for t in x64[1:])
        parts.append(_reference(qs, ks, vs, p, seed, causal=True, top_left=False,
                                bh0=b * hq)[0])
    want = torch.cat(parts)
    assert rel_err(out, want) < 1e-5
    dout = torch.randn_like(out)
    out.backward(dout)
    want.backward(dout.double())
    for name, got, ref in zip("qkv", (q.grad, k.grad, v.grad), x64):
        assert rel_err(got, ref.grad) < 1e-4, name


def test_seeded_by_torch_generator():
    q = torch.randn(1, 64, 2, 16)
    torch.manual_seed(9)
    a = ut.flash_attn_func(q, q, q, dropout_p=0.5)
    b = ut.flash_attn_func(q, q, q, dropout_p=0.5)
    torch.manual_seed(9)
    assert torch.equal(ut.flash_attn_func(q, q, q, dropout_p=0.5), a)
    assert not torch.equal(a, b)


def test_dropout_keeps_the_expectation():
    """With v all ones every output is Σ_j z_j P_j: 1 on average over many rows."""
    q = torch.randn(4, 256, 4, 16)
    out = ut.flash_attn_func(q, q, torch.ones_like(q), dropout_p=0.3)
    assert abs(out.mean().item() - 1.0) < 0.02
    assert (out.std() > 0.05).item()


def test_bad_rng_state_is_refused():
    """The custom ops' generator state (what a compiled graph passes) must be an int64 CPU
    tensor [seed, offset]: anything else is a clear error naming it."""
    q = torch.randn(1, 8, 2, 16)
    for bad in (torch.zeros(3, dtype=torch.int64), torch.zeros(2, dtype=torch.int32),
                torch.zeros(2, 1, dtype=torch.int64)):
        with pytest.raises(ValueError, match="rng must be the dropout generator state"):
            ut.attention_forward(q, q, q, None, None, None, False, False, -1, -1, 0.0, False,
                                 0.5, 0, 0, bad)
    rng = torch.tensor([123, 4], dtype=torch.int64)
    a, _ = ut.attention_forward(q, q, q, None, None, None, False, False, -1, -1, 0.0, False,
                                0.5, 0, 0, rng)
    b, _ = ut.attention_forward(q, q, q, None, None, None, False, False, -1, -1, 0.0, False,
                                0.5, 123, 4)
    assert torch.equal(a, b), "rng and (seed, offset) must name the same mask"


def test_bad_rate_is_refused():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="dropout p=1"):
        ut.flash_attn_func(q, q, q, dropout_p=1.0)


@pytest.mark.skipif(not ufa.cuda_available(), reason="needs ufa's CUDA backend")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_dropout_matches_reference(dtype):
    """CUDA tensors: forward and gradients against the float64 computation with the core's
    factors, GQA and causal, at a size of several tiles; SDPA serves it (no fallback)."""
    b, sq, skv, hq, hkv, d, p = 2, 150, 203, 4, 2, 64, 0.3
    q, k, v = (torch.randn(s, device="cuda", dtype=dtype, requires_grad=True)
               for s in ((b, sq, hq, d), (b, skv, hkv, d), (b, skv, hkv, d)))
    torch.manual_seed(3)
    seed = ut._dropout_seed(q, p)
    torch.manual_seed(3)
    out = ut.flash_attn_func(q, k, v, dropout_p=p, causal=True)
    x64 = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    want = _reference(*x64, p, seed, causal=True, top_left=False)
    tol = tolerance(dtype)
    assert rel_err(out, want) < tol
    dout = torch.randn_like(out)
    out.backward(dout)
    want.backward(dout.cpu().double())
    for name, got, ref in zip("qkv", (q.grad, k.grad, v.grad), x64):
        assert rel_err(got, ref.grad) < 10 * tol, name

    ut.reset_fallback_stats()
    qb = q.detach().transpose(1, 2)
    ut.scaled_dot_product_attention(qb, qb, qb, dropout_p=0.1)
    assert ut.fallback_stats() == {"ufa": 1}


@pytest.mark.skipif(not ufa.cuda_available(), reason="needs ufa's CUDA backend")
def test_cuda_graph_capture_refuses_dropout():
    """A captured call would replay one mask: refused (SDPA falls back), never silently."""
    q = torch.randn(1, 64, 2, 16, device="cuda", dtype=torch.float16)
    ut.flash_attn_func(q, q, q)  # compile and load the kernel outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        with pytest.raises(NotImplementedError, match="CUDA graph"):
            ut.flash_attn_func(q, q, q, dropout_p=0.1)


def _graphs_of(fn, *args):
    """Runs ``torch.compile(fn, fullgraph=True)`` through a backend that keeps each graph's
    text before handing it to aot_eager; returns (result, graph texts)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, _inputs):
        graphs.append(str(gm.graph))
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=keep, bw_compiler=keep)
    return torch.compile(fn, backend=backend, fullgraph=True)(*args), graphs


def test_compiled_dropout_runs_ufa_and_draws_anew():
    """Under torch.compile (fullgraph) SDPA and flash_attn_func with dropout trace ufa's ops,
    forward and backward, with the generator state drawn by the graph: each run drops other
    probabilities, and the output keeps its expectation (v all ones: every output is 1 on
    average)."""

    def sdpa(q):
        return ut.scaled_dot_product_attention(q, q, torch.ones_like(q), dropout_p=0.5)

    def flash(q):
        return ut.flash_attn_func(q, q, torch.ones_like(q), dropout_p=0.5, causal=True)

    for fn, shape in ((sdpa, (2, 2, 256, 16)), (flash, (2, 256, 2, 16))):
        q = torch.randn(shape, requires_grad=True)
        out, graphs = _graphs_of(fn, q)
        out.sum().backward()  # compiles the backward graph
        assert torch.isfinite(q.grad).all()
        assert any("ufa.attention_forward" in g for g in graphs), graphs
        assert any("ufa.attention_backward" in g for g in graphs), graphs
        again = torch.compile(fn, fullgraph=True)(q)  # inductor
        assert not torch.equal(out, again)
        for o in (out, again):
            assert abs(o.mean().item() - 1.0) < 0.05


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_dropout_backward_takes_the_forwards_mask(backend):
    """With V the identity the output is the kept probabilities P∘Z, and with dO all ones
    dV[j] = Σ_i (P∘Z)[i, j] in every column: the backward of a compiled call regenerates its
    forward's mask (the graph's generator state reaches both)."""
    b, s, h, d = 2, 24, 2, 32
    q = torch.randn(b, s, h, d, requires_grad=True)
    k = torch.randn(b, s, h, d, requires_grad=True)
    v = torch.eye(s, d).expand(b, h, s, d).transpose(1, 2).contiguous().requires_grad_()

    def f(q, k, v):
        return ut.flash_attn_func(q, k, v, dropout_p=0.4)

    torch._dynamo.reset()
    out = torch.compile(f, backend=backend, fullgraph=True)(q, k, v)
    out.backward(torch.ones_like(out))
    kept = out.detach()[..., :s]  # [b, i, h, j]
    assert (kept == 0).float().mean().item() > 0.2, "nothing dropped"
    want = kept.sum(1).transpose(1, 2).unsqueeze(-1).expand(b, s, h, d)  # [b, j, h, ·]
    assert rel_err(v.grad, want) < 1e-5


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_varlen_dropout_takes_one_mask_and_draws_anew(backend):
    """Packed batches under torch.compile (fullgraph): the graph draws the generator state, so
    the backward regenerates its forward's mask (V the identity within each sequence, dO all
    ones: dV[j] = Σ_i (P∘Z)[i, j] in every column), and each run drops other probabilities."""
    lens, h, d = (9, 15), 2, 16
    cu = torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32)
    total = sum(lens)
    q = torch.randn(total, h, d, requires_grad=True)
    k = torch.randn(total, h, d, requires_grad=True)
    # Row t of sequence b is the one-hot of its position in b.
    eye = torch.cat([torch.eye(n, d) for n in lens])
    v = eye.unsqueeze(1).expand(total, h, d).contiguous().requires_grad_()

    def f(q, k, v):
        return ut.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), dropout_p=0.4,
                                         causal=True)

    torch._dynamo.reset()
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    out = compiled(q, k, v)
    out.backward(torch.ones_like(out))
    assert (out.detach()[..., :max(lens)] == 0).float().mean().item() > 0.2, "nothing dropped"
    for b, (start, n) in enumerate(((0, lens[0]), (lens[0], lens[1]))):
        kept = out.detach()[start:start + n, :, :n]  # [i, h, j]
        want = kept.sum(0).transpose(0, 1).unsqueeze(-1).expand(n, h, d)  # [j, h, ·]
        assert rel_err(v.grad[start:start + n], want) < 1e-5, f"sequence {b}"
    assert not torch.equal(out, compiled(q, k, v))


def test_compiled_varlen_dropout_traces_ufa_ops():
    """The compiled forward and backward of a packed batch with dropout are ufa's ops."""
    q = torch.randn(10, 2, 16, requires_grad=True)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)

    def f(q):
        return ut.flash_attn_varlen_func(q, q, q, cu, cu, 6, 6, dropout_p=0.1)

    out, graphs = _graphs_of(f, q)
    out.sum().backward()
    assert torch.isfinite(q.grad).all()
    assert any("ufa.varlen_forward" in g for g in graphs), graphs
    assert any("ufa.varlen_backward" in g for g in graphs), graphs
