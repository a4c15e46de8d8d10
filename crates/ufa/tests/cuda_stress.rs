//! CUDA concurrency stress: several threads queueing forwards (with and without the LSE) and
//! deterministic backwards on streams of their own, all on one [`Context`] whose kernels none
//! of them has loaded yet; then several contexts on one device at once, while other contexts
//! are created, used and dropped. Every result is compared byte for byte with the same call
//! made up front on its own, on the legacy default stream, by another context. The forward
//! kernels use no atomics and the deterministic backward orders its dQ sums, so any difference
//! is a race: state shared between streams or contexts, or a kernel cache filled twice.
//!
//! Outputs are poisoned (every byte 0xff: NaN) on the call's stream before each call, so a
//! call that writes nothing, or writes after its stream's next copy, shows as a difference.
//! Without a GPU these tests say so and pass, unless `UFA_REQUIRE_GPU=1` (scripts/gpu-check).

mod support;

use cudarc::driver::{result as cu, sys};
use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::ffi::c_void;
use std::sync::Barrier;
use std::time::Instant;
use support::cuda_memory::{DevBuf, Primary, Stream};
use ufa::{
    AttentionParams, BackwardInputs, Context, DType, Device, Gradients, TensorView, TensorViewMut,
};
use ufa_testkit::cuda::gpu_present;

/// Threads queueing work at once: enough that several always hold the CPU side of a launch
/// (validation, kernel lookup, module loading) at the same time.
const THREADS: usize = 8;
/// Streams each thread fills before it waits for any: the GPU then has up to 24 streams of
/// independent work from one context.
const STREAMS_PER_THREAD: usize = 3;
/// Rounds of one call per stream each thread makes: 8 × 3 × 100 = 2400 checked calls per test,
/// a few seconds on one GPU once the kernels are loaded.
const ROUNDS: usize = 100;

/// `ROUNDS`, or `$UFA_STRESS_ROUNDS` (scripts/gpu-check runs the test under compute-sanitizer
/// with 2: every thread, stream and context path, at a size racecheck finishes).
fn rounds() -> usize {
    std::env::var("UFA_STRESS_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(ROUNDS)
}
/// Contexts sharing the device in the second test (threads take them in turn).
const CONTEXTS: usize = 4;
/// Contexts each churning thread creates, runs every case on once, and drops.
const CHURN_CONTEXTS: usize = 3;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Forward,
    ForwardLse,
    /// Deterministic backward, from a forward's output and LSE.
    Backward,
}

/// One call: kind, batch, seqlen_q, seqlen_kv, heads_q, heads_kv, head_dim, dtype, causal.
#[derive(Clone, Copy, Debug)]
struct Spec {
    kind: Kind,
    dims: (usize, usize, usize, usize, usize, usize),
    dtype: DType,
    causal: bool,
}

/// Tensor-core (bf16, f16) and CUDA-core (f32, odd head dim) kernels, a split-KV decode, GQA
/// and MQA, causal with seqlen_q != seqlen_kv, and the deterministic backward.
fn specs() -> Vec<Spec> {
    use DType::{BF16, F16, F32};
    use Kind::*;
    let s = |kind, dims, dtype, causal| Spec {
        kind,
        dims,
        dtype,
        causal,
    };
    vec![
        s(Forward, (2, 128, 128, 4, 2, 64), BF16, true),
        s(Forward, (1, 1, 4096, 8, 1, 128), F16, false),
        s(Forward, (1, 33, 77, 2, 2, 80), F32, true),
        s(ForwardLse, (1, 256, 200, 8, 8, 128), BF16, true),
        s(ForwardLse, (3, 17, 300, 4, 1, 64), F16, false),
        s(Backward, (1, 128, 128, 4, 2, 64), BF16, true),
        s(Backward, (2, 200, 150, 2, 2, 96), F16, false),
    ]
}

fn random_bytes(dtype: DType, n: usize, rng: &mut ChaCha8Rng, amp: f32) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * dtype.size_in_bytes());
    for _ in 0..n {
        let x: f32 = rng.gen_range(-amp..amp);
        match dtype {
            DType::F32 => out.extend_from_slice(&x.to_ne_bytes()),
            DType::F16 => out.extend_from_slice(&f16::from_f32(x).to_ne_bytes()),
            DType::BF16 => out.extend_from_slice(&bf16::from_f32(x).to_ne_bytes()),
            _ => unreachable!("float inputs only"),
        }
    }
    out
}

fn contiguous(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    strides
}

/// A case on the device: its inputs (read by every thread at once, never written after set-up)
/// and the bytes each output must hold.
struct Case {
    spec: Spec,
    q: DevBuf,
    k: DevBuf,
    v: DevBuf,
    /// The backward's out, dout and LSE.
    grad_of: Option<(DevBuf, DevBuf, DevBuf)>,
    expected: Vec<Vec<u8>>,
}

impl Case {
    fn shapes(&self) -> [Vec<usize>; 3] {
        let (b, sq, skv, hq, hkv, d) = self.spec.dims;
        [vec![b, sq, hq, d], vec![b, skv, hkv, d], vec![b, hq, sq]]
    }

    fn what(&self) -> String {
        format!("{:?}", self.spec)
    }

    /// Fresh (unpoisoned) buffers for this case's outputs: out[, lse], or dq, dk, dv.
    fn outputs(&self) -> Vec<DevBuf> {
        let [qs, ks, ls] = self.shapes();
        let size = |s: &[usize], dt: DType| s.iter().product::<usize>() * dt.size_in_bytes();
        let dt = self.spec.dtype;
        match self.spec.kind {
            Kind::Forward => vec![DevBuf::new(size(&qs, dt))],
            Kind::ForwardLse => vec![
                DevBuf::new(size(&qs, dt)),
                DevBuf::new(size(&ls, DType::F32)),
            ],
            Kind::Backward => vec![
                DevBuf::new(size(&qs, dt)),
                DevBuf::new(size(&ks, dt)),
                DevBuf::new(size(&ks, dt)),
            ],
        }
    }

    /// Poisons `outs` and queues the call on `stream`.
    fn launch(&self, ctx: &Context, outs: &[DevBuf], stream: sys::CUstream) -> ufa::Result<()> {
        outs.iter().for_each(|o| o.poison(stream));
        let [qs, ks, ls] = self.shapes();
        let dt = self.spec.dtype;
        let dev = Device::Cuda(0);
        let view = |b: &DevBuf, dt: DType, s: &[usize]| {
            // SAFETY: the buffer holds the whole contiguous tensor and outlives the call's
            // stream work (every stream is waited for before any buffer is freed).
            unsafe {
                TensorView::from_raw_parts(b.ptr as *const c_void, dt, dev, s, &contiguous(s))
            }
        };
        let view_mut = |b: &DevBuf, dt: DType, s: &[usize]| {
            // SAFETY: as above; each output buffer belongs to one (thread, stream) slot.
            unsafe {
                TensorViewMut::from_raw_parts(b.ptr as *mut c_void, dt, dev, s, &contiguous(s))
            }
        };
        let params = AttentionParams::default()
            .causal(self.spec.causal)
            .deterministic(true);
        let (q, k, v) = (
            view(&self.q, dt, &qs)?,
            view(&self.k, dt, &ks)?,
            view(&self.v, dt, &ks)?,
        );
        let stream = stream as *mut c_void;
        // SAFETY: `stream` is a live stream of device 0's primary context (or null), and every
        // buffer outlives the work queued here.
        unsafe {
            match (&self.grad_of, outs) {
                (None, [out]) => ctx.forward_on_stream(
                    &q,
                    &k,
                    &v,
                    &mut view_mut(out, dt, &qs)?,
                    None,
                    &params,
                    stream,
                ),
                (None, [out, lse]) => ctx.forward_on_stream(
                    &q,
                    &k,
                    &v,
                    &mut view_mut(out, dt, &qs)?,
                    Some(&mut view_mut(lse, DType::F32, &ls)?),
                    &params,
                    stream,
                ),
                (Some((out, dout, lse)), [dq, dk, dv]) => {
                    let inputs = BackwardInputs {
                        q,
                        k,
                        v,
                        out: view(out, dt, &qs)?,
                        dout: view(dout, dt, &qs)?,
                        lse: view(lse, DType::F32, &ls)?,
                    };
                    let mut grads = Gradients {
                        dq: view_mut(dq, dt, &qs)?,
                        dk: view_mut(dk, dt, &ks)?,
                        dv: view_mut(dv, dt, &ks)?,
                    };
                    ctx.backward_on_stream(&inputs, &mut grads, &params, stream)
                }
                _ => unreachable!("outputs match the kind"),
            }
        }
    }
}

/// Uploads every case's inputs and computes what each call must produce: each call alone on
/// `reference`, on the legacy default stream, waited for (the backward's out and LSE too).
fn cases(reference: &Context) -> Vec<Case> {
    let null = cu::stream::null();
    specs()
        .into_iter()
        .enumerate()
        .map(|(i, spec)| {
            let mut rng = ChaCha8Rng::seed_from_u64(100 + i as u64);
            let (b, sq, skv, hq, hkv, d) = spec.dims;
            let dt = spec.dtype;
            let mut case = Case {
                spec,
                q: DevBuf::upload(&random_bytes(dt, b * sq * hq * d, &mut rng, 1.5)),
                k: DevBuf::upload(&random_bytes(dt, b * skv * hkv * d, &mut rng, 1.5)),
                v: DevBuf::upload(&random_bytes(dt, b * skv * hkv * d, &mut rng, 1.0)),
                grad_of: None,
                expected: vec![],
            };
            if spec.kind == Kind::Backward {
                let fwd = Case {
                    spec: Spec {
                        kind: Kind::ForwardLse,
                        ..spec
                    },
                    ..case
                };
                let outs = fwd.outputs();
                fwd.launch(reference, &outs, null)
                    .unwrap_or_else(|e| panic!("{}: forward: {e}", fwd.what()));
                let mut outs = outs.into_iter();
                let (out, lse) = (outs.next().unwrap(), outs.next().unwrap());
                let dout = DevBuf::upload(&random_bytes(dt, b * sq * hq * d, &mut rng, 1.0));
                case = Case {
                    grad_of: Some((out, dout, lse)),
                    ..fwd
                };
                case.spec.kind = Kind::Backward;
            }
            let outs = case.outputs();
            case.launch(reference, &outs, null)
                .unwrap_or_else(|e| panic!("{}: {e}", case.what()));
            case.expected = outs.iter().map(|o| o.download(null)).collect();
            for (o, e) in case.expected.iter().enumerate() {
                let size = if case.spec.kind == Kind::ForwardLse && o == 1 {
                    4
                } else {
                    dt.size_in_bytes()
                };
                assert!(
                    e.chunks(size).all(|x| x.iter().any(|&b| b != 0xff)),
                    "{}: output {o} not fully written",
                    case.what()
                );
            }
            case
        })
        .collect()
}

/// What a thread found.
#[derive(Default)]
struct Tally {
    calls: usize,
    bad: Vec<String>,
}

/// `ROUNDS` rounds on `ctx` from this thread: each queues one random case on each of its
/// streams, then reads every stream's outputs back and compares them with the expected bytes.
fn hammer(primary: Primary, ctx: &Context, cases: &[Case], seed: u64, rounds: usize) -> Tally {
    primary.enter();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let streams: Vec<Stream> = (0..STREAMS_PER_THREAD).map(|_| Stream::new()).collect();
    // Outputs per (stream, case), so that no two queued calls share one.
    let outs: Vec<Vec<Vec<DevBuf>>> = streams
        .iter()
        .map(|_| cases.iter().map(Case::outputs).collect())
        .collect();
    let mut t = Tally::default();
    for round in 0..rounds {
        let picks: Vec<usize> = streams
            .iter()
            .map(|_| rng.gen_range(0..cases.len()))
            .collect();
        let launched: Vec<ufa::Result<()>> = streams
            .iter()
            .zip(&picks)
            .enumerate()
            .map(|(s, (stream, &c))| cases[c].launch(ctx, &outs[s][c], stream.0))
            .collect();
        for (s, (stream, &c)) in streams.iter().zip(&picks).enumerate() {
            t.calls += 1;
            let wrong = match &launched[s] {
                Err(e) => Some(format!("error: {e}")),
                Ok(()) => {
                    let got: Vec<Vec<u8>> =
                        outs[s][c].iter().map(|o| o.download(stream.0)).collect();
                    (got != cases[c].expected).then(|| "output differs".to_string())
                }
            };
            if let Some(w) = wrong {
                t.bad.push(format!(
                    "seed {seed} round {round} stream {s}: {}: {w}",
                    cases[c].what()
                ));
            }
        }
    }
    t
}

fn assert_clean(tallies: Vec<Tally>, what: &str, secs: f64) {
    let calls: usize = tallies.iter().map(|t| t.calls).sum();
    let bad: Vec<String> = tallies.into_iter().flat_map(|t| t.bad).collect();
    println!("{what}: {calls} calls in {secs:.2} s, {} differ", bad.len());
    assert!(
        bad.is_empty(),
        "{what}: {} of {calls} calls differ from the single-stream run or failed:\n{}",
        bad.len(),
        bad.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
    );
}

/// The device's primary context and the cases, or None without a GPU.
fn setup() -> Option<(Primary, Vec<Case>)> {
    let reference = Context::new().expect("a context");
    if !gpu_present(&reference) {
        return None;
    }
    let primary = Primary::retain();
    primary.enter();
    let cases = cases(&reference);
    Some((primary, cases))
}

#[test]
fn streams_of_one_context_from_many_threads_bitwise() {
    let Some((primary, cases)) = setup() else {
        return;
    };
    // Fresh: its kernels are loaded by the threads' first calls, all at once.
    let shared = Context::new().unwrap();
    let start = Barrier::new(THREADS);
    let t0 = Instant::now();
    let tallies: Vec<Tally> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|i| {
                let (shared, cases, start) = (&shared, &cases, &start);
                s.spawn(move || {
                    start.wait();
                    hammer(primary, shared, cases, 10 + i as u64, rounds())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_clean(
        tallies,
        &format!("{THREADS} threads x {STREAMS_PER_THREAD} streams, one context"),
        t0.elapsed().as_secs_f64(),
    );
}

#[test]
fn several_contexts_on_one_device_bitwise() {
    let Some((primary, cases)) = setup() else {
        return;
    };
    let contexts: Vec<Context> = (0..CONTEXTS).map(|_| Context::new().unwrap()).collect();
    const CHURNERS: usize = 2;
    let start = Barrier::new(THREADS + CHURNERS);
    let t0 = Instant::now();
    let tallies: Vec<Tally> = std::thread::scope(|s| {
        let mut handles: Vec<_> = (0..THREADS)
            .map(|i| {
                let (ctx, cases, start) = (&contexts[i % CONTEXTS], &cases, &start);
                s.spawn(move || {
                    start.wait();
                    hammer(primary, ctx, cases, 20 + i as u64, rounds())
                })
            })
            .collect();
        // Contexts made, used for a few rounds on streams of their own, and dropped while the
        // others compute.
        handles.extend((0..CHURNERS).map(|i| {
            let (cases, start) = (&cases, &start);
            s.spawn(move || {
                start.wait();
                let mut t = Tally::default();
                for n in 0..CHURN_CONTEXTS {
                    let ctx = Context::new().unwrap();
                    let r = hammer(
                        primary,
                        &ctx,
                        cases,
                        30 + (i * CHURN_CONTEXTS + n) as u64,
                        2,
                    );
                    t.calls += r.calls;
                    t.bad.extend(r.bad);
                    drop(ctx);
                }
                t
            })
        }));
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_clean(
        tallies,
        &format!(
            "{THREADS} threads x {STREAMS_PER_THREAD} streams over {CONTEXTS} contexts, \
             {CHURNERS} threads making and dropping {CHURN_CONTEXTS} contexts each"
        ),
        t0.elapsed().as_secs_f64(),
    );
}
