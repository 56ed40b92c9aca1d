//! The files the host keeps in a sandbox's directory, and the names of the
//! vsock Unix sockets in it.
//!
//! Host-only (the guest never sees these paths; guest-side tests use the
//! socket names to stand in for the host). It is here rather than in the host
//! library because the host handlers (`net`) bind the per-port
//! sockets and do not depend on the host library; it is plain path joining,
//! so it adds nothing to the guest's binaries.
//!
//! The vsock sockets follow Firecracker's convention: the VMM listens on
//! `<dir>/vsock.sock` for host-initiated connections (a client writes
//! `CONNECT <port>\n` and is joined to that guest port), and hands a
//! guest-initiated connection to host port P to whoever listens on
//! `<dir>/vsock.sock_P`.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// The VMM's socket for host-initiated connections. The VMM listens on it;
/// host clients (the agent connection) connect to it.
pub const VSOCK_SOCKET: &str = "vsock.sock";
/// Every session's record of what the guest tried to reach.
pub const SESSION_DB: &str = "session.db";
/// What the sandbox runs and which host process holds it.
pub const STATE_FILE: &str = "state.json";
/// Where [`STATE_FILE`] is written before it is renamed into place.
pub const STATE_TMP_FILE: &str = "state.json.tmp";
/// The certificate (PEM, public part only) of the sandbox's own CA: what
/// its guest trusts. The key never leaves the process holding the sandbox.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The log of a detached sandbox's host process.
pub const SANDBOX_LOG: &str = "sandbox.log";
/// The output of the command given to a detached `run`.
pub const OUTPUT_LOG: &str = "output.log";
/// The port forwards of a running sandbox (host address, guest port),
/// written by the process holding it as it adds them.
pub const PORTS_FILE: &str = "ports.json";
/// Where [`PORTS_FILE`] is written before it is renamed into place.
pub const PORTS_TMP_FILE: &str = "ports.json.tmp";

/// The Unix socket name for guest-initiated connections to host vsock port
/// `port`: `vsock.sock_<port>`. The host handler of that port listens on it;
/// the VMM connects to it when the guest connects to ([`crate::ports::HOST_CID`], `port`).
pub fn vsock_port_socket_name(port: u32) -> String {
    format!("{VSOCK_SOCKET}_{port}")
}

/// Whether `name` is one of the vsock sockets: `vsock.sock` or `vsock.sock_<anything>`.
pub fn is_vsock_socket_name(name: &OsStr) -> bool {
    name.as_encoded_bytes().starts_with(VSOCK_SOCKET.as_bytes())
}

/// One sandbox's directory on the host, and the paths of what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxDir {
    path: PathBuf,
}

impl SandboxDir {
    /// The sandbox directory at `path` (nothing is created or checked).
    pub fn new(path: impl Into<PathBuf>) -> SandboxDir {
        SandboxDir { path: path.into() }
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `<dir>/vsock.sock`: the VMM listens, host clients connect.
    pub fn vsock_socket(&self) -> PathBuf {
        self.path.join(VSOCK_SOCKET)
    }

    /// `<dir>/vsock.sock_<port>`: the host handler of `port` listens, the VMM
    /// connects for each guest connection to that port.
    pub fn vsock_port_socket(&self, port: u32) -> PathBuf {
        self.path.join(vsock_port_socket_name(port))
    }

    /// `<dir>/ports.json`.
    pub fn ports_file(&self) -> PathBuf {
        self.path.join(PORTS_FILE)
    }

    /// `<dir>/ports.json.tmp`.
    pub fn ports_tmp_file(&self) -> PathBuf {
        self.path.join(PORTS_TMP_FILE)
    }

    /// `<dir>/session.db`.
    pub fn session_db(&self) -> PathBuf {
        self.path.join(SESSION_DB)
    }

    /// `<dir>/state.json`.
    pub fn state_file(&self) -> PathBuf {
        self.path.join(STATE_FILE)
    }

    /// `<dir>/state.json.tmp`.
    pub fn state_tmp_file(&self) -> PathBuf {
        self.path.join(STATE_TMP_FILE)
    }

    /// `<dir>/ca.pem`.
    pub fn ca_cert(&self) -> PathBuf {
        self.path.join(CA_CERT_FILE)
    }

    /// `<dir>/sandbox.log`.
    pub fn sandbox_log(&self) -> PathBuf {
        self.path.join(SANDBOX_LOG)
    }

    /// `<dir>/output.log`.
    pub fn output_log(&self) -> PathBuf {
        self.path.join(OUTPUT_LOG)
    }
}

impl AsRef<Path> for SandboxDir {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::{DNS_PORT, MITM_PORT};

    #[test]
    fn paths_follow_the_firecracker_convention() {
        let dir = SandboxDir::new("/run/sb/abc");
        assert_eq!(dir.vsock_socket(), Path::new("/run/sb/abc/vsock.sock"));
        assert_eq!(dir.vsock_port_socket(MITM_PORT), Path::new("/run/sb/abc/vsock.sock_5002"));
        assert_eq!(dir.vsock_port_socket(DNS_PORT), Path::new("/run/sb/abc/vsock.sock_5007"));
        assert_eq!(dir.session_db(), Path::new("/run/sb/abc/session.db"));
        assert_eq!(dir.state_file(), Path::new("/run/sb/abc/state.json"));
        assert_eq!(dir.state_tmp_file(), Path::new("/run/sb/abc/state.json.tmp"));
        assert_eq!(dir.ca_cert(), Path::new("/run/sb/abc/ca.pem"));
        assert_eq!(dir.sandbox_log(), Path::new("/run/sb/abc/sandbox.log"));
        assert_eq!(dir.output_log(), Path::new("/run/sb/abc/output.log"));
    }

    #[test]
    fn vsock_socket_names_are_recognised() {
        assert!(is_vsock_socket_name(OsStr::new("vsock.sock")));
        assert!(is_vsock_socket_name(OsStr::new("vsock.sock_5002")));
        assert!(!is_vsock_socket_name(OsStr::new("session.db")));
    }
}
