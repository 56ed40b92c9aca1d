//! `GET /v1/sandboxes/{id}/events?after=CURSOR&limit=N`: the rows of a
//! sandbox's `session.db` (DNS queries, connections, model calls,
//! connections from the host into the guest), a page
//! at a time, oldest first; `GET /v1/sandboxes/{id}/events/stream`: the
//! same rows followed live as server-sent events.
//!
//! The rows live in four tables with ids of their own, so a position is
//! four row ids, `<dns>.<net>.<ai>.<inbound>` (the last row of each already
//! returned; a position of three, from before the fourth table, means
//! inbound 0): every page says where the next starts (`next`), every
//! streamed event carries the position after it as its SSE `id`.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::Json;
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use telemetry::query::{LogOptions, LogReader, LogRow, TABLES};
use utoipa::{IntoParams, ToSchema};

use super::{blocking, find, QueryParams, SandboxId};
use crate::error::{ApiError, ApiResult};
use crate::AppState;

/// The most rows one page holds.
pub const MAX_LIMIT: usize = 1000;
/// Rows per page unless `limit` says.
pub const DEFAULT_LIMIT: usize = 100;

/// Which page.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Where to start: a previous page's `next` (default: the first row).
    #[param(example = "3.1.0.0")]
    pub after: Option<String>,
    /// At most this many rows (1..=1000, default 100).
    pub limit: Option<usize>,
}

/// A page of events.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EventPage {
    /// Rows, oldest first: objects with `kind` (`dns`, `net`, `ai` or
    /// `inbound`) and that table's columns.
    #[schema(value_type = Vec<Object>)]
    pub events: Vec<serde_json::Value>,
    /// The `after` of the next page.
    #[schema(example = "4.1.0.0")]
    pub next: String,
    /// More rows were already waiting past this page.
    pub more: bool,
}

/// A position: a row id per table.
pub type Position = [i64; TABLES];

/// A position: four row ids (three, from before inbound rows: the fourth is 0).
pub fn parse_cursor(after: Option<&str>) -> ApiResult<Position> {
    let Some(after) = after else { return Ok([0; TABLES]) };
    let bad = || {
        ApiError::bad_request(format!("after={after:?} is not a position (<dns>.<net>.<ai>.<inbound>, from `next`)"))
    };
    let parts: Vec<&str> = after.split('.').collect();
    if parts.len() != TABLES && parts.len() != TABLES - 1 {
        return Err(bad());
    }
    let mut ids = [0i64; TABLES];
    for (id, part) in ids.iter_mut().zip(&parts) {
        *id = part.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(bad)?;
    }
    Ok(ids)
}

fn slot(row: &LogRow) -> (usize, i64) {
    row.table_and_id()
}

/// The time rows are ordered by (as the reader orders them).
fn time_ms(row: &LogRow) -> i64 {
    row.sort_ms()
}

/// At most `limit` of `rows`, oldest first, taken so that each table's
/// returned rows are all of its rows read up to some id: the next page,
/// starting after those ids, then misses and repeats nothing (a merge of
/// the tables in id order, by time). Returns the page, the new position and
/// whether rows remain.
pub fn page(rows: Vec<LogRow>, start: Position, limit: usize) -> (Vec<LogRow>, Position, bool) {
    let mut tables: [std::collections::VecDeque<LogRow>; TABLES] = Default::default();
    let mut sorted = rows;
    sorted.sort_by_key(|r| slot(r).1);
    for row in sorted {
        tables[slot(&row).0].push_back(row);
    }
    let mut position = start;
    let mut page = Vec::new();
    while page.len() < limit {
        let next = tables.iter().enumerate().filter_map(|(s, t)| t.front().map(|r| (time_ms(r), s, slot(r).1))).min();
        let Some((_, s, id)) = next else { break };
        if let Some(row) = tables[s].pop_front() {
            position[s] = id;
            page.push(row);
        }
    }
    let more = tables.iter().any(|t| !t.is_empty());
    (page, position, more)
}

/// A page of the sandbox's events (its `session.db`), running or stopped.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/events", tag = "events",
    params(("id" = String, Path, description = "The sandbox's id"), EventsQuery),
    responses((status = 200, description = "A page of rows", body = EventPage),
              (status = 400, description = "A bad position or limit", body = crate::ErrorBody),
              (status = 404, description = "No such sandbox", body = crate::ErrorBody)))]
pub async fn events(
    State(state): State<AppState>,
    SandboxId(id): SandboxId,
    QueryParams(query): QueryParams<EventsQuery>,
) -> ApiResult<Json<EventPage>> {
    let start = parse_cursor(query.after.as_deref())?;
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(format!("limit must be within 1..={MAX_LIMIT}")));
    }
    let (rows, position, more) = blocking(move || {
        let db = find(&state, &id)?.session_db();
        if !db.is_file() {
            return Ok((Vec::new(), start, false));
        }
        let mut reader = LogReader::open(&db, &LogOptions::default()).map_err(sandbox::Error::from)?;
        reader.resume_after(start);
        let (rows, waiting) = reader.read_new().map_err(sandbox::Error::from)?;
        let (rows, position, more) = page(rows, start, limit);
        Ok((rows, position, more || waiting))
    })
    .await?;
    let events = rows
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ApiError::internal(format!("encode events: {e}")))?;
    Ok(Json(EventPage { events, next: cursor(position), more }))
}

/// How often the stream looks for new rows.
const POLL: Duration = Duration::from_millis(100);
/// Events buffered for a slow client before the reader waits.
const STREAM_QUEUE: usize = 64;

/// Where a stream starts.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// Where to start: a page's `next` or an event's `id` (default: the
    /// first row). A `Last-Event-ID` header, which a reconnecting
    /// EventSource sends, takes precedence.
    #[param(example = "3.1.0.0")]
    pub after: Option<String>,
}

fn cursor(position: Position) -> String {
    position.map(|id| id.to_string()).join(".")
}

/// What the stream's reader thread sends.
fn row_event(row: &LogRow, position: Position) -> SseEvent {
    match serde_json::to_string(row) {
        Ok(json) => SseEvent::default().id(cursor(position)).data(json),
        Err(e) => error_event(&ApiError::internal(format!("encode an event: {e}"))),
    }
}

fn error_event(e: &ApiError) -> SseEvent {
    let body = crate::ErrorBody { code: e.status.as_u16(), message: e.message.clone() };
    SseEvent::default().event("error").data(serde_json::to_string(&body).unwrap_or_default())
}

/// Follow `sandbox`'s `session.db` from `start`, sending each row as it is
/// committed, until the sandbox has stopped and every row was sent (then
/// an `end` event), or the client went away. Runs on a blocking thread.
fn follow(sandbox: &sandbox::Sandbox, start: Position, events: &tokio::sync::mpsc::Sender<SseEvent>) {
    let db = sandbox.session_db();
    let mut reader: Option<LogReader> = None;
    let mut position = start;
    loop {
        if events.is_closed() {
            return;
        }
        // Whether it ran before reading: rows committed before it stopped
        // are all read on this round.
        let running = sandbox.is_running();
        if reader.is_none() && db.is_file() {
            match LogReader::open(&db, &LogOptions::default()) {
                Ok(mut r) => {
                    r.resume_after(position);
                    reader = Some(r);
                }
                Err(e) => {
                    let _ = events.blocking_send(error_event(&sandbox::Error::from(e).into()));
                    return;
                }
            }
        }
        let (rows, waiting) = match reader.as_mut().map(LogReader::read_new) {
            None => (Vec::new(), false),
            Some(Ok(read)) => read,
            Some(Err(e)) => {
                let _ = events.blocking_send(error_event(&sandbox::Error::from(e).into()));
                return;
            }
        };
        // In the order pages use, so that each event's id resumes exactly after it.
        let (rows, _, _) = page(rows, position, usize::MAX);
        let sent = !rows.is_empty();
        for row in rows {
            let (s, id) = slot(&row);
            position[s] = id;
            if events.blocking_send(row_event(&row, position)).is_err() {
                return;
            }
        }
        if !sent && !waiting {
            if !running {
                let end = SseEvent::default()
                    .event("end")
                    .id(cursor(position))
                    .data(format!("{{\"next\":\"{}\"}}", cursor(position)));
                let _ = events.blocking_send(end);
                return;
            }
            std::thread::sleep(POLL);
        }
    }
}

/// The sandbox's events followed live, as server-sent events: each row of
/// its `session.db` one `data:` JSON object (as the paged endpoint gives
/// it) whose `id:` is the position after it; an `end` event once the
/// sandbox has stopped and every row was sent; keep-alive comments.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/events/stream", tag = "events",
    params(("id" = String, Path, description = "The sandbox's id"), StreamQuery,
           ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event (its `id`)")),
    responses((status = 200, description = "`text/event-stream`: `data:` a row (with `id:` its position), then `event: end` (`data: {\"next\": position}`); `event: error` (`data:` an ErrorBody) if reading fails",
                content_type = "text/event-stream", body = String),
              (status = 400, description = "A bad position", body = crate::ErrorBody),
              (status = 404, description = "No such sandbox", body = crate::ErrorBody)))]
pub async fn events_stream(
    State(state): State<AppState>,
    SandboxId(id): SandboxId,
    headers: HeaderMap,
    QueryParams(query): QueryParams<StreamQuery>,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    let last_event_id = match headers.get("last-event-id") {
        Some(v) => Some(v.to_str().map_err(|_| ApiError::bad_request("Last-Event-ID is not text"))?.to_string()),
        None => None,
    };
    let start = parse_cursor(last_event_id.as_deref().or(query.after.as_deref()))?;
    let sandbox = blocking(move || find(&state, &id)).await?;
    let (sender, receiver) = tokio::sync::mpsc::channel(STREAM_QUEUE);
    tokio::task::spawn_blocking(move || follow(&sandbox, start, &sender));
    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
        let event = receiver.recv().await?;
        Some((Ok(event), receiver))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

#[cfg(test)]
mod tests {
    use telemetry::query::DnsRow;

    use super::*;

    fn dns(id: i64, time_ms: i64) -> LogRow {
        LogRow::Dns(DnsRow {
            id,
            time: String::new(),
            time_ms,
            qname: format!("q{id}.test"),
            qtype: "A".into(),
            rcode: "NXDOMAIN".into(),
            decision: "deny".into(),
            matched_rule: None,
            answers: Vec::new(),
            process_name: None,
            trace_id: None,
            error: None,
        })
    }

    #[test]
    fn positions_parse_and_bad_ones_are_refused() {
        assert_eq!(parse_cursor(None).unwrap(), [0, 0, 0, 0]);
        assert_eq!(parse_cursor(Some("3.1.0")).unwrap(), [3, 1, 0, 0]);
        assert_eq!(parse_cursor(Some("3.1.0.7")).unwrap(), [3, 1, 0, 7]);
        assert_eq!(cursor([3, 1, 0, 7]), "3.1.0.7");
        for bad in ["", "1", "1.2", "1.2.3.4.5", "a.b.c", "-1.0.0", "1..2", "99999999999999999999.0.0"] {
            let e = parse_cursor(Some(bad)).unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    #[test]
    fn a_page_is_a_prefix_of_each_table_so_the_next_one_misses_nothing() {
        // Row 2 was recorded with an earlier time than row 1.
        let rows = vec![dns(2, 5), dns(1, 10), dns(3, 20)];
        let ids = |page: &[LogRow]| page.iter().map(|r| slot(r).1).collect::<Vec<_>>();
        let (page1, pos, more) = page(rows.clone(), [0; 4], 1);
        assert_eq!(ids(&page1), [1]);
        assert_eq!(pos, [1, 0, 0, 0]);
        assert!(more);
        let (page2, pos, more) = page(rows.clone(), [0; 4], 2);
        assert_eq!(ids(&page2), [1, 2]);
        assert_eq!(pos, [2, 0, 0, 0]);
        assert!(more);
        let (page3, pos, more) = page(rows, [0; 4], 100);
        assert_eq!(ids(&page3), [1, 2, 3]);
        assert_eq!(pos, [3, 0, 0, 0]);
        assert!(!more);
        let (empty, pos, more) = page(Vec::new(), [7, 8, 9, 1], 10);
        assert!(empty.is_empty() && !more);
        assert_eq!(pos, [7, 8, 9, 1]);
    }
}
