//! `sandbox policy check | explain`.

use std::process::ExitCode;

use clap::Subcommand;
use sandbox::policy::{Engine, Event, Layer, ProfileSource};

use crate::exit::Outcome;

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Load profiles (lowest layer first) and report errors with file:line:column.
    Check {
        #[arg(required = true)]
        profiles: Vec<String>,
    },
    /// Decide on one event and say which rule decided and why.
    Explain {
        #[arg(required = true)]
        profiles: Vec<String>,
        /// The event as JSON, e.g. '{"event": "http.request", "host": "pypi.org", "method": "GET"}'.
        #[arg(long)]
        event: String,
    },
}

fn layers(profiles: &[String]) -> Vec<(Layer, ProfileSource)> {
    profiles.iter().map(|p| (Layer::User, ProfileSource::from_arg(p))).collect()
}

pub fn policy(cmd: PolicyCommand) -> Outcome {
    match cmd {
        PolicyCommand::Check { profiles } => match sandbox::policy::check(&layers(&profiles)) {
            Ok(summary) => {
                println!("{summary}");
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(ExitCode::FAILURE)
            }
        },
        PolicyCommand::Explain { profiles, event } => {
            let engine = Engine::load_layers(&layers(&profiles))?;
            let event = Event::from_json(&event)?;
            println!("{}", engine.explain(&event));
            Ok(ExitCode::SUCCESS)
        }
    }
}
