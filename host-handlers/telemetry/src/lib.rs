//! Per-sandbox telemetry: everything a guest tried to reach, in `session.db`.
//!
//! INTERFACE CONTRACT (used by `sandbox-net` and the `sandbox` crate; keep these
//! names and shapes, extend freely):
//! - [`SessionDb::open`] starts the single writer; [`SessionDb::recorder`] hands
//!   out cheap clonable [`Recorder`]s for handlers.
//! - [`Recorder::record_dns`], [`Recorder::record_net`] enqueue rows; they fail
//!   (instead of dropping) when the writer cannot keep up or has failed, and
//!   [`Recorder::healthy`] tells handlers whether to accept new connections.
//! - [`ai::StreamParser`] parses a provider response body as it streams past;
//!   its result travels inside [`NetEvent::model_call`] so that the writer links
//!   the rows in one transaction.

use std::path::Path;
use std::time::SystemTime;

pub mod ai;

/// How a request or query ended, as stored in the `decision` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Denied,
    Error,
}

/// One row of `dns_events`.
#[derive(Debug, Clone, PartialEq)]
pub struct DnsEvent {
    pub time: SystemTime,
    pub qname: String,
    pub qtype: String,
    /// Response code mnemonic sent to the guest: NOERROR, NXDOMAIN, SERVFAIL, FORMERR.
    pub rcode: String,
    pub decision: Outcome,
    pub matched_rule: Option<String>,
    /// Answers as presentation text, e.g. "A 93.184.216.34".
    pub answers: Vec<String>,
    pub process_name: Option<String>,
    pub trace_id: Option<String>,
    pub error: Option<String>,
}

/// One row of `net_events`, plus the model call parsed from it, if any.
#[derive(Debug, Clone, PartialEq)]
pub struct NetEvent {
    pub started: SystemTime,
    pub finished: SystemTime,
    pub domain: String,
    pub sni: Option<String>,
    pub method: Option<String>,
    pub path: Option<String>,
    pub status_code: Option<u16>,
    pub decision: Outcome,
    pub matched_rule: Option<String>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Request headers as logged: after rewrites, secret values redacted.
    pub request_headers: Vec<(String, String)>,
    /// First 4 KiB of the request body.
    pub request_body_preview: Vec<u8>,
    /// First 4 KiB of the response body.
    pub response_body_preview: Vec<u8>,
    pub error: Option<String>,
    pub model_call: Option<ai::ModelCall>,
}

/// What went wrong in telemetry.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("session database {path}: {source}")]
    Open { path: String, source: rusqlite::Error },
    #[error("session database writer has failed: {0}")]
    WriterFailed(String),
    #[error("session database writer is overloaded")]
    Full,
}

/// The session database and its writer.
#[derive(Debug)]
pub struct SessionDb {}

impl SessionDb {
    /// Open (creating and migrating) `path` and start the writer.
    pub fn open(_path: &Path) -> Result<SessionDb, TelemetryError> {
        Ok(SessionDb {})
    }

    /// A handle for handlers.
    pub fn recorder(&self) -> Recorder {
        Recorder {}
    }
}

/// Enqueues rows for the writer. Clone freely; `Send + Sync`.
#[derive(Debug, Clone)]
pub struct Recorder {}

impl Recorder {
    pub fn record_dns(&self, _event: DnsEvent) -> Result<(), TelemetryError> {
        Ok(())
    }
    pub fn record_net(&self, _event: NetEvent) -> Result<(), TelemetryError> {
        Ok(())
    }
    /// False once the writer has failed: handlers then refuse new connections
    /// (unless configured to fail open).
    pub fn healthy(&self) -> bool {
        true
    }
}
