//! The connection handler (vsock port [`MITM_PORT`](guest_protocol::ports::MITM_PORT)): every TCP connection the guest
//! opens to anything outside it arrives here, and nothing is sent anywhere
//! before it is decided.
//!
//! Per guest connection: read the PROXY v1 header (original destination) and
//! raise `tcp.connect` with the name the sandbox's DNS handler answered with
//! that address (none: empty host, only a rule naming `tcp.connect.ip` can
//! allow it) and the port. The allowing rule's mode says how the connection
//! is carried ([`splice`] for `tcp` and `passthrough`; `http` is plain HTTP
//! with every request decided as inside TLS); with no `tcp.connect`
//! rule matching, HTTPS (port 443) to a resolved name is inspected and
//! anything else is blocked.
//!
//! Inspection (the MITM): read the ClientHello and take its SNI (none:
//! blocked), present a leaf for that name
//! signed by the sandbox CA, and serve HTTP/1.1 (keep-alive, chunked, upgrades)
//! and HTTP/2 (many streams) with hyper. Each request is decided by the policy
//! and, if allowed, forwarded to the host the SNI names (resolved on the host)
//! over verified TLS, on the port from the header, which the policy saw as
//! `http.request.port` (only rules naming it allow a port other than 443);
//! see [`request`].
//!
//! Connections that fail before their first request (bad header, garbage, no
//! SNI, failed handshake, timeouts, refusals) get one telemetry row each; the
//! others get one row per request.

mod exchange;
mod redact;
mod request;
mod splice;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use policy::{ConnectMode, Decision, Event, Policy, TcpConnect, HTTPS_PORT};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use telemetry::{NetEvent, Outcome, Recorder};
use tokio::io::BufReader;
use tokio::net::UnixStream;
use tokio::time::{timeout_at, Instant};
use tokio_rustls::server::TlsStream;

use crate::bindings::Bindings;
use crate::ca::{LeafCache, SandboxCa};
use crate::client_hello::read_client_hello;
use crate::config::NetConfig;
use crate::error::Result;
use crate::idle::{Activity, Tracked};
use crate::proxy_header::{self, MAX_LEN};
use crate::server::ConnectionHandler;
use crate::upstream::{Upstream, UpstreamConnector};
use exchange::{CountedBody, Exchange};
use redact::SecretRedactor;
use request::Conn;

/// What the handler holds for a guest that stops reading (or for an upstream
/// that does), per connection:
///
/// - guest HTTP/2: at most [`H2_MAX_STREAMS`] streams, each holding at most
///   its send buffer ([`H2_SEND_BUFFER`]) plus two body chunks from upstream
///   (the one that went over the buffer, and the next, held until there is
///   room; a chunk is at most [`HTTP1_BUFFER`] from an HTTP/1.1 upstream, one
///   16 KiB frame from an HTTP/2 one): 100 × 192 KiB = 18.75 MiB; and at most
///   [`H2_CONNECTION_WINDOW`] of request bodies the upstream has not taken.
/// - guest HTTP/1.1: one [`HTTP1_BUFFER`] each way plus one chunk.
/// - upstream HTTP/2: at most [`H2_CONNECTION_WINDOW`] received and not yet
///   passed on ([`H2_STREAM_WINDOW`] per stream); upstream HTTP/1.1: one
///   [`HTTP1_BUFFER`]. Upstream connections are capped per sandbox.
const H2_MAX_STREAMS: u32 = 100;
const H2_SEND_BUFFER: usize = 64 * 1024;
const H2_STREAM_WINDOW: u32 = 256 * 1024;
const H2_CONNECTION_WINDOW: u32 = 1024 * 1024;
/// Read and write buffers of HTTP/1.1 connections, both legs (also the
/// largest response head an upstream may send).
const HTTP1_BUFFER: usize = 64 * 1024;

/// Rule recorded for a ClientHello without a usable server name.
pub const NO_SNI_RULE: &str = "builtin.no_sni";

/// The guest side of a connection once TLS is up.
type GuestStream = TlsStream<BufReader<Tracked<UnixStream>>>;

/// Serves guest TLS connections.
#[derive(Debug)]
pub(crate) struct MitmHandler {
    upstream: Arc<Upstream>,
    /// Pooled upstream connections for guests speaking HTTP/1.1 (offering
    /// http/1.1 only) and HTTP/2 (offering h2 first): the upstream leg speaks
    /// what the guest speaks whenever the upstream can.
    client_http1: Client<UpstreamConnector, CountedBody<Incoming>>,
    client_h2: Client<UpstreamConnector, CountedBody<Incoming>>,
    leaves: Arc<LeafCache>,
    tls: Arc<ServerConfig>,
    http: auto::Builder<TokioExecutor>,
    policy: Policy,
    /// The values of the secrets the policy injects.
    secrets: Arc<SecretRedactor>,
    recorder: Recorder,
    bindings: Arc<Bindings>,
    handshake_timeout: Duration,
    response_timeout: Duration,
    idle_timeout: Duration,
}

/// Leaves are looked up by the SNI rustls saw (the handler minted it just before).
impl ResolvesServerCert for LeafCache {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?.to_ascii_lowercase();
        self.get(&name).inspect_err(|err| tracing::error!(%err, name, "no leaf certificate")).ok()
    }
}

/// What is known about a connection that failed before its first request.
#[derive(Debug, Default)]
struct Setup {
    domain: String,
    port: Option<u16>,
    ip: Option<IpAddr>,
    mode: Option<ConnectMode>,
    sni: Option<String>,
}

/// Where a connection goes, as `tcp.connect` decided.
#[derive(Debug, Clone)]
pub(crate) struct Destination {
    /// The name the sandbox resolved the address from; empty if none.
    pub(crate) host: String,
    pub(crate) ip: IpAddr,
    pub(crate) port: u16,
    pub(crate) mode: ConnectMode,
    /// The rule that allowed it (`None`: HTTPS inspected by default).
    pub(crate) rule: Option<String>,
}

impl Destination {
    /// The name, or the address when there is none.
    pub(crate) fn label(&self) -> String {
        if self.host.is_empty() {
            self.ip.to_string()
        } else {
            self.host.clone()
        }
    }

    /// Put where the connection went, and how, into a row.
    pub(crate) fn describe(&self, event: &mut NetEvent) {
        event.port = Some(self.port);
        event.ip = Some(self.ip.to_string());
        event.mode = Some(self.mode.name().to_owned());
    }
}

/// Why a connection ended before its first request.
#[derive(Debug)]
struct SetupFailure {
    outcome: Outcome,
    rule: Option<String>,
    error: String,
}

impl SetupFailure {
    fn error(error: impl ToString) -> Self {
        Self { outcome: Outcome::Error, rule: None, error: error.to_string() }
    }
}

impl MitmHandler {
    pub(crate) fn new(
        upstream: Arc<Upstream>,
        ca: Arc<SandboxCa>,
        policy: Policy,
        recorder: Recorder,
        bindings: Arc<Bindings>,
        config: &NetConfig,
    ) -> Result<MitmHandler> {
        let leaves = Arc::new(LeafCache::new(ca));
        let mut tls = ServerConfig::builder_with_provider(Arc::new(crate::crypto_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(leaves.clone());
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

        let client = |http1_only| {
            Client::builder(TokioExecutor::new())
                .timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                // Idle pooled connections count against the sandbox's
                // upstream connection limit: keep few, not for long.
                .pool_idle_timeout(Duration::from_secs(30))
                .pool_max_idle_per_host(16)
                .http1_max_buf_size(HTTP1_BUFFER)
                .http2_initial_stream_window_size(H2_STREAM_WINDOW)
                .http2_initial_connection_window_size(H2_CONNECTION_WINDOW)
                .http2_max_send_buf_size(H2_SEND_BUFFER)
                .build(UpstreamConnector::new(upstream.clone(), http1_only))
        };

        let mut http = auto::Builder::new(TokioExecutor::new());
        http.http1().timer(TokioTimer::new()).keep_alive(true).half_close(true).max_buf_size(HTTP1_BUFFER);
        http.http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(H2_MAX_STREAMS)
            .max_send_buf_size(H2_SEND_BUFFER)
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW);

        Ok(MitmHandler {
            client_http1: client(true),
            client_h2: client(false),
            upstream,
            leaves,
            tls: Arc::new(tls),
            http,
            secrets: Arc::new(SecretRedactor::new(policy.engine().secret_values())),
            policy,
            recorder,
            bindings,
            handshake_timeout: config.handshake_timeout,
            response_timeout: config.response_timeout,
            idle_timeout: config.idle_timeout,
        })
    }

    /// The `tcp.connect` decision for a connection to `ip:port`, named `host`
    /// (the name the sandbox resolved the address from, or the SNI of an
    /// inspected connection; empty: none).
    async fn decide_connection(
        &self,
        host: String,
        ip: IpAddr,
        port: u16,
    ) -> std::result::Result<Destination, SetupFailure> {
        let event = Event::TcpConnect(TcpConnect { host: host.clone(), ip: Some(ip), port });
        let verdict = self.policy.decide(&event).await;
        let mode = match (verdict.decision, verdict.mode) {
            (Decision::Allow, mode) => mode.unwrap_or(ConnectMode::Inspect),
            // No tcp.connect rule: HTTPS to a name is inspected, and each
            // request is decided by the http rules.
            (_, _) if verdict.rule.is_none() && port == HTTPS_PORT && !host.is_empty() => ConnectMode::Inspect,
            _ => {
                let target = if host.is_empty() {
                    format!("{ip}:{port} (an address the sandbox did not resolve through its DNS)")
                } else {
                    format!("{host}:{port} ({ip})")
                };
                let error = match &verdict.rule {
                    Some(rule) => format!("connection to {target} blocked by sandbox policy rule {rule}"),
                    None => format!("connection to {target} blocked: no tcp.connect rule allows it"),
                };
                return Err(SetupFailure { outcome: Outcome::Denied, rule: verdict.rule, error });
            }
        };
        Ok(Destination { host, ip, port, mode, rule: verdict.rule })
    }

    /// ClientHello, leaf, TLS handshake. The upstream of an inspected
    /// connection is the name its SNI gives: when that is not the name the
    /// address was resolved for, `tcp.connect` decides again for the SNI,
    /// which must be inspected too.
    async fn accept_tls(
        &self,
        setup: &mut Setup,
        io: BufReader<Tracked<UnixStream>>,
        destination: &Destination,
    ) -> std::result::Result<(String, GuestStream), SetupFailure> {
        let (hello, start) = read_client_hello(io).await.map_err(SetupFailure::error)?;
        let Some(sni) = hello.sni else {
            return Err(SetupFailure {
                outcome: Outcome::Denied,
                rule: Some(NO_SNI_RULE.into()),
                error: "ClientHello has no server name (SNI)".into(),
            });
        };
        setup.domain = sni.clone();
        setup.sni = Some(sni.clone());
        if sni != destination.host {
            let named = self.decide_connection(sni.clone(), destination.ip, destination.port).await?;
            if named.mode != ConnectMode::Inspect {
                return Err(SetupFailure {
                    outcome: Outcome::Denied,
                    rule: named.rule,
                    error: format!("{sni} is allowed in {} mode only, and this connection is inspected", named.mode),
                });
            }
        }
        self.leaves.get(&sni).map_err(SetupFailure::error)?;
        let tls = start
            .into_stream(self.tls.clone())
            .await
            .map_err(|e| SetupFailure::error(format!("TLS handshake with the guest: {e}")))?;
        Ok((sni, tls))
    }

    /// Serve plain HTTP (`mode = "http"`), deciding each request as inside
    /// TLS; the Host must be the name the address was resolved for.
    async fn serve_http(
        self: Arc<Self>,
        started: SystemTime,
        setup: Setup,
        io: BufReader<Tracked<UnixStream>>,
        activity: Arc<Activity>,
        destination: Destination,
    ) {
        let conn = Arc::new(Conn::new(self.clone(), destination.label(), destination, false, activity.clone()));
        self.serve_requests(started, setup, TokioIo::new(io), conn, &activity).await;
    }

    /// Serve HTTP on `io` until the guest or the idle timeout ends it; a
    /// connection without a request gets a row of its own.
    async fn serve_requests<IO>(&self, started: SystemTime, setup: Setup, io: IO, conn: Arc<Conn>, activity: &Activity)
    where
        IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let requests = conn.requests.clone();
        let service = service_fn(move |req| {
            let conn = conn.clone();
            async move { Ok::<_, std::convert::Infallible>(conn.handle(req).await) }
        });
        let serving = self.http.serve_connection_with_upgrades(io, service);
        let ended = tokio::select! {
            served = serving => served.err().map(|e| e.to_string()),
            _ = activity.expired(self.idle_timeout) => Some(format!("idle for {:?}", self.idle_timeout)),
        };
        if requests.load(Ordering::Relaxed) == 0 {
            let error = ended.map_or_else(|| "closed without a request".to_owned(), |e| format!("no request: {e}"));
            self.record_setup(started, setup, SetupFailure::error(error));
        }
    }

    /// Serve HTTP inside the guest's TLS, deciding each request.
    async fn inspect(
        self: Arc<Self>,
        started: SystemTime,
        mut setup: Setup,
        io: BufReader<Tracked<UnixStream>>,
        deadline: Instant,
        activity: Arc<Activity>,
        destination: Destination,
    ) {
        let (sni, tls) = match timeout_at(deadline, self.accept_tls(&mut setup, io, &destination)).await {
            Ok(Ok(accepted)) => accepted,
            Ok(Err(failure)) => return self.record_setup(started, setup, failure),
            Err(_) => {
                let error = format!("no TLS handshake within {:?}", self.handshake_timeout);
                return self.record_setup(started, setup, SetupFailure::error(error));
            }
        };
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let conn = Arc::new(Conn::new(self.clone(), sni, destination, h2, activity.clone()));
        self.serve_requests(started, setup, TokioIo::new(tls), conn, &activity).await;
    }

    fn record_setup(&self, started: SystemTime, setup: Setup, failure: SetupFailure) {
        tracing::debug!(domain = %setup.domain, error = %failure.error, "guest connection ended without a request");
        let mut exchange = Exchange::new(self.recorder.clone(), started, setup.domain, setup.sni);
        exchange.event.port = setup.port;
        exchange.event.ip = setup.ip.map(|ip| ip.to_string());
        exchange.event.mode = setup.mode.map(|mode| mode.name().to_owned());
        exchange.decide(failure.outcome, failure.rule);
        exchange.event.error = Some(failure.error);
    }
}

impl ConnectionHandler for MitmHandler {
    async fn serve(self: Arc<Self>, stream: UnixStream) {
        let started = SystemTime::now();
        let activity = Activity::new();
        let mut setup = Setup::default();
        let deadline = Instant::now() + self.handshake_timeout;
        // The header is read through a small buffer so that little of what
        // follows is copied twice; the buffer stays in the stream.
        let mut io = BufReader::with_capacity(2 * MAX_LEN, Tracked::new(stream, activity.clone()));
        let header = match timeout_at(deadline, proxy_header::read(&mut io)).await {
            Ok(Ok(header)) => header,
            Ok(Err(err)) => return self.record_setup(started, setup, SetupFailure::error(err)),
            Err(_) => {
                let error = format!("no PROXY header within {:?}", self.handshake_timeout);
                return self.record_setup(started, setup, SetupFailure::error(error));
            }
        };
        let ip = header.destination.ip().to_canonical();
        let host = self.bindings.name_of(ip).unwrap_or_default();
        setup.domain = if host.is_empty() { ip.to_string() } else { host.clone() };
        setup.ip = Some(ip);
        setup.port = Some(header.destination.port());
        let destination = match self.decide_connection(host, ip, header.destination.port()).await {
            Ok(destination) => destination,
            Err(failure) => return self.record_setup(started, setup, failure),
        };
        // The handshake's own time starts after the decision (an ask may wait).
        let deadline = Instant::now() + self.handshake_timeout;
        setup.mode = Some(destination.mode);
        match destination.mode {
            ConnectMode::Inspect => self.inspect(started, setup, io, deadline, activity, destination).await,
            ConnectMode::Tcp => splice::tcp(&self, started, io, activity, destination).await,
            ConnectMode::Passthrough => {
                splice::passthrough(&self, started, setup, io, deadline, activity, destination).await
            }
            ConnectMode::Http => self.serve_http(started, setup, io, activity, destination).await,
        }
    }

    fn accepting(&self) -> bool {
        self.recorder.accept_new_connections()
    }

    fn refused(&self, reason: &str) {
        tracing::warn!(reason, "MITM connection refused");
        self.record_setup(
            SystemTime::now(),
            Setup::default(),
            SetupFailure::error(format!("connection refused: {reason}")),
        );
    }
}

/// Counts requests served on a connection.
pub(crate) type RequestCount = Arc<AtomicU64>;
