//! End to end: an application spawns sandboxes, each in a confined holder
//! process of its own (`sandbox-holder`), from a multi-threaded async
//! program, and drives them through the same `Sandbox` handle; a holder
//! runs a command and stops with it, stops at its timeout, and reports why
//! it could not start. Needs root, /dev/kvm and ./setup.sh's artefacts;
//! skips without the last two, or fails with `SANDBOX_REQUIRE_VM=1`.
// Its helper functions (outside #[test] fns) unwrap too.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use sandbox::{Command, Error, Image, Sandbox, SandboxBuilder, Status};

/// A sandbox that boots.
fn cold(data: &Path) -> SandboxBuilder {
    Sandbox::builder(Image::Default)
        .memory_mib(128)
        .data_dir(data)
        .holder_program(env!("CARGO_BIN_EXE_sandbox-holder"), std::iter::empty::<&str>())
}

/// A sandbox restored from the warm snapshot (a boot is not what these tests are about).
fn builder(data: &Path) -> SandboxBuilder {
    cold(data).warm()
}

/// The jailed holder: the only child of the process `state.json` names.
fn holder_pid(sandbox: &Sandbox) -> u32 {
    let outer = sandbox.state().pid;
    let children = std::fs::read_to_string(format!("/proc/{outer}/task/{outer}/children")).unwrap();
    let pids: Vec<u32> = children.split_whitespace().map(|p| p.parse().unwrap()).collect();
    assert_eq!(pids.len(), 1, "process {outer} should have one child, the holder: {children}");
    pids[0]
}

fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find_map(|l| l.strip_prefix(field).and_then(|r| r.strip_prefix(':')));
    line.unwrap_or_else(|| panic!("no {field} in {status}")).trim().to_string()
}

fn wait_until_stopped(sandbox: &Sandbox, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while sandbox.is_running() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_spawns_a_confined_holder_and_drives_it() {
    common::require_vm!();
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_path_buf();
    // This process has many threads; the holder is a process of its own.
    let sandbox = tokio::task::spawn_blocking(move || builder(&dir).profile("dev").spawn()).await.unwrap().unwrap();
    assert!(sandbox.is_running());
    assert!(sandbox.dir().starts_with(data.path()));

    // The holder is confined: its own uid, no privileges, seccomp.
    let pid = holder_pid(&sandbox);
    let uid: u32 = status_field(pid, "Uid").split_whitespace().next().unwrap().parse().unwrap();
    assert!(uid >= 1_000_000, "holder uid {uid}");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(status_field(pid, "Seccomp"), "2");
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_ne!(
        std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap(),
        std::fs::read_link("/proc/self/ns/mnt").unwrap()
    );

    // The same handle as for any sandbox: commands, events, stop.
    let out = sandbox.output(Command::new("echo").arg("spawned")).unwrap();
    assert_eq!((out.status, common::text(&out.stdout)), (Status::Exited(0), "spawned\n".into()));
    sandbox.stop(Duration::from_secs(60)).unwrap();
    assert!(!sandbox.is_running());
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "the holder outlived stop");
    assert!(sandbox.session_db().exists());
    let log = std::fs::read_to_string(sandbox.dir().join("sandbox.log")).unwrap();
    assert!(log.contains("sandbox running") && log.contains("stopping: signal 15"), "{log}");
}

#[test]
fn a_holder_runs_its_command_and_stops_with_it_or_at_its_timeout() {
    common::require_vm!();
    let data = tempfile::tempdir().unwrap();
    let ran = builder(data.path())
        .spawn_running(
            Command::new("sh").args(["-c", "echo \"out $GREETING\"; echo err >&2; sleep 2"]).env("GREETING", "hi"),
        )
        .unwrap();
    assert!(wait_until_stopped(&ran, Duration::from_secs(120)), "the sandbox outlived its command");
    let output = std::fs::read_to_string(ran.dir().join("output.log")).unwrap();
    assert!(output.contains("out hi\n") && output.contains("err\n"), "{output}");
    let log = std::fs::read_to_string(ran.dir().join("sandbox.log")).unwrap();
    assert!(log.contains("the command exited with status 0"), "{log}");

    let idle = builder(data.path()).timeout(Duration::from_secs(2)).spawn().unwrap();
    assert!(wait_until_stopped(&idle, Duration::from_secs(120)), "the sandbox outlived its timeout");
    let log = std::fs::read_to_string(idle.dir().join("sandbox.log")).unwrap();
    assert!(log.contains("stopping: the timeout passed"), "{log}");
}

#[test]
fn a_holder_that_cannot_start_says_why_and_what_cannot_cross_is_refused() {
    common::require_vm!();
    let data = tempfile::tempdir().unwrap();
    // The holder fails to boot: its reason reaches the caller.
    let err = cold(data.path()).kernel("/nonexistent/vmlinux").spawn().unwrap_err();
    assert!(matches!(err, Error::Holder(_)), "{err}");
    assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");

    // No holder program.
    let err = builder(data.path()).holder_program("/nonexistent/holder", ["x"]).spawn().unwrap_err().to_string();
    assert!(err.contains("start the holder program /nonexistent/holder"), "{err}");

    // A Policy object, a console sink or a command's streams stay in this process.
    let policy = sandbox::policy::Policy::new(sandbox::policy::Engine::builtin("dev").unwrap());
    let err = builder(data.path()).policy(policy).spawn().unwrap_err().to_string();
    assert!(err.contains("not a Policy object"), "{err}");
    let err = builder(data.path()).console(std::io::sink()).spawn().unwrap_err().to_string();
    assert!(err.contains("console"), "{err}");
    let err = builder(data.path()).spawn_running(Command::new("true").stdout_to(std::io::sink())).unwrap_err();
    assert!(err.to_string().contains("output.log"), "{err}");
    // A bad profile is refused before any holder starts.
    let err = builder(data.path()).profile("/nonexistent/profile.toml").spawn().unwrap_err().to_string();
    assert!(err.contains("/nonexistent/profile.toml"), "{err}");
    assert_eq!(Sandbox::list_in(data.path()).unwrap().len(), 1, "only the sandbox that failed to boot is listed");
}
