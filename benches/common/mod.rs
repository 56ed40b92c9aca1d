//! What the benchmarks share: counts from the environment, figures in
//! milliseconds, median/min/max, and the host's load average (printed
//! with every figure, since they swing with it).
// Each benchmark uses part of this.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

/// The count in environment variable `name`, else `default` (also for 0 or garbage).
pub fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0).unwrap_or(default)
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Median, min and max of `times` (sorted here; not empty).
pub fn stats(times: &mut [Duration]) -> (Duration, Duration, Duration) {
    times.sort();
    (times[times.len() / 2], times[0], times[times.len() - 1])
}

/// The host's 1, 5 and 15 minute load averages.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// `$SANDBOX_HOLDER`, else the release build in the target directory.
pub fn holder_program() -> PathBuf {
    if let Some(path) = std::env::var_os("SANDBOX_HOLDER") {
        return PathBuf::from(path);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    let path = target.join("release").join("sandbox-holder");
    assert!(path.is_file(), "{} is missing: cargo build --release --bin sandbox-holder", path.display());
    path
}

/// Why this machine cannot run a benchmark that boots the default image,
/// if it cannot.
pub fn missing() -> Option<String> {
    let mut why = Vec::new();
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        why.push(format!("needs read-write access to /dev/kvm ({e})"));
    }
    why.extend(sandbox::paths::kernel().err().map(|e| e.to_string()));
    why.extend(sandbox::paths::default_image().err().map(|e| e.to_string()));
    (!why.is_empty()).then(|| why.join("; "))
}
