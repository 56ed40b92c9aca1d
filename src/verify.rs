//! Proving isolation from outside, the way a production canary would.
//!
//! [`verify`] boots a canary sandbox (and, unless turned off, a second "peer"
//! sandbox), and from inside the canary, as guest root, tries every way out
//! with `sandbox-probe`: TCP and vsock connections to the peer, to a TCP
//! service listening on the host's loopback (started here for the purpose,
//! like an SSH daemon), to the sandbox's own vsock ports, a DNS lookup of a
//! name no rule should allow, HTTPS to the host's loopback through the MITM,
//! and direct TCP/UDP connections to outside addresses, once with the guest
//! network as init built it and again after deleting every nftables rule
//! (bypassing the proxies). Every attempt must fail. The host side checks
//! what the guest cannot fake: the loopback service and the peer count the
//! connections they accepted, which must be none.
//!
//! A failed attempt inside the guest proves nothing by itself (an NXDOMAIN
//! can come from an upstream the handler forwarded to; a 502 from a MITM
//! that dialled the host's loopback and found nothing; silence from a UDP
//! target that never answers anyone). So every check is judged by [`judge`]
//! on evidence from outside the guest as well ([`Evidence`]): the decisions
//! in the canary's `session.db`, connections counted at the host-side
//! targets, and, for each outside target, what the host itself saw when it
//! reached that target first (the control): a failure in the guest counts as
//! blocked only when the same attempt from the host got an answer.
//!
//! ```no_run
//! let report = sandbox::verify::verify(&sandbox::verify::VerifyConfig::default())?;
//! print!("{}", report.table());
//! assert!(report.isolated());
//! # Ok::<(), sandbox::Error>(())
//! ```

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use guest_protocol::ports::{AGENT_PORT, GUEST_CID, HOST_CID, MITM_PORT};
pub use guest_protocol::probe::ProbeLine;
use guest_protocol::sandbox_dir::SandboxDir;

use policy::{Layer, ProfileSource};
use telemetry::query::{LogOptions, LogReader, LogRow};

use crate::{Command, Error, Image, Instance, NetConfig, Sandbox, SandboxBuilder, Status};

/// Where the probe lives in the default image.
pub const PROBE: &str = "/usr/bin/sandbox-probe";
/// The port the peer sandbox listens on (TCP and vsock).
pub const PEER_PORT: u16 = 7777;
/// The name looked up by default: no rule of a sound profile allows it.
pub const DEFAULT_CANARY_NAME: &str = "canary.verify-isolation.invalid";

/// What to verify, and with which sandbox settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct VerifyConfig {
    /// The canary's (and peer's) image.
    pub image: Image,
    /// Profiles for the canary (files or built-in names); empty: `deny-all`.
    pub profiles: Vec<String>,
    /// Corporate profiles for the canary (their locks bind `profiles`), as
    /// `sandbox run --corporate-profile` loads them.
    pub corporate_profiles: Vec<PathBuf>,
    /// Network handler settings (upstream DNS, allowed internal networks).
    pub net: NetConfig,
    /// Outside addresses to try reaching directly (TCP and UDP).
    pub targets: Vec<SocketAddr>,
    /// The DNS name to look up.
    pub canary_name: String,
    /// Port of the host loopback service; 0 picks a free one.
    pub host_port: u16,
    /// Boot a second sandbox and try to reach it.
    pub peer: bool,
    /// How long each attempt may take inside the guest.
    pub attempt_timeout: Duration,
    /// Guest RAM of each sandbox, in MiB.
    pub memory_mib: u32,
    /// Hold each sandbox in a confined holder process started with this
    /// program and arguments (see [`crate::SandboxBuilder::holder_program`]);
    /// `None`: in this process, unconfined.
    pub holder: Option<(PathBuf, Vec<String>)>,
    /// Restore each sandbox from the warm snapshot of its kind (see
    /// [`crate::SandboxBuilder::warm`]; made with the holder program)
    /// instead of booting it. Needs [`Self::holder`].
    pub warm: bool,
}

impl Default for VerifyConfig {
    fn default() -> Self {
        VerifyConfig {
            image: Image::Default,
            profiles: Vec::new(),
            corporate_profiles: Vec::new(),
            net: NetConfig::default(),
            targets: Vec::new(),
            canary_name: DEFAULT_CANARY_NAME.into(),
            host_port: 0,
            peer: true,
            attempt_timeout: Duration::from_secs(3),
            memory_mib: 256,
            holder: None,
            warm: false,
        }
    }
}

/// A sandbox the verification started: in a holder process, or in this one.
// Two of them, each made once: their size does not matter.
#[allow(clippy::large_enum_variant)]
enum Held {
    Holder(Sandbox),
    Here(Instance),
}

impl std::ops::Deref for Held {
    type Target = Sandbox;
    fn deref(&self) -> &Sandbox {
        match self {
            Held::Holder(sandbox) => sandbox,
            Held::Here(instance) => instance,
        }
    }
}

impl Held {
    fn start(builder: SandboxBuilder, config: &VerifyConfig) -> Result<Held, Error> {
        Ok(match &config.holder {
            Some((program, args)) => {
                let builder = builder.holder_program(program, args);
                Held::Holder(if config.warm { builder.warm() } else { builder }.spawn()?)
            }
            None => Held::Here(builder.start()?),
        })
    }

    /// Stop it; every row of its session is in its session.db when this returns.
    fn finish(self) {
        let stopped = match self {
            Held::Holder(sandbox) => sandbox.stop(Duration::from_secs(60)),
            Held::Here(instance) => instance.shutdown().map(drop),
        };
        if let Err(e) = stopped {
            tracing::warn!(error = %e, "verify-isolation: stopping a sandbox");
        }
    }
}

/// How one check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The attempt failed, as it must.
    Blocked,
    /// The attempt got through: isolation is broken.
    Escaped,
    /// The check could not be carried out (counts as a failure of the verification).
    Inconclusive,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Blocked => "blocked",
            Verdict::Escaped => "ESCAPED",
            Verdict::Inconclusive => "INCONCLUSIVE",
        })
    }
}

/// One row of the report.
#[derive(Debug, Clone)]
pub struct Check {
    /// What is being protected (`peer sandbox`, `host loopback`, ...).
    pub invariant: String,
    /// What was tried.
    pub attempt: String,
    pub verdict: Verdict,
    /// What happened, as the probe or the host observed it.
    pub detail: String,
}

/// The outcome of one verification round.
#[derive(Debug, Clone)]
pub struct Report {
    /// The canary sandbox's id (its session.db holds its DNS and HTTPS attempts).
    pub canary_id: String,
    pub canary_session_db: std::path::PathBuf,
    pub checks: Vec<Check>,
}

impl Report {
    /// True when every check was blocked.
    pub fn isolated(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.verdict == Verdict::Blocked)
    }

    /// The checks as an aligned text table.
    pub fn table(&self) -> String {
        let header = ("INVARIANT", "ATTEMPT", "RESULT", "DETAIL");
        let w0 = self.checks.iter().map(|c| c.invariant.len()).chain([header.0.len()]).max().unwrap_or(0);
        let w1 = self.checks.iter().map(|c| c.attempt.len()).chain([header.1.len()]).max().unwrap_or(0);
        let mut out = format!("{:w0$}  {:w1$}  {:12}  {}\n", header.0, header.1, header.2, header.3);
        for c in &self.checks {
            out.push_str(&format!(
                "{:w0$}  {:w1$}  {:12}  {}\n",
                c.invariant,
                c.attempt,
                c.verdict.to_string(),
                c.detail
            ));
        }
        let escaped = self.checks.iter().filter(|c| c.verdict != Verdict::Blocked).count();
        out.push_str(&if escaped == 0 {
            format!("isolated: all {} checks blocked (canary {})\n", self.checks.len(), self.canary_id)
        } else {
            format!(
                "NOT ISOLATED: {escaped} of {} checks did not block (canary {})\n",
                self.checks.len(),
                self.canary_id
            )
        });
        out
    }
}

/// What decides a check, besides the probe's own line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// A connection that must not be made: making it is an escape. With
    /// `refusal_is_remote` (the redirect rules are deleted and the address is
    /// not the guest's own), a refusal or reset came from a host the packet
    /// reached, and is an escape too.
    Connect { refusal_is_remote: bool },
    /// A lookup through the DNS handler: judged on the handler's decision in
    /// session.db (an NXDOMAIN may be the upstream's answer to a query the
    /// handler let out).
    Dns { qname: String },
    /// A lookup with the redirect rules deleted: any answer came from
    /// somewhere other than the handler.
    DnsBypass,
    /// HTTPS to the host's loopback through the MITM: judged on the
    /// connections counted at the host-side target on port 443 and on the
    /// MITM's decisions in session.db for port 443 of these names (the SNI,
    /// and the address the guest connected to, which a connection refused
    /// before its ClientHello is logged under).
    MitmLoopback { domains: Vec<String> },
    /// TCP leaving through dummy0 with the redirect rules in place: the
    /// guest's connect completes against net-proxy whatever the host then
    /// decides, so it is judged on the host's `tcp.connect` decision for that
    /// address and port in session.db.
    Redirected { target: SocketAddr },
    /// TCP to an outside target with the redirect rules deleted, judged
    /// against the host's own attempt.
    OutsideTcp { target: SocketAddr, rules_deleted: bool },
    /// UDP to an outside target, judged against the host's own attempt.
    OutsideUdp { target: SocketAddr, rules_deleted: bool },
    /// Guest root deleting the redirect rules (expected to work).
    NatFlush,
}

/// How a target answered the host's own attempt (or a guest's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    /// A connection was made, or a datagram answered.
    Answered,
    /// A TCP reset or an ICMP port unreachable came back: the packet arrived.
    Refused,
    /// Nothing came back (the reason).
    Silent(String),
}

/// What the host saw reaching an outside target itself, before the canary tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Control {
    pub target: SocketAddr,
    pub tcp: Reach,
    pub udp: Reach,
}

/// A `dns_events` decision of the canary's session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsDecision {
    pub qname: String,
    /// `allowed`, `denied` or `error`.
    pub decision: String,
    pub matched_rule: Option<String>,
}

/// A `net_events` decision of the canary's session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetDecision {
    pub domain: String,
    /// `allowed`, `denied` or `error`.
    pub decision: String,
    pub matched_rule: Option<String>,
    pub status_code: Option<i64>,
    /// The destination port, when logged.
    pub port: Option<i64>,
    /// The destination address the guest connected to, when logged.
    pub ip: Option<String>,
}

/// Evidence from outside the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Evidence {
    pub dns: Vec<DnsDecision>,
    pub net: Vec<NetDecision>,
    /// Connections the host-side target on the loopback's port 443 accepted
    /// (where the MITM would connect for `https://localhost/`); `None` when
    /// that port could not be listened on.
    pub loopback_https_accepted: Option<u32>,
    pub controls: Vec<Control>,
}

impl Evidence {
    /// The decisions recorded in `session.db`.
    pub fn read_session_db(&mut self, path: &std::path::Path) -> Result<(), telemetry::TelemetryError> {
        let options = LogOptions { dns: true, net: true, ..LogOptions::default() };
        let mut reader = LogReader::open(path, &options)?;
        loop {
            let (rows, more) = reader.read_new()?;
            for row in rows {
                match row {
                    LogRow::Dns(r) => self.dns.push(DnsDecision {
                        qname: r.qname,
                        decision: r.decision,
                        matched_rule: r.matched_rule,
                    }),
                    LogRow::Net(r) => self.net.push(NetDecision {
                        domain: r.domain,
                        decision: r.decision,
                        matched_rule: r.matched_rule,
                        status_code: r.status_code,
                        port: r.port,
                        ip: r.ip,
                    }),
                    LogRow::Ai(_) | LogRow::Inbound(_) => {}
                }
            }
            if !more {
                return Ok(());
            }
        }
    }
}

fn same_name(a: &str, b: &str) -> bool {
    a.trim_end_matches('.').eq_ignore_ascii_case(b.trim_end_matches('.'))
}

fn refusal(detail: &str) -> bool {
    detail.starts_with("refused") || detail.starts_with("reset")
}

fn rule_text(rule: Option<&String>) -> String {
    rule.map_or_else(|| "no rule".into(), |r| format!("rule {r}"))
}

/// The verdict of one check: the probe's line (`None` when it printed none)
/// weighed against the evidence from outside the guest.
pub fn judge(kind: &CheckKind, line: Option<&ProbeLine>, evidence: &Evidence) -> (Verdict, String) {
    let detail = line.map_or("no result from the probe", |l| l.detail.as_str());
    let ok = line.is_some_and(|l| l.ok);
    match kind {
        CheckKind::NatFlush => match line {
            Some(l) if l.ok => {
                (Verdict::Blocked, format!("{} (done; the checks below run without the redirects)", l.detail))
            }
            Some(l) => (Verdict::Inconclusive, format!("{} (could not delete them)", l.detail)),
            None => (Verdict::Inconclusive, detail.into()),
        },
        CheckKind::Connect { refusal_is_remote } => match line {
            Some(l) if l.ok => (Verdict::Escaped, l.detail.clone()),
            Some(l) if *refusal_is_remote && refusal(&l.detail) => (
                Verdict::Escaped,
                format!(
                    "{} (with the redirect rules deleted, a refusal comes from a host the packet reached)",
                    l.detail
                ),
            ),
            Some(l) => (Verdict::Blocked, l.detail.clone()),
            None => (Verdict::Inconclusive, detail.into()),
        },
        CheckKind::Dns { qname } => {
            let rows: Vec<&DnsDecision> = evidence.dns.iter().filter(|r| same_name(&r.qname, qname)).collect();
            if ok {
                return (Verdict::Escaped, detail.into());
            }
            if let Some(r) = rows.iter().find(|r| r.decision != "denied") {
                return (
                    Verdict::Escaped,
                    format!(
                        "{detail}; the DNS handler let the query out ({}, {})",
                        r.decision,
                        rule_text(r.matched_rule.as_ref())
                    ),
                );
            }
            match rows.first() {
                Some(r) => (
                    Verdict::Blocked,
                    format!("{detail}; denied by the DNS handler ({})", rule_text(r.matched_rule.as_ref())),
                ),
                None => (Verdict::Inconclusive, format!("{detail}; session.db has no decision for {qname}")),
            }
        }
        CheckKind::DnsBypass => match line {
            Some(l) if l.ok || l.detail.starts_with("rcode=") => (
                Verdict::Escaped,
                format!("{} (an answer came back with the redirect rules deleted, not from the handler)", l.detail),
            ),
            Some(l) => (Verdict::Blocked, l.detail.clone()),
            None => (Verdict::Inconclusive, detail.into()),
        },
        CheckKind::MitmLoopback { domains } => {
            let rows: Vec<&NetDecision> = evidence
                .net
                .iter()
                .filter(|r| domains.iter().any(|d| same_name(&r.domain, d)) && r.port.is_none_or(|p| p == 443))
                .collect();
            let counted = match evidence.loopback_https_accepted {
                Some(n) => format!("the host-side target on port 443 accepted {n}"),
                None => "port 443 of the host's loopback could not be watched".into(),
            };
            if ok {
                return (Verdict::Escaped, format!("{detail}; {counted}"));
            }
            if evidence.loopback_https_accepted.is_some_and(|n| n > 0) {
                return (Verdict::Escaped, format!("{detail}; {counted}"));
            }
            if let Some(r) = rows.iter().find(|r| r.decision != "denied") {
                // Allowed by policy and past the address guard: the MITM dialled the host.
                return (
                    Verdict::Escaped,
                    format!(
                        "{detail}; the MITM let the request through to the host ({}, {}); {counted}",
                        r.decision,
                        rule_text(r.matched_rule.as_ref())
                    ),
                );
            }
            if let Some(r) = rows.first() {
                return (
                    Verdict::Blocked,
                    format!("{detail}; denied by the MITM ({}); {counted}", rule_text(r.matched_rule.as_ref())),
                );
            }
            match evidence.loopback_https_accepted {
                Some(_) => (Verdict::Blocked, format!("{detail}; {counted}")),
                None => (Verdict::Inconclusive, format!("{detail}; no decision in session.db and {counted}")),
            }
        }
        CheckKind::Redirected { target } => {
            let rows: Vec<&NetDecision> = evidence
                .net
                .iter()
                .filter(|r| {
                    r.ip.as_deref() == Some(target.ip().to_string().as_str())
                        && r.port == Some(i64::from(target.port()))
                })
                .collect();
            if !ok {
                return match line {
                    Some(l) => (Verdict::Blocked, format!("{} (not even net-proxy accepted it)", l.detail)),
                    None => (Verdict::Inconclusive, detail.into()),
                };
            }
            if let Some(r) = rows.iter().find(|r| r.decision != "denied") {
                return (
                    Verdict::Escaped,
                    format!(
                        "{detail}; the host let the connection out ({}, {})",
                        r.decision,
                        rule_text(r.matched_rule.as_ref())
                    ),
                );
            }
            match rows.first() {
                Some(r) => (
                    Verdict::Blocked,
                    format!(
                        "{detail} to the guest's net-proxy; the host refused it ({})",
                        rule_text(r.matched_rule.as_ref())
                    ),
                ),
                None => (Verdict::Inconclusive, format!("{detail}; session.db has no decision for {target}")),
            }
        }
        CheckKind::OutsideTcp { target, rules_deleted } => {
            let control = evidence.controls.iter().find(|c| c.target == *target).map(|c| &c.tcp);
            judge_outside(ok, detail, line.is_some(), control, *rules_deleted, "TCP")
        }
        CheckKind::OutsideUdp { target, rules_deleted } => {
            let control = evidence.controls.iter().find(|c| c.target == *target).map(|c| &c.udp);
            judge_outside(ok, detail, line.is_some(), control, *rules_deleted, "UDP")
        }
    }
}

/// An attempt at an outside target, against the host's own attempt at it.
fn judge_outside(
    ok: bool,
    detail: &str,
    got_line: bool,
    control: Option<&Reach>,
    rules_deleted: bool,
    proto: &str,
) -> (Verdict, String) {
    if ok {
        return (Verdict::Escaped, detail.into());
    }
    if !got_line {
        return (Verdict::Inconclusive, detail.into());
    }
    let refused = refusal(detail);
    match control {
        None => (Verdict::Inconclusive, format!("{detail}; the host did not try this target itself")),
        // Had the guest's packet arrived, it would have been answered.
        Some(Reach::Answered) => (Verdict::Blocked, format!("{detail}; the target answers {proto} from the host")),
        Some(Reach::Refused) if refused && rules_deleted => (
            Verdict::Escaped,
            format!("{detail}; the target refuses {proto} from the host too: the guest's packet reached it"),
        ),
        Some(Reach::Refused) if refused => (
            Verdict::Inconclusive,
            format!("{detail}; the target refuses {proto} from the host too, so its refusal cannot be told from the sandbox's own"),
        ),
        Some(Reach::Refused) => (Verdict::Blocked, format!("{detail}; the target refuses {proto} from the host")),
        Some(Reach::Silent(_)) if refused && rules_deleted => (
            Verdict::Escaped,
            format!("{detail}; with the redirect rules deleted, a refusal comes from a host the packet reached"),
        ),
        Some(Reach::Silent(why)) => (
            Verdict::Inconclusive,
            format!("{detail}; the host gets no {proto} answer from the target either ({why}), so silence proves nothing: use a target that answers"),
        ),
    }
}

/// The host's own attempt at `target`: one TCP connection and one datagram.
fn control(target: SocketAddr, timeout: Duration) -> Control {
    let tcp = match TcpStream::connect_timeout(&target, timeout) {
        Ok(_) => Reach::Answered,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset) => {
            Reach::Refused
        }
        Err(e) => Reach::Silent(e.to_string()),
    };
    let udp = (|| -> std::io::Result<()> {
        let any: SocketAddr =
            if target.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
        let socket = UdpSocket::bind(any)?;
        socket.connect(target)?;
        socket.set_read_timeout(Some(timeout))?;
        socket.send(b"sandbox verify-isolation control\n")?;
        let mut buf = [0u8; 512];
        socket.recv(&mut buf).map(|_| ())
    })();
    let udp = match udp {
        Ok(()) => Reach::Answered,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Reach::Refused,
        Err(e) => Reach::Silent(e.to_string()),
    };
    Control { target, tcp, udp }
}

/// A TCP service on the host's loopback that counts who connects.
struct LoopbackService {
    addr: SocketAddr,
    accepted: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LoopbackService {
    fn start(port: u16) -> Result<LoopbackService, Error> {
        Self::start_at(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
    }

    fn start_at(bind: SocketAddr) -> Result<LoopbackService, Error> {
        let listener = TcpListener::bind(bind)
            .map_err(|e| Error::Io(format!("listen on {bind} for the host loopback check"), e))?;
        let addr = listener.local_addr().map_err(|e| Error::Io("loopback service address".into(), e))?;
        listener.set_nonblocking(true).map_err(|e| Error::Io("loopback service".into(), e))?;
        let accepted = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (accepted, stop) = (Arc::clone(&accepted), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((mut s, peer)) => {
                            accepted.fetch_add(1, Ordering::SeqCst);
                            tracing::warn!(%peer, "verify-isolation: the host loopback service accepted a connection");
                            let _ = s.write_all(b"SSH-2.0-sandbox-verify\r\n");
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(50)),
                    }
                }
            })
        };
        Ok(LoopbackService { addr, accepted, stop, thread: Some(thread) })
    }

    fn finish(mut self) -> u32 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.accepted.load(Ordering::SeqCst)
    }
}

/// An attempt made from inside the canary: the row it fills, the probe's
/// arguments and what decides it.
struct Attempt {
    invariant: &'static str,
    args: Vec<String>,
    label: String,
    kind: CheckKind,
}

fn attempt(invariant: &'static str, label: impl Into<String>, args: &[&str]) -> Attempt {
    let kind = match args.first().copied() {
        Some("nat-flush") => CheckKind::NatFlush,
        _ => CheckKind::Connect { refusal_is_remote: false },
    };
    Attempt { invariant, args: args.iter().map(|s| s.to_string()).collect(), label: label.into(), kind }
}

impl Attempt {
    fn judged_by(mut self, kind: CheckKind) -> Attempt {
        self.kind = kind;
        self
    }
}

/// An address on the guest's side of dummy0 that is not the guest's own:
/// TCP to it leaves through dummy0.
const GUEST_PEER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

/// Where the MITM check sends the canary: the MITM would connect to port 443 of it.
const LOOPBACK_NAME: &str = "localhost";

/// The attempts, in order; the nftables rules are deleted in the middle.
fn attempts(config: &VerifyConfig, host: SocketAddr) -> Vec<Attempt> {
    let host_port = host.port().to_string();
    let peer_port = PEER_PORT.to_string();
    let mut list = vec![
        attempt(
            "peer sandbox",
            format!("tcp 10.0.0.2:{PEER_PORT}"),
            &["tcp-connect", &format!("10.0.0.2:{PEER_PORT}")],
        )
        .judged_by(CheckKind::Redirected { target: SocketAddr::from((GUEST_PEER, PEER_PORT)) }),
        attempt(
            "peer sandbox",
            format!("vsock {GUEST_CID}:{PEER_PORT} (every guest's CID)"),
            &["vsock-connect", &format!("{GUEST_CID}:{peer_port}")],
        ),
        attempt("peer sandbox", format!("vsock 4:{PEER_PORT}"), &["vsock-connect", &format!("4:{peer_port}")]),
        attempt(
            "peer sandbox",
            format!("vsock {HOST_CID}:{PEER_PORT} (host)"),
            &["vsock-connect", &format!("{HOST_CID}:{peer_port}")],
        ),
        attempt(
            "host loopback",
            format!("tcp 127.0.0.1:{host_port}"),
            &["tcp-connect", &format!("127.0.0.1:{host_port}")],
        ),
        attempt(
            "host loopback",
            format!("tcp 10.0.0.2:{host_port}"),
            &["tcp-connect", &format!("10.0.0.2:{host_port}")],
        )
        .judged_by(CheckKind::Redirected { target: SocketAddr::from((GUEST_PEER, host.port())) }),
        attempt(
            "host loopback",
            format!("vsock {HOST_CID}:{host_port}"),
            &["vsock-connect", &format!("{HOST_CID}:{host_port}")],
        ),
        attempt(
            "host loopback",
            format!("https://{LOOPBACK_NAME}/ via the MITM"),
            &["tls", "10.0.0.2:443", "--sni", LOOPBACK_NAME],
        )
        .judged_by(CheckKind::MitmLoopback { domains: vec![LOOPBACK_NAME.into(), "10.0.0.2".into()] }),
        attempt(
            "sandbox sockets",
            format!("vsock {HOST_CID}:{AGENT_PORT} (agent port, host side)"),
            &["vsock-connect", &format!("{HOST_CID}:{AGENT_PORT}")],
        ),
        attempt("sandbox sockets", format!("vsock {HOST_CID}:5001"), &["vsock-connect", &format!("{HOST_CID}:5001")]),
        attempt(
            "sandbox sockets",
            format!("vsock 1:{MITM_PORT} (the guest's local CID)"),
            &["vsock-connect", &format!("1:{MITM_PORT}")],
        ),
        attempt("dns", format!("{} A", config.canary_name), &["dns", &config.canary_name])
            .judged_by(CheckKind::Dns { qname: config.canary_name.clone() }),
    ];
    for target in &config.targets {
        list.push(
            attempt("outside address", format!("tcp {target}"), &["tcp-connect", &target.to_string()])
                .judged_by(CheckKind::Redirected { target: *target }),
        );
        list.push(
            attempt("outside address", format!("udp {target}"), &["udp", &target.to_string()])
                .judged_by(CheckKind::OutsideUdp { target: *target, rules_deleted: false }),
        );
    }
    // Guest root removes the redirects: nothing may change.
    list.push(attempt("guest network", "delete every nftables rule (guest root)", &["nat-flush"]));
    let mut bypass = vec![
        attempt(
            "host loopback",
            format!("tcp 10.0.0.2:{host_port} (rules deleted)"),
            &["tcp-connect", &format!("10.0.0.2:{host_port}")],
        )
        .judged_by(CheckKind::Connect { refusal_is_remote: true }),
        attempt(
            "dns",
            format!("{} A via 10.0.0.2:53 (rules deleted)", config.canary_name),
            &["dns", &config.canary_name, "--server", "10.0.0.2:53"],
        )
        .judged_by(CheckKind::DnsBypass),
    ];
    for target in &config.targets {
        bypass.push(
            attempt("outside address", format!("tcp {target} (rules deleted)"), &["tcp-connect", &target.to_string()])
                .judged_by(CheckKind::OutsideTcp { target: *target, rules_deleted: true }),
        );
        bypass.push(
            attempt("outside address", format!("udp {target} (rules deleted)"), &["udp", &target.to_string()])
                .judged_by(CheckKind::OutsideUdp { target: *target, rules_deleted: true }),
        );
    }
    list.extend(bypass);
    list
}

/// Run `argv` in `sandbox`, collecting stdout.
fn exec(
    sandbox: &Sandbox,
    argv: Vec<String>,
    stdin: Option<std::io::PipeReader>,
) -> Result<(i32, String, String), Error> {
    let mut command = Command::from_argv(argv);
    if let Some(stdin) = stdin {
        command = command.stdin_from(stdin);
    }
    let out = sandbox.output(command)?;
    let status = match out.status {
        Status::Exited(code) => code,
        Status::TimedOut => -1,
    };
    Ok((status, String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned()))
}

/// Boot the sandboxes, make every attempt, and report.
pub fn verify(config: &VerifyConfig) -> Result<Report, Error> {
    let host = LoopbackService::start(config.host_port)?;
    // Where the MITM would connect for https://localhost/: count there.
    let https_target = match LoopbackService::start_at(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 443)) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "verify-isolation: cannot watch the host's loopback port 443; the MITM check relies on session.db alone");
            None
        }
    };
    let https_target_v6 = https_target
        .as_ref()
        .and_then(|_| LoopbackService::start_at(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 443)).ok());
    // The host reaches each outside target itself first: the guest's failure
    // counts only against a target that answers.
    let controls: Vec<Control> = config.targets.iter().map(|t| control(*t, config.attempt_timeout)).collect();
    let mut canary_builder =
        Sandbox::builder(config.image.clone()).memory_mib(config.memory_mib).net_config(config.net.clone());
    for f in &config.corporate_profiles {
        canary_builder = canary_builder.profile_at(Layer::Corporate, ProfileSource::File(f.clone()));
    }
    for p in &config.profiles {
        canary_builder = canary_builder.profile(p);
    }
    // One after the other: two guests booting at once on a loaded host can
    // starve each other past the agent's timeouts where kernel code is emulated.
    let peer = if config.peer {
        Some(Held::start(Sandbox::builder(config.image.clone()).memory_mib(config.memory_mib), config)?)
    } else {
        None
    };
    let canary = Held::start(canary_builder, config)?;

    // The peer listens until its standard input ends (after the canary's attempts).
    let attempt_secs = config.attempt_timeout.as_secs().max(1);
    let mut peer_writer = None;
    let peer_thread = match peer {
        None => None,
        Some(peer) => {
            let (reader, writer) =
                std::io::pipe().map_err(|e| Error::Io("create a pipe for the peer's listener".into(), e))?;
            peer_writer = Some(writer);
            let argv = vec![
                PROBE.to_string(),
                "--timeout".into(),
                "3600".into(),
                "listen".into(),
                "--tcp".into(),
                PEER_PORT.to_string(),
                "--vsock".into(),
                PEER_PORT.to_string(),
                "--until-eof".into(),
            ];
            Some(std::thread::spawn(move || {
                let result = exec(&peer, argv, Some(reader));
                peer.finish();
                result
            }))
        }
    };
    if peer_thread.is_some() {
        // Let the listener come up before the canary tries it.
        std::thread::sleep(Duration::from_secs(2));
    }

    let list = attempts(config, host.addr);
    let mut script = String::new();
    for a in &list {
        let mut argv = vec![PROBE.to_string(), "--timeout".into(), attempt_secs.to_string()];
        argv.extend(a.args.iter().cloned());
        script.push_str(&argv.iter().map(|s| shell_quote(s)).collect::<Vec<_>>().join(" "));
        script.push_str(" || true\n");
    }
    let canary_run = exec(&canary, vec!["/bin/sh".into(), "-c".into(), script], None);
    drop(peer_writer);
    let peer_outcome = peer_thread.map(|t| t.join().ok());
    let host_addr = host.addr;
    let host_accepted = host.finish();
    let https_accepted = https_target.map(|t| t.finish() + https_target_v6.map_or(0, LoopbackService::finish));
    let canary_id = canary.id().to_string();
    let canary_session_db = SandboxDir::new(canary.dir()).session_db();
    // Stopping commits every row of the canary's session.
    canary.finish();
    let (_, stdout, stderr) = canary_run?;
    let mut evidence = Evidence { loopback_https_accepted: https_accepted, controls, ..Evidence::default() };
    if let Err(e) = evidence.read_session_db(&canary_session_db) {
        tracing::warn!(error = %e, "verify-isolation: cannot read the canary's session.db; the checks that need it are inconclusive");
    }

    let mut checks = Vec::new();
    let mut lines = stdout.lines().filter_map(ProbeLine::parse);
    for a in &list {
        let line = lines.next();
        let (verdict, mut detail) = judge(&a.kind, line.as_ref(), &evidence);
        if line.is_none() {
            detail = format!("{detail}; stderr: {}", stderr.trim());
        }
        checks.push(Check { invariant: a.invariant.into(), attempt: a.label.clone(), verdict, detail });
    }
    checks.push(Check {
        invariant: "host loopback".into(),
        attempt: format!("connections seen by the service on {host_addr}"),
        verdict: if host_accepted == 0 { Verdict::Blocked } else { Verdict::Escaped },
        detail: format!("accepted={host_accepted}"),
    });
    if let Some(outcome) = peer_outcome {
        let (verdict, detail) = match outcome {
            Some(Ok((_, out, _))) => match out.lines().find_map(ProbeLine::parse) {
                Some(line) if line.ok && line.detail == "accepted=0" => (Verdict::Blocked, line.detail),
                Some(line) if line.ok => (Verdict::Escaped, line.detail),
                Some(line) => (Verdict::Inconclusive, format!("the peer could not listen: {}", line.detail)),
                None => (Verdict::Inconclusive, format!("no result from the peer's listener: {}", out.trim())),
            },
            Some(Err(e)) => (Verdict::Inconclusive, format!("the peer's listener failed: {e}")),
            None => (Verdict::Inconclusive, "the peer's listener did not report".into()),
        };
        checks.push(Check {
            invariant: "peer sandbox".into(),
            attempt: format!("connections seen by the peer on tcp and vsock port {PEER_PORT}"),
            verdict,
            detail,
        });
    }
    Ok(Report { canary_id, canary_session_db, checks })
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:=,@".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// `30s`, `5m`, `2h` or a number of seconds.
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number.parse().map_err(|_| format!("{text:?}: expected a number and s, m or h, e.g. 5m"))?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        _ => return Err(format!("{text:?}: the unit must be s, m or h")),
    };
    if secs == 0 {
        return Err("the interval must be longer than zero".into());
    }
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_interval("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_interval("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_interval("45").unwrap(), Duration::from_secs(45));
        for bad in ["", "0s", "5d", "m", "-5m", "1.5m"] {
            assert!(parse_interval(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_report_is_isolated_only_when_every_check_blocked() {
        let check = |verdict| Check { invariant: "dns".into(), attempt: "x A".into(), verdict, detail: "d".into() };
        let mut report =
            Report { canary_id: "abc".into(), canary_session_db: "/x".into(), checks: vec![check(Verdict::Blocked)] };
        assert!(report.isolated());
        assert!(report.table().contains("isolated: all 1 checks blocked"));
        report.checks.push(check(Verdict::Inconclusive));
        assert!(!report.isolated());
        report.checks.push(check(Verdict::Escaped));
        assert!(report.table().contains("NOT ISOLATED: 2 of 3"), "{}", report.table());
        assert!(!Report { canary_id: String::new(), canary_session_db: "/x".into(), checks: vec![] }.isolated());
    }

    fn line(text: &str) -> ProbeLine {
        ProbeLine::parse(text).unwrap()
    }

    fn dns_row(qname: &str, decision: &str) -> DnsDecision {
        DnsDecision { qname: qname.into(), decision: decision.into(), matched_rule: Some("r".into()) }
    }

    #[test]
    fn dns_check_reports_a_query_the_handler_let_out() {
        let kind = CheckKind::Dns { qname: DEFAULT_CANARY_NAME.into() };
        let nxdomain = line("dns canary.verify-isolation.invalid/A fail rcode=Non-Existent Domain answers=[]");
        // An allow-all profile: the handler forwarded the query and the
        // upstream answered NXDOMAIN for the .invalid name.
        let leaky =
            Evidence { dns: vec![dns_row("Canary.Verify-Isolation.invalid.", "allowed")], ..Evidence::default() };
        let (verdict, detail) = judge(&kind, Some(&nxdomain), &leaky);
        assert_eq!(verdict, Verdict::Escaped, "{detail}");
        assert!(detail.contains("let the query out"), "{detail}");
        // The same answer with the handler's denial on record is blocked.
        let sound = Evidence { dns: vec![dns_row(DEFAULT_CANARY_NAME, "denied")], ..Evidence::default() };
        assert_eq!(judge(&kind, Some(&nxdomain), &sound).0, Verdict::Blocked);
        // No decision on record: nothing proves the query was stopped.
        assert_eq!(judge(&kind, Some(&nxdomain), &Evidence::default()).0, Verdict::Inconclusive);
        // An answer is an escape whatever the rows say.
        let answered = line("dns canary.test/A ok rcode=No Error answers=[192.0.2.80]");
        assert_eq!(judge(&kind, Some(&answered), &sound).0, Verdict::Escaped);
        // With the rules deleted, an NXDOMAIN came from somewhere else.
        let (verdict, _) = judge(&CheckKind::DnsBypass, Some(&nxdomain), &Evidence::default());
        assert_eq!(verdict, Verdict::Escaped);
        let silent = line("dns canary.test/A fail timeout: Resource temporarily unavailable (os error 11)");
        assert_eq!(judge(&CheckKind::DnsBypass, Some(&silent), &Evidence::default()).0, Verdict::Blocked);
    }

    #[test]
    fn mitm_loopback_check_counts_at_the_target() {
        let kind = CheckKind::MitmLoopback { domains: vec!["localhost".into(), "10.0.0.2".into()] };
        let bad_gateway = line("tls 10.0.0.2:443/sni=localhost/host=localhost fail status=502; issuer CN=sandbox");
        // The MITM connected to the host's loopback: the target counted it.
        let reached = Evidence { loopback_https_accepted: Some(1), ..Evidence::default() };
        let (verdict, detail) = judge(&kind, Some(&bad_gateway), &reached);
        assert_eq!(verdict, Verdict::Escaped, "{detail}");
        assert!(detail.contains("accepted 1"), "{detail}");
        // Nothing listened where it dialled, but policy and guard let it try.
        let dialled = Evidence {
            net: vec![NetDecision {
                domain: "localhost".into(),
                decision: "error".into(),
                matched_rule: Some("allow_all".into()),
                status_code: Some(502),
                port: Some(443),
                ip: None,
            }],
            ..Evidence::default()
        };
        assert_eq!(judge(&kind, Some(&bad_gateway), &dialled).0, Verdict::Escaped);
        // Sound: the target saw nothing, and the MITM's refusal is on record.
        let denied = Evidence {
            net: vec![NetDecision {
                domain: "localhost".into(),
                decision: "denied".into(),
                matched_rule: Some("address-guard".into()),
                status_code: Some(403),
                port: Some(443),
                ip: None,
            }],
            loopback_https_accepted: Some(0),
            ..Evidence::default()
        };
        assert_eq!(judge(&kind, Some(&bad_gateway), &denied).0, Verdict::Blocked);
        // A connection refused before its ClientHello is logged under the address.
        let refused_early = Evidence {
            net: vec![NetDecision {
                domain: "10.0.0.2".into(),
                decision: "denied".into(),
                matched_rule: None,
                status_code: None,
                port: Some(443),
                ip: Some("10.0.0.2".into()),
            }],
            ..Evidence::default()
        };
        assert_eq!(judge(&kind, Some(&bad_gateway), &refused_early).0, Verdict::Blocked);
        // A connection-level allow of that address lets the MITM go on.
        let allowed_early = Evidence {
            net: vec![NetDecision {
                domain: "10.0.0.2".into(),
                decision: "allowed".into(),
                matched_rule: Some("tcp.any".into()),
                status_code: None,
                port: Some(443),
                ip: Some("10.0.0.2".into()),
            }],
            ..Evidence::default()
        };
        assert_eq!(judge(&kind, Some(&bad_gateway), &allowed_early).0, Verdict::Escaped);
        // Rows for other ports of that address belong to other checks.
        let other_port = Evidence {
            net: vec![NetDecision {
                domain: "10.0.0.2".into(),
                decision: "allowed".into(),
                matched_rule: None,
                status_code: None,
                port: Some(2222),
                ip: Some("10.0.0.2".into()),
            }],
            loopback_https_accepted: Some(0),
            ..Evidence::default()
        };
        assert_eq!(judge(&kind, Some(&bad_gateway), &other_port).0, Verdict::Blocked);
        // Neither a count nor a decision: unproven.
        assert_eq!(judge(&kind, Some(&bad_gateway), &Evidence::default()).0, Verdict::Inconclusive);
    }

    #[test]
    fn silent_udp_target_is_not_read_as_blocked() {
        let target: SocketAddr = "192.0.2.7:9999".parse().unwrap();
        let no_answer = line("udp 192.0.2.7:9999 fail timeout: Resource temporarily unavailable (os error 11)");
        let with = |udp: Reach| Evidence {
            controls: vec![Control { target, tcp: Reach::Answered, udp }],
            ..Evidence::default()
        };
        for rules_deleted in [false, true] {
            let kind = CheckKind::OutsideUdp { target, rules_deleted };
            // A target that answers nobody: the guest's silence proves nothing.
            let (verdict, detail) = judge(&kind, Some(&no_answer), &with(Reach::Silent("timed out".into())));
            assert_eq!(verdict, Verdict::Inconclusive, "{detail}");
            // A target that answers the host: silence in the guest means blocked.
            assert_eq!(judge(&kind, Some(&no_answer), &with(Reach::Answered)).0, Verdict::Blocked);
            // No control measured: unproven.
            assert_eq!(judge(&kind, Some(&no_answer), &Evidence::default()).0, Verdict::Inconclusive);
        }
        // Leaky: the datagram reached a closed port and the ICMP error came back.
        let refused = line("udp 192.0.2.7:9999 fail refused: Connection refused (os error 111)");
        let kind = CheckKind::OutsideUdp { target, rules_deleted: true };
        assert_eq!(judge(&kind, Some(&refused), &with(Reach::Refused)).0, Verdict::Escaped);
        let answered = line("udp 192.0.2.7:9999 ok answer of 4 bytes");
        assert_eq!(judge(&kind, Some(&answered), &with(Reach::Answered)).0, Verdict::Escaped);
    }

    #[test]
    fn tcp_reset_from_the_target_is_an_escape() {
        let target: SocketAddr = "192.0.2.7:22".parse().unwrap();
        let reset = line("tcp-connect 192.0.2.7:22 fail reset: Connection reset by peer (os error 104)");
        let refused = line("tcp-connect 192.0.2.7:22 fail refused: Connection refused (os error 111)");
        let closed_port = Evidence {
            controls: vec![Control { target, tcp: Reach::Refused, udp: Reach::Refused }],
            ..Evidence::default()
        };
        // With the redirects deleted nothing in the guest refuses: the RST came from the target.
        let bypass = CheckKind::OutsideTcp { target, rules_deleted: true };
        for l in [&reset, &refused] {
            let (verdict, detail) = judge(&bypass, Some(l), &closed_port);
            assert_eq!(verdict, Verdict::Escaped, "{detail}");
        }
        let to_host = CheckKind::Connect { refusal_is_remote: true };
        assert_eq!(judge(&to_host, Some(&refused), &Evidence::default()).0, Verdict::Escaped);
        let listening = Evidence {
            controls: vec![Control { target, tcp: Reach::Answered, udp: Reach::Answered }],
            ..Evidence::default()
        };
        let timeout = line("tcp-connect 192.0.2.7:22 fail timeout: connection timed out");
        assert_eq!(judge(&bypass, Some(&timeout), &listening).0, Verdict::Blocked);
        assert_eq!(
            judge(
                &bypass,
                Some(&timeout),
                &Evidence {
                    controls: vec![Control { target, tcp: Reach::Silent("timed out".into()), udp: Reach::Answered }],
                    ..Evidence::default()
                }
            )
            .0,
            Verdict::Inconclusive
        );
    }

    #[test]
    fn redirected_connections_are_judged_by_the_hosts_decision() {
        // With the redirect rules in place every TCP connect completes against
        // the guest's net-proxy: what counts is what the host decided.
        let target: SocketAddr = "192.0.2.7:22".parse().unwrap();
        let redirected = CheckKind::Redirected { target };
        let connected = line("tcp-connect 192.0.2.7:22 ok connected from 10.0.0.1:4000");
        let row = |decision: &str, port: i64| NetDecision {
            domain: "192.0.2.7".into(),
            decision: decision.into(),
            matched_rule: (decision != "denied").then(|| "tcp.leaky".into()),
            status_code: None,
            port: Some(port),
            ip: Some("192.0.2.7".into()),
        };
        let denied = Evidence { net: vec![row("denied", 22)], ..Evidence::default() };
        assert_eq!(judge(&redirected, Some(&connected), &denied).0, Verdict::Blocked);
        // A leaky profile: the host let it out, in any mode.
        let leaky = Evidence { net: vec![row("denied", 22), row("allowed", 22)], ..Evidence::default() };
        let (verdict, detail) = judge(&redirected, Some(&connected), &leaky);
        assert_eq!(verdict, Verdict::Escaped, "{detail}");
        let failed_upstream = Evidence { net: vec![row("error", 22)], ..Evidence::default() };
        assert_eq!(judge(&redirected, Some(&connected), &failed_upstream).0, Verdict::Escaped);
        // A decision on another port says nothing about this one.
        let other_port = Evidence { net: vec![row("denied", 23)], ..Evidence::default() };
        assert_eq!(judge(&redirected, Some(&connected), &other_port).0, Verdict::Inconclusive);
        let refused = line("tcp-connect 192.0.2.7:22 fail refused: Connection refused (os error 111)");
        assert_eq!(judge(&redirected, Some(&refused), &Evidence::default()).0, Verdict::Blocked);
    }

    #[test]
    fn every_check_is_judged_by_evidence_that_can_fail_it() {
        let config = VerifyConfig { targets: vec!["192.0.2.7:22".parse().unwrap()], ..VerifyConfig::default() };
        let list = attempts(&config, "127.0.0.1:2222".parse().unwrap());
        let kind_of = |label: &str| list.iter().find(|a| a.label == label).map(|a| a.kind.clone()).unwrap();
        assert_eq!(kind_of(&format!("{DEFAULT_CANARY_NAME} A")), CheckKind::Dns { qname: DEFAULT_CANARY_NAME.into() });
        assert_eq!(
            kind_of("https://localhost/ via the MITM"),
            CheckKind::MitmLoopback { domains: vec!["localhost".into(), "10.0.0.2".into()] }
        );
        assert!(matches!(kind_of("udp 192.0.2.7:22"), CheckKind::OutsideUdp { rules_deleted: false, .. }));
        assert!(matches!(
            kind_of("udp 192.0.2.7:22 (rules deleted)"),
            CheckKind::OutsideUdp { rules_deleted: true, .. }
        ));
        assert!(matches!(
            kind_of("tcp 192.0.2.7:22 (rules deleted)"),
            CheckKind::OutsideTcp { rules_deleted: true, .. }
        ));
        assert_eq!(kind_of("tcp 192.0.2.7:22"), CheckKind::Redirected { target: "192.0.2.7:22".parse().unwrap() });
        assert_eq!(kind_of("tcp 10.0.0.2:7777"), CheckKind::Redirected { target: "10.0.0.2:7777".parse().unwrap() });
        assert_eq!(kind_of("tcp 10.0.0.2:2222 (rules deleted)"), CheckKind::Connect { refusal_is_remote: true });
    }

    #[test]
    fn the_host_control_tells_answering_targets_from_silent_ones() {
        // A local target that answers UDP and accepts TCP.
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let udp = UdpSocket::bind(addr).unwrap();
        let echo = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            if let Ok((n, from)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(&buf[..n], from);
            }
        });
        let c = control(addr, Duration::from_secs(2));
        assert_eq!((c.tcp, c.udp), (Reach::Answered, Reach::Answered));
        // A port nothing listens on refuses both.
        echo.join().unwrap();
        drop(tcp);
        let c = control(addr, Duration::from_secs(2));
        assert_eq!((c.tcp, c.udp), (Reach::Refused, Reach::Refused));
    }

    #[test]
    fn evidence_is_read_from_session_db() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("session.db");
        let session = telemetry::SessionDb::open(&path).unwrap();
        let event = telemetry::DnsEvent {
            time: std::time::SystemTime::now(),
            qname: DEFAULT_CANARY_NAME.into(),
            qtype: "A".into(),
            rcode: "NXDOMAIN".into(),
            decision: telemetry::Outcome::Allowed,
            matched_rule: Some("allow_all".into()),
            answers: Vec::new(),
            process_name: None,
            trace_id: None,
            error: None,
        };
        session.recorder().record_dns(event).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(session.close()).unwrap();
        let mut evidence = Evidence::default();
        evidence.read_session_db(&path).unwrap();
        assert_eq!(
            evidence.dns,
            vec![DnsDecision {
                qname: DEFAULT_CANARY_NAME.into(),
                decision: "allowed".into(),
                matched_rule: Some("allow_all".into())
            }]
        );
    }

    #[test]
    fn the_attempts_cover_every_invariant_and_flush_before_the_bypass() {
        let config = VerifyConfig { targets: vec!["127.0.0.1:9".parse().unwrap()], ..VerifyConfig::default() };
        let list = attempts(&config, "127.0.0.1:2222".parse().unwrap());
        let flush = list.iter().position(|a| a.args[0] == "nat-flush").unwrap();
        for invariant in ["peer sandbox", "host loopback", "sandbox sockets", "dns", "outside address"] {
            assert!(list[..flush].iter().any(|a| a.invariant == invariant), "{invariant}");
        }
        assert!(list[flush + 1..].iter().any(|a| a.args.contains(&"127.0.0.1:9".to_string())));
        assert_eq!(shell_quote("a b'c"), r"'a b'\''c'");
        assert_eq!(shell_quote("10.0.0.2:53"), "10.0.0.2:53");
    }
}
