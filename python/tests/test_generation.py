"""End to end: greedy generation with a tiny randomly initialised transformer (rotary
positions, grouped-query attention) gives the same tokens when it recomputes full attention over
the whole prefix every step as when it decodes from a growing dense KV cache or a paged one."""

from __future__ import annotations

import math

import pytest
import torch

import ufa.torch as ut

VOCAB, DIM, HQ, HKV, HD, LAYERS, PAGE = 61, 64, 4, 2, 16, 2, 4


class Tiny:
    def __init__(self, seed: int):
        g = torch.Generator().manual_seed(seed)

        def w(*shape):
            return torch.randn(*shape, generator=g) / math.sqrt(shape[0])

        # Attention outputs scaled up (and embeddings down) so that attention over the prefix,
        # not the last token's embedding, decides the next token: the tokens vary.
        self.emb = torch.randn(VOCAB, DIM, generator=g) * 0.5
        self.layers = [
            dict(q=w(DIM, HQ * HD), k=w(DIM, HKV * HD), v=2 * w(DIM, HKV * HD),
                 o=4 * w(HQ * HD, DIM), up=w(DIM, 2 * DIM), down=w(2 * DIM, DIM))
            for _ in range(LAYERS)
        ]
        self.unemb = w(DIM, VOCAB)
        pos = torch.arange(256, dtype=torch.float64)[:, None]
        freq = 1.0 / 1000.0 ** (torch.arange(0, HD, 2, dtype=torch.float64) / HD)
        self.cos, self.sin = (pos * freq).cos().float(), (pos * freq).sin().float()

    def rotate(self, x, positions):
        """Rotary embedding (GPT-NeoX halves), as ufa computes it: f64, then f32."""
        half = HD // 2
        c, s = self.cos[positions][:, None].double(), self.sin[positions][:, None].double()
        a, b = x[..., :half].double(), x[..., half:].double()
        return torch.cat([(a * c - b * s).float(), (b * c + a * s).float()], dim=-1)

    def block(self, x, layer, attend):
        p = self.layers[layer]
        t = x.shape[0]
        q = (x @ p["q"]).reshape(t, HQ, HD)
        k = (x @ p["k"]).reshape(t, HKV, HD)
        v = (x @ p["v"]).reshape(t, HKV, HD)
        a = attend(q, k, v, layer).reshape(t, HQ * HD)
        x = x + a @ p["o"]
        return x + torch.nn.functional.gelu(x @ p["up"]) @ p["down"]

    def logits(self, x):
        return x[-1] @ self.unemb

    def generate_full(self, prompt, steps):
        """Recomputes causal attention over the whole prefix for every new token."""
        tokens = list(prompt)
        for _ in range(steps):
            x = self.emb[torch.tensor(tokens)]
            pos = torch.arange(len(tokens))

            def attend(q, k, v, layer):
                q, k = self.rotate(q, pos), self.rotate(k, pos)
                return ut.flash_attn_func(q[None], k[None], v[None], causal=True)[0]

            for layer in range(LAYERS):
                x = self.block(x, layer, attend)
            tokens.append(int(self.logits(x).argmax()))
        return tokens[len(prompt):]


class Cache:
    """One KV cache per layer, dense [batch, capacity, HKV, HD] or paged [pages, PAGE, HKV, HD]
    with a shuffled block table, and each sequence's length."""

    def __init__(self, batch: int, capacity: int, paged: bool, seed: int):
        self.paged = paged
        self.lens = torch.zeros(batch, dtype=torch.int32)
        if paged:
            pages = batch * capacity // PAGE
            g = torch.Generator().manual_seed(seed)
            self.table = torch.randperm(pages, generator=g, dtype=torch.int32).reshape(batch, -1)
            shape = (pages, PAGE, HKV, HD)
        else:
            self.table = None
            shape = (batch, capacity, HKV, HD)
        # NaN: any slot read before it is written would poison the output.
        self.k = [torch.full(shape, float("nan")) for _ in range(LAYERS)]
        self.v = [torch.full(shape, float("nan")) for _ in range(LAYERS)]


def generate_cached(model: Tiny, prompts, steps, paged: bool):
    """Prefills each prompt alone (its own cache entry or block-table row), then decodes the
    whole batch one token a step, appending to the cache with rotary embedding."""
    batch = len(prompts)
    cache = Cache(batch, 64, paged, seed=7)
    last = []
    for b, prompt in enumerate(prompts):
        x = model.emb[torch.tensor(prompt)]
        idx = torch.tensor([b], dtype=torch.int32)

        def attend(q, k, v, layer):
            kw = (dict(block_table=cache.table[b:b + 1]) if paged
                  else dict(cache_batch_idx=idx))
            return ut.flash_attn_with_kvcache(
                q[None], cache.k[layer], cache.v[layer], k[None], v[None], model.cos,
                model.sin, cache.lens[b:b + 1], causal=True, rotary_interleaved=False, **kw)[0]

        for layer in range(LAYERS):
            x = model.block(x, layer, attend)
        cache.lens[b] += len(prompt)
        last.append(int(model.logits(x).argmax()))
    out = [[t] for t in last]
    for _ in range(steps - 1):
        x = model.emb[torch.tensor([o[-1] for o in out])]  # [batch, DIM]: one row a sequence

        def attend(q, k, v, layer):
            # q [batch, HQ, HD] -> [batch, 1, HQ, HD]: one new token per sequence.
            o = ut.flash_attn_with_kvcache(
                q[:, None], cache.k[layer], cache.v[layer], k[:, None], v[:, None], model.cos,
                model.sin, cache.lens, block_table=cache.table, causal=True,
                rotary_interleaved=False)
            return o[:, 0]

        for layer in range(LAYERS):
            x = model.block(x, layer, attend)
        cache.lens += 1
        for b in range(batch):
            out[b].append(int((x[b] @ model.unemb).argmax()))
    return out


@pytest.mark.parametrize("paged", [False, True])
def test_cached_generation_matches_full_recompute(paged):
    model = Tiny(seed=4)
    prompts = [[5, 17, 2, 40, 33], [9, 1, 58]]
    steps = 8
    want = [model.generate_full(p, steps) for p in prompts]
    assert all(len(set(w)) >= 4 for w in want), f"degenerate generations {want}"
    got = generate_cached(model, prompts, steps, paged)
    assert got == want
