//! The writer thread: the only connection that writes `session.db`.
//!
//! It blocks on the channel for the first message, takes whatever else is
//! already queued (up to `max_batch`), and commits all of it in one
//! transaction. Under light load every row is committed at once; under heavy
//! load transactions grow, which is what keeps SQLite fast. When rows come
//! one by one but close together (many small requests), the writer waits
//! [`GATHER`] for the next ones before committing: one transaction (and one
//! wake-up of this thread) for many rows, where each row would otherwise pay
//! for its own, rewriting the same pages to the WAL. A flush or close is not
//! delayed.
//!
//! Rows are stored in full until `session.db` nears its size budget, then
//! counted in summaries (see [`crate::budget`]). A blocked request's row keeps
//! no headers and no body previews.
//!
//! On the first failed transaction the writer records the error in
//! [`Shared::failure`] (making every recorder unhealthy), logs it, stops
//! accepting messages, counts the rows that were accepted but will not be
//! written, answers pending flush/close requests with the error and exits.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, Transaction, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use crate::ai::ModelCall;
use crate::budget::{Budget, Counted, Stage, MAX_TRANSACTION_BYTES};
use crate::preview::{body_preview, truncate_str, Preview};
use crate::{
    redact, unix_ms, DnsEvent, InboundEvent, Message, NetEvent, Outcome, PriceTable, Shared, TelemetryConfig,
    TelemetryError,
};

/// Longest stored text field (domain, path, rule, error, ...).
const MAX_TEXT: usize = 8 * 1024;
/// Longest stored header value.
const MAX_HEADER_VALUE: usize = 1024;
/// Most headers stored per request.
const MAX_HEADERS: usize = 128;
/// Most DNS answers stored per query.
const MAX_ANSWERS: usize = 64;
/// Most tool calls stored per model call.
const MAX_TOOL_CALLS: usize = 1024;
/// Longest path and error stored for a denied request or query.
const MAX_DENIED_TEXT: usize = 1024;

type Reply = oneshot::Sender<Result<(), TelemetryError>>;

/// How long a small batch waits for more rows before it is committed. Rows
/// are queued before the actions they record are carried out, so this delays
/// only when they reach the file (and a reader), never a request.
const GATHER: Duration = Duration::from_millis(2);
/// A batch this small waits [`GATHER`]; a larger one shows the writer is
/// already behind, and is committed at once.
const GATHER_BELOW: usize = 64;

pub(crate) struct Writer {
    conn: Connection,
    receiver: mpsc::Receiver<Message>,
    shared: Arc<Shared>,
    max_batch: usize,
    prices: PriceTable,
    budget: Budget,
}

impl Writer {
    pub(crate) fn new(
        conn: Connection,
        receiver: mpsc::Receiver<Message>,
        shared: Arc<Shared>,
        config: &TelemetryConfig,
    ) -> Writer {
        let page_size: i64 = conn.pragma_query_value(None, "page_size", |row| row.get(0)).unwrap_or(4096);
        let budget = Budget::new(config.max_db_bytes, u64::try_from(page_size).unwrap_or(4096));
        Writer { conn, receiver, shared, max_batch: config.max_batch.max(1), prices: config.prices.clone(), budget }
    }

    pub(crate) fn run(mut self) {
        let mut batch = Vec::with_capacity(self.max_batch);
        let mut closers: Vec<Reply> = Vec::new();
        loop {
            // Once closed, what is queued is written but outstanding slots are
            // not waited for (a slot filled later is counted as rejected).
            let first = if closers.is_empty() { self.receiver.blocking_recv() } else { self.receiver.try_recv().ok() };
            let Some(first) = first else { break };
            let gather = is_event(&first) && closers.is_empty();
            batch.push(first);
            self.drain_into(&mut batch);
            if gather && batch.len() < GATHER_BELOW.min(self.max_batch) && only_events(&batch) {
                let deadline = Instant::now() + GATHER;
                // Sleep rather than wait on the channel: senders do not wake
                // this thread row by row meanwhile.
                while let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) {
                    std::thread::sleep(left);
                }
                self.drain_into(&mut batch);
            }
            let mut events = Vec::with_capacity(batch.len());
            let mut flushers = Vec::new();
            for message in batch.drain(..) {
                match message {
                    Message::Dns(_) | Message::Net(_) | Message::Inbound(_) => events.push(message),
                    Message::Flush(reply) => flushers.push(reply),
                    Message::Close(reply) => {
                        // Refuse new rows; what is already queued is still written.
                        self.shared.closed.store(true, Ordering::Release);
                        self.receiver.close();
                        closers.push(reply);
                    }
                }
            }
            match self.commit(&events) {
                Ok(()) => {
                    let written = u64::try_from(events.len()).unwrap_or(u64::MAX);
                    self.shared.committed.fetch_add(written, Ordering::AcqRel);
                    for reply in flushers {
                        // A requester that stopped waiting does not need the answer.
                        let _ = reply.send(Ok(()));
                    }
                }
                Err(e) => {
                    flushers.append(&mut closers);
                    self.fail(&e, events.len(), flushers);
                    return;
                }
            }
        }
        for reply in closers {
            let _ = reply.send(Ok(()));
        }
        tracing::debug!(
            path = %self.shared.path.display(),
            committed = self.shared.committed.load(Ordering::Acquire),
            "session database writer stopped"
        );
    }

    /// Move what is queued into `batch`, up to `max_batch` messages.
    fn drain_into(&mut self, batch: &mut Vec<Message>) {
        while batch.len() < self.max_batch {
            match self.receiver.try_recv() {
                Ok(message) => batch.push(message),
                Err(_) => break,
            }
        }
    }

    fn commit(&mut self, events: &[Message]) -> rusqlite::Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let result = self.write(events);
        if result.is_err() {
            self.budget.discard_pending();
        }
        result
    }

    /// Store `events` in full or count them, in transactions of at most
    /// [`MAX_TRANSACTION_BYTES`].
    fn write(&mut self, events: &[Message]) -> rusqlite::Result<()> {
        let Writer { conn, budget, prices, shared, .. } = self;
        let mut tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // The size is measured once per transaction and after each stored
        // row: only stored rows change it (counted ones are written at the
        // end, by `write_counts`).
        let mut used = budget.used(&tx)?;
        let mut start = used;
        let mut summarised = 0u64;
        for event in events {
            let (full, entered) = match event {
                Message::Dns(dns) => budget.admit(used, dns_size(dns)),
                Message::Net(net) => budget.admit(used, net_size(net)),
                Message::Inbound(inbound) => budget.admit(used, inbound_size(inbound)),
                Message::Flush(_) | Message::Close(_) => continue,
            };
            if let Some(stage) = entered {
                announce(shared, stage);
            }
            match event {
                Message::Dns(dns) if full => insert_dns(&tx, dns)?,
                Message::Net(net) if full => insert_net(&tx, net, prices)?,
                Message::Inbound(inbound) if full => insert_inbound(&tx, inbound)?,
                Message::Dns(dns) => {
                    summarised += 1;
                    budget.count(&Counted {
                        time_ms: unix_ms(dns.time),
                        kind: "dns",
                        decision: dns.decision.as_str(),
                        host: &dns.qname,
                    });
                }
                Message::Net(net) => {
                    summarised += 1;
                    budget.count(&Counted {
                        time_ms: unix_ms(net.started),
                        kind: "net",
                        decision: net.decision.as_str(),
                        host: &net.domain,
                    });
                }
                Message::Inbound(inbound) => {
                    summarised += 1;
                    budget.count(&Counted {
                        time_ms: unix_ms(inbound.started),
                        kind: "inbound",
                        decision: inbound.decision.as_str(),
                        host: &inbound.listener,
                    });
                }
                Message::Flush(_) | Message::Close(_) => {}
            }
            if !full {
                continue;
            }
            used = budget.used(&tx)?;
            if used.saturating_sub(start) >= MAX_TRANSACTION_BYTES {
                tx.commit()?;
                tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                start = used;
            }
        }
        if let Some(stage) = budget.write_counts(&tx)? {
            announce(shared, stage);
        }
        tx.commit()?;
        shared.summarised.fetch_add(summarised, Ordering::AcqRel);
        Ok(())
    }

    /// Make the failure visible and permanent, and account for every row
    /// that was accepted but will not be written.
    fn fail(mut self, error: &rusqlite::Error, failed_batch: usize, mut replies: Vec<Reply>) {
        let text = format!("{}: {error}", self.shared.path.display());
        // Only this thread sets the failure, and it does so once.
        let _ = self.shared.failure.set(text.clone());
        self.receiver.close();
        let mut lost = failed_batch;
        while let Ok(message) = self.receiver.try_recv() {
            match message {
                Message::Dns(_) | Message::Net(_) | Message::Inbound(_) => lost += 1,
                Message::Flush(reply) | Message::Close(reply) => replies.push(reply),
            }
        }
        tracing::error!(
            path = %self.shared.path.display(),
            error = %error,
            lost_events = lost,
            committed_events = self.shared.committed.load(Ordering::Acquire),
            "session database write failed; the events of the failed transaction and those queued after it \
             are not recorded and recording has stopped"
        );
        for reply in replies {
            let _ = reply.send(Err(TelemetryError::WriterFailed(text.clone())));
        }
    }
}

/// Tell the sandbox that the database has reached a stage of its budget.
/// Whether `batch` holds rows only (no flush or close waiting for an answer).
fn only_events(batch: &[Message]) -> bool {
    batch.iter().all(is_event)
}

/// Whether `message` is a row (not a flush or close).
fn is_event(message: &Message) -> bool {
    matches!(message, Message::Dns(_) | Message::Net(_) | Message::Inbound(_))
}

fn announce(shared: &Shared, stage: Stage) {
    shared.over_budget.store(true, Ordering::Release);
    match stage {
        Stage::Full => {}
        Stage::Summaries => tracing::warn!(
            path = %shared.path.display(),
            "session database is near its size budget: events are now counted per second, \
             kind, decision and host in event_summaries instead of stored one row each"
        ),
        Stage::Totals => tracing::warn!(
            path = %shared.path.display(),
            "session database has used its size budget: events are now only counted in \
             running totals per kind and decision"
        ),
    }
}

/// About how many bytes a DNS row takes (an overestimate).
fn dns_size(event: &DnsEvent) -> u64 {
    let texts = [
        Some(&event.qname),
        Some(&event.qtype),
        Some(&event.rcode),
        event.matched_rule.as_ref(),
        event.process_name.as_ref(),
        event.trace_id.as_ref(),
        event.error.as_ref(),
    ];
    let answers: usize = event.answers.iter().take(MAX_ANSWERS).map(|a| a.len().min(MAX_TEXT) + 4).sum();
    // The qname is stored twice: in the row and in its index.
    let qname = event.qname.len().min(MAX_TEXT);
    let bytes = 128 + qname + answers + texts.iter().flatten().map(|t| t.len().min(MAX_TEXT)).sum::<usize>();
    u64::try_from(bytes).unwrap_or(u64::MAX)
}

/// About how many bytes a network row and its model call take (an overestimate).
fn net_size(event: &NetEvent) -> u64 {
    let texts = [
        Some(&event.domain),
        Some(&event.domain),
        event.sni.as_ref(),
        event.method.as_ref(),
        event.path.as_ref(),
        event.matched_rule.as_ref(),
        event.error.as_ref(),
        event.ip.as_ref(),
        event.mode.as_ref(),
    ];
    let mut bytes = 256 + texts.iter().flatten().map(|t| t.len().min(MAX_TEXT)).sum::<usize>();
    if event.decision != Outcome::Denied {
        bytes += event
            .request_headers
            .iter()
            .take(MAX_HEADERS)
            .map(|(n, v)| n.len().min(MAX_HEADER_VALUE) + v.len().min(MAX_HEADER_VALUE) + 8)
            .sum::<usize>();
        bytes += event.request_body_preview.len().min(crate::preview::PREVIEW_LIMIT) * 2;
        bytes += event.response_body_preview.len().min(crate::preview::PREVIEW_LIMIT) * 2;
    }
    if let Some(call) = &event.model_call {
        bytes += 512 + call.problems.iter().map(String::len).sum::<usize>();
        bytes += call
            .tool_calls
            .iter()
            .take(MAX_TOOL_CALLS)
            .map(|t| 128 + t.name.len().min(MAX_TEXT) + t.arguments_preview.len().min(crate::preview::PREVIEW_LIMIT))
            .sum::<usize>();
    }
    u64::try_from(bytes).unwrap_or(u64::MAX)
}

/// About how many bytes an inbound row takes (an overestimate).
fn inbound_size(event: &InboundEvent) -> u64 {
    let texts = [Some(&event.listener), event.peer.as_ref(), event.error.as_ref()];
    let bytes = 128 + texts.iter().flatten().map(|t| t.len().min(MAX_TEXT)).sum::<usize>();
    u64::try_from(bytes).unwrap_or(u64::MAX)
}

fn insert_inbound(tx: &Transaction<'_>, event: &InboundEvent) -> rusqlite::Result<()> {
    let started = unix_ms(event.started);
    let finished = unix_ms(event.finished);
    tx.prepare_cached(
        "INSERT INTO inbound_events (started_ms, finished_ms, duration_ms, listener, peer, guest_port, decision, \
         bytes_to_guest, bytes_from_guest, error) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?
    .execute(params![
        started,
        finished,
        finished.saturating_sub(started).max(0),
        text(&event.listener),
        opt_text(event.peer.as_ref()),
        event.guest_port,
        event.decision.as_str(),
        sql_int(event.bytes_to_guest),
        sql_int(event.bytes_from_guest),
        opt_text(event.error.as_ref()),
    ])?;
    Ok(())
}

fn text(value: &str) -> &str {
    truncate_str(value, MAX_TEXT)
}

fn opt_text(value: Option<&String>) -> Option<&str> {
    value.map(|v| text(v))
}

fn sql_int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn insert_dns(tx: &Transaction<'_>, event: &DnsEvent) -> rusqlite::Result<()> {
    let answers: Vec<&str> = event.answers.iter().take(MAX_ANSWERS).map(|a| text(a)).collect();
    let answers = serde_json::to_string(&answers).unwrap_or_else(|_| "[]".into());
    tx.prepare_cached(
        "INSERT INTO dns_events (time_ms, qname, qtype, rcode, decision, matched_rule, answers, \
         process_name, trace_id, error) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?
    .execute(params![
        unix_ms(event.time),
        text(&event.qname),
        text(&event.qtype),
        text(&event.rcode),
        event.decision.as_str(),
        opt_text(event.matched_rule.as_ref()),
        answers,
        opt_text(event.process_name.as_ref()),
        opt_text(event.trace_id.as_ref()),
        opt_text(event.error.as_ref()),
    ])?;
    Ok(())
}

/// A preview as an SQL value and its binary flag.
fn preview_value(body: &[u8]) -> (rusqlite::types::Value, bool) {
    use rusqlite::types::Value;
    match body_preview(body) {
        Preview::Empty => (Value::Null, false),
        Preview::Text(t) => (Value::Text(t.to_owned()), false),
        Preview::Binary(b) => (Value::Blob(b.to_vec()), true),
    }
}

fn headers_json(headers: &[(String, String)]) -> String {
    let stored: Vec<(&str, String)> = headers
        .iter()
        .take(MAX_HEADERS)
        .map(|(name, value)| {
            let value = redact::header_value(name, value);
            (truncate_str(name, MAX_HEADER_VALUE), truncate_str(&value, MAX_HEADER_VALUE).to_owned())
        })
        .collect();
    serde_json::to_string(&stored).unwrap_or_else(|_| "[]".into())
}

fn insert_net(tx: &Transaction<'_>, event: &NetEvent, prices: &PriceTable) -> rusqlite::Result<()> {
    let started = unix_ms(event.started);
    let finished = unix_ms(event.finished);
    let duration = finished.saturating_sub(started).max(0);
    let path = event.path.as_deref().map(redact::path);
    // A blocked request keeps what identifies it, not what it carried: a
    // guest's refused requests cost little room however many it sends.
    let denied = event.decision == Outcome::Denied;
    let limit = if denied { MAX_DENIED_TEXT } else { MAX_TEXT };
    let (headers, request_body, response_body): (&[(String, String)], &[u8], &[u8]) = if denied {
        (&[], &[], &[])
    } else {
        (&event.request_headers, &event.request_body_preview, &event.response_body_preview)
    };
    let (request_preview, request_binary) = preview_value(request_body);
    let (response_preview, response_binary) = preview_value(response_body);
    tx.prepare_cached(
        "INSERT INTO net_events (started_ms, finished_ms, duration_ms, domain, sni, method, path, \
         status_code, decision, matched_rule, bytes_sent, bytes_received, request_headers, \
         request_body_preview, request_body_binary, response_body_preview, response_body_binary, error, port, ip, mode) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21)",
    )?
    .execute(params![
        started,
        finished,
        duration,
        text(&event.domain),
        opt_text(event.sni.as_ref()),
        opt_text(event.method.as_ref()),
        path.as_deref().map(|p| truncate_str(p, limit)),
        event.status_code,
        event.decision.as_str(),
        opt_text(event.matched_rule.as_ref()),
        sql_int(event.bytes_sent),
        sql_int(event.bytes_received),
        headers_json(headers),
        request_preview,
        request_binary,
        response_preview,
        response_binary,
        event.error.as_deref().map(|e| truncate_str(e, limit)),
        event.port,
        opt_text(event.ip.as_ref()),
        opt_text(event.mode.as_ref()),
    ])?;
    if let Some(call) = &event.model_call {
        let net_event_id = tx.last_insert_rowid();
        insert_model_call(tx, net_event_id, duration, call, prices)?;
    }
    Ok(())
}

fn insert_model_call(
    tx: &Transaction<'_>,
    net_event_id: i64,
    duration_ms: i64,
    call: &ModelCall,
    prices: &PriceTable,
) -> rusqlite::Result<()> {
    let cost = call.estimated_cost_usd.filter(|c| c.is_finite()).or_else(|| prices.estimate(call));
    let problems = (!call.problems.is_empty()).then(|| call.problems.join("; "));
    tx.prepare_cached(
        "INSERT INTO model_calls (net_event_id, provider, model, input_tokens, output_tokens, \
         cache_read_tokens, cache_write_tokens, stop_reason, estimated_cost_usd, duration_ms, complete, problems) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?
    .execute(params![
        net_event_id,
        text(&call.provider),
        opt_text(call.model.as_ref()),
        call.input_tokens.map(sql_int),
        call.output_tokens.map(sql_int),
        call.cache_read_tokens.map(sql_int),
        call.cache_write_tokens.map(sql_int),
        opt_text(call.stop_reason.as_ref()),
        cost,
        duration_ms,
        call.complete,
        problems.as_deref().map(text),
    ])?;
    let model_call_id = tx.last_insert_rowid();
    let mut insert = tx.prepare_cached(
        "INSERT INTO tool_calls (model_call_id, position, call_id, name, arguments_preview) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for (position, tool) in call.tool_calls.iter().take(MAX_TOOL_CALLS).enumerate() {
        insert.execute(params![
            model_call_id,
            sql_int(u64::try_from(position).unwrap_or(u64::MAX)),
            opt_text(tool.call_id.as_ref()),
            text(&tool.name),
            truncate_str(&tool.arguments_preview, crate::preview::PREVIEW_LIMIT),
        ])?;
    }
    Ok(())
}
