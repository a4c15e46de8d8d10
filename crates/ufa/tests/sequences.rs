//! Packed variable-length batches, KV caches and merging on the CPU, against the f64
//! reference, on every kernel family this machine runs.

use ufa::testing::{
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

#[test]
fn merged_states_match_reference() {
    run_on_every_isa(
        &merge_cases(),
        check_merge,
        Comparison::passed,
        Comparison::summary,
    );
}
