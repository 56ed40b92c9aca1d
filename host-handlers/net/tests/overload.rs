//! Issue 20 item 1: no query or request is acted on unless its row is queued.
//! A tiny telemetry channel and a writer stalled behind another connection's
//! write lock; many guest connections flood the handlers. Every query answered
//! and every request forwarded has its row; every refused one was refused
//! before reaching upstream (counted at the local upstream servers).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::str::FromStr;
use std::time::Duration;

use common::Harness;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use http_body_util::BodyExt;
use hyper::header::HOST;
use hyper::{Request, StatusCode};
use net::fixtures::empty_body;
use telemetry::TelemetryConfig;
use tokio::io::AsyncWriteExt;

const CONNECTIONS: usize = 16;
const PER_CONNECTION: usize = 20;
/// DNS queries stay under the sandbox's default DNS limit burst (200 upstream
/// queries at once), so that only the stalled writer refuses them.
const DNS_CONNECTIONS: usize = 8;
/// How long the writer is held up.
const STALL: Duration = Duration::from_millis(1500);

fn tiny_channel() -> TelemetryConfig {
    TelemetryConfig {
        channel_capacity: 8,
        max_batch: 8,
        busy_timeout: Duration::from_secs(60),
        slot_wait: Duration::from_millis(200),
        ..TelemetryConfig::default()
    }
}

async fn start() -> Harness {
    Harness::start_with_telemetry(|c| c.allowed_networks = vec!["127.0.0.1/32".parse().unwrap()], "", tiny_channel())
        .await
}

/// A slow writer: another connection holds the write lock for `STALL`.
fn stall_writer(h: &Harness) -> tokio::task::JoinHandle<()> {
    let lock = rusqlite::Connection::open(&h.db_path).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    tokio::spawn(async move {
        tokio::time::sleep(STALL).await;
        drop(lock);
    })
}

async fn ask(stream: &mut tokio::net::UnixStream, id: u16, name: &str) -> ResponseCode {
    let mut query = Message::new(id, MessageType::Query, OpCode::Query);
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(Name::from_str(name).unwrap(), RecordType::A));
    let bytes = query.to_vec().unwrap();
    let mut wire = u16::try_from(bytes.len()).unwrap().to_be_bytes().to_vec();
    wire.extend_from_slice(&bytes);
    stream.write_all(&wire).await.unwrap();
    let frame = net::dns::read_frame(stream).await.unwrap().unwrap();
    let answer = Message::from_vec(&frame).unwrap();
    assert_eq!(answer.metadata.id, id);
    answer.metadata.response_code
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_rows_never_dropped_under_dns_flood() {
    let h = start().await;
    let stall = stall_writer(&h);
    let mut flood = tokio::task::JoinSet::new();
    for c in 0..DNS_CONNECTIONS {
        let socket = h.dns_socket();
        flood.spawn(async move {
            let mut stream = tokio::net::UnixStream::connect(socket).await.unwrap();
            let mut answered = Vec::new();
            for i in 0..PER_CONNECTION {
                let name = format!("q{c}x{i}.test");
                let rcode = ask(&mut stream, u16::try_from(i).unwrap(), &format!("{name}.")).await;
                answered.push((name, rcode));
            }
            answered
        });
    }
    let mut acted = Vec::new();
    let mut refused = Vec::new();
    while let Some(answers) = flood.join_next().await {
        for (name, rcode) in answers.unwrap() {
            match rcode {
                // The names do not exist in the upstream zone: acted-on
                // queries are answered NXDOMAIN; refused ones SERVFAIL.
                ResponseCode::NXDomain => acted.push(name),
                ResponseCode::ServFail => refused.push(name),
                other => panic!("{name}: unexpected {other:?}"),
            }
        }
    }
    stall.await.unwrap();
    eprintln!("DNS: {} answered, {} refused", acted.len(), refused.len());
    assert_eq!(acted.len() + refused.len(), DNS_CONNECTIONS * PER_CONNECTION);
    assert!(acted.len() > DNS_CONNECTIONS, "queries are answered again once the writer catches up");

    let rows = h.dns_rows().await;
    let (refusal_rows, mut logged): (Vec<_>, Vec<_>) =
        rows.into_iter().partition(|r| r.error.as_deref().is_some_and(|e| e.starts_with("refused")));
    let mut logged: Vec<String> = logged.drain(..).map(|r| r.qname).collect();
    logged.sort();
    acted.sort();
    assert_eq!(logged, acted, "one row for every query acted on, none dropped");
    assert!(!refused.is_empty(), "the stalled writer must make the handler refuse queries");

    let upstream: BTreeSet<String> = h.dns_fixture.names().into_iter().collect();
    for name in &refused {
        assert!(!upstream.contains(&format!("{name}.")), "{name} was refused but reached upstream");
    }
    for name in &acted {
        assert!(upstream.contains(&format!("{name}.")), "{name} was answered without asking upstream");
    }
    let refused_count = u64::try_from(refused.len()).unwrap();
    assert_eq!(h.recorder.overload_refusals(), refused_count);
    assert_eq!(h.recorder.stats().overload_refusals, refused_count);
    // Each refusal is logged best effort: a row, or counted as not recorded.
    assert_eq!(u64::try_from(refusal_rows.len()).unwrap() + h.recorder.rejected_events(), refused_count);
    assert!(refusal_rows.iter().all(|r| r.rcode == "SERVFAIL" && r.decision == "error"));
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_rows_never_dropped_under_https_flood() {
    let h = start().await;
    // Connections are set up before the writer stalls (their handshakes are not the point).
    let mut senders = Vec::new();
    for _ in 0..CONNECTIONS {
        senders.push(h.guest.http1("a.test", h.upstream_addr()).await.unwrap());
    }
    let stall = stall_writer(&h);
    let mut flood = tokio::task::JoinSet::new();
    for (c, mut sender) in senders.into_iter().enumerate() {
        flood.spawn(async move {
            let mut answered = Vec::new();
            for i in 0..PER_CONNECTION {
                let target = format!("/hello?c={c}&i={i}");
                let request = Request::get(&target).header(HOST, "a.test").body(empty_body()).unwrap();
                let response = sender.send_request(request).await.unwrap();
                let status = response.status();
                let retry_after = response.headers().get("retry-after").cloned();
                response.into_body().collect().await.unwrap();
                if status == StatusCode::SERVICE_UNAVAILABLE {
                    assert!(retry_after.is_some());
                }
                answered.push((target, status));
            }
            answered
        });
    }
    let mut forwarded = Vec::new();
    let mut refused = Vec::new();
    while let Some(answers) = flood.join_next().await {
        for (target, status) in answers.unwrap() {
            match status {
                StatusCode::OK => forwarded.push(target),
                StatusCode::SERVICE_UNAVAILABLE => refused.push(target),
                other => panic!("{target}: unexpected {other}"),
            }
        }
    }
    stall.await.unwrap();
    eprintln!("HTTPS: {} forwarded, {} refused", forwarded.len(), refused.len());
    assert!(forwarded.len() > CONNECTIONS);

    let rows = h.wait_net_rows(forwarded.len()).await;
    let mut logged: Vec<String> =
        rows.iter().filter(|r| r.status_code == Some(200)).map(|r| r.path.clone().unwrap()).collect();
    logged.sort();
    forwarded.sort();
    assert_eq!(logged, forwarded, "one row for every request forwarded, none dropped");
    assert!(!refused.is_empty(), "the stalled writer must make the handler refuse requests");
    let upstream: BTreeSet<String> = h.upstream.requests().into_iter().collect();
    assert_eq!(upstream, forwarded.iter().cloned().collect(), "exactly the forwarded requests reached upstream");
    assert_eq!(h.recorder.overload_refusals(), u64::try_from(refused.len()).unwrap());
    h.shutdown().await;
}
