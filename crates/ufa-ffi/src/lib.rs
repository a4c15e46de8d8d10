//! The C ABI of ufa.
//!
//! Two APIs over one core: the native one (`ufa_*`, declared in `include/ufa.h`, generated from
//! this crate by cbindgen) and the UMFA-compatible one (`mfa_*`, `include/mfa.h`), so code
//! written for Universal Metal Flash Attention builds unchanged against libufa.
//!
//! Every exported function runs inside [`boundary`]: errors become status codes plus a
//! thread-local message, and a panic becomes `UFA_STATUS_INTERNAL` instead of unwinding into C.
//! Validation of attention problems is the core's; this crate only turns C descriptions into
//! core tensor views.

// The exported names are C names.
#![allow(non_camel_case_types)]
// Every exported function is `unsafe`-by-contract for its pointer arguments; the contract is in
// each doc comment (and thus in the header), which is where C callers read it.
#![allow(clippy::missing_safety_doc)]

mod boundary;
#[cfg(feature = "test-hooks")]
mod hooks;
mod mfa;
mod native;
mod sequences;

pub use boundary::*;
#[cfg(feature = "test-hooks")]
pub use hooks::*;
pub use mfa::*;
pub use native::*;
pub use sequences::*;
