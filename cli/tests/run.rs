//! End to end: `sandbox run` as a shell script uses it. Needs /dev/kvm and
//! the artefacts of ./setup.sh (see tests/common).

mod common;

use std::time::{Duration, Instant};

#[test]
fn a_command_that_outlives_its_timeout_stops_the_sandbox_with_status_124() {
    common::require_vm!();
    // The CLI: a guest that outlives --timeout is killed, status 124.
    let t = Instant::now();
    let out = common::sandbox(&[
        "run",
        "--memory",
        "128",
        "--timeout",
        "40",
        "default",
        "--",
        "/bin/sh",
        "-c",
        "echo started; sleep 1000",
    ]);
    let elapsed = t.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(124), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("started"), "{stdout}");
    assert!(stderr.contains("did not finish within 40s"), "{stderr}");
    assert!(elapsed < Duration::from_secs(120), "stopping took {elapsed:?}");
}
