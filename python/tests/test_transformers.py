"""Hugging Face transformers with attn_implementation="ufa": tiny randomly initialised models
built from configs (no downloads), against transformers' own SDPA (Llama: GQA, padding masks)
and eager (Gemma 2: soft-capping and sliding windows, which SDPA refuses) implementations, in
fp32 and bf16: logits, a training step's gradients, and greedy generation with the KV cache."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import ufa.torch as ut  # noqa: E402
import ufa.transformers  # noqa: E402

ufa.transformers.register()


def llama(impl, dtype=torch.float32, device="cpu"):
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256)
    return _build(transformers.LlamaForCausalLM, cfg, impl, dtype, device)


def _build(cls, cfg, impl, dtype, device="cpu"):
    torch.manual_seed(0)
    cfg._attn_implementation = impl
    model = cls(cfg).to(device, dtype)
    model.set_attn_implementation(impl)
    return model.eval()


def gemma2(impl, dtype=torch.float32, device="cpu"):
    cfg = transformers.Gemma2Config(vocab_size=97, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=16, sliding_window=6,
                                    attn_logit_softcapping=5.0, max_position_embeddings=256)
    return _build(transformers.Gemma2ForCausalLM, cfg, impl, dtype, device)


def batch(device="cpu"):
    ids = torch.randint(0, 97, (2, 23), device=device)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding of the second sequence
    return ids, mask


def rel(a, b, keep):
    a, b = a.double()[keep], b.double()[keep]
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("build,peer", [(llama, "sdpa"), (gemma2, "eager")],
                         ids=["llama", "gemma2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_logits_match(build, peer, dtype, device):
    ids, mask = batch(device)
    keep = mask.bool()  # padded positions see no key: their outputs are not defined alike
    ut.reset_fallback_stats()
    with torch.no_grad():
        got = build("ufa", dtype, device)(input_ids=ids, attention_mask=mask).logits
        want = build(peer, dtype, device)(input_ids=ids, attention_mask=mask).logits
    assert ut.fallback_stats() == {"ufa": 2}, ut.fallback_stats()
    assert rel(got, want, keep) < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("build,peer", [(llama, "sdpa"), (gemma2, "eager")],
                         ids=["llama", "gemma2"])
def test_training_step_gradients_match(build, peer, device):
    ids = torch.randint(0, 97, (2, 23), device=device)
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0  # right padding: no real token's prediction comes from a padding row
    grads = []
    for impl in ("ufa", peer):
        model = build(impl, device=device).train()
        # Padding is not trained on (-100); its rows see no key, which implementations treat
        # differently (transformers' eager mask lets them see every key), so their logits may
        # differ.
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        loss = loss.loss
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n, g in grads[0].items():
        want = grads[1][n]
        assert ((g - want).norm() / want.norm().clamp_min(1e-30)).item() < 1e-4, n


@pytest.mark.parametrize("build,peer", [(llama, "sdpa"), (gemma2, "eager")],
                         ids=["llama", "gemma2"])
def test_generate_gives_the_same_tokens(build, peer, device):
    ids, mask = batch(device)
    out = [build(impl, device=device).generate(input_ids=ids, attention_mask=mask, max_new_tokens=12,
                                do_sample=False, pad_token_id=0)
           for impl in ("ufa", peer)]
    assert torch.equal(out[0], out[1])


def test_dropout_is_served_on_cpu():
    """Training with attention dropout: ufa computes it (no fallback), seeded by PyTorch's
    generator (the same seed, the same logits; another draw, other logits)."""
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, attention_dropout=0.5)
    model = _build(transformers.LlamaForCausalLM, cfg, "ufa", torch.float32).train()
    ids = torch.randint(0, 97, (1, 9))
    ut.reset_fallback_stats()
    torch.manual_seed(1)
    a = model(input_ids=ids).logits
    b = model(input_ids=ids).logits
    torch.manual_seed(1)
    assert torch.equal(model(input_ids=ids).logits, a)
    assert not torch.equal(a, b)
    assert ut.fallback_stats() == {"ufa": 3}
    a.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_softcap_fallback_goes_to_eager_counted():
    """A soft-capped call ufa cannot serve (float64 here) goes to transformers' eager path,
    which has soft-capping (its SDPA has not), with the boolean mask made additive for it,
    counted and warned. (No padding: transformers' own float64 eager path turns padded rows
    into NaN, which reach every row of the sequence.)"""
    ids, _ = batch()
    mask = torch.ones_like(ids)
    ut.reset_fallback_stats()
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="dtype"):
        got = gemma2("ufa", torch.float64)(input_ids=ids, attention_mask=mask).logits
    assert ut.fallback_stats() == {"dtype": 2}, ut.fallback_stats()
    with torch.no_grad():
        want = gemma2("eager", torch.float64)(input_ids=ids, attention_mask=mask).logits
    assert rel(got, want, mask.bool()) < 1e-12, rel(got, want, mask.bool())
