//! End to end: Debian's containerd, started by the test with its own root,
//! state directory and socket, runs tasks through the built
//! `containerd-shim-sandbox-v2` (`ctr run --runtime io.containerd.sandbox.v2`)
//! on a busybox image the test builds, pushes to a registry of its own on
//! 127.0.0.1 and pulls with `ctr`: output and exit status, a missing command
//! (start fails) and a bad profile annotation (create fails), `ctr task
//! exec` (and the spec's RLIMIT_NOFILE in the guest), a blocked TLS
//! connection logged in the task's `session.db`, `ctr task kill`, and
//! nothing left running afterwards.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{busybox_image, holder_program, missing, rows_of, text, vm, Containerd, Setup, RUNTIME};
use rootfs::fixtures::Registry;
use sandbox::{LogRow, Sandbox};

#[test]
fn ctr_runs_tasks_in_sandboxes() {
    let shim = PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-sandbox-v2"));
    if !vm::vm_available(missing(&shim)) {
        return;
    }
    let holder = holder_program(&shim).unwrap();
    let mut containerd = Containerd::start(&shim, &holder, Setup::default());
    // The image, pushed to a registry of the test's own on 127.0.0.1 and
    // pulled from there by containerd.
    let registry = Registry::start().unwrap();
    let layout = containerd.dir.path().join("layout");
    busybox_image().write_oci_layout(&layout, "latest").unwrap();
    registry.push(&layout, "latest", "test", "latest").unwrap();
    let image = format!("{}/test:latest", registry.addr());
    containerd.ctr_ok(&["image", "pull", "--plain-http", &image]);
    assert!(containerd.ctr_ok(&["image", "ls", "-q"]).contains(&image));
    let image = image.as_str();

    // A task's output and exit status, as with runc.
    let started = Instant::now();
    let out = containerd.ctr(&["run", "--runtime", RUNTIME, "--rm", image, "t1", "sh", "-c", "echo hi; exit 3"]);
    eprintln!("t1 (first task: root image, warm snapshot, run): {:?}", started.elapsed());
    assert_eq!(text(&out.stdout).trim(), "hi", "stderr: {}\n{}", text(&out.stderr), containerd.log());
    assert_eq!(out.status.code(), Some(3), "stderr: {}\n{}", text(&out.stderr), containerd.log());

    // A command the image does not have: `start` fails saying so, as with runc.
    let out = containerd.ctr(&["run", "--runtime", RUNTIME, "--rm", image, "t3", "/no/such/program"]);
    let said = text(&out.stderr);
    assert!(!out.status.success(), "a missing program started: {said}");
    assert!(said.contains("could not be started") && said.contains("/no/such/program"), "{said}\n{}", containerd.log());
    let _ = containerd.ctr(&["task", "rm", "-f", "t3"]);
    let _ = containerd.ctr(&["container", "rm", "t3"]);
    // A profile that does not exist: create fails, naming it and the ones there are.
    let annotation = "sandbox.dev/profile=no-such-profile";
    let out = containerd.ctr(&["run", "--runtime", RUNTIME, "--rm", "--annotation", annotation, image, "t4", "true"]);
    let said = text(&out.stderr);
    assert!(!out.status.success(), "a bad profile was accepted: {said}");
    assert!(said.contains("no-such-profile") && said.contains("deny-all"), "{said}");
    let _ = containerd.ctr(&["container", "rm", "t4"]);

    // A long-running task, an exec in it, a blocked request, a kill.
    let started = Instant::now();
    containerd.ctr_ok(&["run", "-d", "--runtime", RUNTIME, image, "t2", "sleep", "300"]);
    eprintln!("t2 started in {:?}", started.elapsed());
    let started = Instant::now();
    let out = containerd.ctr_ok(&["task", "exec", "--exec-id", "e1", "t2", "echo", "from-exec"]);
    eprintln!("exec in {:?}", started.elapsed());
    assert_eq!(out.trim(), "from-exec");
    // The spec's RLIMIT_NOFILE (containerd's default spec sets 1024; the
    // guest's own hard limit is 4096).
    let nofile = containerd.bundle_nofile("t2");
    eprintln!("t2's bundle RLIMIT_NOFILE: {nofile:?}");
    let out = containerd.ctr_ok(&["task", "exec", "--exec-id", "e3", "t2", "sh", "-c", "ulimit -Hn"]);
    assert_eq!(out.trim(), nofile.unwrap_or(4096).to_string());
    let out = containerd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e2",
        "t2",
        "sh",
        "-c",
        // A TLS connection to an address of TEST-NET-1 (RFC 5737), never
        // routed: it goes no further than the host's handler. (Not wget:
        // Debian's busybox 1.35 wget segfaults with -T, on the host too,
        // and without a timeout a hung request would hang the test.)
        "printf '\\026\\003\\001\\000\\001\\001' | nc -w 20 192.0.2.1 443 2>&1; echo rc=$?",
    ]);
    let said = text(&out.stdout);
    eprintln!("in t2: {said}");
    assert!(said.contains("rc="), "the exec did not run: {said}");
    let sandbox = containerd.sandbox_of("t2");
    let blocked = rows_of(&sandbox, mentions_example);
    assert!(!blocked.is_empty(), "no row for 192.0.2.1 in {}", sandbox.session_db().display());
    for row in &blocked {
        assert!(row.to_text().contains(" denied "), "192.0.2.1 was not denied: {}", row.to_text());
    }

    containerd.ctr_ok(&["task", "kill", "-s", "SIGKILL", "t2"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let tasks = containerd.ctr_ok(&["task", "ls"]);
        if tasks.lines().any(|l| l.starts_with("t2 ") && l.contains("STOPPED")) {
            break;
        }
        assert!(Instant::now() < deadline, "t2 did not stop after SIGKILL: {tasks}");
        std::thread::sleep(Duration::from_millis(500));
    }
    containerd.ctr_ok(&["task", "rm", "t2"]);
    containerd.ctr_ok(&["container", "rm", "t2"]);
    assert!(!sandbox.is_running(), "t2's sandbox still runs");

    // Nothing left: every sandbox stopped, the shims gone with their tasks.
    containerd.stop();
    for sandbox in Sandbox::list_in(&containerd.data).unwrap() {
        assert!(!sandbox.is_running(), "sandbox {} still runs", sandbox.id());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !containerd.own_processes().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(containerd.own_processes(), Vec::<(i32, String)>::new(), "processes left running");
}

fn mentions_example(row: &LogRow) -> bool {
    row.to_text().contains("192.0.2.1")
}
