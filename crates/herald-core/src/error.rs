//! The error type of herald-core.

/// Errors of the shared crate. Services wrap them with context.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("invalid {what}: {reason}")]
    InvalidArgument { what: &'static str, reason: String },
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
}

/// `Result` with herald-core's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<herald_l1::Error> for Error {
    fn from(e: herald_l1::Error) -> Self {
        match e {
            herald_l1::Error::InvalidArgument { what, reason } => Error::InvalidArgument { what, reason },
        }
    }
}

impl Error {
    pub(crate) fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument { what, reason: reason.into() }
    }
}
