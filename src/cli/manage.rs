//! `sandbox exec`, `cp`, `ps`, `stop`, `rm`: driving sandboxes that are
//! already running, from any process.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Args;
use sandbox::{Exec, SandboxRef};

use crate::{exit_status, parse_env, EXIT_SANDBOX_ERROR};

/// How long `stop` waits for a guest to power off before killing its VM.
const STOP_TIMEOUT: Duration = Duration::from_secs(40);

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Pass this process's standard input to the command.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Run the command on a terminal (with -i: an interactive session).
    #[arg(short = 't', long)]
    tty: bool,
    /// Set an environment variable (repeatable).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Working directory of the command.
    #[arg(short = 'w', long, value_name = "DIR", default_value = "/")]
    workdir: String,
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
pub fn exec(args: ExecArgs) -> ExitCode {
    let run = || -> anyhow::Result<i32> {
        let sandbox = SandboxRef::find(&args.id)?;
        let exec = Exec { argv: args.cmd, env: args.env, cwd: args.workdir, user: args.user, tty: None };
        if args.tty && args.interactive {
            return Ok(sandbox::terminal::exec_on_terminal(sandbox.agent()?, exec)?);
        }
        let exec = if args.tty {
            Exec { tty: Some(sandbox::terminal::stdout_size()), ..exec }
        } else {
            exec
        };
        let stdin: Option<Box<dyn std::io::Read + Send>> =
            if args.interactive { Some(Box::new(std::io::stdin())) } else { None };
        Ok(sandbox.exec(exec, stdin, &mut std::io::stdout(), &mut std::io::stderr())?)
    };
    match run() {
        Ok(code) => exit_status(code),
        Err(err) => {
            eprintln!("sandbox: {err:#}");
            ExitCode::from(EXIT_SANDBOX_ERROR)
        }
    }
}

#[derive(Debug, Args)]
pub struct CpArgs {
    /// `<id>:<guest path>` or a local file.
    src: String,
    /// `<id>:<guest path>` or a local file.
    dst: String,
}

/// `<id>:<path>` (a guest path must be absolute, so `./a:b` stays local).
fn guest_path(arg: &str) -> Option<(&str, &str)> {
    let (id, path) = arg.split_once(':')?;
    (sandbox::registry::valid_id(id) && path.starts_with('/')).then_some((id, path))
}

/// Copy one file into or out of a running sandbox.
pub fn cp(args: CpArgs) -> anyhow::Result<ExitCode> {
    match (guest_path(&args.src), guest_path(&args.dst)) {
        (Some((id, src)), None) => {
            let sandbox = SandboxRef::find(id)?;
            let mut dst = PathBuf::from(&args.dst);
            if dst.is_dir() {
                let name = src.rsplit('/').next().filter(|n| !n.is_empty()).context("the guest path names no file")?;
                dst.push(name);
            }
            let n = sandbox.copy_out(src, &dst)?;
            tracing::info!(bytes = n, "copied {}:{src} to {}", sandbox.id(), dst.display());
        }
        (None, Some((id, dst))) => {
            let sandbox = SandboxRef::find(id)?;
            let n = sandbox.copy_in(std::path::Path::new(&args.src), dst)?;
            tracing::info!(bytes = n, "copied {} to {}:{dst}", args.src, sandbox.id());
        }
        (Some(_), Some(_)) => anyhow::bail!("copying between two sandboxes is not supported; copy through a local file"),
        (None, None) => anyhow::bail!("one side must be <sandbox id>:<absolute guest path>, e.g. sandbox cp ./a.txt 3f2a9c:/tmp/a.txt"),
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct PsArgs {
    /// Also list sandboxes that have stopped.
    #[arg(short = 'a', long)]
    all: bool,
    /// Only print ids.
    #[arg(short = 'q', long)]
    quiet: bool,
}

/// "3 minutes ago".
fn ago(created: u64) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(created);
    let secs = now.saturating_sub(created);
    match secs {
        0..=59 => format!("{secs} seconds ago"),
        60..=3599 => format!("{} minutes ago", secs / 60),
        3600..=86_399 => format!("{} hours ago", secs / 3600),
        _ => format!("{} days ago", secs / 86_400),
    }
}

/// List sandboxes.
pub fn ps(args: PsArgs) -> anyhow::Result<ExitCode> {
    let sandboxes = sandbox::registry::list()?;
    let mut out = std::io::stdout().lock();
    if !args.quiet {
        writeln!(out, "{:<14} {:<20} {:<30} {:<16} {:<8} MEMORY", "ID", "IMAGE", "COMMAND", "CREATED", "STATUS")?;
    }
    for s in sandboxes {
        let running = s.is_running();
        if !running && !args.all {
            continue;
        }
        if args.quiet {
            writeln!(out, "{}", s.id())?;
            continue;
        }
        let state = s.state();
        let mut command = state.command.join(" ");
        if command.chars().count() > 28 {
            command = format!("{}…", command.chars().take(27).collect::<String>());
        }
        let image = if state.image.chars().count() > 20 {
            format!("…{}", state.image.chars().rev().take(19).collect::<Vec<_>>().into_iter().rev().collect::<String>())
        } else {
            state.image.clone()
        };
        let status = if running { "running" } else { "exited" };
        writeln!(out, "{:<14} {:<20} {:<30} {:<16} {:<8} {} MiB", state.id, image, command, ago(state.created), status, state.memory_mib)?;
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct StopArgs {
    /// Sandbox ids (or unique prefixes).
    #[arg(required = true)]
    ids: Vec<String>,
}

/// Stop sandboxes; print each id when it has stopped.
pub fn stop(args: StopArgs) -> anyhow::Result<ExitCode> {
    let mut code = ExitCode::SUCCESS;
    for id in args.ids {
        match SandboxRef::find(&id).and_then(|s| s.stop(STOP_TIMEOUT).map(|()| s)) {
            Ok(s) => println!("{}", s.id()),
            Err(e) => {
                eprintln!("sandbox: {e}");
                code = ExitCode::FAILURE;
            }
        }
    }
    Ok(code)
}

#[derive(Debug, Args)]
pub struct RmArgs {
    /// Stop running sandboxes first.
    #[arg(short = 'f', long)]
    force: bool,
    /// Sandbox ids (or unique prefixes).
    #[arg(required = true)]
    ids: Vec<String>,
}

/// Delete sandboxes and their logs.
pub fn rm(args: RmArgs) -> anyhow::Result<ExitCode> {
    let mut code = ExitCode::SUCCESS;
    for id in args.ids {
        match SandboxRef::find(&id).and_then(|s| s.remove(args.force).map(|()| s)) {
            Ok(s) => println!("{}", s.id()),
            Err(e) => {
                eprintln!("sandbox: {e}");
                code = ExitCode::FAILURE;
            }
        }
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_paths_need_an_id_and_an_absolute_path() {
        assert_eq!(guest_path("3f2a:/tmp/x"), Some(("3f2a", "/tmp/x")));
        assert_eq!(guest_path("./a:b"), None);
        assert_eq!(guest_path("3f2a:tmp/x"), None);
        assert_eq!(guest_path("/tmp/x"), None);
        assert_eq!(guest_path("c:/x"), Some(("c", "/x")));
    }
}
