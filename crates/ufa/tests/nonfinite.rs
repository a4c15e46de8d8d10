//! Non-finite inputs propagate as the f64 reference says: a NaN or ±inf planted in q, k, v, an
//! additive mask, ALiBi slopes or dO reaches exactly the outputs it reaches in the reference
//! (never hidden as a finite number, never spread beyond the tiles of a product with a masked
//! probability; see `ufa_testkit::nonfinite`). Fixed cases on every CPU kernel family, then
//! random ones on the best family. Set UFA_PROPTEST_CASES to run more (or fewer) random cases.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use ufa::{Context, DType};
use ufa_testkit::{
    check_nonfinite, nonfinite_cases, run_on_every_isa, Alibi, Case, MaskSpec, NonFiniteCase,
    Plant, Site,
};

#[test]
fn planted_values_reach_what_the_reference_says_on_every_kernel_family() {
    run_on_every_isa(
        &nonfinite_cases(),
        check_nonfinite,
        |r| r.passed(),
        |r| r.summary(),
    );
}

/// The example of the issue, stated plainly: one NaN in one key of a head makes every output
/// row of that head NaN (as PyTorch's SDPA), and leaves the other head alone.
#[test]
fn one_nan_key_makes_its_head_nan() {
    let (s, h, d) = (4, 2, 8);
    let q: Vec<f32> = (0..s * h * d).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut k: Vec<f32> = (0..s * h * d).map(|i| (i as f32 * 0.21).cos()).collect();
    let v = q.clone();
    k[(h * d) + 3] = f32::NAN; // key 1, head 0, element 3
    let (mut out, mut lse) = (vec![0f32; s * h * d], vec![0f32; h * s]);
    let ctx = Context::new().unwrap();
    ctx.forward_with_lse(
        &ufa::TensorView::new(&q, &[1, s, h, d]).unwrap(),
        &ufa::TensorView::new(&k, &[1, s, h, d]).unwrap(),
        &ufa::TensorView::new(&v, &[1, s, h, d]).unwrap(),
        &mut ufa::TensorViewMut::new(&mut out, &[1, s, h, d]).unwrap(),
        Some(&mut ufa::TensorViewMut::new(&mut lse, &[1, h, s]).unwrap()),
        &ufa::AttentionParams::default(),
    )
    .unwrap();
    for i in 0..s {
        assert!(
            out[i * h * d..][..d].iter().all(|x| x.is_nan()),
            "row {i}, head 0: {out:?}"
        );
        assert!(out[i * h * d + d..][..d].iter().all(|x| x.is_finite()));
        assert!(lse[i].is_nan() && lse[s + i].is_finite(), "{lse:?}");
    }
}

/// Kernel scratch outlives a call (it is kept for the next ones of its shape of buffers): a
/// call whose inputs are all NaN leaves nothing that a next call reads, on the worker pool,
/// where that call's last key tile is shorter (its padding was the first call's keys).
#[test]
fn a_call_after_one_of_nan_inputs_sees_none_of_them() {
    let ctx = Context::new().unwrap();
    let (b, sq, h, d) = (1, 300, 4, 64);
    for dtype in [DType::F32, DType::BF16] {
        if dtype == DType::F32 {
            nan_forward(&ctx, f32::NAN, [b, sq, 1100, h, d]);
        } else {
            nan_forward(&ctx, half::bf16::NAN, [b, sq, 1100, h, d]);
        }
        let r = ufa_testkit::check_case(&ctx, &Case::new(b, sq, 1040, h, d, dtype), 7).unwrap();
        assert!(r.passed(), "{dtype:?}: {}", r.summary());
    }
}

/// The backward's buffers are kept between calls too: a backward whose inputs are all NaN
/// leaves nothing that a next one with fewer rows and a shorter last key block reads.
#[test]
fn a_backward_after_one_of_nan_inputs_sees_none_of_them() {
    let ctx = Context::new().unwrap();
    let (b, h, d) = (1, 4, 64);
    for dtype in [DType::F32, DType::BF16] {
        if dtype == DType::F32 {
            nan_backward(&ctx, f32::NAN, [b, 200, 700, h, d]);
        } else {
            nan_backward(&ctx, half::bf16::NAN, [b, 200, 700, h, d]);
        }
        // Fewer rows than a block: the rows past them hold the NaN call's.
        let r = ufa_testkit::check_grads(&ctx, &Case::new(b, 40, 650, h, d, dtype), 7).unwrap();
        assert!(r.passed(), "{dtype:?}: {}", r.summary());
    }
}

/// A forward of `[b, sq, skv, h, d]` whose every input is `nan`.
fn nan_forward<T: ufa::Element>(ctx: &Context, nan: T, [b, sq, skv, h, d]: [usize; 5]) {
    let (q, kv, mut out) = (
        vec![nan; b * sq * h * d],
        vec![nan; b * skv * h * d],
        vec![nan; b * sq * h * d],
    );
    let kv = ufa::TensorView::new(&kv, &[b, skv, h, d]).unwrap();
    let q = ufa::TensorView::new(&q, &[b, sq, h, d]).unwrap();
    let mut o = ufa::TensorViewMut::new(&mut out, &[b, sq, h, d]).unwrap();
    ctx.forward(&q, &kv, &kv, &mut o, &ufa::AttentionParams::default())
        .unwrap();
}

/// A backward of `[b, sq, skv, h, d]` whose every input (the LSE too) is `nan`.
fn nan_backward<T: ufa::Element>(ctx: &Context, nan: T, [b, sq, skv, h, d]: [usize; 5]) {
    let (qn, kvn) = (b * sq * h * d, b * skv * h * d);
    let (q, kv, lse) = (vec![nan; qn], vec![nan; kvn], vec![f32::NAN; b * h * sq]);
    let (mut dq, mut dk, mut dv) = (vec![nan; qn], vec![nan; kvn], vec![nan; kvn]);
    let qv = ufa::TensorView::new(&q, &[b, sq, h, d]).unwrap();
    let kvv = ufa::TensorView::new(&kv, &[b, skv, h, d]).unwrap();
    let inputs = ufa::BackwardInputs {
        q: qv,
        k: kvv,
        v: kvv,
        out: qv,
        dout: qv,
        lse: ufa::TensorView::new(&lse, &[b, h, sq]).unwrap(),
    };
    let mut grads = ufa::Gradients {
        dq: ufa::TensorViewMut::new(&mut dq, &[b, sq, h, d]).unwrap(),
        dk: ufa::TensorViewMut::new(&mut dk, &[b, skv, h, d]).unwrap(),
        dv: ufa::TensorViewMut::new(&mut dv, &[b, skv, h, d]).unwrap(),
    };
    ctx.backward(&inputs, &mut grads, &ufa::AttentionParams::default())
        .unwrap();
}

fn site() -> impl Strategy<Value = Site> {
    prop_oneof![
        Just(Site::Q),
        Just(Site::K),
        Just(Site::V),
        Just(Site::Mask),
        Just(Site::Alibi),
        Just(Site::Dout)
    ]
}

fn value() -> impl Strategy<Value = f32> {
    prop_oneof![
        2 => Just(f32::NAN),
        1 => Just(f32::INFINITY),
        1 => Just(f32::NEG_INFINITY)
    ]
}

prop_compose! {
    fn nonfinite_case()(
        batch in 1usize..=2,
        seqlen_q in 1usize..=80,
        seqlen_kv in 1usize..=160,
        heads_kv in 1usize..=2,
        ratio in prop_oneof![Just(1usize), Just(2), Just(4)],
        head_dim in proptest::sample::select(vec![1usize, 8, 32, 64, 80, 128]),
        dtype in prop_oneof![Just(DType::F32), Just(DType::BF16), Just(DType::F16)],
        causal in any::<bool>(),
        window in prop_oneof![2 => Just((-1i64, -1i64)), 1 => (0i64..40, 0i64..40)],
        softcap in prop_oneof![3 => Just(0.0f32), 1 => 2.0f32..30.0],
        alibi in proptest::bool::weighted(0.3),
        mask in prop_oneof![2 => Just(None), 1 => Just(Some(DType::F32)), 1 => Just(Some(DType::Bool))],
        plants in proptest::collection::vec((site(), any::<u64>(), value()), 1..=3),
        backward in any::<bool>(),
    ) -> NonFiniteCase {
        let mut c = Case::new(batch, seqlen_q, seqlen_kv, heads_kv * ratio, head_dim, dtype);
        c.heads_kv = heads_kv;
        c.causal = causal;
        c.window = window;
        c.softcap = softcap;
        c.alibi = alibi.then_some(Alibi::PerBatchHead);
        c.mask = mask.map(|dtype| MaskSpec { dtype, full: [false, true, true, true], ndim: 3 });
        let plants = plants
            .into_iter()
            .map(|(site, pick, value)| Plant { site, pick, value })
            .collect();
        NonFiniteCase { case: c, plants, backward }
    }
}

#[test]
fn random_plants_reach_what_the_reference_says() {
    let cases = std::env::var("UFA_PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(48);
    let ctx = Context::builder().num_threads(2).build().unwrap();
    let mut runner = TestRunner::new(Config {
        cases,
        ..Config::default()
    });
    runner
        .run(&(nonfinite_case(), any::<u64>()), |(c, seed)| {
            let r =
                check_nonfinite(&ctx, &c, seed).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(
                r.passed(),
                "{} (seed {seed}): {}",
                ufa_testkit::Described::describe(&c),
                r.summary()
            );
            Ok(())
        })
        .unwrap();
}
