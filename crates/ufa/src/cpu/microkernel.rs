//! The matrix products of the flash tiles, register-blocked: `R` rows by `C` columns of fp32
//! accumulators stay in vector registers across the reduction loop. Written once as plain Rust;
//! each kernel family instantiates them with its own `C` inside a `#[target_feature]` function,
//! where the compiler turns the `C`-wide loops into SIMD.

use super::math::MulAdd;

/// Keys per tile: the column count of S and the row count of the packed V tile.
pub const BK: usize = 64;
/// Rows per register block; the row counts of products are padded to a multiple of it.
pub const R: usize = 4;

/// A read-only matrix: element (i, k) at `data[i·row + k·col]`. The left operand of a product
/// is only ever broadcast one element at a time, so it may be read transposed (`col` > 1) at no
/// cost, which spares the backward pass from transposing P and dS.
#[derive(Clone, Copy)]
pub struct Strided<'a, T> {
    pub data: &'a [T],
    pub row: usize,
    pub col: usize,
}

impl<'a, T> Strided<'a, T> {
    /// Row-major with `ld` elements per row.
    #[inline(always)]
    pub fn rows(data: &'a [T], ld: usize) -> Self {
        Strided {
            data,
            row: ld,
            col: 1,
        }
    }

    /// The transpose of a row-major matrix with `ld` elements per row.
    #[inline(always)]
    pub fn transposed(data: &'a [T], ld: usize) -> Self {
        Strided {
            data,
            row: 1,
            col: ld,
        }
    }

    /// Whether elements (i, k) for i < m, k < kn lie inside `data`.
    #[inline(always)]
    pub fn covers(&self, m: usize, kn: usize) -> bool {
        m == 0 || kn == 0 || (m - 1) * self.row + (kn - 1) * self.col < self.data.len()
    }
}

/// Whether a row-major `ld`-wide matrix of `len` elements holds rows `0..m` of `n` columns.
#[inline(always)]
pub fn holds(len: usize, ld: usize, m: usize, n: usize) -> bool {
    n <= ld && (m == 0 || (m - 1) * ld + n <= len)
}

/// Whether a product of `[m, n, kn]` = rows (a multiple of `R`), columns (a multiple of 16)
/// and reduction length fits its operands: `b` row-major and holding `kn` rows of `n`, `a`
/// covering `m × kn`, the output (`out_len` elements, `ldo` a row) holding `m` rows of `n`.
/// Every product kernel asserts it; it covers all their accesses.
#[inline(always)]
pub fn product_fits<T, U>(
    a: Strided<T>,
    b: Strided<U>,
    out_len: usize,
    ldo: usize,
    [m, n, kn]: [usize; 3],
) -> bool {
    m.is_multiple_of(R)
        && n.is_multiple_of(16)
        && b.col == 1
        && a.covers(m, kn)
        && holds(b.data.len(), b.row, kn, n)
        && holds(out_len, ldo, m, n)
}

/// `out[i][c] = scale · Σ_k a(i, k) · b[k][c]`, or with `ACC` `out[i][c] += Σ_k a(i, k) · b[k][c]`
/// (the sum formed first),
/// for `[m, n, kn]` = rows (a multiple of `R`), columns (a multiple of 16) and reduction length.
/// `b` is row-major (`b.col` = 1); `out` is row-major with `ldo` elements per row. Each output
/// element sums its terms in `k` order, so results do not depend on how callers split the work.
#[inline(always)]
pub fn gemm<M: MulAdd, const C: usize, const ACC: bool>(
    a: Strided<f32>,
    b: Strided<f32>,
    out: &mut [f32],
    ldo: usize,
    [m, n, kn]: [usize; 3],
    scale: f32,
) {
    assert!(product_fits(a, b, out.len(), ldo, [m, n, kn]));
    #[cfg(target_arch = "x86_64")]
    if super::isa::avx2_family::<M, C>() {
        // SAFETY: `product_fits` covers every access; the AVX2 family runs inside isa.rs's
        // run_avx2 (avx2, fma).
        unsafe { avx2::gemm::<ACC>(a, b, out, ldo, [m, n, kn], scale) };
        return;
    }
    for r0 in (0..m).step_by(R) {
        let mut c0 = 0;
        while c0 + C <= n {
            block::<M, C, ACC>(a, b, out, ldo, (r0, c0), kn, scale);
            c0 += C;
        }
        while c0 < n {
            block::<M, 16, ACC>(a, b, out, ldo, (r0, c0), kn, scale);
            c0 += 16;
        }
    }
}

/// Rows `r0..r0+R`, columns `c0..c0+W` of [`gemm`], whose assertions cover every access.
#[inline(always)]
fn block<M: MulAdd, const W: usize, const ACC: bool>(
    a: Strided<f32>,
    b: Strided<f32>,
    out: &mut [f32],
    ldo: usize,
    (r0, c0): (usize, usize),
    kn: usize,
    scale: f32,
) {
    // Sums start from zero and are added to `out` at the end: reading `out` first would copy
    // the block through the stack (a memcpy call per row).
    let mut acc = [[0f32; W]; R];
    for k in 0..kn {
        // SAFETY: k < kn, r0 + R <= m and c0 + W <= n, within the bounds `gemm` asserted;
        // unchecked so the loop body is only loads, broadcasts and FMAs.
        unsafe {
            let bv = b.data.as_ptr().add(k * b.row + c0);
            for (i, ai) in acc.iter_mut().enumerate() {
                let x = *a.data.get_unchecked((r0 + i) * a.row + k * a.col);
                for (c, y) in ai.iter_mut().enumerate() {
                    *y = M::mul_add(x, *bv.add(c), *y);
                }
            }
        }
    }
    for (i, ai) in acc.iter().enumerate() {
        let dst = &mut out[(r0 + i) * ldo + c0..][..W];
        if ACC {
            for (d, &x) in dst.iter_mut().zip(ai) {
                *d += x;
            }
        } else {
            for (d, &x) in dst.iter_mut().zip(ai) {
                *d = x * scale;
            }
        }
    }
}

/// Writes `n` rows of `d` elements (row `j` at `row(j)`, 4-byte elements, any alignment) as the
/// columns of `dst` (`d` × `ld`, BK but for the AMX family's wider key tiles):
/// `dst[e·ld + j] = row(j)[e]`, with columns `n..width` zero (`width` ≤ `ld`: the columns its
/// reader takes; the rest keep what they held). The AVX-512 families (`C` = 64)
/// move 16 × 16 blocks through registers; element by element, the scattered stores cost as
/// much as a tenth of a forward tile's products.
///
/// # Safety
/// `row(j)` must address `d` readable f32 values for every `j < n`.
#[inline(always)]
pub unsafe fn transpose_rows<const C: usize, T: Copy + Default>(
    row: impl Fn(usize) -> *const T,
    n: usize,
    d: usize,
    width: usize,
    dst: &mut [T],
    ld: usize,
) {
    assert!(n <= width && width <= ld && dst.len() >= d * ld && std::mem::size_of::<T>() == 4);
    // Columns 0..e0 in 16 × 16 blocks, the rest element by element.
    let e0 = if C == 64 && cfg!(target_arch = "x86_64") {
        d / 16 * 16
    } else {
        0
    };
    #[cfg(target_arch = "x86_64")]
    for e0 in (0..e0).step_by(16) {
        let mut j0 = 0;
        while j0 + 16 <= n {
            let at = |i: usize| row(j0 + i).add(e0) as *const f32;
            x86::transpose16(at, dst.as_mut_ptr().add(e0 * ld + j0) as *mut f32, ld);
            j0 += 16;
        }
        for j in j0..n {
            for e in e0..e0 + 16 {
                dst[e * ld + j] = row(j).add(e).read_unaligned();
            }
        }
    }
    for j in 0..n {
        let r = row(j);
        for e in e0..d {
            dst[e * ld + j] = r.add(e).read_unaligned();
        }
    }
    for e in 0..d {
        dst[e * ld + n..][..width - n].fill(T::default());
    }
}

/// The AVX2 family's products, written with intrinsics: rows six at a time, 16 columns (two
/// ymm) each, so that 12 accumulators cover the two FMA units' four-cycle latency beside the
/// broadcast and B's two vectors in the 16 ymm registers (the generic [`block`]'s R rows hold
/// eight). Given six rows too, the plain-Rust [`block`] ran at 72-85 GFLOP/s, 75-84% of one
/// Zen 3 core's FMA peak (its address arithmetic for the strided left operand took issue
/// slots); this runs at 91-97 (AMD EPYC Zen 3, one thread, products of 24-256 rows × 64-128
/// columns × 64-128 terms from L1). Each output element sums its terms in `k` order from zero,
/// as [`block`] does, so results are bitwise those of the generic kernel.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Strided, R};
    use std::arch::x86_64::*;

    /// [`super::gemm`] for the AVX2 family.
    ///
    /// # Safety
    /// Needs avx2 and fma; the shapes must satisfy [`super::product_fits`].
    #[inline(always)]
    pub unsafe fn gemm<const ACC: bool>(
        a: Strided<f32>,
        b: Strided<f32>,
        out: &mut [f32],
        ldo: usize,
        [m, n, kn]: [usize; 3],
        scale: f32,
    ) {
        // Six rows at a time while the rest stays a multiple of R (m is one).
        let six = m / (3 * R) * (3 * R);
        let out = out.as_mut_ptr();
        for c0 in (0..n).step_by(16) {
            for r0 in (0..six).step_by(6) {
                block::<6, ACC>(a, b, out, ldo, (r0, c0), kn, scale);
            }
            for r0 in (six..m).step_by(R) {
                block::<R, ACC>(a, b, out, ldo, (r0, c0), kn, scale);
            }
        }
    }

    /// Rows `r0..r0+ROWS`, columns `c0..c0+16` of [`gemm`] (`out` row-major, `ldo` apart).
    #[inline(always)]
    unsafe fn block<const ROWS: usize, const ACC: bool>(
        a: Strided<f32>,
        b: Strided<f32>,
        out: *mut f32,
        ldo: usize,
        (r0, c0): (usize, usize),
        kn: usize,
        scale: f32,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; ROWS];
        let (mut ak, mut bk) = (a.data.as_ptr().add(r0 * a.row), b.data.as_ptr().add(c0));
        let out = out.add(r0 * ldo + c0);
        // The second half of the rows from a base of its own: [base + i·row] for i < 3 is one
        // addressing mode each, with no multiply in the loop.
        let half = ROWS / 2;
        for _ in 0..kn {
            let lo = _mm256_loadu_ps(bk);
            let hi = _mm256_loadu_ps(bk.add(8));
            let ak2 = ak.add(half * a.row);
            for i in 0..half {
                for (base, r) in [(ak, i), (ak2, half + i)] {
                    let x = _mm256_broadcast_ss(&*base.add(i * a.row));
                    acc[r][0] = _mm256_fmadd_ps(x, lo, acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(x, hi, acc[r][1]);
                }
            }
            ak = ak.add(a.col);
            bk = bk.add(b.row);
        }
        for (i, row) in acc.iter().enumerate() {
            for (h, &v) in row.iter().enumerate() {
                let o = out.add(i * ldo + 8 * h);
                let v = if ACC {
                    _mm256_add_ps(_mm256_loadu_ps(o), v)
                } else {
                    _mm256_mul_ps(v, _mm256_set1_ps(scale))
                };
                _mm256_storeu_ps(o, v);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Rows `src(0..16)` (16 elements each) as the columns of the 16 × 16 block at `dst` (row
    /// stride `ld`): interleave pairs of rows, then pairs of pairs, then 128-bit lanes twice.
    /// Only moves bits, so any 4-byte elements may pass as f32.
    ///
    /// # Safety
    /// Needs avx512f; every `src(i)` must address 16 readable f32, `dst` 16 rows of 16.
    #[inline(always)]
    pub unsafe fn transpose16(src: impl Fn(usize) -> *const f32, dst: *mut f32, ld: usize) {
        // Plain loops, not closures: a closure would not inherit avx512f, and the intrinsics
        // would become calls.
        let mut r = [_mm512_setzero_ps(); 16];
        for (i, x) in r.iter_mut().enumerate() {
            *x = _mm512_loadu_ps(src(i));
        }
        let mut t = [_mm512_setzero_ps(); 16];
        for i in (0..16).step_by(2) {
            t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
            t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
        }
        // r[4q + k]: from t[4q + k / 2] and t[4q + 2 + k / 2], low or high pairs.
        for q in (0..16).step_by(4) {
            for k in 0..2 {
                let (a, b) = (t[q + k], t[q + 2 + k]);
                r[q + 2 * k] = _mm512_shuffle_ps::<0x44>(a, b);
                r[q + 2 * k + 1] = _mm512_shuffle_ps::<0xEE>(a, b);
            }
        }
        // 128-bit lanes: t[8h + k] from r[8h + k % 4] and r[8h + 4 + k % 4], even or odd lanes.
        for h in (0..16).step_by(8) {
            for k in 0..4 {
                let (a, b) = (r[h + k], r[h + 4 + k]);
                t[h + k] = _mm512_shuffle_f32x4::<0x88>(a, b);
                t[h + 4 + k] = _mm512_shuffle_f32x4::<0xDD>(a, b);
            }
        }
        for i in 0..8 {
            let (a, b) = (t[i], t[8 + i]);
            _mm512_storeu_ps(dst.add(i * ld), _mm512_shuffle_f32x4::<0x88>(a, b));
            _mm512_storeu_ps(dst.add((i + 8) * ld), _mm512_shuffle_f32x4::<0xDD>(a, b));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::math::Separate;
    use super::*;

    #[test]
    fn transposes_match_naive_loops() {
        for (n, d) in [(64, 64), (64, 80), (37, 35), (16, 16), (1, 3)] {
            let src: Vec<f32> = (0..n * d).map(|i| i as f32).collect();
            let mut want = vec![7f32; d * BK];
            let mut got = want.clone();
            // SAFETY: rows j < n of `src` hold d elements.
            unsafe {
                transpose_rows::<16, f32>(|j| src.as_ptr().add(j * d), n, d, BK, &mut want, BK);
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx512f") {
                    transpose_rows::<64, f32>(|j| src.as_ptr().add(j * d), n, d, BK, &mut got, BK);
                    assert_eq!(got, want);
                }
            }
            for e in 0..d {
                for j in 0..BK {
                    let x = if j < n { src[j * d + e] } else { 0.0 };
                    assert_eq!(want[e * BK + j], x, "{n} {d} {e} {j}");
                }
            }
        }
    }

    /// Every family's products are bitwise the fused sums in `k` order (the AVX2 family's
    /// explicit kernel included, where the CPU has it): six-row and four-row blocks, a strided
    /// (transposed) left operand, both epilogues.
    #[test]
    fn fused_products_are_bitwise_the_sums_in_k_order() {
        use super::super::isa::{run_with, Isa, KernelFn};
        use super::super::math::MulAdd;
        struct Products;
        impl KernelFn for Products {
            type Output = ();
            #[inline(always)]
            fn call<M: MulAdd, const C: usize, const B: bool, const BT: bool, const A: bool>(self) {
                for (m, n, kn) in [
                    (4, 16, 1),
                    (8, 48, 37),
                    (12, 16, 64),
                    (28, 128, 5),
                    (64, 64, 64),
                ] {
                    for transposed in [false, true] {
                        let a: Vec<f32> = (0..m * kn).map(|i| (i as f32 * 0.37).sin()).collect();
                        let b: Vec<f32> = (0..kn * n).map(|i| (i as f32 * 0.11).cos()).collect();
                        let av = match transposed {
                            false => Strided::rows(&a, kn),
                            true => Strided::transposed(&a, m),
                        };
                        let at = |i: usize, k: usize| a[i * av.row + k * av.col];
                        let sum = |i: usize, c: usize| {
                            (0..kn).fold(0f32, |s, k| at(i, k).mul_add(b[k * n + c], s))
                        };
                        let mut out = vec![0.5f32; m * n];
                        gemm::<M, C, false>(
                            av,
                            Strided::rows(&b, n),
                            &mut out,
                            n,
                            [m, n, kn],
                            0.25,
                        );
                        let want: Vec<f32> = (0..m * n).map(|x| sum(x / n, x % n) * 0.25).collect();
                        assert_eq!(out, want, "{m} {n} {kn} {transposed}");
                        let mut out = vec![0.5f32; m * n];
                        gemm::<M, C, true>(av, Strided::rows(&b, n), &mut out, n, [m, n, kn], 1.0);
                        let want: Vec<f32> = (0..m * n).map(|x| 0.5 + sum(x / n, x % n)).collect();
                        assert_eq!(out, want, "{m} {n} {kn} {transposed} acc");
                    }
                }
            }
        }
        for isa in [Isa::Avx2, Isa::Avx512] {
            if isa.is_supported() {
                run_with(isa, Products);
            }
        }
    }

    #[test]
    fn products_match_naive_loops() {
        let (rows, d, dvp, nk) = (8, 5, 48, 37);
        let q: Vec<f32> = (0..rows * d).map(|i| (i as f32 * 0.37).sin()).collect();
        let kt: Vec<f32> = (0..d * BK).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut s = vec![0f32; rows * BK];
        let dims = [rows, BK, d];
        gemm::<Separate, 16, false>(
            Strided::rows(&q, d),
            Strided::rows(&kt, BK),
            &mut s,
            BK,
            dims,
            0.5,
        );
        for r in 0..rows {
            for c in 0..BK {
                let want: f32 = (0..d).map(|e| q[r * d + e] * kt[e * BK + c]).sum::<f32>() * 0.5;
                assert!((s[r * BK + c] - want).abs() < 1e-5);
            }
        }
        let v: Vec<f32> = (0..BK * dvp).map(|i| (i as f32 * 0.07).sin()).collect();
        let mut acc = vec![1f32; rows * dvp];
        let dims = [rows, dvp, nk];
        gemm::<Separate, 32, true>(
            Strided::rows(&s, BK),
            Strided::rows(&v, dvp),
            &mut acc,
            dvp,
            dims,
            1.0,
        );
        for r in 0..rows {
            for c in 0..dvp {
                let want: f32 = 1.0 + (0..nk).map(|k| s[r * BK + k] * v[k * dvp + c]).sum::<f32>();
                assert!((acc[r * dvp + c] - want).abs() < 1e-4, "{r} {c}");
            }
        }
        // Sᵀ as the left operand, read in place.
        let mut acc = vec![0f32; BK * d.next_multiple_of(16)];
        let w = d.next_multiple_of(16);
        let qp: Vec<f32> = (0..rows * w)
            .map(|i| if i % w < d { q[i / w * d + i % w] } else { 0.0 })
            .collect();
        let dims = [BK, w, rows];
        gemm::<Separate, 16, true>(
            Strided::transposed(&s, BK),
            Strided::rows(&qp, w),
            &mut acc,
            w,
            dims,
            1.0,
        );
        for c in 0..BK {
            for e in 0..d {
                let want: f32 = (0..rows).map(|r| s[r * BK + c] * q[r * d + e]).sum();
                assert!((acc[c * w + e] - want).abs() < 1e-4, "{c} {e}");
            }
        }
    }
}
