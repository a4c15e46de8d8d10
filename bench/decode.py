#!/usr/bin/env python3
"""One decoding step at memory speed: ufa's dense, KV-cache and paged calls beside PyTorch SDPA.

A decoding step attends one query token per sequence (seqlen_q = 1) to the whole KV cache, so it
does ~2 FLOPs per byte of K and V: its time is the time to read the cache from HBM. This script
measures, in one run on one card (bf16, heads_q = 32, heads_kv = 32 / group):

- the card's HBM read bandwidth, once, from a plain large reduction (the yardstick);
- ufa dense      `ufa.torch.flash_attn_func(q, k, v, causal=True)`, k/v [b, kv, hkv, d];
- ufa cache      `flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=kv)`, same layout;
- ufa step       a whole decoding step of an inference engine: the same call appending the step's
                 key and value (`k=, v=` of one row, `cache_seqlens=kv - 1`; they are the cache's
                 last row, so the attention is the same);
- ufa paged16/256 the same call with a paged cache [pages, page, hkv, d] and an int32 block
                 table holding a random permutation of the pages (scattered, as a real allocator
                 leaves them);
- PyTorch SDPA on contiguous [b, h, s, d] tensors, each backend alone (cuDNN, flash,
  efficient), enable_gqa when group > 1; a backend that refuses gets an empty cell and a note.

For every point it reports µs per call, TB/s (K+V read once, plus q and out) and the fraction of
the measured read bandwidth, ufa dense's speed over the best torch backend's, ufa dense's kernel
launches (a few points, from torch.profiler) and the max |ufa dense - best SDPA| (bf16, randn).
A "goals" section checks the issue's targets (ufa >= best torch at kv >= 8192; >= 90% of the
read bandwidth at kv >= 8192, batch >= 8) and lists the launch-bound floor below 8192.

Sweep: batch 1,8,32,128 x kv 1024,8192,32768,131072 x head_dim 64,128 x group 1,4,8; a point
whose dense K+V exceeds --max-gb (GB = 1e9 bytes) is skipped and listed. Writes
decode_<date>_<tag or card>.{md,csv,png} into --out (the .png only when matplotlib imports).

Usage: bench/decode.py [--batches 1,8,32,128] [--kv 1024,8192,32768,131072] [--dims 64,128]
                       [--groups 1,4,8] [--iters 20] [--max-gb 40] [--out bench/results]
                       [--tag NAME] [--dry-run]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import re
import shlex
import signal
import sys
import warnings
from pathlib import Path

HEADS_Q = 32
DTYPE_BYTES = 2  # bf16
PAGES = {"paged16": 16, "paged256": 256}
UFA = ("ufa_dense", "ufa_cache", "ufa_step", *PAGES)
BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION",
            "efficient": "EFFICIENT_ATTENTION"}  # SDPBackend members, looked up lazily
VARIANTS = (*UFA, *BACKENDS)
TOL = 2e-2       # max |ufa - SDPA| allowed for bf16 with randn inputs
BIG_KV = 8192    # goals (a) and (b) hold from this KV length up
BIG_BATCH = 8    # goal (b) holds from this batch up
BW_GOAL = 0.90   # goal (b): fraction of the measured read bandwidth
WARMUP, REPEATS = 3, 3
SEED = 1234


# --------------------------------------------------------------------------------------------
# Plan (no torch: --dry-run runs on a machine without a GPU)
# --------------------------------------------------------------------------------------------


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def kv_bytes(batch: int, kv: int, heads_kv: int, dim: int) -> int:
    """The dense K+V cache of a point."""
    return 2 * batch * kv * heads_kv * dim * DTYPE_BYTES


def call_bytes(batch: int, kv: int, heads_kv: int, dim: int) -> int:
    """Bytes one call must move at least: K and V read once, q read and out written."""
    return kv_bytes(batch, kv, heads_kv, dim) + 2 * batch * HEADS_Q * dim * DTYPE_BYTES


def label(p: dict) -> str:
    return f"d{p['head_dim']} g{p['group']} b{p['batch']} kv{p['kv']}"


def plan(args) -> list[dict]:
    """Every point of the sweep in run order ((dim, group) outermost), skipped ones included.
    ufa dense's launches are counted at the first and the last point run of each (dim, group):
    the shortest and the longest cache, where the split-KV choice differs."""
    points = []
    for dim in ints(args.dims):
        for group in ints(args.groups):
            if HEADS_Q % group:
                sys.exit(f"group {group} does not divide heads_q = {HEADS_Q}")
            run = []
            for batch in ints(args.batches):
                for kv in ints(args.kv):
                    hkv = HEADS_Q // group
                    size = kv_bytes(batch, kv, hkv, dim)
                    p = dict(head_dim=dim, group=group, batch=batch, kv=kv, heads_q=HEADS_Q,
                             heads_kv=hkv, kv_gb=size / 1e9, bytes=call_bytes(batch, kv, hkv, dim),
                             skipped=size > args.max_gb * 1e9, profile=False)
                    points.append(p)
                    if not p["skipped"]:
                        run.append(p)
            for p in run[:1] + run[-1:]:
                p["profile"] = True
    return points


def card_short(name: str) -> str:
    """'NVIDIA H200' -> 'h200', for file names."""
    s = re.sub(r"^(nvidia|amd)\s+", "", name.strip(), flags=re.I)
    return re.sub(r"[^a-z0-9]+", "_", s.lower()).strip("_") or "gpu"


# --------------------------------------------------------------------------------------------
# Measurements (torch imported here only)
# --------------------------------------------------------------------------------------------


def free() -> None:
    import torch
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def time_us(call, iters: int) -> float:
    """Per-call time in µs of back-to-back calls, as a decoding loop runs them
    (cuda_timing.loop_us: why the loop is not synchronised per call)."""
    from cuda_timing import loop_us

    return loop_us(call, iters, REPEATS, WARMUP)


def read_bandwidth(gib: int = 4, samples: int = 20) -> tuple[float, dict]:
    """The card's HBM read bandwidth in bytes/s, and each probe's reading.

    A reduction reads every byte of its input once and writes next to nothing (one float, or one
    per 1024), so its time is the time to stream the tensor out of HBM: the same traffic as a
    decoding step, which reads K and V and writes one row per head. A copy would mix in writes.
    4 GiB is ~80x the L2, so nothing is served from cache. Each probe is timed call by call (a
    4 GiB read takes ~1 ms, launch cost is noise) and the median of `samples` kept; the faster
    of the two probes is the yardstick."""
    import torch
    from cuda_timing import median_ms

    x = torch.ones((gib << 30) // 4, dtype=torch.float32, device="cuda")
    rows = x.view(-1, 1024)
    probes = {"sum": lambda: x.sum(), "row sum": lambda: rows.sum(dim=1)}
    found = {name: x.numel() * x.element_size() / (median_ms(call, samples, WARMUP) * 1e-3)
             for name, call in probes.items()}
    x = rows = None  # drop the 4 GiB before the sweep
    free()
    return max(found.values()), found


def logical(which: int, seq: int, p: dict):
    """K (which=0) or V (which=1) of sequence `seq`, [kv, heads_kv, dim], from its own seed: every
    layout is filled from these, so all of them hold the same numbers and only one cache is in
    memory at a time (no dense copy kept beside the paged one)."""
    import torch
    g = torch.Generator(device="cuda")
    g.manual_seed(SEED + 2 * seq + which)
    return torch.randn((p["kv"], p["heads_kv"], p["head_dim"]), generator=g, device="cuda",
                       dtype=torch.bfloat16)


def layout(p: dict, shape: tuple, place) -> tuple:
    """K and V in `shape`, filled one sequence at a time by place(tensor, seq, logical)."""
    import torch
    k, v = (torch.empty(shape, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for which, t in enumerate((k, v)):
        for seq in range(p["batch"]):
            place(t, seq, logical(which, seq, p))
    return k, v


def count_launches(call) -> tuple[int, int]:
    """(kernels, memcpy/memset operations) on the GPU during one call, from torch.profiler."""
    import torch
    from torch.profiler import DeviceType, ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    kernels = memops = 0
    for e in prof.events():
        if e.device_type != DeviceType.CUDA:
            continue  # runtime/driver API calls on the host side
        if e.name.startswith(("Memcpy", "Memset")):
            memops += 1
        else:
            kernels += 1
    if kernels == 0:
        raise RuntimeError("the profiler recorded no kernel")
    return kernels, memops


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:120] if text else ''}"


def measure(p: dict, iters: int) -> tuple[dict, dict]:
    """Times every variant of one point; returns (times in µs by variant, extras). Each layout is
    built, used and freed in turn; any failure (a refusing backend, out of memory) becomes a
    note and empty cells, never an abort."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import ufa.torch as ut

    b, kv, hkv, d, group = p["batch"], p["kv"], p["heads_kv"], p["head_dim"], p["group"]
    times: dict = {}
    extra: dict = {"notes": []}
    outs: dict = {}
    notes = extra["notes"]
    g = torch.Generator(device="cuda")
    g.manual_seed(SEED - 1)
    q = torch.randn((b, 1, HEADS_Q, d), generator=g, device="cuda", dtype=torch.bfloat16)
    seqlens = torch.full((b,), kv, dtype=torch.int32, device="cuda")

    def run(name, call):
        try:
            times[name] = time_us(call, iters)
            outs[name] = call()
        except Exception as e:  # noqa: BLE001 (a benchmark records and goes on)
            notes.append(f"{name}: {first_line(e)}")

    def phase(what, body):
        """Runs one layout's variants; the layout lives in body's frame alone, so it is gone
        when body returns or raises (out of memory while filling it, say) and is freed before
        the next layout is allocated."""
        try:
            body()
        except Exception as e:  # noqa: BLE001
            notes.append(f"{what}: {first_line(e)}")
        free()

    def dense():
        # ufa, dense layout [b, kv, hkv, d]: flash_attn_func and the KV-cache call on one buffer.
        k, v = layout(p, (b, kv, hkv, d), lambda t, i, x: t[i].copy_(x))
        call = lambda: ut.flash_attn_func(q, k, v, causal=True)
        run("ufa_dense", call)
        if p["profile"] and "ufa_dense" in times:
            # After the timing, so the profiler cannot perturb this point's numbers.
            try:
                extra["ufa_launches"], extra["ufa_memops"] = count_launches(call)
            except Exception as e:  # noqa: BLE001
                notes.append(f"launch count: {first_line(e)}")
        run("ufa_cache", lambda: ut.flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens,
                                                             causal=True))
        # The step appends the cache's last row over itself: same bits, same attention.
        k_new, v_new = k[:, kv - 1:kv].clone(), v[:, kv - 1:kv].clone()
        before = seqlens - 1
        step = lambda: ut.flash_attn_with_kvcache(q, k, v, k=k_new, v=v_new,
                                                  cache_seqlens=before, causal=True)
        run("ufa_step", step)
        if p["profile"] and "ufa_step" in times:
            try:
                extra["step_launches"], _ = count_launches(step)
            except Exception as e:  # noqa: BLE001
                notes.append(f"step launch count: {first_line(e)}")

    def sdpa():
        # PyTorch SDPA on contiguous [b, h, s, d] (its native layout: no strided views). One
        # query row attends to every key, so is_causal=False is the same attention as ufa's
        # causal=True (bottom-right aligned).
        qt = q.transpose(1, 2).contiguous()
        kt, vt = layout(p, (b, hkv, kv, d), lambda t, i, x: t[i].copy_(x.transpose(0, 1)))
        for name, member in BACKENDS.items():
            try:
                with sdpa_kernel(getattr(SDPBackend, member)), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "not available" warnings: the note says it
                    run(name, lambda: F.scaled_dot_product_attention(
                        qt, kt, vt, is_causal=False, enable_gqa=group > 1))
            except Exception as e:  # noqa: BLE001 (no such backend in this torch)
                notes.append(f"{name}: {first_line(e)}")

    def paged(name, page):
        # ufa paged: the pool [b * kv/page, page, hkv, d] in place of the dense cache; the block
        # table is a random permutation of the pool, so a sequence's consecutive pages lie
        # anywhere (in-order pages would be the dense layout again and flatter the paged path).
        nb = kv // page
        perm = torch.randperm(b * nb, generator=g, device="cuda").view(b, nb)
        table = perm.to(torch.int32)
        kp, vp = layout(p, (b * nb, page, hkv, d),
                        lambda t, i, x: t.index_copy_(0, perm[i], x.view(nb, page, hkv, d)))
        run(name, lambda: ut.flash_attn_with_kvcache(q, kp, vp, cache_seqlens=seqlens,
                                                     block_table=table, causal=True))

    phase("dense layout", dense)
    phase("SDPA layout", sdpa)
    for name, page in PAGES.items():
        if kv % page:
            notes.append(f"{name}: kv {kv} is not a multiple of the page size")
        else:
            phase(f"{name} layout", lambda: paged(name, page))

    # Correctness: ufa dense against the fastest SDPA backend; the other ufa calls against ufa
    # dense (same numbers in every layout, see logical()).
    # SDPA's outputs are [b, hq, 1, d]; ufa's [b, 1, hq, d].
    bshd = lambda n: outs[n].transpose(1, 2) if n in BACKENDS else outs[n]
    diff = lambda a, b_: (bshd(a).float() - bshd(b_).float()).abs().max().item()
    torch_ok = [n for n in BACKENDS if n in times]
    best = min(torch_ok, key=times.get) if torch_ok else None
    extra["best_torch"] = best
    if best and "ufa_dense" in outs:
        extra["max_diff"] = diff("ufa_dense", best)
        if not extra["max_diff"] < TOL:
            notes.append(f"**MISMATCH** ufa dense vs {best}: max diff {extra['max_diff']:.3g} "
                         f"> {TOL}")
    for name in UFA[1:]:
        if name in outs and "ufa_dense" in outs:
            extra[f"{name}_diff"] = diff(name, "ufa_dense")
            if not extra[f"{name}_diff"] < TOL:
                notes.append(f"**MISMATCH** {name} vs ufa dense: max diff "
                             f"{extra[f'{name}_diff']:.3g} > {TOL}")
    return times, extra


def make_row(p: dict, times: dict, extra: dict, bw: float) -> dict:
    """The CSV/Markdown row of a point: time, TB/s and fraction of `bw` per variant, ratios."""
    row = {k: p[k] for k in ("head_dim", "group", "batch", "kv", "heads_q", "heads_kv",
                             "kv_gb", "bytes", "skipped")}
    for name in VARIANTS:
        us = times.get(name)
        row[f"{name}_us"] = us
        row[f"{name}_tbs"] = p["bytes"] / (us * 1e-6) / 1e12 if us else None
        row[f"{name}_bw"] = p["bytes"] / (us * 1e-6) / bw if us else None
    best = extra.get("best_torch")
    row["best_torch"] = best or ""
    row["best_torch_us"] = times.get(best)
    row["best_torch_bw"] = row[f"{best}_bw"] if best else None
    ufa_us = times.get("ufa_dense")
    # Speed ratio: > 1 means ufa dense is faster than the best torch backend.
    row["ufa_over_best"] = row["best_torch_us"] / ufa_us if ufa_us and best else None
    for key in ("ufa_launches", "ufa_memops", "step_launches", "max_diff",
                *(f"{n}_diff" for n in UFA[1:])):
        row[key] = extra.get(key)
    row["notes"] = "; ".join(extra.get("notes", []))
    return row


# --------------------------------------------------------------------------------------------
# Report (no torch)
# --------------------------------------------------------------------------------------------


def fmt_us(x):
    return f"{x:.1f}" if x is not None else ""


def fmt_pct(x):
    return f"{100 * x:.0f}%" if x is not None else ""


def fmt_x(x):
    return f"{x:.2f}x" if x is not None else ""


def fmt_diff(x):
    return f"{x:.1e}" if x is not None else ""


def csv_value(key: str, x):
    if x is None:
        return ""
    if isinstance(x, float):
        digits = 2 if key.endswith("_us") else 4 if key in ("kv_gb",) else 6
        return f"{x:.3e}" if key.endswith("diff") else f"{x:.{digits}f}"
    return x


def short_list(labels: list[str], n: int = 8) -> str:
    more = f", +{len(labels) - n} more" if len(labels) > n else ""
    return ", ".join(labels[:n]) + more


def goals(rows: list[dict]) -> list[str]:
    """PASS/FAIL lines for the issue's targets, from the measured rows."""
    done = [r for r in rows if not r["skipped"]]
    out = []
    # (a) ufa dense at least as fast as the best torch backend wherever the cache is large.
    big = [r for r in done if r["kv"] >= BIG_KV]
    rated = [r for r in big if r["ufa_over_best"] is not None]
    slow = sorted((r for r in rated if r["ufa_over_best"] < 1.0), key=lambda r: r["ufa_over_best"])
    unrated = [label(r) for r in big if r["ufa_over_best"] is None]
    if rated:
        worst = min(rated, key=lambda r: r["ufa_over_best"])
        verdict = "PASS" if not slow else "FAIL"
        line = (f"- (a) {verdict}: ufa dense >= 1.0x best torch at kv >= {BIG_KV}: "
                f"{len(rated) - len(slow)}/{len(rated)} points (lowest "
                f"{fmt_x(worst['ufa_over_best'])} at {label(worst)}, vs {worst['best_torch']})")
        if slow:
            line += "; below: " + short_list([f"{label(r)} {fmt_x(r['ufa_over_best'])}"
                                              for r in slow])
    else:
        line = f"- (a) FAIL: no point with kv >= {BIG_KV} has both ufa dense and a torch time"
    if unrated:
        line += f"; not comparable: {short_list(unrated)}"
    out.append(line)
    # (b) at least BW_GOAL of the read bandwidth where the cache is large and the batch fills the
    # card, for each ufa layout.
    sel = [r for r in done if r["kv"] >= BIG_KV and r["batch"] >= BIG_BATCH]
    for name in ("ufa_dense", "paged16", "paged256"):
        got = [r for r in sel if r[f"{name}_bw"] is not None]
        low = sorted((r for r in got if r[f"{name}_bw"] < BW_GOAL), key=lambda r: r[f"{name}_bw"])
        missing = [label(r) for r in sel if r[f"{name}_bw"] is None]
        if not got:
            out.append(f"- (b) FAIL: {name}: no measured point with kv >= {BIG_KV} and batch >= "
                       f"{BIG_BATCH}")
            continue
        worst = min(got, key=lambda r: r[f"{name}_bw"])
        verdict = "PASS" if not low and not missing else "FAIL"
        line = (f"- (b) {verdict}: {name} >= {fmt_pct(BW_GOAL)} of read bandwidth at kv >= "
                f"{BIG_KV}, batch >= {BIG_BATCH}: {len(got) - len(low)}/{len(sel)} points (lowest "
                f"{fmt_pct(worst[f'{name}_bw'])} at {label(worst)})")
        if low:
            line += "; below: " + short_list([f"{label(r)} {fmt_pct(r[f'{name}_bw'])}"
                                              for r in low])
        if missing:
            line += f"; no time: {short_list(missing)}"
        out.append(line)
    # (c) short caches are launch-bound: the floor, and how many launches make a call.
    small = [r for r in done if r["kv"] < BIG_KV and r["ufa_dense_us"] is not None]
    if small:
        floor = min(small, key=lambda r: r["ufa_dense_us"])
        count = lambda r: f"{label(r)}: {r['ufa_launches']}" + (
            f" (+{r['ufa_memops']} memcpy/memset)" if r["ufa_memops"] else "")
        short = [count(r) for r in small if r["ufa_launches"] is not None]
        long_ = [count(r) for r in done if r["kv"] >= BIG_KV and r["ufa_launches"] is not None]
        out.append(f"- (c) INFO: below kv {BIG_KV} the launch-bound floor of ufa dense is "
                   f"{fmt_us(floor['ufa_dense_us'])} µs ({label(floor)}); kernel launches per "
                   f"call: {short_list(short) or 'not measured'}"
                   + (f"; at kv >= {BIG_KV}: {short_list(long_)}" if long_ else ""))
        steps = [f"{label(r)}: {r['step_launches']}" for r in done
                 if r["step_launches"] is not None]
        if steps:
            out.append(f"- (c) INFO: kernel launches of ufa step (the KV-cache call that "
                       f"appends): {short_list(steps)}")
    else:
        out.append(f"- (c) INFO: no ufa dense time below kv {BIG_KV}")
    bad = [label(r) for r in done if "MISMATCH" in r["notes"]]
    out.append(f"- correctness: {'FAIL' if bad else 'PASS'}: max |ufa - SDPA| < {TOL} "
               + (f"failed at {short_list(bad)}" if bad else "at every compared point"))
    return out


def markdown(rows: list[dict], meta: dict) -> list[str]:
    lines = [
        "# ufa decoding step vs PyTorch SDPA, at memory speed (bf16, seqlen_q = 1)",
        "",
        f"- date: {meta['date']}",
        f"- card: {meta['card']} ({meta['sms']} SMs, L2 {meta['l2'] / 2**20:.0f} MiB)",
        f"- torch: {meta['torch']}, CUDA {meta['cuda']}, cuDNN {meta['cudnn']}; ufa {meta['ufa']}",
        f"- command: `{meta['command']}`",
        f"- HBM read bandwidth, measured in this run: **{meta['bw'] / 1e12:.2f} TB/s** (median "
        "of 20 reductions over a 4 GiB fp32 tensor, the faster of "
        + ", ".join(f"{k} {v / 1e12:.2f}" for k, v in meta["bw_probes"].items()) + " TB/s)",
        f"- shapes: heads_q {HEADS_Q}, heads_kv = {HEADS_Q} / group; ufa q [b, 1, hq, d], k/v "
        "[b, kv, hkv, d], paged [pages, page, hkv, d] with a shuffled int32 block table; SDPA "
        "contiguous [b, h, s, d], enable_gqa when group > 1",
        f"- time: median over {REPEATS} repeats of (CUDA events around {meta['iters']} "
        f"back-to-back calls) / {meta['iters']}, after {WARMUP} warm-up calls; the host cost of "
        "each Python call counts when it exceeds the GPU's",
        "- bytes per call: K and V read once, q read, out written; %BW = bytes / time / measured "
        "read bandwidth; ufa/best = best torch time / ufa dense time (> 1: ufa faster)",
        "- launches: ufa dense's kernels in one call (torch.profiler), at the first and last point "
        "of each (dim, group), and ufa step's (the KV-cache call that appends); max diff: "
        "max |ufa dense - best SDPA backend|",
        "- † after kv: K+V fits in L2, so back-to-back calls may read it from there and %BW can "
        "exceed 100%",
        "",
    ]
    if meta.get("interrupted"):
        lines[-1:-1] = [f"- **incomplete**: {meta['interrupted']}"]
    cols = ["batch", "kv", "group", "ufa dense µs", "ufa dense %BW", "ufa cache µs",
            "ufa step µs", "paged16 µs", "paged16 %BW", "paged256 µs", "paged256 %BW",
            "cudnn µs", "flash µs", "efficient µs",
            "best torch", "ufa/best", "best torch %BW", "launches", "step launches",
            "max diff"]
    for dim in sorted({r["head_dim"] for r in rows}):
        sel = sorted((r for r in rows if r["head_dim"] == dim),
                     key=lambda r: (r["batch"], r["kv"], r["group"]))
        lines += [f"## head_dim {dim}", "", "| " + " | ".join(cols) + " |",
                  "|" + " ---: |" * 3 + " ---: |" * (len(cols) - 3)]
        for r in sel:
            if r["skipped"]:
                continue
            l2 = " †" if r["kv_gb"] * 1e9 <= meta["l2"] else ""
            cells = [r["batch"], f"{r['kv']}{l2}", r["group"], fmt_us(r["ufa_dense_us"]),
                     fmt_pct(r["ufa_dense_bw"]), fmt_us(r["ufa_cache_us"]),
                     fmt_us(r["ufa_step_us"]), fmt_us(r["paged16_us"]), fmt_pct(r["paged16_bw"]), fmt_us(r["paged256_us"]),
                     fmt_pct(r["paged256_bw"]), fmt_us(r["cudnn_us"]), fmt_us(r["flash_us"]),
                     fmt_us(r["efficient_us"]), r["best_torch"], fmt_x(r["ufa_over_best"]),
                     fmt_pct(r["best_torch_bw"]),
                     "" if r["ufa_launches"] is None else r["ufa_launches"],
                     "" if r["step_launches"] is None else r["step_launches"],
                     fmt_diff(r["max_diff"])]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        notes = []
        skipped = [f"b{r['batch']} kv{r['kv']} g{r['group']} ({r['kv_gb']:.0f} GB)"
                   for r in sel if r["skipped"]]
        if skipped:
            notes.append(f"- skipped, dense K+V over --max-gb {meta['max_gb']:g} GB: "
                         + ", ".join(skipped))
        # The same note (a backend refusing GQA, say) usually repeats across points: one line
        # per distinct note with the points it came from.
        by_note: dict = {}
        for r in sel:
            for n in filter(None, r["notes"].split("; ")):
                by_note.setdefault(n, []).append(f"b{r['batch']} kv{r['kv']} g{r['group']}")
        notes += [f"- {n}: {short_list(pts)}" for n, pts in
                  sorted(by_note.items(), key=lambda kv_: "MISMATCH" not in kv_[0])]
        if notes:
            lines += ["", "Notes:", *notes]
        lines.append("")
    lines += ["## Goals", "", *goals(rows), ""]
    return lines


def plot(rows: list[dict], stem: Path, title: str) -> None:
    """Fraction of the read bandwidth against kv, one line per variant (torch dashed), one panel
    per (dim, group), at batch 8 (or the nearest batch run) -> stem.png."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return
    done = [r for r in rows if not r["skipped"]]
    if not done:
        return
    batch = min({r["batch"] for r in done}, key=lambda b: (abs(b - 8), b))
    dims = sorted({r["head_dim"] for r in done})
    groups = sorted({r["group"] for r in done})
    fig, axes = plt.subplots(len(dims), len(groups), figsize=(4.5 * len(groups), 3.8 * len(dims)),
                             squeeze=False)
    for (i, dim), (j, group) in ((a, b) for a in enumerate(dims) for b in enumerate(groups)):
        ax = axes[i][j]
        sel = sorted((r for r in done
                      if (r["head_dim"], r["group"], r["batch"]) == (dim, group, batch)),
                     key=lambda r: r["kv"])
        xs = [r["kv"] for r in sel]
        for name in VARIANTS:
            ys = [r[f"{name}_bw"] if r[f"{name}_bw"] is not None else float("nan") for r in sel]
            ax.plot(xs, ys, marker="o", label=name, linestyle="--" if name in BACKENDS else "-")
        ax.axhline(BW_GOAL, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"head_dim {dim}, group {group}, batch {batch}")
        ax.set_xlabel("KV length")
        ax.set_ylabel("fraction of read bandwidth")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(f"{stem}.png", dpi=80)
    plt.close(fig)


def write(rows: list[dict], meta: dict, stem: Path) -> list[str]:
    lines = markdown(rows, meta)
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    fields = list(rows[0])
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: csv_value(k, r[k]) for k in fields})
    plot(rows, stem, f"ufa decode vs PyTorch SDPA, bf16, {meta['card']}, {meta['date'][:10]}")
    return lines


# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,32,128", help="batch sizes (comma list)")
    ap.add_argument("--kv", default="1024,8192,32768,131072", help="KV lengths (comma list)")
    ap.add_argument("--dims", default="64,128", help="head dims (comma list)")
    ap.add_argument("--groups", default="1,4,8", help="heads_q / heads_kv (comma list)")
    ap.add_argument("--iters", type=int, default=20, help="back-to-back calls per timing")
    ap.add_argument("--max-gb", type=float, default=40.0,
                    help="skip points whose dense K+V exceeds this many GB (1e9 bytes)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                    help="output folder (default: bench/results)")
    ap.add_argument("--tag", default="", help="file name suffix (default: the card's short name)")
    ap.add_argument("--dry-run", action="store_true", help="print the planned points and exit")
    args = ap.parse_args()

    points = plan(args)
    command = shlex.join([sys.argv[0], *sys.argv[1:]])
    now = datetime.datetime.now(datetime.timezone.utc)
    if args.dry_run:
        todo = [p for p in points if not p["skipped"]]
        print(f"# dry run: {command}")
        stem = Path(args.out) / f"decode_{now:%Y-%m-%d}_{args.tag or '<card>'}"
        print(f"# {len(points)} points, {len(todo)} to run, {len(points) - len(todo)} skipped "
              f"(dense K+V > {args.max_gb:g} GB); outputs: {stem}.{{md,csv,png}}")
        for p in points:
            state = (f"skip (K+V {p['kv_gb']:.1f} GB > {args.max_gb:g} GB)" if p["skipped"]
                     else "run" + (", count launches" if p["profile"] else ""))
            print(f"{label(p):<26} heads_kv {p['heads_kv']:<2}  K+V {p['kv_gb']:8.3f} GB  {state}")
        return

    import torch

    import ufa

    if not torch.cuda.is_available():
        sys.exit("no CUDA device (use --dry-run to see the plan)")
    props = torch.cuda.get_device_properties(0)
    card = torch.cuda.get_device_name(0)
    bw, probes = read_bandwidth()
    print(f"{card}: HBM read bandwidth {bw / 1e12:.2f} TB/s "
          + ", ".join(f"({k} {v / 1e12:.2f})" for k, v in probes.items()), file=sys.stderr)
    meta = dict(date=f"{now:%Y-%m-%d %H:%M} UTC", card=card, sms=props.multi_processor_count,
                l2=getattr(props, "L2_cache_size", 0), torch=torch.__version__,
                cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                ufa=getattr(ufa, "__version__", "?"), command=command, bw=bw, bw_probes=probes,
                iters=args.iters, max_gb=args.max_gb)

    # A run stopped from outside (a time limit's SIGTERM, ^C) still writes the points it has.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    rows = []
    try:
        run_points(points, rows, args, bw)
    except KeyboardInterrupt:
        meta["interrupted"] = f"stopped after {len(rows)} of {len(points)} points"
        print(f"interrupted: {meta['interrupted']}", file=sys.stderr)

    stem = Path(args.out) / f"decode_{now:%Y-%m-%d}_{args.tag or card_short(card)}"
    lines = write(rows, meta, stem)
    print("\n".join(lines))
    print(f"wrote {stem}.md/.csv" + (".png" if Path(f"{stem}.png").exists() else ""),
          file=sys.stderr)


def run_points(points: list[dict], rows: list[dict], args, bw: float) -> None:
    """Measures every point in turn, appending its row to `rows`."""
    for p in points:
        if p["skipped"]:
            rows.append(make_row(p, {}, {"notes": []}, bw))
            print(f"{label(p):<26} skipped (K+V {p['kv_gb']:.1f} GB)", file=sys.stderr, flush=True)
            continue
        times, extra = measure(p, args.iters)
        r = make_row(p, times, extra, bw)
        rows.append(r)
        cell = lambda n: f"{n} {fmt_us(r[f'{n}_us']) or '-'}µs {fmt_pct(r[f'{n}_bw'])}"
        print(f"{label(p):<26} " + " | ".join(cell(n) for n in VARIANTS)
              + f" | ufa/best {fmt_x(r['ufa_over_best']) or '-'}"
              + (f" | launches {r['ufa_launches']}" if r["ufa_launches"] is not None else "")
              + (f" | step {r['step_launches']}" if r["step_launches"] is not None else "")
              + f" | diff {fmt_diff(r['max_diff']) or '-'}", file=sys.stderr, flush=True)
        if "MISMATCH" in r["notes"]:
            print(f"!! {label(p)}: {r['notes']}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
