//! `sandbox run`: boot a sandbox, run a command in it, exit with its status.
//! With `-d`, the sandbox runs in a holder process of its own (this program,
//! as `sandbox holder`; see `sandbox::holder`) and its id is printed.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use sandbox::policy::{Engine, Layer, Policy, ProfileSource};
use sandbox::{Command, Image, Jail, NetConfig, Sandbox, SandboxBuilder, Snapshot, Status};

use crate::ask::{GatedWriter, OutputGate, TerminalAsker};
use crate::exit::{guest_status, Failure, Outcome, SandboxFailure, TIMEOUT};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Guest RAM in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    memory: u32,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u8,
    /// Size of the guest's writable root in MiB (default: half of --memory);
    /// it lives in guest memory, never on the host's disk.
    #[arg(long, value_name = "MIB")]
    disk: Option<u32>,
    /// Stop the sandbox after this many seconds (exit status 124).
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    #[command(flatten)]
    process: super::ProcessArgs,
    /// Leave the sandbox running in the background and print its id; the
    /// command, if given, runs with its output in the sandbox's output.log,
    /// and the sandbox stops when it ends.
    #[arg(short = 'd', long, conflicts_with_all = ["interactive", "tty", "console"])]
    detach: bool,
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
    /// Host memory the sandbox's process may use beyond the guest's RAM
    /// (VMM, handlers, their buffers); its cgroup's limit is --memory plus this.
    #[arg(long, value_name = "MIB", default_value_t = sandbox::DEFAULT_MEMORY_OVERHEAD_MIB)]
    holder_memory: u32,
    /// Run the sandbox's process as root with every capability, no seccomp
    /// filter and no resource limits. UNSAFE: a guest that finds a bug in the
    /// VMM or a network handler then owns this host. For debugging only.
    #[arg(long)]
    no_jail: bool,
    /// Show the guest kernel's console log on stderr.
    #[arg(long)]
    console: bool,
    /// Forward a host port to the guest's 127.0.0.1 while the sandbox runs:
    /// `[HOST_ADDR:]HOST_PORT:GUEST_PORT` (HOST_ADDR defaults to 127.0.0.1;
    /// HOST_PORT 0 picks a free one); repeatable. The host address of each
    /// is printed on stderr as `sandbox: port HOST -> GUEST`.
    #[arg(short = 'p', long = "publish", value_name = "[HOST_ADDR:]HOST_PORT:GUEST_PORT", value_parser = super::port::parse_spec)]
    publish: Vec<sandbox::PortSpec>,
    /// Restore the sandbox from this snapshot (a name from `sandbox
    /// snapshots`, or a snapshot's directory) instead of booting an image;
    /// its memory, vCPUs and image are the snapshot's.
    #[arg(long, value_name = "SNAPSHOT", conflicts_with_all = ["image", "memory", "cpus", "disk"])]
    from: Option<String>,
    /// Boot the kernel instead of restoring the cached snapshot of an idle
    /// sandbox of the same image, memory, CPUs and disk (which is made after
    /// the first boot of each).
    #[arg(long, conflicts_with = "from")]
    cold: bool,
    /// `default`, the path of an erofs or ext4 image file, or an OCI image
    /// (`python:3.12-slim`, `oci:<dir>[:tag]`, `docker-archive:<file>`).
    #[arg(required_unless_present = "from")]
    image: Option<String>,
    /// The command and its arguments (optional with -d; for an OCI image:
    /// default its Cmd, after its Entrypoint).
    #[arg(last = true, value_name = "CMD")]
    cmd: Vec<String>,
}

/// The profiles in their layers.
fn layers(args: &RunArgs) -> Vec<(Layer, ProfileSource)> {
    let mut layers: Vec<(Layer, ProfileSource)> =
        args.corporate_profile.iter().map(|f| (Layer::Corporate, ProfileSource::File(f.clone()))).collect();
    layers.extend(args.profile.iter().map(|p| (Layer::User, ProfileSource::from_arg(p))));
    layers
}

/// The policy for a foreground `run`: the profiles in their layers (default
/// `deny-all`), asking on the terminal when there is one (no answer in
/// time: block).
fn load_policy(args: &RunArgs) -> Result<Policy, sandbox::policy::ProfileError> {
    let layers = layers(args);
    let engine = if layers.is_empty() { Engine::builtin("deny-all")? } else { Engine::load_layers(&layers)? };
    Ok(if std::fs::File::open("/dev/tty").is_ok() {
        Policy::with_asker(engine, Arc::new(TerminalAsker::tty()), sandbox::policy::DEFAULT_ASK_TIMEOUT)
    } else {
        Policy::new(engine)
    })
}

/// The network handlers' settings from the command line.
fn net_config(args: &RunArgs) -> Result<NetConfig, Failure> {
    let mut upstream_proxy = args.upstream_proxy.clone();
    if let (Some(proxy), Some(secret)) = (&mut upstream_proxy, &args.upstream_proxy_secret) {
        match std::env::var(secret) {
            Ok(credentials) if credentials.contains(':') => proxy.credentials = Some(credentials),
            _ => {
                return Err(Failure::Sandbox(anyhow::anyhow!(
                    "--upstream-proxy-secret {secret}: set ${secret} to user:password"
                )))
            }
        }
    }
    let mut net = NetConfig::default();
    net.dns_servers.clone_from(&args.dns_server);
    net.extra_root_files.clone_from(&args.upstream_ca);
    net.allowed_networks.clone_from(&args.allow_net);
    net.upstream_proxy = upstream_proxy;
    net.system_roots = true;
    Ok(net)
}

/// The sandbox and the command `args` describe (without its policy and confinement).
fn prepare(args: &RunArgs) -> Result<(SandboxBuilder, Command), Failure> {
    let net = net_config(args)?;
    let needs_command = |image: &Image| args.cmd.is_empty() && !args.detach && !matches!(image, Image::Oci(_));
    let usage = || Failure::Usage("this image needs a command: sandbox run [OPTIONS] <IMAGE> -- <CMD>...".into());
    let mut builder = match (&args.from, &args.image) {
        (Some(from), _) => {
            let snapshot = Snapshot::find_in(&sandbox::paths::data_dir(), from).or_sandbox_failure()?;
            Sandbox::from_snapshot(snapshot)
        }
        (None, Some(image)) => {
            let image = Image::parse(image);
            if needs_command(&image) {
                return Err(usage());
            }
            super::images::prepare(&image).or_sandbox_failure()?;
            let mut builder = Sandbox::builder(image).memory_mib(args.memory).vcpus(args.cpus);
            if let Some(disk) = args.disk {
                builder = builder.disk_mib(disk);
            }
            if !args.cold {
                builder = builder.warm();
            }
            builder
        }
        (None, None) => return Err(Failure::Usage("name an image or a snapshot (--from)".into())),
    };
    if needs_command(builder.image()) {
        return Err(usage());
    }
    // The holder of a background sandbox, and of the one that makes a warm snapshot.
    let exe = std::env::current_exe().context("find the sandbox executable").or_sandbox_failure()?;
    builder = builder.net_config(net).holder_program(exe, ["holder"]);
    if args.no_jail {
        eprintln!("sandbox: --no-jail: the sandbox's process is not confined (unsafe; for debugging only)");
        builder = builder.unconfined();
    }
    // A foreground run's policy is an object (it asks on the terminal);
    // the profiles are still recorded, for forks of the sandbox.
    for (layer, source) in layers(args) {
        builder = builder.profile_at(layer, source);
    }
    Ok((builder, args.process.settings(Command::from_argv(args.cmd.clone()).image_entrypoint())))
}

/// The confinement of a sandbox's process with `vcpus`: a CPU quota of its
/// vCPUs plus half a CPU for its handlers and device loop.
pub fn default_jail(vcpus: u8) -> Jail {
    let mut jail = Jail::default();
    jail.cpus = Some(f64::from(vcpus) + 0.5);
    jail
}

/// The confinement `args` ask for.
fn jail(args: &RunArgs) -> Jail {
    let mut jail = default_jail(args.cpus);
    jail.memory_overhead_mib = args.holder_memory;
    jail
}

/// Bind the listeners of `-p` here (before any confinement: this process's
/// rights, and a port already taken is an error before anything boots),
/// say where each listens, and give them to the sandbox.
fn publish(args: &RunArgs, mut builder: SandboxBuilder) -> Result<SandboxBuilder, Failure> {
    for spec in &args.publish {
        let listener = spec.bind().or_sandbox_failure()?;
        let host = listener.local_addr().context("read a listener's address").or_sandbox_failure()?;
        eprintln!("sandbox: port {host} -> {}", spec.guest_port);
        builder = builder.forward(listener, spec.guest_port);
    }
    Ok(builder)
}

pub fn run(args: RunArgs) -> Outcome {
    let (mut builder, mut command) = prepare(&args)?;
    builder = publish(&args, builder)?;
    let timeout = args.timeout.map(Duration::from_secs);
    if args.detach {
        return detach(&args, builder, command, timeout);
    }
    builder = builder.policy(load_policy(&args).or_sandbox_failure()?);
    if !args.no_jail {
        builder = builder.jail(jail(&args));
    }
    if args.console {
        // The console is guest output too: it waits while a question is asked.
        builder = builder.console(GatedWriter::new(std::io::stderr(), OutputGate::terminal()));
    }
    // Guest output waits while an `ask` question is on the terminal.
    let gate = OutputGate::terminal();
    command = args.process.streams(
        command,
        GatedWriter::new(std::io::stdout(), Arc::clone(&gate)),
        GatedWriter::new(std::io::stderr(), gate),
    );
    if let Some(timeout) = timeout {
        command = command.timeout(timeout);
    }
    let out = builder.run(command).or_sandbox_failure()?;
    tracing::info!(id = %out.id, session_db = %out.session_db.display(), boot = ?out.boot_time, "sandbox finished");
    if std::io::stderr().is_terminal() {
        tracing::debug!("logs: sandbox logs {}", out.id);
    }
    match out.status {
        Status::Exited(code) => Ok(guest_status(code)),
        Status::TimedOut => {
            eprintln!(
                "sandbox: the command did not finish within {}s; the sandbox was stopped",
                args.timeout.unwrap_or(0)
            );
            Ok(ExitCode::from(TIMEOUT))
        }
    }
}

/// `run -d`: start a holder process (this program, `sandbox holder`) that
/// boots the sandbox and runs the command with its output in the sandbox's
/// output.log; print the sandbox's id once it is ready.
fn detach(args: &RunArgs, mut builder: SandboxBuilder, command: Command, timeout: Option<Duration>) -> Outcome {
    builder = builder.label(args.cmd.clone());
    if !args.no_jail {
        builder = builder.jail(jail(args));
    }
    if let Some(timeout) = timeout {
        builder = builder.timeout(timeout);
    }
    let sandbox = builder.spawn_running(command).or_sandbox_failure()?;
    println!("{}", sandbox.id());
    Ok(ExitCode::SUCCESS)
}
