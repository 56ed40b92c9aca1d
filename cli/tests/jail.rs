//! End to end: every sandbox's process is confined, proved from the inside
//! on the real guest kernel. A detached sandbox's holder runs as a uid of
//! its own with no capabilities, `no_new_privs` and a seccomp filter on
//! every thread, in its own namespaces and file system; another sandbox's
//! uid cannot read its files; a forbidden system call in a handler thread
//! stops the sandbox and names the call; a guest that fills its memory
//! stays within its holder's memory limit, and a holder that grows past it
//! is stopped alone; a guest's connection flood does not multiply the
//! holder's threads; `--disk` bounds the guest's writable root. Needs root, /dev/kvm and ./setup.sh's
//! artefacts; skips without the last two, or fails with
//! `SANDBOX_REQUIRE_VM=1` (./test.sh).
// Its helper functions (outside #[test] fns) unwrap too.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{sandbox, sandbox_with_env, text, RemoveOnDrop};

/// A detached sandbox: its id and directory, removed when dropped.
struct Detached {
    id: String,
    dir: PathBuf,
    _remove: RemoveOnDrop,
}

fn start_detached(extra: &[&str]) -> Detached {
    let mut args = vec!["run", "-d"];
    args.extend_from_slice(extra);
    args.push("default");
    let started = sandbox(&args);
    assert!(started.status.success(), "run -d failed: {}", text(&started.stderr));
    let id = text(&started.stdout).trim().to_string();
    let dir = sandbox::Sandbox::find(&id).unwrap().dir().to_path_buf();
    Detached { _remove: RemoveOnDrop(id.clone()), id, dir }
}

/// The process that holds the VM: the only child of the process that
/// state.json names (which waits for it, outside its namespaces).
fn holder_pid(dir: &Path) -> u32 {
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("state.json")).unwrap()).unwrap();
    let outer = state["pid"].as_u64().unwrap();
    let children = std::fs::read_to_string(format!("/proc/{outer}/task/{outer}/children")).unwrap();
    let pids: Vec<u32> = children.split_whitespace().map(|p| p.parse().unwrap()).collect();
    assert_eq!(pids.len(), 1, "process {outer} should have one child, the holder: {children}");
    pids[0]
}

/// The value of `field` in a `/proc/.../status` file.
fn status_field(status: &str, field: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field).and_then(|r| r.strip_prefix(':')))
        .unwrap_or_else(|| panic!("no {field} in {status}"))
        .trim()
        .to_string()
}

fn namespace(pid: &str, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

#[test]
fn a_holder_runs_as_its_own_uid_without_privileges_in_its_own_namespaces() {
    common::require_vm!();
    let a = start_detached(&[]);
    let b = start_detached(&[]);
    let pid = holder_pid(&a.dir);

    // Its credentials and filters, from the kernel's view of it.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uids: Vec<u32> = status_field(&status, "Uid").split_whitespace().map(|u| u.parse().unwrap()).collect();
    let uid = uids[0];
    assert!(uid >= 1_000_000, "holder uid {uid}");
    assert!(uids.iter().all(|&u| u == uid), "real, effective, saved and fs uids differ: {uids:?}");
    assert_eq!(status_field(&status, "NoNewPrivs"), "1");
    assert_eq!(status_field(&status, "Seccomp"), "2");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(&status, caps), "0000000000000000", "{caps}");
    }
    // Every thread is filtered; the VMM's and the handlers' with a filter of their own on top.
    let mut names = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let name = std::fs::read_to_string(task.join("comm")).unwrap().trim().to_string();
        let status = std::fs::read_to_string(task.join("status")).unwrap();
        assert_eq!(status_field(&status, "Seccomp"), "2", "thread {name}");
        let filters: u32 = status_field(&status, "Seccomp_filters").parse().unwrap();
        let own_filter = ["vcpu", "vm-", "net", "handlers-", "session-db-writ"];
        if own_filter.iter().any(|prefix| name.starts_with(prefix)) {
            assert!(filters >= 2, "thread {name} has {filters} filters");
        }
        names.push(name);
    }
    for expected in ["vcpu0", "net", "session-db-writ"] {
        assert!(names.iter().any(|n| n == expected), "no thread {expected}: {names:?}");
    }

    // Its namespaces: mount, PID, IPC and UTS of its own; the host's network (it dials upstreams).
    let me = std::process::id().to_string();
    for kind in ["mnt", "pid", "ipc", "uts"] {
        assert_ne!(namespace(&pid.to_string(), kind), namespace(&me, kind), "{kind} namespace");
    }
    assert_eq!(namespace(&pid.to_string(), "net"), namespace(&me, "net"));
    // Its file system: none of the host's files but what it needs.
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    assert!(!root.join("etc/passwd").exists(), "the holder sees the host's /etc/passwd");
    assert!(root.join("dev/kvm").exists());
    assert!(root.join(a.dir.strip_prefix("/").unwrap()).join("session.db").exists());
    assert!(!root.join(b.dir.strip_prefix("/").unwrap()).exists(), "the holder sees another sandbox's directory");

    // Its directory and session.db belong to its uid, and nobody else's.
    let meta = std::fs::metadata(&a.dir).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (uid, 0o700));
    assert_eq!(std::fs::metadata(a.dir.join("session.db")).unwrap().uid(), uid);
    let uid_b = std::fs::metadata(&b.dir).unwrap().uid();
    assert_ne!(uid_b, uid, "two sandboxes share a uid");
    // Sandbox A's uid cannot read B's session.db (nor list its directory).
    for target in [b.dir.join("session.db"), b.dir.clone()] {
        let out = std::process::Command::new("ls").arg(&target).uid(uid).gid(uid).output().unwrap();
        assert!(!out.status.success(), "uid {uid} listed {}", target.display());
        assert!(text(&out.stderr).contains("Permission denied"), "{}", text(&out.stderr));
    }

    // And it still works.
    let out = sandbox(&["exec", &a.id, "--", "echo", "confined"]);
    assert_eq!(text(&out.stdout), "confined\n", "{}", text(&out.stderr));
    let stopped = sandbox(&["stop", &a.id]);
    assert!(stopped.status.success(), "{}", text(&stopped.stderr));
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "the holder outlived stop");
    assert!(!Path::new(&format!("/sys/fs/cgroup/memory/sandbox/{}", a.id)).exists(), "its cgroup is left");
}

#[test]
fn a_forbidden_system_call_in_a_handler_thread_stops_the_sandbox_and_is_named() {
    common::require_vm!();
    for call in ["execve", "ptrace"] {
        let out = sandbox_with_env(
            &["run", "default", "--", "sleep", "60"],
            &[("SANDBOX_JAIL_SELF_TEST", call), ("SANDBOX_LOG", "warn")],
        );
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(148), "{call}: {stderr}");
        assert!(
            stderr.contains("forbidden system call") && stderr.contains(&format!("({call}) on thread net")),
            "{call}: {stderr}"
        );
    }
    // Files outside the jail are not there to open.
    let out = sandbox_with_env(
        &["run", "default", "--", "true"],
        &[("SANDBOX_JAIL_SELF_TEST", "open"), ("SANDBOX_LOG", "warn")],
    );
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("open /etc/shadow: No such file or directory"), "{stderr}");
}

#[test]
fn the_memory_limit_holds_a_full_guest_and_stops_only_a_holder_that_passes_it() {
    common::require_vm!();
    // A guest touching all the memory it can get: its holder stays under
    // the limit (guest memory plus the holder's allowance) and keeps running.
    let full = start_detached(&["--memory", "64"]);
    let fill =
        "dd if=/dev/zero of=/dev/null bs=$(free -m | awk '/Mem:/ {print $7 - 2}')M count=1 2>/dev/null && echo filled";
    let out = sandbox(&["exec", &full.id, "--", "sh", "-c", fill]);
    assert_eq!(text(&out.stdout), "filled\n", "{}", text(&out.stderr));
    let cgroup = PathBuf::from(format!("/sys/fs/cgroup/memory/sandbox/{}", full.id));
    if cgroup.exists() {
        let read = |f: &str| -> u64 { std::fs::read_to_string(cgroup.join(f)).unwrap().trim().parse().unwrap() };
        let (used, limit) = (read("memory.max_usage_in_bytes"), read("memory.limit_in_bytes"));
        println!("holder of a full 64 MiB guest: at most {} MiB of its {} MiB limit", used >> 20, limit >> 20);
        assert_eq!(limit >> 20, 64 + u64::from(sandbox::DEFAULT_MEMORY_OVERHEAD_MIB));
        assert!(used < limit);
    }

    // A holder that grows past its limit (as a leaking handler would) is
    // stopped and says why; the other sandbox runs on.
    let out = sandbox_with_env(
        &["run", "--memory", "64", "default", "--", "sleep", "60"],
        &[("SANDBOX_JAIL_SELF_TEST", "memory"), ("SANDBOX_LOG", "warn")],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    let limit = 64 + sandbox::DEFAULT_MEMORY_OVERHEAD_MIB;
    assert!(stderr.contains(&format!("used more than its memory limit of {limit} MiB")), "{stderr}");
    let out = sandbox(&["exec", &full.id, "--", "echo", "alive"]);
    assert_eq!(text(&out.stdout), "alive\n", "{}", text(&out.stderr));
}

#[test]
fn a_connection_flood_from_the_guest_does_not_multiply_the_holders_threads() {
    common::require_vm!();
    let s = start_detached(&[]);
    let pid = holder_pid(&s.dir);
    let threads = || -> u32 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status_field(&status, "Threads").parse().unwrap()
    };
    let before = threads();
    // 200 concurrent connections of garbage to each handler's port, straight
    // over vsock (past the guest's proxies): each is a task, not a thread.
    let flood =
        "for port in 5002 5007; do vsock-stream digest $port --conns 200 --bytes 4096 2>/dev/null; done; echo done";
    let mut child = common::sandbox_command(&["exec", &s.id, "--", "sh", "-c", flood])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut most = before;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the flood did not end in time");
        }
        most = most.max(threads());
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(text(&out.stdout).lines().last(), Some("done"));
    println!("holder threads: {before} idle, at most {most} during the flood");
    assert!(most <= before + 16, "threads grew from {before} to {most}");
    let out = sandbox(&["exec", &s.id, "--", "echo", "alive"]);
    assert_eq!(text(&out.stdout), "alive\n");
}

#[test]
fn no_jail_is_said_to_be_unsafe_and_runs_unconfined() {
    common::require_vm!();
    let out = sandbox(&["run", "--no-jail", "default", "--", "true"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("--no-jail: the sandbox's process is not confined (unsafe"));
}

#[test]
fn doctor_says_what_this_host_supports() {
    let out = sandbox(&["doctor"]);
    let stdout = text(&out.stdout);
    for line in ["kvm", "cgroups", "namespaces", "seccomp"] {
        assert!(stdout.lines().any(|l| l.starts_with(line)), "{stdout}");
    }
    // This machine (root, KVM, cgroup v1) can confine sandboxes.
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("sandboxes run confined on this host"), "{stdout}");
}

#[test]
fn the_guests_writable_root_is_as_large_as_disk_says() {
    common::require_vm!();
    let out = sandbox(&["run", "--disk", "8", "default", "--", "sh", "-c", "dd if=/dev/zero of=/big bs=1M count=16"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("No space left on device"), "{}", text(&out.stderr));
    let out = sandbox(&["run", "--memory", "128", "--disk", "200", "default", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("give it between 1 and 128 MiB"), "{}", text(&out.stderr));
}
