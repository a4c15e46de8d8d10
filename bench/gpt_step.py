#!/usr/bin/env python3
"""A GPT training step on the GPU under torch.autocast, with PyTorch's own SDPA and with ufa
(`ufa.torch.patched()`), in one run on one card: issue #18's acceptance. A 12-layer GPT (dim 768,
12 heads, context 2048, batch 8) is trained --steps steps from the same initial weights on the
same batches, once per attention; per autocast dtype (bf16, fp16 with a GradScaler) it records
the loss curves (their largest relative difference), the median step time after --warmup steps
and their ratio, and ufa's fallback counters (every attention call must be ufa's). With
--dropout P the attention dropout runs too (the two masks differ, so only the step times and the
last losses are compared). Writes gpt_step_<date>_<card>.{md,csv} into --out.

The batches come from a fixed random Markov chain over the vocabulary (each token has four
likely successors), so the loss falls well within 50 steps and the curves can be compared.

Usage: python3 bench/gpt_step.py [--out DIR] [--steps 50] [--warmup 10] [--dropout 0.1]
"""

import argparse
import copy
import datetime
import statistics

import torch
import torch.nn as nn
import torch.nn.functional as F

import ufa.torch as ut
from results_files import results_base, write_csv


class Attention(nn.Module):
    def __init__(self, dim, heads, dropout):
        super().__init__()
        self.heads, self.hd, self.dropout = heads, dim // heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.o(y.transpose(1, 2).reshape(b, s, -1))


class GPT(nn.Module):
    def __init__(self, vocab, dim, heads, layers, ctx, dropout):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(ctx, dim)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "ln1": nn.LayerNorm(dim), "attn": Attention(dim, heads, dropout),
            "ln2": nn.LayerNorm(dim),
            "mlp": nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)),
        }) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = x + blk["attn"](blk["ln1"](x))
            x = x + blk["mlp"](blk["ln2"](x))
        return self.head(self.ln(x))


def batches(n, batch, ctx, vocab, seed=0):
    """n batches of (input, target) token sequences from a fixed random Markov chain."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, vocab, (vocab, 4), generator=g)
    out = []
    for _ in range(n):
        seq = torch.empty(batch, ctx + 1, dtype=torch.long)
        seq[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        pick = torch.randint(0, 4, (batch, ctx), generator=g)
        for t in range(ctx):
            seq[:, t + 1] = succ[seq[:, t], pick[:, t]]
        seq = seq.cuda()
        out.append((seq[:, :-1], seq[:, 1:]))
    return out


def train(model, data, dtype, steps):
    """Losses and per-step milliseconds of `steps` AdamW steps under autocast."""
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, fused=True)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    losses, times = [], []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for step in range(steps):
        x, y = data[step % len(data)]
        start.record()
        with torch.autocast("cuda", dtype=dtype):
            loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        losses.append(loss.item())
    return losses, times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--dropout", type=float, default=0.1)
    args = ap.parse_args()
    vocab, dim, heads, layers, ctx, batch = 8192, 768, 12, 12, 2048, 8
    card = torch.cuda.get_device_name()
    print(f"card {card}, torch {torch.__version__}: GPT {layers} layers, dim {dim}, {heads} "
          f"heads, context {ctx}, batch {batch}, vocab {vocab}, {args.steps} steps")
    data = batches(10, batch, ctx, vocab)
    rows = []
    runs = [(torch.bfloat16, 0.0), (torch.float16, 0.0)]
    if args.dropout > 0:
        runs.append((torch.bfloat16, args.dropout))
    for dtype, p in runs:
        torch.manual_seed(0)
        base = GPT(vocab, dim, heads, layers, ctx, p).cuda()
        model, twin = copy.deepcopy(base), copy.deepcopy(base)
        del base
        torch.manual_seed(1)
        want, t_torch = train(model, data, dtype, args.steps)
        del model
        ut.reset_fallback_stats()
        torch.manual_seed(1)
        with ut.patched():
            got, t_ufa = train(twin, data, dtype, args.steps)
        del twin
        stats = ut.fallback_stats()
        ms_t = statistics.median(t_torch[args.warmup:])
        ms_u = statistics.median(t_ufa[args.warmup:])
        diff = max(abs(g - w) / abs(w) for g, w in zip(got, want))
        row = dict(dtype=str(dtype).replace("torch.", ""), dropout=p, steps=args.steps,
                   loss_first=want[0], loss_last_torch=want[-1], loss_last_ufa=got[-1],
                   max_rel_loss_diff=diff, ms_torch=ms_t, ms_ufa=ms_u, speedup=ms_t / ms_u,
                   ufa_calls=stats.get("ufa", 0),
                   fallbacks=sum(v for k, v in stats.items() if k != "ufa"),
                   fallback_reasons=";".join(f"{k}={v}" for k, v in stats.items() if k != "ufa"))
        rows.append(row)
        print(f"{row['dtype']:8} dropout {p}: loss {want[0]:.3f} -> torch {want[-1]:.4f} / ufa "
              f"{got[-1]:.4f}, max rel diff {diff:.2e}; step {ms_t:.1f} ms torch, {ms_u:.1f} "
              f"ms ufa ({ms_t / ms_u:.3f}x); ufa calls {row['ufa_calls']}, fallbacks {stats}")
        torch.cuda.empty_cache()
    date = datetime.date.today().isoformat()
    base = results_base(args.out, "gpt_step")
    write_csv(base + ".csv", rows)
    with open(base + ".md", "w") as fh:
        fh.write(f"# GPT training step under autocast, ufa vs PyTorch SDPA, {card}, {date}\n\n")
        fh.write(f"Command: `python3 bench/gpt_step.py --steps {args.steps} --warmup "
                 f"{args.warmup} --dropout {args.dropout}`; torch {torch.__version__}. GPT: "
                 f"{layers} layers, dim {dim}, {heads} heads (head_dim {dim // heads}), causal, "
                 f"context {ctx}, batch {batch}, vocab {vocab}; AdamW; the same initial weights "
                 "and batches for both. `ms`: median step time after the warm-up steps (forward, "
                 "backward, optimizer); `speedup`: PyTorch's time over ufa's; `max rel diff`: "
                 "the largest relative difference of the two loss curves (with dropout the masks "
                 "differ, so only the trend is comparable).\n\n")
        fh.write("| autocast | dropout | loss step 1 | last loss torch | last loss ufa | max rel "
                 "diff | ms torch | ms ufa | speedup | ufa calls | fallbacks |\n|"
                 + "---|" * 11 + "\n")
        for r in rows:
            fh.write(f"| {r['dtype']} | {r['dropout']} | {r['loss_first']:.3f} | "
                     f"{r['loss_last_torch']:.4f} | {r['loss_last_ufa']:.4f} | "
                     f"{r['max_rel_loss_diff']:.2e} | {r['ms_torch']:.1f} | {r['ms_ufa']:.1f} | "
                     f"{r['speedup']:.3f} | {r['ufa_calls']} | {r['fallbacks']} "
                     f"{r['fallback_reasons']} |\n")
    print(f"wrote {base}.md / .csv")


if __name__ == "__main__":
    main()
