//! Crash safety: a writer process killed with SIGKILL in the middle of
//! sustained writes leaves a database that opens, passes SQLite's integrity
//! check and holds every row the writer had reported as committed.
//!
//! This file is its own test harness: run without arguments it is the test;
//! with `SESSION_DB_CRASH_CHILD` set it is the child that writes until killed.
//! The child numbers its events 0, 1, 2, ... (a DNS query name or a request
//! domain carries the number) and prints how many events are committed; since
//! the writer commits in order, "committed N" means events 0..N are on disk.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use rusqlite::Connection;
use telemetry::ai::{ModelCall, ToolCall};
use telemetry::{DnsEvent, NetEvent, Outcome, SessionDb};

const CHILD_ENV: &str = "SESSION_DB_CRASH_CHILD";
const START_ENV: &str = "SESSION_DB_CRASH_START";
/// Kill points: committed events reached in each round before SIGKILL.
const ROUNDS: [u64; 3] = [5_000, 20_000, 12_000];

fn main() {
    if let Ok(path) = std::env::var(CHILD_ENV) {
        let start = std::env::var(START_ENV).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
        child(Path::new(&path), start);
    }
    parent();
}

fn event_is_net(seq: u64) -> bool {
    seq % 4 == 3
}

fn dns(seq: u64) -> DnsEvent {
    DnsEvent {
        time: SystemTime::now(),
        qname: format!("{seq}.dns.test"),
        qtype: "A".into(),
        rcode: "NOERROR".into(),
        decision: Outcome::Allowed,
        matched_rule: None,
        answers: vec!["A 192.0.2.1".into()],
        process_name: None,
        trace_id: None,
        error: None,
    }
}

fn net(seq: u64) -> NetEvent {
    NetEvent {
        started: SystemTime::now(),
        finished: SystemTime::now(),
        domain: format!("{seq}.net.test"),
        port: Some(443),
        ip: None,
        mode: Some("inspect".into()),
        sni: None,
        method: Some("POST".into()),
        path: Some("/v1/messages".into()),
        status_code: Some(200),
        decision: Outcome::Allowed,
        matched_rule: None,
        bytes_sent: 100,
        bytes_received: 2000,
        request_headers: Vec::new(),
        request_body_preview: vec![b'x'; 2048],
        response_body_preview: vec![b'y'; 2048],
        error: None,
        model_call: Some(ModelCall {
            provider: "anthropic".into(),
            model: Some("claude-sonnet-4-5".into()),
            input_tokens: Some(seq),
            tool_calls: vec![
                ToolCall { name: "a".into(), arguments_preview: "{}".into(), call_id: None },
                ToolCall { name: "b".into(), arguments_preview: "{}".into(), call_id: None },
            ],
            complete: true,
            ..ModelCall::default()
        }),
    }
}

/// Write numbered events as fast as the writer takes them, forever.
fn child(path: &Path, start: u64) -> ! {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    runtime.block_on(async {
        let db = SessionDb::open(path).unwrap();
        let recorder = db.recorder();
        let reporter = recorder.clone();
        std::thread::spawn(move || loop {
            let line = format!("committed {}\n", start + reporter.committed_events());
            if std::io::stdout().write_all(line.as_bytes()).and_then(|()| std::io::stdout().flush()).is_err() {
                std::process::exit(1);
            }
            std::thread::sleep(Duration::from_millis(2));
        });
        let mut seq = start;
        loop {
            if event_is_net(seq) {
                recorder.record_net_wait(net(seq)).await.unwrap();
            } else {
                recorder.record_dns_wait(dns(seq)).await.unwrap();
            }
            seq += 1;
        }
    })
}

/// Run one child from event `start` until `kill_after` events are committed
/// (counted from `start`), SIGKILL it, and return the last committed count
/// it reported.
fn crash_round(path: &Path, start: u64, kill_after: u64) -> u64 {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env(CHILD_ENV, path)
        .env(START_ENV, start.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(n) = line.strip_prefix("committed ").and_then(|n| n.parse::<u64>().ok()) {
                if tx.send(n).is_err() {
                    break;
                }
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = start;
    while last < start + kill_after {
        assert!(Instant::now() < deadline, "child made no progress: {last}");
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(n) => last = n,
            Err(e) => panic!("child stopped reporting: {e}; status {:?}", child.try_wait()),
        }
    }
    // Kill while it is writing. Child::kill sends SIGKILL.
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(status.code().is_none(), "child was killed by a signal: {status:?}");
    reader.join().unwrap();
    // Reports printed before the kill but not yet read.
    while let Ok(n) = rx.try_recv() {
        last = last.max(n);
    }
    last
}

/// Every event number in the database, checked to be exactly 0..count.
fn check_database(path: &Path, reported: u64) -> u64 {
    let conn = Connection::open(path).unwrap();
    let integrity: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(integrity, "ok");
    let mut seqs: Vec<u64> = Vec::new();
    for (sql, is_net) in [("SELECT qname FROM dns_events", false), ("SELECT domain FROM net_events", true)] {
        let mut statement = conn.prepare(sql).unwrap();
        let names = statement.query_map([], |r| r.get::<_, String>(0)).unwrap();
        for name in names {
            let seq = name.unwrap().split('.').next().unwrap().parse().unwrap();
            assert_eq!(event_is_net(seq), is_net, "event {seq} is in the wrong table");
            seqs.push(seq);
        }
    }
    seqs.sort_unstable();
    let count = u64::try_from(seqs.len()).unwrap();
    assert!(seqs.iter().copied().eq(0..count), "events are not exactly 0..{count}: a committed row is missing");
    assert!(count >= reported, "{count} rows on disk but {reported} were reported committed");
    let nets: i64 = conn.query_row("SELECT count(*) FROM net_events", [], |r| r.get(0)).unwrap();
    let model_calls: i64 = conn
        .query_row("SELECT count(*) FROM model_calls m JOIN net_events n ON n.id = m.net_event_id", [], |r| r.get(0))
        .unwrap();
    let tool_calls: i64 = conn
        .query_row("SELECT count(*) FROM tool_calls t JOIN model_calls m ON m.id = t.model_call_id", [], |r| r.get(0))
        .unwrap();
    assert_eq!((model_calls, tool_calls), (nets, nets * 2), "a network row was committed without its model call");
    count
}

fn parent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("session.db");
    let mut on_disk = 0;
    for (round, kill_after) in ROUNDS.into_iter().enumerate() {
        let reported = crash_round(&path, on_disk, kill_after);
        let count = check_database(&path, reported);
        println!(
            "round {round}: killed after {reported} reported committed events; {count} events on disk, \
             contiguous, integrity ok"
        );
        on_disk = count;
    }
    println!("test crash ... ok");
}
