//! `PUT|GET /v1/sandboxes/{id}/files?path=...`: a file into or out of the
//! guest (`Sandbox::copy_in` / `copy_out`, through a temporary file in the
//! data directory's `tmp/`).

use std::path::PathBuf;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use utoipa::{IntoParams, ToSchema};

use super::{blocking, check_text, find, QueryParams, SandboxId};
use crate::error::{ApiError, ApiResult};
use crate::AppState;

/// Which guest file.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FileQuery {
    /// The file's path in the guest.
    #[param(example = "/tmp/data.bin")]
    pub path: String,
    /// Its mode, in octal (upload only; default 644).
    #[param(example = "755")]
    pub mode: Option<String>,
}

/// A file written.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FileWritten {
    pub path: String,
    /// Its size in bytes.
    pub bytes: u64,
}

/// A file's bytes, as they are (not JSON).
#[derive(Debug, ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code, reason = "only its schema is used")]
pub struct FileBytes(Vec<u8>);

/// The guest path a request names: not empty, no NUL, at most 4096 bytes
/// (what it points at is the guest agent's business).
pub fn check_path(path: &str) -> ApiResult<()> {
    check_text("path", path, 4096)
}

/// The mode a request names: octal, at most 7777.
pub fn parse_mode(mode: Option<&str>) -> ApiResult<u32> {
    let Some(mode) = mode else { return Ok(0o644) };
    match u32::from_str_radix(mode, 8) {
        Ok(m) if m <= 0o7777 => Ok(m),
        _ => Err(ApiError::bad_request(format!("mode {mode:?} is not an octal file mode"))),
    }
}

/// The directory temporary files go to (created, mode 0700).
fn tmp_dir(state: &AppState) -> ApiResult<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = state.config().data_dir.join("tmp");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| ApiError::internal(format!("create {}: {e}", dir.display())))?;
    Ok(dir)
}

/// Write a request body (or a part of one) to a temporary file in the data
/// directory, refusing it once it is over the upload limit; the file and
/// how many bytes it holds.
pub async fn spool<E: std::fmt::Display>(
    state: &AppState,
    mut stream: impl futures_util::Stream<Item = Result<axum::body::Bytes, E>> + Unpin,
) -> ApiResult<(tempfile::NamedTempFile, u64)> {
    let limit = state.config().upload_limit;
    let dir = tmp_dir(state)?;
    let tmp = tempfile::NamedTempFile::new_in(&dir).map_err(|e| ApiError::internal(format!("temporary file: {e}")))?;
    let std_file = tmp.reopen().map_err(|e| ApiError::internal(format!("temporary file: {e}")))?;
    let mut file = tokio::fs::File::from_std(std_file);
    let mut written: u64 = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))?;
        written = written.saturating_add(chunk.len() as u64);
        if written > limit {
            return Err(too_large(limit));
        }
        file.write_all(&chunk).await.map_err(|e| ApiError::internal(format!("temporary file: {e}")))?;
    }
    file.flush().await.map_err(|e| ApiError::internal(format!("temporary file: {e}")))?;
    Ok((tmp, written))
}

/// A guest file's bytes as a streamed response body (through a temporary
/// file that is gone by the time the body is sent), at most the transfer
/// limit (the upload limit, 100 MiB by default): past it, a 413.
pub async fn file_response(state: AppState, id: String, path: String) -> ApiResult<Response> {
    let (file, len) = blocking(move || {
        let dir = tmp_dir(&state)?;
        let private = tempfile::Builder::new()
            .prefix("download-")
            .tempdir_in(&dir)
            .map_err(|e| ApiError::internal(format!("temporary directory: {e}")))?;
        let local = private.path().join("file");
        // The guest decides how many bytes it sends: no more than the
        // transfer limit land on this host's disk.
        let len = find(&state, &id)?.copy_out_at_most(&path, &local, state.config().upload_limit)?;
        // Open, then let the directory go: the open file outlives its name.
        let file = std::fs::File::open(&local).map_err(|e| ApiError::internal(format!("temporary file: {e}")))?;
        Ok((file, len))
    })
    .await?;
    let file = tokio::fs::File::from_std(file);
    let stream = futures_util::stream::unfold(file, |mut file| async move {
        let mut buf = vec![0u8; 64 * 1024];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(buf), file))
            }
            Err(e) => Some((Err(e), file)),
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream".to_string()), (header::CONTENT_LENGTH, len.to_string())],
        Body::from_stream(stream),
    )
        .into_response())
}

fn too_large(limit: u64) -> ApiError {
    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("the file is larger than the limit of {limit} bytes"))
}

/// Write the request's body to a file in the guest (created or replaced).
#[utoipa::path(put, path = "/v1/sandboxes/{id}/files", tag = "files",
    params(("id" = String, Path, description = "The sandbox's id"), FileQuery),
    request_body(content = inline(FileBytes), content_type = "application/octet-stream", description = "The file's bytes"),
    responses((status = 200, description = "Written", body = FileWritten),
              (status = 400, description = "A bad path or mode, or the guest refused", body = crate::ErrorBody),
              (status = 404, description = "No such sandbox", body = crate::ErrorBody),
              (status = 409, description = "The sandbox is not running", body = crate::ErrorBody),
              (status = 413, description = "Over the upload limit (100 MiB by default)", body = crate::ErrorBody)))]
pub async fn upload(
    State(state): State<AppState>,
    SandboxId(id): SandboxId,
    QueryParams(query): QueryParams<FileQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<FileWritten>> {
    check_path(&query.path)?;
    let mode = parse_mode(query.mode.as_deref())?;
    let limit = state.config().upload_limit;
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large(limit));
    }
    let (tmp, written) = spool(&state, body.into_data_stream()).await?;
    let path = query.path.clone();
    let bytes = blocking(move || {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(mode))
            .map_err(|e| ApiError::internal(format!("temporary file: {e}")))?;
        Ok(find(&state, &id)?.copy_in(tmp.path(), &path)?)
    })
    .await?;
    tracing::debug!(written, bytes, "file uploaded");
    Ok(Json(FileWritten { path: query.path, bytes }))
}

/// Read a file from the guest.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files", tag = "files",
    params(("id" = String, Path, description = "The sandbox's id"), FileQuery),
    responses((status = 200, description = "The file's bytes", content_type = "application/octet-stream", body = inline(FileBytes)),
              (status = 400, description = "A bad path, or the guest refused (no such file)", body = crate::ErrorBody),
              (status = 404, description = "No such sandbox", body = crate::ErrorBody),
              (status = 409, description = "The sandbox is not running", body = crate::ErrorBody)))]
pub async fn download(
    State(state): State<AppState>,
    SandboxId(id): SandboxId,
    QueryParams(query): QueryParams<FileQuery>,
) -> ApiResult<Response> {
    check_path(&query.path)?;
    file_response(state, id, query.path).await
}
