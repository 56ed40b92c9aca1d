//! The shim's one error type, and how each kind reaches containerd (a
//! ttrpc status code with the message).

use containerd_shim::protos::ttrpc::{self, get_status, Code};

/// What went wrong in a task request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request or the bundle is not something the shim can run.
    #[error("{0}")]
    InvalidArgument(String),
    /// No such task or process.
    #[error("{0}")]
    NotFound(String),
    /// The task or process is not in a state that allows the request.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The shim does not implement the request.
    #[error("{0} is not supported by the sandbox runtime")]
    Unsupported(&'static str),
    /// An I/O operation on the host failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The sandbox library failed (booting, running a process, stopping).
    #[error("{what}: {source}")]
    Sandbox {
        what: String,
        #[source]
        source: sandbox::Error,
    },
    /// Building the task's root image failed.
    #[error("building the root image: {0}")]
    Image(String),
}

impl Error {
    /// An I/O error with what was being done.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }

    /// A library error with what was being done.
    pub fn sandbox(what: impl Into<String>) -> impl FnOnce(sandbox::Error) -> Error {
        let what = what.into();
        move |source| Error::Sandbox { what, source }
    }

    fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            Error::NotFound(_) => Code::NOT_FOUND,
            Error::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            Error::Unsupported(_) => Code::UNIMPLEMENTED,
            Error::Io { .. } | Error::Sandbox { .. } | Error::Image(_) => Code::INTERNAL,
        }
    }
}

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> ttrpc::Error {
        ttrpc::Error::RpcStatus(get_status(e.code(), e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_carry_a_code_and_the_message() {
        let err: ttrpc::Error = Error::Unsupported("pause").into();
        match err {
            ttrpc::Error::RpcStatus(status) => {
                assert_eq!(status.code(), Code::UNIMPLEMENTED);
                assert!(status.message.contains("pause is not supported"), "{}", status.message);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
