//! The cache API's errors, and their one mapping to gRPC and HTTP statuses.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// Bad input: tenant id, key, parameters, sizes. The message says which.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("unknown resource {0:?}")]
    UnknownResource(String),
    #[error("missing or unknown API token")]
    Unauthenticated,
    #[error("token {token:?} may not access tenant {tenant:?}")]
    PermissionDenied { token: String, tenant: String },
    /// A limit of the node or the tenant was reached. The message names it.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A dependency is down and the answer cannot be served without it.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<herald_core::Error> for Error {
    fn from(e: herald_core::Error) -> Self {
        match e {
            herald_core::Error::InvalidArgument { .. } => Error::InvalidArgument(e.to_string()),
            herald_core::Error::Redis(e) => Error::Unavailable(format!("redis: {e}")),
            herald_core::Error::Postgres(e) => Error::Unavailable(format!("postgres: {e}")),
            herald_core::Error::Config(e) => Error::Internal(e),
        }
    }
}

impl Error {
    /// Short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::InvalidArgument(_) => "invalid_argument",
            Error::UnknownResource(_) => "unknown_resource",
            Error::Unauthenticated => "unauthenticated",
            Error::PermissionDenied { .. } => "permission_denied",
            Error::ResourceExhausted(_) => "resource_exhausted",
            Error::Unavailable(_) => "unavailable",
            Error::Internal(_) => "internal",
        }
    }

    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            Error::InvalidArgument(_) => tonic::Code::InvalidArgument,
            Error::UnknownResource(_) => tonic::Code::NotFound,
            Error::Unauthenticated => tonic::Code::Unauthenticated,
            Error::PermissionDenied { .. } => tonic::Code::PermissionDenied,
            Error::ResourceExhausted(_) => tonic::Code::ResourceExhausted,
            Error::Unavailable(_) => tonic::Code::Unavailable,
            Error::Internal(_) => tonic::Code::Internal,
        }
    }

    pub fn http_status(&self) -> StatusCode {
        match self {
            Error::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            Error::UnknownResource(_) => StatusCode::NOT_FOUND,
            Error::Unauthenticated => StatusCode::UNAUTHORIZED,
            Error::PermissionDenied { .. } => StatusCode::FORBIDDEN,
            Error::ResourceExhausted(_) => StatusCode::TOO_MANY_REQUESTS,
            Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        tonic::Status::new(e.grpc_code(), e.to_string())
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": { "code": self.kind(), "message": self.to_string() } });
        (self.http_status(), axum::Json(body)).into_response()
    }
}
