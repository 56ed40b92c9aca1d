//! How the `sandbox` command ends: the one mapping from outcomes to exit
//! statuses.
//!
//! - a guest command's own status, as a shell reports it (the low 8 bits);
//! - 124 when the command ran past `--timeout` (as timeout(1) reports it);
//! - 125 when the sandbox itself failed: no KVM, no kernel, bad image, bad
//!   profile, unreachable agent (as `docker run` reports it);
//! - 2 for a command line that cannot work (clap's own errors too);
//! - 1 for any other failure (a missing sandbox for `cp`, a bad profile for
//!   `policy check`, ...).

use std::process::ExitCode;

/// Status when the command ran past its timeout.
pub const TIMEOUT: u8 = 124;
/// Status when the sandbox itself failed.
pub const SANDBOX_ERROR: u8 = 125;
/// Status for a command line that cannot work.
pub const USAGE: u8 = 2;

/// Why a command failed, which decides the exit status.
#[derive(Debug)]
pub enum Failure {
    /// The sandbox could not run the command (125).
    Sandbox(anyhow::Error),
    /// The command line cannot work (2).
    Usage(String),
    /// Anything else (1).
    Failed(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::Failed(e.into())
    }
}

/// What a command returns.
pub type Outcome = Result<ExitCode, Failure>;

/// Mark an error as the sandbox's own failure (status 125).
pub trait SandboxFailure<T> {
    fn or_sandbox_failure(self) -> Result<T, Failure>;
}

impl<T, E: Into<anyhow::Error>> SandboxFailure<T> for Result<T, E> {
    fn or_sandbox_failure(self) -> Result<T, Failure> {
        self.map_err(|e| Failure::Sandbox(e.into()))
    }
}

/// A guest exit status as this process's (the low 8 bits, as a shell sees them).
pub fn guest_status(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(255))
}

/// Print a failure and turn the outcome into the process's status.
pub fn report(outcome: Outcome) -> ExitCode {
    match outcome {
        Ok(code) => code,
        Err(Failure::Usage(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(USAGE)
        }
        Err(Failure::Sandbox(err)) => {
            eprintln!("sandbox: {err:#}");
            ExitCode::from(SANDBOX_ERROR)
        }
        // `sandbox ps | head -1`: the reader has what it wanted.
        Err(Failure::Failed(err)) if output_closed(&err) => ExitCode::SUCCESS,
        Err(Failure::Failed(err)) => {
            eprintln!("sandbox: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Whether `err` is a write to a pipe whose reader has gone (a bare I/O
/// error, as a command's own output gives: other writes say what they were).
fn output_closed(err: &anyhow::Error) -> bool {
    err.chain().count() == 1
        && err.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_statuses_keep_their_low_bits_and_failures_their_class() {
        assert_eq!(guest_status(3), ExitCode::from(3));
        assert_eq!(guest_status(300), ExitCode::from(255));
        assert_eq!(guest_status(-1), ExitCode::from(255));
        let missing: Result<(), std::io::Error> = Err(std::io::ErrorKind::NotFound.into());
        assert!(matches!(missing.or_sandbox_failure(), Err(Failure::Sandbox(_))));
        let other: Failure = anyhow::anyhow!("x").into();
        assert!(matches!(other, Failure::Failed(_)));
    }

    #[test]
    fn a_reader_that_stops_early_is_not_an_error() {
        let closed = std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        assert_eq!(report(Err(Failure::Failed(closed.into()))), ExitCode::SUCCESS);
        let described = anyhow::Error::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe)).context("send to x");
        assert_eq!(report(Err(Failure::Failed(described))), ExitCode::FAILURE);
    }
}
