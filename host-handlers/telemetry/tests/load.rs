//! Sustained load: 10,000 events per second for 10 seconds into one
//! database through the non-blocking `record_*` calls, with nothing refused
//! and nothing dropped (every row counted afterwards). The rate achieved is
//! printed, not asserted; counts are asserted.

use std::time::{Duration, Instant, SystemTime};

use rusqlite::Connection;
use telemetry::ai::{ModelCall, ToolCall};
use telemetry::{DnsEvent, NetEvent, Outcome, SessionDb};

const EVENTS_PER_MS: u64 = 10;
const MILLISECONDS: u64 = 10_000;

fn dns(seq: u64) -> DnsEvent {
    DnsEvent {
        time: SystemTime::now(),
        qname: format!("host{seq}.example.com"),
        qtype: "AAAA".into(),
        rcode: "NOERROR".into(),
        decision: Outcome::Allowed,
        matched_rule: Some("allow_example".into()),
        answers: vec!["AAAA 2001:db8::1".into()],
        process_name: Some("python3".into()),
        trace_id: None,
        error: None,
    }
}

fn net(seq: u64) -> NetEvent {
    let model_call = seq.is_multiple_of(10).then(|| ModelCall {
        provider: "anthropic".into(),
        model: Some("claude-sonnet-4-5".into()),
        input_tokens: Some(1000),
        output_tokens: Some(200),
        stop_reason: Some("tool_use".into()),
        tool_calls: vec![
            ToolCall { name: "bash".into(), arguments_preview: "{\"cmd\":\"ls\"}".into(), call_id: None },
            ToolCall { name: "read".into(), arguments_preview: "{\"path\":\"/a\"}".into(), call_id: None },
        ],
        complete: true,
        ..ModelCall::default()
    });
    NetEvent {
        started: SystemTime::now(),
        finished: SystemTime::now(),
        domain: format!("api{seq}.example.com"),
        port: Some(443),
        ip: None,
        mode: Some("inspect".into()),
        sni: None,
        method: Some("GET".into()),
        path: Some("/v1/items?page=2".into()),
        status_code: Some(200),
        decision: Outcome::Allowed,
        matched_rule: Some("allow_api".into()),
        bytes_sent: 512,
        bytes_received: 4096,
        request_headers: vec![("accept".into(), "application/json".into())],
        request_body_preview: Vec::new(),
        response_body_preview: br#"{"items":[1,2,3]}"#.to_vec(),
        error: None,
        model_call,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_per_second_for_ten_seconds_nothing_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("session.db");
    let db = SessionDb::open(&path).unwrap();
    let recorder = db.recorder();

    let mut ticks = tokio::time::interval(Duration::from_millis(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let (mut dns_sent, mut net_sent, mut refused) = (0u64, 0u64, 0u64);
    for _ in 0..MILLISECONDS {
        ticks.tick().await;
        for i in 0..EVENTS_PER_MS {
            let result = if i < 7 {
                dns_sent += 1;
                recorder.record_dns(dns(dns_sent))
            } else {
                net_sent += 1;
                recorder.record_net(net(net_sent))
            };
            if let Err(e) = result {
                refused += 1;
                eprintln!("refused: {e}");
            }
        }
    }
    let sending = started.elapsed();
    let committed = db.close().await.unwrap();
    let total = dns_sent + net_sent;
    println!(
        "offered {total} events in {:.2} s ({:.0}/s); all committed {:.2} s after the start",
        sending.as_secs_f64(),
        total as f64 / sending.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );

    assert_eq!(total, EVENTS_PER_MS * MILLISECONDS);
    assert_eq!(refused, 0, "no event may be refused at this rate");
    assert_eq!(committed, total);
    let conn = Connection::open(&path).unwrap();
    let count = |table: &str| -> u64 {
        conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get::<_, i64>(0))
            .map(|n| u64::try_from(n).unwrap())
            .unwrap()
    };
    assert_eq!(count("dns_events"), dns_sent);
    assert_eq!(count("net_events"), net_sent);
    assert_eq!(count("model_calls"), net_sent / 10);
    assert_eq!(count("tool_calls"), net_sent / 10 * 2);
    let distinct: i64 = conn.query_row("SELECT count(DISTINCT qname) FROM dns_events", [], |r| r.get(0)).unwrap();
    assert_eq!(u64::try_from(distinct).unwrap(), dns_sent);
}
