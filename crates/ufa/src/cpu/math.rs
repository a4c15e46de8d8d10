//! Scalar building blocks written so that loops over them vectorise: no branches, no libm calls.

/// How a kernel family multiplies and adds: fused where the hardware has FMA (the function that
/// inlines this must enable the `fma` target feature), separate otherwise, because `mul_add`
/// without hardware FMA is a slow libm call.
pub trait MulAdd: Copy {
    /// Whether this is the hardware FMA: on x86-64 only the AVX2 and AVX-512 families
    /// instantiate [`Fused`], inside functions compiled with avx2 and fma
    /// (`isa::avx2_family` tells the first from the others by its lane count).
    const FUSED: bool;
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

#[derive(Clone, Copy)]
pub struct Fused;
#[derive(Clone, Copy)]
pub struct Separate;

impl MulAdd for Fused {
    const FUSED: bool = true;
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}
impl MulAdd for Separate {
    const FUSED: bool = false;
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

const LOG2E: f32 = std::f32::consts::LOG2_E;

/// e^x to a few ulp for x in [-87, 88], exactly 0 for x <= -88 (and -inf).
/// e^x = 2^n · e^r with n = round(x·log2 e) and r = x − n·ln 2 computed in two parts
/// (Cody–Waite, so r stays accurate for large |x|), |r| <= ln2/2; e^r by a degree-6
/// polynomial fitted for relative error on that interval (1.1e-7 with fp32 rounding, against
/// the 7 degrees a Taylor series needs: one instruction fewer in every softmax); 2^n by
/// building the exponent bits.
#[inline(always)]
pub fn exp<M: MulAdd>(x: f32) -> f32 {
    // ln 2 split so that n·LN2_HI is exact for |n| <= 127.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-88.0, 88.0);
    // Round to nearest with the 1.5·2^23 trick (vectorises, unlike f32::round): y's low
    // mantissa bits then hold n as an integer, read without a float-to-int conversion.
    const MAGIC: f32 = 12_582_912.0;
    let y = M::mul_add(x, LOG2E, MAGIC);
    let n = y - MAGIC;
    // n + 127, the biased exponent of 2^n, straight from y's bits.
    let biased = (y.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32 - 127);
    let r = M::mul_add(n, -LN2_LO, M::mul_add(n, -LN2_HI, x));
    let mut p = 0.001_383_684_6;
    p = M::mul_add(p, r, 0.008_374_816);
    p = M::mul_add(p, r, 0.041_668_225);
    p = M::mul_add(p, r, 0.166_664_2);
    p = M::mul_add(p, r, 0.499_999_9);
    p = M::mul_add(p, r, 1.0);
    p = M::mul_add(p, r, 1.0);
    // n = -127 (x <= -88) gives exponent bits 0, i.e. the scale 0: flushes to exactly zero.
    let scale = f32::from_bits((biased as u32) << 23);
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

/// Lanes of the reductions below: independent partial results combined in a fixed order, so the
/// compiler can vectorise them (a sequential float sum cannot be reordered) and results stay
/// identical for every run.
pub const LANES: usize = 16;

/// The lanes combined by `op` as a fixed pairwise tree (short dependency chains, same order
/// every time).
#[inline(always)]
fn reduce_lanes(mut w: [f32; LANES], op: impl Fn(f32, f32) -> f32) -> f32 {
    let mut half = LANES / 2;
    while half > 0 {
        for i in 0..half {
            w[i] = op(w[i], w[i + half]);
        }
        half /= 2;
    }
    w[0]
}

#[inline(always)]
fn sum_lanes(w: [f32; LANES]) -> f32 {
    reduce_lanes(w, |a, b| a + b)
}

#[inline(always)]
fn max2(a: f32, b: f32) -> f32 {
    if b > a {
        b
    } else {
        a
    }
}

/// Lane-wise maxima of `x` (whose length is a multiple of 16), in 16 lanes: [`max_of_lanes`]
/// turns them into the largest element. Split so that a caller can first ask
/// [`any_lane_above`], which needs no reduction across lanes.
#[inline(always)]
pub fn lane_max(x: &[f32]) -> [f32; LANES] {
    let mut acc = [f32::NEG_INFINITY; LANES];
    // A length the compiler cannot see keeps this a loop of full-width vector maxima: unrolled
    // over a tile's constant width, it became a chain of two-lane pieces.
    let n = std::hint::black_box(x.len());
    for chunk in x[..n].chunks_exact(LANES) {
        for i in 0..LANES {
            acc[i] = max2(acc[i], chunk[i]);
        }
    }
    acc
}

/// The largest of the lanes (-inf if all are -inf).
#[inline(always)]
pub fn max_of_lanes(lanes: [f32; LANES]) -> f32 {
    reduce_lanes(lanes, max2)
}

/// Whether some lane is greater than `m` (NaN lanes are not).
#[inline(always)]
pub fn any_lane_above(lanes: &[f32; LANES], m: f32) -> bool {
    lanes.iter().fold(false, |a, &x| a | (x > m))
}

/// Replaces each element by `exp(x - m)` (length a multiple of 16) and returns
/// `lanes · scale + (their sum in 16 lanes)`, lane by lane: a running sum kept in lanes, whose
/// total [`sum_of_lanes`] forms once at the end rather than once a tile.
#[inline(always)]
pub fn exp_sub_sum_lanes<M: MulAdd>(
    x: &mut [f32],
    m: f32,
    lanes: &[f32; LANES],
    scale: f32,
) -> [f32; LANES] {
    let mut acc = [0f32; LANES];
    for chunk in x.chunks_exact_mut(LANES) {
        for i in 0..LANES {
            chunk[i] = exp::<M>(chunk[i] - m);
            acc[i] += chunk[i];
        }
    }
    std::array::from_fn(|i| M::mul_add(lanes[i], scale, acc[i]))
}

/// The total of 16 lanes, in a fixed order.
#[inline(always)]
pub fn sum_of_lanes(lanes: &[f32]) -> f32 {
    sum_lanes(std::array::from_fn(|i| lanes[i]))
}

/// Σ a[i]·b[i] over equal-length slices, in 16 lanes combined in a fixed order.
#[inline(always)]
pub fn dot<M: MulAdd>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for i in 0..LANES {
            acc[i] = M::mul_add(x[i], y[i], acc[i]);
        }
    }
    for (i, (x, y)) in ar.iter().zip(br).enumerate() {
        acc[i] = M::mul_add(*x, *y, acc[i]);
    }
    sum_lanes(acc)
}

/// y += a·x over equal-length slices.
#[inline(always)]
pub fn axpy<M: MulAdd>(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi = M::mul_add(a, *xi, *yi);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm() {
        exp_close::<Separate>();
        exp_close::<Fused>();
    }

    fn exp_close<M: MulAdd>() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let got = exp::<M>(x) as f64;
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
