//! `net-proxy`: hands every redirected guest TCP connection to the host.
//!
//! nftables redirects guest TCP connections here
//! ([`NET_PROXY_PORT`](guest_protocol::ports::NET_PROXY_PORT): port 443
//! anywhere, and any port leaving through dummy0). For each accepted
//! connection the proxy reads the address the guest program meant to reach
//! (`SO_ORIGINAL_DST`, kept by conntrack), opens a connection to the host's
//! MITM handler, writes one PROXY protocol v1 line naming the client and that
//! destination, and then copies bytes both ways. EOF in one direction becomes
//! `shutdown(Write)` on the other side while the other direction carries on
//! (TLS close_notify and HTTP/1.0-style requests depend on this); both sockets
//! are closed once both directions are done.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::time::Duration;

use guest_protocol::proxy_header::ProxyHeader;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::upstream::Upstream;
use crate::Error;

/// Relay buffers, per direction. Each read takes what has arrived up to
/// this size and goes out as one write: where guest kernel code is costly
/// (emulated), every extra system call, TCP segment and ACK counts, and
/// responses are the large direction.
const TO_HOST_BUFFER: usize = 64 * 1024;
const TO_GUEST_BUFFER: usize = 256 * 1024;

/// Pause after a failed accept (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Accept connections forever, relaying each to `upstream`.
pub async fn serve(listener: TcpListener, upstream: Upstream) {
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    match relay(client, peer, &upstream).await {
                        Ok((sent, received)) => debug!(%peer, sent, received, "connection done"),
                        Err(err @ Error::Connect { .. }) => warn!(%peer, "{err}"),
                        Err(err) => debug!(%peer, "{err}"),
                    }
                });
            }
            Err(err) => {
                warn!("tcp accept: {err}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Relay one accepted connection from `peer`. Returns the bytes copied to the
/// host and back.
pub async fn relay(mut client: TcpStream, peer: SocketAddr, upstream: &Upstream) -> Result<(u64, u64), Error> {
    no_delay(&client);
    let destination = match original_destination(&client) {
        Ok(destination) => destination,
        Err(err) => {
            let local = client.local_addr().map_err(|source| Error::Io { context: "local address", source })?;
            warn!(%peer, "no original destination ({err}), using the local address {local}");
            local
        }
    };
    let mut host = upstream.connect().await?;
    host.write_all(ProxyHeader::new(peer, destination).to_string().as_bytes())
        .await
        .map_err(|source| Error::Io { context: "send the PROXY header", source })?;
    tokio::io::copy_bidirectional_with_sizes(&mut client, &mut host, TO_HOST_BUFFER, TO_GUEST_BUFFER)
        .await
        .map_err(|source| Error::Io { context: "relay", source })
}

/// Turn off Nagle's algorithm on the guest program's connection. The relay
/// writes what the host sent as soon as it arrives, often a response in more
/// than one piece (TLS records, HTTP head then body); with Nagle a piece
/// that follows unacknowledged data waits for the program's ACK, which a
/// delayed-ACK client holds back for up to 40 ms: small keep-alive requests
/// would see tens of milliseconds added. Buffering is already done by the
/// relay's large reads.
fn no_delay(client: &TcpStream) {
    if let Err(err) = client.set_nodelay(true) {
        debug!("TCP_NODELAY on the guest connection: {err}");
    }
}

/// The destination of a redirected connection before nat rewrote it.
pub fn original_destination(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    let mut addr =
        libc::sockaddr_in { sin_family: 0, sin_port: 0, sin_addr: libc::in_addr { s_addr: 0 }, sin_zero: [0; 8] };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: the descriptor is open for as long as `stream` is borrowed, and
    // the kernel writes at most `len` bytes to `addr`, a sockaddr_in of that size.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_IP,
            libc::SO_ORIGINAL_DST,
            (&raw mut addr).cast::<libc::c_void>(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if i32::from(addr.sin_family) != libc::AF_INET {
        return Err(std::io::Error::other(format!("address family {}", addr.sin_family)));
    }
    let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
    Ok(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(addr.sin_port))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_send_without_nagle_delay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _program = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(!accepted.nodelay().unwrap(), "the kernel default changed; this test no longer shows anything");
        no_delay(&accepted);
        assert!(accepted.nodelay().unwrap());
    }
}
