"""End to end: a small GPT trained 20 steps with ufa's SDPA and with PyTorch's gives the same
losses within float32 / bfloat16 tolerance."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ufa.torch as ut


class Attention(nn.Module):
    def __init__(self, dim, heads, kv_heads):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.hd, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.hd).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2, self.kv_heads, self.hd).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           enable_gqa=self.heads != self.kv_heads)
        return self.o(y.transpose(1, 2).reshape(b, s, -1))


class GPT(nn.Module):
    def __init__(self, vocab=61, dim=48, heads=4, kv_heads=2, layers=2, ctx=24):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(ctx, dim)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(nn.ModuleDict({
                "ln1": nn.LayerNorm(dim), "attn": Attention(dim, heads, kv_heads),
                "ln2": nn.LayerNorm(dim),
                "mlp": nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)),
            }))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = x + blk["attn"](blk["ln1"](x))
            x = x + blk["mlp"](blk["ln2"](x))
        return self.head(self.ln(x))


def train(model, data, steps=20):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        x, y = data[step % len(data)]
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)],
                         ids=["float32", "bfloat16"])
def test_gpt_training_matches_pytorch(device, dtype, tol):
    model = GPT().to(device=device, dtype=dtype)
    twin = copy.deepcopy(model)
    data = []
    for _ in range(5):
        seq = torch.randint(0, 61, (4, 25), device=device)
        data.append((seq[:, :-1], seq[:, 1:]))
    want = train(model, data)
    ut.reset_fallback_stats()
    with ut.patched():
        got = train(twin, data)
    stats = ut.fallback_stats()
    assert stats.get("ufa", 0) == 20 * 2 and set(stats) == {"ufa"}, stats
    assert want[-1] < want[0] - 0.5, f"the model did not learn: {want}"
    for step, (g, w) in enumerate(zip(got, want)):
        assert abs(g - w) <= tol * abs(w), f"step {step}: ufa {g} vs torch {w}"
