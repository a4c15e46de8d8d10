//! The [`Context`]: backend state shared by every call, and the entry points.

use crate::cpu::{CpuBackend, Isa};
use crate::cuda::CudaBackend;
use crate::device::Device;
use crate::empty;
use crate::error::{invalid, Result};
use crate::grads::{BackwardInputs, Gradients};
use crate::kvcache::{validate_kvcache, KvAppend, KvCache, Workspace};
use crate::merge::{validate_merge, AttentionState};
use crate::metadata::fetch_host;
use crate::params::AttentionParams;
use crate::problem::{validate_backward, validate_forward, BackwardArgs};
use crate::sequences::IntArray;
use crate::tensor::{TensorView, TensorViewMut};
use crate::varlen::{validate_varlen_backward, validate_varlen_forward, Varlen};
use std::ffi::c_void;

/// Environment variable that sets the CPU thread count of contexts built without one.
pub const NUM_THREADS_ENV: &str = "UFA_NUM_THREADS";

/// Environment variable that picks the CPU kernel family of contexts built without one, by
/// the names `ufa info` and `--cpu-isa` use (`amx-bf16`, `avx512bf16`, `avx512bf16-decode`,
/// `avx512`, `avx2`, `portable`): the one way to pick it from the Python package, whose
/// context the process shares.
pub const CPU_ISA_ENV: &str = "UFA_CPU_ISA";

/// Owns the backends' state: the CPU thread pool (and, later, the CUDA module cache).
/// `Send + Sync`: any number of threads may call [`Context::forward`] on one context at once.
pub struct Context {
    cpu: CpuBackend,
    cuda: CudaBackend,
}

/// Options for [`Context`]; see [`Context::builder`].
#[derive(Clone, Debug, Default)]
pub struct ContextBuilder {
    num_threads: Option<usize>,
    cpu_isa: Option<Isa>,
}

impl ContextBuilder {
    /// CPU threads; 0 or unset means `$UFA_NUM_THREADS`, else every available core.
    pub fn num_threads(mut self, n: usize) -> Self {
        self.num_threads = (n > 0).then_some(n);
        self
    }

    /// Forces a CPU kernel family (for testing and comparison); unset means `$UFA_CPU_ISA`,
    /// else the best available ([`Isa::detect`]).
    pub fn cpu_isa(mut self, isa: Isa) -> Self {
        self.cpu_isa = Some(isa);
        self
    }

    pub fn build(self) -> Result<Context> {
        let threads = match self.num_threads {
            Some(n) => n,
            None => threads_from_env()?,
        };
        let isa = match self.cpu_isa {
            Some(isa) => isa,
            None => isa_from_env()?,
        };
        Ok(Context {
            cpu: CpuBackend::new(threads, isa)?,
            cuda: CudaBackend::new(),
        })
    }
}

fn threads_from_env() -> Result<usize> {
    match std::env::var(NUM_THREADS_ENV) {
        Ok(s) if !s.trim().is_empty() => match s.trim().parse::<usize>() {
            Ok(n) if (1..=4096).contains(&n) => Ok(n),
            _ => invalid!("{NUM_THREADS_ENV}={s:?} must be a whole number from 1 to 4096"),
        },
        _ => Ok(std::thread::available_parallelism().map_or(1, |n| n.get())),
    }
}

fn isa_from_env() -> Result<Isa> {
    match std::env::var(CPU_ISA_ENV) {
        Ok(s) if !s.trim().is_empty() => {
            let isa: Isa = match s.trim().parse() {
                Ok(isa) => isa,
                Err(e) => invalid!("{CPU_ISA_ENV}={s:?}: {e}"),
            };
            if !isa.is_supported() {
                return Err(crate::Error::unsupported(format!(
                    "{CPU_ISA_ENV}={s:?}: this CPU cannot run that kernel family (features: {})",
                    crate::cpu_features().join(", ")
                )));
            }
            Ok(isa)
        }
        _ => Ok(Isa::detect()),
    }
}

impl Context {
    /// A context with default options (see [`ContextBuilder`]).
    pub fn new() -> Result<Context> {
        Context::builder().build()
    }

    pub fn builder() -> ContextBuilder {
        ContextBuilder::default()
    }

    /// CPU threads this context computes with.
    pub fn num_threads(&self) -> usize {
        self.cpu.num_threads()
    }

    /// The CPU kernel family in use.
    pub fn cpu_isa(&self) -> Isa {
        self.cpu.isa()
    }

    /// CUDA devices usable by this context, or the reason there are none.
    pub fn cuda_devices(&self) -> std::result::Result<Vec<String>, String> {
        self.cuda.devices()
    }

    /// `out = softmax(scale · q kᵀ + bias) v` with the masks of `params`; see [`AttentionParams`].
    ///
    /// Shapes: q `[batch, seqlen_q, heads_q, head_dim]`, k `[batch, seqlen_kv, heads_kv,
    /// head_dim]`, v `[batch, seqlen_kv, heads_kv, head_dim_v]`, out `[batch, seqlen_q, heads_q,
    /// head_dim_v]`. On error nothing is written.
    pub fn forward(
        &self,
        q: &TensorView<'_>,
        k: &TensorView<'_>,
        v: &TensorView<'_>,
        out: &mut TensorViewMut<'_>,
        params: &AttentionParams<'_>,
    ) -> Result<()> {
        self.forward_with_lse(q, k, v, out, None, params)
    }

    /// As [`Context::forward`], and writes the log-sum-exp of each row's scores (natural log,
    /// `[batch, heads_q, seqlen_q]`, f32; -inf where a row sees no key) when `lse` is given.
    pub fn forward_with_lse(
        &self,
        q: &TensorView<'_>,
        k: &TensorView<'_>,
        v: &TensorView<'_>,
        out: &mut TensorViewMut<'_>,
        lse: Option<&mut TensorViewMut<'_>>,
        params: &AttentionParams<'_>,
    ) -> Result<()> {
        // SAFETY: the null stream is CUDA's legacy default stream, always valid.
        unsafe { self.forward_on_stream(q, k, v, out, lse, params, std::ptr::null_mut()) }
    }

    /// As [`Context::forward_with_lse`], with CUDA work queued on `stream` (a `CUstream`;
    /// null = the legacy default stream) and not waited for: like any CUDA kernel launch, the
    /// outputs are ready once the stream reaches this point. CPU tensors ignore `stream`.
    ///
    /// # Safety
    /// `stream` must be null or a live stream of the tensors' device's primary context, and the
    /// tensors' memory must stay valid until the stream has run the call.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn forward_on_stream(
        &self,
        q: &TensorView<'_>,
        k: &TensorView<'_>,
        v: &TensorView<'_>,
        out: &mut TensorViewMut<'_>,
        lse: Option<&mut TensorViewMut<'_>>,
        params: &AttentionParams<'_>,
        stream: *mut std::ffi::c_void,
    ) -> Result<()> {
        let problem = validate_forward(q, k, v, out, lse.as_deref(), params)?;
        if let Some(fills) = empty::forward_fills(&problem) {
            return self.fill(problem.device, &fills, stream);
        }
        match problem.device {
            Device::Cpu => self.cpu.forward(&problem),
            Device::Cuda(_) => self.cuda.forward(&problem, stream),
        }
    }

    /// Writes the outputs of a call with nothing to compute (see `empty`).
    fn fill(&self, device: Device, fills: &[empty::Fill], stream: *mut c_void) -> Result<()> {
        match device {
            // SAFETY: the fills describe outputs that validation accepted as host memory.
            Device::Cpu => unsafe { empty::fill_host(fills) },
            Device::Cuda(ordinal) => self.cuda.fill(ordinal, fills, stream)?,
        }
        Ok(())
    }

    /// How each CUDA kernel this context loaded was obtained (compiled or from the disk cache),
    /// with the time it took and its register use.
    pub fn cuda_module_reports(&self) -> Vec<crate::cuda::ModuleReport> {
        self.cuda.module_reports()
    }
}

impl Context {
    /// Gradients of attention with respect to q, k and v, for the same `params` as the forward.
    /// On error nothing is written. The CPU backend is always deterministic (bitwise-identical
    /// results for every run and thread count), so `params.deterministic` changes nothing there;
    /// on CUDA it orders the dQ accumulation so that repeated runs are bitwise equal.
    pub fn backward(
        &self,
        inputs: &BackwardInputs<'_>,
        grads: &mut Gradients<'_>,
        params: &AttentionParams<'_>,
    ) -> Result<()> {
        // SAFETY: the null stream is CUDA's legacy default stream, always valid.
        unsafe { self.backward_on_stream(inputs, grads, params, std::ptr::null_mut()) }
    }

    /// As [`Context::backward`], with CUDA work queued on `stream` (a `CUstream`; null = the
    /// legacy default stream) and not waited for. The call's workspace is allocated and freed
    /// in stream order on `stream`. CPU tensors ignore `stream`.
    ///
    /// # Safety
    /// `stream` must be null or a live stream of the tensors' device's primary context, and the
    /// tensors' memory must stay valid until the stream has run the call.
    pub unsafe fn backward_on_stream(
        &self,
        inputs: &BackwardInputs<'_>,
        grads: &mut Gradients<'_>,
        params: &AttentionParams<'_>,
        stream: *mut std::ffi::c_void,
    ) -> Result<()> {
        let problem = validate_backward(&BackwardArgs::new(inputs, grads), params)?;
        if let Some(fills) = empty::backward_fills(&problem) {
            return self.fill(problem.fwd.device, &fills, stream);
        }
        match problem.fwd.device {
            Device::Cpu => self.cpu.backward(&problem),
            Device::Cuda(_) => self.cuda.backward(&problem, stream),
        }
    }
}

/// Variable-length batches, KV caches and merging (see [`Varlen`], [`KvCache`],
/// [`AttentionState`]).
impl Context {
    /// Reads int32 metadata of a call on `device` into host memory: in place on the CPU; on
    /// CUDA a copy ordered on `stream` and waited for (checked mode only).
    fn fetcher(
        &self,
        device: Device,
        stream: *mut c_void,
    ) -> impl Fn(&IntArray) -> Result<Vec<i32>> + '_ {
        let stream = stream as usize;
        move |a: &IntArray| match device {
            Device::Cpu => fetch_host(a),
            Device::Cuda(ordinal) => self.cuda.read_ints(ordinal, a, stream as *mut c_void),
        }
    }

    /// Attention over a packed batch of variable-length sequences (FlashAttention's
    /// `flash_attn_varlen_func`): q `[total_q, heads_q, head_dim]`, k `[total_kv, heads_kv,
    /// head_dim]`, v `[total_kv, heads_kv, head_dim_v]`, out `[total_q, heads_q, head_dim_v]`,
    /// LSE f32 `[heads_q, total_q]`; see [`Varlen`]. Every rule of [`Context::forward`] applies
    /// to each sequence (causal alignment per sequence). On error nothing is written.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_varlen(
        &self,
        q: &TensorView<'_>,
        k: &TensorView<'_>,
        v: &TensorView<'_>,
        out: &mut TensorViewMut<'_>,
        lse: Option<&mut TensorViewMut<'_>>,
        seqs: &Varlen<'_>,
        params: &AttentionParams<'_>,
    ) -> Result<()> {
        // SAFETY: the null stream is CUDA's legacy default stream, always valid.
        unsafe {
            self.forward_varlen_on_stream(q, k, v, out, lse, seqs, params, std::ptr::null_mut())
        }
    }

    /// As [`Context::forward_varlen`], with CUDA work queued on `stream`.
    ///
    /// # Safety
    /// As [`Context::forward_on_stream`]; the metadata arrays too must stay valid until the
    /// stream has run the call.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn forward_varlen_on_stream(
        &self,
        q: &TensorView<'_>,
        k: &TensorView<'_>,
        v: &TensorView<'_>,
        out: &mut TensorViewMut<'_>,
        lse: Option<&mut TensorViewMut<'_>>,
        seqs: &Varlen<'_>,
        params: &AttentionParams<'_>,
        stream: *mut c_void,
    ) -> Result<()> {
        let fetch = self.fetcher(q.device(), stream);
        let p = validate_varlen_forward(q, k, v, out, lse.as_deref(), seqs, params, &fetch)?;
        match p.device {
            Device::Cpu => self.cpu.forward(&p),
            Device::Cuda(_) => self.cuda.forward(&p, stream),
        }
    }

    /// Gradients of [`Context::forward_varlen`]: dq, dk, dv packed like q, k and v. The keys
    /// must be packed (not a paged cache).
    pub fn backward_varlen(
        &self,
        inputs: &BackwardInputs<'_>,
        grads: &mut Gradients<'_>,
        seqs: &Varlen<'_>,
        params: &AttentionParams<'_>,
    ) -> Result<()> {
        // SAFETY: the null stream is CUDA's legacy default stream, always valid.
        unsafe { self.backward_varlen_on_stream(inputs, grads, seqs, params, std::ptr::null_mut()) }
    }

    /// As [`Context::backward_varlen`], with CUDA work queued on `stream`.
    ///
    /// # Safety
    /// As [`Context::backward_on_stream`].
    pub unsafe fn backward_varlen_on_stream(
        &self,
        inputs: &BackwardInputs<'_>,
        grads: &mut Gradients<'_>,
        seqs: &Varlen<'_>,
        params: &AttentionParams<'_>,
        stream: *mut c_void,
    ) -> Result<()> {
        let fetch = self.fetcher(inputs.q.device(), stream);
        let args = BackwardArgs::new(inputs, grads);
        let p = validate_varlen_backward(&args, seqs, params, &fetch)?;
        match p.fwd.device {
            Device::Cpu => self.cpu.backward(&p),
            Device::Cuda(_) => self.cuda.backward(&p, stream),
        }
    }

    /// Attention over a KV cache (FlashAttention's `flash_attn_with_kvcache`): appends
    /// `append`'s keys and values at each sequence's `cache.seqlens` (rotating keys and q when
    /// it has rotary tables), then attends q `[batch, seqlen_q, heads_q, head_dim]` to every
    /// key of its sequence, writing out `[batch, seqlen_q, heads_q, head_dim_v]` and the LSE
    /// `[batch, heads_q, seqlen_q]`. On error nothing is written, the cache included.
    pub fn forward_kvcache(
        &self,
        q: &TensorView<'_>,
        cache: &mut KvCache<'_>,
        append: Option<&KvAppend<'_>>,
        out: &mut TensorViewMut<'_>,
        lse: Option<&mut TensorViewMut<'_>>,
        params: &AttentionParams<'_>,
    ) -> Result<()> {
        // SAFETY: the null stream is CUDA's legacy default stream, always valid.
        unsafe {
            self.forward_kvcache_on_stream(
                q,
                cache,
                append,
                out,
                lse,
                params,
                None,
                std::ptr::null_mut(),
            )
        }
    }

    /// As [`Context::forward_kvcache`], with CUDA work queued on `stream`, using `workspace`
    /// (at least [`crate::kvcache_workspace_bytes`]) instead of allocating, when given.
    ///
    /// # Safety
    /// As [`Context::forward_on_stream`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn forward_kvcache_on_stream(
        &self,
        q: &TensorView<'_>,
        cache: &mut KvCache<'_>,
        append: Option<&KvAppend<'_>>,
        out: &mut TensorViewMut<'_>,
        lse: Option<&mut TensorViewMut<'_>>,
        params: &AttentionParams<'_>,
        workspace: Option<Workspace<'_>>,
        stream: *mut c_void,
    ) -> Result<()> {
        let fetch = self.fetcher(q.device(), stream);
        let p = validate_kvcache(q, cache, append, out, lse.as_deref(), params, &fetch)?;
        match p.attn.device {
            Device::Cpu => self.cpu.forward_kvcache(&p),
            Device::Cuda(_) => self.cuda.forward_kvcache(&p, workspace, stream),
        }
    }

    /// Merges partial attention results over disjoint keys into `out` `[batch, seqlen, heads,
    /// head_dim]` and, when given, `lse` `[batch, heads, seqlen]`; see [`AttentionState`].
    /// `out` (and `lse`) may be `states[0]`'s own tensors (merged in place).
    pub fn merge_states(
        &self,
        states: &[AttentionState<'_>],
        out: &mut TensorViewMut<'_>,
        lse: Option<&mut TensorViewMut<'_>>,
    ) -> Result<()> {
        // SAFETY: the null stream is CUDA's legacy default stream, always valid.
        unsafe { self.merge_states_on_stream(states, out, lse, std::ptr::null_mut()) }
    }

    /// As [`Context::merge_states`], with CUDA work queued on `stream`.
    ///
    /// # Safety
    /// As [`Context::forward_on_stream`].
    pub unsafe fn merge_states_on_stream(
        &self,
        states: &[AttentionState<'_>],
        out: &mut TensorViewMut<'_>,
        lse: Option<&mut TensorViewMut<'_>>,
        stream: *mut c_void,
    ) -> Result<()> {
        let m = validate_merge(states, out, lse.as_deref())?;
        match m.device {
            Device::Cpu => self.cpu.merge(&m),
            Device::Cuda(_) => self.cuda.merge(&m, stream),
        }
    }
}

// Beside the dispatch, which knows the backends: the size depends on the CUDA decoding plan.
/// Bytes of scratch memory a KV-cache call with this q and append needs on CUDA, at most: the
/// rotated q (with rotary embedding, where the decoding kernel does not serve the call: that
/// one rotates q as it loads it) and the partial states of the decoding kernel's key splits
/// (f16/bf16 q of few rows), whatever the device. 0 when it needs none. The CPU backend
/// allocates its own.
pub fn kvcache_workspace_bytes(q: &TensorView<'_>, append: Option<&KvAppend<'_>>) -> usize {
    let rot = match append {
        Some(KvAppend {
            rotary: Some(_), ..
        }) => crate::kvcache::rotated_q_bytes(q.layout().numel(), q.dtype()),
        _ => 0,
    };
    let shape = q.layout().shape();
    let decode = match shape {
        [b, s, h, d] => crate::cuda::decode_workspace_bound(q.dtype(), *b, *s, *h, *d),
        _ => 0,
    };
    rot + decode
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn context_is_send_and_sync() {
        assert_send_sync::<Context>();
    }
}
