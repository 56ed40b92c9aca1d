//! `POST /v1/sandboxes/{id}/snapshots`, `GET /v1/snapshots`: named
//! snapshots in the data directory's `snapshots/`, which `POST
//! /v1/sandboxes` restores with `snapshot`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{blocking, find, JsonBody, SandboxId};
use crate::error::{ApiError, ApiResult};
use crate::AppState;

/// A snapshot to take.
#[derive(Debug, Default, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    /// Its name (letters, digits, '.', '_', '-'; at most 64; default: the
    /// sandbox's id and the time).
    #[schema(example = "base")]
    pub name: Option<String>,
    /// Stop the sandbox once the snapshot is written (default: it runs on).
    #[serde(default)]
    pub stop: bool,
}

/// A named snapshot.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SnapshotInfo {
    pub name: String,
    /// The sandbox it was taken from.
    pub source: String,
    pub image: String,
    pub memory_mib: u32,
    pub vcpus: u8,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// Bytes it takes on disk.
    pub disk_usage: u64,
}

impl SnapshotInfo {
    fn of(s: &sandbox::Snapshot) -> SnapshotInfo {
        SnapshotInfo {
            name: s.name(),
            source: s.source.clone(),
            image: s.image.clone(),
            memory_mib: s.memory_mib,
            vcpus: s.vcpus,
            created: s.created,
            disk_usage: s.disk_usage(),
        }
    }
}

/// The named snapshots.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SnapshotList {
    /// Newest first.
    pub snapshots: Vec<SnapshotInfo>,
}

/// Save a running sandbox to a named snapshot.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/snapshots", tag = "snapshots", request_body = CreateSnapshot,
    params(("id" = String, Path, description = "The sandbox's id")),
    responses((status = 201, description = "Written", body = SnapshotInfo),
              (status = 400, description = "A bad name", body = crate::ErrorBody),
              (status = 404, description = "No such sandbox", body = crate::ErrorBody),
              (status = 409, description = "The sandbox is not running, or the name is taken", body = crate::ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    SandboxId(id): SandboxId,
    JsonBody(request): JsonBody<CreateSnapshot>,
) -> ApiResult<(StatusCode, Json<SnapshotInfo>)> {
    let name = match request.name {
        Some(name) => name,
        None => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            format!("{id}-{}", now.as_millis())
        }
    };
    if !sandbox::snapshot::valid_name(&name) {
        return Err(ApiError::bad_request(format!(
            "{name:?} is not a snapshot name (letters, digits, '.', '_', '-'; at most 64)"
        )));
    }
    let then = if request.stop { sandbox::AfterSnapshot::Stop } else { sandbox::AfterSnapshot::Resume };
    let info = blocking(move || {
        let sandbox = find(&state, &id)?;
        let store = sandbox::paths::snapshots_in(&state.config().data_dir);
        sandbox::snapshot::create_store(&store)?;
        let dir = store.join(&name);
        if dir.exists() {
            return Err(ApiError::conflict(format!("a snapshot named {name} exists")));
        }
        if !sandbox.is_running() {
            return Err(sandbox::Error::NotRunning(id).into());
        }
        let snapshot = sandbox.snapshot(dir, then)?;
        tracing::info!(id = sandbox.id(), name, "snapshot taken");
        Ok(SnapshotInfo::of(&snapshot))
    })
    .await?;
    Ok((StatusCode::CREATED, Json(info)))
}

/// The named snapshots, newest first.
#[utoipa::path(get, path = "/v1/snapshots", tag = "snapshots",
    responses((status = 200, description = "Every readable snapshot", body = SnapshotList)))]
pub async fn list(State(state): State<AppState>) -> ApiResult<Json<SnapshotList>> {
    let snapshots = blocking(move || {
        let (snapshots, unreadable) = sandbox::Snapshot::list_in(&state.config().data_dir)?;
        for (dir, e) in unreadable {
            tracing::warn!("{} is not a usable snapshot: {e}", dir.display());
        }
        Ok(snapshots.iter().map(SnapshotInfo::of).collect())
    })
    .await?;
    Ok(Json(SnapshotList { snapshots }))
}
