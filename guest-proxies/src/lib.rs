//! Guest-side proxies: the guest's only ways to reach the network.
//!
//! Guest init redirects (nftables nat OUTPUT) every DNS packet to `dns-proxy`
//! and every TCP connection to port 443 to `net-proxy`, which run together in
//! one process, `sandbox-proxy`, on sockets init binds and passes to it. Both
//! forward what they receive to the host over vsock, where the DNS and MITM
//! handlers decide:
//!
//! - [`dns`]: UDP and TCP DNS on a local port, each query sent to the host as
//!   RFC 1035 TCP framing ([`guest_protocol::dns_framing`]) over one
//!   multiplexed connection (vsock port [`guest_protocol::ports::DNS_PORT`]).
//! - [`net`]: TCP on a local port; each connection becomes one host connection
//!   (vsock port [`guest_protocol::ports::MITM_PORT`]) that starts with a PROXY
//!   protocol v1 line ([`guest_protocol::proxy_header`]) naming the
//!   original destination, then carries the raw bytes both ways.
//! - [`upstream`]: where the host is: `vsock:CID:PORT` in the guest,
//!   `unix:PATH` when tests stand in for the host with a Unix socket.
//!
//! The guest kernel is slow at everything it does for user space (every
//! syscall and page fault is emulated on the test bed), so both proxies run on
//! a single-threaded tokio runtime: one process, one thread, no worker pool,
//! small buffers, and readiness through epoll, which tokio already wraps
//! portably and which a hand-written poll loop would only duplicate.

pub mod cert;
pub mod dns;
pub mod net;
pub mod upstream;

use std::io;

/// Errors at the crate boundary.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An `--upstream` value that is neither `vsock:CID:PORT` nor `unix:PATH`.
    #[error("invalid upstream {0:?}: expected vsock:CID:PORT or unix:PATH")]
    InvalidUpstream(String),
    /// Connecting to the host failed or timed out.
    #[error("connect to {upstream}: {source}")]
    Connect {
        /// The upstream as given.
        upstream: String,
        /// Why it failed.
        source: io::Error,
    },
    /// A socket operation on an established connection failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// Why it failed.
        source: io::Error,
    },
    /// Binding a local listening socket failed.
    #[error("listen on {addr}: {source}")]
    Listen {
        /// The address being bound.
        addr: std::net::SocketAddr,
        /// Why it failed.
        source: io::Error,
    },
}

/// Log to stderr (init forwards it to the console) at `level` and above.
pub fn init_logging(level: tracing::Level) {
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(false).with_max_level(level).init();
}
