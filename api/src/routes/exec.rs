//! `POST /v1/sandboxes/{id}/exec`: run a command to its end, and `POST
//! /v1/sandboxes/{id}/exec/stream`: the same, its output streamed as it
//! comes (newline-delimited JSON).
//!
//! Both start the command with `Sandbox::spawn` and hold a [`KillOnDrop`]
//! while it runs: when the client goes away before the command ends, hyper
//! drops the request's future (or the streamed body), the guard drops with
//! it and kills the command in the guest.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{check_text, find, JsonBody, SandboxId};
use crate::error::{ApiError, ApiResult};
use crate::AppState;

/// The longest `timeout_secs` a command may be given: 24 hours.
pub const MAX_TIMEOUT_SECS: u64 = 24 * 3600;
/// The largest standard input a request may carry: 16 MiB.
pub const MAX_STDIN: usize = 16 * 1024 * 1024;
/// The largest request body: room for `MAX_STDIN` in base64, and the rest.
pub const MAX_BODY: usize = 24 * 1024 * 1024;

/// How bytes travel in JSON.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// UTF-8 text; invalid sequences in output become U+FFFD (lossy).
    #[default]
    Text,
    /// Standard base64, for exact bytes.
    Base64,
}

/// A command to run.
#[derive(Debug, Default, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// The program and its arguments (the program is looked up on the guest's PATH).
    #[schema(example = json!(["sh", "-c", "echo hi; exit 3"]))]
    pub argv: Vec<String>,
    /// Environment variables set for the command.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory in the guest (default: the image's, else /).
    pub cwd: Option<String>,
    /// Guest user name or uid to run as.
    pub user: Option<String>,
    /// Standard input, in `stdin_encoding` (default: none, the command reads end of file).
    pub stdin: Option<String>,
    /// How `stdin` is encoded.
    #[serde(default)]
    pub stdin_encoding: Encoding,
    /// Kill the command after this many seconds (status `timed_out`; at most 86400).
    pub timeout_secs: Option<u64>,
    /// How `stdout` and `stderr` are returned.
    #[serde(default)]
    pub output_encoding: Encoding,
}

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExecStatus {
    Exited,
    TimedOut,
}

/// What the command did.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExecResponse {
    pub status: ExecStatus,
    /// The exit status (0..=255; 128+N when killed by signal N; 127: not
    /// found), when it exited.
    #[schema(example = 3)]
    pub exit_code: Option<i32>,
    /// Standard output (its first 16 MiB), in `encoding`.
    #[schema(example = "hi\n")]
    pub stdout: String,
    /// Standard error (its first 16 MiB), in `encoding`.
    pub stderr: String,
    pub encoding: Encoding,
    /// The command wrote more to standard output than was kept.
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
}

fn encode(bytes: &[u8], encoding: Encoding) -> String {
    match encoding {
        Encoding::Text => String::from_utf8_lossy(bytes).into_owned(),
        Encoding::Base64 => base64::engine::general_purpose::STANDARD.encode(bytes),
    }
}

/// The library command `request` describes, checked.
pub fn command(request: &ExecRequest) -> ApiResult<sandbox::Command> {
    if request.argv.is_empty() {
        return Err(ApiError::bad_request("argv is empty"));
    }
    check_text("argv[0]", &request.argv[0], 4096)?;
    if request.argv.iter().any(|a| a.contains('\0')) {
        return Err(ApiError::bad_request("an argument holds a NUL byte"));
    }
    let mut command = sandbox::Command::from_argv(request.argv.clone());
    for (key, value) in &request.env {
        check_text("an environment variable's name", key, 4096)?;
        if key.contains('=') {
            return Err(ApiError::bad_request(format!("environment variable name {key:?} holds '='")));
        }
        if value.contains('\0') {
            return Err(ApiError::bad_request(format!("environment variable {key} holds a NUL byte")));
        }
        command = command.env(key, value);
    }
    if let Some(cwd) = &request.cwd {
        check_text("cwd", cwd, 4096)?;
        command = command.cwd(cwd);
    }
    if let Some(user) = &request.user {
        check_text("user", user, 256)?;
        command = command.user(user);
    }
    if let Some(stdin) = &request.stdin {
        let bytes = match request.stdin_encoding {
            Encoding::Text => stdin.clone().into_bytes(),
            Encoding::Base64 => base64::engine::general_purpose::STANDARD
                .decode(stdin)
                .map_err(|e| ApiError::bad_request(format!("stdin is not base64: {e}")))?,
        };
        if bytes.len() > MAX_STDIN {
            return Err(ApiError::bad_request(format!("stdin is larger than {MAX_STDIN} bytes")));
        }
        command = command.stdin_from(std::io::Cursor::new(bytes));
    }
    if let Some(secs) = request.timeout_secs {
        if secs == 0 || secs > MAX_TIMEOUT_SECS {
            return Err(ApiError::bad_request(format!("timeout_secs must be within 1..={MAX_TIMEOUT_SECS}")));
        }
        command = command.timeout(Duration::from_secs(secs));
    }
    Ok(command)
}

/// How a running command is killed (a [`sandbox::ProcessControl`]; a fake in tests).
pub trait Kill: Send + 'static {
    fn kill(&self);
}

impl Kill for sandbox::ProcessControl {
    fn kill(&self) {
        if let Err(e) = sandbox::ProcessControl::kill(self) {
            tracing::debug!("kill a command whose client went away: {e}");
        }
    }
}

/// Where a command stands, shared by the request (the guard) and the
/// blocking thread that runs it.
enum Stage<K> {
    /// Not started yet.
    Starting,
    Running(K),
    /// The command ended by itself.
    Ended,
    /// The client went away.
    Cancelled,
}

/// Kills the command when dropped before it ended: held by the request's
/// future (or its streamed body), which hyper drops when the client
/// disconnects. Race-free: a command that starts after the guard dropped
/// is killed by the thread that started it ([`Started::running`] says so).
pub struct KillOnDrop<K: Kill>(Arc<Mutex<Stage<K>>>);

/// The blocking thread's half of a [`KillOnDrop`].
pub struct Started<K: Kill>(Arc<Mutex<Stage<K>>>);

/// A guard and its other half.
pub fn kill_on_drop<K: Kill>() -> (KillOnDrop<K>, Started<K>) {
    let stage = Arc::new(Mutex::new(Stage::Starting));
    (KillOnDrop(Arc::clone(&stage)), Started(stage))
}

impl<K: Kill> Started<K> {
    /// The command runs and `control` kills it. False when the client is
    /// already gone: the caller kills it.
    pub fn running(&self, control: K) -> bool {
        let Ok(mut stage) = self.0.lock() else { return false };
        if matches!(*stage, Stage::Cancelled) {
            return false;
        }
        *stage = Stage::Running(control);
        true
    }

    /// The command ended: nothing to kill any more.
    pub fn ended(&self) {
        if let Ok(mut stage) = self.0.lock() {
            if !matches!(*stage, Stage::Cancelled) {
                *stage = Stage::Ended;
            }
        }
    }
}

impl<K: Kill> Drop for KillOnDrop<K> {
    fn drop(&mut self) {
        let previous = match self.0.lock() {
            Ok(mut stage) => std::mem::replace(&mut *stage, Stage::Cancelled),
            Err(_) => return,
        };
        if let Stage::Running(control) = previous {
            tracing::info!("the client went away before its command ended; killing the command");
            // Sending the signal writes to the agent connection: not on an async worker.
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn_blocking(move || control.kill())),
                Err(_) => control.kill(),
            }
        }
    }
}

/// Run `command` (with its timeout) in sandbox `id` to its end, telling
/// `started` (which kills it at once if the client is gone).
fn run(
    state: &AppState,
    id: &str,
    command: sandbox::Command,
    started: &Started<sandbox::ProcessControl>,
) -> ApiResult<sandbox::Output> {
    let sandbox = find(state, id)?;
    let output = sandbox.output_with(command, |control| {
        if !started.running(control.clone()) {
            tracing::info!(id, "the client went away before its command started; killing the command");
            Kill::kill(&control);
        }
    });
    started.ended();
    Ok(output?)
}

/// How a command ended, for a response.
fn ended(status: sandbox::Status) -> (ExecStatus, Option<i32>) {
    match status {
        sandbox::Status::Exited(code) => (ExecStatus::Exited, Some(code)),
        sandbox::Status::TimedOut => (ExecStatus::TimedOut, None),
    }
}

/// Run a command in a running sandbox to its end and return its status and
/// output. If the client disconnects first, the command is killed.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/exec", tag = "sandboxes", request_body = ExecRequest,
    params(("id" = String, Path, description = "The sandbox's id")),
    responses((status = 200, description = "The command ended (whatever its status)", body = ExecResponse),
              (status = 400, description = "A bad request", body = crate::ErrorBody),
              (status = 404, description = "No such sandbox", body = crate::ErrorBody),
              (status = 409, description = "The sandbox is not running", body = crate::ErrorBody)))]
pub async fn exec(
    State(state): State<AppState>,
    SandboxId(id): SandboxId,
    JsonBody(request): JsonBody<ExecRequest>,
) -> ApiResult<Json<ExecResponse>> {
    let command = command(&request)?;
    let encoding = request.output_encoding;
    let (guard, started) = kill_on_drop();
    let out = tokio::task::spawn_blocking(move || run(&state, &id, command, &started)).await??;
    drop(guard);
    let (status, exit_code) = ended(out.status);
    Ok(Json(ExecResponse {
        status,
        exit_code,
        stdout: encode(&out.stdout, encoding),
        stderr: encode(&out.stderr, encoding),
        encoding,
        stdout_truncated: out.stdout_truncated,
        stderr_truncated: out.stderr_truncated,
    }))
}

/// One line of `POST /v1/sandboxes/{id}/exec/stream`: output as it comes,
/// then how the command ended (or why it could not run).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecEvent {
    /// A chunk of standard output (base64).
    Stdout { data: String },
    /// A chunk of standard error (base64).
    Stderr { data: String },
    /// The command ended; the last line.
    Exit { status: ExecStatus, exit_code: Option<i32> },
    /// The command could not be started or waited for; the last line.
    Error { code: u16, message: String },
}

impl ExecEvent {
    fn line(&self) -> Bytes {
        let mut line = serde_json::to_vec(self)
            .unwrap_or_else(|_| b"{\"type\":\"error\",\"code\":500,\"message\":\"encode\"}".to_vec());
        line.push(b'\n');
        Bytes::from(line)
    }
}

/// Chunks of one stream, sent to the response as they come (waiting, and
/// so holding the guest command, while the client is slow).
struct Chunks {
    lines: tokio::sync::mpsc::Sender<Bytes>,
    stderr: bool,
}

impl Write for Chunks {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let data = base64::engine::general_purpose::STANDARD.encode(buf);
        let event = if self.stderr { ExecEvent::Stderr { data } } else { ExecEvent::Stdout { data } };
        self.lines.blocking_send(event.line()).map_err(|_| std::io::Error::other("the client went away"))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Run a command and stream its output as newline-delimited JSON
/// ([`ExecEvent`]s): `stdout`/`stderr` chunks (base64) as they come, then
/// one `exit` (or `error`) line. If the client disconnects first, the
/// command is killed. `output_encoding` is ignored (chunks are base64).
#[utoipa::path(post, path = "/v1/sandboxes/{id}/exec/stream", tag = "sandboxes", request_body = ExecRequest,
    params(("id" = String, Path, description = "The sandbox's id")),
    responses((status = 200, description = "Newline-delimited JSON, one ExecEvent a line; the last is `exit` or `error`",
                content_type = "application/x-ndjson", body = ExecEvent),
              (status = 400, description = "A bad request", body = crate::ErrorBody),
              (status = 404, description = "No such sandbox", body = crate::ErrorBody)))]
pub async fn exec_stream(
    State(state): State<AppState>,
    SandboxId(id): SandboxId,
    JsonBody(request): JsonBody<ExecRequest>,
) -> ApiResult<Response> {
    let command = command(&request)?;
    // Fail before the 200 when there is no such sandbox.
    let sandbox_state = state.clone();
    let sandbox_id = id.clone();
    super::blocking(move || find(&sandbox_state, &sandbox_id).map(drop)).await?;
    let (lines, receiver) = tokio::sync::mpsc::channel::<Bytes>(16);
    let command = command
        .stdout_to(Chunks { lines: lines.clone(), stderr: false })
        .stderr_to(Chunks { lines: lines.clone(), stderr: true });
    let (guard, started) = kill_on_drop();
    tokio::task::spawn_blocking(move || {
        let last = match run(&state, &id, command, &started) {
            Ok(out) => {
                let (status, exit_code) = ended(out.status);
                ExecEvent::Exit { status, exit_code }
            }
            Err(e) => ExecEvent::Error { code: e.status.as_u16(), message: e.message },
        };
        let _ = lines.blocking_send(last.line());
    });
    let body = futures_util::stream::unfold((receiver, guard), |(mut receiver, guard)| async move {
        let line = receiver.recv().await?;
        Some((Ok::<_, Infallible>(line), (receiver, guard)))
    });
    Ok(([(CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(body)).into_response())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    struct Fake(Arc<AtomicUsize>);

    impl Kill for Fake {
        fn kill(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_command_is_killed_when_its_client_goes_away_and_only_then() {
        let kills = Arc::new(AtomicUsize::new(0));
        // The client goes away while the command runs.
        let (guard, started) = kill_on_drop();
        assert!(started.running(Fake(Arc::clone(&kills))));
        drop(guard);
        assert_eq!(kills.load(Ordering::SeqCst), 1);
        // ... before it started: the starter is told to kill it.
        let (guard, started) = kill_on_drop();
        drop(guard);
        assert!(!started.running(Fake(Arc::clone(&kills))));
        // The command ended first: nothing is killed.
        let (guard, started) = kill_on_drop();
        assert!(started.running(Fake(Arc::clone(&kills))));
        started.ended();
        drop(guard);
        assert_eq!(kills.load(Ordering::SeqCst), 1);
    }
}
