"""Gradients through ufa's backward pass against PyTorch autograd through the math backend in
float64; torch.compile(fullgraph=True) of a module using SDPA, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ufa
import ufa.torch as ut
from conftest import reference, rel_err

CASES = {
    "plain": {},
    "causal_bottom_right": {"causal": True},
    "window_softcap": {"window": (3, 1), "softcap": 3.0},
    "alibi": {"alibi": True, "causal": True},
}


def _leaves(shapes, dtype, device):
    return [torch.randn(s, dtype=dtype, device=device, requires_grad=True) for s in shapes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES))
def test_flash_attn_gradients(device, dtype, case):
    b, sq, skv, hq, hkv, d = 2, 11, 19, 4, 2, 32
    q, k, v = _leaves([(b, sq, hq, d), (b, skv, hkv, d), (b, skv, hkv, d)], dtype, device)
    kw = dict(CASES[case])
    ref_kw = {key: kw[key] for key in ("causal", "window", "softcap") if key in kw}
    fa_kw = {"causal": kw.get("causal", False), "window_size": kw.get("window", (-1, -1)),
             "softcap": kw.get("softcap", 0.0)}
    if kw.get("alibi"):
        slopes = torch.rand(hq, device=device)
        fa_kw["alibi_slopes"] = slopes
        ref_kw["alibi"] = slopes.cpu()
    out = ut.flash_attn_func(q, k, v, deterministic=True, **fa_kw)
    dout = torch.randn_like(out)
    out.backward(dout)
    ref_out, _, leaves = reference(q, k, v, grad=True, **ref_kw)
    ref_out.backward(dout.transpose(0, 0).double().cpu())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert rel_err(out, ref_out) < tol
    for name, got, want in zip("qkv", (q.grad, k.grad, v.grad), leaves):
        assert got.dtype == dtype and got.shape == want.shape, name
        assert rel_err(got, want.grad) < tol, name


@pytest.mark.parametrize("mask", [None, "bool", "float"])
@pytest.mark.parametrize("gqa", [False, True])
def test_sdpa_gradients_vs_math(device, mask, gqa):
    """Both sides through SDPA: ufa's against PyTorch's math backend in float64."""
    b, hq, sq, skv, d = 2, 4, 9, 14, 16
    hkv = 2 if gqa else hq
    q, k, v = _leaves([(b, hq, sq, d), (b, hkv, skv, d), (b, hkv, skv, d)], torch.float32,
                      device)
    m = None
    if mask == "bool":
        m = torch.rand(1, hq, sq, skv, device=device) > 0.3
    elif mask == "float":
        m = torch.randn(sq, skv, device=device)
    causal = mask is None
    out = ut.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal,
                                          enable_gqa=gqa)
    dout = torch.randn_like(out)
    out.backward(dout)
    q64, k64, v64 = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    m64 = None if m is None else (m.cpu() if m.dtype == torch.bool else m.double().cpu())
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        want = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=m64, is_causal=causal,
                                              enable_gqa=gqa)
    want.backward(dout.double().cpu())
    assert rel_err(out, want) < 1e-5
    for name, got, ref in zip("qkv", (q.grad, k.grad, v.grad), (q64, k64, v64)):
        assert rel_err(got, ref.grad) < 1e-4, name


@pytest.mark.parametrize("grad", ["sum", "strided", "bhsd_views"])
def test_sdpa_short_path_gradients_of_any_layout(device, grad):
    """The SDPA short path's backward (``_ufa.sdpa_backward``, [B, H, S, D] as given) against
    PyTorch's math backend in float64, with output gradients the core cannot read as they are
    (the gradient of a sum: stride 0 everywhere; a last dimension of stride 2: copied first)
    and with inputs that are transposed views of [B, S, H, D] tensors (read in place)."""
    b, h, sq, skv, d = 2, 3, 7, 12, 16
    if grad == "bhsd_views":
        leaves = _leaves([(b, sq, h, d), (b, skv, h, d), (b, skv, h, d)], torch.float32, device)
        q, k, v = (t.transpose(1, 2) for t in leaves)
    else:
        leaves = _leaves([(b, h, sq, d), (b, h, skv, d), (b, h, skv, d)], torch.float32, device)
        q, k, v = leaves
    before = ut.fallback_stats().get("ufa", 0)
    out = ut.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert ut.fallback_stats().get("ufa", 0) == before + 1
    if grad == "sum":
        dout = torch.ones(()).expand(out.shape)
        out.sum().backward()
    else:
        dout = torch.randn(*out.shape[:-1], 2 * d, device=device)[..., ::2]
        out.backward(dout)
    q64, k64, v64 = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        want = F.scaled_dot_product_attention(q64, k64, v64, is_causal=True)
    want.backward(dout.double().cpu())
    assert rel_err(out, want) < 1e-5
    for name, got, ref in zip("qkv", (t.grad for t in leaves), (q64, k64, v64)):
        want_grad = ref.grad.transpose(1, 2) if grad == "bhsd_views" else ref.grad
        assert got.shape == want_grad.shape, name
        assert rel_err(got, want_grad) < 1e-5, name


def test_lse_is_saved_not_recomputed():
    """The backward reads the very LSE tensor the forward wrote (probe: the pointer the core
    received), so no forward is re-run to get it."""
    q = torch.randn(1, 5, 2, 8, requires_grad=True)
    out, lse, _ = ut.flash_attn_func(q, q, q, causal=True, return_attn_probs=True)
    assert not lse.requires_grad
    ufa._ufa._debug_record(True)
    try:
        out.sum().backward()
        rec = {name: ptr for name, ptr, _, _ in ufa._ufa._debug_last_call()}
    finally:
        ufa._ufa._debug_record(False)
    assert rec["lse"] == lse.data_ptr() and rec["out"] == out.data_ptr() and "dq" in rec


class Block(nn.Module):
    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, s, c = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, c // self.heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, s, c))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    model = Block().to(device)
    x = torch.randn(2, 12, 32, device=device)
    want = model(x)
    want.square().mean().backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with ut.patched():
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        ut.reset_fallback_stats()
        ufa._ufa._debug_record(True)
        try:
            got = compiled(x)
            got.square().mean().backward()
            rec = [name for name, *_ in ufa._ufa._debug_last_call()]
        finally:
            ufa._ufa._debug_record(False)
    assert "dq" in rec, "the compiled backward did not run ufa's backward"
    assert rel_err(got, want) < 1e-5
    for p, g in zip(model.parameters(), want_grads):
        assert rel_err(p.grad, g) < 1e-4
    torch._dynamo.reset()


def test_custom_ops_pass_opcheck():
    """torch.library.opcheck: schema, fake (meta) implementation, autograd registration."""
    q = torch.randn(2, 7, 4, 16, requires_grad=True)
    k = torch.randn(2, 9, 2, 16, requires_grad=True)
    v = torch.randn(2, 9, 2, 8, requires_grad=True)
    mask = torch.rand(7, 9) > 0.2
    args = (q, k, v, mask, None, 0.3, True, True, -1, -1, 0.0, False)
    torch.library.opcheck(torch.ops.ufa.attention_forward.default, args)
    out, lse = torch.ops.ufa.attention_forward(*args)
    dout = torch.randn_like(out)
    bargs = (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, mask, None, 0.3, True,
             True, -1, -1, 0.0, False)
    torch.library.opcheck(torch.ops.ufa.attention_backward.default, bargs)


def test_custom_op_autograd_matches_eager_function():
    """The registered autograd (used under torch.compile) and the eager autograd.Function give
    the same gradients."""
    q = torch.randn(1, 6, 2, 16, requires_grad=True)
    k = torch.randn(1, 8, 2, 16, requires_grad=True)
    args = (None, None, None, True, False, 2, -1, 0.0, False)
    out, _ = torch.ops.ufa.attention_forward(q, k, k, *args)
    grads_op = torch.autograd.grad(out.sum(), (q, k))
    out2 = ut.flash_attn_func(q, k, k, causal=True, window_size=(2, -1))
    grads_fn = torch.autograd.grad(out2.sum(), (q, k))
    assert torch.equal(out, out2)
    for a, b in zip(grads_op, grads_fn):
        assert torch.equal(a, b)


def test_torch_compile_inference(device):
    """Forward-only compiled graph (no gradients needed, so it also runs where the core has no
    backward pass): fullgraph, ufa's custom op inside, same result as eager PyTorch."""
    torch._dynamo.reset()
    model = Block().to(device).eval()
    x = torch.randn(2, 12, 32, device=device)
    with torch.no_grad():
        want = model(x)
        with ut.patched():
            compiled = torch.compile(model, fullgraph=True)
            ufa._ufa._debug_record(True)
            try:
                got = compiled(x)
                rec = [name for name, *_ in ufa._ufa._debug_last_call()]
            finally:
                ufa._ufa._debug_record(False)
    assert "q" in rec, "the compiled graph did not call ufa"
    assert rel_err(got, want) < 1e-5
    torch._dynamo.reset()


@pytest.mark.parametrize("api", ["sdpa", "flash_attn_func"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_last_dim_strided_inputs_are_copied_not_refused(device, api, grad):
    """q, k and v whose last dimension is strided (every other element of a wider buffer) are
    accepted as by PyTorch's SDPA and FlashAttention (which copy them), forward and backward,
    instead of failing the core's contiguous-last-dimension rule."""
    b, h, s, d = 2, 3, 10, 16
    wide = [torch.randn(b, h, s, 2 * d, device=device, requires_grad=grad) for _ in range(3)]
    q, k, v = (w[..., ::2] for w in wide)
    assert q.stride(-1) == 2
    if api == "sdpa":
        out = ut.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        out = ut.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                 causal=True).transpose(1, 2)
    x64 = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        want = F.scaled_dot_product_attention(*x64, is_causal=True)
    assert rel_err(out, want) < 1e-5
    if grad:
        dout = torch.randn_like(out)
        out.backward(dout)
        want.backward(dout.double().cpu())
        for name, w, ref in zip("qkv", wide, x64):
            assert rel_err(w.grad[..., ::2], ref.grad) < 1e-4, name
            assert torch.count_nonzero(w.grad[..., 1::2]) == 0, name


def test_sdpa_common_call_head_dim_v_and_scale(device):
    """SDPA's short path (torch.py, _sdpa_short) with a value head dim of its own, an explicit
    scale and a causal mask, forward and gradients against PyTorch's math backend in
    float64."""
    b, h, sq, skv, d, dv = 2, 3, 7, 12, 16, 24
    q, k, v = _leaves([(b, h, sq, d), (b, h, skv, d), (b, h, skv, dv)], torch.float32, device)
    out = ut.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    dout = torch.randn_like(out)
    out.backward(dout)
    x64 = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        want = F.scaled_dot_product_attention(*x64, is_causal=True, scale=0.3)
    want.backward(dout.double().cpu())
    assert out.shape == (b, h, sq, dv)
    assert rel_err(out, want) < 1e-5
    for name, got, ref in zip("qkv", (q.grad, k.grad, v.grad), x64):
        assert rel_err(got, ref.grad) < 1e-4, name


def test_sdpa_common_call_is_one_node_that_checks_its_inputs():
    """The short path records one autograd node straight on the caller's tensors (no views of
    its own), saves its inputs as PyTorch's own SDPA does (an in-place change of q before the
    backward is an error, not a wrong gradient), and counts each call it serves once."""
    ut.reset_fallback_stats()
    q, k, v = _leaves([(1, 2, 5, 8)] * 3, torch.float32, "cpu")
    out = ut.scaled_dot_product_attention(q, k, v)
    with torch.no_grad():
        ut.scaled_dot_product_attention(q, k, v)
    assert ut.fallback_stats() == {"ufa": 2}
    assert {type(f).__name__ for f, _ in out.grad_fn.next_functions} == {"AccumulateGrad"}
    with torch.no_grad():
        q.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_sdpa_call_the_core_refuses_still_falls_back():
    """A call that looks common but is not ufa's (float64) is refused by the core on the short
    path with nothing written, and goes on to PyTorch's function, counted under its reason."""
    ut.reset_fallback_stats()
    q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    with pytest.warns(RuntimeWarning, match="dtype"):
        out = ut.scaled_dot_product_attention(q, k, v)
    assert ut.fallback_stats() == {"dtype": 1}
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
