//! bf16 products with AVX-512 BF16 dot-product instructions (`vdpbf16ps`: 32 bf16 products
//! summed pairwise into 16 fp32 lanes per instruction, twice the fp32 FMA rate).
//!
//! Operands are "pair-packed": each u32 holds two bf16 values that meet in one product pair —
//! two consecutive head-dim elements for S = Q·Kᵀ, two consecutive keys for O += P·V. Products
//! of bf16 values are exact in fp32 and sums stay fp32, so S is as exact as the fp32 path;
//! P is rounded to bf16 for P·V (as FlashAttention does on GPUs).
//!
//! Everything here runs only inside functions compiled with `avx512f,avx512bf16` (see
//! `Isa::Avx512Bf16`).

use super::microkernel::{BK, R};
use std::arch::x86_64::*;

/// Two bf16 values as one u32: `lo` in the low half (little-endian pair order).
#[inline(always)]
fn pair(lo: u16, hi: u16) -> u32 {
    lo as u32 | (hi as u32) << 16
}

/// Packs one bf16 row of `d` elements into `ceil(d/2)` pairs (odd `d`: the last pair's high
/// half is zero).
///
/// # Safety
/// `src` must address `d` readable bf16 values.
#[inline(always)]
pub unsafe fn pack_row_pairs(src: *const u16, d: usize, dst: &mut [u32]) {
    let row = std::slice::from_raw_parts(src, d);
    for (e2, out) in dst.iter_mut().enumerate().take(d.div_ceil(2)) {
        let hi = if 2 * e2 + 1 < d { row[2 * e2 + 1] } else { 0 };
        *out = pair(row[2 * e2], hi);
    }
}

/// `s[r][c] = scale · Σ_e q[r][e] k[c][e]` with `qp` rows × d2 pairs and `kp` d2 × BK pairs
/// (K transposed by pairs). `rows` is a multiple of `R`.
///
/// # Safety
/// Needs avx512f+avx512bf16; slices must hold `rows·d2`, `d2·BK` and `rows·BK` elements.
#[inline(always)]
pub unsafe fn scores(qp: &[u32], d2: usize, kp: &[u32], s: &mut [f32], rows: usize, scale: f32) {
    debug_assert!(qp.len() >= rows * d2 && kp.len() >= d2 * BK && s.len() >= rows * BK);
    const V: usize = BK / 16;
    for r0 in (0..rows).step_by(R) {
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        for e in 0..d2 {
            let kb = kp.as_ptr().add(e * BK);
            let kv: [__m512bh; V] = std::array::from_fn(|v| {
                std::mem::transmute(_mm512_loadu_si512(kb.add(16 * v) as *const _))
            });
            for (i, a) in acc.iter_mut().enumerate() {
                let q: __m512bh = std::mem::transmute(_mm512_set1_epi32(
                    *qp.get_unchecked((r0 + i) * d2 + e) as i32,
                ));
                for v in 0..V {
                    a[v] = _mm512_dpbf16_ps(a[v], q, kv[v]);
                }
            }
        }
        let sc = _mm512_set1_ps(scale);
        for (i, a) in acc.iter().enumerate() {
            for (v, x) in a.iter().enumerate() {
                _mm512_storeu_ps(
                    s.as_mut_ptr().add((r0 + i) * BK + 16 * v),
                    _mm512_mul_ps(*x, sc),
                );
            }
        }
    }
}

/// Rounds `rows × BK` probabilities to bf16 pairs of consecutive keys: `pp` is rows × BK/2.
///
/// # Safety
/// Needs avx512f+avx512bf16; `p` holds `rows·BK` and `pp` `rows·BK/2` elements.
#[inline(always)]
pub unsafe fn pack_probabilities(p: &[f32], pp: &mut [u32], rows: usize) {
    debug_assert!(p.len() >= rows * BK && pp.len() >= rows * BK / 2);
    for r in 0..rows {
        for c in (0..BK).step_by(32) {
            let lo = _mm512_loadu_ps(p.as_ptr().add(r * BK + c));
            let hi = _mm512_loadu_ps(p.as_ptr().add(r * BK + c + 16));
            // The second operand fills the low 16 bf16 values: keys c..c+16 stay in order.
            let b: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(pp.as_mut_ptr().add(r * BK / 2 + c / 2) as *mut _, b);
        }
    }
}

/// `acc[r][c] += Σ_k p[r][k] v[k][c]` over `nk2` key pairs: `pp` rows × BK/2 pairs, `vp`
/// BK/2 × dvp pairs (rows of V interleaved two by two), `acc` rows × dvp (dvp a multiple of 16).
///
/// # Safety
/// Needs avx512f+avx512bf16; slices sized as described, `nk2 <= BK/2`.
#[inline(always)]
pub unsafe fn accumulate_pv(
    pp: &[u32],
    vp: &[u32],
    dvp: usize,
    acc: &mut [f32],
    rows: usize,
    nk2: usize,
) {
    debug_assert!(pp.len() >= rows * BK / 2 && vp.len() >= nk2 * dvp && acc.len() >= rows * dvp);
    for r0 in (0..rows).step_by(R) {
        let mut c0 = 0;
        while c0 + 64 <= dvp {
            pv_block::<4>(pp, vp, dvp, acc, r0, c0, nk2);
            c0 += 64;
        }
        while c0 < dvp {
            pv_block::<1>(pp, vp, dvp, acc, r0, c0, nk2);
            c0 += 16;
        }
    }
}

#[inline(always)]
unsafe fn pv_block<const V: usize>(
    pp: &[u32],
    vp: &[u32],
    dvp: usize,
    acc: &mut [f32],
    r0: usize,
    c0: usize,
    nk2: usize,
) {
    let ap = acc.as_mut_ptr();
    let mut a: [[__m512; V]; R] = std::array::from_fn(|i| {
        std::array::from_fn(|v| _mm512_loadu_ps(ap.add((r0 + i) * dvp + c0 + 16 * v)))
    });
    for k2 in 0..nk2 {
        let vb = vp.as_ptr().add(k2 * dvp + c0);
        let vv: [__m512bh; V] = std::array::from_fn(|v| {
            std::mem::transmute(_mm512_loadu_si512(vb.add(16 * v) as *const _))
        });
        for (i, ai) in a.iter_mut().enumerate() {
            let p: __m512bh = std::mem::transmute(_mm512_set1_epi32(
                *pp.get_unchecked((r0 + i) * (BK / 2) + k2) as i32,
            ));
            for v in 0..V {
                ai[v] = _mm512_dpbf16_ps(ai[v], p, vv[v]);
            }
        }
    }
    for (i, ai) in a.iter().enumerate() {
        for (v, x) in ai.iter().enumerate() {
            _mm512_storeu_ps(ap.add((r0 + i) * dvp + c0 + 16 * v), *x);
        }
    }
}

/// Interleaves two bf16 rows of V (keys 2k2 and 2k2+1; `second` None past the last key) into
/// pairs: `dst[c] = (first[c], second[c])`.
///
/// # Safety
/// `first` (and `second`) must address `dv` readable bf16 values.
#[inline(always)]
pub unsafe fn pack_v_pairs(
    first: *const u16,
    second: Option<*const u16>,
    dv: usize,
    dst: &mut [u32],
) {
    let a = std::slice::from_raw_parts(first, dv);
    match second {
        Some(b) => {
            let b = std::slice::from_raw_parts(b, dv);
            for ((o, &x), &y) in dst.iter_mut().zip(a).zip(b) {
                *o = pair(x, y);
            }
        }
        None => {
            for (o, &x) in dst.iter_mut().zip(a) {
                *o = pair(x, 0);
            }
        }
    }
}
