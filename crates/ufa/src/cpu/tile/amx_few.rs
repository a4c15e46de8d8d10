//! Tiles of a few rows (decoding: the query heads of one KV head, a query position or a few)
//! on the AMX tile unit ([`super::super::Isa::AmxBf16`]), a step of [`KEYS`] keys at a time.
//!
//! Why a path of its own: the few-rows path in registers (`few_rows.rs`) spends about 120
//! instructions a key on 8 rows of head_dim 128 (dot products and FMAs for each row), which
//! left a batch-1 bf16 decode of 16 query heads over 2 KV heads at 41-43% of the memory's read
//! rate on a 2-core Xeon (`bench/results/cpu_decode_2026-12-05_intel_emr_2cpu.md`); the tile
//! unit does a step's products in a few dozen instructions. And not [`super::amx_rows`]: it
//! packs K transposed (pairs along the head dim, keys across), a 16 × 16 transpose for every
//! 32 head-dim values of every 16 keys, and took twice the few-rows path's time here.
//!
//! So the scores are taken transposed, `Sᵀ = K · Qᵀ`: K's rows are already the left operand's
//! (bf16 pairs along the head dim), read by the tile unit where they lie, and Qᵀ (the right
//! operand, pairs × up to 16 rows) is packed once a call. The softmax then runs down the keys
//! with one row of queries a lane, and only the probabilities are transposed (16 × 16 fp32
//! blocks, one for 16 keys) to be P, the left operand of `O += P · V`.

use super::super::amx::TILE;
use super::few_columns;
use crate::dtype::DType;
use crate::problem::Problem;
// The kernel itself is x86-64 code (AVX-512 and the tile unit); where it is not built, `fits`
// says no and the buffers it sizes are empty.
#[cfg(target_arch = "x86_64")]
use {
    super::super::amx::{emulated, gemm, Emulated, Hw, Tiles},
    super::super::avx512_bf16::{pack_interleaved, pack_probability_row},
    super::super::math::{exp, MulAdd, LANES},
    super::super::microkernel::{transpose_rows, Strided},
    super::{key_rows, round_up, Scratch, TileRows},
    std::arch::x86_64::*,
};

/// Keys a step: the scores (16 KiB of fp32 with their transpose) stay in L1.
pub(super) const KEYS: usize = 128;

/// Fewest rows a tile for this path: with fewer the few-rows path in registers was faster
/// (bf16 B1, 8 KV heads, 4k keys, head_dim 128, 2-core Xeon with AMX, interleaved: 4 rows a
/// KV head 0.65x its time, 6 rows 0.65x, 7 rows 0.95x, 8 rows 1.02-1.13x, 16 rows 2.3x).
const MIN_ROWS: usize = 8;

/// Whether problems of `p` whose tiles have at most `max_rows` rows take this path in the AMX
/// family: [`MIN_ROWS`] to a tile's,
/// bf16 throughout, head dims of whole tile pairs (32) for Q and K and of whole tiles (16)
/// beyond one for V ([`few_columns`]), no score modifier but the causal or windowed band, and
/// K rows whose pairs lie on 4-byte boundaries (read as u32 pairs).
pub(super) fn fits(p: &Problem, max_rows: usize) -> bool {
    let bf16 = [p.q.dtype, p.k.dtype, p.v.dtype]
        .iter()
        .all(|&t| t == DType::BF16);
    let k = &p.k;
    cfg!(target_arch = "x86_64")
        && (MIN_ROWS..=TILE).contains(&max_rows)
        && bf16
        && p.head_dim.is_multiple_of(2 * TILE)
        && p.head_dim_v.is_multiple_of(TILE)
        && !few_columns(p.head_dim_v)
        && p.softcap == 0.0
        && p.alibi.is_none()
        && p.mask.is_none()
        && p.dropout.is_none()
        && k.strides[3] == 1
        && p.v.strides[3] == 1
        && k.strides[..3].iter().all(|s| s.is_multiple_of(2))
        && (k.ptr as usize).is_multiple_of(4)
}

/// [`super::attend`] for the items `ts` of a job (one scratch each, made for this path), step
/// by step over `keys`, each step's items in turn: in [B, S, H, D] layouts the KV heads of a
/// key lie side by side, read within the step.
///
/// # Safety
/// Needs avx512f+avx512bf16 and the tile unit usable (or emulated); [`fits`] holds for `p` and
/// the rows of `ts`, and [`super::begin`] ran for each item on its scratch.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn attend<M: MulAdd, const C: usize>(
    p: &Problem,
    ts: &[TileRows],
    keys: (usize, usize),
    scs: &mut [Scratch],
) {
    if emulated() {
        run::<M, C, _>(&mut Emulated::default(), p, ts, keys, scs)
    } else {
        run::<M, C, _>(&mut Hw, p, ts, keys, scs)
    }
}

/// # Safety
/// As [`attend`]; `tiles` is the unit to use.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn run<M: MulAdd, const C: usize, T: Tiles>(
    tiles: &mut T,
    p: &Problem,
    ts: &[TileRows],
    keys: (usize, usize),
    scs: &mut [Scratch],
) {
    let d2 = p.head_dim / 2;
    for (t, sc) in ts.iter().zip(scs.iter_mut()) {
        // Qᵀ: pair e of row r at [e][r], rows past the tile's zero.
        let qp = sc.qp.as_ptr();
        let qt = &mut sc.amx_few.qt;
        transpose_rows::<C, u32>(|r| qp.add(r * d2), t.nrows, d2, TILE, qt, TILE);
    }
    tiles.begin();
    let mut j0 = keys.0;
    while j0 < keys.1 {
        let nk = (keys.1 - j0).min(KEYS);
        for (t, sc) in ts.iter().zip(scs.iter_mut()) {
            step::<M, C, T>(tiles, p, t, (j0, nk), sc);
        }
        j0 += nk;
    }
    tiles.end();
}

/// Keys `j0..j0+nk` (at most [`KEYS`]) for the rows of `t`.
///
/// # Safety
/// As [`attend`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn step<M: MulAdd, const C: usize, T: Tiles>(
    tiles: &mut T,
    p: &Problem,
    t: &TileRows,
    (j0, nk): (usize, usize),
    sc: &mut Scratch,
) {
    let (dv, dvp) = (p.head_dim_v, sc.dvp);
    let nkp = round_up(nk, LANES);
    let (nk2, pairs) = (nk.div_ceil(2), round_up(nk.div_ceil(2), TILE));
    scores_transposed(tiles, p, t, (j0, nk), sc);

    // The online softmax down the keys, a query row a lane (rows past the tile's are dropped
    // when P is packed).
    let st = &mut sc.amx_few.st[..nkp * TILE];
    let mut m = [f32::NEG_INFINITY; TILE];
    let mut l = [0.0f32; TILE];
    let (mut lo, mut hi) = ([0usize; TILE], [usize::MAX; TILE]);
    for r in 0..t.nrows {
        (m[r], l[r]) = (sc.m[r], sc.l_lanes[r * LANES]);
        (lo[r], hi[r]) = sc.rows[r].band;
    }
    let covered = (0..t.nrows).all(|r| lo[r] <= j0 && hi[r] >= j0 + nk);
    let mut v_rows = [std::ptr::null::<u8>(); KEYS];
    key_rows(&p.v, t, j0, &mut v_rows[..nk]);
    let scale = _mm512_set1_ps(p.scale);
    let mut top = _mm512_set1_ps(f32::NEG_INFINITY);
    for (j, row) in st.chunks_exact_mut(TILE).take(nk).enumerate() {
        if !covered {
            for i in 0..TILE {
                if j0 + j < lo[i] || j0 + j >= hi[i] {
                    row[i] = f32::NEG_INFINITY;
                }
            }
        }
        let x = _mm512_mul_ps(_mm512_loadu_ps(row.as_ptr()), scale);
        _mm512_storeu_ps(row.as_mut_ptr(), x);
        // max(x, top) is top where x is NaN: a NaN is never the maximum (as `lane_max`); it
        // reaches the output through P.
        top = _mm512_max_ps(x, top);
    }
    let top: [f32; TILE] = std::mem::transmute(top);
    let mut corr = [1.0f32; TILE];
    let mut sub = [0.0f32; TILE];
    for i in 0..TILE {
        let m_new = if top[i] > m[i] { top[i] } else { m[i] };
        if m_new != m[i] {
            // m = -inf gives exactly 0; a NaN m (never replaced) keeps the row NaN.
            corr[i] = exp::<M>(m[i] - m_new);
        }
        m[i] = m_new;
        // A row that has seen no key yet: P = 0, its state unchanged.
        sub[i] = if m_new == f32::NEG_INFINITY {
            0.0
        } else {
            m_new
        };
        l[i] *= corr[i];
    }
    for row in st.chunks_exact_mut(TILE).take(nk) {
        let row: &mut [f32; TILE] = row.try_into().unwrap();
        for i in 0..TILE {
            let e = exp::<M>(row[i] - sub[i]);
            row[i] = e;
            l[i] += e;
        }
    }
    st[nk * TILE..].fill(0.0);
    for r in 0..t.nrows {
        (sc.m[r], sc.l_lanes[r * LANES]) = (m[r], l[r]);
        if corr[r] != 1.0 {
            sc.acc[r * dvp..][..dvp]
                .iter_mut()
                .for_each(|a| *a *= corr[r]);
        }
    }

    // P = (Sᵀ)ᵀ as bf16 pairs of keys, rows past the tile's zero; V as pairs of key rows.
    let (st, pt) = (sc.amx_few.st.as_ptr(), &mut sc.amx_few.pt);
    transpose_rows::<C, f32>(|j| st.add(j * TILE), nkp, TILE, nkp, pt, KEYS);
    for r in 0..TILE {
        let dst = &mut sc.pp[r * KEYS / 2..][..KEYS / 2];
        if r < t.nrows {
            pack_probability_row(&pt[r * KEYS..][..nkp], dst, None);
        } else {
            dst.fill(0);
        }
    }
    pack_interleaved(|jj| v_rows[jj] as *const u16, nk, dv, &mut sc.vp, dvp);
    sc.vp[nk2 * dvp..pairs * dvp].fill(0);
    gemm::<T, true>(
        tiles,
        Strided::rows(&sc.pp, KEYS / 2),
        Strided::rows(&sc.vp, dvp),
        &mut sc.acc,
        dvp,
        [TILE, dvp, pairs],
        1.0,
    );
}

/// `Sᵀ = K · Qᵀ` for keys `j0..j0+nk` into the scratch's `st` (key j's scores at `[j][r]`,
/// unscaled): whole tiles of 16 keys read in place, run by run (a paged cache's pages), the
/// rest of a run copied into a tile of zeros first, so that nothing past a run is read.
///
/// # Safety
/// As [`attend`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn scores_transposed<T: Tiles>(
    tiles: &mut T,
    p: &Problem,
    t: &TileRows,
    (j0, nk): (usize, usize),
    sc: &mut Scratch,
) {
    let d2 = p.head_dim / 2;
    let ld = p.k.strides[1] / 2;
    let run = p.k.rows.run_mask();
    let few = &mut sc.amx_few;
    let qt = Strided::rows(&few.qt[..d2 * TILE], TILE);
    let mut a = j0;
    while a < j0 + nk {
        // The keys a..b lie `ld` pairs apart.
        let b = (j0 + nk).min(if run == usize::MAX {
            usize::MAX
        } else {
            (a | run) + 1
        });
        let whole = (b - a) / TILE * TILE;
        let base = p.k.at([t.batch, a, t.hkv, 0]) as *const u32;
        let out = &mut few.st[(a - j0) * TILE..];
        if whole > 0 {
            // SAFETY: keys a..a+whole lie in the validated view, `ld` pairs apart.
            let k = std::slice::from_raw_parts(base, (whole - 1) * ld + d2);
            gemm::<T, false>(
                tiles,
                Strided::rows(k, ld),
                qt,
                out,
                TILE,
                [whole, TILE, d2],
                1.0,
            );
        }
        let rest = b - a - whole;
        if rest > 0 {
            for i in 0..TILE {
                let dst = &mut few.tail[i * d2..][..d2];
                if i < rest {
                    let src = base.add((whole + i) * ld);
                    dst.copy_from_slice(std::slice::from_raw_parts(src, d2));
                } else {
                    dst.fill(0);
                }
            }
            let k = Strided::rows(&few.tail[..TILE * d2], d2);
            let out = &mut out[whole * TILE..];
            gemm::<T, false>(tiles, k, qt, out, TILE, [TILE, TILE, d2], 1.0);
        }
        a = b;
    }
}
