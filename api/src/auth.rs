//! The API key: read from a file, compared in constant time, required on
//! every request when the server has one.

use std::path::Path;

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::{ApiError, Error};
use crate::AppState;

/// The key clients must present. Kept as its SHA-256 digest, so that a
/// comparison takes the same time whatever the presented key's length.
#[derive(Clone)]
pub struct ApiKey {
    digest: [u8; 32],
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(..)")
    }
}

impl ApiKey {
    pub fn new(key: &[u8]) -> ApiKey {
        ApiKey { digest: Sha256::digest(key).into() }
    }

    /// The key in `path`: its content without surrounding whitespace (a
    /// trailing newline is not part of the key). Empty is refused.
    pub fn read(path: &Path) -> Result<ApiKey, Error> {
        use std::os::unix::fs::PermissionsExt;
        let bytes =
            std::fs::read(path).map_err(|e| Error::Io(format!("read the API key file {}", path.display()), e))?;
        let key = bytes.trim_ascii();
        if key.is_empty() {
            return Err(Error::EmptyKey(path.display().to_string()));
        }
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!("the API key file {} is readable by other users", path.display());
            }
        }
        Ok(ApiKey::new(key))
    }

    /// Is `presented` the key? Constant time in the key and in `presented`.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        self.digest.ct_eq(&digest).into()
    }
}

/// The key a request presents: `Authorization: Bearer <key>` or `X-API-Key: <key>`.
pub fn presented(headers: &HeaderMap) -> Option<&[u8]> {
    if let Some(value) = headers.get(axum::http::header::AUTHORIZATION) {
        let value = value.as_bytes();
        let scheme = b"bearer ";
        if value.len() > scheme.len() && value[..scheme.len()].eq_ignore_ascii_case(scheme) {
            return Some(value[scheme.len()..].trim_ascii());
        }
    }
    headers.get("x-api-key").map(|v| v.as_bytes().trim_ascii())
}

/// Middleware: with a key configured, a request without it gets 401.
pub async fn require_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.config().api_key {
        if !presented(request.headers()).is_some_and(|p| key.matches(p)) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(request).await
}
