//! bf16 products on Intel's AMX tiles (Sapphire, Emerald and Granite Rapids): `tdpbf16ps`
//! multiplies a 16 × 32 bf16 tile by a 32 × 16 one into 16 × 16 fp32 sums, 16 times the
//! products of a 512-bit `vdpbf16ps`, in the same operand layout: each u32 holds the two bf16
//! values that meet in one product pair, as [`super::avx512_bf16`] packs them. So the bf16
//! tiles of the forward keep their packing and only their two products change.
//!
//! The products go through the [`Tiles`] trait: [`Hw`] issues the instructions (inline
//! assembly; the standard library's AMX intrinsics are not stable), [`Emulated`] computes what
//! they compute, so that the blocking below is tested on machines without AMX (CI has none).
//!
//! Where a product's shape does not fill whole tiles (rows not a multiple of 16, a reduction
//! not a multiple of 16 pairs, a left operand read transposed), its rest runs on
//! [`super::avx512_bf16::gemm`].
//!
//! The products and the tile unit are x86-64 code; elsewhere the module is built for its
//! constants and switches alone ([`TILE`], [`emulated`], [`os_permits`]), which the kernel
//! family's checks read on every target.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_imports))]

use super::microkernel::{product_fits, Strided};

/// Rows of a tile, and 4-byte columns of a tile row (64 bytes).
pub const TILE: usize = 16;

/// The tile registers [`gemm`] uses: sums 0-3 (2 × 2 blocks of 16 × 16), left operands 4-5,
/// right operands 6-7.
const SUM: usize = 0;
const LEFT: usize = 4;
const RIGHT: usize = 6;

/// The operations of the tile unit that [`gemm`] needs. Tile numbers are 0-7; every tile is
/// configured as 16 rows of 64 bytes.
pub trait Tiles {
    /// Configures the tiles (once a product, on the calling thread).
    ///
    /// # Safety
    /// [`Hw`]: the CPU has AMX and the process has permission to use it ([`os_permits`]).
    unsafe fn begin(&mut self);
    /// # Safety
    /// Between `begin` and `end`.
    unsafe fn zero(&mut self, t: usize);
    /// Loads tile `t` from 16 rows of 64 bytes, `stride` bytes apart.
    ///
    /// # Safety
    /// Between `begin` and `end`; the rows readable.
    unsafe fn load(&mut self, t: usize, src: *const u8, stride: usize);
    /// `c += a · b` over bf16 pairs: `c[m][n] += Σ_k a[m][k].lo·b[k][n].lo + a[m][k].hi·b[k][n].hi`.
    ///
    /// # Safety
    /// Between `begin` and `end`.
    unsafe fn dot(&mut self, c: usize, a: usize, b: usize);
    /// Stores tile `t` as 16 rows of 64 bytes, `stride` bytes apart.
    ///
    /// # Safety
    /// Between `begin` and `end`; the rows writable.
    unsafe fn store(&mut self, t: usize, dst: *mut u8, stride: usize);
    /// Returns the tiles to their initial state (the kernel then need not save them).
    ///
    /// # Safety
    /// After `begin`.
    unsafe fn end(&mut self);
}

/// `out[i][c] = scale · Σ a·b`, or with `ACC` `out[i][c] += Σ a·b` (added term by term on the
/// tile unit, the sum formed first on the rows `vdpbf16ps` takes), over
/// pair-packed operands, as [`super::avx512_bf16::gemm`] defines it: `[m, n, kn2]` = rows (a
/// multiple of `R`), columns (a multiple of 16) and pairs. The rows of whole tiles take the
/// tile unit when `a` is row-major and the pairs fill whole tiles; the rest takes
/// `vdpbf16ps`.
///
/// The caller configures the tiles ([`Tiles::begin`]) and releases them ([`Tiles::end`]):
/// once for all the products of a work item, since `ldtilecfg` and `tilerelease` cost as much
/// as a small product.
///
/// # Safety
/// Needs avx512f+avx512bf16, and the tiles configured (after [`Tiles::begin`], before
/// [`Tiles::end`]).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm<T: Tiles, const ACC: bool>(
    tiles: &mut T,
    a: Strided<u32>,
    b: Strided<u32>,
    out: &mut [f32],
    ldo: usize,
    [m, n, kn2]: [usize; 3],
    scale: f32,
) {
    assert!(product_fits(a, b, out.len(), ldo, [m, n, kn2]));
    let whole = tile_rows(a, m, kn2);
    whole_tiles::<T, ACC>(tiles, a, b, out, ldo, [whole, n, kn2], scale);
    if whole < m {
        let rest = Strided {
            data: &a.data[whole * a.row..],
            ..a
        };
        let out = &mut out[whole * ldo..];
        super::avx512_bf16::gemm::<ACC>(rest, b, out, ldo, [m - whole, n, kn2], scale);
    }
}

/// The rows of a product of `m` rows and `kn2` pairs that whole tiles take.
#[inline(always)]
fn tile_rows(a: Strided<u32>, m: usize, kn2: usize) -> usize {
    if a.col == 1 && kn2 > 0 && kn2.is_multiple_of(TILE) {
        m / TILE * TILE
    } else {
        0
    }
}

/// [`gemm`] for rows `0..m` (a multiple of 16, as [`tile_rows`] gives), all on the tile unit;
/// plain code, which needs no target features of its own.
///
/// # Safety
/// As [`gemm`], whose assertions cover every access.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn whole_tiles<T: Tiles, const ACC: bool>(
    tiles: &mut T,
    a: Strided<u32>,
    b: Strided<u32>,
    out: &mut [f32],
    ldo: usize,
    [m, n, kn2]: [usize; 3],
    scale: f32,
) {
    if m == 0 || kn2 == 0 {
        return;
    }
    debug_assert!(m.is_multiple_of(TILE) && kn2.is_multiple_of(TILE) && a.col == 1);
    let mut r0 = 0;
    while r0 < m {
        let two_rows = r0 + 2 * TILE <= m;
        let mut c0 = 0;
        while c0 < n {
            let two_cols = c0 + 2 * TILE <= n;
            let at = (r0, c0, kn2, scale);
            match (two_rows, two_cols) {
                (true, true) => block::<T, 2, 2, ACC>(tiles, a, b, out, ldo, at),
                (true, false) => block::<T, 2, 1, ACC>(tiles, a, b, out, ldo, at),
                (false, true) => block::<T, 1, 2, ACC>(tiles, a, b, out, ldo, at),
                (false, false) => block::<T, 1, 1, ACC>(tiles, a, b, out, ldo, at),
            }
            c0 += if two_cols { 2 * TILE } else { TILE };
        }
        r0 += if two_rows { 2 * TILE } else { TILE };
    }
}

/// Rows `r0..r0 + 16·MR`, columns `c0..c0 + 16·NR` of [`gemm`], whose assertions cover every
/// access: `MR × NR` sums in tiles across the pairs, stored straight into `out`. With `ACC` the
/// tiles start from `out`'s values (a tile load) instead of zeros; without, the stored sums are
/// then scaled in place. Going through a tile-sized buffer and a scalar copy instead cost as
/// much as the products where the pairs are few (the P·V product of a 64-key tile has two
/// steps of 16 pairs).
#[inline(always)]
unsafe fn block<T: Tiles, const MR: usize, const NR: usize, const ACC: bool>(
    tiles: &mut T,
    a: Strided<u32>,
    b: Strided<u32>,
    out: &mut [f32],
    ldo: usize,
    (r0, c0, kn2, scale): (usize, usize, usize, f32),
) {
    let po = out.as_mut_ptr();
    let sum_at = |i: usize, j: usize| po.add((r0 + TILE * i) * ldo + c0 + TILE * j) as *mut u8;
    for i in 0..MR {
        for j in 0..NR {
            if ACC {
                tiles.load(SUM + i * NR + j, sum_at(i, j), 4 * ldo);
            } else {
                tiles.zero(SUM + i * NR + j);
            }
        }
    }
    let (pa, pb) = (a.data.as_ptr(), b.data.as_ptr());
    for k0 in (0..kn2).step_by(TILE) {
        // Each product right after the loads it needs (left 0, right 0, product, right 1,
        // product, left 1, ...): the tiles are not renamed, so a load waits for the last
        // product that reads its tile, and this order lets the unit start a product while
        // the next operand loads.
        for i in 0..MR {
            let src = pa.add((r0 + TILE * i) * a.row + k0);
            tiles.load(LEFT + i, src as *const u8, 4 * a.row);
            for j in 0..NR {
                if i == 0 {
                    let src = pb.add(k0 * b.row + c0 + TILE * j);
                    tiles.load(RIGHT + j, src as *const u8, 4 * b.row);
                }
                tiles.dot(SUM + i * NR + j, LEFT + i, RIGHT + j);
            }
        }
    }
    for i in 0..MR {
        for j in 0..NR {
            tiles.store(SUM + i * NR + j, sum_at(i, j), 4 * ldo);
        }
    }
    if !ACC && scale != 1.0 {
        for r in r0..r0 + TILE * MR {
            for x in &mut out[r * ldo + c0..][..TILE * NR] {
                *x *= scale;
            }
        }
    }
}

/// The tile unit itself.
pub struct Hw;

/// The tile configuration `ldtilecfg` reads: palette 1, every tile 16 rows of 64 bytes.
#[repr(C, align(64))]
struct Config {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: Config = {
    let mut colsb = [0u16; 16];
    let mut rows = [0u8; 16];
    let mut t = 0;
    while t < 8 {
        colsb[t] = 64;
        rows[t] = TILE as u8;
        t += 1;
    }
    Config {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb,
        rows,
    }
};

/// Expands `$op!(n)` for tile `$t`'s number n: AMX encodes the tile in the instruction.
#[cfg(target_arch = "x86_64")]
macro_rules! with_tile {
    ($t:expr, $op:ident) => {
        match $t {
            0 => $op!(0),
            1 => $op!(1),
            2 => $op!(2),
            3 => $op!(3),
            4 => $op!(4),
            5 => $op!(5),
            6 => $op!(6),
            _ => $op!(7),
        }
    };
}

/// `tdpbf16ps` for the sum, left and right tiles [`gemm`] pairs (sums 0-3, left 4-5, right
/// 6-7).
#[cfg(target_arch = "x86_64")]
macro_rules! dot_tiles {
    ($c:expr, $a:expr, $b:expr; $(($ci:literal, $ai:literal, $bi:literal)),*) => {
        match ($c, $a, $b) {
            $(($ci, $ai, $bi) => std::arch::asm!(
                concat!("tdpbf16ps tmm", $ci, ", tmm", $ai, ", tmm", $bi),
                options(nostack, preserves_flags)
            ),)*
            other => unreachable!("no tile product {other:?}"),
        }
    };
}

#[cfg(target_arch = "x86_64")]
impl Tiles for Hw {
    #[inline(always)]
    unsafe fn begin(&mut self) {
        std::arch::asm!(
            "ldtilecfg [{cfg}]",
            cfg = in(reg) &CONFIG as *const Config,
            options(nostack, preserves_flags, readonly)
        );
    }

    #[inline(always)]
    unsafe fn zero(&mut self, t: usize) {
        macro_rules! zero {
            ($n:literal) => {
                std::arch::asm!(
                    concat!("tilezero tmm", $n),
                    options(nostack, preserves_flags, nomem)
                )
            };
        }
        with_tile!(t, zero)
    }

    #[inline(always)]
    unsafe fn load(&mut self, t: usize, src: *const u8, stride: usize) {
        macro_rules! load {
            ($n:literal) => {
                std::arch::asm!(
                    concat!("tileloadd tmm", $n, ", [{src} + {stride}*1]"),
                    src = in(reg) src,
                    stride = in(reg) stride,
                    options(nostack, preserves_flags, readonly)
                )
            };
        }
        with_tile!(t, load)
    }

    #[inline(always)]
    unsafe fn dot(&mut self, c: usize, a: usize, b: usize) {
        dot_tiles!(c, a, b;
            (0, 4, 6), (0, 4, 7), (0, 5, 6), (0, 5, 7),
            (1, 4, 6), (1, 4, 7), (1, 5, 6), (1, 5, 7),
            (2, 4, 6), (2, 4, 7), (2, 5, 6), (2, 5, 7),
            (3, 4, 6), (3, 4, 7), (3, 5, 6), (3, 5, 7));
    }

    #[inline(always)]
    unsafe fn store(&mut self, t: usize, dst: *mut u8, stride: usize) {
        macro_rules! store {
            ($n:literal) => {
                std::arch::asm!(
                    concat!("tilestored [{dst} + {stride}*1], tmm", $n),
                    dst = in(reg) dst,
                    stride = in(reg) stride,
                    options(nostack, preserves_flags)
                )
            };
        }
        with_tile!(t, store)
    }

    #[inline(always)]
    unsafe fn end(&mut self) {
        std::arch::asm!("tilerelease", options(nostack, preserves_flags, nomem));
    }
}

/// What the tile unit computes, in plain Rust: each `dot` adds, for every sum and pair, the
/// low halves' product and then the high halves' (fp32 multiply-adds in that order). The
/// hardware may round its sums differently; results agree within fp32 rounding.
pub struct Emulated {
    tiles: [[u32; TILE * TILE]; 8],
    configured: bool,
}

impl Default for Emulated {
    fn default() -> Self {
        Emulated {
            tiles: [[0; TILE * TILE]; 8],
            configured: false,
        }
    }
}

impl Tiles for Emulated {
    unsafe fn begin(&mut self) {
        self.configured = true;
    }

    unsafe fn zero(&mut self, t: usize) {
        assert!(self.configured);
        self.tiles[t] = [0; TILE * TILE];
    }

    unsafe fn load(&mut self, t: usize, src: *const u8, stride: usize) {
        assert!(self.configured);
        for r in 0..TILE {
            let row = src.add(r * stride) as *const u32;
            for c in 0..TILE {
                self.tiles[t][r * TILE + c] = row.add(c).read_unaligned();
            }
        }
    }

    unsafe fn dot(&mut self, c: usize, a: usize, b: usize) {
        assert!(self.configured && c != a && c != b);
        let bf = |x: u32, hi: bool| f32::from_bits(if hi { x & 0xffff_0000 } else { x << 16 });
        let (ta, tb) = (self.tiles[a], self.tiles[b]);
        let tc = &mut self.tiles[c];
        for m in 0..TILE {
            for k in 0..TILE {
                let x = ta[m * TILE + k];
                for n in 0..TILE {
                    let y = tb[k * TILE + n];
                    let mut s = f32::from_bits(tc[m * TILE + n]);
                    s = bf(x, false).mul_add(bf(y, false), s);
                    s = bf(x, true).mul_add(bf(y, true), s);
                    tc[m * TILE + n] = s.to_bits();
                }
            }
        }
    }

    unsafe fn store(&mut self, t: usize, dst: *mut u8, stride: usize) {
        assert!(self.configured);
        for r in 0..TILE {
            let row = dst.add(r * stride) as *mut u32;
            for c in 0..TILE {
                row.add(c).write_unaligned(self.tiles[t][r * TILE + c]);
            }
        }
    }

    unsafe fn end(&mut self) {
        self.configured = false;
    }
}

/// Whether `UFA_AMX_EMULATE=1` asks [`super::Isa::AmxBf16`] to run with the tile unit emulated
/// ([`Emulated`], far slower): the family's code is then tested end to end on CPUs without
/// AMX (`tests/amx_emulated.rs`). Read once.
pub fn emulated() -> bool {
    static EMULATED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *EMULATED.get_or_init(|| std::env::var_os("UFA_AMX_EMULATE").is_some_and(|v| v == "1"))
}

/// Whether Linux lets this process use the tile data registers: they are off until the
/// process asks (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`), and a tile
/// instruction before that is a SIGILL. Asked once; true where the kernel grants it.
pub fn os_permits() -> bool {
    static GRANTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *GRANTED.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
            const XFEATURE_XTILEDATA: usize = 18;
            const SYS_ARCH_PRCTL: isize = 158;
            let ret: isize;
            // SAFETY: arch_prctl with this request only changes which register states the
            // kernel lets the process enable; it reads and writes no memory of ours.
            unsafe {
                std::arch::asm!(
                    "syscall",
                    inlateout("rax") SYS_ARCH_PRCTL => ret,
                    in("rdi") ARCH_REQ_XCOMP_PERM,
                    in("rsi") XFEATURE_XTILEDATA,
                    lateout("rcx") _,
                    lateout("r11") _,
                    options(nostack)
                );
            }
            ret == 0
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        false
    })
}

// The products are checked where they run: x86-64.
#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// A deterministic bf16 value in [-2, 2) from `i` (exact in bf16).
    fn value(i: usize) -> u16 {
        let x = ((i * 2654435761) % 4096) as f32 / 1024.0 - 2.0;
        (x.to_bits() >> 16) as u16
    }

    fn bf(x: u16) -> f64 {
        f32::from_bits((x as u32) << 16) as f64
    }

    /// [`gemm`] on the emulated tile unit against an f64 loop, for shapes with whole and
    /// partial tiles in every dimension, transposed left operands, strides wider than the
    /// data, both accumulation modes: every element within fp32 rounding of the exact sum.
    #[test]
    fn products_on_emulated_tiles_match_f64() {
        // The rows and pairs that whole tiles leave take vdpbf16ps: without it, only the
        // shapes that whole tiles fill are checked.
        let full = std::arch::is_x86_feature_detected!("avx512bf16");
        assert_eq!(check_shapes::<Emulated>(full), if full { 32 } else { 10 });
    }

    /// The same on the tile unit itself, where the CPU has AMX (`cargo test -- --ignored
    /// amx`; CI and the development machines have none). Not finding it is a failure.
    #[test]
    #[ignore = "needs a CPU with AMX"]
    fn products_on_amx_tiles_match_f64() {
        assert!(
            super::super::Isa::AmxBf16.is_supported(),
            "no usable AMX here: {:?}, permission {}",
            super::super::amx(),
            os_permits()
        );
        assert_eq!(check_shapes::<Hw>(true), 32);
    }

    /// Checks [`gemm`] over the test's shapes; returns how many it checked.
    fn check_shapes<T: Tiles + Make>(full: bool) -> usize {
        let mut checked = 0;
        for &(m, n, kn2) in &[
            (16, 16, 16),
            (32, 32, 32),
            (64, 64, 32),
            (48, 80, 16),
            (64, 128, 64),
            (20, 48, 32),
            (36, 32, 40),
            (8, 16, 16),
        ] {
            for transposed in [false, true] {
                let tiles_only = !transposed && m % 16 == 0 && kn2 % 16 == 0;
                if !full && !tiles_only {
                    continue;
                }
                for acc in [false, true] {
                    check::<T>(m, n, kn2, transposed, acc, full);
                    checked += 1;
                }
            }
        }
        checked
    }

    /// A fresh tile unit.
    trait Make {
        fn make() -> Self;
    }

    impl Make for Emulated {
        fn make() -> Self {
            Emulated::default()
        }
    }

    impl Make for Hw {
        fn make() -> Self {
            Hw
        }
    }

    fn check<T: Tiles + Make>(
        m: usize,
        n: usize,
        kn2: usize,
        transposed: bool,
        acc: bool,
        full: bool,
    ) {
        let (lda, ldb, ldo) = (kn2 + 3, n + 16, n + 5);
        // Left operand: m × kn2 pairs, row-major with `lda` or its transpose (kn2 × m storage).
        let a_len = if transposed { kn2 * (m + 2) } else { m * lda };
        let a: Vec<u32> = (0..a_len)
            .map(|i| value(2 * i) as u32 | (value(2 * i + 1) as u32) << 16)
            .collect();
        let a_at = |i: usize, k: usize| {
            if transposed {
                a[k * (m + 2) + i]
            } else {
                a[i * lda + k]
            }
        };
        let b: Vec<u32> = (0..kn2 * ldb)
            .map(|i| value(7 * i + 3) as u32 | (value(7 * i + 5) as u32) << 16)
            .collect();
        let init: Vec<f32> = (0..m * ldo).map(|i| (i % 7) as f32 - 3.0).collect();
        let mut out = init.clone();
        let sa = if transposed {
            Strided::transposed(&a, m + 2)
        } else {
            Strided::rows(&a, lda)
        };
        let scale = 0.375;
        let (b_op, shape) = (Strided::rows(&b, ldb), [m, n, kn2]);
        let mut tiles = T::make();
        // SAFETY: the emulated unit needs nothing, the real one is checked by the caller;
        // `gemm` runs only where avx512bf16 is.
        unsafe {
            tiles.begin();
            match (full, acc) {
                (true, true) => {
                    gemm_in::<T, true>(&mut tiles, sa, b_op, &mut out, ldo, shape, scale)
                }
                (true, false) => {
                    gemm_in::<T, false>(&mut tiles, sa, b_op, &mut out, ldo, shape, scale)
                }
                (false, true) => {
                    whole_tiles::<_, true>(&mut tiles, sa, b_op, &mut out, ldo, shape, scale)
                }
                (false, false) => {
                    whole_tiles::<_, false>(&mut tiles, sa, b_op, &mut out, ldo, shape, scale)
                }
            }
            tiles.end();
        }
        for i in 0..m {
            for c in 0..ldo {
                let got = out[i * ldo + c] as f64;
                if c >= n {
                    assert_eq!(got, init[i * ldo + c] as f64, "column {c} past n written");
                    continue;
                }
                let (mut sum, mut mag) = (0f64, 0f64);
                for k in 0..kn2 {
                    let (x, y) = (a_at(i, k), b[k * ldb + c]);
                    let p =
                        bf(x as u16) * bf(y as u16) + bf((x >> 16) as u16) * bf((y >> 16) as u16);
                    sum += p;
                    mag += p.abs();
                }
                let want = if acc {
                    init[i * ldo + c] as f64 + sum
                } else {
                    sum * scale as f64
                };
                let tol = 4.0
                    * f32::EPSILON as f64
                    * (mag + init[i * ldo + c].abs() as f64)
                    * (kn2 as f64).sqrt();
                assert!(
                    (got - want).abs() <= tol,
                    "m {m} n {n} kn2 {kn2} transposed {transposed} acc {acc}: ({i}, {c}) = {got}, want {want}"
                );
            }
        }
    }

    /// [`gemm`] compiled with the target features it needs.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx2,fma,f16c")]
    unsafe fn gemm_in<T: Tiles, const ACC: bool>(
        tiles: &mut T,
        a: Strided<u32>,
        b: Strided<u32>,
        out: &mut [f32],
        ldo: usize,
        shape: [usize; 3],
        scale: f32,
    ) {
        gemm::<T, ACC>(tiles, a, b, out, ldo, shape, scale)
    }
}
