//! Functions that fail on purpose, so the C tests can reach every status code and the panic
//! boundary. Built only with the `test-hooks` feature; never in a shipped library.

use crate::boundary::{ufa_call, ufa_status, UFA_STATUS_INTERNAL};
use crate::mfa::mfa_call;
use std::ffi::c_int;
use ufa::{Error, ErrorKind};

// The repeated `#[cfg]` on each function (the module is already cfg'd) is for cbindgen, which
// reads this file alone and turns it into `#if defined(UFA_TEST_HOOKS)` in ufa.h.

/// Panics inside the library; the boundary must return `UFA_STATUS_INTERNAL`.
#[cfg(feature = "test-hooks")]
#[no_mangle]
pub extern "C" fn ufa_debug_trigger_panic() -> ufa_status {
    ufa_call(|| panic!("ufa_debug_trigger_panic: a deliberate panic"))
}

/// Panics inside an `mfa_*` boundary; it must return `MFA_ERROR_EXECUTION_FAILED`.
#[cfg(feature = "test-hooks")]
#[no_mangle]
pub extern "C" fn mfa_debug_trigger_panic() -> c_int {
    mfa_call(|| panic!("mfa_debug_trigger_panic: a deliberate panic"))
}

fn kind_of(status: ufa_status) -> Option<ErrorKind> {
    use ErrorKind::*;
    let kinds = [
        InvalidArgument,
        Unsupported,
        DeviceUnavailable,
        OutOfMemory,
        Backend,
        Internal,
    ];
    kinds
        .into_iter()
        .find(|&k| crate::boundary::status_of(k) == status)
}

/// A core error of the kind `status` stands for (a panic for `UFA_STATUS_INTERNAL`); nothing
/// for 0 or an unknown code.
fn fail_with(status: ufa_status) -> Result<(), Error> {
    match kind_of(status) {
        Some(ErrorKind::Internal) => panic!("debug_fail_with({UFA_STATUS_INTERNAL})"),
        Some(kind) => Err(Error::new(kind, format!("debug_fail_with({status})"))),
        None => Ok(()),
    }
}

/// Fails with a core error of the kind `status` stands for (a panic for
/// `UFA_STATUS_INTERNAL`), through the same mapping real failures take; success for 0 or an
/// unknown code. For failures no test can provoke on a given machine (out of memory, a driver
/// fault).
#[cfg(feature = "test-hooks")]
#[no_mangle]
pub extern "C" fn ufa_debug_fail_with(status: ufa_status) -> ufa_status {
    ufa_call(|| fail_with(status))
}

/// As `ufa_debug_fail_with`, through the `mfa_*` boundary and its code mapping.
#[cfg(feature = "test-hooks")]
#[no_mangle]
pub extern "C" fn mfa_debug_fail_with(status: ufa_status) -> c_int {
    mfa_call(|| fail_with(status))
}
