//! The panic boundary, the status codes and the thread's last error message.

use std::any::Any;
use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use ufa::{Error, ErrorKind};

/// A status code returned by every fallible `ufa_*` function; 0 is success. Other values name
/// the kind of failure; `ufa_last_error_message()` tells the details.
pub type ufa_status = i32;

/// The call succeeded and wrote its out-parameters.
pub const UFA_STATUS_SUCCESS: ufa_status = 0;
/// An argument is NULL, inconsistent or out of range; the message names it and its value.
pub const UFA_STATUS_INVALID_ARGUMENT: ufa_status = 1;
/// The request is valid but this build, backend or CPU does not implement it.
pub const UFA_STATUS_UNSUPPORTED: ufa_status = 2;
/// The device the tensors live on cannot be used (no CUDA driver, no such ordinal, ...).
pub const UFA_STATUS_DEVICE_UNAVAILABLE: ufa_status = 3;
/// Memory for outputs or scratch space could not be allocated.
pub const UFA_STATUS_OUT_OF_MEMORY: ufa_status = 4;
/// A backend failed while running (a driver error, a kernel that failed to compile).
pub const UFA_STATUS_BACKEND_FAILURE: ufa_status = 5;
/// A bug inside ufa: a panic was caught at the C boundary. Please report the message.
pub const UFA_STATUS_INTERNAL: ufa_status = 6;

pub(crate) fn status_of(kind: ErrorKind) -> ufa_status {
    match kind {
        ErrorKind::InvalidArgument => UFA_STATUS_INVALID_ARGUMENT,
        ErrorKind::Unsupported => UFA_STATUS_UNSUPPORTED,
        ErrorKind::DeviceUnavailable => UFA_STATUS_DEVICE_UNAVAILABLE,
        ErrorKind::OutOfMemory => UFA_STATUS_OUT_OF_MEMORY,
        ErrorKind::Backend => UFA_STATUS_BACKEND_FAILURE,
        ErrorKind::Internal => UFA_STATUS_INTERNAL,
    }
}

/// A short, static description of `status` ("success", "invalid argument", ...); unknown codes
/// give "unknown status". Never NULL; the string must not be freed.
#[no_mangle]
pub extern "C" fn ufa_status_string(status: ufa_status) -> *const c_char {
    let s: &'static CStr = match status {
        UFA_STATUS_SUCCESS => c"success",
        UFA_STATUS_INVALID_ARGUMENT => c"invalid argument",
        UFA_STATUS_UNSUPPORTED => c"unsupported",
        UFA_STATUS_DEVICE_UNAVAILABLE => c"device unavailable",
        UFA_STATUS_OUT_OF_MEMORY => c"out of memory",
        UFA_STATUS_BACKEND_FAILURE => c"backend failure",
        UFA_STATUS_INTERNAL => c"internal error (a bug in ufa)",
        _ => c"unknown status",
    };
    s.as_ptr()
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    // Interior NULs cannot appear in a C string; they would only come from a caller's own
    // strings echoed back, so replacing them loses nothing.
    let c = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// The message of the last failed `ufa_*` or `mfa_*` call on this thread ("" if none failed
/// yet), e.g. "invalid argument: k.shape[2]=3 (heads_kv) does not divide q.shape[2]=8 (heads_q)".
/// Successful calls leave it unchanged. Never NULL. The text is owned by ufa and stays valid
/// until the next failing call on this thread; copy it to keep it.
#[no_mangle]
pub extern "C" fn ufa_last_error_message() -> *const c_char {
    // `with` panics on a thread whose thread-locals are already destroyed (a call from a TLS
    // destructor); such a caller gets "".
    query(c"".as_ptr(), || LAST_ERROR.with(|e| e.borrow().as_ptr()))
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(no message)".to_string())
}

/// Runs the body of an exported function: an error is recorded as the thread's last error and
/// turned into a code by `code_of`; a panic becomes `ErrorKind::Internal` the same way. No
/// unwind leaves this function.
pub(crate) fn boundary<C>(
    success: C,
    code_of: fn(ErrorKind) -> C,
    body: impl FnOnce() -> Result<(), Error>,
) -> C {
    let err = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => return success,
        Ok(Err(e)) => e,
        Err(payload) => Error::new(
            ErrorKind::Internal,
            format!("panic inside ufa: {}", panic_message(payload.as_ref())),
        ),
    };
    // Recording the message allocates and so could itself panic; swallow that too rather than
    // unwind into C.
    let _ = catch_unwind(|| set_last_error(&err.to_string()));
    code_of(err.kind())
}

/// [`boundary`] for `ufa_*` functions.
pub(crate) fn ufa_call(body: impl FnOnce() -> Result<(), Error>) -> ufa_status {
    boundary(UFA_STATUS_SUCCESS, status_of, body)
}

/// Runs an infallible query whose failure (a panic) can only be reported as `fallback`.
pub(crate) fn query<T>(fallback: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(fallback)
}

/// Returns early with an invalid-argument error naming a NULL pointer argument.
macro_rules! require {
    ($ptr:expr, $name:literal) => {
        if $ptr.is_null() {
            return Err(ufa::Error::invalid(concat!($name, " is NULL")));
        }
    };
}
pub(crate) use require;
