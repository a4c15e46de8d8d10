//! Property tests: random shapes and feature combinations against the f64 reference, on the
//! best CPU kernel family. Set UFA_PROPTEST_CASES to run more (or fewer) cases.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use ufa::{CausalAlignment, Context, DType};
use ufa_testkit::{check_case, Alibi, Case, MaskSpec, Placement};

const HEAD_DIMS: [usize; 10] = [1, 8, 32, 64, 80, 96, 128, 160, 192, 256];
/// Keeps one case's f64 reference under about a second.
const MAX_WORK: usize = 120_000_000;

fn dtype() -> impl Strategy<Value = DType> {
    prop_oneof![Just(DType::F32), Just(DType::BF16), Just(DType::F16)]
}

fn placement() -> impl Strategy<Value = Placement> {
    prop_oneof![
        Just(Placement::Contiguous),
        Just(Placement::HeadsFirst),
        Just(Placement::Padded)
    ]
}

fn window_side() -> impl Strategy<Value = i64> {
    prop_oneof![2 => Just(-1i64), 1 => 0i64..80]
}

fn mask() -> impl Strategy<Value = Option<MaskSpec>> {
    let spec = (
        prop_oneof![
            Just(DType::Bool),
            Just(DType::F32),
            Just(DType::F16),
            Just(DType::BF16)
        ],
        any::<[bool; 4]>(),
        1usize..=4,
    )
        .prop_map(|(dtype, mut full, ndim)| {
            // Dimensions dropped on the left are implicitly 1.
            for f in full.iter_mut().take(4 - ndim) {
                *f = false;
            }
            MaskSpec { dtype, full, ndim }
        });
    prop_oneof![2 => Just(None), 1 => spec.prop_map(Some)]
}

prop_compose! {
    fn case()(
        batch in 1usize..=3,
        seqlen_q in 1usize..=300,
        seqlen_kv in 1usize..=300,
        heads_kv in 1usize..=2,
        ratio in prop_oneof![Just(1usize), Just(2), Just(4), Just(8)],
        head_dim in proptest::sample::select(HEAD_DIMS.to_vec()),
        dv_differs in proptest::bool::weighted(0.2),
        head_dim_v in proptest::sample::select(HEAD_DIMS.to_vec()),
        dtype in dtype(),
        f32_out in proptest::bool::weighted(0.2),
        causal in any::<bool>(),
        top_left in proptest::bool::weighted(0.25),
        window in (window_side(), window_side()),
        softcap in prop_oneof![3 => Just(0.0f32), 1 => 2.0f32..50.0],
        scale in prop_oneof![3 => Just(None), 1 => (0.01f32..1.0).prop_map(Some)],
        alibi in prop_oneof![2 => Just(None), 1 => Just(Some(Alibi::PerHead)), 1 => Just(Some(Alibi::PerBatchHead))],
        mask in mask(),
        placement in [placement(), placement(), placement(), placement()],
        with_lse in any::<bool>(),
    ) -> Case {
        let mut c = Case::new(batch, seqlen_q, seqlen_kv, heads_kv * ratio, head_dim, dtype);
        c.heads_kv = heads_kv;
        if dv_differs {
            c.head_dim_v = head_dim_v;
        }
        if f32_out {
            c.out_dtype = DType::F32;
        }
        c.causal = causal;
        c.alignment = if top_left { CausalAlignment::TopLeft } else { CausalAlignment::BottomRight };
        c.window = window;
        c.softcap = softcap;
        c.scale = scale;
        c.alibi = alibi;
        c.mask = mask;
        c.placement = placement;
        c.with_lse = with_lse;
        c
    }
}

fn work(c: &Case) -> usize {
    c.batch * c.heads_q * c.seqlen_q * c.seqlen_kv * (c.head_dim + c.head_dim_v)
}

#[test]
fn random_problems_match_reference() {
    let cases = std::env::var("UFA_PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let ctx = Context::builder().num_threads(2).build().unwrap();
    let mut runner = TestRunner::new(Config {
        cases,
        max_global_rejects: 10_000,
        ..Config::default()
    });
    runner
        .run(&(case(), any::<u64>()), |(case, seed)| {
            prop_assume!(work(&case) <= MAX_WORK);
            let cmp =
                check_case(&ctx, &case, seed).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(
                cmp.passed(),
                "{} (seed {seed}): out error {:.3e} (bound {:.0e}), lse error {:?}, {} unwritten",
                case.describe(),
                cmp.out_error,
                cmp.tolerance,
                cmp.lse_error,
                cmp.unwritten
            );
            Ok(())
        })
        .unwrap();
}
