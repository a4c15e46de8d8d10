//! The CUDA driver API as ufa uses it: devices, the primary context, pointer checks, modules
//! and launches, plus the few memory calls the tests and benchmarks need. Each call goes
//! through cudarc's `result` layer and comes back as a ufa [`Error`].

use crate::error::{Error, ErrorKind, Result};
use cudarc::driver::{result as cu, sys};
use std::ffi::{c_void, CString};
use std::sync::OnceLock;

pub(crate) use sys::{CUdeviceptr, CUfunction, CUstream};

fn driver_error(what: &str, e: cu::DriverError) -> Error {
    let text = e
        .error_string()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Running out of device memory is the caller's to handle (free memory, smaller batches),
    // so it keeps its own kind.
    let kind = match e.0 {
        sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => ErrorKind::OutOfMemory,
        _ => ErrorKind::Backend,
    };
    Error::new(kind, format!("{what} failed: {:?} ({text})", e.0))
}

/// One CUDA device as the driver describes it.
#[derive(Clone, Debug)]
pub(crate) struct DeviceInfo {
    pub ordinal: u32,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub multiprocessors: i32,
    /// Shared memory one block may use after opting in.
    pub max_smem_per_block: u32,
    pub total_memory: usize,
    handle: sys::CUdevice,
}

impl DeviceInfo {
    /// The NVRTC target: the exact architecture, with Hopper's `a` features (wgmma, setmaxnreg).
    pub fn arch(&self) -> String {
        arch_name(self.compute_capability)
    }

    /// Whether kernels may run in thread-block clusters (sm_90+).
    pub fn has_clusters(&self) -> bool {
        self.compute_capability.0 >= 9
    }
}

pub(crate) fn arch_name((major, minor): (i32, i32)) -> String {
    let a = if (major, minor) == (9, 0) { "a" } else { "" };
    format!("sm_{major}{minor}{a}")
}

/// The driver, initialised once per process.
pub(crate) struct Driver {
    pub version: (i32, i32),
    pub devices: Vec<DeviceInfo>,
    contexts: Vec<OnceLock<std::result::Result<usize, Error>>>,
    /// Each device's pool of scratch memory ([`StreamBuffer`]), made on first use; None where
    /// the device has no stream-ordered pools or making one failed (the default pool serves).
    scratch_pools: Vec<OnceLock<Option<usize>>>,
}

/// Bytes of freed scratch memory a device's pool keeps mapped across synchronisations. A pool
/// keeps none by default: every synchronisation (a decoding loop's, a training step's
/// `loss.item()`) unmapped the scratch, and the next call mapped it again. Split decoding calls
/// from Python took 5 us longer each so, 18 against 23-24 us for batch 1 over 8k keys (H100,
/// 2026-12-06, the default pool's threshold raised by hand). 256 MiB holds every decoding
/// call's partial states and most backward workspaces while leaving the rest of the device to
/// the caller's allocator.
const SCRATCH_POOL_KEEP: u64 = 256 << 20;

/// Loads and initialises the driver once; later calls return the same result.
pub(crate) fn driver() -> Result<&'static Driver> {
    static DRIVER: OnceLock<std::result::Result<Driver, Error>> = OnceLock::new();
    DRIVER
        .get_or_init(|| super::no_panic("loading the CUDA driver", init))
        .as_ref()
        .map_err(Clone::clone)
}

fn init() -> Result<Driver> {
    // SAFETY: only tries to open the library.
    if !unsafe { sys::is_culib_present() } {
        return Err(Error::new(
            ErrorKind::DeviceUnavailable,
            "no CUDA driver found (libcuda.so.1 is not on this machine); CUDA tensors need an \
             NVIDIA GPU and its driver",
        ));
    }
    cu::init().map_err(|e| {
        Error::new(
            ErrorKind::DeviceUnavailable,
            format!("the CUDA driver is installed but cuInit failed: {e} (no usable GPU?)"),
        )
    })?;
    let mut v = 0;
    // SAFETY: an out-pointer to a live integer.
    unsafe { sys::cuDriverGetVersion(&mut v) }
        .result()
        .map_err(|e| driver_error("cuDriverGetVersion", e))?;
    let count = cu::device::get_count().map_err(|e| driver_error("cuDeviceGetCount", e))?;
    let mut devices = Vec::new();
    for ordinal in 0..count {
        let handle = cu::device::get(ordinal).map_err(|e| driver_error("cuDeviceGet", e))?;
        let attr = |a| {
            // SAFETY: `handle` came from cuDeviceGet.
            unsafe { cu::device::get_attribute(handle, a) }
                .map_err(|e| driver_error("cuDeviceGetAttribute", e))
        };
        use sys::CUdevice_attribute::*;
        devices.push(DeviceInfo {
            ordinal: ordinal as u32,
            name: cu::device::get_name(handle).map_err(|e| driver_error("cuDeviceGetName", e))?,
            compute_capability: (
                attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
                attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
            ),
            multiprocessors: attr(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
            max_smem_per_block: attr(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as u32,
            // SAFETY: as above.
            total_memory: unsafe { cu::device::total_mem(handle) }
                .map_err(|e| driver_error("cuDeviceTotalMem", e))?,
            handle,
        });
    }
    Ok(Driver {
        version: (v / 1000, (v % 1000) / 10),
        contexts: devices.iter().map(|_| OnceLock::new()).collect(),
        scratch_pools: devices.iter().map(|_| OnceLock::new()).collect(),
        devices,
    })
}

impl Driver {
    pub fn device(&self, ordinal: u32) -> Result<&DeviceInfo> {
        self.devices.get(ordinal as usize).ok_or_else(|| {
            Error::new(
                ErrorKind::DeviceUnavailable,
                format!(
                    "cuda:{ordinal} does not exist: this machine has {} CUDA device(s)",
                    self.devices.len()
                ),
            )
        })
    }

    /// Makes `ordinal`'s primary context (the one PyTorch and the runtime API share) current
    /// on this thread until the guard drops, restoring whatever the caller had current.
    pub fn enter(&self, ordinal: u32) -> Result<ContextGuard> {
        let dev = self.device(ordinal)?;
        let ctx = self.contexts[ordinal as usize]
            .get_or_init(|| {
                // SAFETY: a device handle from cuDeviceGet; retained for the process lifetime.
                unsafe { cu::primary_ctx::retain(dev.handle) }
                    .map(|c| c as usize)
                    .map_err(|e| driver_error("cuDevicePrimaryCtxRetain", e))
            })
            .clone()?;
        // SAFETY: a retained context.
        unsafe { sys::cuCtxPushCurrent_v2(ctx as sys::CUcontext) }
            .result()
            .map_err(|e| driver_error("cuCtxPushCurrent", e))?;
        Ok(ContextGuard { ctx })
    }

    /// `ordinal`'s scratch pool ([`SCRATCH_POOL_KEEP`]), made on first use; None where the
    /// default pool must serve.
    fn scratch_pool(&self, ordinal: u32) -> Option<sys::CUmemoryPool> {
        let slot = self.scratch_pools.get(ordinal as usize)?;
        let pool = slot.get_or_init(|| {
            // SAFETY: plain-data properties, zeroed (no handle types, no maximum size) before
            // the allocation type and the location are set; the pool lives for the process.
            unsafe {
                let mut props: sys::CUmemPoolProps = std::mem::zeroed();
                props.allocType = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
                props.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
                props.location.id = ordinal as i32;
                let pool = cu::mem_pool::create(&props).ok()?;
                let mut keep = SCRATCH_POOL_KEEP;
                let set = cu::mem_pool::set_attribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    &mut keep as *mut u64 as *mut c_void,
                );
                if set.is_err() {
                    let _ = cu::mem_pool::destroy(pool);
                    return None;
                }
                Some(pool as usize)
            }
        });
        pool.map(|p| p as sys::CUmemoryPool)
    }

    /// [`Driver::enter`], then checks that the caller's `stream` belongs to that context: one of
    /// another device or context is an invalid argument here rather than a launch failure after
    /// part of the work was queued. Null and the two special handles (legacy and per-thread
    /// default streams) always do. A destroyed stream is not caught: its handle points into
    /// freed driver memory, and `cuStreamGetCtx` on one segfaulted inside libcuda (H200,
    /// driver 580); the API documents it as undefined behaviour.
    pub fn enter_with_stream(&self, ordinal: u32, stream: CUstream) -> Result<ContextGuard> {
        let guard = self.enter(ordinal)?;
        const LEGACY: usize = 0x1; // CU_STREAM_LEGACY
        const PER_THREAD: usize = 0x2; // CU_STREAM_PER_THREAD
        if matches!(stream as usize, 0 | LEGACY | PER_THREAD) {
            return Ok(guard);
        }
        let mut owner: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: an out-pointer to a live handle; the driver validates the stream handle.
        match unsafe { sys::cuStreamGetCtx(stream, &mut owner) } {
            sys::CUresult::CUDA_SUCCESS if owner as usize == guard.ctx => Ok(guard),
            sys::CUresult::CUDA_SUCCESS => Err(Error::invalid(format!(
                "stream={stream:p} belongs to another CUDA context than cuda:{ordinal}'s \
                 primary context, where the tensors are (pass a stream of that device's \
                 primary context, e.g. torch.cuda.current_stream(), or NULL)"
            ))),
            e => Err(Error::invalid(format!(
                "stream={stream:p} is not a live CUDA stream (cuStreamGetCtx: {e:?}); was it \
                 destroyed?"
            ))),
        }
    }
}

/// Pops the context pushed by [`Driver::enter`].
pub(crate) struct ContextGuard {
    ctx: usize,
}

impl Drop for ContextGuard {
    fn drop(&mut self) {
        let mut old = std::ptr::null_mut();
        // SAFETY: pops exactly the context this guard pushed. Never panics.
        let _ = unsafe { sys::cuCtxPopCurrent_v2(&mut old) };
    }
}

/// One 32-bit attribute of the memory at `ptr` (memory type, managed flag, device ordinal), as
/// the driver knows it; any address may be asked about (unknown ones give an error, not a
/// fault).
fn pointer_attribute(
    ptr: *const c_void,
    attr: sys::CUpointer_attribute,
) -> std::result::Result<i32, sys::CUresult> {
    // Into a zeroed u64, so that a wider attribute could not write past it.
    let mut v: u64 = 0;
    // SAFETY: an out-pointer to a live, large enough integer.
    let r = unsafe {
        sys::cuPointerGetAttribute(&mut v as *mut u64 as *mut c_void, attr, ptr as CUdeviceptr)
    };
    match r {
        sys::CUresult::CUDA_SUCCESS => Ok(v as u32 as i32),
        e => Err(e),
    }
}

/// Checks that `ptr` (named `name` in messages) is device memory of `ordinal`. A host pointer
/// handed over as a CUDA tensor is the caller's bug, so it is an invalid argument, not a crash.
pub(crate) fn check_device_pointer(name: &str, ptr: *const u8, ordinal: u32) -> Result<()> {
    use sys::CUpointer_attribute::*;
    let ptr = ptr as *const c_void;
    let device_memory = sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as i32;
    let unified = sys::CUmemorytype::CU_MEMORYTYPE_UNIFIED as i32;
    if !matches!(pointer_attribute(ptr, CU_POINTER_ATTRIBUTE_MEMORY_TYPE),
                 Ok(t) if t == device_memory || t == unified)
    {
        return Err(Error::invalid(format!(
            "{name} is on cuda:{ordinal} but its data pointer {ptr:p} is not CUDA device memory \
             (a host pointer passed as a device tensor?)"
        )));
    }
    if let Ok(dev) = pointer_attribute(ptr, CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL) {
        if dev >= 0 && dev as u32 != ordinal {
            return Err(Error::invalid(format!(
                "{name} is declared on cuda:{ordinal} but its memory belongs to cuda:{dev}"
            )));
        }
    }
    Ok(())
}

/// The ordinal of the CUDA device whose memory `ptr` addresses, when it is device memory the
/// CPU cannot read; None for host memory of any kind (pageable, pinned, managed) and in a
/// process that has not loaded the CUDA driver (it can hold no device memory, and loading the
/// driver to ask would cost a CPU-only caller a driver start).
pub(crate) fn device_memory_ordinal(ptr: *const c_void) -> Option<u32> {
    if ptr.is_null() || !driver_already_loaded() {
        return None;
    }
    let d = driver().ok()?;
    use sys::CUpointer_attribute::*;
    let mem_type = match pointer_attribute(ptr, CU_POINTER_ATTRIBUTE_MEMORY_TYPE) {
        // Attributes of unified addresses need some current context on some drivers.
        Err(sys::CUresult::CUDA_ERROR_INVALID_CONTEXT) => {
            let _guard = d.enter(0).ok()?;
            pointer_attribute(ptr, CU_POINTER_ATTRIBUTE_MEMORY_TYPE).ok()?
        }
        other => other.ok()?,
    };
    if mem_type != sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as i32
        || pointer_attribute(ptr, CU_POINTER_ATTRIBUTE_IS_MANAGED).unwrap_or(0) != 0
    {
        return None;
    }
    pointer_attribute(ptr, CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL)
        .ok()
        .and_then(|o| u32::try_from(o).ok())
}

/// Whether this process has loaded libcuda (through ufa, PyTorch or the CUDA runtime), asked of
/// the dynamic loader without loading anything. Once loaded it stays, so a yes is remembered;
/// a no is re-asked only when the loader's count of loaded objects has moved. The list of
/// loaded objects is walked (dl_iterate_phdr), not dlopen'ed: dlopen allocates inside the
/// loader's own lock, which made valgrind's race detectors report every caller's next
/// allocation, and costs more.
fn driver_already_loaded() -> bool {
    use std::sync::atomic::{AtomicBool, Ordering};
    static LOADED: AtomicBool = AtomicBool::new(false);
    if LOADED.load(Ordering::Relaxed) {
        return true;
    }
    #[cfg(target_os = "linux")]
    let loaded = loaded_objects::libcuda_loaded();
    #[cfg(not(target_os = "linux"))]
    let loaded = false;
    if loaded {
        LOADED.store(true, Ordering::Relaxed);
    }
    loaded
}

#[cfg(target_os = "linux")]
mod loaded_objects {
    use std::ffi::{c_char, c_int, c_void, CStr};
    use std::sync::atomic::{AtomicU64, Ordering};

    /// The leading fields of `struct dl_phdr_info` (glibc and musl, <link.h>); `adds` is there
    /// when the size the loader passes covers it.
    #[repr(C)]
    struct DlPhdrInfo {
        addr: usize,
        name: *const c_char,
        phdr: *const c_void,
        phnum: u16,
        adds: u64,
        subs: u64,
    }

    extern "C" {
        fn dl_iterate_phdr(
            callback: unsafe extern "C" fn(*mut DlPhdrInfo, usize, *mut c_void) -> c_int,
            data: *mut c_void,
        ) -> c_int;
    }

    /// The loader's count of objects ever loaded when libcuda was last looked for (0: never).
    static SEEN_ADDS: AtomicU64 = AtomicU64::new(0);

    /// Per walk: whether to look at names at all (the count moved), and what was found.
    struct Walk {
        part: &'static [u8],
        /// Stop at once when the count equals SEEN_ADDS (the libcuda walk only).
        remembered: bool,
        adds: Option<u64>,
        found: bool,
    }

    fn has_part(name: &[u8], part: &[u8]) -> bool {
        name.windows(part.len()).any(|w| w == part)
    }

    unsafe extern "C" fn visit(info: *mut DlPhdrInfo, size: usize, data: *mut c_void) -> c_int {
        let (info, walk) = (&*info, &mut *(data as *mut Walk));
        if walk.adds.is_none() {
            let has_adds = size >= std::mem::offset_of!(DlPhdrInfo, subs);
            let adds = if has_adds { info.adds } else { 0 };
            if walk.remembered && has_adds && adds == SEEN_ADDS.load(Ordering::Relaxed) {
                return 1; // nothing loaded since the last walk found no libcuda
            }
            walk.adds = Some(adds);
        }
        if !info.name.is_null() && has_part(CStr::from_ptr(info.name).to_bytes(), walk.part) {
            walk.found = true;
            return 1;
        }
        0
    }

    pub(super) fn libcuda_loaded() -> bool {
        let mut walk = Walk {
            // Any libcuda.so*: cudarc opens the unversioned name first, the runtime
            // libcuda.so.1; the loader lists the name it was opened by.
            part: b"libcuda.so",
            remembered: true,
            adds: None,
            found: false,
        };
        // SAFETY: `visit` reads only the fields the loader's size covers and its own `Walk`.
        unsafe { dl_iterate_phdr(visit, &mut walk as *mut Walk as *mut c_void) };
        if let (false, Some(adds)) = (walk.found, walk.adds) {
            SEEN_ADDS.store(adds, Ordering::Relaxed);
        }
        walk.found
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// The walk sees what is loaded (libc always is) and not what is not; the remembered
        /// count then skips the names until something new is loaded.
        #[test]
        fn finds_loaded_objects_by_name() {
            let find = |part: &'static [u8]| {
                let mut walk = Walk {
                    part,
                    remembered: false,
                    adds: None,
                    found: false,
                };
                // SAFETY: as in libcuda_loaded.
                unsafe { dl_iterate_phdr(visit, &mut walk as *mut Walk as *mut c_void) };
                walk.found
            };
            assert!(find(b"libc.so."));
            assert!(!find(b"libno-such-object.so."));
        }
    }
}

/// A loaded module and its kernel; kept for the process lifetime (modules are never unloaded,
/// so a function handle stays valid while other threads launch it).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Kernel {
    pub function: usize,
    pub registers: i32,
    pub local_bytes: i32,
}

/// Loads `cubin` in the current context and prepares `name` to take `smem` bytes of dynamic
/// shared memory.
pub(crate) fn load_kernel(cubin: &[u8], name: &str, smem: u32) -> Result<Kernel> {
    // SAFETY: a cubin image from NVRTC (or the cache, which checks the ELF magic); the driver
    // copies it during the call.
    let module = unsafe { cu::module::load_data(cubin.as_ptr() as *const c_void) }
        .map_err(|e| driver_error(&format!("cuModuleLoadData({name})"), e))?;
    let cname = CString::new(name).expect("kernel names have no NUL");
    // SAFETY: a live module.
    let f = unsafe { cu::module::get_function(module, cname) }
        .map_err(|e| driver_error(&format!("cuModuleGetFunction({name})"), e))?;
    use sys::CUfunction_attribute::*;
    if smem > 48 * 1024 {
        // SAFETY: a live function.
        unsafe {
            cu::function::set_function_attribute(
                f,
                CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
        }
        .map_err(|e| driver_error(&format!("cuFuncSetAttribute({name}, {smem} B smem)"), e))?;
    }
    let attr = |a| {
        let mut v = 0;
        // SAFETY: a live function and an out-pointer.
        let _ = unsafe { sys::cuFuncGetAttribute(&mut v, a, f) };
        v
    };
    Ok(Kernel {
        function: f as usize,
        registers: attr(CU_FUNC_ATTRIBUTE_NUM_REGS),
        local_bytes: attr(CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES),
    })
}

/// How a launch is ordered after the kernel queued before it on its stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Order {
    /// Stream order: it begins once that kernel has completed.
    Stream,
    /// A programmatic dependent (sm_90+): the launch is processed, and its blocks may start,
    /// while the earlier grid finishes (once its blocks say `griddepcontrol.launch_dependents`
    /// or exit); the kernel itself waits for that grid's completion and memory
    /// (`griddepcontrol.wait`) before it reads what the grid wrote. It saves the gap of a
    /// dependent launch, a few µs, the cost of a short second kernel. Under stream capture it
    /// becomes a programmatic edge of the graph.
    Programmatic,
}

/// Launches `kernel` with one by-value parameter block on `stream` (no synchronisation),
/// ordered after the previous kernel as `order` says.
///
/// # Safety
/// `params` must be the struct the kernel expects, and every pointer in it valid on the device
/// for as long as the launch runs; the kernel's context must be current. With
/// [`Order::Programmatic`] the kernel must wait (`griddepcontrol.wait`) before it touches
/// memory the earlier kernel writes, or writes memory that kernel reads.
pub(crate) unsafe fn launch<P>(
    kernel: &Kernel,
    grid: (u32, u32, u32),
    threads: u32,
    smem: u32,
    stream: CUstream,
    params: &P,
    order: Order,
) -> Result<()> {
    // SAFETY: the caller's contract, with clusters of one block.
    unsafe { launch_clusters(kernel, grid, 1, threads, smem, stream, params, order) }
}

/// [`launch`] with the grid's blocks in thread-block clusters of `cluster_x` consecutive blocks
/// along x (sm_90+; 1: no clusters), which run at once on one GPC and may read each other's
/// shared memory.
///
/// # Safety
/// As [`launch`]; `grid.0` must be a multiple of `cluster_x`, at most 8 (the portable size).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn launch_clusters<P>(
    kernel: &Kernel,
    grid: (u32, u32, u32),
    cluster_x: u32,
    threads: u32,
    smem: u32,
    stream: CUstream,
    params: &P,
    order: Order,
) -> Result<()> {
    let mut args = [params as *const P as *mut c_void];
    if order == Order::Stream && cluster_x <= 1 {
        return cu::launch_kernel(
            kernel.function as CUfunction,
            grid,
            (threads, 1, 1),
            smem,
            stream,
            &mut args,
        )
        .map_err(|e| driver_error("cuLaunchKernel", e));
    }
    // SAFETY: plain C structs, all-zero is a valid value of each.
    let mut attrs: [sys::CUlaunchAttribute; 2] = unsafe { std::mem::zeroed() };
    let mut count = 0;
    if order == Order::Programmatic {
        let a = &mut attrs[count];
        a.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        a.value.programmaticStreamSerializationAllowed = 1;
        count += 1;
    }
    if cluster_x > 1 {
        debug_assert!(grid.0.is_multiple_of(cluster_x) && cluster_x <= 8);
        let a = &mut attrs[count];
        a.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
        a.value.clusterDim.x = cluster_x;
        a.value.clusterDim.y = 1;
        a.value.clusterDim.z = 1;
        count += 1;
    }
    let config = sys::CUlaunchConfig {
        gridDimX: grid.0,
        gridDimY: grid.1,
        gridDimZ: grid.2,
        blockDimX: threads,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: smem,
        hStream: stream,
        attrs: attrs.as_mut_ptr(),
        numAttrs: count as u32,
    };
    // SAFETY: the configuration and its attributes outlive the call; the caller vouches for
    // the kernel, its parameters and the cluster shape.
    unsafe {
        sys::cuLaunchKernelEx(
            &config,
            kernel.function as CUfunction,
            args.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }
    .result()
    .map_err(|e| driver_error("cuLaunchKernelEx", e))
}

/// Device memory owned by ufa's tests and benchmarks (the library itself never allocates).
#[cfg(any(test, feature = "testkit"))]
pub struct DeviceBuffer {
    pub ptr: CUdeviceptr,
    pub bytes: usize,
    ordinal: u32,
}

#[cfg(any(test, feature = "testkit"))]
impl DeviceBuffer {
    pub fn new(ordinal: u32, bytes: usize) -> Result<DeviceBuffer> {
        let _ctx = driver()?.enter(ordinal)?;
        // SAFETY: a current context; at least one byte so the pointer is distinct.
        let ptr =
            unsafe { cu::malloc_sync(bytes.max(1)) }.map_err(|e| driver_error("cuMemAlloc", e))?;
        Ok(DeviceBuffer {
            ptr,
            bytes,
            ordinal,
        })
    }

    pub fn upload(&self, data: &[u8]) -> Result<()> {
        assert!(data.len() <= self.bytes);
        let _ctx = driver()?.enter(self.ordinal)?;
        // SAFETY: the buffer holds at least `data.len()` bytes.
        unsafe { cu::memcpy_htod_sync(self.ptr, data) }.map_err(|e| driver_error("cuMemcpyHtoD", e))
    }

    pub fn download(&self, data: &mut [u8]) -> Result<()> {
        assert!(data.len() <= self.bytes);
        let _ctx = driver()?.enter(self.ordinal)?;
        // SAFETY: as above; the copy is synchronous, so earlier work on the default stream is done.
        unsafe { cu::memcpy_dtoh_sync(data, self.ptr) }.map_err(|e| driver_error("cuMemcpyDtoH", e))
    }
}

#[cfg(any(test, feature = "testkit"))]
impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if let Ok(d) = driver() {
            if let Ok(_ctx) = d.enter(self.ordinal) {
                // SAFETY: allocated by cuMemAlloc and freed once. Errors are ignored: Drop must not panic.
                let _ = unsafe { cu::free_sync(self.ptr) };
            }
        }
    }
}

/// Scratch memory for one call, allocated and freed in stream order on the caller's stream, so
/// that neither waits for the GPU: ufa's pool of the device recycles it between calls and keeps
/// it mapped across synchronisations ([`SCRATCH_POOL_KEEP`]). Under stream capture the
/// allocation becomes a node of the graph.
pub(crate) struct StreamBuffer {
    pub ptr: CUdeviceptr,
    stream: CUstream,
}

impl StreamBuffer {
    /// # Safety
    /// `stream` is null or a live stream of the current context (device `ordinal`'s primary
    /// context), which stays current until the buffer is dropped.
    pub unsafe fn new(
        what: &str,
        bytes: usize,
        ordinal: u32,
        stream: CUstream,
    ) -> Result<StreamBuffer> {
        let bytes = bytes.max(1);
        let pool = driver().ok().and_then(|d| d.scratch_pool(ordinal));
        let (ptr, call) = match pool {
            Some(pool) => {
                let mut ptr: CUdeviceptr = 0;
                let r = sys::cuMemAllocFromPoolAsync(&mut ptr, bytes, pool, stream).result();
                (r.map(|_| ptr), "cuMemAllocFromPoolAsync")
            }
            None => (cu::malloc_async(stream, bytes), "cuMemAllocAsync"),
        };
        let ptr = ptr.map_err(|e| {
            driver_error(
                &format!("allocating {bytes} bytes of device memory for {what} ({call})"),
                e,
            )
        })?;
        Ok(StreamBuffer { ptr, stream })
    }
}

impl Drop for StreamBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated on this stream and freed once, after the work queued on it. Errors
        // are ignored: Drop must not panic.
        let _ = unsafe { cu::free_async(self.ptr, self.stream) };
    }
}

/// Writes a fill's constant into its strided view, queued on `stream`: one memset when the view
/// is contiguous, else 2-d memsets over its two innermost dimensions (a pitch per row).
///
/// # Safety
/// The view lies in device memory of the current context; `stream` is null or a live stream of it.
pub(crate) unsafe fn fill_strided(f: &crate::empty::Fill, stream: CUstream) -> Result<()> {
    let size = f.dtype.size_in_bytes();
    let bits = f.bits();
    let base = f.ptr as CUdeviceptr;
    let set = |ptr: CUdeviceptr, pitch: usize, width: usize, height: usize| -> Result<()> {
        let r = match size {
            2 => sys::cuMemsetD2D16Async(ptr, pitch, bits as u16, width, height, stream),
            4 => sys::cuMemsetD2D32Async(ptr, pitch, bits, width, height, stream),
            _ => {
                return Err(Error::new(
                    ErrorKind::Internal,
                    "fill of a 1- or 8-byte dtype",
                ))
            }
        };
        r.result()
            .map_err(|e| driver_error("cuMemsetD2DAsync (output fill)", e))
    };
    // Dimensions that address more than one element, outermost first.
    let dims: Vec<(usize, usize)> = (0..4)
        .filter(|&d| f.shape[d] > 1)
        .map(|d| (f.shape[d], f.strides[d]))
        .collect();
    let contiguous = dims
        .iter()
        .rev()
        .try_fold(1usize, |want, &(n, s)| (s == want).then_some(want * n))
        .is_some();
    if contiguous {
        return set(base, f.numel() * size, f.numel(), 1);
    }
    // Innermost run: a contiguous row of `width` elements, or single elements.
    let (width, rest) = match dims.split_last() {
        Some((&(n, 1), rest)) => (n, rest),
        _ => (1, &dims[..]),
    };
    let ((height, pitch), outer) = match rest.split_last() {
        Some((&(n, s), outer)) => ((n, s * size), outer),
        None => ((1, width * size), rest),
    };
    let count: usize = outer.iter().map(|&(n, _)| n).product();
    for i in 0..count {
        let (mut rem, mut off) = (i, 0usize);
        for &(n, s) in outer.iter().rev() {
            off += (rem % n) * s;
            rem /= n;
        }
        set(base + (off * size) as CUdeviceptr, pitch, width, height)?;
    }
    Ok(())
}

/// Copies `dst.len()` values from device address `src` once the work queued on `stream` before
/// it is done, and waits for the copy.
///
/// # Safety
/// `src` must address that many values of device memory of the current context; `stream` is
/// null or a live stream of it.
pub(crate) unsafe fn read_on_stream<T: Copy>(
    dst: &mut [T],
    src: CUdeviceptr,
    stream: CUstream,
) -> Result<()> {
    cu::memcpy_dtoh_async(dst, src, stream).map_err(|e| driver_error("cuMemcpyDtoHAsync", e))?;
    cu::stream::synchronize(stream)
        .map_err(|e| driver_error("cuStreamSynchronize (a kernel failed?)", e))
}

/// Waits for all work of `ordinal`'s primary context.
#[cfg(any(test, feature = "testkit"))]
pub fn synchronize(ordinal: u32) -> Result<()> {
    let _ctx = driver()?.enter(ordinal)?;
    cu::ctx::synchronize().map_err(|e| driver_error("cuCtxSynchronize (a kernel failed?)", e))
}

/// Returns to the driver every byte of device `ordinal`'s scratch pool that no call holds, after
/// waiting for the device: what it keeps between calls ([`SCRATCH_POOL_KEEP`]) would otherwise
/// serve an allocation that a test means to fail.
#[cfg(any(test, feature = "testkit"))]
pub fn release_scratch(ordinal: u32) -> Result<()> {
    synchronize(ordinal)?;
    let d = driver()?;
    let _ctx = d.enter(ordinal)?;
    if let Some(pool) = d.scratch_pool(ordinal) {
        // SAFETY: a pool made by scratch_pool, never destroyed.
        unsafe { cu::mem_pool::trim_to(pool, 0) }
            .map_err(|e| driver_error("cuMemPoolTrimTo", e))?;
    }
    Ok(())
}

/// Milliseconds `f` takes on the GPU, measured with events on the legacy default stream.
#[cfg(any(test, feature = "testkit"))]
pub fn time_ms(ordinal: u32, mut f: impl FnMut() -> Result<()>) -> Result<f32> {
    let _ctx = driver()?.enter(ordinal)?;
    let flags = sys::CUevent_flags::CU_EVENT_DEFAULT;
    let start = cu::event::create(flags).map_err(|e| driver_error("cuEventCreate", e))?;
    let end = cu::event::create(flags).map_err(|e| driver_error("cuEventCreate", e))?;
    // SAFETY: live events on the current context; destroyed below on every path.
    let r = (|| unsafe {
        cu::event::record(start, std::ptr::null_mut())
            .map_err(|e| driver_error("cuEventRecord", e))?;
        f()?;
        cu::event::record(end, std::ptr::null_mut())
            .map_err(|e| driver_error("cuEventRecord", e))?;
        cu::event::synchronize(end)
            .map_err(|e| driver_error("cuEventSynchronize (a kernel failed?)", e))?;
        cu::event::elapsed(start, end).map_err(|e| driver_error("cuEventElapsedTime", e))
    })();
    // SAFETY: created above, destroyed once.
    unsafe {
        let _ = cu::event::destroy(start);
        let _ = cu::event::destroy(end);
    }
    r
}

// An inherent method of the bottom layer's Device, defined here because only the CUDA layer
// can answer it (the dependency runs from this backend down to device.rs, not up).
impl crate::Device {
    /// Where the memory at `ptr` is, as far as the CPU can tell: `Cuda(n)` for memory of CUDA
    /// device `n` that the CPU cannot read (`cudaMalloc`, `cuMemAlloc`), `Cpu` for everything
    /// else (pageable, pinned or managed host memory). A process that has not loaded the CUDA
    /// driver has no device memory, so this costs no driver load there. For entry points that
    /// take raw pointers (the C ABI): a device pointer declared as host memory is run on its
    /// device or refused, never read by the CPU.
    pub fn of_memory(ptr: *const std::ffi::c_void) -> crate::Device {
        device_memory_ordinal(ptr).map_or(crate::Device::Cpu, crate::Device::Cuda)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_names() {
        assert_eq!(arch_name((8, 0)), "sm_80");
        assert_eq!(arch_name((8, 6)), "sm_86");
        assert_eq!(arch_name((8, 9)), "sm_89");
        assert_eq!(arch_name((9, 0)), "sm_90a");
        assert_eq!(arch_name((12, 0)), "sm_120");
    }
}
