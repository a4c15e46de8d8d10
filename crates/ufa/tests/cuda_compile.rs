//! Every CUDA kernel variant compiles with NVRTC, with no GPU: for sm_80 every variant but the
//! samples `compiled` describes, for sm_90a the Hopper kernels and the rest as described there.
//! Needs libnvrtc (scripts/test-cuda-compile installs the `nvidia-cuda-nvrtc` wheel and points
//! UFA_NVRTC_PATH at it), so it is ignored in a plain `cargo test`.

use ufa_testkit::cuda::{compile_variants, nvrtc_version};

/// Whether the check compiles `kernel` for `arch`. `UFA_COMPILE_EVERY=1` compiles every
/// variant for both.
///
/// - sm_90a, the mma.sync kernels (`_sm80_`, `_decode_`), compiled for sm_80 in full: their
///   only sm_90 code (`#if __CUDA_ARCH__ >= 900` in mma.cuh and common.cuh: the backward's
///   reductions of fp32 sums, the decoding splits' merge within a thread-block cluster) does
///   not depend on the element type or on the flags, so the backward is compiled in bf16, the
///   forward as the bf16 prefill, and the decoding kernel in bf16 at head dim 64, each tile
///   with no flags and with all of them ([`flag_extremes`]). fp32's TF32 forward and the
///   decoding kernels were 40% of the sm_90a pass (2026-12-04); the backward's fp32 and TF32
///   builds, later, another 132 of its 1085 compile-seconds (2026-12-06).
/// - The f16 builds of kernels also built in bf16 (the mma.sync kernels on sm_80, the cp.async
///   Hopper forward on sm_90a): the two differ only in the element conversions and the MMA
///   type names, which no flag changes, so f16 is compiled for each tile with no flags and with
///   all of them, and bf16 with every flag set. Likewise fp32's TF32 mode on sm_80 beside its
///   3xTF32 builds: one product instead of three, which no flag changes (44 compile-seconds
///   saved, 2026-12-06, when CI's whole run took 1218 s of its 20 minutes), and so on sm_90a
///   beside the Hopper fp32 kernel's 3xTF32 builds (fwd_sm90_f32.cu). The fp32 mma.sync
///   kernels on sm_80 likewise (their flags' code is the bf16 builds', compiled with every
///   flag; what is fp32's own, the TF32 tile products, no flag changes: 100 of the check's 570
///   compile-seconds, 2026-12-07, when CI took 1237 s). The
///   warp-specialised Hopper forward is compiled in bf16 alone (its f16 conversions and wgmma
///   type names are those of the cp.async kernel's f16 builds).
///
/// - The bf16 mma.sync prefill and backward on sm_80 (10 tiles each, flags `mod`, `seqs`,
///   `drop`) and the bf16 decoding kernel (11 tiles, `mod`, `seqs`, `paged`): each tile with
///   no flags, each flag alone and all of them ([`flag_singles`]). A pair of flags without
///   the third is the union of the two flags' code, each compiled alone, and what only two
///   flags together compile is compiled with all three (~80 of the check's 700
///   compile-seconds, 2026-12-08, when CI took 1452 s). The warp-specialised
///   backward's f16 builds on sm_90a, as the other f16 builds: no flags and all.
///
/// CI has two cores: compiling everything took 415-455 s of a 20-minute budget (2026-12-05).
fn compiled(arch: &str, kernel: &str) -> bool {
    if std::env::var_os("UFA_COMPILE_EVERY").is_some() {
        return true;
    }
    let starts = |prefixes: &[&str]| prefixes.iter().any(|p| kernel.starts_with(p));
    if arch == "sm_80" {
        if starts(&[
            "ufa_fwd_sm80_bf16_",
            "ufa_bwd_sm80_bf16_",
            "ufa_fwd_decode_bf16_",
        ]) {
            return flag_singles(kernel);
        }
        return !starts(&[
            "ufa_fwd_sm80_f16_",
            "ufa_bwd_sm80_f16_",
            "ufa_fwd_decode_f16_",
            "ufa_fwd_sm80_f32_",
            "ufa_bwd_sm80_f32_",
            "ufa_fwd_sm80_tf32_",
            "ufa_bwd_sm80_tf32_",
        ]) || flag_extremes(kernel);
    }
    if kernel.starts_with("ufa_fwd_decode_bf16_d64_") {
        return flag_extremes(kernel);
    }
    if starts(&[
        "ufa_fwd_sm80_f16_",
        "ufa_fwd_sm80_f32_",
        "ufa_fwd_sm80_tf32_",
        "ufa_fwd_decode_bf16_",
        "ufa_fwd_decode_f16_",
        "ufa_bwd_sm80_f16_",
        "ufa_bwd_sm80_f32_",
        "ufa_bwd_sm80_tf32_",
        "ufa_fwd_sm90_tma_f16_",
    ]) {
        return false;
    }
    // The Hopper fp32 kernel with every flag set at head dim 128 (the most registers); at the
    // others, whose code differs in loop counts and tile offsets alone, no flags and all.
    if kernel.starts_with("ufa_fwd_sm90_f32_") && !kernel.starts_with("ufa_fwd_sm90_f32_d128_") {
        return flag_extremes(kernel);
    }
    !starts(&[
        "ufa_fwd_sm80_bf16_",
        "ufa_bwd_sm80_bf16_",
        "ufa_fwd_sm90_f16_",
        "ufa_fwd_sm90_tf32_",
        "ufa_bwd_sm90_f16_",
    ]) || flag_extremes(kernel)
}

/// The flags a variant name may carry, as `_flag` parts after its tile.
const FLAGS: [&str; 4] = ["mod", "seqs", "paged", "drop"];

/// Whether `kernel` carries none of [`FLAGS`] or every flag its family takes (the prefill
/// kernels take no `paged` but the cp.async Hopper forward, the decoding kernels no `drop`):
/// per tile, the variant with every flag's code path off and the one with all of them on.
fn flag_extremes(kernel: &str) -> bool {
    let has = |f: &str| kernel.split('_').any(|part| part == f);
    let taken: Vec<&str> = FLAGS
        .into_iter()
        .filter(|&f| match f {
            "paged" => ["ufa_fwd_decode_", "ufa_fwd_sm90_f16_", "ufa_fwd_sm90_bf16_"]
                .iter()
                .any(|p| kernel.starts_with(p)),
            "drop" => !kernel.starts_with("ufa_fwd_decode_"),
            _ => true,
        })
        .collect();
    let n = FLAGS.iter().filter(|f| has(f)).count();
    n == 0 || n == taken.len()
}

/// Whether `kernel` carries no flag, one, or every flag its family takes: per tile, each flag's
/// code path alone beside none and all of them. `paged` comes with `seqs` (a paged cache is
/// read through the sequences' metadata), so the two together are `paged` alone.
fn flag_singles(kernel: &str) -> bool {
    let has = |f: &str| kernel.split('_').any(|part| part == f);
    let n = FLAGS.iter().filter(|f| has(f)).count() - usize::from(has("paged"));
    n <= 1 || flag_extremes(kernel)
}

#[test]
#[ignore = "needs libnvrtc: run scripts/test-cuda-compile"]
fn every_variant_compiles() {
    let v = nvrtc_version().unwrap_or_else(|e| panic!("{e}"));
    let reports =
        compile_variants(&["sm_80", "sm_90a"], &compiled).unwrap_or_else(|e| panic!("{e}"));
    println!("NVRTC {}.{}: {} variants", v.0, v.1, reports.len());
    for r in &reports {
        println!(
            "  {:<7} {:<50} {:>5.2}s {:>7} B  {}",
            r.arch,
            r.kernel,
            r.seconds,
            r.cubin.len(),
            r.resources
        );
        assert!(r.cubin.starts_with(b"\x7fELF"));
        // The streaming row kernels' launch bound (RowKernel::min_blocks) leaves them the
        // registers they need: 32 bytes spilled cost the row statistics 11% (H100).
        if r.kernel == "ufa_bwd_preprocess" || r.kernel == "ufa_bwd_convert_dq" {
            let spills = r.resources.contains(" 0 bytes spill stores");
            assert!(spills, "{} {} spills: {}", r.arch, r.kernel, r.resources);
        }
        // For reading the SASS (cuobjdump -sass) without a GPU.
        if let Ok(dir) = std::env::var("UFA_CUBIN_DUMP") {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(format!("{dir}/{}-{}.cubin", r.kernel, r.arch), &r.cubin).unwrap();
        }
    }
}

/// The sampling rule on names of each family: per tile, no flags and every flag.
#[test]
fn flag_extremes_keep_no_flags_and_all_flags() {
    for (kernel, kept) in [
        ("ufa_fwd_sm80_bf16_d96_m128_n64_w4_b2", true),
        (
            "ufa_fwd_sm80_bf16_d96_m128_n64_w8_b1_qreg_mod_seqs_drop",
            true,
        ),
        ("ufa_fwd_sm80_bf16_d96_m128_n64_w4_b2_seqs_drop", false),
        (
            "ufa_bwd_sm80_f16_d64_m64_n128_w8_s2_g442_b1_mod_seqs_drop",
            true,
        ),
        ("ufa_bwd_sm80_f16_d64_m64_n128_w8_s2_g442_b1_mod", false),
        (
            "ufa_fwd_decode_f16_d96_m1_w8_n16_s3_qreg_mod_seqs_paged",
            true,
        ),
        ("ufa_fwd_decode_f16_d96_m1_w4_n32_s3_qreg_seqs", false),
        (
            "ufa_fwd_sm90_f16_d64_m128_n128_s2_b1_mod_seqs_paged_drop",
            true,
        ),
        ("ufa_fwd_sm90_tf32_d64_m128_n64_mod_seqs_drop", true),
        ("ufa_fwd_sm90_tf32_d128_m128_n32", true),
        ("ufa_fwd_sm90_tf32_d128_m128_n32_seqs", false),
        ("ufa_fwd_sm90_f16_d64_m128_n128_s2_b1_mod_seqs_drop", false),
        ("ufa_fwd_sm90_f16_d64_m128_n128_s2_b2", true),
    ] {
        assert_eq!(flag_extremes(kernel), kept, "{kernel}");
    }
    assert!(compiled(
        "sm_80",
        "ufa_fwd_sm80_bf16_d64_m128_n64_w4_b2_qreg_seqs"
    ));
    assert!(!compiled(
        "sm_80",
        "ufa_fwd_sm80_bf16_d64_m128_n64_w4_b2_qreg_seqs_drop"
    ));
    assert!(compiled(
        "sm_80",
        "ufa_bwd_sm80_bf16_d64_m64_n128_w8_s2_g442_b1_mod_seqs_drop"
    ));
    assert!(!compiled(
        "sm_80",
        "ufa_fwd_decode_bf16_d64_m1_w8_n32_s2_qreg_mod_seqs"
    ));
    assert!(compiled(
        "sm_80",
        "ufa_fwd_decode_bf16_d64_m1_w8_n32_s2_qreg_seqs_paged"
    ));
    assert!(compiled(
        "sm_80",
        "ufa_fwd_decode_bf16_d64_m1_w8_n32_s2_qreg_mod_seqs_paged"
    ));
    assert!(!compiled("sm_90a", "ufa_bwd_sm90_f16_d64_m64_n64_b2_mod"));
    assert!(compiled("sm_90a", "ufa_bwd_sm90_bf16_d64_m64_n64_b2_mod"));
    assert!(!compiled(
        "sm_80",
        "ufa_fwd_sm80_f32_d64_m64_n32_w4_b2_seqs"
    ));
    assert!(compiled(
        "sm_80",
        "ufa_fwd_sm80_f32_d64_m64_n32_w4_b2_mod_seqs_drop"
    ));
    assert!(compiled("sm_90a", "ufa_fwd_sm90_f32_d128_m128_n32_mod"));
    assert!(!compiled("sm_90a", "ufa_fwd_sm90_f32_d64_m128_n64_mod"));
    assert!(compiled(
        "sm_90a",
        "ufa_fwd_sm90_f32_d96_m128_n32_mod_seqs_drop"
    ));
    assert!(!compiled(
        "sm_90a",
        "ufa_bwd_sm80_tf32_d64_m64_n128_w8_s2_g442_b1"
    ));
    assert!(compiled("sm_90a", "ufa_bwd_sm90_bf16_d128"));
}
