"""PyTorch front end of ufa: FlashAttention- and SDPA-compatible functions with autograd.

- :func:`flash_attn_func` — the ``flash_attn.flash_attn_func`` signature and semantics
  (``[batch, seq, heads, dim]``, bottom-right causal alignment); :func:`flash_attn_varlen_func`,
  :func:`flash_attn_with_kvcache` (KV cache, dense or paged, appended in place) and the packed
  ``*_qkvpacked_func`` / ``*_kvpacked_func`` forms likewise.
- :func:`scaled_dot_product_attention` — ``torch.nn.functional.scaled_dot_product_attention``'s
  signature and semantics (``[batch, heads, seq, dim]``, top-left causal alignment, bool and
  float masks, GQA only with ``enable_gqa``, dropout). Calls ufa cannot serve
  (dropout while capturing a CUDA graph, float64, an unsupported device, a mask that requires grad, ...) go to PyTorch's own function, are
  counted in :func:`fallback_stats` and warned about once per reason (``UFA_STRICT=1``: an
  error instead).
- :func:`patch` / :func:`unpatch` / :func:`patched` route ``torch.nn.functional.
  scaled_dot_product_attention`` through ufa.

Autograd goes through ufa's backward pass. Both passes are ``torch.library`` custom ops
(``ufa::attention_forward`` and ``ufa::attention_backward``) with fake implementations, so
``torch.compile(model, fullgraph=True)`` traces them without graph breaks. The forward saves its
log-sum-exp for the backward. Tensors are read in place: the ``[batch, heads, seq, dim]`` tensors
of SDPA reach the core as permuted views, never as copies.

On CUDA tensors the work belongs on the current device and ``torch.cuda.current_stream()``;
ufa reads that stream from PyTorch through DLPack's C exchange API and never synchronises.
fp32 CUDA tensors follow PyTorch's TF32 switch for matmuls (``torch.backends.cuda.matmul.
fp32_precision = "tf32"``, ``allow_tf32 = True`` or ``torch.set_float32_matmul_precision("high")``):
off (the default), the forward and backward keep fp32 accuracy on tensor cores (3xTF32); on,
they round each operand to TF32 once, about three times faster (read when each pass runs, as
PyTorch's matmuls read it).
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _ufa
from ._torch_sequences import (_dropout_refusal, _dropout_rng, _dropout_seed, _last_contiguous,
                               _out_bshd, _seed_offset, _split_rng, _tf32)
from ._torch_sequences import (  # noqa: F401  (re-exported: FlashAttention's other entry points)
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)

__all__ = [
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
    "scaled_dot_product_attention",
    "patch",
    "unpatch",
    "patched",
    "fallback_stats",
    "reset_fallback_stats",
    "attention_forward_out",
    "attention_backward_out",
    "merge_states_out",
]

# PyTorch's own SDPA, captured before any patching: the fallback and what unpatch() restores.
_TORCH_SDPA = F.scaled_dot_product_attention

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Whether the core can compute on CUDA tensors: probed on the first CUDA call, not at import
# (the probe initialises the CUDA driver, which must not happen before a fork), then constant.
_cuda_ok: Optional[bool] = None


def _probe_cuda() -> bool:
    global _cuda_ok
    if _cuda_ok is None:
        _cuda_ok = bool(_ufa.cuda_available())
    return _cuda_ok


# torch.compile evaluates the probe once while tracing and bakes the answer into the graph.
_assume_constant = getattr(getattr(torch, "_dynamo", None), "assume_constant_result", None)
if _assume_constant is not None:
    _probe_cuda = _assume_constant(_probe_cuda)


# --------------------------------------------------------------------------------------------
# Custom ops: the forward and backward passes, as torch.library operators.
# --------------------------------------------------------------------------------------------


# PyTorch >= 2.9 hands tensors to ufa through DLPack's C exchange API (no capsule, and the
# current CUDA stream with them). Older versions go through `Tensor.__dlpack__`, which refuses
# tensors that require grad: those are detached first (a view, no copy).
_HAS_EXCHANGE_API = hasattr(torch.Tensor, "__dlpack_c_exchange_api__")


def _plain(*tensors: Optional[Tensor]):
    if _HAS_EXCHANGE_API:
        return tensors
    return tuple(t.detach() if t is not None and t.requires_grad else t for t in tensors)


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
    dropout_p: float = 0.0,
    seed: int = 0,
    offset: int = 0,
) -> None:
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    q, k, v, mask, alibi_slopes = _plain(q, k, v, mask, alibi_slopes)
    _ufa.forward(
        q, k, v, out, lse, scale=scale, causal=causal, top_left=top_left,
        window_left=window_left, window_right=window_right, softcap=softcap,
        alibi_slopes=alibi_slopes, mask=mask, tf32=_tf32(q), dropout_p=dropout_p, seed=seed,
        offset=offset,
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
    dropout_p: float = 0.0,
    seed: int = 0,
    offset: int = 0,
    rng: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Attention in ufa's layout; returns (out [B, Sq, Hq, Dv], lse f32 [B, Hq, Sq]). With
    ``dropout_p`` > 0 the probabilities are dropped by the generator at
    (``seed``, ``offset``), or at ``rng`` (int64 CPU tensor [seed, offset], which overrides
    them: a traced graph's); the backward takes the same."""
    seed, offset = _seed_offset(seed, offset, rng)
    return _forward_impl(q, k, v, mask, alibi_slopes, scale, causal, top_left, window_left,
                         window_right, softcap, dropout_p, seed, offset)


def _forward_impl(q, k, v, mask, alibi_slopes, scale, causal, top_left, window_left,
                  window_right, softcap, dropout_p=0.0, seed=0, offset=0):
    b, sq, hq, _ = q.shape
    out = q.new_empty((b, sq, hq, v.shape[-1]))
    lse = q.new_empty((b, hq, sq), dtype=torch.float32)
    _forward_into(q, k, v, out, lse, mask, alibi_slopes, scale, causal, top_left, window_left,
                  window_right, softcap, dropout_p, seed, offset)
    return out, lse


@attention_forward.register_fake
def _attention_forward_fake(q, k, v, mask, alibi_slopes, scale, causal, top_left, window_left,
                            window_right, softcap, deterministic, dropout_p=0.0, seed=0,
                            offset=0, rng=None):
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
    dropout_p: float = 0.0,
    seed: int = 0,
    offset: int = 0,
    rng: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of attention_forward, contiguous in ufa's layout."""
    seed, offset = _seed_offset(seed, offset, rng)
    return _backward_impl(dout, q, k, v, out, lse, mask, alibi_slopes, scale, causal, top_left,
                          window_left, window_right, softcap, deterministic, dropout_p, seed,
                          offset)


def _backward_impl(dout, q, k, v, out, lse, mask, alibi_slopes, scale, causal, top_left,
                   window_left, window_right, softcap, deterministic, dropout_p=0.0, seed=0,
                   offset=0):
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    _backward_into(dout, q, k, v, out, lse, dq, dk, dv, mask, alibi_slopes, scale, causal,
                   top_left, window_left, window_right, softcap, deterministic, dropout_p,
                   seed, offset)
    return dq, dk, dv


def _backward_into(dout, q, k, v, out, lse, dq, dk, dv, mask, alibi_slopes, scale, causal,
                   top_left, window_left, window_right, softcap, deterministic, dropout_p=0.0,
                   seed=0, offset=0):
    """Gradients written into dq, dk, dv (ufa's layout, any strides with a contiguous last
    dimension)."""
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    dout, out = _last_contiguous(dout), _last_contiguous(out)
    q, k, v, out, dout, mask, alibi_slopes = _plain(q, k, v, out, dout, mask, alibi_slopes)
    _ufa.backward(
        q, k, v, out, dout, lse, dq, dk, dv, scale=scale, causal=causal, top_left=top_left,
        window_left=window_left, window_right=window_right, softcap=softcap,
        alibi_slopes=alibi_slopes, mask=mask, deterministic=deterministic, tf32=_tf32(q),
        dropout_p=dropout_p, seed=seed, offset=offset,
    )


@attention_backward.register_fake
def _attention_backward_fake(dout, q, k, v, out, lse, mask, alibi_slopes, scale, causal,
                             top_left, window_left, window_right, softcap, deterministic,
                             dropout_p=0.0, seed=0, offset=0, rng=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, alibi, *params = inputs
    ctx.params, rng = _split_rng(params)
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, alibi, rng)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, mask, alibi, rng = ctx.saved_tensors
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, mask, alibi, *ctx.params, rng=rng)
    return (dq, dk, dv) + (None,) * 13


attention_forward.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Low-level ops with caller-owned outputs (ring attention, pipeline schedules)
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("ufa::attention_forward_out", mutates_args=("out", "lse"))
def attention_forward_out(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    mask: Optional[Tensor] = None,
    alibi_slopes: Optional[Tensor] = None,
    scale: Optional[float] = None,
    causal: bool = False,
    top_left: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
) -> None:
    """Attention in ufa's layout into the caller's buffers: ``out`` ``[B, Sq, Hq, Dv]`` and
    ``lse`` float32 ``[B, Hq, Sq]`` (natural log, -inf where a row sees no key), any strides
    with a contiguous last dimension (slices of larger buffers included). For schedules that
    split the keys (ring attention): the partial states merge with :func:`ufa.merge_states`,
    and :func:`attention_backward_out` takes the merged ``out`` and ``lse``. Not differentiable
    itself; a ``torch.compile`` graph traces it as a mutating op. Nothing is written on error."""
    _forward_into(q, k, v, out, lse, mask, alibi_slopes, scale, causal, top_left, window_left,
                  window_right, softcap)


@attention_forward_out.register_fake
def _attention_forward_out_fake(q, k, v, out, lse, mask=None, alibi_slopes=None, scale=None,
                                causal=False, top_left=False, window_left=-1, window_right=-1,
                                softcap=0.0):
    return None


@torch.library.custom_op("ufa::attention_backward_out", mutates_args=("dq", "dk", "dv"))
def attention_backward_out(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
    mask: Optional[Tensor] = None,
    alibi_slopes: Optional[Tensor] = None,
    scale: Optional[float] = None,
    causal: bool = False,
    top_left: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    deterministic: bool = False,
    accumulate: bool = False,
) -> None:
    """Gradients of attention into the caller's ``dq``, ``dk``, ``dv`` (shapes of q, k, v; any
    strides with a contiguous last dimension), from ``dout`` and the forward's ``out`` and
    ``lse``. With keys split across calls, pass the merged ``out`` and ``lse`` of the whole
    row: each call then gives its keys' exact dk/dv and its share of dq. ``accumulate=True``
    adds to what the buffers hold (the gradients are computed into scratch memory, then
    added) instead of overwriting it."""
    params = (mask, alibi_slopes, scale, causal, top_left, window_left, window_right, softcap,
              deterministic)
    if not accumulate:
        _backward_into(dout, q, k, v, out, lse, dq, dk, dv, *params)
        return
    gq, gk, gv = _backward_impl(dout, q, k, v, out, lse, *params)
    dq.add_(gq)
    dk.add_(gk)
    dv.add_(gv)


@attention_backward_out.register_fake
def _attention_backward_out_fake(dout, q, k, v, out, lse, dq, dk, dv, mask=None,
                                 alibi_slopes=None, scale=None, causal=False, top_left=False,
                                 window_left=-1, window_right=-1, softcap=0.0,
                                 deterministic=False, accumulate=False):
    return None


@torch.library.custom_op("ufa::merge_states_out", mutates_args=("out", "lse"))
def merge_states_out(outs: List[Tensor], lses: List[Tensor], out: Tensor, lse: Tensor) -> None:
    """:func:`ufa.merge_states` into the caller's ``out`` and ``lse`` as a custom op, so that a
    split-key schedule (partial states from :func:`attention_forward_out`) traces whole under
    ``torch.compile``."""
    _ufa.merge_states(list(_plain(*outs)), list(lses), out, lse)


@merge_states_out.register_fake
def _merge_states_out_fake(outs, lses, out, lse):
    return None


class _Attention(torch.autograd.Function):
    """Eager autograd: the same forward and backward as the custom ops, without the dispatcher
    round trips of ``torch.library`` (which cost several times the attention itself on small
    problems). ``torch.compile`` traces the custom ops instead."""

    @staticmethod
    def forward(ctx, q, k, v, mask, alibi_slopes, scale, causal, top_left, window_left,
                window_right, softcap, deterministic, dropout_p, seed, offset):
        out, lse = _forward_impl(q, k, v, mask, alibi_slopes, scale, causal, top_left,
                                 window_left, window_right, softcap, dropout_p, seed, offset)
        ctx.save_for_backward(q, k, v, out, lse, mask, alibi_slopes)
        ctx.params = (scale, causal, top_left, window_left, window_right, softcap, deterministic,
                      dropout_p, seed, offset)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, mask, alibi = ctx.saved_tensors
        dq, dk, dv = _backward_impl(dout, q, k, v, out, lse, mask, alibi, *ctx.params)
        return (dq, dk, dv) + (None,) * 12


def _needs_grad(q: Tensor, k: Tensor, v: Tensor) -> bool:
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def _attention(q, k, v, scale, causal, top_left, window_left, window_right, softcap,
               alibi_slopes, mask, deterministic, return_lse, out=None, dropout_p=0.0):
    """ufa-layout attention on torch tensors: the custom op when autograd or compile needs it,
    else a direct call (fewer layers, lower overhead)."""
    compiling = torch.compiler.is_compiling()
    if compiling:
        # The generator state is drawn by the graph (a tensor), anew on every run of it.
        if out is not None:
            raise ValueError("out= cannot be used under torch.compile (autograd needs a fresh "
                             "output); pass out=None")
        o, lse = attention_forward(q, k, v, mask, alibi_slopes, scale, causal, top_left,
                                   window_left, window_right, softcap, deterministic,
                                   dropout_p, 0, 0, _dropout_rng(dropout_p))
        return (o, lse) if return_lse else o
    seed = _dropout_seed(q, dropout_p)
    if _needs_grad(q, k, v):
        if out is not None:
            raise ValueError("out= cannot be used when q, k or v requires grad (autograd "
                             "needs a fresh output); pass out=None")
        o, lse = _Attention.apply(q, k, v, mask, alibi_slopes, scale, causal, top_left,
                                  window_left, window_right, softcap, deterministic, dropout_p,
                                  seed, 0)
        return (o, lse) if return_lse else o
    if q.dim() != 4:
        raise ValueError(f"q must have 4 dimensions [batch, seqlen, heads, head_dim], got "
                         f"{q.dim()} (shape {tuple(q.shape)})")
    if v.dim() != 4:
        raise ValueError(f"v must have 4 dimensions [batch, seqlen, heads, head_dim_v], got "
                         f"{v.dim()} (shape {tuple(v.shape)})")
    b, sq, hq = q.shape[:3]
    if out is None:
        out = _out_bshd(q, v.shape[-1])
    lse = q.new_empty((b, hq, sq), dtype=torch.float32) if return_lse else None
    _forward_into(q, k, v, out, lse, mask, alibi_slopes, scale, causal, top_left, window_left,
                  window_right, softcap, dropout_p, seed)
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

    ``dropout_p`` drops each attention probability with that probability (scaling the rest by
    ``1 / (1 - dropout_p)``), drawn from a counter-based generator seeded from PyTorch's
    default generator, so ``torch.manual_seed`` repeats it and the backward regenerates the
    same mask; as in FlashAttention, pass 0.0 in evaluation.

    Raises:
        NotImplementedError: ``dropout_p > 0`` while capturing a CUDA graph (eager mode and
            ``torch.compile`` have it).
    """
    from . import _window

    left, right = _window(window_size)
    res = _attention(q, k, v, softmax_scale, causal, False, left, right, float(softcap),
                     alibi_slopes, None, deterministic, return_attn_probs,
                     dropout_p=float(dropout_p))
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
    not counted (the decision is then made once per compiled graph, and compiled code does not
    run this Python function again)."""
    with _stats_lock:
        stats = dict(_fallbacks)
    # The short path's calls are counted by the binding (an atomic, no lock in the call).
    short = _ufa._sdpa_calls()
    if short:
        stats["ufa"] = stats.get("ufa", 0) + short
    return stats


def reset_fallback_stats() -> None:
    """Clears :func:`fallback_stats` (and re-arms the one-time fallback warnings)."""
    with _stats_lock:
        _fallbacks.clear()
        _warned.clear()
        _ufa._sdpa_calls(reset=True)


def _count(reason: str) -> None:
    if not torch.compiler.is_compiling():
        with _stats_lock:
            _fallbacks[reason] = _fallbacks.get(reason, 0) + 1


STRICT_ENV = "UFA_STRICT"
"""Set to 1, a call :func:`scaled_dot_product_attention` cannot serve raises instead of
falling back to PyTorch."""

_warned: set = set()


def _fall_back(reason: str, stacklevel: int = 3) -> None:
    """Counts a fallback; says so once per reason (a warning attributed `stacklevel` frames up),
    or refuses it under UFA_STRICT=1."""
    _count(reason)
    if torch.compiler.is_compiling():
        return
    if os.environ.get(STRICT_ENV) == "1":
        raise RuntimeError(
            f"ufa.torch.scaled_dot_product_attention cannot serve this call ({reason}), and "
            f"{STRICT_ENV}=1 forbids falling back to PyTorch's own function")
    with _stats_lock:
        first = reason not in _warned
        _warned.add(reason)
    if first:
        warnings.warn(
            f"ufa.torch.scaled_dot_product_attention falls back to PyTorch's own function for "
            f"this call ({reason}); ufa.torch.fallback_stats() counts such calls, {STRICT_ENV}=1 "
            f"makes them errors. Shown once per reason.", RuntimeWarning, stacklevel=stacklevel)


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # PyTorch < 2.4 takes no argument
        if device_type == "cuda":
            return torch.is_autocast_enabled()
        return device_type == "cpu" and torch.is_autocast_cpu_enabled()


def _autocast_dtype(device_type: str) -> torch.dtype:
    try:
        return torch.get_autocast_dtype(device_type)
    except AttributeError:  # PyTorch < 2.4
        if device_type == "cuda":
            return torch.get_autocast_gpu_dtype()
        return torch.get_autocast_cpu_dtype()


def _autocast_cast(device_type: str, *tensors):
    """The cast PyTorch's autocast applies to ``scaled_dot_product_attention`` (its
    lower-precision list on CPU and CUDA): floating tensors other than float64 (q, k, v and a
    float mask) to the autocast dtype; bool masks and float64 tensors as they are. The casts are
    ordinary differentiable ops, so gradients reach the caller's tensors in their own dtype."""
    dt = _autocast_dtype(device_type)
    return tuple(
        t.to(dt) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
        and t.dtype != dt else t
        for t in tensors)


def _unsupported(query, key, value, attn_mask, dropout_p, is_causal, scale,
                 enable_gqa) -> Optional[str]:
    """Why ufa cannot serve this SDPA call exactly as PyTorch would (None: it can). Ordered so
    that the common case costs as few tensor attribute reads as possible."""
    if not (isinstance(query, Tensor) and isinstance(key, Tensor) and isinstance(value, Tensor)):
        return "not a tensor"
    if dropout_p != 0.0 and _dropout_refusal(query, dropout_p) is not None:
        return "dropout"
    dt = query.dtype
    if dt not in _DTYPES or key.dtype != dt or value.dtype != dt:
        return "dtype"
    dev = query.device
    dev_type = dev.type
    if dev_type != "cpu" and not (dev_type == "cuda" and _probe_cuda()):
        return "device"
    if key.device != dev or value.device != dev:
        return "device mismatch"
    if query.is_nested or key.is_nested or value.is_nested:
        return "nested tensor"
    qs, ks, vs = query.shape, key.shape, value.shape
    nd = len(qs)
    if nd != 4 and nd != 3 or len(ks) != nd or len(vs) != nd:
        return "rank"
    if qs[:-3] != ks[:-3] or ks[:-1] != vs[:-1]:
        return "shape"
    d, dv = qs[-1], vs[-1]
    if ks[-1] != d or d > _ufa.MAX_HEAD_DIM or dv > _ufa.MAX_HEAD_DIM:
        return "head_dim"
    # An empty batch or sequence is served (empty outputs, zeros where no key is seen); zero
    # heads or head dims are not.
    if d == 0 or dv == 0 or nd == 4 and (qs[1] == 0 or ks[1] == 0):
        return "no heads"
    if nd == 4 and qs[1] != ks[1] and not (enable_gqa and qs[1] % ks[1] == 0):
        return "heads"
    if scale is not None and not isinstance(scale, (int, float)):
        return "scale"
    if attn_mask is not None:
        if is_causal:
            return "mask with is_causal"
        if not isinstance(attn_mask, Tensor) or attn_mask.device != dev:
            return "mask device"
        if attn_mask.dtype != torch.bool and attn_mask.dtype != dt:
            return "mask dtype"
        if attn_mask.requires_grad and torch.is_grad_enabled():
            return "mask requires grad"
        full = (qs[0], qs[1] if nd == 4 else 1, qs[-2], ks[-2])
        ms = attn_mask.shape
        if len(ms) > 4 or len(ms) == 0:
            return "mask shape"
        for size, want in zip(reversed(ms), reversed(full)):
            if size != 1 and size != want:
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
    grouped-query attention only with ``enable_gqa``. The inputs reach the core in place, with
    their dims described in ufa's ``[batch, seq, heads, dim]`` order (no copy).

    Calls ufa cannot serve identically go to PyTorch's own function, with a one-time warning
    per reason (an error under ``UFA_STRICT=1``), and are counted in :func:`fallback_stats`:
    dropout while capturing a CUDA graph (eager mode and ``torch.compile`` are served, the
    mask drawn from a generator seeded by PyTorch's), dtypes other than
    float16/bfloat16/float32, devices without a ufa backend, masks
    that require grad, nested tensors, inputs PyTorch itself rejects (so they raise PyTorch's
    error). Under ``torch.autocast`` the inputs are cast first, as PyTorch
    casts them for this function (float tensors other than float64 to the autocast dtype), and
    ufa computes in that dtype.
    """

    out = _sdpa_short(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                      0.0)
    if out is not None:
        return out

    def torch_sdpa(query, key, value, attn_mask):
        gqa = {"enable_gqa": True} if enable_gqa else {}  # PyTorch < 2.5 lacks the argument
        return _TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                           is_causal=is_causal, scale=scale, **gqa)

    return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, 0.0,
                 torch_sdpa, short=False)


def _out_bhsd(query: Tensor, value: Tensor) -> Tensor:
    """The ``[B, H, Sq, Dv]`` output of SDPA-layout inputs. It keeps q's memory order where the
    head dims match (empty_like, also the cheaper allocation; q is often a [B, S, H, D] buffer
    seen transposed), so the caller's usual ``out.transpose(1, 2).reshape(...)`` stays free."""
    qs = query.shape
    dv = value.shape[-1]
    return torch.empty_like(query) if dv == qs[3] else query.new_empty(qs[:3] + (dv,))


def _forward_bhsd(query, key, value, lse, scale, causal, softcap=0.0, mask=None) -> Tensor:
    """The forward on PyTorch's ``[B, H, S, D]`` tensors as they are: the core reads them with
    dims 1 and 2 swapped and writes a ``[B, H, Sq, Dv]`` output (:func:`_out_bhsd`; and
    ``lse``, if given) the same way; SDPA's top-left causal alignment."""
    query, key, value = _last_contiguous(query), _last_contiguous(key), _last_contiguous(value)
    out = _out_bhsd(query, value)
    _ufa.forward(*_plain(query, key, value), out, lse, scale=scale, causal=causal,
                 top_left=True, softcap=softcap, mask=mask, bhsd=True, tf32=_tf32(query))
    return out


def _backward_bhsd(grad_out, query, key, value, out, lse, scale, causal, softcap=0.0):
    """Gradients (dq, dk, dv) of :func:`_forward_bhsd` (no mask), each in the memory order of
    its input; deterministic where PyTorch's ``use_deterministic_algorithms`` asks for it. The
    arrays go to the core as they are (``sdpa_backward`` reads them as ``[B, H, S, D]``), but
    for a last dimension of stride other than 1, copied: the gradient of a sum is an expanded
    tensor of stride 0."""
    grad_out, query, key, value, out = map(_last_contiguous, (grad_out, query, key, value, out))
    dq, dk, dv = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
    _ufa.sdpa_backward(*_plain(grad_out, query, key, value, out), lse, dq, dk, dv, scale, causal,
                       softcap, torch.are_deterministic_algorithms_enabled(), _tf32(query))
    return dq, dk, dv


class _Sdpa(torch.autograd.Function):
    """SDPA's common call (no mask, no dropout) with autograd, on ``[B, H, S, D]`` tensors as
    they are: no views of its own in the graph, and one node. A small call's time is mostly
    what surrounds the kernel, and every transposed view that autograd records costs about a
    microsecond."""

    @staticmethod
    def forward(ctx, query, key, value, params):
        # (scale, causal, softcap) in one argument: apply() costs per argument.
        scale, causal, softcap = params
        b, h, sq, _ = query.shape
        cuda = query.is_cuda
        # Without a device argument the factory is half a microsecond faster.
        lse = (torch.empty(b, h, sq, dtype=torch.float32, device=query.device) if cuda
               else torch.empty(b, h, sq, dtype=torch.float32))
        # The core refuses (ValueError) what _forward_bhsd would first copy (a strided last
        # dimension): the caller then takes the full path.
        out = _out_bhsd(query, value)
        _ufa.sdpa_forward(query, key, value, out, lse, scale, causal, softcap,
                          cuda and _tf32(query))
        ctx.save_for_backward(query, key, value, out)
        # Not an input or output: kept on ctx, as autograd's documentation allows for
        # intermediates (saving it costs more than the attention of a small call).
        ctx.lse = lse
        ctx.params = params
        return out

    @staticmethod
    def backward(ctx, dout):
        query, key, value, out = ctx.saved_tensors
        return (*_backward_bhsd(dout, query, key, value, out, ctx.lse, *ctx.params), None)


_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)


def _sdpa_short(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                softcap) -> Optional[Tensor]:
    """SDPA's common call on a short path, checked in as few attribute reads as possible:
    plain (not nested) 4-D CPU tensors, or CUDA ones where ufa has CUDA; no mask, no
    dropout, no autocast, not traced; heads that need no ``enable_gqa``. The core checks the
    rest itself (dtypes, devices, shapes, strides). None when the call is not one of these,
    or the core refuses it as given (nothing is written then): :func:`_sdpa`'s full path
    decides between ufa and PyTorch. A small call's time is mostly what surrounds the
    kernel."""
    if not (dropout_p == 0.0 and attn_mask is None and type(query) is Tensor
            and type(key) is Tensor and type(value) is Tensor
            and not (query.is_nested or key.is_nested or value.is_nested)
            and (scale is None or type(scale) is float)
            and _any_autocast is not None and not _any_autocast()
            and not torch.compiler.is_compiling()
            and query.dim() == 4 and key.dim() == 4 and value.dim() == 4
            and (query.is_cpu or query.is_cuda and _probe_cuda())
            and (enable_gqa or query.shape[1] == key.shape[1])):
        return None
    causal = bool(is_causal)
    try:
        if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad
                                        or value.requires_grad):
            out = _Sdpa.apply(query, key, value, (scale, causal, softcap))
        else:
            out = _out_bhsd(query, value)
            _ufa.sdpa_forward(query, key, value, out, None, scale, causal, softcap,
                              query.is_cuda and _tf32(query))
    except (ValueError, TypeError, NotImplementedError):
        return None
    return out  # counted by _ufa.sdpa_forward


def _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, softcap,
          fall_back_to, short=True):
    """:func:`scaled_dot_product_attention` with tanh soft-capping of the scores (``softcap``
    > 0, which PyTorch's function lacks; transformers' Gemma 2 has it), and the function that
    serves the calls ufa cannot: ``fall_back_to(query, key, value, attn_mask)``, given the
    tensors after the autocast casts and returning ``[batch, heads, seq_q, dim_v]``.
    ``short=False``: the caller already tried :func:`_sdpa_short`."""
    if short:
        out = _sdpa_short(query, key, value, attn_mask, dropout_p, is_causal, scale,
                          enable_gqa, softcap)
        if out is not None:
            return out
    if isinstance(query, Tensor) and _autocast_on(query.device.type):
        query, key, value, attn_mask = _autocast_cast(query.device.type, query, key, value,
                                                      attn_mask)
    why = _unsupported(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if why is not None:
        _fall_back(why, stacklevel=4)
        return fall_back_to(query, key, value, attn_mask)
    _count("ufa")
    if scale is not None:
        scale = float(scale)
    causal = bool(is_causal)
    if (dropout_p == 0.0 and query.dim() == 4 and not torch.compiler.is_compiling()
            and not _needs_grad(query, key, value)):
        # No autograd, no views.
        return _forward_bhsd(query, key, value, None, scale, causal, softcap, attn_mask)
    three_d = query.dim() == 3
    if three_d:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    # [batch, heads, seq, dim] -> [batch, seq, heads, dim]: views with permuted strides.
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    # The backward is deterministic where PyTorch's switch asks for it, as on the short path.
    out = _attention(q, k, v, scale, causal, True, -1, -1, softcap, None, attn_mask,
                     torch.are_deterministic_algorithms_enabled(), False,
                     dropout_p=float(dropout_p))
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



# ufa as PyTorch's flash attention implementation (torch.nn.attention's registry, PyTorch 2.11+):
# the name is registered here, nothing is activated.
from . import _torch_flash  # noqa: E402,F401
