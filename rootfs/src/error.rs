//! Errors of pulling, converting and caching images.

use std::path::PathBuf;

/// Why an image could not be pulled, converted or found.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid image reference {reference:?}: {reason}")]
    Reference { reference: String, reason: String },
    #[error("registry error for {reference}: {message}")]
    Registry { reference: String, message: String },
    #[error("{what} {digest}: the content has digest {actual}; the source is corrupt or was tampered with")]
    DigestMismatch { what: String, digest: String, actual: String },
    #[error("{what} {digest} is {actual} bytes, but {expected} were expected (truncated or padded)")]
    SizeMismatch { what: String, digest: String, expected: u64, actual: u64 },
    #[error("unsupported digest {0:?}: only sha256 digests are accepted")]
    Digest(String),
    #[error("bad image {what}: {reason}")]
    Manifest { what: String, reason: String },
    #[error("no linux/amd64 image in {0}")]
    NoPlatform(String),
    #[error("layer {layer}: {reason}")]
    Layer { layer: String, reason: String },
    #[error("layer {layer}: entry {path:?}: {reason}")]
    Entry { layer: String, path: String, reason: String },
    #[error("image exceeds a limit: {0}")]
    Limit(String),
    #[error("mkfs.erofs failed ({status}): {stderr}; install erofs-utils (apt-get install erofs-utils)")]
    Mkfs { status: String, stderr: String },
    #[error("image {0} is not in the cache; pull it with `sandbox pull {0}`")]
    NotCached(String),
    #[error("{0}")]
    Permission(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { what, path, source }
    }
}
