//! Results must not depend on the thread count (bitwise), including split-KV decoding, and one
//! context must serve many threads at once.

use std::sync::Arc;
use ufa::{Context, DType};
use ufa_testkit::{Alibi, Case, Instance};

fn problems() -> Vec<Case> {
    let mut v = vec![];
    let mut c = Case::new(2, 129, 300, 8, 80, DType::F32);
    c.heads_kv = 2;
    c.causal = true;
    c.alibi = Some(Alibi::PerHead);
    v.push(c);
    let mut c = Case::new(1, 1, 5000, 16, 128, DType::BF16); // split-KV path
    c.heads_kv = 2;
    v.push(c);
    v.push(Case::new(2, 2, 3000, 3, 96, DType::F32)); // row-by-row decode path, split-KV
    let mut c = Case::new(3, 17, 1000, 4, 64, DType::F16);
    c.window = (100, 3);
    v.push(c);
    // GQA decoding over [B, S, H, D] keys: how many KV heads a job interleaves follows the
    // pool's thread count (cpu/forward.rs, heads_per_job); the results must not.
    let mut c = Case::new(1, 1, 1024, 32, 128, DType::F32);
    c.heads_kv = 8;
    v.push(c);
    // Decoding over [B, S, H, D] keys with 1, 2 and 7 threads: jobs of all 4 KV heads, of 2,
    // and single heads (cpu/tile.rs attend_heads against attend), in bf16 (the bf16 dot
    // products) and in f16 with two query rows of a group of two.
    let mut c = Case::new(2, 1, 1024, 4, 128, DType::BF16);
    c.heads_kv = 4;
    v.push(c);
    let mut c = Case::new(2, 2, 1000, 8, 80, DType::F16);
    c.heads_kv = 4;
    c.causal = true;
    v.push(c);
    // Groups of eight and six query rows a KV head (the sums of V in column blocks held in
    // registers across keys; 80 values a row leave a last block of one vector), each row's
    // scores summed four or two at a time, whether a job holds one KV head or both.
    let mut c = Case::new(2, 1, 700, 16, 128, DType::BF16);
    c.heads_kv = 2;
    v.push(c);
    let mut c = Case::new(1, 1, 515, 12, 80, DType::F32);
    c.heads_kv = 2;
    v.push(c);
    // The same over [B, H, S, D] keys (PyTorch's layout), whose grouped-query rows interleave
    // KV heads too: four rows a head in bf16 and f32, eight in f16 over odd keys.
    for (dtype, heads_q, keys) in [
        (DType::BF16, 16, 1024),
        (DType::F32, 16, 777),
        (DType::F16, 32, 333),
    ] {
        let mut c = Case::new(2, 1, keys, heads_q, 128, dtype);
        c.heads_kv = 4;
        c.placement = [ufa_testkit::Placement::HeadsFirst; 4];
        v.push(c);
    }
    v
}

fn run(case: &Case, threads: usize, seed: u64) -> (Vec<f64>, Option<Vec<f64>>) {
    let ctx = Context::builder().num_threads(threads).build().unwrap();
    let mut inst = Instance::new(case, seed);
    inst.run(&ctx).unwrap();
    inst.outputs()
}

#[test]
fn bitwise_identical_for_1_2_and_7_threads() {
    for (i, case) in problems().iter().enumerate() {
        let seed = 1000 + i as u64;
        let one = run(case, 1, seed);
        assert!(one.0.iter().all(|x| x.is_finite()), "{}", case.describe());
        for threads in [2, 7] {
            let other = run(case, threads, seed);
            // Compare bit patterns: equal floats, and no -0.0/+0.0 or NaN slips.
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&one.0),
                bits(&other.0),
                "{} out, {threads} threads",
                case.describe()
            );
            assert_eq!(
                one.1.as_deref().map(bits),
                other.1.as_deref().map(bits),
                "{} lse, {threads} threads",
                case.describe()
            );
        }
    }
}

#[test]
fn one_context_serves_many_threads() {
    let ctx = Arc::new(Context::builder().num_threads(3).build().unwrap());
    let case = problems().remove(0);
    let expected = run(&case, 1, 7);
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (ctx, case) = (ctx.clone(), case.clone());
            std::thread::spawn(move || {
                let mut inst = Instance::new(&case, 7);
                for _ in 0..3 {
                    inst.run(&ctx).unwrap();
                }
                inst.outputs()
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap().0, expected.0);
    }
}

/// A thread keeps the scratch of its small calls for its next call of the same shape
/// (`Scratch::keep` in cpu/tile.rs): that call must compute bitwise what it computes on a
/// thread that kept nothing, whatever the data before it. The first case has several blocks
/// of rows per head, so its transposed K tiles are cached within a call and must not be
/// taken for the next call's.
#[test]
fn kept_scratch_carries_nothing_between_calls() {
    let mut causal = Case::new(2, 7, 40, 4, 48, DType::F16);
    causal.causal = true;
    causal.heads_kv = 2;
    let cases = [
        Case::new(1, 192, 64, 1, 32, DType::F32),
        Case::new(1, 16, 16, 1, 64, DType::F32),
        Case::new(2, 9, 70, 2, 64, DType::BF16),
        causal,
    ];
    let ctx = Context::builder().num_threads(2).build().unwrap();
    let run_on = |case: &Case, seed: u64| {
        let mut inst = Instance::new(case, seed);
        inst.run(&ctx).unwrap();
        inst.outputs()
    };
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for case in &cases {
        run_on(case, 1);
        let after_another = run_on(case, 2);
        let fresh = std::thread::scope(|s| s.spawn(|| run_on(case, 2)).join().unwrap());
        // assert! rather than assert_eq!: a failure should name the case, not print every bit.
        assert!(
            bits(&after_another.0) == bits(&fresh.0),
            "{}: out after another call of the same shape differs",
            case.describe()
        );
        assert!(
            after_another.1.as_deref().map(bits) == fresh.1.as_deref().map(bits),
            "{}: lse after another call of the same shape differs",
            case.describe()
        );
    }
}
