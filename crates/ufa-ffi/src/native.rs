//! The native C API: contexts, tensor descriptors, parameters and the attention calls.

use crate::boundary::{query, require, ufa_call, ufa_status};
use std::ffi::{c_char, c_void, CStr};
use std::sync::atomic::{AtomicU64, Ordering};
use ufa::{
    AttentionParams, BackwardInputs, CausalAlignment, DType, Device, Error, Fp32Precision,
    Gradients, Isa, Layout, Result, TensorView, TensorViewMut, MAX_DIMS,
};

/// The library version as "major.minor.patch". Static; never NULL.
#[no_mangle]
pub extern "C" fn ufa_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The version as three numbers, generated from the crate's version.
pub(crate) fn version_numbers() -> [u32; 3] {
    [
        env!("CARGO_PKG_VERSION_MAJOR"),
        env!("CARGO_PKG_VERSION_MINOR"),
        env!("CARGO_PKG_VERSION_PATCH"),
    ]
    .map(|s| s.parse().unwrap_or(0))
}

/// Writes the library version's major, minor and patch numbers (each pointer may be NULL).
#[no_mangle]
pub unsafe extern "C" fn ufa_version_numbers(major: *mut u32, minor: *mut u32, patch: *mut u32) {
    query((), || {
        for (out, n) in [major, minor, patch].into_iter().zip(version_numbers()) {
            if !out.is_null() {
                out.write(n);
            }
        }
    })
}

/// Element type of a tensor. 0 is deliberately no type, so a descriptor left zeroed is caught.
pub type ufa_dtype = i32;
/// IEEE half precision.
pub const UFA_DTYPE_F16: ufa_dtype = 1;
/// bfloat16.
pub const UFA_DTYPE_BF16: ufa_dtype = 2;
/// IEEE single precision.
pub const UFA_DTYPE_F32: ufa_dtype = 3;
/// One byte per element, 0 = false (boolean masks only).
pub const UFA_DTYPE_BOOL: ufa_dtype = 4;
/// 32-bit signed integers (sequence metadata only: cu_seqlens, lengths, block tables).
pub const UFA_DTYPE_I32: ufa_dtype = 5;

/// Kind of memory a tensor's data pointer refers to.
pub type ufa_device_type = i32;
/// Host memory.
pub const UFA_DEVICE_CPU: ufa_device_type = 0;
/// Memory of a CUDA device (`device_ordinal` says which).
pub const UFA_DEVICE_CUDA: ufa_device_type = 1;

/// Most dimensions of any ufa tensor.
pub const UFA_MAX_DIMS: i32 = 4;
const _: () = assert!(UFA_MAX_DIMS as usize == MAX_DIMS);

/// A tensor described, not owned: ufa reads (or, for outputs, writes) the caller's memory in
/// place and never keeps the pointers after the call returns.
///
/// Q is [batch, seqlen_q, heads_q, head_dim], K and V [batch, seqlen_kv, heads_kv, head_dim(_v)],
/// O [batch, seqlen_q, heads_q, head_dim_v]; any strides work as long as the last dimension is
/// contiguous, so a [batch, heads, seq, dim] buffer is passed by permuting shape and strides.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ufa_tensor {
    /// First element; may be NULL only when the shape has a 0 (an empty tensor).
    pub data: *mut c_void,
    /// One of the `UFA_DTYPE_*` values.
    pub dtype: ufa_dtype,
    /// `UFA_DEVICE_CPU` or `UFA_DEVICE_CUDA`.
    pub device_type: ufa_device_type,
    /// CUDA device ordinal (ignored for CPU tensors).
    pub device_ordinal: i32,
    /// Number of dimensions, 1 to `UFA_MAX_DIMS`.
    pub ndim: i32,
    /// `ndim` sizes; must not be NULL.
    pub shape: *const i64,
    /// `ndim` strides in elements (not bytes), each >= 0; NULL means row-major contiguous.
    pub strides: *const i64,
    /// Bytes of the caller's allocation from `data` on, or 0 when not known. When given, a view
    /// whose shape and strides reach past it is refused instead of read or written out of
    /// bounds (bindings that hold a slice or array pass its length).
    pub nbytes: u64,
}

/// Options of `ufa_context_create`. Start from `ufa_context_options_default()`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ufa_context_options {
    /// `sizeof(ufa_context_options)` as the caller was compiled; lets the struct grow.
    pub struct_size: u32,
    /// CPU threads; 0 = `$UFA_NUM_THREADS` if set, else every available core.
    pub num_threads: u32,
    /// -1: no CUDA device is required. n >= 0: creation fails with
    /// `UFA_STATUS_DEVICE_UNAVAILABLE` unless CUDA device n can be used.
    pub device_ordinal: i32,
    /// CPU kernel family ("amx-bf16", "avx512bf16", "avx512bf16-decode", "avx512", "avx2", "portable");
    /// NULL = the best this CPU supports (`ufa info` says which and why). A family the CPU
    /// lacks gives `UFA_STATUS_UNSUPPORTED`.
    pub cpu_isa: *const c_char,
}

/// What an attention call computes besides Q, K and V. Start from
/// `ufa_attention_params_default()`, which sets `struct_size` and the defaults; passing NULL
/// instead of a struct means all defaults.
///
/// Scores are `s = softmax_scale * q.k`, then `softcap * tanh(s / softcap)` if softcap > 0, then
/// minus `slope * |i + offset - j|` for ALiBi, plus the additive mask; keys outside the causal
/// or window band, or where a boolean mask is 0, are excluded. Softmax runs in fp32.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ufa_attention_params {
    /// `sizeof(ufa_attention_params)` as the caller was compiled; lets the struct grow.
    pub struct_size: u32,
    /// Nonzero: query i sees only keys at or before its aligned position.
    pub causal: i32,
    /// Multiplies q.k; 0 (the default) means 1/sqrt(head_dim).
    pub softmax_scale: f32,
    /// Tanh soft-capping of the scores; 0 (the default) disables it.
    pub softcap: f32,
    /// `UFA_CAUSAL_BOTTOM_RIGHT` (the default) or `UFA_CAUSAL_TOP_LEFT`.
    pub causal_alignment: i32,
    /// Backward only: nonzero asks for bitwise-reproducible gradients.
    pub deterministic: i32,
    /// Keys visible left of the aligned position; -1 (the default) = unbounded.
    pub window_left: i64,
    /// Keys visible right of the aligned position; -1 (the default) = unbounded.
    pub window_right: i64,
    /// Optional ALiBi slopes, f32, [heads_q] or [batch, heads_q]; NULL = none.
    pub alibi_slopes: *const ufa_tensor,
    /// Optional mask broadcastable to [batch, heads_q, seqlen_q, seqlen_kv]: `UFA_DTYPE_BOOL`
    /// (nonzero = attend) or a float dtype (added to the scores); NULL = none.
    pub mask: *const ufa_tensor,
    /// Forward only, optional output: the log-sum-exp of each score row (natural log, f32,
    /// [batch, heads_q, seqlen_q], -inf where a row sees no key); NULL = not wanted.
    pub lse: *const ufa_tensor,
    /// fp32 inputs: `UFA_FP32_IEEE` (the default) keeps fp32 accuracy; `UFA_FP32_TF32` lets the
    /// CUDA forward and backward round each operand to TF32 once (PyTorch's `allow_tf32`):
    /// about three times faster, outputs within 2e-3 relative instead of 1e-5. The CPU always
    /// computes in fp32.
    pub fp32_precision: i32,
    /// Attention dropout's generator seed and offset (with `dropout_p`): the same three give
    /// the same mask, so a backward call must be given its forward's.
    pub dropout_seed: u64,
    pub dropout_offset: u64,
    /// Probability of dropping each attention probability, in [0, 1); the kept ones are
    /// scaled by 1 / (1 - p). 0 (the default) disables dropout. CPU and CUDA tensors; not on
    /// KV-cache calls.
    pub dropout_p: f32,
}

// The released layouts (LP64): a change here breaks every compiled caller, so it must be a
// deliberate one (append fields, add the new size to `Versioned::SIZES`). `ufa_tensor` has no
// size field (arrays of it would need a stride); it grew once, from 40 to 48 bytes with
// `nbytes`, in 0.2.0, which callers compiled against 0.1 headers must be rebuilt for.
#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(std::mem::size_of::<ufa_tensor>() == 48);
    assert!(std::mem::size_of::<ufa_context_options>() == 24);
    assert!(std::mem::size_of::<ufa_attention_params>() == 96);
};

/// Query i is aligned with key i + seqlen_kv - seqlen_q (FlashAttention 2+, KV-cache decoding).
pub const UFA_CAUSAL_BOTTOM_RIGHT: i32 = 0;
/// Query i is aligned with key i (PyTorch's `is_causal=True`).
pub const UFA_CAUSAL_TOP_LEFT: i32 = 1;

/// fp32 products to fp32 accuracy (the default).
pub const UFA_FP32_IEEE: i32 = 0;
/// fp32 operands may be rounded to TF32 (10 mantissa bits) on tensor cores.
pub const UFA_FP32_TF32: i32 = 1;

/// A struct whose first field is its caller-side size, so fields can be appended later: a
/// caller built against an older header passes a smaller size and gets defaults for the rest.
pub(crate) trait Versioned: Copy {
    /// Every size a released header has given this struct (one so far).
    const SIZES: &'static [usize];
    fn defaults() -> Self;
}

impl Versioned for ufa_context_options {
    const SIZES: &'static [usize] = &[std::mem::size_of::<Self>()];
    fn defaults() -> Self {
        ufa_context_options {
            struct_size: std::mem::size_of::<Self>() as u32,
            num_threads: 0,
            device_ordinal: -1,
            cpu_isa: std::ptr::null(),
        }
    }
}

impl Versioned for ufa_attention_params {
    /// 64 bytes until `fp32_precision` was appended, 72 until the dropout fields were (placed
    /// after the 72nd byte: a 72-byte caller's trailing padding is never read as one).
    const SIZES: &'static [usize] = &[64, 72, std::mem::size_of::<Self>()];
    fn defaults() -> Self {
        ufa_attention_params {
            struct_size: std::mem::size_of::<Self>() as u32,
            causal: 0,
            softmax_scale: 0.0,
            softcap: 0.0,
            causal_alignment: UFA_CAUSAL_BOTTOM_RIGHT,
            deterministic: 0,
            window_left: -1,
            window_right: -1,
            alibi_slopes: std::ptr::null(),
            mask: std::ptr::null(),
            lse: std::ptr::null(),
            fp32_precision: UFA_FP32_IEEE,
            dropout_seed: 0,
            dropout_offset: 0,
            dropout_p: 0.0,
        }
    }
}

/// The caller's struct (NULL = defaults), its missing trailing fields filled with defaults.
pub(crate) unsafe fn read_versioned<T: Versioned>(ptr: *const T, name: &str) -> Result<T> {
    let mut value = T::defaults();
    if ptr.is_null() {
        return Ok(value);
    }
    let size = (ptr as *const u32).read() as usize;
    if !T::SIZES.contains(&size) {
        return Err(Error::invalid(format!(
            "{name}->struct_size={size} but this library knows sizes {:?}; initialise the struct \
             with its _default() function",
            T::SIZES
        )));
    }
    std::ptr::copy_nonoverlapping(ptr as *const u8, &mut value as *mut T as *mut u8, size);
    Ok(value)
}

/// The default context options (all threads, no CUDA device required, best CPU kernels).
#[no_mangle]
pub extern "C" fn ufa_context_options_default() -> ufa_context_options {
    ufa_context_options::defaults()
}

/// The default attention parameters: no masking, scale 1/sqrt(head_dim), no LSE output.
#[no_mangle]
pub extern "C" fn ufa_attention_params_default() -> ufa_attention_params {
    ufa_attention_params::defaults()
}

/// A ufa context: the CPU thread pool and the CUDA kernel cache. Opaque; create with
/// `ufa_context_create`, free with `ufa_context_destroy`. Any number of threads may use one
/// context at once. An `mfa_context_t` is a `ufa_context*`.
pub struct ufa_context {
    pub(crate) inner: ufa::Context,
    /// Seconds the last attention call took, as f64 bits (for `mfa_get_gpu_latency`).
    pub(crate) last_call_seconds: AtomicU64,
}

impl ufa_context {
    pub(crate) fn new(options: &ufa_context_options) -> Result<Box<ufa_context>> {
        let mut builder = ufa::Context::builder().num_threads(options.num_threads as usize);
        if !options.cpu_isa.is_null() {
            // SAFETY: the caller passes a NUL-terminated string (documented).
            let name = unsafe { CStr::from_ptr(options.cpu_isa) }.to_string_lossy();
            let isa: Isa = name
                .parse()
                .map_err(|e: String| Error::invalid(format!("options->cpu_isa: {e}")))?;
            builder = builder.cpu_isa(isa);
        }
        if options.device_ordinal < -1 {
            return Err(Error::invalid(format!(
                "options->device_ordinal={} must be -1 (none) or a CUDA device ordinal",
                options.device_ordinal
            )));
        }
        let inner = builder.build()?;
        if options.device_ordinal >= 0 {
            let n = cuda_device_count(&inner)?;
            if options.device_ordinal as usize >= n {
                return Err(Error::new(
                    ufa::ErrorKind::DeviceUnavailable,
                    format!(
                        "options->device_ordinal={} but this machine has {n} usable CUDA devices",
                        options.device_ordinal
                    ),
                ));
            }
        }
        Ok(Box::new(ufa_context {
            inner,
            last_call_seconds: AtomicU64::new(0f64.to_bits()),
        }))
    }

    /// Runs one attention call, recording how long it took.
    pub(crate) fn timed(&self, f: impl FnOnce(&ufa::Context) -> Result<()>) -> Result<()> {
        let start = std::time::Instant::now();
        f(&self.inner)?;
        let secs = start.elapsed().as_secs_f64();
        self.last_call_seconds
            .store(secs.to_bits(), Ordering::Relaxed);
        Ok(())
    }
}

fn cuda_device_count(ctx: &ufa::Context) -> Result<usize> {
    match ctx.cuda_devices() {
        Ok(d) => Ok(d.len()),
        Err(why) => Err(Error::new(
            ufa::ErrorKind::DeviceUnavailable,
            format!("no CUDA device can be used: {why}"),
        )),
    }
}

/// Creates a context with `options` (NULL = defaults) and writes it to `*out`, which the caller
/// frees with `ufa_context_destroy`. On failure `*out` is untouched.
#[no_mangle]
pub unsafe extern "C" fn ufa_context_create(
    options: *const ufa_context_options,
    out: *mut *mut ufa_context,
) -> ufa_status {
    ufa_call(|| {
        require!(out, "out");
        let options = read_versioned(options, "options")?;
        let ctx = ufa_context::new(&options)?;
        out.write(Box::into_raw(ctx));
        Ok(())
    })
}

/// Frees a context made by `ufa_context_create` (or `mfa_create_context`). NULL is ignored.
/// No call may be using the context.
#[no_mangle]
pub unsafe extern "C" fn ufa_context_destroy(ctx: *mut ufa_context) {
    query((), || {
        if !ctx.is_null() {
            drop(Box::from_raw(ctx));
        }
    })
}

/// Writes the number of CPU threads `ctx` computes with to `*out`.
#[no_mangle]
pub unsafe extern "C" fn ufa_context_num_threads(
    ctx: *const ufa_context,
    out: *mut u32,
) -> ufa_status {
    ufa_call(|| {
        require!(ctx, "ctx");
        require!(out, "out");
        out.write((*ctx).inner.num_threads().min(u32::MAX as usize) as u32);
        Ok(())
    })
}

/// Writes the name of the CPU kernel family `ctx` uses ("avx512bf16", "avx2", ...) to `*out`;
/// the string is static.
#[no_mangle]
pub unsafe extern "C" fn ufa_context_cpu_isa(
    ctx: *const ufa_context,
    out: *mut *const c_char,
) -> ufa_status {
    ufa_call(|| {
        require!(ctx, "ctx");
        require!(out, "out");
        out.write((*ctx).inner.cpu_isa().c_name().as_ptr());
        Ok(())
    })
}

/// Writes how many devices of `device_type` `ctx` can compute on to `*out`: 1 for
/// `UFA_DEVICE_CPU`; for `UFA_DEVICE_CUDA` the number of usable GPUs, 0 where there is no
/// driver or no GPU (not an error).
#[no_mangle]
pub unsafe extern "C" fn ufa_device_count(
    ctx: *const ufa_context,
    device_type: ufa_device_type,
    out: *mut u32,
) -> ufa_status {
    ufa_call(|| {
        require!(ctx, "ctx");
        require!(out, "out");
        let n = match device_type {
            UFA_DEVICE_CPU => 1,
            UFA_DEVICE_CUDA => cuda_device_count(&(*ctx).inner).unwrap_or(0),
            other => return Err(bad_device_type(other, "device_type")),
        };
        out.write(n.min(u32::MAX as usize) as u32);
        Ok(())
    })
}

fn bad_device_type(t: i32, name: &str) -> Error {
    Error::invalid(format!(
        "{name}={t} but must be UFA_DEVICE_CPU (0) or UFA_DEVICE_CUDA (1)"
    ))
}

pub(crate) fn dtype_of(code: ufa_dtype, name: &str) -> Result<DType> {
    Ok(match code {
        UFA_DTYPE_F16 => DType::F16,
        UFA_DTYPE_BF16 => DType::BF16,
        UFA_DTYPE_F32 => DType::F32,
        UFA_DTYPE_BOOL => DType::Bool,
        UFA_DTYPE_I32 => DType::I32,
        other => {
            return Err(Error::invalid(format!(
                "{name}.dtype={other} but must be UFA_DTYPE_F16 (1), UFA_DTYPE_BF16 (2), \
                 UFA_DTYPE_F32 (3), UFA_DTYPE_BOOL (4) or UFA_DTYPE_I32 (5)"
            )))
        }
    })
}

/// Reads `n` int64 values of a C array as element counts.
pub(crate) unsafe fn read_dims(
    ptr: *const i64,
    n: usize,
    name: &str,
    what: &str,
) -> Result<Vec<usize>> {
    std::slice::from_raw_parts(ptr, n)
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            usize::try_from(x)
                .map_err(|_| Error::invalid(format!("{name}.{what}[{i}]={x} must be >= 0")))
        })
        .collect()
}

/// Shape and strides of a C description: `ndim` checked so the arrays can be read, NULL strides
/// meaning row-major. Everything about the values themselves is the core's to judge.
pub(crate) unsafe fn layout_of(
    ndim: i64,
    shape: *const i64,
    strides: *const i64,
    name: &str,
) -> Result<Layout> {
    if !(1..=MAX_DIMS as i64).contains(&ndim) {
        return Err(Error::invalid(format!(
            "{name}.ndim={ndim} but must be 1 to {MAX_DIMS}"
        )));
    }
    if shape.is_null() {
        return Err(Error::invalid(format!("{name}.shape is NULL")));
    }
    let shape = read_dims(shape, ndim as usize, name, "shape")?;
    let layout = if strides.is_null() {
        Layout::contiguous(&shape)
    } else {
        Layout::new(&shape, &read_dims(strides, ndim as usize, name, "strides")?)
    };
    // The core's layout errors quote the numbers but cannot know which argument they came from.
    layout.map_err(|e| named(e, name))
}

/// Data pointer, dtype, device and layout of a descriptor.
struct Parts {
    data: *mut c_void,
    dtype: DType,
    device: Device,
    layout: Layout,
}

unsafe fn parts(t: *const ufa_tensor, name: &str) -> Result<Parts> {
    if t.is_null() {
        return Err(Error::invalid(format!("{name} is NULL")));
    }
    let t = &*t;
    // NULL data (allowed for empty tensors only) is judged by the view (TensorView::from_raw_parts).
    let layout = layout_of(t.ndim as i64, t.shape, t.strides, name)?;
    let device = match t.device_type {
        UFA_DEVICE_CPU => Device::Cpu,
        UFA_DEVICE_CUDA => Device::Cuda(u32::try_from(t.device_ordinal).map_err(|_| {
            Error::invalid(format!(
                "{name}.device_ordinal={} must be >= 0",
                t.device_ordinal
            ))
        })?),
        other => return Err(bad_device_type(other, &format!("{name}.device_type"))),
    };
    let dtype = dtype_of(t.dtype, name)?;
    if t.nbytes != 0 {
        // span() already succeeded (layout_of), so this product is bounded by the address space.
        let need = layout.span()? as u64 * dtype.size_in_bytes() as u64;
        if need > t.nbytes {
            return Err(Error::invalid(format!(
                "{name}.shape={:?} with strides {:?} reaches {need} bytes from {name}.data but \
                 {name}.nbytes={}",
                layout.shape(),
                layout.strides(),
                t.nbytes
            )));
        }
    }
    // Device memory described as host memory would be read by the CPU: a crash in the
    // caller's process. Refused with what to write instead.
    if let (Device::Cpu, Device::Cuda(o)) = (device, Device::of_memory(t.data)) {
        return Err(Error::invalid(format!(
            "{name}.device_type is UFA_DEVICE_CPU but {name}.data={:p} is memory of cuda:{o}: \
             set {name}.device_type = UFA_DEVICE_CUDA and {name}.device_ordinal = {o}",
            t.data
        )));
    }
    Ok(Parts {
        data: t.data,
        dtype,
        device,
        layout,
    })
}

/// # Safety
/// As `TensorView::from_raw_parts`: the caller's promise, documented on `ufa_tensor`.
pub(crate) unsafe fn view<'a>(t: *const ufa_tensor, name: &str) -> Result<TensorView<'a>> {
    let p = parts(t, name)?;
    TensorView::from_raw_parts(
        p.data,
        p.dtype,
        p.device,
        p.layout.shape(),
        p.layout.strides(),
    )
    .map_err(|e| named(e, name))
}

/// The core's error about a descriptor, with the argument it came from ("q: data=0x... is not
/// aligned ...").
fn named(e: Error, name: &str) -> Error {
    Error::new(e.kind(), format!("{name}: {}", e.message()))
}

/// # Safety
/// As `TensorViewMut::from_raw_parts`.
pub(crate) unsafe fn view_mut<'a>(t: *const ufa_tensor, name: &str) -> Result<TensorViewMut<'a>> {
    let p = parts(t, name)?;
    TensorViewMut::from_raw_parts(
        p.data,
        p.dtype,
        p.device,
        p.layout.shape(),
        p.layout.strides(),
    )
    .map_err(|e| named(e, name))
}

pub(crate) unsafe fn optional<T>(
    t: *const ufa_tensor,
    name: &str,
    make: unsafe fn(*const ufa_tensor, &str) -> Result<T>,
) -> Result<Option<T>> {
    if t.is_null() {
        Ok(None)
    } else {
        make(t, name).map(Some)
    }
}

/// The core's parameters from the C struct, and the LSE output it names.
pub(crate) unsafe fn params_of<'a>(
    p: *const ufa_attention_params,
) -> Result<(AttentionParams<'a>, Option<TensorViewMut<'a>>)> {
    let c = read_versioned(p, "params")?;
    let causal_alignment = match c.causal_alignment {
        UFA_CAUSAL_BOTTOM_RIGHT => CausalAlignment::BottomRight,
        UFA_CAUSAL_TOP_LEFT => CausalAlignment::TopLeft,
        other => {
            return Err(Error::invalid(format!(
                "params->causal_alignment={other} but must be UFA_CAUSAL_BOTTOM_RIGHT (0) or \
                 UFA_CAUSAL_TOP_LEFT (1)"
            )))
        }
    };
    let fp32_precision = match c.fp32_precision {
        UFA_FP32_IEEE => Fp32Precision::Ieee,
        UFA_FP32_TF32 => Fp32Precision::Tf32,
        other => {
            return Err(Error::invalid(format!(
                "params->fp32_precision={other} but must be UFA_FP32_IEEE (0) or UFA_FP32_TF32 (1)"
            )))
        }
    };
    let params = AttentionParams {
        softmax_scale: (c.softmax_scale != 0.0).then_some(c.softmax_scale),
        causal: c.causal != 0,
        causal_alignment,
        window_left: c.window_left,
        window_right: c.window_right,
        softcap: c.softcap,
        alibi_slopes: optional(c.alibi_slopes, "params->alibi_slopes", view)?,
        mask: optional(c.mask, "params->mask", view)?,
        deterministic: c.deterministic != 0,
        fp32_precision,
        // p = 0 is no dropout (the core's rule).
        dropout: Some(ufa::Dropout {
            p: c.dropout_p,
            seed: c.dropout_seed,
            offset: c.dropout_offset,
        }),
    };
    let lse = optional(c.lse, "params->lse", view_mut)?;
    Ok((params, lse))
}

/// Attention forward: `out = softmax(scale * q k^T + bias) v` with the masks of `params` (NULL =
/// defaults), and the log-sum-exp into `params->lse` when it is set.
///
/// CUDA tensors: the work is queued on `stream` (a `CUstream`; NULL = the legacy default stream)
/// and not waited for; the memory must stay valid until the stream has run it. The stream must
/// belong to the tensors' device's primary context (the runtime API's and PyTorch's): one of
/// another context or device is refused with `UFA_STATUS_INVALID_ARGUMENT`. A destroyed stream
/// cannot be detected (its handle points into freed driver memory) and is undefined behaviour,
/// as in every CUDA call. CPU tensors ignore `stream` and are complete on return. On failure
/// nothing is written.
#[no_mangle]
pub unsafe extern "C" fn ufa_attention_forward(
    ctx: *const ufa_context,
    q: *const ufa_tensor,
    k: *const ufa_tensor,
    v: *const ufa_tensor,
    out: *const ufa_tensor,
    params: *const ufa_attention_params,
    stream: *mut c_void,
) -> ufa_status {
    ufa_call(|| {
        require!(ctx, "ctx");
        let (q, k, v) = (view(q, "q")?, view(k, "k")?, view(v, "v")?);
        let mut out = view_mut(out, "out")?;
        let (params, mut lse) = params_of(params)?;
        (*ctx).timed(|c| c.forward_on_stream(&q, &k, &v, &mut out, lse.as_mut(), &params, stream))
    })
}

/// Attention backward: from the forward's inputs, its output `out`, its log-sum-exp `lse` (f32,
/// [batch, heads_q, seqlen_q]) and the output gradient `dout`, writes `dq`, `dk`, `dv` (shapes
/// of q, k, v; for GQA, dk/dv are summed over the query heads sharing a KV head). `params` must
/// be the forward's (NULL = defaults); its `lse` field must be NULL here, and its
/// `deterministic` flag makes CUDA gradients bitwise reproducible. CUDA tensors: queued on
/// `stream` like the forward (its scratch memory too, allocated and freed in stream order).
/// On failure nothing is written.
#[no_mangle]
pub unsafe extern "C" fn ufa_attention_backward(
    ctx: *const ufa_context,
    q: *const ufa_tensor,
    k: *const ufa_tensor,
    v: *const ufa_tensor,
    out: *const ufa_tensor,
    dout: *const ufa_tensor,
    lse: *const ufa_tensor,
    dq: *const ufa_tensor,
    dk: *const ufa_tensor,
    dv: *const ufa_tensor,
    params: *const ufa_attention_params,
    stream: *mut c_void,
) -> ufa_status {
    ufa_call(|| {
        require!(ctx, "ctx");
        let inputs = BackwardInputs {
            q: view(q, "q")?,
            k: view(k, "k")?,
            v: view(v, "v")?,
            out: view(out, "out")?,
            dout: view(dout, "dout")?,
            lse: view(lse, "lse")?,
        };
        let mut grads = Gradients {
            dq: view_mut(dq, "dq")?,
            dk: view_mut(dk, "dk")?,
            dv: view_mut(dv, "dv")?,
        };
        let (params, lse_out) = params_of(params)?;
        if lse_out.is_some() {
            return Err(Error::invalid(
                "params->lse must be NULL for the backward pass; pass the forward's LSE as lse",
            ));
        }
        (*ctx).timed(|c| c.backward_on_stream(&inputs, &mut grads, &params, stream))
    })
}
