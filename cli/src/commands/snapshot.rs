//! `sandbox snapshot | snapshots | rm-snapshot | fork`: snapshots of
//! running sandboxes, kept by name in the data directory, and sandboxes
//! restored from them (`run --from` restores one too).

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use sandbox::{AfterSnapshot, Sandbox, Snapshot};

use crate::exit::{Outcome, SandboxFailure};

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// The sandbox (id or unique prefix).
    id: String,
    /// Keep it under this name (default: a new random one).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Stop the sandbox once the snapshot is written.
    #[arg(long)]
    stop: bool,
}

#[derive(Debug, Args)]
pub struct SnapshotsArgs {
    /// Only print names.
    #[arg(short = 'q', long)]
    quiet: bool,
}

#[derive(Debug, Args)]
pub struct RmSnapshotArgs {
    /// Snapshot names.
    #[arg(required_unless_present = "warm", value_name = "NAME")]
    names: Vec<String>,
    /// Empty the cache of warm-start snapshots instead.
    #[arg(long, conflicts_with = "names")]
    warm: bool,
}

#[derive(Debug, Args)]
pub struct ForkArgs {
    /// The sandbox to copy (id or unique prefix); it runs on.
    id: String,
    /// How many copies to start.
    #[arg(short = 'n', long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    count: u16,
}

/// A new snapshot name: the sandbox's id and the time.
fn new_name(id: &str) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    format!("{id}-{}", now.as_millis())
}

/// `sandbox snapshot`: print the snapshot's name once it is written.
pub fn snapshot(args: SnapshotArgs) -> Outcome {
    let data = sandbox::paths::data_dir();
    let sandbox = Sandbox::find(&args.id)?;
    let name = args.name.unwrap_or_else(|| new_name(sandbox.id()));
    if !sandbox::snapshot::valid_name(&name) {
        return Err(crate::exit::Failure::Usage(format!(
            "{name:?} is not a snapshot name (letters, digits, '.', '_', '-'; at most 64)"
        )));
    }
    let store = sandbox::paths::snapshots_in(&data);
    sandbox::snapshot::create_store(&store).or_sandbox_failure()?;
    let then = if args.stop { AfterSnapshot::Stop } else { AfterSnapshot::Resume };
    let snapshot = sandbox.snapshot(store.join(&name), then).or_sandbox_failure()?;
    println!("{}", snapshot.name());
    Ok(ExitCode::SUCCESS)
}

/// `sandbox snapshots`: list the named snapshots.
pub fn snapshots(args: SnapshotsArgs) -> Outcome {
    let (snapshots, unreadable) = Snapshot::list_in(&sandbox::paths::data_dir())?;
    let mut out = std::io::stdout().lock();
    if !args.quiet {
        writeln!(
            out,
            "{:<28} {:<14} {:<20} {:<8} {:<5} {:<9} CREATED",
            "NAME", "SOURCE", "IMAGE", "MEMORY", "CPUS", "SIZE"
        )?;
    }
    for s in snapshots {
        if args.quiet {
            writeln!(out, "{}", s.name())?;
            continue;
        }
        writeln!(
            out,
            "{:<28} {:<14} {:<20} {:<8} {:<5} {:<9} {}",
            s.name(),
            s.source,
            s.image,
            format!("{} MiB", s.memory_mib),
            s.vcpus,
            format!("{} MiB", s.disk_usage() >> 20),
            super::ps::ago(s.created)
        )?;
    }
    for (dir, e) in unreadable {
        eprintln!("sandbox: {} is not a usable snapshot: {e}", dir.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// `sandbox rm-snapshot`: delete snapshots; sandboxes restored from them run on.
pub fn rm_snapshot(args: RmSnapshotArgs) -> Outcome {
    if args.warm {
        let removed = sandbox::warm::clear()?;
        eprintln!("sandbox: removed {removed} warm snapshot(s)");
        return Ok(ExitCode::SUCCESS);
    }
    let data = sandbox::paths::data_dir();
    let mut code = ExitCode::SUCCESS;
    for name in args.names {
        let dir = sandbox::paths::snapshots_in(&data).join(&name);
        let removed = if sandbox::snapshot::valid_name(&name) && dir.is_dir() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))
        } else {
            Err(anyhow::anyhow!("no snapshot {name:?} (sandbox snapshots lists them)"))
        };
        match removed {
            Ok(()) => println!("{name}"),
            Err(e) => {
                eprintln!("sandbox: {e:#}");
                code = ExitCode::FAILURE;
            }
        }
    }
    Ok(code)
}

/// `sandbox fork`: snapshot a running sandbox and start copies of it in
/// the background, each with the source's profiles; print their ids. The
/// snapshot is deleted once they run (their memory maps it).
pub fn fork(args: ForkArgs) -> Outcome {
    let source = Sandbox::find(&args.id)?;
    let exe = std::env::current_exe().context("find the sandbox executable").or_sandbox_failure()?;
    let (label, vcpus) = (source.state().command.clone(), source.state().vcpus);
    let copies = source
        .fork(usize::from(args.count), |builder| {
            builder.holder_program(&exe, ["holder"]).jail(super::run::default_jail(vcpus)).label(label.clone())
        })
        .or_sandbox_failure()?;
    let mut failed = None;
    for copy in copies {
        match copy {
            Ok(copy) => println!("{}", copy.id()),
            Err(e) => {
                eprintln!("sandbox: a copy did not start: {e}");
                failed.get_or_insert(e);
            }
        }
    }
    if let Some(e) = failed {
        return Err(e).or_sandbox_failure();
    }
    Ok(ExitCode::SUCCESS)
}
