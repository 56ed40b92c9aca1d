//! Errors of the sandbox runtime.

use std::path::PathBuf;

/// Why a sandbox could not run a command to its end.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the guest kernel is not built ({0} does not exist); build it with ./setup.sh (or kernel-config/build.sh), or set SANDBOX_KERNEL")]
    KernelMissing(PathBuf),
    #[error(
        "the default image is not built ({0} does not exist); build it with ./setup.sh (or rootfs/build-default.sh)"
    )]
    DefaultImageMissing(PathBuf),
    #[error("cannot use {path} as a guest image: {reason}")]
    BadImage { path: PathBuf, reason: String },
    #[error("invalid sandbox configuration: {0}")]
    Config(String),
    #[error("invalid command for the guest: {0}")]
    Launch(#[from] guest_protocol::ProtocolError),
    #[error(transparent)]
    Vmm(#[from] vmm::Error),
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error("the guest did not come up: {0}")]
    Boot(String),
    #[error(transparent)]
    Agent(#[from] crate::agent::AgentError),
    #[error(transparent)]
    Telemetry(#[from] telemetry::TelemetryError),
    #[error(transparent)]
    Net(#[from] net::Error),
    #[error(transparent)]
    Profile(#[from] policy::ProfileError),
    #[error("no sandbox {0} (sandbox ps -a lists them)")]
    NoSuchSandbox(String),
    #[error("sandbox {0} is not running")]
    NotRunning(String),
    #[error(transparent)]
    Image(#[from] rootfs::Error),
    #[error("confining the sandbox's process: {0} (sandbox doctor says what this host supports; --no-jail runs unconfined, which is unsafe)")]
    Jail(#[from] jail::Error),
    #[error("the sandbox's holder process failed: {0}")]
    Holder(String),
    #[error(
        "the guest stopped without reporting an exit status (kernel panic or init failure); last console lines:\n{0}"
    )]
    NoExitStatus(String),
}
