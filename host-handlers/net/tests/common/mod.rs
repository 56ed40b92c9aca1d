//! A sandbox's network side on loopback: the DNS fixture as upstream resolver,
//! an HTTPS upstream with its own CA, a session database, the handlers on Unix
//! sockets in a temporary directory, and a guest client.
#![allow(clippy::unwrap_used, dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use guest_protocol::sandbox_dir::SandboxDir;
use net::fixtures::{Guest, GuestBody, HttpsUpstream, TestCa, TestDns};
use net::{Handlers, NetConfig, Server, DNS_PORT, MITM_PORT};
use policy::{Engine, Layer, Policy, ProfileSource, Secrets};
use telemetry::query::{DnsRow, LogOptions, LogReader, LogRow, NetRow};
use telemetry::{Recorder, SessionDb, TelemetryConfig};
use tokio::net::TcpListener;

/// Names the upstream certificate covers.
pub const UPSTREAM_NAMES: &[&str] =
    &["a.test", "b.test", "blocked.test", "metadata.test", "loop.test", "down.test", "only443.test", "pinned.test"];

/// The secret the rewrite rule puts into `x-api-token`.
pub const SECRET_TOKEN: &str = "tok-7f3a9c-secret";

/// The profile the tests run under, in the policy's TOML/CEL format, for an
/// upstream listening on `UPSTREAM_PORT` (rules must name a port other than 443).
pub const PROFILE: &str = r#"
[security.rules.dns.test_names]
on = "dns.request"
if = 'dns.request.qname.endsWith(".test") && dns.request.qname != "blocked.test"'
decision = "allow"

[security.rules.dns.svc_rewrite]
on = "dns.request"
if = 'dns.request.qname == "svc.test"'
decision = "rewrite"
answer = { ttl = 30, a = ["10.9.8.7"] }

# The guest fixture announces the loopback upstreams' own addresses, which
# no DNS answer gave: a rule names them.
[security.rules.tcp.loopback_upstreams]
on = "tcp.connect"
if = 'tcp.connect.ip == "127.0.0.1" && tcp.connect.port >= 1024'
decision = "allow"

[security.rules.http.test_hosts]
on = "http.request"
if = 'http.request.host in ["a.test", "b.test", "metadata.test", "loop.test"] && http.request.port == UPSTREAM_PORT'
decision = "allow"

[security.rules.http.unprivileged_ports]
on = "http.request"
if = 'http.request.host in ["down.test", "untrusted.test"] && http.request.port >= 1024'
decision = "allow"

[security.rules.http.only443]
on = "http.request"
if = 'http.request.host == "only443.test"'
decision = "allow"

[security.rules.http.no_post_b]
on = "http.request"
if = 'http.request.host == "b.test" && http.request.method == "POST"'
decision = "block"
priority = 10

[security.rules.http.no_websocket_b]
on = "http.request"
if = 'http.request.host == "b.test" && "upgrade" in http.request.headers'
decision = "block"
priority = 10

[security.rules.http.no_admin_a]
on = "http.request"
if = 'http.request.host == "a.test" && http.request.path.startsWith("/admin")'
decision = "block"
priority = 10

[security.rules.http.token]
on = "http.request"
if = 'http.request.host == "a.test" && http.request.path in ["/headers", "/reflect"]'
decision = "rewrite"
set_request_headers = { "x-api-token" = "${secret:NET_TEST_TOKEN}", "x-added" = "by-rule" }
remove_request_headers = ["x-remove-me"]

[security.rules.http.responses]
on = "http.response"
decision = "allow"

[security.rules.http.no_teapots]
on = "http.response"
if = 'http.response.status == 418'
decision = "block"
priority = 10

[security.rules.http.mark_a]
on = "http.response"
if = 'http.request.host == "a.test"'
decision = "rewrite"
set_response_headers = { "x-sandbox" = "seen" }
"#;

/// [`PROFILE`] for an upstream on `port`.
pub fn profile(port: u16) -> String {
    PROFILE.replace("UPSTREAM_PORT", &port.to_string())
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub db: Option<SessionDb>,
    pub db_path: PathBuf,
    pub recorder: Recorder,
    pub dns_fixture: TestDns,
    pub upstream_ca: TestCa,
    pub upstream: HttpsUpstream,
    pub handlers: Handlers,
    pub dns: Option<Server>,
    pub mitm: Option<Server>,
    pub guest: Guest,
}

impl Harness {
    /// Handlers allowed to reach 127.0.0.1 (where the upstream listens).
    pub async fn start() -> Harness {
        Self::start_with(|config| config.allowed_networks = vec!["127.0.0.1/32".parse().unwrap()]).await
    }

    pub async fn start_with(configure: impl FnOnce(&mut NetConfig)) -> Harness {
        Self::start_with_profile(configure, "").await
    }

    /// As [`Harness::start_with`], with `extra` appended to the profile
    /// (`UPSTREAM_PORT` in it is the upstream's port).
    pub async fn start_with_profile(configure: impl FnOnce(&mut NetConfig), extra: &str) -> Harness {
        Self::start_with_telemetry(configure, extra, TelemetryConfig::default()).await
    }

    /// As [`Harness::start_with_profile`], with telemetry settings.
    pub async fn start_with_telemetry(
        configure: impl FnOnce(&mut NetConfig),
        extra: &str,
        telemetry: TelemetryConfig,
    ) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let dns_fixture = TestDns::start(&[
            ("a.test", ip("127.0.0.1")),
            ("b.test", ip("127.0.0.1")),
            ("blocked.test", ip("127.0.0.1")),
            ("loop.test", ip("127.0.0.1")),
            ("down.test", ip("127.0.0.1")),
            ("untrusted.test", ip("127.0.0.1")),
            ("only443.test", ip("127.0.0.1")),
            ("pinned.test", ip("127.0.0.1")),
            ("ssh.test", ip("127.0.0.2")),
            ("models.test", ip("127.0.0.2")),
            ("sshblocked.test", ip("127.0.0.2")),
            ("metadata.test", ip("169.254.169.254")),
            ("private.test", ip("10.0.0.5")),
            ("mixed.test", ip("93.184.216.34")),
            ("mixed.test", ip("192.168.1.9")),
        ])
        .await
        .unwrap();
        let upstream_ca = TestCa::new("upstream test CA").unwrap();
        let upstream = HttpsUpstream::start(&upstream_ca, UPSTREAM_NAMES).await.unwrap();

        let mut config = NetConfig::default();
        config.dns_servers = vec![dns_fixture.addr()];
        config.system_roots = false;
        config.extra_root_files = vec![upstream_ca.write_pem(dir.path(), "upstream-ca.pem").unwrap()];
        config.handshake_timeout = Duration::from_secs(5);
        config.connect_timeout = Duration::from_secs(3);
        config.response_timeout = Duration::from_secs(5);
        config.dns_timeout = Duration::from_secs(2);
        configure(&mut config);

        let engine = Engine::builder()
            .secrets(Secrets::none().with_value("NET_TEST_TOKEN", SECRET_TOKEN))
            .profile(
                Layer::User,
                ProfileSource::Text {
                    name: "net-test.toml".into(),
                    text: (PROFILE.to_owned() + extra).replace("UPSTREAM_PORT", &upstream.addr().port().to_string()),
                },
            )
            .build()
            .unwrap();
        let db_path = SandboxDir::new(dir.path()).session_db();
        let db = SessionDb::open_with(&db_path, telemetry).unwrap();
        let recorder = db.recorder();
        let handlers = Handlers::new(config, Policy::new(engine), recorder.clone()).unwrap();
        let (dns, mitm) = handlers.serve_vsock_dir(dir.path()).unwrap();
        let guest = Guest::new(mitm.path(), handlers.ca().ca_cert_pem()).unwrap();
        Harness {
            dir,
            db: Some(db),
            db_path,
            recorder,
            dns_fixture,
            upstream_ca,
            upstream,
            handlers,
            dns: Some(dns),
            mitm: Some(mitm),
            guest,
        }
    }

    pub fn dns_socket(&self) -> PathBuf {
        SandboxDir::new(self.dir.path()).vsock_port_socket(DNS_PORT)
    }

    pub fn mitm_socket(&self) -> PathBuf {
        SandboxDir::new(self.dir.path()).vsock_port_socket(MITM_PORT)
    }

    /// The original destination the guest would announce for the upstream.
    pub fn upstream_addr(&self) -> SocketAddr {
        self.upstream.addr()
    }

    async fn rows(&self) -> Vec<LogRow> {
        self.recorder.flush().await.unwrap();
        let mut reader = LogReader::open(&self.db_path, &LogOptions::default()).unwrap();
        let mut rows = Vec::new();
        loop {
            let (mut batch, more) = reader.read_new().unwrap();
            rows.append(&mut batch);
            if !more {
                return rows;
            }
        }
    }

    /// Every `net_events` row so far.
    pub async fn net_rows(&self) -> Vec<NetRow> {
        self.rows().await.into_iter().filter_map(|r| if let LogRow::Net(n) = r { Some(n) } else { None }).collect()
    }

    /// Every `dns_events` row so far.
    pub async fn dns_rows(&self) -> Vec<DnsRow> {
        self.rows().await.into_iter().filter_map(|r| if let LogRow::Dns(d) = r { Some(d) } else { None }).collect()
    }

    /// Wait until `count` net rows exist (rows are written when bodies end,
    /// which can be just after the client saw the last byte).
    pub async fn wait_net_rows(&self, count: usize) -> Vec<NetRow> {
        for _ in 0..200 {
            let rows = self.net_rows().await;
            if rows.len() >= count {
                return rows;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.net_rows().await
    }

    /// Whether `text` occurs in session.db or its WAL (read while the
    /// handlers still run, after the queued rows are written).
    pub async fn db_files_contain(&self, text: &str) -> bool {
        self.recorder.flush().await.unwrap();
        let mut read = 0;
        let mut found = false;
        for file in [self.db_path.clone(), self.db_path.with_extension("db-wal")] {
            if let Ok(bytes) = std::fs::read(&file) {
                read += 1;
                found |= bytes.windows(text.len()).any(|w| w == text.as_bytes());
            }
        }
        assert!(read > 0, "no database file at {}", self.db_path.display());
        found
    }

    pub async fn shutdown(mut self) {
        if let Some(dns) = self.dns.take() {
            dns.shutdown().await;
        }
        if let Some(mitm) = self.mitm.take() {
            mitm.shutdown().await;
        }
        if let Some(db) = self.db.take() {
            db.close().await.unwrap();
        }
    }
}

/// An HTTP/1.1 guest connection to `sni` through the MITM at `destination`,
/// for many guests opening at once: a connect refused because the handler's
/// listen backlog is full (`EAGAIN` on a Unix socket, nothing sent yet) is
/// tried again until `deadline`. Also returns how many times it was retried.
pub async fn http1_when_accepted(
    guest: &Guest,
    sni: &str,
    destination: SocketAddr,
    deadline: tokio::time::Instant,
) -> Result<(hyper::client::conn::http1::SendRequest<GuestBody>, usize), String> {
    let mut retries = 0;
    loop {
        match guest.http1(sni, destination).await {
            Ok(sender) => return Ok((sender, retries)),
            Err(err) => {
                let backlog_full =
                    err.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::WouldBlock);
                if !backlog_full || tokio::time::Instant::now() >= deadline {
                    return Err(format!("connecting after {retries} retries: {err}"));
                }
                retries += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

pub fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// A TCP echo server on 127.0.0.2 (an ssh or database server stand-in),
/// counting its connections.
pub async fn echo_server() -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.2:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let accepted = count.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            accepted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut reader, mut writer) = stream.split();
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
            });
        }
    });
    (addr, count)
}

/// Rules added to [`PROFILE`] for the connection modes: `ssh.test` and
/// `sshblocked.test` (whose DNS is blocked) in `tcp` mode on `port`,
/// `pinned.test` in `passthrough` mode on the upstream's port, `models.test`
/// in `http` mode on `port` (paths under `/admin` blocked).
pub fn modes_profile(port: u16) -> String {
    format!(
        r#"
[security.rules.tcp.ssh]
on = "tcp.connect"
if = 'tcp.connect.host in ["ssh.test", "sshblocked.test"] && tcp.connect.port == {port}'
decision = "allow"
mode = "tcp"
priority = 10

[security.rules.tcp.pinned]
on = "tcp.connect"
if = 'tcp.connect.host == "pinned.test" && tcp.connect.port == UPSTREAM_PORT'
decision = "allow"
mode = "passthrough"
priority = 10

[security.rules.tcp.models]
on = "tcp.connect"
if = 'tcp.connect.host == "models.test" && tcp.connect.port == {port}'
decision = "allow"
mode = "http"
priority = 10

[security.rules.http.models]
on = "http.request"
if = 'http.request.host == "models.test" && http.request.port == {port} && !http.request.path.startsWith("/admin")'
decision = "allow"

[security.rules.dns.no_sshblocked]
on = "dns.request"
if = 'dns.request.qname == "sshblocked.test"'
decision = "block"
priority = 10
"#
    )
}
