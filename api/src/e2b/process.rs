//! envd's `process.Process` service: start a command and stream its output
//! and exit (`Start`), re-attach to it (`Connect`), list, send input,
//! close input, signal, resize its terminal (`Update`).
//!
//! A command started here belongs to the server, not to the request: a
//! client that stops reading its stream leaves it running (as envd does),
//! and `Connect` picks up its output from then on. Its id is its guest pid.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize};
use tokio::sync::mpsc;

use super::connect::{self, Code, RpcError};
use super::EnvdSandbox;
use crate::routes::find;
use crate::AppState;

/// How many output messages wait for a slow reader before the command's
/// output blocks (as a full pipe would block it).
const QUEUE: usize = 64;
/// How long a command may take to report its pid.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// The keepalive interval when the client asks for none.
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(50);

/// `ProcessConfig`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ProcessConfig {
    pub cmd: String,
    pub args: Vec<String>,
    pub envs: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(default)]
struct PtySize {
    cols: u32,
    rows: u32,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(default)]
struct Pty {
    size: Option<PtySize>,
}

impl Pty {
    fn win_size(self) -> sandbox::WinSize {
        let size = self.size.unwrap_or(PtySize { cols: 80, rows: 24 });
        let clamp = |v: u32, default: u16| u16::try_from(v).ok().filter(|v| *v > 0).unwrap_or(default);
        sandbox::WinSize { cols: clamp(size.cols, 80), rows: clamp(size.rows, 24) }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct StartRequest {
    process: Option<ProcessConfig>,
    pty: Option<Pty>,
    tag: Option<String>,
    stdin: Option<bool>,
}

/// `ProcessSelector`: a pid or a tag.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Selector {
    pid: Option<u32>,
    tag: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Selected {
    process: Option<Selector>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ProcessInput {
    stdin: Option<String>,
    pty: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct SendInputRequest {
    process: Option<Selector>,
    input: Option<ProcessInput>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct SendSignalRequest {
    process: Option<Selector>,
    #[serde(deserialize_with = "signal")]
    signal: i32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct UpdateRequest {
    process: Option<Selector>,
    pty: Option<Pty>,
}

/// A `process.Signal`: its name or its number.
fn signal<'de, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Value {
        Name(String),
        Number(i32),
    }
    Ok(match Value::deserialize(d)? {
        Value::Number(n) => n,
        Value::Name(name) => match name.as_str() {
            "SIGNAL_SIGKILL" => libc_signal::KILL,
            "SIGNAL_SIGTERM" => libc_signal::TERM,
            _ => 0,
        },
    })
}

mod libc_signal {
    pub const KILL: i32 = 9;
    pub const TERM: i32 = 15;
}

/// A command started through envd.
struct Running {
    pid: u32,
    tag: Option<String>,
    config: ProcessConfig,
    control: sandbox::ProcessControl,
    stdin: Mutex<Option<sandbox::ProcessStdin>>,
    readers: Arc<Readers>,
}

/// The streams reading a command's events.
#[derive(Default)]
struct Readers(Mutex<Vec<mpsc::Sender<Bytes>>>);

impl Readers {
    fn add(&self) -> mpsc::Receiver<Bytes> {
        let (tx, rx) = mpsc::channel(QUEUE);
        if let Ok(mut readers) = self.0.lock() {
            readers.push(tx);
        }
        rx
    }

    /// Hand `message` to every reader, waiting for room (called from the
    /// library's output threads, never from the async runtime).
    fn publish(&self, message: &Bytes) {
        let readers = self.0.lock().map(|r| r.clone()).unwrap_or_default();
        let mut gone = false;
        for reader in readers {
            gone |= reader.blocking_send(message.clone()).is_err();
        }
        if gone {
            if let Ok(mut readers) = self.0.lock() {
                readers.retain(|r| !r.is_closed());
            }
        }
    }

    /// No more events: every stream ends.
    fn close(&self) {
        if let Ok(mut readers) = self.0.lock() {
            readers.clear();
        }
    }
}

/// Output as `DataEvent`s to the readers.
struct EventSink {
    readers: Arc<Readers>,
    field: &'static str,
}

impl Write for EventSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let data = base64::engine::general_purpose::STANDARD.encode(buf);
        let event = serde_json::json!({ "event": { "data": { (self.field): data } } });
        self.readers.publish(&connect::stream_message(&event));
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn start_event(pid: u32) -> Bytes {
    connect::stream_message(&serde_json::json!({ "event": { "start": { "pid": pid } } }))
}

fn end_event(status: Result<i32, String>) -> Bytes {
    let end = match status {
        Ok(code) => serde_json::json!({ "exitCode": code, "exited": true, "status": format!("exit status {code}") }),
        Err(error) => serde_json::json!({ "exitCode": -1, "exited": false, "status": "error", "error": error }),
    };
    connect::stream_message(&serde_json::json!({ "event": { "end": end } }))
}

/// The commands started through envd, by sandbox and pid.
#[derive(Default)]
pub struct Table(Mutex<HashMap<String, HashMap<u32, Arc<Running>>>>);

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("process::Table")
    }
}

impl Table {
    fn insert(&self, sandbox: &str, running: Arc<Running>) {
        if let Ok(mut all) = self.0.lock() {
            all.entry(sandbox.to_string()).or_default().insert(running.pid, running);
        }
    }

    fn remove(&self, sandbox: &str, pid: u32) {
        if let Ok(mut all) = self.0.lock() {
            if let Some(table) = all.get_mut(sandbox) {
                table.remove(&pid);
            }
        }
    }

    fn list(&self, sandbox: &str) -> Vec<Arc<Running>> {
        let Ok(all) = self.0.lock() else { return Vec::new() };
        let mut list: Vec<_> = all.get(sandbox).map(|t| t.values().cloned().collect()).unwrap_or_default();
        list.sort_by_key(|r| r.pid);
        list
    }

    fn find(&self, sandbox: &str, selector: Option<&Selector>) -> Result<Arc<Running>, RpcError> {
        let selector = selector.ok_or_else(|| RpcError::invalid("no process selected (pid or tag)"))?;
        let found = self.list(sandbox).into_iter().find(|r| match (selector.pid, &selector.tag) {
            (Some(pid), _) => r.pid == pid,
            (None, Some(tag)) => r.tag.as_ref() == Some(tag),
            (None, None) => false,
        });
        found.ok_or_else(|| RpcError::new(Code::NotFound, "no such process (it may have ended)"))
    }

    /// Drop what is kept about a deleted sandbox's commands.
    pub fn forget_sandbox(&self, sandbox: &str) {
        let removed = self.0.lock().ok().and_then(|mut all| all.remove(sandbox));
        for running in removed.into_iter().flat_map(|t| t.into_values()) {
            running.readers.close();
        }
    }
}

/// `POST /process.Process/{method}`.
pub async fn call(
    State(state): State<AppState>,
    Extension(found): Extension<EnvdSandbox>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let result = match method.as_str() {
        "Start" => return start(state, found, &headers, &body).await,
        "Connect" => return attach(&state, &found, &headers, &body),
        "List" => list(&state, &found, &headers, &body),
        "SendInput" => send_input(&state, &found, &headers, &body).await,
        "CloseStdin" => close_stdin(&state, &found, &headers, &body).await,
        "SendSignal" => send_signal(&state, &found, &headers, &body).await,
        "Update" => update(&state, &found, &headers, &body).await,
        "StreamInput" => Err(RpcError::unimplemented("process.Process/StreamInput (use SendInput)")),
        other => Err(RpcError::new(Code::NotFound, format!("no method process.Process/{other}"))),
    };
    match result {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

/// The keepalive interval the client asks for (`Keepalive-Ping-Interval`, seconds).
fn keepalive(headers: &HeaderMap) -> Duration {
    headers
        .get(KEEPALIVE_HEADER)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .filter(|s| (1..=3600).contains(s))
        .map_or(DEFAULT_KEEPALIVE, Duration::from_secs)
}

/// The header a client names its keepalive interval in.
pub const KEEPALIVE_HEADER: &str = "keepalive-ping-interval";

/// A stream of `first`, then what `events` brings, with keepalives in
/// between, then the end of the stream.
fn event_stream(first: Bytes, events: mpsc::Receiver<Bytes>, every: Duration) -> Response {
    let keepalive = connect::stream_message(&serde_json::json!({ "event": { "keepalive": {} } }));
    let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let rest = futures_util::stream::unfold(Some((events, interval)), move |state| {
        let keepalive = keepalive.clone();
        async move {
            let (mut events, mut interval) = state?;
            tokio::select! {
                event = events.recv() => match event {
                    Some(event) => Some((event, Some((events, interval)))),
                    None => Some((connect::end_of_stream(None), None)),
                },
                _ = interval.tick() => Some((keepalive, Some((events, interval)))),
            }
        }
    });
    connect::stream_response(futures_util::StreamExt::chain(futures_util::stream::once(async { first }), rest))
}

async fn start(state: AppState, found: EnvdSandbox, headers: &HeaderMap, body: &Bytes) -> Response {
    let request: StartRequest = match connect::stream_request(headers, body) {
        Ok(r) => r,
        Err(e) => return connect::stream_error(&e),
    };
    let user = super::request_user(headers);
    let every = keepalive(headers);
    match spawn(&state, &found, request, user).await {
        Ok((pid, events)) => event_stream(start_event(pid), events, every),
        Err(e) => connect::stream_error(&e),
    }
}

/// Start the command `request` describes; its pid and its first reader.
async fn spawn(
    state: &AppState,
    found: &EnvdSandbox,
    request: StartRequest,
    user: Option<String>,
) -> Result<(u32, mpsc::Receiver<Bytes>), RpcError> {
    let mut config = request.process.ok_or_else(|| RpcError::invalid("process is required"))?;
    if config.cmd.is_empty() || config.cmd.contains('\0') || config.args.iter().any(|a| a.contains('\0')) {
        return Err(RpcError::invalid("cmd is empty or holds a NUL byte"));
    }
    if config.cmd == "/bin/bash" && !state.e2b().has_bash(state, &found.id).await {
        // The SDK runs every command as `/bin/bash -l -c ...`; an image
        // without bash runs it with its POSIX shell.
        config.cmd = "/bin/sh".into();
    }
    let readers = Arc::new(Readers::default());
    let events = readers.add();
    let mut command = sandbox::Command::new(config.cmd.clone()).args(config.args.iter().cloned());
    for (key, value) in found.record.env.iter().chain(config.envs.iter()) {
        command = command.env(key, value);
    }
    if let Some(cwd) = &config.cwd {
        command = command.cwd(cwd);
    }
    if let Some(user) = &user {
        command = command.user(user);
    }
    let tty = request.pty.is_some();
    if let Some(pty) = request.pty {
        command = command.tty(pty.win_size());
        command = command.stdout_to(EventSink { readers: Arc::clone(&readers), field: "pty" });
    } else {
        command = command.stdout_to(EventSink { readers: Arc::clone(&readers), field: "stdout" });
        command = command.stderr_to(EventSink { readers: Arc::clone(&readers), field: "stderr" });
    }
    if request.stdin.unwrap_or(false) || tty {
        command = command.stdin_piped();
    }
    let (st, id, tag) = (state.clone(), found.id.clone(), request.tag);
    let pid = super::run(move || {
        let sandbox = find(&st, &id)?;
        let mut process = sandbox.spawn(command)?;
        let pid = match process.wait_started(START_TIMEOUT) {
            Ok(Some(pid)) => pid,
            Ok(None) => {
                let status = process.wait().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                return Err(RpcError::new(
                    Code::FailedPrecondition,
                    format!("the command did not start (status {status})"),
                ));
            }
            Err(_) => {
                let _ = process.kill();
                return Err(RpcError::new(Code::Unavailable, "the command did not start in time"));
            }
        };
        let running = Arc::new(Running {
            pid,
            tag,
            config,
            control: process.control(),
            stdin: Mutex::new(process.take_stdin()),
            readers: Arc::clone(&readers),
        });
        st.e2b().processes.insert(&id, Arc::clone(&running));
        let waiter = std::thread::Builder::new().name("envd-process".into()).spawn(move || {
            let status = process.wait().map_err(|e| e.to_string());
            running.readers.publish(&end_event(status));
            running.readers.close();
            st.e2b().processes.remove(&id, pid);
        });
        if let Err(e) = waiter {
            return Err(RpcError::new(Code::Internal, format!("start a thread: {e}")));
        }
        Ok(pid)
    })
    .await?;
    tracing::debug!(sandbox = found.id, pid, "envd process started");
    Ok((pid, events))
}

fn attach(state: &AppState, found: &EnvdSandbox, headers: &HeaderMap, body: &Bytes) -> Response {
    let request: Selected = match connect::stream_request(headers, body) {
        Ok(r) => r,
        Err(e) => return connect::stream_error(&e),
    };
    match state.e2b().processes.find(&found.id, request.process.as_ref()) {
        Ok(running) => event_stream(start_event(running.pid), running.readers.add(), keepalive(headers)),
        Err(e) => connect::stream_error(&e),
    }
}

fn list(state: &AppState, found: &EnvdSandbox, headers: &HeaderMap, body: &Bytes) -> Result<Response, RpcError> {
    let _: serde_json::Value = connect::unary_request(headers, body)?;
    let processes: Vec<_> = state
        .e2b()
        .processes
        .list(&found.id)
        .iter()
        .map(|r| serde_json::json!({ "config": r.config, "pid": r.pid, "tag": r.tag }))
        .collect();
    Ok(connect::unary_response(&serde_json::json!({ "processes": processes })))
}

async fn send_input(
    state: &AppState,
    found: &EnvdSandbox,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, RpcError> {
    let request: SendInputRequest = connect::unary_request(headers, body)?;
    let running = state.e2b().processes.find(&found.id, request.process.as_ref())?;
    let input = request.input.unwrap_or_default();
    let data = input.stdin.or(input.pty).unwrap_or_default();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|e| RpcError::invalid(format!("input is not base64: {e}")))?;
    super::run(move || {
        let mut stdin = running.stdin.lock().map_err(|_| RpcError::new(Code::Internal, "stdin lock"))?;
        let stdin = stdin.as_mut().ok_or_else(|| {
            RpcError::invalid("the process's stdin is closed or was not opened (start it with stdin)")
        })?;
        stdin.write_all(&bytes).map_err(|e| RpcError::new(Code::Internal, format!("write to stdin: {e}")))
    })
    .await?;
    Ok(connect::unary_response(&serde_json::json!({})))
}

async fn close_stdin(
    state: &AppState,
    found: &EnvdSandbox,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, RpcError> {
    let request: Selected = connect::unary_request(headers, body)?;
    let running = state.e2b().processes.find(&found.id, request.process.as_ref())?;
    super::run(move || {
        let stdin = running.stdin.lock().map_err(|_| RpcError::new(Code::Internal, "stdin lock"))?.take();
        if let Some(stdin) = stdin {
            stdin.close()?;
        }
        Ok(())
    })
    .await?;
    Ok(connect::unary_response(&serde_json::json!({})))
}

async fn send_signal(
    state: &AppState,
    found: &EnvdSandbox,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, RpcError> {
    let request: SendSignalRequest = connect::unary_request(headers, body)?;
    if request.signal <= 0 || request.signal > 64 {
        return Err(RpcError::invalid("signal must be SIGNAL_SIGKILL or SIGNAL_SIGTERM"));
    }
    let running = state.e2b().processes.find(&found.id, request.process.as_ref())?;
    let signal = request.signal;
    super::run(move || Ok(running.control.signal(signal)?)).await?;
    Ok(connect::unary_response(&serde_json::json!({})))
}

async fn update(
    state: &AppState,
    found: &EnvdSandbox,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, RpcError> {
    let request: UpdateRequest = connect::unary_request(headers, body)?;
    let running = state.e2b().processes.find(&found.id, request.process.as_ref())?;
    if let Some(pty) = request.pty {
        let size = pty.win_size();
        super::run(move || Ok(running.control.resize(size)?)).await?;
    }
    Ok(connect::unary_response(&serde_json::json!({})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_decode_as_the_sdk_encodes_them() {
        let start: StartRequest = serde_json::from_str(
            r#"{"process":{"cmd":"/bin/bash","args":["-l","-c","echo hi"],"envs":{"A":"b"}},"stdin":false,"unknown":1}"#,
        )
        .unwrap();
        let config = start.process.unwrap();
        assert_eq!((config.cmd.as_str(), config.args.len(), config.envs["A"].as_str()), ("/bin/bash", 3, "b"));
        let kill: SendSignalRequest =
            serde_json::from_str(r#"{"process":{"pid":42},"signal":"SIGNAL_SIGKILL"}"#).unwrap();
        assert_eq!((kill.process.unwrap().pid, kill.signal), (Some(42), 9));
        let term: SendSignalRequest = serde_json::from_str(r#"{"process":{"tag":"t"},"signal":15}"#).unwrap();
        assert_eq!(term.signal, 15);
        let pty: Pty = serde_json::from_str(r#"{"size":{"cols":0,"rows":100000}}"#).unwrap();
        assert_eq!(pty.win_size(), sandbox::WinSize { cols: 80, rows: 24 });
    }

    #[test]
    fn events_have_the_connect_json_shape() {
        let end = end_event(Ok(3));
        let json: serde_json::Value = serde_json::from_slice(&end[5..]).unwrap();
        assert_eq!(json["event"]["end"]["exitCode"], 3);
        assert_eq!(json["event"]["end"]["status"], "exit status 3");
        let mut sink = EventSink { readers: Arc::new(Readers::default()), field: "stdout" };
        let mut rx = sink.readers.add();
        std::thread::spawn(move || sink.write_all(b"hi\n").unwrap()).join().unwrap();
        let msg = rx.try_recv().unwrap();
        let json: serde_json::Value = serde_json::from_slice(&msg[5..]).unwrap();
        assert_eq!(json["event"]["data"]["stdout"], "aGkK");
    }
}
