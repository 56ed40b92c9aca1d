//! envd's `filesystem.Filesystem` service (stat, list, make a directory,
//! move, remove; watching is not supported) and its file transfer
//! endpoints (`GET|POST /files`), served by the guest agent.

use axum::body::Bytes;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;

use super::connect::{self, Code, RpcError};
use super::{guest_path, request_user, EnvdSandbox};
use crate::routes::files::{file_response, spool};
use crate::routes::find;
use crate::AppState;

/// `GET /health`: envd answers 204 while it runs.
pub async fn health() -> StatusCode {
    StatusCode::NO_CONTENT
}

/// An entry as envd's `EntryInfo` (JSON).
fn entry_info(entry: &sandbox::Entry) -> serde_json::Value {
    let kind = match entry.kind {
        sandbox::EntryKind::File => "FILE_TYPE_FILE",
        sandbox::EntryKind::Directory => "FILE_TYPE_DIRECTORY",
        sandbox::EntryKind::Symlink => "FILE_TYPE_SYMLINK",
        sandbox::EntryKind::Other => "FILE_TYPE_UNSPECIFIED",
    };
    let modified = time::OffsetDateTime::from_unix_timestamp(entry.modified.0)
        .map(|t| t + time::Duration::nanoseconds(i64::from(entry.modified.1)))
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok());
    serde_json::json!({
        "name": entry.name,
        "type": kind,
        "path": entry.path,
        "size": entry.size,
        "mode": entry.mode & 0o7777,
        "permissions": permissions(entry.mode),
        "owner": entry.owner,
        "group": entry.group,
        "modifiedTime": modified,
        "symlinkTarget": entry.symlink_target,
        "isSymlink": entry.kind == sandbox::EntryKind::Symlink,
    })
}

/// `ls -l` style permissions: `drwxr-xr-x`.
fn permissions(mode: u32) -> String {
    let kind = match mode & 0o170_000 {
        0o040_000 => 'd',
        0o120_000 => 'l',
        0o100_000 => '-',
        0o020_000 => 'c',
        0o060_000 => 'b',
        0o010_000 => 'p',
        0o140_000 => 's',
        _ => '?',
    };
    let mut out = String::from(kind);
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 0o7;
        out.push(if bits & 4 != 0 { 'r' } else { '-' });
        out.push(if bits & 2 != 0 { 'w' } else { '-' });
        out.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    out
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PathRequest {
    path: String,
    depth: u32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct MoveRequest {
    source: String,
    destination: String,
}

/// `POST /filesystem.Filesystem/{method}`.
pub async fn call(
    State(state): State<AppState>,
    Extension(found): Extension<EnvdSandbox>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match fs_call(&state, &found, &method, &headers, &body).await {
        Ok(response) => response,
        Err(e) if method == "WatchDir" => connect::stream_error(&e),
        Err(e) => e.into_response(),
    }
}

async fn fs_call(
    state: &AppState,
    found: &EnvdSandbox,
    method: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, RpcError> {
    let user = request_user(headers);
    let (st, id) = (state.clone(), found.id.clone());
    let entry = |e: sandbox::Entry| serde_json::json!({ "entry": entry_info(&e) });
    let answer = match method {
        "Stat" => {
            let path = guest_path(&connect::unary_request::<PathRequest>(headers, body)?.path, user.as_deref())?;
            entry(super::run(move || Ok(find(&st, &id)?.stat(&path)?)).await?)
        }
        "ListDir" => {
            let request: PathRequest = connect::unary_request(headers, body)?;
            let path = guest_path(&request.path, user.as_deref())?;
            let depth = request.depth.max(1);
            let entries = super::run(move || Ok(find(&st, &id)?.list_dir(&path, depth)?)).await?;
            serde_json::json!({ "entries": entries.iter().map(entry_info).collect::<Vec<_>>() })
        }
        "MakeDir" => {
            let path = guest_path(&connect::unary_request::<PathRequest>(headers, body)?.path, user.as_deref())?;
            entry(super::run(move || Ok(find(&st, &id)?.make_dir(&path)?)).await?)
        }
        "Move" => {
            let request: MoveRequest = connect::unary_request(headers, body)?;
            let from = guest_path(&request.source, user.as_deref())?;
            let to = guest_path(&request.destination, user.as_deref())?;
            entry(super::run(move || Ok(find(&st, &id)?.rename(&from, &to)?)).await?)
        }
        "Remove" => {
            let path = guest_path(&connect::unary_request::<PathRequest>(headers, body)?.path, user.as_deref())?;
            super::run(move || Ok(find(&st, &id)?.remove_path(&path)?)).await?;
            serde_json::json!({})
        }
        "WatchDir" | "CreateWatcher" | "GetWatcherEvents" | "RemoveWatcher" => {
            return Err(RpcError::unimplemented("watching directories"))
        }
        other => return Err(RpcError::new(Code::NotFound, format!("no method filesystem.Filesystem/{other}"))),
    };
    Ok(connect::unary_response(&answer))
}

/// `?path=...&username=...`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct FileQuery {
    path: Option<String>,
    username: Option<String>,
}

impl FileQuery {
    fn user(&self, headers: &HeaderMap) -> Option<String> {
        self.username.clone().filter(|u| !u.is_empty() && u != "root").or_else(|| request_user(headers))
    }
}

/// An error of the file endpoints: `{"code": <status>, "message": ...}`.
fn file_error(e: RpcError) -> Response {
    let status = match e.code {
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::InvalidArgument | Code::FailedPrecondition | Code::AlreadyExists => StatusCode::BAD_REQUEST,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::ResourceExhausted => StatusCode::PAYLOAD_TOO_LARGE,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (status, Json(serde_json::json!({ "code": status.as_u16(), "message": e.message }))).into_response()
}

/// `GET /files?path=`: the file's bytes.
pub async fn read_file(
    State(state): State<AppState>,
    Extension(found): Extension<EnvdSandbox>,
    axum::extract::Query(query): axum::extract::Query<FileQuery>,
    headers: HeaderMap,
) -> Response {
    let result = async {
        let path = guest_path(query.path.as_deref().unwrap_or_default(), query.user(&headers).as_deref())?;
        let (st, id, p) = (state.clone(), found.id.clone(), path.clone());
        let entry = super::run(move || Ok(find(&st, &id)?.stat(&p)?)).await?;
        match entry.kind {
            sandbox::EntryKind::File | sandbox::EntryKind::Symlink => {}
            sandbox::EntryKind::Directory => return Err(RpcError::invalid(format!("{path} is a directory"))),
            sandbox::EntryKind::Other => {
                return Err(RpcError::invalid(format!("{path} is not a regular file (a device, socket or FIFO)")))
            }
        }
        Ok(file_response(state, found.id, path).await?)
    }
    .await;
    result.unwrap_or_else(file_error)
}

/// `POST /files?path=`: a body of `application/octet-stream`, or
/// `multipart/form-data` with one part per file (named by `path`, or by
/// each part's file name). Missing directories are made.
pub async fn write_file(
    State(state): State<AppState>,
    Extension(found): Extension<EnvdSandbox>,
    axum::extract::Query(query): axum::extract::Query<FileQuery>,
    headers: HeaderMap,
    request: Request,
) -> Response {
    let user = query.user(&headers);
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let result = async {
        let mut written = Vec::new();
        if content_type.starts_with("multipart/form-data") {
            let mut multipart = axum::extract::Multipart::from_request(request, &state)
                .await
                .map_err(|e| RpcError::invalid(format!("multipart body: {e}")))?;
            while let Some(field) =
                multipart.next_field().await.map_err(|e| RpcError::invalid(format!("multipart body: {e}")))?
            {
                let named = match (&query.path, field.file_name()) {
                    (Some(path), _) if written.is_empty() => path.clone(),
                    (_, Some(name)) => name.to_string(),
                    _ => return Err(RpcError::invalid("a part without a file name, and no path")),
                };
                let path = guest_path(&named, user.as_deref())?;
                let (tmp, _) = spool(&state, field).await?;
                written.push(put(&state, &found.id, tmp, path).await?);
            }
        } else {
            let path = guest_path(query.path.as_deref().unwrap_or_default(), user.as_deref())?;
            if headers.get(header::CONTENT_ENCODING).is_some_and(|e| e != "identity") {
                return Err(RpcError::invalid("compressed uploads are not supported"));
            }
            let (tmp, _) = spool(&state, request.into_body().into_data_stream()).await?;
            written.push(put(&state, &found.id, tmp, path).await?);
        }
        if written.is_empty() {
            return Err(RpcError::invalid("no file in the request"));
        }
        Ok(Json(written).into_response())
    }
    .await;
    result.unwrap_or_else(file_error)
}

/// Copy `tmp` to `path` in sandbox `id` (its directory made first); the
/// file's `WriteInfo`.
async fn put(
    state: &AppState,
    id: &str,
    tmp: tempfile::NamedTempFile,
    path: String,
) -> Result<serde_json::Value, RpcError> {
    let (st, id) = (state.clone(), id.to_string());
    super::run(move || {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))
            .map_err(|e| RpcError::new(Code::Internal, format!("temporary file: {e}")))?;
        let sandbox = find(&st, &id)?;
        if let Some(parent) = std::path::Path::new(&path).parent().and_then(|p| p.to_str()).filter(|p| *p != "/") {
            match sandbox.make_dir(parent) {
                Ok(_)
                | Err(sandbox::Error::Agent(sandbox::AgentError::Fs {
                    kind: sandbox::FsErrorKind::AlreadyExists,
                    ..
                })) => {}
                Err(e) => return Err(e.into()),
            }
        }
        sandbox.copy_in(tmp.path(), &path)?;
        let name = path.rsplit('/').next().unwrap_or_default().to_string();
        Ok(serde_json::json!({ "name": name, "type": "file", "path": path }))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_look_like_envd_entries() {
        assert_eq!(permissions(0o040_755), "drwxr-xr-x");
        assert_eq!(permissions(0o100_640), "-rw-r-----");
        let entry = sandbox::Entry {
            name: "a".into(),
            path: "/tmp/a".into(),
            kind: sandbox::EntryKind::File,
            size: 5,
            mode: 0o100_644,
            owner: "root".into(),
            group: "root".into(),
            modified: (1_700_000_000, 0),
            symlink_target: None,
        };
        let info = entry_info(&entry);
        assert_eq!(info["type"], "FILE_TYPE_FILE");
        assert_eq!(info["mode"], 0o644);
        assert_eq!(info["modifiedTime"], "2023-11-14T22:13:20Z");
    }
}
