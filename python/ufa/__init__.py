"""ufa — Universal Flash Attention.

Exact attention, ``softmax(scale * q @ k^T + bias) @ v``, computed tile by tile so that no
``seqlen_q x seqlen_kv`` matrix is ever stored. Arrays are read in place through DLPack (NumPy,
PyTorch, and any other DLPack producer): any strides are accepted as long as the last dimension
is contiguous, so transposed views are never copied.

- :func:`attention` — the native API, ``[batch, seq, heads, dim]`` layout, NumPy or PyTorch.
- :func:`merge_states` / :func:`merge_state` — combine partial attention results over
  disjoint keys by their log-sum-exp (split-KV decoding, shared prefixes, ring attention).
- :mod:`ufa.torch` — drop-in ``flash_attn_func`` and ``scaled_dot_product_attention`` with
  autograd and ``torch.compile`` support, and :func:`ufa.torch.patch` to route
  ``torch.nn.functional.scaled_dot_product_attention`` through ufa.

Errors: bad arguments raise ``ValueError`` (``TypeError`` for dtypes) whose message names the
argument; problems the library does not implement raise ``NotImplementedError``; device or
backend failures raise ``RuntimeError``.
"""

from __future__ import annotations

import sys
from typing import Any, Optional, Tuple

from . import _ufa
from ._ufa import __version__, cuda_available, info

__all__ = [
    "attention",
    "merge_states",
    "merge_state",
    "lse_to_log2",
    "lse_from_log2",
    "info",
    "cuda_available",
    "__version__",
]


def _is_torch(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _empty_like_kind(like: Any, shape: Tuple[int, ...], dtype: Any = None) -> Any:
    """A new array of ``like``'s kind (NumPy for NumPy, array-API namespaces otherwise)."""
    np = sys.modules.get("numpy")
    if np is not None and isinstance(like, np.ndarray):
        return np.empty(shape, dtype=like.dtype if dtype is None else dtype)
    if type(like).__module__.split(".")[0] in ("jax", "jaxlib"):
        raise TypeError("q is a JAX array, which is immutable: pass out= a writable array "
                        "(NumPy, PyTorch, CuPy, ...) of shape [batch, seqlen_q, heads_q, "
                        "head_dim_v]")
    space = getattr(like, "__array_namespace__", None)
    if space is not None:
        xp = space()
        kwargs = {}
        if hasattr(like, "device"):
            kwargs["device"] = like.device
        return xp.empty(shape, dtype=like.dtype if dtype is None else getattr(xp, dtype), **kwargs)
    raise TypeError(
        f"cannot allocate an output like q (a {type(like).__name__}); pass out= explicitly"
    )


def _shape4(x: Any, name: str) -> Tuple[int, int, int, int]:
    shape = getattr(x, "shape", None)
    if shape is None:
        raise TypeError(
            f"{name} must be an array that supports DLPack (torch.Tensor, numpy.ndarray, ...), "
            f"got {type(x).__name__}"
        )
    if len(shape) != 4:
        raise ValueError(
            f"{name} must have 4 dimensions [batch, seqlen, heads, head_dim], "
            f"got {len(shape)} (shape {tuple(shape)})"
        )
    return tuple(int(s) for s in shape)  # type: ignore[return-value]


def attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    scale: Optional[float] = None,
    causal: bool = False,
    window: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Any = None,
    mask: Any = None,
    return_lse: bool = False,
    out: Any = None,
    fp32_precision: Optional[str] = None,
) -> Any:
    """Exact attention in ``[batch, seq, heads, dim]`` layout.

    Args:
        q: ``[batch, seqlen_q, heads_q, head_dim]``, float16, bfloat16 or float32.
        k: ``[batch, seqlen_kv, heads_kv, head_dim]``; ``heads_kv`` must divide ``heads_q``
            (grouped-query attention).
        v: ``[batch, seqlen_kv, heads_kv, head_dim_v]``.
        scale: multiplies ``q @ k^T``; default ``1/sqrt(head_dim)``.
        causal: query ``i`` sees keys ``j <= i + seqlen_kv - seqlen_q`` (bottom-right aligned,
            as FlashAttention 2+).
        window: ``(left, right)`` sliding window around the aligned diagonal; -1 = unbounded.
        softcap: if > 0, scores become ``softcap * tanh(scores / softcap)``.
        alibi_slopes: float32 ``[heads_q]`` or ``[batch, heads_q]``; adds
            ``-slope * |i + seqlen_kv - seqlen_q - j|`` to the scores.
        mask: bool (True = attend) or additive float mask broadcastable to
            ``[batch, heads_q, seqlen_q, seqlen_kv]``; read in place, never expanded.
        return_lse: also return the log-sum-exp of each row's scores, float32
            ``[batch, heads_q, seqlen_q]`` (-inf where a row sees no key).
        out: optional ``[batch, seqlen_q, heads_q, head_dim_v]`` array written in place.
        fp32_precision: float32 inputs on CUDA: ``"ieee"`` (the default) keeps fp32 accuracy,
            ``"tf32"`` rounds each operand to TF32 once (about three times faster, outputs
            within 2e-3 relative). PyTorch tensors follow PyTorch's own switch
            (``torch.backends.cuda.matmul.fp32_precision``) and take no value here.

    Returns:
        ``out``, or ``(out, lse)`` when ``return_lse``. The output is ``out`` when given, else a
        new array of q's kind (``torch.Tensor`` for PyTorch, ``numpy.ndarray`` for NumPy).
        PyTorch tensors that require grad are differentiated through ufa's backward pass.
    """
    left, right = _window(window)
    if fp32_precision not in (None, "ieee", "tf32"):
        raise ValueError(f"fp32_precision={fp32_precision!r} must be 'ieee' or 'tf32'")
    if _is_torch(q):
        from . import torch as _torch_api

        if fp32_precision is not None:
            raise ValueError(
                "fp32_precision is for arrays other than PyTorch tensors: PyTorch tensors follow "
                "torch.backends.cuda.matmul.fp32_precision ('ieee' or 'tf32'), as torch.matmul "
                "does")

        return _torch_api._attention(
            q, k, v, scale, causal, False, left, right, float(softcap), alibi_slopes, mask,
            False, return_lse, out,
        )
    b, sq, hq, _ = _shape4(q, "q")
    dv = _shape4(v, "v")[3]
    if out is None:
        out = _empty_like_kind(q, (b, sq, hq, dv))
    # The LSE is allocated like `out` (so a caller-given writable array decides its kind).
    lse = _empty_like_kind(out, (b, hq, sq), "float32") if return_lse else None
    _ufa.forward(
        q, k, v, out, lse, scale=scale, causal=causal, window_left=left, window_right=right,
        softcap=float(softcap), alibi_slopes=alibi_slopes, mask=mask,
        tf32=fp32_precision == "tf32",
    )
    return (out, lse) if return_lse else out


def _window(window: Any) -> Tuple[int, int]:
    try:
        left, right = window
        return int(left), int(right)
    except (TypeError, ValueError):
        raise ValueError(f"window={window!r} must be a pair (left, right); -1 = unbounded") from None


def _states(x: Any, name: str) -> list:
    """A sequence of arrays, or one array stacked along its first dimension, as a list."""
    if isinstance(x, (list, tuple)):
        return list(x)
    shape = getattr(x, "shape", None)
    if shape is None:
        raise TypeError(f"{name} must be a list of arrays or one stacked array, got "
                        f"{type(x).__name__}")
    return [x[i] for i in range(shape[0])]


def _new_like(like: Any, shape: Tuple[int, ...], float32: bool = False) -> Any:
    """A new array of ``like``'s kind and device (its dtype, or float32)."""
    if _is_torch(like):
        torch = sys.modules["torch"]
        return like.new_empty(shape, dtype=torch.float32 if float32 else like.dtype)
    return _empty_like_kind(like, shape, "float32" if float32 else None)


def merge_states(outs: Any, lses: Any, *, out: Any = None, lse_out: Any = None,
                 return_lse: bool = True) -> Any:
    """Merges partial attention results over disjoint sets of keys into one.

    ``outs``: states' outputs ``[batch, seqlen, heads, dim]`` (or ``[total, heads, dim]``, a
    packed batch's), as a list or stacked along a first dimension; ``lses``: their log-sum-exps,
    float32 ``[batch, heads, seqlen]`` (``[heads, total]``), natural log, as every ufa call
    returns them. Weights are ``exp(lse_i - max)``: a state with LSE -inf (it saw no key)
    contributes nothing, and a row no state saw gets 0 and LSE -inf. NumPy or PyTorch (any
    device ufa runs on; not differentiable); ``out``/``lse_out`` may be the first state's own
    arrays (merged in place).

    FlashInfer's LSEs are base 2: convert them with :func:`lse_from_log2` first.

    Returns the merged output, and its LSE when ``return_lse``.
    """
    outs, lses = _states(outs, "outs"), _states(lses, "lses")
    if not outs:
        raise ValueError("outs is empty: a merge needs at least one state")
    packed = len(outs[0].shape) == 3
    if packed:  # [total, heads, dim] with [heads, total]: a batch of one, as views
        outs, lses = [o[None] for o in outs], [l[None] for l in lses]
    if out is None:
        out = _new_like(outs[0], tuple(outs[0].shape))
    elif packed:
        out = out[None]
    if lse_out is None and return_lse:
        lse_out = _new_like(lses[0], tuple(lses[0].shape), float32=True)
    elif lse_out is not None and packed:
        lse_out = lse_out[None]
    _ufa.merge_states(outs, lses, out, lse_out)
    if packed:
        out = out[0]
        lse_out = lse_out[0] if lse_out is not None else None
    return (out, lse_out) if return_lse else out


def merge_state(out_a: Any, lse_a: Any, out_b: Any, lse_b: Any) -> Tuple[Any, Any]:
    """Merges two attention states (see :func:`merge_states`); returns ``(out, lse)``."""
    return merge_states([out_a, out_b], [lse_a, lse_b])


_LN2 = 0.6931471805599453


def lse_to_log2(lse: Any) -> Any:
    """A natural-log LSE (ufa's) as a base-2 one (FlashInfer's): ``lse / ln 2``."""
    return lse * (1.0 / _LN2)


def lse_from_log2(lse2: Any) -> Any:
    """A base-2 LSE (FlashInfer's) as a natural-log one (ufa's): ``lse2 * ln 2``."""
    return lse2 * _LN2
