//! `net-proxy`: redirected TCP connections, relayed to the host with a PROXY
//! protocol v1 header. See [`guest_proxies::net`].

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::Context;
use clap::Parser;
use guest_protocol::ports::{HOST_CID, MITM_PORT, NET_PROXY_PORT};
use guest_proxies::upstream::Upstream;
use guest_proxies::{net, Error};
use tokio::net::TcpListener;

/// Relay the guest's redirected TCP connections to the host's MITM handler.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address of the TCP listener.
    #[arg(long, default_value_t = SocketAddr::from((Ipv4Addr::LOCALHOST, NET_PROXY_PORT)))]
    listen: SocketAddr,
    /// The host's MITM handler: vsock:CID:PORT or unix:PATH.
    #[arg(long, default_value_t = Upstream::Vsock { cid: HOST_CID, port: MITM_PORT })]
    upstream: Upstream,
    /// Least severe log level shown (error, warn, info, debug, trace).
    #[arg(long, default_value_t = tracing::Level::INFO)]
    log_level: tracing::Level,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    guest_proxies::init_logging(args.log_level);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("start the runtime")?;
    runtime.block_on(async {
        let listener =
            TcpListener::bind(args.listen).await.map_err(|source| Error::Listen { addr: args.listen, source })?;
        tracing::info!(listen = %args.listen, upstream = %args.upstream, "net-proxy ready");
        net::serve(listener, args.upstream).await;
        Ok(())
    })
}
