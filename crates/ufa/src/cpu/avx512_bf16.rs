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

use super::math::{exp, MulAdd, LANES};
use super::microkernel::{product_fits, transpose_rows, Strided, BK, R};
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
    assert!(dst.len() >= d.div_ceil(2));
    // Little-endian pairs of consecutive elements are the row's own bytes, 16 pairs at a time.
    let mut e2 = 0;
    while 2 * (e2 + 16) <= d {
        let x = _mm512_loadu_si512(src.add(2 * e2) as *const _);
        _mm512_storeu_si512(dst.as_mut_ptr().add(e2) as *mut _, x);
        e2 += 16;
    }
    let row = std::slice::from_raw_parts(src, d);
    for (e2, out) in dst.iter_mut().enumerate().take(d.div_ceil(2)).skip(e2) {
        let hi = if 2 * e2 + 1 < d { row[2 * e2 + 1] } else { 0 };
        *out = pair(row[2 * e2], hi);
    }
}

/// The bf16 twin of [`super::microkernel::gemm`] over pair-packed operands: `a` (i, k2) and
/// `b` rows `k2` hold the pairs of reduction indices 2·k2 and 2·k2+1, so `kn2` counts pairs.
/// `out[i][c] = scale · Σ a·b`, or with `ACC` `out[i][c] += Σ a·b`; `m` is a multiple of `R`,
/// `n` of 16.
///
/// # Safety
/// Needs avx512f+avx512bf16.
#[inline(always)]
pub unsafe fn gemm<const ACC: bool>(
    a: Strided<u32>,
    b: Strided<u32>,
    out: &mut [f32],
    ldo: usize,
    [m, n, kn2]: [usize; 3],
    scale: f32,
) {
    assert!(product_fits(a, b, out.len(), ldo, [m, n, kn2]));
    for r0 in (0..m).step_by(R) {
        let mut c0 = 0;
        while c0 + 64 <= n {
            block::<4, ACC>(a, b, out, ldo, (r0, c0), kn2, scale);
            c0 += 64;
        }
        while c0 < n {
            block::<1, ACC>(a, b, out, ldo, (r0, c0), kn2, scale);
            c0 += 16;
        }
    }
}

/// Rows `r0..r0+R`, columns `c0..c0+16·V` of [`gemm`], whose assertions cover every access.
#[inline(always)]
unsafe fn block<const V: usize, const ACC: bool>(
    a: Strided<u32>,
    b: Strided<u32>,
    out: &mut [f32],
    ldo: usize,
    (r0, c0): (usize, usize),
    kn2: usize,
    scale: f32,
) {
    let op = out.as_mut_ptr();
    // As in the fp32 kernel: sums start from zero and are added to `out` at the end.
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    for k2 in 0..kn2 {
        let bb = b.data.as_ptr().add(k2 * b.row + c0);
        let bv: [__m512bh; V] = std::array::from_fn(|v| {
            std::mem::transmute(_mm512_loadu_si512(bb.add(16 * v) as *const _))
        });
        for (i, ai) in acc.iter_mut().enumerate() {
            let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(
                *a.data.get_unchecked((r0 + i) * a.row + k2 * a.col) as i32,
            ));
            for v in 0..V {
                ai[v] = _mm512_dpbf16_ps(ai[v], x, bv[v]);
            }
        }
    }
    let sc = _mm512_set1_ps(scale);
    for (i, ai) in acc.iter().enumerate() {
        for (v, x) in ai.iter().enumerate() {
            let dst = op.add((r0 + i) * ldo + c0 + 16 * v);
            let x = if ACC {
                _mm512_add_ps(_mm512_loadu_ps(dst), *x)
            } else {
                _mm512_mul_ps(*x, sc)
            };
            _mm512_storeu_ps(dst, x);
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
        pack_probability_row(&p[r * BK..][..BK], &mut pp[r * BK / 2..][..BK / 2], None);
    }
}

/// Rounds a row of probabilities (a multiple of 16) to bf16 pairs of consecutive keys, the
/// rest of `pp` zero. With `lo`, also the residuals `p - bf16(p)` (exact in fp32) rounded to
/// bf16 pairs, laid out as `pp` is: a product with both, against the same V pairs, takes P
/// to 16 significant bits instead of 8 (where V has few columns: `tile::few_columns`).
///
/// # Safety
/// Needs avx512f+avx512bf16; `pp` (and `lo`) hold at least `s.len() / 2` pairs, rounded up
/// to 16.
#[inline(always)]
pub unsafe fn pack_probability_row(s: &[f32], pp: &mut [u32], mut lo: Option<&mut [u32]>) {
    let n = s.len();
    check_probability_row(n, pp, lo.as_deref());
    let mut c = 0;
    while c < n {
        let first = _mm512_loadu_ps(s.as_ptr().add(c));
        let second = if c + 16 < n {
            _mm512_loadu_ps(s.as_ptr().add(c + 16))
        } else {
            _mm512_setzero_ps()
        };
        store_probability_pairs(first, second, pp, lo.as_deref_mut(), c);
        c += 32;
    }
    zero_probability_pairs(pp, lo, c);
}

/// [`pack_probability_row`] of the probabilities exp(s·scale − m) of raw scores `s`, formed
/// here in registers rather than stored and read back (the AMX path's plain rows: two passes
/// over the row fewer). Returns `lanes · corr + (their sums in 16 lanes)`, as
/// [`super::math::exp_sub_sum_lanes`] does for scaled scores.
///
/// # Safety
/// As [`pack_probability_row`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub unsafe fn exp_pack_probability_row<M: MulAdd>(
    s: &[f32],
    scale: f32,
    m: f32,
    lanes: &[f32; LANES],
    corr: f32,
    pp: &mut [u32],
    mut lo: Option<&mut [u32]>,
) -> [f32; LANES] {
    let n = s.len();
    check_probability_row(n, pp, lo.as_deref());
    let mut sum = [0f32; LANES];
    let mut c = 0;
    while c < n {
        let first = exp_lanes::<M>(&s[c..][..LANES], scale, m, &mut sum);
        let second = if c + 16 < n {
            exp_lanes::<M>(&s[c + 16..][..LANES], scale, m, &mut sum)
        } else {
            _mm512_setzero_ps()
        };
        store_probability_pairs(first, second, pp, lo.as_deref_mut(), c);
        c += 32;
    }
    zero_probability_pairs(pp, lo, c);
    for i in 0..LANES {
        sum[i] = M::mul_add(lanes[i], corr, sum[i]);
    }
    sum
}

/// exp(x·scale − m) of 16 scores, added into `sum` lane by lane. (A plain function: as a
/// closure it was not inlined into the AVX-512 caller, and its exponentials ran scalar, 25
/// times slower.)
#[inline(always)]
unsafe fn exp_lanes<M: MulAdd>(x: &[f32], scale: f32, m: f32, sum: &mut [f32; LANES]) -> __m512 {
    let mut e = [0f32; LANES];
    for i in 0..LANES {
        e[i] = exp::<M>(M::mul_add(x[i], scale, -m));
        sum[i] += e[i];
    }
    _mm512_loadu_ps(e.as_ptr())
}

#[inline(always)]
fn check_probability_row(n: usize, pp: &[u32], lo: Option<&[u32]>) {
    let pairs = (n / 2).div_ceil(16) * 16;
    assert!(n.is_multiple_of(16) && pp.len() >= pairs && lo.is_none_or(|lo| lo.len() >= pairs));
}

/// Rounds 32 probabilities (`first`, then `second`) to the bf16 pairs from pair `c / 2` of
/// `pp`, and their residuals into `lo`.
///
/// # Safety
/// Needs avx512f+avx512bf16; `pp` (and `lo`) hold 16 pairs from `c / 2`.
#[inline(always)]
pub(super) unsafe fn store_probability_pairs(
    first: __m512,
    second: __m512,
    pp: &mut [u32],
    lo: Option<&mut [u32]>,
    c: usize,
) {
    // The second operand fills the low 16 bf16 values: keys c..c+16 stay in order.
    let b: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(second, first));
    _mm512_storeu_si512(pp.as_mut_ptr().add(c / 2) as *mut _, b);
    if let Some(lo) = lo {
        let r0 = _mm512_sub_ps(first, widen(b, false));
        let r1 = _mm512_sub_ps(second, widen(b, true));
        let r: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(r1, r0));
        _mm512_storeu_si512(lo.as_mut_ptr().add(c / 2) as *mut _, r);
    }
}

/// bf16 lanes `half` (0: the low 16, 1: the high 16) of `b`, widened to fp32 exactly.
#[inline(always)]
unsafe fn widen(b: __m512i, half: bool) -> __m512 {
    let h = if half {
        _mm512_extracti64x4_epi64::<1>(b)
    } else {
        _mm512_castsi512_si256(b)
    };
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
}

/// Zeroes the pairs of `pp` (and `lo`) from pair `c / 2`: past the row.
#[inline(always)]
fn zero_probability_pairs(pp: &mut [u32], lo: Option<&mut [u32]>, c: usize) {
    pp[c / 2..].fill(0);
    if let Some(lo) = lo {
        lo[c / 2..].fill(0);
    }
}

/// Interleaves two bf16 rows (`second` None past the last row) into pairs:
/// `dst[c] = (first[c], second[c])`.
///
/// # Safety
/// `first` (and `second`) must address `dv` readable bf16 values.
#[inline(always)]
unsafe fn interleave(first: *const u16, second: Option<*const u16>, dv: usize, dst: &mut [u32]) {
    assert!(dst.len() >= dv);
    // 16 pairs at a time: each row widened to u32 lanes, the second shifted into the high half.
    let widen = |p: *const u16| _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
    let mut c = 0;
    while c + 16 <= dv {
        let hi = match second {
            Some(b) => _mm512_slli_epi32::<16>(widen(b.add(c))),
            None => _mm512_setzero_si512(),
        };
        let x = _mm512_or_si512(widen(first.add(c)), hi);
        _mm512_storeu_si512(dst.as_mut_ptr().add(c) as *mut _, x);
        c += 16;
    }
    let (first, second, dst) = (first.add(c), second.map(|b| b.add(c)), &mut dst[c..]);
    let dv = dv - c;
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

/// Packs rows `0..n` (bf16, `len` elements each, `row(i)` addressing row i) interleaved two by
/// two: `dst[k2·ld + c] = (row 2·k2 [c], row 2·k2+1 [c])`, the right operand of a product that
/// reduces over those rows. An odd last row is paired with zero.
///
/// # Safety
/// `row(i)` must address `len` readable bf16 values for every i < n.
#[inline(always)]
pub unsafe fn pack_interleaved(
    row: impl Fn(usize) -> *const u16,
    n: usize,
    len: usize,
    dst: &mut [u32],
    ld: usize,
) {
    for k2 in 0..n.div_ceil(2) {
        let second = (2 * k2 + 1 < n).then(|| row(2 * k2 + 1));
        interleave(row(2 * k2), second, len, &mut dst[k2 * ld..][..len]);
    }
}

/// Packs rows `0..nk` (bf16, `d` elements each) transposed by pairs: `dst[e2·ld + j]` holds
/// elements 2·e2 and 2·e2+1 of row j, the right operand of a product that reduces over the
/// head dimension. Columns `nk..width` (width ≤ `ld`) are zero. `ld` is BK but for the AMX
/// family's wider key tiles.
///
/// # Safety
/// `row(j)` must address `d` readable bf16 values for every j < nk; `d <= MAX_HEAD_DIM`.
#[inline(always)]
pub unsafe fn pack_transposed_pairs(
    row: impl Fn(usize) -> *const u16,
    nk: usize,
    d: usize,
    width: usize,
    dst: &mut [u32],
    ld: usize,
) {
    let d2 = d.div_ceil(2);
    if d.is_multiple_of(2) {
        // Pairs of consecutive elements are the row's own bytes: a plain transposition.
        return transpose_rows::<64, u32>(|jj| row(jj) as *const u32, nk, d2, width, dst, ld);
    }
    let mut pairs = [0u32; crate::problem::MAX_HEAD_DIM / 2];
    for jj in 0..width {
        if jj < nk {
            pack_row_pairs(row(jj), d, &mut pairs[..d2]);
            for (e2, &x) in pairs[..d2].iter().enumerate() {
                dst[e2 * ld + jj] = x;
            }
        } else {
            for e2 in 0..d2 {
                dst[e2 * ld + jj] = 0;
            }
        }
    }
}

/// Rounds fp32 rows (`rows × BK`, rows a multiple of 2) to bf16 pairs of consecutive rows:
/// `dst[r2·BK + c] = (x[2·r2][c], x[2·r2+1][c])`, the left operand of a product that reduces
/// over rows (Pᵀ·dO, dSᵀ·Q), read transposed.
///
/// # Safety
/// Needs avx512f+avx512bf16; `x` holds `rows·BK` and `dst` `rows/2·BK` elements.
#[inline(always)]
pub unsafe fn pack_row_pairs_f32(x: &[f32], rows: usize, dst: &mut [u32]) {
    assert!(rows.is_multiple_of(2) && x.len() >= rows * BK && dst.len() >= rows / 2 * BK);
    for r2 in 0..rows / 2 {
        for c in (0..BK).step_by(16) {
            let lo = _mm512_loadu_ps(x.as_ptr().add(2 * r2 * BK + c));
            let hi = _mm512_loadu_ps(x.as_ptr().add((2 * r2 + 1) * BK + c));
            let widen = |x| {
                let b: __m256i = std::mem::transmute::<__m256bh, _>(_mm512_cvtneps_pbh(x));
                _mm512_cvtepu16_epi32(b)
            };
            let (lo, hi) = (widen(lo), widen(hi));
            let both = _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi));
            _mm512_storeu_si512(dst.as_mut_ptr().add(r2 * BK + c) as *mut _, both);
        }
    }
}
