//! `net-proxy`: hands every redirected guest TCP connection to the host.
//!
//! nftables redirects guest TCP connections here (port 443 anywhere, and any
//! port leaving through dummy0). For each accepted
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

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::upstream::Upstream;
use crate::Error;

/// Where guest init points it (nat redirects the guest's outgoing TCP here).
pub const LISTEN_PORT: u16 = 10443;
/// The host's MITM handler's vsock port.
pub const HOST_PORT: u32 = 5002;

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
    let destination = match original_destination(&client) {
        Ok(destination) => destination,
        Err(err) => {
            let local = client.local_addr().map_err(|source| Error::Io { context: "local address", source })?;
            warn!(%peer, "no original destination ({err}), using the local address {local}");
            local
        }
    };
    let mut host = upstream.connect().await?;
    host.write_all(proxy_header(peer, destination).as_bytes())
        .await
        .map_err(|source| Error::Io { context: "send the PROXY header", source })?;
    tokio::io::copy_bidirectional_with_sizes(&mut client, &mut host, TO_HOST_BUFFER, TO_GUEST_BUFFER)
        .await
        .map_err(|source| Error::Io { context: "relay", source })
}

/// The PROXY protocol v1 line for a connection from `source` to `destination`:
/// `PROXY TCP4 <src ip> <dst ip> <src port> <dst port>\r\n` (TCP6, with IPv4
/// addresses mapped, if either address is IPv6).
pub fn proxy_header(source: SocketAddr, destination: SocketAddr) -> String {
    let (source_ip, destination_ip) = (source.ip().to_canonical(), destination.ip().to_canonical());
    let (sport, dport) = (source.port(), destination.port());
    match (source_ip, destination_ip) {
        (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => format!("PROXY TCP4 {s} {d} {sport} {dport}\r\n"),
        (s, d) => {
            let v6 = |ip: std::net::IpAddr| match ip {
                std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                std::net::IpAddr::V6(v6) => v6,
            };
            format!("PROXY TCP6 {} {} {sport} {dport}\r\n", v6(s), v6(d))
        }
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

    #[test]
    fn header_for_ipv4() {
        let h = proxy_header("10.0.0.1:40000".parse().unwrap(), "93.184.216.34:443".parse().unwrap());
        assert_eq!(h, "PROXY TCP4 10.0.0.1 93.184.216.34 40000 443\r\n");
    }

    #[test]
    fn header_for_mapped_and_ipv6_addresses() {
        let mapped = proxy_header("[::ffff:10.0.0.1]:1".parse().unwrap(), "[::ffff:1.2.3.4]:443".parse().unwrap());
        assert_eq!(mapped, "PROXY TCP4 10.0.0.1 1.2.3.4 1 443\r\n");
        let v6 = proxy_header("[fd00::1]:65535".parse().unwrap(), "1.2.3.4:443".parse().unwrap());
        assert_eq!(v6, "PROXY TCP6 fd00::1 ::ffff:1.2.3.4 65535 443\r\n");
    }

    #[test]
    fn longest_header_fits_the_spec_limit() {
        let v4 = proxy_header("255.255.255.255:65535".parse().unwrap(), "255.255.255.255:65535".parse().unwrap());
        let v6 = proxy_header(
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535".parse().unwrap(),
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535".parse().unwrap(),
        );
        assert!(v4.len() <= 107 && v6.len() <= 107, "{} {}", v4.len(), v6.len());
    }
}
