//! The CUDA backend's place in the dispatch. Kernels, NVRTC compilation and the driver layer
//! arrive with their own issue; until then a CUDA tensor gets a clear error instead of a crash.

use crate::error::{Error, ErrorKind, Result};
use crate::problem::{BackwardProblem, Problem};

/// Why CUDA cannot run in this build, for `ufa info` and errors.
pub const UNAVAILABLE: &str =
    "this build of ufa has no CUDA backend yet; only CPU tensors can be computed";

pub(crate) struct CudaBackend;

impl CudaBackend {
    pub fn new() -> Self {
        CudaBackend
    }

    /// Names of the CUDA devices this backend can use, or why there are none.
    pub fn devices(&self) -> std::result::Result<Vec<String>, String> {
        Err(UNAVAILABLE.to_string())
    }

    pub fn forward(&self, p: &Problem) -> Result<()> {
        Err(Error::new(
            ErrorKind::DeviceUnavailable,
            format!("tensors are on {}: {UNAVAILABLE}", p.device),
        ))
    }

    pub fn backward(&self, p: &BackwardProblem) -> Result<()> {
        self.forward(&p.fwd)
    }
}
