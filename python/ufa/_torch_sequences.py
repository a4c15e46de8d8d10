"""PyTorch front end of ufa's packed variable-length batches and KV caches: FlashAttention's
``flash_attn_varlen_func``, ``flash_attn_with_kvcache`` and the packed-QKV forms, with the same
argument names, shapes and return values. Re-exported by :mod:`ufa.torch`.

The varlen forward and backward are ``torch.library`` custom ops (``ufa::varlen_forward``,
``ufa::varlen_backward``) with fake implementations, so ``torch.compile`` traces them; eager
autograd goes through a plain ``autograd.Function`` (fewer dispatcher round trips). The KV-cache
call writes the cache in place and has no gradient (inference).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from . import _ufa, _window


class _Scores(NamedTuple):
    """What a call computes besides q, k and v: one record passed between the helpers (only
    the custom ops' signatures stay flat, as ``torch.library`` requires)."""

    scale: Optional[float]
    causal: bool
    window_left: int
    window_right: int
    softcap: float
    deterministic: bool
    # CUDA: also check the metadata's values on the host (see flash_attn_with_kvcache).
    checked: bool = False
    # Attention dropout (packed batches; see _dropout_seed); p = 0: none.
    dropout_p: float = 0.0
    seed: int = 0
    offset: int = 0

    def kwargs(self) -> dict:
        return dict(scale=self.scale, causal=self.causal, window_left=self.window_left,
                    window_right=self.window_right, softcap=self.softcap, checked=self.checked)

    def dropout_kwargs(self) -> dict:
        return dict(dropout_p=self.dropout_p, seed=self.seed, offset=self.offset)


def _tf32(q: Tensor) -> bool:
    """Whether q is a float32 CUDA tensor and PyTorch's switch lets fp32 matmuls round to TF32
    (``torch.backends.cuda.matmul.fp32_precision == "tf32"``, or the legacy ``allow_tf32``):
    ufa's fp32 CUDA forward and backward follow it as ``torch.matmul`` does. Read per call
    (other tensors skip the read, a microsecond of a small call); the new API is read first
    because PyTorch refuses to read the legacy flag once the new one was set."""
    if q.dtype != torch.float32 or not q.is_cuda:
        return False
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)  # PyTorch 2.9+
    if precision is None:
        return bool(matmul.allow_tf32)
    if precision == "none":  # inherits the global setting
        precision = getattr(torch.backends, "fp32_precision", "none")
    return precision == "tf32"


def _scores(softmax_scale, causal, window_size, softcap, deterministic=False,
            checked=False) -> _Scores:
    left, right = _window(window_size)
    return _Scores(None if softmax_scale is None else float(softmax_scale), bool(causal), left,
                   right, float(softcap), bool(deterministic), bool(checked))


def _dropout_refusal(q: Tensor, dropout_p: float) -> Optional[str]:
    """Why ufa cannot compute this call's dropout (None: it can, or there is none): the one
    rule behind SDPA's fallback and the FlashAttention functions' error. Under
    ``torch.compile`` every path draws its generator state as a tensor in the traced graph
    (:func:`_dropout_rng`), so compiled code is served."""
    if dropout_p == 0.0 or torch.compiler.is_compiling():
        return None
    if q.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # The generator's seed is drawn on the host per call: a captured graph would replay
        # one mask on every replay.
        return ("attention dropout while capturing a CUDA graph is not implemented by ufa "
                "(each replay would repeat the captured call's mask)")
    return None


def _dropout_seed(q: Tensor, dropout_p: float) -> int:
    """The generator seed of one call's dropout (0 without dropout), drawn from PyTorch's
    default generator so that ``torch.manual_seed`` makes runs repeat; the backward is given
    the same one. 0 under ``torch.compile`` too, where the graph draws the state instead
    (:func:`_dropout_rng`): an int drawn here would be baked into the graph. Raises
    NotImplementedError where :func:`_dropout_refusal` says why."""
    if dropout_p == 0.0 or torch.compiler.is_compiling():
        return 0
    why = _dropout_refusal(q, dropout_p)
    if why is not None:
        raise NotImplementedError(why)
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))


def _dropout_rng(dropout_p: float) -> Optional[Tensor]:
    """The generator state of one call's dropout as a tensor, (seed, offset) int64 on the CPU
    (None without dropout): what a ``torch.compile`` graph passes to the custom ops, drawn by
    an op of the graph so that every run of it draws anew (an int would be baked into the
    graph, and every call would drop the same probabilities)."""
    if dropout_p == 0.0:
        return None
    return torch.randint(0, 2**63 - 1, (2,), dtype=torch.int64)


def _seed_offset(seed: int, offset: int, rng: Optional[Tensor]):
    """The (seed, offset) a custom op runs with: ``rng``'s when the caller traced one."""
    if rng is None:
        return seed, offset
    if not (isinstance(rng, Tensor) and rng.dtype == torch.int64 and rng.device.type == "cpu"
            and tuple(rng.shape) == (2,)):
        what = (f"a {rng.dtype} tensor of shape {tuple(rng.shape)} on {rng.device}"
                if isinstance(rng, Tensor) else type(rng).__name__)
        raise ValueError(f"rng must be the dropout generator state, an int64 CPU tensor "
                         f"[seed, offset] of shape (2,); got {what}")
    seed, offset = rng.tolist()
    return seed % 2**64, offset % 2**64


def _int32(x: Optional[Tensor], name: str) -> Optional[Tensor]:
    """Sequence metadata as int32 (FlashAttention's type); other integer tensors are converted."""
    if x is None:
        return None
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int32, got {type(x).__name__}")
    if x.dtype == torch.int32:
        return x
    if x.dtype in (torch.int64, torch.int16, torch.int8, torch.uint8):
        return x.to(torch.int32)
    raise TypeError(f"{name}.dtype={x.dtype} but must be an integer dtype (int32)")


def _out_bshd(q: Tensor, dv: int) -> Tensor:
    """The ``[B, S, H, Dv]`` output of q: empty_like where that is the same tensor (q
    contiguous, equal head dims), as it costs half of new_empty."""
    if dv == q.shape[-1] and q.is_contiguous():
        return torch.empty_like(q)
    return q.new_empty(q.shape[:3] + (dv,))


def _last_contiguous(t: Tensor) -> Tensor:
    """The core needs stride 1 in the last dimension; anything else (rare) is copied, as
    FlashAttention's own wrappers do."""
    return t if t.stride(-1) == 1 or t.size(-1) == 1 else t.contiguous()


# --------------------------------------------------------------------------------------------
# Varlen custom ops
# --------------------------------------------------------------------------------------------


def _varlen_forward_impl(q, k, v, cu_q, cu_k, max_q, max_k, seqused_k, block_table, alibi,
                         s: _Scores):
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    out = q.new_empty((q.shape[0], q.shape[1], v.shape[-1]))
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    _ufa.forward_varlen(q, k, v, out, lse, cu_q, cu_k, max_q, max_k, seqused_k=seqused_k,
                        block_table=block_table, alibi_slopes=alibi, tf32=_tf32(q), **s.kwargs(),
                        **s.dropout_kwargs())
    return out, lse


@torch.library.custom_op("ufa::varlen_forward", mutates_args=())
def varlen_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    seqused_k: Optional[Tensor],
    block_table: Optional[Tensor],
    alibi_slopes: Optional[Tensor],
    scale: Optional[float],
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    deterministic: bool,
    checked: bool,
    dropout_p: float = 0.0,
    seed: int = 0,
    offset: int = 0,
    rng: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Packed-batch attention; returns (out [total_q, Hq, Dv], lse f32 [Hq, total_q]).
    Dropout as for ``ufa::attention_forward``: at (``seed``, ``offset``), or at ``rng``."""
    seed, offset = _seed_offset(seed, offset, rng)
    s = _Scores(scale, causal, window_left, window_right, softcap, deterministic, checked,
                dropout_p, seed, offset)
    return _varlen_forward_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                seqused_k, block_table, alibi_slopes, s)


@varlen_forward.register_fake
def _varlen_forward_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         seqused_k, block_table, alibi_slopes, scale, causal, window_left,
                         window_right, softcap, deterministic, checked, dropout_p=0.0, seed=0,
                         offset=0, rng=None):
    return (q.new_empty((q.shape[0], q.shape[1], v.shape[-1])),
            q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32))


def _varlen_backward_impl(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, alibi,
                          s: _Scores):
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    dout, out = _last_contiguous(dout), _last_contiguous(out)
    # Rows outside every sequence get no gradient: zeros, not whatever memory held.
    dq, dk, dv = q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    _ufa.backward_varlen(q, k, v, out, dout, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k,
                         alibi_slopes=alibi, deterministic=s.deterministic, tf32=_tf32(q),
                         **s.kwargs(), **s.dropout_kwargs())
    return dq, dk, dv


@torch.library.custom_op("ufa::varlen_backward", mutates_args=())
def varlen_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    alibi_slopes: Optional[Tensor],
    scale: Optional[float],
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    deterministic: bool,
    checked: bool,
    dropout_p: float = 0.0,
    seed: int = 0,
    offset: int = 0,
    rng: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of varlen_forward, packed like q, k and v."""
    seed, offset = _seed_offset(seed, offset, rng)
    s = _Scores(scale, causal, window_left, window_right, softcap, deterministic, checked,
                dropout_p, seed, offset)
    return _varlen_backward_impl(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                 max_seqlen_q, max_seqlen_k, alibi_slopes, s)


@varlen_backward.register_fake
def _varlen_backward_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                          max_seqlen_k, alibi_slopes, scale, causal, window_left, window_right,
                          softcap, deterministic, checked, dropout_p=0.0, seed=0, offset=0,
                          rng=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _split_rng(params) -> Tuple[tuple, Optional[Tensor]]:
    """A custom op's parameters after its tensors, as (the scalars its backward takes, the
    generator state): the state is the last parameter of every op that drops, a tensor (or
    None) that autograd must save as a tensor."""
    *scalars, rng = params
    return tuple(scalars), rng


def _varlen_setup_context(ctx, inputs, output):
    (q, k, v, cu_q, cu_k, max_q, max_k, _seqused, _table, alibi, *params) = inputs
    ctx.params, rng = _split_rng(params)
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi, rng)
    ctx.lengths = (max_q, max_k)
    ctx.mark_non_differentiable(lse)


def _varlen_backward_op(ctx, dout, _dlse):
    q, k, v, out, lse, cu_q, cu_k, alibi, rng = ctx.saved_tensors
    dq, dk, dv = varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, *ctx.lengths, alibi,
                                 *ctx.params, rng=rng)
    return (dq, dk, dv) + (None,) * 18


varlen_forward.register_autograd(_varlen_backward_op, setup_context=_varlen_setup_context)


class _Varlen(torch.autograd.Function):
    """Eager autograd over the same implementations as the custom ops."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, seqused_k, block_table, alibi,
                s: _Scores):
        out, lse = _varlen_forward_impl(q, k, v, cu_q, cu_k, max_q, max_k, seqused_k,
                                        block_table, alibi, s)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi)
        ctx.lengths = (max_q, max_k)
        ctx.scores = s
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_q, cu_k, alibi = ctx.saved_tensors
        dq, dk, dv = _varlen_backward_impl(dout, q, k, v, out, lse, cu_q, cu_k, *ctx.lengths,
                                           alibi, ctx.scores)
        return (dq, dk, dv) + (None,) * 8


def _varlen(q, k, v, cu_q, cu_k, max_q, max_k, seqused_k, block_table, alibi,
            s: _Scores) -> Tuple[Tensor, Tensor]:
    cu_q, cu_k = _int32(cu_q, "cu_seqlens_q"), _int32(cu_k, "cu_seqlens_k")
    seqused_k, block_table = _int32(seqused_k, "seqused_k"), _int32(block_table, "block_table")
    max_q, max_k = int(max_q), int(max_k)
    compiling = torch.compiler.is_compiling()
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if needs_grad and (seqused_k is not None or block_table is not None):
        raise NotImplementedError(
            "gradients through seqused_k or a paged block_table are not implemented (the "
            "backward takes packed k and v with every sequence's keys); run under "
            "torch.no_grad() or pass packed k and v")
    if compiling:
        # The generator state is drawn by the graph (a tensor), anew on every run of it.
        return varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, seqused_k, block_table, alibi,
                              s.scale, s.causal, s.window_left, s.window_right, s.softcap,
                              s.deterministic, s.checked, s.dropout_p, 0, 0,
                              _dropout_rng(s.dropout_p))
    if needs_grad:
        return _Varlen.apply(q, k, v, cu_q, cu_k, max_q, max_k, seqused_k, block_table, alibi, s)
    return _varlen_forward_impl(q, k, v, cu_q, cu_k, max_q, max_k, seqused_k, block_table,
                                alibi, s)


# --------------------------------------------------------------------------------------------
# FlashAttention-compatible functions
# --------------------------------------------------------------------------------------------


def flash_attn_varlen_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: Optional[Tensor] = None,
    seqused_k: Optional[Tensor] = None,
    *,
    checked: bool = False,
):
    """``flash_attn.flash_attn_varlen_func`` on ufa: sequences packed one after another.

    q ``[total_q, heads_q, head_dim]``, k/v ``[total_k, heads_kv, head_dim]`` (or, with
    ``block_table`` int32 ``[batch, max_pages]``, a paged cache ``[num_pages, page_size,
    heads_kv, head_dim]`` with any power-of-two page size up to 256); ``cu_seqlens_q``/
    ``cu_seqlens_k`` int32 ``[batch + 1]`` from 0; ``seqused_k`` int32 ``[batch]`` limits each
    sequence's keys. Causal masking aligns to each sequence's bottom-right corner.

    Returns ``out`` ``[total_q, heads_q, head_dim]``, or ``(out, softmax_lse, None)`` with
    ``return_attn_probs`` (``softmax_lse`` float32 ``[heads_q, total_q]``). Rows past
    ``cu_seqlens_q[-1]`` are not written. Differentiable with packed k and v. ``checked`` (a
    ufa addition) is as for :func:`flash_attn_with_kvcache`. ``dropout_p`` is as for
    :func:`ufa.torch.flash_attn_func` (CPU tensors); sequence b draws its mask as batch entry b.
    """
    s = _scores(softmax_scale, causal, window_size, softcap, deterministic, checked)
    s = s._replace(dropout_p=float(dropout_p), seed=_dropout_seed(q, dropout_p))
    out, lse = _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                       seqused_k, block_table, alibi_slopes, s)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_qkvpacked_func(qkv: Tensor, dropout_p: float = 0.0,
                              softmax_scale: Optional[float] = None, causal: bool = False,
                              window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                              alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                              return_attn_probs: bool = False):
    """``flash_attn.flash_attn_qkvpacked_func``: qkv ``[batch, seqlen, 3, heads, head_dim]``,
    read through strided views (no copy)."""
    from .torch import flash_attn_func

    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale,
                           causal, window_size, softcap, alibi_slopes, deterministic,
                           return_attn_probs)


def flash_attn_kvpacked_func(q: Tensor, kv: Tensor, dropout_p: float = 0.0,
                             softmax_scale: Optional[float] = None, causal: bool = False,
                             window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                             alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                             return_attn_probs: bool = False):
    """``flash_attn.flash_attn_kvpacked_func``: kv ``[batch, seqlen_k, 2, heads_kv, head_dim]``,
    read through strided views (no copy)."""
    from .torch import flash_attn_func

    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal,
                           window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                                     dropout_p: float = 0.0,
                                     softmax_scale: Optional[float] = None, causal: bool = False,
                                     window_size: Tuple[int, int] = (-1, -1),
                                     softcap: float = 0.0,
                                     alibi_slopes: Optional[Tensor] = None,
                                     deterministic: bool = False,
                                     return_attn_probs: bool = False):
    """``flash_attn.flash_attn_varlen_qkvpacked_func``: qkv ``[total, 3, heads, head_dim]``."""
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens,
                                  max_seqlen, max_seqlen, dropout_p, softmax_scale, causal,
                                  window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_varlen_kvpacked_func(q: Tensor, kv: Tensor, cu_seqlens_q: Tensor,
                                    cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                                    dropout_p: float = 0.0,
                                    softmax_scale: Optional[float] = None, causal: bool = False,
                                    window_size: Tuple[int, int] = (-1, -1),
                                    softcap: float = 0.0,
                                    alibi_slopes: Optional[Tensor] = None,
                                    deterministic: bool = False,
                                    return_attn_probs: bool = False):
    """``flash_attn.flash_attn_varlen_kvpacked_func``: kv ``[total_k, 2, heads_kv, head_dim]``."""
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k,
                                  max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                                  window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Optional[Tensor] = None,
    v: Optional[Tensor] = None,
    rotary_cos: Optional[Tensor] = None,
    rotary_sin: Optional[Tensor] = None,
    cache_seqlens: Optional[Union[int, Tensor]] = None,
    cache_batch_idx: Optional[Tensor] = None,
    cache_leftpad: Optional[Tensor] = None,
    block_table: Optional[Tensor] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: Optional[Tensor] = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
    *,
    checked: bool = False,
):
    """``flash_attn.flash_attn_with_kvcache`` on ufa: attention over a KV cache, appending in
    place.

    q ``[batch, seqlen_q, heads_q, head_dim]``; k_cache/v_cache ``[batch_cache, seqlen_cache,
    heads_kv, head_dim]``, or paged ``[num_blocks, page_block_size, heads_kv, head_dim]`` with
    ``block_table`` int32 ``[batch, max_blocks]`` (any power-of-two page size from 1 to 256;
    pages may be shared and in any order). When ``k``/``v`` ``[batch, seqlen_new, heads_kv,
    head_dim]`` are given they are written into the cache at ``cache_seqlens`` first (rotated by
    ``rotary_cos``/``rotary_sin`` ``[seqlen_ro, rotary_dim / 2]`` when given, which also rotate q:
    at ``cache_seqlens + i`` when causal or windowed, else at ``cache_seqlens``), and q attends
    to ``cache_seqlens + seqlen_new`` keys per sequence, bottom-right aligned. ``cache_seqlens``
    (int or int32 ``[batch]``) is not advanced. Everything is validated before the cache is
    written. ``num_splits`` is accepted for compatibility: ufa chooses its own KV splits.

    Metadata on the GPU (``cache_seqlens``, ``block_table``, ``cache_batch_idx``) is read by the
    kernels, so its values are not checked on the host unless ``checked=True`` (a ufa addition,
    which costs a synchronisation and so cannot be captured in a CUDA graph). Without it a bad
    value gives wrong numbers for its sequence but never a read or write outside the tensors:
    the kernels skip indices out of range. CPU calls always check, and raise ValueError.

    Returns ``out`` ``[batch, seqlen_q, heads_q, head_dim]``, or ``(out, softmax_lse)`` with
    ``return_softmax_lse`` (float32 ``[batch, heads_q, seqlen_q]``).
    """
    if cache_leftpad is not None:
        raise NotImplementedError(
            "cache_leftpad is not supported by ufa; keep each sequence's keys at the start of "
            "its cache entry (cache_seqlens counts them)")
    if not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits={num_splits!r} must be an int >= 0")
    s = _scores(softmax_scale, causal, window_size, softcap, checked=checked)
    batch = q.shape[0]
    if cache_seqlens is None:
        raise ValueError("cache_seqlens is required: the keys already in the cache for each "
                         "sequence (an int or an int32 tensor [batch])")
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)
    cache_seqlens = _int32(cache_seqlens, "cache_seqlens")
    q = _last_contiguous(q)
    out = _out_bshd(q, v_cache.shape[-1])
    lse = (q.new_empty((batch, q.shape[2], q.shape[1]), dtype=torch.float32)
           if return_softmax_lse else None)
    _ufa.forward_kvcache(
        q, k_cache, v_cache, cache_seqlens, out, lse,
        block_table=_int32(block_table, "block_table"),
        cache_batch_idx=_int32(cache_batch_idx, "cache_batch_idx"), k=k, v=v,
        rotary_cos=rotary_cos, rotary_sin=rotary_sin, rotary_interleaved=rotary_interleaved,
        alibi_slopes=alibi_slopes, tf32=_tf32(q), **s.kwargs())
    return (out, lse) if return_softmax_lse else out
