//! `sandbox ca show | rotate`.

use std::process::ExitCode;

use clap::Subcommand;
use net::SandboxCa;

use crate::exit::Outcome;

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Print the CA certificate (PEM), creating the CA if there is none.
    Show,
    /// Replace the CA with a new one; running sandboxes keep the old one.
    Rotate,
}

pub fn ca(cmd: CaCommand) -> Outcome {
    let dir = SandboxCa::default_dir();
    let ca = match cmd {
        CaCommand::Show => SandboxCa::load_or_create(&dir)?,
        CaCommand::Rotate => {
            let ca = SandboxCa::rotate(&dir)?;
            eprintln!("sandbox: new CA in {}", ca.path().display());
            ca
        }
    };
    print!("{}", ca.ca_cert_pem());
    Ok(ExitCode::SUCCESS)
}
