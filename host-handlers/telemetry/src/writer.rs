//! The writer thread: the only connection that writes `session.db`.
//!
//! It blocks on the channel for the first message, takes whatever else is
//! already queued (up to `max_batch`), and commits all of it in one
//! transaction. Under light load every row is committed at once; under heavy
//! load transactions grow, which is what keeps SQLite fast.
//!
//! On the first failed transaction the writer records the error in
//! [`Shared::failure`] (making every recorder unhealthy), logs it, stops
//! accepting messages, counts the rows that were accepted but will not be
//! written, answers pending flush/close requests with the error and exits.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use rusqlite::{params, Connection, Transaction, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use crate::ai::ModelCall;
use crate::preview::{body_preview, truncate_str, Preview};
use crate::{
    redact, unix_ms, DnsEvent, Message, NetEvent, PriceTable, Shared, TelemetryConfig,
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

type Reply = oneshot::Sender<Result<(), TelemetryError>>;

pub(crate) struct Writer {
    conn: Connection,
    receiver: mpsc::Receiver<Message>,
    shared: Arc<Shared>,
    max_batch: usize,
    prices: PriceTable,
}

impl Writer {
    pub(crate) fn new(
        conn: Connection,
        receiver: mpsc::Receiver<Message>,
        shared: Arc<Shared>,
        config: &TelemetryConfig,
    ) -> Writer {
        Writer {
            conn,
            receiver,
            shared,
            max_batch: config.max_batch.max(1),
            prices: config.prices.clone(),
        }
    }

    pub(crate) fn run(mut self) {
        let mut batch = Vec::with_capacity(self.max_batch);
        let mut closers: Vec<Reply> = Vec::new();
        loop {
            // Once closed, what is queued is written but outstanding slots are
            // not waited for (a slot filled later is counted as rejected).
            let first = if closers.is_empty() {
                self.receiver.blocking_recv()
            } else {
                self.receiver.try_recv().ok()
            };
            let Some(first) = first else { break };
            batch.push(first);
            while batch.len() < self.max_batch {
                match self.receiver.try_recv() {
                    Ok(message) => batch.push(message),
                    Err(_) => break,
                }
            }
            let mut events = Vec::with_capacity(batch.len());
            let mut flushers = Vec::new();
            for message in batch.drain(..) {
                match message {
                    Message::Dns(_) | Message::Net(_) => events.push(message),
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

    fn commit(&mut self, events: &[Message]) -> rusqlite::Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        for event in events {
            match event {
                Message::Dns(dns) => insert_dns(&tx, dns)?,
                Message::Net(net) => insert_net(&tx, net, &self.prices)?,
                Message::Flush(_) | Message::Close(_) => {}
            }
        }
        tx.commit()
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
                Message::Dns(_) | Message::Net(_) => lost += 1,
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
    let answers: Vec<&str> = event
        .answers
        .iter()
        .take(MAX_ANSWERS)
        .map(|a| text(a))
        .collect();
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
            (
                truncate_str(name, MAX_HEADER_VALUE),
                truncate_str(&value, MAX_HEADER_VALUE).to_owned(),
            )
        })
        .collect();
    serde_json::to_string(&stored).unwrap_or_else(|_| "[]".into())
}

fn insert_net(tx: &Transaction<'_>, event: &NetEvent, prices: &PriceTable) -> rusqlite::Result<()> {
    let started = unix_ms(event.started);
    let finished = unix_ms(event.finished);
    let duration = finished.saturating_sub(started).max(0);
    let path = event.path.as_deref().map(redact::path);
    let (request_preview, request_binary) = preview_value(&event.request_body_preview);
    let (response_preview, response_binary) = preview_value(&event.response_body_preview);
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
        path.as_deref().map(text),
        event.status_code,
        event.decision.as_str(),
        opt_text(event.matched_rule.as_ref()),
        sql_int(event.bytes_sent),
        sql_int(event.bytes_received),
        headers_json(&event.request_headers),
        request_preview,
        request_binary,
        response_preview,
        response_binary,
        opt_text(event.error.as_ref()),
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
    let cost = call
        .estimated_cost_usd
        .filter(|c| c.is_finite())
        .or_else(|| prices.estimate(call));
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
