//! `sandbox ca <ID>`: the certificate of a sandbox's own CA.

use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use sandbox::Sandbox;

use crate::exit::Outcome;

#[derive(Debug, Args)]
pub struct CaArgs {
    /// The sandbox id (printed by `sandbox run -d`, listed by `sandbox ps -a`) or a unique prefix of it.
    id: String,
}

pub fn ca(args: CaArgs) -> Outcome {
    let sandbox = Sandbox::find(&args.id)?;
    let path = sandbox.ca_cert();
    let pem = match std::fs::read_to_string(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(anyhow::anyhow!(
                "sandbox {} has no CA certificate ({} does not exist; it is written when the sandbox starts)",
                sandbox.id(),
                path.display()
            )
            .into());
        }
        read => read.with_context(|| format!("read {}", path.display()))?,
    };
    print!("{pem}");
    Ok(ExitCode::SUCCESS)
}
