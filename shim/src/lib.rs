//! `containerd-shim-sandbox-v2`: containerd's shim v2 for the sandbox
//! runtime. Every containerd task runs in a microVM of its own, held by a
//! confined `sandbox-holder` process, with the egress policy of the
//! `sandbox.dev/profile` annotation and a `session.db` under the shim's
//! data directory. See `docs/containerd.md`.

pub mod bundle;
pub mod config;
pub mod error;
pub mod rootfs;
pub mod service;
pub mod shim;
pub mod stdio;

pub use error::Error;

/// The runtime name containerd knows the shim by.
pub const RUNTIME_ID: &str = "io.containerd.sandbox.v2";
/// Where the shim keeps sandboxes and root images when `$SANDBOX_DATA` is not set.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/sandbox-shim";

/// The shim's data directory: `$SANDBOX_DATA`, else [`DEFAULT_DATA_DIR`].
pub fn data_dir() -> std::path::PathBuf {
    std::env::var_os("SANDBOX_DATA")
        .filter(|d| !d.is_empty())
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(DEFAULT_DATA_DIR))
}
