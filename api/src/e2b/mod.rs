//! The E2B-compatible surface: what the official `e2b` SDK calls, so that a
//! platform written against E2B switches to this server by setting
//! `E2B_API_URL`, `E2B_SANDBOX_URL` (both this server's URL) and
//! `E2B_API_KEY`.
//!
//! - The control plane ([`control`]): create, list, get, connect, set the
//!   timeout of and kill sandboxes, with the API key (`X-API-Key`).
//! - envd, the in-sandbox services ([`process`], [`filesystem`]): the SDK
//!   sends them to the sandbox URL with the sandbox's id in
//!   `E2b-Sandbox-Id` and its envd access token in `X-Access-Token` (not
//!   the API key); each is served by the guest agent through the library.
//!
//! What E2B keeps per sandbox and the library does not (the envd access
//! token, metadata, environment, the deadline) is a record in
//! `<data dir>/e2b/<id>.json`, so a restarted server knows its sandboxes.
//! Deadlines are kept by this server: a sweeper stops and deletes a sandbox
//! whose deadline has passed.

pub mod connect;
pub mod control;
pub mod filesystem;
pub mod ports;
pub mod process;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ApiResult};
use crate::AppState;

/// The envd version this server answers as: the SDK enables what envd had
/// by then (a default user, stdin, closing stdin, octet-stream uploads).
pub const ENVD_VERSION: &str = "0.5.7";
/// The `clientID` every sandbox reports.
const CLIENT_ID: &str = "sandbox";
/// A sandbox's lifetime when the request names none (E2B's default).
pub const DEFAULT_TIMEOUT_SECS: u64 = 300;
/// The deadline of a sandbox the E2B surface adopted (started by the CLI
/// or `/v1`) until a client sets one: 9999-12-31T23:59:59Z, never.
pub const NO_DEADLINE: u64 = 253_402_300_799;
/// How often the sweeper looks for sandboxes past their deadline.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// What the E2B surface keeps about one sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// The envd access token: what `X-Access-Token` must be.
    pub token: String,
    /// The template it was created from, as named.
    pub template: String,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Environment variables for every command started through envd.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Seconds since the Unix epoch.
    pub started_at: u64,
    /// When the sandbox is stopped and deleted, in seconds since the Unix epoch.
    pub end_at: u64,
}

/// The E2B surface's state: the records, and the processes started
/// through envd (by sandbox, by guest pid).
#[derive(Debug)]
pub struct E2bState {
    dir: PathBuf,
    records: Mutex<HashMap<String, Record>>,
    processes: process::Table,
    /// Does the sandbox have `/bin/bash` (the SDK runs every command with it)?
    has_bash: Mutex<HashMap<String, bool>>,
}

impl E2bState {
    /// The state kept in `<data_dir>/e2b`, its records read.
    pub fn load(data_dir: &Path) -> E2bState {
        let dir = data_dir.join("e2b");
        let mut records = HashMap::new();
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                let Some(id) = path.file_stem().and_then(|s| s.to_str()).map(str::to_string) else { continue };
                if path.extension().is_none_or(|e| e != "json") || !sandbox::valid_id(&id) {
                    continue;
                }
                match std::fs::read(&path).map(|b| serde_json::from_slice::<Record>(&b)) {
                    Ok(Ok(record)) => {
                        records.insert(id, record);
                    }
                    Ok(Err(e)) => tracing::warn!("ignoring the damaged record {}: {e}", path.display()),
                    Err(e) => tracing::warn!("cannot read {}: {e}", path.display()),
                }
            }
        }
        E2bState {
            dir,
            records: Mutex::new(records),
            processes: process::Table::default(),
            has_bash: Mutex::new(HashMap::new()),
        }
    }

    /// The record of sandbox `id`.
    pub fn record(&self, id: &str) -> Option<Record> {
        self.records.lock().ok()?.get(id).cloned()
    }

    /// Keep `record` for `id`, on disk first.
    pub fn put(&self, id: &str, record: Record) -> ApiResult<()> {
        use std::io::Write as _;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let io =
            |e: std::io::Error| ApiError::internal(format!("record of sandbox {id} in {}: {e}", self.dir.display()));
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.dir).map_err(io)?;
        let bytes = serde_json::to_vec(&record).map_err(|e| ApiError::internal(e.to_string()))?;
        let tmp = self.dir.join(format!(".{id}.json.tmp"));
        let mut file =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io)?;
        file.write_all(&bytes).map_err(io)?;
        std::fs::rename(&tmp, self.dir.join(format!("{id}.json"))).map_err(io)?;
        if let Ok(mut records) = self.records.lock() {
            records.insert(id.to_string(), record);
        }
        Ok(())
    }

    /// Forget sandbox `id`.
    pub fn forget(&self, id: &str) {
        let _ = std::fs::remove_file(self.dir.join(format!("{id}.json")));
        if let Ok(mut records) = self.records.lock() {
            records.remove(id);
        }
        if let Ok(mut has_bash) = self.has_bash.lock() {
            has_bash.remove(id);
        }
        self.processes.forget_sandbox(id);
    }

    /// Does sandbox `id` have `/bin/bash`? (Asked of the guest once.)
    pub async fn has_bash(&self, state: &AppState, id: &str) -> bool {
        if let Some(known) = self.has_bash.lock().ok().and_then(|m| m.get(id).copied()) {
            return known;
        }
        let (st, owned) = (state.clone(), id.to_string());
        let found = crate::routes::blocking(move || Ok(crate::routes::find(&st, &owned)?.stat("/bin/bash").is_ok()))
            .await
            .unwrap_or(true);
        if let Ok(mut has_bash) = self.has_bash.lock() {
            has_bash.insert(id.to_string(), found);
        }
        found
    }

    /// The ids whose deadline is at or before `now`.
    fn expired(&self, now: u64) -> Vec<String> {
        let Ok(records) = self.records.lock() else { return Vec::new() };
        records.iter().filter(|(_, r)| r.end_at <= now).map(|(id, _)| id.clone()).collect()
    }
}

/// Run a blocking library call off the async threads.
pub async fn run<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, connect::RpcError> + Send + 'static,
) -> Result<T, connect::RpcError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| connect::RpcError::new(connect::Code::Internal, format!("the request's worker failed: {e}")))?
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Seconds since the Unix epoch as RFC 3339.
pub fn rfc3339(secs: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(0))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// A fresh random token (128 bits, hex).
pub fn token() -> ApiResult<String> {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new().fill(&mut bytes).map_err(|_| ApiError::internal("no randomness for a token"))?;
    Ok(hex::encode(bytes))
}

/// Stop and delete the sandboxes whose deadline has passed, every second,
/// for as long as the runtime runs.
pub fn spawn_sweeper(state: AppState) {
    if tokio::runtime::Handle::try_current().is_err() {
        return;
    }
    tokio::spawn(async move {
        let mut every = tokio::time::interval(SWEEP_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            for id in state.e2b().expired(now()) {
                tracing::info!(id, "the sandbox's timeout has passed; stopping it");
                if let Err(e) = control::kill_sandbox(&state, &id).await {
                    if e.status != axum::http::StatusCode::NOT_FOUND {
                        tracing::warn!(id, "stopping a sandbox past its timeout: {}", e.message);
                        continue;
                    }
                }
                state.e2b().forget(&id);
            }
        }
    });
}

/// The control plane's routes (behind the API key).
pub fn control_router() -> Router<AppState> {
    Router::new()
        .route("/sandboxes", post(control::create).get(control::list_sandboxes))
        .route("/v2/sandboxes", post(control::create).get(control::list_sandboxes))
        .route("/sandboxes/{id}", get(control::get_one).delete(control::kill))
        .route("/sandboxes/{id}/timeout", post(control::set_timeout))
        .route("/sandboxes/{id}/connect", post(control::connect))
        .route("/v2/sandboxes/{id}/connect", post(control::connect))
        .route("/sandboxes/{id}/refreshes", post(control::refresh))
        .route("/sandboxes/{id}/pause", post(control::not_supported))
        .route("/sandboxes/{id}/resume", post(control::not_supported))
        .route("/sandboxes/{id}/fork", post(control::fork))
        .route("/sandboxes/{id}/snapshots", post(control::not_supported))
        .route("/sandboxes/{id}/metrics", get(control::not_supported))
        .route("/sandboxes/{id}/logs", get(control::not_supported))
        .route("/v2/sandboxes/{id}/logs", get(control::not_supported))
        .route("/sandboxes/{id}/network", axum::routing::put(control::not_supported))
        .route("/sandboxes/metrics", get(control::not_supported))
        .route("/templates", get(control::not_supported).post(control::not_supported))
        .route("/templates/{*rest}", get(control::not_supported).post(control::not_supported))
        .route("/v2/templates", get(control::not_supported).post(control::not_supported))
        .route("/v3/templates", post(control::not_supported))
        .route("/snapshots", get(control::not_supported))
        .route("/volumes", get(control::not_supported).post(control::not_supported))
        .route("/volumes/{id}", get(control::not_supported).delete(control::not_supported))
}

/// envd's routes: each request names its sandbox and carries its token.
pub fn envd_router(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/health", get(filesystem::health))
        // The upload limit is enforced as the body is written out (`spool`).
        .route(
            "/files",
            get(filesystem::read_file).post(filesystem::write_file).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/process.Process/{method}", post(process::call))
        .route("/filesystem.Filesystem/{method}", post(filesystem::call))
        .route_layer(axum::middleware::from_fn_with_state(state, require_sandbox_token))
}

/// The sandbox an envd request is for (`E2b-Sandbox-Id`), checked against
/// its token (`X-Access-Token`, compared in constant time).
#[derive(Debug, Clone)]
pub struct EnvdSandbox {
    pub id: String,
    pub record: Record,
}

/// Middleware in front of envd's routes: the request must name a sandbox
/// this server knows and carry its token; the sandbox goes into the
/// request's extensions. A sandbox that is gone answers 502, as E2B's edge
/// does (the SDK's `is_running()` reads that as "not running").
pub async fn require_sandbox_token(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let found = match envd_sandbox(&state, request.headers()) {
        Ok(found) => found,
        Err(e) => return *e,
    };
    if request.uri().path() == "/health" {
        let (st, id) = (state.clone(), found.id.clone());
        let running = crate::routes::blocking(move || Ok(crate::routes::find(&st, &id)?.is_running())).await;
        if !running.unwrap_or(false) {
            return gone(&found.id);
        }
    }
    request.extensions_mut().insert(found);
    next.run(request).await
}

fn gone(id: &str) -> Response {
    let status = axum::http::StatusCode::BAD_GATEWAY;
    let body = serde_json::json!({ "code": status.as_u16(), "message": format!("sandbox {id} not found") });
    (status, axum::Json(body)).into_response()
}

fn envd_sandbox(state: &AppState, headers: &HeaderMap) -> Result<EnvdSandbox, Box<Response>> {
    use connect::{Code, RpcError};
    use subtle::ConstantTimeEq as _;
    let id = headers.get("e2b-sandbox-id").and_then(|v| v.to_str().ok()).ok_or_else(|| {
        Box::new(
            RpcError::invalid("the E2b-Sandbox-Id header is missing (set E2B_SANDBOX_URL to this server)")
                .into_response(),
        )
    })?;
    let record = state.e2b().record(id).filter(|_| sandbox::valid_id(id)).ok_or_else(|| Box::new(gone(id)))?;
    let presented = headers.get("x-access-token").map(|v| v.as_bytes()).unwrap_or_default();
    if !bool::from(presented.ct_eq(record.token.as_bytes())) {
        return Err(Box::new(
            RpcError::new(Code::Unauthenticated, "a valid X-Access-Token for this sandbox is required").into_response(),
        ));
    }
    Ok(EnvdSandbox { id: id.to_string(), record })
}

/// The user a request runs as (`Authorization: Basic base64("user:")`):
/// `None` for the default, root.
pub fn request_user(headers: &HeaderMap) -> Option<String> {
    use base64::Engine as _;
    let value = headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ").or_else(|| value.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let user = decoded.split(':').next().unwrap_or_default();
    (!user.is_empty() && user != "root").then(|| user.to_string())
}

/// A guest path as E2B names it: relative paths are under the user's home
/// (`/root` for root, `/home/<user>` otherwise).
pub fn guest_path(path: &str, user: Option<&str>) -> Result<String, connect::RpcError> {
    if path.is_empty() || path.contains('\0') || path.len() > 4096 {
        return Err(connect::RpcError::invalid(format!("{path:?} is not a usable path")));
    }
    if path.starts_with('/') {
        return Ok(path.to_string());
    }
    let home = match user {
        None => "/root".to_string(),
        Some(user) => format!("/home/{user}"),
    };
    let rest = path.strip_prefix("~/").unwrap_or(path);
    Ok(if rest == "~" { home } else { format!("{home}/{rest}") })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_paths() {
        use base64::Engine as _;
        let mut headers = HeaderMap::new();
        assert_eq!(request_user(&headers), None);
        let basic = |v: &str| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(v));
        headers.insert(axum::http::header::AUTHORIZATION, basic("user:").parse().unwrap());
        assert_eq!(request_user(&headers).as_deref(), Some("user"));
        headers.insert(axum::http::header::AUTHORIZATION, basic("root:").parse().unwrap());
        assert_eq!(request_user(&headers), None);
        assert_eq!(guest_path("a/b", None).unwrap(), "/root/a/b");
        assert_eq!(guest_path("~/x", Some("user")).unwrap(), "/home/user/x");
        assert_eq!(guest_path("/etc/hosts", Some("user")).unwrap(), "/etc/hosts");
        assert!(guest_path("", None).is_err() && guest_path("a\0b", None).is_err());
    }

    #[test]
    fn records_survive_a_restart_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let state = E2bState::load(dir.path());
        let record = Record {
            token: "t".into(),
            template: "base".into(),
            metadata: BTreeMap::from([("k".into(), "v".into())]),
            env: BTreeMap::new(),
            started_at: 10,
            end_at: 20,
        };
        state.put("abc123", record).unwrap();
        std::fs::write(dir.path().join("e2b/bad.json"), b"{").unwrap();
        let again = E2bState::load(dir.path());
        assert_eq!(again.record("abc123").unwrap().metadata["k"], "v");
        assert_eq!(again.expired(19), Vec::<String>::new());
        assert_eq!(again.expired(20), vec!["abc123".to_string()]);
        again.forget("abc123");
        assert!(E2bState::load(dir.path()).record("abc123").is_none());
    }
}
