//! `sandbox stop`: their holders stop the VMs.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use sandbox::Sandbox;

use crate::exit::Outcome;

/// How long `stop` waits for a sandbox to stop before killing its holder.
const STOP_TIMEOUT: Duration = Duration::from_secs(40);

#[derive(Debug, Args)]
pub struct StopArgs {
    /// Sandbox ids (or unique prefixes).
    #[arg(required = true)]
    ids: Vec<String>,
}

/// Stop sandboxes; print each id when it has stopped.
pub fn stop(args: StopArgs) -> Outcome {
    let mut code = ExitCode::SUCCESS;
    for id in args.ids {
        match Sandbox::find(&id).and_then(|s| s.stop(STOP_TIMEOUT).map(|()| s)) {
            Ok(s) => println!("{}", s.id()),
            Err(e) => {
                eprintln!("sandbox: {e}");
                code = ExitCode::FAILURE;
            }
        }
    }
    Ok(code)
}
