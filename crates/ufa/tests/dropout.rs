//! Attention dropout on the CPU: forward and gradients against the f64 reference, which drops
//! exactly the probabilities the kernels drop (the same counter-based generator); the keep rate
//! and the mean of the factors; bitwise repeatability for a seed and different masks for
//! different offsets; bad arguments.

use ufa::{AttentionParams, Context, DType, Dropout, ErrorKind, TensorView, TensorViewMut};
use ufa_testkit::{
    check_case, check_grads, check_varlen, check_varlen_grads, run_on_every_isa, Alibi, Case,
    Comparison, Features, GradComparison, Instance, VarlenCase,
};

fn with_dropout(mut c: Case, p: f32, seed: u64, offset: u64) -> Case {
    c.dropout = Some(Dropout { p, seed, offset });
    c
}

/// Odd shapes, GQA, causal and windowed bands, score modifiers, several seeds and rates, both
/// precisions, and a decoding shape (one query row, the CPU's split-KV path).
fn cases() -> Vec<Case> {
    let mut out = vec![];
    for dtype in [DType::F32, DType::BF16] {
        let plain = Case::new(2, 37, 53, 4, 40, dtype);
        out.push(with_dropout(plain.clone(), 0.1, 1, 0));
        let mut gqa = Case::new(1, 64, 96, 8, 64, dtype);
        gqa.heads_kv = 2;
        gqa.causal = true;
        out.push(with_dropout(gqa, 0.5, 0xdead_beef_1234, 77));
        let mut mods = Case::new(2, 29, 29, 2, 32, dtype);
        mods.window = (7, 3);
        mods.softcap = 5.0;
        mods.alibi = Some(Alibi::PerHead);
        out.push(with_dropout(mods, 0.9, u64::MAX, u64::MAX));
        let mut decode = Case::new(2, 1, 700, 4, 64, dtype);
        decode.heads_kv = 1;
        out.push(with_dropout(decode, 0.25, 42, 1 << 40));
    }
    out
}

#[test]
fn forward_matches_reference_on_every_isa() {
    run_on_every_isa(
        &cases(),
        check_case,
        Comparison::passed,
        Comparison::summary,
    );
}

#[test]
fn gradients_match_reference_on_every_isa() {
    let grads: Vec<Case> = cases().into_iter().filter(|c| c.seqlen_q > 1).collect();
    run_on_every_isa(
        &grads,
        check_grads,
        GradComparison::passed,
        GradComparison::summary,
    );
}

/// Packed batches: sequence b draws its dropout as batch entry b (rows and keys counted within
/// the sequence), forward (packed, seqused_kv and paged keys) and gradients, on every ISA.
#[test]
fn varlen_matches_reference_on_every_isa() {
    let mut f = Features::new(4, 2, 32, DType::F32);
    f.causal = true;
    f.dropout = Some(Dropout {
        p: 0.3,
        seed: 99,
        offset: 5,
    });
    let mut bf = f.clone();
    bf.dtype = DType::BF16;
    bf.causal = false;
    let packed = VarlenCase::new(&[5, 17, 1, 30], &[9, 17, 40, 30], f.clone());
    let mut used = VarlenCase::new(&[3, 12], &[20, 33], bf.clone());
    used.used_kv = Some(vec![11, 33]);
    let mut paged = VarlenCase::new(&[6, 2], &[40, 70], f);
    paged.page_size = Some(16);
    let forward = [
        packed.clone(),
        used,
        paged,
        VarlenCase::new(&[8, 8], &[8, 24], bf.clone()),
    ];
    run_on_every_isa(
        &forward,
        check_varlen,
        Comparison::passed,
        Comparison::summary,
    );
    let grads = [packed, VarlenCase::new(&[8, 8], &[8, 24], bf)];
    run_on_every_isa(
        &grads,
        check_varlen_grads,
        GradComparison::passed,
        GradComparison::summary,
    );
}

/// Over 4·10^6 draws the kept fraction is 1 - p within 5 standard deviations, and the factors
/// (0 or 1 / (1 - p)) average 1: dropout leaves the output's expectation unchanged.
#[test]
fn keep_rate_and_mean_factor() {
    for p in [0.1f32, 0.5, 0.8] {
        let d = Dropout {
            p,
            seed: 2024,
            offset: 9,
        };
        let (mut kept, mut sum, mut n) = (0u64, 0f64, 0u64);
        for bh in 0..4 {
            for i in 0..1000 {
                for j in 0..1000 {
                    let s = d.scale(bh, i, j);
                    kept += u64::from(s != 0.0);
                    sum += s;
                    n += 1;
                }
            }
        }
        let keep = 1.0 - f64::from(p);
        let sd = (keep * (1.0 - keep) / n as f64).sqrt();
        let rate = kept as f64 / n as f64;
        assert!(
            (rate - keep).abs() < 5.0 * sd,
            "p {p}: kept {rate}, want {keep} ± {sd}"
        );
        let mean = sum / n as f64;
        assert!(
            (mean - 1.0).abs() < 5.0 * sd / keep,
            "p {p}: mean factor {mean}"
        );
    }
}

fn outputs_and_grads(ctx: &Context, case: &Case) -> (Vec<u32>, [Vec<u64>; 3]) {
    let mut inst = Instance::new(case, 5);
    inst.run(ctx).unwrap();
    inst.run_backward(ctx).unwrap();
    let out = inst
        .outputs()
        .0
        .iter()
        .map(|x| (*x as f32).to_bits())
        .collect();
    let grads = inst
        .grads()
        .unwrap()
        .map(|g| g.iter().map(|x| x.to_bits()).collect());
    (out, grads)
}

/// The same (p, seed, offset) gives bitwise the same output and gradients, whatever the thread
/// count; another offset or seed gives another mask.
#[test]
fn same_seed_same_bits_other_offset_other_mask() {
    let mut base = Case::new(1, 48, 80, 2, 32, DType::F32);
    base.causal = true;
    let case = |seed, offset| with_dropout(base.clone(), 0.3, seed, offset);
    let one = Context::builder().num_threads(1).build().unwrap();
    let three = Context::builder().num_threads(3).build().unwrap();
    let a = outputs_and_grads(&one, &case(11, 100));
    assert_eq!(a, outputs_and_grads(&three, &case(11, 100)));
    assert_ne!(a.0, outputs_and_grads(&one, &case(11, 101)).0);
    assert_ne!(a.0, outputs_and_grads(&one, &case(12, 100)).0);
    assert_ne!(
        a.0,
        outputs_and_grads(&one, &with_dropout(base.clone(), 0.0, 11, 100)).0
    );
}

/// p = 0 is no dropout at all: bitwise the output without it.
#[test]
fn zero_rate_is_no_dropout() {
    let base = Case::new(1, 20, 30, 2, 16, DType::F32);
    let ctx = Context::new().unwrap();
    assert_eq!(
        outputs_and_grads(&ctx, &with_dropout(base.clone(), 0.0, 3, 4)),
        outputs_and_grads(&ctx, &base)
    );
}

/// A rate outside [0, 1) is refused, naming it, and nothing is written, on dense and packed
/// calls.
#[test]
fn bad_rates_are_refused_and_nothing_is_written() {
    let ctx = Context::new().unwrap();
    let (b, s, h, d) = (1, 8, 2, 16);
    let x = vec![0.5f32; b * s * h * d];
    let view = || TensorView::new(&x, &[b, s, h, d]).unwrap();
    for p in [1.0f32, 1.5, -0.1, f32::NAN, f32::INFINITY] {
        let mut out = vec![f32::NAN; b * s * h * d];
        let err = ctx
            .forward(
                &view(),
                &view(),
                &view(),
                &mut TensorViewMut::new(&mut out, &[b, s, h, d]).unwrap(),
                &AttentionParams::default().dropout(p, 1, 2),
            )
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
        assert!(err.message().contains("dropout p="), "{err}");
        assert!(out.iter().all(|x| x.is_nan()), "p {p}: output written");
    }
    let cu = [0i32, 8];
    let cu = TensorView::new(&cu, &[2]).unwrap();
    let packed = TensorView::new(&x, &[s, h, d]).unwrap();
    let mut out = vec![f32::NAN; s * h * d];
    let err = ctx
        .forward_varlen(
            &packed,
            &packed,
            &packed,
            &mut TensorViewMut::new(&mut out, &[s, h, d]).unwrap(),
            None,
            &ufa::Varlen::new(cu, cu, s, s),
            &AttentionParams::default().dropout(1.5, 1, 2),
        )
        .unwrap_err();
    assert!(err.message().contains("dropout p=1.5"), "{err}");
    assert!(out.iter().all(|x| x.is_nan()));
}

/// A KV-cache call (inference) refuses dropout, naming it, and leaves the cache, the appended
/// slot included, and the output untouched.
#[test]
fn kvcache_refuses_dropout_and_writes_nothing() {
    let ctx = Context::new().unwrap();
    let (h, d, cap) = (2, 16, 8);
    let q = vec![0.5f32; h * d];
    let new = vec![0.25f32; h * d];
    let mut kc = vec![f32::NAN; cap * h * d];
    let mut vc = vec![f32::NAN; cap * h * d];
    let lens = [3i32];
    let mut out = vec![f32::NAN; h * d];
    let shape = [1, 1, h, d];
    let mut cache = ufa::KvCache {
        k: TensorViewMut::new(&mut kc, &[1, cap, h, d]).unwrap(),
        v: TensorViewMut::new(&mut vc, &[1, cap, h, d]).unwrap(),
        seqlens: TensorView::new(&lens, &[1]).unwrap(),
        block_table: None,
        batch_idx: None,
        checked: false,
    };
    let append = ufa::KvAppend {
        k: TensorView::new(&new, &shape).unwrap(),
        v: TensorView::new(&new, &shape).unwrap(),
        rotary: None,
    };
    let err = ctx
        .forward_kvcache(
            &TensorView::new(&q, &shape).unwrap(),
            &mut cache,
            Some(&append),
            &mut TensorViewMut::new(&mut out, &shape).unwrap(),
            None,
            &AttentionParams::default().dropout(0.1, 1, 2),
        )
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    assert!(err.message().contains("dropout"), "{err}");
    assert!(
        kc.iter().chain(&vc).chain(&out).all(|x| x.is_nan()),
        "written on error"
    );
}
