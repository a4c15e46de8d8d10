//! The CUDA backend: kernels compiled at first use with NVRTC for the device's exact
//! architecture, cached on disk, and launched through the driver API on the caller's stream and
//! memory. CUDA's libraries are loaded at run time (cudarc), so this module builds everywhere;
//! where they are missing every call returns a clear error and the CPU path is untouched.

mod backward;
mod cache;
mod driver;
mod kernels;
mod nvrtc;
mod tma;
mod wgmma;

pub use cache::CACHE_DIR_ENV;
pub use nvrtc::NVRTC_PATH_ENV;

pub(crate) use driver::{synchronize, time_ms, DeviceBuffer};

use crate::error::{Error, ErrorKind, Result};
use crate::kvcache::{KvCacheProblem, Workspace};
use crate::merge::MergeProblem;
use crate::problem::{BackwardProblem, Problem};
use crate::sequences::IntArray;
use kernels::{FwdParams, Variant};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::RwLock;
use std::time::Instant;
use wgmma::runs_wgmma;

/// Runs `f`, turning a panic inside it (cudarc panics when a library or symbol is missing)
/// into an error, so no panic crosses into the caller.
pub(crate) fn no_panic<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Err(Error::new(
            ErrorKind::DeviceUnavailable,
            format!("{what}: the CUDA libraries could not be used: {msg}"),
        ))
    })
}

/// How a module was obtained, for `ufa info` and the compile-time budget in the tests.
#[derive(Clone, Debug)]
pub struct ModuleReport {
    pub kernel: String,
    pub arch: String,
    /// Seconds spent in NVRTC (0 when the cubin came from the disk cache).
    pub compile_s: f64,
    /// Seconds to read the cubin from disk (when cached) and load it into the context.
    pub load_s: f64,
    pub from_cache: bool,
    pub registers: i32,
    pub spill_bytes: i32,
}

/// Loaded kernels per (device, variant): read-locked on the hot path, written once per variant.
pub(crate) struct CudaBackend {
    modules: RwLock<HashMap<(u32, Variant), driver::Kernel>>,
    reports: RwLock<Vec<ModuleReport>>,
}

impl CudaBackend {
    pub fn new() -> Self {
        CudaBackend {
            modules: RwLock::new(HashMap::new()),
            reports: RwLock::new(Vec::new()),
        }
    }

    /// One line per CUDA device (with the driver and NVRTC versions), or why there are none.
    pub fn devices(&self) -> std::result::Result<Vec<String>, String> {
        let d = driver::driver().map_err(|e| e.message().to_string())?;
        let nv = match nvrtc::nvrtc() {
            Ok(n) => match &n.path {
                Some(p) => format!("NVRTC {}.{} ({})", n.version.0, n.version.1, p.display()),
                None => format!("NVRTC {}.{}", n.version.0, n.version.1),
            },
            Err(e) => format!("no NVRTC: {}", e.message()),
        };
        Ok(d.devices
            .iter()
            .map(|g| {
                format!(
                    "cuda:{} {} ({}, {} SMs, {:.0} GiB), driver {}.{}, {nv}",
                    g.ordinal,
                    g.name,
                    g.arch(),
                    g.multiprocessors,
                    g.total_memory as f64 / (1u64 << 30) as f64,
                    d.version.0,
                    d.version.1
                )
            })
            .collect())
    }

    /// What loading each module cost so far in this process.
    pub fn module_reports(&self) -> Vec<ModuleReport> {
        self.reports
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The kernel of `variant` on `ordinal`, compiled or read from the disk cache on first use.
    /// The caller has the device's context current.
    fn kernel(&self, ordinal: u32, arch: &str, variant: Variant) -> Result<driver::Kernel> {
        if let Some(k) = self
            .modules
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(ordinal, variant))
        {
            return Ok(*k);
        }
        let mut modules = self.modules.write().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = modules.get(&(ordinal, variant)) {
            return Ok(*k);
        }
        let name = variant.kernel_name();
        let t0 = Instant::now();
        let (cubin, compile_s, from_cache) = cubin_for(&variant, arch)?;
        let t1 = Instant::now();
        let k = driver::load_kernel(&cubin, &name, variant.dynamic_smem())?;
        let load_s = if from_cache {
            t1.duration_since(t0).as_secs_f64() + t1.elapsed().as_secs_f64()
        } else {
            t1.elapsed().as_secs_f64()
        };
        self.reports
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(ModuleReport {
                kernel: name,
                arch: arch.to_string(),
                compile_s,
                load_s,
                from_cache,
                registers: k.registers,
                spill_bytes: k.local_bytes,
            });
        modules.insert((ordinal, variant), k);
        Ok(k)
    }

    pub fn backward(&self, p: &BackwardProblem, stream: *mut c_void) -> Result<()> {
        no_panic("running the backward on CUDA", || {
            self.backward_inner(p, stream)
        })
    }

    fn backward_inner(&self, p: &BackwardProblem, stream: *mut c_void) -> Result<()> {
        if !p.fwd.seqs.is_uniform() {
            return Err(Error::unsupported(
                "variable-length batches are not implemented on CUDA yet",
            ));
        }
        let (ordinal, dev) = usable_device(&p.fwd)?;
        let _ctx = driver::driver()?.enter(ordinal)?;
        let mut tensors = tensors_of(&p.fwd);
        tensors.extend([
            ("dout", p.dout.ptr),
            ("dq", p.dq.ptr),
            ("dk", p.dk.ptr),
            ("dv", p.dv.ptr),
        ]);
        check_pointers(&tensors, ordinal)?;
        let plan = backward::Plan::select(p, dev.max_smem_per_block, runs_wgmma(&dev.arch()));
        let launches = backward::launches(p, &plan)?;
        let kernels = launches
            .iter()
            .map(|l| self.kernel(ordinal, &dev.arch(), l.variant))
            .collect::<Result<Vec<_>>>()?;
        let stream = stream as driver::CUstream;
        // SAFETY: `stream` is the caller's (null or live on this context, per the API's
        // contract); the buffer is dropped while the context is still current.
        let workspace = unsafe { driver::StreamBuffer::new(plan.workspace(p).bytes, stream)? };
        let params =
            backward::BwdParams::new(p, &plan, workspace.ptr, dev.multiprocessors.max(1) as u32)?;
        for (l, k) in launches.iter().zip(&kernels) {
            // SAFETY: the parameter block mirrors the kernels'; every tensor pointer was
            // checked to be device memory of this device, the workspace holds the layout
            // `params` describes, and validation bounds every index by the views' spans.
            let (threads, smem) = (l.variant.threads(), l.variant.dynamic_smem());
            unsafe {
                match l.variant {
                    Variant::BwdWgmma { tile, .. } => {
                        let sm90 = tma::BwdSm90Params::new(p, params, tile.block_m, tile.block_n)?;
                        driver::launch(k, l.grid, threads, smem, stream, &sm90)?
                    }
                    _ => driver::launch(k, l.grid, threads, smem, stream, &params)?,
                }
            }
        }
        Ok(())
    }

    pub fn forward(&self, p: &Problem, stream: *mut c_void) -> Result<()> {
        no_panic("running on CUDA", || self.forward_inner(p, stream))
    }

    /// Copies int32 metadata of device `ordinal` to the host, ordered on `stream`, and waits.
    pub fn read_ints(&self, ordinal: u32, a: &IntArray, stream: *mut c_void) -> Result<Vec<i32>> {
        no_panic("reading metadata from CUDA", || {
            let _ctx = driver::driver()?.enter(ordinal)?;
            driver::check_device_pointer("metadata", a.ptr as *const u8, ordinal)?;
            let mut raw = vec![0i32; a.span_bytes() / 4];
            // SAFETY: the array's span lies in device memory of this device (validated
            // shape and strides); `stream` is the caller's.
            unsafe { driver::read_on_stream(&mut raw, a.ptr as u64, stream as driver::CUstream)? };
            Ok((0..a.len)
                .flat_map(|i| raw[i * a.stride..][..a.cols].to_vec())
                .collect())
        })
    }

    pub fn forward_kvcache(
        &self,
        _p: &KvCacheProblem,
        _workspace: Option<Workspace<'_>>,
        _stream: *mut c_void,
    ) -> Result<()> {
        Err(Error::unsupported(
            "attention over a KV cache is not implemented on CUDA yet",
        ))
    }

    pub fn merge(&self, _m: &MergeProblem, _stream: *mut c_void) -> Result<()> {
        Err(Error::unsupported(
            "merging attention states is not implemented on CUDA yet",
        ))
    }

    fn forward_inner(&self, p: &Problem, stream: *mut c_void) -> Result<()> {
        if !p.seqs.is_uniform() {
            return Err(Error::unsupported(
                "variable-length batches are not implemented on CUDA yet",
            ));
        }
        let (ordinal, dev) = usable_device(p)?;
        let _ctx = driver::driver()?.enter(ordinal)?;
        check_pointers(&tensors_of(p), ordinal)?;
        let variant = Variant::select(p, dev.max_smem_per_block, runs_wgmma(&dev.arch()));
        let params = FwdParams::new(p, variant.rows_per_block())?;
        let grid = variant.grid(p)?;
        if grid.0 == 0 {
            return Ok(());
        }
        let kernel = self.kernel(ordinal, &dev.arch(), variant)?;
        // SAFETY: the parameter block mirrors the kernel's; every pointer was checked to be
        // device memory of this device, and validation bounds every index by the views' spans.
        unsafe {
            driver::launch(
                &kernel,
                grid,
                variant.threads(),
                variant.dynamic_smem(),
                stream as driver::CUstream,
                &params,
            )
        }
    }
}

/// The CUDA device of `p`, if ufa's kernels can run on it.
fn usable_device(p: &Problem) -> Result<(u32, &'static driver::DeviceInfo)> {
    let crate::device::Device::Cuda(ordinal) = p.device else {
        return Err(Error::new(
            ErrorKind::Internal,
            "CUDA backend given a CPU problem",
        ));
    };
    let dev = driver::driver()?.device(ordinal)?;
    if dev.compute_capability.0 < 8 {
        return Err(Error::unsupported(format!(
            "cuda:{ordinal} ({}) has compute capability {}.{}; ufa's kernels need 8.0 or newer",
            dev.name, dev.compute_capability.0, dev.compute_capability.1
        )));
    }
    Ok((ordinal, dev))
}

/// The forward problem's tensors by argument name.
fn tensors_of(p: &Problem) -> Vec<(&'static str, *mut u8)> {
    let mut tensors = vec![
        ("q", p.q.ptr),
        ("k", p.k.ptr),
        ("v", p.v.ptr),
        ("out", p.out.ptr),
    ];
    tensors.extend(p.lse.map(|o| ("lse", o.ptr)));
    tensors.extend(p.alibi.map(|o| ("alibi_slopes", o.ptr)));
    tensors.extend(p.mask.map(|o| ("mask", o.ptr)));
    tensors
}

fn check_pointers(tensors: &[(&'static str, *mut u8)], ordinal: u32) -> Result<()> {
    for &(name, ptr) in tensors {
        driver::check_device_pointer(name, ptr, ordinal)?;
    }
    Ok(())
}

/// The cubin of `variant` for `arch`: from the disk cache, else compiled (and cached).
/// Returns it with the NVRTC seconds and whether it was cached.
fn cubin_for(variant: &Variant, arch: &str) -> Result<(Vec<u8>, f64, bool)> {
    let nv = nvrtc::nvrtc()?;
    let source = variant.source();
    let name = variant.kernel_name();
    let key = cache::cache_key(&source, &nvrtc::compile_options(arch), nv.version, arch);
    let dir = cache::cache_dir(&|k| std::env::var(k).ok());
    let path = cache::cubin_path(&dir, &name, arch, key);
    if let Some(cubin) = cache::load(&path) {
        return Ok((cubin, 0.0, true));
    }
    let t = Instant::now();
    let compiled = nv.compile(&name, &source, arch)?;
    let secs = t.elapsed().as_secs_f64();
    cache::store(&path, &compiled.cubin);
    Ok((compiled.cubin, secs, false))
}

/// One variant compiled for an architecture, without a GPU (CI's compile check).
#[derive(Clone, Debug)]
pub struct CompileReport {
    pub kernel: String,
    pub arch: String,
    pub seconds: f64,
    pub cubin: Vec<u8>,
    /// ptxas's resource line(s): registers, spills, shared memory.
    pub resources: String,
}

/// Compiles every kernel variant for `arch` with NVRTC (no GPU, no cache); the first failure
/// is returned with its log.
pub fn compile_all_variants(arch: &str) -> Result<Vec<CompileReport>> {
    let nv = nvrtc::nvrtc()?;
    // Each architecture's largest opt-in shared memory a block, so that the variants compiled
    // are the ones its devices select.
    let smem = match arch {
        "sm_80" | "sm_87" => 166_912,
        a if a.starts_with("sm_8") => 101_376,
        a if a.starts_with("sm_90") => 232_448,
        _ => 101_376,
    };
    // UFA_COMPILE_ONLY=text keeps the variants whose kernel name contains it (while editing
    // one kernel).
    let only = std::env::var("UFA_COMPILE_ONLY").unwrap_or_default();
    let variants: Vec<Variant> = Variant::all(smem, runs_wgmma(arch))
        .into_iter()
        .filter(|v| v.kernel_name().contains(&only))
        .collect();
    if variants.is_empty() {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("UFA_COMPILE_ONLY={only:?} matches no kernel variant for {arch}"),
        ));
    }
    let results: Vec<Result<CompileReport>> = std::thread::scope(|s| {
        let chunks: Vec<_> = variants
            .chunks(
                variants
                    .len()
                    .div_ceil(std::thread::available_parallelism().map_or(2, |n| n.get())),
            )
            .map(|chunk| {
                s.spawn(move || {
                    chunk
                        .iter()
                        .map(|v| {
                            let t = Instant::now();
                            let c = nv.compile(&v.kernel_name(), &v.source(), arch)?;
                            Ok(CompileReport {
                                kernel: v.kernel_name(),
                                arch: arch.to_string(),
                                seconds: t.elapsed().as_secs_f64(),
                                cubin: c.cubin,
                                resources: c
                                    .log
                                    .lines()
                                    .filter(|l| {
                                        l.contains("registers")
                                            || l.contains("spill")
                                            || l.contains("arning")
                                    })
                                    .map(str::trim)
                                    .collect::<Vec<_>>()
                                    .join("; "),
                            })
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        chunks
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    results.into_iter().collect()
}

/// The NVRTC version, or why NVRTC cannot be loaded.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    nvrtc::nvrtc().map(|n| n.version)
}
