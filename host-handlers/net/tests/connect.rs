//! Connections decided by `tcp.connect` before anything is sent: addresses
//! bound to the names the sandbox resolved, and the modes that carry them
//! (`tcp`, `passthrough`), against local servers on loopback.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{echo_server, modes_profile, Harness};
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use http_body_util::BodyExt;
use hyper::header::HOST;
use hyper::{Request, StatusCode};
use net::fixtures::{dns_query, empty_body, Guest};
use telemetry::query::NetRow;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A harness with [`modes_profile`] added.
async fn harness(echo_port: u16) -> Harness {
    Harness::start_with_profile(
        |config| config.allowed_networks = vec!["127.0.0.0/24".parse().unwrap()],
        &modes_profile(echo_port),
    )
    .await
}

async fn resolve(h: &Harness, name: &str) -> ResponseCode {
    dns_query(&h.dns_socket(), name, RecordType::A).await.unwrap().metadata.response_code
}

/// Write `data`, read until the handler or the server closes.
async fn exchange(stream: &mut tokio::net::UnixStream, data: &[u8]) -> Vec<u8> {
    stream.write_all(data).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut back = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut back)).await;
    back
}

fn row<'a>(rows: &'a [NetRow], mode: Option<&str>, decision: &str) -> &'a NetRow {
    rows.iter()
        .find(|r| r.mode.as_deref() == mode && r.decision == decision)
        .unwrap_or_else(|| panic!("no {mode:?} {decision} row in {rows:#?}"))
}

/// `tcp` mode to a server by name: allowed, spliced, counted. The same
/// server by its literal address (no DNS answer named it): blocked before
/// any byte leaves.
#[tokio::test]
async fn tcp_mode_by_name_is_spliced_and_by_literal_address_is_blocked() {
    let (echo, connections) = echo_server().await;
    let h = harness(echo.port()).await;

    // Literal address first: nothing bound it yet.
    let mut stream = h.guest.connect(echo).await.unwrap();
    assert_eq!(exchange(&mut stream, b"SSH-2.0-literal\r\n").await, b"");
    assert_eq!(connections.load(Ordering::SeqCst), 0, "a literal address reached the server");

    // By name: the DNS answer binds the address to ssh.test.
    assert_eq!(resolve(&h, "ssh.test.").await, ResponseCode::NoError);
    let mut stream = h.guest.connect(echo).await.unwrap();
    let payload = b"SSH-2.0-OpenSSH_9.2\r\nsome binary \x00\x01\x02 bytes";
    assert_eq!(exchange(&mut stream, payload).await, payload);
    assert_eq!(connections.load(Ordering::SeqCst), 1);

    let rows = h.wait_net_rows(2).await;
    let blocked = row(&rows, None, "denied");
    assert_eq!(
        (blocked.domain.as_str(), blocked.port, blocked.ip.as_deref()),
        ("127.0.0.2", Some(i64::from(echo.port())), Some("127.0.0.2"))
    );
    assert!(blocked.error.as_deref().unwrap().contains("did not resolve through its DNS"), "{:?}", blocked.error);
    let spliced = row(&rows, Some("tcp"), "allowed");
    assert_eq!((spliced.domain.as_str(), spliced.matched_rule.as_deref()), ("ssh.test", Some("tcp.ssh")));
    assert_eq!((spliced.bytes_sent, spliced.bytes_received), (payload.len() as i64, payload.len() as i64));
    h.shutdown().await;
}

/// An address from a blocked DNS query has no name: a rule for that name
/// does not let a connection to it through.
#[tokio::test]
async fn address_of_a_blocked_query_is_refused() {
    let (echo, connections) = echo_server().await;
    let h = harness(echo.port()).await;
    assert_eq!(resolve(&h, "sshblocked.test.").await, ResponseCode::NXDomain);
    let mut stream = h.guest.connect(echo).await.unwrap();
    assert_eq!(exchange(&mut stream, b"SSH-2.0-x\r\n").await, b"");
    assert_eq!(connections.load(Ordering::SeqCst), 0);
    let rows = h.wait_net_rows(1).await;
    assert_eq!((rows[0].decision.as_str(), rows[0].matched_rule.as_deref()), ("denied", None));
    h.shutdown().await;
}

/// `passthrough`: a client that trusts only the upstream's own CA (as a
/// certificate-pinning client does) talks to the upstream end to end; one
/// whose ClientHello names another host than the address was resolved for is
/// refused.
#[tokio::test]
async fn passthrough_keeps_the_upstream_certificate_and_checks_the_sni() {
    let (echo, _) = echo_server().await;
    let h = harness(echo.port()).await;
    let pinning = Guest::new(&h.mitm_socket(), h.upstream_ca.cert_pem()).unwrap();
    assert_eq!(resolve(&h, "pinned.test.").await, ResponseCode::NoError);

    let mut sender = pinning.http1("pinned.test", h.upstream_addr()).await.unwrap();
    let request = Request::get("/hello").header(HOST, "pinned.test").body(empty_body()).unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(body.starts_with(b"hello pinned.test"), "{body:?}");
    drop(sender);

    // Inspected, the same client would refuse the sandbox CA's certificate;
    // passed through, a ClientHello for another name is refused.
    let err = pinning.http1("a.test", h.upstream_addr()).await;
    assert!(err.is_err(), "a ClientHello for a.test went through an address resolved for pinned.test");

    let rows = h.wait_net_rows(2).await;
    let through = row(&rows, Some("passthrough"), "allowed");
    assert_eq!((through.domain.as_str(), through.sni.as_deref()), ("pinned.test", Some("pinned.test")));
    assert!(through.bytes_sent > 0 && through.bytes_received > 0, "{through:?}");
    assert_eq!(through.path, None, "nothing inside passthrough TLS is seen");
    let mismatch = row(&rows, Some("passthrough"), "denied");
    assert_eq!(mismatch.matched_rule.as_deref(), Some("builtin.passthrough_sni_mismatch"));
    assert_eq!(mismatch.sni.as_deref(), Some("a.test"));
    h.shutdown().await;
}

/// A plain HTTP server on 127.0.0.2 (a local model server stand-in) that
/// answers `<method> <path> <host>`, counting its requests.
async fn http_server() -> (SocketAddr, Arc<AtomicU64>) {
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    let listener = TcpListener::bind("127.0.0.2:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let served = count.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let served = served.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    served.fetch_add(1, Ordering::SeqCst);
                    let host = req.headers().get(HOST).and_then(|h| h.to_str().ok()).unwrap_or("").to_owned();
                    let text = format!("{} {} {host}", req.method(), req.uri().path());
                    async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from(text),
                        )))
                    }
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    (addr, count)
}

/// `http` mode: plain HTTP on an opted-in port, each request decided by the
/// http rules (a blocked path gets 403 without reaching the server).
#[tokio::test]
async fn http_mode_inspects_plain_http() {
    use hyper_util::rt::TokioIo;
    let (server, requests) = http_server().await;
    let h = harness(server.port()).await;
    assert_eq!(resolve(&h, "models.test.").await, ResponseCode::NoError);
    let stream = h.guest.connect(server).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    let get = |path: &str| {
        Request::get(path).header(HOST, format!("models.test:{}", server.port())).body(empty_body()).unwrap()
    };
    let response = sender.send_request(get("/api/generate")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], format!("GET /api/generate models.test:{}", server.port()).as_bytes());
    let response = sender.send_request(get("/admin/keys")).await.unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(requests.load(Ordering::SeqCst), 1, "the blocked request reached the server");

    let rows = h.wait_net_rows(2).await;
    let allowed = row(&rows, Some("http"), "allowed");
    assert_eq!(
        (allowed.path.as_deref(), allowed.status_code, allowed.sni.as_deref()),
        (Some("/api/generate"), Some(200), None)
    );
    let blocked = row(&rows, Some("http"), "denied");
    assert_eq!((blocked.path.as_deref(), blocked.status_code), (Some("/admin/keys"), Some(403)));
    h.shutdown().await;
}

/// An inspected connection goes where its SNI says: a `tcp.connect` block
/// rule for that name applies even when the guest connects to an address
/// it resolved for another, allowed, name.
#[tokio::test]
async fn tcp_connect_rules_apply_to_the_sni_of_inspected_connections() {
    let extra = "[security.rules.tcp.no_b]\non = \"tcp.connect\"\nif = 'tcp.connect.host == \"b.test\"'\ndecision = \"block\"\npriority = 1\n";
    let h =
        Harness::start_with_profile(|config| config.allowed_networks = vec!["127.0.0.1/32".parse().unwrap()], extra)
            .await;
    assert_eq!(resolve(&h, "a.test.").await, ResponseCode::NoError);
    let before = h.upstream.connections_accepted();
    let refused = h.guest.http1("b.test", h.upstream_addr()).await;
    assert!(refused.is_err(), "a TLS session for b.test was set up through an address resolved for a.test");
    assert_eq!(h.upstream.connections_accepted(), before);
    let rows = h.wait_net_rows(1).await;
    assert_eq!(
        (rows[0].domain.as_str(), rows[0].decision.as_str(), rows[0].matched_rule.as_deref()),
        ("b.test", "denied", Some("tcp.no_b"))
    );
    h.shutdown().await;
}
