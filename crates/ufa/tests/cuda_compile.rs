//! Every CUDA kernel variant compiles with NVRTC for sm_80 and sm_90a, with no GPU. Needs
//! libnvrtc (scripts/test-cuda-compile installs the `nvidia-cuda-nvrtc` wheel and points
//! UFA_NVRTC_PATH at it), so it is ignored in a plain `cargo test`.

use ufa::testing::cuda::{compile_all_variants, nvrtc_version};

fn compile_for(arch: &str) {
    let v = nvrtc_version().unwrap_or_else(|e| panic!("{e}"));
    let reports = compile_all_variants(arch).unwrap_or_else(|e| panic!("{e}"));
    println!("NVRTC {}.{}, {arch}: {} variants", v.0, v.1, reports.len());
    for r in &reports {
        println!(
            "  {:<44} {:>5.2}s {:>7} B  {}",
            r.kernel,
            r.seconds,
            r.cubin.len(),
            r.resources
        );
        assert!(r.cubin.starts_with(b"\x7fELF"));
        // For reading the SASS (cuobjdump -sass) without a GPU.
        if let Ok(dir) = std::env::var("UFA_CUBIN_DUMP") {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(format!("{dir}/{}-{arch}.cubin", r.kernel), &r.cubin).unwrap();
        }
    }
}

#[test]
#[ignore = "needs libnvrtc: run scripts/test-cuda-compile"]
fn every_variant_compiles_for_sm80() {
    compile_for("sm_80");
}

#[test]
#[ignore = "needs libnvrtc: run scripts/test-cuda-compile"]
fn every_variant_compiles_for_sm90a() {
    compile_for("sm_90a");
}
