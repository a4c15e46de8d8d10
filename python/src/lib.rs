//! `ufa._ufa`: the compiled core of the Python package.
//!
//! Arrays come in through DLPack and are read (or written) in place: no copies, any strides whose
//! last dimension is contiguous. Producers that publish the DLPack C exchange API (PyTorch ≥ 2.9)
//! are read through it without allocating a capsule, which also yields the producer's current
//! stream; any other producer (NumPy, JAX, CuPy, ...) goes through `__dlpack__`. Allocation of
//! outputs, autograd and the PyTorch-facing semantics live in the Python half of the package;
//! this module only describes memory to the core and maps its errors onto Python exceptions.

use dlpark::ffi::{DLDataTypeCode, DLDeviceType, DLTensor};
use dlpark::python::consumer::exchange::ExchangeApi;
use dlpark::python::{from_dlpack, ImportedDlpack};
use dlpark::DlpackFlags;
use pyo3::exceptions::{
    PyMemoryError, PyNotImplementedError, PyRuntimeError, PyTypeError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use ufa::{
    AttentionParams, AttentionState, BackwardInputs, CausalAlignment, Context, DType, Device,
    ErrorKind, Fp32Precision, Gradients, KvAppend, KvCache, Rotary, TensorView, TensorViewMut,
    Varlen, MAX_DIMS,
};

/// The one context of the process (its CPU thread pool is built on first use).
fn context() -> PyResult<&'static Context> {
    static CTX: OnceLock<Result<Context, ufa::Error>> = OnceLock::new();
    CTX.get_or_init(Context::new)
        .as_ref()
        .map_err(|e| core_error(e.clone()))
}

/// Maps a core error onto the Python exception a caller expects. Messages already name the
/// argument and the values that were wrong.
fn core_error(e: ufa::Error) -> PyErr {
    let msg = e.message().to_string();
    match e.kind() {
        ErrorKind::InvalidArgument if msg.contains(".dtype=") => PyTypeError::new_err(msg),
        ErrorKind::InvalidArgument => PyValueError::new_err(msg),
        ErrorKind::Unsupported => PyNotImplementedError::new_err(msg),
        ErrorKind::OutOfMemory => PyMemoryError::new_err(msg),
        _ => PyRuntimeError::new_err(e.to_string()),
    }
}

/// One array argument, described for the core. `_keep` holds a DLPack import alive (its deleter
/// runs when the call is over); exchange-API views need nothing held beyond the Python object.
struct Arg {
    name: &'static str,
    ptr: *mut c_void,
    dtype: DType,
    device: Device,
    ndim: usize,
    shape: [usize; MAX_DIMS],
    strides: [usize; MAX_DIMS],
    read_only: bool,
    /// The producer's current work stream for this device (null on the CPU or when unknown).
    stream: *mut c_void,
    _keep: Option<ImportedDlpack>,
}

// SAFETY: an `Arg` only describes memory owned by a Python object that outlives the call; the
// raw pointers are read by the core exactly as the views it builds from them allow.
unsafe impl Send for Arg {}
unsafe impl Sync for Arg {}

fn dtype_name(code: DLDataTypeCode, bits: u8) -> String {
    let kind = match code {
        DLDataTypeCode::INT => "int",
        DLDataTypeCode::UINT => "uint",
        DLDataTypeCode::FLOAT => "float",
        DLDataTypeCode::BFLOAT => "bfloat",
        DLDataTypeCode::BOOL => "bool",
        _ => "dlpack_code_",
    };
    if code == DLDataTypeCode::BOOL {
        "bool".into()
    } else if kind == "dlpack_code_" {
        format!("{kind}{}_{bits}", code.0)
    } else {
        format!("{kind}{bits}")
    }
}

/// Reads a DLTensor into an [`Arg`] (copying shape and strides, which the producer owns).
///
/// # Safety
/// `t` must be a valid DLTensor whose shape/strides arrays hold `ndim` entries.
unsafe fn describe(
    name: &'static str,
    t: &DLTensor,
    read_only: bool,
    stream: *mut c_void,
) -> PyResult<Arg> {
    let ndim = usize::try_from(t.ndim).unwrap_or(0);
    if ndim == 0 || ndim > MAX_DIMS {
        return Err(PyValueError::new_err(format!(
            "{name} must have 1 to {MAX_DIMS} dimensions (4 for q, k, v and out), got {}",
            t.ndim
        )));
    }
    let dt = t.dtype;
    let dtype = match (dt.code, dt.bits, dt.lanes) {
        (DLDataTypeCode::FLOAT, 16, 1) => DType::F16,
        (DLDataTypeCode::BFLOAT, 16, 1) => DType::BF16,
        (DLDataTypeCode::FLOAT, 32, 1) => DType::F32,
        (DLDataTypeCode::BOOL, 8, 1) => DType::Bool,
        (DLDataTypeCode::INT, 32, 1) => DType::I32,
        (code, bits, _) => {
            return Err(PyTypeError::new_err(format!(
                "{name}.dtype={} is not supported: ufa takes float16, bfloat16 or float32 \
                 (bool for masks, int32 for sequence metadata)",
                dtype_name(code, bits)
            )))
        }
    };
    let device = match t.device.device_type {
        DLDeviceType::CPU | DLDeviceType::CUDAHOST => Device::Cpu,
        DLDeviceType::CUDA => Device::Cuda(t.device.device_id.max(0) as u32),
        other => {
            return Err(PyValueError::new_err(format!(
                "{name} lives on DLPack device type {} which ufa cannot use (CPU or CUDA only)",
                other.0
            )))
        }
    };
    let mut shape = [1usize; MAX_DIMS];
    let mut strides = [0usize; MAX_DIMS];
    let dims = std::slice::from_raw_parts(t.shape, ndim);
    let mut contiguous = 1i64;
    for d in (0..ndim).rev() {
        let size = dims[d];
        // DLPack before 1.2 allows NULL strides for a row-major tensor.
        let stride = if t.strides.is_null() {
            contiguous
        } else {
            *t.strides.add(d)
        };
        contiguous = contiguous.saturating_mul(size.max(1));
        if size < 0 {
            return Err(PyValueError::new_err(format!(
                "{name}.shape[{d}]={size} is negative"
            )));
        }
        if stride < 0 {
            return Err(PyValueError::new_err(format!(
                "{name}.strides[{d}]={stride} is negative; ufa reads memory in place and needs \
                 non-negative strides (pass a copy)"
            )));
        }
        shape[d] = size as usize;
        strides[d] = stride as usize;
    }
    let ptr = (t.data as *mut u8).wrapping_add(t.byte_offset as usize) as *mut c_void;
    Ok(Arg {
        name,
        ptr,
        dtype,
        device,
        ndim,
        shape,
        strides,
        read_only,
        stream,
        _keep: None,
    })
}

thread_local! {
    /// The DLPack exchange API of the last type that had one (torch.Tensor, in practice) and
    /// that type, held so that its address keeps naming it: an import looks the table up once
    /// per type instead of once per array (a type attribute lookup, about a tenth of a small
    /// call's time in the binding). DLPack has the table live as long as the process.
    static EXCHANGE: std::cell::RefCell<Option<(Py<pyo3::types::PyType>, ExchangeApi)>> =
        const { std::cell::RefCell::new(None) };
}

/// Describes `obj` through a DLPack exchange API.
fn import_exchange(api: &ExchangeApi, obj: &Bound<'_, PyAny>, name: &'static str) -> PyResult<Arg> {
    // SAFETY: the producer fills a valid DLTensor for the duration of the closure, and we copy
    // everything out of it; the data stays alive with `obj`, which the caller holds.
    api.with_tensor_view_no_sync(obj.as_borrowed(), |t, stream| unsafe {
        describe(name, t, false, stream)
    })
    .map_err(|e| annotate(obj.py(), e, name))?
}

/// Describes a Python array in place, through the fastest DLPack route it offers.
fn import(obj: &Bound<'_, PyAny>, name: &'static str) -> PyResult<Arg> {
    let ty = obj.get_type();
    let cached = EXCHANGE.with(|cache| match &*cache.borrow() {
        Some((t, api)) if t.as_ptr() == ty.as_ptr() => Some(import_exchange(api, obj, name)),
        _ => None,
    });
    if let Some(arg) = cached {
        return arg;
    }
    if let Some(api) = ExchangeApi::from_object(obj.as_borrowed())? {
        let arg = import_exchange(&api, obj, name);
        EXCHANGE.with(|cache| *cache.borrow_mut() = Some((ty.unbind(), api)));
        return arg;
    }
    if obj.hasattr(pyo3::intern!(obj.py(), "__dlpack__"))? {
        let imported =
            from_dlpack(obj.as_borrowed(), None, None).map_err(|e| annotate(obj.py(), e, name))?;
        let read_only = imported.flags().contains(DlpackFlags::READ_ONLY);
        // SAFETY: the managed tensor is valid until `imported` is dropped, and the Arg keeps it.
        let t = unsafe {
            match &imported {
                ImportedDlpack::Legacy(m) => *m.tensor(),
                ImportedDlpack::Versioned(m) => *m.tensor(),
            }
        };
        let mut arg = unsafe { describe(name, &t, read_only, std::ptr::null_mut())? };
        arg._keep = Some(imported);
        return Ok(arg);
    }
    Err(PyTypeError::new_err(format!(
        "{name} must be an array that supports DLPack (torch.Tensor, numpy.ndarray, ...), \
         got {}",
        obj.get_type().name()?
    )))
}

/// Prefixes a producer's DLPack error with the argument's name.
fn annotate(py: Python<'_>, e: PyErr, name: &str) -> PyErr {
    if e.is_instance_of::<PyTypeError>(py) || e.is_instance_of::<PyValueError>(py) {
        e
    } else {
        let msg = format!("{name}: {}", e.value(py));
        if e.is_instance_of::<pyo3::exceptions::PyBufferError>(py) {
            PyValueError::new_err(msg)
        } else {
            PyRuntimeError::new_err(msg)
        }
    }
}

fn import_opt(obj: Option<&Bound<'_, PyAny>>, name: &'static str) -> PyResult<Option<Arg>> {
    match obj {
        Some(o) if !o.is_none() => import(o, name).map(Some),
        _ => Ok(None),
    }
}

impl Arg {
    /// Swaps dims 1 and 2 of a 4-d array (`[b, h, s, d]` <-> `[b, s, h, d]`) when `swap`.
    fn bhsd(mut self, swap: bool) -> Self {
        if swap && self.ndim == 4 {
            self.shape.swap(1, 2);
            self.strides.swap(1, 2);
        }
        self
    }

    fn view(&self) -> PyResult<TensorView<'_>> {
        // SAFETY: the memory belongs to a live Python array that the call holds, and the core
        // validates shapes/strides before reading; the producer promised these strides.
        unsafe {
            TensorView::from_raw_parts(
                self.ptr,
                self.dtype,
                self.device,
                &self.shape[..self.ndim],
                &self.strides[..self.ndim],
            )
        }
        .map_err(|e| name_error(self.name, e))
    }

    fn view_mut(&self) -> PyResult<TensorViewMut<'_>> {
        if self.read_only {
            return Err(PyValueError::new_err(format!(
                "{} is read-only; outputs must be writable arrays",
                self.name
            )));
        }
        // SAFETY: as for `view`; the core checks that outputs overlap neither each other nor
        // any input before it writes.
        unsafe {
            TensorViewMut::from_raw_parts(
                self.ptr,
                self.dtype,
                self.device,
                &self.shape[..self.ndim],
                &self.strides[..self.ndim],
            )
        }
        .map_err(|e| name_error(self.name, e))
    }
}

/// Layout errors from a view constructor do not know which argument they were about.
fn name_error(name: &str, e: ufa::Error) -> PyErr {
    core_error(ufa::Error::new(
        e.kind(),
        format!("{name}: {}", e.message()),
    ))
}

/// Debug hook: when on, each call records what it handed to the core (name, data pointer, shape,
/// strides), so tests can prove that views were passed in place.
static RECORD: AtomicBool = AtomicBool::new(false);
type Record = Vec<(&'static str, usize, Vec<usize>, Vec<usize>)>;
static LAST_CALL: Mutex<Record> = Mutex::new(Vec::new());

fn record<'a>(args: impl IntoIterator<Item = &'a Arg>) {
    if RECORD.load(Ordering::Relaxed) {
        let args: Vec<&Arg> = args.into_iter().collect();
        let mut rec: Record = args
            .iter()
            .map(|a| {
                (
                    a.name,
                    a.ptr as usize,
                    a.shape[..a.ndim].to_vec(),
                    a.strides[..a.ndim].to_vec(),
                )
            })
            .collect();
        // The stream the call's CUDA work goes on (q's producer stream; 0 = default stream).
        rec.push(("stream", args[0].stream as usize, Vec::new(), Vec::new()));
        *LAST_CALL.lock().unwrap_or_else(|p| p.into_inner()) = rec;
    }
}

/// The score parameters every entry point takes, flat in its Python signature (as the
/// `torch.library` ops that call it must be), gathered into one record at the top of the call.
struct Scores {
    scale: Option<f64>,
    causal: bool,
    top_left: bool,
    window: (i64, i64),
    softcap: f64,
    deterministic: bool,
    tf32: bool,
    /// (p, seed, offset) of AttentionParams::dropout; p = 0: none.
    dropout: (f32, u64, u64),
}

impl Scores {
    /// The parameters every entry point takes; deterministic, TF32 and dropout off.
    fn new(
        scale: Option<f64>,
        causal: bool,
        top_left: bool,
        window: (i64, i64),
        softcap: f64,
    ) -> Scores {
        Scores {
            scale,
            causal,
            top_left,
            window,
            softcap,
            deterministic: false,
            tf32: false,
            dropout: (0.0, 0, 0),
        }
    }

    /// The core's parameters, borrowing the imported ALiBi slopes and mask.
    fn params<'a>(
        &self,
        alibi: Option<&'a Arg>,
        mask: Option<&'a Arg>,
    ) -> PyResult<AttentionParams<'a>> {
        let mut params = AttentionParams::default()
            .causal(self.causal)
            .causal_alignment(if self.top_left {
                CausalAlignment::TopLeft
            } else {
                CausalAlignment::BottomRight
            })
            .window(self.window.0, self.window.1)
            .softcap(self.softcap as f32)
            .deterministic(self.deterministic)
            .fp32_precision(if self.tf32 {
                Fp32Precision::Tf32
            } else {
                Fp32Precision::Ieee
            });
        if let Some(s) = self.scale {
            params = params.softmax_scale(s as f32);
        }
        // p = 0 is no dropout (the core's rule).
        let (p, seed, offset) = self.dropout;
        params = params.dropout(p, seed, offset);
        if let Some(a) = alibi {
            params = params.alibi_slopes(a.view()?);
        }
        if let Some(m) = mask {
            params = params.mask(m.view()?);
        }
        Ok(params)
    }
}

/// Runs a core call with the GIL released. CUDA work goes on the producer's current stream of
/// `first` (PyTorch's `current_stream()` through the DLPack exchange API; null, the legacy
/// default stream, for producers without it, which is what `__dlpack__()` without a stream
/// argument synchronises with). Nothing waits for it.
fn run_detached(
    py: Python<'_>,
    first: &Arg,
    call: impl FnOnce(*mut c_void) -> ufa::Result<()> + Send,
) -> PyResult<()> {
    let stream = first.stream as usize;
    py.detach(|| call(stream as *mut c_void))
        .map_err(core_error)
}

/// The nine arrays of a backward call (q, k, v, out, dout, lse, dq, dk, dv), imported.
fn import_backward(objs: [&Bound<'_, PyAny>; 9]) -> PyResult<[Arg; 9]> {
    const NAMES: [&str; 9] = ["q", "k", "v", "out", "dout", "lse", "dq", "dk", "dv"];
    let mut args = Vec::with_capacity(9);
    for (obj, name) in objs.into_iter().zip(NAMES) {
        args.push(import(obj, name)?);
    }
    Ok(args
        .try_into()
        .unwrap_or_else(|_| unreachable!("nine names, nine arrays")))
}

/// The backward's views of `import_backward`'s arrays.
fn backward_views(args: &[Arg; 9]) -> PyResult<(BackwardInputs<'_>, Gradients<'_>)> {
    let [q, k, v, out, dout, lse, dq, dk, dv] = args;
    Ok((
        BackwardInputs {
            q: q.view()?,
            k: k.view()?,
            v: v.view()?,
            out: out.view()?,
            dout: dout.view()?,
            lse: lse.view()?,
        },
        Gradients {
            dq: dq.view_mut()?,
            dk: dk.view_mut()?,
            dv: dv.view_mut()?,
        },
    ))
}

/// Computes attention into `out` (and the log-sum-exp into `lse` when given), in place.
///
/// All arrays are DLPack producers in ufa's layout: q `[batch, seqlen_q, heads_q, head_dim]`,
/// k/v `[batch, seqlen_kv, heads_kv, head_dim(_v)]`, out `[batch, seqlen_q, heads_q,
/// head_dim_v]`, lse f32 `[batch, heads_q, seqlen_q]`. `top_left` aligns the causal diagonal
/// and window to the top-left corner (PyTorch SDPA) instead of the bottom-right one. With
/// `bhsd`, q, k, v and out are given as `[batch, heads, seqlen, dim]` (PyTorch SDPA's layout)
/// and are described to the core with dims 1 and 2 swapped: still no copy. `tf32`: fp32 inputs
/// may be rounded to TF32 once per product on CUDA (Fp32Precision::Tf32) instead of kept to
/// fp32 accuracy; the varlen and KV-cache forwards take it too. `dropout_p`, `seed`, `offset`:
/// attention dropout (AttentionParams::dropout, CPU tensors); the backward takes the same
/// three. Releases the GIL while computing.
#[pyfunction]
#[pyo3(signature = (q, k, v, out, lse=None, *, scale=None, causal=false, top_left=false,
    window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None, mask=None, bhsd=false,
    tf32=false, dropout_p=0.0, seed=0, offset=0))]
#[allow(clippy::too_many_arguments)]
fn forward(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    lse: Option<&Bound<'_, PyAny>>,
    scale: Option<f64>,
    causal: bool,
    top_left: bool,
    window_left: i64,
    window_right: i64,
    softcap: f64,
    alibi_slopes: Option<&Bound<'_, PyAny>>,
    mask: Option<&Bound<'_, PyAny>>,
    bhsd: bool,
    tf32: bool,
    dropout_p: f64,
    seed: u64,
    offset: u64,
) -> PyResult<()> {
    let ctx = context()?;
    let mut scores = Scores::new(
        scale,
        causal,
        top_left,
        (window_left, window_right),
        softcap,
    );
    scores.tf32 = tf32;
    scores.dropout = (dropout_p as f32, seed, offset);
    let (q, k, v, out) = (
        import(q, "q")?.bhsd(bhsd),
        import(k, "k")?.bhsd(bhsd),
        import(v, "v")?.bhsd(bhsd),
        import(out, "out")?.bhsd(bhsd),
    );
    let lse = import_opt(lse, "lse")?;
    let alibi = import_opt(alibi_slopes, "alibi_slopes")?;
    let mask = import_opt(mask, "mask")?;
    record(
        [&q, &k, &v, &out]
            .into_iter()
            .chain(&lse)
            .chain(&alibi)
            .chain(&mask),
    );
    let params = scores.params(alibi.as_ref(), mask.as_ref())?;
    let (qv, kv, vv) = (q.view()?, k.view()?, v.view()?);
    let mut ov = out.view_mut()?;
    let mut lv = lse.as_ref().map(|l| l.view_mut()).transpose()?;
    run_detached(py, &q, |stream| {
        // SAFETY: the stream is the producer's live current stream of the tensors' device (or
        // null), and the producer keeps the memory valid in that stream's order.
        unsafe { ctx.forward_on_stream(&qv, &kv, &vv, &mut ov, lv.as_mut(), &params, stream) }
    })
}

/// `forward(q, k, v, out, lse, scale=scale, causal=causal, top_left=True, softcap=softcap,
/// bhsd=True, tf32=tf32)`, PyTorch SDPA's common call, with positional arguments only: the
/// Python layer's short path, where parsing keywords was a tenth of a small call's time in
/// the binding.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn sdpa_forward(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    lse: Option<&Bound<'_, PyAny>>,
    scale: Option<f64>,
    causal: bool,
    softcap: f64,
    tf32: bool,
) -> PyResult<()> {
    forward(
        py, q, k, v, out, lse, scale, causal, true, -1, -1, softcap, None, None, true, tf32, 0.0,
        0, 0,
    )?;
    SDPA_CALLS.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Calls `sdpa_forward` computed: the SDPA calls ufa served on its short path, which counts
/// them here at no cost to the call (`ufa.torch.fallback_stats()` adds them to "ufa").
static SDPA_CALLS: AtomicU64 = AtomicU64::new(0);

/// The count of `sdpa_forward` calls that computed; `reset=True` sets it back to zero.
#[pyfunction]
#[pyo3(signature = (reset=false))]
fn _sdpa_calls(reset: bool) -> u64 {
    if reset {
        SDPA_CALLS.swap(0, Ordering::Relaxed)
    } else {
        SDPA_CALLS.load(Ordering::Relaxed)
    }
}

/// Gradients of attention, written in place into dq, dk and dv (shapes of q, k and v).
///
/// `out` and `lse` are the forward's output and log-sum-exp, `dout` the gradient of the loss
/// with respect to `out`; the options must be those of the forward (`tf32` as in `forward`:
/// fp32 products on CUDA rounded to TF32 once). With `bhsd`, every array but `lse` is given as
/// `[batch, heads, seqlen, dim]`, as in `forward`. Releases the GIL.
#[pyfunction]
#[pyo3(signature = (q, k, v, out, dout, lse, dq, dk, dv, *, scale=None, causal=false,
    top_left=false, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None, mask=None,
    deterministic=false, tf32=false, dropout_p=0.0, seed=0, offset=0, bhsd=false))]
#[allow(clippy::too_many_arguments)]
fn backward(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    dout: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    dq: &Bound<'_, PyAny>,
    dk: &Bound<'_, PyAny>,
    dv: &Bound<'_, PyAny>,
    scale: Option<f64>,
    causal: bool,
    top_left: bool,
    window_left: i64,
    window_right: i64,
    softcap: f64,
    alibi_slopes: Option<&Bound<'_, PyAny>>,
    mask: Option<&Bound<'_, PyAny>>,
    deterministic: bool,
    tf32: bool,
    dropout_p: f64,
    seed: u64,
    offset: u64,
    bhsd: bool,
) -> PyResult<()> {
    let ctx = context()?;
    let mut scores = Scores::new(
        scale,
        causal,
        top_left,
        (window_left, window_right),
        softcap,
    );
    scores.deterministic = deterministic;
    scores.tf32 = tf32;
    scores.dropout = (dropout_p as f32, seed, offset);
    let args = import_backward([q, k, v, out, dout, lse, dq, dk, dv])?;
    // lse is [batch, heads, seqlen] in both layouts.
    let args = args.map(|a| if a.name == "lse" { a } else { a.bhsd(bhsd) });
    let alibi = import_opt(alibi_slopes, "alibi_slopes")?;
    let mask = import_opt(mask, "mask")?;
    record(args.iter().chain(&alibi).chain(&mask));
    let params = scores.params(alibi.as_ref(), mask.as_ref())?;
    let (inputs, mut grads) = backward_views(&args)?;
    run_detached(py, &args[0], |stream| {
        // SAFETY: as in `forward`.
        unsafe { ctx.backward_on_stream(&inputs, &mut grads, &params, stream) }
    })
}

/// `backward(q, k, v, out, dout, lse, dq, dk, dv, scale=scale, causal=causal, top_left=True,
/// softcap=softcap, deterministic=deterministic, tf32=tf32, bhsd=True)`, dout first, with
/// positional arguments only: the backward of the Python layer's short path (`_Sdpa`), where
/// the eight transposed views and the keyword parsing of the full path were a third of a small
/// call's backward.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn sdpa_backward(
    py: Python<'_>,
    dout: &Bound<'_, PyAny>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    dq: &Bound<'_, PyAny>,
    dk: &Bound<'_, PyAny>,
    dv: &Bound<'_, PyAny>,
    scale: Option<f64>,
    causal: bool,
    softcap: f64,
    deterministic: bool,
    tf32: bool,
) -> PyResult<()> {
    backward(
        py,
        q,
        k,
        v,
        out,
        dout,
        lse,
        dq,
        dk,
        dv,
        scale,
        causal,
        true,
        -1,
        -1,
        softcap,
        None,
        None,
        deterministic,
        tf32,
        0.0,
        0,
        0,
        true,
    )
}

/// The metadata of a packed batch (all int32 arrays on the tensors' device).
struct Packed {
    cu_q: Arg,
    cu_k: Arg,
    used: Option<Arg>,
    table: Option<Arg>,
    max_q: usize,
    max_k: usize,
    checked: bool,
}

impl Packed {
    #[allow(clippy::too_many_arguments)]
    fn import(
        cu_q: &Bound<'_, PyAny>,
        cu_k: &Bound<'_, PyAny>,
        max_q: i64,
        max_k: i64,
        used: Option<&Bound<'_, PyAny>>,
        table: Option<&Bound<'_, PyAny>>,
        checked: bool,
    ) -> PyResult<Packed> {
        let size = |x: i64, name: &str| {
            usize::try_from(x)
                .map_err(|_| PyValueError::new_err(format!("{name}={x} must be >= 0")))
        };
        Ok(Packed {
            cu_q: import(cu_q, "cu_seqlens_q")?,
            cu_k: import(cu_k, "cu_seqlens_k")?,
            used: import_opt(used, "seqused_k")?,
            table: import_opt(table, "block_table")?,
            max_q: size(max_q, "max_seqlen_q")?,
            max_k: size(max_k, "max_seqlen_k")?,
            checked,
        })
    }

    fn args(&self) -> Vec<&Arg> {
        let mut v = vec![&self.cu_q, &self.cu_k];
        v.extend(self.used.iter().chain(&self.table));
        v
    }

    fn varlen(&self) -> PyResult<Varlen<'_>> {
        let mut s = Varlen::new(self.cu_q.view()?, self.cu_k.view()?, self.max_q, self.max_k)
            .checked(self.checked);
        s.seqused_kv = self.used.as_ref().map(Arg::view).transpose()?;
        s.block_table = self.table.as_ref().map(Arg::view).transpose()?;
        Ok(s)
    }
}

/// Attention over a packed batch of variable-length sequences, written in place: q
/// `[total_q, heads_q, head_dim]`, k/v `[total_kv, heads_kv, head_dim(_v)]` (or a paged cache
/// `[num_pages, page_size, heads_kv, dim]` with `block_table`), out `[total_q, heads_q,
/// head_dim_v]`, lse f32 `[heads_q, total_q]`; `cu_seqlens_q`/`cu_seqlens_k` int32 `[batch +
/// 1]` (FlashAttention's convention). Releases the GIL; CUDA work goes on q's stream.
#[pyfunction]
#[pyo3(signature = (q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    *, seqused_k=None, block_table=None, scale=None, causal=false, top_left=false,
    window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None, checked=false, tf32=false,
    dropout_p=0.0, seed=0, offset=0))]
#[allow(clippy::too_many_arguments)]
fn forward_varlen(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    lse: Option<&Bound<'_, PyAny>>,
    cu_seqlens_q: &Bound<'_, PyAny>,
    cu_seqlens_k: &Bound<'_, PyAny>,
    max_seqlen_q: i64,
    max_seqlen_k: i64,
    seqused_k: Option<&Bound<'_, PyAny>>,
    block_table: Option<&Bound<'_, PyAny>>,
    scale: Option<f64>,
    causal: bool,
    top_left: bool,
    window_left: i64,
    window_right: i64,
    softcap: f64,
    alibi_slopes: Option<&Bound<'_, PyAny>>,
    checked: bool,
    tf32: bool,
    dropout_p: f64,
    seed: u64,
    offset: u64,
) -> PyResult<()> {
    let ctx = context()?;
    let mut scores = Scores::new(
        scale,
        causal,
        top_left,
        (window_left, window_right),
        softcap,
    );
    scores.tf32 = tf32;
    scores.dropout = (dropout_p as f32, seed, offset);
    let (q, k, v, out) = (
        import(q, "q")?,
        import(k, "k")?,
        import(v, "v")?,
        import(out, "out")?,
    );
    let lse = import_opt(lse, "lse")?;
    let alibi = import_opt(alibi_slopes, "alibi_slopes")?;
    let packed = Packed::import(
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        seqused_k,
        block_table,
        checked,
    )?;
    record(
        [&q, &k, &v, &out]
            .into_iter()
            .chain(&lse)
            .chain(&alibi)
            .chain(packed.args()),
    );
    let params = scores.params(alibi.as_ref(), None)?;
    let seqs = packed.varlen()?;
    let (qv, kv, vv) = (q.view()?, k.view()?, v.view()?);
    let mut ov = out.view_mut()?;
    let mut lv = lse.as_ref().map(|l| l.view_mut()).transpose()?;
    run_detached(py, &q, |stream| {
        // SAFETY: as in `forward`.
        unsafe {
            ctx.forward_varlen_on_stream(
                &qv,
                &kv,
                &vv,
                &mut ov,
                lv.as_mut(),
                &seqs,
                &params,
                stream,
            )
        }
    })
}

/// Gradients of `forward_varlen` (packed k and v), written in place into dq, dk and dv.
#[pyfunction]
#[pyo3(signature = (q, k, v, out, dout, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
    max_seqlen_q, max_seqlen_k, *, scale=None, causal=false, top_left=false, window_left=-1,
    window_right=-1, softcap=0.0, alibi_slopes=None, deterministic=false, checked=false,
    tf32=false, dropout_p=0.0, seed=0, offset=0))]
#[allow(clippy::too_many_arguments)]
fn backward_varlen(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    dout: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    dq: &Bound<'_, PyAny>,
    dk: &Bound<'_, PyAny>,
    dv: &Bound<'_, PyAny>,
    cu_seqlens_q: &Bound<'_, PyAny>,
    cu_seqlens_k: &Bound<'_, PyAny>,
    max_seqlen_q: i64,
    max_seqlen_k: i64,
    scale: Option<f64>,
    causal: bool,
    top_left: bool,
    window_left: i64,
    window_right: i64,
    softcap: f64,
    alibi_slopes: Option<&Bound<'_, PyAny>>,
    deterministic: bool,
    checked: bool,
    tf32: bool,
    dropout_p: f64,
    seed: u64,
    offset: u64,
) -> PyResult<()> {
    let ctx = context()?;
    let mut scores = Scores::new(
        scale,
        causal,
        top_left,
        (window_left, window_right),
        softcap,
    );
    scores.deterministic = deterministic;
    scores.tf32 = tf32;
    scores.dropout = (dropout_p as f32, seed, offset);
    let args = import_backward([q, k, v, out, dout, lse, dq, dk, dv])?;
    let alibi = import_opt(alibi_slopes, "alibi_slopes")?;
    let packed = Packed::import(
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        None,
        None,
        checked,
    )?;
    record(args.iter().chain(&alibi).chain(packed.args()));
    let params = scores.params(alibi.as_ref(), None)?;
    let seqs = packed.varlen()?;
    let (inputs, mut grads) = backward_views(&args)?;
    run_detached(py, &args[0], |stream| {
        // SAFETY: as in `forward`.
        unsafe { ctx.backward_varlen_on_stream(&inputs, &mut grads, &seqs, &params, stream) }
    })
}

/// Attention over a KV cache (FlashAttention's `flash_attn_with_kvcache`), written in place:
/// appends k/v (rotated with rotary_cos/rotary_sin when given) into k_cache/v_cache at
/// cache_seqlens, then attends q `[batch, seqlen_q, heads_q, head_dim]` into out (and lse f32
/// `[batch, heads_q, seqlen_q]`). Releases the GIL; CUDA work goes on q's stream.
#[pyfunction]
#[pyo3(signature = (q, k_cache, v_cache, cache_seqlens, out, lse=None, *, block_table=None,
    cache_batch_idx=None, k=None, v=None, rotary_cos=None, rotary_sin=None,
    rotary_interleaved=false, scale=None, causal=false, top_left=false, window_left=-1,
    window_right=-1, softcap=0.0, alibi_slopes=None, checked=false, tf32=false))]
#[allow(clippy::too_many_arguments)]
fn forward_kvcache(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k_cache: &Bound<'_, PyAny>,
    v_cache: &Bound<'_, PyAny>,
    cache_seqlens: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    lse: Option<&Bound<'_, PyAny>>,
    block_table: Option<&Bound<'_, PyAny>>,
    cache_batch_idx: Option<&Bound<'_, PyAny>>,
    k: Option<&Bound<'_, PyAny>>,
    v: Option<&Bound<'_, PyAny>>,
    rotary_cos: Option<&Bound<'_, PyAny>>,
    rotary_sin: Option<&Bound<'_, PyAny>>,
    rotary_interleaved: bool,
    scale: Option<f64>,
    causal: bool,
    top_left: bool,
    window_left: i64,
    window_right: i64,
    softcap: f64,
    alibi_slopes: Option<&Bound<'_, PyAny>>,
    checked: bool,
    tf32: bool,
) -> PyResult<()> {
    let ctx = context()?;
    let mut scores = Scores::new(
        scale,
        causal,
        top_left,
        (window_left, window_right),
        softcap,
    );
    scores.tf32 = tf32;
    let (q, kc, vc, lens, out) = (
        import(q, "q")?,
        import(k_cache, "k_cache")?,
        import(v_cache, "v_cache")?,
        import(cache_seqlens, "cache_seqlens")?,
        import(out, "out")?,
    );
    let lse = import_opt(lse, "lse")?;
    let table = import_opt(block_table, "block_table")?;
    let idx = import_opt(cache_batch_idx, "cache_batch_idx")?;
    let (kn, vn) = (import_opt(k, "k")?, import_opt(v, "v")?);
    let (cos, sin) = (
        import_opt(rotary_cos, "rotary_cos")?,
        import_opt(rotary_sin, "rotary_sin")?,
    );
    let alibi = import_opt(alibi_slopes, "alibi_slopes")?;
    let optional = [&lse, &table, &idx, &kn, &vn, &cos, &sin, &alibi];
    record(
        [&q, &kc, &vc, &lens, &out]
            .into_iter()
            .chain(optional.into_iter().flatten()),
    );
    let params = scores.params(alibi.as_ref(), None)?;
    let rotary = match (&cos, &sin) {
        (Some(c), Some(s)) => Some(Rotary {
            cos: c.view()?,
            sin: s.view()?,
            interleaved: rotary_interleaved,
        }),
        (None, None) => None,
        _ => {
            return Err(PyValueError::new_err(
                "rotary_cos and rotary_sin go together: pass both or neither",
            ))
        }
    };
    let append = match (&kn, &vn) {
        (Some(k), Some(v)) => Some(KvAppend {
            k: k.view()?,
            v: v.view()?,
            rotary,
        }),
        (None, None) if rotary.is_some() => {
            return Err(PyValueError::new_err(
                "rotary_cos/rotary_sin need k and v: rotary embedding applies to the keys a \
                 call appends (and to q with them)",
            ))
        }
        (None, None) => None,
        _ => {
            return Err(PyValueError::new_err(
                "k and v go together: pass both or neither",
            ))
        }
    };
    let mut cache = KvCache {
        k: kc.view_mut()?,
        v: vc.view_mut()?,
        seqlens: lens.view()?,
        block_table: table.as_ref().map(Arg::view).transpose()?,
        batch_idx: idx.as_ref().map(Arg::view).transpose()?,
        checked,
    };
    let qv = q.view()?;
    let mut ov = out.view_mut()?;
    let mut lv = lse.as_ref().map(|l| l.view_mut()).transpose()?;
    run_detached(py, &q, |stream| {
        // SAFETY: as in `forward`.
        unsafe {
            ctx.forward_kvcache_on_stream(
                &qv,
                &mut cache,
                append.as_ref(),
                &mut ov,
                lv.as_mut(),
                &params,
                None,
                stream,
            )
        }
    })
}

/// Merges attention states (outputs `[batch, seqlen, heads, dim]` with f32 LSEs `[batch,
/// heads, seqlen]`, natural log) into out and, when given, lse. Releases the GIL.
#[pyfunction]
#[pyo3(signature = (outs, lses, out, lse=None))]
fn merge_states(
    py: Python<'_>,
    outs: Vec<Bound<'_, PyAny>>,
    lses: Vec<Bound<'_, PyAny>>,
    out: &Bound<'_, PyAny>,
    lse: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    let ctx = context()?;
    if outs.len() != lses.len() {
        return Err(PyValueError::new_err(format!(
            "outs has {} states but lses has {}; give one LSE per output",
            outs.len(),
            lses.len()
        )));
    }
    let o_args = outs
        .iter()
        .map(|o| import(o, "states.out"))
        .collect::<PyResult<Vec<_>>>()?;
    let l_args = lses
        .iter()
        .map(|l| import(l, "states.lse"))
        .collect::<PyResult<Vec<_>>>()?;
    let out = import(out, "out")?;
    let lse = import_opt(lse, "lse")?;
    let states = o_args
        .iter()
        .zip(&l_args)
        .map(|(o, l)| {
            Ok(AttentionState {
                out: o.view()?,
                lse: l.view()?,
            })
        })
        .collect::<PyResult<Vec<_>>>()?;
    let mut ov = out.view_mut()?;
    let mut lv = lse.as_ref().map(|l| l.view_mut()).transpose()?;
    run_detached(py, &out, |stream| {
        // SAFETY: as in `forward`.
        unsafe { ctx.merge_states_on_stream(&states, &mut ov, lv.as_mut(), stream) }
    })
}

/// Test hook: the dropout factors (0 or 1 / (1 - p)) of heads `0..heads` (b · heads_q + h),
/// rows `0..rows` and keys `0..cols`, flat in that order: what the kernels multiply P by.
#[pyfunction]
fn _dropout_factors(
    p: f32,
    seed: u64,
    offset: u64,
    heads: usize,
    rows: usize,
    cols: usize,
) -> Vec<f64> {
    let d = ufa::Dropout { p, seed, offset };
    let mut out = Vec::with_capacity(heads * rows * cols);
    for bh in 0..heads {
        for i in 0..rows {
            for j in 0..cols {
                out.push(d.scale(bh, i, j));
            }
        }
    }
    out
}

/// Benchmark hook: seconds per `Context::forward` call on already-imported arrays, timed in
/// Rust over `iters` calls (the core's own per-call cost, without the Python layer).
#[pyfunction]
fn _bench_core(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    iters: u32,
) -> PyResult<f64> {
    let ctx = context()?;
    let (q, k, v, out) = (
        import(q, "q")?,
        import(k, "k")?,
        import(v, "v")?,
        import(out, "out")?,
    );
    let (qv, kv, vv) = (q.view()?, k.view()?, v.view()?);
    let mut ov = out.view_mut()?;
    let params = AttentionParams::default();
    py.detach(|| {
        let t0 = std::time::Instant::now();
        for _ in 0..iters {
            ctx.forward(&qv, &kv, &vv, &mut ov, &params)?;
        }
        Ok(t0.elapsed().as_secs_f64() / f64::from(iters.max(1)))
    })
    .map_err(core_error)
}

/// Benchmark hook: seconds per DLPack import of `x` (what each array argument costs).
#[pyfunction]
fn _bench_import(x: &Bound<'_, PyAny>, iters: u32) -> PyResult<f64> {
    let t0 = std::time::Instant::now();
    for _ in 0..iters {
        std::hint::black_box(import(x, "x")?);
    }
    Ok(t0.elapsed().as_secs_f64() / f64::from(iters.max(1)))
}

/// Whether the core can compute on CUDA tensors in this build and on this machine.
#[pyfunction]
fn cuda_available() -> PyResult<bool> {
    Ok(context()?.cuda_devices().is_ok_and(|d| !d.is_empty()))
}

/// Build and machine facts: version, CPU threads and kernel family, CUDA devices or why none.
#[pyfunction]
fn info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let ctx = context()?;
    let d = PyDict::new(py);
    d.set_item("version", ufa::VERSION)?;
    d.set_item("num_threads", ctx.num_threads())?;
    d.set_item("cpu_isa", format!("{:?}", ctx.cpu_isa()))?;
    // Per-core peaks measured once a process, which chose the CPU kernel family (None where
    // the CPU has no AVX-512 BF16 and there was nothing to choose).
    match ufa::rates() {
        Some(r) => {
            let rates = PyDict::new(py);
            rates.set_item("fma_gflops", r.fma_gflops)?;
            rates.set_item("bf16_dot_gflops", r.bf16_dot_gflops)?;
            rates.set_item("bf16_dot_min_ratio", ufa::BF16_DOT_MIN_RATIO)?;
            d.set_item("cpu_rates", rates)?;
        }
        None => d.set_item("cpu_rates", py.None())?,
    }
    // The AMX tile unit: on the CPU, its state saved by the operating system, the tile data
    // granted to this process, and whether the family that uses it is the default where it is
    // granted.
    let (amx, amx_info) = (ufa::amx(), PyDict::new(py));
    amx_info.set_item("cpu", amx.cpu)?;
    amx_info.set_item("os", amx.os)?;
    amx_info.set_item("granted", amx.granted)?;
    amx_info.set_item("by_default", ufa::AMX_BY_DEFAULT)?;
    d.set_item("amx", amx_info)?;
    match ctx.cuda_devices() {
        Ok(devs) => d.set_item("cuda_devices", devs)?,
        Err(why) => {
            d.set_item("cuda_devices", PyList::empty(py))?;
            d.set_item("cuda_unavailable", why)?;
        }
    }
    Ok(d)
}

/// Turns the pointer-recording debug hook on or off (tests only).
#[pyfunction]
fn _debug_record(on: bool) {
    RECORD.store(on, Ordering::Relaxed);
    LAST_CALL.lock().unwrap_or_else(|p| p.into_inner()).clear();
}

/// What the last call handed to the core while recording: (name, data_ptr, shape, strides).
#[pyfunction]
fn _debug_last_call(py: Python<'_>) -> PyResult<Bound<'_, PyList>> {
    let rec = LAST_CALL.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let list = PyList::empty(py);
    for (name, ptr, shape, strides) in rec {
        let t = PyTuple::new(
            py,
            [
                name.into_pyobject(py)?.into_any(),
                ptr.into_pyobject(py)?.into_any(),
                PyTuple::new(py, shape)?.into_any(),
                PyTuple::new(py, strides)?.into_any(),
            ],
        )?;
        list.append(t)?;
    }
    Ok(list)
}

#[pymodule]
fn _ufa(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", ufa::VERSION)?;
    m.add("MAX_HEAD_DIM", ufa::MAX_HEAD_DIM)?;
    m.add_function(wrap_pyfunction!(forward, m)?)?;
    m.add_function(wrap_pyfunction!(sdpa_forward, m)?)?;
    m.add_function(wrap_pyfunction!(sdpa_backward, m)?)?;
    m.add_function(wrap_pyfunction!(_sdpa_calls, m)?)?;
    m.add_function(wrap_pyfunction!(backward, m)?)?;
    m.add_function(wrap_pyfunction!(forward_varlen, m)?)?;
    m.add_function(wrap_pyfunction!(backward_varlen, m)?)?;
    m.add_function(wrap_pyfunction!(forward_kvcache, m)?)?;
    m.add_function(wrap_pyfunction!(merge_states, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_available, m)?)?;
    m.add_function(wrap_pyfunction!(info, m)?)?;
    m.add_function(wrap_pyfunction!(_debug_record, m)?)?;
    m.add_function(wrap_pyfunction!(_debug_last_call, m)?)?;
    m.add_function(wrap_pyfunction!(_bench_core, m)?)?;
    m.add_function(wrap_pyfunction!(_dropout_factors, m)?)?;
    m.add_function(wrap_pyfunction!(_bench_import, m)?)?;
    Ok(())
}
