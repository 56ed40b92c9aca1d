//! A guest flooding the host with vsock connection attempts: the VMM's
//! memory must stay bounded and another sandbox must not slow down.
//!
//!   cargo build --release -p cli && cargo bench --bench vsock_flood
//!
//! Sandbox A runs in its own holder process (`sandbox run -d`, with a
//! private `SANDBOX_DATA`), so its VMM's memory can be read from
//! `/proc/<pid>/status`; sandbox B runs in this process. In A,
//! `vsock-stream flood` makes N connection attempts one after another
//! (`VSOCK_FLOOD_COUNT`, default 10,000): half to host port 6200, which this
//! bench serves (accept and close), half to port 6201, which nobody serves
//! (refused). Before and while A floods, B's `exec /bin/true` latency is
//! measured; A's holder RSS is sampled before, during and after. Printed:
//! the flood's counts and duration, A's RSS before/peak/after, B's median
//! latency idle and during the flood and their ratio, and the load average.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use common::{env_count, ms};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sandbox::{Command, Image, Sandbox, Status};

const SERVED_PORT: u32 = 6200;
const UNSERVED_PORT: u32 = 6201;
const IDLE_RUNS: usize = 10;

fn median(times: &mut [Duration]) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn cli_path() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    target.join("release").join("sandbox")
}

/// Runs the CLI with the private data directory; its stdout, or a panic.
fn cli(path: &Path, data: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(path).env("SANDBOX_DATA", data).args(args).output().unwrap();
    assert!(out.status.success(), "sandbox {args:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn main() {
    let count = env_count("VSOCK_FLOOD_COUNT", 10_000);
    let cli_bin = cli_path();
    assert!(cli_bin.is_file(), "{} is missing: cargo build --release -p cli", cli_bin.display());
    let data = tempfile::tempdir().unwrap();

    // A: its own holder process.
    let id_a = cli(&cli_bin, data.path(), &["run", "-d", "--memory", "128", "default"]).trim().to_string();
    let dir_a = data.path().join("sandboxes").join(&id_a);
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(dir_a.join("state.json")).unwrap()).unwrap();
    let pid_a = u32::try_from(state["pid"].as_u64().unwrap()).unwrap();
    // B: in this process.
    let b = Sandbox::builder(Image::Default).memory_mib(128).data_dir(data.path()).start().unwrap();
    println!("sandbox A {id_a} (holder pid {pid_a}), sandbox B {} booted in {:?}", b.id(), b.boot_time());

    let listener = UnixListener::bind(dir_a.join(format!("vsock.sock_{SERVED_PORT}"))).unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    {
        let accepted = Arc::clone(&accepted);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                drop(stream.unwrap());
                accepted.fetch_add(1, Ordering::Relaxed);
            }
        });
    }

    let exec_b = || {
        let t = Instant::now();
        let out = b.output(Command::new("/bin/true")).unwrap();
        assert_eq!(out.status, Status::Exited(0));
        t.elapsed()
    };
    // Warm both up: the first exec pages in the agent's paths.
    cli(&cli_bin, data.path(), &["exec", &id_a, "--", "/bin/true"]);
    exec_b();
    let mut idle: Vec<Duration> = (0..IDLE_RUNS).map(|_| exec_b()).collect();
    let idle_median = median(&mut idle);

    let rss_before = status_kib(pid_a, "VmRSS");
    let hwm_before = status_kib(pid_a, "VmHWM");
    let done = Arc::new(AtomicBool::new(false));
    let flood = {
        let done = Arc::clone(&done);
        let (cli_bin, data, id_a) = (cli_bin.clone(), data.path().to_path_buf(), id_a.clone());
        std::thread::spawn(move || {
            let t = Instant::now();
            let (served, unserved, n) = (SERVED_PORT.to_string(), UNSERVED_PORT.to_string(), count.to_string());
            let args = ["exec", &id_a, "--", "vsock-stream", "flood", &served, "--unserved", &unserved, "--count", &n];
            let out = cli(&cli_bin, &data, &args);
            done.store(true, Ordering::SeqCst);
            (out, t.elapsed())
        })
    };
    let sampler = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let mut peak = 0;
            while !done.load(Ordering::SeqCst) {
                peak = peak.max(status_kib(pid_a, "VmRSS"));
                std::thread::sleep(Duration::from_millis(100));
            }
            peak
        })
    };
    let mut during = Vec::new();
    while !done.load(Ordering::SeqCst) {
        let took = exec_b();
        // Only runs that ended while A was still flooding.
        if !done.load(Ordering::SeqCst) {
            during.push(took);
        }
    }
    let (flood_out, flood_took) = flood.join().unwrap();
    let rss_peak = sampler.join().unwrap();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap();
    // Let the guest's lingering sockets close, then look again.
    std::thread::sleep(Duration::from_secs(5));
    let rss_after = status_kib(pid_a, "VmRSS");
    let hwm_after = status_kib(pid_a, "VmHWM");
    // A still answers (the host's share of the connections was kept).
    let t = Instant::now();
    cli(&cli_bin, data.path(), &["exec", &id_a, "--", "/bin/true"]);
    let a_after = t.elapsed();

    println!(
        "flood in A: {} (host saw {} accepted), {:.1} s",
        flood_out.trim(),
        accepted.load(Ordering::Relaxed),
        flood_took.as_secs_f64()
    );
    println!(
        "A holder RSS: before {:.1} MiB, peak {:.1} MiB, after {:.1} MiB (growth {:+.1} MiB); VmHWM {:.1} -> {:.1} MiB",
        mib(rss_before),
        mib(rss_peak.max(rss_before)),
        mib(rss_after),
        mib(rss_after) - mib(rss_before),
        mib(hwm_before),
        mib(hwm_after)
    );
    if during.is_empty() {
        println!("B exec /bin/true: idle median {:.1} ms; no run ended during the flood", ms(idle_median));
    } else {
        let n = during.len();
        let during_median = median(&mut during);
        println!(
            "B exec /bin/true: idle median {:.1} ms ({IDLE_RUNS} runs), during the flood median {:.1} ms ({n} runs, max {:.1} ms), ratio {:.2}",
            ms(idle_median),
            ms(during_median),
            ms(during[n - 1]),
            during_median.as_secs_f64() / idle_median.as_secs_f64()
        );
    }
    println!("A exec /bin/true after the flood (CLI): {:.1} ms", ms(a_after));
    println!("load average at the end of the flood: {}", load.trim());

    b.shutdown().unwrap();
    cli(&cli_bin, data.path(), &["rm", "-f", &id_a]);
}
