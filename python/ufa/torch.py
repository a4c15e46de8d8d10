"""PyTorch front end of ufa: FlashAttention- and SDPA-compatible functions with autograd.

- :func:`flash_attn_func` — the ``flash_attn.flash_attn_func`` signature and semantics
  (``[batch, seq, heads, dim]``, bottom-right causal alignment).
- :func:`scaled_dot_product_attention` — ``torch.nn.functional.scaled_dot_product_attention``'s
  signature and semantics (``[batch, heads, seq, dim]``, top-left causal alignment, bool and
  float masks, GQA only with ``enable_gqa``). Calls ufa cannot serve (dropout, float64, an
  unsupported device, a mask that requires grad, ...) go to PyTorch's own function and are
  counted in :func:`fallback_stats`.
- :func:`patch` / :func:`unpatch` / :func:`patched` route ``torch.nn.functional.
  scaled_dot_product_attention`` through ufa.

Autograd goes through ufa's backward pass. Both passes are ``torch.library`` custom ops
(``ufa::attention_forward`` and ``ufa::attention_backward``) with fake implementations, so
``torch.compile(model, fullgraph=True)`` traces them without graph breaks. The forward saves its
log-sum-exp for the backward. Tensors are read in place: the ``[batch, heads, seq, dim]`` tensors
of SDPA reach the core as permuted views, never as copies.

On CUDA tensors the work belongs on the current device and ``torch.cuda.current_stream()``;
ufa reads that stream from PyTorch through DLPack's C exchange API and never synchronises.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _ufa

__all__ = [
    "flash_attn_func",
    "scaled_dot_product_attention",
    "patch",
    "unpatch",
    "patched",
    "fallback_stats",
    "reset_fallback_stats",
]

# PyTorch's own SDPA, captured before any patching: the fallback and what unpatch() restores.
_TORCH_SDPA = F.scaled_dot_product_attention

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Whether the core can compute on CUDA tensors (decided once: the answer cannot change while the
# process runs, and a constant keeps torch.compile's tracing free of calls into the extension).
_CUDA_OK = bool(_ufa.cuda_available())
_MAX_HEAD_DIM = 512


# --------------------------------------------------------------------------------------------
# Custom ops: the forward and backward passes, as torch.library operators.
# --------------------------------------------------------------------------------------------


def _last_contiguous(t: Tensor) -> Tensor:
    """The core needs stride 1 in the last dimension; anything else (rare) is copied."""
    return t if t.stride(-1) == 1 or t.size(-1) == 1 else t.contiguous()


def _forward_into(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Optional[Tensor],
    mask: Optional[Tensor],
    alibi_slopes: Optional[Tensor],
    scale: Optional[float],
    causal: bool,
    top_left: bool,
    window_left: int,
    window_right: int,
    softcap: float,
) -> None:
    _ufa.forward(
        q, k, v, out, lse, scale=scale, causal=causal, top_left=top_left,
        window_left=window_left, window_right=window_right, softcap=softcap,
        alibi_slopes=alibi_slopes, mask=mask,
    )


@torch.library.custom_op("ufa::attention_forward", mutates_args=())
def attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor],
    alibi_slopes: Optional[Tensor],
    scale: Optional[float],
    causal: bool,
    top_left: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    deterministic: bool,
) -> Tuple[Tensor, Tensor]:
    """Attention in ufa's layout; returns (out [B, Sq, Hq, Dv], lse f32 [B, Hq, Sq])."""
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    b, sq, hq, _ = q.shape
    out = q.new_empty((b, sq, hq, v.shape[-1]))
    lse = q.new_empty((b, hq, sq), dtype=torch.float32)
    _forward_into(q, k, v, out, lse, mask, alibi_slopes, scale, causal, top_left, window_left,
                  window_right, softcap)
    return out, lse


@attention_forward.register_fake
def _attention_forward_fake(q, k, v, mask, alibi_slopes, scale, causal, top_left, window_left,
                            window_right, softcap, deterministic):
    b, sq, hq, _ = q.shape
    return (q.new_empty((b, sq, hq, v.shape[-1])),
            q.new_empty((b, hq, sq), dtype=torch.float32))


@torch.library.custom_op("ufa::attention_backward", mutates_args=())
def attention_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    mask: Optional[Tensor],
    alibi_slopes: Optional[Tensor],
    scale: Optional[float],
    causal: bool,
    top_left: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    deterministic: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of attention_forward, contiguous in ufa's layout."""
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    dout, out = _last_contiguous(dout), _last_contiguous(out)
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    _ufa.backward(
        q, k, v, out, dout, lse, dq, dk, dv, scale=scale, causal=causal, top_left=top_left,
        window_left=window_left, window_right=window_right, softcap=softcap,
        alibi_slopes=alibi_slopes, mask=mask, deterministic=deterministic,
    )
    return dq, dk, dv


@attention_backward.register_fake
def _attention_backward_fake(dout, q, k, v, out, lse, mask, alibi_slopes, scale, causal,
                             top_left, window_left, window_right, softcap, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, alibi, *params = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, alibi)
    ctx.params = tuple(params)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, mask, alibi = ctx.saved_tensors
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, mask, alibi, *ctx.params)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


attention_forward.register_autograd(_backward, setup_context=_setup_context)


def _needs_graph(*tensors: Optional[Tensor]) -> bool:
    """Whether the call must go through the custom op (autograd or torch.compile tracing)."""
    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _attention(q, k, v, scale, causal, top_left, window_left, window_right, softcap,
               alibi_slopes, mask, deterministic, return_lse, out=None):
    """ufa-layout attention on torch tensors: the custom op when autograd or compile needs it,
    else a direct call (fewer layers, lower overhead)."""
    if _needs_graph(q, k, v):
        if out is not None:
            raise ValueError("out= cannot be used when q, k or v requires grad (autograd "
                             "needs a fresh output); pass out=None")
        o, lse = attention_forward(q, k, v, mask, alibi_slopes, scale, causal, top_left,
                                   window_left, window_right, softcap, deterministic)
        return (o, lse) if return_lse else o
    if q.dim() != 4:
        raise ValueError(f"q must have 4 dimensions [batch, seqlen, heads, head_dim], got "
                         f"{q.dim()} (shape {tuple(q.shape)})")
    if v.dim() != 4:
        raise ValueError(f"v must have 4 dimensions [batch, seqlen, heads, head_dim_v], got "
                         f"{v.dim()} (shape {tuple(v.shape)})")
    b, sq, hq, _ = q.shape
    if out is None:
        out = q.new_empty((b, sq, hq, v.shape[-1]))
    lse = q.new_empty((b, hq, sq), dtype=torch.float32) if return_lse else None
    _forward_into(q, k, v, out, lse, mask, alibi_slopes, scale, causal, top_left, window_left,
                  window_right, softcap)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------------------------
# FlashAttention-compatible API
# --------------------------------------------------------------------------------------------


def flash_attn_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """``flash_attn.flash_attn_func`` on ufa.

    q ``[batch, seqlen_q, heads_q, head_dim]``, k/v ``[batch, seqlen_kv, heads_kv, head_dim]``
    (``heads_kv`` divides ``heads_q``: MQA/GQA). Causal masking and the sliding window align to
    the bottom-right corner when ``seqlen_q != seqlen_kv``. ``alibi_slopes`` (float32,
    ``[heads_q]`` or ``[batch, heads_q]``) adds ``-slope * |i + seqlen_kv - seqlen_q - j|``.

    Returns ``out`` ``[batch, seqlen_q, heads_q, head_dim]``, or ``(out, softmax_lse, None)``
    when ``return_attn_probs`` (``softmax_lse`` float32 ``[batch, heads_q, seqlen_q]``; the
    attention probabilities themselves are never materialised, so the third item is None).

    Raises:
        NotImplementedError: ``dropout_p > 0`` (ufa has no dropout).
    """
    if dropout_p != 0.0:
        raise NotImplementedError(
            f"dropout_p={dropout_p} is not supported by ufa (attention dropout is not "
            "implemented); use dropout_p=0.0"
        )
    from . import _window

    left, right = _window(window_size)
    res = _attention(q, k, v, softmax_scale, causal, False, left, right, float(softcap),
                     alibi_slopes, None, deterministic, return_attn_probs)
    if return_attn_probs:
        out, lse = res
        return out, lse, None
    return res


# --------------------------------------------------------------------------------------------
# torch.nn.functional.scaled_dot_product_attention-compatible API
# --------------------------------------------------------------------------------------------

_stats_lock = threading.Lock()
_fallbacks: Dict[str, int] = {}


def fallback_stats() -> Dict[str, int]:
    """Counts of :func:`scaled_dot_product_attention` calls that went to PyTorch's own function,
    by reason, plus ``"ufa"``: the calls ufa served. Calls made while ``torch.compile`` traces are
    not counted (the decision is then made once per compiled graph)."""
    with _stats_lock:
        return dict(_fallbacks)


def reset_fallback_stats() -> None:
    """Clears :func:`fallback_stats`."""
    with _stats_lock:
        _fallbacks.clear()


def _count(reason: str) -> None:
    if not torch.compiler.is_compiling():
        with _stats_lock:
            _fallbacks[reason] = _fallbacks.get(reason, 0) + 1


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # PyTorch < 2.4 takes no argument
        return torch.is_autocast_enabled() if device_type == "cuda" else False


def _unsupported(query, key, value, attn_mask, dropout_p, is_causal, scale,
                 enable_gqa) -> Optional[str]:
    """Why ufa cannot serve this SDPA call exactly as PyTorch would (None: it can)."""
    if not (isinstance(query, Tensor) and isinstance(key, Tensor) and isinstance(value, Tensor)):
        return "not a tensor"
    if dropout_p != 0.0:
        return "dropout"
    if query.dtype not in _DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return "dtype"
    dev = query.device
    if key.device != dev or value.device != dev:
        return "device mismatch"
    if not (dev.type == "cpu" or (dev.type == "cuda" and _CUDA_OK)):
        return "device"
    if query.is_nested or key.is_nested or value.is_nested:
        return "nested tensor"
    if _autocast_on(dev.type):
        return "autocast"
    nd = query.dim()
    if nd not in (3, 4) or key.dim() != nd or value.dim() != nd:
        return "rank"
    if query.shape[:-3] != key.shape[:-3] or key.shape[:-1] != value.shape[:-1]:
        return "shape"
    d, dv = query.shape[-1], value.shape[-1]
    if key.shape[-1] != d or d > _MAX_HEAD_DIM or dv > _MAX_HEAD_DIM:
        return "head_dim"
    if min(query.shape) == 0 or min(key.shape) == 0 or dv == 0:
        return "empty"
    if nd == 4:
        hq, hkv = query.shape[1], key.shape[1]
        if hq != hkv and not (enable_gqa and hq % hkv == 0):
            return "heads"
    if scale is not None and not isinstance(scale, (int, float)):
        return "scale"
    if attn_mask is not None:
        if is_causal:
            return "mask with is_causal"
        if not isinstance(attn_mask, Tensor) or attn_mask.device != dev:
            return "mask device"
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            return "mask dtype"
        if attn_mask.requires_grad and torch.is_grad_enabled():
            return "mask requires grad"
        full = (query.shape[0], query.shape[1] if nd == 4 else 1, query.shape[-2], key.shape[-2])
        if attn_mask.dim() > 4 or attn_mask.dim() == 0:
            return "mask shape"
        for size, want in zip(reversed(attn_mask.shape), reversed(full)):
            if size not in (1, want):
                return "mask shape"
    return None


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` computed by ufa.

    Same signature and semantics: ``[batch, heads, seq, dim]`` (or ``[batch, seq, dim]``)
    tensors, ``is_causal`` aligned to the top-left corner, bool masks (True = attend) and float
    masks (added to the scores) broadcast to ``[batch, heads, seq_q, seq_kv]`` and read in place,
    grouped-query attention only with ``enable_gqa``. The inputs reach the core as permuted
    views (no copy); the output is a ``[batch, heads, seq, dim]`` view of a
    ``[batch, seq, heads, dim]`` buffer, as PyTorch's own flash kernel returns it.

    Calls ufa cannot serve identically go to PyTorch's own function and are counted in
    :func:`fallback_stats`: dropout, dtypes other than float16/bfloat16/float32, devices without
    a ufa backend, masks that require grad, autocast, nested tensors, inputs PyTorch itself
    rejects (so they raise PyTorch's error).
    """
    why = _unsupported(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if why is not None:
        _count(why)
        if enable_gqa:
            return _TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                               is_causal=is_causal, scale=scale, enable_gqa=True)
        return _TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                           is_causal=is_causal, scale=scale)
    _count("ufa")
    three_d = query.dim() == 3
    if three_d:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    # [batch, heads, seq, dim] -> [batch, seq, heads, dim]: a view with permuted strides.
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    scale = None if scale is None else float(scale)
    out = _attention(q, k, v, scale, bool(is_causal), True, -1, -1, 0.0, None, attn_mask,
                     False, False)
    out = out.transpose(1, 2)
    return out.squeeze(1) if three_d else out


# --------------------------------------------------------------------------------------------
# Patching torch.nn.functional
# --------------------------------------------------------------------------------------------

_patch_lock = threading.Lock()
_patch_depth = 0


def patch() -> None:
    """Makes ``torch.nn.functional.scaled_dot_product_attention`` call ufa's
    :func:`scaled_dot_product_attention`. Code that imported the function by name before
    patching (``from torch.nn.functional import scaled_dot_product_attention``) keeps PyTorch's.
    Calls nest: each :func:`patch` needs one :func:`unpatch`."""
    global _patch_depth
    with _patch_lock:
        _patch_depth += 1
        F.scaled_dot_product_attention = scaled_dot_product_attention


def unpatch() -> None:
    """Undoes one :func:`patch`; the last one restores PyTorch's own function."""
    global _patch_depth
    with _patch_lock:
        _patch_depth = max(0, _patch_depth - 1)
        if _patch_depth == 0:
            F.scaled_dot_product_attention = _TORCH_SDPA


@contextlib.contextmanager
def patched() -> Iterator[None]:
    """Context manager: ``torch.nn.functional.scaled_dot_product_attention`` goes through ufa
    inside the ``with`` block."""
    patch()
    try:
        yield
    finally:
        unpatch()

