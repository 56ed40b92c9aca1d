//! Reading `session.db`: the library side of `sandbox logs`.
//!
//! [`LogReader`] returns rows newer than the last ones it returned (by row id,
//! per table), so the same code serves a one-off listing and `--follow`,
//! which polls. It opens the database read-only; in WAL mode reading never
//! blocks the sandbox's writer. [`print_logs`] writes the rows as aligned
//! text lines or as JSON lines (one object per row, `"kind"` saying which).
//!
//! Everything in the database came from the guest or an upstream server:
//! text output escapes control and bidirectional-override characters so a
//! hostile query name cannot rewrite the user's terminal.

use std::fmt::Write as _;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use base64::Engine as _;
use rusqlite::types::Value as SqlValue;
use rusqlite::{params, Connection, Row};
use serde::{Deserialize, Serialize};

use crate::{schema, TelemetryError};

/// Rows read per table per round.
const BATCH: usize = 1000;

/// SQL expression formatting a `*_ms` column as an RFC 3339 UTC timestamp.
macro_rules! iso_time {
    ($column:literal) => {
        concat!("strftime('%Y-%m-%dT%H:%M:%fZ', ", $column, " / 1000.0, 'unixepoch')")
    };
}

/// What `sandbox logs` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogOptions {
    /// DNS queries. When none of `dns`, `net`, `ai`, `inbound` is set, all are shown.
    pub dns: bool,
    /// Network requests.
    pub net: bool,
    /// Model calls with their tool calls.
    pub ai: bool,
    /// Connections from the host into the guest (port forwards).
    pub inbound: bool,
    /// JSON lines instead of text.
    pub json: bool,
    /// Keep polling for new rows until stopped.
    pub follow: bool,
    /// How often `follow` polls.
    pub poll_interval: Duration,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            dns: false,
            net: false,
            ai: false,
            inbound: false,
            json: false,
            follow: false,
            poll_interval: Duration::from_millis(500),
        }
    }
}

/// A row of `dns_events`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DnsRow {
    pub id: i64,
    pub time: String,
    pub time_ms: i64,
    pub qname: String,
    pub qtype: String,
    pub rcode: String,
    pub decision: String,
    pub matched_rule: Option<String>,
    pub answers: Vec<String>,
    pub process_name: Option<String>,
    pub trace_id: Option<String>,
    pub error: Option<String>,
}

/// A row of `net_events`. Binary body previews are base64 in JSON output.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NetRow {
    pub id: i64,
    pub started: String,
    pub started_ms: i64,
    pub finished_ms: i64,
    pub duration_ms: i64,
    pub domain: String,
    pub port: Option<i64>,
    pub ip: Option<String>,
    pub mode: Option<String>,
    pub sni: Option<String>,
    pub method: Option<String>,
    pub path: Option<String>,
    pub status_code: Option<i64>,
    pub decision: String,
    pub matched_rule: Option<String>,
    pub bytes_sent: i64,
    pub bytes_received: i64,
    pub request_headers: Vec<(String, String)>,
    pub request_body_preview: Option<String>,
    pub request_body_binary: bool,
    pub response_body_preview: Option<String>,
    pub response_body_binary: bool,
    pub error: Option<String>,
}

/// A row of `tool_calls`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCallRow {
    pub call_id: Option<String>,
    pub name: String,
    pub arguments_preview: String,
}

/// A row of `model_calls` with its tool calls and the request's domain.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelCallRow {
    pub id: i64,
    pub net_event_id: i64,
    /// When the response ended.
    pub time: String,
    pub time_ms: i64,
    pub domain: String,
    pub provider: String,
    pub model: Option<String>,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub cache_read_tokens: Option<i64>,
    pub cache_write_tokens: Option<i64>,
    pub stop_reason: Option<String>,
    pub estimated_cost_usd: Option<f64>,
    pub duration_ms: i64,
    pub complete: bool,
    pub problems: Option<String>,
    pub tool_calls: Vec<ToolCallRow>,
}

/// A row of `inbound_events`: a connection from the host into the guest.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InboundRow {
    pub id: i64,
    pub started: String,
    pub started_ms: i64,
    pub finished_ms: i64,
    pub duration_ms: i64,
    /// The forward's host address it came in on (or `connect_port`).
    pub listener: String,
    /// The client's address.
    pub peer: Option<String>,
    pub guest_port: i64,
    pub decision: String,
    pub bytes_to_guest: i64,
    pub bytes_from_guest: i64,
    pub error: Option<String>,
}

/// One row of any table.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum LogRow {
    Dns(DnsRow),
    Net(NetRow),
    Ai(ModelCallRow),
    Inbound(InboundRow),
}

/// The tables, in the order rows of equal time are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dns,
    Net,
    Ai,
    Inbound,
}

/// How many tables rows come from.
pub const TABLES: usize = 4;

const KINDS: [Kind; TABLES] = [Kind::Dns, Kind::Net, Kind::Ai, Kind::Inbound];

/// The first schema version with `inbound_events`.
const INBOUND_SINCE: i64 = 4;

impl LogRow {
    fn kind(&self) -> Kind {
        match self {
            LogRow::Dns(_) => Kind::Dns,
            LogRow::Net(_) => Kind::Net,
            LogRow::Ai(_) => Kind::Ai,
            LogRow::Inbound(_) => Kind::Inbound,
        }
    }

    /// Which table the row is from (its index in a position: dns, net,
    /// ai, inbound), and its id there.
    pub fn table_and_id(&self) -> (usize, i64) {
        (self.kind() as usize, self.id())
    }

    fn id(&self) -> i64 {
        match self {
            LogRow::Dns(r) => r.id,
            LogRow::Net(r) => r.id,
            LogRow::Ai(r) => r.id,
            LogRow::Inbound(r) => r.id,
        }
    }

    /// The time rows are ordered by: when the row was recorded (a network
    /// row and its model call, and an inbound row, are recorded when the
    /// connection ends).
    pub fn sort_ms(&self) -> i64 {
        match self {
            LogRow::Dns(r) => r.time_ms,
            LogRow::Net(r) => r.finished_ms,
            LogRow::Ai(r) => r.time_ms,
            LogRow::Inbound(r) => r.finished_ms,
        }
    }

    /// The row as one line of text, escaped for a terminal.
    pub fn to_text(&self) -> String {
        let opt = |v: &Option<String>| v.as_deref().map(printable).unwrap_or_default();
        let mut line = String::new();
        // Writing to a String cannot fail.
        let _ = match self {
            LogRow::Dns(r) => write!(
                line,
                "{}  dns  {:<7}  {:<6} {}  {}",
                r.time,
                r.decision,
                printable(&r.qtype),
                printable(&r.qname),
                printable(&r.rcode)
            ),
            LogRow::Net(r) => write!(
                line,
                "{}  net  {:<7}  {:>3} {:<6} {}{}{}  sent={} received={} {}ms",
                r.started,
                r.decision,
                r.status_code.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
                r.method.as_deref().map(printable).unwrap_or_else(|| "-".into()),
                printable(&r.domain),
                r.port.filter(|&port| port != 443).map(|port| format!(":{port}")).unwrap_or_default(),
                opt(&r.path),
                r.bytes_sent,
                r.bytes_received,
                r.duration_ms
            ),
            LogRow::Ai(r) => write!(
                line,
                "{}  ai   {} {}  tokens in={} out={} cache_read={} cache_write={}  cost={}  stop={}",
                r.time,
                printable(&r.provider),
                r.model.as_deref().map(printable).unwrap_or_else(|| "?".into()),
                count(r.input_tokens),
                count(r.output_tokens),
                count(r.cache_read_tokens),
                count(r.cache_write_tokens),
                r.estimated_cost_usd.map(|c| format!("${c:.6}")).unwrap_or_else(|| "?".into()),
                r.stop_reason.as_deref().map(printable).unwrap_or_else(|| "-".into()),
            ),
            LogRow::Inbound(r) => write!(
                line,
                "{}  in   {:<7}  {} -> {} -> guest:{}  to_guest={} from_guest={} {}ms",
                r.started,
                r.decision,
                r.peer.as_deref().map(printable).unwrap_or_else(|| "-".into()),
                printable(&r.listener),
                r.guest_port,
                r.bytes_to_guest,
                r.bytes_from_guest,
                r.duration_ms
            ),
        };
        let mut extra = |label: &str, value: String| {
            if !value.is_empty() {
                let _ = write!(line, "  {label}={value}");
            }
        };
        match self {
            LogRow::Dns(r) => {
                extra("rule", opt(&r.matched_rule));
                extra("answers", printable(&r.answers.join(", ")));
                extra("process", opt(&r.process_name));
                extra("trace", opt(&r.trace_id));
                extra("error", opt(&r.error));
            }
            LogRow::Net(r) => {
                extra("mode", r.mode.as_deref().filter(|mode| *mode != "inspect").map(printable).unwrap_or_default());
                extra("ip", opt(&r.ip));
                extra("sni", if r.sni.as_deref() == Some(r.domain.as_str()) { String::new() } else { opt(&r.sni) });
                extra("rule", opt(&r.matched_rule));
                extra("error", opt(&r.error));
            }
            LogRow::Ai(r) => {
                let tools: Vec<String> = r
                    .tool_calls
                    .iter()
                    .map(|t| {
                        format!(
                            "{}({})",
                            printable(&t.name),
                            printable(crate::preview::truncate_str(&t.arguments_preview, 60))
                        )
                    })
                    .collect();
                extra("tools", tools.join(", "));
                if !r.complete {
                    extra("incomplete", "yes".into());
                }
                extra("problems", opt(&r.problems));
            }
            LogRow::Inbound(r) => extra("error", opt(&r.error)),
        }
        line
    }
}

fn count(n: Option<i64>) -> String {
    n.map(|n| n.to_string()).unwrap_or_else(|| "?".into())
}

/// `text` with control and bidirectional-formatting characters escaped.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let dangerous =
            c.is_control() || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if dangerous {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Reads rows newer than those already returned.
#[derive(Debug)]
pub struct LogReader {
    conn: Connection,
    path: String,
    selected: [bool; TABLES],
    last_id: [i64; TABLES],
}

impl LogReader {
    /// Open `path` read-only for the tables `options` selects.
    pub fn open(path: &Path, options: &LogOptions) -> Result<LogReader, TelemetryError> {
        if !path.exists() {
            return Err(TelemetryError::NotUsable { path: path.display().to_string(), what: "no such file".into() });
        }
        let conn = schema::open_for_reading(path)?;
        let err = |source| TelemetryError::Query { path: path.display().to_string(), source };
        let version: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0)).map_err(err)?;
        let all = !(options.dns || options.net || options.ai || options.inbound);
        Ok(LogReader {
            conn,
            path: path.display().to_string(),
            selected: [
                all || options.dns,
                all || options.net,
                all || options.ai,
                // A database from before the table has no such rows.
                (all || options.inbound) && version >= INBOUND_SINCE,
            ],
            last_id: [0; TABLES],
        })
    }

    /// Start after these row ids (of the DNS, network, model-call and
    /// inbound tables): the rows read next are those recorded after them. A reader that pages (the HTTP API) resumes here.
    pub fn resume_after(&mut self, position: [i64; TABLES]) {
        self.last_id = position;
    }

    /// Rows added since the previous call, ordered by time. The second value
    /// is true when more rows are waiting (a round reads at most a batch per
    /// table), so the caller should call again before pausing.
    pub fn read_new(&mut self) -> Result<(Vec<LogRow>, bool), TelemetryError> {
        let mut per_kind: Vec<Vec<LogRow>> = Vec::with_capacity(TABLES);
        for (slot, kind) in KINDS.iter().enumerate() {
            let rows = if self.selected[slot] { self.fetch(*kind, self.last_id[slot])? } else { Vec::new() };
            per_kind.push(rows);
        }
        // When a table returned a full batch, rows of other tables later than
        // its last row wait for the next round, so the merged order holds.
        let limiting = per_kind
            .iter()
            .enumerate()
            .filter(|(_, rows)| rows.len() >= BATCH)
            .filter_map(|(slot, rows)| rows.last().map(|r| (slot, r.sort_ms())))
            .min_by_key(|(_, ms)| *ms);
        let more = limiting.is_some();
        let mut out = Vec::new();
        for (slot, rows) in per_kind.into_iter().enumerate() {
            let keep: Vec<LogRow> = match limiting {
                Some((limit_slot, cutoff)) if limit_slot != slot => {
                    rows.into_iter().take_while(|r| r.sort_ms() <= cutoff).collect()
                }
                _ => rows,
            };
            if let Some(last) = keep.last() {
                self.last_id[slot] = last.id();
            }
            out.extend(keep);
        }
        out.sort_by_key(|r| (r.sort_ms(), r.kind() as u8, r.id()));
        Ok((out, more))
    }

    fn fetch(&self, kind: Kind, after: i64) -> Result<Vec<LogRow>, TelemetryError> {
        let err = |source| TelemetryError::Query { path: self.path.clone(), source };
        let limit = i64::try_from(BATCH).unwrap_or(i64::MAX);
        let (sql, map): (&str, fn(&Row<'_>) -> rusqlite::Result<LogRow>) = match kind {
            Kind::Dns => (DNS_SQL, dns_row),
            Kind::Net => (NET_SQL, net_row),
            Kind::Ai => (AI_SQL, ai_row),
            Kind::Inbound => (INBOUND_SQL, inbound_row),
        };
        let mut statement = self.conn.prepare_cached(sql).map_err(err)?;
        let rows = statement.query_map(params![after, limit], map).map_err(err)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(err)
    }
}

const DNS_SQL: &str = concat!(
    "SELECT id, ",
    iso_time!("time_ms"),
    ", time_ms, qname, qtype, rcode, decision, matched_rule, answers, process_name, trace_id, error \
     FROM dns_events WHERE id > ?1 ORDER BY id LIMIT ?2"
);

const NET_SQL: &str = concat!(
    "SELECT id, ",
    iso_time!("started_ms"),
    ", started_ms, finished_ms, duration_ms, domain, sni, method, path, status_code, decision, \
     matched_rule, bytes_sent, bytes_received, request_headers, request_body_preview, request_body_binary, \
     response_body_preview, response_body_binary, error, port, ip, mode FROM net_events WHERE id > ?1 ORDER BY id LIMIT ?2"
);

const AI_SQL: &str = concat!(
    "SELECT m.id, m.net_event_id, ",
    iso_time!("n.finished_ms"),
    ", n.finished_ms, n.domain, m.provider, m.model, m.input_tokens, m.output_tokens, \
     m.cache_read_tokens, m.cache_write_tokens, m.stop_reason, m.estimated_cost_usd, m.duration_ms, \
     m.complete, m.problems, \
     (SELECT json_group_array(json_object('call_id', t.call_id, 'name', t.name, \
             'arguments_preview', t.arguments_preview)) \
        FROM (SELECT * FROM tool_calls WHERE model_call_id = m.id ORDER BY position) AS t) \
     FROM model_calls m JOIN net_events n ON n.id = m.net_event_id \
     WHERE m.id > ?1 ORDER BY m.id LIMIT ?2"
);

const INBOUND_SQL: &str = concat!(
    "SELECT id, ",
    iso_time!("started_ms"),
    ", started_ms, finished_ms, duration_ms, listener, peer, guest_port, decision, bytes_to_guest, \
     bytes_from_guest, error FROM inbound_events WHERE id > ?1 ORDER BY id LIMIT ?2"
);

/// A JSON text column, tolerating what another writer may have put there.
fn json_column<T: for<'de> Deserialize<'de> + Default>(text: Option<String>) -> T {
    text.and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
}

/// A body preview column: text as is, a blob as base64.
fn preview_column(value: SqlValue) -> Option<String> {
    match value {
        SqlValue::Text(text) => Some(text),
        SqlValue::Blob(bytes) => Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
        SqlValue::Null => None,
        SqlValue::Integer(n) => Some(n.to_string()),
        SqlValue::Real(f) => Some(f.to_string()),
    }
}

fn dns_row(row: &Row<'_>) -> rusqlite::Result<LogRow> {
    Ok(LogRow::Dns(DnsRow {
        id: row.get(0)?,
        time: row.get::<_, Option<String>>(1)?.unwrap_or_default(),
        time_ms: row.get(2)?,
        qname: row.get(3)?,
        qtype: row.get(4)?,
        rcode: row.get(5)?,
        decision: row.get(6)?,
        matched_rule: row.get(7)?,
        answers: json_column(row.get(8)?),
        process_name: row.get(9)?,
        trace_id: row.get(10)?,
        error: row.get(11)?,
    }))
}

fn net_row(row: &Row<'_>) -> rusqlite::Result<LogRow> {
    Ok(LogRow::Net(NetRow {
        id: row.get(0)?,
        started: row.get::<_, Option<String>>(1)?.unwrap_or_default(),
        started_ms: row.get(2)?,
        finished_ms: row.get(3)?,
        duration_ms: row.get(4)?,
        domain: row.get(5)?,
        sni: row.get(6)?,
        method: row.get(7)?,
        path: row.get(8)?,
        status_code: row.get(9)?,
        decision: row.get(10)?,
        matched_rule: row.get(11)?,
        bytes_sent: row.get(12)?,
        bytes_received: row.get(13)?,
        request_headers: json_column(row.get(14)?),
        request_body_preview: preview_column(row.get(15)?),
        request_body_binary: row.get(16)?,
        response_body_preview: preview_column(row.get(17)?),
        response_body_binary: row.get(18)?,
        error: row.get(19)?,
        port: row.get(20)?,
        ip: row.get(21)?,
        mode: row.get(22)?,
    }))
}

fn ai_row(row: &Row<'_>) -> rusqlite::Result<LogRow> {
    Ok(LogRow::Ai(ModelCallRow {
        id: row.get(0)?,
        net_event_id: row.get(1)?,
        time: row.get::<_, Option<String>>(2)?.unwrap_or_default(),
        time_ms: row.get(3)?,
        domain: row.get(4)?,
        provider: row.get(5)?,
        model: row.get(6)?,
        input_tokens: row.get(7)?,
        output_tokens: row.get(8)?,
        cache_read_tokens: row.get(9)?,
        cache_write_tokens: row.get(10)?,
        stop_reason: row.get(11)?,
        estimated_cost_usd: row.get(12)?,
        duration_ms: row.get(13)?,
        complete: row.get(14)?,
        problems: row.get(15)?,
        tool_calls: json_column(row.get(16)?),
    }))
}

fn inbound_row(row: &Row<'_>) -> rusqlite::Result<LogRow> {
    Ok(LogRow::Inbound(InboundRow {
        id: row.get(0)?,
        started: row.get::<_, Option<String>>(1)?.unwrap_or_default(),
        started_ms: row.get(2)?,
        finished_ms: row.get(3)?,
        duration_ms: row.get(4)?,
        listener: row.get(5)?,
        peer: row.get(6)?,
        guest_port: row.get(7)?,
        decision: row.get(8)?,
        bytes_to_guest: row.get(9)?,
        bytes_from_guest: row.get(10)?,
        error: row.get(11)?,
    }))
}

/// Print the rows of `path` to `out` as `options` says. With
/// `options.follow`, keep polling for new rows until `stop` is set (checked
/// between polls) or writing fails (for example a closed pipe).
pub fn print_logs(
    path: &Path,
    options: &LogOptions,
    out: &mut dyn Write,
    stop: &AtomicBool,
) -> Result<(), TelemetryError> {
    let mut reader = LogReader::open(path, options)?;
    loop {
        let (rows, more) = reader.read_new()?;
        for row in &rows {
            if options.json {
                serde_json::to_writer(&mut *out, row).map_err(std::io::Error::from)?;
                out.write_all(b"\n")?;
            } else {
                writeln!(out, "{}", row.to_text())?;
            }
        }
        if more {
            continue;
        }
        out.flush()?;
        if !options.follow || stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        std::thread::sleep(options.poll_interval);
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_escapes_are_neutralised() {
        assert_eq!(printable("evil\u{1b}[2Jname"), "evil\\u{1b}[2Jname");
        assert_eq!(printable("a\u{202e}b\nc"), "a\\u{202e}b\\nc");
        assert_eq!(printable("例え.jp"), "例え.jp");
    }
}
