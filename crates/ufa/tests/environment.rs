//! Configuration from the environment (its own test binary: it changes process-wide state).

use ufa::{Context, NUM_THREADS_ENV};

#[test]
fn thread_count_from_environment() {
    std::env::set_var(NUM_THREADS_ENV, "3");
    assert_eq!(Context::new().unwrap().num_threads(), 3);
    for bad in ["lots", "0", "-1", "99999"] {
        std::env::set_var(NUM_THREADS_ENV, bad);
        let err = Context::new().err().expect("must fail");
        assert_eq!(err.kind(), ufa::ErrorKind::InvalidArgument);
        assert!(
            err.message().contains(&format!("UFA_NUM_THREADS={bad:?}")),
            "{err}"
        );
    }
    // An explicit count wins over the environment.
    assert_eq!(
        Context::builder()
            .num_threads(2)
            .build()
            .unwrap()
            .num_threads(),
        2
    );
    std::env::remove_var(NUM_THREADS_ENV);
}
