//! Validation: the one place that turns user-supplied views and parameters into a [`Problem`]
//! every backend may trust. Each rule reports the argument and the values that broke it.

use crate::device::Device;
use crate::dropout::DropoutMask;
use crate::dtype::DType;
use crate::error::{invalid, Error, Result};
use crate::params::{AttentionParams, Fp32Precision};
use crate::sequences::{RowMap, Seq, Sequences};
use crate::tensor::{Layout, TensorView, TensorViewMut};

/// Largest head dimension (of Q/K and of V) the library accepts.
pub const MAX_HEAD_DIM: usize = 512;

/// Sequences (and a cache's capacity) must stay below this, so that band arithmetic
/// (`i + offset ± window`) fits in the CUDA kernels' 32-bit integers.
pub(crate) const MAX_SEQLEN: usize = 1 << 28;

/// A strided operand after validation: base pointer, dtype, 4-d strides in elements (broadcast
/// dimensions have stride 0) and how its rows belong to sequences.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Operand {
    pub ptr: *mut u8,
    pub dtype: DType,
    pub strides: [usize; 4],
    /// Where row `pos` of sequence `b` is (dense, packed, paged or gathered).
    pub rows: RowMap,
    /// The dimension that holds rows: 1 for q/k/v/out ([b, s, h, d]), 2 for the LSE ([b, h, s]).
    pub seq_dim: usize,
}

// SAFETY: validation guarantees that outputs do not overlap themselves or the inputs, and the
// backends write each output element from exactly one thread.
unsafe impl Send for Operand {}
unsafe impl Sync for Operand {}

impl Operand {
    /// A dense strided operand (rows in dimension 1).
    pub fn strided(ptr: *mut u8, dtype: DType, strides: [usize; 4]) -> Operand {
        Operand {
            ptr,
            dtype,
            strides,
            rows: RowMap::Strided,
            seq_dim: 1,
        }
    }
}

/// A validated attention problem. Heads and head dimensions are >= 1. Batch and sequence lengths
/// may be 0, but the backends only see problems with work (crate::empty settles the others);
/// sequences of a packed batch or a KV cache may still be empty.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Problem {
    pub device: Device,
    pub batch: usize,
    /// Query rows of every sequence of a dense batch; at least those of any other sequence (a
    /// packed batch's `max_seqlen_q`).
    pub seqlen_q: usize,
    /// Keys of every sequence of a dense batch; at least those of any other sequence (a packed
    /// batch's `max_seqlen_kv`, a cache's capacity). Kernels clamp lengths read from device
    /// memory to these.
    pub seqlen_kv: usize,
    pub heads_q: usize,
    pub heads_kv: usize,
    pub head_dim: usize,
    pub head_dim_v: usize,
    /// [batch, seqlen_q, heads_q, head_dim]
    pub q: Operand,
    /// [batch, seqlen_kv, heads_kv, head_dim]
    pub k: Operand,
    /// [batch, seqlen_kv, heads_kv, head_dim_v]
    pub v: Operand,
    /// [batch, seqlen_q, heads_q, head_dim_v]
    pub out: Operand,
    /// [batch, heads_q, seqlen_q, (unused)]
    pub lse: Option<Operand>,
    pub scale: f32,
    /// 0 = off.
    pub softcap: f32,
    /// Each sequence's lengths and the alignment of its causal diagonal.
    pub seqs: Sequences,
    /// Visible keys are `[c - left, c + right]` around the aligned position `c`; None = unbounded.
    pub window_left: Option<usize>,
    pub window_right: Option<usize>,
    /// fp32 slopes indexed [batch, head] (batch stride 0 when shared).
    pub alibi: Option<Operand>,
    /// Broadcast to [batch, heads_q, seqlen_q, seqlen_kv]; bool = visibility, float = additive.
    pub mask: Option<Operand>,
    /// fp32 inputs: products may be rounded to TF32 (AttentionParams::fp32_precision).
    pub fp32_precision: Fp32Precision,
    /// Dropout of the probabilities; None when none is asked for (or p = 0).
    pub dropout: Option<DropoutMask>,
}

impl Problem {
    pub fn group_size(&self) -> usize {
        self.heads_q / self.heads_kv
    }

    /// Whether a score is more than `scale · q·k` before the softmax: a softcap, ALiBi or a
    /// mask. The one answer every backend's choice of score-modifying code starts from.
    pub fn modifies_scores(&self) -> bool {
        self.softcap > 0.0 || self.alibi.is_some() || self.mask.is_some()
    }

    /// Whether causal or window rules hide keys from some rows (a band): key blocks then see
    /// unequal numbers of query blocks.
    pub fn has_band(&self) -> bool {
        self.window_left.is_some() || self.window_right.is_some()
    }

    /// Query row `i` of a dense batch is aligned with key `i + diag_offset()`.
    pub fn diag_offset(&self) -> i64 {
        self.seqs.diag_offset(self.seqlen_q, self.seqlen_kv)
    }

    /// The lengths of sequence `b`. Reads host metadata: CPU problems only, unless uniform.
    #[inline]
    pub fn seq(&self, b: usize) -> Seq {
        if self.seqs.is_uniform() {
            return Seq {
                seqlen_q: self.seqlen_q,
                seqlen_kv: self.seqlen_kv,
                diag_offset: self.diag_offset(),
            };
        }
        debug_assert_eq!(self.device, Device::Cpu, "device metadata read on the host");
        // SAFETY: validation checked the host metadata of every sequence b < batch.
        unsafe { self.seqs.seq(b, self.seqlen_q, self.seqlen_kv) }
    }

    /// Half-open range of keys that query row `i` of sequence `seq` may see by causal/window
    /// rules alone.
    #[inline]
    pub fn visible_keys(&self, seq: &Seq, i: usize) -> (usize, usize) {
        let c = i as i64 + seq.diag_offset;
        let n = seq.seqlen_kv as i64;
        let lo = match self.window_left {
            Some(l) => c.saturating_sub(l as i64).max(0),
            None => 0,
        };
        let hi = match self.window_right {
            Some(r) => c.saturating_add(r as i64).saturating_add(1),
            None => n,
        }
        .min(n);
        let lo = lo.min(n) as usize;
        (lo, (hi.max(lo as i64)) as usize)
    }

    /// Half-open range of the query rows of sequence `seq` whose band (causal/window rules
    /// alone) holds some key of `key0..=key_last`: the band inverted, as the kernels'
    /// `rows_of_keys` (kernels/mask.cuh) computes it.
    pub fn rows_seeing_keys(&self, seq: &Seq, key0: usize, key_last: usize) -> (usize, usize) {
        let n = seq.seqlen_q as i64;
        let lo = match self.window_right {
            Some(r) => (key0 as i64 - seq.diag_offset)
                .saturating_sub(r as i64)
                .max(0),
            None => 0,
        }
        .min(n);
        let hi = match self.window_left {
            Some(l) => (key_last as i64 - seq.diag_offset)
                .saturating_add(l as i64)
                .saturating_add(1),
            None => n,
        }
        .min(n);
        (lo as usize, hi.max(lo) as usize)
    }
}

/// Forward FLOPs: two matmuls, `2·Sq·Skv·D` for S = QKᵀ and `2·Sq·Skv·Dv` for O = PV, per head;
/// halved for causal, as FlashAttention counts them.
pub fn forward_flops(
    batch: usize,
    heads_q: usize,
    seqlen_q: usize,
    seqlen_kv: usize,
    head_dim: usize,
    head_dim_v: usize,
    causal: bool,
) -> f64 {
    let per_pair = 2.0 * (head_dim + head_dim_v) as f64;
    let f = batch as f64 * heads_q as f64 * seqlen_q as f64 * seqlen_kv as f64 * per_pair;
    if causal {
        f / 2.0
    } else {
        f
    }
}

/// An f32 LSE operand `[batch, heads, rows]` (rows in dimension 2).
pub(crate) fn lse_operand(ptr: *const u8, layout: &Layout) -> Operand {
    Operand {
        seq_dim: 2,
        ..operand(ptr, DType::F32, layout)
    }
}

pub(crate) fn operand(ptr: *const u8, dtype: DType, layout: &Layout) -> Operand {
    let mut strides = [0usize; 4];
    strides[..layout.ndim()].copy_from_slice(layout.strides());
    Operand::strided(ptr as *mut u8, dtype, strides)
}

/// Byte range [start, end) a view touches, for overlap checks.
pub(crate) fn byte_range(ptr: *const u8, dtype: DType, layout: &Layout) -> (usize, usize) {
    let span = layout.span().unwrap_or(0);
    let start = ptr as usize;
    (start, start.saturating_add(span * dtype.size_in_bytes()))
}

pub(crate) fn check_rank(name: &str, v: &Layout, want: usize, meaning: &str) -> Result<()> {
    if v.ndim() != want {
        invalid!(
            "{name} must have {want} dimensions {meaning}, got {} (shape {:?})",
            v.ndim(),
            v.shape()
        );
    }
    Ok(())
}

pub(crate) fn check_last_contiguous(name: &str, l: &Layout) -> Result<()> {
    let n = l.ndim();
    if l.shape()[n - 1] > 1 && l.strides()[n - 1] != 1 {
        invalid!(
            "{name}.strides[{}]={} but the last dimension must be contiguous (stride 1)",
            n - 1,
            l.strides()[n - 1]
        );
    }
    Ok(())
}

pub(crate) fn check_dim(name: &str, l: &Layout, dim: usize, want: usize, what: &str) -> Result<()> {
    let got = l.shape()[dim];
    if got != want {
        invalid!("{name}.shape[{dim}]={got} but must equal {what}={want}");
    }
    Ok(())
}

pub(crate) fn check_device(name: &str, got: Device, want: Device) -> Result<()> {
    if got != want {
        invalid!("{name} is on {got} but q is on {want}; all tensors must be on one device");
    }
    Ok(())
}

/// What a tensor must look like: its dims with the name of what each must equal.
pub(crate) type Expect<'n> = [(usize, &'n str)];

/// Checks device, rank, dims and a contiguous last dim (rank-3 LSE tensors excepted).
pub(crate) fn check_tensor(
    name: &str,
    l: &Layout,
    device: Device,
    want_device: Device,
    want: &Expect<'_>,
) -> Result<()> {
    check_device(name, device, want_device)?;
    if l.ndim() != want.len() {
        let names: Vec<&str> = want.iter().map(|w| w.1).collect();
        invalid!(
            "{name} must have {} dimensions [{}], got {} (shape {:?})",
            want.len(),
            names.join(", "),
            l.ndim(),
            l.shape()
        );
    }
    for (d, &(size, what)) in want.iter().enumerate() {
        check_dim(name, l, d, size, what)?;
    }
    if want.len() == 4 {
        check_last_contiguous(name, l)?;
    }
    Ok(())
}

/// `value`, the head dim named `name`, is one the kernels take (at most MAX_HEAD_DIM).
pub(crate) fn check_head_dim(name: &str, value: usize) -> Result<()> {
    if value > MAX_HEAD_DIM {
        invalid!("{name}={value} exceeds the largest supported head dimension {MAX_HEAD_DIM}");
    }
    Ok(())
}

pub(crate) fn check_float(name: &str, dtype: DType) -> Result<()> {
    if !dtype.is_float() {
        invalid!("{name}.dtype={dtype} but must be f16, bf16 or f32");
    }
    Ok(())
}

pub(crate) fn check_f32(name: &str, dtype: DType) -> Result<()> {
    if dtype != DType::F32 {
        invalid!("{name}.dtype={dtype} but must be f32");
    }
    Ok(())
}

/// An output must not address one element twice (threads would race on it).
pub(crate) fn check_no_self_overlap(name: &str, l: &Layout) -> Result<()> {
    if l.has_overlap() {
        invalid!(
            "{name} has strides {:?} for shape {:?}, so different elements share memory",
            l.strides(),
            l.shape()
        );
    }
    Ok(())
}

/// Byte ranges of named tensors, for the aliasing rules.
pub(crate) type Ranges<'n> = Vec<(&'n str, (usize, usize))>;

pub(crate) fn range_of(name: &str, t: &TensorView<'_>) -> (String, (usize, usize)) {
    (
        name.to_string(),
        byte_range(t.as_ptr(), t.dtype(), t.layout()),
    )
}

/// Outputs must not share memory with each other or with any input: other threads read the
/// inputs while outputs are written.
pub(crate) fn check_no_alias(outputs: &Ranges<'_>, inputs: &Ranges<'_>) -> Result<()> {
    let meets = |a: (usize, usize), b: (usize, usize)| a.0 < b.1 && b.0 < a.1;
    for (i, (oname, o)) in outputs.iter().enumerate() {
        for (other, r) in &outputs[i + 1..] {
            if meets(*o, *r) {
                invalid!("{oname} and {other} share memory; they must be separate buffers");
            }
        }
        for (iname, r) in inputs {
            if meets(*o, *r) {
                invalid!("{oname} shares memory with {iname}; outputs must not overlap inputs");
            }
        }
    }
    Ok(())
}

/// Byte ranges of the inputs of `validate_inputs`.
pub(crate) fn input_ranges<'a>(
    q: &TensorView<'_>,
    k: &TensorView<'_>,
    v: &TensorView<'_>,
    params: &AttentionParams<'_>,
) -> Ranges<'a> {
    let mut inputs = vec![
        ("q", byte_range(q.as_ptr(), q.dtype(), q.layout())),
        ("k", byte_range(k.as_ptr(), k.dtype(), k.layout())),
        ("v", byte_range(v.as_ptr(), v.dtype(), v.layout())),
    ];
    if let Some(a) = &params.alibi_slopes {
        inputs.push((
            "alibi_slopes",
            byte_range(a.as_ptr(), a.dtype(), a.layout()),
        ));
    }
    if let Some(m) = &params.mask {
        inputs.push(("mask", byte_range(m.as_ptr(), m.dtype(), m.layout())));
    }
    inputs
}

impl Problem {
    fn q_shape(&self) -> [(usize, &'static str); 4] {
        [
            (self.batch, "q.shape[0] (batch)"),
            (self.seqlen_q, "q.shape[1] (seqlen_q)"),
            (self.heads_q, "q.shape[2] (heads_q)"),
            (self.head_dim, "q.shape[3] (head_dim)"),
        ]
    }
    fn out_shape(&self) -> [(usize, &'static str); 4] {
        let mut s = self.q_shape();
        s[3] = (self.head_dim_v, "v.shape[3] (head_dim_v)");
        s
    }
    fn kv_shape(&self, head_dim: usize, what: &'static str) -> [(usize, &'static str); 4] {
        [
            (self.batch, "q.shape[0] (batch)"),
            (self.seqlen_kv, "k.shape[1] (seqlen_kv)"),
            (self.heads_kv, "k.shape[2] (heads_kv)"),
            (head_dim, what),
        ]
    }
    fn lse_shape(&self) -> [(usize, &'static str); 3] {
        [
            (self.batch, "q.shape[0] (batch)"),
            (self.heads_q, "q.shape[2] (heads_q)"),
            (self.seqlen_q, "q.shape[1] (seqlen_q)"),
        ]
    }
}

/// Checks every argument of a forward call and returns the problem the backends run.
pub(crate) fn validate_forward(
    q: &TensorView<'_>,
    k: &TensorView<'_>,
    v: &TensorView<'_>,
    out: &TensorViewMut<'_>,
    lse: Option<&TensorViewMut<'_>>,
    params: &AttentionParams<'_>,
) -> Result<Problem> {
    let mut p = validate_inputs(q, k, v, params)?;
    check_tensor("out", out.layout(), out.device(), p.device, &p.out_shape())?;
    check_float("out", out.dtype())?;
    check_no_self_overlap("out", out.layout())?;
    let mut outputs: Ranges<'_> = vec![("out", range_of("out", &out.as_view()).1)];
    if let Some(l) = lse {
        check_tensor("lse", l.layout(), l.device(), p.device, &p.lse_shape())?;
        check_f32("lse", l.dtype())?;
        check_no_self_overlap("lse", l.layout())?;
        outputs.push(("lse", range_of("lse", &l.as_view()).1));
    }
    check_no_alias(&outputs, &input_ranges(q, k, v, params))?;
    p.out = operand(out.as_view().as_ptr(), out.dtype(), out.layout());
    p.lse = lse.map(|l| lse_operand(l.as_view().as_ptr(), l.layout()));
    Ok(p)
}

/// A validated backward problem: the forward's problem (with `out` and `lse` as inputs) plus
/// the incoming gradient and the three outputs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BackwardProblem {
    pub fwd: Problem,
    /// [batch, seqlen_q, heads_q, head_dim_v]
    pub dout: Operand,
    /// [batch, seqlen_q, heads_q, head_dim]
    pub dq: Operand,
    /// [batch, seqlen_kv, heads_kv, head_dim]
    pub dk: Operand,
    /// [batch, seqlen_kv, heads_kv, head_dim_v]
    pub dv: Operand,
    /// Bitwise-reproducible results wanted (AttentionParams::deterministic).
    pub deterministic: bool,
}

/// The tensors of a backward call.
pub(crate) struct BackwardArgs<'x, 'a> {
    pub q: &'x TensorView<'a>,
    pub k: &'x TensorView<'a>,
    pub v: &'x TensorView<'a>,
    pub out: &'x TensorView<'a>,
    pub dout: &'x TensorView<'a>,
    pub lse: &'x TensorView<'a>,
    pub dq: &'x TensorViewMut<'a>,
    pub dk: &'x TensorViewMut<'a>,
    pub dv: &'x TensorViewMut<'a>,
}

impl<'x, 'a> BackwardArgs<'x, 'a> {
    pub fn new(
        inputs: &'x crate::grads::BackwardInputs<'a>,
        grads: &'x crate::grads::Gradients<'a>,
    ) -> Self {
        BackwardArgs {
            q: &inputs.q,
            k: &inputs.k,
            v: &inputs.v,
            out: &inputs.out,
            dout: &inputs.dout,
            lse: &inputs.lse,
            dq: &grads.dq,
            dk: &grads.dk,
            dv: &grads.dv,
        }
    }
}

/// Checks every argument of a backward call.
pub(crate) fn validate_backward(
    a: &BackwardArgs<'_, '_>,
    params: &AttentionParams<'_>,
) -> Result<BackwardProblem> {
    let mut p = validate_inputs(a.q, a.k, a.v, params)?;
    for (name, t) in [("out", a.out), ("dout", a.dout)] {
        check_tensor(name, t.layout(), t.device(), p.device, &p.out_shape())?;
        check_float(name, t.dtype())?;
    }
    check_tensor(
        "lse",
        a.lse.layout(),
        a.lse.device(),
        p.device,
        &p.lse_shape(),
    )?;
    check_f32("lse", a.lse.dtype())?;
    let grads = [
        ("dq", a.dq, p.q_shape()),
        ("dk", a.dk, p.kv_shape(p.head_dim, "q.shape[3] (head_dim)")),
        (
            "dv",
            a.dv,
            p.kv_shape(p.head_dim_v, "v.shape[3] (head_dim_v)"),
        ),
    ];
    let mut outputs: Ranges<'_> = Vec::new();
    for (name, t, shape) in &grads {
        check_tensor(name, t.layout(), t.device(), p.device, shape)?;
        check_float(name, t.dtype())?;
        check_no_self_overlap(name, t.layout())?;
        outputs.push((name, range_of(name, &t.as_view()).1));
    }
    let mut inputs = input_ranges(a.q, a.k, a.v, params);
    inputs.push(("out", range_of("out", a.out).1));
    inputs.push(("dout", range_of("dout", a.dout).1));
    inputs.push(("lse", range_of("lse", a.lse).1));
    check_no_alias(&outputs, &inputs)?;
    p.out = operand(a.out.as_ptr(), a.out.dtype(), a.out.layout());
    p.lse = Some(lse_operand(a.lse.as_ptr(), a.lse.layout()));
    let op = |t: &TensorViewMut<'_>| operand(t.as_view().as_ptr(), t.dtype(), t.layout());
    Ok(BackwardProblem {
        fwd: p,
        dout: operand(a.dout.as_ptr(), a.dout.dtype(), a.dout.layout()),
        dq: op(a.dq),
        dk: op(a.dk),
        dv: op(a.dv),
        deterministic: params.deterministic,
    })
}

/// Checks the inputs of a call (everything but the outputs); `out` is left null.
pub(crate) fn validate_inputs(
    q: &TensorView<'_>,
    k: &TensorView<'_>,
    v: &TensorView<'_>,
    params: &AttentionParams<'_>,
) -> Result<Problem> {
    let device = q.device();
    for (name, t) in [("q", q.layout()), ("k", k.layout()), ("v", v.layout())] {
        check_rank(name, t, 4, "[batch, seqlen, heads, head_dim]")?;
    }
    check_device("k", k.device(), device)?;
    check_device("v", v.device(), device)?;

    if !q.dtype().is_float() {
        invalid!("q.dtype={} but must be f16, bf16 or f32", q.dtype());
    }
    for (name, t) in [("k", k), ("v", v)] {
        if t.dtype() != q.dtype() {
            invalid!(
                "{name}.dtype={} but must equal q.dtype={}",
                t.dtype(),
                q.dtype()
            );
        }
    }

    let [batch, seqlen_q, heads_q, head_dim] = dims4(q.shape());
    let [_, seqlen_kv, heads_kv, _] = dims4(k.shape());
    let head_dim_v = v.shape()[3];
    // Batch and sequence lengths may be 0 (crate::empty answers such calls); heads and head
    // dimensions may not: a problem without them has no meaning PyTorch and ufa agree on.
    for (name, value) in [
        ("q.shape[2] (heads_q)", heads_q),
        ("q.shape[3] (head_dim)", head_dim),
        ("k.shape[2] (heads_kv)", heads_kv),
        ("v.shape[3] (head_dim_v)", head_dim_v),
    ] {
        if value == 0 {
            invalid!("{name}=0 but heads and head dimensions must be at least 1");
        }
    }
    check_head_dim("q.shape[3] (head_dim)", head_dim)?;
    check_head_dim("v.shape[3] (head_dim_v)", head_dim_v)?;
    check_dim("k", k.layout(), 0, batch, "q.shape[0] (batch)")?;
    check_dim("k", k.layout(), 3, head_dim, "q.shape[3] (head_dim)")?;
    check_dim("v", v.layout(), 0, batch, "q.shape[0] (batch)")?;
    check_dim("v", v.layout(), 1, seqlen_kv, "k.shape[1] (seqlen_kv)")?;
    check_dim("v", v.layout(), 2, heads_kv, "k.shape[2] (heads_kv)")?;
    if heads_q % heads_kv != 0 {
        invalid!("k.shape[2]={heads_kv} (heads_kv) does not divide q.shape[2]={heads_q} (heads_q)");
    }
    for (name, t) in [("q", q.layout()), ("k", k.layout()), ("v", v.layout())] {
        check_last_contiguous(name, t)?;
    }
    let dims = Dims {
        batch,
        seqlen_q,
        seqlen_kv,
        heads_q,
        heads_kv,
        head_dim,
        head_dim_v,
    };
    let seqs = Sequences {
        alignment: params.causal_alignment,
        ..Sequences::default()
    };
    let [q, k, v] = [q, k, v].map(|t| operand(t.as_ptr(), t.dtype(), t.layout()));
    assemble(device, dims, [q, k, v], seqs, params)
}

/// The sizes of a problem: a dense batch's, or the largest sequence's of a packed batch or cache.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub batch: usize,
    pub seqlen_q: usize,
    pub seqlen_kv: usize,
    pub heads_q: usize,
    pub heads_kv: usize,
    pub head_dim: usize,
    pub head_dim_v: usize,
}

/// What every entry point shares once it has checked and described q, k and v: the scale,
/// softcap, window, ALiBi and mask checks, and the problem (outputs left null).
pub(crate) fn assemble(
    device: Device,
    dims: Dims,
    [q, k, v]: [Operand; 3],
    seqs: Sequences,
    params: &AttentionParams<'_>,
) -> Result<Problem> {
    let Dims {
        batch,
        seqlen_q,
        seqlen_kv,
        heads_q,
        heads_kv,
        head_dim,
        head_dim_v,
    } = dims;
    let scale = params
        .softmax_scale
        .unwrap_or(1.0 / (head_dim as f32).sqrt());
    if !scale.is_finite() {
        invalid!("softmax_scale={scale} must be finite");
    }
    if !(params.softcap.is_finite() && params.softcap >= 0.0) {
        invalid!(
            "softcap={} must be finite and >= 0 (0 disables it)",
            params.softcap
        );
    }
    for (name, w) in [
        ("window_left", params.window_left),
        ("window_right", params.window_right),
    ] {
        if w < -1 {
            invalid!("{name}={w} must be >= 0, or -1 for unbounded");
        }
    }
    let to_opt = |w: i64| (w >= 0).then_some(w as usize);
    let window_left = to_opt(params.window_left);
    let mut window_right = to_opt(params.window_right);
    if params.causal {
        window_right = Some(0);
    }

    let dropout = match params.dropout {
        Some(d) => d.validate()?,
        None => None,
    };
    if dropout.is_some() && batch.saturating_mul(heads_q) > u32::MAX as usize {
        invalid!(
            "dropout with batch·heads_q={batch}·{heads_q} above 2^32 (the generator's \
             counter word)"
        );
    }

    let alibi = match &params.alibi_slopes {
        None => None,
        Some(a) => {
            check_device("alibi_slopes", a.device(), device)?;
            if a.dtype() != DType::F32 {
                invalid!("alibi_slopes.dtype={} but must be f32", a.dtype());
            }
            let l = a.layout();
            let (bs, hs) = match l.shape() {
                [h] if *h == heads_q => (0, l.strides()[0]),
                [b, h] if *b == batch && *h == heads_q => (l.strides()[0], l.strides()[1]),
                s => invalid!(
                    "alibi_slopes.shape={s:?} but must be [heads_q]=[{heads_q}] or \
                     [batch, heads_q]=[{batch}, {heads_q}]"
                ),
            };
            Some(Operand::strided(
                a.as_ptr() as *mut u8,
                DType::F32,
                [bs, hs, 0, 0],
            ))
        }
    };

    let mask = match &params.mask {
        None => None,
        Some(m) => {
            check_device("mask", m.device(), device)?;
            if m.dtype() == DType::I32 {
                invalid!("mask.dtype=i32 but must be bool or a float dtype");
            }
            let full = [batch, heads_q, seqlen_q, seqlen_kv];
            let names = ["batch", "heads_q", "seqlen_q", "seqlen_kv"];
            let l = m.layout();
            let pad = 4 - l.ndim();
            let mut strides = [0usize; 4];
            for d in 0..l.ndim() {
                let (size, want) = (l.shape()[d], full[pad + d]);
                if size != want && size != 1 {
                    invalid!(
                        "mask.shape={:?} does not broadcast to [batch, heads_q, seqlen_q, \
                         seqlen_kv]={full:?}: mask.shape[{d}]={size} must be 1 or {}={want}",
                        l.shape(),
                        names[pad + d]
                    );
                }
                strides[pad + d] = if size == 1 { 0 } else { l.strides()[d] };
            }
            Some(Operand::strided(m.as_ptr() as *mut u8, m.dtype(), strides))
        }
    };

    Ok(Problem {
        device,
        batch,
        seqlen_q,
        seqlen_kv,
        heads_q,
        heads_kv,
        head_dim,
        head_dim_v,
        q,
        k,
        v,
        out: Operand::strided(std::ptr::null_mut(), q.dtype, [0; 4]),
        lse: None,
        scale,
        softcap: params.softcap,
        seqs,
        window_left,
        window_right,
        alibi,
        mask,
        fp32_precision: params.fp32_precision,
        dropout,
    })
}

fn dims4(s: &[usize]) -> [usize; 4] {
    [s[0], s[1], s[2], s[3]]
}

impl From<std::collections::TryReserveError> for Error {
    fn from(e: std::collections::TryReserveError) -> Self {
        Error::new(
            crate::error::ErrorKind::OutOfMemory,
            format!("scratch allocation failed: {e}"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The inverted band is exactly the rows whose forward band meets the keys, for every
    /// key range, alignment and window, with more, as many and fewer queries than keys.
    #[test]
    fn rows_seeing_keys_inverts_visible_keys() {
        let (h, d) = (1, 8);
        for (sq, skv) in [(7, 7), (5, 12), (12, 5)] {
            let (q, k) = (vec![0f32; sq * h * d], vec![0f32; skv * h * d]);
            let q = TensorView::new(&q, &[1, sq, h, d]).unwrap();
            let k = TensorView::new(&k, &[1, skv, h, d]).unwrap();
            let plain = AttentionParams::default();
            let top_left = plain.causal_alignment(crate::CausalAlignment::TopLeft);
            for params in [
                plain,
                plain.causal(true),
                top_left.causal(true),
                plain.window(2, 1),
                plain.window(0, 3),
                top_left.window(3, 0),
            ] {
                let p = validate_inputs(&q, &k, &k, &params).unwrap();
                let seq = p.seq(0);
                for key0 in 0..skv {
                    for key_last in key0..skv {
                        let want: Vec<usize> = (0..sq)
                            .filter(|&i| {
                                let (lo, hi) = p.visible_keys(&seq, i);
                                lo < hi && lo <= key_last && key0 < hi
                            })
                            .collect();
                        let (lo, hi) = p.rows_seeing_keys(&seq, key0, key_last);
                        assert_eq!(
                            (lo..hi).collect::<Vec<_>>(),
                            want,
                            "sq {sq} skv {skv} keys {key0}..={key_last} {params:?}"
                        );
                    }
                }
            }
        }
    }
}
