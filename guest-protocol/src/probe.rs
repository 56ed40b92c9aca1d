//! The result line of `sandbox-probe`, the guest program that tries one way
//! out of the guest:
//!
//! ```text
//! <probe> <target> ok|fail <detail>
//! ```
//!
//! `ok` means the attempt got through (a connection was made, a name
//! resolved, the kernel accepted the netlink request), `fail` that it did not.
//! The probe prints exactly one such line on standard output (`Display`); the
//! host's isolation check (`sandbox verify-isolation`) runs it in a canary
//! sandbox and reads the lines back ([`ProbeLine::parse`]), ignoring anything
//! else on the output.

use std::fmt;

/// The word for an attempt that got through.
pub const OK: &str = "ok";
/// The word for an attempt that did not.
pub const FAIL: &str = "fail";

/// One line of `sandbox-probe` output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeLine {
    /// The probe's name (its subcommand, e.g. `tcp-connect`).
    pub probe: String,
    /// What it tried to reach, without spaces (e.g. `10.0.0.2:22`).
    pub target: String,
    /// Whether the attempt got through.
    pub ok: bool,
    /// What happened, free text (line breaks become spaces when printed).
    pub detail: String,
}

impl ProbeLine {
    /// Parse one output line; `None` for anything else.
    pub fn parse(line: &str) -> Option<ProbeLine> {
        let mut parts = line.splitn(4, ' ');
        let probe = parts.next()?.to_string();
        let target = parts.next()?.to_string();
        let ok = match parts.next()? {
            OK => true,
            FAIL => false,
            _ => return None,
        };
        let detail = parts.next().unwrap_or("").to_string();
        Some(ProbeLine { probe, target, ok, detail })
    }
}

/// The line, without its line end.
impl fmt::Display for ProbeLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let outcome = if self.ok { OK } else { FAIL };
        let detail = self.detail.replace(['\n', '\r'], " ");
        write!(f, "{} {} {outcome} {detail}", self.probe, self.target)
    }
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
    fn printed_lines_parse_back() {
        let line = ProbeLine {
            probe: "tls".into(),
            target: "1.2.3.4:443/sni=a".into(),
            ok: true,
            detail: "status=200;\r\nx".into(),
        };
        let printed = line.to_string();
        assert_eq!(printed, "tls 1.2.3.4:443/sni=a ok status=200;  x");
        assert_eq!(ProbeLine::parse(&printed).unwrap(), ProbeLine { detail: "status=200;  x".into(), ..line });
        let bare = ProbeLine { probe: "nat-flush".into(), target: "nftables".into(), ok: false, detail: String::new() };
        assert_eq!(bare.to_string(), "nat-flush nftables fail ");
        assert_eq!(ProbeLine::parse(&bare.to_string()).unwrap(), bare);
    }
}
