//! The API without a VM: authentication, the error shape, request
//! validation, the upload limit, and serving on a Unix socket.
// The helpers unwrap like the tests they serve.
#![allow(clippy::unwrap_used)]

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper::Method;
use serde_json::{json, Value};
use tower::ServiceExt;

const KEY: &str = "s3cret-key-for-tests";

fn app(data: &std::path::Path, key: Option<&str>) -> axum::Router {
    api::router(api::Config::new(data).api_key(key.map(|k| api::ApiKey::new(k.as_bytes()))).upload_limit(1024))
}

async fn send(app: &axum::Router, request: Request<Body>) -> (StatusCode, Option<String>, Value) {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let auth = response.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_string());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, auth, body)
}

fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

fn post_json(uri: &str, body: &str) -> Request<Body> {
    Request::post(uri).header("content-type", "application/json").body(Body::from(body.to_string())).unwrap()
}

/// The one error shape: `{"code": status, "message": text}`.
fn assert_error(status: StatusCode, body: &Value, expected: StatusCode) {
    assert_eq!(status, expected, "{body}");
    assert_eq!(body["code"], json!(expected.as_u16()), "{body}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert_eq!(body.as_object().unwrap().len(), 2, "{body}");
}

#[tokio::test]
async fn without_the_key_every_request_is_refused_with_401() {
    let data = tempfile::tempdir().unwrap();
    let app = app(data.path(), Some(KEY));
    for uri in ["/v1/health", "/v1/sandboxes", "/openapi.json", "/nowhere"] {
        let (status, auth, body) = send(&app, get(uri)).await;
        assert_error(status, &body, StatusCode::UNAUTHORIZED);
        assert_eq!(auth.as_deref(), Some("Bearer"));
    }
    for wrong in [
        "Bearer nope",
        "Bearer s3cret-key-for-test",
        "Bearer s3cret-key-for-tests-and-more",
        "Basic czNjcmV0",
        "s3cret-key-for-tests",
    ] {
        let request = Request::get("/v1/health").header("authorization", wrong).body(Body::empty()).unwrap();
        let (status, _, body) = send(&app, request).await;
        assert_error(status, &body, StatusCode::UNAUTHORIZED);
    }
    let request = Request::get("/v1/health").header("x-api-key", "nope").body(Body::empty()).unwrap();
    assert_eq!(send(&app, request).await.0, StatusCode::UNAUTHORIZED);

    let request =
        Request::get("/v1/health").header("authorization", format!("bearer {KEY}")).body(Body::empty()).unwrap();
    let (status, _, body) = send(&app, request).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"status": "ok"}));
    let request = Request::get("/v1/version").header("x-api-key", KEY).body(Body::empty()).unwrap();
    let (status, _, body) = send(&app, request).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["api"], "v1");

    // Without a configured key, none is needed.
    let open = self::app(data.path(), None);
    assert_eq!(send(&open, get("/v1/health")).await.0, StatusCode::OK);
}

#[test]
fn the_key_is_read_trimmed_and_compared_whatever_its_length() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("key");
    std::fs::write(&file, format!("{KEY}\n")).unwrap();
    let key = api::ApiKey::read(&file).unwrap();
    assert!(key.matches(KEY.as_bytes()));
    assert!(!key.matches(b""));
    assert!(!key.matches(&KEY.as_bytes()[..KEY.len() - 1]));
    assert!(!key.matches(format!("{KEY}x").as_bytes()));
    assert!(!format!("{key:?}").contains(KEY), "the key must not be printed");
    std::fs::write(&file, " \n").unwrap();
    assert!(api::ApiKey::read(&file).is_err());
    assert!(api::ApiKey::read(&dir.path().join("missing")).is_err());
}

#[tokio::test]
async fn errors_have_one_shape_and_bad_input_is_a_400() {
    let data = tempfile::tempdir().unwrap();
    let app = app(data.path(), None);
    let cases: Vec<(Request<Body>, StatusCode)> = vec![
        (get("/nowhere"), StatusCode::NOT_FOUND),
        (Request::delete("/v1/health").body(Body::empty()).unwrap(), StatusCode::METHOD_NOT_ALLOWED),
        // Bodies that are not what the endpoint takes.
        (post_json("/v1/sandboxes", "{not json"), StatusCode::BAD_REQUEST),
        (post_json("/v1/sandboxes", r#"{"memory_mib": "lots"}"#), StatusCode::BAD_REQUEST),
        (post_json("/v1/sandboxes", r#"{"unknown": 1}"#), StatusCode::BAD_REQUEST),
        (Request::post("/v1/sandboxes").body(Body::from("{}")).unwrap(), StatusCode::UNSUPPORTED_MEDIA_TYPE),
        (post_json("/v1/sandboxes", r#"{"memory_mib": 1}"#), StatusCode::BAD_REQUEST),
        (post_json("/v1/sandboxes", r#"{"vcpus": 0}"#), StatusCode::BAD_REQUEST),
        (post_json("/v1/sandboxes", r#"{"timeout_secs": 0}"#), StatusCode::BAD_REQUEST),
        // Nothing on the host can be named: image files, OCI directories, profile files.
        (post_json("/v1/sandboxes", r#"{"image": "/etc/passwd"}"#), StatusCode::BAD_REQUEST),
        (post_json("/v1/sandboxes", r#"{"image": "oci:/var/lib/images/x"}"#), StatusCode::BAD_REQUEST),
        (post_json("/v1/sandboxes", r#"{"image": "docker-archive:/tmp/x.tar"}"#), StatusCode::BAD_REQUEST),
        (post_json("/v1/sandboxes", r#"{"image": "def\u0000ault"}"#), StatusCode::BAD_REQUEST),
        (post_json("/v1/sandboxes", r#"{"profiles": ["/etc/shadow"]}"#), StatusCode::BAD_REQUEST),
        (post_json("/v1/sandboxes", r#"{"snapshot": "../../etc"}"#), StatusCode::BAD_REQUEST),
        (post_json("/v1/sandboxes", r#"{"snapshot": "nosuch"}"#), StatusCode::NOT_FOUND),
        // Ids are checked before anything is looked up.
        (get("/v1/sandboxes/..%2F..%2Fetc"), StatusCode::BAD_REQUEST),
        (get("/v1/sandboxes/abc-def"), StatusCode::BAD_REQUEST),
        (get("/v1/sandboxes/0123456789abcdef"), StatusCode::NOT_FOUND),
        (Request::delete("/v1/sandboxes/0123456789abcdef").body(Body::empty()).unwrap(), StatusCode::NOT_FOUND),
        (get("/v1/sandboxes/0123456789abcdef/events"), StatusCode::NOT_FOUND),
        (get("/v1/sandboxes/0123456789abcdef/events?after=x"), StatusCode::BAD_REQUEST),
        (get("/v1/sandboxes/0123456789abcdef/events?limit=0"), StatusCode::BAD_REQUEST),
        (get("/v1/sandboxes/0123456789abcdef/events?limit=many"), StatusCode::BAD_REQUEST),
        (post_json("/v1/sandboxes/0123456789abcdef/snapshots", r#"{"name": "a/b"}"#), StatusCode::BAD_REQUEST),
        (post_json("/v1/sandboxes/0123456789abcdef/snapshots", r#"{"name": "ok"}"#), StatusCode::NOT_FOUND),
        // Commands.
        (post_json("/v1/sandboxes/0123456789abcdef/exec", r#"{"argv": []}"#), StatusCode::BAD_REQUEST),
        (post_json("/v1/sandboxes/0123456789abcdef/exec", r#"{"argv": ["sh\u0000"]}"#), StatusCode::BAD_REQUEST),
        (
            post_json("/v1/sandboxes/0123456789abcdef/exec", r#"{"argv": ["sh"], "env": {"A=B": "c"}}"#),
            StatusCode::BAD_REQUEST,
        ),
        (
            post_json(
                "/v1/sandboxes/0123456789abcdef/exec",
                r#"{"argv": ["sh"], "stdin": "%%%", "stdin_encoding": "base64"}"#,
            ),
            StatusCode::BAD_REQUEST,
        ),
        (
            post_json("/v1/sandboxes/0123456789abcdef/exec", r#"{"argv": ["sh"], "timeout_secs": 0}"#),
            StatusCode::BAD_REQUEST,
        ),
        (post_json("/v1/sandboxes/0123456789abcdef/exec", r#"{"argv": ["true"]}"#), StatusCode::NOT_FOUND),
        // Files: a path is required, without NUL.
        (get("/v1/sandboxes/0123456789abcdef/files"), StatusCode::BAD_REQUEST),
        (get("/v1/sandboxes/0123456789abcdef/files?path="), StatusCode::BAD_REQUEST),
        (get("/v1/sandboxes/0123456789abcdef/files?path=%2Ftmp%2Fa%00b"), StatusCode::BAD_REQUEST),
        (get("/v1/sandboxes/0123456789abcdef/files?path=%2Fetc%2Fhostname"), StatusCode::NOT_FOUND),
        (
            Request::put("/v1/sandboxes/0123456789abcdef/files?path=%2Ftmp%2Fa&mode=999")
                .body(Body::from("x"))
                .unwrap(),
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (request, expected) in cases {
        let what = format!("{} {}", request.method(), request.uri());
        let (status, _, body) = send(&app, request).await;
        assert_eq!(status, expected, "{what}: {body}");
        assert_error(status, &body, expected);
    }
}

#[tokio::test]
async fn an_upload_over_the_limit_is_refused_with_413() {
    let data = tempfile::tempdir().unwrap();
    let app = app(data.path(), None);
    // Declared too large.
    let request =
        Request::put("/v1/sandboxes/0123456789abcdef/files?path=/tmp/big").body(Body::from(vec![0u8; 4096])).unwrap();
    let (status, _, body) = send(&app, request).await;
    assert_error(status, &body, StatusCode::PAYLOAD_TOO_LARGE);
    // Streamed without a length, and too large.
    let chunks = futures_util::stream::iter((0..8).map(|_| Ok::<_, std::io::Error>(vec![0u8; 512])));
    let request =
        Request::put("/v1/sandboxes/0123456789abcdef/files?path=/tmp/big").body(Body::from_stream(chunks)).unwrap();
    let (status, _, body) = send(&app, request).await;
    assert_error(status, &body, StatusCode::PAYLOAD_TOO_LARGE);
    // Nothing stays behind.
    let tmp = data.path().join("tmp");
    assert_eq!(std::fs::read_dir(&tmp).map(|d| d.count()).unwrap_or(0), 0);
}

#[tokio::test]
async fn the_unix_socket_is_private_and_serves_the_api() {
    use std::os::unix::fs::PermissionsExt;
    let data = tempfile::tempdir().unwrap();
    let socket = data.path().join("api.sock");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn({
        let (socket, app) = (socket.clone(), app(data.path(), Some(KEY)));
        async move { api::serve_unix(&socket, app, async { drop(stopped.await) }).await }
    });
    for _ in 0..100 {
        if socket.exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    let (status, body) = common::json(&socket, Method::GET, "/v1/health", None, Value::Null).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED);
    let (status, body) = common::json(&socket, Method::GET, "/v1/health", Some(KEY), Value::Null).await;
    assert_eq!((status, body), (StatusCode::OK, json!({"status": "ok"})));
    let (status, doc) = common::json(&socket, Method::GET, "/openapi.json", Some(KEY), Value::Null).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["paths"]["/v1/sandboxes/{id}/exec"]["post"].is_object());
    // A second server on a live socket is refused; the first one goes on.
    assert!(api::serve_unix(&socket, app(data.path(), None), async {}).await.is_err());
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    assert!(!socket.exists(), "the socket is removed when the server stops");
}

const GOOD_PROFILE: &str = r#"
[security.rules.dns.allow_pypi]
on = "dns.request"
if = 'dns.request.qname == "pypi.org"'
decision = "allow"
priority = 10
"#;

#[tokio::test]
async fn profiles_are_checked_with_the_place_of_each_problem() {
    let data = tempfile::tempdir().unwrap();
    let app = app(data.path(), None);
    // One profile's TOML as the body.
    let request = Request::post("/v1/policy/check").body(Body::from(GOOD_PROFILE)).unwrap();
    let (status, _, body) = send(&app, request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["ok"], true, "{body}");
    assert_eq!(body["rule_count"], 1);
    assert_eq!(body["rules"][0]["name"], "dns.allow_pypi");
    assert_eq!(body["errors"], json!([]));
    // A bad one: where, and why.
    let bad = "[security.rules.dns.x]\non = \"dns.request\"\nif = 'dns.request.qname ==='\ndecision = \"allow\"\n";
    let request = Request::post("/v1/policy/check").body(Body::from(bad)).unwrap();
    let (status, _, body) = send(&app, request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["ok"], false, "{body}");
    let problem = &body["errors"][0];
    assert_eq!(problem["file"], "profile-1.toml", "{body}");
    assert_eq!(problem["line"], 3, "{body}");
    assert!(problem["column"].as_u64().is_some_and(|c| c >= 1), "{body}");
    assert!(body["text"].as_str().unwrap().starts_with("profile-1.toml:3:"), "{body}");
    // Layered, as JSON: a built-in name and named text.
    let layered = json!({"profiles": ["deny-all", {"name": "mine.toml", "text": GOOD_PROFILE}]});
    let (status, _, body) = send(&app, post_json("/v1/policy/check", &layered.to_string())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["ok"], true, "{body}");
    assert!(body["rules"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["location"].as_str().unwrap().starts_with("mine.toml:")));

    // Hostile requests get the error shape.
    let cases: Vec<(Request<Body>, StatusCode)> = vec![
        (post_json("/v1/policy/check", "{\"profiles\": "), StatusCode::BAD_REQUEST),
        (post_json("/v1/policy/check", r#"{"profiles": []}"#), StatusCode::BAD_REQUEST),
        (post_json("/v1/policy/check", r#"{"profiles": ["/etc/shadow"]}"#), StatusCode::BAD_REQUEST),
        (post_json("/v1/policy/check", r#"{"profiles": [{"text": "", "path": "/x"}]}"#), StatusCode::BAD_REQUEST),
        (
            Request::post("/v1/policy/check").body(Body::from(vec![b'#'; 3 * 1024 * 1024])).unwrap(),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (Request::post("/v1/policy/check").body(Body::from(vec![0xff, 0xfe])).unwrap(), StatusCode::BAD_REQUEST),
        (post_json("/v1/policy/explain", r#"{"profiles": ["dev"]}"#), StatusCode::BAD_REQUEST),
        (
            post_json("/v1/policy/explain", r#"{"profiles": ["dev"], "event": {"event": "nonsense"}}"#),
            StatusCode::BAD_REQUEST,
        ),
        (
            post_json(
                "/v1/policy/explain",
                &json!({"profiles": [{"text": "[oops"}], "event": {"event": "dns.request", "qname": "a.test"}})
                    .to_string(),
            ),
            StatusCode::BAD_REQUEST,
        ),
        (get("/v1/sandboxes/0123456789abcdef/profile"), StatusCode::NOT_FOUND),
        (get("/v1/sandboxes/bad-id/profile"), StatusCode::BAD_REQUEST),
    ];
    for (request, expected) in cases {
        let what = format!("{} {}", request.method(), request.uri());
        let (status, _, body) = send(&app, request).await;
        assert_eq!(status, expected, "{what}: {body}");
        assert_error(status, &body, expected);
    }
    // A profile over the policy crate's own limit, inside the body limit.
    let big = json!({"profiles": [{"text": "#".repeat((1 << 20) + 1)}]});
    let (status, _, body) = send(&app, post_json("/v1/policy/check", &big.to_string())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["ok"], false);
    assert!(body["errors"][0]["message"].as_str().unwrap().contains("larger than"), "{body}");
}

#[tokio::test]
async fn an_event_is_explained_blocked_or_allowed_with_its_rule() {
    let data = tempfile::tempdir().unwrap();
    let app = app(data.path(), None);
    let explain = |qname: &str| {
        json!({"profiles": [{"text": GOOD_PROFILE}], "event": {"event": "dns.request", "qname": qname, "qtype": "A"}})
            .to_string()
    };
    let (status, _, allowed) = send(&app, post_json("/v1/policy/explain", &explain("pypi.org"))).await;
    assert_eq!(status, StatusCode::OK, "{allowed}");
    assert_eq!(allowed["decision"], "allow", "{allowed}");
    assert_eq!(allowed["rule"], "dns.allow_pypi");
    assert_eq!(allowed["rules"][0]["outcome"], "matched");
    assert!(allowed["text"].as_str().unwrap().contains("decision: allow by rule dns.allow_pypi"), "{allowed}");

    let (status, _, blocked) = send(&app, post_json("/v1/policy/explain", &explain("evil.test"))).await;
    assert_eq!(status, StatusCode::OK, "{blocked}");
    assert_eq!(blocked["decision"], "block", "{blocked}");
    assert_eq!(blocked["rule"], Value::Null);
    assert_eq!(blocked["rules"][0]["outcome"], "not_matched");

    // Built-in profiles by name.
    let body =
        json!({"profiles": ["deny-all"], "event": {"event": "http.request", "host": "pypi.org", "method": "GET"}});
    let (status, _, denied) = send(&app, post_json("/v1/policy/explain", &body.to_string())).await;
    assert_eq!(status, StatusCode::OK, "{denied}");
    assert_eq!(denied["decision"], "block");
    let body = json!({"profiles": ["dev"], "event": {"event": "http.request", "host": "pypi.org", "method": "GET"}});
    let (status, _, allowed) = send(&app, post_json("/v1/policy/explain", &body.to_string())).await;
    assert_eq!(status, StatusCode::OK, "{allowed}");
    assert_eq!((allowed["decision"].as_str(), allowed["rule"].as_str()), (Some("allow"), Some("http.registries")));
}

/// A stopped sandbox in `data` with `rows` DNS rows in its session.db,
/// as a sandbox that ran leaves it.
async fn stopped_sandbox(data: &std::path::Path, id: &str, rows: usize) {
    let dir = data.join("sandboxes").join(id);
    std::fs::create_dir_all(&dir).unwrap();
    let state = json!({"id": id, "image": "default", "command": [], "created": 1, "memory_mib": 256, "vcpus": 1,
                       "pid": 0, "pid_start": 0, "profiles": [["User", {"Builtin": "deny-all"}]]});
    std::fs::write(dir.join("state.json"), state.to_string()).unwrap();
    let db = telemetry::SessionDb::open(&dir.join("session.db")).unwrap();
    for i in 1..=rows {
        db.recorder()
            .record_dns(telemetry::DnsEvent {
                time: std::time::SystemTime::now(),
                qname: format!("q{i}.test"),
                qtype: "A".into(),
                rcode: "NXDOMAIN".into(),
                decision: telemetry::Outcome::Denied,
                matched_rule: None,
                answers: Vec::new(),
                process_name: None,
                trace_id: None,
                error: None,
            })
            .unwrap();
    }
    db.close().await.unwrap();
}

/// The events of an SSE body: (event name, id, data).
fn sse_events(text: &str) -> Vec<(String, String, String)> {
    text.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .filter_map(|block| {
            let (mut name, mut id, mut data) = ("message".to_string(), String::new(), String::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim().into();
                } else if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().into();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim());
                }
            }
            (!data.is_empty()).then_some((name, id, data))
        })
        .collect()
}

#[tokio::test]
async fn events_stream_as_sse_with_resumable_ids_and_end_when_the_sandbox_stopped() {
    let data = tempfile::tempdir().unwrap();
    let id = "00112233445566aa";
    stopped_sandbox(data.path(), id, 3).await;
    let app = app(data.path(), None);
    let stream = |request: Request<Body>| {
        let app = app.clone();
        async move {
            let response = app.oneshot(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(response.headers()["content-type"], "text/event-stream");
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            sse_events(std::str::from_utf8(&bytes).unwrap())
        }
    };
    let uri = format!("/v1/sandboxes/{id}/events/stream");
    let events = stream(get(&uri)).await;
    assert_eq!(events.len(), 4, "{events:?}");
    for (i, (name, event_id, data)) in events[..3].iter().enumerate() {
        assert_eq!(name, "message");
        assert_eq!(event_id, &format!("{}.0.0.0", i + 1));
        let row: Value = serde_json::from_str(data).unwrap();
        assert_eq!(row["kind"], "dns");
        assert_eq!(row["qname"], format!("q{}.test", i + 1));
    }
    assert_eq!(events[3].0, "end");
    assert_eq!(serde_json::from_str::<Value>(&events[3].2).unwrap(), json!({"next": "3.0.0.0"}));

    // Resumed after the first row, by `after` or by Last-Event-ID (which
    // wins); a position of three ids, from before inbound rows, still works.
    let resumed = stream(get(&format!("{uri}?after=1.0.0.0"))).await;
    assert_eq!(resumed.iter().map(|e| e.1.as_str()).collect::<Vec<_>>(), ["2.0.0.0", "3.0.0.0", "3.0.0.0"]);
    let request =
        Request::get(format!("{uri}?after=0.0.0")).header("last-event-id", "2.0.0").body(Body::empty()).unwrap();
    let resumed = stream(request).await;
    assert_eq!(resumed.len(), 2, "{resumed:?}");
    assert_eq!(resumed[0].1, "3.0.0.0");

    // Bad positions and unknown sandboxes are errors, not streams.
    let (status, _, body) = send(&app, get(&format!("{uri}?after=x"))).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST);
    let request = Request::get(&uri).header("last-event-id", "1.2").body(Body::empty()).unwrap();
    let (status, _, body) = send(&app, request).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST);
    let (status, _, body) = send(&app, get("/v1/sandboxes/0123456789abcdef/events/stream")).await;
    assert_error(status, &body, StatusCode::NOT_FOUND);

    // Its recorded profiles.
    let (status, _, body) = send(&app, get(&format!("/v1/sandboxes/{id}/profile"))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let profile = &body["profiles"][0];
    assert_eq!((profile["layer"].as_str(), profile["source"].as_str()), (Some("user"), Some("builtin")), "{body}");
    assert_eq!(profile["name"], "deny-all");
    assert!(profile["text"].as_str().is_some_and(|t| t.contains("[security")), "{body}");
}

#[tokio::test]
async fn e2b_calls_have_their_own_checks() {
    let data = tempfile::tempdir().unwrap();
    let config = api::Config::new(data.path())
        .api_key(Some(api::ApiKey::new(KEY.as_bytes())))
        .e2b_domain(Some("localhost:3000".into()));
    let app = api::router(config);
    // A port of a sandbox the E2B surface does not know: no guest is asked.
    let port = Request::get("/").header("host", "8080-abc123.localhost:3000").body(Body::empty()).unwrap();
    let (status, _, body) = send(&app, port).await;
    assert_error(status, &body, StatusCode::BAD_GATEWAY);
    // envd calls need the sandbox's id and token, not the API key.
    let (status, _, body) = send(&app, post_json("/process.Process/List", "{}")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let unknown = Request::post("/process.Process/List")
        .header("content-type", "application/json")
        .header("e2b-sandbox-id", "abc123")
        .header("x-access-token", "whatever")
        .body(Body::from("{}"))
        .unwrap();
    let (status, _, body) = send(&app, unknown).await;
    assert_error(status, &body, StatusCode::BAD_GATEWAY);
    // The control plane needs the key; calls it does not serve are a 501.
    let (status, _, body) = send(&app, get("/v2/sandboxes")).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED);
    let pause = Request::post("/sandboxes/abc123/pause").header("x-api-key", KEY).body(Body::empty()).unwrap();
    let (status, _, body) = send(&app, pause).await;
    assert_error(status, &body, StatusCode::NOT_IMPLEMENTED);
}
