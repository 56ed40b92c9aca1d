//! `POST /v1/sandboxes/{id}/exec`: run a command to its end (`Sandbox::output`).

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::State;
use axum::Json;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{blocking, check_text, find, JsonBody, SandboxId};
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

/// Run a command in a running sandbox to its end and return its status and output.
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
    let output = blocking(move || Ok(find(&state, &id)?.output(command)?)).await?;
    let (status, exit_code) = match output.status {
        sandbox::Status::Exited(code) => (ExecStatus::Exited, Some(code)),
        sandbox::Status::TimedOut => (ExecStatus::TimedOut, None),
    };
    Ok(Json(ExecResponse {
        status,
        exit_code,
        stdout: encode(&output.stdout, encoding),
        stderr: encode(&output.stderr, encoding),
        encoding,
        stdout_truncated: output.stdout_truncated,
        stderr_truncated: output.stderr_truncated,
    }))
}
