//! P·V of the few-rows path ([`super::few_rows`]) for grouped-query decoding with bf16 V, in
//! the bf16 dot-product instruction (`vdpbf16ps`) instead of fp32 FMAs on widened V rows.
//!
//! With three to eight query rows a KV head, decoding is bound by the arithmetic rather than
//! by the memory on a core whose dot products run at the FMAs' rate (Zen 4): a key's V row
//! was widened (two instructions a vector) and multiplied once a row and vector. Here the V
//! rows of two keys are interleaved into bf16 pairs (a load and an unpack a vector of 32
//! values), and one instruction multiplies a pair of keys for 16 columns: half the products'
//! instructions and a quarter of the widening. P is rounded to bf16 for it, as this kernel
//! family's tiles round it and FlashAttention does; sums stay fp32.
//!
//! The unpacks interleave within 128-bit lanes, so a pair vector's 16 fp32 lanes are not 16
//! consecutive columns: each 32-column chunk of an accumulator row is kept in that order
//! ([`PairOrder`]) while the keys are added, and put back by the caller once its key loop ends.

use super::few_rows::{Ahead, HeadRows};
use std::arch::x86_64::*;

/// Keys taken for a head before the next head's (a job of several KV heads reads a block of
/// keys' rows of every head: together, one stretch of memory).
const KEYS: usize = 32;

/// The column orders of an accumulator row. In pair order each 32-column chunk holds first the
/// columns of `_mm512_unpacklo_epi16`'s lanes (0-3, 8-11, 16-19, 24-27 of the chunk), then
/// those of `_mm512_unpackhi_epi16`'s (4-7, 12-15, 20-23, 28-31).
#[derive(Clone, Copy)]
pub enum PairOrder {
    /// From natural column order to pair order.
    Into,
    /// Back to natural order.
    Back,
}

/// Whether [`accumulate_heads`] serves V rows of `dv` columns: whole 32-column chunks, and
/// more than the 16 columns where one bf16 part of P misses the error bound (as
/// `tile::few_columns` says for the tiles).
pub fn serves(dv: usize) -> bool {
    dv >= 32 && dv.is_multiple_of(32)
}

/// Reorders `nrows` accumulator rows (`dv` values each, [`serves`], `ldo` apart) by `order`.
///
/// # Safety
/// Needs avx512f; `acc` addresses `nrows` rows of `ldo >= dv` values.
#[target_feature(enable = "avx512f")]
pub unsafe fn reorder(acc: *mut f32, nrows: usize, dv: usize, ldo: usize, order: PairOrder) {
    const LO: [i32; 16] = [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27];
    const HI: [i32; 16] = [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31];
    const BACK0: [i32; 16] = [0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23];
    const BACK1: [i32; 16] = [8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31];
    let (i0, i1) = match order {
        PairOrder::Into => (LO, HI),
        PairOrder::Back => (BACK0, BACK1),
    };
    let (i0, i1) = (
        _mm512_loadu_si512(i0.as_ptr() as *const _),
        _mm512_loadu_si512(i1.as_ptr() as *const _),
    );
    for r in 0..nrows {
        for c in (0..dv).step_by(32) {
            let at = acc.add(r * ldo + c);
            let (a, b) = (_mm512_loadu_ps(at), _mm512_loadu_ps(at.add(16)));
            _mm512_storeu_ps(at, _mm512_permutex2var_ps(a, i0, b));
            _mm512_storeu_ps(at.add(16), _mm512_permutex2var_ps(a, i1, b));
        }
    }
}

/// `acc_h[r·ldo..][..dv] += Σ_jj bf16(p_h[r·ld + jj]) · V_h,jj` for the `nrows` (3 to 8) rows
/// of each of a job's heads, as [`super::few_rows::accumulate_heads`] adds them, with V bf16
/// and the accumulators in pair order ([`reorder`]). Keys are taken in pairs from the first;
/// an odd last key is paired with zero. `ahead(jj)` runs before key `jj` is read.
///
/// # Safety
/// Needs avx512f, avx512bw and avx512bf16; as `few_rows::accumulate_heads` for each head, with
/// `dv` served ([`serves`]) and V bf16.
#[allow(clippy::too_many_arguments)]
pub unsafe fn accumulate_heads(
    nrows: usize,
    dv: usize,
    v: HeadRows,
    ps: &[*const f32],
    accs: &[*mut f32],
    ld: usize,
    ldo: usize,
    ahead: impl Ahead,
) {
    debug_assert!((3..=8).contains(&nrows) && serves(dv));
    let args = (dv, v, ps, accs, ld, ldo);
    match nrows {
        3 => heads_of::<3, 2>(args, &ahead),
        4 => heads_of::<4, 2>(args, &ahead),
        5 => heads_of::<5, 1>(args, &ahead),
        6 => heads_of::<6, 1>(args, &ahead),
        7 => heads_of::<7, 1>(args, &ahead),
        _ => heads_of::<8, 1>(args, &ahead),
    }
}

type Args<'a> = (
    usize,
    HeadRows<'a>,
    &'a [*const f32],
    &'a [*mut f32],
    usize,
    usize,
);

/// [`accumulate_heads`] for `NR` rows, `CW` chunks of 32 columns at a time (their `NR × 2·CW`
/// accumulators in registers across [`KEYS`] keys).
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline(never)]
unsafe fn heads_of<const NR: usize, const CW: usize>(
    (dv, v, ps, accs, ld, ldo): Args,
    ahead: &impl Ahead,
) {
    let n = v.rows.len();
    let mut j = 0;
    while j < n {
        let nk = (n - j).min(KEYS);
        // The keys' hints of a head shared out among its column steps ([`Ahead`]): `per` keys
        // a step.
        let per = nk.div_ceil(dv.div_ceil(32 * CW));
        for (h, (&p, &acc)) in ps.iter().zip(accs).enumerate() {
            let mut rows = [std::ptr::null::<u8>(); KEYS];
            for (x, row) in rows[..nk].iter_mut().enumerate() {
                *row = v.rows[j + x].add(h * v.step);
            }
            let pp = probability_pairs::<NR>(p.add(j), ld, nk);
            let mut c = 0;
            let mut hinted = 0;
            let mut hint = || {
                for x in hinted..(hinted + per).min(nk) {
                    ahead.ahead(j + x, h);
                }
                hinted += per;
            };
            while c + 32 * CW <= dv {
                hint();
                add_chunks::<NR, CW>(&rows[..nk], &pp, acc.add(c), ldo, c);
                c += 32 * CW;
            }
            while c < dv {
                hint();
                add_chunks::<NR, 1>(&rows[..nk], &pp, acc.add(c), ldo, c);
                c += 32;
            }
        }
        j += nk;
    }
}

/// The `NR` rows' probabilities of `nk <= KEYS` keys (rows `ld` apart) rounded to bf16 pairs
/// of consecutive keys, zero past `nk`.
#[inline(always)]
unsafe fn probability_pairs<const NR: usize>(
    p: *const f32,
    ld: usize,
    nk: usize,
) -> [[u32; KEYS / 2]; NR] {
    let mut pp = [[0u32; KEYS / 2]; NR];
    let (m0, m1) = (lanes(nk), lanes(nk.saturating_sub(16)));
    for (r, pp) in pp.iter_mut().enumerate() {
        let row = p.add(r * ld);
        let first = _mm512_maskz_loadu_ps(m0, row);
        let second = _mm512_maskz_loadu_ps(m1, row.add(16));
        // Rounded and paired as the family's tiles pair theirs.
        super::avx512_bf16::store_probability_pairs(first, second, pp, None, 0);
    }
    pp
}

/// The first `n` of 16 lanes (all of them from 16).
#[inline(always)]
fn lanes(n: usize) -> __mmask16 {
    if n >= 16 {
        0xffff
    } else {
        (1u16 << n) - 1
    }
}

/// Columns `c..c + 32·CW` of the `NR` rows at `acc` (pair order, rows `ldo` apart) plus the
/// products of `pp` with the keys' V rows `rows` (bf16), key pair by key pair.
#[inline(always)]
unsafe fn add_chunks<const NR: usize, const CW: usize>(
    rows: &[*const u8],
    pp: &[[u32; KEYS / 2]; NR],
    acc: *mut f32,
    ldo: usize,
    c: usize,
) {
    // lo[r][w] and hi[r][w]: chunk w's two halves (16 lanes each) of row r.
    let mut lo = [[_mm512_setzero_ps(); CW]; NR];
    let mut hi = [[_mm512_setzero_ps(); CW]; NR];
    for r in 0..NR {
        for w in 0..CW {
            lo[r][w] = _mm512_loadu_ps(acc.add(r * ldo + 32 * w));
            hi[r][w] = _mm512_loadu_ps(acc.add(r * ldo + 32 * w + 16));
        }
    }
    let nk = rows.len();
    let mut x = 0;
    while x < nk {
        // Chunk w of keys x and x + 1 (zero past the last key), interleaved into pairs.
        let mut vl = [_mm512_setzero_si512(); CW];
        let mut vh = [_mm512_setzero_si512(); CW];
        for w in 0..CW {
            let a = _mm512_loadu_si512(rows[x].add(2 * c + 64 * w) as *const _);
            let b = match x + 1 < nk {
                true => _mm512_loadu_si512(rows[x + 1].add(2 * c + 64 * w) as *const _),
                false => _mm512_setzero_si512(),
            };
            vl[w] = _mm512_unpacklo_epi16(a, b);
            vh[w] = _mm512_unpackhi_epi16(a, b);
        }
        for r in 0..NR {
            let p = bh(_mm512_set1_epi32(pp[r][x / 2] as i32));
            for w in 0..CW {
                lo[r][w] = _mm512_dpbf16_ps(lo[r][w], bh(vl[w]), p);
                hi[r][w] = _mm512_dpbf16_ps(hi[r][w], bh(vh[w]), p);
            }
        }
        x += 2;
    }
    for r in 0..NR {
        for w in 0..CW {
            _mm512_storeu_ps(acc.add(r * ldo + 32 * w), lo[r][w]);
            _mm512_storeu_ps(acc.add(r * ldo + 32 * w + 16), hi[r][w]);
        }
    }
}

/// 32 bf16 values as the dot-product instruction's operand type (the same bits).
#[inline(always)]
fn bh(x: __m512i) -> __m512bh {
    // SAFETY: both are 64 bytes of plain data.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(x) }
}
