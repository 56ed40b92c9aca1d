//! The MITM handler end to end on loopback: a guest client through the Unix
//! socket, the handler, and a local HTTPS upstream with its own CA.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Harness, SECRET_TOKEN};
use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use hyper::header::HOST;
use hyper::{Request, StatusCode};
use net::fixtures::{body_from_chunks, empty_body, full_body, pattern_chunks, HttpsUpstream, TestCa};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message as WsMessage;

fn get(host: &str, path: &str) -> Request<net::fixtures::GuestBody> {
    Request::get(path).header(HOST, host).body(empty_body()).unwrap()
}

async fn text(response: hyper::Response<hyper::body::Incoming>) -> (StatusCode, String) {
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Read until the handler closes the connection; true if it did within 5 s.
async fn closed_by_handler(stream: &mut tokio::net::UnixStream) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
    false
}

async fn assert_still_serving(h: &Harness) {
    let mut sender = h.guest.http1("a.test", h.upstream_addr()).await.unwrap();
    let (status, body) = text(sender.send_request(get("a.test", "/hello")).await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn allowed_get_end_to_end_with_one_row() {
    let h = Harness::start().await;
    let mut sender = h.guest.http1("a.test", h.upstream_addr()).await.unwrap();
    let response = sender.send_request(get("a.test", "/hello")).await.unwrap();
    assert_eq!(response.headers()["x-sandbox"], "seen", "response rewrite applied");
    let (status, body) = text(response).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.starts_with("hello a.test"), "{body}");

    let rows = h.wait_net_rows(1).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = &rows[0];
    assert_eq!(row.domain, "a.test");
    assert_eq!(row.sni.as_deref(), Some("a.test"));
    assert_eq!((row.method.as_deref(), row.path.as_deref()), (Some("GET"), Some("/hello")));
    assert_eq!(row.status_code, Some(200));
    assert_eq!(row.decision, "allowed");
    assert_eq!(row.matched_rule.as_deref(), Some("http.test_hosts"));
    assert_eq!(row.bytes_received, body.len() as i64);
    assert_eq!(row.response_body_preview.as_deref(), Some(body.as_str()));
    h.shutdown().await;
}

#[tokio::test]
async fn blocked_domain_gets_403_naming_the_decision() {
    let h = Harness::start().await;
    let mut sender = h.guest.http1("blocked.test", h.upstream_addr()).await.unwrap();
    let (status, body) = text(sender.send_request(get("blocked.test", "/hello")).await.unwrap()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body.contains("no rule allows this request"), "{body}");
    let rows = h.wait_net_rows(1).await;
    assert_eq!((rows[0].decision.as_str(), rows[0].status_code), ("denied", Some(403)));
    assert_eq!(rows[0].matched_rule, None);
    h.shutdown().await;
}

#[tokio::test]
async fn post_blocked_by_method_rule_while_get_is_allowed() {
    let h = Harness::start().await;
    let mut sender = h.guest.http1("b.test", h.upstream_addr()).await.unwrap();
    let (status, _) = text(sender.send_request(get("b.test", "/hello")).await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let post = Request::post("/echo").header(HOST, "b.test").body(full_body("data")).unwrap();
    let (status, body) = text(sender.send_request(post).await.unwrap()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body.contains("rule http.no_post_b"), "{body}");

    let rows = h.wait_net_rows(2).await;
    assert_eq!(rows.len(), 2);
    let post_row = rows.iter().find(|r| r.method.as_deref() == Some("POST")).unwrap();
    assert_eq!((post_row.decision.as_str(), post_row.matched_rule.as_deref()), ("denied", Some("http.no_post_b")));
    h.shutdown().await;
}

#[tokio::test]
async fn chunked_upload_streams_through() {
    let h = Harness::start().await;
    let mut sender = h.guest.http1("a.test", h.upstream_addr()).await.unwrap();
    let chunks: Vec<Bytes> = (0..100u8).map(|i| Bytes::from(vec![i; 10_000])).collect();
    let expected: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
    let post = Request::post("/echo").header(HOST, "a.test").body(body_from_chunks(chunks)).unwrap();
    let response = sender.send_request(post).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-request-method"], "POST");
    let echoed = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(echoed.len(), expected.len());
    assert!(echoed == expected);

    let rows = h.wait_net_rows(1).await;
    assert_eq!(rows[0].bytes_sent, 1_000_000);
    assert_eq!(rows[0].bytes_received, 1_000_000);
    h.shutdown().await;
}

#[tokio::test]
async fn download_of_100_mb_is_streamed_intact() {
    const SIZE: u64 = 100 * 1024 * 1024;
    let h = Harness::start().await;
    let mut sender = h.guest.http1("a.test", h.upstream_addr()).await.unwrap();
    let response = sender.send_request(get("a.test", &format!("/bytes/{SIZE}"))).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut digest = Sha256::new();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            received += data.len() as u64;
            digest.update(&data);
        }
    }
    let mut expected = Sha256::new();
    pattern_chunks(SIZE).for_each(|c| expected.update(&c));
    assert_eq!(received, SIZE);
    assert_eq!(digest.finalize(), expected.finalize());
    let rows = h.wait_net_rows(1).await;
    assert_eq!(rows[0].bytes_received, SIZE as i64);
    assert_eq!(rows[0].decision, "allowed");
    h.shutdown().await;
}

#[tokio::test]
async fn http2_with_50_concurrent_streams() {
    let h = Harness::start().await;
    let sender = h.guest.http2("a.test", h.upstream_addr()).await.unwrap();
    let requests = (0..50).map(|i| {
        let mut sender = sender.clone();
        async move {
            let request = Request::get(format!("https://a.test/bytes/{}", 1000 + i)).body(empty_body()).unwrap();
            let response = sender.send_request(request).await.unwrap();
            assert_eq!(response.version(), hyper::Version::HTTP_2);
            let status = response.status();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, body.len())
        }
    });
    let results = futures_util::future::join_all(requests).await;
    for (i, (status, len)) in results.into_iter().enumerate() {
        assert_eq!((status, len), (StatusCode::OK, 1000 + i));
    }
    let rows = h.wait_net_rows(50).await;
    assert_eq!(rows.len(), 50);
    assert!(rows.iter().all(|r| r.decision == "allowed" && r.status_code == Some(200)));
    h.shutdown().await;
}

#[tokio::test]
async fn websocket_echo_where_allowed_and_403_where_blocked() {
    let h = Harness::start().await;
    let tls = h.guest.tls("a.test", h.upstream_addr(), &[b"http/1.1"]).await.unwrap();
    let (mut ws, response) = tokio_tungstenite::client_async("wss://a.test/ws", tls).await.unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    for i in 0..5 {
        ws.send(WsMessage::text(format!("ping {i}"))).await.unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), format!("ping {i}"));
    }
    ws.close(None).await.unwrap();
    drop(ws);

    let tls = h.guest.tls("b.test", h.upstream_addr(), &[b"http/1.1"]).await.unwrap();
    let refused = tokio_tungstenite::client_async("wss://b.test/ws", tls).await.unwrap_err();
    match refused {
        tokio_tungstenite::tungstenite::Error::Http(response) => assert_eq!(response.status(), StatusCode::FORBIDDEN),
        other => panic!("expected a 403, got {other}"),
    }

    let rows = h.wait_net_rows(2).await;
    let tunnel = rows.iter().find(|r| r.domain == "a.test").unwrap();
    assert_eq!(tunnel.status_code, Some(101));
    assert!(tunnel.bytes_sent > 0 && tunnel.bytes_received > 0, "{tunnel:?}");
    let blocked = rows.iter().find(|r| r.domain == "b.test").unwrap();
    assert_eq!(blocked.matched_rule.as_deref(), Some("http.no_websocket_b"));
    h.shutdown().await;
}

#[tokio::test]
async fn sni_host_mismatch_is_blocked_on_http1_and_http2() {
    let h = Harness::start().await;
    let mut sender = h.guest.http1("a.test", h.upstream_addr()).await.unwrap();
    let (status, body) = text(sender.send_request(get("b.test", "/hello")).await.unwrap()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body.contains("builtin.sni_host_mismatch") || body.contains("does not match"), "{body}");

    let mut sender = h.guest.http2("a.test", h.upstream_addr()).await.unwrap();
    let request = Request::get("https://b.test/hello").body(empty_body()).unwrap();
    let (status, _) = text(sender.send_request(request).await.unwrap()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let rows = h.wait_net_rows(2).await;
    assert_eq!(rows.len(), 2);
    for row in rows {
        assert_eq!(row.decision, "denied");
        assert_eq!(row.matched_rule.as_deref(), Some("builtin.sni_host_mismatch"));
    }
    h.shutdown().await;
}

#[tokio::test]
async fn upstream_down_is_502() {
    let h = Harness::start().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut sender = h.guest.http1("down.test", SocketAddr::from(([127, 0, 0, 1], port))).await.unwrap();
    let (status, body) = text(sender.send_request(get("down.test", "/hello")).await.unwrap()).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    let rows = h.wait_net_rows(1).await;
    assert_eq!((rows[0].decision.as_str(), rows[0].status_code), ("error", Some(502)));
    assert!(rows[0].error.as_deref().unwrap_or_default().contains("connect"), "{:?}", rows[0].error);
    h.shutdown().await;
}

#[tokio::test]
async fn upstream_with_untrusted_certificate_is_502() {
    let h = Harness::start().await;
    let other_ca = TestCa::new("nobody trusts this").unwrap();
    let untrusted = HttpsUpstream::start(&other_ca, &["untrusted.test"]).await.unwrap();
    let mut sender = h.guest.http1("untrusted.test", untrusted.addr()).await.unwrap();
    let (status, body) = text(sender.send_request(get("untrusted.test", "/hello")).await.unwrap()).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(body.to_lowercase().contains("certificate"), "{body}");
    let rows = h.wait_net_rows(1).await;
    assert_eq!(rows[0].decision, "error");
    h.shutdown().await;
}

#[tokio::test]
async fn metadata_address_is_refused_even_when_loopback_is_allowed() {
    let h = Harness::start().await;
    let mut sender = h.guest.http1("metadata.test", h.upstream_addr()).await.unwrap();
    let (status, body) = text(sender.send_request(get("metadata.test", "/latest/meta-data")).await.unwrap()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body.contains("169.254.169.254"), "{body}");
    let rows = h.wait_net_rows(1).await;
    assert_eq!(rows[0].matched_rule.as_deref(), Some("builtin.address_guard"));
    h.shutdown().await;
}

#[tokio::test]
async fn loopback_is_refused_unless_configured() {
    let h = Harness::start_with(|config| config.allowed_networks.clear()).await;
    let mut sender = h.guest.http1("loop.test", h.upstream_addr()).await.unwrap();
    let (status, body) = text(sender.send_request(get("loop.test", "/hello")).await.unwrap()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body.contains("127.0.0.1"), "{body}");
    let rows = h.wait_net_rows(1).await;
    assert_eq!((rows[0].decision.as_str(), rows[0].matched_rule.as_deref()), ("denied", Some("builtin.address_guard")));
    h.shutdown().await;
}

#[tokio::test]
async fn garbage_instead_of_client_hello_is_closed_and_logged() {
    let h = Harness::start().await;
    let mut stream = h.guest.connect(h.upstream_addr()).await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n").await.unwrap();
    assert!(closed_by_handler(&mut stream).await);
    let rows = h.wait_net_rows(1).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].decision, "error");
    assert_eq!(rows[0].domain, "127.0.0.1", "the announced destination names the attempt");
    assert!(rows[0].error.as_deref().unwrap().contains("no TLS ClientHello"), "{:?}", rows[0].error);
    assert_still_serving(&h).await;
    h.shutdown().await;
}

#[tokio::test]
async fn bad_or_missing_proxy_header_is_closed_and_logged() {
    let h = Harness::start().await;
    let inputs: [&[u8]; 3] = [b"HELLO\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", &[b'P'; 300]];
    for input in inputs {
        let mut stream = tokio::net::UnixStream::connect(h.mitm_socket()).await.unwrap();
        stream.write_all(input).await.unwrap();
        stream.shutdown().await.unwrap();
        assert!(closed_by_handler(&mut stream).await);
    }
    let rows = h.wait_net_rows(3).await;
    assert_eq!(rows.len(), 3);
    for row in &rows {
        assert_eq!(row.decision, "error");
        assert!(row.error.as_deref().unwrap().contains("PROXY header"), "{:?}", row.error);
    }
    assert_still_serving(&h).await;
    h.shutdown().await;
}

#[tokio::test]
async fn client_hello_without_sni_is_blocked() {
    let h = Harness::start().await;
    // rustls sends no SNI for an IP address.
    let refused = h.guest.tls("127.0.0.1", h.upstream_addr(), &[b"http/1.1"]).await;
    assert!(refused.is_err());
    let rows = h.wait_net_rows(1).await;
    assert_eq!((rows[0].decision.as_str(), rows[0].matched_rule.as_deref()), ("denied", Some("builtin.no_sni")));
    h.shutdown().await;
}

#[tokio::test]
async fn slow_upstream_is_504_and_cut_body_is_logged() {
    let h = Harness::start_with(|config| {
        config.allowed_networks = vec!["127.0.0.1/32".parse().unwrap()];
        config.response_timeout = Duration::from_millis(500);
    })
    .await;
    let mut sender = h.guest.http1("a.test", h.upstream_addr()).await.unwrap();
    let (status, _) = text(sender.send_request(get("a.test", "/delay/3000")).await.unwrap()).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);

    let mut sender = h.guest.http1("a.test", h.upstream_addr()).await.unwrap();
    let response = sender.send_request(get("a.test", "/truncated")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.into_body().collect().await.is_err(), "the guest sees the cut");

    let rows = h.wait_net_rows(2).await;
    let timeout = rows.iter().find(|r| r.path.as_deref() == Some("/delay/3000")).unwrap();
    assert_eq!((timeout.decision.as_str(), timeout.status_code), ("error", Some(504)));
    let cut = rows.iter().find(|r| r.path.as_deref() == Some("/truncated")).unwrap();
    assert_eq!(cut.decision, "error");
    assert_eq!(cut.bytes_received, 10);
    assert_still_serving(&h).await;
    h.shutdown().await;
}

#[tokio::test]
async fn response_rule_can_block() {
    let h = Harness::start().await;
    let mut sender = h.guest.http1("a.test", h.upstream_addr()).await.unwrap();
    let (status, body) = text(sender.send_request(get("a.test", "/status/418")).await.unwrap()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body.contains("http.no_teapots"), "{body}");
    let rows = h.wait_net_rows(1).await;
    assert_eq!((rows[0].decision.as_str(), rows[0].matched_rule.as_deref()), ("denied", Some("http.no_teapots")));
    h.shutdown().await;
}

#[tokio::test]
async fn rewrites_apply_before_forwarding_and_secrets_are_never_logged() {
    let h = Harness::start().await;
    let mut sender = h.guest.http1("a.test", h.upstream_addr()).await.unwrap();
    let request = Request::get("/headers")
        .header(HOST, "a.test")
        .header("x-remove-me", "gone")
        .header("authorization", "Bearer guest-credential")
        .body(empty_body())
        .unwrap();
    let (status, seen) = text(sender.send_request(request).await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    // The upstream got the token (it reflects the header) and the guest does not.
    assert!(seen.contains("x-api-token: [REDACTED]"), "{seen}");
    assert!(!seen.contains(SECRET_TOKEN), "{seen}");
    assert!(!seen.contains("x-remove-me"), "{seen}");

    let rows = h.wait_net_rows(1).await;
    let headers = &rows[0].request_headers;
    assert!(headers.contains(&("x-api-token".into(), "REDACTED".into())), "{headers:?}");
    assert!(!headers.iter().any(|(k, _)| k == "x-remove-me"));
    // Read while the harness still holds its directory.
    assert!(!h.db_files_contain(SECRET_TOKEN).await, "secret in session.db");
    assert!(!h.db_files_contain("guest-credential").await, "credential in session.db");
    assert!(h.db_files_contain("x-remove-me").await || h.db_files_contain("a.test").await);
    h.shutdown().await;
}

#[tokio::test]
async fn secret_reflected_by_upstream_is_redacted() {
    let h = Harness::start().await;
    // Buffered body, over HTTP/1.1.
    let mut sender = h.guest.http1("a.test", h.upstream_addr()).await.unwrap();
    let (status, seen) = text(sender.send_request(get("a.test", "/headers")).await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(seen.contains("x-api-token: [REDACTED]") && !seen.contains(SECRET_TOKEN), "{seen}");

    // Streamed 5 bytes at a time (the value split across chunks), and
    // reflected in response headers, over HTTP/1.1 and HTTP/2.
    let mut h1 = h.guest.http1("a.test", h.upstream_addr()).await.unwrap();
    let mut h2 = h.guest.http2("a.test", h.upstream_addr()).await.unwrap();
    for http2 in [false, true] {
        let response = if http2 {
            h2.send_request(Request::get("https://a.test/reflect").body(empty_body()).unwrap()).await.unwrap()
        } else {
            h1.send_request(get("a.test", "/reflect")).await.unwrap()
        };
        assert_eq!(response.headers()["x-echo-x-api-token"], "[REDACTED]");
        assert_eq!(response.headers()["x-echo-x-added"], "by-rule");
        let all_headers = format!("{:?}", response.headers());
        assert!(!all_headers.contains(SECRET_TOKEN), "{all_headers}");
        let (status, seen) = text(response).await;
        assert_eq!(status, StatusCode::OK);
        assert!(seen.contains("x-api-token: [REDACTED]"), "h2 {http2}: {seen}");
        assert!(seen.contains("x-added: by-rule"), "h2 {http2}: {seen}");
        assert!(!seen.contains(SECRET_TOKEN), "h2 {http2}: {seen}");
    }

    // TRACE with an injected secret is refused before it leaves.
    let trace = Request::builder().method("TRACE").uri("/headers").header(HOST, "a.test").body(empty_body()).unwrap();
    let (status, body) = text(sender.send_request(trace).await.unwrap()).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("builtin.trace_with_secret"), "{body}");
    // TRACE without one goes through.
    let trace = Request::builder().method("TRACE").uri("/hello").header(HOST, "a.test").body(empty_body()).unwrap();
    let (status, _) = text(sender.send_request(trace).await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);

    let rows = h.wait_net_rows(5).await;
    assert_eq!(rows.len(), 5, "{rows:?}");
    let traced = rows.iter().find(|r| r.method.as_deref() == Some("TRACE") && r.status_code == Some(403)).unwrap();
    assert_eq!(
        (traced.decision.as_str(), traced.matched_rule.as_deref()),
        ("denied", Some("builtin.trace_with_secret"))
    );
    for row in rows.iter().filter(|r| r.path.as_deref() != Some("/hello") && r.method.as_deref() == Some("GET")) {
        let preview = row.response_body_preview.as_deref().unwrap_or_default();
        assert!(preview.contains("x-api-token: [REDACTED]"), "{preview}");
        assert!(row.decision == "allowed" && row.error.is_none(), "{row:?}");
    }
    assert!(!h.db_files_contain(SECRET_TOKEN).await, "secret in session.db");
    h.shutdown().await;
}

/// `count` HTTP/1.1 guest connections each sending one request at once.
async fn concurrent_gets(h: &Harness, path: &str, count: usize) -> Vec<StatusCode> {
    let requests = (0..count).map(|_| async {
        let mut sender = h.guest.http1("a.test", h.upstream_addr()).await.unwrap();
        text(sender.send_request(get("a.test", path)).await.unwrap()).await.0
    });
    futures_util::future::join_all(requests).await
}

#[tokio::test]
async fn upstream_connections_are_capped_per_sandbox() {
    let h = Harness::start_with(|config| {
        config.allowed_networks = vec!["127.0.0.1/32".parse().unwrap()];
        config.max_upstream_connections = 4;
        config.upstream_connection_wait = Duration::from_secs(3);
    })
    .await;
    // Within the wait: everyone gets through, never more than 4 connections upstream.
    let statuses = concurrent_gets(&h, "/delay/300", 10).await;
    assert!(statuses.iter().all(|s| *s == StatusCode::OK), "{statuses:?}");
    assert!(h.upstream.most_connections_open() <= 4, "{} connections", h.upstream.most_connections_open());
    h.shutdown().await;

    let h = Harness::start_with(|config| {
        config.allowed_networks = vec!["127.0.0.1/32".parse().unwrap()];
        config.max_upstream_connections = 4;
        config.upstream_connection_wait = Duration::from_millis(300);
    })
    .await;
    // Beyond the wait: 503, recorded.
    let statuses = concurrent_gets(&h, "/delay/1500", 10).await;
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    let unavailable = statuses.iter().filter(|s| **s == StatusCode::SERVICE_UNAVAILABLE).count();
    assert_eq!((ok, unavailable), (4, 6), "{statuses:?}");
    assert!(h.upstream.most_connections_open() <= 4, "{} connections", h.upstream.most_connections_open());
    let rows = h.wait_net_rows(10).await;
    let refused: Vec<_> = rows.iter().filter(|r| r.status_code == Some(503)).collect();
    assert_eq!(refused.len(), 6, "{rows:?}");
    assert!(refused
        .iter()
        .all(|r| r.decision == "error" && r.error.as_deref().unwrap_or_default().contains("4 upstream connections")));
    // Once they close, requests get through again.
    assert_still_serving(&h).await;
    h.shutdown().await;
}

#[tokio::test]
async fn connection_header_cannot_remove_rule_headers() {
    let h = Harness::start().await;
    let mut sender = h.guest.http1("a.test", h.upstream_addr()).await.unwrap();
    let request = Request::get("/headers")
        .header(HOST, "a.test")
        .header("connection", "x-added, x-api-token, x-guest")
        .header("x-guest", "hop")
        .body(empty_body())
        .unwrap();
    let (status, seen) = text(sender.send_request(request).await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(seen.contains("x-added: by-rule"), "{seen}");
    assert!(seen.contains("x-api-token: [REDACTED]"), "{seen}");
    assert!(!seen.contains("x-guest"), "the guest's own hop-by-hop header still goes: {seen}");
    h.shutdown().await;
}

#[tokio::test]
async fn encoded_path_cannot_bypass_prefix_rule() {
    let h = Harness::start().await;
    let mut sender = h.guest.http1("a.test", h.upstream_addr()).await.unwrap();
    let paths = ["/admin", "/%61dmin", "//admin", "/x/../admin/users", "/%2e/admin"];
    for path in paths {
        let (status, body) = text(sender.send_request(get("a.test", path)).await.unwrap()).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {body}");
        assert!(body.contains("http.no_admin_a"), "{path}: {body}");
    }
    let rows = h.wait_net_rows(paths.len()).await;
    assert!(rows.iter().all(|r| r.matched_rule.as_deref() == Some("http.no_admin_a")), "{rows:?}");
    // The row keeps the path as sent.
    assert!(rows.iter().any(|r| r.path.as_deref() == Some("/%61dmin")), "{rows:?}");
    h.shutdown().await;
}

#[tokio::test]
async fn keep_alive_requests_each_get_a_row() {
    let h = Harness::start().await;
    let mut sender = h.guest.http1("a.test", h.upstream_addr()).await.unwrap();
    for _ in 0..10 {
        let (status, _) = text(sender.send_request(get("a.test", "/hello")).await.unwrap()).await;
        assert_eq!(status, StatusCode::OK);
    }
    let rows = h.wait_net_rows(10).await;
    assert_eq!(rows.len(), 10);
    h.shutdown().await;
}

#[tokio::test]
async fn refuses_new_connections_when_telemetry_stops_recording() {
    let mut h = Harness::start().await;
    h.db.take().unwrap().close().await.unwrap();
    assert!(!h.recorder.healthy());
    let mut stream = h.guest.connect(h.upstream_addr()).await.unwrap();
    assert!(closed_by_handler(&mut stream).await);
    assert!(h.guest.http1("a.test", h.upstream_addr()).await.is_err());
    h.shutdown().await;
}

#[tokio::test]
async fn slow_and_idle_guests_are_cut_off_and_logged() {
    let h = Harness::start_with(|config| {
        config.allowed_networks = vec!["127.0.0.1/32".parse().unwrap()];
        config.handshake_timeout = Duration::from_millis(300);
        config.idle_timeout = Duration::from_millis(500);
    })
    .await;
    // Header, then silence instead of a ClientHello.
    let mut slow = h.guest.connect(h.upstream_addr()).await.unwrap();
    let started = Instant::now();
    assert!(closed_by_handler(&mut slow).await);
    assert!(started.elapsed() < Duration::from_secs(3));

    // A TLS connection that never sends a request.
    let mut idle = h.guest.tls("a.test", h.upstream_addr(), &[b"http/1.1"]).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf)).await.unwrap();
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(started.elapsed() < Duration::from_secs(3));

    let rows = h.wait_net_rows(2).await;
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r.decision == "error"));
    assert!(rows.iter().any(|r| r.error.as_deref().unwrap().contains("within")), "{rows:?}");
    assert!(rows.iter().any(|r| r.error.as_deref().unwrap().contains("idle")), "{rows:?}");
    h.shutdown().await;
}

#[tokio::test]
async fn handler_survives_a_flood_of_hostile_connections() {
    let h = Harness::start().await;
    let mut tasks = Vec::new();
    for i in 0..100u32 {
        let path = h.mitm_socket();
        tasks.push(tokio::spawn(async move {
            let mut stream = tokio::net::UnixStream::connect(path).await.unwrap();
            let junk: Vec<u8> = (0..(i * 37 % 500)).map(|j| (j * 7 + i) as u8).collect();
            let _ = stream.write_all(&junk).await;
            drop(stream);
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_still_serving(&h).await;
    let rows = h.wait_net_rows(101).await;
    assert_eq!(rows.len(), 101, "one row per connection attempt and request");
    h.shutdown().await;
}

/// The guest chooses the destination port it announces (root in the guest can
/// connect to net-proxy's own port, or forge the PROXY line): a rule that names
/// a host but no port allows that host on 443 only, and the handler never
/// connects anywhere else for it.
#[tokio::test]
async fn forged_port_is_blocked_unless_a_rule_names_it() {
    let h = Harness::start().await;
    let before = h.upstream.connections_accepted();
    let mut sender = h.guest.http1("only443.test", h.upstream_addr()).await.unwrap();
    let (status, body) = text(sender.send_request(get("only443.test", "/hello")).await.unwrap()).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("no rule allows this request"), "{body}");
    assert_eq!(h.upstream.connections_accepted(), before, "the upstream was reached on a port no rule names");

    // The same host on 443 is what the rule allows (nothing listens there:
    // 502), once the sandbox resolved the name: the address then has a name
    // and HTTPS to it is inspected without a tcp.connect rule.
    let answer =
        net::fixtures::dns_query(&h.dns_socket(), "only443.test.", hickory_proto::rr::RecordType::A).await.unwrap();
    assert_eq!(answer.answers.len(), 1);
    let port443 = SocketAddr::new(h.upstream_addr().ip(), 443);
    let mut sender = h.guest.http1("only443.test", port443).await.unwrap();
    let (status, body) = text(sender.send_request(get("only443.test", "/hello")).await.unwrap()).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");

    // A rule naming the upstream's port allows it.
    let mut sender = h.guest.http1("a.test", h.upstream_addr()).await.unwrap();
    let (status, body) = text(sender.send_request(get("a.test", "/hello")).await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let rows = h.wait_net_rows(3).await;
    let summary: Vec<_> =
        rows.iter().map(|r| (r.domain.as_str(), r.port, r.decision.as_str(), r.matched_rule.as_deref())).collect();
    let upstream_port = i64::from(h.upstream_addr().port());
    assert_eq!(
        summary,
        [
            ("only443.test", Some(upstream_port), "denied", None),
            ("only443.test", Some(443), "error", Some("http.only443")),
            ("a.test", Some(upstream_port), "allowed", Some("http.test_hosts")),
        ]
    );
    h.shutdown().await;
}
