//! Every validation rule: the error kind, a message naming the argument and values, and an
//! output buffer left untouched.

use half::bf16;
use ufa::{AttentionParams, Context, DType, Device, ErrorKind, TensorView, TensorViewMut};

const POISON: f32 = 12345.0;

struct Bufs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    out: Vec<f32>,
    lse: Vec<f32>,
}

/// Valid inputs for B2 Sq5 Skv7 Hq4 Hkv2 D8.
fn bufs() -> Bufs {
    Bufs {
        q: (0..2 * 5 * 4 * 8).map(|i| (i as f32 * 0.1).sin()).collect(),
        k: (0..2 * 7 * 2 * 8).map(|i| (i as f32 * 0.2).cos()).collect(),
        v: (0..2 * 7 * 2 * 8).map(|i| (i as f32 * 0.3).sin()).collect(),
        out: vec![POISON; 2 * 5 * 4 * 8],
        lse: vec![POISON; 2 * 4 * 5],
    }
}

const Q: [usize; 4] = [2, 5, 4, 8];
const KV: [usize; 4] = [2, 7, 2, 8];

/// Runs a forward that must fail with `kind` and a message containing every `needle`.
fn expect_err(
    kind: ErrorKind,
    needles: &[&str],
    f: impl FnOnce(&Context, &mut Bufs) -> ufa::Result<()>,
) {
    let ctx = Context::builder().num_threads(2).build().unwrap();
    let mut b = bufs();
    let err = f(&ctx, &mut b).expect_err("call must fail");
    assert_eq!(err.kind(), kind, "{err}");
    for n in needles {
        assert!(
            err.message().contains(n),
            "message {:?} lacks {n:?}",
            err.message()
        );
    }
    assert!(
        b.out.iter().all(|&x| x == POISON),
        "out was written on error: {err}"
    );
    assert!(
        b.lse.iter().all(|&x| x == POISON),
        "lse was written on error: {err}"
    );
}

fn run(ctx: &Context, b: &mut Bufs, params: &AttentionParams<'_>) -> ufa::Result<()> {
    let q = TensorView::new(&b.q, &Q)?;
    let k = TensorView::new(&b.k, &KV)?;
    let v = TensorView::new(&b.v, &KV)?;
    let mut out = TensorViewMut::new(&mut b.out, &Q)?;
    let mut lse = TensorViewMut::new(&mut b.lse, &[2, 4, 5])?;
    ctx.forward_with_lse(&q, &k, &v, &mut out, Some(&mut lse), params)
}

#[test]
fn valid_call_succeeds_and_writes_everything() {
    let ctx = Context::builder().num_threads(2).build().unwrap();
    let mut b = bufs();
    run(&ctx, &mut b, &AttentionParams::default()).unwrap();
    assert!(b
        .out
        .iter()
        .chain(&b.lse)
        .all(|&x| x != POISON && x.is_finite()));
}

#[test]
fn wrong_rank() {
    expect_err(
        ErrorKind::InvalidArgument,
        &["q must have 4 dimensions", "[2, 5, 32]"],
        |ctx, b| {
            let q = TensorView::new(&b.q, &[2, 5, 32])?;
            let k = TensorView::new(&b.k, &KV)?;
            let v = TensorView::new(&b.v, &KV)?;
            ctx.forward(
                &q,
                &k,
                &v,
                &mut TensorViewMut::new(&mut b.out, &Q)?,
                &AttentionParams::default(),
            )
        },
    );
}

#[test]
fn heads_kv_must_divide_heads_q() {
    expect_err(
        ErrorKind::InvalidArgument,
        &["k.shape[2]=3", "q.shape[2]=4"],
        |ctx, b| {
            let kv3 = vec![0.25f32; 2 * 7 * 3 * 8];
            let q = TensorView::new(&b.q, &Q)?;
            let k = TensorView::new(&kv3, &[2, 7, 3, 8])?;
            let v = TensorView::new(&kv3, &[2, 7, 3, 8])?;
            ctx.forward(
                &q,
                &k,
                &v,
                &mut TensorViewMut::new(&mut b.out, &Q)?,
                &AttentionParams::default(),
            )
        },
    );
}

#[test]
fn mismatched_shapes() {
    // k head_dim differs from q.
    expect_err(
        ErrorKind::InvalidArgument,
        &["k.shape[3]=4", "head_dim", "=8"],
        |ctx, b| {
            let q = TensorView::new(&b.q, &Q)?;
            let k = TensorView::new(&b.k, &[2, 7, 4, 4])?;
            let v = TensorView::new(&b.v, &KV)?;
            ctx.forward(
                &q,
                &k,
                &v,
                &mut TensorViewMut::new(&mut b.out, &Q)?,
                &AttentionParams::default(),
            )
        },
    );
    // v seqlen differs from k.
    expect_err(
        ErrorKind::InvalidArgument,
        &["v.shape[1]=3", "seqlen_kv", "=7"],
        |ctx, b| {
            let q = TensorView::new(&b.q, &Q)?;
            let k = TensorView::new(&b.k, &KV)?;
            let v = TensorView::new(&b.v, &[2, 3, 2, 8])?;
            ctx.forward(
                &q,
                &k,
                &v,
                &mut TensorViewMut::new(&mut b.out, &Q)?,
                &AttentionParams::default(),
            )
        },
    );
    // batch differs.
    expect_err(
        ErrorKind::InvalidArgument,
        &["k.shape[0]=1", "batch", "=2"],
        |ctx, b| {
            let q = TensorView::new(&b.q, &Q)?;
            let k = TensorView::new(&b.k, &[1, 7, 2, 8])?;
            let v = TensorView::new(&b.v, &KV)?;
            ctx.forward(
                &q,
                &k,
                &v,
                &mut TensorViewMut::new(&mut b.out, &Q)?,
                &AttentionParams::default(),
            )
        },
    );
    // out shape differs.
    expect_err(
        ErrorKind::InvalidArgument,
        &["out.shape[1]=4", "seqlen_q", "=5"],
        |ctx, b| {
            let q = TensorView::new(&b.q, &Q)?;
            let k = TensorView::new(&b.k, &KV)?;
            let v = TensorView::new(&b.v, &KV)?;
            let mut out = TensorViewMut::new(&mut b.out, &[2, 4, 4, 8])?;
            ctx.forward(&q, &k, &v, &mut out, &AttentionParams::default())
        },
    );
}

#[test]
fn zero_heads_or_head_dims() {
    // Batch and sequence lengths may be 0 (tests/empty.rs); heads and head dims may not.
    expect_err(
        ErrorKind::InvalidArgument,
        &["heads_q)=0", "at least 1"],
        |ctx, b| {
            let q = TensorView::new(&b.q, &[2, 5, 0, 8])?;
            let k = TensorView::new(&b.k, &KV)?;
            let v = TensorView::new(&b.v, &KV)?;
            let mut out = TensorViewMut::new(&mut b.out, &[2, 5, 0, 8])?;
            ctx.forward(&q, &k, &v, &mut out, &AttentionParams::default())
        },
    );
    expect_err(ErrorKind::InvalidArgument, &["head_dim_v)=0"], |ctx, b| {
        let q = TensorView::new(&b.q, &Q)?;
        let k = TensorView::new(&b.k, &KV)?;
        let v = TensorView::new(&b.v, &[2, 7, 2, 0])?;
        let mut out = TensorViewMut::new(&mut b.out, &[2, 5, 4, 0])?;
        ctx.forward(&q, &k, &v, &mut out, &AttentionParams::default())
    });
}

#[test]
fn head_dim_above_limit() {
    let q = vec![0f32; 513];
    let mut out = vec![POISON; 513];
    let ctx = Context::builder().num_threads(2).build().unwrap();
    let t = TensorView::new(&q, &[1, 1, 1, 513]).unwrap();
    let err = ctx
        .forward(
            &t,
            &t,
            &t,
            &mut TensorViewMut::new(&mut out, &[1, 1, 1, 513]).unwrap(),
            &AttentionParams::default(),
        )
        .unwrap_err();
    assert!(err.message().contains("head_dim)=513 exceeds"), "{err}");
    assert!(out.iter().all(|&x| x == POISON));
}

#[test]
fn overflowing_sizes_are_rejected_before_any_allocation() {
    let data = [0f32; 4];
    // A raw view with an absurd shape: rejected by checked arithmetic, not by a crash.
    let err = unsafe {
        TensorView::from_raw_parts(
            data.as_ptr().cast(),
            DType::F32,
            Device::Cpu,
            &[usize::MAX / 4, 1 << 20, 1, 1],
            &[1 << 20, 1, 1, 1],
        )
    }
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(
        err.message().contains("addresses more memory than exists"),
        "{err}"
    );
}

#[test]
fn dtype_rules() {
    expect_err(
        ErrorKind::InvalidArgument,
        &["k.dtype=bf16", "q.dtype=f32"],
        |ctx, b| {
            let kb: Vec<bf16> = b.k.iter().map(|&x| bf16::from_f32(x)).collect();
            let q = TensorView::new(&b.q, &Q)?;
            let k = TensorView::new(&kb, &KV)?;
            let v = TensorView::new(&b.v, &KV)?;
            ctx.forward(
                &q,
                &k,
                &v,
                &mut TensorViewMut::new(&mut b.out, &Q)?,
                &AttentionParams::default(),
            )
        },
    );
    expect_err(ErrorKind::InvalidArgument, &["q.dtype=bool"], |ctx, b| {
        let qb = vec![true; b.q.len()];
        let q = TensorView::new(&qb, &Q)?;
        let k = TensorView::new(&b.k, &KV)?;
        let v = TensorView::new(&b.v, &KV)?;
        ctx.forward(
            &q,
            &k,
            &v,
            &mut TensorViewMut::new(&mut b.out, &Q)?,
            &AttentionParams::default(),
        )
    });
    expect_err(
        ErrorKind::InvalidArgument,
        &["lse.dtype=bf16", "f32"],
        |ctx, b| {
            let mut lb = vec![bf16::ZERO; 40];
            let q = TensorView::new(&b.q, &Q)?;
            let k = TensorView::new(&b.k, &KV)?;
            let v = TensorView::new(&b.v, &KV)?;
            let mut out = TensorViewMut::new(&mut b.out, &Q)?;
            let mut lse = TensorViewMut::new(&mut lb, &[2, 4, 5])?;
            ctx.forward_with_lse(
                &q,
                &k,
                &v,
                &mut out,
                Some(&mut lse),
                &AttentionParams::default(),
            )
        },
    );
}

#[test]
fn last_dim_must_be_contiguous() {
    expect_err(
        ErrorKind::InvalidArgument,
        &["q.strides[3]=2", "contiguous"],
        |ctx, b| {
            // Every other element of the last dimension: a valid view, but not a valid q.
            let q = TensorView::with_strides(&b.q, &[2, 5, 4, 4], &[160, 32, 8, 2])?;
            let k = TensorView::with_strides(&b.k, &[2, 7, 2, 4], &[112, 16, 8, 1])?;
            let v = TensorView::new(&b.v, &KV)?;
            ctx.forward(
                &q,
                &k,
                &v,
                &mut TensorViewMut::new(&mut b.out, &Q)?,
                &AttentionParams::default(),
            )
        },
    );
}

#[test]
fn overlapping_output_is_rejected() {
    expect_err(
        ErrorKind::InvalidArgument,
        &["out has strides", "share memory"],
        |ctx, b| {
            let q = TensorView::new(&b.q, &Q)?;
            let k = TensorView::new(&b.k, &KV)?;
            let v = TensorView::new(&b.v, &KV)?;
            let mut out = TensorViewMut::with_strides(&mut b.out, &Q, &[160, 32, 0, 1])?;
            ctx.forward(&q, &k, &v, &mut out, &AttentionParams::default())
        },
    );
}

#[test]
fn output_aliasing_an_input_is_rejected() {
    let ctx = Context::builder().num_threads(2).build().unwrap();
    let mut buf = vec![0.5f32; 2 * 5 * 4 * 8];
    // out and q view the same memory through raw pointers (as a C caller could).
    let p = buf.as_mut_ptr();
    let q = unsafe {
        TensorView::from_raw_parts(p.cast(), DType::F32, Device::Cpu, &Q, &[160, 32, 8, 1])
    }
    .unwrap();
    let mut out = unsafe {
        TensorViewMut::from_raw_parts(p.cast(), DType::F32, Device::Cpu, &Q, &[160, 32, 8, 1])
    }
    .unwrap();
    let b = bufs();
    let k = TensorView::new(&b.k, &KV).unwrap();
    let v = TensorView::new(&b.v, &KV).unwrap();
    let err = ctx
        .forward(&q, &k, &v, &mut out, &AttentionParams::default())
        .unwrap_err();
    assert!(err.message().contains("out shares memory with q"), "{err}");
    assert!(buf.iter().all(|&x| x == 0.5));
}

#[test]
fn lse_shape_and_overlap() {
    expect_err(
        ErrorKind::InvalidArgument,
        &["lse.shape[1]=5", "heads_q", "=4"],
        |ctx, b| {
            let q = TensorView::new(&b.q, &Q)?;
            let k = TensorView::new(&b.k, &KV)?;
            let v = TensorView::new(&b.v, &KV)?;
            let mut out = TensorViewMut::new(&mut b.out, &Q)?;
            let mut lse = TensorViewMut::new(&mut b.lse, &[2, 5, 4])?;
            ctx.forward_with_lse(
                &q,
                &k,
                &v,
                &mut out,
                Some(&mut lse),
                &AttentionParams::default(),
            )
        },
    );
}

#[test]
fn scalar_parameters() {
    expect_err(
        ErrorKind::InvalidArgument,
        &["softmax_scale=NaN"],
        |ctx, b| run(ctx, b, &AttentionParams::default().softmax_scale(f32::NAN)),
    );
    expect_err(ErrorKind::InvalidArgument, &["softcap=-1"], |ctx, b| {
        run(ctx, b, &AttentionParams::default().softcap(-1.0))
    });
    expect_err(ErrorKind::InvalidArgument, &["window_left=-2"], |ctx, b| {
        run(ctx, b, &AttentionParams::default().window(-2, 0))
    });
    expect_err(
        ErrorKind::InvalidArgument,
        &["window_right=-7"],
        |ctx, b| run(ctx, b, &AttentionParams::default().window(3, -7)),
    );
}

#[test]
fn alibi_rules() {
    expect_err(
        ErrorKind::InvalidArgument,
        &["alibi_slopes.shape=[3]", "[heads_q]=[4]"],
        |ctx, b| {
            let s = [0.1f32; 3];
            let p = AttentionParams::default().alibi_slopes(TensorView::new(&s, &[3])?);
            run(ctx, b, &p)
        },
    );
    expect_err(
        ErrorKind::InvalidArgument,
        &["alibi_slopes.dtype=bf16"],
        |ctx, b| {
            let s = [bf16::ONE; 4];
            let p = AttentionParams::default().alibi_slopes(TensorView::new(&s, &[4])?);
            run(ctx, b, &p)
        },
    );
}

#[test]
fn mask_rules() {
    expect_err(
        ErrorKind::InvalidArgument,
        &[
            "mask.shape=[5, 6]",
            "mask.shape[1]=6 must be 1 or seqlen_kv=7",
        ],
        |ctx, b| {
            let m = vec![true; 30];
            let p = AttentionParams::default().mask(TensorView::new(&m, &[5, 6])?);
            run(ctx, b, &p)
        },
    );
    expect_err(
        ErrorKind::InvalidArgument,
        &["mask.shape[0]=3 must be 1 or batch=2"],
        |ctx, b| {
            let m = vec![0f32; 3 * 4 * 5 * 7];
            let p = AttentionParams::default().mask(TensorView::new(&m, &[3, 4, 5, 7])?);
            run(ctx, b, &p)
        },
    );
}

#[test]
fn device_mismatch() {
    expect_err(
        ErrorKind::InvalidArgument,
        &["k is on cuda:0 but q is on cpu"],
        |ctx, b| {
            let q = TensorView::new(&b.q, &Q)?;
            let k = unsafe {
                TensorView::from_raw_parts(
                    b.k.as_ptr().cast(),
                    DType::F32,
                    Device::Cuda(0),
                    &KV,
                    &[112, 16, 8, 1],
                )?
            };
            let v = TensorView::new(&b.v, &KV)?;
            ctx.forward(
                &q,
                &k,
                &v,
                &mut TensorViewMut::new(&mut b.out, &Q)?,
                &AttentionParams::default(),
            )
        },
    );
}

#[test]
fn slice_too_small_for_view() {
    let data = vec![0f32; 100];
    let err = TensorView::new(&data, &Q).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(
        err.message()
            .contains("needs 320 elements but the slice has 100"),
        "{err}"
    );
}

/// Backward: a valid call, then one bad argument at a time; the gradients stay untouched.
#[test]
fn backward_rules() {
    use ufa::{BackwardInputs, Gradients};
    let ctx = Context::builder().num_threads(2).build().unwrap();
    let b = bufs();
    let dout = b.q.clone();
    let lse = vec![0.5f32; 2 * 4 * 5];
    let lse_bad = vec![bf16::ONE; 2 * 4 * 5];
    type Mutate = fn(&mut BackwardInputs<'_>);
    let cases: Vec<(&str, &str, Mutate)> = vec![
        ("ok", "", |_| {}),
        ("dout shape", "dout.shape[1]=4", |i| {
            i.dout = TensorView::new(&DOUT_SHORT, &[2, 4, 4, 8]).unwrap()
        }),
        ("lse dtype", "lse.dtype=bf16", |_| {}),
        ("out rank", "out must have 4 dimensions", |i| {
            i.out = TensorView::new(&DOUT_SHORT, &[2, 4, 32]).unwrap()
        }),
    ];
    for (what, needle, mutate) in cases {
        let mut dq = vec![POISON; b.q.len()];
        let mut dk = vec![POISON; b.k.len()];
        let mut dv = vec![POISON; b.v.len()];
        let mut inputs = BackwardInputs {
            q: TensorView::new(&b.q, &Q).unwrap(),
            k: TensorView::new(&b.k, &KV).unwrap(),
            v: TensorView::new(&b.v, &KV).unwrap(),
            out: TensorView::new(&b.q, &Q).unwrap(),
            dout: TensorView::new(&dout, &Q).unwrap(),
            lse: if what == "lse dtype" {
                TensorView::new(&lse_bad, &[2, 4, 5]).unwrap()
            } else {
                TensorView::new(&lse, &[2, 4, 5]).unwrap()
            },
        };
        mutate(&mut inputs);
        let mut grads = Gradients {
            dq: TensorViewMut::new(&mut dq, &Q).unwrap(),
            dk: TensorViewMut::new(&mut dk, &KV).unwrap(),
            dv: TensorViewMut::new(&mut dv, &KV).unwrap(),
        };
        let r = ctx.backward(&inputs, &mut grads, &AttentionParams::default());
        if what == "ok" {
            r.unwrap();
            assert!(dq
                .iter()
                .chain(&dk)
                .chain(&dv)
                .all(|x| x.is_finite() && *x != POISON));
            continue;
        }
        let err = r.expect_err(what);
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{what}: {err}");
        assert!(err.message().contains(needle), "{what}: {err}");
        assert!(
            dq.iter().chain(&dk).chain(&dv).all(|&x| x == POISON),
            "{what}: gradients written"
        );
    }
}

static DOUT_SHORT: [f32; 2 * 4 * 4 * 8] = [0.0; 2 * 4 * 4 * 8];

#[test]
fn backward_gradient_aliasing_an_input_is_rejected() {
    use ufa::{BackwardInputs, Gradients};
    let ctx = Context::builder().num_threads(2).build().unwrap();
    let mut b = bufs();
    let lse = vec![0.5f32; 40];
    let dout = b.q.clone();
    let (mut dq, mut dv) = (vec![POISON; b.q.len()], vec![POISON; b.v.len()]);
    let kptr = b.k.as_mut_ptr();
    // dk is k itself, through a raw pointer as a C caller could pass it.
    let dk = unsafe {
        TensorViewMut::from_raw_parts(kptr.cast(), DType::F32, Device::Cpu, &KV, &[112, 16, 8, 1])
    }
    .unwrap();
    let k = unsafe {
        TensorView::from_raw_parts(kptr.cast(), DType::F32, Device::Cpu, &KV, &[112, 16, 8, 1])
    }
    .unwrap();
    let k_before = b.k.clone();
    let inputs = BackwardInputs {
        q: TensorView::new(&b.q, &Q).unwrap(),
        k,
        v: TensorView::new(&b.v, &KV).unwrap(),
        out: TensorView::new(&b.q, &Q).unwrap(),
        dout: TensorView::new(&dout, &Q).unwrap(),
        lse: TensorView::new(&lse, &[2, 4, 5]).unwrap(),
    };
    let mut grads = Gradients {
        dq: TensorViewMut::new(&mut dq, &Q).unwrap(),
        dk,
        dv: TensorViewMut::new(&mut dv, &KV).unwrap(),
    };
    let err = ctx
        .backward(&inputs, &mut grads, &AttentionParams::default())
        .unwrap_err();
    assert!(err.message().contains("dk shares memory with k"), "{err}");
    assert!(dq.iter().chain(&dv).all(|&x| x == POISON));
    assert_eq!(b.k, k_before);
}

/// A CPU kernel family this machine cannot run is refused when the context is built, by name
/// (the AMX family on CPUs without AMX, CI's included; where AMX is usable it is accepted).
#[test]
fn unrunnable_cpu_kernel_family_is_refused_by_name() {
    let built = Context::builder().cpu_isa(ufa::Isa::AmxBf16).build();
    match built {
        Ok(ctx) => {
            assert!(ufa::Isa::AmxBf16.is_supported());
            assert_eq!(ctx.cpu_isa(), ufa::Isa::AmxBf16);
        }
        Err(e) => {
            assert!(!ufa::Isa::AmxBf16.is_supported());
            assert_eq!(e.kind(), ErrorKind::Unsupported);
            let msg = e.to_string();
            assert!(
                msg.contains("cpu_isa=amx-bf16") && msg.contains("not supported by this CPU"),
                "{msg}"
            );
        }
    }
}
