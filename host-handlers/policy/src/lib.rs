//! The security engine: every DNS query and connection attempt from a guest
//! becomes an [`Event`]; the [`Engine`] decides on it from TOML profiles whose
//! rule conditions are CEL expressions compiled once at load.
//!
//! INTERFACE CONTRACT (used by `sandbox-net` and the `sandbox` crate; keep these
//! names and shapes, extend freely):
//! - [`Event`] and its payload structs,
//! - [`Decision`], [`Verdict`], [`Action`], [`DnsRecord`], [`SecretValue`],
//! - [`Engine::load`], [`Engine::decide`],
//! - [`Policy`] (an engine plus the `ask` resolution) and [`Policy::decide`].

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// A DNS query seen from the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsRequest {
    /// Query name, lower case, without the trailing dot.
    pub qname: String,
    /// Record type mnemonic, e.g. "A", "AAAA", "TXT".
    pub qtype: String,
}

/// An HTTP request seen inside a guest TLS connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    /// Host header (or :authority), lower case, without port.
    pub host: String,
    /// TLS SNI of the connection.
    pub sni: String,
    pub method: String,
    pub path: String,
    /// Query string without the leading '?', empty if none.
    pub query: String,
    /// Header names lower case; repeated headers joined with ", ".
    pub headers: BTreeMap<String, String>,
    /// "https" for traffic through the MITM.
    pub scheme: String,
}

/// An upstream response, with the request it answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub request: HttpRequest,
    pub status: u16,
    pub headers: BTreeMap<String, String>,
}

/// A non-HTTP connection attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpConnect {
    pub host: String,
    pub ip: Option<IpAddr>,
    pub port: u16,
}

/// A security event (`dns.request`, `http.request`, `http.response`, `tcp.connect`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    DnsRequest(DnsRequest),
    HttpRequest(HttpRequest),
    HttpResponse(HttpResponse),
    TcpConnect(TcpConnect),
}

/// The final decision on an event. `rewrite` rules never decide; they only
/// contribute [`Action`]s to traffic that is allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    Allow,
    Block,
    Ask,
}

/// A value that may hold a secret (`${secret:NAME}` filled in at load).
/// Its `Debug` and `Display` never show a secret's value.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue {
    value: String,
    secret: bool,
}

impl SecretValue {
    /// A value that is not secret.
    pub fn plain(value: impl Into<String>) -> Self {
        Self { value: value.into(), secret: false }
    }
    /// A value that came from a secret.
    pub fn secret(value: impl Into<String>) -> Self {
        Self { value: value.into(), secret: true }
    }
    /// The real value, to put on the wire. Never log it.
    pub fn expose(&self) -> &str {
        &self.value
    }
    /// Whether the value came from a secret.
    pub fn is_secret(&self) -> bool {
        self.secret
    }
    /// What may be logged: the value, or `[REDACTED]` for a secret.
    pub fn redacted(&self) -> &str {
        if self.secret {
            "[REDACTED]"
        } else {
            &self.value
        }
    }
}

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

/// A synthesised DNS record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsRecord {
    A(std::net::Ipv4Addr),
    Aaaa(std::net::Ipv6Addr),
    Cname(String),
    Txt(String),
}

/// What a matching `rewrite` rule does to allowed traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    RemoveRequestHeader(String),
    SetRequestHeader(String, SecretValue),
    RemoveResponseHeader(String),
    SetResponseHeader(String, SecretValue),
    /// Answer a DNS query with these records without asking upstream.
    DnsAnswer { records: Vec<DnsRecord>, ttl: u32 },
}

/// The engine's answer for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    /// Name of the deciding rule (`http.allow_pypi`), `None` when nothing matched.
    pub rule: Option<String>,
    /// Rewrite actions, in priority order; empty unless the decision is Allow.
    pub actions: Vec<Action>,
}

/// A profile that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("{file}:{line}:{column}: {message}")]
    Invalid { file: PathBuf, line: usize, column: usize, message: String },
    #[error("{file}: {source}")]
    Io { file: PathBuf, source: std::io::Error },
}

/// Compiled profiles. Cheap to share across threads (`Arc` inside).
#[derive(Debug, Clone)]
pub struct Engine {
    _inner: Arc<()>,
}

impl Engine {
    /// Load profiles, lowest layer first.
    pub fn load(_paths: &[PathBuf]) -> Result<Engine, ProfileError> {
        Ok(Engine { _inner: Arc::new(()) })
    }

    /// Decide on one event. No matching rule means block.
    pub fn decide(&self, _event: &Event) -> Verdict {
        Verdict { decision: Decision::Block, rule: None, actions: Vec::new() }
    }
}

/// Answers `ask` decisions (the CLI asks on the terminal; platforms pass their own).
pub trait Asker: Send + Sync + std::fmt::Debug {
    /// `true` allows. The caller applies the timeout.
    fn ask(&self, event: &Event, rule: Option<&str>) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + '_>>;
}

/// An [`Engine`] plus how `ask` is resolved: the only thing handlers call.
#[derive(Debug, Clone)]
pub struct Policy {
    engine: Engine,
}

impl Policy {
    pub fn new(engine: Engine) -> Self {
        Self { engine }
    }

    /// Decide, resolving `ask` through the asker (timeout: block). The returned
    /// decision is never [`Decision::Ask`].
    pub async fn decide(&self, event: &Event) -> Verdict {
        self.engine.decide(event)
    }
}
