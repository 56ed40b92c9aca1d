//! E2B's control plane: `POST /sandboxes` (and `/v2/sandboxes`), list,
//! get, connect, timeout, kill. Templates are our images: `base` (the
//! SDK's default) and `default` are the built-in image; anything else is an
//! OCI image reference.

use std::collections::BTreeMap;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::{now, rfc3339, token, Record, CLIENT_ID, DEFAULT_TIMEOUT_SECS, ENVD_VERSION};
use crate::error::{ApiError, ApiResult};
use crate::routes::sandboxes::{self, CreateSandbox, MAX_TIMEOUT_SECS};
use crate::routes::{blocking, find, JsonBody, SandboxId};
use crate::AppState;

/// The metadata key that picks the sandbox's built-in policy profile.
pub const PROFILE_METADATA: &str = "sandbox.dev/profile";

/// `NewSandbox`: the fields this server reads (others are accepted and ignored).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewSandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    pub timeout: Option<u64>,
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub env_vars: Option<BTreeMap<String, String>>,
}

/// `Sandbox`: what create and connect answer with.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Created {
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "clientID")]
    pub client_id: &'static str,
    pub envd_version: &'static str,
    pub envd_access_token: String,
    /// The domain `get_host(port)` builds host names in: `<port>-<id>.<domain>`.
    pub domain: Option<String>,
}

/// `SandboxDetail` / `ListedSandbox`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Detail {
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "clientID")]
    pub client_id: &'static str,
    pub started_at: String,
    pub end_at: String,
    pub cpu_count: u8,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u32,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u32,
    pub envd_version: &'static str,
    pub state: &'static str,
    pub metadata: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub envd_access_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

/// `{"timeout": seconds}`.
#[derive(Debug, Deserialize)]
pub struct Timeout {
    pub timeout: Option<u64>,
}

fn check_timeout(secs: u64) -> ApiResult<u64> {
    if secs == 0 || secs > MAX_TIMEOUT_SECS {
        return Err(ApiError::bad_request(format!("timeout must be within 1..={MAX_TIMEOUT_SECS} seconds")));
    }
    Ok(secs)
}

fn created(state: &AppState, id: &str, record: &Record) -> Created {
    Created {
        sandbox_id: id.to_string(),
        template_id: record.template.clone(),
        client_id: CLIENT_ID,
        envd_version: ENVD_VERSION,
        envd_access_token: record.token.clone(),
        domain: state.config().e2b_domain.clone(),
    }
}

/// Create a sandbox from a template, with a deadline.
pub async fn create(State(state): State<AppState>, JsonBody(request): JsonBody<NewSandbox>) -> ApiResult<Response> {
    let timeout = check_timeout(request.timeout.unwrap_or(DEFAULT_TIMEOUT_SECS))?;
    let metadata = request.metadata.unwrap_or_default();
    let image = match request.template_id.as_str() {
        "base" | "default" | "" => "default".to_string(),
        other => other.to_string(),
    };
    let native = CreateSandbox {
        image: Some(image),
        profiles: metadata.get(PROFILE_METADATA).map(|p| vec![p.clone()]),
        ..CreateSandbox::default()
    };
    let mut builder = sandboxes::builder(&state, &native).map_err(|e| {
        if e.status == StatusCode::BAD_REQUEST {
            ApiError::bad_request(format!("template {:?}: {}", request.template_id, e.message))
        } else {
            e
        }
    })?;
    if let Some((program, args)) = &state.config().holder {
        builder = builder.holder_program(program, args.iter().cloned());
    }
    let id = blocking(move || Ok(builder.spawn()?.id().to_string())).await?;
    let started_at = now();
    let record = Record {
        token: token()?,
        template: request.template_id,
        metadata,
        env: request.env_vars.unwrap_or_default(),
        started_at,
        end_at: started_at + timeout,
    };
    if let Err(e) = state.e2b().put(&id, record.clone()) {
        let _ = kill_sandbox(&state, &id).await;
        return Err(e);
    }
    tracing::info!(id, template = record.template, timeout, "sandbox created");
    Ok((StatusCode::CREATED, Json(created(&state, &id, &record))).into_response())
}

/// The record of a running sandbox this server knows; a sandbox started
/// otherwise (the CLI, the native API) gets one now.
async fn known(state: &AppState, id: &str) -> ApiResult<(sandbox::Sandbox, Record)> {
    let (st, owned) = (state.clone(), id.to_string());
    let sandbox = blocking(move || {
        let sandbox = find(&st, &owned)?;
        if !sandbox.is_running() {
            return Err(ApiError::not_found(format!("sandbox {owned} is not running")));
        }
        Ok(sandbox)
    })
    .await?;
    if let Some(record) = state.e2b().record(id) {
        return Ok((sandbox, record));
    }
    // Started otherwise: no deadline until a client sets one.
    let record = Record {
        token: token()?,
        template: sandbox.state().image.clone(),
        metadata: BTreeMap::new(),
        env: BTreeMap::new(),
        started_at: sandbox.state().created,
        end_at: super::NO_DEADLINE,
    };
    state.e2b().put(id, record.clone())?;
    Ok((sandbox, record))
}

fn detail(state: &AppState, sandbox: &sandbox::Sandbox, record: &Record, with_token: bool) -> Detail {
    let s = sandbox.state();
    Detail {
        sandbox_id: s.id.clone(),
        template_id: record.template.clone(),
        client_id: CLIENT_ID,
        started_at: rfc3339(record.started_at),
        end_at: rfc3339(record.end_at),
        cpu_count: s.vcpus,
        memory_mb: s.memory_mib,
        disk_size_mb: 0,
        envd_version: ENVD_VERSION,
        state: "running",
        metadata: record.metadata.clone(),
        envd_access_token: with_token.then(|| record.token.clone()),
        domain: with_token.then(|| state.config().e2b_domain.clone()).flatten(),
    }
}

/// `metadata=k%3Dv%26k2%3Dv2` (a query string of its own) and `state=running,paused`.
#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    pub metadata: Option<String>,
    pub state: Option<String>,
}

async fn list(state: AppState, query: ListQuery) -> ApiResult<Vec<Detail>> {
    let wanted: Vec<(String, String)> = match &query.metadata {
        Some(m) => serde_urlencoded_pairs(m),
        None => Vec::new(),
    };
    if query.state.as_deref().is_some_and(|s| !s.split(',').any(|s| s.trim() == "running")) {
        return Ok(Vec::new());
    }
    let st = state.clone();
    let running = blocking(move || {
        let all = sandbox::Sandbox::list_in(&st.config().data_dir)?;
        Ok(all.into_iter().filter(sandbox::Sandbox::is_running).collect::<Vec<_>>())
    })
    .await?;
    let mut out = Vec::new();
    for sandbox in running {
        let Some(record) = state.e2b().record(sandbox.id()) else { continue };
        if wanted.iter().all(|(k, v)| record.metadata.get(k) == Some(v)) {
            out.push(detail(&state, &sandbox, &record, false));
        }
    }
    Ok(out)
}

/// `k=v&k2=v2` (what is left of the `metadata` parameter once the query
/// is decoded), each key and value decoded again.
fn serde_urlencoded_pairs(query: &str) -> Vec<(String, String)> {
    serde_urlencoded::from_str(query).unwrap_or_default()
}

/// `GET /sandboxes` and `GET /v2/sandboxes` (in one page): the running
/// sandboxes this server created or was asked about.
pub async fn list_sandboxes(
    State(state): State<AppState>,
    Query(query): Query<ListQuery>,
) -> ApiResult<Json<Vec<Detail>>> {
    Ok(Json(list(state, query).await?))
}

/// `GET /sandboxes/{id}`.
pub async fn get_one(State(state): State<AppState>, SandboxId(id): SandboxId) -> ApiResult<Json<Detail>> {
    let (sandbox, record) = known(&state, &id).await?;
    Ok(Json(detail(&state, &sandbox, &record, true)))
}

/// `POST /v2/sandboxes/{id}/connect`: the sandbox's connection details;
/// its deadline moves to `timeout` seconds from now if that is later (a
/// sandbox without one keeps none).
pub async fn connect(
    State(state): State<AppState>,
    SandboxId(id): SandboxId,
    JsonBody(request): JsonBody<Timeout>,
) -> ApiResult<Json<Created>> {
    let (_, mut record) = known(&state, &id).await?;
    if let Some(secs) = request.timeout {
        record.end_at = record.end_at.max(now() + check_timeout(secs)?);
        state.e2b().put(&id, record.clone())?;
    }
    Ok(Json(created(&state, &id, &record)))
}

/// `POST /sandboxes/{id}/timeout`: the deadline is `timeout` seconds from now.
pub async fn set_timeout(
    State(state): State<AppState>,
    SandboxId(id): SandboxId,
    JsonBody(request): JsonBody<Timeout>,
) -> ApiResult<StatusCode> {
    let secs = check_timeout(request.timeout.ok_or_else(|| ApiError::bad_request("timeout is required"))?)?;
    let (_, mut record) = known(&state, &id).await?;
    record.end_at = now() + secs;
    state.e2b().put(&id, record)?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /sandboxes/{id}/refreshes`: `{"duration": seconds}` more from now.
pub async fn refresh(
    State(state): State<AppState>,
    SandboxId(id): SandboxId,
    body: axum::body::Bytes,
) -> ApiResult<StatusCode> {
    #[derive(Deserialize)]
    struct Refresh {
        duration: Option<u64>,
    }
    let secs = match serde_json::from_slice::<Refresh>(&body) {
        Ok(Refresh { duration: Some(secs) }) => check_timeout(secs)?,
        _ => DEFAULT_TIMEOUT_SECS,
    };
    let (_, mut record) = known(&state, &id).await?;
    record.end_at = record.end_at.max(now() + secs);
    state.e2b().put(&id, record)?;
    Ok(StatusCode::NO_CONTENT)
}

/// `{"count": n, "timeout": seconds}`.
#[derive(Debug, Default, Deserialize)]
pub struct Fork {
    pub count: Option<u16>,
    pub timeout: Option<u64>,
}

/// `POST /sandboxes/{id}/fork`: `count` copies (default 1) from one
/// snapshot of the sandbox, which runs on; each a `{"sandbox": ...}` or an
/// `{"error": ...}`.
pub async fn fork(
    State(state): State<AppState>,
    SandboxId(id): SandboxId,
    JsonBody(request): JsonBody<Fork>,
) -> ApiResult<(StatusCode, Json<Vec<serde_json::Value>>)> {
    let timeout = check_timeout(request.timeout.unwrap_or(DEFAULT_TIMEOUT_SECS))?;
    let (_, source) = known(&state, &id).await?;
    let count = request.count.unwrap_or(1);
    let st = state.clone();
    let copies = blocking(move || sandboxes::fork_copies(&st, &id, count)).await?;
    let mut results = Vec::new();
    for copy in copies {
        let result = match copy {
            Ok(copy) => {
                let started_at = now();
                let record = Record {
                    token: token()?,
                    template: source.template.clone(),
                    metadata: source.metadata.clone(),
                    env: source.env.clone(),
                    started_at,
                    end_at: started_at + timeout,
                };
                state.e2b().put(copy.id(), record.clone())?;
                serde_json::json!({ "sandbox": created(&state, copy.id(), &record) })
            }
            Err(e) => serde_json::json!({ "error": { "code": e.status.as_u16(), "message": e.message } }),
        };
        results.push(result);
    }
    Ok((StatusCode::CREATED, Json(results)))
}

/// Stop sandbox `id` and delete it with its logs.
pub async fn kill_sandbox(state: &AppState, id: &str) -> ApiResult<()> {
    let (st, owned) = (state.clone(), id.to_string());
    blocking(move || sandboxes::stop_and_remove(&st, &owned)).await
}

/// `DELETE /sandboxes/{id}`.
pub async fn kill(State(state): State<AppState>, SandboxId(id): SandboxId) -> ApiResult<StatusCode> {
    kill_sandbox(&state, &id).await?;
    state.e2b().forget(&id);
    Ok(StatusCode::NO_CONTENT)
}

/// E2B calls this server does not serve: 501 in the error shape.
pub async fn not_supported(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        format!("{} is not supported by this server (see docs/api.md for the E2B calls it serves)", uri.path()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_filters_are_decoded() {
        assert_eq!(
            serde_urlencoded_pairs("us%3Der=me&a=b%20c&k=v+w&bad=%zz%é"),
            vec![
                ("us=er".to_string(), "me".to_string()),
                ("a".into(), "b c".into()),
                ("k".into(), "v w".into()),
                ("bad".into(), "%zz%é".into())
            ]
        );
    }
}
