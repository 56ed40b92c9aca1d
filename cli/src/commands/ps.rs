//! `sandbox ps`: list sandboxes.

use std::io::Write;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Args;
use sandbox::Sandbox;

use crate::exit::Outcome;

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
pub fn ago(created: u64) -> String {
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
pub fn ps(args: PsArgs) -> Outcome {
    let sandboxes = Sandbox::list()?;
    let mut out = std::io::stdout().lock();
    if !args.quiet {
        writeln!(
            out,
            "{:<14} {:<20} {:<30} {:<16} {:<8} {:<9} PORTS",
            "ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "MEMORY"
        )?;
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
        let ports: Vec<String> = s.ports().iter().map(|f| format!("{}->{}", f.host, f.guest_port)).collect();
        writeln!(
            out,
            "{:<14} {:<20} {:<30} {:<16} {:<8} {:<9} {}",
            state.id,
            image,
            command,
            ago(state.created),
            status,
            format!("{} MiB", state.memory_mib),
            ports.join(", ")
        )?;
    }
    Ok(ExitCode::SUCCESS)
}
