//! `sandbox logs`: what a sandbox's guest tried to reach.

use std::process::ExitCode;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use clap::Args;
use sandbox::Sandbox;
use telemetry::query::{print_logs, LogOptions};

use crate::exit::Outcome;

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The sandbox id (printed by `sandbox run -d`, listed by `sandbox ps -a`) or a unique
    /// prefix of it, or `last` for the most recent run.
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

/// The file naming the most recent run, for `sandbox logs last`.
fn last_file() -> std::path::PathBuf {
    sandbox::paths::sandboxes_dir().join("last")
}

/// Make `id` the one `sandbox logs last` reads.
pub fn remember_last(id: &str) {
    let _ = std::fs::write(last_file(), id);
}

pub fn logs(args: LogsArgs) -> Outcome {
    let id = if args.id == "last" {
        std::fs::read_to_string(last_file()).context("no sandbox has run yet")?.trim().to_string()
    } else {
        args.id
    };
    let db = Sandbox::find(&id)?.session_db();
    if !db.is_file() {
        return Err(anyhow::anyhow!("no session database for sandbox {id} ({} does not exist)", db.display()).into());
    }
    let options = LogOptions {
        dns: args.dns,
        net: args.net,
        ai: args.ai,
        json: args.json,
        follow: args.follow,
        ..Default::default()
    };
    let stop = AtomicBool::new(false);
    print_logs(&db, &options, &mut std::io::stdout().lock(), &stop)?;
    Ok(ExitCode::SUCCESS)
}
