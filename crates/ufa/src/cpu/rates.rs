//! How fast this core runs the two forms of multiply-add the AVX-512 families choose between,
//! measured once a process: 512-bit fp32 FMAs (`vfmadd231ps`) and bf16 dot products
//! (`vdpbf16ps`). Feature flags say what a core can run, not how fast. On Zen 4 a bf16 dot
//! product does twice an FMA's flops a cycle, so bf16 inputs pay their packing back; on Intel's
//! Sapphire and Emerald Rapids cores (no AMX tiles in use) it issues every other cycle while two
//! FMAs issue each cycle, a quarter of the FMAs' instruction rate and half their flops (2-core
//! Xeon, family 6 model 207: 87 against 177 GFLOP/s a core), and bf16 inputs widened to fp32
//! ran the forward 1.56x as fast (W1: 210 against 135 GFLOP/s on 2 threads).
//!
//! Each form runs as 12 independent chains of register-only instructions (more than latency
//! times issue width on either core), in short trials that alternate between the two forms; the
//! fastest trial of each counts, since a trial can only be slowed (by an interrupt, another
//! process, the clock ramping up for 512-bit work), never sped up. The dot products' rate over
//! the FMAs' is 0.49 on the Xeon and 2.0 on Zen 4, and the threshold between the families
//! ([`BF16_DOT_MIN_RATIO`]) lies at least 1.4x from either, so the choice does not change from
//! one process to the next.

use std::sync::OnceLock;

/// Peak rates of one core, GFLOP/s.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rates {
    /// 512-bit fp32 FMAs (32 flops an instruction).
    pub fma_gflops: f64,
    /// 512-bit bf16 dot products (64 flops an instruction).
    pub bf16_dot_gflops: f64,
}

/// A bf16 dot product must do at least this many times an FMA's flops for the bf16 family to
/// be chosen: its operands are packed in pairs and its probabilities rounded to bf16, which
/// costs work and accuracy that equal rates would not pay back.
pub const BF16_DOT_MIN_RATIO: f64 = 1.4;

/// The measured rates, or None where this CPU has no AVX-512 BF16 (then there is no choice to
/// make). Measured on the first call (about half a millisecond), then remembered.
pub fn rates() -> Option<Rates> {
    static RATES: OnceLock<Option<Rates>> = OnceLock::new();
    *RATES.get_or_init(measure)
}

/// Whether bf16 inputs should take the bf16 dot-product kernels on this core (see the module
/// documentation). True where nothing was measured: then the CPU lacks the instructions, and
/// no family that takes them is chosen.
pub fn bf16_dot_pays() -> bool {
    rates().is_none_or(|r| r.bf16_dot_gflops >= BF16_DOT_MIN_RATIO * r.fma_gflops)
}

#[cfg(target_arch = "x86_64")]
fn measure() -> Option<Rates> {
    use std::time::Instant;
    if !(std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bf16"))
    {
        return None;
    }
    // 12 instructions an iteration; a trial of the FMAs takes about 10 µs on either core.
    const ITERS: u64 = 4096;
    const TRIALS: usize = 9;
    let time = |f: unsafe fn(u64)| {
        let t = Instant::now();
        // SAFETY: both features were detected above.
        unsafe { f(ITERS) };
        t.elapsed().as_secs_f64()
    };
    // Warm-up: cores run 512-bit instructions slowly for some microseconds before their clock
    // and power settle.
    for _ in 0..4 {
        time(x86::fma_zmm);
        time(x86::dpbf16_zmm);
    }
    let (mut fma, mut dot) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..TRIALS {
        fma = fma.min(time(x86::fma_zmm));
        dot = dot.min(time(x86::dpbf16_zmm));
    }
    let gflops = |flops_per_instruction: f64, secs: f64| {
        flops_per_instruction * (12 * ITERS) as f64 / secs.max(1e-9) / 1e9
    };
    Some(Rates {
        fma_gflops: gflops(32.0, fma),
        bf16_dot_gflops: gflops(64.0, dot),
    })
}

#[cfg(not(target_arch = "x86_64"))]
fn measure() -> Option<Rates> {
    None
}

/// Register-only throughput loops of the multiply-adds, shared with `bench/cpu_ceilings.rs`
/// (through `ufa::internals`), which reports the machine's ceilings from the same loops.
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::asm;

    /// `$name(iters)`: 12 × `iters` independent `$op`s, each into its own accumulator `$r`0..11
    /// from `$r`12 and `$r`13, all zeroed first (zeros keep every value normal: denormal
    /// results can cost a microcode assist each), so that only the instruction's throughput
    /// limits the loop.
    macro_rules! chains {
        ($(#[$doc:meta])* $name:ident, $features:literal, $op:literal, $r:literal) => {
            $(#[$doc])*
            /// # Safety
            /// The CPU must have the target features.
            #[target_feature(enable = $features)]
            pub unsafe fn $name(iters: u64) {
                asm!(
                    "vxorps xmm0, xmm0, xmm0", "vxorps xmm1, xmm1, xmm1",
                    "vxorps xmm2, xmm2, xmm2", "vxorps xmm3, xmm3, xmm3",
                    "vxorps xmm4, xmm4, xmm4", "vxorps xmm5, xmm5, xmm5",
                    "vxorps xmm6, xmm6, xmm6", "vxorps xmm7, xmm7, xmm7",
                    "vxorps xmm8, xmm8, xmm8", "vxorps xmm9, xmm9, xmm9",
                    "vxorps xmm10, xmm10, xmm10", "vxorps xmm11, xmm11, xmm11",
                    "vxorps xmm12, xmm12, xmm12", "vxorps xmm13, xmm13, xmm13",
                    "2:",
                    concat!($op, " ", $r, "0, ", $r, "12, ", $r, "13"),
                    concat!($op, " ", $r, "1, ", $r, "12, ", $r, "13"),
                    concat!($op, " ", $r, "2, ", $r, "12, ", $r, "13"),
                    concat!($op, " ", $r, "3, ", $r, "12, ", $r, "13"),
                    concat!($op, " ", $r, "4, ", $r, "12, ", $r, "13"),
                    concat!($op, " ", $r, "5, ", $r, "12, ", $r, "13"),
                    concat!($op, " ", $r, "6, ", $r, "12, ", $r, "13"),
                    concat!($op, " ", $r, "7, ", $r, "12, ", $r, "13"),
                    concat!($op, " ", $r, "8, ", $r, "12, ", $r, "13"),
                    concat!($op, " ", $r, "9, ", $r, "12, ", $r, "13"),
                    concat!($op, " ", $r, "10, ", $r, "12, ", $r, "13"),
                    concat!($op, " ", $r, "11, ", $r, "12, ", $r, "13"),
                    "dec {n}",
                    "jnz 2b",
                    "vzeroupper",
                    n = inout(reg) iters.max(1) => _,
                    out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _,
                    out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _,
                    out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
                    out("zmm12") _, out("zmm13") _,
                    options(nomem, nostack),
                );
            }
        };
    }

    chains!(
        /// 12 × `iters` 512-bit fp32 FMAs (16 lanes × 2 flops each).
        fma_zmm, "avx512f", "vfmadd231ps", "zmm"
    );
    #[cfg(feature = "testkit")]
    chains!(
        /// 12 × `iters` 256-bit fp32 FMAs (8 lanes × 2 flops each), for the ceilings alone.
        fma_ymm, "avx2,fma", "vfmadd231ps", "ymm"
    );
    chains!(
        /// 12 × `iters` 512-bit bf16 dot products (16 lanes × 2 pairs × 2 flops each).
        dpbf16_zmm, "avx512f,avx512bf16", "vdpbf16ps", "zmm"
    );

    /// 4 × `iters` bf16 tile products (`tdpbf16ps`: 16 × 16 sums of 32 pairs, 16384 flops
    /// each) into four independent sums, from two left and two right tiles of zeros that
    /// nothing reloads (the kernels' 2 × 2 block, [`super::super::amx::gemm`]), so that the
    /// tile unit's own rate alone limits the loop; for the ceilings alone.
    ///
    /// # Safety
    /// The tile unit must be usable here (`ufa::amx().granted`).
    #[cfg(feature = "testkit")]
    pub unsafe fn amx_bf16_tiles(iters: u64) {
        use super::super::amx::{Hw, Tiles};
        let mut t = Hw;
        t.begin();
        for i in 0..8 {
            t.zero(i);
        }
        for _ in 0..iters.max(1) {
            t.dot(0, 4, 6);
            t.dot(1, 4, 7);
            t.dot(2, 5, 6);
            t.dot(3, 5, 7);
        }
        t.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ceilings' tile loop runs where the tile unit is usable (a missing permission would
    /// be a SIGILL here), and is not offered where it is not.
    #[cfg(all(target_arch = "x86_64", feature = "testkit"))]
    #[test]
    fn the_tile_loop_runs_where_the_tile_unit_is_usable() {
        let a = super::super::amx();
        assert!(!a.granted || (a.cpu && a.os), "{a:?}");
        if a.granted {
            // SAFETY: the tile unit is usable.
            unsafe { x86::amx_bf16_tiles(1000) };
        }
    }

    #[test]
    fn rates_are_measured_where_the_instructions_exist() {
        #[cfg(target_arch = "x86_64")]
        let has = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16");
        #[cfg(not(target_arch = "x86_64"))]
        let has = false;
        match rates() {
            Some(r) => {
                assert!(has);
                // Any core with AVX-512 runs well over 1 GFLOP/s; both forms, however slow,
                // finish in a finite time.
                assert!(r.fma_gflops > 1.0 && r.fma_gflops.is_finite(), "{r:?}");
                assert!(
                    r.bf16_dot_gflops > 1.0 && r.bf16_dot_gflops.is_finite(),
                    "{r:?}"
                );
                // Remembered, not measured again.
                assert_eq!(rates(), Some(r));
            }
            None => assert!(!has),
        }
    }
}
