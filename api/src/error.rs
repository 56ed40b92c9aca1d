//! The one error shape every endpoint answers with, `{"code": <HTTP
//! status>, "message": "..."}`, and how the library's errors map to it.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error("the API key file {0} is empty")]
    EmptyKey(String),
    #[error("listening on {0} needs an API key (--api-key-file)")]
    KeyRequired(String),
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// The HTTP status, repeated.
    #[schema(example = 404)]
    pub code: u16,
    /// What went wrong, for a person.
    #[schema(example = "no sandbox 0123abcd (sandbox ps -a lists them)")]
    pub message: String,
}

/// An error answered to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into() }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }

    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    pub fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "a valid API key is required (Authorization: Bearer <key>, or X-API-Key: <key>)",
        )
    }

    /// A rejection of one of axum's extractors (bad JSON, a bad query, a
    /// body over the limit), in our shape with its own status.
    pub fn rejected(status: StatusCode, text: String) -> ApiError {
        ApiError::new(status, text)
    }
}

impl From<sandbox::Error> for ApiError {
    fn from(e: sandbox::Error) -> ApiError {
        use sandbox::Error as E;
        let status = match &e {
            E::NoSuchSandbox(_) => StatusCode::NOT_FOUND,
            E::NotRunning(_) => StatusCode::CONFLICT,
            E::Config(_) | E::Launch(_) | E::Profile(_) | E::BadImage { .. } | E::Image(_) => StatusCode::BAD_REQUEST,
            E::Agent(sandbox::AgentError::Remote(_)) => StatusCode::BAD_REQUEST,
            E::Agent(sandbox::AgentError::TooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
            E::Agent(sandbox::AgentError::Fs { kind, .. }) => match kind {
                sandbox::FsErrorKind::NotFound => StatusCode::NOT_FOUND,
                sandbox::FsErrorKind::AlreadyExists => StatusCode::CONFLICT,
                sandbox::FsErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
                sandbox::FsErrorKind::Other => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::BAD_REQUEST,
            },
            // The guest is too busy to take another command now.
            E::Agent(sandbox::AgentError::Timeout(_)) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::warn!("request failed: {e}");
        }
        ApiError::new(status, e.to_string())
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> ApiError {
        ApiError::internal(format!("the request's worker failed: {e}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { code: self.status.as_u16(), message: self.message };
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(axum::http::header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// What a handler returns.
pub type ApiResult<T> = Result<T, ApiError>;
