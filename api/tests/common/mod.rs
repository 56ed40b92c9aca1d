//! A small HTTP client over a Unix socket, for the suites that talk to a
//! real server.
// Each suite uses part of this; the helpers unwrap like the tests they serve.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

/// Stops whatever sandboxes a failed run left in the data directory.
pub struct Cleanup(pub std::path::PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for sandbox in sandbox::Sandbox::list_in(&self.0).unwrap_or_default() {
            let _ = sandbox.stop(std::time::Duration::from_secs(30));
        }
    }
}

/// One request on a new connection to the server at `socket`.
pub async fn call(socket: &Path, method: Method, uri: &str, key: Option<&str>, body: Vec<u8>) -> (StatusCode, Bytes) {
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let mut request = Request::builder().method(method).uri(uri).header("host", "sandbox");
    if let Some(key) = key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    if !body.is_empty() && body[0] == b'{' {
        request = request.header("content-type", "application/json");
    }
    let response = sender.send_request(request.body(Full::new(Bytes::from(body))).unwrap()).await.unwrap();
    let status = response.status();
    (status, response.into_body().collect().await.unwrap().to_bytes())
}

/// A request whose answer is JSON.
pub async fn json(
    socket: &Path,
    method: Method,
    uri: &str,
    key: Option<&str>,
    body: serde_json::Value,
) -> (StatusCode, serde_json::Value) {
    let body = if body.is_null() { Vec::new() } else { serde_json::to_vec(&body).unwrap() };
    let (status, bytes) = call(socket, method, uri, key, body).await;
    let value = if bytes.is_empty() { serde_json::Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
    (status, value)
}

#[path = "../../../tests/common/vm.rs"]
mod vm;

/// The holder program sandboxes are spawned with: `$SANDBOX_HOLDER`, else
/// the `sandbox-holder` cargo built beside these tests.
pub fn holder() -> std::path::PathBuf {
    if let Some(path) = std::env::var_os("SANDBOX_HOLDER").filter(|p| !p.is_empty()) {
        return path.into();
    }
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> -> target/<profile>/sandbox-holder
    exe.parent().and_then(Path::parent).unwrap().join("sandbox-holder")
}

/// Whether this machine can boot sandboxes for these tests: /dev/kvm, the
/// kernel, the default image and the holder program (a skip, said on
/// stderr; a failure with `SANDBOX_REQUIRE_VM=1`).
pub fn vm_available() -> bool {
    let mut missing: Vec<String> = [sandbox::paths::kernel().err(), sandbox::paths::default_image().err()]
        .into_iter()
        .flatten()
        .map(|e| e.to_string())
        .collect();
    missing.extend(vm::missing_file(&holder(), "build it with `cargo build -p sandbox --bin sandbox-holder`"));
    vm::vm_available(missing)
}

/// A request whose answer is read as it comes: the response, its body
/// still streaming. Dropping the body (and the task driving the
/// connection, which ends with it) closes the connection.
pub async fn open(
    socket: &Path,
    method: Method,
    uri: &str,
    body: Option<serde_json::Value>,
) -> hyper::Response<hyper::body::Incoming> {
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let mut request = Request::builder().method(method).uri(uri).header("host", "sandbox");
    let bytes = match body {
        Some(v) => {
            request = request.header("content-type", "application/json");
            serde_json::to_vec(&v).unwrap()
        }
        None => Vec::new(),
    };
    sender.send_request(request.body(Full::new(Bytes::from(bytes))).unwrap()).await.unwrap()
}

/// The next data frame of a streaming body (`None`: it ended).
pub async fn next_chunk(body: &mut hyper::body::Incoming) -> Option<Bytes> {
    loop {
        let frame = body.frame().await?.unwrap();
        if let Ok(data) = frame.into_data() {
            return Some(data);
        }
    }
}
