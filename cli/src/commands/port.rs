//! `sandbox port`: forward a host port to a running sandbox, or list its forwards.

use std::process::ExitCode;

use clap::Args;
use sandbox::{PortSpec, Sandbox};

use crate::exit::Outcome;

#[derive(Debug, Args)]
pub struct PortArgs {
    /// The sandbox id (or a unique prefix).
    id: String,
    /// `[HOST_ADDR:]HOST_PORT:GUEST_PORT`: listen on HOST_ADDR (default
    /// 127.0.0.1; anything wider only when given) port HOST_PORT (0: a free
    /// one) and carry each connection to the guest's 127.0.0.1:GUEST_PORT,
    /// until the sandbox stops. Without it, list the sandbox's forwards.
    #[arg(value_name = "[HOST_ADDR:]HOST_PORT:GUEST_PORT", value_parser = parse_spec)]
    mapping: Option<PortSpec>,
}

/// A `-p` / `sandbox port` mapping.
pub fn parse_spec(s: &str) -> Result<PortSpec, String> {
    s.parse::<PortSpec>().map_err(|e| e.to_string())
}

/// Add a forward and print the host address it listens on, or list the forwards.
pub fn port(args: PortArgs) -> Outcome {
    let sandbox = Sandbox::find(&args.id)?;
    match args.mapping {
        Some(spec) => {
            // Bound here, by the caller (its rights, its address), and handed to
            // the sandbox's holder, which only accepts on it.
            let forward = sandbox.forward_port(&spec)?;
            println!("{}", forward.host);
        }
        None => {
            if !sandbox.is_running() {
                return Err(anyhow::anyhow!("sandbox {} is not running", sandbox.id()).into());
            }
            for forward in sandbox.ports() {
                println!("{} -> {}", forward.host, forward.guest_port);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mappings_parse_or_say_what_is_expected() {
        assert_eq!(parse_spec("8080:80").unwrap(), PortSpec::loopback(8080, 80));
        assert_eq!(parse_spec("0.0.0.0:0:80").unwrap().host, "0.0.0.0:0".parse().unwrap());
        let err = parse_spec("80").unwrap_err();
        assert!(err.contains("[HOST_ADDR:]HOST_PORT:GUEST_PORT"), "{err}");
    }
}
