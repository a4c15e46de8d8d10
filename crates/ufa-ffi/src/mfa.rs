//! The UMFA-compatible API (`include/mfa.h`): Universal Metal Flash Attention's C functions,
//! mapped onto the core. Buffers carry a pointer and a size (and optionally a shape and strides);
//! each call turns its dimensions, precisions and transpose flags into core tensor views, checks
//! that every view fits in its buffer, and leaves all other validation to the core.

use crate::boundary::{boundary, query, require};
use crate::native::{layout_of, ufa_context, version_numbers, Versioned};
use std::alloc::{alloc_zeroed, dealloc, Layout as AllocLayout};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::Ordering;
use ufa::{
    AttentionParams, BackwardInputs, DType, Device, Error, ErrorKind, Gradients, Layout, Result,
    TensorView, TensorViewMut,
};

/// A context (the same object as a `ufa_context*`). Create with `mfa_create_context`.
pub type mfa_context_t = *mut c_void;
/// A buffer: host memory ufa allocated or the caller's memory wrapped without a copy.
pub type mfa_buffer_t = *mut c_void;
/// A status code: `MFA_SUCCESS` or one of the `MFA_ERROR_*` values.
pub type mfa_error_t = c_int;
/// Element type of a buffer's contents: one of the `MFA_PRECISION_*` values.
pub type mfa_precision_t = c_int;
/// How a mask is applied: one of the `MFA_MASK_TYPE_*` values.
pub type mfa_mask_type_t = c_int;
/// Element type of a mask: one of the `MFA_MASK_SCALAR_*` values.
pub type mfa_mask_scalar_t = c_int;

/// Success.
pub const MFA_SUCCESS: mfa_error_t = 0;
/// An argument is NULL, out of range, or inconsistent with the others (including a buffer too
/// small for the shape it is used with). `ufa_last_error_message()` says which.
pub const MFA_ERROR_INVALID_ARGS: mfa_error_t = 1;
/// Memory could not be allocated (a buffer, or scratch space of a call).
pub const MFA_ERROR_MEMORY_ALLOCATION: mfa_error_t = 2;
/// The device cannot be used, or the request (e.g. INT8/INT4 precision) is not implemented.
pub const MFA_ERROR_DEVICE_NOT_SUPPORTED: mfa_error_t = 3;
/// A GPU kernel failed to compile. ufa reports compile failures as `MFA_ERROR_EXECUTION_FAILED`
/// (its core does not tell them apart yet), so this code is currently never returned.
pub const MFA_ERROR_KERNEL_COMPILATION: mfa_error_t = 4;
/// A backend failed while running, or an internal error (a bug in ufa) was caught.
pub const MFA_ERROR_EXECUTION_FAILED: mfa_error_t = 5;

/// IEEE half precision.
pub const MFA_PRECISION_FP16: mfa_precision_t = 0;
/// bfloat16.
pub const MFA_PRECISION_BF16: mfa_precision_t = 1;
/// IEEE single precision.
pub const MFA_PRECISION_FP32: mfa_precision_t = 2;
/// 8-bit quantized (UMFA only): ufa returns `MFA_ERROR_DEVICE_NOT_SUPPORTED`.
pub const MFA_PRECISION_INT8: mfa_precision_t = 3;
/// 4-bit quantized (UMFA only): ufa returns `MFA_ERROR_DEVICE_NOT_SUPPORTED`.
pub const MFA_PRECISION_INT4: mfa_precision_t = 4;

/// No mask.
pub const MFA_MASK_TYPE_NONE: mfa_mask_type_t = 0;
/// Boolean mask: nonzero = attend, 0 = masked out.
pub const MFA_MASK_TYPE_BOOL: mfa_mask_type_t = 1;
/// Additive mask: added to the scaled scores before the softmax.
pub const MFA_MASK_TYPE_ADDITIVE: mfa_mask_type_t = 2;

/// One byte per element (boolean masks).
pub const MFA_MASK_SCALAR_BYTE: mfa_mask_scalar_t = 0;
/// IEEE half precision (additive masks).
pub const MFA_MASK_SCALAR_FP16: mfa_mask_scalar_t = 1;
/// bfloat16 (additive masks).
pub const MFA_MASK_SCALAR_BF16: mfa_mask_scalar_t = 2;
/// IEEE single precision (additive masks).
pub const MFA_MASK_SCALAR_FP32: mfa_mask_scalar_t = 3;

fn mfa_code(kind: ErrorKind) -> mfa_error_t {
    match kind {
        ErrorKind::InvalidArgument => MFA_ERROR_INVALID_ARGS,
        ErrorKind::OutOfMemory => MFA_ERROR_MEMORY_ALLOCATION,
        ErrorKind::Unsupported | ErrorKind::DeviceUnavailable => MFA_ERROR_DEVICE_NOT_SUPPORTED,
        ErrorKind::Backend | ErrorKind::Internal => MFA_ERROR_EXECUTION_FAILED,
    }
}

/// [`boundary`] for `mfa_*` functions.
pub(crate) fn mfa_call(body: impl FnOnce() -> Result<()>) -> mfa_error_t {
    boundary(MFA_SUCCESS, mfa_code, body)
}

/// What an `mfa_buffer_t` points to.
struct Buffer {
    data: *mut u8,
    size: usize,
    /// Set when ufa allocated `data` (and so frees it).
    owned: Option<AllocLayout>,
    /// Shape and strides given with `mfa_buffer_from_ptr_with_strides`.
    layout: Option<Layout>,
    /// Host memory, or CUDA memory wrapped with `mfa_buffer_from_cuda_ptr`.
    device: Device,
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if let Some(l) = self.owned {
            // SAFETY: allocated in mfa_create_buffer with this layout.
            unsafe { dealloc(self.data, l) }
        }
    }
}

/// Cache-line alignment, enough for every element type and for vector loads.
const BUFFER_ALIGN: usize = 64;

unsafe fn context_ref<'a>(ctx: mfa_context_t) -> Result<&'a ufa_context> {
    require!(ctx, "context");
    Ok(&*(ctx as *const ufa_context))
}

unsafe fn new_buffer(out: *mut mfa_buffer_t, buffer: Buffer) -> Result<()> {
    out.write(Box::into_raw(Box::new(buffer)).cast());
    Ok(())
}

fn check_size(size_bytes: usize) -> Result<()> {
    if size_bytes == 0 {
        return Err(Error::invalid(
            "size_bytes=0 but a buffer needs at least 1 byte",
        ));
    }
    Ok(())
}

/// Creates a context (all CPU cores; CUDA when tensors live there) and writes it to `*context`.
/// Free it with `mfa_destroy_context`.
#[no_mangle]
pub unsafe extern "C" fn mfa_create_context(context: *mut mfa_context_t) -> mfa_error_t {
    mfa_call(|| {
        require!(context, "context");
        let ctx = ufa_context::new(&crate::native::ufa_context_options::defaults())?;
        context.write(Box::into_raw(ctx).cast());
        Ok(())
    })
}

/// Frees a context. NULL is ignored. Buffers made with it stay valid (they do not refer to it).
#[no_mangle]
pub unsafe extern "C" fn mfa_destroy_context(context: mfa_context_t) {
    crate::native::ufa_context_destroy(context.cast())
}

/// Allocates `size_bytes` of zeroed host memory, 64-byte aligned, owned by the buffer. A size of
/// 0 is `MFA_ERROR_INVALID_ARGS`; a size that cannot be allocated is
/// `MFA_ERROR_MEMORY_ALLOCATION`.
#[no_mangle]
pub unsafe extern "C" fn mfa_create_buffer(
    context: mfa_context_t,
    size_bytes: usize,
    buffer: *mut mfa_buffer_t,
) -> mfa_error_t {
    mfa_call(|| {
        context_ref(context)?;
        require!(buffer, "buffer");
        check_size(size_bytes)?;
        let oom = || {
            Error::new(
                ErrorKind::OutOfMemory,
                format!("could not allocate a buffer of {size_bytes} bytes"),
            )
        };
        let layout = AllocLayout::from_size_align(size_bytes, BUFFER_ALIGN).map_err(|_| oom())?;
        let data = alloc_zeroed(layout);
        if data.is_null() {
            return Err(oom());
        }
        new_buffer(
            buffer,
            Buffer {
                data,
                size: size_bytes,
                owned: Some(layout),
                layout: None,
                device: Device::Cpu,
            },
        )
    })
}

/// Wraps `size_bytes` of the caller's host memory at `data_ptr` without copying. The memory must
/// outlive the buffer and stay owned by the caller (`mfa_destroy_buffer` does not free it).
/// CUDA device memory (`cudaMalloc`) is recognised through the driver and wrapped as
/// `mfa_buffer_from_cuda_ptr` would wrap it: calls on it run on that GPU. Its
/// layout comes from each call's arguments: [batch, heads, seq, head_dim] row-major, or
/// [batch, seq, heads, head_dim] when the call's transpose flag for it is set. A call whose
/// shape needs more than `size_bytes` fails with `MFA_ERROR_INVALID_ARGS`.
#[no_mangle]
pub unsafe extern "C" fn mfa_buffer_from_ptr(
    context: mfa_context_t,
    data_ptr: *mut c_void,
    size_bytes: usize,
    buffer: *mut mfa_buffer_t,
) -> mfa_error_t {
    mfa_call(|| wrap(context, data_ptr, size_bytes, None, Device::Cpu, buffer))
}

/// As `mfa_buffer_from_ptr`, and records a shape and strides (in elements, each >= 0; NULL
/// strides = row-major) of `ndim` (1 to 4) dimensions. When the buffer is used as a
/// [batch, heads, seq, head_dim] operand (in the order its transpose flag names), the shape must
/// equal the call's and the strides replace the row-major layout; so a permuted or sliced
/// PyTorch tensor is read in place.
#[no_mangle]
pub unsafe extern "C" fn mfa_buffer_from_ptr_with_strides(
    context: mfa_context_t,
    data_ptr: *mut c_void,
    size_bytes: usize,
    shape: *const i64,
    strides: *const i64,
    ndim: u32,
    buffer: *mut mfa_buffer_t,
) -> mfa_error_t {
    mfa_call(|| {
        let layout = layout_of(ndim as i64, shape, strides, "buffer")?;
        wrap(
            context,
            data_ptr,
            size_bytes,
            Some(layout),
            Device::Cpu,
            buffer,
        )
    })
}

/// A ufa extension (UMFA had `mfa_buffer_from_mtl_buffer` instead): wraps `size_bytes` of memory
/// of CUDA device `device_ordinal` without copying, owned by the caller. Attention calls on such
/// buffers (all of one call's buffers, and its mask, must be on that device) run there, queued on
/// the legacy default stream: later work on that stream, such as a `cudaMemcpy`, sees the
/// results, and `mfa_get_gpu_latency` then measures only the launch.
#[no_mangle]
pub unsafe extern "C" fn mfa_buffer_from_cuda_ptr(
    context: mfa_context_t,
    device_ptr: *mut c_void,
    size_bytes: usize,
    device_ordinal: c_int,
    buffer: *mut mfa_buffer_t,
) -> mfa_error_t {
    mfa_call(|| {
        let ordinal = u32::try_from(device_ordinal)
            .map_err(|_| Error::invalid(format!("device_ordinal={device_ordinal} must be >= 0")))?;
        wrap(
            context,
            device_ptr,
            size_bytes,
            None,
            Device::Cuda(ordinal),
            buffer,
        )
    })
}

unsafe fn wrap(
    context: mfa_context_t,
    data_ptr: *mut c_void,
    size_bytes: usize,
    layout: Option<Layout>,
    device: Device,
    buffer: *mut mfa_buffer_t,
) -> Result<()> {
    context_ref(context)?;
    require!(data_ptr, "data_ptr");
    require!(buffer, "buffer");
    check_size(size_bytes)?;
    // UMFA's README wraps whatever memory the caller has; on Linux that is often cudaMalloc'd.
    // Such a buffer runs on its GPU, as if it came from mfa_buffer_from_cuda_ptr, instead of
    // being read by the CPU.
    let device = match device {
        Device::Cpu => Device::of_memory(data_ptr),
        d => d,
    };
    new_buffer(
        buffer,
        Buffer {
            data: data_ptr.cast(),
            size: size_bytes,
            owned: None,
            layout,
            device,
        },
    )
}

/// The buffer's memory (what `mfa_buffer_from_ptr` was given, or what `mfa_create_buffer`
/// allocated); NULL for a NULL buffer.
#[no_mangle]
pub unsafe extern "C" fn mfa_buffer_contents(buffer: mfa_buffer_t) -> *mut c_void {
    query(std::ptr::null_mut(), || {
        if buffer.is_null() {
            return std::ptr::null_mut();
        }
        (*(buffer as *const Buffer)).data.cast()
    })
}

/// Frees a buffer, and its memory if ufa allocated it (wrapped memory stays the caller's).
/// NULL is ignored.
#[no_mangle]
pub unsafe extern "C" fn mfa_destroy_buffer(buffer: mfa_buffer_t) {
    query((), || {
        if !buffer.is_null() {
            drop(Box::from_raw(buffer as *mut Buffer));
        }
    })
}

fn dtype_of(p: mfa_precision_t, name: &str) -> Result<DType> {
    match p {
        MFA_PRECISION_FP16 => Ok(DType::F16),
        MFA_PRECISION_BF16 => Ok(DType::BF16),
        MFA_PRECISION_FP32 => Ok(DType::F32),
        MFA_PRECISION_INT8 | MFA_PRECISION_INT4 => Err(Error::unsupported(format!(
            "{name}={p}: quantized (INT8/INT4) attention is not implemented by ufa"
        ))),
        other => Err(Error::invalid(format!(
            "{name}={other} but must be MFA_PRECISION_FP16 (0), _BF16 (1) or _FP32 (2)"
        ))),
    }
}

/// The scalar arguments every attention call shares.
struct Dims {
    batch: usize,
    seq_q: usize,
    seq_kv: usize,
    heads: usize,
    head_dim: usize,
    /// transpose_q, transpose_k, transpose_v, transpose_o
    transpose: [bool; 4],
}

/// Which operand of a call a buffer is, for its shape and messages.
#[derive(Clone, Copy)]
enum Role {
    Q,
    K,
    V,
    O,
}

impl Dims {
    /// From the C arguments `[batch_size, seq_len_q, seq_len_kv, num_heads]`, `head_dim` and
    /// the four transpose flags.
    fn new(sizes: [u32; 4], head_dim: u16, transpose: [bool; 4]) -> Self {
        let [batch, seq_q, seq_kv, heads] = sizes.map(|x| x as usize);
        Dims {
            batch,
            seq_q,
            seq_kv,
            heads,
            head_dim: head_dim as usize,
            transpose,
        }
    }

    /// The operand's shape in its buffer's dimension order, and the permutation to the core's
    /// [batch, seq, heads, head_dim].
    fn logical(&self, role: Role) -> ([usize; 4], [usize; 4]) {
        let (seq, transposed) = match role {
            Role::Q => (self.seq_q, self.transpose[0]),
            Role::K => (self.seq_kv, self.transpose[1]),
            Role::V => (self.seq_kv, self.transpose[2]),
            Role::O => (self.seq_q, self.transpose[3]),
        };
        if transposed {
            ([self.batch, seq, self.heads, self.head_dim], [0, 1, 2, 3])
        } else {
            ([self.batch, self.heads, seq, self.head_dim], [0, 2, 1, 3])
        }
    }
}

/// The buffer's memory seen as `logical` (its recorded strides, or row-major), checked to fit in
/// the buffer, and reordered by `perm` into the core's dimension order.
unsafe fn mapped(
    buffer: mfa_buffer_t,
    name: &str,
    dtype: DType,
    logical: &[usize],
    perm: &[usize],
) -> Result<Mapped> {
    if buffer.is_null() {
        return Err(Error::invalid(format!("{name} buffer is NULL")));
    }
    let b = &*(buffer as *const Buffer);
    let layout = match &b.layout {
        Some(l) if l.shape() != logical => {
            return Err(Error::invalid(format!(
                "{name} buffer was wrapped with shape {:?} but this call uses it as {logical:?}",
                l.shape()
            )))
        }
        Some(l) => *l,
        None => Layout::contiguous(logical)?,
    };
    // span() is at most isize::MAX / 8, so the product cannot overflow.
    let needed = layout.span()? * dtype.size_in_bytes();
    if needed > b.size {
        return Err(Error::invalid(format!(
            "{name} buffer holds {} bytes but {dtype} shape {logical:?} with strides {:?} needs \
             {needed}",
            b.size,
            layout.strides()
        )));
    }
    let shape: Vec<usize> = perm.iter().map(|&p| layout.shape()[p]).collect();
    let strides: Vec<usize> = perm.iter().map(|&p| layout.strides()[p]).collect();
    Ok(Mapped {
        ptr: b.data.cast(),
        device: b.device,
        layout: Layout::new(&shape, &strides)?,
    })
}

/// A buffer's memory described in the core's dimension order.
struct Mapped {
    ptr: *mut c_void,
    device: Device,
    layout: Layout,
}

impl Mapped {
    unsafe fn view<'a>(&self, dtype: DType) -> Result<TensorView<'a>> {
        let l = &self.layout;
        TensorView::from_raw_parts(self.ptr, dtype, self.device, l.shape(), l.strides())
    }
    unsafe fn view_mut<'a>(&self, dtype: DType) -> Result<TensorViewMut<'a>> {
        let l = &self.layout;
        TensorViewMut::from_raw_parts(self.ptr, dtype, self.device, l.shape(), l.strides())
    }
}

unsafe fn operand<'a>(
    buffer: mfa_buffer_t,
    name: &str,
    dtype: DType,
    dims: &Dims,
    role: Role,
) -> Result<TensorView<'a>> {
    let (logical, perm) = dims.logical(role);
    mapped(buffer, name, dtype, &logical, &perm)?.view(dtype)
}

unsafe fn operand_mut<'a>(
    buffer: mfa_buffer_t,
    name: &str,
    dtype: DType,
    dims: &Dims,
    role: Role,
) -> Result<TensorViewMut<'a>> {
    let (logical, perm) = dims.logical(role);
    mapped(buffer, name, dtype, &logical, &perm)?.view_mut(dtype)
}

/// The log-sum-exp buffer: f32 [batch, heads, seq_q].
unsafe fn lse_layout(buffer: mfa_buffer_t, dims: &Dims) -> Result<Mapped> {
    let logical = [dims.batch, dims.heads, dims.seq_q];
    mapped(buffer, "softmax_lse", DType::F32, &logical, &[0, 1, 2])
}

fn params<'a>(softmax_scale: f32, causal: bool) -> AttentionParams<'a> {
    AttentionParams {
        softmax_scale: (softmax_scale != 0.0).then_some(softmax_scale),
        causal,
        ..AttentionParams::default()
    }
}

/// The mask of `mfa_attention_forward_masked`, as a core view (None for `MFA_MASK_TYPE_NONE`).
struct MaskArgs {
    ptr: *const c_void,
    size_bytes: usize,
    shape: *const i64,
    strides: *const i64,
    ndim: u32,
    kind: mfa_mask_type_t,
    scalar: mfa_mask_scalar_t,
}

/// The mask lives on `device`, the device of the call's buffers.
unsafe fn mask_view<'a>(m: &MaskArgs, device: Device) -> Result<Option<TensorView<'a>>> {
    let dtype = match (m.kind, m.scalar) {
        (MFA_MASK_TYPE_NONE, _) => return Ok(None),
        (MFA_MASK_TYPE_BOOL, MFA_MASK_SCALAR_BYTE) => DType::Bool,
        (MFA_MASK_TYPE_ADDITIVE, MFA_MASK_SCALAR_FP16) => DType::F16,
        (MFA_MASK_TYPE_ADDITIVE, MFA_MASK_SCALAR_BF16) => DType::BF16,
        (MFA_MASK_TYPE_ADDITIVE, MFA_MASK_SCALAR_FP32) => DType::F32,
        (k, s) => {
            return Err(Error::invalid(format!(
                "mask_type={k} with mask_scalar_type={s}: a BOOL (1) mask takes BYTE (0) \
                 elements, an ADDITIVE (2) mask FP16 (1), BF16 (2) or FP32 (3)"
            )))
        }
    };
    require!(m.ptr, "mask_ptr");
    let l = layout_of(m.ndim as i64, m.shape, m.strides, "mask")?;
    let needed = l.span()? * dtype.size_in_bytes();
    if needed > m.size_bytes {
        return Err(Error::invalid(format!(
            "mask_size_bytes={} but {dtype} mask shape {:?} with strides {:?} needs {needed}",
            m.size_bytes,
            l.shape(),
            l.strides()
        )));
    }
    TensorView::from_raw_parts(m.ptr, dtype, device, l.shape(), l.strides()).map(Some)
}

/// The forward calls, all of which end here.
struct Forward<'m> {
    dims: Dims,
    input: mfa_precision_t,
    intermediate: mfa_precision_t,
    output: mfa_precision_t,
    softmax_scale: f32,
    causal: bool,
    mask: Option<&'m MaskArgs>,
}

impl Forward<'_> {
    unsafe fn run(
        &self,
        ctx: mfa_context_t,
        bufs: [mfa_buffer_t; 4],
        lse: mfa_buffer_t,
    ) -> Result<()> {
        let ctx = context_ref(ctx)?;
        let input = dtype_of(self.input, "input_precision")?;
        // Only checked: softmax and accumulation are fp32 whatever is asked.
        dtype_of(self.intermediate, "intermediate_precision")?;
        let output = dtype_of(self.output, "output_precision")?;
        let d = &self.dims;
        let q = operand(bufs[0], "q", input, d, Role::Q)?;
        let k = operand(bufs[1], "k", input, d, Role::K)?;
        let v = operand(bufs[2], "v", input, d, Role::V)?;
        let mut out = operand_mut(bufs[3], "out", output, d, Role::O)?;
        let mut lse = match lse.is_null() {
            true => None,
            false => Some(lse_layout(lse, d)?.view_mut(DType::F32)?),
        };
        let mut p = params(self.softmax_scale, self.causal);
        if let Some(m) = self.mask {
            p.mask = mask_view(m, q.device())?;
        }
        ctx.timed(|c| c.forward_with_lse(&q, &k, &v, &mut out, lse.as_mut(), &p))
    }
}

/// Attention forward exactly as UMFA's README calls it: `out = softmax(softmax_scale * q k^T) v`
/// for `num_heads` heads of `batch_size` sequences.
///
/// Layout: each buffer is [batch, heads, seq, head_dim] row-major, or [batch, seq, heads,
/// head_dim] when its `transpose_*` flag is set (strides recorded with
/// `mfa_buffer_from_ptr_with_strides` override the row-major layout). K and V use `seq_len_kv`.
/// `softmax_scale` 0 means 1/sqrt(head_dim). `causal` aligns the diagonal bottom-right when
/// `seq_len_q != seq_len_kv` (query i sees keys j <= i + seq_len_kv - seq_len_q).
/// `input_precision` is the dtype of q, k, v; `output_precision` that of out (honoured, unlike
/// UMFA); `intermediate_precision` is a ceiling: softmax and accumulation always run in fp32.
/// Every head is computed. On host buffers the call is complete when it returns; on CUDA buffers
/// (`mfa_buffer_from_cuda_ptr`) it is queued on the legacy default stream.
#[no_mangle]
pub unsafe extern "C" fn mfa_attention_forward(
    context: mfa_context_t,
    q: mfa_buffer_t,
    k: mfa_buffer_t,
    v: mfa_buffer_t,
    out: mfa_buffer_t,
    batch_size: u32,
    seq_len_q: u32,
    seq_len_kv: u32,
    num_heads: u32,
    head_dim: u16,
    softmax_scale: f32,
    causal: bool,
    input_precision: mfa_precision_t,
    intermediate_precision: mfa_precision_t,
    output_precision: mfa_precision_t,
    transpose_q: bool,
    transpose_k: bool,
    transpose_v: bool,
    transpose_o: bool,
) -> mfa_error_t {
    mfa_call(|| {
        Forward {
            dims: Dims::new(
                [batch_size, seq_len_q, seq_len_kv, num_heads],
                head_dim,
                [transpose_q, transpose_k, transpose_v, transpose_o],
            ),
            input: input_precision,
            intermediate: intermediate_precision,
            output: output_precision,
            softmax_scale,
            causal,
            mask: None,
        }
        .run(context, [q, k, v, out], std::ptr::null_mut())
    })
}

/// `mfa_attention_forward` with a mask: UMFA's later header appended these seven arguments to
/// `mfa_attention_forward` itself; C has no overloads, so ufa keeps the README's 19-argument
/// function and gives the masked one this name.
///
/// The mask (host memory, `mask_size_bytes` long, read in place) has `mask_ndim` (1 to 4)
/// dimensions `mask_shape` with `mask_strides` in elements (NULL = row-major), broadcastable to
/// [batch, heads, seq_len_q, seq_len_kv] with NumPy's rules. `MFA_MASK_TYPE_BOOL` takes
/// `MFA_MASK_SCALAR_BYTE` elements (nonzero = attend); `MFA_MASK_TYPE_ADDITIVE` takes FP16, BF16
/// or FP32 elements added to the scaled scores. `MFA_MASK_TYPE_NONE` ignores the mask arguments.
/// A query row that sees no key outputs zeros.
#[no_mangle]
pub unsafe extern "C" fn mfa_attention_forward_masked(
    context: mfa_context_t,
    q: mfa_buffer_t,
    k: mfa_buffer_t,
    v: mfa_buffer_t,
    out: mfa_buffer_t,
    batch_size: u32,
    seq_len_q: u32,
    seq_len_kv: u32,
    num_heads: u32,
    head_dim: u16,
    softmax_scale: f32,
    causal: bool,
    input_precision: mfa_precision_t,
    intermediate_precision: mfa_precision_t,
    output_precision: mfa_precision_t,
    transpose_q: bool,
    transpose_k: bool,
    transpose_v: bool,
    transpose_o: bool,
    mask_ptr: *const c_void,
    mask_size_bytes: usize,
    mask_shape: *const i64,
    mask_strides: *const i64,
    mask_ndim: u32,
    mask_type: mfa_mask_type_t,
    mask_scalar_type: mfa_mask_scalar_t,
) -> mfa_error_t {
    mfa_call(|| {
        let mask = MaskArgs {
            ptr: mask_ptr,
            size_bytes: mask_size_bytes,
            shape: mask_shape,
            strides: mask_strides,
            ndim: mask_ndim,
            kind: mask_type,
            scalar: mask_scalar_type,
        };
        Forward {
            dims: Dims::new(
                [batch_size, seq_len_q, seq_len_kv, num_heads],
                head_dim,
                [transpose_q, transpose_k, transpose_v, transpose_o],
            ),
            input: input_precision,
            intermediate: intermediate_precision,
            output: output_precision,
            softmax_scale,
            causal,
            mask: Some(&mask),
        }
        .run(context, [q, k, v, out], std::ptr::null_mut())
    })
}

/// `mfa_attention_forward` that also writes the log-sum-exp of each score row to `lse`: f32,
/// [batch, heads, seq_len_q] row-major, natural log, -inf for a row that sees no key. This is
/// what `mfa_attention_backward` reads. The output has the input's precision.
#[no_mangle]
pub unsafe extern "C" fn mfa_attention_forward_with_lse(
    context: mfa_context_t,
    q: mfa_buffer_t,
    k: mfa_buffer_t,
    v: mfa_buffer_t,
    out: mfa_buffer_t,
    lse: mfa_buffer_t,
    batch_size: u32,
    seq_len_q: u32,
    seq_len_kv: u32,
    num_heads: u32,
    head_dim: u16,
    softmax_scale: f32,
    causal: bool,
    input_precision: mfa_precision_t,
    intermediate_precision: mfa_precision_t,
    transpose_q: bool,
    transpose_k: bool,
    transpose_v: bool,
    transpose_o: bool,
) -> mfa_error_t {
    mfa_call(|| {
        require!(lse, "lse");
        Forward {
            dims: Dims::new(
                [batch_size, seq_len_q, seq_len_kv, num_heads],
                head_dim,
                [transpose_q, transpose_k, transpose_v, transpose_o],
            ),
            input: input_precision,
            intermediate: intermediate_precision,
            output: input_precision,
            softmax_scale,
            causal,
            mask: None,
        }
        .run(context, [q, k, v, out], lse)
    })
}

/// Attention backward: gradients `dq`, `dk`, `dv` (laid out like q, k, v; `dout` like out) from
/// the forward's q, k, v, its output `out` and its log-sum-exp `softmax_lse` (from
/// `mfa_attention_forward_with_lse`), for the same scale and causal flag. All tensors, gradients
/// included, have `input_precision`; `d_buffer` is scratch UMFA needed and ufa does not (it may
/// be NULL; it is never touched). Deterministic.
#[no_mangle]
pub unsafe extern "C" fn mfa_attention_backward(
    context: mfa_context_t,
    dout: mfa_buffer_t,
    q: mfa_buffer_t,
    k: mfa_buffer_t,
    v: mfa_buffer_t,
    out: mfa_buffer_t,
    softmax_lse: mfa_buffer_t,
    dq: mfa_buffer_t,
    dk: mfa_buffer_t,
    dv: mfa_buffer_t,
    d_buffer: mfa_buffer_t,
    batch_size: u32,
    seq_len_q: u32,
    seq_len_kv: u32,
    num_heads: u32,
    head_dim: u16,
    softmax_scale: f32,
    causal: bool,
    input_precision: mfa_precision_t,
    intermediate_precision: mfa_precision_t,
    transpose_q: bool,
    transpose_k: bool,
    transpose_v: bool,
    transpose_o: bool,
) -> mfa_error_t {
    let _ = d_buffer;
    mfa_call(|| {
        let ctx = context_ref(context)?;
        let t = dtype_of(input_precision, "input_precision")?;
        dtype_of(intermediate_precision, "intermediate_precision")?;
        let d = Dims::new(
            [batch_size, seq_len_q, seq_len_kv, num_heads],
            head_dim,
            [transpose_q, transpose_k, transpose_v, transpose_o],
        );
        let inputs = BackwardInputs {
            q: operand(q, "q", t, &d, Role::Q)?,
            k: operand(k, "k", t, &d, Role::K)?,
            v: operand(v, "v", t, &d, Role::V)?,
            out: operand(out, "out", t, &d, Role::O)?,
            dout: operand(dout, "dout", t, &d, Role::O)?,
            lse: lse_layout(softmax_lse, &d)?.view(DType::F32)?,
        };
        let mut grads = Gradients {
            dq: operand_mut(dq, "dq", t, &d, Role::Q)?,
            dk: operand_mut(dk, "dk", t, &d, Role::K)?,
            dv: operand_mut(dv, "dv", t, &d, Role::V)?,
        };
        ctx.timed(|c| c.backward(&inputs, &mut grads, &params(softmax_scale, causal)))
    })
}

/// A static description of `error` ("success", "invalid arguments", ...); never NULL. For the
/// details of the last failure on this thread, call `ufa_last_error_message()` (ufa.h).
#[no_mangle]
pub extern "C" fn mfa_error_string(error: mfa_error_t) -> *const c_char {
    let s: &'static CStr = match error {
        MFA_SUCCESS => c"success",
        MFA_ERROR_INVALID_ARGS => c"invalid arguments",
        MFA_ERROR_MEMORY_ALLOCATION => c"memory allocation failed",
        MFA_ERROR_DEVICE_NOT_SUPPORTED => c"device or feature not supported",
        MFA_ERROR_KERNEL_COMPILATION => c"kernel compilation failed",
        MFA_ERROR_EXECUTION_FAILED => c"execution failed",
        _ => c"unknown error",
    };
    s.as_ptr()
}

/// Always true: ufa's CPU backend runs everywhere (UMFA answered whether Metal was available).
#[no_mangle]
pub extern "C" fn mfa_is_device_supported() -> bool {
    true
}

/// Writes ufa's version numbers (each pointer may be NULL).
#[no_mangle]
pub unsafe extern "C" fn mfa_get_version(major: *mut c_int, minor: *mut c_int, patch: *mut c_int) {
    query((), || {
        for (out, n) in [major, minor, patch].into_iter().zip(version_numbers()) {
            if !out.is_null() {
                out.write(n as c_int);
            }
        }
    })
}

/// Seconds the last successful attention call on `context` took, measured on the host around
/// the whole call; 0 before any call and for a NULL context. (UMFA timed the GPU command
/// buffer; on host buffers ufa's calls complete before returning, so the two agree; on CUDA
/// buffers this is the time to validate and launch.)
#[no_mangle]
pub unsafe extern "C" fn mfa_get_gpu_latency(context: mfa_context_t) -> f64 {
    query(0.0, || {
        if context.is_null() {
            return 0.0;
        }
        let ctx = &*(context as *const ufa_context);
        f64::from_bits(ctx.last_call_seconds.load(Ordering::Relaxed))
    })
}
