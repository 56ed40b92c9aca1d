//! The native endpoints, one module per resource, and what they share:
//! extractors whose rejections answer in the error shape, finding a
//! sandbox by id, running a blocking library call.

pub mod events;
pub mod exec;
pub mod files;
pub mod meta;
pub mod policy;
pub mod ports;
pub mod sandboxes;
pub mod snapshots;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use serde::de::DeserializeOwned;

use crate::error::{ApiError, ApiResult};
use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/openapi.json", get(meta::openapi_json))
        .route("/v1/health", get(meta::health))
        .route("/v1/version", get(meta::version))
        .route("/v1/sandboxes", post(sandboxes::create).get(sandboxes::list))
        .route("/v1/sandboxes/{id}", get(sandboxes::get_one).delete(sandboxes::delete))
        .route("/v1/sandboxes/{id}/exec", post(exec::exec).layer(DefaultBodyLimit::max(exec::MAX_BODY)))
        .route("/v1/sandboxes/{id}/exec/stream", post(exec::exec_stream).layer(DefaultBodyLimit::max(exec::MAX_BODY)))
        .route("/v1/sandboxes/{id}/files", get(files::download).put(files::upload))
        .route("/v1/sandboxes/{id}/events", get(events::events))
        .route("/v1/sandboxes/{id}/events/stream", get(events::events_stream))
        .route("/v1/sandboxes/{id}/ports", post(ports::create).get(ports::list))
        .route("/v1/sandboxes/{id}/snapshots", post(snapshots::create))
        .route("/v1/sandboxes/{id}/fork", post(sandboxes::fork))
        .route("/v1/snapshots", get(snapshots::list))
        .route("/v1/sandboxes/{id}/profile", get(policy::sandbox_profile))
        .route("/v1/policy/check", post(policy::check).layer(DefaultBodyLimit::max(policy::MAX_BODY)))
        .route("/v1/policy/explain", post(policy::explain).layer(DefaultBodyLimit::max(policy::MAX_BODY)))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint (GET /openapi.json lists them)")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "this endpoint does not take that method")
}

/// A JSON body; bad JSON is a 400 (415 without the content type) in our shape.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(JsonBody(v)),
            Err(e) => Err(json_rejection(&e)),
        }
    }
}

fn json_rejection(e: &JsonRejection) -> ApiError {
    let status = match e.status() {
        StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
        s => s,
    };
    ApiError::rejected(status, e.body_text())
}

/// Query parameters; bad ones are a 400 in our shape.
#[derive(Debug)]
pub struct QueryParams<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(QueryParams(v)),
            Err(e) => Err(query_rejection(&e)),
        }
    }
}

fn query_rejection(e: &QueryRejection) -> ApiError {
    ApiError::bad_request(e.body_text())
}

/// The `{id}` of a path, checked to be a sandbox id (else 400).
#[derive(Debug)]
pub struct SandboxId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for SandboxId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Path(id) = axum::extract::Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e: PathRejection| ApiError::bad_request(e.body_text()))?;
        if !sandbox::valid_id(&id) {
            return Err(ApiError::bad_request(format!("{id:?} is not a sandbox id (letters and digits, at most 64)")));
        }
        Ok(SandboxId(id))
    }
}

/// Run a blocking library call off the async threads.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> ApiResult<T> + Send + 'static) -> ApiResult<T> {
    tokio::task::spawn_blocking(f).await?
}

/// The sandbox `id` of the server's data directory, by its whole id (a
/// prefix, which the CLI accepts, is not found here).
pub fn find(state: &AppState, id: &str) -> ApiResult<sandbox::Sandbox> {
    let sandbox = sandbox::Sandbox::find_in(&state.config().data_dir, id)?;
    if sandbox.id() != id {
        return Err(sandbox::Error::NoSuchSandbox(id.to_string()).into());
    }
    Ok(sandbox)
}

/// A text a client sent that reaches the guest or a path: not empty, no NUL.
pub fn check_text(what: &str, value: &str, max: usize) -> ApiResult<()> {
    if value.is_empty() {
        return Err(ApiError::bad_request(format!("{what} is empty")));
    }
    if value.contains('\0') {
        return Err(ApiError::bad_request(format!("{what} holds a NUL byte")));
    }
    if value.len() > max {
        return Err(ApiError::bad_request(format!("{what} is longer than {max} bytes")));
    }
    Ok(())
}
