//! What confining a sandbox's process costs: cold boot and `exec` latency
//! of the CLI with the jail (the default) and with `--no-jail`, alternated
//! in one run on one host.
//!
//!   cargo build --release -p cli && cargo bench --bench jail
//!
//! Each round starts a `run -d` sandbox in each mode (boot: until the CLI
//! prints its id, which it does once the agent answers), then times
//! `sandbox exec <id> -- /bin/true` M times in each, then stops both.
//! `JAIL_BENCH_ROUNDS` (default 3) and `JAIL_BENCH_M` (default 10) set the
//! counts. The figures are the medians and their ratio, jailed / unjailed.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use common::{env_count, load_average};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn cli_binary() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    target.join("release").join("sandbox")
}

fn median(times: &mut [Duration]) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn sandbox(cli: &Path, data: &Path, args: &[&str]) -> (Duration, String) {
    let started = Instant::now();
    let out = Command::new(cli).args(args).env("SANDBOX_DATA", data).output().unwrap();
    let took = started.elapsed();
    assert!(out.status.success(), "sandbox {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    (took, String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[derive(Default)]
struct Mode {
    boots: Vec<Duration>,
    execs: Vec<Duration>,
}

fn main() {
    let rounds = env_count("JAIL_BENCH_ROUNDS", 3);
    let m = env_count("JAIL_BENCH_M", 10);
    let cli = cli_binary();
    assert!(cli.is_file(), "{} is missing: cargo build --release -p cli", cli.display());
    let data = tempfile::tempdir().unwrap();
    println!("{rounds} rounds, {m} execs per sandbox; load average {}", load_average());

    let mut modes = [("jail", Mode::default()), ("no-jail", Mode::default())];
    for round in 0..rounds {
        let mut ids = Vec::new();
        for (name, mode) in &mut modes {
            let mut args = vec!["run", "-d", "--memory", "128"];
            if *name == "no-jail" {
                args.push("--no-jail");
            }
            args.push("default");
            let (boot, id) = sandbox(&cli, data.path(), &args);
            mode.boots.push(boot);
            ids.push(id);
        }
        for _ in 0..m {
            for ((_, mode), id) in modes.iter_mut().zip(&ids) {
                let (took, _) = sandbox(&cli, data.path(), &["exec", id, "--", "/bin/true"]);
                mode.execs.push(took);
            }
        }
        for id in &ids {
            sandbox(&cli, data.path(), &["rm", "--force", id]);
        }
        println!("round {} done; load average {}", round + 1, load_average());
    }

    let [(_, jail), (_, free)] = &mut modes;
    let (boot_j, boot_f) = (median(&mut jail.boots), median(&mut free.boots));
    let (exec_j, exec_f) = (median(&mut jail.execs), median(&mut free.execs));
    println!(
        "cold boot (run -d until ready): jail {:.2} s, no-jail {:.2} s, ratio {:.3}",
        boot_j.as_secs_f64(),
        boot_f.as_secs_f64(),
        boot_j.as_secs_f64() / boot_f.as_secs_f64()
    );
    println!(
        "exec /bin/true (CLI):           jail {:.0} ms, no-jail {:.0} ms, ratio {:.3}",
        exec_j.as_secs_f64() * 1e3,
        exec_f.as_secs_f64() * 1e3,
        exec_j.as_secs_f64() / exec_f.as_secs_f64()
    );
}
