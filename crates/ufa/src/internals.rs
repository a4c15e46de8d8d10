//! What ufa's test kit (`crates/ufa-testkit`: the f64 reference, the random cases, `ufa check`)
//! needs from inside the library: the validation the reference shares with the backends, raw
//! element loads, device memory and timing for the GPU suites, and the NVRTC compile reports;
//! and the multiply-add throughput loops the CPU family is chosen with, for
//! `bench/cpu_ceilings.rs`; the count of running CPU workers, for the teardown test.
//! Compiled only with the `testkit` feature; not part of ufa's API and without stability
//! promises.

pub use crate::cpu::live_workers;
#[cfg(target_arch = "x86_64")]
pub use crate::cpu::throughput_loops::{amx_bf16_tiles, dpbf16_zmm, fma_ymm, fma_zmm};
pub use crate::cuda::{
    compile_all_variants, compile_variants, nvrtc_version, off_tile_enabled, release_scratch,
    synchronize, time_ms, tma_fwd_enabled, CompileReport, DeviceBuffer, ModuleReport,
    CACHE_DIR_ENV, NVRTC_PATH_ENV,
};
pub use crate::dtype::load_f64;

use crate::{AttentionParams, Result, TensorView};

/// Validates q, k, v and `params` exactly as a forward call does, so the reference rejects
/// the calls the library rejects (and may then read the dimensions from the shapes).
pub fn validate_forward_inputs(
    q: &TensorView<'_>,
    k: &TensorView<'_>,
    v: &TensorView<'_>,
    params: &AttentionParams<'_>,
) -> Result<()> {
    crate::problem::validate_inputs(q, k, v, params).map(|_| ())
}
