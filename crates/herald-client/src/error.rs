//! The error type of herald-client.

/// What a near-cache call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// cache-api answered with an error (or could not be reached).
    #[error("cache-api: {0}")]
    Status(#[from] tonic::Status),
    /// A resource's value is not the JSON the caller asked for.
    #[error("resource value does not decode: {0}")]
    Decode(#[from] serde_json::Error),
    /// The configuration cannot work (no endpoint, a bad URI or token).
    #[error("invalid near-cache configuration: {0}")]
    Config(String),
}

/// `Result` with herald-client's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
