//! The error type of herald-l1.

/// A value that is not a valid tenant id, tag or identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("invalid {what}: {reason}")]
    InvalidArgument { what: &'static str, reason: String },
}

/// `Result` with herald-l1's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument { what, reason: reason.into() }
    }
}
