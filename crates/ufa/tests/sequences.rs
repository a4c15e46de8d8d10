//! Packed variable-length batches, KV caches and merging on the CPU, against the f64
//! reference, on every kernel family this machine runs.

use ufa_testkit::{
    check_kvcache, check_merge, check_varlen, check_varlen_grads, kvcache_cases, merge_cases,
    run_on_every_isa, varlen_cases, varlen_grad_cases, Comparison, GradComparison,
};

#[test]
fn varlen_forward_matches_reference() {
    run_on_every_isa(
        &varlen_cases(),
        check_varlen,
        Comparison::passed,
        Comparison::summary,
    );
}

#[test]
fn varlen_gradients_match_reference() {
    run_on_every_isa(
        &varlen_grad_cases(),
        check_varlen_grads,
        GradComparison::passed,
        GradComparison::summary,
    );
}

#[test]
fn kvcache_matches_reference_and_appends_exactly() {
    run_on_every_isa(
        &kvcache_cases(),
        check_kvcache,
        Comparison::passed,
        Comparison::summary,
    );
}

/// Decoding over bf16 caches with 8 and 16 query rows a KV head, which the AMX family runs
/// on the tile unit with the scores transposed (`cpu/tile/amx_few.rs`): dense and paged
/// caches (pages of 16, and of 1, where every key is a run of its own), a partial last tile
/// of keys, appending, and two query positions whose causal bands differ.
#[test]
fn kvcache_decoding_of_grouped_heads_matches_reference() {
    use ufa::DType::BF16;
    use ufa_testkit::{Features, KvCacheCase};
    let mut cases = Vec::new();
    let mut f = Features::new(16, 2, 128, BF16);
    f.causal = true;
    cases.push(KvCacheCase::new(1, &[300, 17, 0], 1, f.clone()));
    for page in [16, 1] {
        let mut c = KvCacheCase::new(1, &[300, 17, 0], 1, f.clone());
        c.page_size = Some(page);
        cases.push(c);
    }
    let mut g = Features::new(32, 4, 64, BF16);
    g.causal = true;
    let mut c = KvCacheCase::new(2, &[129, 40], 2, g);
    c.page_size = Some(64);
    cases.push(c);
    run_on_every_isa(
        &cases,
        check_kvcache,
        Comparison::passed,
        Comparison::summary,
    );
}

#[test]
fn merged_states_match_reference() {
    run_on_every_isa(
        &merge_cases(),
        check_merge,
        Comparison::passed,
        Comparison::summary,
    );
}

mod properties {
    //! Random packed batches and KV-cache calls against the f64 reference on the best CPU
    //! kernel family: empty and one-row sequences, more queries than keys, pages of 1 to 256
    //! rows, GQA 1/4/8, every dtype and feature. UFA_PROPTEST_CASES sets how many.

    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    use ufa::{CausalAlignment, Context, DType};
    use ufa_testkit::{check_kvcache, check_varlen, Alibi, Features, KvCacheCase, VarlenCase};

    fn cases() -> u32 {
        std::env::var("UFA_PROPTEST_CASES")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(32)
    }

    fn runner() -> TestRunner {
        TestRunner::new(Config {
            cases: cases(),
            max_global_rejects: 10_000,
            ..Config::default()
        })
    }

    /// Sequence lengths: mostly short, with zeros and ones, sometimes a few hundred.
    fn length() -> impl Strategy<Value = usize> {
        prop_oneof![1 => Just(0usize), 1 => Just(1usize), 4 => 2usize..40, 1 => 40usize..300]
    }

    fn page_size() -> impl Strategy<Value = usize> {
        prop_oneof![Just(1usize), Just(2), Just(16), Just(64), Just(256)]
    }

    prop_compose! {
        fn features()(
            heads_kv in 1usize..=2,
            ratio in prop_oneof![Just(1usize), Just(4), Just(8)],
            head_dim in proptest::sample::select(vec![8usize, 32, 64, 80, 128]),
            dtype in prop_oneof![Just(DType::F32), Just(DType::BF16), Just(DType::F16)],
            causal in any::<bool>(),
            top_left in proptest::bool::weighted(0.25),
            window in prop_oneof![3 => Just((-1i64, -1i64)), 1 => (0i64..40, prop_oneof![Just(-1i64), 0i64..8])],
            softcap in prop_oneof![3 => Just(0.0f32), 1 => 2.0f32..30.0],
            alibi in prop_oneof![3 => Just(None), 1 => Just(Some(Alibi::PerHead)), 1 => Just(Some(Alibi::PerBatchHead))],
        ) -> Features {
            let mut f = Features::new(heads_kv * ratio, heads_kv, head_dim, dtype);
            f.causal = causal;
            f.alignment = if top_left { CausalAlignment::TopLeft } else { CausalAlignment::BottomRight };
            f.window = window;
            f.softcap = softcap;
            f.alibi = alibi;
            f
        }
    }

    prop_compose! {
        fn varlen_case()(
            lens in proptest::collection::vec((length(), length(), 0usize..=100), 1..=4),
            used in proptest::bool::weighted(0.25),
            page in prop_oneof![2 => Just(None), 1 => page_size().prop_map(Some)],
            max_slack in prop_oneof![Just(0usize), 1usize..9],
            f in features(),
        ) -> VarlenCase {
            let q: Vec<usize> = lens.iter().map(|l| l.0).collect();
            let kv: Vec<usize> = lens.iter().map(|l| l.1).collect();
            let mut c = VarlenCase::new(&q, &kv, f);
            if used {
                // A percentage of each sequence's keys.
                c.used_kv = Some(lens.iter().map(|l| l.1 * l.2 / 100).collect());
            }
            c.page_size = page;
            c.max_slack = max_slack;
            c
        }
    }

    prop_compose! {
        fn kvcache_case()(
            seqlen_q in prop_oneof![3 => Just(1usize), 1 => 2usize..12],
            cache_lens in proptest::collection::vec(length(), 1..=4),
            seqlen_new in prop_oneof![Just(0usize), Just(1usize), 2usize..12],
            spare_slots in 0usize..5,
            page in prop_oneof![1 => Just(None), 2 => page_size().prop_map(Some)],
            shared_prefix in any::<bool>(),
            gathered in any::<bool>(),
            rotary in prop_oneof![2 => Just(None), 1 => (1usize..=4, any::<bool>()).prop_map(Some)],
            f in features(),
        ) -> KvCacheCase {
            let head_dim = f.head_dim;
            let mut c = KvCacheCase::new(seqlen_q, &cache_lens, seqlen_new, f);
            c.capacity += spare_slots;
            c.page_size = page;
            // Prefix sharing needs two sequences; a gathered cache is a dense one.
            c.shared_prefix = page.is_some() && cache_lens.len() >= 2 && shared_prefix;
            c.gathered = page.is_none() && gathered;
            if seqlen_new > 0 {
                // Quarters of the head dim, rounded to even: 8-dim heads rotate 2 to 8 columns.
                c.rotary = rotary.map(|(quarters, i)| ((head_dim * quarters / 4) & !1, i))
                    .filter(|&(d, _)| d > 0);
            }
            c
        }
    }

    fn work(seqs: impl Iterator<Item = (usize, usize)>, f: &Features) -> usize {
        seqs.map(|(q, kv)| q * kv).sum::<usize>() * f.heads_q * 2 * f.head_dim
    }

    #[test]
    fn random_packed_batches_match_reference() {
        let ctx = Context::builder().num_threads(2).build().unwrap();
        runner()
            .run(&(varlen_case(), any::<u64>()), |(case, seed)| {
                let seqs = case
                    .seqlens_q
                    .iter()
                    .copied()
                    .zip(case.seqlens_kv.iter().copied());
                prop_assume!(work(seqs, &case.f) <= 60_000_000);
                let cmp = check_varlen(&ctx, &case, seed)
                    .map_err(|e| TestCaseError::fail(format!("{}: {e}", case.describe())))?;
                prop_assert!(
                    cmp.passed(),
                    "{} (seed {seed}): {}",
                    case.describe(),
                    cmp.summary()
                );
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn random_kvcache_calls_match_reference() {
        let ctx = Context::builder().num_threads(2).build().unwrap();
        runner()
            .run(&(kvcache_case(), any::<u64>()), |(case, seed)| {
                let seqs = case
                    .cache_lens
                    .iter()
                    .map(|&l| (case.seqlen_q, l + case.seqlen_new));
                prop_assume!(work(seqs, &case.f) <= 60_000_000);
                let cmp = check_kvcache(&ctx, &case, seed)
                    .map_err(|e| TestCaseError::fail(format!("{}: {e}", case.describe())))?;
                prop_assert!(
                    cmp.passed(),
                    "{} (seed {seed}): {}",
                    case.describe(),
                    cmp.summary()
                );
                Ok(())
            })
            .unwrap();
    }
}
