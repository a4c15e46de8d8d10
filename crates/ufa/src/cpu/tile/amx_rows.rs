//! The forward's bf16 tiles on the AMX tile unit ([`super::super::Isa::AmxBf16`]): key tiles
//! of [`KB`] keys, each taken a chunk of [`CHUNK`] rows at a time.
//!
//! Why not the other families' loop (tiles of 64 keys, each step over all of a work item's
//! rows): on one core of a Sapphire-Rapids-class Xeon (2026-12-06, `perf`, bf16 W3), the tile
//! unit's work (products, tile loads and stores) was a third of the time and the rest went to
//! the softmax's fixed costs per row and tile (four vectors a row), and to reading each
//! step's output back from L2 (256 rows: 64 KiB of scores, 32 KiB of probabilities). A tile
//! store costs ~10 ns and a load ~5 against ~6.5 for a product (measured there), so the
//! accumulator tiles that P·V loads and stores once a key tile cost a third of its products
//! at 64 keys.
//!
//! So here a key tile's K and V are packed once (for the work item, or kept by the thread for
//! its next items of the same KV head: `Scratch::amx_kv`); then each chunk takes its
//! scores, their softmax (fused with the packing, `exp_pack_probability_row`, where nothing
//! modifies the scores; else the other families' per-row code, [`softmax_row`]), its
//! probabilities as bf16 pairs and its P·V product in turn, its scores (64 KiB) and
//! probabilities (32 KiB) read back from L2. A chunk skips the key tiles that none of its
//! rows sees (causal and windowed attention): such a tile changes no row's state; and of a
//! tile it sees, it computes only the keys from the first whole tile of pairs its rows see.
//! The tiles are configured once for the item ([`Tiles::begin`]), not once a product.

use super::super::amx::{emulated, gemm, Emulated, Hw, Tiles};
use super::super::avx512_bf16::{
    exp_pack_probability_row, pack_interleaved, pack_probability_row, pack_transposed_pairs,
};
use super::super::math::{MulAdd, LANES};
use super::super::microkernel::Strided;
use super::{
    chunk_keys, few_columns, lane_max_of, round_up, softmax_row, update_max, Scratch, TileRows,
    AMX_CHUNK, AMX_KEYS, AMX_LD, AMX_PAD, R,
};
use crate::problem::Problem;

/// Rows of a chunk.
const CHUNK: usize = AMX_CHUNK;
/// Keys of a key tile.
const KB: usize = AMX_KEYS;
/// Row stride of packed K pairs and of a chunk's scores (see [`AMX_LD`]).
const LD: usize = AMX_LD;
/// Key pairs of a tile of the tile unit.
const TILE_PAIRS: usize = super::super::amx::TILE;

/// [`super::attend`] on the bf16 path under AMX, on the tile unit or, where
/// `UFA_AMX_EMULATE=1`, its emulation.
///
/// # Safety
/// Needs avx512f+avx512bf16 and the tile unit usable (the AMX family is taken only there, or
/// emulated); bf16 K and V, and [`super::begin`] run for `t` on `sc`.
#[inline(always)]
pub(super) unsafe fn attend<M: MulAdd, const C: usize>(
    p: &Problem,
    t: &TileRows,
    keys: (usize, usize),
    sc: &mut Scratch,
) {
    if emulated() {
        run::<M, C, _>(&mut Emulated::default(), p, t, keys, sc)
    } else {
        run::<M, C, _>(&mut Hw, p, t, keys, sc)
    }
}

/// # Safety
/// As [`attend`]; `tiles` is the unit to use.
#[inline(always)]
unsafe fn run<M: MulAdd, const C: usize, T: Tiles>(
    tiles: &mut T,
    p: &Problem,
    t: &TileRows,
    keys: (usize, usize),
    sc: &mut Scratch,
) {
    let (d, dvp) = (p.head_dim, sc.dvp);
    let d2 = d.div_ceil(2);
    let rows = round_up(t.nrows, R);
    // Split probabilities: a row's parts lie KB/2 pairs apart, V's pairs come twice.
    let split = few_columns(p.head_dim_v);
    let ld_p = if split { KB } else { KB / 2 } + AMX_PAD;
    let k_len = d2 * LD;
    // Problems whose scores need no modification (their bands are masked below): every row
    // takes the softmax of `exp_pack_probability_row`.
    let plain = !p.modifies_scores() && p.dropout.is_none() && p.scale > 0.0 && p.scale.is_finite();
    tiles.begin();
    let mut j0 = keys.0;
    while j0 < keys.1 {
        let nk = (keys.1 - j0).min(KB);
        // K and V packed into the thread's cache (kept for its next items of this head), or
        // into the item's own buffers; either way once, for the first chunk that sees them.
        let slot = sc.amx_kv.slot(j0);
        let mut packed = false;
        for r0 in (0..rows).step_by(CHUNK) {
            let r1 = (r0 + CHUNK).min(rows);
            let seen = chunk_keys(t, sc, (r0, r1), keys);
            if seen.0 >= seen.1 || seen.1 <= j0 || seen.0 >= j0 + nk {
                continue;
            }
            if !packed {
                match slot {
                    Some(slot) => {
                        if let Some(kv) = sc.amx_kv.stale(slot, (t.batch, t.hkv, nk)) {
                            let (kp, vp) = kv.split_at_mut(k_len);
                            pack_tile(p, t, (j0, nk), split, kp, vp, dvp);
                        }
                    }
                    None => pack_tile(p, t, (j0, nk), split, &mut sc.kp, &mut sc.vp, dvp),
                }
                packed = true;
            }
            let (kp, vp): (&[u32], &[u32]) = match slot {
                Some(slot) => sc.amx_kv.get(slot).split_at(k_len),
                None => (&sc.kp, &sc.vp),
            };
            // The chunk's keys of this tile: from the first whole tile of pairs any of its rows
            // sees to the last key one sees. A causal or windowed band's edge tile then costs
            // what its rows see, not the whole tile (at 256 keys, causal cost as much as not).
            let off = (seen.0.max(j0) - j0) / (2 * TILE_PAIRS) * (2 * TILE_PAIRS);
            let (jc, nkc) = (j0 + off, seen.1.min(j0 + nk) - j0 - off);
            // Score columns computed: those keys rounded up to whole vectors. Key pairs of
            // P·V: whole tiles of pairs, the padding's probabilities and values zero, so that
            // a short last tile takes the tile unit too (K's columns and V's pairs past the
            // tile's keys are packed as zeros up to the same roundings).
            let nkp = round_up(nkc, LANES);
            let pairs = round_up(nkc.div_ceil(2), TILE_PAIRS);
            let (kp, vp) = (&kp[off..], &vp[off / 2 * dvp..]);
            let n = r1 - r0;
            // Unscaled: `gemm` would scale each block's sums right after storing them, and
            // vector loads of what tile stores just wrote wait ~20 ns a tile (measured on the
            // Xeon above); each row is scaled below instead, the same product rounded alike.
            gemm::<T, false>(
                tiles,
                Strided::rows(&sc.qp[r0 * d2..], d2),
                Strided::rows(kp, LD),
                &mut sc.s,
                LD,
                [n, nkp, d2],
                1.0,
            );
            // Plain rows: the keys outside each row's band masked here, and every row's new
            // maximum (and its output rescaled) before any row's exponentials. The scale goes
            // into the exponentials' argument (the maxima of scores scaled by a positive
            // factor are the maxima scaled). A row's maximum is a chain of dependent scalar
            // steps (the lanes' reduction, the rescaling factor's exponential): taken row
            // after row apart from the exponentials, the rows' chains overlap; between them
            // they were a sixth of a 128-key call's samples.
            let mut maxima = [None; CHUNK];
            if plain {
                for r in r0..r1.min(t.nrows) {
                    let s = &mut sc.s[(r - r0) * LD..][..nkp];
                    mask_outside(sc.rows[r].band, jc, nkc, s);
                    let lanes = lane_max_of::<M, C>(s).map(|x| x * p.scale);
                    let acc = &mut sc.acc[r * dvp..][..dvp];
                    maxima[r - r0] = update_max::<M>(lanes, s, &mut sc.m[r], acc);
                }
            }
            for r in r0..r1 {
                let i = r - r0;
                let s = &mut sc.s[i * LD..][..nkp];
                // Split, the parts zero up to KB/2 pairs, where V's pairs are zero too.
                let pp = &mut sc.pp[i * ld_p..][..ld_p];
                let (hi, lo) = pp.split_at_mut(if split { KB / 2 } else { pairs });
                let lo = split.then_some(lo);
                let l: &mut [f32; LANES] =
                    (&mut sc.l_lanes[r * LANES..][..LANES]).try_into().unwrap();
                if r < t.nrows && !plain {
                    let acc = &mut sc.acc[r * dvp..][..dvp];
                    s.iter_mut().for_each(|x| *x *= p.scale);
                    let (row, m) = (&sc.rows[r], &mut sc.m[r]);
                    softmax_row::<M, C>(p, t, row, (jc, nkc), s, (m, l, acc));
                } else if let Some((m, corr)) = maxima[i] {
                    // The probabilities packed as they are formed.
                    *l = exp_pack_probability_row::<M>(s, p.scale, m, l, corr, hi, lo);
                    continue;
                } else {
                    // Padding, or a row that has seen no key yet: P = 0.
                    s.fill(0.0);
                }
                pack_probability_row(s, hi, lo);
            }
            gemm::<T, true>(
                tiles,
                Strided::rows(&sc.pp, ld_p),
                Strided::rows(vp, dvp),
                &mut sc.acc[r0 * dvp..],
                dvp,
                [n, dvp, if split { KB / 2 + pairs } else { pairs }],
                1.0,
            );
        }
        j0 += nk;
    }
    tiles.end();
}

/// Scores `s` of keys `j0..j0+nk` (then padding to whole vectors) set to −∞ outside `band`
/// and past the keys, as [`super::apply_score_mods`] masks them: exactly zero probabilities.
#[inline(always)]
fn mask_outside(band: (usize, usize), j0: usize, nk: usize, s: &mut [f32]) {
    let lo = band.0.saturating_sub(j0).min(nk);
    let hi = band.1.saturating_sub(j0).clamp(lo, nk);
    s[..lo].fill(f32::NEG_INFINITY);
    s[hi..].fill(f32::NEG_INFINITY);
}

/// Packs keys `j0..j0+nk` of K (transposed pairs, `kp`, [`LD`] a row) and V (interleaved
/// pairs, `vp`, `dvp` a row) for [`run`]: V's pairs past the keys zero up to the tile's whole
/// tiles of pairs (or [`KB`]/2 where `split`, then copied once more for the second part).
///
/// # Safety
/// Needs avx512f+avx512bf16; bf16 K and V.
#[inline(always)]
unsafe fn pack_tile(
    p: &Problem,
    t: &TileRows,
    (j0, nk): (usize, usize),
    split: bool,
    kp: &mut [u32],
    vp: &mut [u32],
    dvp: usize,
) {
    let k_row = |jj: usize| p.k.at([t.batch, j0 + jj, t.hkv, 0]) as *const u16;
    pack_transposed_pairs(k_row, nk, p.head_dim, round_up(nk, LANES), kp, LD);
    let v_row = |jj: usize| p.v.at([t.batch, j0 + jj, t.hkv, 0]) as *const u16;
    pack_interleaved(v_row, nk, p.head_dim_v, vp, dvp);
    let zero_to = if split {
        KB / 2
    } else {
        round_up(nk.div_ceil(2), TILE_PAIRS)
    };
    vp[nk.div_ceil(2) * dvp..zero_to * dvp].fill(0);
    if split {
        vp.copy_within(..KB / 2 * dvp, KB / 2 * dvp);
    }
}
