//! `sandbox doctor`: what this host supports for sandboxes, and what is missing.

use std::process::ExitCode;

use clap::Args;
use sandbox::HostSupport;

use crate::exit::Outcome;

#[derive(Debug, Args)]
pub struct DoctorArgs {}

/// Print each check; fail (status 1) when sandboxes cannot run confined here.
pub fn doctor(_args: DoctorArgs) -> Outcome {
    let support = HostSupport::probe();
    print!("{support}");
    match support.can_jail() {
        Ok(()) => {
            println!("sandboxes run confined on this host");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("sandboxes cannot run confined on this host: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}
