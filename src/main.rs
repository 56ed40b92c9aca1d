//! `sandbox`: the command-line interface.
//!
//! Exit status of `sandbox run`: the guest command's own status; 124 when it
//! ran past `--timeout`; 125 when the sandbox itself failed (no KVM, no
//! kernel, bad image, bad arguments); 2 for a command line clap rejects.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Status when the command ran past its timeout (as timeout(1) reports it).
const EXIT_TIMEOUT: u8 = 124;
/// Status when the sandbox itself failed (as `docker run` reports it).
const EXIT_SANDBOX_ERROR: u8 = 125;

#[derive(Debug, Parser)]
#[command(name = "sandbox", version, about = "Run untrusted code in a KVM microVM whose network egress is decided by policy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a sandbox, run a command in it, and exit with the command's status.
    Run(RunArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Guest RAM in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    memory: u32,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u8,
    /// Stop the sandbox after this many seconds (exit status 124).
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    /// Set an environment variable in the guest (repeatable).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Working directory of the command in the guest.
    #[arg(short = 'w', long, value_name = "DIR", default_value = "/")]
    workdir: String,
    /// Show the guest kernel's console log on stderr.
    #[arg(long)]
    console: bool,
    /// `default`, or the path of an erofs or ext4 image file.
    image: String,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    cmd: Vec<String>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SANDBOX_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(args),
    }
}

fn run(args: RunArgs) -> ExitCode {
    let mut builder = sandbox::Sandbox::builder(sandbox::Image::parse(&args.image))
        .memory_mib(args.memory)
        .vcpus(args.cpus)
        .cwd(args.workdir)
        .output(std::io::stdout());
    for (k, v) in args.env {
        builder = builder.env(k, v);
    }
    if let Some(secs) = args.timeout {
        builder = builder.timeout(Duration::from_secs(secs));
    }
    if args.console {
        builder = builder.console(std::io::stderr());
    }
    match builder.run(args.cmd) {
        Ok(out) => match out.status {
            sandbox::Status::Exited(code) => ExitCode::from(u8::try_from(code).unwrap_or(255)),
            sandbox::Status::TimedOut => {
                eprintln!("sandbox: the command did not finish within {}s; the sandbox was stopped", args.timeout.unwrap_or(0));
                ExitCode::from(EXIT_TIMEOUT)
            }
        },
        Err(err) => {
            eprintln!("sandbox: {err}");
            ExitCode::from(EXIT_SANDBOX_ERROR)
        }
    }
}
