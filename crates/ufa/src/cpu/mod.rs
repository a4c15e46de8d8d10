//! The CPU backend: the flash algorithm on a private thread pool, with SIMD kernels chosen at
//! run time. Results depend only on the problem, never on the thread count: every output row is
//! computed by one work item in a fixed order, and the split-KV decision uses problem sizes alone.

mod aligned;
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx512_bf16;
mod backward;
mod caches;
#[cfg(target_arch = "x86_64")]
mod few_rows;
mod forward;
mod isa;
mod kvcache;
mod math;
mod merge;
mod microkernel;
mod parallel;
mod pool;
mod rates;
mod spare;
mod tile;
#[cfg(target_arch = "x86_64")]
mod value_pairs;

pub use caches::last_level_cache;
pub use isa::{amx, cpu_features, Amx, Isa, AMX_BY_DEFAULT};
#[cfg(all(target_arch = "x86_64", feature = "testkit"))]
pub(crate) use rates::x86 as throughput_loops;
pub use rates::{rates, Rates, BF16_DOT_MIN_RATIO};

use crate::error::{Error, Result};
use crate::kvcache::KvCacheProblem;
use crate::merge::MergeProblem;
use crate::problem::{BackwardProblem, Problem};
use parallel::{Exec, INLINE_WORK};
#[cfg(feature = "testkit")]
pub use pool::live_workers;
use pool::WorkerPool;
use std::sync::{Arc, Mutex};

/// Whether a problem is small enough to compute on the calling thread.
fn is_tiny(p: &Problem) -> bool {
    [
        p.heads_q,
        p.seqlen_q,
        p.seqlen_kv,
        p.head_dim + p.head_dim_v,
    ]
    .iter()
    .try_fold(p.batch, |acc, &x| acc.checked_mul(x))
    .is_some_and(|work| work < INLINE_WORK)
}

/// Memory for partial results (the backward's partial dQ, the forward's split-KV parts), kept
/// between calls when it is small: fresh pages cost a fault each, which for a short problem
/// rivals the arithmetic.
#[derive(Default)]
struct Workspace(Mutex<Vec<f32>>);

/// Largest workspace kept for the next call, in elements.
const KEEP_WORKSPACE: usize = 16 << 20;

impl Workspace {
    /// A buffer of `n` elements (contents unspecified); concurrent callers get their own.
    fn take(&self, n: usize) -> Result<Vec<f32>> {
        let mut v = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        v.truncate(n);
        v.try_reserve_exact(n - v.len())?;
        v.resize(n, 0.0);
        Ok(v)
    }

    fn give_back(&self, v: Vec<f32>) {
        if v.capacity() <= KEEP_WORKSPACE {
            *self.0.lock().unwrap_or_else(|e| e.into_inner()) = v;
        }
    }
}

/// The CPU backend: its thread pool (see `pool`), kernel family and scratch memory.
pub(crate) struct CpuBackend {
    isa: Isa,
    pool: WorkerPool,
    workspace: Workspace,
}

impl CpuBackend {
    pub fn new(num_threads: usize, isa: Isa) -> Result<Self> {
        if !isa.is_supported() {
            return Err(Error::unsupported(format!(
                "cpu_isa={isa} is not supported by this CPU (features: {})",
                cpu_features().join(", ")
            )));
        }
        Ok(CpuBackend {
            isa,
            pool: WorkerPool::new(num_threads),
            workspace: Workspace::default(),
        })
    }

    pub fn num_threads(&self) -> usize {
        self.pool.num_threads()
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    fn pool(&self) -> Result<Arc<rayon::ThreadPool>> {
        self.pool.get()
    }

    pub fn forward(&self, p: &Problem) -> Result<()> {
        if is_tiny(p) {
            return forward::forward(p, self.isa, Exec::Inline, &self.workspace);
        }
        let pool = self.pool()?;
        pool.install(|| forward::forward(p, self.isa, Exec::Pool, &self.workspace))
    }

    /// Appends to the cache, rotates q when asked, then attends over the cache.
    pub fn forward_kvcache(&self, kp: &KvCacheProblem) -> Result<()> {
        let mut kp = *kp;
        let mut rotated = Vec::new();
        if let Some(a) = &kp.append {
            if let Some(r) = &a.rotary {
                rotated = kvcache::rotate_q(&kp, a, r);
            }
            kvcache::append(&kp, a);
        }
        if kp.rotates_q() {
            kp.use_rotated_q(rotated.as_mut_ptr());
        }
        self.forward(&kp.attn)
    }

    pub fn merge(&self, m: &MergeProblem) -> Result<()> {
        let work = m.batch * m.seqlen * m.heads * m.head_dim * m.states.len();
        if work < INLINE_WORK {
            merge::merge(m, Exec::Inline);
        } else {
            self.pool()?.install(|| merge::merge(m, Exec::Pool));
        }
        Ok(())
    }

    pub fn backward(&self, p: &BackwardProblem) -> Result<()> {
        if is_tiny(&p.fwd) {
            return backward::backward(p, self.isa, Exec::Inline, &self.workspace);
        }
        let pool = self.pool()?;
        pool.install(|| backward::backward(p, self.isa, Exec::Pool, &self.workspace))
    }
}
