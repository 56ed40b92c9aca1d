//! `session.db` end to end: rows written by the writer thread, read back with
//! SQL and through the `sandbox logs` functions; failures made visible.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rusqlite::Connection;
use telemetry::ai::{ModelCall, StreamParser, ToolCall};
use telemetry::query::{print_logs, LogOptions, LogReader, LogRow};
use telemetry::{
    DnsEvent, InboundEvent, NetEvent, OnWriteFailure, Outcome, PriceTable, SessionDb, TelemetryConfig, TelemetryError,
};

fn at(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(1_750_000_000_000 + ms)
}

fn dns(qname: &str, ms: u64) -> DnsEvent {
    DnsEvent {
        time: at(ms),
        qname: qname.into(),
        qtype: "A".into(),
        rcode: "NOERROR".into(),
        decision: Outcome::Allowed,
        matched_rule: Some("allow_example".into()),
        answers: vec!["A 93.184.216.34".into(), "A 93.184.216.35".into()],
        process_name: Some("curl".into()),
        trace_id: None,
        error: None,
    }
}

fn net(domain: &str, ms: u64) -> NetEvent {
    NetEvent {
        started: at(ms),
        finished: at(ms + 250),
        domain: domain.into(),
        port: Some(443),
        ip: None,
        mode: Some("inspect".into()),
        sni: Some(domain.into()),
        method: Some("POST".into()),
        path: Some("/v1/messages".into()),
        status_code: Some(200),
        decision: Outcome::Allowed,
        matched_rule: Some("allow_ai".into()),
        bytes_sent: 1234,
        bytes_received: 56789,
        request_headers: vec![("content-type".into(), "application/json".into())],
        request_body_preview: b"{\"model\":\"claude-sonnet-4-5\"}".to_vec(),
        response_body_preview: b"event: message_start\n".to_vec(),
        error: None,
        model_call: None,
    }
}

fn inbound(ms: u64) -> InboundEvent {
    InboundEvent {
        started: at(ms),
        finished: at(ms + 40),
        listener: "127.0.0.1:8080".into(),
        peer: Some("127.0.0.1:40000".into()),
        guest_port: 80,
        decision: Outcome::Allowed,
        bytes_to_guest: 77,
        bytes_from_guest: 1500,
        error: None,
    }
}

/// A database made by a build from before `inbound_events` (schema 3) is
/// read without it, and migrated (its summaries kept) when written again.
#[tokio::test]
async fn a_database_from_before_inbound_rows_is_read_and_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("session.db");
    SessionDb::open(&path).unwrap().close().await.unwrap();
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "DROP TABLE inbound_events; DROP TABLE event_summaries; \
             CREATE TABLE event_summaries (id INTEGER PRIMARY KEY, second_ms INTEGER NOT NULL, \
               kind TEXT NOT NULL CHECK (kind IN ('dns', 'net')), \
               decision TEXT NOT NULL CHECK (decision IN ('allowed', 'denied', 'error')), \
               host TEXT NOT NULL, count INTEGER NOT NULL, UNIQUE (second_ms, kind, decision, host)); \
             INSERT INTO event_summaries (second_ms, kind, decision, host, count) VALUES (0, 'dns', 'allowed', '*', 5); \
             PRAGMA user_version = 3;",
        )
        .unwrap();
    }
    assert!(read_all(&path, &LogOptions::default()).is_empty());
    let db = SessionDb::open(&path).unwrap();
    db.recorder().record_inbound(inbound(0)).unwrap();
    db.close().await.unwrap();
    assert_eq!(count(&path, "inbound_events"), 1);
    assert_eq!(count(&path, "event_summaries"), 1);
    Connection::open(&path)
        .unwrap()
        .execute("INSERT INTO event_summaries (second_ms, kind, decision, host, count) VALUES (0, 'inbound', 'error', '*', 1)", [])
        .unwrap();
}

fn model_call() -> ModelCall {
    ModelCall {
        provider: "anthropic".into(),
        model: Some("claude-sonnet-4-5-20250929".into()),
        input_tokens: Some(1_000_000),
        output_tokens: Some(100_000),
        cache_read_tokens: None,
        cache_write_tokens: None,
        stop_reason: Some("tool_use".into()),
        estimated_cost_usd: None,
        tool_calls: vec![
            ToolCall {
                name: "get_weather".into(),
                arguments_preview: "{\"city\":\"Rome\"}".into(),
                call_id: Some("toolu_1".into()),
            },
            ToolCall { name: "get_time".into(), arguments_preview: "{}".into(), call_id: None },
        ],
        complete: true,
        problems: vec![],
    }
}

fn count(path: &Path, table: &str) -> i64 {
    Connection::open(path).unwrap().query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0)).unwrap()
}

/// Read every row the way `sandbox logs` does.
fn read_all(path: &Path, options: &LogOptions) -> Vec<LogRow> {
    let mut reader = LogReader::open(path, options).unwrap();
    let mut rows = Vec::new();
    loop {
        let (batch, more) = reader.read_new().unwrap();
        rows.extend(batch);
        if !more {
            return rows;
        }
    }
}

#[tokio::test]
async fn rows_are_written_linked_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("session.db");
    let db = SessionDb::open(&path).unwrap();
    let recorder = db.recorder();
    recorder.record_dns(dns("example.com", 0)).unwrap();
    let mut event = net("api.anthropic.com", 10);
    event.model_call = Some(model_call());
    recorder.record_net(event).unwrap();
    let mut denied = net("evil.example", 20);
    denied.decision = Outcome::Denied;
    denied.status_code = None;
    denied.matched_rule = None;
    denied.error = Some("no rule allows evil.example".into());
    recorder.record_net(denied).unwrap();
    recorder.record_inbound(inbound(300)).unwrap();
    recorder.flush().await.unwrap();
    assert_eq!(recorder.committed_events(), 4);
    assert!(recorder.healthy());

    let conn = Connection::open(&path).unwrap();
    let (net_id, provider, cost, duration): (i64, String, f64, i64) = conn
        .query_row(
            "SELECT n.id, m.provider, m.estimated_cost_usd, m.duration_ms FROM model_calls m \
             JOIN net_events n ON n.id = m.net_event_id",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    assert_eq!(provider, "anthropic");
    assert_eq!(duration, 250);
    // Built-in price of claude-sonnet-4-5: $3 in, $15 out per million tokens.
    assert!((cost - 4.5).abs() < 1e-9, "{cost}");
    let tools: Vec<(i64, String)> = conn
        .prepare(
            "SELECT t.position, t.name FROM tool_calls t JOIN model_calls m ON m.id = t.model_call_id \
             WHERE m.net_event_id = ?1 ORDER BY t.position",
        )
        .unwrap()
        .query_map([net_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(tools, vec![(0, "get_weather".to_string()), (1, "get_time".to_string())]);

    let rows = read_all(&path, &LogOptions::default());
    let kinds: Vec<&str> = rows
        .iter()
        .map(|r| match r {
            LogRow::Dns(_) => "dns",
            LogRow::Net(_) => "net",
            LogRow::Ai(_) => "ai",
            LogRow::Inbound(_) => "inbound",
        })
        .collect();
    assert_eq!(kinds, ["dns", "net", "ai", "net", "inbound"]);
    let LogRow::Ai(ai) = &rows[2] else { panic!("{:?}", rows[2]) };
    assert_eq!(ai.domain, "api.anthropic.com");
    assert_eq!(ai.tool_calls.len(), 2);
    assert_eq!(ai.tool_calls[0].arguments_preview, "{\"city\":\"Rome\"}");
    let LogRow::Dns(d) = &rows[0] else { panic!() };
    assert_eq!(d.answers, ["A 93.184.216.34", "A 93.184.216.35"]);
    assert_eq!(d.time, "2025-06-15T15:06:40.000Z");
    let LogRow::Net(n) = &rows[3] else { panic!() };
    assert_eq!((n.decision.as_str(), n.status_code), ("denied", None));
    let LogRow::Inbound(i) = &rows[4] else { panic!() };
    assert_eq!(
        (i.listener.as_str(), i.peer.as_deref(), i.guest_port, i.bytes_to_guest, i.bytes_from_guest, i.duration_ms),
        ("127.0.0.1:8080", Some("127.0.0.1:40000"), 80, 77, 1500, 40)
    );
    let text = rows[4].to_text();
    assert!(text.contains("in   allowed  127.0.0.1:40000 -> 127.0.0.1:8080 -> guest:80"), "{text}");
    let json = serde_json::to_value(&rows[4]).unwrap();
    assert_eq!(json["kind"], "inbound");

    let only_ai = read_all(&path, &LogOptions { ai: true, ..LogOptions::default() });
    assert_eq!(only_ai.len(), 1);
    let only_inbound = read_all(&path, &LogOptions { inbound: true, ..LogOptions::default() });
    assert_eq!(only_inbound.len(), 1);
    assert_eq!(db.close().await.unwrap(), 4);
    assert!(matches!(recorder.record_dns(dns("late.example", 99)), Err(TelemetryError::Closed)));
    assert!(!recorder.healthy());
}

#[tokio::test]
async fn previews_keep_text_as_text_and_flag_binary() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("session.db");
    let db = SessionDb::open(&path).unwrap();
    let mut event = net("cdn.example", 0);
    let mut text = "a".repeat(4095);
    text.push('€');
    event.request_body_preview = text.into_bytes();
    event.response_body_preview = vec![0x1f, 0x8b, 0x08, 0x00, 0xff, 0x00];
    db.recorder().record_net(event).unwrap();
    db.close().await.unwrap();
    let conn = Connection::open(&path).unwrap();
    let row: (String, i64, i64, String, i64, Vec<u8>) = conn
        .query_row(
            "SELECT typeof(request_body_preview), length(request_body_preview), request_body_binary, \
             typeof(response_body_preview), response_body_binary, response_body_preview FROM net_events",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
        )
        .unwrap();
    assert_eq!(row, ("text".into(), 4095, 0, "blob".into(), 1, vec![0x1f, 0x8b, 0x08, 0x00, 0xff, 0x00]));
    let rows = read_all(&path, &LogOptions { json: true, ..LogOptions::default() });
    let LogRow::Net(n) = &rows[0] else { panic!() };
    assert_eq!(n.response_body_preview.as_deref(), Some("H4sIAP8A"), "binary previews are base64 in JSON");
}

#[tokio::test]
async fn secrets_never_reach_the_database_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("session.db");
    let db = SessionDb::open(&path).unwrap();
    let mut event = net("generativelanguage.googleapis.com", 0);
    event.path = Some("/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse&key=AIzaSECRET1".into());
    event.request_headers = vec![
        ("authorization".into(), "Bearer sk-SECRET2".into()),
        ("x-api-key".into(), "sk-ant-SECRET3".into()),
        ("Cookie".into(), "session=SECRET4".into()),
        ("x-goog-api-key".into(), "SECRET5".into()),
        ("accept".into(), "text/event-stream".into()),
    ];
    db.recorder().record_net(event).unwrap();
    db.recorder().flush().await.unwrap();
    // Look at the raw files while the WAL still holds the rows, and after close.
    let scan = || {
        let mut all = Vec::new();
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            all.extend(std::fs::read(entry.unwrap().path()).unwrap());
        }
        all
    };
    for bytes in [scan(), {
        db.close().await.unwrap();
        scan()
    }] {
        for secret in ["SECRET1", "SECRET2", "SECRET3", "SECRET4", "SECRET5"] {
            assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "{secret} found on disk");
        }
    }
    let rows = read_all(&path, &LogOptions::default());
    let LogRow::Net(n) = &rows[0] else { panic!() };
    assert_eq!(n.path.as_deref(), Some("/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse&key=REDACTED"));
    assert_eq!(n.request_headers[0], ("authorization".to_string(), "Bearer REDACTED".to_string()));
    assert_eq!(n.request_headers[4], ("accept".to_string(), "text/event-stream".to_string()));
}

#[tokio::test]
async fn a_parsed_stream_lands_in_model_and_tool_calls_with_a_custom_price_table() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("session.db");
    let prices = PriceTable::parse("[models.gpt-4o]\ninput = 1.0\noutput = 2.0\ncache_read = 0.5\n", "test").unwrap();
    let db = SessionDb::open_with(&path, TelemetryConfig { prices, ..TelemetryConfig::default() }).unwrap();
    let body = std::fs::read(format!("{}/tests/fixtures/openai_chat_stream.sse", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let mut parser =
        StreamParser::for_request("api.openai.com", "/v1/chat/completions", Some("text/event-stream")).unwrap();
    for chunk in body.chunks(512) {
        parser.feed(chunk);
    }
    let mut event = net("api.openai.com", 0);
    event.path = Some("/v1/chat/completions".into());
    event.model_call = Some(parser.finish());
    db.recorder().record_net(event).unwrap();
    db.close().await.unwrap();
    let rows = read_all(&path, &LogOptions { ai: true, ..LogOptions::default() });
    let LogRow::Ai(ai) = &rows[0] else { panic!() };
    assert_eq!((ai.input_tokens, ai.cache_read_tokens, ai.output_tokens), (Some(176), Some(1024), Some(45)));
    let expected = (176.0 * 1.0 + 1024.0 * 0.5 + 45.0 * 2.0) / 1e6;
    assert!((ai.estimated_cost_usd.unwrap() - expected).abs() < 1e-12);
    assert!(ai.complete);
    let names: Vec<&str> = ai.tool_calls.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["get_weather", "get_time"]);
    let line = rows[0].to_text();
    assert!(line.contains("tools=get_weather({\"location\":\"Paris\"}), get_time("), "{line}");
}

#[tokio::test]
async fn unknown_models_get_tokens_and_no_cost() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("session.db");
    let db = SessionDb::open(&path).unwrap();
    let mut event = net("api.anthropic.com", 0);
    event.model_call = Some(ModelCall { model: Some("claude-next-9".into()), ..model_call() });
    db.recorder().record_net(event).unwrap();
    db.close().await.unwrap();
    let (tokens, cost): (Option<i64>, Option<f64>) = Connection::open(&path)
        .unwrap()
        .query_row("SELECT input_tokens, estimated_cost_usd FROM model_calls", [], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap();
    assert_eq!((tokens, cost), (Some(1_000_000), None));
}

/// Another process (here: another connection) holds the write lock, so the
/// writer's transaction cannot commit.
fn hold_write_lock(path: &Path) -> Connection {
    let conn = Connection::open(path).unwrap();
    conn.execute_batch("BEGIN EXCLUSIVE").unwrap();
    conn
}

#[tokio::test]
async fn a_locked_database_fails_closed_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("session.db");
    let config = TelemetryConfig { busy_timeout: Duration::from_millis(200), ..TelemetryConfig::default() };
    let db = SessionDb::open_with(&path, config).unwrap();
    let recorder = db.recorder();
    recorder.record_dns(dns("before.example", 0)).unwrap();
    recorder.flush().await.unwrap();

    let lock = hold_write_lock(&path);
    recorder.record_dns(dns("during.example", 1)).unwrap();
    let err = recorder.flush().await.unwrap_err();
    assert!(matches!(&err, TelemetryError::WriterFailed(m) if m.contains("locked")), "{err}");
    assert!(!recorder.healthy());
    assert!(!recorder.accept_new_connections(), "fail closed by default");
    assert!(recorder.failure().unwrap().contains("database is locked"), "{:?}", recorder.failure());
    let err = recorder.record_dns(dns("after.example", 2)).unwrap_err();
    assert!(matches!(err, TelemetryError::WriterFailed(_)), "{err}");
    let err = recorder.record_net(net("after.example", 3)).unwrap_err();
    assert!(matches!(err, TelemetryError::WriterFailed(_)), "{err}");
    assert_eq!(recorder.rejected_events(), 2);
    assert!(db.close().await.is_err());

    // The failure is permanent even once the lock is gone; committed rows are intact.
    drop(lock);
    assert!(recorder.record_dns(dns("later.example", 4)).is_err());
    assert_eq!(count(&path, "dns_events"), 1);
}

#[tokio::test]
async fn fail_open_is_a_setting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("session.db");
    let config = TelemetryConfig {
        busy_timeout: Duration::from_millis(100),
        on_write_failure: OnWriteFailure::KeepServing,
        ..TelemetryConfig::default()
    };
    let db = SessionDb::open_with(&path, config).unwrap();
    let recorder = db.recorder();
    let _lock = hold_write_lock(&path);
    recorder.record_dns(dns("during.example", 1)).unwrap();
    assert!(recorder.flush().await.is_err());
    assert!(!recorder.healthy());
    assert!(recorder.accept_new_connections());
    assert!(recorder.record_dns(dns("after.example", 2)).is_err(), "rows are still refused, not dropped silently");
}

#[tokio::test]
async fn a_full_channel_refuses_rows_instead_of_dropping_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("session.db");
    let config = TelemetryConfig { channel_capacity: 4, max_batch: 4, ..TelemetryConfig::default() };
    let db = SessionDb::open_with(&path, config).unwrap();
    let recorder = db.recorder();
    // Stall the writer behind a lock (it waits up to busy_timeout = 5 s).
    let lock = hold_write_lock(&path);
    let mut accepted = 0u64;
    let mut refused = 0u64;
    for i in 0..100 {
        match recorder.record_dns(dns(&format!("q{i}.example"), i)) {
            Ok(()) => accepted += 1,
            Err(TelemetryError::Full) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(refused > 0 && accepted >= 4, "accepted {accepted}, refused {refused}");
    assert_eq!(recorder.rejected_events(), refused);
    drop(lock);
    recorder.flush().await.unwrap();
    assert!(recorder.healthy());
    assert_eq!(i64::try_from(accepted).unwrap(), count(&path, "dns_events"));
    db.close().await.unwrap();
}

#[tokio::test]
async fn reserved_slots_are_never_lost_and_the_overflow_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("session.db");
    let config = TelemetryConfig {
        channel_capacity: 4,
        max_batch: 4,
        busy_timeout: Duration::from_secs(30),
        slot_wait: Duration::from_millis(100),
        ..TelemetryConfig::default()
    };
    let db = SessionDb::open_with(&path, config).unwrap();
    let recorder = db.recorder();
    // Stall the writer behind a lock, with one row it has taken and is trying to write.
    let lock = hold_write_lock(&path);
    recorder.reserve().await.unwrap().record_dns(dns("first.example", 0));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut slots = Vec::new();
    let mut refused = 0;
    for _ in 0..10 {
        match recorder.reserve().await {
            Ok(slot) => slots.push(slot),
            Err(TelemetryError::Overloaded(wait)) => {
                assert_eq!(wait, Duration::from_millis(100));
                refused += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(slots.len(), 4, "the channel's capacity");
    assert_eq!(refused, 6);
    assert_eq!(recorder.overload_refusals(), 6);
    assert_eq!(recorder.stats().overload_refusals, 6);
    // Filling the slots needs no room: it is already reserved.
    for (i, slot) in slots.into_iter().enumerate() {
        slot.record_dns(dns(&format!("slot{i}.example"), 1));
    }
    drop(lock);
    recorder.flush().await.unwrap();
    assert_eq!(count(&path, "dns_events"), 5);
    assert_eq!(recorder.rejected_events(), 0);
    // A slot dropped unfilled gives its room back.
    for _ in 0..8 {
        drop(recorder.reserve().await.unwrap());
    }
    assert!(recorder.healthy());
    assert_eq!(db.close().await.unwrap(), 5);
}

#[tokio::test]
async fn close_does_not_wait_for_an_unfilled_slot() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("session.db");
    let db = SessionDb::open(&path).unwrap();
    let recorder = db.recorder();
    let late = recorder.reserve().await.unwrap();
    recorder.reserve().await.unwrap().record_dns(dns("kept.example", 0));
    let closed = tokio::time::timeout(Duration::from_secs(5), db.close()).await;
    assert_eq!(closed.expect("close returned").unwrap(), 1);
    late.record_dns(dns("late.example", 1));
    assert_eq!(recorder.rejected_events(), 1, "a row filled after close is counted");
    assert_eq!(count(&path, "dns_events"), 1);
}

#[test]
fn opening_an_unusable_path_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = SessionDb::open(dir.path()).unwrap_err();
    assert!(matches!(err, TelemetryError::Open { .. }), "{err}");
    assert!(LogReader::open(&dir.path().join("missing.db"), &LogOptions::default()).is_err());
}

/// A `Write` shared with the test while `print_logs` runs in a thread.
#[derive(Clone, Default)]
struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl SharedBuffer {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

#[tokio::test]
async fn follow_prints_rows_as_they_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("session.db");
    let db = SessionDb::open(&path).unwrap();
    let recorder = db.recorder();
    recorder.record_dns(dns("first.example", 0)).unwrap();
    recorder.flush().await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let out = SharedBuffer::default();
    let follower = {
        let (path, stop, mut out) = (path.clone(), Arc::clone(&stop), out.clone());
        std::thread::spawn(move || {
            let options = LogOptions {
                json: true,
                follow: true,
                poll_interval: Duration::from_millis(20),
                ..LogOptions::default()
            };
            print_logs(&path, &options, &mut out, &stop)
        })
    };
    let wait_for = |needle: &str| {
        for _ in 0..500 {
            if out.text().contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("{needle} never printed: {}", out.text());
    };
    wait_for("first.example");
    recorder.record_dns(dns("second.example", 1)).unwrap();
    recorder.record_net(net("third.example", 2)).unwrap();
    recorder.flush().await.unwrap();
    wait_for("third.example");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    follower.join().unwrap().unwrap();

    let lines: Vec<serde_json::Value> = out.text().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let names: Vec<&str> =
        lines.iter().map(|l| l["qname"].as_str().or_else(|| l["domain"].as_str()).unwrap()).collect();
    assert_eq!(names, ["first.example", "second.example", "third.example"], "each row once, in order");
    assert_eq!(lines[2]["kind"], "net");
    db.close().await.unwrap();
}

#[tokio::test]
async fn text_output_is_one_escaped_line_per_row() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("session.db");
    let db = SessionDb::open(&path).unwrap();
    let mut hostile = dns("x\u{1b}]0;pwned\u{7}\n.example", 0);
    hostile.decision = Outcome::Denied;
    hostile.answers.clear();
    db.recorder().record_dns(hostile).unwrap();
    db.recorder().record_net(net("api.example", 1)).unwrap();
    db.close().await.unwrap();
    let mut out = Vec::new();
    print_logs(&path, &LogOptions::default(), &mut out, &AtomicBool::new(false)).unwrap();
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(!text.contains('\u{1b}'));
    assert!(lines[0].contains("dns  denied") && lines[0].contains("x\\u{1b}]0;pwned\\u{7}\\n.example"), "{}", lines[0]);
    assert!(
        lines[1].contains("net  allowed") && lines[1].contains("200 POST   api.example/v1/messages"),
        "{}",
        lines[1]
    );
}

#[tokio::test]
async fn reading_in_batches_keeps_time_order_across_tables() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("session.db");
    let db = SessionDb::open(&path).unwrap();
    let recorder = db.recorder();
    // More rows than one read batch, interleaved in time between the tables.
    for i in 0..2500u64 {
        recorder.record_dns_wait(dns(&format!("q{i}.example"), i * 2)).await.unwrap();
        if i.is_multiple_of(10) {
            let mut event = net("api.example", i * 2 + 1);
            event.finished = event.started;
            recorder.record_net_wait(event).await.unwrap();
        }
    }
    db.close().await.unwrap();
    let rows = read_all(&path, &LogOptions::default());
    assert_eq!(rows.len(), 2750);
    let times: Vec<i64> = rows.iter().map(LogRow::sort_ms).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "rows out of time order");
}
