//! Concurrency stress on the CPU: many threads calling one shared [`Context`] at once (and, in
//! the other tests, contexts of their own, and contexts created and dropped while others
//! compute), mixing dense forwards with and without the LSE, backwards, packed (varlen)
//! forwards and backwards and KV-cache calls over several shapes and all three float dtypes.
//! Every result is compared byte for byte with the same call run up front on a one-thread
//! context: the CPU backend promises bitwise-identical results whatever the thread count or the
//! other calls in flight, so any difference is a race, a shared buffer leaking between calls or
//! a schedule that depends on timing.
//!
//! Outputs are poisoned (all bits set: NaN in every float type) before every call and KV caches
//! restored to their initial contents, so a call that writes nothing, or only part of its
//! output, shows as a difference too.

use half::{bf16, f16};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::{Arc, Barrier};
use std::time::Instant;
use ufa::{
    AttentionParams, BackwardInputs, Context, DType, Gradients, KvAppend, KvCache, Rotary,
    TensorView, TensorViewMut, Varlen,
};

/// Threads sharing one context: 8 per core of the 2-core CI machine, so that the scheduler
/// preempts callers all the time in the middle of a call (validation, the shared workspace's
/// lock, the thread pool's queue), which is where interleavings that a race needs come from.
const THREADS: usize = 16;

/// Calls each thread makes: 16 × 10^4 = 160 000 calls over the 24 cases below, so every case
/// runs thousands of times alongside every other kind of call, while the shapes are small
/// enough (3 to 180 µs a call, 35 on average) that each test takes about 10 s on the 2-core CI
/// machine in `cargo test --release`.
const CALLS_PER_THREAD: usize = 10_000;

/// Threads of the shared context's pool: more than the CI machine's cores, so that its workers
/// too are preempted mid-item, and fixed so that the test is the same on every machine.
const POOL_THREADS: usize = 4;

/// Contexts each churning thread creates, uses and drops while the others compute.
const CHURN_CONTEXTS: usize = 100;

/// Mismatches listed in a failure message (the count covers them all).
const SHOWN: usize = 10;

/// Owned data of one tensor.
enum Buf {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    I32(Vec<i32>),
}

/// The bytes of a slice of plain numbers.
/// The backward's inputs ([q, k, v, out, dout, lse]) and gradients ([dq, dk, dv]) as views.
fn backward_io<'a>(ins: [&'a T; 6], grads: [&'a mut T; 3]) -> (BackwardInputs<'a>, Gradients<'a>) {
    let [q, k, v, out, dout, lse] = ins;
    let [dq, dk, dv] = grads;
    (
        BackwardInputs {
            q: q.view(),
            k: k.view(),
            v: v.view(),
            out: out.view(),
            dout: dout.view(),
            lse: lse.view(),
        },
        Gradients {
            dq: dq.view_mut(),
            dk: dk.view_mut(),
            dv: dv.view_mut(),
        },
    )
}

fn raw<X>(v: &[X]) -> &[u8] {
    // SAFETY: f32, f16, bf16 and i32 have no padding and every byte is initialised.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

fn raw_mut<X>(v: &mut [X]) -> &mut [u8] {
    // SAFETY: as above; every bit pattern is a valid f32, f16, bf16 or i32.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, std::mem::size_of_val(v)) }
}

impl Buf {
    fn bytes(&self) -> &[u8] {
        match self {
            Buf::F32(v) => raw(v),
            Buf::F16(v) => raw(v),
            Buf::BF16(v) => raw(v),
            Buf::I32(v) => raw(v),
        }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Buf::F32(v) => raw_mut(v),
            Buf::F16(v) => raw_mut(v),
            Buf::BF16(v) => raw_mut(v),
            Buf::I32(v) => raw_mut(v),
        }
    }

    fn elem_size(&self) -> usize {
        match self {
            Buf::F32(_) | Buf::I32(_) => 4,
            Buf::F16(_) | Buf::BF16(_) => 2,
        }
    }
}

/// A contiguous tensor.
struct T {
    buf: Buf,
    shape: Vec<usize>,
}

impl T {
    fn random(shape: &[usize], dtype: DType, rng: &mut ChaCha8Rng, amp: f32) -> T {
        let n = shape.iter().product();
        let mut x = || rng.gen_range(-amp..amp);
        let buf = match dtype {
            DType::F32 => Buf::F32((0..n).map(|_| x()).collect()),
            DType::F16 => Buf::F16((0..n).map(|_| f16::from_f32(x())).collect()),
            DType::BF16 => Buf::BF16((0..n).map(|_| bf16::from_f32(x())).collect()),
            _ => unreachable!("float tensors only"),
        };
        T {
            buf,
            shape: shape.to_vec(),
        }
    }

    /// An output: every bit set, which is NaN in every float type.
    fn poisoned(shape: &[usize], dtype: DType) -> T {
        let n = shape.iter().product();
        let buf = match dtype {
            DType::F32 => Buf::F32(vec![0.0; n]),
            DType::F16 => Buf::F16(vec![f16::ZERO; n]),
            DType::BF16 => Buf::BF16(vec![bf16::ZERO; n]),
            _ => unreachable!("float tensors only"),
        };
        let mut t = T {
            buf,
            shape: shape.to_vec(),
        };
        t.poison();
        t
    }

    fn ints(v: Vec<i32>, shape: &[usize]) -> T {
        T {
            buf: Buf::I32(v),
            shape: shape.to_vec(),
        }
    }

    fn poison(&mut self) {
        self.buf.bytes_mut().fill(0xff);
    }

    /// Whether no element still holds the poison.
    fn fully_written(&self) -> bool {
        let e = self.buf.elem_size();
        self.buf
            .bytes()
            .chunks(e)
            .all(|c| c.iter().any(|&b| b != 0xff))
    }

    fn view(&self) -> TensorView<'_> {
        let s = &self.shape;
        match &self.buf {
            Buf::F32(v) => TensorView::new(v, s),
            Buf::F16(v) => TensorView::new(v, s),
            Buf::BF16(v) => TensorView::new(v, s),
            Buf::I32(v) => TensorView::new(v, s),
        }
        .expect("a valid view")
    }

    fn view_mut(&mut self) -> TensorViewMut<'_> {
        let s = &self.shape;
        match &mut self.buf {
            Buf::F32(v) => TensorViewMut::new(v, s),
            Buf::F16(v) => TensorViewMut::new(v, s),
            Buf::BF16(v) => TensorViewMut::new(v, s),
            Buf::I32(v) => TensorViewMut::new(v, s),
        }
        .expect("a valid view")
    }
}

/// Masking and score modifiers of a case.
#[derive(Clone, Copy, Debug, Default)]
struct Scores {
    causal: bool,
    window: Option<(i64, i64)>,
    softcap: f32,
}

impl Scores {
    fn causal() -> Scores {
        Scores {
            causal: true,
            ..Scores::default()
        }
    }

    fn params(&self) -> AttentionParams<'static> {
        let (l, r) = self.window.unwrap_or((-1, -1));
        AttentionParams::default()
            .causal(self.causal)
            .window(l, r)
            .softcap(self.softcap)
    }
}

/// One call with its inputs; its outputs are in [`Call::outs`].
enum Kind {
    Dense {
        q: T,
        k: T,
        v: T,
    },
    Backward {
        q: T,
        k: T,
        v: T,
        out: T,
        dout: T,
        lse: T,
    },
    Varlen {
        q: T,
        k: T,
        v: T,
        cu_q: T,
        cu_kv: T,
        max: (usize, usize),
        /// The backward's (out, dout, lse); None: the forward.
        grad_of: Option<(T, T, T)>,
    },
    KvCache {
        q: T,
        /// The caches' contents before the call (outs[2] and outs[3] are the caches).
        k_init: Vec<u8>,
        v_init: Vec<u8>,
        seqlens: T,
        block_table: Option<T>,
        new: Option<(T, T)>,
        rotary: Option<(T, T)>,
    },
}

struct Call {
    what: String,
    scores: Scores,
    kind: Kind,
    /// Outputs in a fixed order: out[, lse] for forwards, dq, dk, dv for backwards, out, lse,
    /// k_cache, v_cache for KV-cache calls.
    outs: Vec<T>,
}

impl Call {
    /// Poisons the outputs (restoring a KV cache instead), then runs the call on `ctx`.
    fn run(&mut self, ctx: &Context) -> ufa::Result<()> {
        let params = self.scores.params();
        match &self.kind {
            Kind::KvCache { k_init, v_init, .. } => {
                self.outs[0].poison();
                self.outs[1].poison();
                self.outs[2].buf.bytes_mut().copy_from_slice(k_init);
                self.outs[3].buf.bytes_mut().copy_from_slice(v_init);
            }
            _ => self.outs.iter_mut().for_each(T::poison),
        }
        match (&self.kind, &mut self.outs[..]) {
            (Kind::Dense { q, k, v, .. }, [out]) => ctx.forward(
                &q.view(),
                &k.view(),
                &v.view(),
                &mut out.view_mut(),
                &params,
            ),
            (Kind::Dense { q, k, v, .. }, [out, lse]) => ctx.forward_with_lse(
                &q.view(),
                &k.view(),
                &v.view(),
                &mut out.view_mut(),
                Some(&mut lse.view_mut()),
                &params,
            ),
            (
                Kind::Backward {
                    q,
                    k,
                    v,
                    out,
                    dout,
                    lse,
                },
                [dq, dk, dv],
            ) => {
                let (inputs, mut grads) = backward_io([q, k, v, out, dout, lse], [dq, dk, dv]);
                ctx.backward(&inputs, &mut grads, &params)
            }
            (
                Kind::Varlen {
                    q,
                    k,
                    v,
                    cu_q,
                    cu_kv,
                    max,
                    grad_of,
                },
                outs,
            ) => {
                let seqs = Varlen::new(cu_q.view(), cu_kv.view(), max.0, max.1);
                match (grad_of, outs) {
                    (None, [out, lse]) => ctx.forward_varlen(
                        &q.view(),
                        &k.view(),
                        &v.view(),
                        &mut out.view_mut(),
                        Some(&mut lse.view_mut()),
                        &seqs,
                        &params,
                    ),
                    (Some((out, dout, lse)), [dq, dk, dv]) => {
                        let (inputs, mut grads) =
                            backward_io([q, k, v, out, dout, lse], [dq, dk, dv]);
                        ctx.backward_varlen(&inputs, &mut grads, &seqs, &params)
                    }
                    _ => unreachable!("varlen outputs"),
                }
            }
            (
                Kind::KvCache {
                    q,
                    seqlens,
                    block_table,
                    new,
                    rotary,
                    ..
                },
                [out, lse, k_cache, v_cache],
            ) => {
                let mut cache = KvCache {
                    k: k_cache.view_mut(),
                    v: v_cache.view_mut(),
                    seqlens: seqlens.view(),
                    block_table: block_table.as_ref().map(T::view),
                    batch_idx: None,
                    checked: false,
                };
                let append = new.as_ref().map(|(k, v)| KvAppend {
                    k: k.view(),
                    v: v.view(),
                    rotary: rotary.as_ref().map(|(cos, sin)| Rotary {
                        cos: cos.view(),
                        sin: sin.view(),
                        interleaved: false,
                    }),
                });
                ctx.forward_kvcache(
                    &q.view(),
                    &mut cache,
                    append.as_ref(),
                    &mut out.view_mut(),
                    Some(&mut lse.view_mut()),
                    &params,
                )
            }
            _ => unreachable!("outputs match the kind"),
        }
    }

    /// The outputs' bytes, one after another.
    fn result(&self) -> Vec<u8> {
        self.outs
            .iter()
            .flat_map(|t| t.buf.bytes())
            .copied()
            .collect()
    }

    /// Whether the outputs hold exactly `expected` (no allocation: this runs on every call).
    fn matches(&self, expected: &[u8]) -> bool {
        let mut rest = expected;
        for t in &self.outs {
            let b = t.buf.bytes();
            if rest.len() < b.len() || rest[..b.len()] != *b {
                return false;
            }
            rest = &rest[b.len()..];
        }
        rest.is_empty()
    }

    /// Whether every output the call must write is written (KV caches are not poisoned).
    fn fully_written(&self) -> bool {
        let n = match self.kind {
            Kind::KvCache { .. } => 2,
            _ => self.outs.len(),
        };
        self.outs[..n].iter().all(T::fully_written)
    }
}

/// A dense problem's sizes: batch, seqlen_q, seqlen_kv, heads_q, heads_kv, head_dim.
type Dims = (usize, usize, usize, usize, usize, usize);

fn dense(dims: Dims, dtype: DType, out_dtype: DType, s: Scores, lse: bool, seed: u64) -> Call {
    let (b, sq, skv, hq, hkv, d) = dims;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut outs = vec![T::poisoned(&[b, sq, hq, d], out_dtype)];
    if lse {
        outs.push(T::poisoned(&[b, hq, sq], DType::F32));
    }
    Call {
        what: format!(
            "{} b{b} sq{sq} skv{skv} h{hq}/{hkv} d{d} {dtype}->{out_dtype} {s:?}",
            if lse { "forward_with_lse" } else { "forward" }
        ),
        scores: s,
        kind: Kind::Dense {
            q: T::random(&[b, sq, hq, d], dtype, &mut rng, 1.5),
            k: T::random(&[b, skv, hkv, d], dtype, &mut rng, 1.5),
            v: T::random(&[b, skv, hkv, d], dtype, &mut rng, 1.0),
        },
        outs,
    }
}

/// A backward call whose out and LSE come from a forward on `ctx`.
fn backward(dims: Dims, dtype: DType, s: Scores, seed: u64, ctx: &Context) -> Call {
    let (b, sq, skv, hq, hkv, d) = dims;
    let mut fwd = dense(dims, dtype, dtype, s, true, seed);
    fwd.run(ctx).expect("the forward of a backward case");
    let Kind::Dense { q, k, v, .. } = fwd.kind else {
        unreachable!()
    };
    let mut outs = fwd.outs.into_iter();
    let (out, lse) = (outs.next().unwrap(), outs.next().unwrap());
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    Call {
        what: format!("backward b{b} sq{sq} skv{skv} h{hq}/{hkv} d{d} {dtype} {s:?}"),
        scores: s,
        kind: Kind::Backward {
            dout: T::random(&[b, sq, hq, d], dtype, &mut rng, 1.0),
            q,
            k,
            v,
            out,
            lse,
        },
        outs: vec![
            T::poisoned(&[b, sq, hq, d], dtype),
            T::poisoned(&[b, skv, hkv, d], dtype),
            T::poisoned(&[b, skv, hkv, d], dtype),
        ],
    }
}

fn cumulative(lens: &[usize]) -> Vec<i32> {
    std::iter::once(0)
        .chain(lens.iter().scan(0, |acc, &n| {
            *acc += n as i32;
            Some(*acc)
        }))
        .collect()
}

/// A packed batch: sequence lengths of q and kv, heads_q, heads_kv, head_dim.
type Packed<'a> = (&'a [usize], &'a [usize], usize, usize, usize);

fn varlen(p: Packed<'_>, dtype: DType, s: Scores, seed: u64) -> Call {
    let (lq, lkv, hq, hkv, d) = p;
    let (tq, tkv) = (lq.iter().sum::<usize>(), lkv.iter().sum::<usize>());
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let max = |l: &[usize]| l.iter().copied().max().unwrap_or(0);
    Call {
        what: format!("forward_varlen q{lq:?} kv{lkv:?} h{hq}/{hkv} d{d} {dtype} {s:?}"),
        scores: s,
        kind: Kind::Varlen {
            q: T::random(&[tq, hq, d], dtype, &mut rng, 1.5),
            k: T::random(&[tkv, hkv, d], dtype, &mut rng, 1.5),
            v: T::random(&[tkv, hkv, d], dtype, &mut rng, 1.0),
            cu_q: T::ints(cumulative(lq), &[lq.len() + 1]),
            cu_kv: T::ints(cumulative(lkv), &[lkv.len() + 1]),
            max: (max(lq), max(lkv)),
            grad_of: None,
        },
        outs: vec![
            T::poisoned(&[tq, hq, d], dtype),
            T::poisoned(&[hq, tq], DType::F32),
        ],
    }
}

/// The backward of a packed batch, its out and LSE from a forward on `ctx`.
fn varlen_backward(p: Packed<'_>, dtype: DType, s: Scores, seed: u64, ctx: &Context) -> Call {
    let mut fwd = varlen(p, dtype, s, seed);
    fwd.run(ctx).expect("the forward of a varlen backward case");
    let mut outs = fwd.outs.into_iter();
    let (out, lse) = (outs.next().unwrap(), outs.next().unwrap());
    let Kind::Varlen {
        q,
        k,
        v,
        cu_q,
        cu_kv,
        max,
        ..
    } = fwd.kind
    else {
        unreachable!()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    let dout = T::random(&out.shape, dtype, &mut rng, 1.0);
    let outs = vec![
        T::poisoned(&q.shape, dtype),
        T::poisoned(&k.shape, dtype),
        T::poisoned(&v.shape, dtype),
    ];
    Call {
        what: fwd.what.replace("forward_varlen", "backward_varlen"),
        scores: s,
        kind: Kind::Varlen {
            q,
            k,
            v,
            cu_q,
            cu_kv,
            max,
            grad_of: Some((out, dout, lse)),
        },
        outs,
    }
}

/// A KV-cache call's shape: seqlen_q, keys cached per sequence, keys appended, heads_q,
/// heads_kv, head_dim, and the page size of a paged cache (None: dense).
struct Cache<'a> {
    sq: usize,
    cached: &'a [usize],
    new: usize,
    heads: (usize, usize),
    d: usize,
    page: Option<usize>,
    rotary: bool,
}

fn kvcache(c: Cache<'_>, dtype: DType, s: Scores, seed: u64) -> Call {
    let (b, (hq, hkv), d) = (c.cached.len(), c.heads, c.d);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let longest = c.cached.iter().max().unwrap() + c.new;
    // Dense: 3 spare slots per sequence; paged: the pages each sequence needs, shuffled, and
    // 2 spare pages (unused block-table entries hold -1, which must never be followed).
    let (outer, rows, block_table) = match c.page {
        None => (b, longest + 3, None),
        Some(ps) => {
            let need: Vec<usize> = c.cached.iter().map(|n| (n + c.new).div_ceil(ps)).collect();
            let max_pages = need.iter().max().unwrap() + 1;
            let pages = need.iter().sum::<usize>() + 2;
            let mut ids: Vec<i32> = (0..pages as i32).collect();
            ids.shuffle(&mut rng);
            let mut next = ids.into_iter();
            let mut table = vec![-1; b * max_pages];
            for (i, &n) in need.iter().enumerate() {
                for j in 0..n {
                    table[i * max_pages + j] = next.next().unwrap();
                }
            }
            (pages, ps, Some(T::ints(table, &[b, max_pages])))
        }
    };
    let q = T::random(&[b, c.sq, hq, d], dtype, &mut rng, 1.5);
    let k_cache = T::random(&[outer, rows, hkv, d], dtype, &mut rng, 1.5);
    let v_cache = T::random(&[outer, rows, hkv, d], dtype, &mut rng, 1.0);
    let new = (c.new > 0).then(|| {
        (
            T::random(&[b, c.new, hkv, d], dtype, &mut rng, 1.5),
            T::random(&[b, c.new, hkv, d], dtype, &mut rng, 1.0),
        )
    });
    // Rotary tables over every position a key or query can take, rotating all of head_dim.
    let rotary = c.rotary.then(|| {
        let n = longest + c.sq + 1;
        let angle = |i: usize| (i / (d / 2)) as f64 * 0.37f64.powi((i % (d / 2)) as i32 + 1);
        let table = |g: fn(f64) -> f64| {
            let vals = (0..n * d / 2).map(|i| g(angle(i)) as f32).collect();
            T {
                buf: Buf::F32(vals),
                shape: vec![n, d / 2],
            }
        };
        (table(f64::cos), table(f64::sin))
    });
    Call {
        what: format!(
            "forward_kvcache sq{} cached{:?} new{} h{hq}/{hkv} d{d} {dtype} page{:?} rotary{} {s:?}",
            c.sq, c.cached, c.new, c.page, c.rotary
        ),
        scores: s,
        kind: Kind::KvCache {
            q,
            k_init: k_cache.buf.bytes().to_vec(),
            v_init: v_cache.buf.bytes().to_vec(),
            seqlens: T::ints(c.cached.iter().map(|&n| n as i32).collect(), &[b]),
            block_table,
            new,
            rotary,
        },
        outs: vec![
            T::poisoned(&[b, c.sq, hq, d], dtype),
            T::poisoned(&[b, hq, c.sq], DType::F32),
            k_cache,
            v_cache,
        ],
    }
}

/// The mix of calls. Most are tiny, computed on the calling thread; those marked "pool" have
/// at least 2^20 multiply-adds and go through the context's thread pool; those marked
/// "split-KV" decode one query over 2100 keys, which splits the keys and merges the parts in the
/// context's shared workspace (as every backward does with its partial dQ). `ctx` runs the
/// forwards whose outputs the backward cases read.
fn cases(ctx: &Context) -> Vec<Call> {
    use DType::{BF16, F16, F32};
    let none = Scores::default;
    let causal = Scores::causal;
    let window = Scores {
        window: Some((4, 0)),
        ..Scores::default()
    };
    let capped = Scores {
        softcap: 5.0,
        ..Scores::default()
    };
    let both = Scores {
        window: Some((3, 3)),
        softcap: 8.0,
        ..Scores::default()
    };
    let mut seed = 0u64;
    let mut next = || {
        seed += 1;
        seed
    };
    vec![
        dense((1, 7, 13, 2, 1, 16), F32, F32, causal(), false, next()),
        dense((2, 1, 24, 4, 2, 32), F16, F16, none(), false, next()),
        dense((1, 16, 16, 3, 3, 8), BF16, BF16, window, false, next()),
        dense((1, 5, 9, 2, 2, 24), BF16, F32, capped, false, next()),
        // split-KV
        dense((1, 1, 2100, 1, 1, 16), F32, F32, none(), false, next()),
        // pool
        dense((1, 64, 64, 4, 4, 32), F32, F32, causal(), false, next()),
        dense((1, 24, 24, 4, 2, 32), F32, F32, none(), true, next()),
        // More queries than keys, bottom-right causal: the first rows see no key (LSE -inf).
        dense((1, 9, 3, 2, 2, 16), F16, F16, causal(), true, next()),
        dense((2, 12, 20, 2, 1, 32), BF16, BF16, both, true, next()),
        // split-KV
        dense((1, 1, 2100, 2, 1, 8), BF16, BF16, none(), true, next()),
        // pool
        dense((1, 64, 64, 4, 2, 32), BF16, BF16, none(), true, next()),
        backward((1, 8, 12, 2, 1, 16), F32, causal(), next(), ctx),
        backward((1, 16, 16, 2, 2, 32), BF16, none(), next(), ctx),
        backward((1, 5, 20, 1, 1, 8), F16, both, next(), ctx),
        // pool
        backward((1, 64, 64, 4, 4, 32), F32, causal(), next(), ctx),
        varlen((&[3, 0, 7], &[5, 2, 7], 2, 1, 16), F32, causal(), next()),
        varlen(
            (&[1, 1, 1, 1], &[20, 3, 1, 9], 4, 2, 32),
            BF16,
            none(),
            next(),
        ),
        varlen_backward((&[4, 9], &[6, 9], 2, 2, 16), F32, causal(), next(), ctx),
        varlen_backward((&[6, 0, 3], &[4, 5, 8], 2, 1, 8), F16, window, next(), ctx),
        kvcache(
            Cache {
                sq: 1,
                cached: &[5, 11],
                new: 1,
                heads: (2, 1),
                d: 16,
                page: None,
                rotary: false,
            },
            F32,
            causal(),
            next(),
        ),
        kvcache(
            Cache {
                sq: 3,
                cached: &[20],
                new: 3,
                heads: (4, 2),
                d: 32,
                page: None,
                rotary: true,
            },
            BF16,
            causal(),
            next(),
        ),
        kvcache(
            Cache {
                sq: 1,
                cached: &[6, 3],
                new: 1,
                heads: (2, 2),
                d: 16,
                page: Some(4),
                rotary: false,
            },
            F16,
            causal(),
            next(),
        ),
        // split-KV, appending into a long cache
        kvcache(
            Cache {
                sq: 1,
                cached: &[2100],
                new: 1,
                heads: (1, 1),
                d: 16,
                page: None,
                rotary: false,
            },
            F16,
            none(),
            next(),
        ),
        // Nothing appended.
        kvcache(
            Cache {
                sq: 2,
                cached: &[9],
                new: 0,
                heads: (1, 1),
                d: 8,
                page: None,
                rotary: false,
            },
            F32,
            none(),
            next(),
        ),
    ]
}

/// Each case run once on a one-thread context, in order: the results every other run must
/// reproduce bit for bit. Checks that each wrote all of its outputs (so a call that writes
/// nothing cannot pass by matching an equally unwritten expectation).
fn expected(reference: &Context) -> Vec<Vec<u8>> {
    cases(reference)
        .into_iter()
        .map(|mut c| {
            c.run(reference)
                .unwrap_or_else(|e| panic!("{}: {e}", c.what));
            assert!(c.fully_written(), "{}: outputs left unwritten", c.what);
            c.result()
        })
        .collect()
}

fn one_thread() -> Context {
    Context::builder().num_threads(1).build().unwrap()
}

/// What a thread found: how many calls it made and the calls that did not reproduce the
/// expected bytes or failed.
#[derive(Default)]
struct Tally {
    calls: usize,
    bad: usize,
    shown: Vec<String>,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.calls += other.calls;
        self.bad += other.bad;
        self.shown.extend(
            other
                .shown
                .into_iter()
                .take(SHOWN - self.shown.len().min(SHOWN)),
        );
    }

    fn assert_clean(&self, what: &str) {
        assert!(
            self.bad == 0,
            "{what}: {} of {} calls differ from the single-threaded run or failed:\n{}",
            self.bad,
            self.calls,
            self.shown.join("\n")
        );
    }
}

/// `n` calls on `ctx` of cases drawn at random (from `seed`, so each thread runs its own
/// order), each checked against `expected`.
fn hammer(ctx: &Context, calls: &mut [Call], expected: &[Vec<u8>], n: usize, seed: u64) -> Tally {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut t = Tally::default();
    for i in 0..n {
        let c = rng.gen_range(0..calls.len());
        let call = &mut calls[c];
        let wrong = match call.run(ctx) {
            Ok(()) if call.matches(&expected[c]) => None,
            Ok(()) => Some("output differs".to_string()),
            Err(e) => Some(format!("error: {e}")),
        };
        if let Some(w) = wrong {
            t.bad += 1;
            if t.shown.len() < SHOWN {
                t.shown
                    .push(format!("thread seed {seed}, call {i}: {}: {w}", call.what));
            }
        }
        t.calls += 1;
    }
    t
}

/// Runs `threads` threads, each calling [`hammer`] `calls` times on the context `ctx_for`
/// gives it (the shared one, or its own), all released at once; returns the combined tally.
fn run_threads(
    threads: usize,
    calls: usize,
    ctx_for: impl Fn(usize) -> Arc<Context> + Sync,
    expected: &Arc<Vec<Vec<u8>>>,
) -> Tally {
    let reference = one_thread();
    let start = Arc::new(Barrier::new(threads));
    let mut tally = Tally::default();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                // Built here, on one thread: the backward cases' inputs come from `reference`.
                let mut mine = cases(&reference);
                let (ctx, start, expected) = (ctx_for(i), start.clone(), expected.clone());
                s.spawn(move || {
                    start.wait();
                    hammer(&ctx, &mut mine, &expected, calls, 1000 + i as u64)
                })
            })
            .collect();
        for h in handles {
            tally.add(h.join().expect("a stress thread panicked"));
        }
    });
    tally
}

#[test]
fn one_shared_context_many_threads_bitwise() {
    let expected = Arc::new(expected(&one_thread()));
    let shared = Arc::new(
        Context::builder()
            .num_threads(POOL_THREADS)
            .build()
            .unwrap(),
    );
    let t0 = Instant::now();
    let tally = run_threads(THREADS, CALLS_PER_THREAD, |_| shared.clone(), &expected);
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "shared context: {THREADS} threads x {CALLS_PER_THREAD} calls = {} calls over {} cases \
         in {secs:.2} s ({:.0} calls/s)",
        tally.calls,
        expected.len(),
        tally.calls as f64 / secs
    );
    assert_eq!(tally.calls, THREADS * CALLS_PER_THREAD);
    tally.assert_clean("shared context");
}

#[test]
fn a_context_per_thread_bitwise() {
    let expected = Arc::new(expected(&one_thread()));
    let t0 = Instant::now();
    // Pools of 1, 2 and 3 threads side by side.
    let tally = run_threads(
        THREADS,
        CALLS_PER_THREAD,
        |i| Arc::new(Context::builder().num_threads(1 + i % 3).build().unwrap()),
        &expected,
    );
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "context per thread: {THREADS} threads x {CALLS_PER_THREAD} calls in {secs:.2} s \
         ({:.0} calls/s)",
        tally.calls as f64 / secs
    );
    assert_eq!(tally.calls, THREADS * CALLS_PER_THREAD);
    tally.assert_clean("context per thread");
}

/// Contexts are created, used (through their thread pool, which each builds on its first
/// large call) and dropped, over and over on several threads, while other threads compute on
/// a shared context: neither side may disturb the other. Some contexts are used from a thread
/// other than the one that made them, and dropped there too.
#[test]
fn contexts_created_and_dropped_while_others_compute() {
    const CHURNERS: usize = 4;
    const WORKERS: usize = THREADS - CHURNERS;
    let reference = one_thread();
    let expected = Arc::new(expected(&reference));
    let shared = Context::builder()
        .num_threads(POOL_THREADS)
        .build()
        .unwrap();
    // The calls a churning context makes: one through its pool, one inline, one split-KV.
    let pool_case = cases(&reference)
        .iter()
        .position(|c| c.what.starts_with("backward b1 sq64"))
        .expect("the pool-sized backward case");
    let picks = [pool_case, 0, 4];
    let start = Barrier::new(THREADS);
    let mut tally = Tally::default();
    let t0 = Instant::now();
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for i in 0..WORKERS {
            let mut mine = cases(&reference);
            let (shared, start, expected) = (&shared, &start, &expected);
            handles.push(s.spawn(move || {
                start.wait();
                hammer(
                    shared,
                    &mut mine,
                    expected,
                    CALLS_PER_THREAD / 4,
                    2000 + i as u64,
                )
            }));
        }
        for i in 0..CHURNERS {
            let mut mine = cases(&reference);
            let (start, expected) = (&start, &expected);
            handles.push(s.spawn(move || {
                start.wait();
                let mut t = Tally::default();
                for n in 0..CHURN_CONTEXTS {
                    let ctx = Context::builder()
                        .num_threads(1 + (i + n) % 3)
                        .build()
                        .unwrap();
                    let mut check = |ctx: &Context, mine: &mut [Call]| {
                        for &c in &picks {
                            let ok = mine[c].run(ctx).is_ok() && mine[c].matches(&expected[c]);
                            t.calls += 1;
                            if !ok {
                                t.bad += 1;
                                t.shown.push(format!("churn {i}.{n}: {}", mine[c].what));
                            }
                        }
                    };
                    if n % 2 == 0 {
                        check(&ctx, &mut mine);
                        drop(ctx);
                    } else {
                        // Made here, used and dropped on another thread.
                        std::thread::scope(|s2| {
                            s2.spawn(|| {
                                check(&ctx, &mut mine);
                                drop(ctx);
                            });
                        });
                    }
                }
                t
            }));
        }
        for h in handles {
            tally.add(h.join().expect("a stress thread panicked"));
        }
    });
    println!(
        "{WORKERS} threads x {} calls on a shared context while {CHURNERS} threads each made, \
         used and dropped {CHURN_CONTEXTS} contexts: {:.2} s",
        CALLS_PER_THREAD / 4,
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(
        tally.calls,
        WORKERS * (CALLS_PER_THREAD / 4) + CHURNERS * CHURN_CONTEXTS * picks.len()
    );
    tally.assert_clean("contexts created and dropped");
}
