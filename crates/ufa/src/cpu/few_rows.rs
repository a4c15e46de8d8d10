//! The few-rows path of [`super::tile::attend`] (decoding: tiles of one to eight query rows
//! a KV head) in AVX-512 registers, and the same for a job of several KV heads taken key by key
//! ([`super::tile::attend_heads`]). Each K row is read once for all the tile's rows; bf16 and
//! fp16 values are widened in registers (bf16 K instead meets raw bf16 queries in the bf16
//! dot-product instruction, where the family has it); the dot products' partial sums, and for
//! one head the output rows' accumulators, stay in registers across a tile's keys. The portable
//! version (`dot` and `axpy` on rows converted into scratch) stores a converted row, a score and
//! an accumulator row to memory for every key: bf16 decoding over [B, H, S, D] read 15 GB/s
//! with it on the 2-core Zen 4 VM, 23 GB/s with this.
//!
//! Taken where head_dim and head_dim_v are multiples of 16 (whole vectors; the others stay on
//! the portable version) and K and V hold f32, bf16 or fp16
//! ([`super::tile::few_rows_in_registers`]).
//!
//! Each instantiation of a row count and element type (`scores_of`, `scores_pairs_of`,
//! `add_rows`, `accumulate_heads_of`) is a function of its own, compiled for AVX-512 and never
//! inlined: inlined, all of them landed in the one function per kernel family that runs a
//! forward job, whose optimisation then took 230 s of one core (the whole crate's build was 4
//! minutes, and CI builds it four times). A call costs nothing next to a tile of keys.

use crate::dtype::DType;
use std::arch::x86_64::*;

/// How a row's values are read as fp32, 16 at a time.
trait Row16 {
    /// Values `16·i..16·i + 16` of the row at `row`.
    ///
    /// # Safety
    /// They must be readable; needs avx512f.
    unsafe fn load(row: *const u8, i: usize) -> __m512;
}

struct F32;
struct Bf16;
struct F16;

impl Row16 for F32 {
    #[inline(always)]
    unsafe fn load(row: *const u8, i: usize) -> __m512 {
        _mm512_loadu_ps((row as *const f32).add(16 * i))
    }
}

impl Row16 for Bf16 {
    /// bf16 is the top half of an f32: widen and shift.
    #[inline(always)]
    unsafe fn load(row: *const u8, i: usize) -> __m512 {
        let h = _mm256_loadu_si256((row as *const u16).add(16 * i) as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }
}

impl Row16 for F16 {
    #[inline(always)]
    unsafe fn load(row: *const u8, i: usize) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(
            (row as *const u16).add(16 * i) as *const __m256i
        ))
    }
}

/// What the caller does before a key's rows are read (its prefetching): a trait with an
/// always-inlined method rather than a closure, which is compiled apart, without the caller's
/// AVX-512, unless the compiler inlines it (it did not: a call and a `vzeroupper` a key).
///
/// A loop over a job's heads asks for head `h`'s hints of its keys with head `h`'s work, so
/// that the hints go out spread among the arithmetic. Issued all at once, a step's
/// hints (up to a thousand cache lines before the V rows of 32 keys) filled the core's miss
/// buffers and held its loads until they had drained, so that memory and arithmetic took
/// turns: bf16 grouped-query decoding over 128 MiB, B8, 32/8 heads, 4k keys, 2-core Zen 4,
/// from Python, 7.3 ms best before and 4.9 after (1.5x; 27.5 GB/s of a ~34 GB/s read). A
/// head's share is its row, an address away: cutting a key's span of every head into even
/// shares took divisions a call, and at a call per key, head and column step they cost the
/// KV-cache step (D1) 10-15%.
pub trait Ahead {
    /// Key `jj`'s hints for head `head` of a job of KV heads (0 in a job of one).
    fn ahead(&self, jj: usize, head: usize);
}

/// Nothing to do.
impl Ahead for () {
    #[inline(always)]
    fn ahead(&self, _: usize, _: usize) {}
}

/// The K (or V) rows of a job's KV heads: `rows[jj]` addresses key `jj` of the first head;
/// head `h`'s row lies `h · step` bytes after it.
#[derive(Clone, Copy)]
pub struct HeadRows<'a> {
    pub rows: &'a [*const u8],
    pub step: usize,
}

/// `s_h[r·ld + jj] = q_h,r · K_h,jj` for the `nrows` rows of each head `h` (`q_h` = `qs[h]`,
/// `d` values a row, pre-scaled; `s_h` = `ss[h]`) and its keys in `k` (of type `dtype`, `d`
/// values a row), key by key: for each key, every head's row. `ahead(jj)` runs before key `jj`
/// is read (the caller's prefetch).
///
/// # Safety
/// Needs avx512f; `d` a multiple of 16; `dtype` f32, bf16 or fp16; the rows readable;
/// `1 <= nrows <= 8`; `qs` and `ss` (as many as heads) address `nrows` rows.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub unsafe fn scores(
    dtype: DType,
    nrows: usize,
    d: usize,
    k: HeadRows,
    qs: &[*const f32],
    ss: &[*mut f32],
    ld: usize,
    ahead: impl Ahead,
) {
    macro_rules! rows {
        ($l:ty) => {
            match nrows {
                1 => scores_of::<$l, 1, 4>(d, k, qs, ss, ld, &ahead),
                2 => scores_of::<$l, 2, 4>(d, k, qs, ss, ld, &ahead),
                3 => scores_of::<$l, 3, 4>(d, k, qs, ss, ld, &ahead),
                4 => scores_of::<$l, 4, 4>(d, k, qs, ss, ld, &ahead),
                5 => scores_of::<$l, 5, 2>(d, k, qs, ss, ld, &ahead),
                6 => scores_of::<$l, 6, 2>(d, k, qs, ss, ld, &ahead),
                7 => scores_of::<$l, 7, 2>(d, k, qs, ss, ld, &ahead),
                _ => scores_of::<$l, 8, 2>(d, k, qs, ss, ld, &ahead),
            }
        };
    }
    match dtype {
        DType::BF16 => rows!(Bf16),
        DType::F16 => rows!(F16),
        _ => rows!(F32),
    }
}

/// [`scores`] for `NR` rows, `KB` keys at a time (then one at a time): one accumulator a
/// row and key, summed across lanes at the end. A job of heads then reads `KB` streams of
/// rows, each a key's rows of all heads (see [`super::tile::attend_heads`]), and each
/// query vector loaded serves `KB` keys.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[inline(never)]
unsafe fn scores_of<L: Row16, const NR: usize, const KB: usize>(
    d: usize,
    k: HeadRows,
    qs: &[*const f32],
    ss: &[*mut f32],
    ld: usize,
    ahead: &impl Ahead,
) {
    let n = k.rows.len();
    let mut jj = 0;
    // One head's rows are one stream already; read key by key, its loads go in address order
    // (4 keys at a time read them at 0.75-0.8x the rate, 2-core Zen 4, [B, H, S, D] f32, one
    // row). More rows are bound by the arithmetic: there each query vector loaded serves KB
    // keys (see [`one_key_at_a_time`]).
    let one_key = one_key_at_a_time(NR, k.step);
    while !one_key && jj + KB <= n {
        scores_keys::<L, NR, KB>(d, k, jj, qs, ss, ld, ahead);
        jj += KB;
    }
    while jj < n {
        scores_keys::<L, NR, 1>(d, k, jj, qs, ss, ld, ahead);
        jj += 1;
    }
}

/// Whether the scores of `nrows` rows a head take keys one at a time, given the byte `step`
/// between a key's rows of consecutive heads (0: a job of one head). One head's rows are one
/// stream, read in address order key by key, and with one or two rows the memory is the bound.
/// With more rows (grouped-query decoding) the arithmetic is: re-loading the queries for every
/// key cost about 5% of a decoding step (2-core Xeon, family 6 model 207, bf16, 16/2 heads over
/// 8k keys with the FMA scores: 573 against 544 µs, three interleaved rounds).
#[inline(always)]
fn one_key_at_a_time(nrows: usize, step: usize) -> bool {
    step == 0 && nrows <= 2
}

/// Scores of keys `jj..jj + KB` for every head.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn scores_keys<L: Row16, const NR: usize, const KB: usize>(
    d: usize,
    k: HeadRows,
    jj: usize,
    qs: &[*const f32],
    ss: &[*mut f32],
    ld: usize,
    ahead: &impl Ahead,
) {
    for (h, (&q, &s)) in qs.iter().zip(ss).enumerate() {
        for x in 0..KB {
            ahead.ahead(jj + x, h);
        }
        let mut kh = [std::ptr::null::<u8>(); KB];
        for (x, row) in kh.iter_mut().enumerate() {
            *row = k.rows[jj + x].add(h * k.step);
        }
        let mut acc = [[_mm512_setzero_ps(); KB]; NR];
        for i in 0..d / 16 {
            // Plain loops: `std::array::from_fn` was left a call here, its vectors on the stack.
            let mut kv = [_mm512_setzero_ps(); KB];
            for (v, &row) in kv.iter_mut().zip(&kh) {
                *v = L::load(row, i);
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let qv = _mm512_loadu_ps(q.add(r * d + 16 * i));
                for (a, kv) in acc.iter_mut().zip(&kv) {
                    *a = _mm512_fmadd_ps(qv, *kv, *a);
                }
            }
        }
        store_sums(&acc, s.add(jj), ld, 1.0);
    }
}

/// [`scores`] for bf16 K with the bf16 dot-product instruction (`vdpbf16ps`): each row's raw
/// bf16 query, pair-packed (`qs[h]`: `nrows` rows of `d / 2` u32, as
/// [`super::avx512_bf16::pack_row_pairs`] packs them), against K rows read as they lie, the
/// sums times `scale`. One instruction takes 32 products where widening K took five (a load,
/// two widenings, two shifts and two multiply-adds), which left bf16 decoding short of
/// the memory's speed (B1, 32 heads, 256 keys in cache: 23 against f32's 40 GB/s a core).
/// The products are exact in fp32 as before; the sums are rounded once a pair.
///
/// # Safety
/// As [`scores`]; needs avx512bf16; `dtype` bf16.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub unsafe fn scores_pairs(
    nrows: usize,
    d: usize,
    k: HeadRows,
    qs: &[*const u32],
    ss: &[*mut f32],
    ld: usize,
    scale: f32,
    ahead: impl Ahead,
) {
    let args = (d, k, qs, ss, ld, scale);
    match nrows {
        1 => scores_pairs_of::<1, 4>(args, &ahead),
        2 => scores_pairs_of::<2, 4>(args, &ahead),
        3 => scores_pairs_of::<3, 4>(args, &ahead),
        4 => scores_pairs_of::<4, 4>(args, &ahead),
        5 => scores_pairs_of::<5, 2>(args, &ahead),
        6 => scores_pairs_of::<6, 2>(args, &ahead),
        7 => scores_pairs_of::<7, 2>(args, &ahead),
        _ => scores_pairs_of::<8, 2>(args, &ahead),
    }
}

type PairArgs<'a> = (
    usize,
    HeadRows<'a>,
    &'a [*const u32],
    &'a [*mut f32],
    usize,
    f32,
);

/// [`scores_pairs`] for `NR` rows, keys taken as [`scores_of`] takes them.
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx2,fma,f16c")]
#[inline(never)]
unsafe fn scores_pairs_of<const NR: usize, const KB: usize>(args: PairArgs, ahead: &impl Ahead) {
    let n = args.1.rows.len();
    let mut jj = 0;
    let one_key = one_key_at_a_time(NR, args.1.step);
    while !one_key && jj + KB <= n {
        scores_pairs_keys::<NR, KB>(args, jj, ahead);
        jj += KB;
    }
    while jj < n {
        scores_pairs_keys::<NR, 1>(args, jj, ahead);
        jj += 1;
    }
}

/// 32 bf16 values (16 pairs) at `at`, or 16 (the rest of a row whose length is an odd multiple
/// of 16) with zeros after them.
#[inline(always)]
unsafe fn pairs(at: *const u8, whole: bool) -> __m512bh {
    let x = if whole {
        _mm512_loadu_si512(at as *const _)
    } else {
        _mm512_zextsi256_si512(_mm256_loadu_si256(at as *const __m256i))
    };
    std::mem::transmute::<__m512i, __m512bh>(x)
}

#[inline(always)]
unsafe fn scores_pairs_keys<const NR: usize, const KB: usize>(
    (d, k, qs, ss, ld, scale): PairArgs,
    jj: usize,
    ahead: &impl Ahead,
) {
    let d2 = d / 2;
    for (h, (&q, &s)) in qs.iter().zip(ss).enumerate() {
        for x in 0..KB {
            ahead.ahead(jj + x, h);
        }
        let mut kh = [std::ptr::null::<u8>(); KB];
        for (x, row) in kh.iter_mut().enumerate() {
            *row = k.rows[jj + x].add(h * k.step);
        }
        let mut acc = [[_mm512_setzero_ps(); KB]; NR];
        // 64 bytes (32 values) a step; a last step of 32 bytes where d is an odd multiple of 16.
        for i in 0..d.div_ceil(32) {
            let whole = 32 * (i + 1) <= d;
            let mut kv = [std::mem::transmute::<__m512i, __m512bh>(_mm512_setzero_si512()); KB];
            for (v, &row) in kv.iter_mut().zip(&kh) {
                *v = pairs(row.add(64 * i), whole);
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let qv = pairs(q.add(r * d2 + 16 * i) as *const u8, whole);
                for (a, kv) in acc.iter_mut().zip(&kv) {
                    *a = _mm512_dpbf16_ps(*a, qv, *kv);
                }
            }
        }
        store_sums(&acc, s.add(jj), ld, scale);
    }
}

/// The sums of the lanes of `a`, `b`, `c` and `d`, in that order, in the first four lanes.
/// Every vector's 16 lanes are added in one fixed order, whichever vectors it is summed with,
/// so that a score is the same bits whether its key was taken alone or with others (the jobs
/// of a call, and so the groupings, follow the thread count). Ten instructions for four sums,
/// where a sum on its own took about nine: with four query rows (GQA decoding) the sums were
/// most of the work of the scores.
#[inline(always)]
unsafe fn sums4(a: __m512, b: __m512, c: __m512, d: __m512) -> __m128 {
    // In each 128-bit lane L: [a0+a2, b0+b2, a1+a3, b1+b3] (indices within the lane).
    let ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    let cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    let (ab, cd) = (_mm512_castps_pd(ab), _mm512_castps_pd(cd));
    // Lane L: [A_L, B_L, C_L, D_L], each the sum of that vector's four values in lane L.
    let x = _mm512_add_ps(
        _mm512_castpd_ps(_mm512_unpacklo_pd(ab, cd)),
        _mm512_castpd_ps(_mm512_unpackhi_pd(ab, cd)),
    );
    // Lane 0: (x_0 + x_2) + (x_1 + x_3).
    let y = _mm512_add_ps(x, _mm512_shuffle_f32x4::<0b01_00_11_10>(x, x));
    let z = _mm512_add_ps(y, _mm512_shuffle_f32x4::<0b10_11_00_01>(y, y));
    _mm512_castps512_ps128(z)
}

/// Writes `scale` times the lane sum of `acc[r][x]` to `s[r·ld + x]`, four sums at a time.
#[inline(always)]
unsafe fn store_sums<const NR: usize, const KB: usize>(
    acc: &[[__m512; KB]; NR],
    s: *mut f32,
    ld: usize,
    scale: f32,
) {
    let scale = _mm_set1_ps(scale);
    if KB == 4 {
        for (r, a) in acc.iter().enumerate() {
            let v = sums4(a[0], a[1], a[2], a[3]);
            _mm_storeu_ps(s.add(r * ld), _mm_mul_ps(v, scale));
        }
        return;
    }
    // Fewer keys: the sums of several rows in one `sums4`, stored where they belong. Through
    // index arrays on the stack (the general case) they cost as much as the products of eight
    // rows (GQA decoding, 2-core Xeon).
    let zero = _mm512_setzero_ps();
    let at = |r: usize, x: usize| if r < NR { acc[r][x] } else { zero };
    if KB == 2 {
        // Rows r and r + 1: [s(r, 0), s(r, 1), s(r + 1, 0), s(r + 1, 1)].
        for r in (0..NR).step_by(2) {
            let v = _mm_mul_ps(sums4(at(r, 0), at(r, 1), at(r + 1, 0), at(r + 1, 1)), scale);
            let v = _mm_castps_pd(v);
            _mm_storel_pd(s.add(r * ld) as *mut f64, v);
            if r + 1 < NR {
                _mm_storeh_pd(s.add((r + 1) * ld) as *mut f64, v);
            }
        }
        return;
    }
    debug_assert_eq!(KB, 1);
    // One key: four rows at a time, down the key's column.
    for r in (0..NR).step_by(4) {
        let v = _mm_mul_ps(
            sums4(at(r, 0), at(r + 1, 0), at(r + 2, 0), at(r + 3, 0)),
            scale,
        );
        let v: [f32; 4] = std::mem::transmute(v);
        for (t, &x) in v.iter().enumerate().take(NR - r) {
            *s.add((r + t) * ld) = x;
        }
    }
}

/// `acc[r·ldo..][..dv] += Σ_jj p[r·ld + jj] · V_jj` for the one or two rows (`nrows`) of one
/// head and the V rows at `v_rows` (of type `dtype`, `dv <= 128` values each), the
/// accumulators held in registers across the keys, each V row read whole once. (More rows, or
/// longer ones, would need blocks of part of a row: V would be read in pieces with gaps, which
/// the memory serves at a third of a stream's rate; [`accumulate_heads`] serves them.)
/// `ahead(jj)` runs before key `jj` is read.
///
/// # Safety
/// As [`scores`], with `dv` for `d`; `acc` holds `nrows` rows of `ldo >= dv` values.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub unsafe fn accumulate(
    dtype: DType,
    p: &[f32],
    ld: usize,
    nrows: usize,
    v_rows: &[*const u8],
    dv: usize,
    acc: &mut [f32],
    ldo: usize,
    ahead: impl Ahead,
) {
    debug_assert!(nrows <= 2 && dv <= 128);
    debug_assert!(
        acc.len() >= (nrows - 1) * ldo + dv && p.len() >= (nrows - 1) * ld + v_rows.len()
    );
    let args = (p.as_ptr(), ld, v_rows, dv, acc.as_mut_ptr(), ldo);
    macro_rules! rows {
        ($l:ty) => {
            match nrows {
                1 => add_rows::<$l, 1, 8>(args, &ahead),
                _ => add_rows::<$l, 2, 8>(args, &ahead),
            }
        };
    }
    match dtype {
        DType::BF16 => rows!(Bf16),
        DType::F16 => rows!(F16),
        _ => rows!(F32),
    }
}

type AddArgs<'a> = (*const f32, usize, &'a [*const u8], usize, *mut f32, usize);

/// [`accumulate`] for `NR` rows: the first `NV` vectors (a whole row of up to 128 values),
/// then single vectors.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[inline(never)]
unsafe fn add_rows<L: Row16, const NR: usize, const NV: usize>(args: AddArgs, ahead: &impl Ahead) {
    add_vectors::<L, NR, NV>(args, ahead);
}

/// The rows' vectors `NV` at a time (their `NR × NV` accumulators in registers across the
/// keys), then one at a time.
#[inline(always)]
unsafe fn add_vectors<L: Row16, const NR: usize, const NV: usize>(
    args: AddArgs,
    ahead: &impl Ahead,
) {
    let nv = args.3 / 16;
    let mut i = 0;
    while i + NV <= nv {
        add_block::<L, NR, NV>(args, i, i == 0, ahead);
        i += NV;
    }
    while i < nv {
        add_block::<L, NR, 1>(args, i, i == 0, ahead);
        i += 1;
    }
}

/// Vectors `i..i + NV` of the `NR` output rows: `out_r += Σ_jj p_r[jj] · V_jj`.
#[inline(always)]
unsafe fn add_block<L: Row16, const NR: usize, const NV: usize>(
    (p, ld, v_rows, _, out, ldo): AddArgs,
    i: usize,
    prefetch: bool,
    ahead: &impl Ahead,
) {
    let mut a = [[_mm512_setzero_ps(); NV]; NR];
    for (r, a) in a.iter_mut().enumerate() {
        for (x, a) in a.iter_mut().enumerate() {
            *a = _mm512_loadu_ps(out.add(r * ldo + 16 * (i + x)));
        }
    }
    for (jj, &v) in v_rows.iter().enumerate() {
        if prefetch {
            ahead.ahead(jj, 0);
        }
        let mut vv = [_mm512_setzero_ps(); NV];
        for (x, vv) in vv.iter_mut().enumerate() {
            *vv = L::load(v, i + x);
        }
        for (r, a) in a.iter_mut().enumerate() {
            let pj = _mm512_set1_ps(*p.add(r * ld + jj));
            for (a, vv) in a.iter_mut().zip(&vv) {
                *a = _mm512_fmadd_ps(pj, *vv, *a);
            }
        }
    }
    for (r, a) in a.iter().enumerate() {
        for (x, a) in a.iter().enumerate() {
            _mm512_storeu_ps(out.add(r * ldo + 16 * (i + x)), *a);
        }
    }
}

/// `acc_h[r·ldo..][..dv] += Σ_jj p_h[r·ld + jj] · V_h,jj` for the `nrows` (1 to 8) rows of
/// each of a job's heads (`p_h` = `ps[h]`, `acc_h` = `accs[h]`), a few keys at a time: for
/// them, every head's V rows, so that a job of heads reads V in address order and one head's
/// rows are read whole, in order. The accumulators go through memory (L1) once every few keys;
/// each element gets the same multiply-adds in the same order as in [`accumulate`], so the
/// results are the same bits. `ahead(jj)` runs before key `jj` is read.
///
/// # Safety
/// As [`accumulate`] for each head, with any `dv` (a multiple of 16) and `nrows`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub unsafe fn accumulate_heads(
    dtype: DType,
    nrows: usize,
    dv: usize,
    v: HeadRows,
    ps: &[*const f32],
    accs: &[*mut f32],
    ld: usize,
    ldo: usize,
    ahead: impl Ahead,
) {
    macro_rules! rows {
        ($l:ty) => {
            match nrows {
                1 => accumulate_heads_of::<$l, 1, 8>(dv, v, ps, accs, ld, ldo, &ahead),
                2 => accumulate_heads_of::<$l, 2, 8>(dv, v, ps, accs, ld, ldo, &ahead),
                3 => accumulate_heads_of::<$l, 3, 8>(dv, v, ps, accs, ld, ldo, &ahead),
                4 => accumulate_heads_of::<$l, 4, 8>(dv, v, ps, accs, ld, ldo, &ahead),
                5 => accumulate_heads_of::<$l, 5, 8>(dv, v, ps, accs, ld, ldo, &ahead),
                6 => accumulate_heads_of::<$l, 6, 8>(dv, v, ps, accs, ld, ldo, &ahead),
                7 => accumulate_heads_of::<$l, 7, 8>(dv, v, ps, accs, ld, ldo, &ahead),
                _ => accumulate_heads_of::<$l, 8, 8>(dv, v, ps, accs, ld, ldo, &ahead),
            }
        };
    }
    match dtype {
        DType::BF16 => rows!(Bf16),
        DType::F16 => rows!(F16),
        _ => rows!(F32),
    }
}

/// [`accumulate_heads`] for `NR` rows, `KB` keys at a time (then one at a time), as
/// [`scores_of`] reads K.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[inline(never)]
#[allow(clippy::too_many_arguments)]
unsafe fn accumulate_heads_of<L: Row16, const NR: usize, const KB: usize>(
    dv: usize,
    v: HeadRows,
    ps: &[*const f32],
    accs: &[*mut f32],
    ld: usize,
    ldo: usize,
    ahead: &impl Ahead,
) {
    let n = v.rows.len();
    let mut jj = 0;
    while jj + KB <= n {
        accumulate_keys::<L, NR, KB>(dv, v, jj, ps, accs, ld, ldo, ahead);
        jj += KB;
    }
    while jj < n {
        accumulate_keys::<L, NR, 1>(dv, v, jj, ps, accs, ld, ldo, ahead);
        jj += 1;
    }
}

/// Keys `jj..jj + KB` added to every head's accumulators, key after key for each element.
/// Up to two rows, a row's accumulators are read and written once a key block, a whole row at
/// a time. More rows take the row in pieces of `16·CV` columns whose `NR × CV` accumulators
/// stay in registers across the block's keys: eight rows of a whole 128-wide row would need 64
/// registers, and going through L1 instead (a load and a store an FMA) made the stores, not
/// the products, set the pace (GQA decoding with eight query rows a KV head).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn accumulate_keys<L: Row16, const NR: usize, const KB: usize>(
    dv: usize,
    v: HeadRows,
    jj: usize,
    ps: &[*const f32],
    accs: &[*mut f32],
    ld: usize,
    ldo: usize,
    ahead: &impl Ahead,
) {
    for (h, (&p, &acc)) in ps.iter().zip(accs).enumerate() {
        for x in 0..KB {
            ahead.ahead(jj + x, h);
        }
        let mut vh = [std::ptr::null::<u8>(); KB];
        for (x, row) in vh.iter_mut().enumerate() {
            *row = v.rows[jj + x].add(h * v.step);
        }
        // The keys' V rows, `v_rows` of `add_vectors`: each element gets them in key order.
        let args = (p.add(jj), ld, &vh[..], dv, acc, ldo);
        if NR <= 2 {
            add_vectors::<L, NR, 1>(args, &());
        } else if NR <= 4 {
            add_vectors::<L, NR, 4>(args, &());
        } else {
            add_vectors::<L, NR, 2>(args, &());
        }
    }
}
