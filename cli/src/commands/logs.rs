//! `sandbox logs`: what a sandbox's guest tried to reach.

use std::process::ExitCode;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use clap::Args;
use guest_protocol::sandbox_dir::SandboxDir;
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
    /// Only connections from the host into the guest (port forwards).
    #[arg(long)]
    inbound: bool,
    /// JSON lines.
    #[arg(long)]
    json: bool,
    /// Keep printing new rows.
    #[arg(short = 'f', long)]
    follow: bool,
}

/// The most recently started sandbox (`sandbox logs last`): the newest
/// state file, which its holder writes once as it starts.
fn last_started() -> anyhow::Result<String> {
    let newest = Sandbox::list()?
        .into_iter()
        .filter_map(|s| {
            let started = std::fs::metadata(SandboxDir::new(s.dir()).state_file()).and_then(|m| m.modified()).ok()?;
            Some((started, s.id().to_string()))
        })
        .max();
    newest.map(|(_, id)| id).context("no sandbox has run yet")
}

pub fn logs(args: LogsArgs) -> Outcome {
    let id = if args.id == "last" { last_started()? } else { args.id };
    let db = Sandbox::find(&id)?.session_db();
    if !db.is_file() {
        return Err(anyhow::anyhow!("no session database for sandbox {id} ({} does not exist)", db.display()).into());
    }
    let options = LogOptions {
        dns: args.dns,
        net: args.net,
        ai: args.ai,
        inbound: args.inbound,
        json: args.json,
        follow: args.follow,
        ..Default::default()
    };
    let stop = AtomicBool::new(false);
    print_logs(&db, &options, &mut std::io::stdout().lock(), &stop)?;
    Ok(ExitCode::SUCCESS)
}
