//! The CPU backward pass: FlashAttention-2's recomputation (P from the saved log-sum-exp, tile
//! by tile, no attention matrix stored), arranged so that every gradient element is written by
//! exactly one work item — deterministic for any thread count, with no atomics:
//!
//! 1. `delta[i] = rowsum(dO_i ∘ O_i)`.
//! 2. One item per (batch, KV head, block of keys): loops over the query rows of its GQA group
//!    and accumulates `dV = Pᵀ dO` and `dK = dSᵀ Q·scale`.
//! 3. One item per (batch, KV head, block of query rows): loops over keys and accumulates
//!    `dQ = dS K·scale`.
//!
//! with `P = exp(S − lse)`, `dP = dO Vᵀ`, `dS = P ∘ (dP − delta) ∘ softcap'`.
//! Step 3 recomputes S and dP, trading two extra products for determinism.

use super::isa::{run_with, Isa, KernelFn};
use super::math::{exp, MulAdd};
use super::microkernel::{accumulate_pv, scores, BK, R};
use super::parallel::{for_each, for_each_chunk_mut, Exec};
use super::tile::{apply_score_mods, round_up, row_f32, set_column, widen, RowInfo, TileRows};
use crate::dtype::{load_row_f32, store_row_f32};
use crate::error::Result;
use crate::problem::{BackwardProblem, Problem};

/// Query rows per block; at most BK, because Pᵀ and dSᵀ use BK as their row stride.
const BQ: usize = BK;

struct Scratch {
    /// Query rows × dp: Q·scale, zero-padded to dp columns.
    q: Vec<f32>,
    /// Query rows × dvp: dO.
    dout: Vec<f32>,
    lse: Vec<f32>,
    delta: Vec<f32>,
    rows: Vec<RowInfo>,
    /// dp × BK: K transposed; dvp × BK: V transposed; BK × dp: K rows.
    kt: Vec<f32>,
    vt: Vec<f32>,
    krows: Vec<f32>,
    row: Vec<f32>,
    /// Rows × BK: S then P; dP then dS; the softcap's slope.
    p: Vec<f32>,
    ds: Vec<f32>,
    cap: Vec<f32>,
    /// BK × BK transposes of P and dS (keys × rows).
    pt: Vec<f32>,
    dst: Vec<f32>,
    /// Gradient accumulators: dK (BK × dp), dV (BK × dvp), dQ (rows × dp).
    acc_k: Vec<f32>,
    acc_v: Vec<f32>,
    acc_q: Vec<f32>,
    dp: usize,
    dvp: usize,
}

impl Scratch {
    fn new(p: &Problem) -> Scratch {
        let (dp, dvp) = (round_up(p.head_dim, 16), round_up(p.head_dim_v, 16));
        Scratch {
            q: vec![0.0; BQ * dp],
            dout: vec![0.0; BQ * dvp],
            lse: vec![0.0; BQ],
            delta: vec![0.0; BQ],
            rows: vec![RowInfo::default(); BQ],
            kt: vec![0.0; dp * BK],
            vt: vec![0.0; dvp * BK],
            krows: vec![0.0; BK * dp],
            row: vec![0.0; dp.max(dvp)],
            p: vec![0.0; BQ * BK],
            ds: vec![0.0; BQ * BK],
            cap: vec![1.0; BQ * BK],
            pt: vec![0.0; BK * BK],
            dst: vec![0.0; BK * BK],
            acc_k: vec![0.0; BK * dp],
            acc_v: vec![0.0; BK * dvp],
            acc_q: vec![0.0; BQ * dp],
            dp,
            dvp,
        }
    }
}

/// Loads rows `t` (Q·scale, dO, lse, delta and bookkeeping); returns the union of their bands.
#[inline(always)]
fn load_rows(
    bp: &BackwardProblem,
    delta: &[f32],
    t: &TileRows,
    sc: &mut Scratch,
) -> (usize, usize) {
    let p = &bp.fwd;
    let (d, dv) = (p.head_dim, p.head_dim_v);
    let lse = p
        .lse
        .as_ref()
        .expect("validated backward problems carry the lse");
    let mut keys = (0, 0);
    sc.q.fill(0.0);
    sc.dout.fill(0.0);
    for r in 0..t.nrows {
        let info = t.row(p, r);
        let (qpos, head) = (info.qpos, info.head);
        sc.rows[r] = info;
        keys = widen(keys, info.band);
        let q = &mut sc.q[r * sc.dp..][..d];
        // SAFETY: indices are within the validated views.
        unsafe {
            load_row_f32(p.q.dtype, p.q.at([t.batch, qpos, head, 0]), q);
            load_row_f32(
                bp.dout.dtype,
                bp.dout.at([t.batch, qpos, head, 0]),
                &mut sc.dout[r * sc.dvp..][..dv],
            );
            sc.lse[r] = *(lse.at([t.batch, head, qpos, 0]) as *const f32);
        }
        q.iter_mut().for_each(|x| *x *= p.scale);
        sc.delta[r] = delta[(t.batch * p.heads_q + head) * p.seqlen_q + qpos];
    }
    keys
}

/// Packs keys `j0..j0+nk` of K (transposed and as rows) and V (transposed), zero-padded.
#[inline(always)]
fn load_keys(p: &Problem, t: &TileRows, j0: usize, nk: usize, sc: &mut Scratch, with_rows: bool) {
    let (d, dv, dp) = (p.head_dim, p.head_dim_v, sc.dp);
    sc.kt.fill(0.0);
    sc.vt.fill(0.0);
    if with_rows {
        sc.krows.fill(0.0);
    }
    for jj in 0..nk {
        // SAFETY: key j0+jj < seqlen_kv, within the validated views.
        let row = unsafe {
            row_f32(
                p.k.dtype,
                p.k.at([t.batch, j0 + jj, t.hkv, 0]),
                &mut sc.row[..d],
            )
        };
        set_column(&mut sc.kt, jj, row);
        if with_rows {
            sc.krows[jj * dp..][..d].copy_from_slice(row);
        }
        // SAFETY: as above.
        let row = unsafe {
            row_f32(
                p.v.dtype,
                p.v.at([t.batch, j0 + jj, t.hkv, 0]),
                &mut sc.row[..dv],
            )
        };
        set_column(&mut sc.vt, jj, row);
    }
}

/// For the loaded rows and keys: P in `sc.p` and dS in `sc.ds` (zero for padding and for keys
/// a row does not see).
#[inline(always)]
fn probabilities_and_ds<M: MulAdd, const C: usize>(
    p: &Problem,
    t: &TileRows,
    j0: usize,
    nk: usize,
    sc: &mut Scratch,
) {
    let rows = round_up(t.nrows, R);
    scores::<M, C>(&sc.q, sc.dp, &sc.kt, &mut sc.p, rows);
    scores::<M, C>(&sc.dout, sc.dvp, &sc.vt, &mut sc.ds, rows);
    for r in 0..rows {
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
        for c in 0..BK {
            s[c] = exp::<M>(s[c] - lse);
            let soft = if p.softcap > 0.0 { cap[c] } else { 1.0 };
            ds[c] = s[c] * (ds[c] - delta) * soft;
        }
    }
}

/// Step 2: dK and dV of one block of keys.
struct KeyBlock<'a> {
    bp: &'a BackwardProblem,
    delta: &'a [f32],
    batch: usize,
    hkv: usize,
    j0: usize,
    sc: &'a mut Scratch,
}

impl KernelFn for KeyBlock<'_> {
    type Output = ();
    #[inline(always)]
    fn call<M: MulAdd, const C: usize, const BF16: bool>(self) {
        let KeyBlock {
            bp,
            delta,
            batch,
            hkv,
            j0,
            sc,
        } = self;
        let p = &bp.fwd;
        let nk = (p.seqlen_kv - j0).min(BK);
        let (dp, dvp) = (sc.dp, sc.dvp);
        sc.acc_k.fill(0.0);
        sc.acc_v.fill(0.0);
        let probe = TileRows {
            batch,
            hkv,
            row0: 0,
            nrows: 0,
        };
        load_keys(p, &probe, j0, nk, sc, false);
        let rows_per_head = p.seqlen_q * p.group_size();
        for row0 in (0..rows_per_head).step_by(BQ) {
            let t = TileRows {
                batch,
                hkv,
                row0,
                nrows: BQ.min(rows_per_head - row0),
            };
            let (lo, hi) = load_rows(bp, delta, &t, sc);
            if lo >= hi || hi <= j0 || lo >= j0 + nk {
                continue; // no row of this block sees these keys
            }
            probabilities_and_ds::<M, C>(p, &t, j0, nk, sc);
            for r in 0..t.nrows {
                for c in 0..BK {
                    sc.pt[c * BK + r] = sc.p[r * BK + c];
                    sc.dst[c * BK + r] = sc.ds[r * BK + c];
                }
            }
            // dV += Pᵀ dO; dK += dSᵀ (Q·scale)
            accumulate_pv::<M, C>(&sc.pt, &sc.dout, dvp, &mut sc.acc_v, BK, t.nrows);
            accumulate_pv::<M, C>(&sc.dst, &sc.q, dp, &mut sc.acc_k, BK, t.nrows);
        }
        for jj in 0..nk {
            // SAFETY: this item alone owns rows j0..j0+nk of dK and dV for this head.
            unsafe {
                store_row_f32(
                    bp.dk.dtype,
                    &sc.acc_k[jj * dp..][..p.head_dim],
                    bp.dk.at([batch, j0 + jj, hkv, 0]),
                );
                store_row_f32(
                    bp.dv.dtype,
                    &sc.acc_v[jj * dvp..][..p.head_dim_v],
                    bp.dv.at([batch, j0 + jj, hkv, 0]),
                );
            }
        }
    }
}

/// Step 3: dQ of one block of query rows.
struct QueryBlock<'a> {
    bp: &'a BackwardProblem,
    delta: &'a [f32],
    t: TileRows,
    sc: &'a mut Scratch,
}

impl KernelFn for QueryBlock<'_> {
    type Output = ();
    #[inline(always)]
    fn call<M: MulAdd, const C: usize, const BF16: bool>(self) {
        let QueryBlock { bp, delta, t, sc } = self;
        let p = &bp.fwd;
        let dp = sc.dp;
        let rows = round_up(t.nrows, R);
        sc.acc_q.fill(0.0);
        let (lo, hi) = load_rows(bp, delta, &t, sc);
        let mut j0 = lo;
        while j0 < hi {
            let nk = (hi - j0).min(BK);
            load_keys(p, &t, j0, nk, sc, true);
            probabilities_and_ds::<M, C>(p, &t, j0, nk, sc);
            // dQ += dS K (scale applied at the end)
            accumulate_pv::<M, C>(&sc.ds, &sc.krows, dp, &mut sc.acc_q, rows, nk);
            j0 += nk;
        }
        for r in 0..t.nrows {
            let row = &mut sc.acc_q[r * dp..][..p.head_dim];
            row.iter_mut().for_each(|x| *x *= p.scale);
            // SAFETY: this item alone owns these rows of dQ.
            unsafe {
                store_row_f32(
                    bp.dq.dtype,
                    row,
                    bp.dq.at([t.batch, sc.rows[r].qpos, sc.rows[r].head, 0]),
                )
            };
        }
    }
}

/// `delta[b, h, i] = Σ_e dO[b, i, h, e] · O[b, i, h, e]`.
fn row_deltas(bp: &BackwardProblem, exec: Exec) -> Result<Vec<f32>> {
    let p = &bp.fwd;
    let n = p.batch * p.heads_q * p.seqlen_q;
    let mut delta = Vec::new();
    delta.try_reserve_exact(n)?;
    delta.resize(n, 0f32);
    let dv = p.head_dim_v;
    for_each_chunk_mut(
        exec,
        &mut delta,
        p.seqlen_q,
        || (vec![0f32; dv], vec![0f32; dv]),
        |(o, g), bh, chunk| {
            let (b, h) = (bh / p.heads_q, bh % p.heads_q);
            for (i, d) in chunk.iter_mut().enumerate() {
                // SAFETY: within the validated out and dout views.
                unsafe {
                    load_row_f32(p.out.dtype, p.out.at([b, i, h, 0]), o);
                    load_row_f32(bp.dout.dtype, bp.dout.at([b, i, h, 0]), g);
                }
                *d = o.iter().zip(g.iter()).map(|(a, b)| a * b).sum();
            }
        },
    );
    Ok(delta)
}

pub(super) fn backward(bp: &BackwardProblem, isa: Isa, exec: Exec) -> Result<()> {
    let p = &bp.fwd;
    let delta = row_deltas(bp, exec)?;
    let key_blocks = p.seqlen_kv.div_ceil(BK);
    for_each(
        exec,
        p.batch * p.heads_kv * key_blocks,
        || Scratch::new(p),
        |sc, item| {
            let (bh, kb) = (item / key_blocks, item % key_blocks);
            let (batch, hkv) = (bh / p.heads_kv, bh % p.heads_kv);
            run_with(
                isa,
                KeyBlock {
                    bp,
                    delta: &delta,
                    batch,
                    hkv,
                    j0: kb * BK,
                    sc,
                },
            );
        },
    );
    let rows_per_head = p.seqlen_q * p.group_size();
    let row_blocks = rows_per_head.div_ceil(BQ);
    for_each(
        exec,
        p.batch * p.heads_kv * row_blocks,
        || Scratch::new(p),
        |sc, item| {
            let (bh, rb) = (item / row_blocks, item % row_blocks);
            let row0 = rb * BQ;
            let t = TileRows {
                batch: bh / p.heads_kv,
                hkv: bh % p.heads_kv,
                row0,
                nrows: BQ.min(rows_per_head - row0),
            };
            run_with(
                isa,
                QueryBlock {
                    bp,
                    delta: &delta,
                    t,
                    sc,
                },
            );
        },
    );
    Ok(())
}
