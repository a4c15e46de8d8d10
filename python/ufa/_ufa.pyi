"""Type stubs for the compiled module ``ufa._ufa`` (see ``python/src/lib.rs``).

Array arguments are any DLPack producers (``torch.Tensor``, ``numpy.ndarray``, ...), read or
written in place. Use the public API in :mod:`ufa` and :mod:`ufa.torch`; this module is private.
"""

from typing import Any, Dict, List, Optional, Tuple

__version__: str
# The largest head_dim (and head_dim_v) the core accepts.
MAX_HEAD_DIM: int

def forward(
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Optional[Any] = None,
    *,
    scale: Optional[float] = None,
    causal: bool = False,
    top_left: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: Optional[Any] = None,
    mask: Optional[Any] = None,
    bhsd: bool = False,
    tf32: bool = False,
    dropout_p: float = 0.0,
    seed: int = 0,
    offset: int = 0,
) -> None:
    """Attention into ``out`` (and the log-sum-exp into ``lse``), in place; releases the GIL."""

def backward(
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    dout: Any,
    lse: Any,
    dq: Any,
    dk: Any,
    dv: Any,
    *,
    scale: Optional[float] = None,
    causal: bool = False,
    top_left: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: Optional[Any] = None,
    mask: Optional[Any] = None,
    deterministic: bool = False,
    tf32: bool = False,
    dropout_p: float = 0.0,
    seed: int = 0,
    offset: int = 0,
    bhsd: bool = False,
) -> None:
    """Gradients into ``dq``, ``dk``, ``dv`` (shapes of q, k, v), in place; releases the GIL."""

def sdpa_forward(
    q: Any, k: Any, v: Any, out: Any, lse: Optional[Any], scale: Optional[float], causal: bool,
    softcap: float, tf32: bool, /,
) -> None:
    """``forward(..., top_left=True, bhsd=True)`` with positional arguments (SDPA's short path)."""

def sdpa_backward(
    dout: Any, q: Any, k: Any, v: Any, out: Any, lse: Any, dq: Any, dk: Any, dv: Any,
    scale: Optional[float], causal: bool, softcap: float, deterministic: bool, tf32: bool, /,
) -> None:
    """``backward(..., top_left=True, bhsd=True)`` with positional arguments (SDPA's short
    path's backward)."""

def forward_varlen(
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Optional[Any],
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    seqused_k: Optional[Any] = None,
    block_table: Optional[Any] = None,
    scale: Optional[float] = None,
    causal: bool = False,
    top_left: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: Optional[Any] = None,
    checked: bool = False,
    tf32: bool = False,
    dropout_p: float = 0.0,
    seed: int = 0,
    offset: int = 0,
) -> None:
    """Packed-batch attention into ``out`` (and ``lse`` [heads_q, total_q]), in place."""

def backward_varlen(
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    dout: Any,
    lse: Any,
    dq: Any,
    dk: Any,
    dv: Any,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    scale: Optional[float] = None,
    causal: bool = False,
    top_left: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: Optional[Any] = None,
    deterministic: bool = False,
    checked: bool = False,
    dropout_p: float = 0.0,
    seed: int = 0,
    offset: int = 0,
) -> None:
    """Gradients of ``forward_varlen`` into ``dq``, ``dk``, ``dv``, in place."""

def forward_kvcache(
    q: Any,
    k_cache: Any,
    v_cache: Any,
    cache_seqlens: Any,
    out: Any,
    lse: Optional[Any] = None,
    *,
    block_table: Optional[Any] = None,
    cache_batch_idx: Optional[Any] = None,
    k: Optional[Any] = None,
    v: Optional[Any] = None,
    rotary_cos: Optional[Any] = None,
    rotary_sin: Optional[Any] = None,
    rotary_interleaved: bool = False,
    scale: Optional[float] = None,
    causal: bool = False,
    top_left: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: Optional[Any] = None,
    checked: bool = False,
    tf32: bool = False,
) -> None:
    """KV-cache attention: appends k/v into the cache, then attends; in place."""

def merge_states(outs: List[Any], lses: List[Any], out: Any, lse: Optional[Any] = None) -> None:
    """Merges attention states into ``out`` (and ``lse``), in place."""

def cuda_available() -> bool:
    """Whether the core can compute on CUDA tensors here."""

def info() -> Dict[str, Any]:
    """Version, CPU threads and kernel family, the per-core rates that chose it (``cpu_rates``:
    ``fma_gflops``, ``bf16_dot_gflops``, ``bf16_dot_min_ratio``; None without AVX-512 BF16),
    the AMX tile unit (``amx``: ``cpu``, ``os`` (the OS saves its state), ``granted`` (this process
    may use it), ``by_default``), CUDA devices (or
    ``cuda_unavailable``: why not). ``UFA_CPU_ISA`` picks the family by hand."""

def _debug_record(on: bool) -> None: ...
def _debug_last_call() -> List[Tuple[str, int, Tuple[int, ...], Tuple[int, ...]]]: ...
def _bench_core(q: Any, k: Any, v: Any, out: Any, iters: int) -> float: ...
def _dropout_factors(p: float, seed: int, offset: int, heads: int, rows: int,
                     cols: int) -> List[float]: ...
def _bench_import(x: Any, iters: int) -> float: ...
