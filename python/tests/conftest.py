"""Shared helpers: devices to run on, a float64 reference built on PyTorch's math SDPA, seeds, and
a DLPack producer that labels host memory as CUDA (to test device plumbing without a GPU)."""

from __future__ import annotations

import ctypes
import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import ufa

# Devices the suite runs on: the CPU always; CUDA when PyTorch sees a GPU and ufa has a CUDA
# backend that finds it (before that backend lands, CUDA cases are skipped with the reason).
DEVICES = ["cpu"]
if torch.cuda.is_available():
    DEVICES.append("cuda")


def pytest_configure(config):
    seed = int(os.environ.get("UFA_TEST_SEED", random.randrange(1 << 31)))
    config._ufa_seed = seed
    print(f"\nufa tests: seed {seed} (replay with UFA_TEST_SEED={seed}); ufa.info()={ufa.info()}")


@pytest.fixture(autouse=True)
def _seed(request):
    seed = request.config._ufa_seed
    torch.manual_seed(seed)
    np.random.seed(seed % (1 << 32))
    yield


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cuda" and not ufa.cuda_available():
        pytest.skip(f"ufa has no usable CUDA backend here: {ufa.info().get('cuda_unavailable')}")
    return request.param


def rel_err(got, want) -> float:
    got = torch.as_tensor(got).detach().to("cpu", torch.float64)
    want = torch.as_tensor(want).detach().to("cpu", torch.float64)
    assert not torch.isnan(got).any(), "NaN in result"
    fin = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), fin), "infinities differ"
    diff = (got[fin] - want[fin]).norm().item()
    return diff / max(want[fin].norm().item(), 1e-30)


def tolerance(dtype) -> float:
    return 1e-5 if dtype in (torch.float32, np.float32) else 1e-2


# fp32 in the TF32 mode (ufa_testkit::TF32_TOLERANCE, the bound documented for
# Fp32Precision::Tf32).
TF32_TOLERANCE = 2e-3


def reference(q, k, v, *, scale=None, causal=False, top_left=False, window=(-1, -1),
              softcap=0.0, alibi=None, mask=None, grad=False):
    """Attention in float64 on the CPU, ufa layout [B, S, H, D]; returns (out, lse).

    Without softcap the output is PyTorch's math SDPA in float64 with every other feature
    (causal alignment, window, ALiBi, masks, GQA) expressed as an additive -inf/bias mask; the
    LSE is logsumexp of the same scores. With grad=True the inputs' float64 copies are leaves
    (returned third) so gradients come from PyTorch autograd through the same computation."""
    leaves = [torch.as_tensor(t).detach().to("cpu", torch.float64).requires_grad_(grad)
              for t in (q, k, v)]
    q64, k64, v64 = leaves
    b, sq, hq, d = q64.shape
    skv, hkv = k64.shape[1], k64.shape[2]
    g = hq // hkv
    qh = q64.transpose(1, 2)
    kh = k64.repeat_interleave(g, dim=2).transpose(1, 2)
    vh = v64.repeat_interleave(g, dim=2).transpose(1, 2)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    i = torch.arange(sq)[:, None]
    j = torch.arange(skv)[None, :]
    c = i + (0 if top_left else skv - sq)
    visible = torch.ones(sq, skv, dtype=torch.bool)
    left, right = window
    if causal:
        right = 0
    if left >= 0:
        visible &= j >= c - left
    if right >= 0:
        visible &= j <= c + right
    bias = torch.zeros(b, hq, sq, skv, dtype=torch.float64)
    if alibi is not None:
        slopes = torch.as_tensor(alibi).to("cpu", torch.float64).reshape(-1, hq, 1, 1)
        bias = bias - slopes * (c - j).abs().to(torch.float64)
    visible = visible.expand(b, hq, sq, skv)
    if mask is not None:
        m = torch.as_tensor(mask).to("cpu")
        if m.dtype == torch.bool:
            visible = visible & m
        else:
            bias = bias + m.to(torch.float64)
    full_mask = bias.masked_fill(~visible, float("-inf"))
    if softcap > 0:
        s = qh @ kh.transpose(-1, -2) * scale
        s = softcap * torch.tanh(s / softcap) + full_mask
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
        out = p @ vh
    else:
        with sdpa_kernel(SDPBackend.MATH):
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=full_mask, scale=scale)
        with torch.no_grad():
            lse = torch.logsumexp(qh @ kh.transpose(-1, -2) * scale + full_mask, dim=-1)
    out = out.transpose(1, 2)
    return (out, lse, leaves) if grad else (out, lse)


# --------------------------------------------------------------------------------------------
# A DLPack producer over host memory that claims to be on a CUDA device.
# --------------------------------------------------------------------------------------------

class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int), ("device_id", ctypes.c_int)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int),
        ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    pass


_DELETER = ctypes.CFUNCTYPE(None, ctypes.POINTER(_DLManagedTensor))
_DLManagedTensor._fields_ = [
    ("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", _DELETER),
]
_PyCapsule_New = ctypes.pythonapi.PyCapsule_New
_PyCapsule_New.restype = ctypes.py_object
_PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class FakeCudaArray:
    """Exports a float32 NumPy array through DLPack as if it lived on cuda:0. Only for calls that
    must fail before any memory is touched (validation, or no CUDA backend)."""

    def __init__(self, array: np.ndarray):
        assert array.dtype == np.float32
        self.array = array
        self.shape = array.shape
        self.dtype = array.dtype
        self._shape = (ctypes.c_int64 * array.ndim)(*array.shape)
        self._strides = (ctypes.c_int64 * array.ndim)(*(s // 4 for s in array.strides))
        self._deleter = _DELETER(lambda _p: None)
        self._managed = []

    def __dlpack_device__(self):
        return (2, 0)

    def __dlpack__(self, stream=None, max_version=None, dl_device=None, copy=None):
        m = _DLManagedTensor()
        m.dl_tensor.data = self.array.ctypes.data
        m.dl_tensor.device = _DLDevice(2, 0)
        m.dl_tensor.ndim = self.array.ndim
        m.dl_tensor.dtype = _DLDataType(2, 32, 1)
        m.dl_tensor.shape = self._shape
        m.dl_tensor.strides = self._strides
        m.deleter = self._deleter
        self._managed.append(m)
        return _PyCapsule_New(ctypes.addressof(m), b"dltensor", None)
