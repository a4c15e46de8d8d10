//! ufa's test kit: the f64 reference ([`mod@reference`]), random problems, and their comparison
//! with it. Shared by the test suites (a dev-dependency of `ufa`), the bindings' tests and
//! `ufa check`, so every caller judges accuracy the same way. It lives outside the library so
//! that neither its code nor its random number generators are part of what users link.

pub mod reference;

use crate::reference::{
    reference_backward, reference_backward_rounded, reference_forward, ReferenceGrads,
    ReferenceOutput,
};
use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use ufa::{
    AttentionParams, BackwardInputs, CausalAlignment, Context, DType, Fp32Precision, Gradients,
    Result, TensorView, TensorViewMut,
};

mod nonfinite;
mod sequences;
pub use nonfinite::{
    check_nonfinite, check_nonfinite_cuda, check_nonfinite_with, nonfinite_cases, NonFiniteCase,
    NonFiniteReport, Plant, Site,
};
pub use sequences::cuda::{
    check_kvcache_cuda, check_merge_cuda, check_varlen_cuda, check_varlen_grads_cuda,
};
pub use sequences::{
    check_kvcache, check_merge, check_varlen, check_varlen_grads, kvcache_cases, merge_cases,
    varlen_cases, varlen_grad_cases, Features, KvCacheCase, KvCacheInstance, MergeCase,
    MergeInstance, VarlenCase, VarlenInstance,
};

/// How a tensor sits in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Row-major `[batch, seq, heads, dim]`.
    Contiguous,
    /// Stored `[batch, heads, seq, dim]` (PyTorch's layout) and viewed permuted.
    HeadsFirst,
    /// Every row padded by a few elements and the view sliced (`x[..., :dim]`).
    Padded,
}

/// Where ALiBi slopes come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alibi {
    PerHead,
    PerBatchHead,
}

/// An optional mask: dtype (Bool, or a float for additive) and which of
/// [batch, heads_q, seqlen_q, seqlen_kv] it spans (false = broadcast size 1), with `ndim`
/// trailing dims kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaskSpec {
    pub dtype: DType,
    pub full: [bool; 4],
    pub ndim: usize,
}

/// One attention problem, fully described (inputs are drawn from `seed`).
#[derive(Clone, Debug)]
pub struct Case {
    pub batch: usize,
    pub seqlen_q: usize,
    pub seqlen_kv: usize,
    pub heads_q: usize,
    pub heads_kv: usize,
    pub head_dim: usize,
    pub head_dim_v: usize,
    pub dtype: DType,
    pub out_dtype: DType,
    pub causal: bool,
    pub alignment: CausalAlignment,
    pub window: (i64, i64),
    pub softcap: f32,
    pub scale: Option<f32>,
    pub alibi: Option<Alibi>,
    pub mask: Option<MaskSpec>,
    /// Placement of q, k, v and out.
    pub placement: [Placement; 4],
    pub with_lse: bool,
    /// AttentionParams::deterministic (only the CUDA backward reads it).
    pub deterministic: bool,
    /// AttentionParams::fp32_precision (fp32 on CUDA tensor cores reads it).
    pub fp32_precision: Fp32Precision,
    /// AttentionParams::dropout: the reference drops exactly what the backends drop.
    pub dropout: Option<ufa::Dropout>,
}

/// A test case that can say what it is in one line (tables and failure messages).
pub trait Described {
    fn describe(&self) -> String;
}

impl Described for Case {
    fn describe(&self) -> String {
        Case::describe(self)
    }
}

impl Case {
    /// A plain problem: contiguous, no masking, output in the input dtype.
    pub fn new(
        batch: usize,
        seqlen_q: usize,
        seqlen_kv: usize,
        heads: usize,
        head_dim: usize,
        dtype: DType,
    ) -> Case {
        Case {
            batch,
            seqlen_q,
            seqlen_kv,
            heads_q: heads,
            heads_kv: heads,
            head_dim,
            head_dim_v: head_dim,
            dtype,
            out_dtype: dtype,
            causal: false,
            alignment: CausalAlignment::BottomRight,
            window: (-1, -1),
            softcap: 0.0,
            scale: None,
            alibi: None,
            mask: None,
            placement: [Placement::Contiguous; 4],
            with_lse: true,
            deterministic: false,
            fp32_precision: Fp32Precision::Ieee,
            dropout: None,
        }
    }

    /// A short description for tables and failure messages.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "b{} sq{} skv{} h{}/{} d{}",
            self.batch, self.seqlen_q, self.seqlen_kv, self.heads_q, self.heads_kv, self.head_dim
        );
        if self.head_dim_v != self.head_dim {
            s += &format!(" dv{}", self.head_dim_v);
        }
        s += &format!(" {}", self.dtype);
        if self.out_dtype != self.dtype {
            s += &format!("->{}", self.out_dtype);
        }
        s += &describe_scores(
            self.causal,
            self.alignment,
            self.window,
            self.softcap,
            self.alibi,
        );
        if let Some(m) = self.mask {
            let dims: String = m.full[4 - m.ndim..]
                .iter()
                .map(|&f| if f { 'F' } else { '1' })
                .collect();
            s += &format!(" mask-{}[{dims}]", m.dtype);
        }
        if self.placement.iter().any(|&p| p != Placement::Contiguous) {
            s += " strided";
        }
        if self.deterministic {
            s += " det";
        }
        if let Some(d) = self.dropout {
            s += &format!(" drop{}@{}+{}", d.p, d.seed, d.offset);
        }
        if self.fp32_precision == Fp32Precision::Tf32 && self.dtype == DType::F32 {
            s += " tf32";
        }
        s
    }

    /// The error bound for this case's gradients: as for the output (the backward reads the
    /// forward's output in the input dtype, as FlashAttention does).
    pub fn grad_tolerance(&self) -> f64 {
        self.tolerance()
    }

    /// The error bound for this case's output ([`tolerance`]).
    pub fn tolerance(&self) -> f64 {
        let dtype = if self.out_dtype == DType::F32 {
            self.dtype
        } else {
            self.out_dtype
        };
        tolerance(dtype, self.fp32_precision)
    }
}

/// The error bound (relative RMS against the f64 reference) of outputs computed from inputs
/// of `dtype` (DESIGN.md): fp32 well under 1e-5, the 16-bit types 1e-2, and fp32 in the TF32
/// mode [`TF32_TOLERANCE`].
pub fn tolerance(dtype: DType, precision: Fp32Precision) -> f64 {
    match (dtype, precision) {
        (DType::F32, Fp32Precision::Ieee) => 1e-5,
        (DType::F32, Fp32Precision::Tf32) => TF32_TOLERANCE,
        _ => 1e-2,
    }
}

/// The documented bound of Fp32Precision::Tf32: operands rounded to 11 significant bits
/// (2^-12 relative, as fp16 inputs are) in both products, with the output kept in fp32 (the
/// 16-bit types' 1e-2 also covers rounding the output and P to 16 bits).
pub const TF32_TOLERANCE: f64 = 2e-3;

/// Owned storage of one tensor.
pub(crate) enum Storage {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    Bool(Vec<bool>),
    I32(Vec<i32>),
}

impl Storage {
    fn random(
        dtype: DType,
        n: usize,
        rng: &mut ChaCha8Rng,
        gen: &mut dyn FnMut(&mut ChaCha8Rng) -> f32,
    ) -> Storage {
        match dtype {
            DType::F32 => Storage::F32((0..n).map(|_| gen(rng)).collect()),
            DType::F16 => Storage::F16((0..n).map(|_| f16::from_f32(gen(rng))).collect()),
            DType::BF16 => Storage::BF16((0..n).map(|_| bf16::from_f32(gen(rng))).collect()),
            DType::Bool => Storage::Bool((0..n).map(|_| gen(rng) != 0.0).collect()),
            DType::I32 => unreachable!("test tensors are float or bool"),
        }
    }

    fn poisoned(dtype: DType, n: usize) -> Storage {
        match dtype {
            DType::F32 => Storage::F32(vec![f32::NAN; n]),
            DType::F16 => Storage::F16(vec![f16::NAN; n]),
            DType::BF16 => Storage::BF16(vec![bf16::NAN; n]),
            DType::Bool => Storage::Bool(vec![false; n]),
            DType::I32 => unreachable!("test tensors are float or bool"),
        }
    }

    fn view(&self, shape: &[usize], strides: &[usize]) -> Result<TensorView<'_>> {
        match self {
            Storage::F32(v) => TensorView::with_strides(v, shape, strides),
            Storage::F16(v) => TensorView::with_strides(v, shape, strides),
            Storage::BF16(v) => TensorView::with_strides(v, shape, strides),
            Storage::Bool(v) => TensorView::with_strides(v, shape, strides),
            Storage::I32(v) => TensorView::with_strides(v, shape, strides),
        }
    }

    fn view_mut(&mut self, shape: &[usize], strides: &[usize]) -> Result<TensorViewMut<'_>> {
        match self {
            Storage::F32(v) => TensorViewMut::with_strides(v, shape, strides),
            Storage::F16(v) => TensorViewMut::with_strides(v, shape, strides),
            Storage::BF16(v) => TensorViewMut::with_strides(v, shape, strides),
            Storage::Bool(v) => TensorViewMut::with_strides(v, shape, strides),
            Storage::I32(v) => TensorViewMut::with_strides(v, shape, strides),
        }
    }

    /// Sets element `i` (of a float tensor) to `x`, rounded to the dtype.
    pub(crate) fn set(&mut self, i: usize, x: f32) {
        match self {
            Storage::F32(v) => v[i] = x,
            Storage::F16(v) => v[i] = f16::from_f32(x),
            Storage::BF16(v) => v[i] = bf16::from_f32(x),
            Storage::Bool(_) | Storage::I32(_) => unreachable!("values are set in float tensors"),
        }
    }

    fn get(&self, i: usize) -> f64 {
        match self {
            Storage::F32(v) => v[i] as f64,
            Storage::F16(v) => v[i].to_f64(),
            Storage::BF16(v) => v[i].to_f64(),
            Storage::Bool(v) => v[i] as u8 as f64,
            Storage::I32(v) => v[i] as f64,
        }
    }
}

/// A tensor with its storage and strided view geometry.
pub(crate) struct Tensor {
    storage: Storage,
    shape: Vec<usize>,
    strides: Vec<usize>,
}

/// Memory size and strides of a [b, s, h, d] tensor stored with `placement`.
fn geometry(shape: [usize; 4], placement: Placement) -> (usize, Vec<usize>) {
    let [b, s, h, d] = shape;
    match placement {
        Placement::Contiguous => (b * s * h * d, vec![s * h * d, h * d, d, 1]),
        Placement::HeadsFirst => (b * h * s * d, vec![h * s * d, d, s * d, 1]),
        Placement::Padded => {
            let dp = d + 3;
            (b * s * h * dp, vec![s * h * dp, h * dp, dp, 1])
        }
    }
}

impl Tensor {
    fn random4(
        shape: [usize; 4],
        placement: Placement,
        dtype: DType,
        rng: &mut ChaCha8Rng,
        amp: f32,
    ) -> Tensor {
        let (n, strides) = geometry(shape, placement);
        Tensor {
            storage: Storage::random(dtype, n, rng, &mut |r| r.gen_range(-amp..amp)),
            shape: shape.to_vec(),
            strides,
        }
    }

    fn poisoned4(shape: [usize; 4], placement: Placement, dtype: DType) -> Tensor {
        let (n, strides) = geometry(shape, placement);
        Tensor {
            storage: Storage::poisoned(dtype, n),
            shape: shape.to_vec(),
            strides,
        }
    }

    fn view(&self) -> Result<TensorView<'_>> {
        self.storage.view(&self.shape, &self.strides)
    }

    fn view_mut(&mut self) -> Result<TensorViewMut<'_>> {
        self.storage.view_mut(&self.shape, &self.strides)
    }

    /// Element at a logical index.
    fn at(&self, idx: &[usize]) -> f64 {
        self.storage
            .get(idx.iter().zip(&self.strides).map(|(i, s)| i * s).sum())
    }
}

/// Inputs and (poisoned) outputs of a case.
pub struct Instance {
    pub case: Case,
    pub seed: u64,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Option<Tensor>,
    alibi: Option<Tensor>,
    mask: Option<Tensor>,
    grads: Option<GradTensors>,
}

/// The backward pass's extra tensors: the incoming gradient and the (poisoned) outputs.
struct GradTensors {
    dout: Tensor,
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
}

impl Instance {
    /// Draws the inputs of `case` from `seed`; outputs are filled with NaN.
    pub fn new(case: &Case, seed: u64) -> Instance {
        let c = case;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let q = Tensor::random4(
            [c.batch, c.seqlen_q, c.heads_q, c.head_dim],
            c.placement[0],
            c.dtype,
            &mut rng,
            1.5,
        );
        let k = Tensor::random4(
            [c.batch, c.seqlen_kv, c.heads_kv, c.head_dim],
            c.placement[1],
            c.dtype,
            &mut rng,
            1.5,
        );
        let v = Tensor::random4(
            [c.batch, c.seqlen_kv, c.heads_kv, c.head_dim_v],
            c.placement[2],
            c.dtype,
            &mut rng,
            1.0,
        );
        let out = Tensor::poisoned4(
            [c.batch, c.seqlen_q, c.heads_q, c.head_dim_v],
            c.placement[3],
            c.out_dtype,
        );
        let lse = c.with_lse.then(|| {
            let shape = vec![c.batch, c.heads_q, c.seqlen_q];
            Tensor {
                storage: Storage::poisoned(DType::F32, c.batch * c.heads_q * c.seqlen_q),
                strides: vec![c.heads_q * c.seqlen_q, c.seqlen_q, 1],
                shape,
            }
        });
        let alibi = c.alibi.map(|a| {
            let shape = match a {
                Alibi::PerHead => vec![c.heads_q],
                Alibi::PerBatchHead => vec![c.batch, c.heads_q],
            };
            let n = shape.iter().product();
            let strides = if shape.len() == 1 {
                vec![1]
            } else {
                vec![c.heads_q, 1]
            };
            Tensor {
                storage: Storage::random(DType::F32, n, &mut rng, &mut |r| r.gen_range(0.01..0.5)),
                shape,
                strides,
            }
        });
        let mask = c.mask.map(|m| {
            let full = [c.batch, c.heads_q, c.seqlen_q, c.seqlen_kv];
            let shape: Vec<usize> = (4 - m.ndim..4)
                .map(|d| if m.full[d] { full[d] } else { 1 })
                .collect();
            let mut strides = vec![0; shape.len()];
            let mut acc = 1;
            for d in (0..shape.len()).rev() {
                strides[d] = acc;
                acc *= shape[d];
            }
            let mut gen = |r: &mut ChaCha8Rng| -> f32 {
                let u: f32 = r.gen();
                match m.dtype {
                    DType::Bool => (u < 0.8) as u8 as f32,
                    _ if u < 0.05 => f32::NEG_INFINITY,
                    _ => r.gen_range(-2.0..2.0),
                }
            };
            Tensor {
                storage: Storage::random(m.dtype, acc, &mut rng, &mut gen),
                shape,
                strides,
            }
        });
        Instance {
            case: case.clone(),
            seed,
            q,
            k,
            v,
            out,
            lse,
            alibi,
            mask,
            grads: None,
        }
    }

    fn params(&self) -> Result<AttentionParams<'_>> {
        params_of(&self.case, self.alibi.as_ref(), self.mask.as_ref())
    }
}

/// The score features as a case description prints them (" causal-tl", " win(8, 0)",
/// " cap20", " alibi-bh"), shared by every kind of case.
pub(crate) fn describe_scores(
    causal: bool,
    alignment: CausalAlignment,
    window: (i64, i64),
    softcap: f32,
    alibi: Option<Alibi>,
) -> String {
    let mut s = String::new();
    if causal {
        s += if alignment == CausalAlignment::TopLeft {
            " causal-tl"
        } else {
            " causal"
        };
    }
    if window != (-1, -1) {
        s += &format!(" win{window:?}");
    }
    if softcap > 0.0 {
        s += &format!(" cap{softcap}");
    }
    if let Some(a) = alibi {
        s += if a == Alibi::PerHead {
            " alibi"
        } else {
            " alibi-bh"
        };
    }
    s
}

fn params_of<'a>(
    c: &Case,
    alibi: Option<&'a Tensor>,
    mask: Option<&'a Tensor>,
) -> Result<AttentionParams<'a>> {
    let mut p = AttentionParams::default()
        .causal(c.causal)
        .causal_alignment(c.alignment)
        .window(c.window.0, c.window.1)
        .softcap(c.softcap)
        .deterministic(c.deterministic)
        .fp32_precision(c.fp32_precision);
    p.softmax_scale = c.scale;
    p.dropout = c.dropout;
    if let Some(a) = alibi {
        p = p.alibi_slopes(a.view()?);
    }
    if let Some(m) = mask {
        p = p.mask(m.view()?);
    }
    Ok(p)
}

impl Instance {
    /// Runs the case on `ctx`.
    pub fn run(&mut self, ctx: &Context) -> Result<()> {
        let params = params_of(&self.case, self.alibi.as_ref(), self.mask.as_ref())?;
        let (q, k, v) = (self.q.view()?, self.k.view()?, self.v.view()?);
        let mut out = self
            .out
            .storage
            .view_mut(&self.out.shape, &self.out.strides)?;
        let mut lse = match &mut self.lse {
            Some(l) => Some(l.view_mut()?),
            None => None,
        };
        ctx.forward_with_lse(&q, &k, &v, &mut out, lse.as_mut(), &params)
    }

    /// The f64 reference for this case.
    pub fn reference(&self) -> Result<ReferenceOutput> {
        reference_forward(
            &self.q.view()?,
            &self.k.view()?,
            &self.v.view()?,
            &self.params()?,
        )
    }

    /// Compares the outputs with `reference`.
    pub fn compare(&self, reference: &ReferenceOutput) -> Comparison {
        let c = &self.case;
        let (mut diff, mut norm) = (0.0, 0.0);
        let mut unwritten = 0usize;
        let mut i = 0;
        for b in 0..c.batch {
            for s in 0..c.seqlen_q {
                for h in 0..c.heads_q {
                    for e in 0..c.head_dim_v {
                        let got = self.out.at(&[b, s, h, e]);
                        let want = reference.out[i];
                        i += 1;
                        if got.is_nan() {
                            unwritten += 1;
                        }
                        diff += (got - want) * (got - want);
                        norm += want * want;
                    }
                }
            }
        }
        let out_error = rel(diff, norm, reference.out.len());
        let lse_error = self.lse.as_ref().map(|l| {
            let (mut diff, mut norm) = (0.0, 0.0);
            let mut i = 0;
            for b in 0..c.batch {
                for h in 0..c.heads_q {
                    for s in 0..c.seqlen_q {
                        let got = l.at(&[b, h, s]);
                        let want = reference.lse[i];
                        i += 1;
                        if want == f64::NEG_INFINITY {
                            if got != f64::NEG_INFINITY {
                                return f64::INFINITY;
                            }
                            continue;
                        }
                        diff += (got - want) * (got - want);
                        norm += want * want;
                    }
                }
            }
            rel(diff, norm, reference.lse.len())
        });
        Comparison {
            out_error,
            lse_error,
            unwritten,
            strays: 0,
            tolerance: c.tolerance(),
            lse_tolerance: lse_tolerance(c.dtype, c.fp32_precision),
        }
    }

    /// Makes V the identity (V[b, j, h, c] = 1 if j = c, else 0; needs seqlen_kv <= head_dim_v),
    /// so that the output's row i is the probabilities (after dropout) of row i: P[i, c] in
    /// column c, exactly 0 where a probability was dropped.
    pub fn set_v_identity(&mut self) {
        let c = &self.case;
        assert!(
            c.seqlen_kv <= c.head_dim_v,
            "V as the identity needs seqlen_kv <= head_dim_v"
        );
        for b in 0..c.batch {
            for j in 0..c.seqlen_kv {
                for h in 0..c.heads_kv {
                    for e in 0..c.head_dim_v {
                        let at: usize = [b, j, h, e]
                            .iter()
                            .zip(&self.v.strides)
                            .map(|(i, s)| i * s)
                            .sum();
                        self.v.storage.set(at, if e == j { 1.0 } else { 0.0 });
                    }
                }
            }
        }
    }

    /// Copies of the output as f64 in logical [b, s, h, d] order, and of the LSE.
    pub fn outputs(&self) -> (Vec<f64>, Option<Vec<f64>>) {
        let c = &self.case;
        let mut out = Vec::with_capacity(c.batch * c.seqlen_q * c.heads_q * c.head_dim_v);
        for b in 0..c.batch {
            for s in 0..c.seqlen_q {
                for h in 0..c.heads_q {
                    for e in 0..c.head_dim_v {
                        out.push(self.out.at(&[b, s, h, e]));
                    }
                }
            }
        }
        let lse = self.lse.as_ref().map(|l| {
            (0..c.batch * c.heads_q * c.seqlen_q)
                .map(|i| l.storage.get(i))
                .collect()
        });
        (out, lse)
    }
}

impl Instance {
    /// Runs the backward pass on `ctx` after the forward (which must have produced the LSE):
    /// dO is drawn from the instance's seed, the gradients start as NaN.
    pub fn run_backward(&mut self, ctx: &Context) -> Result<()> {
        self.grad_tensors();
        let grads = self.grads.as_mut().expect("created above");
        let lse = self
            .lse
            .as_ref()
            .ok_or_else(|| ufa::Error::invalid("run_backward needs a case with_lse"))?;
        let params = params_of(&self.case, self.alibi.as_ref(), self.mask.as_ref())?;
        let inputs = BackwardInputs {
            q: self.q.view()?,
            k: self.k.view()?,
            v: self.v.view()?,
            out: self.out.view()?,
            dout: grads.dout.view()?,
            lse: lse.view()?,
        };
        let mut out = Gradients {
            dq: grads
                .dq
                .storage
                .view_mut(&grads.dq.shape, &grads.dq.strides)?,
            dk: grads
                .dk
                .storage
                .view_mut(&grads.dk.shape, &grads.dk.strides)?,
            dv: grads
                .dv
                .storage
                .view_mut(&grads.dv.shape, &grads.dv.strides)?,
        };
        ctx.backward(&inputs, &mut out, &params)
    }

    /// dO (random, from the seed) and the NaN-poisoned gradient tensors, made on first use.
    fn grad_tensors(&mut self) -> &mut GradTensors {
        let c = &self.case;
        let seed = self.seed;
        self.grads.get_or_insert_with(|| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
            GradTensors {
                dout: Tensor::random4(
                    [c.batch, c.seqlen_q, c.heads_q, c.head_dim_v],
                    Placement::Contiguous,
                    c.dtype,
                    &mut rng,
                    1.0,
                ),
                dq: Tensor::poisoned4(
                    [c.batch, c.seqlen_q, c.heads_q, c.head_dim],
                    c.placement[0],
                    c.dtype,
                ),
                dk: Tensor::poisoned4(
                    [c.batch, c.seqlen_kv, c.heads_kv, c.head_dim],
                    c.placement[1],
                    c.dtype,
                ),
                dv: Tensor::poisoned4(
                    [c.batch, c.seqlen_kv, c.heads_kv, c.head_dim_v],
                    c.placement[2],
                    c.dtype,
                ),
            }
        })
    }

    /// The f64 reference gradients for this case and the dO of [`Instance::run_backward`]:
    /// exact, and with a flash backward pass's roundings ([`reference_backward_rounded`]).
    pub fn reference_grads(&self) -> Result<(ReferenceGrads, ReferenceGrads)> {
        let g = self
            .grads
            .as_ref()
            .ok_or_else(|| ufa::Error::invalid("run_backward first"))?;
        let (q, k, v, dout) = (
            self.q.view()?,
            self.k.view()?,
            self.v.view()?,
            g.dout.view()?,
        );
        let params = self.params()?;
        let exact = reference_backward(&q, &k, &v, &dout, None, &params)?;
        let out = self.out.view()?;
        let rounded =
            reference_backward_rounded(&q, &k, &v, &dout, &out, Some(self.case.dtype), &params)?;
        Ok((exact, rounded))
    }

    /// Relative errors of dq, dk and dv against the exact reference. The bound of each is the
    /// case's gradient tolerance, or twice the error that the reference itself makes with a
    /// flash backward pass's roundings (D from the stored output, P and dS rounded to the
    /// 16-bit input type for their products: `reference_backward_rounded`), whichever is
    /// larger: those roundings limit every flash backward pass, and ill-conditioned rows
    /// (peaked softmax, dP ≈ D) amplify them past the tolerance.
    pub fn compare_grads(&self, reference: &(ReferenceGrads, ReferenceGrads)) -> GradComparison {
        let g = self.grads.as_ref().expect("run_backward first");
        let (exact, from_out) = reference;
        let mut errors = [0.0; 3];
        let mut floor = [0.0f64; 3];
        let mut unwritten = 0;
        let grads = [
            (&g.dq, &exact.dq, &from_out.dq),
            (&g.dk, &exact.dk, &from_out.dk),
            (&g.dv, &exact.dv, &from_out.dv),
        ];
        for (n, (t, want, base)) in grads.into_iter().enumerate() {
            let (mut diff, mut norm, mut base_diff) = (0.0, 0.0, 0.0);
            let [d0, d1, d2, d3] = [t.shape[0], t.shape[1], t.shape[2], t.shape[3]];
            let mut i = 0;
            for a in 0..d0 {
                for b in 0..d1 {
                    for c in 0..d2 {
                        for e in 0..d3 {
                            let got = t.at(&[a, b, c, e]);
                            unwritten += got.is_nan() as usize;
                            diff += (got - want[i]) * (got - want[i]);
                            base_diff += (base[i] - want[i]) * (base[i] - want[i]);
                            norm += want[i] * want[i];
                            i += 1;
                        }
                    }
                }
            }
            errors[n] = rel(diff, norm, want.len());
            floor[n] = 2.0 * rel(base_diff, norm, want.len());
        }
        let tol = self.case.grad_tolerance();
        GradComparison {
            dq: errors[0],
            dk: errors[1],
            dv: errors[2],
            unwritten,
            tolerance: [tol.max(floor[0]), tol.max(floor[1]), tol.max(floor[2])],
        }
    }

    /// The gradients as f64 in logical order (for bitwise comparisons between runs).
    pub fn grads(&self) -> Option<[Vec<f64>; 3]> {
        self.grads.as_ref().map(|g| {
            [&g.dq, &g.dk, &g.dv].map(|t| {
                let [d0, d1, d2, d3] = [t.shape[0], t.shape[1], t.shape[2], t.shape[3]];
                let mut v = Vec::with_capacity(d0 * d1 * d2 * d3);
                for a in 0..d0 {
                    for b in 0..d1 {
                        for c in 0..d2 {
                            for e in 0..d3 {
                                v.push(t.at(&[a, b, c, e]));
                            }
                        }
                    }
                }
                v
            })
        })
    }
}

/// Errors of one backward run against the reference.
#[derive(Clone, Copy, Debug)]
pub struct GradComparison {
    pub dq: f64,
    pub dk: f64,
    pub dv: f64,
    /// Gradient elements still holding the NaN poison.
    pub unwritten: usize,
    /// Bounds for dq, dk and dv (see [`Instance::compare_grads`]).
    pub tolerance: [f64; 3],
}

impl GradComparison {
    pub fn passed(&self) -> bool {
        self.unwritten == 0
            && [self.dq, self.dk, self.dv]
                .iter()
                .zip(self.tolerance)
                .all(|(&e, t)| e <= t)
    }

    /// One line: the three errors, their bounds and the unwritten count.
    pub fn summary(&self) -> String {
        format!(
            "dq {:.2e} dk {:.2e} dv {:.2e} (bounds {:.0e} {:.0e} {:.0e}) unwritten {}",
            self.dq,
            self.dk,
            self.dv,
            self.tolerance[0],
            self.tolerance[1],
            self.tolerance[2],
            self.unwritten
        )
    }
}

/// Runs forward and backward of `case` (with the LSE) and compares the gradients.
pub fn check_grads(ctx: &Context, case: &Case, seed: u64) -> Result<GradComparison> {
    let mut case = case.clone();
    case.with_lse = true;
    let mut inst = Instance::new(&case, seed);
    inst.run(ctx)?;
    inst.run_backward(ctx)?;
    Ok(inst.compare_grads(&inst.reference_grads()?))
}

/// ||a - b|| / ||b|| from the squared sums, or the root-mean-square error when the reference is
/// all zeros (a gradient that cancels exactly, e.g. every row seeing a single key): there is no
/// scale to be relative to, and the inputs are of unit size. NaN stays NaN.
pub(crate) fn rel(diff: f64, norm: f64, count: usize) -> f64 {
    if norm > 0.0 {
        (diff / norm).sqrt()
    } else {
        (diff / count.max(1) as f64).sqrt()
    }
}

/// Errors of one run against the reference.
#[derive(Clone, Copy, Debug)]
pub struct Comparison {
    pub out_error: f64,
    pub lse_error: Option<f64>,
    /// Output elements still holding the NaN poison.
    pub unwritten: usize,
    /// Elements the call must not write (rows of a packed batch outside every sequence, a
    /// cache's slots outside the appended ones) that changed.
    pub strays: usize,
    pub tolerance: f64,
    pub lse_tolerance: f64,
}

impl Comparison {
    /// Within tolerance, every element written, no NaN (NaN compares false, so it fails).
    pub fn passed(&self) -> bool {
        self.unwritten == 0
            && self.strays == 0
            && self.out_error <= self.tolerance
            && self.lse_error.is_none_or(|e| e <= self.lse_tolerance)
    }

    /// One line: the output and LSE errors and the unwritten count.
    pub fn summary(&self) -> String {
        let strays = if self.strays > 0 {
            format!(" STRAY WRITES {}", self.strays)
        } else {
            String::new()
        };
        format!(
            "err {:.2e} lse {:.2e} unwritten {}{strays}",
            self.out_error,
            self.lse_error.unwrap_or(0.0),
            self.unwritten
        )
    }
}

/// The LSE is always fp32 computed from fp32 scores, whatever the input dtype...
pub const LSE_TOLERANCE: f64 = 1e-5;

/// ...except in the TF32 mode, whose scores come from operands rounded to 11 significant bits:
/// the LSE (about log(seqlen_kv) plus the largest score) moves by the probability-weighted
/// score error, a few 1e-4 absolute for unit-scale scores, so about 1e-4 relative or less.
pub const TF32_LSE_TOLERANCE: f64 = 2e-4;

/// The LSE's error bound for inputs of `dtype` in `precision`.
pub fn lse_tolerance(dtype: DType, precision: Fp32Precision) -> f64 {
    if dtype == DType::F32 && precision == Fp32Precision::Tf32 {
        TF32_LSE_TOLERANCE
    } else {
        LSE_TOLERANCE
    }
}

/// Environment variable that fixes the seed of [`seed`] (to replay a failure).
pub const SEED_ENV: &str = "UFA_TEST_SEED";

/// A seed for random inputs: `$UFA_TEST_SEED` if set, else fresh from the clock. Callers print
/// it so that a failure can be replayed.
pub fn seed() -> u64 {
    std::env::var(SEED_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        })
}

/// Runs `check` on every case with `ctx` (seed: `seed` plus the case's index), printing one
/// line each (`label`, the case, `summary`); returns a line for every case that failed
/// `passed` or returned an error. The loop behind [`run_on_every_isa`] and the GPU suites.
pub fn run_checks<C: Described, R: std::fmt::Debug>(
    ctx: &Context,
    label: &str,
    cases: &[C],
    seed: u64,
    check: &impl Fn(&Context, &C, u64) -> Result<R>,
    passed: &impl Fn(&R) -> bool,
    summary: &impl Fn(&R) -> String,
) -> Vec<String> {
    let mut failed = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let s = seed.wrapping_add(i as u64);
        match check(ctx, c, s) {
            Ok(r) => {
                let ok = passed(&r);
                let tag = if ok { "ok  " } else { "FAIL" };
                println!("{tag} {label}{:<64} {}", c.describe(), summary(&r));
                if !ok {
                    failed.push(format!("{label}{} (seed {s}): {r:?}", c.describe()));
                }
            }
            Err(e) => {
                println!("ERR  {label}{:<64} {e}", c.describe());
                failed.push(format!("{label}{} (seed {s}): {e}", c.describe()));
            }
        }
    }
    failed
}

/// [`run_checks`] with a two-thread context for every CPU kernel family this machine runs
/// (seed: `$UFA_TEST_SEED` or fresh, printed); panics listing every failure.
pub fn run_on_every_isa<C: Described, R: std::fmt::Debug>(
    cases: &[C],
    check: impl Fn(&Context, &C, u64) -> Result<R>,
    passed: impl Fn(&R) -> bool,
    summary: impl Fn(&R) -> String,
) {
    let seed = seed();
    println!("seed {seed} (replay with {SEED_ENV}={seed})");
    let mut failed = Vec::new();
    for isa in ufa::Isa::ALL.into_iter().filter(|i| i.is_supported()) {
        let ctx = Context::builder()
            .cpu_isa(isa)
            .num_threads(2)
            .build()
            .expect("a context");
        let label = format!("{isa:>9} ");
        failed.extend(run_checks(
            &ctx, &label, cases, seed, &check, &passed, &summary,
        ));
    }
    assert!(failed.is_empty(), "seed {seed}: {failed:#?}");
}

/// Runs `case` with inputs from `seed` and compares it with the reference.
pub fn check_case(ctx: &Context, case: &Case, seed: u64) -> Result<Comparison> {
    let mut inst = Instance::new(case, seed);
    inst.run(ctx)?;
    Ok(inst.compare(&inst.reference()?))
}

/// The spread of problems `ufa check` runs: every feature, odd sizes, each dtype.
pub fn standard_cases() -> Vec<Case> {
    use DType::*;
    let mut cases = Vec::new();
    for dtype in [F32, BF16, F16] {
        cases.push(Case::new(1, 1, 1, 1, 1, dtype));
        cases.push(Case::new(2, 17, 129, 4, 64, dtype));
        let mut c = Case::new(1, 129, 1000, 8, 128, dtype);
        c.heads_kv = 2;
        c.causal = true;
        cases.push(c);
    }
    let mut c = Case::new(1, 1000, 17, 8, 96, BF16);
    c.heads_kv = 1;
    c.causal = true;
    cases.push(c);
    let mut c = Case::new(2, 200, 300, 4, 80, F32);
    c.window = (32, 8);
    cases.push(c);
    let mut c = Case::new(1, 64, 96, 2, 160, F16);
    c.softcap = 30.0;
    c.alibi = Some(Alibi::PerHead);
    cases.push(c);
    let mut c = Case::new(2, 33, 70, 4, 192, BF16);
    c.alibi = Some(Alibi::PerBatchHead);
    c.causal = true;
    c.alignment = CausalAlignment::TopLeft;
    cases.push(c);
    let mut c = Case::new(2, 45, 77, 4, 32, F32);
    c.mask = Some(MaskSpec {
        dtype: Bool,
        full: [true, false, true, true],
        ndim: 4,
    });
    cases.push(c);
    let mut c = Case::new(1, 50, 61, 4, 256, BF16);
    c.mask = Some(MaskSpec {
        dtype: F32,
        full: [false, true, true, true],
        ndim: 3,
    });
    c.placement = [
        Placement::HeadsFirst,
        Placement::Padded,
        Placement::HeadsFirst,
        Placement::Padded,
    ];
    cases.push(c);
    let mut c = Case::new(1, 1, 4096, 32, 128, BF16);
    c.heads_kv = 8;
    cases.push(c);
    let mut c = Case::new(2, 1, 3000, 16, 128, F32);
    c.alibi = Some(Alibi::PerHead);
    cases.push(c);
    let mut c = Case::new(1, 31, 47, 2, 512, F32);
    c.head_dim_v = 48;
    c.out_dtype = BF16;
    cases.push(c);
    cases
}

/// The same cases on a CUDA device: inputs are uploaded, outputs (poisoned on the host first,
/// so the poison travels) downloaded and compared exactly as on the CPU.
pub mod cuda {
    use super::{
        params_of, Case, Comparison, GradComparison, GradTensors, Instance, Storage, Tensor,
    };
    pub(crate) use ufa::internals::synchronize;
    pub use ufa::internals::{
        compile_all_variants, compile_variants, nvrtc_version, CompileReport, ModuleReport,
        CACHE_DIR_ENV, NVRTC_PATH_ENV,
    };
    use ufa::internals::{time_ms, DeviceBuffer};
    use ufa::{
        AttentionParams, BackwardInputs, Context, Device, Gradients, Result, TensorView,
        TensorViewMut,
    };

    fn bytes(s: &Storage) -> &[u8] {
        fn raw<T>(v: &[T]) -> &[u8] {
            // SAFETY: plain-old-data elements viewed as their bytes.
            unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
        }
        match s {
            Storage::F32(v) => raw(v),
            Storage::F16(v) => raw(v),
            Storage::BF16(v) => raw(v),
            Storage::Bool(v) => raw(v),
            Storage::I32(v) => raw(v),
        }
    }

    pub(crate) fn bytes_mut(s: &mut Storage) -> &mut [u8] {
        fn raw<T>(v: &mut [T]) -> &mut [u8] {
            // SAFETY: as above; every bit pattern downloaded is a valid f16/bf16/f32.
            unsafe {
                std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, std::mem::size_of_val(v))
            }
        }
        match s {
            Storage::F32(v) => raw(v),
            Storage::F16(v) => raw(v),
            Storage::BF16(v) => raw(v),
            Storage::Bool(v) => raw(v),
            Storage::I32(v) => raw(v),
        }
    }

    /// A tensor's storage copied to the device, with its host geometry.
    pub(crate) struct OnDevice<'t> {
        host: &'t Tensor,
        buf: DeviceBuffer,
        ordinal: u32,
    }

    impl<'t> OnDevice<'t> {
        pub(crate) fn new(host: &'t Tensor, ordinal: u32) -> Result<Self> {
            let data = bytes(&host.storage);
            let buf = DeviceBuffer::new(ordinal, data.len())?;
            buf.upload(data)?;
            Ok(OnDevice { host, buf, ordinal })
        }

        pub(crate) fn view(&self) -> Result<TensorView<'_>> {
            let dt = match self.host.storage {
                Storage::F32(_) => ufa::DType::F32,
                Storage::F16(_) => ufa::DType::F16,
                Storage::BF16(_) => ufa::DType::BF16,
                Storage::Bool(_) => ufa::DType::Bool,
                Storage::I32(_) => ufa::DType::I32,
            };
            // SAFETY: the buffer holds the whole host storage, so every strided index fits.
            unsafe {
                TensorView::from_raw_parts(
                    self.buf.ptr as *const std::ffi::c_void,
                    dt,
                    Device::Cuda(self.ordinal),
                    &self.host.shape,
                    &self.host.strides,
                )
            }
        }

        pub(crate) fn download(&self) -> Result<Vec<u8>> {
            let mut b = vec![0u8; self.buf.bytes];
            self.buf.download(&mut b)?;
            Ok(b)
        }

        pub(crate) fn view_mut(&self) -> Result<TensorViewMut<'_>> {
            let v = self.view()?;
            // SAFETY: as above; the buffer is this test's own.
            unsafe {
                TensorViewMut::from_raw_parts(
                    self.buf.ptr as *mut std::ffi::c_void,
                    v.dtype(),
                    v.device(),
                    v.shape(),
                    v.strides(),
                )
            }
        }
    }

    /// Device copies of an instance's tensors.
    struct DeviceInstance<'i> {
        q: OnDevice<'i>,
        k: OnDevice<'i>,
        v: OnDevice<'i>,
        out: OnDevice<'i>,
        lse: Option<OnDevice<'i>>,
        alibi: Option<OnDevice<'i>>,
        mask: Option<OnDevice<'i>>,
    }

    impl<'i> DeviceInstance<'i> {
        fn new(inst: &'i Instance, ordinal: u32) -> Result<Self> {
            let up = |t: &'i Tensor| OnDevice::new(t, ordinal);
            Ok(DeviceInstance {
                q: up(&inst.q)?,
                k: up(&inst.k)?,
                v: up(&inst.v)?,
                out: up(&inst.out)?,
                lse: inst.lse.as_ref().map(up).transpose()?,
                alibi: inst.alibi.as_ref().map(up).transpose()?,
                mask: inst.mask.as_ref().map(up).transpose()?,
            })
        }

        /// The case's parameters with the device copies of its ALiBi slopes and mask.
        fn params(&self, case: &Case) -> Result<AttentionParams<'_>> {
            let mut params = params_of(case, None, None)?;
            params.alibi_slopes = self.alibi.as_ref().map(|a| a.view()).transpose()?;
            params.mask = self.mask.as_ref().map(|m| m.view()).transpose()?;
            Ok(params)
        }

        /// Queues the forward pass on the legacy default stream.
        fn launch(&self, ctx: &Context, case: &Case) -> Result<()> {
            let params = self.params(case)?;
            let mut out = self.out.view_mut()?;
            let mut lse = self.lse.as_ref().map(|l| l.view_mut()).transpose()?;
            // SAFETY: the null stream; the buffers live until after the synchronisation.
            unsafe {
                ctx.forward_on_stream(
                    &self.q.view()?,
                    &self.k.view()?,
                    &self.v.view()?,
                    &mut out,
                    lse.as_mut(),
                    &params,
                    std::ptr::null_mut(),
                )
            }
        }

        /// Queues the backward pass on the legacy default stream.
        fn launch_backward(&self, ctx: &Context, case: &Case, g: &DeviceGrads<'_>) -> Result<()> {
            let params = self.params(case)?;
            let lse = self
                .lse
                .as_ref()
                .ok_or_else(|| ufa::Error::invalid("the backward needs a case with_lse"))?;
            let inputs = BackwardInputs {
                q: self.q.view()?,
                k: self.k.view()?,
                v: self.v.view()?,
                out: self.out.view()?,
                dout: g.dout.view()?,
                lse: lse.view()?,
            };
            let mut grads = Gradients {
                dq: g.dq.view_mut()?,
                dk: g.dk.view_mut()?,
                dv: g.dv.view_mut()?,
            };
            // SAFETY: as above.
            unsafe { ctx.backward_on_stream(&inputs, &mut grads, &params, std::ptr::null_mut()) }
        }
    }

    /// Device copies of the backward's dO and of its (poisoned) gradient tensors.
    struct DeviceGrads<'g> {
        dout: OnDevice<'g>,
        dq: OnDevice<'g>,
        dk: OnDevice<'g>,
        dv: OnDevice<'g>,
    }

    impl<'g> DeviceGrads<'g> {
        fn new(g: &'g GradTensors, ordinal: u32) -> Result<Self> {
            Ok(DeviceGrads {
                dout: OnDevice::new(&g.dout, ordinal)?,
                dq: OnDevice::new(&g.dq, ordinal)?,
                dk: OnDevice::new(&g.dk, ordinal)?,
                dv: OnDevice::new(&g.dv, ordinal)?,
            })
        }
    }

    impl Instance {
        /// Runs the case on CUDA device `ordinal` and brings the outputs back to the host.
        pub fn run_cuda(&mut self, ctx: &Context, ordinal: u32) -> Result<()> {
            let (out, lse) = {
                let dev = DeviceInstance::new(self, ordinal)?;
                dev.launch(ctx, &self.case)?;
                synchronize(ordinal)?;
                let mut out = vec![0u8; dev.out.buf.bytes];
                dev.out.buf.download(&mut out)?;
                let lse = match &dev.lse {
                    Some(l) => {
                        let mut b = vec![0u8; l.buf.bytes];
                        l.buf.download(&mut b)?;
                        Some(b)
                    }
                    None => None,
                };
                (out, lse)
            };
            bytes_mut(&mut self.out.storage).copy_from_slice(&out);
            if let (Some(l), Some(b)) = (self.lse.as_mut(), lse) {
                bytes_mut(&mut l.storage).copy_from_slice(&b);
            }
            Ok(())
        }

        /// Runs the forward and then the backward on CUDA device `ordinal` and brings the
        /// outputs and gradients back to the host.
        pub fn run_backward_cuda(&mut self, ctx: &Context, ordinal: u32) -> Result<()> {
            self.run_cuda(ctx, ordinal)?;
            self.grad_tensors();
            let grads = {
                let dev = DeviceInstance::new(self, ordinal)?;
                let g = DeviceGrads::new(self.grads.as_ref().expect("made above"), ordinal)?;
                dev.launch_backward(ctx, &self.case, &g)?;
                synchronize(ordinal)?;
                [g.dq.download()?, g.dk.download()?, g.dv.download()?]
            };
            let g = self.grads.as_mut().expect("made above");
            for (t, b) in [&mut g.dq, &mut g.dk, &mut g.dv].into_iter().zip(grads) {
                bytes_mut(&mut t.storage).copy_from_slice(&b);
            }
            Ok(())
        }

        /// Median GPU milliseconds of one forward call over `iters` timed calls (after
        /// `warmup` untimed ones, which also compile or load the kernel).
        pub fn time_cuda(
            &self,
            ctx: &Context,
            ordinal: u32,
            warmup: usize,
            iters: usize,
        ) -> Result<f64> {
            let dev = DeviceInstance::new(self, ordinal)?;
            median_ms(ordinal, warmup, iters, || dev.launch(ctx, &self.case))
        }

        /// As [`Instance::time_cuda`] for the backward call (dQ, dK, dV from the forward's
        /// output and LSE, which run once first).
        pub fn time_cuda_backward(
            &mut self,
            ctx: &Context,
            ordinal: u32,
            warmup: usize,
            iters: usize,
        ) -> Result<f64> {
            self.run_cuda(ctx, ordinal)?;
            self.grad_tensors();
            let dev = DeviceInstance::new(self, ordinal)?;
            let g = DeviceGrads::new(self.grads.as_ref().expect("made above"), ordinal)?;
            median_ms(ordinal, warmup, iters, || {
                dev.launch_backward(ctx, &self.case, &g)
            })
        }
    }

    /// Median milliseconds of `iters` timed calls of `launch` after `warmup` untimed ones.
    pub(crate) fn median_ms(
        ordinal: u32,
        warmup: usize,
        iters: usize,
        mut launch: impl FnMut() -> Result<()>,
    ) -> Result<f64> {
        for _ in 0..warmup {
            launch()?;
        }
        synchronize(ordinal)?;
        let mut times = Vec::with_capacity(iters);
        for _ in 0..iters.max(1) {
            times.push(time_ms(ordinal, &mut launch)? as f64);
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    }

    /// Runs `check` on every case on CUDA device 0 (seed: `$UFA_TEST_SEED` or fresh, plus the
    /// case's index), printing one line each with `summary`; then the kernel modules loaded, and
    /// a panic listing every case that failed `passed` or returned an error. Without a GPU it
    /// says so and returns (see [`gpu_present`]).
    pub fn run_suite<C: super::Described, R: std::fmt::Debug>(
        cases: &[C],
        check: impl Fn(&Context, &C, u64) -> Result<R>,
        passed: impl Fn(&R) -> bool,
        summary: impl Fn(&R) -> String,
    ) {
        let ctx = Context::new().expect("a context");
        if gpu_present(&ctx) {
            run_suite_in(&ctx, cases, check, passed, summary);
        }
    }

    /// [`run_suite`] in a context of the caller's, which has a GPU (so that the caller can then
    /// ask which kernels served the cases: [`loaded_kernels`]).
    pub fn run_suite_in<C: super::Described, R: std::fmt::Debug>(
        ctx: &Context,
        cases: &[C],
        check: impl Fn(&Context, &C, u64) -> Result<R>,
        passed: impl Fn(&R) -> bool,
        summary: impl Fn(&R) -> String,
    ) {
        let seed = super::seed();
        println!("seed {seed} (UFA_TEST_SEED={seed} replays)");
        let failed = super::run_checks(ctx, "", cases, seed, &check, &passed, &summary);
        report_and_assert(ctx, &failed);
    }

    /// The end of a GPU suite: one line per kernel module loaded (compile or cache-load time,
    /// registers, spills), then a panic listing every failed case, if any.
    fn report_and_assert(ctx: &Context, failed: &[String]) {
        for r in ctx.cuda_module_reports() {
            println!(
                "module {:<44} {} compile {:.2}s load {:.1}ms cached {} regs {} spill {}B",
                r.kernel,
                r.arch,
                r.compile_s,
                r.load_s * 1e3,
                r.from_cache,
                r.registers,
                r.spill_bytes
            );
        }
        assert!(
            failed.is_empty(),
            "{} case(s) failed:\n{}",
            failed.len(),
            failed.join("\n")
        );
    }

    /// The kernels `ctx` has loaded, by name: which kernels a call really ran (a test that no
    /// fallback kernel served it).
    pub fn loaded_kernels(ctx: &Context) -> Vec<String> {
        ctx.cuda_module_reports()
            .into_iter()
            .map(|m| m.kernel)
            .collect()
    }

    /// Whether a CUDA device is here (listing them); without one, says so and returns false,
    /// unless `UFA_REQUIRE_GPU=1` (set by scripts/gpu-check), which makes that a panic.
    pub fn gpu_present(ctx: &Context) -> bool {
        match ctx.cuda_devices() {
            Ok(d) if !d.is_empty() => {
                println!("{}", d.join("\n"));
                true
            }
            other => {
                assert!(
                    std::env::var("UFA_REQUIRE_GPU").map_or(true, |v| v != "1"),
                    "UFA_REQUIRE_GPU=1 but no CUDA device: {other:?}"
                );
                println!("no CUDA device ({other:?}); GPU checks skipped");
                false
            }
        }
    }

    /// Runs `case` on CUDA device `ordinal` with inputs from `seed` and compares it with the
    /// f64 reference.
    pub fn check_case_cuda(
        ctx: &Context,
        case: &Case,
        seed: u64,
        ordinal: u32,
    ) -> Result<Comparison> {
        let mut inst = Instance::new(case, seed);
        inst.run_cuda(ctx, ordinal)?;
        Ok(inst.compare(&inst.reference()?))
    }

    /// Runs forward and backward of `case` (with the LSE) on CUDA device `ordinal` and
    /// compares the gradients with the f64 reference, as [`super::check_grads`] does on CPU.
    pub fn check_grads_cuda(
        ctx: &Context,
        case: &Case,
        seed: u64,
        ordinal: u32,
    ) -> Result<GradComparison> {
        let mut case = case.clone();
        case.with_lse = true;
        let mut inst = Instance::new(&case, seed);
        inst.run_backward_cuda(ctx, ordinal)?;
        Ok(inst.compare_grads(&inst.reference_grads()?))
    }
}

/// The GPU suites' tensor-core cases: every head dim the tensor-core kernels are built for,
/// both 16-bit dtypes, GQA/MQA, causal in both alignments with seqlen_q != seqlen_kv, and the
/// score modifiers with a window. `vary_deterministic` (the backward suite) sets deterministic
/// mode on about half of them, alternating by head dim.
pub fn tensor_core_cases(vary_deterministic: bool) -> Vec<Case> {
    let mut cases = Vec::new();
    for dtype in [DType::BF16, DType::F16] {
        cases.extend(tensor_core_cases_of(
            dtype,
            Fp32Precision::Ieee,
            vary_deterministic,
        ));
    }
    cases
}

/// Head dims between the instantiated tensor-core ones (and below the smallest), which CUDA's
/// mma.sync forward runs on the next larger tile with zero padding: 16-bit dims that fill
/// 16-byte pieces (multiples of 8) and fp32 ones (multiples of 4), plain, causal with GQA and
/// with score modifiers over a padded cache-like key count.
pub fn padded_head_dim_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    let dims: [(DType, &[usize]); 3] = [
        (DType::BF16, &[8, 40, 80, 136, 248]),
        (DType::F16, &[16, 48, 72, 112, 200]),
        (DType::F32, &[4, 20, 44, 100, 180]),
    ];
    for (dtype, ds) in dims {
        for (i, &d) in ds.iter().enumerate() {
            let mut c = Case::new(2, 70 + 13 * i, 131 - 9 * i, 4, d, dtype);
            c.heads_kv = [1, 2, 4][i % 3];
            c.causal = i % 2 == 0;
            if i == 3 {
                c.softcap = 15.0;
                c.alibi = Some(Alibi::PerHead);
                c.window = (30, 4);
            }
            cases.push(c);
        }
    }
    cases
}

/// Head dims above 256, which CUDA's mma.sync forward runs on its wide tiles (320, 384, 512:
/// pairs of warps share the rows, each summing half of Q Kᵀ and owning half of O's columns):
/// each tile, one between tiles (264 on 320), unequal pairs (Q/K or V the wider), causal with
/// GQA, every score modifier, dropout, PyTorch's layout, sizes off every tile; 16-bit only.
pub fn wide_head_dim_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for (i, (dtype, d, dv)) in [
        (DType::BF16, 512, 512),
        (DType::F16, 320, 320),
        (DType::BF16, 264, 264),
        (DType::F16, 384, 256),
        (DType::BF16, 128, 512),
        (DType::BF16, 512, 512),
        (DType::F16, 384, 384),
    ]
    .into_iter()
    .enumerate()
    {
        let mut c = Case::new(2, 97 + 31 * i, 203 - 17 * i, 4, d, dtype);
        c.head_dim_v = dv;
        c.heads_kv = [4, 2, 1][i % 3];
        c.causal = i % 2 == 1;
        match i {
            2 => {
                c.softcap = 20.0;
                c.alibi = Some(Alibi::PerHead);
                c.window = (60, 5);
            }
            5 => {
                c.dropout = Some(ufa::Dropout {
                    p: 0.2,
                    seed: 1234,
                    offset: 7,
                })
            }
            6 => c.placement = [Placement::HeadsFirst; 4],
            _ => {}
        }
        cases.push(c);
    }
    cases
}

/// Q/K and V of different head dims (MLA's 192 and 128, the other way round, a padded pair),
/// which CUDA's mma.sync kernels run on the tile of the larger one: plain, causal with GQA,
/// with every score modifier, PyTorch's layout; 16-bit and fp32 in both precisions.
pub fn unequal_head_dim_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for (i, (dtype, d, dv)) in [
        (DType::BF16, 192, 128),
        (DType::F16, 128, 64),
        (DType::BF16, 64, 128),
        (DType::F16, 96, 80),
        (DType::F32, 128, 64),
        (DType::F32, 32, 64),
    ]
    .into_iter()
    .enumerate()
    {
        let mut c = Case::new(2, 131 + 7 * i, 257 - 11 * i, 4, d, dtype);
        c.head_dim_v = dv;
        c.heads_kv = [1, 2, 4][i % 3];
        c.fp32_precision = [Fp32Precision::Ieee, Fp32Precision::Tf32][i % 2];
        cases.push(c.clone());
        c.causal = true;
        cases.push(c.clone());
        let mut m = c.clone();
        m.softcap = 20.0;
        m.alibi = Some(Alibi::PerHead);
        m.window = (40, 9);
        cases.push(m);
        c.placement = [Placement::HeadsFirst; 4];
        cases.push(c);
    }
    cases
}

/// [`tensor_core_cases`] for fp32, which CUDA runs on TF32 tensor cores, in both precisions.
pub fn fp32_tensor_core_cases() -> Vec<Case> {
    let mut cases = tensor_core_cases_of(DType::F32, Fp32Precision::Ieee, false);
    cases.extend(tensor_core_cases_of(DType::F32, Fp32Precision::Tf32, false));
    cases
}

fn tensor_core_cases_of(
    dtype: DType,
    fp32_precision: Fp32Precision,
    vary_deterministic: bool,
) -> Vec<Case> {
    let mut cases = Vec::new();
    for (i, d) in [32, 64, 96, 128, 160, 192, 256].into_iter().enumerate() {
        let mut c = Case::new(2, 129 + 7 * i, 257 - 11 * i, 4, d, dtype);
        c.fp32_precision = fp32_precision;
        c.heads_kv = [1, 2, 4][i % 3];
        c.deterministic = vary_deterministic && i % 2 == 0;
        cases.push(c.clone());
        c.causal = true;
        cases.push(c.clone());
        c.seqlen_q = 300;
        c.seqlen_kv = 77;
        c.deterministic = vary_deterministic && !c.deterministic;
        cases.push(c.clone());
        let mut m = Case::new(1, 70, 150, 4, d, dtype);
        m.fp32_precision = fp32_precision;
        m.softcap = 20.0;
        m.alibi = Some(Alibi::PerHead);
        m.window = (40, 9);
        cases.push(m);
    }
    cases
}

/// Decoding shapes (few query rows per KV head), which CUDA serves with its split-KV kernel:
/// every tensor-core head dim and 16-bit dtype, GQA groups 1 to 16, one to four query rows,
/// odd key counts, split counts from 1 to many (the count follows the key count for a single
/// sequence), splits that see no key (a short window over a long cache), and every score
/// modifier on packed rows of several heads.
pub fn decode_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for (di, dtype) in [DType::BF16, DType::F16].into_iter().enumerate() {
        for (i, d) in [32, 64, 96, 128, 160, 192, 256].into_iter().enumerate() {
            let mut c = Case::new(3, 1, 1000 + 37 * i + di, 16, d, dtype);
            c.heads_kv = [1, 2, 4, 8, 16][(i + di) % 5];
            c.causal = i % 2 == 0;
            cases.push(c.clone());
            // Speculative decoding: 4 rows of a group of 8 (two m-tiles up to head dim 128).
            c.seqlen_q = 4;
            c.seqlen_kv = 513 + i;
            c.heads_kv = 2;
            c.causal = true;
            cases.push(c);
        }
    }
    // One sequence, one KV head: the split count grows with the keys (split boundaries inside
    // and at the end of key tiles).
    for skv in [1, 31, 32, 33, 255, 257, 1024, 4097, 20011] {
        let mut c = Case::new(1, 1, skv, 8, 128, DType::BF16);
        c.heads_kv = 1;
        c.causal = true;
        cases.push(c);
    }
    // Head dims on a larger tile (zero padding): split and single-block, GQA, two query rows.
    for (d, skv, dtype) in [
        (80, 3000, DType::BF16),
        (40, 200, DType::F16),
        (200, 1500, DType::BF16),
    ] {
        let mut c = Case::new(2, 2, skv, 8, d, dtype);
        c.heads_kv = 2;
        c.causal = true;
        cases.push(c);
    }
    // A window of 10 keys over 5000: all but the first split see no key.
    let mut c = Case::new(1, 1, 5000, 4, 64, DType::F16);
    c.heads_kv = 1;
    c.causal = true;
    c.window = (10, 0);
    cases.push(c.clone());
    c.seqlen_q = 3;
    c.window = (100, 2);
    cases.push(c);
    // Score modifiers on packed rows of several heads and query rows.
    for (k, dtype) in [DType::BF16, DType::F16].into_iter().enumerate() {
        let mut c = Case::new(2, 2, 700 + k, 8, 64 * (k + 1), dtype);
        c.heads_kv = 2;
        c.softcap = 15.0;
        c.alibi = Some([Alibi::PerHead, Alibi::PerBatchHead][k]);
        c.causal = true;
        cases.push(c.clone());
        c.softcap = 0.0;
        c.alibi = None;
        c.causal = false;
        c.mask = Some(MaskSpec {
            dtype: [DType::Bool, DType::F32][k],
            full: [true, true, true, true],
            ndim: 4,
        });
        cases.push(c.clone());
        c.mask = None;
        c.scale = Some(-0.3);
        c.placement = [
            Placement::HeadsFirst,
            Placement::HeadsFirst,
            Placement::Padded,
            Placement::Contiguous,
        ];
        cases.push(c);
    }
    cases
}

/// Problems with nothing to compute, answered as PyTorch answers them (zero batch, zero query
/// rows: empty outputs; zero keys: the fully-masked rule; in the backward, zero gradients where
/// no term reaches them), in the layouts and with the features that change which outputs exist
/// or how they are addressed. Outputs start as NaN, so an output left unwritten fails.
pub fn empty_cases() -> Vec<Case> {
    use DType::*;
    let mut cases = Vec::new();
    let sizes = [
        (0, 5, 7),
        (2, 0, 7),
        (2, 5, 0),
        (0, 0, 0),
        (2, 0, 0),
        (3, 1, 0),
    ];
    for (i, &(b, sq, skv)) in sizes.iter().enumerate() {
        for (j, dtype) in [F32, BF16, F16].into_iter().enumerate() {
            let mut c = Case::new(b, sq, skv, 4, 64, dtype);
            c.heads_kv = 2;
            c.head_dim_v = if j == 1 { 32 } else { 64 };
            c.placement = [
                [Placement::Contiguous; 4],
                [Placement::HeadsFirst; 4],
                [Placement::Padded; 4],
            ][(i + j) % 3];
            c.causal = (i + j) % 2 == 0;
            cases.push(c.clone());
            c.mask = Some(MaskSpec {
                dtype: Bool,
                full: [true, false, true, true],
                ndim: 4,
            });
            c.alibi = Some(Alibi::PerBatchHead);
            c.with_lse = j != 2;
            cases.push(c);
        }
    }
    cases
}

/// The GPU suites' spread of features and layouts (forward and backward): MQA/GQA with causal
/// in both alignments and seqlen_q != seqlen_kv, windows, every mask kind, ALiBi, strided views,
/// zero and negative scales, the CUDA-core path's dtypes and head dims, and long sequences
/// where the band skips many tiles.
pub fn feature_cases() -> Vec<Case> {
    use DType::*;
    let mut cases = Vec::new();
    for (sq, skv) in [(1, 1), (1, 1000), (17, 17), (1000, 129), (129, 1000)] {
        let mut c = Case::new(1, sq, skv, 8, 128, BF16);
        c.heads_kv = 1; // MQA
        c.causal = true;
        cases.push(c.clone());
        c.alignment = CausalAlignment::TopLeft;
        c.heads_kv = 2; // GQA 4
        cases.push(c);
    }
    let mut c = Case::new(2, 200, 300, 8, 64, F16);
    c.window = (32, 8);
    cases.push(c.clone());
    c.window = (0, 0);
    cases.push(c.clone());
    c.window = (-1, 5);
    c.causal = false;
    cases.push(c);
    for mask in [
        MaskSpec {
            dtype: Bool,
            full: [true, false, true, true],
            ndim: 4,
        },
        MaskSpec {
            dtype: F32,
            full: [false, true, true, true],
            ndim: 3,
        },
        MaskSpec {
            dtype: BF16,
            full: [false, false, false, true],
            ndim: 1,
        },
        MaskSpec {
            dtype: F16,
            full: [true, true, true, true],
            ndim: 4,
        },
    ] {
        let mut c = Case::new(2, 45, 77, 4, 64, BF16);
        c.mask = Some(mask);
        cases.push(c.clone());
        c.causal = true;
        c.dtype = F16;
        c.out_dtype = F16;
        cases.push(c);
    }
    let mut c = Case::new(2, 33, 70, 4, 128, F16);
    c.alibi = Some(Alibi::PerBatchHead);
    c.causal = true;
    cases.push(c);
    for placement in [Placement::HeadsFirst, Placement::Padded] {
        let mut c = Case::new(2, 100, 130, 4, 128, BF16);
        c.placement = [placement; 4];
        cases.push(c.clone());
        c.placement = [
            Placement::Contiguous,
            placement,
            Placement::HeadsFirst,
            placement,
        ];
        c.causal = true;
        cases.push(c);
    }
    // Zero and negative scales leave the fused-scale fast path.
    for scale in [-0.2, 0.0] {
        let mut c = Case::new(1, 40, 50, 2, 64, BF16);
        c.scale = Some(scale);
        c.causal = true;
        cases.push(c);
    }
    // The CUDA-core path: fp32, head dims off the tensor-core list, mixed output dtype.
    for (d, dv, dtype, out) in [
        (80, 80, F32, F32),
        (48, 48, BF16, BF16),
        (512, 48, F32, BF16),
        (64, 32, F16, F32),
        (128, 128, BF16, F32),
    ] {
        let mut c = Case::new(2, 37, 300, 4, d, dtype);
        c.head_dim_v = dv;
        c.out_dtype = out;
        c.heads_kv = 2;
        c.causal = true;
        c.softcap = 10.0;
        cases.push(c);
    }
    // Long enough that many key tiles are skipped by the causal band, and rows see thousands of keys.
    let mut c = Case::new(1, 2048, 2048, 4, 128, BF16);
    c.causal = true;
    cases.push(c);
    let mut c = Case::new(1, 1024, 4096, 2, 64, F16);
    c.window = (256, 0);
    cases.push(c);
    cases
}

/// The spread of backward problems `ufa check` and the tests run: every feature, odd sizes,
/// each dtype, rows that see nothing.
pub fn standard_grad_cases() -> Vec<Case> {
    use DType::*;
    let mut v = vec![
        Case::new(1, 1, 1, 1, 1, F32),
        Case::new(2, 17, 129, 4, 64, F32),
        Case::new(1, 70, 70, 2, 128, BF16),
    ];
    let mut c = Case::new(2, 129, 65, 8, 80, F32);
    c.heads_kv = 2;
    c.causal = true;
    v.push(c);
    let mut c = Case::new(1, 33, 200, 4, 96, F16);
    c.heads_kv = 1;
    c.window = (40, 5);
    c.softcap = 20.0;
    v.push(c);
    let mut c = Case::new(2, 45, 77, 4, 32, F32);
    c.alibi = Some(Alibi::PerBatchHead);
    c.mask = Some(MaskSpec {
        dtype: Bool,
        full: [true, false, true, true],
        ndim: 4,
    });
    c.causal = true;
    c.alignment = CausalAlignment::TopLeft;
    v.push(c);
    let mut c = Case::new(1, 50, 61, 2, 160, F32);
    c.head_dim_v = 48;
    c.mask = Some(MaskSpec {
        dtype: F32,
        full: [false, false, true, true],
        ndim: 2,
    });
    c.placement = [
        Placement::HeadsFirst,
        Placement::Padded,
        Placement::HeadsFirst,
        Placement::Contiguous,
    ];
    v.push(c);
    let mut c = Case::new(1, 200, 1, 2, 256, BF16);
    c.causal = true; // most rows see nothing: zero gradients, never NaN
    v.push(c);
    v
}
