//! Per-sandbox telemetry: everything a guest tried to reach, in `session.db`.
//!
//! INTERFACE CONTRACT (used by `net` and the `sandbox` crate; keep these
//! names and shapes, extend freely):
//! - [`SessionDb::open`] starts the single writer; [`SessionDb::recorder`] hands
//!   out cheap clonable [`Recorder`]s for handlers.
//! - [`Recorder::reserve`] waits (at most [`TelemetryConfig::slot_wait`]) for
//!   room for one row and hands out a [`Slot`]; a handler reserves before it
//!   acts on an event and fills the slot when the row is complete, which cannot
//!   fail for lack of room. No slot in time: the handler refuses the event
//!   ([`TelemetryError::Overloaded`], counted in [`RecorderStats`]).
//! - [`Recorder::record_dns`], [`Recorder::record_net`] enqueue rows without a
//!   slot (best effort, for rows about events that were refused anyway); they
//!   fail (instead of dropping) when the writer cannot keep up or has failed, and
//!   [`Recorder::healthy`] tells handlers whether to accept new connections.
//! - [`ai::StreamParser`] parses a provider response body as it streams past;
//!   its result travels inside [`NetEvent::model_call`] so that the writer links
//!   the rows in one transaction.
//!
//! # Design
//!
//! One SQLite database per sandbox (WAL mode, so readers such as `sandbox logs
//! --follow` never block the writer). A single writer thread owns the only
//! writing connection (an OS thread rather than a tokio task, because SQLite
//! calls block); handlers hand it rows through a bounded channel, and the
//! writer commits whatever has queued up as one transaction, so the commit rate
//! adapts to the load. Enqueuing into a reserved [`Slot`] never blocks and never
//! fails for lack of room; [`Recorder::record_dns`] and
//! [`Recorder::record_net`] are safe to call from async tasks. The async
//! [`Recorder::record_dns_wait`] / [`Recorder::record_net_wait`] variants wait
//! for room in the channel instead of failing with [`TelemetryError::Full`].
//!
//! Nothing is lost silently: when a transaction cannot be committed (disk full,
//! database locked by another process, corruption) the writer logs the error,
//! stores it (see [`Recorder::failure`]), counts the rows it could not write
//! and stops. From then on every `record_*` call returns
//! [`TelemetryError::WriterFailed`], [`Recorder::healthy`] is false and
//! [`Recorder::accept_new_connections`] tells handlers to refuse new
//! connections unless [`TelemetryConfig::on_write_failure`] says otherwise.
//! The failure is permanent for the session: an audit log with a gap in the
//! middle would be worse than a sandbox that stopped talking to the network.
//!
//! Secrets: rows store the request headers they are given (the handler passes
//! them after rewrites, with secret values redacted) and, as a second line of
//! defence, the writer redacts values of credential-like headers and query
//! parameters again (see [`redact`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};

pub mod ai;
mod budget;
pub mod preview;
pub mod query;
pub mod redact;
mod schema;
mod writer;

pub use ai::prices::{ModelPrice, PriceTable};

/// How a request or query ended, as stored in the `decision` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Denied,
    Error,
}

impl Outcome {
    /// The text stored in the `decision` column: `allowed`, `denied` or `error`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Denied => "denied",
            Outcome::Error => "error",
        }
    }
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
    /// The destination port the guest connected to, once known.
    pub port: Option<u16>,
    /// The destination address the guest connected to, once known.
    pub ip: Option<String>,
    /// How the connection was carried (`inspect`, `passthrough`, `tcp`,
    /// `http`), once decided.
    pub mode: Option<String>,
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

/// One row of `inbound_events`: a connection from the host into the guest
/// (a port forward's, or one `Sandbox::connect_port` made), recorded when
/// it ends.
#[derive(Debug, Clone, PartialEq)]
pub struct InboundEvent {
    pub started: SystemTime,
    pub finished: SystemTime,
    /// Where it came in: the forward's host address (`127.0.0.1:8080`), or
    /// what opened it otherwise (`connect_port`).
    pub listener: String,
    /// The client's address, when there is one.
    pub peer: Option<String>,
    /// The port on the guest's 127.0.0.1 it was carried to.
    pub guest_port: u16,
    /// `Allowed`: the guest accepted it; `Error`: it did not (nothing
    /// listening, the guest agent unreachable).
    pub decision: Outcome,
    pub bytes_to_guest: u64,
    pub bytes_from_guest: u64,
    pub error: Option<String>,
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
    #[error("session database writer is overloaded: no room for a row within {0:?}")]
    Overloaded(Duration),
    #[error("session database is closed")]
    Closed,
    #[error("session database {path} has schema version {found}; this build supports up to {supported}")]
    SchemaTooNew { path: String, found: i64, supported: i64 },
    #[error("session database {path}: {what}")]
    NotUsable { path: String, what: String },
    #[error("reading session database {path}: {source}")]
    Query { path: String, source: rusqlite::Error },
    #[error("price table {origin}: {reason}")]
    Prices { origin: String, reason: String },
    #[error("writing log output: {0}")]
    Output(#[from] std::io::Error),
}

/// What handlers do once rows can no longer be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnWriteFailure {
    /// Refuse new connections and queries (fail closed). The default.
    #[default]
    RefuseConnections,
    /// Keep serving without a record (fail open). Every `record_*` call still
    /// returns the error, so handlers can log what they could not record.
    KeepServing,
}

/// Default of [`TelemetryConfig::slot_wait`].
pub const DEFAULT_SLOT_WAIT: Duration = Duration::from_secs(2);
/// Default of [`TelemetryConfig::max_db_bytes`]: 1 GiB.
pub const DEFAULT_MAX_DB_BYTES: u64 = 1 << 30;

/// Settings for [`SessionDb::open_with`].
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// Rows that may wait for the writer before `record_*` returns
    /// [`TelemetryError::Full`].
    pub channel_capacity: usize,
    /// Most rows committed in one transaction.
    pub max_batch: usize,
    /// How long a write waits for a lock held by another connection before
    /// it counts as a failure.
    pub busy_timeout: Duration,
    /// Whether handlers keep accepting connections after a write failure.
    pub on_write_failure: OnWriteFailure,
    /// Prices used to fill `estimated_cost_usd` of model calls that have none.
    pub prices: PriceTable,
    /// Longest [`Recorder::reserve`] waits for room in the channel before the
    /// event it was for is refused ([`TelemetryError::Overloaded`]).
    pub slot_wait: Duration,
    /// Size budget of `session.db` in bytes. Full rows are stored until the
    /// database reaches 7/8 of it; beyond that events are counted in
    /// `event_summaries` (per second, kind, decision and host), and once the
    /// whole budget is used, in one running total per kind and decision.
    /// [`Recorder::over_budget`] turns true and a warning is logged.
    pub max_db_bytes: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            channel_capacity: 16_384,
            max_batch: 2_048,
            busy_timeout: Duration::from_secs(5),
            on_write_failure: OnWriteFailure::default(),
            prices: PriceTable::builtin(),
            slot_wait: DEFAULT_SLOT_WAIT,
            max_db_bytes: DEFAULT_MAX_DB_BYTES,
        }
    }
}

/// A message for the writer thread.
enum Message {
    Dns(Box<DnsEvent>),
    Net(Box<NetEvent>),
    Inbound(Box<InboundEvent>),
    /// Reply once everything queued before it is committed.
    Flush(oneshot::Sender<Result<(), TelemetryError>>),
    /// Commit everything queued, stop accepting rows and reply when done.
    Close(oneshot::Sender<Result<(), TelemetryError>>),
}

/// State shared by the writer and every recorder.
#[derive(Debug)]
struct Shared {
    path: PathBuf,
    /// Set once, by the writer, when a transaction could not be committed.
    failure: OnceLock<String>,
    closed: AtomicBool,
    committed: AtomicU64,
    rejected: AtomicU64,
    /// Events refused because no slot could be reserved in time.
    overloaded: AtomicU64,
    /// Set once the database has reached the part of its budget kept for summaries.
    over_budget: AtomicBool,
    /// Events counted in `event_summaries` instead of stored as rows.
    summarised: AtomicU64,
    on_write_failure: OnWriteFailure,
    slot_wait: Duration,
}

/// The session database and its writer.
#[derive(Debug)]
pub struct SessionDb {
    recorder: Recorder,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl SessionDb {
    /// Open (creating and migrating) `path` and start the writer.
    pub fn open(path: &Path) -> Result<SessionDb, TelemetryError> {
        Self::open_with(path, TelemetryConfig::default())
    }

    /// Like [`SessionDb::open`], with explicit settings.
    pub fn open_with(path: &Path, config: TelemetryConfig) -> Result<SessionDb, TelemetryError> {
        let conn = schema::open_for_writing(path, config.busy_timeout)?;
        let (sender, receiver) = mpsc::channel(config.channel_capacity.max(1));
        let shared = Arc::new(Shared {
            path: path.to_path_buf(),
            failure: OnceLock::new(),
            closed: AtomicBool::new(false),
            committed: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            overloaded: AtomicU64::new(0),
            over_budget: AtomicBool::new(false),
            summarised: AtomicU64::new(0),
            on_write_failure: config.on_write_failure,
            slot_wait: config.slot_wait,
        });
        let writer = writer::Writer::new(conn, receiver, Arc::clone(&shared), &config);
        let handle =
            std::thread::Builder::new().name("session-db-writer".into()).spawn(move || writer.run()).map_err(|e| {
                TelemetryError::NotUsable {
                    path: path.display().to_string(),
                    what: format!("cannot start the writer thread: {e}"),
                }
            })?;
        Ok(SessionDb { recorder: Recorder { sender, shared }, writer: Some(handle) })
    }

    /// A handle for handlers.
    pub fn recorder(&self) -> Recorder {
        self.recorder.clone()
    }

    /// Commit everything queued so far, then stop the writer. Rows recorded
    /// afterwards are refused with [`TelemetryError::Closed`]. Returns the
    /// number of events committed during the session, or the writer's failure.
    pub async fn close(mut self) -> Result<u64, TelemetryError> {
        let result = self.recorder.request(Message::Close).await;
        if let Some(handle) = self.writer.take() {
            // The writer has replied; it is past its last statement.
            if handle.join().is_err() {
                return Err(TelemetryError::WriterFailed("the writer thread panicked".into()));
            }
        }
        result.map(|()| self.recorder.committed_events())
    }
}

/// Enqueues rows for the writer. Clone freely; `Send + Sync`.
#[derive(Debug, Clone)]
pub struct Recorder {
    sender: mpsc::Sender<Message>,
    shared: Arc<Shared>,
}

impl Recorder {
    /// Queue a `dns_events` row. Never blocks.
    pub fn record_dns(&self, event: DnsEvent) -> Result<(), TelemetryError> {
        self.try_enqueue(Message::Dns(Box::new(event)))
    }

    /// Queue a `net_events` row (and its model call and tool calls). Never blocks.
    pub fn record_net(&self, event: NetEvent) -> Result<(), TelemetryError> {
        self.try_enqueue(Message::Net(Box::new(event)))
    }

    /// Queue an `inbound_events` row. Never blocks.
    pub fn record_inbound(&self, event: InboundEvent) -> Result<(), TelemetryError> {
        self.try_enqueue(Message::Inbound(Box::new(event)))
    }

    /// Reserve room for one row, waiting at most [`TelemetryConfig::slot_wait`].
    ///
    /// Handlers call this before they act on an event (answer or forward a
    /// query, forward a request) and fill the slot once the row is complete.
    /// [`TelemetryError::Overloaded`] means the writer is too far behind: the
    /// caller must refuse the event (it is counted in
    /// [`RecorderStats::overload_refusals`]).
    pub async fn reserve(&self) -> Result<Slot, TelemetryError> {
        self.check_usable()?;
        let wait = self.shared.slot_wait;
        match tokio::time::timeout(wait, self.sender.clone().reserve_owned()).await {
            Ok(Ok(permit)) => Ok(Slot { permit, shared: Arc::clone(&self.shared) }),
            Ok(Err(_)) => Err(self.stopped_error()),
            Err(_) => {
                self.shared.overloaded.fetch_add(1, Ordering::Relaxed);
                Err(TelemetryError::Overloaded(wait))
            }
        }
    }

    /// Queue a `dns_events` row, waiting for room if the writer is behind.
    pub async fn record_dns_wait(&self, event: DnsEvent) -> Result<(), TelemetryError> {
        self.enqueue(Message::Dns(Box::new(event))).await
    }

    /// Queue a `net_events` row, waiting for room if the writer is behind.
    pub async fn record_net_wait(&self, event: NetEvent) -> Result<(), TelemetryError> {
        self.enqueue(Message::Net(Box::new(event))).await
    }

    /// False once the writer has failed: handlers then refuse new connections
    /// (unless configured to fail open).
    pub fn healthy(&self) -> bool {
        self.shared.failure.get().is_none() && !self.shared.closed.load(Ordering::Acquire) && !self.sender.is_closed()
    }

    /// Room for the row of an event the caller is about to act on, as
    /// [`Recorder::reserve`] gives it; `Ok(None)` when the writer has failed
    /// but the sandbox is configured to keep serving without a record (fail
    /// open). An error means: refuse to act (the writer is behind, or has
    /// failed and the sandbox fails closed).
    pub async fn reserve_to_act(&self) -> Result<Option<Slot>, TelemetryError> {
        match self.reserve().await {
            Ok(slot) => Ok(Some(slot)),
            Err(err @ TelemetryError::Overloaded(_)) => Err(err),
            Err(_) if self.accept_new_connections() => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// Whether a handler should accept a new connection or query: true while
    /// the writer is healthy, and always under [`OnWriteFailure::KeepServing`].
    pub fn accept_new_connections(&self) -> bool {
        self.healthy() || self.shared.on_write_failure == OnWriteFailure::KeepServing
    }

    /// The writer's error, once it has failed.
    pub fn failure(&self) -> Option<&str> {
        self.shared.failure.get().map(String::as_str)
    }

    /// Events committed so far (DNS and network rows, and events counted in
    /// summaries; model and tool calls are part of their network row).
    pub fn committed_events(&self) -> u64 {
        self.shared.committed.load(Ordering::Acquire)
    }

    /// Events refused because the channel was full or the writer had failed.
    pub fn rejected_events(&self) -> u64 {
        self.shared.rejected.load(Ordering::Relaxed)
    }

    /// Events refused because no slot could be reserved within
    /// [`TelemetryConfig::slot_wait`] (the writer was behind).
    pub fn overload_refusals(&self) -> u64 {
        self.shared.overloaded.load(Ordering::Relaxed)
    }

    /// True once `session.db` has reached its size budget
    /// ([`TelemetryConfig::max_db_bytes`]): events are then counted in
    /// `event_summaries` instead of stored one row each.
    pub fn over_budget(&self) -> bool {
        self.shared.over_budget.load(Ordering::Acquire)
    }

    /// Events counted in `event_summaries` instead of stored as rows (they
    /// are part of [`Recorder::committed_events`]).
    pub fn summarised_events(&self) -> u64 {
        self.shared.summarised.load(Ordering::Acquire)
    }

    /// The counters of this session, at once.
    pub fn stats(&self) -> RecorderStats {
        RecorderStats {
            healthy: self.healthy(),
            committed_events: self.committed_events(),
            rejected_events: self.rejected_events(),
            overload_refusals: self.overload_refusals(),
            over_budget: self.over_budget(),
            summarised_events: self.summarised_events(),
        }
    }

    /// Wait until every row queued before this call is committed.
    pub async fn flush(&self) -> Result<(), TelemetryError> {
        self.request(Message::Flush).await
    }

    fn check_usable(&self) -> Result<(), TelemetryError> {
        if let Some(failure) = self.shared.failure.get() {
            return Err(TelemetryError::WriterFailed(failure.clone()));
        }
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(TelemetryError::Closed);
        }
        Ok(())
    }

    fn try_enqueue(&self, message: Message) -> Result<(), TelemetryError> {
        let result = self.check_usable().and_then(|()| {
            self.sender.try_send(message).map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => TelemetryError::Full,
                mpsc::error::TrySendError::Closed(_) => self.stopped_error(),
            })
        });
        if result.is_err() {
            self.shared.rejected.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    async fn enqueue(&self, message: Message) -> Result<(), TelemetryError> {
        let result = match self.check_usable() {
            Ok(()) => self.sender.send(message).await.map_err(|_| self.stopped_error()),
            Err(e) => Err(e),
        };
        if result.is_err() {
            self.shared.rejected.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// Send a message that the writer answers, and wait for the answer.
    async fn request(
        &self,
        message: impl FnOnce(oneshot::Sender<Result<(), TelemetryError>>) -> Message,
    ) -> Result<(), TelemetryError> {
        self.check_usable()?;
        let (reply, answer) = oneshot::channel();
        self.sender.send(message(reply)).await.map_err(|_| self.stopped_error())?;
        answer.await.map_err(|_| self.stopped_error())?
    }

    /// The error for a writer that no longer receives messages.
    fn stopped_error(&self) -> TelemetryError {
        match self.shared.failure.get() {
            Some(failure) => TelemetryError::WriterFailed(failure.clone()),
            None if self.shared.closed.load(Ordering::Acquire) => TelemetryError::Closed,
            None => TelemetryError::WriterFailed("the writer has stopped".into()),
        }
    }
}

/// Counters of a session, from [`Recorder::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecorderStats {
    /// See [`Recorder::healthy`].
    pub healthy: bool,
    /// Rows committed.
    pub committed_events: u64,
    /// Rows refused without a slot (channel full, writer failed or closed).
    pub rejected_events: u64,
    /// Events (queries, requests) refused because the writer was behind.
    pub overload_refusals: u64,
    /// See [`Recorder::over_budget`].
    pub over_budget: bool,
    /// See [`Recorder::summarised_events`].
    pub summarised_events: u64,
}

/// Room for one row, reserved with [`Recorder::reserve`]. Filling it cannot
/// fail for lack of room; dropping it unfilled gives the room back.
#[derive(Debug)]
pub struct Slot {
    permit: mpsc::OwnedPermit<Message>,
    shared: Arc<Shared>,
}

impl Slot {
    /// Queue a `dns_events` row in this slot.
    pub fn record_dns(self, event: DnsEvent) {
        self.fill(Message::Dns(Box::new(event)));
    }

    /// Queue a `net_events` row (and its model call) in this slot.
    pub fn record_net(self, event: NetEvent) {
        self.fill(Message::Net(Box::new(event)));
    }

    /// Queue an `inbound_events` row in this slot.
    pub fn record_inbound(self, event: InboundEvent) {
        self.fill(Message::Inbound(Box::new(event)));
    }

    fn fill(self, message: Message) {
        if let Some(failure) = self.shared.failure.get() {
            self.shared.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::error!(failure, "event not recorded: the session database writer has failed");
        } else if self.shared.closed.load(Ordering::Acquire) {
            self.shared.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("event not recorded: the session database was closed before it ended");
        }
        self.permit.send(message);
    }
}

/// Milliseconds since the Unix epoch (negative before it), as stored in `*_ms` columns.
fn unix_ms(time: SystemTime) -> i64 {
    match time.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_millis()).map_or(i64::MIN, |ms| -ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorder_is_send_sync_clone() {
        fn assert_traits<T: Send + Sync + Clone + 'static>() {}
        assert_traits::<Recorder>();
    }

    #[test]
    fn unix_ms_handles_times_before_the_epoch() {
        assert_eq!(unix_ms(SystemTime::UNIX_EPOCH + Duration::from_millis(1500)), 1500);
        assert_eq!(unix_ms(SystemTime::UNIX_EPOCH - Duration::from_millis(20)), -20);
    }
}
