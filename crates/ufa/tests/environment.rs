//! Configuration from the environment (its own test binary: it changes process-wide state).

use ufa::{Context, Isa, CPU_ISA_ENV, NUM_THREADS_ENV};

/// One test: the variables are process-wide, and every context reads both.
#[test]
fn configuration_from_environment() {
    thread_count_from_environment();
    kernel_family_from_environment();
}

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

fn kernel_family_from_environment() {
    // Every family this CPU runs, by the names `ufa info` prints, any case.
    for isa in Isa::ALL.into_iter().filter(|i| i.is_supported()) {
        std::env::set_var(CPU_ISA_ENV, isa.name().to_ascii_uppercase());
        assert_eq!(Context::new().unwrap().cpu_isa(), isa);
    }
    // An explicit family wins over the environment.
    std::env::set_var(CPU_ISA_ENV, "avx2-but-not-quite");
    let ctx = Context::builder().cpu_isa(Isa::Portable).build().unwrap();
    assert_eq!(ctx.cpu_isa(), Isa::Portable);
    // An unknown name: an error naming the variable, the value and the names there are.
    let err = Context::new().err().expect("must fail");
    assert_eq!(err.kind(), ufa::ErrorKind::InvalidArgument);
    let msg = err.message();
    assert!(msg.contains("UFA_CPU_ISA=\"avx2-but-not-quite\""), "{err}");
    assert!(msg.contains("portable"), "{err}");
    // A family this CPU cannot run, where there is one.
    if let Some(isa) = Isa::ALL.into_iter().find(|i| !i.is_supported()) {
        std::env::set_var(CPU_ISA_ENV, isa.name());
        let err = Context::new().err().expect("must fail");
        assert_eq!(err.kind(), ufa::ErrorKind::Unsupported);
        assert!(
            err.message()
                .contains(&format!("UFA_CPU_ISA={:?}", isa.name())),
            "{err}"
        );
    }
    // Unset or empty: the detected family.
    std::env::set_var(CPU_ISA_ENV, " ");
    assert_eq!(Context::new().unwrap().cpu_isa(), Isa::detect());
    std::env::remove_var(CPU_ISA_ENV);
    assert_eq!(Context::new().unwrap().cpu_isa(), Isa::detect());
}
