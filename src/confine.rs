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
use std::time::{Duration, Instant};
use std::path::{Path, PathBuf};

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
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Jail {
    /// The uids (and equal gids) given to sandboxes, one each.
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

/// The holder's own memory allowance beyond guest RAM (see [`Jail::memory_overhead_mib`]).
pub const DEFAULT_MEMORY_OVERHEAD_MIB: u32 = 192;

/// What the holder needs from the host's file system, besides its sandbox directory.
#[derive(Debug)]
pub(crate) struct HostFiles<'a> {
    pub kernel: &'a Path,
    pub disks: Vec<&'a Path>,
}

/// Confine this process to hold the sandbox in `dir` (see the module
/// documentation). Returns in the confined child; the calling process waits
/// for it and exits as it does.
pub(crate) fn confine(jail: &Jail, id: &str, dir: &SandboxDir, memory_mib: u32, files: HostFiles) -> Result<(), Error> {
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
    cgroup.add_self()?;
    let root = root_dir(dir)?;
    // A terminal the process asks questions on (`ask` rules) stays reachable.
    let tty = std::fs::File::open("/dev/tty").is_ok();
    wait_single_threaded();
    match jail::namespaces::enter_new_namespaces()? {
        Role::Outer { child } => {
            let status = jail::namespaces::forward_and_wait(child);
            report_limits(&cgroup, &limits, id, dir);
            if let Err(e) = cgroup.remove() {
                tracing::warn!(id, "removing the sandbox's cgroup: {e}");
            }
            drop(lease);
            match status {
                Ok(status) => jail::namespaces::exit_like(status),
                Err(e) => {
                    tracing::error!(id, "waiting for the sandbox's process: {e}");
                    std::process::exit(125)
                }
            }
        }
        Role::Inner { .. } => {
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
            for file in [files.kernel].into_iter().chain(files.disks) {
                jail_root = jail_root.bind_read_only(file, file);
            }
            for file in ["/etc/resolv.conf", "/etc/hosts"].map(Path::new) {
                if file.exists() {
                    jail_root = jail_root.bind_read_only(file, file);
                }
            }
            jail_root.enter()?;
            // Standard input, output and error stay; so does the uid lease.
            jail::privileges::close_other_fds(&[lease.as_raw_fd()])?;
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
        match std::fs::read_dir("/proc/self/task") {
            Ok(tasks) if tasks.count() > 1 => std::thread::sleep(Duration::from_millis(10)),
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

/// Say which limit stopped the sandbox, if one did: on standard error and in
/// the sandbox's log (a background holder's standard error goes nowhere).
fn report_limits(cgroup: &Cgroup, limits: &Limits, id: &str, dir: &SandboxDir) {
    let message = if cgroup.oom_kills() > 0 {
        format!(
            "sandbox {id} was stopped: it used more than its memory limit of {} MiB (guest memory plus the holder's allowance)",
            limits.memory_bytes >> 20
        )
    } else if cgroup.pids_limit_hit() {
        format!("sandbox {id}: its process reached its limit of {} processes and threads", limits.pids)
    } else {
        return;
    };
    tracing::error!("{message}");
    eprintln!("sandbox: {message}");
    use std::io::Write;
    if let Ok(mut log) = std::fs::OpenOptions::new().append(true).create(true).open(dir.sandbox_log()) {
        let _ = writeln!(log, "{message}");
    }
}
