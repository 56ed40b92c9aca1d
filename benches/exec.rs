//! Latency of running `/bin/true` in a sandbox, against what the guest's
//! own fork+exec of it costs, all measured in one run in one sandbox.
//!
//!   cargo build --release -p cli && cargo bench --bench exec
//!
//! (a) the guest alone: a shell loop in the guest runs `/bin/true` N times,
//!     timed with the guest's clock, less the same loop without the command;
//! (b) the library: `output(Command::new("/bin/true"))`, M times;
//! (c) the CLI: `target/release/sandbox exec <id> -- /bin/true`, M times,
//!     the CLI's own start included.
//!
//! Ratios (b)/(a) and (c)/(a) are the figures. `EXEC_BENCH_N` (default 20)
//! and `EXEC_BENCH_M` (default 15) set the counts.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use common::{env_count, load_average, ms, stats};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use sandbox::{Command, Image, Sandbox, Status};

fn cli_binary() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    target.join("release").join("sandbox")
}

fn main() {
    let n = env_count("EXEC_BENCH_N", 20);
    let m = env_count("EXEC_BENCH_M", 15);
    let cli = cli_binary();
    assert!(cli.is_file(), "{} is missing: cargo build --release -p cli", cli.display());
    let data = tempfile::tempdir().unwrap();

    let instance = Sandbox::builder(Image::Default).memory_mib(128).data_dir(data.path()).start().unwrap();
    println!(
        "sandbox {} booted in {:.1} s; load average {}",
        instance.id(),
        instance.boot_time().as_secs_f64(),
        load_average()
    );

    // Warm up: the first exec pages in the agent's paths and /bin/true.
    for _ in 0..2 {
        assert_eq!(instance.output(Command::new("/bin/true")).unwrap().status, Status::Exited(0));
    }

    // (a) The guest's own fork+exec+wait of /bin/true, from a shell loop
    // timed with /proc/uptime (read by the shell itself: no fork).
    let script = format!(
        "read a _ </proc/uptime; i=0; while [ $i -lt {n} ]; do /bin/true; i=$((i+1)); done; \
         read b _ </proc/uptime; i=0; while [ $i -lt {n} ]; do i=$((i+1)); done; \
         read c _ </proc/uptime; echo $a $b $c"
    );
    let out = instance.output(Command::new("/bin/sh").args(["-c", &script])).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let t: Vec<f64> = text.split_whitespace().map(|v| v.parse().unwrap()).collect();
    assert_eq!(t.len(), 3, "{text}");
    let (with, without) = (t[1] - t[0], t[2] - t[1]);
    let guest = Duration::from_secs_f64(((with - without) / n as f64).max(1e-6));
    println!(
        "(a) guest fork+exec+wait of /bin/true: {:.1} ms each ({n} runs: loop {:.2} s, empty loop {:.2} s)",
        ms(guest),
        with,
        without
    );

    // (b) The library.
    let mut lib: Vec<Duration> = (0..m)
        .map(|_| {
            let t = Instant::now();
            let out = instance.output(Command::new("/bin/true")).unwrap();
            assert_eq!(out.status, Status::Exited(0));
            t.elapsed()
        })
        .collect();
    let (lib_med, lib_min, lib_max) = stats(&mut lib);
    println!(
        "(b) library output(/bin/true): median {:.1} ms, min {:.1} ms, max {:.1} ms over {m} runs",
        ms(lib_med),
        ms(lib_min),
        ms(lib_max)
    );

    // (c) The CLI, a new process each time.
    let mut cmd_line: Vec<Duration> = (0..m)
        .map(|_| {
            let t = Instant::now();
            let status = std::process::Command::new(&cli)
                .args(["exec", instance.id(), "--", "/bin/true"])
                .env("SANDBOX_DATA", data.path())
                .status()
                .unwrap();
            assert!(status.success(), "{status}");
            t.elapsed()
        })
        .collect();
    let (cli_med, cli_min, cli_max) = stats(&mut cmd_line);
    println!(
        "(c) CLI `sandbox exec {} -- /bin/true`: median {:.1} ms, min {:.1} ms, max {:.1} ms over {m} runs",
        instance.id(),
        ms(cli_med),
        ms(cli_min),
        ms(cli_max)
    );

    let ratio = |d: Duration| d.as_secs_f64() / guest.as_secs_f64();
    println!("ratio (b)/(a) = {:.2}, (c)/(a) = {:.2} (goal <= 1.5)", ratio(lib_med), ratio(cli_med));
    println!("load average after: {}", load_average());
    instance.shutdown().unwrap();
}
