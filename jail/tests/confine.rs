//! Confinement tests, proved from inside a real jail (they need root).
//!
//! Entering namespaces and dropping privileges need a single-threaded process
//! and cannot be undone, so each case re-runs this binary as a child with
//! `JAIL_TEST_CHILD=<case>`, which does the jail work and reports lines such as
//! `check <name> ok`; the parent asserts on them. libtest runs every test on a
//! thread of its own even with `--test-threads=1`, so this binary has its own
//! `main` (`harness = false`): the child's work runs on its only thread.

// clippy.toml allows unwrap in #[test] functions; these are tests without the
// attribute, where a panic is likewise a failure with its location.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use jail::namespaces::{enter_new_namespaces, exit_like, forward_and_wait, Role};
use jail::privileges::{close_other_fds, drop_privileges, set_rlimits};
use jail::root::JailRoot;
use jail::uids::{UidLease, UidRange};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const CHILD_ENV: &str = "JAIL_TEST_CHILD";

type Case = (&'static str, fn(), fn());

const CASES: &[Case] = &[
    ("jail_confines_the_holder", jail_confines_parent, jail_confines_child),
    ("another_jail_uid_is_denied", other_uid_parent, other_uid_child),
    ("sigterm_is_forwarded_and_exit_code_mirrored", sigterm_parent, signal_child),
    ("death_by_signal_is_mirrored", killed_parent, signal_child),
    ("inner_dies_with_outer", orphan_parent, signal_child),
];

fn main() {
    if let Ok(case) = std::env::var(CHILD_ENV) {
        let Some((_, _, child)) = CASES.iter().find(|(name, _, _)| *name == case) else {
            eprintln!("unknown case {case}");
            std::process::exit(2);
        };
        child();
        return;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        for (name, _, _) in CASES {
            println!("{name}: test");
        }
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        println!("confine: skipped, these tests build real jails and need root");
        return;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let mut failed = 0;
    let mut ran = 0;
    for (name, parent, _) in CASES {
        if !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        ran += 1;
        let ok = std::panic::catch_unwind(parent).is_ok();
        println!("test {name} ... {}", if ok { "ok" } else { "FAILED" });
        failed += usize::from(!ok);
    }
    println!("\ntest result: {}. {} passed; {failed} failed", if failed == 0 { "ok" } else { "FAILED" }, ran - failed);
    if failed > 0 {
        std::process::exit(1);
    }
}

fn spawn_child(case: &str, envs: &[(&str, String)]) -> Child {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.env(CHILD_ENV, case).stdout(Stdio::piped()).stderr(Stdio::inherit());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

/// Waits for `child`, killing it after a few seconds so a broken case fails
/// instead of hanging.
fn wait_bounded(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("child did not finish in time");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn env_u32(name: &str) -> u32 {
    std::env::var(name).unwrap().parse().unwrap()
}

/// Reports one check from inside the jail.
fn check(name: &str, result: Result<(), String>) {
    match result {
        Ok(()) => println!("check {name} ok"),
        Err(e) => println!("check {name} FAIL {e}"),
    }
}

fn expect_errno<T>(r: std::io::Result<T>, want: &[i32]) -> Result<(), String> {
    match r {
        Ok(_) => Err("succeeded".into()),
        Err(e) if e.raw_os_error().is_some_and(|n| want.contains(&n)) => Ok(()),
        Err(e) => Err(format!("failed with the wrong error: {e}")),
    }
}

fn nix_errno<T>(r: nix::Result<T>, want: Errno) -> Result<(), String> {
    match r {
        Ok(_) => Err("succeeded".into()),
        Err(e) if e == want => Ok(()),
        Err(e) => Err(format!("failed with {e}, not {want}")),
    }
}

fn lease_in(dir: &Path) -> UidLease {
    UidRange::default().lease(&dir.join("locks")).unwrap()
}

// ---- jail_confines_the_holder ----

const JAIL_HOSTNAME: &str = "jail-test";

/// RLIMIT_NPROC in the jail: with a uid of its own, its threads are all that count.
const NPROC: u64 = 4;

const EXPECTED_CHECKS: &[&str] = &[
    "outer_keeps_the_host_fs",
    "pid_is_1",
    "only_own_processes_in_proc",
    "uids",
    "status_no_caps",
    "not_dumpable",
    "host_file_gone",
    "ro_file_readable",
    "ro_file_not_writable",
    "rw_dir_writable",
    "root_read_only",
    "root_mount_flags",
    "ro_mount_flags",
    "rw_mount_flags",
    "kvm_opens",
    "null_writes",
    "hostname",
    "setuid_root_fails",
    "mount_fails",
    "mknod_fails",
    "unshare_fails",
    "kept_fd_open",
    "other_fd_closed",
    "nproc_caps_threads",
];

fn jail_confines_parent() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let lease = lease_in(dir);
    let uid = lease.uid();
    std::fs::create_dir(dir.join("root")).unwrap();
    std::fs::write(dir.join("ro.txt"), "hello").unwrap();
    std::fs::create_dir(dir.join("rw")).unwrap();
    nix::unistd::chown(&dir.join("rw"), Some(uid.into()), Some(uid.into())).unwrap();
    std::fs::set_permissions(dir.join("rw"), std::fs::Permissions::from_mode(0o700)).unwrap();
    // Descriptors the child inherits: the lease's, kept; another one, closed.
    lease.set_inheritable(true).unwrap();
    let stray = std::fs::File::open(dir.join("ro.txt")).unwrap();
    nix::fcntl::fcntl(&stray, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty())).unwrap();
    let host_name = nix::unistd::gethostname().unwrap();

    let mut child = spawn_child(
        "jail_confines_the_holder",
        &[
            ("JAIL_DIR", dir.display().to_string()),
            ("JAIL_UID", uid.to_string()),
            ("JAIL_KEEP_FD", lease.as_raw_fd().to_string()),
            ("JAIL_STRAY_FD", stray.as_raw_fd().to_string()),
        ],
    );
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let status = wait_bounded(&mut child);
    assert!(status.success(), "jail child: {status:?}\n{out}");
    for name in EXPECTED_CHECKS {
        assert!(out.lines().any(|l| l == format!("check {name} ok")), "check {name} did not pass:\n{out}");
    }
    assert!(!out.contains("FAIL"), "{out}");

    assert_eq!(nix::unistd::gethostname().unwrap(), host_name, "the host's name changed");
    let written = std::fs::metadata(dir.join("rw/written")).unwrap();
    assert_eq!(written.uid(), uid, "file written in the jail belongs to the jail's uid");
    // The jail's tmpfs and binds were in its own mount namespace only.
    assert_eq!(std::fs::read_dir(dir.join("root")).unwrap().count(), 0);
}

fn jail_confines_child() {
    let dir = PathBuf::from(std::env::var("JAIL_DIR").unwrap());
    let uid = env_u32("JAIL_UID");
    let keep_fd: RawFd = std::env::var("JAIL_KEEP_FD").unwrap().parse().unwrap();
    let stray_fd: RawFd = std::env::var("JAIL_STRAY_FD").unwrap().parse().unwrap();
    match enter_new_namespaces().unwrap() {
        Role::Outer { child } => {
            let status = forward_and_wait(child).unwrap();
            // The jail's pivot_root did not move the outer process: it still
            // sees the host's files (it cleans up after the inner one).
            let host = dir.join("ro.txt");
            check("outer_keeps_the_host_fs", if host.exists() { Ok(()) } else { Err(format!("{host:?} gone")) });
            exit_like(status)
        }
        Role::Inner { .. } => {}
    }
    JailRoot::new(dir.join("root"))
        .bind_read_only(dir.join("ro.txt"), "/etc/ro.txt")
        .bind_writable(dir.join("rw"), "/data")
        .device("/dev/kvm", "/dev/kvm", uid, uid, 0o600)
        .device("/dev/null", "/dev/null", 0, 0, 0o666)
        .proc()
        .hostname(JAIL_HOSTNAME)
        .enter()
        .unwrap();
    set_rlimits(256, Some(NPROC)).unwrap();
    close_other_fds(&[keep_fd]).unwrap();
    drop_privileges(uid, uid).unwrap();

    check("pid_is_1", if std::process::id() == 1 { Ok(()) } else { Err(format!("pid {}", std::process::id())) });
    let pids: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        .collect();
    check("only_own_processes_in_proc", if pids == ["1"] { Ok(()) } else { Err(format!("{pids:?}")) });
    let ids = nix::unistd::getresuid().unwrap();
    let gids = nix::unistd::getresgid().unwrap();
    check(
        "uids",
        if [ids.real, ids.effective, ids.saved].iter().all(|u| u.as_raw() == uid)
            && [gids.real, gids.effective, gids.saved].iter().all(|g| g.as_raw() == uid)
            && nix::unistd::getgroups().unwrap().iter().all(|g| g.as_raw() == uid)
        {
            Ok(())
        } else {
            Err(format!("{ids:?} {gids:?}"))
        },
    );
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |key: &str| {
        status.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':').map(str::trim)).unwrap_or("missing")
    };
    let mut bad = Vec::new();
    for key in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        if field(key) != "0000000000000000" {
            bad.push(format!("{key}={}", field(key)));
        }
    }
    if field("NoNewPrivs") != "1" {
        bad.push(format!("NoNewPrivs={}", field("NoNewPrivs")));
    }
    check("status_no_caps", if bad.is_empty() { Ok(()) } else { Err(bad.join(" ")) });
    check("not_dumpable", if nix::sys::prctl::get_dumpable() == Ok(false) { Ok(()) } else { Err("dumpable".into()) });

    check("host_file_gone", expect_errno(std::fs::File::open("/etc/passwd"), &[libc::ENOENT]));
    check(
        "ro_file_readable",
        match std::fs::read_to_string("/etc/ro.txt") {
            Ok(s) if s == "hello" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    check(
        "ro_file_not_writable",
        expect_errno(std::fs::OpenOptions::new().write(true).open("/etc/ro.txt"), &[libc::EROFS, libc::EACCES]),
    );
    check("rw_dir_writable", std::fs::write("/data/written", "x").map_err(|e| e.to_string()));
    check("root_read_only", expect_errno(std::fs::write("/new", "x"), &[libc::EROFS, libc::EACCES]));
    use nix::sys::statvfs::FsFlags;
    let flags_check = |path: &str, want: FsFlags, unwanted: FsFlags| match nix::sys::statvfs::statvfs(path) {
        Ok(st) if st.flags().contains(want) && !st.flags().intersects(unwanted) => Ok(()),
        Ok(st) => Err(format!("{path}: {:?}", st.flags())),
        Err(e) => Err(format!("{path}: {e}")),
    };
    check(
        "root_mount_flags",
        flags_check("/", FsFlags::ST_RDONLY | FsFlags::ST_NOSUID | FsFlags::ST_NOEXEC, FsFlags::empty()),
    );
    let restricted = FsFlags::ST_NOSUID | FsFlags::ST_NODEV | FsFlags::ST_NOEXEC;
    check("ro_mount_flags", flags_check("/etc/ro.txt", restricted | FsFlags::ST_RDONLY, FsFlags::empty()));
    check("rw_mount_flags", flags_check("/data", restricted, FsFlags::ST_RDONLY));
    check(
        "kvm_opens",
        std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").map(drop).map_err(|e| e.to_string()),
    );
    check(
        "null_writes",
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .and_then(|mut f| f.write_all(b"x"))
            .map_err(|e| e.to_string()),
    );
    check(
        "hostname",
        match nix::unistd::gethostname() {
            Ok(n) if n == JAIL_HOSTNAME => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    check("setuid_root_fails", nix_errno(nix::unistd::setuid(0.into()), Errno::EPERM));
    check(
        "mount_fails",
        nix_errno(
            nix::mount::mount(Some("tmpfs"), "/data", Some("tmpfs"), nix::mount::MsFlags::empty(), None::<&str>),
            Errno::EPERM,
        ),
    );
    check(
        "mknod_fails",
        nix_errno(
            nix::sys::stat::mknod(
                "/data/kvm2",
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::from_bits_truncate(0o666),
                nix::sys::stat::makedev(10, 232),
            ),
            Errno::EPERM,
        ),
    );
    // SAFETY: unshare only changes this process's namespaces (it must fail).
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNS) };
    check("unshare_fails", if rc != 0 && Errno::last() == Errno::EPERM { Ok(()) } else { Err(format!("rc {rc}")) });
    // SAFETY: F_GETFD only reads descriptor flags.
    let kept = unsafe { libc::fcntl(keep_fd, libc::F_GETFD) };
    check("kept_fd_open", if kept >= 0 { Ok(()) } else { Err("closed".into()) });
    // SAFETY: as above.
    let stray = unsafe { libc::fcntl(stray_fd, libc::F_GETFD) };
    check("other_fd_closed", if stray < 0 && Errno::last() == Errno::EBADF { Ok(()) } else { Err("open".into()) });
    let mut threads = Vec::new();
    for _ in 0..2 * NPROC {
        match std::thread::Builder::new().spawn(|| std::thread::sleep(Duration::from_millis(200))) {
            Ok(t) => threads.push(t),
            Err(_) => break,
        }
    }
    let started = threads.len() as u64 + 1;
    check(
        "nproc_caps_threads",
        if started == NPROC { Ok(()) } else { Err(format!("{started} threads for a limit of {NPROC}")) },
    );
}

// ---- another_jail_uid_is_denied ----

fn other_uid_parent() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let a = lease_in(dir);
    let b = lease_in(dir);
    assert_ne!(a.uid(), b.uid());
    let private = dir.join("a");
    std::fs::create_dir(&private).unwrap();
    std::fs::write(private.join("secret"), "s").unwrap();
    nix::unistd::chown(&private, Some(a.uid().into()), Some(a.gid().into())).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();

    let run = |uid: u32| {
        let mut child = spawn_child(
            "another_jail_uid_is_denied",
            &[("JAIL_DIR", private.display().to_string()), ("JAIL_UID", uid.to_string())],
        );
        let mut out = String::new();
        child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        assert!(wait_bounded(&mut child).success());
        out
    };
    assert_eq!(run(b.uid()).trim(), "open EACCES", "uid B must not open uid A's directory");
    assert_eq!(run(a.uid()).trim(), "open ok", "uid A opens its own directory");
}

fn other_uid_child() {
    let uid = env_u32("JAIL_UID");
    drop_privileges(uid, uid).unwrap();
    match std::fs::read_dir(std::env::var("JAIL_DIR").unwrap()) {
        Ok(_) => println!("open ok"),
        Err(e) if e.raw_os_error() == Some(libc::EACCES) => println!("open EACCES"),
        Err(e) => println!("open {e}"),
    }
}

// ---- signals ----

/// The inner process exits with this code on SIGTERM.
const SIGTERM_CODE: i32 = 42;

extern "C" fn on_sigterm(_: libc::c_int) {
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(SIGTERM_CODE) };
}

fn signal_child() {
    match enter_new_namespaces().unwrap() {
        Role::Outer { child } => {
            println!("inner {child}");
            exit_like(forward_and_wait(child).unwrap())
        }
        Role::Inner { .. } => {
            // PID 1 of a PID namespace ignores signals it has no handler for.
            let handler = nix::sys::signal::SigAction::new(
                nix::sys::signal::SigHandler::Handler(on_sigterm),
                nix::sys::signal::SaFlags::empty(),
                nix::sys::signal::SigSet::empty(),
            );
            // SAFETY: the handler only calls _exit.
            unsafe { nix::sys::signal::sigaction(Signal::SIGTERM, &handler) }.unwrap();
            println!("ready {}", std::process::id());
            loop {
                nix::unistd::pause();
            }
        }
    }
}

/// Starts the signal child and returns it with the inner process's host pid,
/// once the inner process is ready.
fn start_signal_child(case: &str) -> (Child, Pid) {
    let mut child = spawn_child(case, &[]);
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut inner, mut ready) = (None, false);
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(pid) = line.strip_prefix("inner ") {
            inner = Some(Pid::from_raw(pid.parse().unwrap()));
        }
        if let Some(pid) = line.strip_prefix("ready ") {
            assert_eq!(pid, "1", "the inner process is PID 1 of its namespace");
            ready = true;
        }
        if ready && inner.is_some() {
            break;
        }
    }
    assert!(ready, "the inner process never got ready");
    (child, inner.unwrap())
}

fn sigterm_parent() {
    let (mut child, _) = start_signal_child("sigterm_is_forwarded_and_exit_code_mirrored");
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let status = wait_bounded(&mut child);
    assert_eq!(status.code(), Some(SIGTERM_CODE), "{status:?}");
}

fn killed_parent() {
    let (mut child, inner) = start_signal_child("death_by_signal_is_mirrored");
    kill(inner, Signal::SIGKILL).unwrap();
    let status = wait_bounded(&mut child);
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
}

fn orphan_parent() {
    let (mut child, inner) = start_signal_child("inner_dies_with_outer");
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
    wait_bounded(&mut child);
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        // Gone, or a zombie waiting for its new parent to reap it.
        match std::fs::read_to_string(format!("/proc/{inner}/stat")) {
            Err(_) => break,
            Ok(stat) if stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')) => break,
            Ok(_) => {}
        }
        assert!(Instant::now() < deadline, "the inner process outlived the outer one");
        std::thread::sleep(Duration::from_millis(10));
    }
}
