//! `POST /v1/sandboxes`, `GET /v1/sandboxes`, `GET|DELETE /v1/sandboxes/{id}`.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{blocking, check_text, find, JsonBody, SandboxId};
use crate::error::{ApiError, ApiResult};
use crate::AppState;

/// The longest `timeout_secs` a sandbox may be given: 24 hours.
pub const MAX_TIMEOUT_SECS: u64 = 24 * 3600;
/// How long `DELETE` waits for a sandbox to stop before its holder is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// A sandbox to start: booted from an image, or restored from a snapshot.
#[derive(Debug, Default, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    /// `default` (the built-in image) or an OCI image reference from a
    /// registry (`python:3.12-slim`); host files and directories are not
    /// accepted. Ignored with `snapshot`; default `default`.
    #[schema(example = "default")]
    pub image: Option<String>,
    /// Guest RAM in MiB (default 256).
    #[schema(example = 256)]
    pub memory_mib: Option<u32>,
    /// Number of vCPUs (default 1).
    #[schema(example = 1)]
    pub vcpus: Option<u8>,
    /// Built-in policy profiles, in order (default `deny-all`). Profile
    /// files on the host cannot be named through the API.
    #[schema(example = json!(["deny-all"]))]
    pub profiles: Option<Vec<String>>,
    /// Stop the sandbox after this many seconds (at most 86400; default: never).
    pub timeout_secs: Option<u64>,
    /// Restore this named snapshot (`GET /v1/snapshots`) instead of booting;
    /// the memory, vCPUs and image are the snapshot's.
    pub snapshot: Option<String>,
    /// Boot the kernel instead of restoring the cached snapshot of an idle
    /// sandbox of the same kind (a warm start, the default).
    #[serde(default)]
    pub cold: bool,
}

/// A sandbox, running or not.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxInfo {
    #[schema(example = "3f2a9c0d1e4b5a6c")]
    pub id: String,
    /// The image as it was named.
    pub image: String,
    /// Seconds since the Unix epoch.
    pub created: u64,
    pub memory_mib: u32,
    pub vcpus: u8,
    pub running: bool,
}

impl SandboxInfo {
    fn of(sandbox: &sandbox::Sandbox) -> SandboxInfo {
        let state = sandbox.state();
        SandboxInfo {
            id: state.id.clone(),
            image: state.image.clone(),
            created: state.created,
            memory_mib: state.memory_mib,
            vcpus: state.vcpus,
            running: sandbox.is_running(),
        }
    }
}

/// The sandboxes of the server's data directory.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxList {
    /// Newest first.
    pub sandboxes: Vec<SandboxInfo>,
}

/// The image a request names: `default` or an OCI registry reference.
pub fn parse_image(name: &str) -> ApiResult<sandbox::Image> {
    check_text("image", name, 512)?;
    let local = name.starts_with('/')
        || name.starts_with('.')
        || name.starts_with("oci:")
        || name.starts_with("docker-archive:");
    match sandbox::Image::parse(name) {
        sandbox::Image::Default => Ok(sandbox::Image::Default),
        sandbox::Image::Oci(reference) if !local => Ok(sandbox::Image::Oci(reference)),
        _ => Err(ApiError::bad_request(format!(
            "image {name:?}: only `default` and OCI registry references can be named through the API"
        ))),
    }
}

/// A built-in profile's name (files on the host cannot be named).
pub fn parse_profile(name: &str) -> ApiResult<sandbox::policy::ProfileSource> {
    check_text("profile", name, 128)?;
    match sandbox::policy::ProfileSource::from_arg(name) {
        source @ sandbox::policy::ProfileSource::Builtin(_) => Ok(source),
        _ => Err(ApiError::bad_request(format!("{name:?} is not a built-in profile"))),
    }
}

/// The builder `request` describes (checked), confined, before its holder is set.
pub fn builder(state: &AppState, request: &CreateSandbox) -> ApiResult<sandbox::SandboxBuilder> {
    let data_dir = &state.config().data_dir;
    let vcpus;
    let mut builder = match &request.snapshot {
        Some(name) => {
            if request.memory_mib.is_some() || request.vcpus.is_some() {
                return Err(ApiError::bad_request("memory_mib and vcpus are the snapshot's; leave them out"));
            }
            if !sandbox::snapshot::valid_name(name) {
                return Err(ApiError::bad_request(format!("{name:?} is not a snapshot name")));
            }
            let snapshot = sandbox::Snapshot::find_in(data_dir, name)
                .map_err(|e| ApiError::not_found(format!("snapshot {name}: {e}")))?;
            vcpus = snapshot.vcpus;
            sandbox::Sandbox::from_snapshot(snapshot)
        }
        None => {
            let image = parse_image(request.image.as_deref().unwrap_or("default"))?;
            let memory = request.memory_mib.unwrap_or(256);
            if !sandbox::MEMORY_MIB_RANGE.contains(&memory) {
                return Err(ApiError::bad_request(format!(
                    "memory_mib must be within {}..={}",
                    sandbox::MEMORY_MIB_RANGE.start(),
                    sandbox::MEMORY_MIB_RANGE.end()
                )));
            }
            vcpus = request.vcpus.unwrap_or(1);
            if !sandbox::VCPUS_RANGE.contains(&vcpus) {
                return Err(ApiError::bad_request(format!(
                    "vcpus must be within {}..={}",
                    sandbox::VCPUS_RANGE.start(),
                    sandbox::VCPUS_RANGE.end()
                )));
            }
            let builder = sandbox::Sandbox::builder(image).memory_mib(memory).vcpus(vcpus);
            if request.cold {
                builder
            } else {
                builder.warm()
            }
        }
    };
    for profile in request.profiles.iter().flatten() {
        builder = builder.profile_at(sandbox::policy::Layer::User, parse_profile(profile)?);
    }
    if let Some(secs) = request.timeout_secs {
        if secs == 0 || secs > MAX_TIMEOUT_SECS {
            return Err(ApiError::bad_request(format!("timeout_secs must be within 1..={MAX_TIMEOUT_SECS}")));
        }
        builder = builder.timeout(Duration::from_secs(secs));
    }
    // The holder's CPU quota: its vCPUs, and half a CPU for its handlers.
    let mut jail = sandbox::Jail::default();
    jail.cpus = Some(f64::from(vcpus) + 0.5);
    Ok(builder.data_dir(data_dir).jail(jail))
}

/// Start a sandbox in a confined holder process of its own; answers once its agent does.
#[utoipa::path(post, path = "/v1/sandboxes", tag = "sandboxes", request_body = CreateSandbox,
    responses((status = 201, description = "The sandbox runs", body = SandboxInfo),
              (status = 400, description = "A bad request", body = crate::ErrorBody),
              (status = 404, description = "No such snapshot", body = crate::ErrorBody),
              (status = 500, description = "The sandbox could not start", body = crate::ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<CreateSandbox>,
) -> ApiResult<(StatusCode, Json<SandboxInfo>)> {
    let mut builder = builder(&state, &request)?;
    if let Some((program, args)) = &state.config().holder {
        builder = builder.holder_program(program, args.iter().cloned());
    }
    let info = blocking(move || {
        let sandbox = builder.spawn()?;
        tracing::info!(id = sandbox.id(), "sandbox started");
        Ok(SandboxInfo::of(&sandbox))
    })
    .await?;
    Ok((StatusCode::CREATED, Json(info)))
}

/// The sandboxes of this server's data directory, running or not, newest first.
#[utoipa::path(get, path = "/v1/sandboxes", tag = "sandboxes",
    responses((status = 200, description = "Every sandbox", body = SandboxList)))]
pub async fn list(State(state): State<AppState>) -> ApiResult<Json<SandboxList>> {
    let sandboxes = blocking(move || {
        let all = sandbox::Sandbox::list_in(&state.config().data_dir)?;
        Ok(all.iter().map(SandboxInfo::of).collect())
    })
    .await?;
    Ok(Json(SandboxList { sandboxes }))
}

/// One sandbox.
#[utoipa::path(get, path = "/v1/sandboxes/{id}", tag = "sandboxes",
    params(("id" = String, Path, description = "The sandbox's id")),
    responses((status = 200, description = "The sandbox", body = SandboxInfo),
              (status = 404, description = "No such sandbox", body = crate::ErrorBody)))]
pub async fn get_one(State(state): State<AppState>, SandboxId(id): SandboxId) -> ApiResult<Json<SandboxInfo>> {
    Ok(Json(blocking(move || Ok(SandboxInfo::of(&find(&state, &id)?))).await?))
}

/// Stop a sandbox and delete it with its logs.
#[utoipa::path(delete, path = "/v1/sandboxes/{id}", tag = "sandboxes",
    params(("id" = String, Path, description = "The sandbox's id")),
    responses((status = 204, description = "Stopped and deleted"),
              (status = 404, description = "No such sandbox", body = crate::ErrorBody)))]
pub async fn delete(State(state): State<AppState>, SandboxId(id): SandboxId) -> ApiResult<StatusCode> {
    let st = state.clone();
    let owned = id.clone();
    blocking(move || stop_and_remove(&st, &owned)).await?;
    state.e2b().forget(&id);
    Ok(StatusCode::NO_CONTENT)
}

/// Stop sandbox `id` and delete it with its logs (blocking).
pub fn stop_and_remove(state: &AppState, id: &str) -> ApiResult<()> {
    let sandbox = find(state, id)?;
    sandbox.stop(STOP_TIMEOUT)?;
    sandbox.remove(true)?;
    tracing::info!(id, "sandbox deleted");
    Ok(())
}

/// How many copies to fork.
#[derive(Debug, Default, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkSandbox {
    /// How many copies (1..=16, default 1).
    #[schema(example = 2)]
    pub count: Option<u16>,
}

/// The copies a fork started, and why any others did not start.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ForkResult {
    pub sandboxes: Vec<SandboxInfo>,
    pub errors: Vec<crate::ErrorBody>,
}

/// The most copies one fork request starts.
pub const MAX_FORK: u16 = 16;

/// Start copies of a running sandbox (blocking): its snapshot is taken
/// once (it runs on), each copy restored from it with the source's
/// profiles, and the snapshot deleted.
pub fn fork_copies(state: &AppState, id: &str, count: u16) -> ApiResult<Vec<Result<sandbox::Sandbox, ApiError>>> {
    if !(1..=MAX_FORK).contains(&count) {
        return Err(ApiError::bad_request(format!("count must be within 1..={MAX_FORK}")));
    }
    let source = find(state, id)?;
    let mut jail = sandbox::Jail::default();
    jail.cpus = Some(f64::from(source.state().vcpus) + 0.5);
    let holder = state.config().holder.clone();
    let copies = source.fork(usize::from(count), |builder| {
        let builder = builder.jail(jail.clone());
        match &holder {
            Some((program, args)) => builder.holder_program(program, args.iter().cloned()),
            None => builder,
        }
    })?;
    Ok(copies.into_iter().map(|c| c.map_err(ApiError::from)).collect())
}

/// Start copies of a running sandbox from one snapshot of it (it runs on).
#[utoipa::path(post, path = "/v1/sandboxes/{id}/fork", tag = "sandboxes", request_body = ForkSandbox,
    params(("id" = String, Path, description = "The sandbox's id")),
    responses((status = 201, description = "The copies that started (and errors of any that did not)", body = ForkResult),
              (status = 400, description = "A bad count", body = crate::ErrorBody),
              (status = 404, description = "No such sandbox", body = crate::ErrorBody),
              (status = 409, description = "The sandbox is not running", body = crate::ErrorBody)))]
pub async fn fork(
    State(state): State<AppState>,
    SandboxId(id): SandboxId,
    JsonBody(request): JsonBody<ForkSandbox>,
) -> ApiResult<(StatusCode, Json<ForkResult>)> {
    let count = request.count.unwrap_or(1);
    let copies = blocking(move || fork_copies(&state, &id, count)).await?;
    let mut result = ForkResult { sandboxes: Vec::new(), errors: Vec::new() };
    for copy in copies {
        match copy {
            Ok(copy) => result.sandboxes.push(SandboxInfo::of(&copy)),
            Err(e) => result.errors.push(crate::ErrorBody { code: e.status.as_u16(), message: e.message }),
        }
    }
    if result.sandboxes.is_empty() {
        let first = result.errors.first().map_or_else(|| "no copy started".to_string(), |e| e.message.clone());
        return Err(ApiError::internal(format!("no copy started: {first}")));
    }
    Ok((StatusCode::CREATED, Json(result)))
}
