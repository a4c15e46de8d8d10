//! Where a tensor's memory lives.

use std::fmt;

/// The device of a tensor; the backend that runs a call is chosen from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    /// Host memory, computed by the CPU backend.
    #[default]
    Cpu,
    /// Memory of the CUDA device with this ordinal.
    Cuda(u32),
}

impl Device {
    /// Where the memory at `ptr` is, as far as the CPU can tell: `Cuda(n)` for memory of CUDA
    /// device `n` that the CPU cannot read (`cudaMalloc`, `cuMemAlloc`), `Cpu` for everything
    /// else (pageable, pinned or managed host memory). A process that has not loaded the CUDA
    /// driver has no device memory, so this costs no driver load there. For entry points that
    /// take raw pointers (the C ABI): a device pointer declared as host memory is run on its
    /// device or refused, never read by the CPU.
    pub fn of_memory(ptr: *const std::ffi::c_void) -> Device {
        crate::cuda::device_memory_ordinal(ptr).map_or(Device::Cpu, Device::Cuda)
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}
