"""Packed variable-length batches, KV caches and merging through FlashAttention's argument
conventions, against PyTorch's float64 math applied to one sequence at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ufa
import ufa.torch as ut
from conftest import reference, rel_err, tolerance

DTYPES = [torch.float32, torch.bfloat16]


def packed_batch(lens_q, lens_k, hq, hkv, d, dtype, device, spare=1):
    """q [total_q + spare, hq, d], k/v [total_k + spare, hkv, d] and their cu_seqlens."""
    cu_q = torch.tensor([0] + list(np.cumsum(lens_q)), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + list(np.cumsum(lens_k)), dtype=torch.int32, device=device)
    tq, tk = sum(lens_q) + spare, sum(lens_k) + spare
    q = torch.randn(tq, hq, d, device=device).to(dtype)
    k = torch.randn(tk, hkv, d, device=device).to(dtype)
    v = torch.randn(tk, hkv, d, device=device).to(dtype)
    return q, k, v, cu_q, cu_k


def per_sequence(q, k, v, cu_q, cu_k, **kw):
    """The float64 reference of each sequence, as lists of (out [sq, hq, d], lse [hq, sq])."""
    res = []
    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        if q1 == q0:
            res.append(None)
            continue
        if k1 == k0:
            res.append((torch.zeros(q1 - q0, q.shape[1], v.shape[-1], dtype=torch.float64),
                        torch.full((q.shape[1], q1 - q0), float("-inf"), dtype=torch.float64)))
            continue
        o, lse = reference(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], **kw)
        res.append((o[0], lse[0]))
    return res


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_matches_reference(device, dtype, causal):
    lens_q, lens_k = [5, 0, 33, 1], [7, 3, 20, 64]
    q, k, v, cu_q, cu_k = packed_batch(lens_q, lens_k, 8, 2, 64, dtype, device)
    out, lse, none = ut.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, return_attn_probs=True)
    assert none is None and out.shape == (q.shape[0], 8, 64) and lse.shape == (8, q.shape[0])
    for b, want in enumerate(per_sequence(q, k, v, cu_q, cu_k, causal=causal)):
        if want is None:
            continue
        q0, q1 = int(cu_q[b]), int(cu_q[b + 1])
        assert rel_err(out[q0:q1], want[0]) < tolerance(dtype), b
        got_lse = lse[:, q0:q1].double().cpu()
        assert torch.equal(torch.isinf(got_lse), torch.isinf(want[1])), b
        fin = torch.isfinite(want[1])
        assert (got_lse[fin] - want[1][fin]).abs().max() < 1e-4, b


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_gradients(device, dtype):
    lens_q, lens_k = [17, 0, 40], [30, 5, 40]
    q, k, v, cu_q, cu_k = packed_batch(lens_q, lens_k, 4, 2, 32, dtype, device, spare=0)
    for t in (q, k, v):
        t.requires_grad_(True)
    out = ut.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 40, 40, causal=True, softcap=20.0)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    for b in range(3):
        q0, q1, k0, k1 = (int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1]))
        if q1 == q0:
            # No query sees these keys: their gradients are exactly zero.
            assert not dk[k0:k1].any() and not dv[k0:k1].any()
            continue
        want, _, leaves = reference(q.detach()[None, q0:q1], k.detach()[None, k0:k1],
                                    v.detach()[None, k0:k1], causal=True, softcap=20.0,
                                    grad=True)
        grads = torch.autograd.grad(want, leaves, dout.detach()[None, q0:q1].double().cpu())
        tol = 2e-5 if dtype == torch.float32 else 2e-2
        for got, w in zip((dq[q0:q1], dk[k0:k1], dv[k0:k1]), grads):
            assert rel_err(got, w[0]) < tol, b


def test_varlen_custom_ops_pass_opcheck():
    q, k, v, cu_q, cu_k = packed_batch([3, 5], [4, 6], 4, 2, 16, torch.float32, "cpu", 0)
    for t in (q, k, v):
        t.requires_grad_(True)
    args = (q, k, v, cu_q, cu_k, 5, 6, None, None, None, None, True, -1, -1, 0.0, False, False)
    torch.library.opcheck(torch.ops.ufa.varlen_forward.default, args)
    out, lse = torch.ops.ufa.varlen_forward(*args)
    bargs = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, cu_q,
             cu_k, 5, 6, None, None, True, -1, -1, 0.0, False, False)
    torch.library.opcheck(torch.ops.ufa.varlen_backward.default, bargs)


def test_varlen_paged_keys_and_seqused(device):
    """Keys in a paged cache of 16-key pages in shuffled order, sequences using part of them."""
    lens_q, lens_k, used = [4, 1, 9], [40, 16, 9], [33, 16, 1]
    q, k, v, cu_q, cu_k = packed_batch(lens_q, lens_k, 4, 4, 64, torch.bfloat16, device)
    ps, pages = 16, 8
    table = torch.full((3, 4), -1, dtype=torch.int32)
    order = torch.randperm(pages)
    kc = torch.randn(pages, ps, 4, 64, device=device).to(torch.bfloat16)
    vc = torch.randn(pages, ps, 4, 64, device=device).to(torch.bfloat16)
    n = 0
    for b in range(3):
        for j in range(-(-lens_k[b] // ps)):
            page = int(order[n])
            n += 1
            table[b, j] = page
            rows = slice(j * ps, min((j + 1) * ps, lens_k[b]))
            k0 = int(cu_k[b])
            cnt = rows.stop - rows.start
            kc[page, :cnt] = k[k0 + rows.start:k0 + rows.stop]
            vc[page, :cnt] = v[k0 + rows.start:k0 + rows.stop]
    seqused = torch.tensor(used, dtype=torch.int32, device=device)
    out = ut.flash_attn_varlen_func(q, kc, vc, cu_q, cu_k, 9, 40, causal=True,
                                    block_table=table.to(device), seqused_k=seqused)
    used_cu = torch.tensor([0] + list(np.cumsum(used)), dtype=torch.int32)
    k_used = torch.cat([k[int(cu_k[b]):int(cu_k[b]) + used[b]] for b in range(3)])
    v_used = torch.cat([v[int(cu_k[b]):int(cu_k[b]) + used[b]] for b in range(3)])
    for b, want in enumerate(per_sequence(q, k_used, v_used, cu_q, used_cu, causal=True)):
        q0, q1 = int(cu_q[b]), int(cu_q[b + 1])
        assert rel_err(out[q0:q1], want[0]) < 1e-2, b


def test_packed_forms_are_views_of_the_plain_calls():
    b, s, h, d = 2, 9, 4, 32
    qkv = torch.randn(b, s, 3, h, d)
    want = ut.flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True)
    assert torch.equal(ut.flash_attn_qkvpacked_func(qkv, causal=True), want)
    kv = qkv[:, :, 1:]
    assert torch.equal(ut.flash_attn_kvpacked_func(qkv[:, :, 0], kv, causal=True), want)
    flat = qkv.reshape(b * s, 3, h, d)
    cu = torch.tensor([0, s, 2 * s], dtype=torch.int32)
    got = ut.flash_attn_varlen_qkvpacked_func(flat, cu, s, causal=True)
    assert torch.equal(got.reshape(b, s, h, d), want)
    got = ut.flash_attn_varlen_kvpacked_func(flat[:, 0], flat[:, 1:], cu, cu, s, s, causal=True)
    assert torch.equal(got.reshape(b, s, h, d), want)
    # Gradients flow back into the packed tensor.
    qkv.requires_grad_(True)
    ut.flash_attn_qkvpacked_func(qkv, causal=True).sum().backward()
    assert qkv.grad.shape == qkv.shape and qkv.grad.abs().sum() > 0


def rotate(x, cos, sin, pos, interleaved):
    """The rotary embedding of rows x [.., d] at positions pos, as ufa defines it: in float64,
    rounded to float32, then to x's dtype."""
    half = cos.shape[1]
    c, s = cos[pos].double(), sin[pos].double()
    x64 = x.double()
    if interleaved:
        a, b = x64[..., 0:2 * half:2], x64[..., 1:2 * half:2]
    else:
        a, b = x64[..., :half], x64[..., half:2 * half]
    ra, rb = a * c - b * s, b * c + a * s
    y = x.clone()
    if interleaved:
        y[..., 0:2 * half:2] = ra.float().to(x.dtype)
        y[..., 1:2 * half:2] = rb.float().to(x.dtype)
    else:
        y[..., :half] = ra.float().to(x.dtype)
        y[..., half:2 * half] = rb.float().to(x.dtype)
    return y


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("paged", [False, True])
def test_kvcache_append_rotary_and_attend(device, interleaved, paged):
    batch, hq, hkv, d, cap = 3, 8, 2, 64, 48
    dtype = torch.bfloat16
    lens = [5, 0, 30]
    new = 2
    q = torch.randn(batch, new, hq, d, device=device).to(dtype)
    k_new = torch.randn(batch, new, hkv, d, device=device).to(dtype)
    v_new = torch.randn(batch, new, hkv, d, device=device).to(dtype)
    k_dense = torch.randn(batch, cap, hkv, d, device=device).to(dtype)
    v_dense = torch.randn(batch, cap, hkv, d, device=device).to(dtype)
    pos = torch.arange(64, dtype=torch.float64)[:, None]
    freq = 1.0 / 100.0 ** (torch.arange(0, 32, 2, dtype=torch.float64) / 32)
    cos, sin = (pos * freq).cos().float().to(device), (pos * freq).sin().float().to(device)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    if paged:
        ps = 4
        table = torch.randperm(batch * cap // ps, dtype=torch.int32).reshape(batch, cap // ps)
        k_cache = torch.empty(batch * cap // ps, ps, hkv, d, dtype=dtype, device=device)
        v_cache = torch.empty_like(k_cache)
        for b in range(batch):
            for j in range(cap // ps):
                k_cache[table[b, j]] = k_dense[b, j * ps:(j + 1) * ps]
                v_cache[table[b, j]] = v_dense[b, j * ps:(j + 1) * ps]
        before = k_cache.clone()
        out, lse = ut.flash_attn_with_kvcache(
            q, k_cache, v_cache, k_new, v_new, cos, sin, seqlens, block_table=table.to(device),
            causal=True, rotary_interleaved=interleaved, return_softmax_lse=True)
        gathered_k = torch.stack([k_cache[table[b]].reshape(cap, hkv, d) for b in range(batch)])
        gathered_v = torch.stack([v_cache[table[b]].reshape(cap, hkv, d) for b in range(batch)])
    else:
        k_cache, v_cache = k_dense.clone(), v_dense.clone()
        before = k_cache.clone()
        out, lse = ut.flash_attn_with_kvcache(
            q, k_cache, v_cache, k_new, v_new, cos, sin, seqlens, causal=True,
            rotary_interleaved=interleaved, return_softmax_lse=True)
        gathered_k, gathered_v = k_cache, v_cache
    for b in range(batch):
        p = torch.arange(lens[b], lens[b] + new)
        want_k = rotate(k_new[b].cpu(), cos.cpu(), sin.cpu(), p[:, None], interleaved)
        assert torch.equal(gathered_k[b, lens[b]:lens[b] + new].cpu(), want_k), b
        assert torch.equal(gathered_v[b, lens[b]:lens[b] + new].cpu(), v_new[b].cpu()), b
        # Untouched elsewhere.
        if not paged:
            assert torch.equal(k_cache[b, :lens[b]], before[b, :lens[b]])
            assert torch.equal(k_cache[b, lens[b] + new:], before[b, lens[b] + new:])
        qr = rotate(q[b].cpu(), cos.cpu(), sin.cpu(), p[:, None], interleaved)
        n = lens[b] + new
        want, want_lse = reference(qr[None], gathered_k[None, b, :n].cpu(),
                                   gathered_v[None, b, :n].cpu(), causal=True)
        assert rel_err(out[b], want[0]) < tolerance(dtype), b
        assert (lse[b].double().cpu() - want_lse[0]).abs().max() < 1e-4
    if paged:
        untouched = torch.ones(k_cache.shape[0], 4, dtype=torch.bool)
        for b in range(batch):
            for j in range(lens[b], lens[b] + new):
                untouched[table[b, j // 4], j % 4] = False
        assert torch.equal(k_cache.cpu()[untouched], before.cpu()[untouched])


def test_kvcache_rejects_overflow_and_leaves_the_cache(device):
    k_cache = torch.randn(2, 8, 1, 16, device=device)
    v_cache = torch.randn(2, 8, 1, 16, device=device)
    before = k_cache.clone()
    q = torch.randn(2, 1, 2, 16, device=device)
    kn = torch.randn(2, 1, 1, 16, device=device)
    lens = torch.tensor([3, 8], dtype=torch.int32, device=device)
    # On the GPU the values of device metadata are checked only on request (a synchronisation).
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\]=8 exceeds"):
        ut.flash_attn_with_kvcache(q, k_cache, v_cache, kn, kn, cache_seqlens=lens,
                                   checked=device == "cuda")
    assert torch.equal(k_cache, before)
    if device == "cuda":
        # Unchecked, the sequence that fits is appended and the one that does not is skipped:
        # nothing is written outside its slots.
        ut.flash_attn_with_kvcache(q, k_cache, v_cache, kn, kn, cache_seqlens=lens)
        after = before.clone()
        after[0, 3] = kn[0, 0]
        assert torch.equal(k_cache, after)
    with pytest.raises(NotImplementedError, match="cache_leftpad"):
        ut.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=1,
                                   cache_leftpad=torch.zeros(2, dtype=torch.int32))


def test_kvcache_int_seqlens_and_no_append(device):
    k_cache = torch.randn(2, 10, 2, 32, device=device)
    v_cache = torch.randn(2, 10, 2, 32, device=device)
    q = torch.randn(2, 3, 4, 32, device=device)
    out = ut.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=6, causal=True)
    want, _ = reference(q, k_cache[:, :6], v_cache[:, :6], causal=True)
    assert rel_err(out, want) < 1e-5


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_merge_states_of_split_keys(kind):
    q = torch.randn(2, 5, 4, 32)
    k, v = torch.randn(2, 23, 2, 32), torch.randn(2, 23, 2, 32)
    parts = [ufa.attention(q, k[:, a:b], v[:, a:b], return_lse=True)
             for a, b in [(0, 7), (7, 16), (16, 23)]]
    outs, lses = [p[0] for p in parts], [p[1] for p in parts]
    if kind == "numpy":
        outs, lses = [o.numpy() for o in outs], [x.numpy() for x in lses]
    out, lse = ufa.merge_states(outs, lses)
    want, want_lse = reference(q, k, v)
    assert rel_err(torch.as_tensor(out), want) < 1e-5
    assert (torch.as_tensor(lse).double() - want_lse).abs().max() < 1e-5
    # Stacked, and two at a time, agree.
    if kind == "torch":
        o2, l2 = ufa.merge_states(torch.stack(outs), torch.stack(lses))
        assert torch.equal(o2, out) and torch.equal(l2, lse)
        oa, la = ufa.merge_state(outs[0], lses[0], outs[1], lses[1])
        ob, lb = ufa.merge_state(oa, la, outs[2], lses[2])
        assert rel_err(ob, want) < 1e-5


def test_merge_states_handles_states_without_keys_and_log2():
    o = torch.randn(1, 3, 2, 8)
    empty = torch.full((1, 2, 3), float("-inf"))
    out, lse = ufa.merge_states([o, torch.zeros_like(o)], [torch.zeros(1, 2, 3), empty])
    assert torch.allclose(out, o) and torch.equal(lse, torch.zeros(1, 2, 3))
    out, lse = ufa.merge_states([o, o], [empty, empty])
    assert not out.any() and torch.equal(lse, empty)
    l2 = ufa.lse_to_log2(torch.tensor([1.0]))
    assert torch.allclose(ufa.lse_from_log2(l2), torch.tensor([1.0]))
    # Varlen states: [total, heads, dim] with [heads, total].
    out, lse = ufa.merge_states([o[0], o[0]], [torch.zeros(2, 3), torch.zeros(2, 3)])
    assert out.shape == (3, 2, 8) and torch.allclose(out, o[0]) and lse.shape == (2, 3)


needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or not ufa.cuda_available(),
    reason="needs a CUDA GPU that ufa can use")


def captured(run, warmup=None):
    """`run` captured in a CUDA graph: (graph, what the captured call returned). `warmup` (by
    default `run`) runs first on a side stream, as PyTorch asks, which also compiles and loads
    ufa's kernels outside the capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        (warmup or run)()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = run()
    return graph, result


@needs_gpu
@pytest.mark.parametrize("paged", [False, True])
def test_decode_step_is_captured_in_a_cuda_graph(paged):
    """A decoding step (append with rotary, attend) captured once and replayed after the
    lengths, q and the new keys change in place: no host synchronisation inside the call, and
    the scratch memory of the rotated q allocated in stream order within the graph."""
    dev, dtype = "cuda", torch.bfloat16
    batch, cap, hq, hkv, d, ps = 3, 64, 8, 2, 64, 16
    pos = torch.arange(cap, dtype=torch.float64)[:, None]
    freq = 1.0 / 100.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = (pos * freq).cos().float().to(dev), (pos * freq).sin().float().to(dev)
    k_cache = torch.randn(batch * cap // ps, ps, hkv, d, device=dev, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(batch * cap // ps, dtype=torch.int32, device=dev).view(batch, -1)
    if not paged:
        k_cache, v_cache = k_cache.view(batch, cap, hkv, d), v_cache.view(batch, cap, hkv, d)
        table = None
    q = torch.randn(batch, 1, hq, d, device=dev, dtype=dtype)
    kn = torch.randn(batch, 1, hkv, d, device=dev, dtype=dtype)
    vn = torch.randn_like(kn)
    lens = torch.tensor([5, 17, 40], dtype=torch.int32, device=dev)

    def step(kc, vc):
        return ut.flash_attn_with_kvcache(q, kc, vc, kn, vn, rotary_cos=cos, rotary_sin=sin,
                                          cache_seqlens=lens, block_table=table, causal=True)

    # The warm-up call appends to copies; the captured one to the caches themselves.
    k_eager, v_eager = k_cache.clone(), v_cache.clone()
    graph, out = captured(lambda: step(k_cache, v_cache),
                          warmup=lambda: step(k_cache.clone(), v_cache.clone()))
    for _ in range(3):
        want = step(k_eager, v_eager)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want)
        assert torch.equal(k_cache, k_eager) and torch.equal(v_cache, v_eager)
        lens += 1
        q.normal_()
        kn.normal_()
        vn.normal_()


@needs_gpu
def test_packed_forward_is_captured_in_a_cuda_graph():
    dev, dtype = "cuda", torch.bfloat16
    q, k, v, cu_q, cu_k = packed_batch([7, 0, 33], [9, 4, 40], 4, 2, 64, dtype, dev)
    run = lambda: ut.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 33, 40, causal=True)  # noqa: E731
    graph, out = captured(run)
    for _ in range(2):
        want = run()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out[:40], want[:40])
        q.normal_()


@needs_gpu
def test_split_decoding_is_captured_in_a_cuda_graph():
    """One sequence over a long cache: the keys are split across blocks, whose partial states
    live in scratch memory allocated in stream order inside the graph; replays match eager
    calls bitwise (the split count and merge order depend only on the problem)."""
    dev, dtype = "cuda", torch.bfloat16
    q = torch.randn(1, 1, 8, 128, device=dev, dtype=dtype)
    k = torch.randn(1, 4096, 1, 128, device=dev, dtype=dtype)
    v = torch.randn_like(k)
    run = lambda: ut.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)  # noqa: E731
    graph, (out, lse, _) = captured(run)
    for _ in range(2):
        want, want_lse, _ = run()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want) and torch.equal(lse, want_lse)
        scores = q[0, 0].float() @ k[0, :, 0].float().T / 128 ** 0.5
        ref = torch.softmax(scores, -1) @ v[0, :, 0].float()
        assert (out[0, 0].float() - ref).abs().max() < 2e-2
        q.normal_()
