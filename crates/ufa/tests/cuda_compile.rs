//! Every CUDA kernel variant compiles with NVRTC, with no GPU: for sm_80 every variant, for
//! sm_90a the Hopper kernels and the rest as described at `hopper_needs`. Needs libnvrtc
//! (scripts/test-cuda-compile installs the `nvidia-cuda-nvrtc` wheel and points
//! UFA_NVRTC_PATH at it), so it is ignored in a plain `cargo test`.

use ufa_testkit::cuda::{compile_variants, nvrtc_version};

/// Which variants the sm_90a pass compiles. The mma.sync kernels (`_sm80_`, `_decode_`) are compiled for
/// sm_80 in full; their only sm_90 code (`#if __CUDA_ARCH__ >= 900` in mma.cuh, the
/// backward's reductions of fp32 sums) does not depend on the element type, so on sm_90a the
/// backward is compiled in bf16 only (its fp32 and TF32 builds, added later, had been compiled
/// there too: 132 of the 1085 compile-seconds, 2026-12-06) and the forward kernels, which have
/// none, as the bf16 prefill alone:
/// every head dim, tile and flag set. fp32's TF32 forward and the decoding kernels were 40%
/// of the sm_90a pass (2026-12-04). The warp-specialised forward is compiled in bf16 too: its
/// f16 build differs only in the element conversions and the wgmma type names, which the f16
/// builds of the cp.async Hopper forward compile. Every other kernel is compiled in full.
/// `UFA_COMPILE_EVERY=1` compiles every variant for both.
fn hopper_needs(kernel: &str) -> bool {
    std::env::var_os("UFA_COMPILE_EVERY").is_some()
        || !(kernel.starts_with("ufa_fwd_sm80_f16_")
            || kernel.starts_with("ufa_fwd_sm80_f32_")
            || kernel.starts_with("ufa_fwd_sm80_tf32_")
            || kernel.starts_with("ufa_fwd_decode_bf16_")
            || kernel.starts_with("ufa_bwd_sm80_f16_")
            || kernel.starts_with("ufa_bwd_sm80_f32_")
            || kernel.starts_with("ufa_bwd_sm80_tf32_")
            || kernel.starts_with("ufa_fwd_decode_f16_")
            || kernel.starts_with("ufa_fwd_sm90_tma_f16_"))
}

#[test]
#[ignore = "needs libnvrtc: run scripts/test-cuda-compile"]
fn every_variant_compiles() {
    let v = nvrtc_version().unwrap_or_else(|e| panic!("{e}"));
    let reports = compile_variants(&["sm_80", "sm_90a"], &|arch, kernel| {
        arch != "sm_90a" || hopper_needs(kernel)
    })
    .unwrap_or_else(|e| panic!("{e}"));
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
        // For reading the SASS (cuobjdump -sass) without a GPU.
        if let Ok(dir) = std::env::var("UFA_CUBIN_DUMP") {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(format!("{dir}/{}-{}.cubin", r.kernel, r.arch), &r.cubin).unwrap();
        }
    }
}
