//! The CUDA backend: kernels compiled at first use with NVRTC for the device's exact
//! architecture, cached on disk, and launched through the driver API on the caller's stream and
//! memory. CUDA's libraries are loaded at run time (cudarc), so this module builds everywhere;
//! where they are missing every call returns a clear error and the CPU path is untouched.

mod abi;
mod backward;
mod cache;
mod decode;
mod driver;
mod nvrtc;
mod params;
mod sm90;
mod sm90_f32;
mod sources;
mod tiles;
mod tma;
mod variants;

// The test kit's share (crate::internals): compiling every variant without a GPU, device
// memory and timing for the GPU suites, the environment variables their tests set.
#[cfg(feature = "testkit")]
mod compile_check;
#[cfg(feature = "testkit")]
pub use cache::CACHE_DIR_ENV;
#[cfg(feature = "testkit")]
pub use compile_check::{compile_all_variants, compile_variants, nvrtc_version, CompileReport};
#[cfg(feature = "testkit")]
pub use driver::{release_scratch, synchronize, time_ms, DeviceBuffer};
#[cfg(feature = "testkit")]
pub use nvrtc::NVRTC_PATH_ENV;
#[cfg(feature = "testkit")]
pub use sm90::{off_tile_enabled, tma_fwd_enabled};
// What runs on tensor cores, in words (`ufa info`).
pub use tiles::tensor_core_coverage;

pub(crate) use decode::workspace_bound as decode_workspace_bound;

use crate::empty::Fill;
use crate::error::{Error, ErrorKind, Result};
use crate::kvcache::{KvCacheProblem, Workspace};
use crate::merge::MergeProblem;
use crate::problem::{BackwardProblem, Problem};
use crate::sequences::{IntArray, KeyLengths, RowMap};
use abi::{
    AppendParams, AppendRows, DecodeParams, FwdParams, MergeParams, MERGE_MAX_STATES, ROW_WARPS,
};
use decode::{DecodePlan, SplitMerge};
use driver::Order::Stream;
use sm90::runs_wgmma;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;
use variants::{grid, AppendKernel, Variant};

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

/// A loaded kernel's device ordinal and variant.
type ModuleKey = (u32, Variant);

/// Loaded kernels per (device, variant): read-locked on the hot path, write-locked only to
/// insert one. A variant is compiled and loaded under a lock of its own (`loading`), so a
/// first-use NVRTC compile (a second or more) stalls neither calls whose kernels are loaded nor
/// the compiles of other variants, and no variant is compiled twice.
pub(crate) struct CudaBackend {
    modules: RwLock<HashMap<ModuleKey, driver::Kernel>>,
    loading: Mutex<HashMap<ModuleKey, Arc<Mutex<()>>>>,
    reports: RwLock<Vec<ModuleReport>>,
}

impl CudaBackend {
    pub fn new() -> Self {
        CudaBackend {
            modules: RwLock::new(HashMap::new()),
            loading: Mutex::new(HashMap::new()),
            reports: RwLock::new(Vec::new()),
        }
    }

    fn loaded(&self, key: &ModuleKey) -> Option<driver::Kernel> {
        let modules = self.modules.read().unwrap_or_else(|e| e.into_inner());
        modules.get(key).copied()
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
        let key = (ordinal, variant);
        if let Some(k) = self.loaded(&key) {
            return Ok(k);
        }
        let slot = self
            .loading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default()
            .clone();
        let _loading = slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = self.loaded(&key) {
            return Ok(k); // another thread loaded it while this one waited
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
        self.modules
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, k);
        Ok(k)
    }

    pub fn backward(&self, p: &BackwardProblem, stream: *mut c_void) -> Result<()> {
        no_panic("running the backward on CUDA", || {
            self.backward_inner(p, stream)
        })
    }

    fn backward_inner(&self, p: &BackwardProblem, stream: *mut c_void) -> Result<()> {
        let (ordinal, dev) = usable_device(&p.fwd)?;
        let _ctx = driver::driver()?.enter_with_stream(ordinal, stream as driver::CUstream)?;
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
        let workspace = unsafe {
            driver::StreamBuffer::new(
                "the backward's workspace",
                plan.workspace(p).bytes,
                ordinal,
                stream,
            )?
        };
        let params =
            abi::BwdParams::new(p, &plan, workspace.ptr, dev.multiprocessors.max(1) as u32)?;
        // The kernels after the first are programmatic dependents on sm_90+: a few µs of
        // launch gap saved at each of the two joins (Variant::program's prologue waits).
        let mut order = Stream;
        for (l, k) in launches.iter().zip(&kernels) {
            if l.grid.0 == 0 || l.grid.1 == 0 || l.grid.2 == 0 {
                continue; // no rows (an empty packed batch)
            }
            // SAFETY: the parameter block is the kernels' (abi.rs); every tensor pointer was
            // checked to be device memory of this device, the workspace holds the layout
            // `params` describes, and validation bounds every index by the views' spans (the
            // kernels clamp what they read from device metadata). A programmatic dependent
            // waits for its predecessor before anything else (Variant::program).
            let (threads, smem) = (l.variant.threads(), l.variant.dynamic_smem());
            unsafe {
                match l.variant {
                    Variant::BwdSm90 { tile, .. } => {
                        let sm90 = abi::BwdSm90Params::new(p, params, tile.block_m, tile.block_n)?;
                        driver::launch(k, l.grid, threads, smem, stream, &sm90, order)?
                    }
                    _ => driver::launch(k, l.grid, threads, smem, stream, &params, order)?,
                }
            }
            if dev.compute_capability.0 >= 9 && sm90::bwd_pdl_enabled() {
                order = driver::Order::Programmatic;
            }
        }
        Ok(())
    }

    pub fn forward(&self, p: &Problem, stream: *mut c_void) -> Result<()> {
        no_panic("running on CUDA", || self.forward_inner(p, stream))
    }

    /// Writes the constant outputs of a call with nothing to compute (crate::empty), queued on
    /// `stream`. Empty fills are skipped, so their pointers (often NULL) are never checked.
    pub fn fill(&self, ordinal: u32, fills: &[Fill], stream: *mut c_void) -> Result<()> {
        no_panic("filling outputs on CUDA", || {
            let _ctx = driver::driver()?.enter_with_stream(ordinal, stream as driver::CUstream)?;
            let fills: Vec<&Fill> = fills.iter().filter(|f| f.numel() > 0).collect();
            for f in &fills {
                driver::check_device_pointer("output", f.ptr, ordinal)?;
            }
            for f in fills {
                // SAFETY: validation bounds the view by the output's span, checked above to be
                // device memory of this device; `stream` is the caller's.
                unsafe { driver::fill_strided(f, stream as driver::CUstream)? };
            }
            Ok(())
        })
    }

    fn forward_inner(&self, p: &Problem, stream: *mut c_void) -> Result<()> {
        let (ordinal, dev) = usable_device(p)?;
        let _ctx = driver::driver()?.enter_with_stream(ordinal, stream as driver::CUstream)?;
        check_pointers(&tensors_of(p), ordinal)?;
        self.launch_forward(ordinal, dev, p, None, stream as driver::CUstream)
    }

    /// Launches the forward of `p` (its device's context current, its pointers checked): the
    /// decoding kernels for few query rows per KV head, else a prefill kernel. A decoding
    /// call's split partials go to `scratch` (checked device memory of the call's device), or
    /// to memory allocated and freed in stream order.
    fn launch_forward(
        &self,
        ordinal: u32,
        dev: &driver::DeviceInfo,
        p: &Problem,
        scratch: Option<(*mut c_void, usize)>,
        stream: driver::CUstream,
    ) -> Result<()> {
        let sms = dev.multiprocessors.max(1) as u32;
        if let Some(plan) = decode_plan(dev, p) {
            return self.launch_decode(ordinal, dev, p, &plan, scratch, None, stream);
        }
        let variant = Variant::select(p, dev.max_smem_per_block, runs_wgmma(&dev.arch()));
        let params = FwdParams::new(p, variant.rows_per_block())?;
        let grid = variant.grid(p, sms)?;
        if grid.0 == 0 || grid.2 == 0 {
            return Ok(());
        }
        let kernel = self.kernel(ordinal, &dev.arch(), variant)?;
        // SAFETY: the parameter block is the kernel's (abi.rs); every pointer was checked to be
        // device memory of this device, validation bounds every index by the views' spans, and
        // the kernels clamp what they read from device metadata.
        let (threads, smem) = (variant.threads(), variant.dynamic_smem());
        unsafe {
            match variant {
                Variant::FwdSm90Tma { tile, .. } => {
                    let sm90 = abi::FwdSm90Params::new(p, params, tile.block_m, tile.block_n)?;
                    driver::launch(&kernel, grid, threads, smem, stream, &sm90, Stream)
                }
                _ => driver::launch(&kernel, grid, threads, smem, stream, &params, Stream),
            }
        }
    }

    /// Launches a decoding call: the split blocks (in clusters where they merge there, and
    /// writing a KV-cache call's new rows where `append` has any), then, where they merge in
    /// scratch memory, the combine.
    #[allow(clippy::too_many_arguments)]
    fn launch_decode(
        &self,
        ordinal: u32,
        dev: &driver::DeviceInfo,
        p: &Problem,
        plan: &DecodePlan,
        scratch: Option<(*mut c_void, usize)>,
        append: Option<AppendRows>,
        stream: driver::CUstream,
    ) -> Result<()> {
        let need = plan.scratch_bytes(p);
        let mut owned = None;
        let base: *mut u8 = match scratch {
            _ if need == 0 => std::ptr::null_mut(),
            Some((ptr, bytes)) if bytes >= need => ptr as *mut u8,
            Some((_, bytes)) => {
                return Err(Error::new(
                    ErrorKind::Internal,
                    format!("decoding scratch of {bytes} bytes, {need} needed"),
                ))
            }
            None => {
                // SAFETY: `stream` is the caller's, on this (current) context.
                let buf = unsafe {
                    driver::StreamBuffer::new(
                        "the decoding splits' partial states",
                        need,
                        ordinal,
                        stream,
                    )?
                };
                let ptr = buf.ptr as *mut u8;
                owned = Some(buf);
                ptr
            }
        };
        let (o_part, lse_part) = if base.is_null() {
            (std::ptr::null_mut(), std::ptr::null_mut())
        } else {
            // SAFETY: both offsets lie within the `need` bytes at `base`.
            (base as *mut f32, unsafe {
                base.add(plan.scratch_layout(p).lse_offset) as *mut f32
            })
        };
        let params = DecodeParams::new(p, plan, o_part, lse_part, append)?;
        let variant = decode_variant(p, plan);
        // One block per (split, KV head and row block, batch entry), within the grid's limits;
        // a cluster merge's clusters are the splits of each.
        let blocks = grid(plan.splits, 1, p.heads_kv * plan.row_blocks, p.batch)?;
        let cluster = match plan.merge {
            SplitMerge::Cluster => plan.splits as u32,
            _ => 1,
        };
        let kernel = self.kernel(ordinal, &dev.arch(), variant)?;
        // SAFETY: as in the prefill launch below; the partials span `need` bytes of scratch;
        // the grid's x is the cluster's (at most DECODE_CLUSTER_MAX, on sm_90+: the plan's).
        unsafe {
            driver::launch_clusters(
                &kernel,
                blocks,
                cluster,
                variant.threads(),
                variant.dynamic_smem(),
                stream,
                &params,
                Stream,
            )?
        };
        if plan.merge == SplitMerge::Combine {
            let g = grid(p.seqlen_q, ROW_WARPS, p.heads_q, p.batch)?;
            let v = Variant::DecodeCombine;
            let kernel = self.kernel(ordinal, &dev.arch(), v)?;
            // SAFETY: as above; the combine reads what the split blocks wrote, in stream order
            // (as a programmatic dependent on sm_90+, after its griddepcontrol.wait: two short
            // launches back to back otherwise leave the GPU idle for the second one's launch).
            let order = if dev.compute_capability.0 >= 9 {
                driver::Order::Programmatic
            } else {
                driver::Order::Stream
            };
            unsafe { driver::launch(&kernel, g, v.threads(), 0, stream, &params, order)? };
        }
        drop(owned); // freed in stream order, after the combine
        Ok(())
    }

    /// Copies int32 metadata of device `ordinal` to the host, ordered on `stream`, and waits.
    pub fn read_ints(&self, ordinal: u32, a: &IntArray, stream: *mut c_void) -> Result<Vec<i32>> {
        no_panic("reading metadata from CUDA", || {
            let _ctx = driver::driver()?.enter_with_stream(ordinal, stream as driver::CUstream)?;
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

    /// A KV-cache call: the append (with rotary embedding of the new keys and of q), then the
    /// attention over the cache, all queued on `stream`. A call the decoding kernel serves is
    /// one launch (its blocks write the new rows they read, and rotate q as they load it);
    /// otherwise the append kernels come first and the rotated q lives in `workspace`, or in
    /// memory allocated and freed in stream order.
    pub fn forward_kvcache(
        &self,
        kp: &KvCacheProblem,
        workspace: Option<Workspace<'_>>,
        stream: *mut c_void,
    ) -> Result<()> {
        no_panic("running the KV-cache call on CUDA", || {
            let (ordinal, dev) = usable_device(&kp.attn)?;
            let _ctx = driver::driver()?.enter_with_stream(ordinal, stream as driver::CUstream)?;
            let stream = stream as driver::CUstream;
            let mut tensors = tensors_of(&kp.attn);
            if let Some(a) = &kp.append {
                tensors.extend([("k", a.k.ptr), ("v", a.v.ptr)]);
                if let Some(r) = &a.rotary {
                    tensors.extend([("rotary_cos", r.cos.ptr), ("rotary_sin", r.sin.ptr)]);
                }
            }
            check_pointers(&tensors, ordinal)?;
            // The decoding kernel appends itself (over the caller's q, which it rotates).
            let fused = kp.append.as_ref().and_then(|_| decode_plan(dev, &kp.attn));
            let mut attn = *kp;
            // A workspace holds the rotated q, then the decoding splits' partials (planned on
            // the attention as it will run: over the rotated q, at the workspace's start).
            let rot_need = if fused.is_some() {
                0
            } else {
                kp.workspace_bytes()
            };
            if let Some(w) = &workspace {
                let mut planned = *kp;
                if rot_need > 0 {
                    planned.use_rotated_q(w.ptr as *mut u8);
                }
                // A fused call's plan is the one it runs (its q is the caller's).
                let decode_need = fused
                    .or_else(|| decode_plan(dev, &planned.attn))
                    .map_or(0, |plan| plan.scratch_bytes(&planned.attn));
                let need = rot_need + decode_need;
                if w.bytes < need {
                    return Err(Error::invalid(format!(
                        "workspace has {} bytes but this call needs {need} \
                         (kvcache_workspace_bytes)",
                        w.bytes
                    )));
                }
                if need > 0 {
                    driver::check_device_pointer("workspace", w.ptr as *const u8, ordinal)?;
                }
            }
            let scratch = workspace.as_ref().map(|w| {
                // SAFETY: rot_need <= w.bytes, checked above.
                let ptr = unsafe { (w.ptr as *mut u8).add(rot_need) };
                (ptr as *mut c_void, w.bytes - rot_need)
            });
            if let Some(plan) = fused {
                let rows = AppendRows::new(kp);
                return self.launch_decode(
                    ordinal,
                    dev,
                    &kp.attn,
                    &plan,
                    scratch,
                    Some(rows),
                    stream,
                );
            }
            let mut owned = None;
            let q_rot: *mut c_void = match (&workspace, rot_need) {
                (_, 0) => std::ptr::null_mut(),
                (Some(w), _) => w.ptr,
                (None, need) => {
                    // SAFETY: `stream` is the caller's, on this (current) context.
                    let buf = unsafe {
                        driver::StreamBuffer::new("the rotated queries", need, ordinal, stream)?
                    };
                    let ptr = buf.ptr as *mut c_void;
                    owned = Some(buf);
                    ptr
                }
            };
            if let Some(a) = &kp.append {
                let params = AppendParams::new(kp, q_rot)?;
                let mut launches = vec![(
                    AppendKernel::Append,
                    grid(a.seqlen_new, ROW_WARPS, kp.attn.heads_kv, kp.attn.batch)?,
                )];
                if !q_rot.is_null() {
                    let p = &kp.attn;
                    launches.push((
                        AppendKernel::RotateQ,
                        grid(p.seqlen_q, ROW_WARPS, p.heads_q, p.batch)?,
                    ));
                }
                for (k, g) in launches {
                    if g.0 == 0 || g.2 == 0 {
                        continue;
                    }
                    let v = Variant::KvAppend(k);
                    let kernel = self.kernel(ordinal, &dev.arch(), v)?;
                    // SAFETY: as in launch_forward; the new rows, tables and q_rot were checked
                    // or allocated above.
                    unsafe { driver::launch(&kernel, g, v.threads(), 0, stream, &params, Stream)? };
                }
                if !q_rot.is_null() {
                    attn.use_rotated_q(q_rot as *mut u8);
                }
            }
            let r = self.launch_forward(ordinal, dev, &attn.attn, scratch, stream);
            drop(owned); // freed in stream order, after the attention
            r
        })
    }

    /// Merges attention states in rounds of MERGE_MAX_STATES, queued on `stream`.
    pub fn merge(&self, m: &MergeProblem, stream: *mut c_void) -> Result<()> {
        no_panic("merging states on CUDA", || {
            let crate::device::Device::Cuda(ordinal) = m.device else {
                return Err(Error::new(
                    ErrorKind::Internal,
                    "CUDA merge of a CPU problem",
                ));
            };
            let dev = driver::driver()?.device(ordinal)?;
            let _ctx = driver::driver()?.enter_with_stream(ordinal, stream as driver::CUstream)?;
            let stream = stream as driver::CUstream;
            let mut tensors: Vec<(&'static str, *mut u8)> = vec![("out", m.out.ptr)];
            tensors.extend(m.lse.map(|l| ("lse", l.ptr)));
            for (o, l) in &m.states {
                tensors.extend([("states.out", o.ptr), ("states.lse", l.ptr)]);
            }
            check_pointers(&tensors, ordinal)?;
            let rounds = m.states.len().div_ceil(MERGE_MAX_STATES);
            // Later rounds read the merged LSE back: scratch when the caller wants none.
            let mut scratch = None;
            let lse = match (&m.lse, rounds) {
                (Some(l), _) => l.ptr as *mut f32,
                (None, 1) => std::ptr::null_mut(),
                (None, _) => {
                    let bytes = m.batch * m.heads * m.seqlen * 4;
                    // SAFETY: the caller's stream, on this (current) context.
                    let buf = unsafe {
                        driver::StreamBuffer::new(
                            "the merge's scratch LSE",
                            bytes,
                            ordinal,
                            stream,
                        )?
                    };
                    let ptr = buf.ptr as *mut f32;
                    scratch = Some(buf);
                    ptr
                }
            };
            let g = grid(m.seqlen, ROW_WARPS, m.heads, m.batch)?;
            if g.0 > 0 && g.2 > 0 {
                let kernel = self.kernel(ordinal, &dev.arch(), Variant::Merge)?;
                for r in 0..rounds {
                    let first = r * MERGE_MAX_STATES;
                    let n = MERGE_MAX_STATES.min(m.states.len() - first);
                    let params = MergeParams::new(m, first, n, r > 0, lse);
                    // SAFETY: as in launch_forward; rounds run in stream order.
                    unsafe {
                        driver::launch(
                            &kernel,
                            g,
                            Variant::Merge.threads(),
                            0,
                            stream,
                            &params,
                            Stream,
                        )?
                    };
                }
            }
            drop(scratch);
            Ok(())
        })
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

/// The forward problem's tensors and sequence metadata by argument name.
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
    let int = |name, a: IntArray| (name, a.ptr as *mut u8);
    tensors.extend(p.seqs.cu_q.map(|a| int("cu_seqlens_q", a)));
    // A packed batch counts used keys in seqused_kv; a KV cache in cache_seqlens.
    let used_name = if p.seqs.cu_q.is_some() {
        "seqused_kv"
    } else {
        "cache_seqlens"
    };
    match p.seqs.kv {
        KeyLengths::Cumulative(a) => tensors.push(int("cu_seqlens_kv", a)),
        KeyLengths::Used { used, .. } => tensors.push(int(used_name, used)),
        KeyLengths::Uniform => {}
    }
    match p.k.rows {
        RowMap::Packed { cu, .. } => tensors.push(int("cu_seqlens_kv", cu)),
        RowMap::Paged { table, .. } => tensors.push(int("block_table", table)),
        RowMap::Gathered { index, .. } => tensors.push(int("cache_batch_idx", index)),
        RowMap::Strided => {}
    }
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
    let program = variant.program();
    let name = variant.kernel_name();
    let key = cache::cache_key(
        program.texts(),
        &nvrtc::compile_options(arch),
        nv.version,
        arch,
    );
    let dir = cache::cache_dir(&|k| std::env::var(k).ok());
    let path = cache::cubin_path(&dir, &name, arch, key);
    if let Some(cubin) = cache::load(&path) {
        return Ok((cubin, 0.0, true));
    }
    let t = Instant::now();
    let compiled = nv.compile(&name, &program, arch)?;
    let secs = t.elapsed().as_secs_f64();
    cache::store(&path, &compiled.cubin);
    Ok((compiled.cubin, secs, false))
}

/// How `p` decodes on `dev`, None where the prefill kernels serve it.
fn decode_plan(dev: &driver::DeviceInfo, p: &Problem) -> Option<DecodePlan> {
    let sms = dev.multiprocessors.max(1) as u32;
    DecodePlan::new(p, sms, dev.max_smem_per_block, dev.has_clusters())
}

/// The decoding kernel of `p` under `plan`.
fn decode_variant(p: &Problem, plan: &DecodePlan) -> Variant {
    Variant::FwdDecode {
        dtype: p.q.dtype,
        tile: plan.tile,
        score_mod: variants::needs_score_mod(p),
        seqs: variants::has_sequence_metadata(p),
        paged: p.k.rows.is_paged(),
    }
}
