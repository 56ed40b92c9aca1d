//! One module per command.

use std::io::Write;

use clap::{Args, Subcommand};
use sandbox::Command as GuestCommand;

use crate::exit::Outcome;

mod ca;
mod cp;
mod doctor;
mod exec;
mod images;
mod logs;
mod policy;
mod port;
mod ps;
mod rm;
pub mod run;
mod serve;
mod snapshot;
mod stop;
mod verify_isolation;

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a sandbox (from the warm snapshot of its kind unless --cold), run a
    /// command in it, and exit with the command's status (with -d: leave it
    /// running and print its id).
    Run(Box<run::RunArgs>),
    /// Run a command in a running sandbox.
    Exec(exec::ExecArgs),
    /// Copy a file into or out of a running sandbox: `cp <id>:<path> <local>` or `cp <local> <id>:<path>`.
    Cp(cp::CpArgs),
    /// List running sandboxes (-a: all).
    Ps(ps::PsArgs),
    /// Forward a host port to a running sandbox's 127.0.0.1 (`port <id>
    /// [HOST_ADDR:]HOST_PORT:GUEST_PORT`, prints the host address), or list its forwards.
    Port(port::PortArgs),
    /// Stop running sandboxes.
    Stop(stop::StopArgs),
    /// Delete sandboxes and their logs.
    Rm(rm::RmArgs),
    /// Save a running sandbox to a named snapshot (`run --from NAME` restores it).
    Snapshot(snapshot::SnapshotArgs),
    /// List the named snapshots.
    Snapshots(snapshot::SnapshotsArgs),
    /// Delete snapshots (sandboxes restored from them run on).
    RmSnapshot(snapshot::RmSnapshotArgs),
    /// Snapshot a running sandbox and start copies of it in the background; print their ids.
    Fork(snapshot::ForkArgs),
    /// Print what a sandbox's guest tried to reach (its session.db).
    Logs(logs::LogsArgs),
    /// Check profiles, or explain a decision.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Print the certificate of a sandbox's own CA: the one its guest trusts
    /// (each sandbox gets a fresh CA; its key never leaves the sandbox's process).
    Ca(ca::CaArgs),
    #[command(flatten)]
    Images(images::ImagesCommand),
    /// Serve the HTTP API (a Unix socket by default; see docs/api.md).
    Serve(serve::ServeArgs),
    /// Print what this host supports for sandboxes (KVM, cgroups, namespaces, seccomp) and what is missing.
    Doctor(doctor::DoctorArgs),
    /// Boot a canary sandbox and prove from outside that nothing gets out of it.
    VerifyIsolation(verify_isolation::VerifyArgs),
    /// Hold one sandbox whose spec arrives on standard input (started by `run -d`).
    #[command(hide = true)]
    Holder,
}

impl Command {
    /// Is this the process that holds a `run -d` sandbox?
    pub fn is_holder(&self) -> bool {
        matches!(self, Command::Holder)
    }

    /// Does this command run as a service (the API server), whose log says
    /// what it does?
    pub fn is_service(&self) -> bool {
        matches!(self, Command::Serve(_))
    }
}

/// Run `command`.
pub fn run(command: Command) -> Outcome {
    match command {
        Command::Run(args) => run::run(*args),
        Command::Exec(args) => exec::exec(args),
        Command::Cp(args) => cp::cp(args),
        Command::Ps(args) => ps::ps(args),
        Command::Port(args) => port::port(args),
        Command::Stop(args) => stop::stop(args),
        Command::Rm(args) => rm::rm(args),
        Command::Snapshot(args) => snapshot::snapshot(args),
        Command::Snapshots(args) => snapshot::snapshots(args),
        Command::RmSnapshot(args) => snapshot::rm_snapshot(args),
        Command::Fork(args) => snapshot::fork(args),
        Command::Logs(args) => logs::logs(args),
        Command::Policy(cmd) => policy::policy(cmd),
        Command::Ca(args) => ca::ca(args),
        Command::Images(cmd) => images::images(cmd),
        Command::Serve(args) => serve::serve(args),
        Command::Doctor(args) => doctor::doctor(args),
        Command::VerifyIsolation(args) => verify_isolation::verify_isolation(args),
        Command::Holder => Ok(sandbox::holder::main()),
    }
}

/// How a command runs in the guest: what `run` and `exec` share.
#[derive(Debug, Args)]
pub struct ProcessArgs {
    /// Set an environment variable in the guest (repeatable).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Working directory of the command in the guest (default: the image's, else /).
    #[arg(short = 'w', long, value_name = "DIR")]
    workdir: Option<String>,
    /// Run the command as this guest user.
    #[arg(short = 'u', long, value_name = "USER")]
    user: Option<String>,
    /// Pass this process's standard input to the command.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Run the command on a terminal (with -i: an interactive session, as `docker run -it`).
    #[arg(short = 't', long)]
    tty: bool,
}

impl ProcessArgs {
    /// `command` with the environment, directory and user given here.
    pub fn settings(&self, mut command: GuestCommand) -> GuestCommand {
        for (k, v) in &self.env {
            command = command.env(k, v);
        }
        if let Some(dir) = &self.workdir {
            command = command.cwd(dir);
        }
        if let Some(user) = &self.user {
            command = command.user(user);
        }
        command
    }

    /// `command` attached to this process as -i and -t say, its output
    /// written to `stdout` and `stderr`.
    pub fn streams(
        &self,
        command: GuestCommand,
        stdout: impl Write + Send + 'static,
        stderr: impl Write + Send + 'static,
    ) -> GuestCommand {
        if self.tty && self.interactive {
            return command.attach_terminal().stdout_to(stdout);
        }
        let mut command = command.stdout_to(stdout).stderr_to(stderr);
        if self.tty {
            command = command.tty(sandbox::terminal::stdout_size());
        }
        if self.interactive {
            command = command.stdin_from(std::io::stdin());
        }
        command
    }
}

/// `KEY=VALUE`, for `-e`.
pub fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}
