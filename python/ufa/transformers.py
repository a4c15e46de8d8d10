"""Hugging Face transformers integration: ``attn_implementation="ufa"``.

After :func:`register`, any model that supports ``attn_implementation="sdpa"`` can be loaded or
built with ``attn_implementation="ufa"`` (or switched with ``model.set_attn_implementation("ufa")``)
and its attention runs on ufa, forward and backward, on CPU and CUDA::

    import ufa.transformers
    ufa.transformers.register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="ufa")

The models build their masks as they do for SDPA (padding, sliding windows and chunked attention
are in the mask; a purely causal one is skipped in favour of ``is_causal``), and ufa reads them in
place. Grouped-query attention runs on the key/value heads as they are (no ``repeat_kv`` copies),
and attention logit soft-capping (Gemma 2), which SDPA refuses, is computed in the kernel.

Dropout while training (``attention_dropout > 0``) is computed by ufa. What ufa does not compute
goes to transformers' or PyTorch's own function, counted in :func:`ufa.torch.fallback_stats` and
warned about once per reason (``UFA_STRICT=1``: an error): dropout while capturing a CUDA
graph, and attention sinks (``s_aux``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import torch as _ut

NAME = "ufa"
"""The ``attn_implementation`` name :func:`register` adds."""


def register(name: str = NAME) -> None:
    """Adds ufa to transformers' attention implementations under ``name``, with SDPA's mask
    construction. Idempotent; needs transformers with ``AttentionInterface`` (4.48 or newer)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)


def _sdpa_fallback(reason, module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    _ut._fall_back(reason)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    softcap: Optional[float] = None,
    position_bias: Optional[Tensor] = None,
    **kwargs,
) -> Tuple[Tensor, None]:
    """transformers' attention interface: ``query`` ``[batch, heads, seq_q, dim]``, ``key`` and
    ``value`` ``[batch, kv_heads, seq_kv, dim]``, ``attention_mask`` as ``sdpa_mask`` builds it
    (bool, True = attend, or additive; None when causality alone masks). Returns the output as
    ``[batch, seq_q, heads, dim_v]`` and no attention weights."""
    if kwargs.get("s_aux") is not None:
        return _sdpa_fallback("attention sinks", module, query, key, value, attention_mask,
                              dropout=dropout, scaling=scaling, is_causal=is_causal,
                              softcap=softcap, position_bias=position_bias, **kwargs)
    q_len = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # As transformers' SDPA path: causality by flag only for several queries and no mask
    # (decoding attends to the whole cache); SDPA's top-left alignment.
    causal = bool(q_len > 1 and attention_mask is None and causal)
    if position_bias is not None:
        from transformers.integrations.sdpa_attention import create_position_bias_mask

        attention_mask = create_position_bias_mask(position_bias, attention_mask, causal, query,
                                                   key)
        causal = False
    if not softcap:
        out = _ut.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                               dropout_p=dropout, is_causal=causal,
                                               scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None

    def eager(query, key, value, attention_mask):
        # transformers' SDPA refuses soft-capping, so its eager path is the reference.
        from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

        # The eager path takes causality and padding only as a mask it adds to the scores:
        # SDPA's causal flag (top-left) and boolean masks become an additive one.
        if attention_mask is None and causal:
            attention_mask = torch.ones((1, 1, query.shape[2], key.shape[2]), dtype=torch.bool,
                                        device=query.device).tril()
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            hidden = torch.finfo(query.dtype).min
            attention_mask = torch.zeros_like(attention_mask, dtype=query.dtype).masked_fill(
                ~attention_mask, hidden)
        out, _ = eager_attention_forward(module, query, key, value, attention_mask,
                                         dropout=dropout, scaling=scaling, softcap=softcap,
                                         **kwargs)
        return out.transpose(1, 2)  # [batch, heads, seq_q, dim_v], as SDPA returns it

    out = _ut._sdpa(query, key, value, attention_mask, dropout, causal, scaling, True,
                    float(softcap), eager)
    return out.transpose(1, 2).contiguous(), None
