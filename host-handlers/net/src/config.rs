//! Configuration of the handlers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

use crate::proxy::UpstreamProxy;

/// How the DNS and MITM handlers of one sandbox reach upstream. Start from
/// `NetConfig::default()` and set the fields you need (more may come).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct NetConfig {
    /// Upstream DNS servers (UDP with TCP fallback). Empty: the host's `/etc/resolv.conf`.
    pub dns_servers: Vec<SocketAddr>,
    /// Trust the host's system root certificates for upstream TLS.
    pub system_roots: bool,
    /// PEM files of additional root certificates trusted for upstream TLS.
    pub extra_root_files: Vec<PathBuf>,
    /// Networks a guest may reach although they are loopback, link-local,
    /// private or host-owned (for example `127.0.0.1/32` for a local upstream).
    /// They also let such addresses through in DNS answers.
    pub allowed_networks: Vec<IpNet>,
    /// Where the sandbox CA comes from. `None` (the default): a fresh CA for
    /// each sandbox, generated in memory ([`crate::SandboxCa::generate`]), its key
    /// never written anywhere. `Some(dir)`: the persistent CA in `dir`,
    /// created on first use and shared by every sandbox given that directory
    /// ([`crate::SandboxCa::load_or_create`]), for embedders and tests that pin one.
    pub ca_dir: Option<PathBuf>,
    /// Time for a guest to send the PROXY header and complete the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time to resolve, connect to and complete TLS with an upstream.
    pub connect_timeout: Duration,
    /// Time for an upstream to start its response (then 504).
    pub response_timeout: Duration,
    /// A guest connection with no bytes moving either way for this long is closed.
    pub idle_timeout: Duration,
    /// Time for one upstream DNS attempt.
    pub dns_timeout: Duration,
    /// Most guest connections served at once per handler; more are closed.
    pub max_connections: usize,
    /// An HTTP proxy every upstream connection goes through (`CONNECT`).
    pub upstream_proxy: Option<UpstreamProxy>,
    /// Most upstream (TLS over TCP) connections the sandbox's MITM handler
    /// keeps open at once, idle pooled ones included.
    pub max_upstream_connections: usize,
    /// How long a request that needs a new upstream connection waits for one
    /// to close when [`NetConfig::max_upstream_connections`] are open (then 503).
    pub upstream_connection_wait: Duration,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            dns_servers: Vec::new(),
            system_roots: true,
            extra_root_files: Vec::new(),
            allowed_networks: Vec::new(),
            ca_dir: None,
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(300),
            dns_timeout: Duration::from_secs(5),
            max_connections: 1024,
            upstream_proxy: None,
            max_upstream_connections: 256,
            upstream_connection_wait: Duration::from_secs(10),
        }
    }
}
