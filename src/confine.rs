//! Confining the process that holds a sandbox (see the README's "The
//! process that holds a sandbox" and "Threat model").
//!
//! [`confine`] runs in [`crate::Instance::start`] after the sandbox's
//! directory exists and before anything that parses guest bytes starts:
//!
//! 1. As root, on the host: lease a uid/gid of its own for the sandbox,
//!    give it the sandbox directory (mode 0700), create its cgroup (memory =
//!    guest + [`Jail::memory_overhead_mib`], CPU quota, pids) and join it.
//! 2. Enter new mount, PID, IPC and UTS namespaces and fork. The calling
//!    process becomes the *outer* process: it holds nothing, forwards
//!    termination signals, waits, reports a limit the sandbox hit, removes
//!    the cgroup and exits as the holder did. [`confine`] never returns
//!    there.
//! 3. The child (PID 1 of its namespace) builds a file system of only what
//!    it needs, at the same paths as on the host (kernel and disks
//!    read-only, the sandbox directory, `/dev/kvm`, the resolver's files, a
//!    fresh `/proc`), `pivot_root`s into it, closes every other file
//!    descriptor, sets resource limits, drops to the sandbox's uid with no
//!    capabilities and `no_new_privs`, and installs the holder's seccomp
//!    filter. It returns, and boots the VM from there.
//!
//! The fork needs a single-threaded process, so only a process that exists
//! to hold this one sandbox can be confined (the CLI's `run`, and its `run
//! -d` background process): an application embedding the library holds its
//! sandboxes unconfined in its own process.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use guest_protocol::sandbox_dir::SandboxDir;
use jail::cgroup::{Cgroup, Limits};
use jail::namespaces::Role;
use jail::root::JailRoot;
use jail::seccomp::ThreadKind;
use jail::uids::UidRange;

use crate::Error;

/// Where uid leases are kept: on a tmpfs, so a lease never outlives a reboot,
/// and one directory for the whole host, so two data directories never hand
/// out the same uid.
const UID_LOCK_DIR: &str = "/run/sandbox/uids";

/// How the process holding a sandbox confines itself. [`Jail::default`]
/// is what `sandbox run` uses.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct Jail {
    /// The uids (and equal gids) given to sandboxes, one each.
    #[serde(with = "uid_range")]
    pub uids: UidRange,
    /// Host memory the holder may use beyond the guest's RAM: the VMM,
    /// the handlers' buffers and connections, the session database writer.
    /// The sandbox's cgroup limit is guest memory + this.
    pub memory_overhead_mib: u32,
    /// CPU time, in CPUs (1.5: one and a half cores). `None`: no quota.
    pub cpus: Option<f64>,
    /// Most processes and threads in the sandbox's cgroup (and, through
    /// `RLIMIT_NPROC`, of its uid).
    pub pids: u64,
    /// Most open file descriptors (`RLIMIT_NOFILE`).
    pub open_files: u64,
    /// Hostname inside the holder's UTS namespace.
    pub hostname: String,
}

impl Default for Jail {
    fn default() -> Self {
        Jail {
            uids: UidRange::default(),
            memory_overhead_mib: DEFAULT_MEMORY_OVERHEAD_MIB,
            cpus: None,
            pids: 128,
            open_files: 4096,
            hostname: "sandbox-holder".into(),
        }
    }
}

/// A [`UidRange`] as `[first, count]`, checked when read.
mod uid_range {
    use jail::uids::UidRange;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(range: &UidRange, s: S) -> Result<S::Ok, S::Error> {
        [range.first(), range.count()].serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<UidRange, D::Error> {
        let [first, count] = <[u32; 2]>::deserialize(d)?;
        UidRange::new(first, count).map_err(serde::de::Error::custom)
    }
}

/// The holder's own memory allowance beyond guest RAM (see [`Jail::memory_overhead_mib`]).
pub const DEFAULT_MEMORY_OVERHEAD_MIB: u32 = 192;

/// What the holder needs from the host's file system, besides its sandbox
/// directory: the kernel, the disks and a snapshot's files, read-only.
#[derive(Debug)]
pub(crate) struct HostFiles<'a> {
    pub read_only: Vec<&'a Path>,
    /// Descriptors the confined process keeps (every other is closed): the
    /// listeners of port forwards bound before it was confined.
    pub keep_fds: Vec<std::os::fd::RawFd>,
}

/// Confine this process to hold the sandbox in `dir` (see the module
/// documentation). Returns in the confined child; the calling process waits
/// for it and exits as it does.
pub(crate) fn confine(jail: &Jail, id: &str, dir: &SandboxDir, memory_mib: u32, files: HostFiles) -> Result<(), Error> {
    if !nix::unistd::geteuid().is_root() {
        return Err(jail::Error::Unsupported(
            "a confined sandbox needs root (namespaces, pivot_root, a uid of its own, cgroups): run as root".into(),
        )
        .into());
    }
    let lease = jail.uids.lease(Path::new(UID_LOCK_DIR))?;
    let (uid, gid) = (lease.uid(), lease.gid());
    nix::unistd::chown(dir.path(), Some(uid.into()), Some(gid.into()))
        .map_err(|e| Error::Io(format!("give {} to uid {uid}", dir.path().display()), e.into()))?;
    let limits = Limits {
        memory_bytes: (u64::from(memory_mib) + u64::from(jail.memory_overhead_mib)) << 20,
        cpu_quota: jail.cpus,
        pids: jail.pids,
    };
    let cgroup = Cgroup::create(id, &limits)?;
    let root = root_dir(dir)?;
    // A terminal the process asks questions on (`ask` rules) stays reachable.
    let tty = std::fs::File::open("/dev/tty").is_ok();
    wait_single_threaded();
    // The child waits until the outer process has put it in its cgroup.
    let (go_read, go_write) = nix::unistd::pipe().map_err(|e| jail::Error::sys("create a pipe", e))?;
    match jail::namespaces::enter_new_namespaces()? {
        Role::Outer { child } => {
            drop(go_read);
            let joined = cgroup.add_process(child.as_raw().unsigned_abs());
            if joined.is_ok() {
                let _ = nix::unistd::write(&go_write, b"1");
            }
            // Closed without a byte: the child gives up.
            drop(go_write);
            if let Err(e) = joined {
                tracing::error!(id, "putting the sandbox's process in its cgroup: {e}");
            }
            let status = jail::namespaces::forward_and_wait(child);
            let limit_hit = report_limits(&cgroup, &limits, id, dir);
            if let Err(e) = cgroup.remove() {
                tracing::warn!(id, "removing the sandbox's cgroup: {e}");
            }
            drop(lease);
            match status {
                // Killed for its limit: the sandbox failed, as any other start or run failure.
                Ok(_) if limit_hit => std::process::exit(125),
                Ok(status) => jail::namespaces::exit_like(status),
                Err(e) => {
                    tracing::error!(id, "waiting for the sandbox's process: {e}");
                    std::process::exit(125)
                }
            }
        }
        Role::Inner { .. } => {
            drop(go_write);
            let mut go = [0u8; 1];
            if nix::unistd::read(&go_read, &mut go) != Ok(1) {
                return Err(Error::Config("the sandbox's process could not be put in its cgroup".into()));
            }
            drop(go_read);
            let mut jail_root = JailRoot::new(&root)
                .proc()
                .hostname(&jail.hostname)
                .device("/dev/kvm", "/dev/kvm", uid, gid, 0o600)
                .device("/dev/null", "/dev/null", uid, gid, 0o666)
                .device("/dev/urandom", "/dev/urandom", uid, gid, 0o444)
                .bind_writable(dir.path(), dir.path());
            if tty {
                jail_root = jail_root.device("/dev/tty", "/dev/tty", 0, 0, 0o666);
            }
            for file in files.read_only {
                jail_root = jail_root.bind_read_only(file, file);
            }
            for file in ["/etc/resolv.conf", "/etc/hosts"].map(Path::new) {
                if file.exists() {
                    jail_root = jail_root.bind_read_only(file, file);
                }
            }
            jail_root.enter()?;
            // Standard input, output and error stay; so do the uid lease and
            // the listeners the caller handed over.
            let keep: Vec<_> = std::iter::once(lease.as_raw_fd()).chain(files.keep_fds.iter().copied()).collect();
            jail::privileges::close_other_fds(&keep)?;
            jail::privileges::set_rlimits(jail.open_files, Some(jail.pids))?;
            jail::privileges::drop_privileges(uid, gid)?;
            jail::seccomp::install_violation_reporter()?;
            jail::seccomp::install(ThreadKind::Holder)?;
            // The lease lives as long as the process (the descriptor is kept open).
            std::mem::forget(lease);
            std::mem::forget(cgroup);
            Ok(())
        }
    }
}

/// Threads that have finished work for this process (an image pull's
/// runtime) may take a moment to exit; the fork needs them gone.
fn wait_single_threaded() {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match jail::namespaces::thread_count() {
            Ok(n) if n > 1 => std::thread::sleep(Duration::from_millis(10)),
            _ => return,
        }
    }
}

/// An empty directory to mount the jail's root file system on (in the
/// holder's own mount namespace, so one directory serves every sandbox).
fn root_dir(dir: &SandboxDir) -> Result<PathBuf, Error> {
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).map_err(|e| Error::Io(format!("create {}", root.display()), e))?;
    Ok(root)
}

/// Say which limit the sandbox hit, if one did: on standard error and in
/// the sandbox's log (a background holder's standard error goes nowhere).
/// Returns whether the memory limit killed it.
fn report_limits(cgroup: &Cgroup, limits: &Limits, id: &str, dir: &SandboxDir) -> bool {
    let killed = cgroup.oom_kills() > 0;
    let message = if killed {
        format!(
            "sandbox {id} was stopped: it used more than its memory limit of {} MiB (guest memory plus the holder's allowance, `--holder-memory`)",
            limits.memory_bytes >> 20
        )
    } else if cgroup.pids_limit_hit() {
        format!("sandbox {id}: its process reached its limit of {} processes and threads", limits.pids)
    } else {
        return false;
    };
    tracing::error!("{message}");
    eprintln!("sandbox: {message}");
    use std::io::Write;
    if let Ok(mut log) = std::fs::OpenOptions::new().append(true).create(true).open(dir.sandbox_log()) {
        let _ = writeln!(log, "{message}");
    }
    killed
}

/// The environment variable that makes a confined holder's handler thread
/// try one forbidden thing once it serves: `execve`, `ptrace`, `open` (of
/// a host file outside the jail) or `memory` (grow past its memory limit). It proves the layers from the inside in
/// the end-to-end tests; it can only stop or fail the sandbox that sets it.
pub(crate) const SELF_TEST_VAR: &str = "SANDBOX_JAIL_SELF_TEST";

/// Try what [`SELF_TEST_VAR`] names, on the calling thread. A forbidden
/// system call ends the process (the seccomp reporter names it); the rest
/// is logged.
pub(crate) fn self_test(what: &str) {
    tracing::warn!("jail self-test: trying {what} on this thread");
    match what {
        "execve" => {
            let path = c"/bin/true";
            let argv = [path.as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null()];
            // SAFETY: the path and both arrays are valid and null-terminated
            // for the call; under the holder's filter it never returns.
            let rc = unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
            tracing::error!("jail self-test: execve returned {rc}: {}", std::io::Error::last_os_error());
        }
        "ptrace" => {
            // SAFETY: PTRACE_TRACEME takes no pointers.
            let rc = unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
            tracing::error!("jail self-test: ptrace returned {rc}: {}", std::io::Error::last_os_error());
        }
        "memory" => {
            // Grow as a leaking handler would, until the cgroup stops it
            // (at most 4 GiB, should there be no limit).
            let mut held: Vec<Vec<u8>> = Vec::new();
            for _ in 0..64 {
                held.push(vec![1u8; 64 << 20]);
            }
            tracing::error!("jail self-test: allocated {} MiB", held.len() * 64);
        }
        "open" => match std::fs::File::open("/etc/shadow") {
            Ok(_) => tracing::error!("jail self-test: opened /etc/shadow"),
            Err(e) => tracing::warn!("jail self-test: open /etc/shadow: {e}"),
        },
        other => tracing::warn!("jail self-test: unknown test {other:?}"),
    }
}
