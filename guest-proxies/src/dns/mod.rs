//! `dns-proxy`: the guest's DNS server, which only forwards to the host.
//!
//! Guest programs send DNS to port 53 anywhere; nftables redirects it to this
//! proxy ([`DNS_PROXY_PORT`](guest_protocol::ports::DNS_PROXY_PORT)). Each query, UDP or TCP, is checked ([`wire::Query::parse`]) and sent
//! to the host's DNS handler over the shared [`link::HostLink`]. Every query
//! that can be answered is answered: with the host's answer (truncated with TC
//! for UDP clients when it does not fit), SERVFAIL when the host does not
//! answer in time or answers nonsense, FORMERR when the query is malformed.
//!
//! Listen on 127.0.0.1, not 0.0.0.0: the nat redirect delivers queries to
//! 127.0.0.1, and a UDP socket bound to the wildcard address would answer from
//! the address its route to the client prefers (10.0.0.1 for a guest client),
//! which conntrack would not translate back, and resolvers discard answers
//! from an address they did not ask.

pub mod link;
pub mod wire;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use guest_protocol::dns_framing::{self, push_frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use self::link::HostLink;
use self::wire::{Query, Rejected};
use crate::upstream::Upstream;

/// How long the host has to answer before the client gets SERVFAIL.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

/// A TCP client idle this long, between or within queries, is disconnected.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serve DNS on `udp` and `tcp` (normally the same address) forever,
/// forwarding to `upstream`, waiting at most `timeout` for each answer.
pub async fn serve(udp: UdpSocket, tcp: TcpListener, upstream: Upstream, timeout: Duration) {
    let link = HostLink::spawn(upstream);
    tokio::join!(serve_udp(udp, link.clone(), timeout), serve_tcp(tcp, link, timeout));
}

async fn serve_udp(socket: UdpSocket, link: HostLink, timeout: Duration) {
    let socket = Arc::new(socket);
    let mut buf = vec![0; usize::from(u16::MAX)];
    loop {
        let (len, peer) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(err) => {
                warn!("udp receive: {err}");
                continue;
            }
        };
        let packet = buf[..len].to_vec();
        let (socket, link) = (socket.clone(), link.clone());
        tokio::spawn(async move {
            let Some(response) = respond(&link, packet, timeout, peer, Transport::Udp).await else { return };
            if let Err(err) = socket.send_to(&response, peer).await {
                debug!(%peer, "udp send: {err}");
            }
        });
    }
}

async fn serve_tcp(listener: TcpListener, link: HostLink, timeout: Duration) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(serve_tcp_client(stream, peer, link.clone(), timeout));
            }
            Err(err) => {
                warn!("tcp accept: {err}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// One TCP client: pipelined queries in, answers out as they are ready.
/// After the client's EOF, the answers still due are written, then the
/// connection is closed.
async fn serve_tcp_client(stream: TcpStream, peer: SocketAddr, link: HostLink, timeout: Duration) {
    let (mut reader, mut writer) = stream.into_split();
    let (answers, mut ready) = mpsc::channel::<Vec<u8>>(16);
    let read_queries = async move {
        loop {
            let query = match tokio::time::timeout(TCP_IDLE_TIMEOUT, read_frame(&mut reader)).await {
                Ok(Ok(Some(query))) => query,
                Ok(Ok(None)) => break,
                Ok(Err(err)) => {
                    debug!(%peer, "tcp read: {err}");
                    break;
                }
                Err(_) => {
                    debug!(%peer, "tcp client idle, closing");
                    break;
                }
            };
            let (answers, link) = (answers.clone(), link.clone());
            tokio::spawn(async move {
                if let Some(response) = respond(&link, query, timeout, peer, Transport::Tcp).await {
                    let _ = answers.send(response).await;
                }
            });
        }
    };
    let write_answers = async move {
        let mut frame = Vec::new();
        while let Some(response) = ready.recv().await {
            frame.clear();
            if !push_frame(&mut frame, &response) {
                continue;
            }
            if let Err(err) = writer.write_all(&frame).await {
                debug!(%peer, "tcp write: {err}");
                return;
            }
        }
    };
    tokio::join!(read_queries, write_answers);
}

/// One framed message, or None at a clean EOF before its length.
async fn read_frame(reader: &mut (impl AsyncReadExt + Unpin)) -> std::io::Result<Option<Vec<u8>>> {
    let mut prefix = [0; dns_framing::PREFIX_LEN];
    match reader.read_exact(&mut prefix).await {
        Ok(_) => {}
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(err) => return Err(err),
    }
    let mut message = vec![0; dns_framing::message_len(prefix)];
    reader.read_exact(&mut message).await?;
    Ok(Some(message))
}

#[derive(Debug, Clone, Copy)]
enum Transport {
    Udp,
    Tcp,
}

/// The bytes to send back to a client for `packet`, or None to stay silent.
async fn respond(
    link: &HostLink,
    packet: Vec<u8>,
    timeout: Duration,
    peer: SocketAddr,
    transport: Transport,
) -> Option<Vec<u8>> {
    let query = match Query::parse(&packet) {
        Ok(query) => query,
        Err(Rejected::FormErr { reason, response }) => {
            warn!(%peer, "answering FORMERR: {reason}");
            return Some(response);
        }
        Err(rejected @ Rejected::Drop(_)) => {
            warn!(%peer, "{rejected}");
            return None;
        }
    };
    let limit = match transport {
        Transport::Udp => query.udp_limit(),
        Transport::Tcp => dns_framing::MAX_MESSAGE_LEN,
    };
    let answer = match link.exchange(packet, timeout).await {
        Ok(answer) => query.answer(&answer, limit).map_err(|err| err.to_string()),
        Err(err) => Err(err.to_string()),
    };
    let response = answer.or_else(|reason| {
        warn!(%peer, question = %query.question(), "answering SERVFAIL: {reason}");
        query.servfail()
    });
    response.inspect_err(|err| warn!(%peer, "cannot encode an answer: {err}")).ok()
}
