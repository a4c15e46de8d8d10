//! Instruction sets the CPU kernels are compiled for, and run-time detection of the best one.

use super::math::{Fused, MulAdd, Separate};
use std::fmt;

/// A piece of kernel code written once, generic over how to multiply-add (`M`), the SIMD
/// width in f32 lanes (`C`), whether bf16 scores may be dot products of raw bf16 pairs
/// (`BF16`: the few-rows path of decoding) and whether the register-blocked tiles and the
/// backward pass take them too (`BF16_TILES`, which implies `BF16`). [`run_with`] instantiates it
/// inside a function compiled for the chosen instruction set; everything `call` reaches must be
/// `#[inline(always)]` to inherit those target features.
pub trait KernelFn {
    type Output;
    fn call<M: MulAdd, const C: usize, const BF16: bool, const BF16_TILES: bool, const AMX: bool>(
        self,
    ) -> Self::Output;
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx2,fma,f16c")]
unsafe fn run_avx512bf16<F: KernelFn>(f: F) -> F::Output {
    f.call::<Fused, 64, true, true, false>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx2,fma,f16c")]
unsafe fn run_amxbf16<F: KernelFn>(f: F) -> F::Output {
    f.call::<Fused, 64, true, false, true>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx2,fma,f16c")]
unsafe fn run_avx512bf16_decode<F: KernelFn>(f: F) -> F::Output {
    f.call::<Fused, 64, true, false, false>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn run_avx512<F: KernelFn>(f: F) -> F::Output {
    f.call::<Fused, 64, false, false, false>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run_avx2<F: KernelFn>(f: F) -> F::Output {
    f.call::<Fused, 16, false, false, false>()
}

/// Whether code instantiated with `M` and `C` runs inside [`run_avx2`] (avx2 and fma): the one
/// family that takes the hardware FMA with 16 lanes. Its intrinsic paths (microkernel.rs's
/// products, tile.rs's row maxima) rely on this for their target features.
pub const fn avx2_family<M: MulAdd, const C: usize>() -> bool {
    C == 16 && M::FUSED
}

fn run_portable<F: KernelFn>(f: F) -> F::Output {
    f.call::<Separate, 16, false, false, false>()
}

/// Runs `f` compiled for `isa`, which must be supported by this CPU (the backend checks this
/// when it is built).
pub fn run_with<F: KernelFn>(isa: Isa, f: F) -> F::Output {
    match isa {
        // SAFETY: CpuBackend::new only accepts an Isa that `is_supported()` on this CPU.
        #[cfg(target_arch = "x86_64")]
        Isa::AmxBf16 => unsafe { run_amxbf16(f) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Bf16 => unsafe { run_avx512bf16(f) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Bf16Decode => unsafe { run_avx512bf16_decode(f) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { run_avx512(f) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { run_avx2(f) },
        _ => run_portable(f),
    }
}

/// Whether [`Isa::detect`] takes [`Isa::AmxBf16`] where the machine has it (and the operating
/// system grants the tile data): yes. The family differs from [`Isa::Avx512Bf16Decode`] only
/// in the bf16 forward's tiles, which it ran 1.7-3.3x as fast as that family on a 2-core
/// Emerald Rapids VM with AMX (`bench/results/cpu_amx_2026-12-06_intel_emr_2cpu.md`). Its
/// probabilities are rounded to bf16 for P·V as FlashAttention's are, but for V of a vector's
/// columns or fewer, where that missed the error bound and they are split into two bf16
/// parts (`cpu::tile::few_columns`). The tile unit's emulation is never a default.
pub const AMX_BY_DEFAULT: bool = true;

/// A family of CPU kernels. All are built into every binary; one is chosen at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Intel AMX tiles (`tdpbf16ps`) for the bf16 products of the forward's tiles (decoding
    /// with 8 to 16 query rows a KV head included) and of the backward, and
    /// [`Isa::Avx512Bf16Decode`] for everything else: decoding with fewer rows, and fp32. The
    /// default where the tile unit is usable ([`AMX_BY_DEFAULT`]).
    AmxBf16,
    /// x86-64 AVX-512F with the BF16 dot-product instructions: bf16 inputs use them.
    Avx512Bf16,
    /// The same instructions, with bf16 dot products only where a tile has a few rows
    /// (decoding), whose speed is the memory's: the register-blocked tiles and the backward
    /// widen bf16 to fp32 for FMAs. For cores whose FMAs do more flops than their bf16 dot
    /// products (see [`super::rates`]).
    Avx512Bf16Decode,
    /// x86-64 AVX-512F (16-wide fp32 FMA).
    Avx512,
    /// x86-64 AVX2 + FMA (8-wide fp32 FMA).
    Avx2,
    /// Plain Rust that the compiler vectorises for the target's baseline (NEON on aarch64,
    /// SSE2 on x86-64). Used everywhere else.
    Portable,
}

impl Isa {
    /// Every kernel family. [`Isa::detect`] takes the first this machine supports, but for
    /// the choice between the two bf16 families and [`Isa::AmxBf16`] (see [`AMX_BY_DEFAULT`]).
    pub const ALL: [Isa; 6] = [
        Isa::AmxBf16,
        Isa::Avx512Bf16,
        Isa::Avx512Bf16Decode,
        Isa::Avx512,
        Isa::Avx2,
        Isa::Portable,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable if cfg!(target_arch = "aarch64") => "portable (neon)",
            _ => self.c_name().to_str().unwrap_or_default(),
        }
    }

    /// The name that selects this family (`FromStr`, the C ABI's `cpu_isa` option).
    pub fn c_name(self) -> &'static std::ffi::CStr {
        match self {
            Isa::AmxBf16 => c"amx-bf16",
            Isa::Avx512Bf16 => c"avx512bf16",
            Isa::Avx512Bf16Decode => c"avx512bf16-decode",
            Isa::Avx512 => c"avx512",
            Isa::Avx2 => c"avx2",
            Isa::Portable => c"portable",
        }
    }

    /// Whether the family's kernels are compiled for 512-bit registers.
    pub fn avx512(self) -> bool {
        matches!(
            self,
            Isa::AmxBf16 | Isa::Avx512Bf16 | Isa::Avx512Bf16Decode | Isa::Avx512
        )
    }

    /// Whether the forward's register-blocked tiles take bf16 products (dot products or AMX
    /// tiles) on pair-packed operands.
    pub fn bf16_tiles(self) -> bool {
        matches!(self, Isa::Avx512Bf16 | Isa::AmxBf16)
    }

    /// Whether the backward's bf16 products take pairs (dot products, or AMX tiles).
    pub fn bf16_backward(self) -> bool {
        matches!(self, Isa::Avx512Bf16 | Isa::AmxBf16)
    }

    /// Whether this machine can run the kernels of `self`.
    pub fn is_supported(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::AmxBf16 => {
                Isa::Avx512Bf16.is_supported() && (super::amx::emulated() || amx().granted)
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Bf16 | Isa::Avx512Bf16Decode => {
                Isa::Avx512.is_supported() && std::arch::is_x86_feature_detected!("avx512bf16")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            Isa::Portable => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Why a machine takes this family, and what it does with each dtype (for `ufa info`).
    pub fn why(self) -> &'static str {
        match self {
            Isa::AmxBf16 => {
                "AMX tiles (tdpbf16ps) for the bf16 products of the forward's tiles, of decoding \
                 with 8-16 query rows a KV head and of the backward, pairs multiplied exactly \
                 and summed in fp32; AVX-512 with BF16 dot products for decoding with fewer; \
                 fp32 in 16-wide FMAs"
            }
            Isa::Avx512Bf16 => {
                "AVX-512 with BF16 dot products: fp32 in 16-wide FMAs, bf16 inputs through \
                 vdpbf16ps, pairs multiplied exactly and summed in fp32"
            }
            Isa::Avx512Bf16Decode => {
                "AVX-512 with BF16 dot products, taken for decoding (few query rows, the \
                 memory's speed); bf16 tiles and the backward widen bf16 to fp32, since this \
                 core's fp32 FMAs do more flops"
            }
            Isa::Avx512 => {
                "AVX-512 without BF16 dot products: 16-wide FMAs, bf16/f16 inputs converted \
                 to fp32"
            }
            Isa::Avx2 => "AVX2 and FMA, no AVX-512: 8-wide FMAs, half types converted to fp32",
            Isa::Portable => {
                "no AVX2 or AVX-512 kernels for this CPU: plain Rust that the compiler \
                 vectorises for the target"
            }
        }
    }

    /// The fastest kernel family this machine runs: the first of [`Isa::ALL`] it supports,
    /// except that a core whose bf16 dot products are not clearly faster than its fp32 FMAs
    /// (measured: [`super::rates`]) takes [`Isa::Avx512Bf16Decode`].
    pub fn detect() -> Isa {
        let first = Isa::ALL
            .into_iter()
            // The tile unit's emulation (UFA_AMX_EMULATE=1) is for tests, never a default.
            .filter(|&i| i != Isa::AmxBf16 || (AMX_BY_DEFAULT && !super::amx::emulated()))
            .find(|i| i.is_supported())
            .unwrap_or(Isa::Portable);
        if first == Isa::Avx512Bf16 && !super::rates::bf16_dot_pays() {
            return Isa::Avx512Bf16Decode;
        }
        first
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Isa {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let lower = s.to_ascii_lowercase();
        Isa::ALL
            .into_iter()
            .find(|i| i.c_name().to_bytes() == lower.as_bytes())
            .ok_or_else(|| {
                let names: Vec<&str> = Isa::ALL.iter().map(|i| i.name()).collect();
                format!("unknown CPU kernel family '{lower}' ({})", names.join(", "))
            })
    }
}

/// Intel's AMX tiles on this machine: whether the CPU has them with bf16 products, whether
/// the operating system saves their register state (XCR0 bits 17 and 18), and whether it
/// grants the tile data to this process (Linux asks each process to request it; a tile
/// instruction without it is a SIGILL). The tile unit is usable where `granted` holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Amx {
    pub cpu: bool,
    pub os: bool,
    pub granted: bool,
}

/// [`Amx`] from CPUID and XGETBV (the standard library's detection of the AMX features is not
/// stable yet). [`Isa::AmxBf16`] uses them.
pub fn amx() -> Amx {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::__cpuid_count;
        // CPUID exists on every x86-64 CPU (newer toolchains declare `__cpuid_count` safe,
        // older ones that rust-version allows declare it unsafe); leaf 7 only where the
        // maximum leaf allows.
        #[allow(unused_unsafe)]
        let leaf = |l: u32, sub: u32| unsafe { __cpuid_count(l, sub) };
        let cpu = leaf(0, 0).eax >= 7 && {
            let edx = leaf(7, 0).edx;
            edx & (1 << 22) != 0 && edx & (1 << 24) != 0 // AMX-BF16, AMX-TILE
        };
        // SAFETY: XGETBV runs only where CPUID.1:ECX.OSXSAVE (bit 27) says it is there.
        let os = cpu
            && leaf(1, 0).ecx & (1 << 27) != 0
            && unsafe { xcr0() } & (0b11 << 17) == (0b11 << 17);
        // Asked once a process (the amx module), only where the state can be saved.
        let granted = os && super::amx::os_permits();
        Amx { cpu, os, granted }
    }
    #[cfg(not(target_arch = "x86_64"))]
    Amx {
        cpu: false,
        os: false,
        granted: false,
    }
}

/// XCR0, the register state the operating system saves.
///
/// # Safety
/// The CPU must report OSXSAVE.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "xsave")]
unsafe fn xcr0() -> u64 {
    std::arch::x86_64::_xgetbv(0)
}

/// The SIMD-relevant features of this CPU, for `ufa info`.
pub fn cpu_features() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut v = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") {
            v.push("avx512f");
        }
        if has!("avx512bf16") {
            v.push("avx512bf16");
        }
        if has!("avx2") {
            v.push("avx2");
        }
        if has!("fma") {
            v.push("fma");
        }
        if has!("f16c") {
            v.push("f16c");
        }
        if amx().cpu {
            v.push("amx-bf16");
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            v.push("neon");
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_selected_by_its_name() {
        for isa in Isa::ALL {
            let name = isa.c_name().to_str().unwrap();
            assert_eq!(name.parse::<Isa>(), Ok(isa));
            assert_eq!(name.to_ascii_uppercase().parse::<Isa>(), Ok(isa));
        }
        let err = "avx1024".parse::<Isa>().unwrap_err();
        assert!(
            err.contains("avx1024") && err.contains("avx512bf16-decode"),
            "{err}"
        );
    }

    #[test]
    fn detection_takes_amx_then_follows_the_measured_rates() {
        let isa = Isa::detect();
        assert!(isa.is_supported());
        if AMX_BY_DEFAULT && Isa::AmxBf16.is_supported() && !super::super::amx::emulated() {
            // A usable tile unit comes before the measured choice between the other two.
            assert_eq!(isa, Isa::AmxBf16);
        } else if Isa::Avx512Bf16.is_supported() {
            let want = if super::super::rates::bf16_dot_pays() {
                Isa::Avx512Bf16
            } else {
                Isa::Avx512Bf16Decode
            };
            assert_eq!(isa, want, "{:?}", super::super::rates::rates());
        } else {
            // Without the bf16 instructions there is nothing to measure, and the first
            // supported family is taken.
            assert_eq!(super::super::rates::rates(), None);
            assert_eq!(Some(isa), Isa::ALL.into_iter().find(|i| i.is_supported()));
        }
    }
}
