//! `ufa check`'s spread of problems, on every CPU kernel family this machine runs.

use ufa_testkit::{check_case, run_on_every_isa, standard_cases, Comparison};

#[test]
fn standard_cases_match_reference_on_every_isa() {
    run_on_every_isa(
        &standard_cases(),
        check_case,
        Comparison::passed,
        Comparison::summary,
    );
}

/// The decoding shapes CUDA serves with its split-KV kernel (`testing::decode_cases`), on the
/// CPU's own split decoding, on every kernel family.
#[test]
fn decode_cases_match_reference_on_every_isa() {
    run_on_every_isa(
        &ufa_testkit::decode_cases(),
        check_case,
        Comparison::passed,
        Comparison::summary,
    );
}
