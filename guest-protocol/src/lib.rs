//! Every contract between the host and the guest, defined once for both.
//!
//! - [`ports`]: the vsock context ids and ports, and the guest-local proxy ports;
//! - [`agent`]: the agent protocol on vsock port 5000;
//! - [`proxy_header`]: the PROXY line in front of each connection the guest's
//!   net-proxy hands to the host;
//! - [`dns_framing`]: the length-prefixed DNS messages between the guest's
//!   dns-proxy and the host's DNS handler;
//! - [`probe`]: the result line of `sandbox-probe`, read by the host's
//!   isolation check;
//! - [`console`] and [`LaunchSpec`]: the launch spec and the console markers;
//! - [`sandbox_dir`]: the host-side names of the vsock sockets (and the other
//!   files of a sandbox's directory on the host).
//!
//! The host hands init a [`LaunchSpec`] on the kernel command line
//! (`sandbox.launch=<base64 JSON>`); init reports back on the serial console,
//! framing the command's output between [`console`] markers. The spec is the
//! same whatever carries it, so a control channel can replace the command line
//! and console without touching the code that launches processes.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

pub mod agent;
pub mod console;
pub mod dns_framing;
pub mod ports;
pub mod probe;
pub mod proxy_header;
pub mod sandbox_dir;

/// Kernel command-line key carrying the launch spec.
pub const LAUNCH_KEY: &str = "sandbox.launch";

/// Upper bound of the encoded spec: the x86 kernel command line holds 2048
/// bytes in all, and the boot arguments need the rest.
pub const MAX_ENCODED_LAUNCH: usize = 1400;

/// The command the guest runs, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchSpec {
    /// Program and arguments; `argv[0]` is looked up in `PATH` when it has no `/`.
    pub argv: Vec<String>,
    /// Environment on top of init's defaults (`PATH`, `HOME`, `TERM`).
    pub env: Vec<(String, String)>,
    /// Working directory, absolute.
    pub cwd: String,
    /// Guest hostname.
    pub hostname: String,
}

/// A spec that could not be encoded or decoded, or a PROXY line that could not be parsed.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("the command line has no {LAUNCH_KEY}= argument")]
    Missing,
    #[error("{LAUNCH_KEY} is not valid base64: {0}")]
    Base64(#[from] base64::DecodeError),
    #[error("{LAUNCH_KEY} is not a valid launch spec: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the command, environment and working directory take {0} bytes encoded; at most {MAX_ENCODED_LAUNCH} fit on the kernel command line")]
    TooLong(usize),
    #[error("invalid launch spec: {0}")]
    Invalid(&'static str),
    /// A [`proxy_header`] line that is not one.
    #[error("bad PROXY header: {0}")]
    ProxyHeader(&'static str),
}

impl LaunchSpec {
    /// Check what init relies on.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        if self.argv.is_empty() || self.argv[0].is_empty() {
            return Err(ProtocolError::Invalid("no command given"));
        }
        if !self.cwd.starts_with('/') {
            return Err(ProtocolError::Invalid("the working directory must be an absolute path"));
        }
        let has_nul = |s: &String| s.contains('\0');
        if self.argv.iter().any(has_nul) || self.env.iter().any(|(k, v)| has_nul(k) || has_nul(v)) || has_nul(&self.cwd)
        {
            return Err(ProtocolError::Invalid("arguments and environment cannot contain NUL bytes"));
        }
        if self.env.iter().any(|(k, _)| k.is_empty() || k.contains('=')) {
            return Err(ProtocolError::Invalid("environment names must be non-empty and contain no '='"));
        }
        Ok(())
    }

    /// `sandbox.launch=<base64url JSON>`, ready to append to a kernel command line.
    pub fn to_cmdline_arg(&self) -> Result<String, ProtocolError> {
        self.validate()?;
        let json = serde_json::to_vec(self)?;
        let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json);
        if encoded.len() > MAX_ENCODED_LAUNCH {
            return Err(ProtocolError::TooLong(encoded.len()));
        }
        Ok(format!("{LAUNCH_KEY}={encoded}"))
    }

    /// Find and decode the spec in a kernel command line (`/proc/cmdline`).
    pub fn from_cmdline(cmdline: &str) -> Result<Self, ProtocolError> {
        let prefix = format!("{LAUNCH_KEY}=");
        let encoded = cmdline
            .split_ascii_whitespace()
            .find_map(|arg| arg.strip_prefix(prefix.as_str()))
            .ok_or(ProtocolError::Missing)?;
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(encoded)?;
        let spec: LaunchSpec = serde_json::from_slice(&json)?;
        spec.validate()?;
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> LaunchSpec {
        LaunchSpec {
            argv: vec!["/bin/sh".into(), "-c".into(), "echo 'a b' \"$X\"; exit 3".into()],
            env: vec![("X".into(), "é=1 2".into())],
            cwd: "/tmp".into(),
            hostname: "sandbox".into(),
        }
    }

    #[test]
    fn round_trips_through_a_command_line() {
        let arg = spec().to_cmdline_arg().unwrap();
        assert!(!arg.contains(' '), "one command-line word: {arg}");
        let cmdline = format!("console=ttyS0 quiet {arg} root=/dev/vda");
        assert_eq!(LaunchSpec::from_cmdline(&cmdline).unwrap(), spec());
    }

    #[test]
    fn rejects_what_init_cannot_run() {
        let mut s = spec();
        s.argv.clear();
        assert!(matches!(s.to_cmdline_arg(), Err(ProtocolError::Invalid(_))));
        let mut s = spec();
        s.cwd = "tmp".into();
        assert!(matches!(s.to_cmdline_arg(), Err(ProtocolError::Invalid(_))));
        let mut s = spec();
        s.env.push(("A=B".into(), "c".into()));
        assert!(matches!(s.to_cmdline_arg(), Err(ProtocolError::Invalid(_))));
        let mut s = spec();
        s.argv.push("x\0y".into());
        assert!(matches!(s.to_cmdline_arg(), Err(ProtocolError::Invalid(_))));
    }

    #[test]
    fn too_long_is_an_error_naming_the_limit() {
        let mut s = spec();
        s.argv.push("x".repeat(2000));
        let err = s.to_cmdline_arg().unwrap_err();
        assert!(matches!(err, ProtocolError::TooLong(n) if n > MAX_ENCODED_LAUNCH));
        assert!(err.to_string().contains("1400"));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(matches!(LaunchSpec::from_cmdline("quiet"), Err(ProtocolError::Missing)));
        assert!(matches!(LaunchSpec::from_cmdline("sandbox.launch=!!!"), Err(ProtocolError::Base64(_))));
        assert!(matches!(LaunchSpec::from_cmdline("sandbox.launch=e30"), Err(ProtocolError::Json(_))));
    }
}
