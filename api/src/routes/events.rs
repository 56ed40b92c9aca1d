//! `GET /v1/sandboxes/{id}/events?after=CURSOR&limit=N`: the rows of a
//! sandbox's `session.db` (DNS queries, connections, model calls), a page
//! at a time, oldest first.
//!
//! The rows live in three tables with ids of their own, so a position is
//! three row ids, `<dns>.<net>.<ai>` (the last row of each already
//! returned): every page says where the next starts (`next`).

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use telemetry::query::{LogOptions, LogReader, LogRow};
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
    #[param(example = "3.1.0")]
    pub after: Option<String>,
    /// At most this many rows (1..=1000, default 100).
    pub limit: Option<usize>,
}

/// A page of events.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EventPage {
    /// Rows, oldest first: objects with `kind` (`dns`, `net` or `ai`) and
    /// that table's columns.
    #[schema(value_type = Vec<Object>)]
    pub events: Vec<serde_json::Value>,
    /// The `after` of the next page.
    #[schema(example = "4.1.0")]
    pub next: String,
    /// More rows were already waiting past this page.
    pub more: bool,
}

/// A position: three row ids.
pub fn parse_cursor(after: Option<&str>) -> ApiResult<[i64; 3]> {
    let Some(after) = after else { return Ok([0; 3]) };
    let bad = || ApiError::bad_request(format!("after={after:?} is not a position (<dns>.<net>.<ai>, from `next`)"));
    let mut ids = [0i64; 3];
    let mut parts = after.split('.');
    for id in &mut ids {
        *id = parts.next().and_then(|p| p.parse::<i64>().ok()).filter(|n| *n >= 0).ok_or_else(bad)?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(ids)
}

fn slot(row: &LogRow) -> (usize, i64) {
    match row {
        LogRow::Dns(r) => (0, r.id),
        LogRow::Net(r) => (1, r.id),
        LogRow::Ai(r) => (2, r.id),
    }
}

/// The time rows are ordered by (as the reader orders them).
fn time_ms(row: &LogRow) -> i64 {
    match row {
        LogRow::Dns(r) => r.time_ms,
        LogRow::Net(r) => r.finished_ms,
        LogRow::Ai(r) => r.time_ms,
    }
}

/// At most `limit` of `rows`, oldest first, taken so that each table's
/// returned rows are all of its rows read up to some id: the next page,
/// starting after those ids, then misses and repeats nothing (a merge of
/// the tables in id order, by time). Returns the page, the new position and
/// whether rows remain.
pub fn page(rows: Vec<LogRow>, start: [i64; 3], limit: usize) -> (Vec<LogRow>, [i64; 3], bool) {
    let mut tables: [std::collections::VecDeque<LogRow>; 3] = Default::default();
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
    Ok(Json(EventPage { events, next: format!("{}.{}.{}", position[0], position[1], position[2]), more }))
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
        assert_eq!(parse_cursor(None).unwrap(), [0, 0, 0]);
        assert_eq!(parse_cursor(Some("3.1.0")).unwrap(), [3, 1, 0]);
        for bad in ["", "1", "1.2", "1.2.3.4", "a.b.c", "-1.0.0", "1..2", "99999999999999999999.0.0"] {
            let e = parse_cursor(Some(bad)).unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    #[test]
    fn a_page_is_a_prefix_of_each_table_so_the_next_one_misses_nothing() {
        // Row 2 was recorded with an earlier time than row 1.
        let rows = vec![dns(2, 5), dns(1, 10), dns(3, 20)];
        let ids = |page: &[LogRow]| page.iter().map(|r| slot(r).1).collect::<Vec<_>>();
        let (page1, pos, more) = page(rows.clone(), [0; 3], 1);
        assert_eq!(ids(&page1), [1]);
        assert_eq!(pos, [1, 0, 0]);
        assert!(more);
        let (page2, pos, more) = page(rows.clone(), [0; 3], 2);
        assert_eq!(ids(&page2), [1, 2]);
        assert_eq!(pos, [2, 0, 0]);
        assert!(more);
        let (page3, pos, more) = page(rows, [0; 3], 100);
        assert_eq!(ids(&page3), [1, 2, 3]);
        assert_eq!(pos, [3, 0, 0]);
        assert!(!more);
        let (empty, pos, more) = page(Vec::new(), [7, 8, 9], 10);
        assert!(empty.is_empty() && !more);
        assert_eq!(pos, [7, 8, 9]);
    }
}
