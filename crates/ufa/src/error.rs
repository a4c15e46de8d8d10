//! The one error type of the library. Every binding maps [`ErrorKind`] to its own error model
//! (a C status code, a Python exception class, a Go `error`), so the kinds are few and stable.

use std::fmt;

/// What went wrong, coarsely: enough for a caller to decide what to do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// An argument is inconsistent or out of range; the message names it and its value.
    InvalidArgument,
    /// The problem is valid but this build or backend does not implement it.
    Unsupported,
    /// The device the tensors live on cannot be used (no driver, no such ordinal, ...).
    DeviceUnavailable,
    /// Memory for outputs or scratch space could not be allocated.
    OutOfMemory,
    /// A backend failed while running (a driver error, a kernel that failed to compile).
    Backend,
    /// A bug inside the library (a panic caught at a boundary).
    Internal,
}

impl ErrorKind {
    /// A short lowercase name, stable across versions.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::DeviceUnavailable => "device unavailable",
            ErrorKind::OutOfMemory => "out of memory",
            ErrorKind::Backend => "backend failure",
            ErrorKind::Internal => "internal error",
        }
    }
}

/// An error with its kind and a message meant for a person.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidArgument, message)
    }

    pub fn unsupported(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Unsupported, message)
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.as_str(), self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// Returns early with an [`ErrorKind::InvalidArgument`] error built like `format!`.
macro_rules! invalid {
    ($($arg:tt)*) => {
        return Err($crate::error::Error::invalid(format!($($arg)*)))
    };
}
pub(crate) use invalid;
