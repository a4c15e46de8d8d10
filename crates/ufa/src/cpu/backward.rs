//! The CPU backward pass: FlashAttention-2's recomputation (P from the saved log-sum-exp, tile
//! by tile, no attention matrix stored) with its five products per tile, arranged so that the
//! gradients are bitwise the same for any thread count, with no atomics:
//!
//! 1. `delta[i] = rowsum(dO_i ∘ O_i)`.
//! 2. One item per (batch, KV head, chunk of keys): for each group of key blocks (sized to stay
//!    in cache), loops over the query rows of the GQA group, loading each block of rows once,
//!    and accumulates `dV = Pᵀ dO` and `dK = dSᵀ Q·scale`, which it alone writes, and `dS K`
//!    into the chunk's own fp32 partial dQ.
//! 3. One item per (batch, KV head): sums the chunks' partial dQ in chunk order and writes
//!    `dQ = scale · Σ dS K`.
//!
//! with `S = scale · Q Kᵀ`, `P = exp(S − lse)`, `dP = dO Vᵀ`, `dS = P ∘ (dP − delta) ∘ softcap'`.
//! The chunking depends on the problem's sizes and the machine's core count only, never on a
//! context's thread count. bf16 inputs take the bf16 dot products,
//! with P and dS rounded to bf16 for the products that consume them (as FlashAttention does on
//! GPUs); every sum stays fp32.

use super::aligned::{AlignedBuf, Plain};
#[cfg(target_arch = "x86_64")]
use super::amx::Tiles;
use super::isa::{run_with, Isa, KernelFn};
use super::math::{dot, exp, MulAdd};
use super::microkernel::{gemm, transpose_rows, Strided, BK, R};
use super::parallel::{for_each, for_each_slice_mut, Exec};
use super::spare::{Kept, Lent, Spares};
use super::tile::{
    apply_score_mods, pack_transposed, prefetch, round_up, widen, RowInfo, TileRows,
};
use super::Workspace;
use crate::dtype::{load_row_f32, store_row_f32, DType};
use crate::error::{Error, Result};
use crate::problem::{BackwardProblem, Problem};
use crate::sequences::Seq;

/// Query rows per block.
const BQ: usize = 64;
/// Key-pass items wanted: four per core of the machine, at least 16. Problems with fewer
/// (batch × KV head) pairs split their keys into chunks, each with its own partial dQ. It
/// depends on the machine, not on a context's thread count, so gradients stay bitwise the
/// same for any thread count. 16 (the count for 2 cores) leaves a 16-core machine waiting:
/// a causal B1 H8 S4096 backward has 16 items there, the largest with 3/4 of a head's work (a
/// model of the schedule keeps 16 threads 67% busy); 64 items taken longest first (see
/// [`plan`]) keep them all busy in the model, and cost 2 cores 0-3% (measured), which is why
/// the count follows the machine.
fn target_items() -> usize {
    static ITEMS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *ITEMS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        cores.saturating_mul(4).clamp(16, 256)
    })
}
/// Fewest key blocks per chunk, so that a chunk's partial dQ stays cheap next to its work.
const MIN_BLOCKS_PER_CHUNK: usize = 4;
/// Cache budget of a group of key blocks (their packed K, V and dK, dV accumulators).
const GROUP_BYTES: usize = 512 << 10;
/// Most fp32 elements of partial dQ beyond one chunk per head (which is dQ in fp32).
const PARTIAL_BUDGET: usize = 32 << 20;

/// One (batch, KV head) of the key pass: all its query rows, and its chunks of keys.
#[derive(Clone, Copy, Debug)]
struct HeadPlan {
    rows: TileRows,
    key_blocks: usize,
    chunks: usize,
    blocks_per_chunk: usize,
    /// Elements of one chunk's partial dQ: rows (padded to R) × dp.
    part_len: usize,
    /// Where chunk c's partial dQ starts in the workspace is `Plan::part_offsets[first + c]`.
    first: usize,
}

/// How the key pass is cut: per (batch, KV head), chunks of `blocks_per_chunk` key blocks.
struct Plan {
    heads: Vec<HeadPlan>,
    /// Items of step 2: (head, chunk), the longest first. Their partial dQ lie in the
    /// workspace in this order.
    items: Vec<(usize, usize)>,
    /// Where each (head, chunk)'s partial dQ starts (see `HeadPlan::first`).
    part_offsets: Vec<usize>,
    /// Key blocks loaded together (see [`KeyChunk`]).
    group: usize,
    /// Elements of partial dQ in all.
    total: usize,
}

fn plan(p: &Problem, dp: usize, bf16: bool) -> Result<Plan> {
    let g = p.group_size();
    let seqs: Vec<Seq> = (0..p.batch).map(|b| p.seq(b)).collect();
    let part_len = |s: &Seq| round_up(s.seqlen_q * g, R) * dp;
    let all_parts: usize = seqs.iter().map(|s| p.heads_kv * part_len(s)).sum();
    let affordable = 1 + PARTIAL_BUDGET / all_parts.max(1);
    let n_heads = p.batch * p.heads_kv;
    let mut heads = Vec::with_capacity(n_heads);
    // (work, head, chunk): work counts the (query row, key) pairs the chunk's band lets in.
    let mut items = Vec::new();
    let mut chunks_before = 0;
    for (batch, &seq) in seqs.iter().enumerate() {
        let key_blocks = seq.seqlen_kv.div_ceil(BK);
        let wanted = target_items()
            .div_ceil(n_heads)
            .min(key_blocks / MIN_BLOCKS_PER_CHUNK)
            .min(affordable)
            .max(1);
        let blocks_per_chunk = key_blocks.div_ceil(wanted).max(1);
        let chunks = key_blocks.div_ceil(blocks_per_chunk);
        // The same for every KV head of this sequence.
        let work: Vec<usize> = (0..chunks)
            .map(|c| {
                let k0 = c * blocks_per_chunk * BK;
                let k1 = (k0 + blocks_per_chunk * BK).min(seq.seqlen_kv);
                (0..seq.seqlen_q)
                    .map(|i| {
                        let (lo, hi) = p.visible_keys(&seq, i);
                        hi.min(k1).saturating_sub(lo.max(k0))
                    })
                    .sum()
            })
            .collect();
        for hkv in 0..p.heads_kv {
            let head = HeadPlan {
                rows: TileRows {
                    batch,
                    hkv,
                    row0: 0,
                    nrows: seq.seqlen_q * g,
                    seq,
                },
                key_blocks,
                chunks,
                blocks_per_chunk,
                part_len: part_len(&seq),
                first: chunks_before,
            };
            chunks_before += chunks;
            items.extend(work.iter().enumerate().map(|(c, &w)| (w, heads.len(), c)));
            heads.push(head);
        }
    }
    // Longest first, so that the last items a thread takes are short ones. The order moves no
    // sum: each chunk has its own partial dQ, and step 3 adds them in chunk order.
    items.sort_by_key(|&(work, h, c)| (std::cmp::Reverse(work), h, c));
    let mut part_offsets = vec![0; items.len()];
    let mut total = 0usize;
    for &(_, h, c) in &items {
        part_offsets[heads[h].first + c] = total;
        total = total
            .checked_add(heads[h].part_len)
            .ok_or_else(|| Error::invalid("problem too large for the backward pass"))?;
    }
    let items = items.into_iter().map(|(_, h, c)| (h, c)).collect();
    let most_blocks = heads.iter().map(|h| h.blocks_per_chunk).max().unwrap_or(1);
    let group = (GROUP_BYTES / KeyBlock::bytes(p, bf16)).clamp(1, most_blocks);
    Ok(Plan {
        heads,
        items,
        part_offsets,
        group,
        total,
    })
}

/// Whether the products take the bf16 dot products: bf16 inputs and gradients of the output,
/// and a kernel family that has the instructions.
#[inline(always)]
fn uses_bf16(bp: &BackwardProblem, has_instructions: bool) -> bool {
    has_instructions
        && cfg!(target_arch = "x86_64")
        && bp.fwd.q.dtype == DType::BF16
        && bp.dout.dtype == DType::BF16
}

/// Per-thread buffers of the rows and the tile. The fp32 path keeps rows of Q and dO; the bf16
/// path keeps them pair-packed (see `avx512_bf16.rs`): `*p` packs pairs along the head
/// dimension, `*i` interleaves pairs of rows.
struct Scratch {
    /// Query rows × dp: Q; query rows × dvp: dO.
    q: Vec<f32>,
    dout: Vec<f32>,
    qp: AlignedBuf<u32>,
    dop: AlignedBuf<u32>,
    qi: AlignedBuf<u32>,
    doi: AlignedBuf<u32>,
    lse: Vec<f32>,
    delta: Vec<f32>,
    rows: Vec<RowInfo>,
    /// BK × dv: V rows converted to fp32 before they are transposed (non-f32 V only).
    stage: Vec<f32>,
    /// Rows × BK: S then P; dP then dS; the softcap's slope.
    p: AlignedBuf<f32>,
    ds: AlignedBuf<f32>,
    cap: Vec<f32>,
    /// bf16 P and dS in row pairs (rows/2 × BK), and dS in key pairs (rows × BK/2).
    p_rows: AlignedBuf<u32>,
    ds_rows: AlignedBuf<u32>,
    ds_keys: AlignedBuf<u32>,
    /// On the tile unit, Pᵀ and dSᵀ as rows: keys × row pairs (BK × BQ/2).
    p_keys: AlignedBuf<u32>,
    ds_t: AlignedBuf<u32>,
    dp: usize,
    dvp: usize,
}

/// Allocates `n` zeros where `used`, nothing otherwise (buffers of the path not taken).
fn zeros<T: Clone + Default>(used: bool, n: usize) -> Vec<T> {
    vec![T::default(); if used { n } else { 0 }]
}

/// [`zeros`], 64-byte aligned: the operands and sums of the products (tile rows and vectors
/// split across two cache lines ran the AMX products at half speed; see `cpu/aligned.rs`).
fn aligned<T: Plain>(used: bool, n: usize) -> AlignedBuf<T> {
    AlignedBuf::zeroed(if used { n } else { 0 })
}

impl Scratch {
    /// `amx`: the bf16 products run on the tile unit (the amx-bf16 family).
    fn new(p: &Problem, bf16: bool, amx: bool) -> Scratch {
        let (dp, dvp) = (round_up(p.head_dim, 16), round_up(p.head_dim_v, 16));
        let (d2, dv2) = (p.head_dim.div_ceil(2), p.head_dim_v.div_ceil(2));
        Scratch {
            q: zeros(!bf16, BQ * dp),
            dout: zeros(!bf16, BQ * dvp),
            qp: aligned(bf16, BQ * d2),
            dop: aligned(bf16, BQ * dv2),
            qi: aligned(bf16, BQ / 2 * dp),
            doi: aligned(bf16, BQ / 2 * dvp),
            lse: vec![0.0; BQ],
            delta: vec![0.0; BQ],
            rows: vec![RowInfo::default(); BQ],
            stage: zeros(!bf16 && p.v.dtype != DType::F32, BK * p.head_dim_v),
            p: aligned(true, BQ * BK),
            ds: aligned(true, BQ * BK),
            cap: vec![1.0; BQ * BK],
            p_rows: aligned(bf16, BQ / 2 * BK),
            ds_rows: aligned(bf16, BQ / 2 * BK),
            ds_keys: aligned(bf16, BQ * BK / 2),
            p_keys: aligned(bf16 && amx, BK * BQ / 2),
            ds_t: aligned(bf16 && amx, BK * BQ / 2),
            dp,
            dvp,
        }
    }
}

/// One block of keys: K and V packed as the products need them, and its dK, dV accumulators.
struct KeyBlock {
    j0: usize,
    nk: usize,
    /// fp32: dp × BK K transposed, dvp × BK V transposed, BK × dp K rows.
    kt: Vec<f32>,
    vt: Vec<f32>,
    krows: Vec<f32>,
    /// bf16: K and V transposed by pairs, K rows interleaved.
    kp: AlignedBuf<u32>,
    vp: AlignedBuf<u32>,
    ki: AlignedBuf<u32>,
    /// dK (BK × dp) and dV (BK × dvp).
    acc_k: AlignedBuf<f32>,
    acc_v: AlignedBuf<f32>,
}

impl KeyBlock {
    fn new(p: &Problem, bf16: bool) -> KeyBlock {
        let (dp, dvp) = (round_up(p.head_dim, 16), round_up(p.head_dim_v, 16));
        let (d2, dv2) = (p.head_dim.div_ceil(2), p.head_dim_v.div_ceil(2));
        KeyBlock {
            j0: 0,
            nk: 0,
            kt: zeros(!bf16, dp * BK),
            vt: zeros(!bf16, dvp * BK),
            krows: zeros(!bf16, BK * dp),
            kp: aligned(bf16, d2 * BK),
            vp: aligned(bf16, dv2 * BK),
            ki: aligned(bf16, BK / 2 * dp),
            acc_k: aligned(true, BK * dp),
            acc_v: aligned(true, BK * dvp),
        }
    }

    /// Bytes of one block's buffers, to size groups of blocks for the cache.
    fn bytes(p: &Problem, bf16: bool) -> usize {
        let (dp, dvp) = (round_up(p.head_dim, 16), round_up(p.head_dim_v, 16));
        let packed = if bf16 {
            (p.head_dim.div_ceil(2) + p.head_dim_v.div_ceil(2)) * BK + BK / 2 * dp
        } else {
            (2 * dp + dvp) * BK
        };
        4 * (packed + BK * (dp + dvp))
    }
}

/// The union of the keys that rows `t` may see by causal/window rules (no memory is read).
#[inline(always)]
fn rows_band(p: &Problem, t: &TileRows) -> (usize, usize) {
    let g = p.group_size();
    let (first, last) = (t.row0 / g, (t.row0 + t.nrows - 1) / g);
    (first..=last).fold((0, 0), |keys, qpos| {
        widen(keys, p.visible_keys(&t.seq, qpos))
    })
}

/// Loads rows `t`: Q and dO (fp32, or bf16 pair-packed), lse, delta and bookkeeping.
#[inline(always)]
fn load_rows(bp: &BackwardProblem, delta: &Deltas, t: &TileRows, sc: &mut Scratch, bf16: bool) {
    let p = &bp.fwd;
    let (d, dv) = (p.head_dim, p.head_dim_v);
    let lse = p
        .lse
        .as_ref()
        .expect("validated backward problems carry the lse");
    let q_at = |r: usize| p.q.at([t.batch, t.position(p, r).0, t.position(p, r).1, 0]);
    let do_at = |r: usize| {
        bp.dout
            .at([t.batch, t.position(p, r).0, t.position(p, r).1, 0])
    };
    for r in 0..t.nrows {
        let info = t.row(p, r);
        let (qpos, head) = (info.qpos, info.head);
        sc.rows[r] = info;
        // SAFETY: indices are within the validated views.
        unsafe {
            sc.lse[r] = *(lse.at([t.batch, head, qpos, 0]) as *const f32);
            if !bf16 {
                load_row_f32(p.q.dtype, q_at(r), &mut sc.q[r * sc.dp..][..d]);
                load_row_f32(bp.dout.dtype, do_at(r), &mut sc.dout[r * sc.dvp..][..dv]);
            }
        }
        sc.delta[r] = delta.get(t.batch, head, qpos);
    }
    if bf16 {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the bf16 path runs only for bf16 q and dout, within the validated views.
        unsafe {
            use super::avx512_bf16::{pack_interleaved, pack_row_pairs};
            let (d2, dv2) = (d.div_ceil(2), dv.div_ceil(2));
            for r in 0..t.nrows {
                pack_row_pairs(q_at(r) as *const u16, d, &mut sc.qp[r * d2..][..d2]);
                pack_row_pairs(do_at(r) as *const u16, dv, &mut sc.dop[r * dv2..][..dv2]);
            }
            let q_row = |r: usize| q_at(r) as *const u16;
            let do_row = |r: usize| do_at(r) as *const u16;
            pack_interleaved(q_row, t.nrows, d, &mut sc.qi, sc.dp);
            pack_interleaved(do_row, t.nrows, dv, &mut sc.doi, sc.dvp);
        }
    }
}

/// Asks for the Q and dO rows of the block after `t` while `t` is computed: the loads of a
/// block's rows stall on memory otherwise (each group of keys streams them all again).
#[inline(always)]
fn prefetch_rows(bp: &BackwardProblem, t: &TileRows, rows_per_head: usize) {
    let p = &bp.fwd;
    let next = t.row0 + t.nrows;
    let q_bytes = p.head_dim * p.q.dtype.size_in_bytes();
    let do_bytes = p.head_dim_v * bp.dout.dtype.size_in_bytes();
    for r in next..(next + BQ).min(rows_per_head) {
        let (qpos, head) = TileRows { row0: 0, ..*t }.position(p, r);
        prefetch(p.q.at([t.batch, qpos, head, 0]), q_bytes);
        prefetch(bp.dout.at([t.batch, qpos, head, 0]), do_bytes);
    }
}

/// Packs keys `j0..j0+nk` of K and V into `kb`, zero-padded to BK keys, and clears its
/// accumulators.
#[inline(always)]
fn load_keys<const C: usize>(
    p: &Problem,
    t: &TileRows,
    (j0, nk): (usize, usize),
    kb: &mut KeyBlock,
    stage: &mut [f32],
    bf16: bool,
) {
    let (d, dv, dp) = (p.head_dim, p.head_dim_v, round_up(p.head_dim, 16));
    (kb.j0, kb.nk) = (j0, nk);
    kb.acc_k.fill(0.0);
    kb.acc_v.fill(0.0);
    let k_at = |jj: usize| p.k.at([t.batch, j0 + jj, t.hkv, 0]);
    if bf16 {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the bf16 path runs only for bf16 k and v; keys j0+jj < seqlen_kv.
        unsafe {
            use super::avx512_bf16::{pack_interleaved, pack_transposed_pairs};
            let v_at = |jj: usize| p.v.at([t.batch, j0 + jj, t.hkv, 0]);
            let (k_row, v_row) = (|jj| k_at(jj) as *const u16, |jj| v_at(jj) as *const u16);
            pack_transposed_pairs(k_row, nk, d, BK, &mut kb.kp, BK);
            pack_transposed_pairs(v_row, nk, dv, BK, &mut kb.vp, BK);
            pack_interleaved(k_row, nk, d, &mut kb.ki, dp);
        }
        return;
    }
    for jj in 0..nk {
        // SAFETY: key j0+jj < seqlen_kv, within the validated view.
        unsafe { load_row_f32(p.k.dtype, k_at(jj), &mut kb.krows[jj * dp..][..d]) };
    }
    let krows = kb.krows.as_ptr();
    // SAFETY: rows jj < nk of `krows` hold d values.
    unsafe { transpose_rows::<C, f32>(|jj| krows.add(jj * dp), nk, d, BK, &mut kb.kt, BK) };
    pack_transposed::<C>(&p.v, t, (j0, nk), dv, BK, stage, &mut kb.vt);
}

/// Turns S in `sc.p` and dP in `sc.ds` into P and dS (zero for padding and for keys a row does
/// not see).
#[inline(always)]
fn probabilities_and_ds<M: MulAdd>(
    p: &Problem,
    t: &TileRows,
    j0: usize,
    nk: usize,
    sc: &mut Scratch,
) {
    for r in 0..round_up(t.nrows, R) {
        let (s, ds) = (&mut sc.p[r * BK..][..BK], &mut sc.ds[r * BK..][..BK]);
        if r >= t.nrows || sc.lse[r] == f32::NEG_INFINITY {
            s.fill(0.0); // padding, or a row that sees no key: no gradient flows
            ds.fill(0.0);
            continue;
        }
        let cap = &mut sc.cap[r * BK..][..BK];
        let cap_slope = (p.softcap > 0.0).then_some(&mut cap[..]);
        apply_score_mods::<M>(p, t, &sc.rows[r], j0, nk, s, cap_slope);
        let (lse, delta) = (sc.lse[r], sc.delta[r]);
        // Dropout's factors (0 or 1 / (1 - p)), regenerated as the forward drew them: P and
        // dP are the kept ones, scaled; D (from the output) already is.
        let mut keep = [1.0f32; BK];
        if let Some(d) = &p.dropout {
            let row = &sc.rows[r];
            d.apply(
                t.batch * p.heads_q + row.head,
                row.qpos,
                j0,
                &mut keep[..nk],
            );
        }
        for c in 0..BK {
            // A masked key (score -inf) gets exactly 0, even in a row whose LSE or D is NaN:
            // a NaN row must not reach the gradients of keys it does not see.
            let masked = s[c] == f32::NEG_INFINITY;
            let pc = exp::<M>(s[c] - lse);
            let soft = if p.softcap > 0.0 { cap[c] } else { 1.0 };
            let dsc = pc * (ds[c] * keep[c] - delta) * soft;
            s[c] = if masked { 0.0 } else { pc * keep[c] };
            ds[c] = if masked { 0.0 } else { dsc };
        }
    }
}

/// The five products of one tile (rows `t` against the keys of `kb`, both loaded): dV and dK
/// of the keys accumulate in `kb`, `dS K` of the rows in `dq`. On the bf16 path the products
/// take vdpbf16ps, or the AMX tile unit (`amx`: the amx-bf16 family).
#[inline(always)]
fn tile<M: MulAdd, const C: usize>(
    p: &Problem,
    t: &TileRows,
    kb: &mut KeyBlock,
    sc: &mut Scratch,
    dq: &mut [f32],
    (bf16, amx): (bool, bool),
) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = amx; // the bf16 path exists on x86-64 only
    if bf16 {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the bf16 path runs only under avx512bf16 (BF16 is true only there), and
        // with `amx` only in the AMX family, which runs where the tile unit is usable (or
        // emulated).
        unsafe {
            use super::amx::{emulated, Emulated, Hw};
            if !amx {
                bf16_tile::<M, C, Hw>(p, t, kb, sc, dq, None);
            } else if emulated() {
                let mut tiles = Emulated::default();
                tiles.begin();
                bf16_tile::<M, C, _>(p, t, kb, sc, dq, Some(&mut tiles));
                tiles.end();
            } else {
                let mut tiles = Hw;
                tiles.begin();
                bf16_tile::<M, C, _>(p, t, kb, sc, dq, Some(&mut tiles));
                tiles.end();
            }
        }
        return;
    }
    let (j0, nk) = (kb.j0, kb.nk);
    let (d, dv, dp, dvp) = (p.head_dim, p.head_dim_v, sc.dp, sc.dvp);
    let rows = round_up(t.nrows, R);
    let (q, kt) = (Strided::rows(&sc.q, dp), Strided::rows(&kb.kt, BK));
    gemm::<M, C, false>(q, kt, &mut sc.p, BK, [rows, BK, d], p.scale);
    let (dout, vt) = (Strided::rows(&sc.dout, dvp), Strided::rows(&kb.vt, BK));
    gemm::<M, C, false>(dout, vt, &mut sc.ds, BK, [rows, BK, dv], 1.0);
    probabilities_and_ds::<M>(p, t, j0, nk, sc);
    let n = t.nrows;
    let (q, dout) = (Strided::rows(&sc.q, dp), Strided::rows(&sc.dout, dvp));
    // dV += Pᵀ dO; dK += dSᵀ Q
    let pt = Strided::transposed(&sc.p, BK);
    gemm::<M, C, true>(pt, dout, &mut kb.acc_v, dvp, [BK, dvp, n], 1.0);
    let dst = Strided::transposed(&sc.ds, BK);
    gemm::<M, C, true>(dst, q, &mut kb.acc_k, dp, [BK, dp, n], 1.0);
    // dQ += dS K
    let (ds, k) = (Strided::rows(&sc.ds, BK), Strided::rows(&kb.krows, dp));
    gemm::<M, C, true>(ds, k, dq, dp, [rows, dp, nk], 1.0);
}

/// One product of the bf16 path, as `avx512_bf16::gemm` takes it (bf16 pairs, fp32 sums): on
/// the tile unit where `tiles` is given (`amx::gemm` hands what fills no whole tile to
/// vdpbf16ps), else on vdpbf16ps.
///
/// # Safety
/// As `avx512_bf16::gemm`, and the tiles configured.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn bf16_gemm<T: Tiles, const ACC: bool>(
    tiles: &mut Option<&mut T>,
    a: Strided<u32>,
    b: Strided<u32>,
    out: &mut [f32],
    ldo: usize,
    dims: [usize; 3],
    scale: f32,
) {
    match tiles {
        Some(t) => super::amx::gemm::<T, ACC>(t, a, b, out, ldo, dims, scale),
        None => super::avx512_bf16::gemm::<ACC>(a, b, out, ldo, dims, scale),
    }
}

/// [`tile`] on the bf16 path, on the tile unit where `tiles` is given ([`bf16_gemm`]): P and
/// dS rounded to bf16 for the products that consume them, every sum fp32.
///
/// # Safety
/// Needs avx512f+avx512bf16, bf16 Q, dO, K and V; the tiles configured.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn bf16_tile<M: MulAdd, const C: usize, T: Tiles>(
    p: &Problem,
    t: &TileRows,
    kb: &mut KeyBlock,
    sc: &mut Scratch,
    dq: &mut [f32],
    mut tiles: Option<&mut T>,
) {
    use super::avx512_bf16::{pack_probabilities, pack_row_pairs_f32};
    let (j0, nk) = (kb.j0, kb.nk);
    let (d2, dv2) = (p.head_dim.div_ceil(2), p.head_dim_v.div_ceil(2));
    let (dp, dvp) = (sc.dp, sc.dvp);
    let rows = round_up(t.nrows, R);
    let (qp, kp) = (Strided::rows(&sc.qp, d2), Strided::rows(&kb.kp, BK));
    bf16_gemm::<T, false>(&mut tiles, qp, kp, &mut sc.p, BK, [rows, BK, d2], p.scale);
    let (dop, vp) = (Strided::rows(&sc.dop, dv2), Strided::rows(&kb.vp, BK));
    bf16_gemm::<T, false>(&mut tiles, dop, vp, &mut sc.ds, BK, [rows, BK, dv2], 1.0);
    probabilities_and_ds::<M>(p, t, j0, nk, sc);
    pack_row_pairs_f32(&sc.p, rows, &mut sc.p_rows);
    pack_row_pairs_f32(&sc.ds, rows, &mut sc.ds_rows);
    pack_probabilities(&sc.ds, &mut sc.ds_keys, rows);
    let n2 = t.nrows.div_ceil(2);
    // dV += Pᵀ dO; dK += dSᵀ Q, with Pᵀ and dSᵀ (keys × row pairs) as rows for the tile
    // unit, which loads rows (vdpbf16ps reads them in place through a transposed view).
    let (pt, dst) = if tiles.is_some() {
        let ld = BQ / 2;
        let (p_rows, ds_rows) = (sc.p_rows.as_ptr(), sc.ds_rows.as_ptr());
        transpose_rows::<C, u32>(|i| p_rows.add(i * BK), n2, BK, n2, &mut sc.p_keys, ld);
        transpose_rows::<C, u32>(|i| ds_rows.add(i * BK), n2, BK, n2, &mut sc.ds_t, ld);
        (Strided::rows(&sc.p_keys, ld), Strided::rows(&sc.ds_t, ld))
    } else {
        (
            Strided::transposed(&sc.p_rows, BK),
            Strided::transposed(&sc.ds_rows, BK),
        )
    };
    let doi = Strided::rows(&sc.doi, dvp);
    bf16_gemm::<T, true>(&mut tiles, pt, doi, &mut kb.acc_v, dvp, [BK, dvp, n2], 1.0);
    let qi = Strided::rows(&sc.qi, dp);
    bf16_gemm::<T, true>(&mut tiles, dst, qi, &mut kb.acc_k, dp, [BK, dp, n2], 1.0);
    // dQ += dS K
    let (ds, ki) = (
        Strided::rows(&sc.ds_keys, BK / 2),
        Strided::rows(&kb.ki, dp),
    );
    bf16_gemm::<T, true>(&mut tiles, ds, ki, dq, dp, [rows, dp, nk.div_ceil(2)], 1.0);
}

/// Step 2: one chunk of keys of one (batch, KV head); `part` is its partial dQ.
/// Keys are taken in groups of blocks that stay in cache while every block of query rows is
/// loaded once per group.
struct KeyChunk<'a> {
    bp: &'a BackwardProblem,
    /// The products take bf16 pairs ([`uses_bf16`]), as the scratch was made for.
    bf16: bool,
    delta: &'a Deltas,
    group: usize,
    head: &'a HeadPlan,
    chunk: usize,
    part: &'a mut [f32],
    sc: &'a mut Buffers,
}

/// A worker's scratch and key blocks, kept between calls ([`super::spare`]).
struct Buffers {
    shape: BuffersShape,
    sc: Scratch,
    blocks: Vec<KeyBlock>,
}

/// What [`Buffers`]' sizes follow from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct BuffersShape {
    head_dim: usize,
    head_dim_v: usize,
    v_f32: bool,
    bf16: bool,
    amx: bool,
    blocks: usize,
}

thread_local! {
    static LOCAL_SPARE: std::cell::RefCell<Vec<Buffers>> = const { std::cell::RefCell::new(Vec::new()) };
}

static SPARE: Spares<Buffers> = Spares::new(&LOCAL_SPARE);

impl Kept for Buffers {
    type Shape = BuffersShape;
    fn shape(&self) -> &BuffersShape {
        &self.shape
    }
    fn bytes(&self) -> usize {
        let f32s = |v: &[&[f32]]| v.iter().map(|x| x.len()).sum::<usize>();
        let u32s = |v: &[&[u32]]| v.iter().map(|x| x.len()).sum::<usize>();
        let sc = &self.sc;
        let scratch = f32s(&[
            &sc.q, &sc.dout, &sc.lse, &sc.delta, &sc.stage, &sc.p, &sc.ds, &sc.cap,
        ]) + u32s(&[
            &sc.qp,
            &sc.dop,
            &sc.qi,
            &sc.doi,
            &sc.p_rows,
            &sc.ds_rows,
            &sc.ds_keys,
            &sc.p_keys,
            &sc.ds_t,
        ]);
        let blocks: usize = (self.blocks.iter())
            .map(|b| {
                f32s(&[&b.kt, &b.vt, &b.krows, &b.acc_k, &b.acc_v]) + u32s(&[&b.kp, &b.vp, &b.ki])
            })
            .sum();
        4 * (scratch + blocks) + sc.rows.len() * std::mem::size_of::<RowInfo>()
    }
}

impl Buffers {
    /// A worker's buffers for `p`, kept from an earlier call where there are some of the same
    /// shape. Every buffer is rewritten before it is read, by each item, as when the buffers
    /// serve a call's items in turn; the padding past the head dims, which nothing writes,
    /// stays zero, since the shape fixes the head dims.
    fn lend(p: &Problem, bf16: bool, amx: bool, blocks: usize, exec: Exec) -> Lent<Buffers> {
        let shape = BuffersShape {
            head_dim: p.head_dim,
            head_dim_v: p.head_dim_v,
            v_f32: p.v.dtype == DType::F32,
            bf16,
            amx,
            blocks,
        };
        SPARE.lend(&shape, exec, || Buffers {
            shape,
            sc: Scratch::new(p, bf16, amx),
            blocks: (0..blocks).map(|_| KeyBlock::new(p, bf16)).collect(),
        })
    }
}

impl KernelFn for KeyChunk<'_> {
    type Output = ();
    #[inline(always)]
    fn call<
        M: MulAdd,
        const C: usize,
        const BF16: bool,
        const BF16_TILES: bool,
        const AMX: bool,
    >(
        self,
    ) {
        let KeyChunk {
            bp,
            bf16,
            delta,
            group: group_len,
            head: plan,
            chunk,
            part,
            sc: Buffers { sc, blocks, .. },
        } = self;
        let p = &bp.fwd;
        let dp = sc.dp;
        let (head, rows_per_head, seqlen_kv) =
            (plan.rows, plan.rows.nrows, plan.rows.seq.seqlen_kv);
        part.fill(0.0);
        let first = chunk * plan.blocks_per_chunk;
        let last = (first + plan.blocks_per_chunk).min(plan.key_blocks);
        for group in (first..last).step_by(group_len) {
            let n = group_len.min(last - group);
            for (g, kb) in blocks[..n].iter_mut().enumerate() {
                let j0 = (group + g) * BK;
                let keys = (j0, (seqlen_kv - j0).min(BK));
                load_keys::<C>(p, &head, keys, kb, &mut sc.stage, bf16);
            }
            let keys = (group * BK, ((group + n) * BK).min(seqlen_kv));
            for row0 in (0..rows_per_head).step_by(BQ) {
                let t = TileRows {
                    row0,
                    nrows: BQ.min(rows_per_head - row0),
                    ..head
                };
                let (lo, hi) = rows_band(p, &t);
                if lo >= hi || hi <= keys.0 || lo >= keys.1 {
                    continue; // no row of this block sees these keys
                }
                load_rows(bp, delta, &t, sc, bf16);
                prefetch_rows(bp, &t, rows_per_head);
                for kb in &mut blocks[..n] {
                    if hi > kb.j0 && lo < kb.j0 + kb.nk {
                        tile::<M, C>(p, &t, kb, sc, &mut part[row0 * dp..], (bf16, AMX));
                    }
                }
            }
            for kb in &mut blocks[..n] {
                store_key_grads(bp, &head, kb);
            }
        }
    }
}

/// Writes dK·scale and dV of one key block; its item alone owns those rows.
fn store_key_grads(bp: &BackwardProblem, head: &TileRows, kb: &mut KeyBlock) {
    let p = &bp.fwd;
    let (dp, dvp) = (round_up(p.head_dim, 16), round_up(p.head_dim_v, 16));
    for jj in 0..kb.nk {
        let dk = &mut kb.acc_k[jj * dp..][..p.head_dim];
        dk.iter_mut().for_each(|x| *x *= p.scale);
        let key = kb.j0 + jj;
        // SAFETY: key < seqlen_kv, within the validated dk and dv views.
        unsafe {
            store_row_f32(bp.dk.dtype, dk, bp.dk.at([head.batch, key, head.hkv, 0]));
            store_row_f32(
                bp.dv.dtype,
                &kb.acc_v[jj * dvp..][..p.head_dim_v],
                bp.dv.at([head.batch, key, head.hkv, 0]),
            );
        }
    }
}

/// `delta[i] = rowsum(dO_i ∘ O_i)` of every query row, stored [batch][head][row] with each
/// sequence's rows (`seqlen_q` of them, or its own length in a packed batch) after the previous
/// sequence's.
struct Deltas {
    values: Vec<f32>,
    /// `starts[b]`: where sequence `b`'s values begin; its rows are `seqlens[b]`.
    starts: Vec<usize>,
    seqlens: Vec<usize>,
}

impl Deltas {
    #[inline(always)]
    fn get(&self, b: usize, head: usize, i: usize) -> f32 {
        self.values[self.starts[b] + head * self.seqlens[b] + i]
    }
}

/// Step 1 for one (batch, query head): `delta[i] = Σ_e dO[b, i, h, e] · O[b, i, h, e]`, in the
/// kernel family's vectors.
struct RowDeltas<'a> {
    bp: &'a BackwardProblem,
    b: usize,
    h: usize,
    delta: &'a mut [f32],
    rows: &'a mut (Vec<f32>, Vec<f32>),
}

impl KernelFn for RowDeltas<'_> {
    type Output = ();
    #[inline(always)]
    fn call<
        M: MulAdd,
        const C: usize,
        const BF16: bool,
        const BF16_TILES: bool,
        const AMX: bool,
    >(
        self,
    ) {
        let RowDeltas {
            bp,
            b,
            h,
            delta,
            rows: (o, g),
        } = self;
        let p = &bp.fwd;
        for (i, d) in delta.iter_mut().enumerate() {
            // SAFETY: within the validated out and dout views.
            unsafe {
                load_row_f32(p.out.dtype, p.out.at([b, i, h, 0]), o);
                load_row_f32(bp.dout.dtype, bp.dout.at([b, i, h, 0]), g);
            }
            *d = dot::<M>(o, g);
        }
    }
}

fn row_deltas(bp: &BackwardProblem, isa: Isa, exec: Exec) -> Result<Deltas> {
    let p = &bp.fwd;
    let seqlens: Vec<usize> = (0..p.batch).map(|b| p.seq(b).seqlen_q).collect();
    // One slice per (batch, query head).
    let mut bounds = vec![0usize];
    let mut starts = Vec::with_capacity(p.batch);
    for &n in &seqlens {
        starts.push(*bounds.last().unwrap_or(&0));
        for _ in 0..p.heads_q {
            bounds.push(bounds.last().unwrap_or(&0) + n);
        }
    }
    let total = *bounds.last().unwrap_or(&0);
    let mut values = Vec::new();
    values.try_reserve_exact(total)?;
    values.resize(total, 0f32);
    let dv = p.head_dim_v;
    for_each_slice_mut(
        exec,
        &mut values,
        &bounds,
        || (vec![0f32; dv], vec![0f32; dv]),
        |rows, bh, delta| {
            let (b, h) = (bh / p.heads_q, bh % p.heads_q);
            run_with(
                isa,
                RowDeltas {
                    bp,
                    b,
                    h,
                    delta,
                    rows,
                },
            )
        },
    );
    Ok(Deltas {
        values,
        starts,
        seqlens,
    })
}

pub(super) fn backward(
    bp: &BackwardProblem,
    isa: Isa,
    exec: Exec,
    workspace: &Workspace,
) -> Result<()> {
    let p = &bp.fwd;
    let delta = row_deltas(bp, isa, exec)?;
    let dp = round_up(p.head_dim, 16);
    let bf16 = uses_bf16(bp, isa.bf16_backward());
    let amx = bf16 && isa == Isa::AmxBf16;
    let plan = plan(p, dp, bf16)?;
    let mut partial = workspace.take(plan.total)?;
    let bounds: Vec<usize> = std::iter::once(0)
        .chain(plan.items.iter().map(|&(h, c)| {
            let head = &plan.heads[h];
            plan.part_offsets[head.first + c] + head.part_len
        }))
        .collect();
    for_each_slice_mut(
        exec,
        &mut partial,
        &bounds,
        || Buffers::lend(p, bf16, amx, plan.group, exec),
        |sc, item, part| {
            let (h, chunk) = plan.items[item];
            let chunk = KeyChunk {
                bp,
                bf16,
                delta: &delta,
                group: plan.group,
                head: &plan.heads[h],
                chunk,
                part,
                sc,
            };
            run_with(isa, chunk);
        },
    );
    // Step 3, one item per (batch, KV head): dQ = scale · Σ over chunks in chunk order (zero
    // for a sequence without keys).
    let parts = &partial;
    for_each(
        exec,
        plan.heads.len(),
        || vec![0f32; p.head_dim],
        |row, h| {
            let head = &plan.heads[h];
            let t = head.rows;
            for r in 0..t.nrows {
                let part =
                    |c: usize| &parts[plan.part_offsets[head.first + c] + r * dp..][..p.head_dim];
                if head.chunks == 0 {
                    row.fill(0.0);
                } else {
                    row.copy_from_slice(part(0));
                }
                for c in 1..head.chunks {
                    row.iter_mut().zip(part(c)).for_each(|(a, x)| *a += x);
                }
                row.iter_mut().for_each(|x| *x *= p.scale);
                let (qpos, head) = t.position(p, r);
                // SAFETY: this item alone owns the dQ rows of this (batch, KV head).
                unsafe { store_row_f32(bp.dq.dtype, row, bp.dq.at([t.batch, qpos, head, 0])) };
            }
        },
    );
    workspace.give_back(partial);
    Ok(())
}
