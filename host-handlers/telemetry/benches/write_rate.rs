//! Events per second the session.db writer commits, measured in one run.
//!
//! Producers enqueue as fast as the channel admits (`record_*_wait`), and the
//! clock stops when `close` returns, i.e. when every row is committed. Three
//! workloads: DNS rows only; network rows with 4 KiB body previews; and
//! network rows that each carry a model call with two tool calls.
//!
//! `cargo bench -p telemetry --bench write_rate`
#![allow(clippy::unwrap_used)]

use std::time::{Instant, SystemTime};

use telemetry::ai::{ModelCall, ToolCall};
use telemetry::{DnsEvent, NetEvent, Outcome, Recorder, SessionDb};

fn dns(seq: u64) -> DnsEvent {
    DnsEvent {
        time: SystemTime::now(),
        qname: format!("host{seq}.example.com"),
        qtype: "A".into(),
        rcode: "NOERROR".into(),
        decision: Outcome::Allowed,
        matched_rule: Some("allow_example".into()),
        answers: vec!["A 192.0.2.1".into(), "A 192.0.2.2".into()],
        process_name: Some("python3".into()),
        trace_id: None,
        error: None,
    }
}

fn net(seq: u64, with_model_call: bool) -> NetEvent {
    NetEvent {
        started: SystemTime::now(),
        finished: SystemTime::now(),
        domain: format!("api{seq}.example.com"),
        port: Some(443),
        ip: None,
        mode: Some("inspect".into()),
        sni: Some("api.example.com".into()),
        method: Some("POST".into()),
        path: Some("/v1/messages".into()),
        status_code: Some(200),
        decision: Outcome::Allowed,
        matched_rule: Some("allow_api".into()),
        bytes_sent: 4096,
        bytes_received: 65536,
        request_headers: vec![
            ("content-type".into(), "application/json".into()),
            ("authorization".into(), "Bearer REDACTED".into()),
        ],
        request_body_preview: vec![b'q'; 4096],
        response_body_preview: vec![b'r'; 4096],
        error: None,
        model_call: with_model_call.then(|| ModelCall {
            provider: "anthropic".into(),
            model: Some("claude-sonnet-4-5-20250929".into()),
            input_tokens: Some(1200),
            output_tokens: Some(300),
            stop_reason: Some("tool_use".into()),
            tool_calls: vec![
                ToolCall { name: "bash".into(), arguments_preview: "{\"cmd\":\"ls -la\"}".into(), call_id: None },
                ToolCall { name: "read".into(), arguments_preview: "{\"path\":\"a.txt\"}".into(), call_id: None },
            ],
            complete: true,
            ..ModelCall::default()
        }),
    }
}

async fn produce(recorder: Recorder, events: u64, kind: &'static str) {
    for seq in 0..events {
        match kind {
            "dns" => recorder.record_dns_wait(dns(seq)).await.unwrap(),
            "net" => recorder.record_net_wait(net(seq, false)).await.unwrap(),
            _ => recorder.record_net_wait(net(seq, true)).await.unwrap(),
        }
    }
}

async fn measure(kind: &'static str, events: u64) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let db = SessionDb::open(&dir.path().join("session.db")).unwrap();
    let producers = 4;
    let started = Instant::now();
    let tasks: Vec<_> =
        (0..producers).map(|_| tokio::spawn(produce(db.recorder(), events / producers, kind))).collect();
    for task in tasks {
        task.await.unwrap();
    }
    let committed = db.close().await.unwrap();
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(committed, events / producers * producers);
    committed as f64 / seconds
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    for (kind, label, events) in [
        ("dns", "dns_events rows", 400_000),
        ("net", "net_events rows with 2 x 4 KiB previews", 100_000),
        ("ai", "net_events rows + model call + 2 tool calls", 100_000),
    ] {
        let rate = measure(kind, events).await;
        println!("write_rate {label}: {rate:.0} events/s ({events} events, committed)");
    }
}
