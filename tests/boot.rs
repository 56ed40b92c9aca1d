//! End to end: boot the real guest kernel with the default image and run
//! commands through the library API and the CLI. Needs /dev/kvm and the
//! artefacts of ./setup.sh; skips without them, or fails with
//! `SANDBOX_REQUIRE_VM=1` (./test.sh).

mod common;

use std::time::{Duration, Instant};

use sandbox::{Image, Sandbox, Status};

#[test]
fn a_command_runs_with_its_arguments_environment_and_status() {
    common::require_vm!();
    let script = r#"
        uname -a
        echo "host=$(hostname) cwd=$(pwd) greeting=$GREETING args=$#:$1:$2"
        echo written > /etc/overlay-test && cat /etc/overlay-test
        grep -q ' / overlay ' /proc/mounts && echo "root=overlay"
        echo "pid1=$(cat /proc/1/comm)"
        echo "to stderr" >&2
        exit 3
    "#;
    let t = Instant::now();
    let run = Sandbox::builder(Image::Default)
        .memory_mib(128)
        .env("GREETING", "hello world")
        .cwd("/tmp")
        .timeout(Duration::from_secs(300))
        .run(["/bin/sh", "-c", script, "sh", "a b", "c"])
        .unwrap();
    let out = String::from_utf8_lossy(&run.stdout);
    eprintln!(
        "boot to agent: {:?}, whole run: {:?} (wall {:?})\n--- output ---\n{out}",
        run.boot_time,
        run.total_time,
        t.elapsed()
    );
    assert_eq!(run.status, Status::Exited(3), "console:\n{}", String::from_utf8_lossy(&run.console));
    assert!(out.starts_with("Linux sandbox "), "{out}");
    assert!(out.contains("host=sandbox cwd=/tmp greeting=hello world args=2:a b:c\n"), "{out}");
    assert!(out.contains("written\nroot=overlay\npid1=sandbox-init\n"), "{out}");
    assert_eq!(String::from_utf8_lossy(&run.stderr), "to stderr\n");
    assert!(run.session_db.is_file());
}

#[test]
fn a_missing_command_is_127_and_a_timeout_stops_the_vm() {
    common::require_vm!();
    let run = Sandbox::builder(Image::Default)
        .memory_mib(128)
        .timeout(Duration::from_secs(300))
        .run(["no-such-command"])
        .unwrap();
    assert_eq!(run.status, Status::Exited(127));

    // The CLI: a guest that outlives --timeout is killed, status 124.
    let t = Instant::now();
    let out = common::sandbox(&["run", "--memory", "128", "--timeout", "40", "default", "--", "/bin/sh", "-c", "echo started; sleep 1000"]);
    let elapsed = t.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(124), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("started"), "{stdout}");
    assert!(stderr.contains("did not finish within 40s"), "{stderr}");
    assert!(elapsed < Duration::from_secs(120), "stopping took {elapsed:?}");
}
