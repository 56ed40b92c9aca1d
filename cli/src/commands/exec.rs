//! `sandbox exec`: run a command in a running sandbox.

use clap::Args;
use sandbox::{Command, Sandbox};

use crate::exit::{guest_status, Outcome, SandboxFailure};

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Pass this process's standard input to the command.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Run the command on a terminal (with -i: an interactive session).
    #[arg(short = 't', long)]
    tty: bool,
    /// Set an environment variable (repeatable).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE", value_parser = super::parse_env)]
    env: Vec<(String, String)>,
    /// Working directory of the command (default: the image's, else /).
    #[arg(short = 'w', long, value_name = "DIR")]
    workdir: Option<String>,
    /// Run the command as this guest user.
    #[arg(short = 'u', long, value_name = "USER")]
    user: Option<String>,
    /// The sandbox id (or a unique prefix).
    id: String,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    cmd: Vec<String>,
}

/// Run a command in a running sandbox; exit with its status.
pub fn exec(args: ExecArgs) -> Outcome {
    let sandbox = Sandbox::find(&args.id).or_sandbox_failure()?;
    let mut command = Command::from_argv(args.cmd);
    for (k, v) in args.env {
        command = command.env(k, v);
    }
    if let Some(dir) = args.workdir {
        command = command.cwd(dir);
    }
    if let Some(user) = args.user {
        command = command.user(user);
    }
    command = if args.tty && args.interactive {
        command.attach_terminal()
    } else {
        if args.tty {
            command = command.tty(sandbox::terminal::stdout_size());
        }
        if args.interactive {
            command = command.stdin_from(std::io::stdin());
        }
        command.stdout_to(std::io::stdout()).stderr_to(std::io::stderr())
    };
    let status = sandbox.spawn(command).and_then(|mut process| process.wait()).or_sandbox_failure()?;
    Ok(guest_status(status))
}
