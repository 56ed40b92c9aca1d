//! The security engine: every DNS query and connection attempt from a guest
//! becomes an [`Event`]; the [`Engine`] decides on it from TOML profiles whose
//! rule conditions are CEL expressions compiled once at load.
//!
//! INTERFACE CONTRACT (used by `net` and the `sandbox` crate; keep these
//! names and shapes, extend freely):
//! - [`Event`] and its payload structs,
//! - [`Decision`], [`Verdict`], [`Action`], [`DnsRecord`], [`SecretValue`],
//! - [`Engine::load`], [`Engine::decide`],
//! - [`Policy`] (an engine plus the `ask` resolution) and [`Policy::decide`].
//!
//! Beyond the contract: [`Engine::load_layers`] and [`EngineBuilder`] load
//! profiles into layers (built-in < corporate < user < command line) with
//! section locks; [`ProfileSource`] names a file, a built-in profile
//! (`deny-all`, `dev`) or profile text; [`Secrets`] fills `${secret:NAME}`;
//! [`Engine::explain`] says why an event gets its verdict; [`check`] loads
//! profiles and summarises them; [`Event::from_json`] reads events.
//!
//! The profile format and its semantics are described in the crate's README
//! section (precedence, rewrite, ask, layers, locks, secrets).

mod builtin;
mod condition;
mod engine;
mod event;
mod explain;
mod limits;
mod location;
mod policy;
mod profile;
mod secrets;

use std::fmt;
use std::path::PathBuf;

pub use builtin::{builtin_profile, BUILTIN_PROFILES};
pub use engine::{check, Engine, EngineBuilder, Layer, ProfileSource, RuleDecision, COMMON_QTYPES};
pub use event::{
    normalise_path, DnsRequest, Event, EventKind, Field, FieldType, HttpRequest, HttpResponse, Section, TcpConnect,
    HTTPS_PORT,
};
pub use explain::{Explanation, Outcome, RuleInfo, RuleTrace, Summary};
pub use limits::DnsLimits;
pub use location::Location;
pub use policy::{Asker, Policy, DEFAULT_ASK_TIMEOUT};
pub use secrets::Secrets;

/// The final decision on an event. `rewrite` rules never decide; they only
/// contribute [`Action`]s to traffic that is allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Let the traffic through (with the verdict's actions applied).
    Allow,
    /// Refuse the traffic.
    Block,
    /// Ask the user; [`Policy::decide`] resolves this to allow or block.
    Ask,
}

impl Decision {
    /// `allow`, `block` or `ask`.
    pub fn name(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Block => "block",
            Decision::Ask => "ask",
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
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

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.redacted())
    }
}

/// A synthesised DNS record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsRecord {
    /// An IPv4 address.
    A(std::net::Ipv4Addr),
    /// An IPv6 address.
    Aaaa(std::net::Ipv6Addr),
    /// An alias (a name, lower case, without the trailing dot).
    Cname(String),
    /// One text string (at most 255 bytes).
    Txt(String),
}

impl DnsRecord {
    /// The record type mnemonic: `A`, `AAAA`, `CNAME` or `TXT`.
    pub fn type_name(&self) -> &'static str {
        match self {
            DnsRecord::A(_) => "A",
            DnsRecord::Aaaa(_) => "AAAA",
            DnsRecord::Cname(_) => "CNAME",
            DnsRecord::Txt(_) => "TXT",
        }
    }
}

impl fmt::Display for DnsRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DnsRecord::A(ip) => write!(f, "A {ip}"),
            DnsRecord::Aaaa(ip) => write!(f, "AAAA {ip}"),
            DnsRecord::Cname(name) => write!(f, "CNAME {name}"),
            DnsRecord::Txt(text) => write!(f, "TXT {text:?}"),
        }
    }
}

/// What a matching `rewrite` rule does to allowed traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Remove a request header (name lower case).
    RemoveRequestHeader(String),
    /// Set a request header (name lower case), replacing any value the guest sent.
    SetRequestHeader(String, SecretValue),
    /// Remove a response header (name lower case).
    RemoveResponseHeader(String),
    /// Set a response header (name lower case), replacing any value upstream sent.
    SetResponseHeader(String, SecretValue),
    /// Answer a DNS query with these records without asking upstream. The
    /// records are those of the query's type (a CNAME answers every type;
    /// `ANY` gets all); none means an empty answer (NOERROR, no records).
    DnsAnswer {
        /// The answer records.
        records: Vec<DnsRecord>,
        /// Time to live of every record, in seconds.
        ttl: u32,
    },
}

impl Action {
    /// The header an action touches, with `true` for request headers.
    fn header(&self) -> Option<(bool, &str)> {
        match self {
            Action::RemoveRequestHeader(name) | Action::SetRequestHeader(name, _) => Some((true, name)),
            Action::RemoveResponseHeader(name) | Action::SetResponseHeader(name, _) => Some((false, name)),
            Action::DnsAnswer { .. } => None,
        }
    }
}

/// Secrets show as `[REDACTED]`.
impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::RemoveRequestHeader(name) => write!(f, "remove request header {name}"),
            Action::SetRequestHeader(name, value) => {
                write!(f, "set request header {name}: {value}")
            }
            Action::RemoveResponseHeader(name) => write!(f, "remove response header {name}"),
            Action::SetResponseHeader(name, value) => {
                write!(f, "set response header {name}: {value}")
            }
            Action::DnsAnswer { records, ttl } if records.is_empty() => {
                write!(f, "answer DNS with no records (ttl {ttl})")
            }
            Action::DnsAnswer { records, ttl } => {
                let records = records.iter().map(DnsRecord::to_string).collect::<Vec<_>>().join(", ");
                write!(f, "answer DNS with {records} (ttl {ttl})")
            }
        }
    }
}

/// How an allowed `tcp.connect` is carried: the `mode` key of its rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectMode {
    /// TLS terminated by the host with the sandbox CA; each HTTP request and
    /// response is decided by the `http.*` rules (the default).
    Inspect,
    /// TLS spliced through undecrypted; its ClientHello must name the host
    /// the address was resolved for.
    Passthrough,
    /// Bytes spliced through as they are (ssh, databases, ...).
    Tcp,
    /// Plain HTTP, each request and response decided by the `http.*` rules.
    Http,
}

impl ConnectMode {
    /// Every mode.
    pub const ALL: [ConnectMode; 4] =
        [ConnectMode::Inspect, ConnectMode::Passthrough, ConnectMode::Tcp, ConnectMode::Http];

    /// The name written in profiles.
    pub fn name(self) -> &'static str {
        match self {
            ConnectMode::Inspect => "inspect",
            ConnectMode::Passthrough => "passthrough",
            ConnectMode::Tcp => "tcp",
            ConnectMode::Http => "http",
        }
    }

    /// Looks a mode up by its name.
    pub fn from_name(name: &str) -> Option<ConnectMode> {
        ConnectMode::ALL.into_iter().find(|mode| mode.name() == name)
    }
}

impl fmt::Display for ConnectMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The engine's answer for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The decision.
    pub decision: Decision,
    /// Name of the deciding rule (`http.allow_pypi`), `None` when nothing matched.
    pub rule: Option<String>,
    /// Rewrite actions, in priority order; empty unless the decision is Allow.
    pub actions: Vec<Action>,
    /// For an allowed `tcp.connect`: how the connection is carried.
    pub mode: Option<ConnectMode>,
}

/// A profile that could not be loaded (or an event that could not be read).
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// A problem at a place in a profile.
    #[error("{}:{line}:{column}: {message}", file.display())]
    Invalid {
        /// The profile (`builtin:<name>` for built-in profiles).
        file: PathBuf,
        /// Line, from 1.
        line: usize,
        /// Column in characters, from 1.
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// A profile or secrets file that could not be read.
    #[error("{}: {source}", file.display())]
    Io {
        /// The file.
        file: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// A built-in profile name that does not exist.
    #[error("unknown built-in profile `{name}` (built-in profiles: {})", BUILTIN_PROFILES.iter().map(|(name, _)| *name).collect::<Vec<_>>().join(", "))]
    UnknownBuiltin {
        /// The name asked for.
        name: String,
    },
    /// An event (JSON) that could not be read.
    #[error("invalid event: {message}")]
    Event {
        /// What is wrong.
        message: String,
    },
    /// The thread that loads profiles could not be started.
    #[error("cannot start the profile loader: {0}")]
    Loader(std::io::Error),
    /// Several problems, one per line.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Several(Vec<ProfileError>),
}

impl ProfileError {
    /// One error for a list of problems (which must not be empty).
    pub(crate) fn from_list(mut errors: Vec<ProfileError>) -> ProfileError {
        if errors.len() == 1 {
            if let Some(error) = errors.pop() {
                return error;
            }
        }
        ProfileError::Several(errors)
    }

    /// Every single problem.
    pub fn problems(&self) -> Vec<&ProfileError> {
        match self {
            ProfileError::Several(errors) => errors.iter().flat_map(ProfileError::problems).collect(),
            other => vec![other],
        }
    }
}
