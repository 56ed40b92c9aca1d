//! `dns-proxy`: UDP and TCP DNS on a local port, forwarded to the host.
//! See [`guest_proxies::dns`].

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use guest_protocol::ports::{DNS_PORT, DNS_PROXY_PORT, HOST_CID};
use guest_proxies::upstream::Upstream;
use guest_proxies::{dns, Error};
use tokio::net::{TcpListener, UdpSocket};

/// Forward the guest's DNS queries to the host's DNS handler.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address of the UDP and TCP listeners.
    #[arg(long, default_value_t = SocketAddr::from((Ipv4Addr::LOCALHOST, DNS_PROXY_PORT)))]
    listen: SocketAddr,
    /// The host's DNS handler: vsock:CID:PORT or unix:PATH.
    #[arg(long, default_value_t = Upstream::Vsock { cid: HOST_CID, port: DNS_PORT })]
    upstream: Upstream,
    /// Milliseconds to wait for the host's answer before answering SERVFAIL.
    #[arg(long, default_value_t = dns::DEFAULT_TIMEOUT.as_millis() as u64)]
    timeout_ms: u64,
    /// Least severe log level shown (error, warn, info, debug, trace).
    #[arg(long, default_value_t = tracing::Level::INFO)]
    log_level: tracing::Level,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    guest_proxies::init_logging(args.log_level);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("start the runtime")?;
    runtime.block_on(async {
        let listen = |source| Error::Listen { addr: args.listen, source };
        let udp = UdpSocket::bind(args.listen).await.map_err(listen)?;
        let tcp = TcpListener::bind(args.listen).await.map_err(listen)?;
        tracing::info!(listen = %args.listen, upstream = %args.upstream, "dns-proxy ready");
        dns::serve(udp, tcp, args.upstream, Duration::from_millis(args.timeout_ms)).await;
        Ok(())
    })
}
