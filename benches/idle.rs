//! Idle cost: N sandboxes doing nothing, and what they cost the host.
//!
//!   cargo build --release --bin sandbox-holder && cargo bench --bench idle
//!
//! Starts `IDLE_BENCH_COUNT` (default 30) default-image sandboxes (256 MiB,
//! 1 vCPU) in confined holders, from the warm snapshot (made first if there
//! is none), lets them settle 20 s, then measures over `IDLE_BENCH_S`
//! seconds (default 60) the CPU time of the host processes holding each
//! (`Sandbox::host_usage`: the holder and the VMM under it). Prints the CPU
//! per sandbox as a share of one core (goal: at most 0.2 %), all of them
//! together as a share of the machine, and their proportional memory.
//! The load average is printed at the start and the end: compare figures
//! of one run.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::time::{Duration, Instant};

use common::{env_count, holder_program, load_average, missing};
use sandbox::{Image, Sandbox};

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if let Some(why) = missing() {
        eprintln!("skipped: idle benchmark: {why}");
        return;
    }
    let count = env_count("IDLE_BENCH_COUNT", 30);
    let window = Duration::from_secs(env_count("IDLE_BENCH_S", 60) as u64);
    let data = tempfile::tempdir().unwrap();
    let holder = holder_program();
    println!("{count} idle default sandboxes, {:?} window; load average at start {}", window, load_average());

    let started = Instant::now();
    let sandboxes: Vec<Sandbox> = (0..count)
        .map(|_| {
            Sandbox::builder(Image::Default)
                .memory_mib(256)
                .data_dir(data.path())
                .holder_program(&holder, std::iter::empty::<&str>())
                .warm()
                .spawn()
                .unwrap()
        })
        .collect();
    println!("{count} started in {:.1} s", started.elapsed().as_secs_f64());
    std::thread::sleep(Duration::from_secs(20));

    let before: Vec<_> = sandboxes.iter().map(|s| s.host_usage().unwrap()).collect();
    std::thread::sleep(window);
    let after: Vec<_> = sandboxes.iter().map(|s| s.host_usage().unwrap()).collect();
    let mut shares: Vec<f64> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| 100.0 * a.cpu.saturating_sub(b.cpu).as_secs_f64() / window.as_secs_f64())
        .collect();
    shares.sort_by(f64::total_cmp);
    let total: f64 = shares.iter().sum();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
    let pss: u64 = after.iter().map(|u| u.memory_bytes).sum();
    println!(
        "CPU per idle sandbox, % of a core: median {:.2}, min {:.2}, max {:.2} (goal <= 0.2)",
        shares[shares.len() / 2],
        shares[0],
        shares[shares.len() - 1]
    );
    println!("all {count} together: {total:.1} % of a core, {:.1} % of this {cores}-core machine", total / cores);
    println!(
        "proportional memory (PSS) per sandbox: {:.1} MiB ({:.0} MiB for all)",
        pss as f64 / count as f64 / 1048576.0,
        pss as f64 / 1048576.0
    );
    println!("load average at end {}", load_average());
    for sandbox in &sandboxes {
        let _ = sandbox.stop(Duration::from_secs(60));
    }
}
