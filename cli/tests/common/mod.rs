//! What the CLI's end-to-end suites share: the library suites' helpers
//! (tests/common: the VM guard, a shared buffer) and the runner of the
//! `sandbox` binary built with these tests.
// Each suite uses part of this; the helpers unwrap like the tests they serve.
#![allow(dead_code, clippy::unwrap_used)]

use std::process::{Command, Output, Stdio};

#[path = "../../../tests/common/mod.rs"]
mod shared;

pub use shared::*;

/// The `sandbox` binary built with these tests, with `args`.
pub fn sandbox_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sandbox"));
    cmd.args(args);
    cmd
}

/// Runs the `sandbox` binary with `args` (stdin from /dev/null) to its end.
pub fn sandbox(args: &[&str]) -> Output {
    sandbox_with_env(args, &[])
}

/// [`sandbox`], with these environment variables set.
pub fn sandbox_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = sandbox_command(args);
    cmd.envs(env.iter().copied()).stdin(Stdio::null());
    cmd.output().unwrap()
}

/// Removes the sandbox `.0` (`sandbox rm --force`) when dropped, also when
/// an assertion fails.
pub struct RemoveOnDrop(pub String);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = sandbox(&["rm", "--force", &self.0]);
    }
}
