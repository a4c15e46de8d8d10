"""ufa — Universal Flash Attention.

Exact attention, ``softmax(scale * q @ k^T + bias) @ v``, computed tile by tile so that no
``seqlen_q x seqlen_kv`` matrix is ever stored. Arrays are read in place through DLPack (NumPy,
PyTorch, and any other DLPack producer): any strides are accepted as long as the last dimension
is contiguous, so transposed views are never copied.

- :func:`attention` — the native API, ``[batch, seq, heads, dim]`` layout, NumPy or PyTorch.
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

__all__ = ["attention", "info", "cuda_available", "__version__"]


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

    Returns:
        ``out``, or ``(out, lse)`` when ``return_lse``. The output is ``out`` when given, else a
        new array of q's kind (``torch.Tensor`` for PyTorch, ``numpy.ndarray`` for NumPy).
        PyTorch tensors that require grad are differentiated through ufa's backward pass.
    """
    left, right = _window(window)
    if _is_torch(q):
        from . import torch as _torch_api

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
    )
    return (out, lse) if return_lse else out


def _window(window: Any) -> Tuple[int, int]:
    try:
        left, right = window
        return int(left), int(right)
    except (TypeError, ValueError):
        raise ValueError(f"window={window!r} must be a pair (left, right); -1 = unbounded") from None
