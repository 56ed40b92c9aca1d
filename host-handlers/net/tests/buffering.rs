//! How much the MITM holds for a guest that stops reading. In a test binary of
//! its own, so that the process's memory is this test's alone.
#![allow(clippy::unwrap_used)]

mod common;

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use common::Harness;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use net::fixtures::{empty_body, HttpsUpstream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A guest connection that, once `stalled`, never reads again (its writes go on).
struct Stalling<T> {
    inner: T,
    stalled: Arc<AtomicBool>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Stalling<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.stalled.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Stalling<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Resident memory of this process.
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// Streams a guest can have open on one connection (the handler's limit).
const STREAMS: usize = 100;
/// What the handler may hold per stream for a guest that does not read: its
/// HTTP/2 send buffer (64 KiB) plus two body chunks from upstream (at most
/// 64 KiB each from an HTTP/1.1 upstream).
const PER_STREAM: u64 = 192 * 1024;
/// What the handler's writes may leave in the guest's socket and TLS buffers.
const SOCKET: u64 = 1024 * 1024;

/// Open [`STREAMS`] streams for large bodies on one HTTP/2 guest connection
/// to `upstream` that never reads, wait, go away; the bytes the handler took
/// from upstream for them, and how much the process grew meanwhile.
async fn stall(h: &Harness, upstream: std::net::SocketAddr) -> (u64, u64) {
    let rows_before = h.net_rows().await.len();
    let tls = h.guest.tls("a.test", upstream, &[b"h2"]).await.unwrap();
    let io = Stalling { inner: tls, stalled: Arc::new(AtomicBool::new(true)) };
    // The guest offers the largest windows and never reads a byte.
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(u32::MAX >> 1)
        .initial_connection_window_size(u32::MAX >> 1)
        .handshake::<_, net::fixtures::GuestBody>(TokioIo::new(io))
        .await
        .unwrap();
    let guest = tokio::spawn(connection);
    let before = rss_bytes();
    let mut requests = Vec::new();
    for _ in 0..STREAMS {
        let mut sender = sender.clone();
        requests.push(tokio::spawn(async move {
            let request = Request::get("https://a.test/bytes/67108864").body(empty_body()).unwrap();
            let _ = sender.send_request(request).await;
        }));
    }
    // Let the handler fill whatever it buffers.
    let mut grew = 0;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        grew = grew.max(rss_bytes().saturating_sub(before));
    }
    // The guest goes away; every stream's row says how much the handler took from upstream.
    guest.abort();
    for request in requests {
        request.abort();
    }
    drop(sender);
    let rows = h.wait_net_rows(rows_before + STREAMS).await;
    assert_eq!(rows.len(), rows_before + STREAMS, "{rows:?}");
    let taken = rows[rows_before..].iter().map(|r| u64::try_from(r.bytes_received).unwrap()).sum();
    (taken, grew)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_guest_that_stops_reading_holds_bounded_memory() {
    // The test's own upstreams listen on ports of their own.
    let any_port = "[security.rules.http.a_any_port]\non = \"http.request\"\nif = 'http.request.host == \"a.test\" && http.request.port >= 1024'\ndecision = \"allow\"\n";
    let h =
        Harness::start_with_profile(|config| config.allowed_networks = vec!["127.0.0.1/32".parse().unwrap()], any_port)
            .await;
    let bound = STREAMS as u64 * PER_STREAM + SOCKET;

    // An HTTP/1.1 upstream: each stream gets its own upstream connection and
    // the upstream itself holds little (its socket buffers are the kernel's).
    let upstream = HttpsUpstream::start_http1_only(&h.upstream_ca, &["a.test"]).await.unwrap();
    let (taken, grew) = stall(&h, upstream.addr()).await;
    println!(
        "{STREAMS} stalled streams, HTTP/1.1 upstream: handler took {} KiB from upstream (bound {} KiB), process grew {} KiB",
        taken / 1024,
        bound / 1024,
        grew / 1024
    );
    assert_eq!(upstream.connections_accepted(), STREAMS, "each stream reached the upstream");
    assert!(taken <= bound, "the handler buffered {taken} bytes for a guest that reads nothing (bound {bound})");
    // The process also holds the upstream's side of its 100 connections and
    // the TLS state of 200 connections: three times the handler's bound.
    assert!(grew <= 3 * bound, "the process grew by {grew} bytes");

    // An HTTP/2 upstream: the streams share one upstream connection.
    let (taken, _) = stall(&h, h.upstream_addr()).await;
    println!("{STREAMS} stalled streams, HTTP/2 upstream: handler took {} KiB from upstream", taken / 1024);
    assert!(taken <= bound, "the handler buffered {taken} bytes for a guest that reads nothing (bound {bound})");
    h.shutdown().await;
}
