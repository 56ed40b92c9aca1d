//! The `session.db` schema and its migrations.
//!
//! The schema version lives in SQLite's `user_version` header field. Each entry
//! of [`MIGRATIONS`] takes the database from version `i` to `i + 1` inside one
//! transaction, so a database is always at a version this code knows, and a
//! newer database is refused instead of being written with an old layout.
//! Append migrations; never edit one that has shipped.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use crate::TelemetryError;

/// `MIGRATIONS[i]` upgrades a database at version `i` to version `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: the initial schema.
    r#"
    CREATE TABLE net_events (
        id                     INTEGER PRIMARY KEY,
        started_ms             INTEGER NOT NULL,
        finished_ms            INTEGER NOT NULL,
        duration_ms            INTEGER NOT NULL,
        domain                 TEXT NOT NULL,
        sni                    TEXT,
        method                 TEXT,
        path                   TEXT,
        status_code            INTEGER,
        decision               TEXT NOT NULL CHECK (decision IN ('allowed', 'denied', 'error')),
        matched_rule           TEXT,
        bytes_sent             INTEGER NOT NULL,
        bytes_received         INTEGER NOT NULL,
        request_headers        TEXT NOT NULL DEFAULT '[]',
        request_body_preview   BLOB,
        request_body_binary    INTEGER NOT NULL DEFAULT 0,
        response_body_preview  BLOB,
        response_body_binary   INTEGER NOT NULL DEFAULT 0,
        error                  TEXT
    );
    CREATE INDEX net_events_started ON net_events (started_ms);
    CREATE INDEX net_events_domain ON net_events (domain);

    CREATE TABLE dns_events (
        id            INTEGER PRIMARY KEY,
        time_ms       INTEGER NOT NULL,
        qname         TEXT NOT NULL,
        qtype         TEXT NOT NULL,
        rcode         TEXT NOT NULL,
        decision      TEXT NOT NULL CHECK (decision IN ('allowed', 'denied', 'error')),
        matched_rule  TEXT,
        answers       TEXT NOT NULL DEFAULT '[]',
        process_name  TEXT,
        trace_id      TEXT,
        error         TEXT
    );
    CREATE INDEX dns_events_time ON dns_events (time_ms);
    CREATE INDEX dns_events_qname ON dns_events (qname);

    CREATE TABLE model_calls (
        id                  INTEGER PRIMARY KEY,
        net_event_id        INTEGER NOT NULL REFERENCES net_events (id),
        provider            TEXT NOT NULL,
        model               TEXT,
        input_tokens        INTEGER,
        output_tokens       INTEGER,
        cache_read_tokens   INTEGER,
        cache_write_tokens  INTEGER,
        stop_reason         TEXT,
        estimated_cost_usd  REAL,
        duration_ms         INTEGER NOT NULL,
        complete            INTEGER NOT NULL,
        problems            TEXT
    );
    CREATE INDEX model_calls_net_event ON model_calls (net_event_id);

    CREATE TABLE tool_calls (
        id                 INTEGER PRIMARY KEY,
        model_call_id      INTEGER NOT NULL REFERENCES model_calls (id),
        position           INTEGER NOT NULL,
        call_id            TEXT,
        name               TEXT NOT NULL,
        arguments_preview  TEXT NOT NULL
    );
    CREATE INDEX tool_calls_model_call ON tool_calls (model_call_id);
    "#,
    // 2: where each connection went and how it was carried: the destination
    // address and port the guest connected to (NULL when the connection
    // failed before the guest said), and the connect mode (inspect,
    // passthrough, tcp, http; NULL when no decision was reached).
    r#"
    ALTER TABLE net_events ADD COLUMN port INTEGER;
    ALTER TABLE net_events ADD COLUMN ip TEXT;
    ALTER TABLE net_events ADD COLUMN mode TEXT;
    "#,
    // 3: events counted instead of stored once the database is near its size
    // budget: per second, kind, decision and host; `second_ms` = 0 and host
    // '*' are the running totals kept once the whole budget is used.
    r#"
    CREATE TABLE event_summaries (
        id          INTEGER PRIMARY KEY,
        second_ms   INTEGER NOT NULL,
        kind        TEXT NOT NULL CHECK (kind IN ('dns', 'net')),
        decision    TEXT NOT NULL CHECK (decision IN ('allowed', 'denied', 'error')),
        host        TEXT NOT NULL,
        count       INTEGER NOT NULL,
        UNIQUE (second_ms, kind, decision, host)
    );
    "#,
    // 4: connections made from the host into the guest (port forwards and
    // `Sandbox::connect_port`): where they came in, from whom, the guest
    // port, how they ended and the bytes each way. Summaries count them too
    // (kind 'inbound'), so event_summaries is rebuilt with the wider CHECK.
    r#"
    CREATE TABLE inbound_events (
        id                INTEGER PRIMARY KEY,
        started_ms        INTEGER NOT NULL,
        finished_ms       INTEGER NOT NULL,
        duration_ms       INTEGER NOT NULL,
        listener          TEXT NOT NULL,
        peer              TEXT,
        guest_port        INTEGER NOT NULL,
        decision          TEXT NOT NULL CHECK (decision IN ('allowed', 'denied', 'error')),
        bytes_to_guest    INTEGER NOT NULL,
        bytes_from_guest  INTEGER NOT NULL,
        error             TEXT
    );
    CREATE INDEX inbound_events_started ON inbound_events (started_ms);

    CREATE TABLE event_summaries_new (
        id          INTEGER PRIMARY KEY,
        second_ms   INTEGER NOT NULL,
        kind        TEXT NOT NULL CHECK (kind IN ('dns', 'net', 'inbound')),
        decision    TEXT NOT NULL CHECK (decision IN ('allowed', 'denied', 'error')),
        host        TEXT NOT NULL,
        count       INTEGER NOT NULL,
        UNIQUE (second_ms, kind, decision, host)
    );
    INSERT INTO event_summaries_new SELECT id, second_ms, kind, decision, host, count FROM event_summaries;
    DROP TABLE event_summaries;
    ALTER TABLE event_summaries_new RENAME TO event_summaries;
    "#,
];

/// The schema version this build writes.
pub(crate) fn current_version() -> i64 {
    i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX)
}

/// Open (or create) `path` for the writer: WAL journal, migrated schema.
///
/// `synchronous = NORMAL` in WAL mode keeps every committed transaction
/// across a crash of this process (the WAL is written before commit
/// returns); only an operating-system crash or power loss can lose the
/// last transactions, which is the usual trade for not syncing each batch.
pub(crate) fn open_for_writing(path: &Path, busy_timeout: Duration) -> Result<Connection, TelemetryError> {
    let err = |source| TelemetryError::Open { path: path.display().to_string(), source };
    let mut conn = Connection::open(path).map_err(err)?;
    conn.busy_timeout(busy_timeout).map_err(err)?;
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "wal", |row| row.get(0)).map_err(err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(TelemetryError::NotUsable {
            path: path.display().to_string(),
            what: format!("cannot switch to WAL journal mode (got {mode})"),
        });
    }
    conn.pragma_update(None, "synchronous", "NORMAL").map_err(err)?;
    conn.pragma_update(None, "foreign_keys", true).map_err(err)?;
    // After a checkpoint the WAL is cut back to this size (it is otherwise
    // left at its largest), so that it counts little against the budget.
    conn.pragma_update(None, "journal_size_limit", crate::budget::WAL_SIZE_LIMIT).map_err(err)?;
    migrate(&mut conn, path)?;
    Ok(conn)
}

/// Open an existing `path` read-only, for queries.
pub(crate) fn open_for_reading(path: &Path) -> Result<Connection, TelemetryError> {
    let err = |source| TelemetryError::Open { path: path.display().to_string(), source };
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(err)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
    let version: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0)).map_err(err)?;
    if version == 0 {
        return Err(TelemetryError::NotUsable {
            path: path.display().to_string(),
            what: "not a session database (no schema)".into(),
        });
    }
    if version > current_version() {
        return Err(TelemetryError::SchemaTooNew {
            path: path.display().to_string(),
            found: version,
            supported: current_version(),
        });
    }
    Ok(conn)
}

/// Bring the database up to [`current_version`], one transaction per step.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), TelemetryError> {
    let err = |source| TelemetryError::Open { path: path.display().to_string(), source };
    loop {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(err)?;
        let version: i64 = tx.pragma_query_value(None, "user_version", |row| row.get(0)).map_err(err)?;
        if version > current_version() {
            return Err(TelemetryError::SchemaTooNew {
                path: path.display().to_string(),
                found: version,
                supported: current_version(),
            });
        }
        let Some(step) = usize::try_from(version).ok().and_then(|v| MIGRATIONS.get(v)) else {
            return Ok(());
        };
        tx.execute_batch(step).map_err(err)?;
        tx.pragma_update(None, "user_version", version + 1).map_err(err)?;
        tx.commit().map_err(err)?;
        tracing::debug!(path = %path.display(), version = version + 1, "session database migrated");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_the_current_schema_and_reopens_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("session.db");
        drop(open_for_writing(&path, Duration::from_secs(1)).unwrap());
        let conn = open_for_writing(&path, Duration::from_secs(1)).unwrap();
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(version, current_version());
        let mode: String = conn.pragma_query_value(None, "journal_mode", |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
        for table in ["net_events", "dns_events", "model_calls", "tool_calls", "event_summaries", "inbound_events"] {
            let n: i64 = conn
                .query_row("SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = ?1", [table], |r| {
                    r.get(0)
                })
                .unwrap();
            assert_eq!(n, 1, "{table}");
        }
    }

    #[test]
    fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("session.db");
        drop(open_for_writing(&path, Duration::from_secs(1)).unwrap());
        Connection::open(&path).unwrap().pragma_update(None, "user_version", current_version() + 1).unwrap();
        let err = open_for_writing(&path, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, TelemetryError::SchemaTooNew { .. }), "{err}");
        let err = open_for_reading(&path).unwrap_err();
        assert!(matches!(err, TelemetryError::SchemaTooNew { .. }), "{err}");
    }

    #[test]
    fn refuses_a_file_that_is_not_a_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("session.db");
        std::fs::write(&path, b"this is not sqlite, just some text that is long enough to have a header").unwrap();
        assert!(open_for_writing(&path, Duration::from_secs(1)).is_err());
    }
}
