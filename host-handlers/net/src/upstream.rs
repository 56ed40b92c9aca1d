//! Reaching upstream on a guest's behalf: the shared DNS resolver, the address
//! guard, and TLS connections verified against the system roots plus configured
//! extra roots.
//!
//! An upstream connection always starts from a host name (the SNI the guest sent)
//! and resolves it on the host; the destination address the guest announced is
//! never dialled. Every resolved address is checked by the [`AddressGuard`], and
//! the address actually connected to is checked again before TLS starts. With
//! an upstream proxy configured, connections go through its `CONNECT` tunnels
//! (see [`crate::proxy`]) after the same resolution and checks.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{timeout_at, Instant};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::config::NetConfig;
use crate::error::{Error, Result};
use crate::guard::AddressGuard;
use crate::proxy::UpstreamProxy;

/// ALPN protocol ids offered to upstreams.
const ALPN_H2: &[u8] = b"h2";
const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Everything needed to reach upstream: shared by the DNS and MITM handlers of a sandbox.
#[derive(Debug)]
pub struct Upstream {
    resolver: TokioResolver,
    guard: AddressGuard,
    /// Offers h2 and http/1.1.
    tls_any: Arc<ClientConfig>,
    /// Offers http/1.1 only, for requests that upgrade the connection.
    tls_http1: Arc<ClientConfig>,
    connect_timeout: std::time::Duration,
    proxy: Option<UpstreamProxy>,
    /// One permit per open upstream connection.
    slots: Arc<Semaphore>,
    max_connections: usize,
    slot_wait: std::time::Duration,
}

impl Upstream {
    /// Build the resolver, guard and TLS client configuration from `config`.
    pub fn new(config: &NetConfig) -> Result<Upstream> {
        let roots = root_store(config)?;
        let mut tls = ClientConfig::builder_with_provider(Arc::new(crate::crypto_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut tls_http1 = tls.clone();
        tls_http1.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
        tls.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
        Ok(Upstream {
            resolver: build_resolver(config)?,
            guard: AddressGuard::new(config.allowed_networks.clone()),
            tls_any: Arc::new(tls),
            tls_http1: Arc::new(tls_http1),
            connect_timeout: config.connect_timeout,
            proxy: config.upstream_proxy.clone(),
            slots: Arc::new(Semaphore::new(config.max_upstream_connections.max(1))),
            max_connections: config.max_upstream_connections.max(1),
            slot_wait: config.upstream_connection_wait,
        })
    }

    /// The caching resolver used for guest queries and upstream connections.
    pub fn resolver(&self) -> &TokioResolver {
        &self.resolver
    }

    /// The address guard.
    pub fn guard(&self) -> &AddressGuard {
        &self.guard
    }

    /// Open a verified TLS connection to `host:port`. With `http1_only` the
    /// ALPN offer is http/1.1 alone (needed for protocol upgrades).
    /// The connection counts against the sandbox's upstream connection limit
    /// until it is dropped; at the limit this waits for one to close, at most
    /// the configured wait.
    pub async fn connect(&self, host: &str, port: u16, http1_only: bool) -> Result<UpstreamStream> {
        let slot = self.slot(host).await?;
        let deadline = Instant::now() + self.connect_timeout;
        let timed_out = || Error::ConnectTimeout { host: host.to_owned() };
        let tcp = timeout_at(deadline, self.dial(host, port)).await.map_err(|_| timed_out())??;
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| Error::Resolve { host: host.to_owned(), message: e.to_string() })?;
        let tls = if http1_only { &self.tls_http1 } else { &self.tls_any };
        let stream = timeout_at(deadline, TlsConnector::from(tls.clone()).connect(name, tcp))
            .await
            .map_err(|_| timed_out())?
            .map_err(|source| Error::UpstreamTls { host: host.to_owned(), source })?;
        Ok(UpstreamStream { io: UpstreamIo::Tls(Box::new(stream)), _slot: slot })
    }

    /// Open a plain TCP connection to `host:port` (resolved on the host, every
    /// address guarded), for connections spliced without inspection and for
    /// plain HTTP. It counts against the upstream connection limit as
    /// [`Upstream::connect`] does.
    pub async fn connect_tcp(&self, host: &str, port: u16) -> Result<UpstreamStream> {
        let slot = self.slot(host).await?;
        let deadline = Instant::now() + self.connect_timeout;
        let tcp = timeout_at(deadline, self.dial(host, port))
            .await
            .map_err(|_| Error::ConnectTimeout { host: host.to_owned() })??;
        Ok(UpstreamStream { io: UpstreamIo::Plain(tcp), _slot: slot })
    }

    /// Open a plain TCP connection to the address `ip` itself (a rule allowed
    /// it by address), if the address guard permits it.
    pub async fn connect_address(&self, ip: IpAddr, port: u16) -> Result<UpstreamStream> {
        let host = ip.to_string();
        if self.guard.check(ip).is_err() {
            return Err(Error::AddressRefused { host, refused: vec![ip] });
        }
        let slot = self.slot(&host).await?;
        let tcp =
            timeout_at(Instant::now() + self.connect_timeout, self.dial_address(&host, SocketAddr::new(ip, port)))
                .await
                .map_err(|_| Error::ConnectTimeout { host: host.clone() })??;
        Ok(UpstreamStream { io: UpstreamIo::Plain(tcp), _slot: slot })
    }

    /// A place under the sandbox's upstream connection limit, for one
    /// connection to `host`, held until dropped: every connection made on the
    /// guest's behalf takes one. At the limit, waits for one to be released,
    /// at most the configured wait.
    pub async fn slot(&self, host: &str) -> Result<OwnedSemaphorePermit> {
        match tokio::time::timeout(self.slot_wait, self.slots.clone().acquire_owned()).await {
            Ok(Ok(slot)) => Ok(slot),
            _ => {
                tracing::warn!(host, limit = self.max_connections, "upstream connection limit reached");
                Err(Error::UpstreamConnectionLimit {
                    host: host.to_owned(),
                    limit: self.max_connections,
                    waited: self.slot_wait,
                })
            }
        }
    }

    /// Resolve `host` and connect to the first permitted address that answers.
    async fn dial(&self, host: &str, port: u16) -> Result<TcpStream> {
        let resolve_error = |message: String| Error::Resolve { host: host.to_owned(), message };
        let fqdn = format!("{}.", host.trim_end_matches('.'));
        let lookup = self.resolver.lookup_ip(fqdn.as_str()).await.map_err(|e| resolve_error(e.to_string()))?;
        let (permitted, refused): (Vec<IpAddr>, Vec<IpAddr>) =
            lookup.iter().partition(|ip| self.guard.check(*ip).is_ok());
        if permitted.is_empty() {
            if refused.is_empty() {
                return Err(resolve_error("no addresses".into()));
            }
            return Err(Error::AddressRefused { host: host.to_owned(), refused });
        }
        let mut last_error = None;
        for ip in permitted {
            match self.dial_address(host, SocketAddr::new(ip, port)).await {
                Ok(stream) => return Ok(stream),
                Err(err @ Error::AddressRefused { .. }) => return Err(err),
                Err(err) => last_error = Some(err),
            }
        }
        Err(last_error.unwrap_or_else(|| resolve_error("no addresses".into())))
    }

    /// Connect to a checked address of `host`: directly, or through the
    /// upstream proxy. The proxy is asked for the address, not the name: a
    /// proxy inside a corporate network resolving the name again could be
    /// steered to an internal address nothing checked.
    async fn dial_address(&self, host: &str, addr: SocketAddr) -> Result<TcpStream> {
        if let Some(proxy) = &self.proxy {
            return proxy.connect(&addr.to_string()).await;
        }
        let stream = TcpStream::connect(addr).await.map_err(|source| Error::Connect { addr, source })?;
        let peer = stream.peer_addr().map_err(|source| Error::Connect { addr, source })?;
        if self.guard.check(peer.ip()).is_err() {
            return Err(Error::AddressRefused { host: host.to_owned(), refused: vec![peer.ip()] });
        }
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

fn root_store(config: &NetConfig) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    if config.system_roots {
        let native = rustls_native_certs::load_native_certs();
        for err in &native.errors {
            tracing::warn!(%err, "system root certificates");
        }
        let (added, ignored) = roots.add_parsable_certificates(native.certs);
        tracing::debug!(added, ignored, "system root certificates loaded");
    }
    for path in &config.extra_root_files {
        let text = std::fs::read(path).map_err(|source| Error::File { path: path.clone(), source })?;
        let certs = rustls_pemfile::certs(&mut text.as_slice())
            .collect::<io::Result<Vec<CertificateDer<'static>>>>()
            .map_err(|e| Error::Roots(format!("{}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(Error::Roots(format!("{}: no PEM certificate", path.display())));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| Error::Roots(format!("{}: {e}", path.display())))?;
        }
    }
    if roots.is_empty() {
        return Err(Error::Roots("no root certificate to verify upstreams with".into()));
    }
    Ok(roots)
}

fn build_resolver(config: &NetConfig) -> Result<TokioResolver> {
    let (resolver_config, mut opts) = if config.dns_servers.is_empty() {
        hickory_resolver::system_conf::read_system_conf()
            .map_err(|e| Error::Resolver(format!("/etc/resolv.conf: {e}")))?
    } else {
        let servers = config
            .dns_servers
            .iter()
            .map(|addr| {
                let mut server = NameServerConfig::udp_and_tcp(addr.ip());
                server.connections = [ConnectionConfig::udp(), ConnectionConfig::tcp()]
                    .into_iter()
                    .map(|mut c| {
                        c.port = addr.port();
                        c
                    })
                    .collect();
                server
            })
            .collect();
        (ResolverConfig::from_name_servers(servers), ResolverOpts::default())
    };
    // Guests send fully qualified names; the host's hosts file and search
    // domains are the host's business, not the guest's.
    opts.use_hosts_file = ResolveHosts::Never;
    opts.ndots = 0;
    opts.timeout = config.dns_timeout;
    opts.preserve_intermediates = true;
    opts.cache_size = 8192;
    let resolver_config = ResolverConfig::from_name_servers(resolver_config.name_servers().to_vec());
    hickory_resolver::Resolver::builder_with_config(resolver_config, TokioRuntimeProvider::default())
        .with_options(opts)
        .build()
        .map_err(|e| Error::Resolver(e.to_string()))
}

/// A connection to an upstream: verified TLS, or plain TCP for `http://`.
#[derive(Debug)]
pub struct UpstreamStream {
    io: UpstreamIo,
    /// Its place under the sandbox's upstream connection limit.
    _slot: OwnedSemaphorePermit,
}

/// What an [`UpstreamStream`] carries.
#[derive(Debug)]
enum UpstreamIo {
    /// `https://`: TLS verified against the configured roots.
    Tls(Box<TlsStream<TcpStream>>),
    /// `http://` (a rule's `mode = "http"`), and spliced connections.
    Plain(TcpStream),
}

impl UpstreamStream {
    /// Whether the upstream chose HTTP/2.
    pub fn is_h2(&self) -> bool {
        match &self.io {
            UpstreamIo::Tls(tls) => tls.get_ref().1.alpn_protocol() == Some(ALPN_H2),
            UpstreamIo::Plain(_) => false,
        }
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            UpstreamIo::Tls(tls) => Pin::new(tls).poll_read(cx, buf),
            UpstreamIo::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            UpstreamIo::Tls(tls) => Pin::new(tls).poll_write(cx, buf),
            UpstreamIo::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            UpstreamIo::Tls(tls) => Pin::new(tls).poll_flush(cx),
            UpstreamIo::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            UpstreamIo::Tls(tls) => Pin::new(tls).poll_shutdown(cx),
            UpstreamIo::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            UpstreamIo::Tls(tls) => Pin::new(tls).poll_write_vectored(cx, bufs),
            UpstreamIo::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match &self.io {
            UpstreamIo::Tls(tls) => tls.is_write_vectored(),
            UpstreamIo::Plain(tcp) => tcp.is_write_vectored(),
        }
    }
}

impl Connection for UpstreamStream {
    fn connected(&self) -> Connected {
        if self.is_h2() {
            Connected::new().negotiated_h2()
        } else {
            Connected::new()
        }
    }
}

/// The connector of a pooled upstream HTTP client: `https://host:port` URIs
/// become [`Upstream::connect`] calls, offering http/1.1 alone or h2 first;
/// `http://host:port` URIs plain [`Upstream::connect_tcp`] connections.
#[derive(Debug, Clone)]
pub struct UpstreamConnector {
    upstream: Arc<Upstream>,
    http1_only: bool,
}

impl UpstreamConnector {
    pub fn new(upstream: Arc<Upstream>, http1_only: bool) -> Self {
        Self { upstream, http1_only }
    }
}

impl tower_service::Service<Uri> for UpstreamConnector {
    type Response = TokioIo<UpstreamStream>;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let upstream = self.upstream.clone();
        let http1_only = self.http1_only;
        Box::pin(async move {
            let host = uri.host().unwrap_or_default().to_owned();
            if uri.scheme_str() == Some("http") {
                let port = uri.port_u16().unwrap_or(80);
                return upstream.connect_tcp(&host, port).await.map(TokioIo::new);
            }
            let port = uri.port_u16().unwrap_or(443);
            upstream.connect(&host, port, http1_only).await.map(TokioIo::new)
        })
    }
}
