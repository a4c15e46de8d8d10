"""ufa through PyTorch's own flash registration (torch.nn.attention.activate_flash_attention_impl,
PyTorch 2.11+): F.scaled_dot_product_attention under sdpa_kernel(FLASH_ATTENTION) runs ufa's
forward and backward (seen in the core's call record, not inferred from timing), eager and
under torch.compile(fullgraph=True), and restore gives the backend back."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import ufa
import ufa.torch  # noqa: F401  (registers the name)
from conftest import rel_err

attn = torch.nn.attention


def test_name_is_registered_where_pytorch_has_the_registry():
    if not hasattr(attn, "register_flash_attention_impl"):
        assert not ufa._torch_flash.REGISTERED
        pytest.skip("PyTorch has no flash attention registry (2.11+)")
    assert "ufa" in attn.list_flash_attention_impls()


def _recorded(fn):
    ufa._ufa._debug_record(True)
    try:
        result = fn()
        names = [name for name, *_ in ufa._ufa._debug_last_call()]
    finally:
        ufa._ufa._debug_record(False)
    return result, names


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sdpa_flash_backend_runs_ufa(compiled, causal):
    if not hasattr(attn, "activate_flash_attention_impl"):
        pytest.skip("PyTorch has no flash attention registry (2.11+)")
    if not (torch.cuda.is_available() and ufa.cuda_available()):
        pytest.skip("PyTorch's flash backend is CUDA only")
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 100, 64, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    with sdpa_kernel(SDPBackend.MATH):
        want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
        want_grads = torch.autograd.grad(want, (q, k, v), dout.float())

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    if compiled:
        torch._dynamo.reset()
        sdpa = torch.compile(sdpa, fullgraph=True)
    attn.activate_flash_attention_impl("ufa")
    try:
        assert attn.current_flash_attention_impl() == "ufa"
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out, fwd = _recorded(lambda: sdpa(q, k, v))
            grads, bwd = _recorded(lambda: torch.autograd.grad(out, (q, k, v), dout))
    finally:
        attn.restore_flash_attention_impl()
    assert "out" in fwd and "dq" in bwd, (fwd, bwd)
    assert rel_err(out, want) < 1e-2
    for g, w in zip(grads, want_grads):
        assert rel_err(g, w) < 1e-2
    # Restored: PyTorch's own flash kernel runs, ufa's core is not called.
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        _, after = _recorded(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
    assert "out" not in after
    torch._dynamo.reset()


def test_dropout_is_refused_not_ignored():
    if not hasattr(attn, "activate_flash_attention_impl"):
        pytest.skip("PyTorch has no flash attention registry (2.11+)")
    if not (torch.cuda.is_available() and ufa.cuda_available()):
        pytest.skip("PyTorch's flash backend is CUDA only")
    q = torch.randn(1, 2, 16, 64, device="cuda", dtype=torch.float16)
    attn.activate_flash_attention_impl("ufa")
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), pytest.raises(NotImplementedError,
                                                                    match="dropout"):
            F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    finally:
        attn.restore_flash_attention_impl()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_override_functions_match_autograd(device, causal):
    """The two functions the activation installs, called directly (so the CPU in CI runs them
    too): aten's argument and return conventions, layouts [B, H, S, D], against autograd
    through ufa's SDPA."""
    from ufa._torch_flash import _sdpa_flash_backward, _sdpa_flash_forward

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 37, 32, device=device, requires_grad=True) for _ in range(3))
    want = ufa.torch.scaled_dot_product_attention(q, k, v, is_causal=causal)
    dout = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, (q, k, v), dout)
    with torch.no_grad():
        out, lse, cq, ck, max_q, max_k, rng, offset, _ = _sdpa_flash_forward(
            q, k, v, 0.0, causal)
        assert (cq, ck, max_q, max_k) == (None, None, 37, 37)
        grads = _sdpa_flash_backward(dout, q, k, v, out, lse, cq, ck, max_q, max_k, 0.0,
                                     causal, rng, offset)
    assert rel_err(out, want) < 1e-5
    for g, w in zip(grads, want_grads):
        assert rel_err(g, w) < 1e-5
