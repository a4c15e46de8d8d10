"""Bad input raises ValueError/TypeError naming the argument; SDPA falls back (and counts) or
raises exactly as PyTorch; patching; CUDA plumbing without a GPU."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ufa
import ufa.torch as ut
from conftest import FakeCudaArray


@pytest.fixture(params=["attention", "flash_attn_func"])
def fn(request):
    return ufa.attention if request.param == "attention" else ut.flash_attn_func


def test_wrong_rank(fn):
    with pytest.raises(ValueError, match=r"\bq\b.*4 dimensions"):
        fn(torch.randn(2, 8, 16), torch.randn(2, 8, 1, 16), torch.randn(2, 8, 1, 16))


def test_mismatched_heads(fn):
    q, k = torch.randn(1, 8, 4, 16), torch.randn(1, 8, 3, 16)
    with pytest.raises(ValueError, match=r"k\.shape\[2\]=3"):
        fn(q, k, k)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_unsupported_dtype(fn, dtype):
    q = torch.ones(1, 8, 2, 16, dtype=dtype)
    with pytest.raises(TypeError, match=r"q\.dtype"):
        fn(q, q, q)


def test_mixed_dtypes(fn):
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(TypeError, match=r"k\.dtype"):
        fn(q, q.half(), q)


def test_non_contiguous_last_dim(fn):
    """PyTorch tensors with a strided last dimension are copied (as PyTorch's SDPA and
    FlashAttention do); other arrays are read in place only, and refused by name."""
    q = torch.randn(1, 8, 2, 32)[..., ::2]
    k = torch.randn(1, 8, 2, 16)
    assert torch.allclose(fn(q, k, k), fn(q.contiguous(), k, k), rtol=0, atol=0)
    qn = np.random.rand(1, 8, 2, 32).astype(np.float32)[..., ::2]
    kn = np.random.rand(1, 8, 2, 16).astype(np.float32)
    with pytest.raises(ValueError, match=r"q\.strides\[3\]=2"):
        ufa.attention(qn, kn, kn)


def test_not_an_array():
    with pytest.raises(TypeError, match=r"\bq\b"):
        ufa.attention([[1.0]], np.zeros((1, 1, 1, 1), np.float32), None)


def test_bad_window_and_softcap():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="window_left"):
        ufa.attention(q, q, q, window=(-3, 0))
    with pytest.raises(ValueError, match="softcap"):
        ufa.attention(q, q, q, softcap=-1.0)


def test_out_with_wrong_shape():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match=r"out\.shape"):
        ufa.attention(q, q, q, out=torch.empty(1, 8, 2, 8))


def test_out_aliasing_input():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="out shares memory with q"):
        ufa.attention(q, q, q, out=q)


def test_device_mismatch_without_a_gpu():
    """A DLPack producer that claims CUDA: the core rejects the mix before touching memory."""
    q = np.random.randn(1, 8, 2, 16).astype(np.float32)
    with pytest.raises(ValueError, match=r"k is on cuda:0 but q is on cpu"):
        ufa.attention(q, FakeCudaArray(q.copy()), q)


@pytest.mark.skipif(ufa.cuda_available(), reason="ufa has a CUDA backend here")
def test_cuda_tensors_reach_the_core():
    """CUDA-labelled arrays flow through the same path and get the core's clear error."""
    q = FakeCudaArray(np.random.randn(1, 8, 2, 16).astype(np.float32))
    out = FakeCudaArray(np.zeros((1, 8, 2, 16), np.float32))
    with pytest.raises(RuntimeError, match="CUDA"):
        ufa.attention(q, q, q, out=out)


def test_device_mismatch_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    q = torch.randn(1, 8, 2, 16, device="cuda")
    with pytest.raises(ValueError, match=r"k is on cpu"):
        ufa.attention(q, q.cpu(), q)


# --- SDPA: fallbacks and PyTorch's own errors ----------------------------------------------

def _qkv(h_kv=4):
    return torch.randn(2, 4, 8, 16), torch.randn(2, h_kv, 8, 16), torch.randn(2, h_kv, 8, 16)


def test_sdpa_falls_back_and_counts():
    q, k, v = _qkv()
    ut.reset_fallback_stats()
    got = ut.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert torch.equal(got, F.scaled_dot_product_attention(q.double(), k.double(), v.double()))
    m = torch.zeros(8, 8, requires_grad=True)
    ut.scaled_dot_product_attention(q, k, v, attn_mask=m)
    ut.scaled_dot_product_attention(q, k, v)
    ut.scaled_dot_product_attention(q, k, v, dropout_p=0.5)  # CPU dropout is served
    assert ut.fallback_stats() == {"dtype": 1, "mask requires grad": 1, "ufa": 2}


def test_sdpa_nested_tensors_fall_back():
    """Nested tensors (strided layout: plain torch.Tensor objects) are not taken by the short
    path, whose DLPack import would fail on them: PyTorch's function serves them, counted."""
    nt = torch.nested.nested_tensor([torch.randn(2, 5, 8), torch.randn(2, 3, 8)])
    ut.reset_fallback_stats()
    with pytest.warns(RuntimeWarning, match="nested tensor"):
        got = ut.scaled_dot_product_attention(nt, nt, nt)
    assert ut.fallback_stats() == {"nested tensor": 1}
    want = F.scaled_dot_product_attention(nt, nt, nt)
    for g, w in zip(got.unbind(), want.unbind()):
        assert torch.equal(g, w)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_sdpa_3d_key_value_with_4d_query_falls_back(grad):
    """A 4-D query with 3-D key and value (PyTorch broadcasts them) is PyTorch's to serve,
    counted. The short path used to take it and read value's fourth dimension, raising
    IndexError."""
    q = torch.randn(1, 2, 5, 8, requires_grad=grad)
    kv = torch.randn(2, 5, 8)
    ut.reset_fallback_stats()
    with pytest.warns(RuntimeWarning, match="rank"):
        got = ut.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
    assert ut.fallback_stats() == {"rank": 1}
    assert torch.equal(got, F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True))


def test_sdpa_fallbacks_warn_once_per_reason_and_strict_refuses(monkeypatch):
    q, k, v = _qkv()
    q64, k64, v64 = q.double(), k.double(), v.double()
    m = torch.zeros(8, 8, requires_grad=True)
    ut.reset_fallback_stats()
    with pytest.warns(RuntimeWarning, match=r"falls back to PyTorch's own function .*\(dtype\)"):
        ut.scaled_dot_product_attention(q64, k64, v64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call of a reason is silent
        ut.scaled_dot_product_attention(q64, k64, v64)
        ut.scaled_dot_product_attention(q, k, v)  # served: never a warning
    monkeypatch.setenv("UFA_STRICT", "1")
    with pytest.raises(RuntimeError,
                       match=r"cannot serve this call \(mask requires grad\), and UFA_STRICT=1"):
        ut.scaled_dot_product_attention(q, k, v, attn_mask=m)
    ut.scaled_dot_product_attention(q, k, v)  # what ufa serves is unaffected
    assert ut.fallback_stats() == {"dtype": 2, "mask requires grad": 1, "ufa": 2}


def test_sdpa_mismatched_heads_raise_like_pytorch():
    q, k, v = _qkv(h_kv=2)
    with pytest.raises(Exception) as theirs:
        F.scaled_dot_product_attention(q, k, v)
    with pytest.raises(type(theirs.value)):
        ut.scaled_dot_product_attention(q, k, v)
    out = ut.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert torch.allclose(out, want, atol=1e-5)


def test_sdpa_mask_with_causal_behaves_like_pytorch():
    """A mask together with is_causal goes to PyTorch: same error, or same result, as its own
    function gives (versions differ on whether this combination is an error)."""
    q, k, v = _qkv()
    m = torch.rand(8, 8) > 0.3
    try:
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=True)
    except Exception as theirs:  # noqa: BLE001 - whatever PyTorch raises, ufa must raise too
        with pytest.raises(type(theirs)):
            ut.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=True)
    else:
        got = ut.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=True)
        assert torch.equal(got, want)


def test_patch_unpatch_and_context_manager():
    original = F.scaled_dot_product_attention
    with ut.patched():
        assert F.scaled_dot_product_attention is ut.scaled_dot_product_attention
        assert torch.nn.functional.scaled_dot_product_attention is ut.scaled_dot_product_attention
    assert F.scaled_dot_product_attention is original
    ut.patch()
    ut.patch()
    ut.unpatch()
    assert F.scaled_dot_product_attention is ut.scaled_dot_product_attention
    ut.unpatch()
    assert F.scaled_dot_product_attention is original


def test_gil_released_threads():
    """Calls from several Python threads run concurrently and agree with a serial run."""
    import concurrent.futures

    q = torch.randn(1, 64, 2, 32)
    want = ufa.attention(q, q, q, causal=True)
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(lambda _: ufa.attention(q, q, q, causal=True), range(8)))
    for o in outs:
        assert torch.equal(o, want)


def test_info_and_version():
    info = ufa.info()
    assert info["version"] == ufa.__version__
    assert info["num_threads"] >= 1
    # The per-core rates that chose the CPU kernel family: measured where the CPU has AVX-512
    # BF16, None elsewhere; the family follows them.
    rates = info["cpu_rates"]
    amx = info["amx"]
    if os.environ.get("UFA_CPU_ISA", "").strip():
        return  # picked by hand
    assert amx["granted"] <= (amx["cpu"] and amx["os"])
    if amx["granted"] and amx["by_default"]:
        assert info["cpu_isa"] == "AmxBf16"
    elif rates is None:
        assert info["cpu_isa"] not in ("Avx512Bf16", "Avx512Bf16Decode")
    else:
        assert rates["fma_gflops"] > 1 and rates["bf16_dot_gflops"] > 1
        dot_pays = rates["bf16_dot_gflops"] >= rates["bf16_dot_min_ratio"] * rates["fma_gflops"]
        assert info["cpu_isa"] == ("Avx512Bf16" if dot_pays else "Avx512Bf16Decode")


def test_kernel_family_from_environment():
    """UFA_CPU_ISA picks the CPU kernel family of the process's context; a name it does not
    know is an error that names the variable and the value."""
    import subprocess
    import sys

    def run(value, code):
        env = dict(os.environ, UFA_CPU_ISA=value)
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=120)

    r = run("portable", "import ufa; print(ufa.info()['cpu_isa'])")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "Portable"
    r = run("nonsense", "import ufa; ufa.info()")
    assert r.returncode != 0
    assert "ValueError" in r.stderr and 'UFA_CPU_ISA="nonsense"' in r.stderr, r.stderr


def test_cuda_work_goes_on_the_current_stream(device):
    """On CUDA, the core receives torch.cuda.current_stream() (probe) and nothing synchronises:
    the result is read back on that stream."""
    if device != "cuda":
        pytest.skip("CUDA only")
    s = torch.cuda.Stream()
    q = torch.randn(2, 4, 64, 32, device="cuda", dtype=torch.float16)
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ufa._ufa._debug_record(True)
        try:
            out = ut.scaled_dot_product_attention(q, q, q, is_causal=True)
            rec = {name: ptr for name, ptr, _, _ in ufa._ufa._debug_last_call()}
        finally:
            ufa._ufa._debug_record(False)
        want = F.scaled_dot_product_attention(q.float(), q.float(), q.float(), is_causal=True)
        err = ((out.float() - want).norm() / want.norm()).item()
    assert rec["stream"] == s.cuda_stream
    assert err < 1e-2
