//! Issue 20 item 2(c): the bytes a guest can make the DNS handler hold.
//!
//! Every query waits on an `ask` nobody answers, so nothing a connection sent
//! is answered while the test runs. Each connection pipelines 64 frames of
//! ~63 KiB (4 MiB, far over the per-connection bound of 256 KiB) and all of
//! them together 64 MiB (over the per-sandbox bound of 4 MiB). The process's
//! resident memory must grow by the bound plus fixed per-connection buffers,
//! not by what the guest sent. This test is alone in its binary so that the
//! process's memory is its own.
#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::rdata::TXT;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use net::dns::{MAX_HELD_BYTES_PER_CONNECTION, MAX_HELD_BYTES_PER_SANDBOX};
use net::fixtures::TestCa;
use net::{Handlers, NetConfig};
use policy::{Asker, Engine, Event, Layer, Policy, ProfileSource};
use telemetry::SessionDb;
use tokio::io::AsyncWriteExt;

const CONNECTIONS: usize = 16;
const FRAMES_PER_CONNECTION: usize = 64;

/// Never answers: every `ask` stays pending until its timeout.
#[derive(Debug)]
struct Silent;

impl Asker for Silent {
    fn ask(&self, _event: &Event, _rule: Option<&str>) -> Pin<Box<dyn Future<Output = bool> + Send + '_>> {
        Box::pin(std::future::pending())
    }
}

/// A well-formed query for `name` padded with a TXT record in the additional
/// section to just under the 64 KiB frame limit.
fn big_query(name: &str) -> Vec<u8> {
    let mut message = Message::new(7, MessageType::Query, OpCode::Query);
    message.add_query(Query::query(Name::from_str(name).unwrap(), RecordType::A));
    let strings = vec!["x".repeat(250); 250];
    message.add_additional(Record::from_rdata(Name::from_str(name).unwrap(), 0, RData::TXT(TXT::new(strings))));
    let bytes = message.to_vec().unwrap();
    assert!(bytes.len() > 60_000 && bytes.len() <= usize::from(u16::MAX), "{}", bytes.len());
    let mut frame = u16::try_from(bytes.len()).unwrap().to_be_bytes().to_vec();
    frame.extend_from_slice(&bytes);
    frame
}

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_bytes_held_per_connection_and_sandbox_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    // The upstream resolver is never asked (every query waits on its ask);
    // it is a local socket nonetheless.
    let silent_upstream = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut config = NetConfig::default();
    config.dns_servers = vec![silent_upstream.local_addr().unwrap()];
    config.system_roots = false;
    config.extra_root_files =
        vec![TestCa::new("unused upstream CA").unwrap().write_pem(dir.path(), "roots.pem").unwrap()];
    let profile = "[security.rules.dns.ask_everything]\non = \"dns.request\"\ndecision = \"ask\"\n";
    let engine = Engine::builder()
        .profile(Layer::User, ProfileSource::Text { name: "ask.toml".into(), text: profile.into() })
        .build()
        .unwrap();
    let policy = Policy::with_asker(engine, Arc::new(Silent), Duration::from_secs(60));
    let db = SessionDb::open(&dir.path().join("session.db")).unwrap();
    let handlers = Handlers::new(config, policy, db.recorder()).unwrap();
    let socket = dir.path().join("vsock.sock_5007");
    let server = handlers.serve_dns(&socket).unwrap();

    let frame = Arc::new(big_query("big.example."));
    // Warm up: one connection's worth, so that buffers and tasks exist
    // before the baseline is taken.
    let mut warm = tokio::net::UnixStream::connect(&socket).await.unwrap();
    warm.write_all(&frame).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = rss();

    let mut guests = Vec::new();
    for _ in 0..CONNECTIONS {
        let socket = socket.clone();
        let frame = frame.clone();
        guests.push(tokio::spawn(async move {
            let mut stream = tokio::net::UnixStream::connect(socket).await.unwrap();
            for _ in 0..FRAMES_PER_CONNECTION {
                if stream.write_all(&frame).await.is_err() {
                    break;
                }
            }
            // Keep the connection open (unanswered) until the test ends.
            std::future::pending::<()>().await;
        }));
    }
    let sent = CONNECTIONS * FRAMES_PER_CONNECTION * frame.len();
    let mut peak = 0;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(rss().saturating_sub(baseline));
    }
    // The bound, plus a fixed 8 KiB read and 8 KiB write buffer per
    // connection, plus room for the allocator and the tasks of 1,024 pending
    // queries.
    let allowed = MAX_HELD_BYTES_PER_SANDBOX + CONNECTIONS * 16 * 1024 + 16 * 1024 * 1024;
    eprintln!(
        "guests sent {} MiB; resident memory grew by {:.1} MiB (allowed {} MiB; bounds {} KiB per connection, {} MiB per sandbox)",
        sent >> 20,
        peak as f64 / 1_048_576.0,
        allowed >> 20,
        MAX_HELD_BYTES_PER_CONNECTION >> 10,
        MAX_HELD_BYTES_PER_SANDBOX >> 20
    );
    assert!(peak < u64::try_from(allowed).unwrap(), "resident memory grew by {peak} bytes while guests sent {sent}");
    for guest in guests {
        guest.abort();
    }
    server.shutdown().await;
}
