//! net-proxy against a fake host MITM handler on a Unix socket (standing in
//! for vsock port 5002), with clients on 127.0.0.1. Without nat the original
//! destination is the proxy's own address.

#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use guest_proxies::net;
use guest_proxies::upstream::Upstream;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::mpsc;

/// What the fake host saw on one connection.
#[derive(Debug)]
struct Seen {
    header: String,
    data: Vec<u8>,
}

/// How the fake host behaves after reading the header.
#[derive(Debug, Clone, Copy)]
enum Host {
    /// Read to EOF, then send back the SHA-256 of what it read and close.
    Digest,
    /// Send "server first", shut down its write side, then read to EOF.
    SpeakFirst,
}

async fn start(host: Host) -> (SocketAddr, mpsc::UnboundedReceiver<Seen>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let socket: PathBuf = dir.path().join("vsock.sock_5002");
    let (seen, rx) = mpsc::unbounded_channel();
    tokio::spawn(fake_host(UnixListener::bind(&socket).unwrap(), host, seen));
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(net::serve(listener, Upstream::Unix(socket)));
    (addr, rx, dir)
}

async fn fake_host(listener: UnixListener, host: Host, seen: mpsc::UnboundedSender<Seen>) {
    loop {
        let (stream, _) = listener.accept().await.unwrap();
        let seen = seen.clone();
        tokio::spawn(async move {
            let mut stream = BufReader::new(stream);
            let mut header = String::new();
            stream.read_line(&mut header).await.unwrap();
            let mut data = Vec::new();
            match host {
                Host::Digest => {
                    stream.read_to_end(&mut data).await.unwrap();
                    stream.get_mut().write_all(&Sha256::digest(&data)).await.unwrap();
                }
                Host::SpeakFirst => {
                    stream.get_mut().write_all(b"server first").await.unwrap();
                    stream.get_mut().shutdown().await.unwrap();
                    stream.read_to_end(&mut data).await.unwrap();
                }
            }
            seen.send(Seen { header, data }).unwrap();
        });
    }
}

/// Deterministic bytes for stream `n`: a few tens of KiB, different per stream.
fn payload(n: u32) -> Vec<u8> {
    let mut state = n.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..40_000 + n * 613)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect()
}

#[tokio::test]
async fn header_names_client_and_destination() {
    let (addr, mut seen, _dir) = start(Host::Digest).await;
    let mut client = TcpStream::connect(addr).await.unwrap();
    let local = client.local_addr().unwrap();
    client.shutdown().await.unwrap();
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    let seen = seen.recv().await.unwrap();
    assert_eq!(seen.header, format!("PROXY TCP4 127.0.0.1 127.0.0.1 {} {}\r\n", local.port(), addr.port()));
    assert!(seen.data.is_empty());
    assert_eq!(rest, Sha256::digest(b"").as_slice());
}

#[tokio::test]
async fn two_hundred_concurrent_streams_arrive_intact() {
    let (addr, mut seen, _dir) = start(Host::Digest).await;
    let clients: Vec<_> = (0..200u32)
        .map(|n| {
            tokio::spawn(async move {
                let data = payload(n);
                let mut client = TcpStream::connect(addr).await.unwrap();
                let (mut reader, mut writer) = client.split();
                // Client EOF first: the host answers only after seeing it.
                let send = async {
                    writer.write_all(&data).await.unwrap();
                    writer.shutdown().await.unwrap();
                };
                let mut digest = Vec::new();
                tokio::join!(send, async { reader.read_to_end(&mut digest).await.unwrap() });
                assert_eq!(digest, Sha256::digest(&data).as_slice(), "stream {n}");
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    let mut total = 0;
    for _ in 0..200 {
        let s = seen.recv().await.unwrap();
        assert!(s.header.starts_with("PROXY TCP4 127.0.0.1 127.0.0.1 "));
        total += s.data.len();
    }
    assert_eq!(total, (0..200).map(|n| payload(n).len()).sum::<usize>());
}

#[tokio::test]
async fn host_eof_first_leaves_the_client_direction_open() {
    let (addr, mut seen, _dir) = start(Host::SpeakFirst).await;
    let mut client = TcpStream::connect(addr).await.unwrap();
    let mut greeting = Vec::new();
    client.read_to_end(&mut greeting).await.unwrap();
    assert_eq!(greeting, b"server first");
    // The host's EOF reached us, but our direction still carries data.
    client.write_all(b"client after the server's EOF").await.unwrap();
    client.shutdown().await.unwrap();
    let seen = seen.recv().await.unwrap();
    assert_eq!(seen.data, b"client after the server's EOF");
}

#[tokio::test]
async fn client_is_closed_when_the_host_is_absent() {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(net::serve(listener, Upstream::Unix(dir.path().join("missing"))));
    let mut client = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), client.read_to_end(&mut buf)).await.unwrap();
    assert!(read.is_err() || buf.is_empty());
}

#[tokio::test]
async fn relay_reports_bytes_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vsock.sock_5002");
    let host = UnixListener::bind(&socket).unwrap();
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let host_side = async {
        let (mut stream, _) = host.accept().await.unwrap();
        let mut all = Vec::new();
        stream.read_to_end(&mut all).await.unwrap();
        stream.write_all(b"0123456789").await.unwrap();
        all
    };
    let client_side = async {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"abc").await.unwrap();
        c.shutdown().await.unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).await.unwrap();
        back
    };
    let relay = async {
        let (client, peer) = listener.accept().await.unwrap();
        net::relay(client, peer, &Upstream::Unix(socket.clone())).await.unwrap()
    };
    let (from_client, back, counts) = tokio::join!(host_side, client_side, relay);
    assert!(from_client.ends_with(b"\r\nabc"));
    assert_eq!(back, b"0123456789");
    assert_eq!(counts, (3, 10));
}
