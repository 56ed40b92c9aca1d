//! The crate's error type.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

/// Everything that can go wrong in the handlers, from setup to one connection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file.
    #[error("{path}: {source}")]
    File { path: PathBuf, source: io::Error },
    /// The sandbox CA on disk is unusable.
    #[error("sandbox CA {path}: {message}")]
    Ca { path: PathBuf, message: String },
    /// Generating a key or certificate.
    #[error("certificate generation: {0}")]
    Certificate(#[from] rcgen::Error),
    /// Building a TLS configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// No usable root certificate for upstream connections.
    #[error("upstream root certificates: {0}")]
    Roots(String),
    /// The upstream DNS configuration (resolv.conf or configured servers).
    #[error("DNS resolver configuration: {0}")]
    Resolver(String),
    /// Binding the Unix socket a handler serves on.
    #[error("cannot listen on {path}: {source}")]
    Listen { path: PathBuf, source: io::Error },
    /// The PROXY protocol v1 line in front of a guest connection.
    #[error(transparent)]
    ProxyHeader(#[from] guest_protocol::ProtocolError),
    /// The guest did not start with a usable TLS ClientHello.
    #[error("no TLS ClientHello: {0}")]
    ClientHello(io::Error),
    /// A DNS message from the guest that cannot be answered normally.
    #[error("malformed DNS message: {0}")]
    DnsMessage(String),
    /// The upstream name did not resolve to any address.
    #[error("cannot resolve {host}: {message}")]
    Resolve { host: String, message: String },
    /// Every address of the upstream is in a range the guest may not reach.
    #[error("{host} resolves only to refused addresses ({})", format_addrs(refused))]
    AddressRefused { host: String, refused: Vec<IpAddr> },
    /// The upstream proxy did not open a tunnel.
    #[error("upstream proxy {proxy}, tunnel to {target}: {message}")]
    Proxy { proxy: String, target: String, message: String },
    /// TCP connection to the upstream failed.
    #[error("connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    /// The upstream did not accept the connection in time.
    #[error("connect to {host} timed out")]
    ConnectTimeout { host: String },
    /// The TLS handshake with the upstream failed (includes untrusted certificates).
    #[error("TLS with {host}: {source}")]
    UpstreamTls { host: String, source: io::Error },
    /// The sandbox already has its most upstream connections open, and none
    /// closed while the request waited.
    #[error(
        "no upstream connection for {host}: the sandbox's {limit} upstream connections stayed in use for {waited:?}"
    )]
    UpstreamConnectionLimit { host: String, limit: usize, waited: std::time::Duration },
}

fn format_addrs(addrs: &[IpAddr]) -> String {
    addrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
