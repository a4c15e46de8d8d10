//! The two matrix products of a flash tile, register-blocked: `R` rows by `C` columns of fp32
//! accumulators stay in vector registers across the reduction loop. Written once as plain Rust;
//! each kernel family instantiates them with its own `C` inside a `#[target_feature]` function,
//! where the compiler turns the `C`-wide loops into SIMD.

use super::math::MulAdd;

/// Keys per tile: the column count of S and the row count of the packed V tile.
pub const BK: usize = 64;
/// Query rows per register block; tiles are padded to a multiple of it.
pub const R: usize = 4;

/// `s[r][c] = Σ_e q[r][e] · kt[e][c]` for `rows` rows (a multiple of `R`) and `BK` columns.
/// `q` is `rows × d` row-major, `kt` is `d × BK` (K transposed), `s` is `rows × BK`.
#[inline(always)]
pub fn scores<M: MulAdd, const C: usize>(
    q: &[f32],
    d: usize,
    kt: &[f32],
    s: &mut [f32],
    rows: usize,
) {
    assert!(
        rows.is_multiple_of(R)
            && BK.is_multiple_of(C)
            && q.len() >= rows * d
            && kt.len() >= d * BK
            && s.len() >= rows * BK
    );
    for r0 in (0..rows).step_by(R) {
        for c0 in (0..BK).step_by(C) {
            let mut acc = [[0f32; C]; R];
            for e in 0..d {
                // SAFETY: e < d, c0 + C <= BK and r0 + R <= rows, within the lengths asserted above;
                // unchecked so the loop body is only loads and FMAs.
                unsafe {
                    let kv = kt.as_ptr().add(e * BK + c0);
                    for (i, a) in acc.iter_mut().enumerate() {
                        let qv = *q.get_unchecked((r0 + i) * d + e);
                        for (c, x) in a.iter_mut().enumerate() {
                            *x = M::mul_add(qv, *kv.add(c), *x);
                        }
                    }
                }
            }
            for (i, a) in acc.iter().enumerate() {
                s[(r0 + i) * BK + c0..][..C].copy_from_slice(a);
            }
        }
    }
}

/// `acc[r][c] += Σ_{k < nk} p[r][k] · v[k][c]` for `rows` rows (a multiple of `R`).
/// `p` is `rows × BK`, `v` is `BK × dvp`, `acc` is `rows × dvp`; `dvp` is a multiple of 16.
#[inline(always)]
pub fn accumulate_pv<M: MulAdd, const C: usize>(
    p: &[f32],
    v: &[f32],
    dvp: usize,
    acc: &mut [f32],
    rows: usize,
    nk: usize,
) {
    debug_assert!(rows.is_multiple_of(R) && dvp.is_multiple_of(16) && nk <= BK);
    for r0 in (0..rows).step_by(R) {
        let mut c0 = 0;
        while c0 + C <= dvp {
            pv_block::<M, C>(p, v, dvp, acc, r0, c0, nk);
            c0 += C;
        }
        while c0 < dvp {
            pv_block::<M, 16>(p, v, dvp, acc, r0, c0, nk);
            c0 += 16;
        }
    }
}

#[inline(always)]
fn pv_block<M: MulAdd, const W: usize>(
    p: &[f32],
    v: &[f32],
    dvp: usize,
    acc: &mut [f32],
    r0: usize,
    c0: usize,
    nk: usize,
) {
    assert!(p.len() >= (r0 + R) * BK && nk <= BK && c0 + W <= dvp && v.len() >= nk * dvp);
    let mut a: [[f32; W]; R] =
        std::array::from_fn(|i| acc[(r0 + i) * dvp + c0..][..W].try_into().unwrap());
    for k in 0..nk {
        // SAFETY: k < nk <= BK rows of p (asserted) and of v (k·dvp + c0 + W <= nk·dvp);
        // unchecked so the loop body is only loads and FMAs.
        unsafe {
            let vv = v.as_ptr().add(k * dvp + c0);
            for (i, ai) in a.iter_mut().enumerate() {
                let pk = *p.get_unchecked((r0 + i) * BK + k);
                for (c, x) in ai.iter_mut().enumerate() {
                    *x = M::mul_add(pk, *vv.add(c), *x);
                }
            }
        }
    }
    for (i, ai) in a.iter().enumerate() {
        acc[(r0 + i) * dvp + c0..][..W].copy_from_slice(ai);
    }
}

#[cfg(test)]
mod tests {
    use super::super::math::Separate;
    use super::*;

    #[test]
    fn products_match_naive_loops() {
        let (rows, d, dvp, nk) = (8, 5, 48, 37);
        let q: Vec<f32> = (0..rows * d).map(|i| (i as f32 * 0.37).sin()).collect();
        let kt: Vec<f32> = (0..d * BK).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut s = vec![0f32; rows * BK];
        scores::<Separate, 16>(&q, d, &kt, &mut s, rows);
        for r in 0..rows {
            for c in 0..BK {
                let want: f32 = (0..d).map(|e| q[r * d + e] * kt[e * BK + c]).sum();
                assert!((s[r * BK + c] - want).abs() < 1e-5);
            }
        }
        let v: Vec<f32> = (0..BK * dvp).map(|i| (i as f32 * 0.07).sin()).collect();
        let mut acc = vec![1f32; rows * dvp];
        accumulate_pv::<Separate, 32>(&s, &v, dvp, &mut acc, rows, nk);
        for r in 0..rows {
            for c in 0..dvp {
                let want: f32 = 1.0 + (0..nk).map(|k| s[r * BK + k] * v[k * dvp + c]).sum::<f32>();
                assert!((acc[r * dvp + c] - want).abs() < 1e-4, "{r} {c}");
            }
        }
    }
}
