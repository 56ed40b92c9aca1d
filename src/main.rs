//! `sandbox`: the command-line interface.
//!
//! Exit status of `sandbox run`: the guest command's own status; 124 when it
//! ran past `--timeout`; 125 when the sandbox itself failed (no KVM, no
//! kernel, bad image, bad profile); 2 for a command line clap rejects.

mod images_cli;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use sandbox::policy::{Engine, Event, Layer, ProfileSource};

mod cli {
    pub mod detached;
    pub mod manage;
    pub mod verify;
}

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
    /// Boot a sandbox, run a command in it, and exit with the command's status
    /// (with -d: leave it running and print its id).
    Run(Box<RunArgs>),
    /// Run a command in a running sandbox.
    Exec(cli::manage::ExecArgs),
    /// Copy a file into or out of a running sandbox: `cp <id>:<path> <local>` or `cp <local> <id>:<path>`.
    Cp(cli::manage::CpArgs),
    /// List running sandboxes (-a: all).
    Ps(cli::manage::PsArgs),
    /// Stop running sandboxes (the guest powers off).
    Stop(cli::manage::StopArgs),
    /// Delete sandboxes and their logs.
    Rm(cli::manage::RmArgs),
    /// Print what a sandbox's guest tried to reach (its session.db).
    Logs(LogsArgs),
    /// Check profiles, or explain a decision.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Manage the sandbox CA that signs the certificates guests see.
    #[command(subcommand)]
    Ca(CaCommand),
    #[command(flatten)]
    Images(images_cli::ImagesCommand),
    /// Boot a canary sandbox and prove from outside that nothing gets out of it.
    VerifyIsolation(cli::verify::VerifyArgs),
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
    /// Leave the sandbox running in the background and print its id; the
    /// command, if given, runs with its output in the sandbox's output.log,
    /// and the sandbox stops when it ends.
    #[arg(short = 'd', long, conflicts_with_all = ["interactive", "tty"])]
    detach: bool,
    /// Marks the background process of `run -d`.
    #[arg(long = "detached-child", hide = true)]
    detached_child: bool,
    /// Policy profile: a TOML file or a built-in name (`deny-all`, `dev`); repeatable.
    #[arg(long, value_name = "PROFILE")]
    profile: Vec<String>,
    /// A corporate profile (its locks bind every --profile).
    #[arg(long, value_name = "FILE")]
    corporate_profile: Vec<PathBuf>,
    /// Let guests reach this internal network (CIDR), e.g. 127.0.0.1/32 for a local upstream.
    #[arg(long, value_name = "CIDR")]
    allow_net: Vec<ipnet::IpNet>,
    /// Upstream DNS server (IP:PORT); default: the host's resolv.conf.
    #[arg(long, value_name = "ADDR")]
    dns_server: Vec<std::net::SocketAddr>,
    /// Trust this PEM root for upstream TLS, beside the system roots.
    #[arg(long, value_name = "FILE")]
    upstream_ca: Vec<PathBuf>,
    /// Reach every upstream through this HTTP proxy (`CONNECT`), e.g. http://proxy.corp:3128.
    #[arg(long, value_name = "URL", value_parser = sandbox::UpstreamProxy::parse)]
    upstream_proxy: Option<sandbox::UpstreamProxy>,
    /// Basic credentials for the upstream proxy: the name of a secret (an
    /// environment variable) whose value is `user:password`.
    #[arg(long, value_name = "SECRET", requires = "upstream_proxy")]
    upstream_proxy_secret: Option<String>,
    /// Show the guest kernel's console log on stderr.
    #[arg(long)]
    console: bool,
    /// `default`, the path of an erofs or ext4 image file, or an OCI image
    /// (`python:3.12-slim`, `oci:<dir>[:tag]`, `docker-archive:<file>`).
    image: String,
    /// The command and its arguments (optional with -d; for an OCI image:
    /// default its Cmd, after its Entrypoint).
    #[arg(last = true, value_name = "CMD")]
    cmd: Vec<String>,
}

#[derive(Debug, Args)]
struct LogsArgs {
    /// The sandbox id (printed by `sandbox run` with --print-id or in `SANDBOX_LOG=info`), or `last`.
    id: String,
    /// Only DNS queries.
    #[arg(long)]
    dns: bool,
    /// Only network requests.
    #[arg(long)]
    net: bool,
    /// Only model calls.
    #[arg(long)]
    ai: bool,
    /// JSON lines.
    #[arg(long)]
    json: bool,
    /// Keep printing new rows.
    #[arg(short = 'f', long)]
    follow: bool,
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Load profiles (lowest layer first) and report errors with file:line:column.
    Check {
        #[arg(required = true)]
        profiles: Vec<String>,
    },
    /// Decide on one event and say which rule decided and why.
    Explain {
        #[arg(required = true)]
        profiles: Vec<String>,
        /// The event as JSON, e.g. '{"event": "http.request", "host": "pypi.org", "method": "GET"}'.
        #[arg(long)]
        event: String,
    },
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Print the CA certificate (PEM), creating the CA if there is none.
    Show,
    /// Replace the CA with a new one; running sandboxes keep the old one.
    Rotate,
}

/// A guest exit status as this process's (the low 8 bits, as a shell sees them).
fn exit_status(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(255))
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The background process of `run -d` writes a log file: say more there.
    let background = matches!(&cli.command, Command::Run(args) if args.detached_child);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SANDBOX_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(if background { "info" } else { "warn" })),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && !background)
        .init();
    let result = match cli.command {
        Command::Run(args) => return run(*args),
        Command::Exec(args) => return cli::manage::exec(args),
        Command::Cp(args) => cli::manage::cp(args),
        Command::Ps(args) => cli::manage::ps(args),
        Command::Stop(args) => cli::manage::stop(args),
        Command::Rm(args) => cli::manage::rm(args),
        Command::Logs(args) => logs(args),
        Command::Policy(cmd) => policy(cmd),
        Command::Ca(cmd) => ca(cmd),
        Command::Images(cmd) => images_cli::main(cmd),
        Command::VerifyIsolation(args) => return cli::verify::verify_isolation(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("sandbox: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The policy for `run`: the profiles in their layers (default `deny-all`),
/// asking on the terminal when there is one (no answer in time: block).
fn load_policy(args: &RunArgs) -> Result<sandbox::policy::Policy, sandbox::policy::ProfileError> {
    let mut layers: Vec<(Layer, ProfileSource)> =
        args.corporate_profile.iter().map(|f| (Layer::Corporate, ProfileSource::File(f.clone()))).collect();
    layers.extend(args.profile.iter().map(|p| (Layer::User, ProfileSource::from_arg(p))));
    let engine = if layers.is_empty() { Engine::builtin("deny-all")? } else { Engine::load_layers(&layers)? };
    Ok(if std::fs::File::open("/dev/tty").is_ok() {
        let asker = sandbox::ask::TerminalAsker::tty();
        sandbox::policy::Policy::with_asker(engine, std::sync::Arc::new(asker), sandbox::policy::DEFAULT_ASK_TIMEOUT)
    } else {
        sandbox::policy::Policy::new(engine)
    })
}

fn run(args: RunArgs) -> ExitCode {
    if args.detach && !args.detached_child {
        return cli::detached::start();
    }
    let policy = match load_policy(&args) {
        Ok(policy) => policy,
        Err(err) => {
            eprintln!("sandbox: {err}");
            return ExitCode::from(EXIT_SANDBOX_ERROR);
        }
    };
    let mut upstream_proxy = args.upstream_proxy;
    if let (Some(proxy), Some(secret)) = (&mut upstream_proxy, &args.upstream_proxy_secret) {
        match std::env::var(secret) {
            Ok(credentials) if credentials.contains(':') => proxy.credentials = Some(credentials),
            _ => {
                eprintln!("sandbox: --upstream-proxy-secret {secret}: set ${secret} to user:password");
                return ExitCode::from(EXIT_SANDBOX_ERROR);
            }
        }
    }
    let mut net = sandbox::NetConfig {
        dns_servers: args.dns_server,
        extra_root_files: args.upstream_ca,
        allowed_networks: args.allow_net,
        upstream_proxy,
        ..sandbox::NetConfig::default()
    };
    net.system_roots = true;
    let image = sandbox::Image::parse(&args.image);
    if args.cmd.is_empty() && !args.detach && !matches!(image, sandbox::Image::Oci(_)) {
        eprintln!("error: this image needs a command: sandbox run [OPTIONS] <IMAGE> -- <CMD>...");
        return ExitCode::from(2);
    }
    if let Err(err) = images_cli::prepare(&image) {
        eprintln!("sandbox: {err:#}");
        return ExitCode::from(EXIT_SANDBOX_ERROR);
    }
    let mut builder = sandbox::Sandbox::builder(image)
        .memory_mib(args.memory)
        .vcpus(args.cpus)
        .net_config(net)
        .policy(policy);
    if args.console {
        // The console is guest output too: it waits while a question is asked.
        builder = builder.console(sandbox::ask::GatedWriter::new(std::io::stderr(), sandbox::ask::OutputGate::terminal()));
    }
    let timeout = args.timeout.map(Duration::from_secs);
    for (k, v) in args.env {
        builder = builder.env(k, v);
    }
    if let Some(user) = args.user {
        builder = builder.user(user);
    }
    if let Some(dir) = args.workdir {
        builder = builder.cwd(dir);
    }
    if args.detached_child {
        // The command as the image's config makes it (none: the sandbox just runs).
        let command = builder.exec_for_image(args.cmd.clone()).ok();
        return cli::detached::serve(builder.command(args.cmd), command, timeout);
    }
    // Guest output waits while an `ask` question is on the terminal.
    let gate = sandbox::ask::OutputGate::terminal();
    builder = builder
        .stdout(sandbox::ask::GatedWriter::new(std::io::stdout(), std::sync::Arc::clone(&gate)))
        .stderr(sandbox::ask::GatedWriter::new(std::io::stderr(), gate));
    if args.tty && args.interactive {
        builder = builder.terminal();
    } else if args.tty {
        builder = builder.tty(sandbox::terminal::stdout_size());
    } else if args.interactive {
        builder = builder.stdin(std::io::stdin());
    }
    if let Some(timeout) = timeout {
        builder = builder.timeout(timeout);
    }
    match builder.run(args.cmd) {
        Ok(out) => {
            tracing::info!(id = %out.id, session_db = %out.session_db.display(), boot = ?out.boot_time, "sandbox finished");
            if std::io::stderr().is_terminal() {
                tracing::debug!("logs: sandbox logs {}", out.id);
            }
            remember_last(&out.id);
            match out.status {
                sandbox::Status::Exited(code) => exit_status(code),
                sandbox::Status::TimedOut => {
                    eprintln!(
                        "sandbox: the command did not finish within {}s; the sandbox was stopped",
                        args.timeout.unwrap_or(0)
                    );
                    ExitCode::from(EXIT_TIMEOUT)
                }
            }
        }
        Err(err) => {
            eprintln!("sandbox: {err}");
            ExitCode::from(EXIT_SANDBOX_ERROR)
        }
    }
}

/// `sandbox logs last` reads the most recent run's database.
fn remember_last(id: &str) {
    let _ = std::fs::write(sandbox::paths::sandboxes_dir().join("last"), id);
}

fn logs(args: LogsArgs) -> anyhow::Result<ExitCode> {
    let dir = sandbox::paths::sandboxes_dir();
    let id = if args.id == "last" {
        std::fs::read_to_string(dir.join("last")).context("no sandbox has run yet")?.trim().to_string()
    } else {
        args.id
    };
    anyhow::ensure!(id.chars().all(|c| c.is_ascii_alphanumeric()), "not a sandbox id: {id:?}");
    let db = dir.join(&id).join(guest_protocol::sandbox_dir::SESSION_DB);
    anyhow::ensure!(db.is_file(), "no session database for sandbox {id} ({} does not exist)", db.display());
    let options = sandbox_telemetry::query::LogOptions {
        dns: args.dns,
        net: args.net,
        ai: args.ai,
        json: args.json,
        follow: args.follow,
        ..Default::default()
    };
    let stop = AtomicBool::new(false);
    sandbox_telemetry::query::print_logs(&db, &options, &mut std::io::stdout().lock(), &stop)?;
    Ok(ExitCode::SUCCESS)
}

fn layers(profiles: &[String]) -> Vec<(Layer, ProfileSource)> {
    profiles.iter().map(|p| (Layer::User, ProfileSource::from_arg(p))).collect()
}

fn policy(cmd: PolicyCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCommand::Check { profiles } => match sandbox::policy::check(&layers(&profiles)) {
            Ok(summary) => {
                println!("{summary}");
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(ExitCode::FAILURE)
            }
        },
        PolicyCommand::Explain { profiles, event } => {
            let engine = Engine::load_layers(&layers(&profiles))?;
            let event = Event::from_json(&event)?;
            println!("{}", engine.explain(&event));
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn ca(cmd: CaCommand) -> anyhow::Result<ExitCode> {
    let dir = sandbox_net::SandboxCa::default_dir();
    let ca = match cmd {
        CaCommand::Show => sandbox_net::SandboxCa::load_or_create(&dir)?,
        CaCommand::Rotate => {
            let ca = sandbox_net::SandboxCa::rotate(&dir)?;
            eprintln!("sandbox: new CA in {}", ca.path().display());
            ca
        }
    };
    print!("{}", ca.ca_cert_pem());
    Ok(ExitCode::SUCCESS)
}
