//! End to end through real HTTP on a Unix socket, booting real VMs (needs
//! root, /dev/kvm and ./setup.sh's kernel and image): a sandbox is created,
//! runs a command, takes a file in and gives it back, shows the DNS query
//! its guest made, is snapshotted; a second sandbox is restored from that
//! snapshot; two clients drive the two at once; both are deleted. The
//! server has a data directory of its own.
// The helpers unwrap like the tests they serve.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

async fn exec(socket: &Path, id: &str, script: &str) -> Value {
    let (status, out) = common::json(
        socket,
        Method::POST,
        &format!("/v1/sandboxes/{id}/exec"),
        None,
        json!({"argv": ["sh", "-c", script]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_drives_sandboxes_through_the_api() {
    if !common::vm_available() {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let _cleanup = common::Cleanup(data.path().to_path_buf());
    let socket = data.path().join("api.sock");
    let config = api::Config::new(data.path()).holder(common::holder(), std::iter::empty::<String>());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn({
        let socket = socket.clone();
        async move { api::serve_unix(&socket, api::router(config), async { drop(stopped.await) }).await }
    });
    while !socket.exists() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let started = Instant::now();
    let (status, a) = common::json(&socket, Method::POST, "/v1/sandboxes", None, json!({"memory_mib": 256})).await;
    assert_eq!(status, StatusCode::CREATED, "{a}");
    let a = a["id"].as_str().unwrap().to_string();
    eprintln!("sandbox {a} ready in {:?}", started.elapsed());

    // A command's status and output.
    let out = exec(&socket, &a, "echo hi; exit 3").await;
    assert_eq!(out["status"], "exited");
    assert_eq!(out["exit_code"], 3);
    assert_eq!(out["stdout"], "hi\n");
    assert_eq!(out["stdout_truncated"], false);

    // A 1 MiB file in and back out.
    let blob: Vec<u8> = (0u32..1 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let files = format!("/v1/sandboxes/{a}/files?path=/tmp/blob");
    let (status, body) = common::call(&socket, Method::PUT, &files, None, blob.clone()).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let (status, back) = common::call(&socket, Method::GET, &files, None, Vec::new()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(Sha256::digest(&back), Sha256::digest(&blob), "the file came back different ({} bytes)", back.len());
    let (status, missing) =
        common::json(&socket, Method::GET, &format!("/v1/sandboxes/{a}/files?path=/nonexistent"), None, Value::Null)
            .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{missing}");

    // The DNS query its guest made is one of its events (deny-all blocks it).
    exec(&socket, &a, "nslookup example.test >/dev/null 2>&1; true").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut after = "0.0.0.0".to_string();
    let row = loop {
        let (status, page) = common::json(
            &socket,
            Method::GET,
            &format!("/v1/sandboxes/{a}/events?after={after}&limit=1"),
            None,
            Value::Null,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{page}");
        after = page["next"].as_str().unwrap().to_string();
        if let Some(row) = page["events"].as_array().unwrap().iter().find(|r| r["qname"] == "example.test") {
            break row.clone();
        }
        assert!(Instant::now() < deadline, "no event for example.test");
        if page["events"].as_array().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    assert_eq!(row["kind"], "dns");
    assert_eq!(row["decision"], "denied", "{row}");

    // Followed live: a client streaming the events sees a query the guest
    // makes after the stream began.
    live_events(&socket, &a, &after).await;
    // A client that goes away mid-exec stops its command.
    disconnect_kills(&socket, &a).await;
    // Output streamed as newline-delimited JSON, then the exit.
    streamed_exec(&socket, &a).await;
    // A port forward to httpd in the guest, and its connection as an event.
    port_forward(&socket, &a).await;
    let (status, profile) =
        common::json(&socket, Method::GET, &format!("/v1/sandboxes/{a}/profile"), None, Value::Null).await;
    assert_eq!(status, StatusCode::OK, "{profile}");

    // A snapshot, and a second sandbox restored from it.
    let (status, snap) =
        common::json(&socket, Method::POST, &format!("/v1/sandboxes/{a}/snapshots"), None, json!({"name": "base"}))
            .await;
    assert_eq!(status, StatusCode::CREATED, "{snap}");
    assert_eq!(snap["source"], a.as_str());
    let (status, again) =
        common::json(&socket, Method::POST, &format!("/v1/sandboxes/{a}/snapshots"), None, json!({"name": "base"}))
            .await;
    assert_eq!(status, StatusCode::CONFLICT, "{again}");
    let (_, list) = common::json(&socket, Method::GET, "/v1/snapshots", None, Value::Null).await;
    assert!(list["snapshots"].as_array().unwrap().iter().any(|s| s["name"] == "base"), "{list}");
    let (status, b) = common::json(&socket, Method::POST, "/v1/sandboxes", None, json!({"snapshot": "base"})).await;
    assert_eq!(status, StatusCode::CREATED, "{b}");
    let b = b["id"].as_str().unwrap().to_string();
    assert_ne!(a, b);
    let (_, list) = common::json(&socket, Method::GET, "/v1/sandboxes", None, Value::Null).await;
    let running: Vec<&str> = list["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["running"] == true)
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert!(running.contains(&a.as_str()) && running.contains(&b.as_str()), "{list}");

    // Two clients, each driving its own sandbox, at once: the restored one
    // has the file the first one had when it was saved.
    let drive = |id: String| {
        let socket = socket.clone();
        async move {
            let mut outputs = Vec::new();
            for i in 0..3 {
                let out = exec(&socket, &id, &format!("wc -c < /tmp/blob; hostname; exit {i}")).await;
                assert_eq!(out["exit_code"], i, "{out}");
                outputs.push(out["stdout"].as_str().unwrap().to_string());
            }
            outputs
        }
    };
    let (from_a, from_b) = tokio::join!(tokio::spawn(drive(a.clone())), tokio::spawn(drive(b.clone())));
    for (id, outputs) in [(&a, from_a.unwrap()), (&b, from_b.unwrap())] {
        for out in outputs {
            assert_eq!(out, format!("1048576\n{id}\n"), "sandbox {id}");
        }
    }

    // A fork of the restored one: a copy with the same file, its own
    // identity, and the fork's snapshot gone from the store.
    let (status, fork) =
        common::json(&socket, Method::POST, &format!("/v1/sandboxes/{b}/fork"), None, json!({"count": 1})).await;
    assert_eq!(status, StatusCode::CREATED, "{fork}");
    assert_eq!(fork["errors"], json!([]), "{fork}");
    let c = fork["sandboxes"][0]["id"].as_str().unwrap().to_string();
    assert!(c != a && c != b, "{fork}");
    let out = exec(&socket, &c, "wc -c < /tmp/blob; hostname").await;
    assert_eq!(out["stdout"], format!("1048576\n{c}\n"));
    let (_, list) = common::json(&socket, Method::GET, "/v1/snapshots", None, Value::Null).await;
    assert_eq!(list["snapshots"].as_array().unwrap().len(), 1, "only `base` is left: {list}");
    let (status, bad) =
        common::json(&socket, Method::POST, &format!("/v1/sandboxes/{b}/fork"), None, json!({"count": 99})).await;
    assert_eq!((status, bad["code"].as_u64()), (StatusCode::BAD_REQUEST, Some(400)), "{bad}");

    // All deleted.
    for id in [&a, &b, &c] {
        let (status, body) =
            common::json(&socket, Method::DELETE, &format!("/v1/sandboxes/{id}"), None, Value::Null).await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
        let (status, body) =
            common::json(&socket, Method::GET, &format!("/v1/sandboxes/{id}"), None, Value::Null).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert_eq!(body["code"], 404);
    }
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

/// Forward a host port to busybox httpd on the guest's 127.0.0.1:8080, GET
/// a file through it, see it listed and its connection among the events.
async fn port_forward(socket: &Path, id: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    exec(
        socket,
        id,
        "mkdir -p /tmp/www && echo through the api > /tmp/www/f.txt && httpd -p 127.0.0.1:8080 -h /tmp/www",
    )
    .await;
    let ports = format!("/v1/sandboxes/{id}/ports");
    let (status, forward) = common::json(socket, Method::POST, &ports, None, json!({"guest_port": 8080})).await;
    assert_eq!(status, StatusCode::CREATED, "{forward}");
    let host: std::net::SocketAddr = forward["host"].as_str().unwrap().parse().unwrap();
    assert!(host.ip().is_loopback(), "{forward}");
    let (status, bad) = common::json(socket, Method::POST, &ports, None, json!({"guest_port": 0})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    let (status, list) = common::json(socket, Method::GET, &ports, None, Value::Null).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list["ports"], json!([forward]));

    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    stream.write_all(b"GET /f.txt HTTP/1.0\r\n\r\n").await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.contains(" 200 ") && response.ends_with("through the api\n"), "{response}");
    // Its row is written when the connection ends: both sides closed.
    drop(stream);

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, page) =
            common::json(socket, Method::GET, &format!("/v1/sandboxes/{id}/events?limit=1000"), None, Value::Null)
                .await;
        let inbound = page["events"].as_array().unwrap().iter().find(|r| r["kind"] == "inbound").cloned();
        if let Some(row) = inbound {
            assert_eq!(
                (&row["listener"], &row["guest_port"], &row["decision"]),
                (&forward["host"], &json!(8080), &json!("allowed")),
                "{row}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no inbound event: {page}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Stream `id`'s events from `after`, make the guest look up `live.test`,
/// and read the stream until that row arrives.
async fn live_events(socket: &Path, id: &str, after: &str) {
    let mut response =
        common::open(socket, Method::GET, &format!("/v1/sandboxes/{id}/events/stream?after={after}"), None).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let started = Instant::now();
    exec(socket, id, "nslookup live.test >/dev/null 2>&1; true").await;
    let mut text = String::new();
    let found = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(chunk) = common::next_chunk(response.body_mut()).await {
            text.push_str(&String::from_utf8_lossy(&chunk));
            let rows: Vec<Value> = text
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .filter_map(|d| serde_json::from_str(d.trim()).ok())
                .collect();
            if let Some(row) = rows.into_iter().find(|r| r["qname"] == "live.test") {
                return Some(row);
            }
        }
        None
    })
    .await;
    let row = found.ok().flatten().unwrap_or_else(|| panic!("no live.test event on the stream; got:\n{text}"));
    assert_eq!(row["kind"], "dns");
    assert!(text.lines().any(|l| l.starts_with("id:")), "{text}");
    eprintln!("live event after {:?}", started.elapsed());
}

/// How many `sleep 601` run in the guest.
async fn sleepers(socket: &Path, id: &str) -> usize {
    let out = exec(socket, id, "ps -o args 2>/dev/null || ps").await;
    out["stdout"].as_str().unwrap().lines().filter(|l| l.contains("sleep 601")).count()
}

/// Start `sleep 601` through exec, drop the connection once it runs: the
/// command is gone shortly after.
async fn disconnect_kills(socket: &Path, id: &str) {
    assert_eq!(sleepers(socket, id).await, 0);
    let client = tokio::spawn({
        let (socket, uri) = (socket.to_path_buf(), format!("/v1/sandboxes/{id}/exec"));
        async move { common::json(&socket, Method::POST, &uri, None, json!({"argv": ["sleep", "601"]})).await }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while sleepers(socket, id).await == 0 {
        assert!(Instant::now() < deadline, "sleep 601 did not start");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    client.abort();
    assert!(client.await.is_err(), "the request ended before it was dropped");
    let gone = Instant::now();
    while sleepers(socket, id).await > 0 {
        assert!(gone.elapsed() < Duration::from_secs(20), "sleep 601 still runs after its client went away");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("command killed {:?} after its client went away", gone.elapsed());
}

async fn streamed_exec(socket: &Path, id: &str) {
    use base64::Engine as _;
    let mut response = common::open(
        socket,
        Method::POST,
        &format!("/v1/sandboxes/{id}/exec/stream"),
        Some(json!({"argv": ["sh", "-c", "echo out; echo err >&2; exit 4"]})),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut text = String::new();
    while let Some(chunk) = common::next_chunk(response.body_mut()).await {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let events: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let stream = |kind: &str| {
        events
            .iter()
            .filter(|e| e["type"] == kind)
            .map(|e| base64::engine::general_purpose::STANDARD.decode(e["data"].as_str().unwrap()).unwrap())
            .collect::<Vec<_>>()
            .concat()
    };
    assert_eq!(stream("stdout"), b"out\n", "{text}");
    assert_eq!(stream("stderr"), b"err\n", "{text}");
    assert_eq!(events.last().unwrap(), &json!({"type": "exit", "status": "exited", "exit_code": 4}), "{text}");
}
