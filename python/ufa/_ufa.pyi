"""Type stubs for the compiled module ``ufa._ufa`` (see ``python/src/lib.rs``).

Array arguments are any DLPack producers (``torch.Tensor``, ``numpy.ndarray``, ...), read or
written in place. Use the public API in :mod:`ufa` and :mod:`ufa.torch`; this module is private.
"""

from typing import Any, Dict, List, Optional, Tuple

__version__: str

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
) -> None:
    """Gradients into ``dq``, ``dk``, ``dv`` (shapes of q, k, v), in place; releases the GIL."""

def cuda_available() -> bool:
    """Whether the core can compute on CUDA tensors here."""

def info() -> Dict[str, Any]:
    """Version, CPU threads and kernel family, CUDA devices (or ``cuda_unavailable``: why not)."""

def _debug_record(on: bool) -> None: ...
def _debug_last_call() -> List[Tuple[str, int, Tuple[int, ...], Tuple[int, ...]]]: ...
def _bench_core(q: Any, k: Any, v: Any, out: Any, iters: int) -> float: ...
def _bench_import(x: Any, iters: int) -> float: ...
