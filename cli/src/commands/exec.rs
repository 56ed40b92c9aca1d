//! `sandbox exec`: run a command in a running sandbox.

use clap::Args;
use sandbox::{Command, Sandbox};

use crate::exit::{guest_status, Outcome, SandboxFailure};

#[derive(Debug, Args)]
pub struct ExecArgs {
    #[command(flatten)]
    process: super::ProcessArgs,
    /// The sandbox id (or a unique prefix).
    id: String,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    cmd: Vec<String>,
}

/// Run a command in a running sandbox; exit with its status.
pub fn exec(args: ExecArgs) -> Outcome {
    let sandbox = Sandbox::find(&args.id).or_sandbox_failure()?;
    let command = args.process.settings(Command::from_argv(args.cmd));
    let command = args.process.streams(command, std::io::stdout(), std::io::stderr());
    let status = sandbox.spawn(command).and_then(|mut process| process.wait()).or_sandbox_failure()?;
    Ok(guest_status(status))
}
