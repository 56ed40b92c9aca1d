//! `sandbox verify-isolation`: the CLI face of [`sandbox::verify`].

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use sandbox::verify::{self, VerifyConfig};

use crate::exit::{Outcome, SandboxFailure};

/// Status when a check did not block (or could not be made).
const EXIT_NOT_ISOLATED: u8 = 1;

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// An outside address the canary tries to reach directly, TCP and UDP (repeatable).
    #[arg(long, value_name = "ADDR:PORT")]
    target: Vec<std::net::SocketAddr>,
    /// Repeat every INTERVAL (`30s`, `5m`, `1h`), logging each round.
    #[arg(long, value_name = "INTERVAL", value_parser = verify::parse_interval)]
    every: Option<Duration>,
    /// With --every: stop after this many rounds (default: run until stopped).
    #[arg(long, value_name = "N")]
    rounds: Option<u64>,
    /// Profile for the canary (repeatable; default deny-all). A profile that allows the
    /// canary name makes the DNS check fail, as it should.
    #[arg(long, value_name = "PROFILE")]
    profile: Vec<String>,
    /// A corporate profile for the canary (its locks bind every --profile), as `sandbox run` takes it.
    #[arg(long, value_name = "FILE")]
    corporate_profile: Vec<std::path::PathBuf>,
    /// Let the canary's handlers reach this internal network (CIDR), as `sandbox run --allow-net`
    /// does: verify the configuration production runs with.
    #[arg(long, value_name = "CIDR")]
    allow_net: Vec<ipnet::IpNet>,
    /// The DNS name the canary looks up.
    #[arg(long, value_name = "NAME", default_value = verify::DEFAULT_CANARY_NAME)]
    canary_name: String,
    /// Port of the host loopback service the canary tries to reach (default: a free one).
    #[arg(long, value_name = "PORT", default_value_t = 0)]
    host_port: u16,
    /// Upstream DNS server of the canary's handlers (IP:PORT).
    #[arg(long, value_name = "ADDR")]
    dns_server: Vec<std::net::SocketAddr>,
    /// Do not boot the second (peer) sandbox.
    #[arg(long)]
    no_peer: bool,
    /// Image of the canary and the peer: `default` or an image file with /usr/bin/sandbox-probe.
    #[arg(long, default_value = "default")]
    image: String,
    /// Hold the sandboxes in this process, unconfined (unsafe; for debugging
    /// only), instead of a confined holder process each.
    #[arg(long)]
    no_jail: bool,
    /// Boot the sandboxes instead of restoring the warm snapshot of their kind.
    #[arg(long)]
    cold: bool,
}

/// The verification `args` ask for.
fn config(args: &VerifyArgs) -> anyhow::Result<VerifyConfig> {
    let mut config = VerifyConfig::default();
    if args.no_jail {
        eprintln!("sandbox: --no-jail: the sandboxes' processes are not confined (unsafe; for debugging only)");
    } else {
        let exe = std::env::current_exe().context("find the sandbox executable")?;
        config.holder = Some((exe, vec!["holder".into()]));
        config.warm = !args.cold;
    }
    config.image = sandbox::Image::parse(&args.image);
    config.profiles.clone_from(&args.profile);
    config.corporate_profiles.clone_from(&args.corporate_profile);
    config.net.dns_servers.clone_from(&args.dns_server);
    config.net.allowed_networks.clone_from(&args.allow_net);
    config.targets.clone_from(&args.target);
    config.canary_name.clone_from(&args.canary_name);
    config.host_port = args.host_port;
    config.peer = !args.no_peer;
    Ok(config)
}

/// Run the rounds; exit 0 only when every round was isolated.
pub fn verify_isolation(args: VerifyArgs) -> Outcome {
    let config = config(&args).or_sandbox_failure()?;
    let rounds = match (args.every, args.rounds) {
        (None, _) => 1,
        (Some(_), n) => n.unwrap_or(u64::MAX),
    };
    let mut all_isolated = true;
    for round in 1..=rounds {
        let started = std::time::Instant::now();
        match verify::verify(&config) {
            Ok(report) => {
                if args.every.is_some() {
                    println!("round {round} ({}s since the epoch)", unix_now());
                }
                print!("{}", report.table());
                if report.isolated() {
                    tracing::info!(round, canary = %report.canary_id, "verify-isolation: isolated");
                } else {
                    all_isolated = false;
                    let failed: Vec<String> = report
                        .checks
                        .iter()
                        .filter(|c| c.verdict != verify::Verdict::Blocked)
                        .map(|c| format!("{}: {} ({})", c.invariant, c.attempt, c.verdict))
                        .collect();
                    tracing::error!(round, canary = %report.canary_id, failed = ?failed, "verify-isolation: NOT isolated");
                }
            }
            Err(err) => {
                eprintln!("sandbox: verify-isolation round {round}: {err}");
                if args.every.is_none() {
                    return Ok(ExitCode::from(crate::exit::SANDBOX_ERROR));
                }
                all_isolated = false;
            }
        }
        if let Some(every) = args.every.filter(|_| round < rounds) {
            std::thread::sleep(every.saturating_sub(started.elapsed()));
        }
    }
    Ok(if all_isolated { ExitCode::SUCCESS } else { ExitCode::from(EXIT_NOT_ISOLATED) })
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: VerifyArgs,
    }

    #[test]
    fn verify_isolation_takes_the_production_network_and_corporate_profile() {
        let cli = Cli::try_parse_from([
            "verify-isolation",
            "--allow-net",
            "10.20.0.0/16",
            "--corporate-profile",
            "/etc/sandbox/corp.toml",
            "--profile",
            "dev",
        ])
        .unwrap();
        let config = config(&cli.args).unwrap();
        assert_eq!(config.holder.as_ref().map(|(_, args)| args.as_slice()), Some(&["holder".to_string()][..]));
        assert_eq!(config.net.allowed_networks, vec!["10.20.0.0/16".parse::<ipnet::IpNet>().unwrap()]);
        assert_eq!(config.corporate_profiles, vec![std::path::PathBuf::from("/etc/sandbox/corp.toml")]);
        assert_eq!(config.profiles, vec!["dev".to_string()]);
    }
}
