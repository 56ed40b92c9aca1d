//! Where the sandbox finds its kernel and images.
//!
//! Built artefacts live outside any work tree, in `$SANDBOX_CACHE` (default
//! `${XDG_CACHE_HOME:-$HOME/.cache}/sandbox`), written by the scripts in
//! `kernel-config/` and `rootfs/`. `$SANDBOX_KERNEL` overrides the kernel.

use std::path::PathBuf;

use crate::Error;

/// The cache directory holding `kernel/` and `images/`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SANDBOX_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("sandbox")
}

/// The guest kernel (`vmlinux`), or an error saying how to build it.
pub fn kernel() -> Result<PathBuf, Error> {
    let path =
        std::env::var_os("SANDBOX_KERNEL").map(PathBuf::from).unwrap_or_else(|| cache_dir().join("kernel/vmlinux"));
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::KernelMissing(path))
    }
}

/// The built-in `default` image, or an error saying how to build it.
pub fn default_image() -> Result<PathBuf, Error> {
    let path = cache_dir().join("images/default.erofs");
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::DefaultImageMissing(path))
    }
}

/// The directory of persistent data: the sandbox CA, and one directory per
/// sandbox. `$SANDBOX_DATA`, else `${XDG_DATA_HOME:-$HOME/.local/share}/sandbox`.
pub fn data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SANDBOX_DATA").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    std::env::var_os("XDG_DATA_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("/var/lib"))
        .join("sandbox")
}

/// Where each sandbox keeps its sockets and `session.db`.
pub fn sandboxes_dir() -> PathBuf {
    sandboxes_in(&data_dir())
}

/// The sandboxes directory of the data directory `data_dir`.
pub fn sandboxes_in(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("sandboxes")
}

/// The named snapshots of the data directory `data_dir` (`sandbox snapshot --name`).
pub fn snapshots_in(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("snapshots")
}
