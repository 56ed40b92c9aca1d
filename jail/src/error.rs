//! What can go wrong while confining a holder process.

/// An error of this crate: every variant says what was being done.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: nix::errno::Errno,
    },
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A seccomp filter could not be built or installed.
    #[error("seccomp: {0}")]
    Seccomp(String),
    /// This host lacks something confinement needs (and what to do about it).
    #[error("{0}")]
    Unsupported(String),
}

impl Error {
    /// A failed system call, with what was being done.
    pub fn sys(what: impl Into<String>, source: nix::errno::Errno) -> Self {
        Error::Sys { what: what.into(), source }
    }
    /// A failed file operation, with what was being done.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { what: what.into(), source }
    }
}
