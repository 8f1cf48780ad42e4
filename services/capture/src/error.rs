//! Errors of the capture service.

/// What can go wrong while installing or draining.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("postgres pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    #[error("only {acked} of {wanted} redis replicas acknowledged the appends in time")]
    NotReplicated { acked: i64, wanted: u32 },
    #[error("schema: {0}")]
    Schema(String),
    #[error(transparent)]
    Core(#[from] herald_core::Error),
}

/// `Result` with capture's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
