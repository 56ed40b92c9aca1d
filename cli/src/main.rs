//! `sandbox`: the command-line interface. Each command is a module of
//! `commands`; exit statuses are decided in `exit`.

mod ask;
mod commands;
mod exit;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "sandbox",
    version,
    about = "Run untrusted code in a KVM microVM whose network egress is decided by policy"
)]
struct Cli {
    #[command(subcommand)]
    command: commands::Command,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The process holding a `run -d` sandbox writes a log file: say more there.
    let holder = cli.command.is_holder();
    let level = if holder || cli.command.is_service() { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SANDBOX_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && !holder)
        .init();
    exit::report(commands::run(cli.command))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
        let detached = Cli::try_parse_from(["sandbox", "run", "-d", "default"]).unwrap();
        assert!(!detached.command.is_holder());
        let holder = Cli::try_parse_from(["sandbox", "holder"]).unwrap();
        assert!(holder.command.is_holder());
        assert!(Cli::try_parse_from(["sandbox", "run", "-d", "-t", "default"]).is_err());
    }
}
