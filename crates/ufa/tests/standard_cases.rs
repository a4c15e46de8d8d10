//! `ufa check`'s spread of problems, on every CPU kernel family this machine runs.

use ufa::testing::{check_case, run_on_every_isa, standard_cases, Comparison};

#[test]
fn standard_cases_match_reference_on_every_isa() {
    run_on_every_isa(
        &standard_cases(),
        check_case,
        Comparison::passed,
        Comparison::summary,
    );
}
