"""ufa as PyTorch's flash attention implementation, through PyTorch's own registration point
(``torch.nn.attention.register_flash_attention_impl``, PyTorch 2.11+): after

    torch.nn.attention.activate_flash_attention_impl("ufa")

every call PyTorch's SDPA dispatch sends to its flash backend (``F.scaled_dot_product_attention``
with fp16/bf16 CUDA tensors, under ``sdpa_kernel(SDPBackend.FLASH_ATTENTION)`` or chosen by
PyTorch's heuristics; ``torch.compile`` graphs; libraries built on SDPA) runs ufa's forward and
backward, with no ``patch()``. ``torch.nn.attention.restore_flash_attention_impl()`` gives the
flash backend back to PyTorch. Imported (and the name registered, nothing activated) by
:mod:`ufa.torch`.

The implementation overrides the CUDA kernels of ``aten::_scaled_dot_product_flash_attention``
and its backward, whose signatures PyTorch fixes: top-left causal alignment (SDPA's), the
output in the query's memory order, the LSE ``[batch, heads, seqlen_q]`` in fp32 (ufa's own
layout, so the backward reads it as it is). Dropout has no ufa kernel yet: a call with
``dropout_p > 0`` raises ``NotImplementedError`` instead of returning something else.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

NAME = "ufa"
"""The name ufa registers under (``torch.nn.attention.list_flash_attention_impls()``)."""


class _Handle:
    """What activation returns to PyTorch's registry: the library holding the overrides;
    ``remove`` (on restore or on activating another implementation) deregisters them."""

    def __init__(self, library):
        self.library = library

    def remove(self) -> None:
        if self.library is not None:
            self.library._destroy()
            self.library = None


def _activate() -> _Handle:
    lib = torch.library.Library("aten", "IMPL", "CUDA")
    lib.impl("_scaled_dot_product_flash_attention", _sdpa_flash_forward, "CUDA")
    lib.impl("_scaled_dot_product_flash_attention_backward", _sdpa_flash_backward, "CUDA")
    return _Handle(lib)


def _no_dropout(dropout_p: float) -> None:
    if dropout_p != 0.0:
        raise NotImplementedError(
            f"dropout_p={dropout_p}: ufa's flash attention implementation has no dropout yet; "
            "call torch.nn.attention.restore_flash_attention_impl() to use PyTorch's for this "
            "model, or train without attention dropout")


def _sdpa_flash_forward(query: Tensor, key: Tensor, value: Tensor, dropout_p: float = 0.0,
                        is_causal: bool = False, return_debug_mask: bool = False, *,
                        scale: Optional[float] = None):
    from .torch import _forward_bhsd

    _no_dropout(dropout_p)
    if return_debug_mask:
        raise NotImplementedError("return_debug_mask: ufa computes no attention matrix")
    b, h, sq, _ = query.shape
    lse = query.new_empty((b, h, sq), dtype=torch.float32)
    out = _forward_bhsd(query, key, value, lse, scale, is_causal)
    dev = query.device
    rng_state = torch.zeros((2,), dtype=torch.uint64, device=dev)
    philox_offset = torch.zeros((), dtype=torch.uint64, device=dev)
    debug_mask = torch.empty(0, dtype=query.dtype, device=dev)
    return out, lse, None, None, sq, key.shape[2], rng_state, philox_offset, debug_mask


def _sdpa_flash_backward(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor,
                         out: Tensor, logsumexp: Tensor, cum_seq_q, cum_seq_k, max_q: int,
                         max_k: int, dropout_p: float, is_causal: bool, philox_seed: Tensor,
                         philox_offset: Tensor, *, scale: Optional[float] = None):
    from .torch import _backward_bhsd

    _no_dropout(dropout_p)
    return _backward_bhsd(grad_out, query, key, value, out, logsumexp, scale, is_causal)


def _register() -> bool:
    """Registers the name where PyTorch has the registry (2.11+); False where it has not."""
    register = getattr(torch.nn.attention, "register_flash_attention_impl", None)
    if register is None:
        return False
    register(NAME, register_fn=_activate)
    return True


REGISTERED = _register()
