//! `ufa check`'s spread of problems, on every CPU kernel family this machine runs.

use ufa::testing::{check_case, standard_cases};
use ufa::{Context, Isa};

#[test]
fn standard_cases_match_reference_on_every_isa() {
    let seed = ufa::testing::seed();
    println!("seed {seed} (replay with UFA_TEST_SEED={seed})");
    let mut failures = Vec::new();
    for isa in Isa::ALL.into_iter().filter(|i| i.is_supported()) {
        let ctx = Context::builder()
            .cpu_isa(isa)
            .num_threads(2)
            .build()
            .unwrap();
        for (i, case) in standard_cases().iter().enumerate() {
            let cmp = check_case(&ctx, case, seed.wrapping_add(i as u64)).unwrap();
            println!(
                "{isa:>9} {:<55} out {:.2e} lse {:?}",
                case.describe(),
                cmp.out_error,
                cmp.lse_error
            );
            if !cmp.passed() {
                failures.push(format!("{isa} {}: {cmp:?}", case.describe()));
            }
        }
    }
    assert!(failures.is_empty(), "seed {seed}: {failures:#?}");
}
