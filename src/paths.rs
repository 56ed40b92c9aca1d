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
    let path = std::env::var_os("SANDBOX_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("kernel/vmlinux"));
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
