//! Every kernel variant compiled for an architecture with NVRTC, without a GPU: CI's compile
//! check and `ufa check`'s. Part of the test kit's share of the library (feature `testkit`).

use super::nvrtc;
use super::sm90::runs_wgmma;
use super::variants::Variant;
use crate::error::{Error, ErrorKind, Result};
use std::time::Instant;

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
    compile_variants(&[arch], &|_, _| true)
}

/// Compiles, for each architecture of `archs`, the variants its devices can select and `keep`
/// accepts (called with the architecture and the kernel name), on every core of the machine
/// from one queue; reports come in that order and the first failure is returned with its log.
/// `UFA_COMPILE_ONLY=text` further keeps the kernels whose name contains it (while editing one
/// kernel).
pub fn compile_variants(
    archs: &[&str],
    keep: &(dyn Fn(&str, &str) -> bool + Sync),
) -> Result<Vec<CompileReport>> {
    let nv = nvrtc::nvrtc()?;
    let only = std::env::var("UFA_COMPILE_ONLY").unwrap_or_default();
    let mut jobs: Vec<(&str, Variant)> = Vec::new();
    for &arch in archs {
        // Each architecture's largest opt-in shared memory a block, so that the variants
        // compiled are the ones its devices select.
        let smem = match arch {
            "sm_80" | "sm_87" => 166_912,
            a if a.starts_with("sm_8") => 101_376,
            a if a.starts_with("sm_90") => 232_448,
            _ => 101_376,
        };
        jobs.extend(
            Variant::all(smem, runs_wgmma(arch))
                .into_iter()
                .filter(|v| {
                    let name = v.kernel_name();
                    name.contains(&only) && keep(arch, &name)
                })
                .map(|v| (arch, v)),
        );
    }
    if jobs.is_empty() {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("UFA_COMPILE_ONLY={only:?} matches no kernel variant for {archs:?}"),
        ));
    }
    let compile = |&(arch, v): &(&str, Variant)| -> Result<CompileReport> {
        let t = Instant::now();
        let c = nv.compile(&v.kernel_name(), &v.program(), arch)?;
        Ok(CompileReport {
            kernel: v.kernel_name(),
            arch: arch.to_string(),
            seconds: t.elapsed().as_secs_f64(),
            cubin: c.cubin,
            resources: c
                .log
                .lines()
                .filter(|l| l.contains("registers") || l.contains("spill") || l.contains("arning"))
                .map(str::trim)
                .collect::<Vec<_>>()
                .join("; "),
        })
    };
    // One shared queue: compile times differ by 10x between variants, so fixed chunks would
    // leave cores idle at the end.
    let next = std::sync::atomic::AtomicUsize::new(0);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut results: Vec<(usize, Result<CompileReport>)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads.min(jobs.len()))
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(job) = jobs.get(i) else { break };
                        done.push((i, compile(job)));
                    }
                    done
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("a compile worker panicked"))
            .collect()
    });
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

/// The NVRTC version, or why NVRTC cannot be loaded.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    nvrtc::nvrtc().map(|n| n.version)
}
