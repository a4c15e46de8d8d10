"""Outputs and LSE against a float64 reference (PyTorch's math SDPA in float64) for every feature
and dtype, odd sizes and GQA; NumPy in and out; in-place outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ufa
import ufa.torch as ut
from conftest import TF32_TOLERANCE, reference, rel_err, tolerance
from torch.nn.attention import SDPBackend, sdpa_kernel

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (name, ufa.attention keyword arguments, extra shape settings)
FEATURES = {
    "plain": {},
    "scale": {"scale": 0.3},
    "causal": {"causal": True},
    "window": {"window": (5, 2)},
    "causal_window": {"causal": True, "window": (4, -1)},
    "softcap": {"softcap": 2.5, "scale": 1.5},
    "alibi": {"alibi": True},
    "alibi_causal": {"alibi": True, "causal": True},
    "bool_mask": {"mask": "bool"},
    "float_mask": {"mask": "float"},
}


def make_qkv(b, sq, skv, hq, hkv, d, dv, dtype, device, layout="bshd"):
    q = torch.randn(b, sq, hq, d, dtype=dtype, device=device)
    k = torch.randn(b, skv, hkv, d, dtype=dtype, device=device)
    v = torch.randn(b, skv, hkv, dv, dtype=dtype, device=device)
    return q, k, v


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("sq,skv", [(17, 33), (33, 17), (1, 9)])
def test_attention_matches_reference(device, dtype, feature, sq, skv):
    b, hq, hkv, d, dv = 2, 4, 2, 40, 24
    q, k, v = make_qkv(b, sq, skv, hq, hkv, d, dv, dtype, device)
    kw = dict(FEATURES[feature])
    ref_kw = {key: kw[key] for key in ("scale", "causal", "window", "softcap") if key in kw}
    if kw.pop("alibi", False):
        slopes = torch.rand(b, hq, device=device) * 0.5
        kw["alibi_slopes"] = slopes
        ref_kw["alibi"] = slopes.cpu()
    mask_kind = kw.pop("mask", None)
    if mask_kind == "bool":
        m = torch.rand(b, 1, sq, skv, device=device) > 0.3  # broadcast over heads
        m[0, 0, 0] = False  # one row sees no key: zeros and LSE -inf
        kw["mask"] = m
        ref_kw["mask"] = m.cpu()
    elif mask_kind == "float":
        m = torch.randn(sq, skv, device=device).to(dtype)  # broadcast over batch and heads
        kw["mask"] = m
        ref_kw["mask"] = m.cpu()
    out, lse = ufa.attention(q, k, v, return_lse=True, **kw)
    ref_out, ref_lse = reference(q, k, v, **ref_kw)
    assert out.dtype == dtype and out.device.type == device and out.shape == (b, sq, hq, dv)
    assert lse.dtype == torch.float32 and lse.shape == (b, hq, sq)
    tol = tolerance(dtype)
    assert rel_err(out, ref_out) < tol
    assert rel_err(lse, ref_lse) < max(tol, 1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq,hkv,gqa", [(4, 4, False), (8, 2, True), (3, 1, True)])
def test_sdpa_matches_math_sdpa(device, dtype, causal, hq, hkv, gqa):
    """ufa's SDPA against PyTorch's math SDPA in float64 ([B, H, S, D], top-left causal)."""
    b, sq, skv, d = 2, 13, 29, 64
    q = torch.randn(b, hq, sq, d, dtype=dtype, device=device)
    k = torch.randn(b, hkv, skv, d, dtype=dtype, device=device)
    v = torch.randn(b, hkv, skv, d, dtype=dtype, device=device)
    out = ut.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        want = F.scaled_dot_product_attention(q.double().cpu(), k.double().cpu(),
                                              v.double().cpu(), is_causal=causal,
                                              enable_gqa=gqa)
    assert out.shape == want.shape and out.dtype == dtype
    assert rel_err(out, want) < tolerance(dtype)


@pytest.mark.parametrize("mask_shape", [(13, 29), (2, 1, 13, 29), (1, 4, 1, 29), (29,)])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_masks_broadcast(device, mask_shape, kind):
    b, h, sq, skv, d = 2, 4, 13, 29, 32
    q = torch.randn(b, h, sq, d, device=device)
    k = torch.randn(b, h, skv, d, device=device)
    v = torch.randn(b, h, skv, d, device=device)
    if kind == "bool":
        m = torch.rand(mask_shape, device=device) > 0.4
    else:
        m = torch.randn(mask_shape, device=device)
    ut.reset_fallback_stats()
    out = ut.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.2)
    assert ut.fallback_stats() == {"ufa": 1}
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        want = F.scaled_dot_product_attention(q.double().cpu(), k.double().cpu(),
                                              v.double().cpu(),
                                              attn_mask=m.cpu() if kind == "bool"
                                              else m.double().cpu(), scale=0.2)
    assert rel_err(out, want) < 1e-5


def test_sdpa_three_dims(device):
    q = torch.randn(3, 11, 16, device=device)
    k = torch.randn(3, 7, 16, device=device)
    v = torch.randn(3, 7, 8, device=device)
    out = ut.scaled_dot_product_attention(q, k, v, is_causal=True)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    assert out.shape == (3, 11, 8)
    assert rel_err(out, want) < 1e-5


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_func(device, causal):
    b, sq, skv, hq, hkv, d = 2, 9, 21, 6, 2, 48
    q, k, v = make_qkv(b, sq, skv, hq, hkv, d, d, torch.bfloat16, device)
    slopes = torch.rand(hq, device=device)
    out, lse, probs = ut.flash_attn_func(q, k, v, causal=causal, window_size=(7, 3),
                                         softcap=4.0, alibi_slopes=slopes,
                                         return_attn_probs=True)
    assert probs is None
    ref_out, ref_lse = reference(q, k, v, causal=causal, window=(7, 3), softcap=4.0,
                                 alibi=slopes.cpu())
    assert rel_err(out, ref_out) < 1e-2
    assert rel_err(lse, ref_lse) < 1e-2
    plain = ut.flash_attn_func(q, k, v, causal=causal)
    assert isinstance(plain, torch.Tensor)
    assert rel_err(plain, reference(q, k, v, causal=causal)[0]) < 1e-2


@pytest.mark.parametrize("head_dim", [1, 80, 160, 256])
@pytest.mark.parametrize("seqlen", [1, 129])
def test_odd_sizes(head_dim, seqlen):
    q, k, v = make_qkv(1, seqlen, seqlen + 6, 3, 1, head_dim, head_dim, torch.float32, "cpu")
    out, lse = ufa.attention(q, k, v, causal=True, return_lse=True)
    ref_out, ref_lse = reference(q, k, v, causal=True)
    assert rel_err(out, ref_out) < 1e-5
    assert rel_err(lse, ref_lse) < 1e-6


# --- NumPy ---------------------------------------------------------------------------------

def test_numpy_in_numpy_out():
    q = np.random.randn(2, 17, 4, 32).astype(np.float32)
    k = np.random.randn(2, 23, 2, 32).astype(np.float32)
    v = np.random.randn(2, 23, 2, 16).astype(np.float32)
    out, lse = ufa.attention(q, k, v, causal=True, return_lse=True)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (2, 17, 4, 16)
    assert isinstance(lse, np.ndarray) and lse.dtype == np.float32 and lse.shape == (2, 4, 17)
    ref_out, ref_lse = reference(q, k, v, causal=True)
    assert rel_err(out, ref_out) < 1e-5
    assert rel_err(lse, ref_lse) < 1e-6


def test_numpy_float16_and_strided_views_in_place():
    base = np.random.randn(2, 4, 17, 32).astype(np.float16)  # [B, H, S, D]
    q = base.transpose(0, 2, 1, 3)  # [B, S, H, D] view, not contiguous
    assert not q.flags.c_contiguous
    ufa._ufa._debug_record(True)
    try:
        out = ufa.attention(q, q, q)
        rec = {name: (ptr, strides) for name, ptr, _, strides in ufa._ufa._debug_last_call()}
    finally:
        ufa._ufa._debug_record(False)
    assert rec["q"] == (base.ctypes.data, tuple(s // 2 for s in q.strides))
    assert out.dtype == np.float16
    assert rel_err(out, reference(q, q, q)[0]) < 1e-2


def test_numpy_out_written_in_place():
    q = np.random.randn(1, 8, 2, 16).astype(np.float32)
    out = np.full((1, 8, 2, 16), np.nan, dtype=np.float32)
    got = ufa.attention(q, q, q, out=out)
    assert got is out
    assert rel_err(out, reference(q, q, q)[0]) < 1e-5


def test_numpy_read_only_out_rejected():
    q = np.random.randn(1, 8, 2, 16).astype(np.float32)
    out = np.zeros_like(q)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out"):
        ufa.attention(q, q, q, out=out)


# --- PyTorch in-place and zero-copy --------------------------------------------------------

def test_torch_out_written_in_place(device):
    q = torch.randn(2, 8, 2, 16, device=device)
    out = torch.full_like(q, float("nan"))
    ptr = out.data_ptr()
    got = ufa.attention(q, q, q, out=out)
    assert got is out and out.data_ptr() == ptr
    assert rel_err(out, reference(q, q, q)[0]) < 1e-5


def test_sdpa_transposed_views_are_not_copied(device):
    """The probe records what reached the core: the [B, H, S, D] tensors' own storage with
    permuted strides, and a mask read in place with its broadcast (stride-0) dims."""
    q = torch.randn(2, 4, 13, 32, device=device)
    k = torch.randn(2, 4, 9, 32, device=device)
    mask = (torch.rand(13, 9, device=device) > 0.5).expand(2, 4, 13, 9)
    ufa._ufa._debug_record(True)
    try:
        out = ut.scaled_dot_product_attention(q, k, k, attn_mask=mask)
        rec = {name: (ptr, shape, strides)
               for name, ptr, shape, strides in ufa._ufa._debug_last_call()}
    finally:
        ufa._ufa._debug_record(False)
    assert rec["q"] == (q.data_ptr(), (2, 13, 4, 32), (q.stride(0), q.stride(2), q.stride(1), 1))
    assert rec["k"][0] == k.data_ptr() and rec["v"][0] == k.data_ptr()
    assert rec["mask"] == (mask.data_ptr(), (2, 4, 13, 9), (0, 0, 9, 1))
    assert rec["out"][0] == out.data_ptr()
    assert rel_err(out, F.scaled_dot_product_attention(q.double(), k.double(), k.double(),
                                                       attn_mask=mask)) < 1e-5


@pytest.mark.parametrize("b,sq,skv", [(0, 5, 7), (2, 0, 7), (2, 5, 0), (0, 0, 0)])
@pytest.mark.parametrize("causal", [False, True])
def test_empty_problems_as_pytorch(device, b, sq, skv, causal):
    """Batch 0 or seqlen 0: what PyTorch's SDPA returns (empty outputs; zeros where no key is
    seen), forward and backward, served by ufa rather than falling back."""
    def inputs():
        torch.manual_seed(0)
        return [torch.randn(b, 4, s, 16, device=device, requires_grad=True)
                for s in (sq, skv, skv)]
    ut.reset_fallback_stats()
    q, k, v = inputs()
    out = ut.scaled_dot_product_attention(q, k, v, is_causal=causal)
    (out.sum() + 0 * out.square().sum()).backward()
    assert ut.fallback_stats() == {"ufa": 1}
    q2, k2, v2 = inputs()
    with sdpa_kernel(SDPBackend.MATH):
        want = F.scaled_dot_product_attention(q2, k2, v2, is_causal=causal)
    want.sum().backward()
    assert out.shape == want.shape and torch.equal(out, want)
    for got, ref in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        assert got.shape == ref.shape and torch.equal(got, ref)
    # flash_attn_func's [batch, seq, heads, dim] layout, with the LSE.
    qf, kf, vf = (t.detach().transpose(1, 2) for t in (q, k, v))
    o, lse, _ = ut.flash_attn_func(qf, kf, vf, causal=causal, return_attn_probs=True)
    assert o.shape == (b, sq, 4, 16) and not o.any()
    assert lse.shape == (b, 4, sq) and bool((lse == float("-inf")).all())


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_sdpa_under_autocast_is_served_as_pytorch_casts_it(device, mask_kind):
    """Under torch.autocast the drop-in casts q, k, v (and a float mask) to the autocast dtype,
    as PyTorch does for SDPA, instead of falling back: output in that dtype, values as PyTorch's
    under the same autocast, gradients in the leaves' own dtype (float32)."""
    dt = torch.bfloat16
    def leaves():
        torch.manual_seed(1)
        return [torch.randn(2, 4, 33, 32, device=device, requires_grad=True) for _ in range(3)]
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(33, 33, device=device) > 0.2
    elif mask_kind == "float":
        mask = torch.randn(2, 1, 33, 33, device=device)
    ut.reset_fallback_stats()
    q, k, v = leaves()
    with torch.autocast(device, dtype=dt):
        out = ut.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert ut.fallback_stats() == {"ufa": 1}
    assert out.dtype == dt
    out.float().square().sum().backward()
    q2, k2, v2 = leaves()
    with torch.autocast(device, dtype=dt), sdpa_kernel(SDPBackend.MATH):
        want = F.scaled_dot_product_attention(q2, k2, v2, attn_mask=mask)
    want.float().square().sum().backward()
    # Both compute from the same bf16 inputs; the f64 reference of those inputs bounds both.
    qb, kb, vb = (t.detach().to(dt).transpose(1, 2) for t in (q, k, v))
    ref = reference(qb, kb, vb, mask=None if mask is None else mask.to(dt) if mask_kind == "float"
                    else mask)[0].transpose(1, 2)
    assert rel_err(out, ref) < tolerance(dt)
    assert rel_err(want, ref) < 2 * tolerance(dt)
    for got, theirs in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        assert got.dtype == torch.float32
        assert rel_err(got, theirs) < 5 * tolerance(dt)


def _set_tf32(on: bool):
    """Sets PyTorch's TF32 switch for matmuls (the new API where it exists); returns a function
    that restores it."""
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):
        old = m.fp32_precision
        m.fp32_precision = "tf32" if on else "ieee"
        return lambda: setattr(m, "fp32_precision", old)
    old = m.allow_tf32
    m.allow_tf32 = on
    return lambda: setattr(m, "allow_tf32", old)


@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"])
def test_fp32_cuda_follows_torch_tf32_switch(tf32):
    """fp32 on CUDA keeps fp32 accuracy by default and rounds to TF32 when PyTorch's switch is
    on: the error shows which one ran (TF32's rounding is far above the fp32 bound), through
    both front ends."""
    if not (torch.cuda.is_available() and ufa.cuda_available()):
        pytest.skip("no CUDA device for ufa")
    q, k, v = make_qkv(2, 300, 333, 4, 2, 64, 64, torch.float32, "cuda")
    want, _ = reference(q, k, v, causal=True)
    restore = _set_tf32(tf32)
    try:
        outs = [ut.flash_attn_func(q, k, v, causal=True),
                ut.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                    enable_gqa=True, scale=None).transpose(1, 2)]
    finally:
        restore()
    want_top_left, _ = reference(q, k, v, causal=True, top_left=True)
    for out, ref in zip(outs, [want, want_top_left]):
        err = rel_err(out, ref)
        if tf32:
            assert 1e-5 < err < TF32_TOLERANCE, err
        else:
            assert err < tolerance(torch.float32), err


def test_fp32_precision_argument():
    """ufa.attention takes the precision for arrays other than PyTorch tensors (the CPU always
    computes in fp32); PyTorch tensors follow PyTorch's switch and refuse the argument."""
    q, k, v = (np.random.randn(1, 20, 2, 32).astype(np.float32) for _ in range(3))
    want, _ = reference(q, k, v)
    for precision in ("ieee", "tf32"):
        out = ufa.attention(q, k, v, fp32_precision=precision)
        assert rel_err(out, want) < tolerance(np.float32)
    with pytest.raises(ValueError, match="fp32_precision"):
        ufa.attention(q, k, v, fp32_precision="fast")
    with pytest.raises(ValueError, match="PyTorch tensors follow"):
        ufa.attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v),
                      fp32_precision="tf32")
