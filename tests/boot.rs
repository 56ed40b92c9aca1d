//! End to end: boot the real guest kernel with the default image and run
//! commands through the library API and the CLI. Needs /dev/kvm and the
//! artefacts of ./setup.sh; skips without them, or fails with
//! `SANDBOX_REQUIRE_VM=1` (./test.sh).

mod common;

use std::time::{Duration, Instant};

use sandbox::{Command as SandboxCommand, Image, Sandbox, Status};

#[test]
fn a_command_runs_with_its_arguments_environment_and_status() {
    common::require_vm!();
    let script = r#"
        uname -a
        echo "host=$(hostname) cwd=$(pwd) greeting=$GREETING args=$#:$1:$2"
        echo written > /etc/overlay-test && cat /etc/overlay-test
        grep -q ' / overlay ' /proc/mounts && echo "root=overlay"
        echo "pid1=$(cat /proc/1/comm)"
        echo "clock=$(date +%s)"
        echo "to stderr" >&2
        exit 3
    "#;
    let t = Instant::now();
    let run = Sandbox::builder(Image::Default)
        .memory_mib(128)
        .run(
            SandboxCommand::from_argv(["/bin/sh", "-c", script, "sh", "a b", "c"])
                .env("GREETING", "hello world")
                .cwd("/tmp")
                .timeout(Duration::from_secs(300)),
        )
        .unwrap();
    let out = String::from_utf8_lossy(&run.stdout);
    eprintln!(
        "boot to agent: {:?}, whole run: {:?} (wall {:?})\n--- output ---\n{out}",
        run.boot_time,
        run.total_time,
        t.elapsed()
    );
    assert_eq!(run.status, Status::Exited(3), "console:\n{}", String::from_utf8_lossy(&run.console));
    // The sandbox's id is the guest's hostname (set with its identity).
    assert!(out.starts_with(&format!("Linux {} ", run.id)), "{out}");
    assert!(out.contains(&format!("host={} cwd=/tmp greeting=hello world args=2:a b:c\n", run.id)), "{out}");
    assert!(out.contains("written\nroot=overlay\npid1=sandbox-init\n"), "{out}");
    assert_eq!(String::from_utf8_lossy(&run.stderr), "to stderr\n");
    assert!(run.session_db.is_file());
    // The guest's clock is the host's (set with its identity once it is up).
    let clock: u64 = out.lines().find_map(|l| l.strip_prefix("clock=")).and_then(|c| c.parse().ok()).unwrap();
    let host = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!(host.abs_diff(clock) <= run.total_time.as_secs() + 5, "guest clock {clock}, host {host}");
}

#[test]
fn a_missing_command_is_127_and_a_timeout_kills_the_command() {
    common::require_vm!();
    let instance = Sandbox::builder(Image::Default).memory_mib(128).start().unwrap();
    let missing = instance.output(SandboxCommand::new("no-such-command")).unwrap();
    assert_eq!(missing.status, Status::Exited(127));
    let t = Instant::now();
    let slow = instance
        .output(
            SandboxCommand::new("/bin/sh").args(["-c", "echo started; sleep 1000"]).timeout(Duration::from_secs(10)),
        )
        .unwrap();
    assert_eq!(slow.status, Status::TimedOut);
    assert_eq!(String::from_utf8_lossy(&slow.stdout), "started\n");
    assert!(t.elapsed() < Duration::from_secs(120), "stopping took {:?}", t.elapsed());
    // The sandbox lives on after its command was killed.
    let after = instance.output(SandboxCommand::new("true")).unwrap();
    assert_eq!(after.status, Status::Exited(0));
    instance.shutdown().unwrap();
}
