//! `sandbox rm`: delete sandboxes and their logs.

use std::process::ExitCode;

use clap::Args;
use sandbox::Sandbox;

use crate::exit::Outcome;

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
pub fn rm(args: RmArgs) -> Outcome {
    let mut code = ExitCode::SUCCESS;
    for id in args.ids {
        match Sandbox::find(&id).and_then(|s| s.remove(args.force).map(|()| s)) {
            Ok(s) => println!("{}", s.id()),
            Err(e) => {
                eprintln!("sandbox: {e}");
                code = ExitCode::FAILURE;
            }
        }
    }
    Ok(code)
}
