//! Calls with nothing to compute (batch 0, seqlen_q 0, seqlen_kv 0) return what PyTorch returns,
//! compared element by element with the f64 reference on every CPU kernel family: outputs start
//! as NaN, so one left unwritten fails.

use ufa_testkit::{check_case, check_grads, empty_cases, run_on_every_isa};

#[test]
fn empty_forwards_match_the_reference() {
    run_on_every_isa(&empty_cases(), check_case, |r| r.passed(), |r| r.summary());
}

#[test]
fn empty_backwards_match_the_reference() {
    run_on_every_isa(&empty_cases(), check_grads, |r| r.passed(), |r| r.summary());
}
