//! Throughput of the handlers against the same local upstream, measured in
//! one run and printed as ratios:
//!
//! - a 100 MB download through the MITM vs direct TLS from the upstream
//!   (target: at least 0.7),
//! - small keep-alive requests per second through vs direct (target: at least 0.5),
//! - DNS queries per second through the handler with a warm cache.
//!
//! Each measurement is repeated and the best run kept, alternating direct and
//! through so that both see the same machine load. The process's CPU time per
//! unit of work is printed too: client, upstream and handlers share one
//! process, so on a small machine the rates are bounded by it.
#![allow(clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Harness;
use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use http_body_util::BodyExt;
use hyper::client::conn::http1::SendRequest;
use hyper::header::HOST;
use hyper::Request;
use hyper_util::rt::TokioIo;
use net::fixtures::{empty_body, GuestBody};
use tokio::io::{AsyncWriteExt, BufReader};

const DOWNLOAD: u64 = 100 * 1024 * 1024;
const ROUNDS: usize = 3;
const CONNECTIONS: usize = 4;
const REQUESTS_PER_CONNECTION: usize = 500;
const DNS_QUERIES: u16 = 20_000;
const DNS_WINDOW: u16 = 64;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(run());
}

async fn run() {
    let h = Harness::start().await;
    let direct = DirectClient::new(&h);

    let mut best = (0f64, 0f64);
    let mut cpu = (f64::MAX, f64::MAX);
    for _ in 0..ROUNDS {
        let (d, d_cpu) = measured(download(direct.http1().await)).await;
        let (t, t_cpu) = measured(download(h.guest.http1("a.test", h.upstream_addr()).await.unwrap())).await;
        best = (best.0.max(d), best.1.max(t));
        cpu = (cpu.0.min(d_cpu), cpu.1.min(t_cpu));
    }
    let (direct_mbs, through_mbs) = best;
    let mb = DOWNLOAD as f64 / 1e6;
    println!(
        "download 100 MB: direct {direct_mbs:.0} MB/s, through MITM {through_mbs:.0} MB/s, ratio {:.2} (target >= 0.7); \
         CPU per MB: direct {:.2} ms, through {:.2} ms",
        through_mbs / direct_mbs,
        cpu.0 * 1e3 / mb,
        cpu.1 * 1e3 / mb,
    );

    let mut best = (0f64, 0f64);
    let mut cpu = (f64::MAX, f64::MAX);
    let mut writer_cpu = f64::MAX;
    for _ in 0..ROUNDS {
        let mut senders = Vec::new();
        for _ in 0..CONNECTIONS {
            senders.push(direct.http1().await);
        }
        let (d, d_cpu) = measured(requests_per_second(senders)).await;
        let mut senders = Vec::new();
        for _ in 0..CONNECTIONS {
            senders.push(h.guest.http1("a.test", h.upstream_addr()).await.unwrap());
        }
        let writer_before = telemetry_writer_cpu_seconds();
        let (t, t_cpu) = measured(requests_per_second(senders)).await;
        writer_cpu = writer_cpu.min(telemetry_writer_cpu_seconds() - writer_before);
        best = (best.0.max(d), best.1.max(t));
        cpu = (cpu.0.min(d_cpu), cpu.1.min(t_cpu));
    }
    let (direct_rps, through_rps) = best;
    let requests = (CONNECTIONS * REQUESTS_PER_CONNECTION) as f64;
    println!(
        "small keep-alive requests ({CONNECTIONS} connections): direct {direct_rps:.0}/s, through MITM {through_rps:.0}/s, \
         ratio {:.2} (target >= 0.5); CPU per request: direct {:.0} us, through {:.0} us \
         (of which the session.db writer {:.0} us)",
        through_rps / direct_rps,
        cpu.0 * 1e6 / requests,
        cpu.1 * 1e6 / requests,
        writer_cpu * 1e6 / requests,
    );

    let mut best_qps = 0f64;
    for _ in 0..ROUNDS {
        best_qps = best_qps.max(dns_queries_per_second(&h).await);
    }
    println!("DNS through the handler, warm cache, {DNS_WINDOW} in flight: {best_qps:.0} queries/s");

    // Give the last rows time to reach the database before it closes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    h.shutdown().await;
}

/// Run `work`, returning its result and the CPU seconds the process spent meanwhile.
async fn measured<T>(work: impl std::future::Future<Output = T>) -> (T, f64) {
    let before = process_cpu_seconds();
    let result = work.await;
    (result, process_cpu_seconds() - before)
}

/// User plus system CPU time of this process, from /proc/self/stat (in USER_HZ = 1/100 s).
fn process_cpu_seconds() -> f64 {
    cpu_seconds_of_stat(&std::fs::read_to_string("/proc/self/stat").unwrap())
}

fn cpu_seconds_of_stat(stat: &str) -> f64 {
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

/// CPU seconds of the telemetry writer thread (`session-db-writer`).
fn telemetry_writer_cpu_seconds() -> f64 {
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end().starts_with("session-db-writ") {
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap();
            return cpu_seconds_of_stat(&stat);
        }
    }
    0.0
}

/// The upstream reached directly over TLS, as a client without the sandbox would.
struct DirectClient {
    addr: std::net::SocketAddr,
    tls: tokio_rustls::TlsConnector,
}

impl DirectClient {
    fn new(h: &Harness) -> DirectClient {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut h.upstream_ca.cert_pem().as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(net::crypto_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        DirectClient { addr: h.upstream_addr(), tls: tokio_rustls::TlsConnector::from(Arc::new(config)) }
    }

    async fn http1(&self) -> SendRequest<GuestBody> {
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let name = rustls::pki_types::ServerName::try_from("a.test").unwrap();
        let tls = self.tls.connect(name, tcp).await.unwrap();
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
        tokio::spawn(connection);
        sender
    }
}

fn get(path: &str) -> Request<GuestBody> {
    Request::get(path).header(HOST, "a.test").body(empty_body()).unwrap()
}

/// MB/s of one 100 MB download.
async fn download(mut sender: SendRequest<GuestBody>) -> f64 {
    let started = Instant::now();
    let response = sender.send_request(get(&format!("/bytes/{DOWNLOAD}"))).await.unwrap();
    let mut body = response.into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            received += data.len() as u64;
        }
    }
    assert_eq!(received, DOWNLOAD);
    received as f64 / 1e6 / started.elapsed().as_secs_f64()
}

/// Requests per second of sequential small GETs on each connection, all at once.
async fn requests_per_second(senders: Vec<SendRequest<GuestBody>>) -> f64 {
    let started = Instant::now();
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|mut sender| {
            tokio::spawn(async move {
                for _ in 0..REQUESTS_PER_CONNECTION {
                    let response = sender.send_request(get("/hello")).await.unwrap();
                    assert!(response.status().is_success());
                    response.into_body().collect().await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    (CONNECTIONS * REQUESTS_PER_CONNECTION) as f64 / started.elapsed().as_secs_f64()
}

/// Queries per second on one pipelined connection, after one query warmed the cache.
async fn dns_queries_per_second(h: &Harness) -> f64 {
    let query = |id: u16| {
        let mut message = Message::new(id, MessageType::Query, OpCode::Query);
        message.add_query(Query::query(Name::from_str("a.test.").unwrap(), RecordType::A));
        let bytes = message.to_vec().unwrap();
        let mut frame = u16::try_from(bytes.len()).unwrap().to_be_bytes().to_vec();
        frame.extend_from_slice(&bytes);
        frame
    };
    net::fixtures::dns_query(&h.dns_socket(), "a.test.", RecordType::A).await.unwrap();

    let stream = tokio::net::UnixStream::connect(h.dns_socket()).await.unwrap();
    let (read, mut write) = stream.into_split();
    let started = Instant::now();
    let (window_tx, mut window_rx) = tokio::sync::mpsc::channel::<()>(usize::from(DNS_WINDOW));
    let writer = tokio::spawn(async move {
        for id in 0..DNS_QUERIES {
            if id >= DNS_WINDOW {
                window_rx.recv().await.unwrap();
            }
            write.write_all(&query(id)).await.unwrap();
        }
        write
    });
    let mut read = BufReader::new(read);
    for _ in 0..DNS_QUERIES {
        let frame = net::dns::read_frame(&mut read).await.unwrap().unwrap();
        assert!(frame.len() > 12);
        let _ = window_tx.try_send(());
    }
    let elapsed = started.elapsed();
    drop(writer.await.unwrap());
    f64::from(DNS_QUERIES) / elapsed.as_secs_f64()
}
