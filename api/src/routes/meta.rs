//! `GET /v1/health`, `GET /v1/version`, `GET /openapi.json`.

use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The server answers.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    #[schema(example = "ok")]
    pub status: String,
}

/// What this server is.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Version {
    /// The runtime's version.
    #[schema(example = "0.1.0")]
    pub version: String,
    /// The native API's version (the path prefix).
    #[schema(example = "v1")]
    pub api: String,
}

/// Is the server up.
#[utoipa::path(get, path = "/v1/health", tag = "meta",
    responses((status = 200, description = "The server answers", body = Health),
              (status = 401, description = "No valid API key", body = crate::ErrorBody)))]
pub async fn health() -> Json<Health> {
    Json(Health { status: "ok".into() })
}

/// The runtime's version.
#[utoipa::path(get, path = "/v1/version", tag = "meta",
    responses((status = 200, description = "Versions", body = Version),
              (status = 401, description = "No valid API key", body = crate::ErrorBody)))]
pub async fn version() -> Json<Version> {
    Json(Version { version: env!("CARGO_PKG_VERSION").into(), api: "v1".into() })
}

/// This API's OpenAPI 3.1 document.
pub async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(crate::openapi())
}
