//! Issue 20 item 5: session.db has a size budget. Beyond it events are
//! counted in summaries instead of stored one row each, the sandbox is told,
//! and blocked requests store far less than allowed ones.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, SystemTime};

use rusqlite::Connection;
use telemetry::{DnsEvent, NetEvent, Outcome, SessionDb, TelemetryConfig};

fn at(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(1_750_000_000_000 + ms)
}

fn dns(qname: &str, ms: u64, decision: Outcome) -> DnsEvent {
    DnsEvent {
        time: at(ms),
        qname: qname.into(),
        qtype: "A".into(),
        rcode: "NOERROR".into(),
        decision,
        matched_rule: Some("dns_rule".into()),
        answers: vec!["A 93.184.216.34".into()],
        process_name: None,
        trace_id: None,
        error: None,
    }
}

/// A request with everything a guest controls filled up: headers and both previews.
fn net(domain: &str, ms: u64, decision: Outcome) -> NetEvent {
    NetEvent {
        started: at(ms),
        finished: at(ms + 20),
        domain: domain.into(),
        port: Some(443),
        ip: None,
        mode: Some("inspect".into()),
        sni: Some(domain.into()),
        method: Some("POST".into()),
        path: Some(format!("/upload/{}", "p".repeat(3000))),
        status_code: (decision == Outcome::Allowed).then_some(200),
        decision,
        matched_rule: Some("net_rule".into()),
        bytes_sent: 100_000,
        bytes_received: 4096,
        request_headers: (0..32).map(|i| (format!("x-header-{i}"), "v".repeat(200))).collect(),
        request_body_preview: vec![b'a'; 4096],
        response_body_preview: vec![b'b'; 4096],
        error: Some("e".repeat(2000)),
        model_call: None,
    }
}

fn query_i64(path: &Path, sql: &str) -> i64 {
    Connection::open(path).unwrap().query_row(sql, [], |r| r.get(0)).unwrap()
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

const BUDGET: u64 = 2 * 1024 * 1024;

#[tokio::test]
async fn session_db_stays_within_its_budget_and_summarises() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("session.db");
    let config = TelemetryConfig { max_db_bytes: BUDGET, ..TelemetryConfig::default() };
    let db = SessionDb::open_with(&path, config).unwrap();
    let recorder = db.recorder();
    const EVENTS: u64 = 12_000;
    let (mut dns_sent, mut net_sent) = (0i64, 0i64);
    let mut largest_on_disk = 0;
    for i in 0..EVENTS {
        // 50 hosts; one event a second of event time, a burst every 100th second.
        let host = format!("h{}.example", i % 50);
        let ms = (i / 10) * 1000 + (i % 10);
        let decision = match i % 3 {
            0 => Outcome::Allowed,
            1 => Outcome::Denied,
            _ => Outcome::Error,
        };
        let slot = recorder.reserve().await.unwrap();
        if i % 4 == 0 {
            dns_sent += 1;
            slot.record_dns(dns(&host, ms, decision));
        } else {
            net_sent += 1;
            slot.record_net(net(&host, ms, decision));
        }
        if i % 500 == 0 {
            recorder.flush().await.unwrap();
            let wal = path.with_extension("db-wal");
            largest_on_disk = largest_on_disk.max(file_size(&path) + file_size(&wal));
        }
    }
    recorder.flush().await.unwrap();
    let stats = recorder.stats();
    let committed = db.close().await.unwrap();
    assert_eq!(committed, EVENTS);

    let size = file_size(&path);
    println!(
        "budget {BUDGET} bytes: session.db is {size} bytes; largest with its WAL while writing: {largest_on_disk}; \
         {} events summarised",
        stats.summarised_events
    );
    assert!(size <= BUDGET, "session.db is {size} bytes, over its budget of {BUDGET}");
    assert!(recorder.over_budget(), "the sandbox is told");
    assert!(stats.over_budget);
    // While writing, the WAL adds at most its own bound (8 MiB) on top.
    assert!(largest_on_disk <= BUDGET + 8 * 1024 * 1024 + 1024 * 1024);

    let rows_dns = query_i64(&path, "SELECT count(*) FROM dns_events");
    let rows_net = query_i64(&path, "SELECT count(*) FROM net_events");
    let summed = |sql: &str| query_i64(&path, &format!("SELECT coalesce(sum(count), 0) FROM event_summaries {sql}"));
    assert!(rows_net > 0 && rows_dns > 0, "full rows come first");
    assert!(
        query_i64(&path, "SELECT count(*) FROM event_summaries WHERE second_ms > 0") > 0,
        "per-second summary rows"
    );
    assert!(
        query_i64(&path, "SELECT count(*) FROM event_summaries WHERE second_ms = 0") > 0,
        "running totals once the whole budget is used"
    );
    assert_eq!(rows_dns + summed("WHERE kind = 'dns'"), dns_sent, "DNS counts add up");
    assert_eq!(rows_net + summed("WHERE kind = 'net'"), net_sent, "network counts add up");
    assert_eq!(u64::try_from(summed("")).unwrap(), stats.summarised_events);
    for decision in ["allowed", "denied", "error"] {
        let stored = query_i64(&path, &format!("SELECT count(*) FROM net_events WHERE decision = '{decision}'"))
            + query_i64(&path, &format!("SELECT count(*) FROM dns_events WHERE decision = '{decision}'"));
        let counted = summed(&format!("WHERE decision = '{decision}'"));
        assert_eq!(stored + counted, i64::try_from(EVENTS / 3).unwrap(), "{decision}");
    }
    // At most 32 hosts a second have a row of their own; the rest are '*'.
    let widest = query_i64(
        &path,
        "SELECT max(n) FROM (SELECT count(DISTINCT host) AS n FROM event_summaries \
         WHERE second_ms > 0 AND host != '*' GROUP BY second_ms)",
    );
    assert!(widest <= 32, "{widest} hosts in one second");
}

#[tokio::test]
async fn blocked_requests_store_far_less_than_allowed_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("session.db");
    let db = SessionDb::open(&path).unwrap();
    let recorder = db.recorder();
    recorder.reserve().await.unwrap().record_net(net("a.example", 0, Outcome::Allowed));
    recorder.reserve().await.unwrap().record_net(net("a.example", 1, Outcome::Denied));
    db.close().await.unwrap();
    let stored = |decision: &str| {
        query_i64(
            &path,
            &format!(
                "SELECT length(request_headers) + coalesce(length(request_body_preview), 0) \
                 + coalesce(length(response_body_preview), 0) + length(path) + length(error) \
                 FROM net_events WHERE decision = '{decision}'"
            ),
        )
    };
    let (allowed, denied) = (stored("allowed"), stored("denied"));
    println!("allowed row: {allowed} bytes of headers, previews, path and error; denied row: {denied}");
    assert!(denied * 8 < allowed, "denied {denied} bytes, allowed {allowed}");
    let conn = Connection::open(&path).unwrap();
    let (headers, preview): (String, Option<Vec<u8>>) = conn
        .query_row("SELECT request_headers, request_body_preview FROM net_events WHERE decision = 'denied'", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!((headers.as_str(), preview), ("[]", None));
    let (domain, method, rule): (String, String, String) = conn
        .query_row("SELECT domain, method, matched_rule FROM net_events WHERE decision = 'denied'", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert_eq!((domain.as_str(), method.as_str(), rule.as_str()), ("a.example", "POST", "net_rule"));
}
