//! Destroying a context releases its CPU threads before the call returns: a program that
//! creates and destroys contexts in a loop keeps a constant thread count, and memory checkers
//! see no worker still alive at exit. (Its own test binary: it counts the process's threads.)

#![cfg(target_os = "linux")]

use ufa::{Context, DType};
use ufa_testkit::{Case, Instance};

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

#[test]
fn dropping_a_context_joins_its_threads() {
    // Large enough to run on the pool rather than inline on the calling thread.
    let case = Case::new(2, 128, 256, 4, 64, DType::F32);
    let before = thread_count();
    for round in 0..20 {
        let ctx = Context::builder().num_threads(4).build().unwrap();
        Instance::new(&case, round).run(&ctx).unwrap();
        assert!(
            thread_count() >= before + 4,
            "round {round}: the call did not start the pool's 4 threads"
        );
        drop(ctx);
        assert_eq!(
            thread_count(),
            before,
            "round {round}: threads left running after the context was dropped"
        );
    }
}
