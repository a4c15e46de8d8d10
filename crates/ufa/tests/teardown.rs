//! Destroying a context releases its CPU threads before the call returns: a program that
//! creates and destroys contexts in a loop keeps a constant thread count, and memory checkers
//! see no worker still running at exit. (Its own test binary: it counts the process's workers.)

use ufa::{Context, DType};
use ufa_testkit::{Case, Instance};

#[test]
fn dropping_a_context_joins_its_threads() {
    use ufa::internals::live_workers;
    // Large enough to run on the pool rather than inline on the calling thread.
    let case = Case::new(2, 128, 256, 4, 64, DType::F32);
    assert_eq!(live_workers(), 0);
    for round in 0..20 {
        let ctx = Context::builder().num_threads(4).build().unwrap();
        Instance::new(&case, round).run(&ctx).unwrap();
        // The call ran on the pool (workers not needed yet may still be starting).
        assert!(
            live_workers() > 0,
            "round {round}: the call started no workers"
        );
        drop(ctx);
        // Each worker lowers the count as its last act: 0 means every one has run to its end.
        assert_eq!(
            live_workers(),
            0,
            "round {round}: workers still running after the context was dropped"
        );
    }
}
