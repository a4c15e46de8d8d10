//! Random packed batches, KV caches and merges, and their comparison with the f64 reference:
//! the cases of the property tests, the GPU suite and `ufa check`.
//!
//! Every instance poisons its outputs with NaN, and adds rows the call must leave alone (rows
//! past the last sequence of a packed batch, cache slots outside the appended ones), which the
//! comparison counts as strays if they change.

use super::{
    describe_scores, lse_tolerance, rel, tolerance, Alibi, Comparison, Described, GradComparison,
    Storage, Tensor, LSE_TOLERANCE,
};
use crate::reference::{
    reference_kvcache, reference_merge, reference_varlen, reference_varlen_backward, ReferenceGrads,
};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use ufa::{
    AttentionParams, AttentionState, BackwardInputs, CausalAlignment, Context, DType,
    Fp32Precision, Gradients, KvAppend, KvCache, Result, Rotary, TensorView, Varlen,
};

/// Rows of a packed tensor after the last sequence, which no call may touch.
const SPARE_ROWS: usize = 2;

fn tensor(shape: &[usize], storage: Storage) -> Tensor {
    let mut strides = vec![0; shape.len()];
    let mut acc = 1;
    for d in (0..shape.len()).rev() {
        strides[d] = acc;
        acc *= shape[d];
    }
    Tensor {
        storage,
        shape: shape.to_vec(),
        strides,
    }
}

fn random(shape: &[usize], dtype: DType, rng: &mut ChaCha8Rng, amp: f32) -> Tensor {
    let n = shape.iter().product();
    let s = Storage::random(dtype, n, rng, &mut |r| r.gen_range(-amp..amp));
    tensor(shape, s)
}

fn poisoned(shape: &[usize], dtype: DType) -> Tensor {
    tensor(shape, Storage::poisoned(dtype, shape.iter().product()))
}

fn ints(v: Vec<i32>, shape: &[usize]) -> Tensor {
    tensor(shape, Storage::I32(v))
}

fn cumulative(lens: &[usize]) -> Vec<i32> {
    std::iter::once(0)
        .chain(lens.iter().scan(0, |acc, &n| {
            *acc += n as i32;
            Some(*acc)
        }))
        .collect()
}

/// Squared differences and norms over chosen elements.
#[derive(Default)]
struct Accum {
    diff: f64,
    norm: f64,
    count: usize,
    unwritten: usize,
}

impl Accum {
    fn add(&mut self, got: f64, want: f64) {
        self.unwritten += got.is_nan() as usize;
        self.diff += (got - want) * (got - want);
        self.norm += want * want;
        self.count += 1;
    }

    fn error(&self) -> f64 {
        rel(self.diff, self.norm, self.count)
    }
}

/// Compares an LSE element: −inf must match exactly.
fn add_lse(acc: &mut Accum, bad: &mut bool, got: f64, want: f64) {
    if want == f64::NEG_INFINITY {
        *bad |= got != f64::NEG_INFINITY;
    } else {
        acc.add(got, want);
    }
}

/// The features every sequence case shares.
#[derive(Clone, Debug)]
pub struct Features {
    pub heads_q: usize,
    pub heads_kv: usize,
    pub head_dim: usize,
    pub head_dim_v: usize,
    pub dtype: DType,
    pub causal: bool,
    pub alignment: CausalAlignment,
    pub window: (i64, i64),
    pub softcap: f32,
    pub alibi: Option<Alibi>,
    pub deterministic: bool,
    pub fp32_precision: Fp32Precision,
    /// Packed batches only (a KV-cache call refuses dropout).
    pub dropout: Option<ufa::Dropout>,
}

impl Features {
    pub fn new(heads_q: usize, heads_kv: usize, head_dim: usize, dtype: DType) -> Features {
        Features {
            heads_q,
            heads_kv,
            head_dim,
            head_dim_v: head_dim,
            dtype,
            causal: false,
            alignment: CausalAlignment::BottomRight,
            window: (-1, -1),
            softcap: 0.0,
            alibi: None,
            deterministic: false,
            fp32_precision: Fp32Precision::Ieee,
            dropout: None,
        }
    }

    fn describe(&self) -> String {
        let mut s = format!("h{}/{} d{}", self.heads_q, self.heads_kv, self.head_dim);
        if self.head_dim_v != self.head_dim {
            s += &format!(" dv{}", self.head_dim_v);
        }
        s += &format!(" {}", self.dtype);
        s += &describe_scores(
            self.causal,
            self.alignment,
            self.window,
            self.softcap,
            self.alibi,
        );
        if self.deterministic {
            s += " det";
        }
        if self.fp32_precision == Fp32Precision::Tf32 && self.dtype == DType::F32 {
            s += " tf32";
        }
        if let Some(d) = self.dropout {
            s += &format!(" drop{}@{}+{}", d.p, d.seed, d.offset);
        }
        s
    }

    fn tolerance(&self) -> f64 {
        tolerance(self.dtype, self.fp32_precision)
    }

    fn alibi_tensor(&self, batch: usize, rng: &mut ChaCha8Rng) -> Option<Tensor> {
        self.alibi.map(|a| {
            let shape = match a {
                Alibi::PerHead => vec![self.heads_q],
                Alibi::PerBatchHead => vec![batch, self.heads_q],
            };
            let n = shape.iter().product();
            let s = Storage::random(DType::F32, n, rng, &mut |r| r.gen_range(0.01..0.5));
            tensor(&shape, s)
        })
    }

    fn params<'a>(&self, alibi: Option<&'a Tensor>) -> Result<AttentionParams<'a>> {
        Ok(self.params_with(alibi.map(|a| a.view()).transpose()?))
    }

    /// The parameters with ALiBi slopes from wherever they live (a device copy, say).
    fn params_with<'a>(&self, alibi: Option<TensorView<'a>>) -> AttentionParams<'a> {
        let mut p = AttentionParams::default()
            .causal(self.causal)
            .causal_alignment(self.alignment)
            .window(self.window.0, self.window.1)
            .softcap(self.softcap)
            .deterministic(self.deterministic)
            .fp32_precision(self.fp32_precision);
        p.alibi_slopes = alibi;
        p.dropout = self.dropout;
        p
    }
}

/// A packed batch of variable-length sequences.
#[derive(Clone, Debug)]
pub struct VarlenCase {
    pub seqlens_q: Vec<usize>,
    pub seqlens_kv: Vec<usize>,
    /// `seqused_kv` (each at most the sequence's keys), forward only.
    pub used_kv: Option<Vec<usize>>,
    /// Keys in a paged cache of this page size (pages shuffled, with spare ones), forward only.
    pub page_size: Option<usize>,
    /// Added to the longest lengths to give max_seqlen (a bound, not the exact maximum).
    pub max_slack: usize,
    pub f: Features,
}

impl VarlenCase {
    pub fn new(seqlens_q: &[usize], seqlens_kv: &[usize], f: Features) -> VarlenCase {
        VarlenCase {
            seqlens_q: seqlens_q.to_vec(),
            seqlens_kv: seqlens_kv.to_vec(),
            used_kv: None,
            page_size: None,
            max_slack: 0,
            f,
        }
    }

    pub fn describe(&self) -> String {
        let mut s = format!(
            "varlen q{:?} kv{:?} {}",
            self.seqlens_q,
            self.seqlens_kv,
            self.f.describe()
        );
        if let Some(u) = &self.used_kv {
            s += &format!(" used{u:?}");
        }
        if let Some(p) = self.page_size {
            s += &format!(" page{p}");
        }
        s
    }
}

/// Inputs and (poisoned) outputs of a [`VarlenCase`].
pub struct VarlenInstance {
    pub case: VarlenCase,
    pub seed: u64,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    meta: VarlenMeta,
    alibi: Option<Tensor>,
    grads: Option<[Tensor; 4]>,
}

/// The int32 arrays of a packed batch.
struct VarlenMeta {
    cu_q: Tensor,
    cu_kv: Tensor,
    used: Option<Tensor>,
    table: Option<Tensor>,
    max_q: usize,
    max_kv: usize,
}

impl VarlenMeta {
    fn varlen(&self) -> Result<Varlen<'_>> {
        let mut s = Varlen::new(
            self.cu_q.view()?,
            self.cu_kv.view()?,
            self.max_q,
            self.max_kv,
        );
        s.seqused_kv = self.used.as_ref().map(|u| u.view()).transpose()?;
        s.block_table = self.table.as_ref().map(|t| t.view()).transpose()?;
        Ok(s)
    }

    /// The metadata's tensors: cu_q, cu_kv, then seqused and the block table where present.
    fn tensors(&self) -> Vec<&Tensor> {
        let mut v = vec![&self.cu_q, &self.cu_kv];
        v.extend(self.used.iter().chain(&self.table));
        v
    }
}

impl VarlenInstance {
    pub fn new(case: &VarlenCase, seed: u64) -> VarlenInstance {
        let c = case;
        let f = &c.f;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let total_q: usize = c.seqlens_q.iter().sum::<usize>() + SPARE_ROWS;
        let total_kv: usize = c.seqlens_kv.iter().sum::<usize>() + SPARE_ROWS;
        let batch = c.seqlens_q.len();
        let q = random(&[total_q, f.heads_q, f.head_dim], f.dtype, &mut rng, 1.5);
        let (k, v, table) = match c.page_size {
            None => (
                random(&[total_kv, f.heads_kv, f.head_dim], f.dtype, &mut rng, 1.5),
                random(
                    &[total_kv, f.heads_kv, f.head_dim_v],
                    f.dtype,
                    &mut rng,
                    1.0,
                ),
                None,
            ),
            Some(ps) => {
                let need: Vec<usize> = c.seqlens_kv.iter().map(|n| n.div_ceil(ps)).collect();
                let max_pages = need.iter().max().copied().unwrap_or(0) + 1;
                let pages = need.iter().sum::<usize>() + 2;
                let mut ids: Vec<i32> = (0..pages as i32).collect();
                ids.shuffle(&mut rng);
                // Unused entries hold indices no page has: they must never be read.
                let mut t = vec![i32::MAX; batch * max_pages];
                let mut next = ids.into_iter();
                for (b, &n) in need.iter().enumerate() {
                    for j in 0..n {
                        t[b * max_pages + j] = next.next().expect("enough pages");
                    }
                }
                (
                    random(&[pages, ps, f.heads_kv, f.head_dim], f.dtype, &mut rng, 1.5),
                    random(
                        &[pages, ps, f.heads_kv, f.head_dim_v],
                        f.dtype,
                        &mut rng,
                        1.0,
                    ),
                    Some(ints(t, &[batch, max_pages])),
                )
            }
        };
        let alibi = f.alibi_tensor(batch, &mut rng);
        let max = |l: &[usize]| l.iter().max().copied().unwrap_or(0) + c.max_slack;
        VarlenInstance {
            case: c.clone(),
            seed,
            out: poisoned(&[total_q, f.heads_q, f.head_dim_v], f.dtype),
            lse: poisoned(&[f.heads_q, total_q], DType::F32),
            meta: VarlenMeta {
                cu_q: ints(cumulative(&c.seqlens_q), &[batch + 1]),
                cu_kv: ints(cumulative(&c.seqlens_kv), &[batch + 1]),
                used: c
                    .used_kv
                    .as_ref()
                    .map(|u| ints(u.iter().map(|&n| n as i32).collect(), &[batch])),
                table,
                max_q: max(&c.seqlens_q),
                max_kv: max(&c.seqlens_kv),
            },
            q,
            k,
            v,
            alibi,
            grads: None,
        }
    }

    /// Runs the forward pass on `ctx` (host memory).
    pub fn run(&mut self, ctx: &Context) -> Result<()> {
        let params = self.case.f.params(self.alibi.as_ref())?;
        let seqs = self.meta.varlen()?;
        let (q, k, v) = (self.q.view()?, self.k.view()?, self.v.view()?);
        let mut out = self
            .out
            .storage
            .view_mut(&self.out.shape, &self.out.strides)?;
        let mut lse = self
            .lse
            .storage
            .view_mut(&self.lse.shape, &self.lse.strides)?;
        ctx.forward_varlen(&q, &k, &v, &mut out, Some(&mut lse), &seqs, &params)
    }

    /// Compares out and LSE with the reference over the sequences' rows; the spare rows after
    /// them must still hold the poison.
    pub fn compare(&self) -> Result<Comparison> {
        let r = reference_varlen(
            &self.q.view()?,
            &self.k.view()?,
            &self.v.view()?,
            &self.meta.varlen()?,
            &self.case.f.params(self.alibi.as_ref())?,
        )?;
        let f = &self.case.f;
        let covered: usize = self.case.seqlens_q.iter().sum();
        let total = self.out.shape[0];
        let (mut o, mut l, mut bad_lse, mut strays) =
            (Accum::default(), Accum::default(), false, 0);
        for row in 0..total {
            for h in 0..f.heads_q {
                for e in 0..f.head_dim_v {
                    let got = self.out.at(&[row, h, e]);
                    if row < covered {
                        o.add(got, r.out[(row * f.heads_q + h) * f.head_dim_v + e]);
                    } else {
                        strays += !got.is_nan() as usize;
                    }
                }
                let got = self.lse.at(&[h, row]);
                if row < covered {
                    add_lse(&mut l, &mut bad_lse, got, r.lse[h * total + row]);
                } else {
                    strays += !got.is_nan() as usize;
                }
            }
        }
        Ok(Comparison {
            out_error: o.error(),
            lse_error: Some(if bad_lse { f64::INFINITY } else { l.error() }),
            unwritten: o.unwritten + l.unwritten,
            strays,
            tolerance: f.tolerance(),
            lse_tolerance: lse_tolerance(f.dtype, f.fp32_precision),
        })
    }

    /// dO and the poisoned gradients, made once (so that timed backward calls time the call).
    fn grad_tensors(&mut self) {
        if self.grads.is_some() {
            return;
        }
        let f = &self.case.f;
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x9e37_79b9);
        let (tq, tk) = (self.q.shape[0], self.k.shape[0]);
        self.grads = Some([
            random(&[tq, f.heads_q, f.head_dim_v], f.dtype, &mut rng, 1.0),
            poisoned(&[tq, f.heads_q, f.head_dim], f.dtype),
            poisoned(&[tk, f.heads_kv, f.head_dim], f.dtype),
            poisoned(&[tk, f.heads_kv, f.head_dim_v], f.dtype),
        ]);
    }

    /// Runs the backward pass on `ctx` after [`VarlenInstance::run`].
    pub fn run_backward(&mut self, ctx: &Context) -> Result<()> {
        self.grad_tensors();
        let params = self.case.f.params(self.alibi.as_ref())?;
        let seqs = self.meta.varlen()?;
        let [dout, dq, dk, dv] = self.grads.as_mut().expect("made above");
        let inputs = BackwardInputs {
            q: self.q.view()?,
            k: self.k.view()?,
            v: self.v.view()?,
            out: self.out.view()?,
            dout: dout.view()?,
            lse: self.lse.view()?,
        };
        let mut grads = Gradients {
            dq: dq.view_mut()?,
            dk: dk.view_mut()?,
            dv: dv.view_mut()?,
        };
        ctx.backward_varlen(&inputs, &mut grads, &seqs, &params)
    }

    /// Compares the gradients with the reference (exact, and with a flash pass's roundings, as
    /// [`super::Instance::compare_grads`]); spare rows must keep the poison.
    pub fn compare_grads(&self) -> Result<GradComparison> {
        let [dout, dq, dk, dv] = self.grads.as_ref().expect("run_backward first");
        let (q, k, v) = (self.q.view()?, self.k.view()?, self.v.view()?);
        let (seqs, params) = (
            self.meta.varlen()?,
            self.case.f.params(self.alibi.as_ref())?,
        );
        let g = |out: Option<&TensorView<'_>>| -> Result<ReferenceGrads> {
            let flash = out.map(|o| (o, Some(self.case.f.dtype)));
            reference_varlen_backward(&q, &k, &v, &dout.view()?, flash, &seqs, &params)
        };
        let (exact, from_out) = (g(None)?, g(Some(&self.out.view()?))?);
        let covered = [
            self.case.seqlens_q.iter().sum::<usize>(),
            self.case.seqlens_kv.iter().sum(),
            self.case.seqlens_kv.iter().sum(),
        ];
        let (mut errors, mut floor, mut unwritten) = ([0.0; 3], [0.0f64; 3], 0);
        let wants = [
            (dq, &exact.dq, &from_out.dq),
            (dk, &exact.dk, &from_out.dk),
            (dv, &exact.dv, &from_out.dv),
        ];
        for (n, (t, want, base)) in wants.into_iter().enumerate() {
            let (mut acc, mut base_acc) = (Accum::default(), Accum::default());
            let row_len = t.shape[1] * t.shape[2];
            for row in 0..t.shape[0] {
                for i in 0..row_len {
                    let got = t.storage.get(row * row_len + i);
                    if row < covered[n] {
                        acc.add(got, want[row * row_len + i]);
                        base_acc.add(base[row * row_len + i], want[row * row_len + i]);
                    } else {
                        // Spare rows: a write shows as a lost poison.
                        unwritten += !got.is_nan() as usize;
                    }
                }
            }
            unwritten += acc.unwritten;
            errors[n] = acc.error();
            floor[n] = 2.0 * base_acc.error();
        }
        let tol = self.case.f.tolerance();
        Ok(GradComparison {
            dq: errors[0],
            dk: errors[1],
            dv: errors[2],
            unwritten,
            tolerance: [tol.max(floor[0]), tol.max(floor[1]), tol.max(floor[2])],
        })
    }

    /// The gradients' bits (for determinism checks).
    pub fn grad_bits(&self) -> Vec<u64> {
        let g = self.grads.as_ref().expect("run_backward first");
        g[1..]
            .iter()
            .flat_map(|t| {
                let n: usize = t.shape.iter().product();
                (0..n).map(|i| t.storage.get(i).to_bits())
            })
            .collect()
    }
}

/// A call over a KV cache.
#[derive(Clone, Debug)]
pub struct KvCacheCase {
    pub seqlen_q: usize,
    /// Keys already cached, per sequence (the batch is its length).
    pub cache_lens: Vec<usize>,
    /// Keys appended by the call (0: none).
    pub seqlen_new: usize,
    /// Dense cache slots per sequence (rows of the cache beyond the longest need).
    pub capacity: usize,
    /// Paged cache of this page size (else dense).
    pub page_size: Option<usize>,
    /// Paged: sequences 0 and 1 share their first full pages (prefix sharing).
    pub shared_prefix: bool,
    /// Dense: read through a shuffled `cache_batch_idx` with spare entries.
    pub gathered: bool,
    /// Rotary embedding: (rotary_dim, interleaved).
    pub rotary: Option<(usize, bool)>,
    pub f: Features,
}

impl KvCacheCase {
    pub fn new(seqlen_q: usize, cache_lens: &[usize], seqlen_new: usize, f: Features) -> Self {
        let longest = cache_lens.iter().max().copied().unwrap_or(0) + seqlen_new;
        KvCacheCase {
            seqlen_q,
            cache_lens: cache_lens.to_vec(),
            seqlen_new,
            capacity: longest + 3,
            page_size: None,
            shared_prefix: false,
            gathered: false,
            rotary: None,
            f,
        }
    }

    pub fn describe(&self) -> String {
        let mut s = format!(
            "kvcache sq{} cached{:?} new{} {}",
            self.seqlen_q,
            self.cache_lens,
            self.seqlen_new,
            self.f.describe()
        );
        match self.page_size {
            Some(p) => s += &format!(" page{p}"),
            None => s += &format!(" slots{}", self.capacity),
        }
        if self.shared_prefix {
            s += " shared";
        }
        if self.gathered {
            s += " batch_idx";
        }
        if let Some((d, i)) = self.rotary {
            s += &format!(" rope{d}{}", if i { "i" } else { "" });
        }
        s
    }
}

/// Inputs, cache and (poisoned) outputs of a [`KvCacheCase`].
pub struct KvCacheInstance {
    pub case: KvCacheCase,
    pub seed: u64,
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    /// The cache before the call.
    k_before: Tensor,
    v_before: Tensor,
    seqlens: Tensor,
    table: Option<Tensor>,
    batch_idx: Option<Tensor>,
    new: NewRows,
    alibi: Option<Tensor>,
    out: Tensor,
    lse: Tensor,
}

/// What a KV-cache call appends.
struct NewRows {
    k: Option<Tensor>,
    v: Option<Tensor>,
    cos: Option<Tensor>,
    sin: Option<Tensor>,
    interleaved: bool,
}

impl NewRows {
    fn append(&self) -> Result<Option<KvAppend<'_>>> {
        let (Some(k), Some(v)) = (&self.k, &self.v) else {
            return Ok(None);
        };
        let rotary = match (&self.cos, &self.sin) {
            (Some(c), Some(s)) => Some(Rotary {
                cos: c.view()?,
                sin: s.view()?,
                interleaved: self.interleaved,
            }),
            _ => None,
        };
        Ok(Some(KvAppend {
            k: k.view()?,
            v: v.view()?,
            rotary,
        }))
    }
}

fn copy(t: &Tensor) -> Tensor {
    let storage = match &t.storage {
        Storage::F32(v) => Storage::F32(v.clone()),
        Storage::F16(v) => Storage::F16(v.clone()),
        Storage::BF16(v) => Storage::BF16(v.clone()),
        Storage::Bool(v) => Storage::Bool(v.clone()),
        Storage::I32(v) => Storage::I32(v.clone()),
    };
    Tensor {
        storage,
        shape: t.shape.clone(),
        strides: t.strides.clone(),
    }
}

impl KvCacheInstance {
    pub fn new(case: &KvCacheCase, seed: u64) -> KvCacheInstance {
        let c = case;
        let f = &c.f;
        let batch = c.cache_lens.len();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let q = random(
            &[batch, c.seqlen_q, f.heads_q, f.head_dim],
            f.dtype,
            &mut rng,
            1.5,
        );
        let (outer, rows, table, batch_idx) = match c.page_size {
            Some(ps) => {
                let need: Vec<usize> = c
                    .cache_lens
                    .iter()
                    .map(|n| (n + c.seqlen_new).div_ceil(ps))
                    .collect();
                let max_pages = need.iter().max().copied().unwrap_or(0) + 1;
                // Shared: sequence 1 takes sequence 0's first full pages of cached keys.
                let shared = if c.shared_prefix && batch >= 2 {
                    c.cache_lens[0].min(c.cache_lens[1]) / ps
                } else {
                    0
                };
                let pages = need.iter().sum::<usize>() - shared + 3;
                let mut ids: Vec<i32> = (0..pages as i32).collect();
                ids.shuffle(&mut rng);
                let mut next = ids.into_iter();
                let mut t = vec![-1; batch * max_pages];
                for (b, &n) in need.iter().enumerate() {
                    for j in 0..n {
                        t[b * max_pages + j] = if b == 1 && j < shared {
                            t[j]
                        } else {
                            next.next().expect("enough pages")
                        };
                    }
                }
                (pages, ps, Some(ints(t, &[batch, max_pages])), None)
            }
            None if c.gathered => {
                let entries = batch + 2;
                let mut ids: Vec<i32> = (0..entries as i32).collect();
                ids.shuffle(&mut rng);
                ids.truncate(batch);
                (entries, c.capacity, None, Some(ints(ids, &[batch])))
            }
            None => (batch, c.capacity, None, None),
        };
        let k_cache = random(
            &[outer, rows, f.heads_kv, f.head_dim],
            f.dtype,
            &mut rng,
            1.5,
        );
        let v_cache = random(
            &[outer, rows, f.heads_kv, f.head_dim_v],
            f.dtype,
            &mut rng,
            1.0,
        );
        let (k_new, v_new) = if c.seqlen_new > 0 {
            (
                Some(random(
                    &[batch, c.seqlen_new, f.heads_kv, f.head_dim],
                    f.dtype,
                    &mut rng,
                    1.5,
                )),
                Some(random(
                    &[batch, c.seqlen_new, f.heads_kv, f.head_dim_v],
                    f.dtype,
                    &mut rng,
                    1.0,
                )),
            )
        } else {
            (None, None)
        };
        let (cos, sin) = match c.rotary {
            Some((dim, _)) => {
                let n = c.cache_lens.iter().max().copied().unwrap_or(0)
                    + c.seqlen_new.max(c.seqlen_q)
                    + 1;
                let angles: Vec<f64> = (0..n * dim / 2)
                    .map(|i| (i / (dim / 2)) as f64 * 0.37f64.powi((i % (dim / 2)) as i32 + 1))
                    .collect();
                let table = |g: fn(f64) -> f64| {
                    let vals: Vec<f32> = angles.iter().map(|&a| g(a) as f32).collect();
                    tensor(&[n, dim / 2], Storage::F32(vals))
                };
                (Some(table(f64::cos)), Some(table(f64::sin)))
            }
            None => (None, None),
        };
        let alibi = f.alibi_tensor(batch, &mut rng);
        KvCacheInstance {
            case: c.clone(),
            seed,
            k_before: copy(&k_cache),
            v_before: copy(&v_cache),
            seqlens: ints(c.cache_lens.iter().map(|&n| n as i32).collect(), &[batch]),
            out: poisoned(&[batch, c.seqlen_q, f.heads_q, f.head_dim_v], f.dtype),
            lse: poisoned(&[batch, f.heads_q, c.seqlen_q], DType::F32),
            q,
            k_cache,
            v_cache,
            table,
            batch_idx,
            new: NewRows {
                k: k_new,
                v: v_new,
                cos,
                sin,
                interleaved: c.rotary.is_some_and(|r| r.1),
            },
            alibi,
        }
    }

    /// Runs the call on `ctx` (host memory).
    pub fn run(&mut self, ctx: &Context) -> Result<()> {
        let params = self.case.f.params(self.alibi.as_ref())?;
        let append = self.new.append()?;
        let mut cache = KvCache {
            k: self.k_cache.view_mut()?,
            v: self.v_cache.view_mut()?,
            seqlens: self.seqlens.view()?,
            block_table: self.table.as_ref().map(|t| t.view()).transpose()?,
            batch_idx: self.batch_idx.as_ref().map(|t| t.view()).transpose()?,
            checked: false,
        };
        let mut out = self
            .out
            .storage
            .view_mut(&self.out.shape, &self.out.strides)?;
        let mut lse = self
            .lse
            .storage
            .view_mut(&self.lse.shape, &self.lse.strides)?;
        ctx.forward_kvcache(
            &self.q.view()?,
            &mut cache,
            append.as_ref(),
            &mut out,
            Some(&mut lse),
            &params,
        )
    }

    /// Compares the attention with the reference and the cache bit for bit with the expected
    /// one (its differences are the comparison's strays).
    pub fn compare(&self) -> Result<Comparison> {
        let params = self.case.f.params(self.alibi.as_ref())?;
        let r = reference_kvcache(
            &self.q.view()?,
            &self.k_before.view()?,
            &self.v_before.view()?,
            &self.seqlens.view()?,
            self.table.as_ref().map(|t| t.view()).transpose()?.as_ref(),
            self.batch_idx
                .as_ref()
                .map(|t| t.view())
                .transpose()?
                .as_ref(),
            self.new.append()?.as_ref(),
            &params,
        )?;
        let (mut o, mut l, mut bad_lse) = (Accum::default(), Accum::default(), false);
        let n = self.out.shape.iter().product::<usize>();
        for i in 0..n {
            o.add(self.out.storage.get(i), r.attention.out[i]);
        }
        for i in 0..r.attention.lse.len() {
            add_lse(
                &mut l,
                &mut bad_lse,
                self.lse.storage.get(i),
                r.attention.lse[i],
            );
        }
        let mut strays = 0;
        for (t, want) in [(&self.k_cache, &r.k_cache), (&self.v_cache, &r.v_cache)] {
            for (i, w) in want.iter().enumerate() {
                strays += (t.storage.get(i).to_bits() != w.to_bits()) as usize;
            }
        }
        Ok(Comparison {
            out_error: o.error(),
            lse_error: Some(if bad_lse { f64::INFINITY } else { l.error() }),
            unwritten: o.unwritten + l.unwritten,
            strays,
            tolerance: self.case.f.tolerance(),
            lse_tolerance: lse_tolerance(self.case.f.dtype, self.case.f.fp32_precision),
        })
    }

    /// Whether the cache still holds exactly what it held before the call.
    pub fn cache_untouched(&self) -> bool {
        let same = |a: &Tensor, b: &Tensor| {
            let n: usize = a.shape.iter().product();
            (0..n).all(|i| a.storage.get(i).to_bits() == b.storage.get(i).to_bits())
        };
        same(&self.k_cache, &self.k_before) && same(&self.v_cache, &self.v_before)
    }
}

/// A merge of `states` random partial results (some rows with LSE −inf in some states).
#[derive(Clone, Debug)]
pub struct MergeCase {
    pub states: usize,
    pub batch: usize,
    pub seqlen: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub dtype: DType,
    /// The output is `states[0]` itself.
    pub in_place: bool,
}

impl MergeCase {
    pub fn describe(&self) -> String {
        format!(
            "merge n{} b{} s{} h{} d{} {}{}",
            self.states,
            self.batch,
            self.seqlen,
            self.heads,
            self.head_dim,
            self.dtype,
            if self.in_place { " in-place" } else { "" }
        )
    }
}

/// Inputs and outputs of a [`MergeCase`].
pub struct MergeInstance {
    pub case: MergeCase,
    outs: Vec<Tensor>,
    lses: Vec<Tensor>,
    out: Tensor,
    lse: Tensor,
}

impl MergeInstance {
    pub fn new(case: &MergeCase, seed: u64) -> MergeInstance {
        let c = case;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let shape = [c.batch, c.seqlen, c.heads, c.head_dim];
        let lshape = [c.batch, c.heads, c.seqlen];
        let outs: Vec<Tensor> = (0..c.states)
            .map(|_| random(&shape, c.dtype, &mut rng, 1.0))
            .collect();
        let lses = (0..c.states)
            .map(|s| {
                let n = c.batch * c.heads * c.seqlen;
                let vals = (0..n)
                    .map(|i| {
                        // Row 0 of every state but the last sees no key; the last state's row
                        // 1 neither, and in all states row 2 when there are 3 rows or more.
                        let none = (i % c.seqlen == 0 && s + 1 < c.states)
                            || (i % c.seqlen == 2 && c.seqlen > 2);
                        if none {
                            f32::NEG_INFINITY
                        } else {
                            rng.gen_range(-20.0..20.0)
                        }
                    })
                    .collect();
                tensor(&lshape, Storage::F32(vals))
            })
            .collect();
        MergeInstance {
            case: c.clone(),
            out: poisoned(&shape, c.dtype),
            lse: poisoned(&lshape, DType::F32),
            outs,
            lses,
        }
    }

    /// Merges on `ctx`.
    pub fn run(&mut self, ctx: &Context) -> Result<()> {
        let (first, rest) = self.outs.split_at_mut(1);
        let (lfirst, lrest) = self.lses.split_at_mut(1);
        let (mut out, mut lse, mut states);
        if self.case.in_place {
            out = first[0].view_mut()?;
            lse = lfirst[0].view_mut()?;
            // SAFETY: the output is states[0] itself, which the merge allows; both views end
            // with this call.
            states = vec![unsafe {
                AttentionState {
                    out: reborrow(&out.as_view()),
                    lse: reborrow(&lse.as_view()),
                }
            }];
        } else {
            out = self.out.view_mut()?;
            lse = self.lse.view_mut()?;
            states = vec![AttentionState {
                out: first[0].view()?,
                lse: lfirst[0].view()?,
            }];
        }
        for (o, l) in rest.iter().zip(lrest.iter()) {
            states.push(AttentionState {
                out: o.view()?,
                lse: l.view()?,
            });
        }
        ctx.merge_states(&states, &mut out, Some(&mut lse))
    }

    /// Compares with the reference computed from `before` (the inputs as drawn).
    pub fn compare(&self, before: &MergeInstance) -> Result<Comparison> {
        let states: Vec<AttentionState<'_>> = before
            .outs
            .iter()
            .zip(&before.lses)
            .map(|(o, l)| {
                Ok(AttentionState {
                    out: o.view()?,
                    lse: l.view()?,
                })
            })
            .collect::<Result<_>>()?;
        let r = reference_merge(&states);
        let (out, lse) = if self.case.in_place {
            (&self.outs[0], &self.lses[0])
        } else {
            (&self.out, &self.lse)
        };
        let (mut o, mut l, mut bad_lse) = (Accum::default(), Accum::default(), false);
        for (i, &w) in r.out.iter().enumerate() {
            o.add(out.storage.get(i), w);
        }
        for (i, &w) in r.lse.iter().enumerate() {
            add_lse(&mut l, &mut bad_lse, lse.storage.get(i), w);
        }
        Ok(Comparison {
            out_error: o.error(),
            lse_error: Some(if bad_lse { f64::INFINITY } else { l.error() }),
            unwritten: o.unwritten + l.unwritten,
            strays: 0,
            tolerance: tolerance(self.case.dtype, Fp32Precision::Ieee),
            lse_tolerance: LSE_TOLERANCE,
        })
    }
}

/// A view with an unbounded lifetime, for the in-place merge whose first state is the output
/// it writes.
///
/// # Safety
/// The memory must outlive every use of the copy.
unsafe fn reborrow<'b>(v: &TensorView<'_>) -> TensorView<'b> {
    TensorView::from_raw_parts(
        v.as_ptr() as *const std::ffi::c_void,
        v.dtype(),
        v.device(),
        v.shape(),
        v.strides(),
    )
    .expect("a valid view")
}

impl Described for VarlenCase {
    fn describe(&self) -> String {
        VarlenCase::describe(self)
    }
}
impl Described for KvCacheCase {
    fn describe(&self) -> String {
        KvCacheCase::describe(self)
    }
}
impl Described for MergeCase {
    fn describe(&self) -> String {
        MergeCase::describe(self)
    }
}

/// Runs a packed-batch case on `ctx` and compares it with the reference.
pub fn check_varlen(ctx: &Context, case: &VarlenCase, seed: u64) -> Result<Comparison> {
    let mut inst = VarlenInstance::new(case, seed);
    inst.run(ctx)?;
    inst.compare()
}

/// Runs a packed-batch case forward and backward and compares the gradients.
pub fn check_varlen_grads(ctx: &Context, case: &VarlenCase, seed: u64) -> Result<GradComparison> {
    let mut inst = VarlenInstance::new(case, seed);
    inst.run(ctx)?;
    inst.run_backward(ctx)?;
    inst.compare_grads()
}

/// Runs a KV-cache case and compares the attention and the cache.
pub fn check_kvcache(ctx: &Context, case: &KvCacheCase, seed: u64) -> Result<Comparison> {
    let mut inst = KvCacheInstance::new(case, seed);
    inst.run(ctx)?;
    inst.compare()
}

/// Runs a merge case and compares it with the reference.
pub fn check_merge(ctx: &Context, case: &MergeCase, seed: u64) -> Result<Comparison> {
    let mut inst = MergeInstance::new(case, seed);
    inst.run(ctx)?;
    inst.compare(&MergeInstance::new(case, seed))
}

fn features(heads_q: usize, heads_kv: usize, head_dim: usize, dtype: DType) -> Features {
    Features::new(heads_q, heads_kv, head_dim, dtype)
}

/// Packed batches: empty and one-row sequences, more queries than keys under causal masking,
/// GQA 1/4/8, every dtype and feature, paged keys with pages of 1, 16 and 256.
pub fn varlen_cases() -> Vec<VarlenCase> {
    use DType::*;
    let mut cases = Vec::new();
    cases.push(VarlenCase::new(
        &[1, 0, 17, 5],
        &[1, 3, 17, 130],
        features(2, 2, 64, F32),
    ));
    let mut f = features(8, 2, 128, BF16);
    f.causal = true;
    cases.push(VarlenCase::new(&[40, 3, 1], &[10, 7, 0], f));
    let mut f = features(8, 1, 80, F16);
    f.window = (16, 4);
    f.softcap = 20.0;
    f.alibi = Some(Alibi::PerBatchHead);
    let mut c = VarlenCase::new(&[33, 70], &[90, 70], f);
    c.max_slack = 5;
    cases.push(c);
    let mut f = features(4, 4, 32, F32);
    f.causal = true;
    f.alignment = CausalAlignment::TopLeft;
    cases.push(VarlenCase::new(&[9, 64, 2], &[12, 50, 2], f));
    for (ps, dtype) in [(1, BF16), (16, F32), (256, F16)] {
        let mut f = features(4, 1, 64, dtype);
        f.causal = true;
        let mut c = VarlenCase::new(&[1, 7, 0, 3], &[300, 17, 4, 1], f);
        c.page_size = Some(ps);
        c.used_kv = Some(vec![260, 17, 0, 1]);
        cases.push(c);
    }
    let mut f = features(8, 8, 96, BF16);
    f.alibi = Some(Alibi::PerHead);
    let mut c = VarlenCase::new(&[129, 1], &[100, 1000], f);
    c.used_kv = Some(vec![64, 999]);
    cases.push(c);
    cases
}

/// Packed batches for the backward: f32 and bf16, GQA, causal with more queries than keys,
/// an empty sequence, windows and score modifiers.
pub fn varlen_grad_cases() -> Vec<VarlenCase> {
    use DType::*;
    let mut cases = Vec::new();
    let mut f = features(4, 2, 64, F32);
    f.causal = true;
    cases.push(VarlenCase::new(&[37, 0, 150, 1], &[20, 3, 150, 64], f));
    let mut f = features(8, 2, 128, BF16);
    f.causal = true;
    cases.push(VarlenCase::new(&[65, 130], &[65, 200], f));
    let mut f = features(2, 1, 80, F16);
    f.window = (8, 8);
    f.softcap = 15.0;
    f.alibi = Some(Alibi::PerBatchHead);
    cases.push(VarlenCase::new(&[50, 9, 70], &[60, 0, 70], f));
    // (Not 300 queries over 1 key: every such row's gradient cancels exactly, so its rounding
    // noise would be measured against the other sequence's gradients.)
    let mut f = features(4, 4, 32, F32);
    f.deterministic = true;
    cases.push(VarlenCase::new(&[1, 300], &[300, 2], f));
    cases
}

/// KV-cache calls: decoding, speculative decoding and chunked prefill over dense, gathered
/// and paged caches (pages of 1, 16 and 256, shared prefixes), with and without appending and
/// rotary embedding (both layouts).
pub fn kvcache_cases() -> Vec<KvCacheCase> {
    use DType::*;
    let mut cases = Vec::new();
    let mut f = features(8, 2, 64, BF16);
    f.causal = true;
    cases.push(KvCacheCase::new(1, &[5, 0, 37], 1, f.clone()));
    let mut c = KvCacheCase::new(1, &[100, 16, 3], 1, f.clone());
    c.page_size = Some(16);
    c.rotary = Some((64, false));
    cases.push(c);
    let mut c = KvCacheCase::new(3, &[40, 44, 0], 3, f.clone());
    c.page_size = Some(1);
    c.shared_prefix = true;
    c.rotary = Some((32, true));
    cases.push(c);
    let mut g = features(4, 4, 128, F16);
    g.causal = true;
    let mut c = KvCacheCase::new(5, &[300, 7], 0, g);
    c.page_size = Some(256);
    cases.push(c);
    let mut g = features(4, 2, 32, F32);
    g.window = (10, 0);
    g.softcap = 10.0;
    let mut c = KvCacheCase::new(2, &[20, 3, 9], 2, g);
    c.gathered = true;
    c.rotary = Some((16, false));
    cases.push(c);
    let mut g = features(8, 1, 128, BF16);
    g.causal = true;
    g.alibi = Some(Alibi::PerHead);
    let mut c = KvCacheCase::new(33, &[0, 64], 33, g);
    c.page_size = Some(16);
    cases.push(c);
    let mut g = features(2, 2, 64, F32);
    g.causal = true;
    cases.push(KvCacheCase::new(4, &[2], 0, g));
    cases
}

/// Merges of 2 to 5 states, in place or not, every dtype.
pub fn merge_cases() -> Vec<MergeCase> {
    let case = |states, dtype, in_place| MergeCase {
        states,
        batch: 2,
        seqlen: 5,
        heads: 3,
        head_dim: 40,
        dtype,
        in_place,
    };
    vec![
        case(2, DType::F32, false),
        case(3, DType::BF16, true),
        case(5, DType::F16, false),
        case(1, DType::F32, false),
    ]
}

/// The same instances on a CUDA device: every tensor (the metadata too) uploaded, poisoned
/// outputs uploaded with their poison, and outputs and caches downloaded for the comparisons
/// above.
pub mod cuda {
    use super::super::cuda::{bytes_mut, median_ms, synchronize, OnDevice};
    use super::*;

    fn up(t: &Tensor, ordinal: u32) -> Result<OnDevice<'_>> {
        OnDevice::new(t, ordinal)
    }

    fn up_opt(t: Option<&Tensor>, ordinal: u32) -> Result<Option<OnDevice<'_>>> {
        t.map(|t| up(t, ordinal)).transpose()
    }

    /// One launch then a synchronisation, or (`timing`: warm-up and timed calls) the median
    /// milliseconds of the timed ones.
    fn run_or_time(
        ordinal: u32,
        timing: Option<(usize, usize)>,
        mut launch: impl FnMut() -> Result<()>,
    ) -> Result<Option<f64>> {
        match timing {
            None => {
                launch()?;
                synchronize(ordinal)?;
                Ok(None)
            }
            Some((warmup, iters)) => median_ms(ordinal, warmup, iters, launch).map(Some),
        }
    }

    /// Copies a device buffer back into its host tensor.
    fn take(dev: &OnDevice<'_>) -> Result<Vec<u8>> {
        dev.download()
    }

    /// Device copies of a packed batch's metadata, as a [`Varlen`].
    struct DeviceMeta<'m> {
        meta: &'m VarlenMeta,
        bufs: Vec<OnDevice<'m>>,
    }

    impl<'m> DeviceMeta<'m> {
        fn new(meta: &'m VarlenMeta, ordinal: u32) -> Result<Self> {
            let bufs = meta
                .tensors()
                .into_iter()
                .map(|t| up(t, ordinal))
                .collect::<Result<_>>()?;
            Ok(DeviceMeta { meta, bufs })
        }

        fn varlen(&self, checked: bool) -> Result<Varlen<'_>> {
            let mut s = Varlen::new(
                self.bufs[0].view()?,
                self.bufs[1].view()?,
                self.meta.max_q,
                self.meta.max_kv,
            )
            .checked(checked);
            let mut rest = self.bufs[2..].iter();
            if self.meta.used.is_some() {
                s.seqused_kv = Some(rest.next().expect("uploaded").view()?);
            }
            if self.meta.table.is_some() {
                s.block_table = Some(rest.next().expect("uploaded").view()?);
            }
            Ok(s)
        }
    }

    impl VarlenInstance {
        /// Runs the forward on CUDA device `ordinal` (checked: the metadata checked on the
        /// host too) and brings out and the LSE back.
        pub fn run_cuda(&mut self, ctx: &Context, ordinal: u32, checked: bool) -> Result<()> {
            self.launch_cuda(ctx, ordinal, checked, None).map(drop)
        }

        /// Median milliseconds of `iters` forward calls on CUDA device `ordinal`, after
        /// `warmup` untimed ones (the results are brought back as by `run_cuda`).
        pub fn time_cuda(
            &mut self,
            ctx: &Context,
            ordinal: u32,
            warmup: usize,
            iters: usize,
        ) -> Result<f64> {
            let ms = self.launch_cuda(ctx, ordinal, false, Some((warmup, iters)))?;
            Ok(ms.expect("timed"))
        }

        fn launch_cuda(
            &mut self,
            ctx: &Context,
            ordinal: u32,
            checked: bool,
            timing: Option<(usize, usize)>,
        ) -> Result<Option<f64>> {
            let (out, lse, ms) = {
                let (q, k, v) = (
                    up(&self.q, ordinal)?,
                    up(&self.k, ordinal)?,
                    up(&self.v, ordinal)?,
                );
                let (out, lse) = (up(&self.out, ordinal)?, up(&self.lse, ordinal)?);
                let alibi = up_opt(self.alibi.as_ref(), ordinal)?;
                let meta = DeviceMeta::new(&self.meta, ordinal)?;
                let params = self
                    .case
                    .f
                    .params_with(alibi.as_ref().map(|a| a.view()).transpose()?);
                let seqs = meta.varlen(checked)?;
                let launch = || {
                    // SAFETY: the null stream; every buffer lives until after the
                    // synchronisation.
                    unsafe {
                        ctx.forward_varlen_on_stream(
                            &q.view()?,
                            &k.view()?,
                            &v.view()?,
                            &mut out.view_mut()?,
                            Some(&mut lse.view_mut()?),
                            &seqs,
                            &params,
                            std::ptr::null_mut(),
                        )
                    }
                };
                let ms = run_or_time(ordinal, timing, launch)?;
                (take(&out)?, take(&lse)?, ms)
            };
            bytes_mut(&mut self.out.storage).copy_from_slice(&out);
            bytes_mut(&mut self.lse.storage).copy_from_slice(&lse);
            Ok(ms)
        }

        /// Runs forward and backward on CUDA device `ordinal` and brings the gradients back.
        pub fn run_backward_cuda(&mut self, ctx: &Context, ordinal: u32) -> Result<()> {
            self.launch_backward_cuda(ctx, ordinal, None).map(drop)
        }

        /// Median milliseconds of `iters` backward calls (after one forward and `warmup`
        /// untimed backward calls) on CUDA device `ordinal`.
        pub fn time_cuda_backward(
            &mut self,
            ctx: &Context,
            ordinal: u32,
            warmup: usize,
            iters: usize,
        ) -> Result<f64> {
            let ms = self.launch_backward_cuda(ctx, ordinal, Some((warmup, iters)))?;
            Ok(ms.expect("timed"))
        }

        fn launch_backward_cuda(
            &mut self,
            ctx: &Context,
            ordinal: u32,
            timing: Option<(usize, usize)>,
        ) -> Result<Option<f64>> {
            self.run_cuda(ctx, ordinal, false)?;
            self.grad_tensors();
            let (grads, ms) = {
                let [dout, dq, dk, dv] = self.grads.as_ref().expect("made above");
                let dev = [
                    &self.q, &self.k, &self.v, &self.out, dout, &self.lse, dq, dk, dv,
                ]
                .into_iter()
                .map(|t| up(t, ordinal))
                .collect::<Result<Vec<_>>>()?;
                let alibi = up_opt(self.alibi.as_ref(), ordinal)?;
                let meta = DeviceMeta::new(&self.meta, ordinal)?;
                let params = self
                    .case
                    .f
                    .params_with(alibi.as_ref().map(|a| a.view()).transpose()?);
                let seqs = meta.varlen(false)?;
                let inputs = BackwardInputs {
                    q: dev[0].view()?,
                    k: dev[1].view()?,
                    v: dev[2].view()?,
                    out: dev[3].view()?,
                    dout: dev[4].view()?,
                    lse: dev[5].view()?,
                };
                let launch = || {
                    let mut g = Gradients {
                        dq: dev[6].view_mut()?,
                        dk: dev[7].view_mut()?,
                        dv: dev[8].view_mut()?,
                    };
                    // SAFETY: as in launch_cuda.
                    unsafe {
                        ctx.backward_varlen_on_stream(
                            &inputs,
                            &mut g,
                            &seqs,
                            &params,
                            std::ptr::null_mut(),
                        )
                    }
                };
                let ms = run_or_time(ordinal, timing, launch)?;
                ([take(&dev[6])?, take(&dev[7])?, take(&dev[8])?], ms)
            };
            let [_, dq, dk, dv] = self.grads.as_mut().expect("made above");
            for (t, b) in [dq, dk, dv].into_iter().zip(grads) {
                bytes_mut(&mut t.storage).copy_from_slice(&b);
            }
            Ok(ms)
        }
    }

    impl KvCacheInstance {
        /// Runs the call on CUDA device `ordinal` (checked: the metadata checked on the host
        /// too) and brings out, the LSE and the cache back.
        pub fn run_cuda(&mut self, ctx: &Context, ordinal: u32, checked: bool) -> Result<()> {
            self.launch_cuda(ctx, ordinal, checked, None).map(drop)
        }

        /// Median milliseconds of `iters` calls on CUDA device `ordinal`, after `warmup`
        /// untimed ones. `cache_seqlens` does not advance, so every call appends to the same
        /// slots: each is the same decoding step.
        pub fn time_cuda(
            &mut self,
            ctx: &Context,
            ordinal: u32,
            warmup: usize,
            iters: usize,
        ) -> Result<f64> {
            let ms = self.launch_cuda(ctx, ordinal, false, Some((warmup, iters)))?;
            Ok(ms.expect("timed"))
        }

        fn launch_cuda(
            &mut self,
            ctx: &Context,
            ordinal: u32,
            checked: bool,
            timing: Option<(usize, usize)>,
        ) -> Result<Option<f64>> {
            let downloads = {
                let (q, kc, vc, lens) = (
                    up(&self.q, ordinal)?,
                    up(&self.k_cache, ordinal)?,
                    up(&self.v_cache, ordinal)?,
                    up(&self.seqlens, ordinal)?,
                );
                let (out, lse) = (up(&self.out, ordinal)?, up(&self.lse, ordinal)?);
                let table = up_opt(self.table.as_ref(), ordinal)?;
                let idx = up_opt(self.batch_idx.as_ref(), ordinal)?;
                let n = &self.new;
                let (kn, vn) = (
                    up_opt(n.k.as_ref(), ordinal)?,
                    up_opt(n.v.as_ref(), ordinal)?,
                );
                let (cos, sin) = (
                    up_opt(n.cos.as_ref(), ordinal)?,
                    up_opt(n.sin.as_ref(), ordinal)?,
                );
                let alibi = up_opt(self.alibi.as_ref(), ordinal)?;
                let params = self
                    .case
                    .f
                    .params_with(alibi.as_ref().map(|a| a.view()).transpose()?);
                let append = match (&kn, &vn) {
                    (Some(k), Some(v)) => Some(KvAppend {
                        k: k.view()?,
                        v: v.view()?,
                        rotary: match (&cos, &sin) {
                            (Some(c), Some(s)) => Some(Rotary {
                                cos: c.view()?,
                                sin: s.view()?,
                                interleaved: n.interleaved,
                            }),
                            _ => None,
                        },
                    }),
                    _ => None,
                };
                let launch = || {
                    let mut cache = KvCache {
                        k: kc.view_mut()?,
                        v: vc.view_mut()?,
                        seqlens: lens.view()?,
                        block_table: table.as_ref().map(|t| t.view()).transpose()?,
                        batch_idx: idx.as_ref().map(|t| t.view()).transpose()?,
                        checked,
                    };
                    // SAFETY: as in VarlenInstance::launch_cuda.
                    unsafe {
                        ctx.forward_kvcache_on_stream(
                            &q.view()?,
                            &mut cache,
                            append.as_ref(),
                            &mut out.view_mut()?,
                            Some(&mut lse.view_mut()?),
                            &params,
                            None,
                            std::ptr::null_mut(),
                        )
                    }
                };
                let r = run_or_time(ordinal, timing, launch);
                // The cache comes back whether or not the call succeeded (a rejected call must
                // leave it as it was).
                let cache_bytes = (take(&kc)?, take(&vc)?);
                let ms = r?;
                (take(&out)?, take(&lse)?, cache_bytes, ms)
            };
            let (out, lse, (kc, vc), ms) = downloads;
            bytes_mut(&mut self.out.storage).copy_from_slice(&out);
            bytes_mut(&mut self.lse.storage).copy_from_slice(&lse);
            bytes_mut(&mut self.k_cache.storage).copy_from_slice(&kc);
            bytes_mut(&mut self.v_cache.storage).copy_from_slice(&vc);
            Ok(ms)
        }

        /// Sets `cache_seqlens[b]` (to make a call invalid).
        pub fn set_cache_len(&mut self, b: usize, n: i32) {
            if let Storage::I32(v) = &mut self.seqlens.storage {
                v[b] = n;
            }
        }
    }

    impl MergeInstance {
        /// Merges on CUDA device `ordinal` and brings the output back.
        pub fn run_cuda(&mut self, ctx: &Context, ordinal: u32) -> Result<()> {
            let (out, lse) = {
                let outs = self
                    .outs
                    .iter()
                    .map(|t| up(t, ordinal))
                    .collect::<Result<Vec<_>>>()?;
                let lses = self
                    .lses
                    .iter()
                    .map(|t| up(t, ordinal))
                    .collect::<Result<Vec<_>>>()?;
                let (out, lse) = if self.case.in_place {
                    (None, None)
                } else {
                    (Some(up(&self.out, ordinal)?), Some(up(&self.lse, ordinal)?))
                };
                let states = outs
                    .iter()
                    .zip(&lses)
                    .map(|(o, l)| {
                        Ok(AttentionState {
                            out: o.view()?,
                            lse: l.view()?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let (o_dev, l_dev) = match (&out, &lse) {
                    (Some(o), Some(l)) => (o, l),
                    _ => (&outs[0], &lses[0]),
                };
                // SAFETY: as in VarlenInstance::run_cuda; in place, the output is states[0].
                unsafe {
                    ctx.merge_states_on_stream(
                        &states,
                        &mut o_dev.view_mut()?,
                        Some(&mut l_dev.view_mut()?),
                        std::ptr::null_mut(),
                    )?
                };
                synchronize(ordinal)?;
                (take(o_dev)?, take(l_dev)?)
            };
            let (o, l) = if self.case.in_place {
                (&mut self.outs[0], &mut self.lses[0])
            } else {
                (&mut self.out, &mut self.lse)
            };
            bytes_mut(&mut o.storage).copy_from_slice(&out);
            bytes_mut(&mut l.storage).copy_from_slice(&lse);
            Ok(())
        }
    }

    /// [`super::check_varlen`] on CUDA device `ordinal`.
    pub fn check_varlen_cuda(
        ctx: &Context,
        case: &VarlenCase,
        seed: u64,
        ordinal: u32,
    ) -> Result<Comparison> {
        let mut inst = VarlenInstance::new(case, seed);
        inst.run_cuda(ctx, ordinal, false)?;
        inst.compare()
    }

    /// [`super::check_varlen_grads`] on CUDA device `ordinal`.
    pub fn check_varlen_grads_cuda(
        ctx: &Context,
        case: &VarlenCase,
        seed: u64,
        ordinal: u32,
    ) -> Result<GradComparison> {
        let mut inst = VarlenInstance::new(case, seed);
        inst.run_backward_cuda(ctx, ordinal)?;
        inst.compare_grads()
    }

    /// [`super::check_kvcache`] on CUDA device `ordinal`.
    pub fn check_kvcache_cuda(
        ctx: &Context,
        case: &KvCacheCase,
        seed: u64,
        ordinal: u32,
    ) -> Result<Comparison> {
        let mut inst = KvCacheInstance::new(case, seed);
        inst.run_cuda(ctx, ordinal, false)?;
        inst.compare()
    }

    /// [`super::check_merge`] on CUDA device `ordinal`.
    pub fn check_merge_cuda(
        ctx: &Context,
        case: &MergeCase,
        seed: u64,
        ordinal: u32,
    ) -> Result<Comparison> {
        let mut inst = MergeInstance::new(case, seed);
        inst.run_cuda(ctx, ordinal)?;
        inst.compare(&MergeInstance::new(case, seed))
    }
}
