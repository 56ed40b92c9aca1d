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
//! ```no_run
//! let report = sandbox::verify::verify(&sandbox::verify::VerifyConfig::default())?;
//! print!("{}", report.table());
//! assert!(report.isolated());
//! # Ok::<(), sandbox::Error>(())
//! ```

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use guest_protocol::agent::Exec;

use crate::{Error, Image, Instance, NetConfig, Sandbox};

/// Where the probe lives in the default image.
pub const PROBE: &str = "/usr/bin/sandbox-probe";
/// The port the peer sandbox listens on (TCP and vsock).
pub const PEER_PORT: u16 = 7777;
/// The name looked up by default: no rule of a sound profile allows it.
pub const DEFAULT_CANARY_NAME: &str = "canary.verify-isolation.invalid";

/// What to verify, and with which sandbox settings.
#[derive(Debug, Clone)]
pub struct VerifyConfig {
    /// The canary's (and peer's) image.
    pub image: Image,
    /// Profiles for the canary (files or built-in names); empty: `deny-all`.
    pub profiles: Vec<String>,
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
}

impl Default for VerifyConfig {
    fn default() -> Self {
        VerifyConfig {
            image: Image::Default,
            profiles: Vec::new(),
            net: NetConfig::default(),
            targets: Vec::new(),
            canary_name: DEFAULT_CANARY_NAME.into(),
            host_port: 0,
            peer: true,
            attempt_timeout: Duration::from_secs(3),
            memory_mib: 256,
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
            out.push_str(&format!("{:w0$}  {:w1$}  {:12}  {}\n", c.invariant, c.attempt, c.verdict.to_string(), c.detail));
        }
        let escaped = self.checks.iter().filter(|c| c.verdict != Verdict::Blocked).count();
        out.push_str(&if escaped == 0 {
            format!("isolated: all {} checks blocked (canary {})\n", self.checks.len(), self.canary_id)
        } else {
            format!("NOT ISOLATED: {escaped} of {} checks did not block (canary {})\n", self.checks.len(), self.canary_id)
        });
        out
    }
}

/// One line of `sandbox-probe` output: `<probe> <target> ok|fail <detail>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeLine {
    pub probe: String,
    pub target: String,
    pub ok: bool,
    pub detail: String,
}

impl ProbeLine {
    /// Parse one output line; `None` for anything else.
    pub fn parse(line: &str) -> Option<ProbeLine> {
        let mut parts = line.splitn(4, ' ');
        let probe = parts.next()?.to_string();
        let target = parts.next()?.to_string();
        let ok = match parts.next()? {
            "ok" => true,
            "fail" => false,
            _ => return None,
        };
        let detail = parts.next().unwrap_or("").to_string();
        Some(ProbeLine { probe, target, ok, detail })
    }
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
        let listener = TcpListener::bind(("127.0.0.1", port))
            .map_err(|e| Error::Io(format!("listen on 127.0.0.1:{port} for the host loopback check"), e))?;
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

/// An attempt made from inside the canary: the row it fills and the probe's arguments.
struct Attempt {
    invariant: &'static str,
    args: Vec<String>,
    /// The probe's exit when blocked (`fail`), except for probes whose `ok` is expected.
    label: String,
}

fn attempt(invariant: &'static str, label: impl Into<String>, args: &[&str]) -> Attempt {
    Attempt { invariant, args: args.iter().map(|s| s.to_string()).collect(), label: label.into() }
}

/// The attempts, in order; the nftables rules are deleted in the middle.
fn attempts(config: &VerifyConfig, host: SocketAddr) -> Vec<Attempt> {
    let host_port = host.port().to_string();
    let peer_port = PEER_PORT.to_string();
    let mut list = vec![
        attempt("peer sandbox", format!("tcp 10.0.0.2:{PEER_PORT}"), &["tcp-connect", &format!("10.0.0.2:{PEER_PORT}")]),
        attempt("peer sandbox", format!("vsock 3:{PEER_PORT} (every guest's CID)"), &["vsock-connect", &format!("3:{peer_port}")]),
        attempt("peer sandbox", format!("vsock 4:{PEER_PORT}"), &["vsock-connect", &format!("4:{peer_port}")]),
        attempt("peer sandbox", format!("vsock 2:{PEER_PORT} (host)"), &["vsock-connect", &format!("2:{peer_port}")]),
        attempt("host loopback", format!("tcp 127.0.0.1:{host_port}"), &["tcp-connect", &format!("127.0.0.1:{host_port}")]),
        attempt("host loopback", format!("tcp 10.0.0.2:{host_port}"), &["tcp-connect", &format!("10.0.0.2:{host_port}")]),
        attempt("host loopback", format!("vsock 2:{host_port}"), &["vsock-connect", &format!("2:{host_port}")]),
        attempt("host loopback", "https://localhost/ via the MITM", &["tls", "10.0.0.2:443", "--sni", "localhost"]),
        attempt("sandbox sockets", "vsock 2:5000 (agent port, host side)", &["vsock-connect", "2:5000"]),
        attempt("sandbox sockets", "vsock 2:5001", &["vsock-connect", "2:5001"]),
        attempt("sandbox sockets", "vsock 1:5002 (the guest's local CID)", &["vsock-connect", "1:5002"]),
        attempt("dns", format!("{} A", config.canary_name), &["dns", &config.canary_name]),
    ];
    for target in &config.targets {
        list.push(attempt("outside address", format!("tcp {target}"), &["tcp-connect", &target.to_string()]));
        list.push(attempt("outside address", format!("udp {target}"), &["udp", &target.to_string()]));
    }
    // Guest root removes the redirects: nothing may change.
    list.push(attempt("guest network", "delete every nftables rule (guest root)", &["nat-flush"]));
    let mut bypass = vec![
        attempt("host loopback", format!("tcp 10.0.0.2:{host_port} (rules deleted)"), &["tcp-connect", &format!("10.0.0.2:{host_port}")]),
        attempt("dns", format!("{} A via 10.0.0.2:53 (rules deleted)", config.canary_name), &["dns", &config.canary_name, "--server", "10.0.0.2:53"]),
    ];
    for target in &config.targets {
        bypass.push(attempt("outside address", format!("tcp {target} (rules deleted)"), &["tcp-connect", &target.to_string()]));
    }
    list.extend(bypass);
    list
}

/// Run `argv` in `instance`, collecting stdout.
fn exec(instance: &Instance, argv: Vec<String>, stdin: Option<Box<dyn std::io::Read + Send>>) -> Result<(i32, String, String), Error> {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let exec = Exec { argv, env: Vec::new(), cwd: "/".into(), user: None, tty: None };
    let status = instance.exec(exec, stdin, &mut out, &mut err)?;
    Ok((status, String::from_utf8_lossy(&out).into_owned(), String::from_utf8_lossy(&err).into_owned()))
}

/// Boot the sandboxes, make every attempt, and report.
pub fn verify(config: &VerifyConfig) -> Result<Report, Error> {
    let host = LoopbackService::start(config.host_port)?;
    let mut canary_builder = Sandbox::builder(config.image.clone()).memory_mib(config.memory_mib).net_config(config.net.clone());
    for p in &config.profiles {
        canary_builder = canary_builder.profile(p);
    }
    // One after the other: two guests booting at once on a loaded host can
    // starve each other past the agent's timeouts where kernel code is emulated.
    let peer = if config.peer { Some(Sandbox::builder(config.image.clone()).memory_mib(config.memory_mib).start()?) } else { None };
    let canary = canary_builder.start()?;

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
                let result = exec(&peer, argv, Some(Box::new(reader)));
                let _ = peer.shutdown();
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
    let canary_id = canary.id().to_string();
    let canary_session_db = canary.dir().join("session.db");
    let _ = canary.shutdown();
    let (_, stdout, stderr) = canary_run?;

    let mut checks = Vec::new();
    let mut lines = stdout.lines().filter_map(ProbeLine::parse);
    for a in &list {
        let (verdict, detail) = match lines.next() {
            // Deleting the rules is expected to work (guest root may); what matters is what follows.
            Some(line) if a.args.first().map(String::as_str) == Some("nat-flush") => {
                (if line.ok { Verdict::Blocked } else { Verdict::Inconclusive }, format!("{} ({})", line.detail, if line.ok { "done; the checks below run without the redirects" } else { "could not delete them" }))
            }
            Some(line) if line.ok => (Verdict::Escaped, line.detail),
            Some(line) => (Verdict::Blocked, line.detail),
            None => (Verdict::Inconclusive, format!("no result from the probe; stderr: {}", stderr.trim())),
        };
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
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn probe_lines_parse_and_anything_else_is_ignored() {
        let line = ProbeLine::parse("tcp-connect 10.0.0.2:22 fail refused: Connection refused (os error 111)").unwrap();
        assert_eq!((line.probe.as_str(), line.target.as_str(), line.ok), ("tcp-connect", "10.0.0.2:22", false));
        assert_eq!(line.detail, "refused: Connection refused (os error 111)");
        assert!(ProbeLine::parse("dns a.test/A ok rcode=No Error answers=[1.2.3.4]").unwrap().ok);
        assert_eq!(ProbeLine::parse("nat-flush nftables ok").unwrap().detail, "");
        for junk in ["", "hello", "a b maybe c", "sandbox-init: net-proxy exited"] {
            assert_eq!(ProbeLine::parse(junk), None, "{junk:?}");
        }
    }

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
        let mut report = Report { canary_id: "abc".into(), canary_session_db: "/x".into(), checks: vec![check(Verdict::Blocked)] };
        assert!(report.isolated());
        assert!(report.table().contains("isolated: all 1 checks blocked"));
        report.checks.push(check(Verdict::Inconclusive));
        assert!(!report.isolated());
        report.checks.push(check(Verdict::Escaped));
        assert!(report.table().contains("NOT ISOLATED: 2 of 3"), "{}", report.table());
        assert!(!Report { canary_id: String::new(), canary_session_db: "/x".into(), checks: vec![] }.isolated());
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
