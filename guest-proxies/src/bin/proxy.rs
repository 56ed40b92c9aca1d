//! `sandbox-proxy`: dns-proxy ([`guest_proxies::dns`]) and net-proxy
//! ([`guest_proxies::net`]) in one process on one thread.
//!
//! Init starts it at boot, with the listening sockets already bound
//! (`--inherited-sockets`): one program to start instead of two, which
//! matters where every process start and first page fault runs through
//! emulated guest kernel code, and nothing the guest sends before the proxy
//! runs is refused. It tells init when it serves them (descriptor 6).

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use guest_protocol::ports::{
    DNS_PORT, DNS_PROXY_PORT, DNS_TCP_SOCKET_FD, DNS_UDP_SOCKET_FD, HOST_CID, MITM_PORT, NET_PROXY_PORT, NET_SOCKET_FD,
    PROXY_READY_FD,
};
use guest_proxies::upstream::Upstream;
use guest_proxies::{dns, net, Error};
use nix::sys::socket::{getsockopt, sockopt, SockType};
use tokio::net::{TcpListener, UdpSocket};

/// Forward the guest's DNS queries to the host's DNS handler, and relay its
/// redirected TCP connections to the host's MITM handler.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Take the listening sockets from init instead of binding them: the
    /// descriptors 3 (DNS over UDP), 4 (DNS over TCP) and 5 (connections);
    /// once they are served, write a byte to descriptor 6.
    #[arg(long)]
    inherited_sockets: bool,
    /// Address of the DNS listeners (UDP and TCP), unless inherited.
    #[arg(long, default_value_t = SocketAddr::from((Ipv4Addr::LOCALHOST, DNS_PROXY_PORT)))]
    dns_listen: SocketAddr,
    /// The host's DNS handler: vsock:CID:PORT or unix:PATH.
    #[arg(long, default_value_t = Upstream::Vsock { cid: HOST_CID, port: DNS_PORT })]
    dns_upstream: Upstream,
    /// Milliseconds to wait for the host's answer before answering SERVFAIL.
    #[arg(long, default_value_t = dns::DEFAULT_TIMEOUT.as_millis() as u64)]
    dns_timeout_ms: u64,
    /// Address of the connection listener, unless inherited.
    #[arg(long, default_value_t = SocketAddr::from((Ipv4Addr::LOCALHOST, NET_PROXY_PORT)))]
    net_listen: SocketAddr,
    /// The host's MITM handler: vsock:CID:PORT or unix:PATH.
    #[arg(long, default_value_t = Upstream::Vsock { cid: HOST_CID, port: MITM_PORT })]
    net_upstream: Upstream,
    /// Least severe log level shown (error, warn, info, debug, trace).
    #[arg(long, default_value_t = tracing::Level::INFO)]
    log_level: tracing::Level,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    guest_proxies::init_logging(args.log_level);
    // Before anything else opens a descriptor, which could land on a free one of 3 to 6.
    let inherited = args.inherited_sockets.then(take_inherited).transpose()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("start the runtime")?;
    runtime.block_on(async {
        let (udp, dns_tcp, net_tcp, ready) = match inherited {
            Some(Inherited { udp, dns_tcp, net_tcp, ready }) => (
                UdpSocket::from_std(udp)?,
                TcpListener::from_std(dns_tcp)?,
                TcpListener::from_std(net_tcp)?,
                Some(ready),
            ),
            None => {
                let dns = |source| Error::Listen { addr: args.dns_listen, source };
                let net = |source| Error::Listen { addr: args.net_listen, source };
                (
                    UdpSocket::bind(args.dns_listen).await.map_err(dns)?,
                    TcpListener::bind(args.dns_listen).await.map_err(dns)?,
                    TcpListener::bind(args.net_listen).await.map_err(net)?,
                    None,
                )
            }
        };
        tracing::info!(
            dns = %udp.local_addr()?,
            dns_upstream = %args.dns_upstream,
            net = %net_tcp.local_addr()?,
            net_upstream = %args.net_upstream,
            "sandbox-proxy ready"
        );
        if let Some(ready) = ready {
            // One byte, then closed: init learns that the sockets are served.
            (&ready).write_all(b"r").context("tell init that the proxy serves")?;
        }
        tokio::join!(
            dns::serve(udp, dns_tcp, args.dns_upstream, Duration::from_millis(args.dns_timeout_ms)),
            net::serve(net_tcp, args.net_upstream),
        );
        Ok(())
    })
}

/// What init passes: the listening sockets (non-blocking for the runtime)
/// and the pipe on which to say that they are served.
struct Inherited {
    udp: std::net::UdpSocket,
    dns_tcp: std::net::TcpListener,
    net_tcp: std::net::TcpListener,
    ready: std::fs::File,
}

fn take_inherited() -> anyhow::Result<Inherited> {
    let udp = std::net::UdpSocket::from(inherited_socket(DNS_UDP_SOCKET_FD, SockType::Datagram)?);
    let dns_tcp = std::net::TcpListener::from(inherited_socket(DNS_TCP_SOCKET_FD, SockType::Stream)?);
    let net_tcp = std::net::TcpListener::from(inherited_socket(NET_SOCKET_FD, SockType::Stream)?);
    for set in [udp.set_nonblocking(true), dns_tcp.set_nonblocking(true), net_tcp.set_nonblocking(true)] {
        set.context("make an inherited socket non-blocking")?;
    }
    let ready = std::fs::File::from(inherited_fd(PROXY_READY_FD)?);
    Ok(Inherited { udp, dns_tcp, net_tcp, ready })
}

/// Take descriptor `raw`, which init passed, if it is open.
fn inherited_fd(raw: RawFd) -> anyhow::Result<OwnedFd> {
    // SAFETY: F_GETFD only reads the descriptor's flags; a descriptor that
    // is not open gives -1.
    if unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
        bail!("descriptor {raw} is not open: was this started by init with its sockets?");
    }
    // SAFETY: the descriptor is open and, by contract with init, this
    // process's, and nothing else in it uses it; callers check what it is
    // before use.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Take descriptor `raw`, which init passed bound (and, for a stream socket,
/// listening), after checking that it is a socket of the `expected` type.
fn inherited_socket(raw: RawFd, expected: SockType) -> anyhow::Result<OwnedFd> {
    let fd = inherited_fd(raw)?;
    let kind = getsockopt(&fd, sockopt::SockType).with_context(|| format!("descriptor {raw} is not a socket"))?;
    if kind != expected {
        bail!("descriptor {raw} is a {kind:?} socket, expected {expected:?}");
    }
    if expected == SockType::Stream && !getsockopt(&fd, sockopt::AcceptConn).context("read SO_ACCEPTCONN")? {
        bail!("descriptor {raw} is not listening");
    }
    Ok(fd)
}
