//! Scalar building blocks written so that loops over them vectorise: no branches, no libm calls.

/// How a kernel family multiplies and adds: fused where the hardware has FMA (the function that
/// inlines this must enable the `fma` target feature), separate otherwise, because `mul_add`
/// without hardware FMA is a slow libm call.
pub trait MulAdd: Copy {
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

#[derive(Clone, Copy)]
pub struct Fused;
#[derive(Clone, Copy)]
pub struct Separate;

impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}
impl MulAdd for Separate {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2: f32 = std::f32::consts::LN_2;

/// e^x to about 1 ulp on [-inf, 88], returning exactly 0 for x <= -87.4 (and -inf).
/// 2^t = 2^n · 2^f with n = round(t), |f| <= 1/2; 2^f by its Taylor series to degree 7
/// (truncation error < 2e-9 relative); 2^n by building the exponent bits.
#[inline(always)]
pub fn exp<M: MulAdd>(x: f32) -> f32 {
    let t = (x * LOG2E).clamp(-127.0, 127.0);
    // Round to nearest with the 1.5·2^23 trick (vectorises, unlike f32::round).
    const MAGIC: f32 = 12_582_912.0;
    let n = (t + MAGIC) - MAGIC;
    let f = (t - n) * LN2; // e^f = 2^(t-n)
    let mut p = 1.0 / 5040.0;
    p = M::mul_add(p, f, 1.0 / 720.0);
    p = M::mul_add(p, f, 1.0 / 120.0);
    p = M::mul_add(p, f, 1.0 / 24.0);
    p = M::mul_add(p, f, 1.0 / 6.0);
    p = M::mul_add(p, f, 0.5);
    p = M::mul_add(p, f, 1.0);
    p = M::mul_add(p, f, 1.0);
    // n = -127 gives exponent bits 0, i.e. the scale 0: underflow flushes to exactly zero.
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    p * scale
}

/// tanh(x) to a few ulp: an odd Taylor polynomial near 0 (where 1 - 2/(e^2x + 1) would cancel)
/// and the exponential form elsewhere.
#[inline(always)]
pub fn tanh<M: MulAdd>(x: f32) -> f32 {
    let a = x.abs();
    let a2 = a * a;
    // x - x^3/3 + 2x^5/15 - 17x^7/315 + 62x^9/2835 - 1382x^11/155925; error < 3e-9 for |x| < 0.3
    let mut p = -1382.0 / 155_925.0;
    p = M::mul_add(p, a2, 62.0 / 2835.0);
    p = M::mul_add(p, a2, -17.0 / 315.0);
    p = M::mul_add(p, a2, 2.0 / 15.0);
    p = M::mul_add(p, a2, -1.0 / 3.0);
    let small = M::mul_add(p * a2, a, a);
    let large = 1.0 - 2.0 / (exp::<M>(2.0 * a) + 1.0);
    let r = if a < 0.3 { small } else { large };
    r.copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let got = exp::<Separate>(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.001;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp::<Separate>(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp::<Separate>(-100.0), 0.0);
        assert_eq!(exp::<Fused>(0.0), 1.0);
    }

    #[test]
    fn tanh_matches_libm() {
        let mut worst = 0f64;
        let mut x = -12.0f32;
        while x <= 12.0 {
            let got = tanh::<Separate>(x) as f64;
            let want = (x as f64).tanh();
            let err = (got - want).abs() / want.abs().max(1e-30);
            worst = worst.max(err);
            x += 0.0007;
        }
        assert!(worst < 1e-6, "worst relative error {worst}");
        assert_eq!(tanh::<Separate>(1e6), 1.0);
        assert_eq!(tanh::<Separate>(-1e6), -1.0);
    }
}
