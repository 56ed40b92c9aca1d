//! New mount, PID, IPC and UTS namespaces for the holder, entered by the holder
//! itself.
//!
//! [`enter_new_namespaces`] unshares the namespaces and forks once: the child is
//! PID 1 of a fresh PID namespace (it sees no other process of the host and
//! cannot signal any), the parent stays outside as a small supervisor that
//! forwards termination signals and reports how the child ended
//! ([`forward_and_wait`], [`exit_like`]).
//!
//! PID 1 of a PID namespace is special: the kernel drops every signal sent to
//! it (from inside the namespace, or from outside except `SIGKILL`/`SIGSTOP`)
//! for which it has not installed a handler. The holder must therefore install
//! handlers for the signals it wants to act on (it does for `SIGTERM`), or the
//! forwarded signal is silently ignored. When PID 1 exits, the kernel kills
//! every other process of its namespace.

use std::os::fd::{IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::sys::signal::{self, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{ForkResult, Pid};

use crate::Error;

/// Set in the inner process by [`enter_new_namespaces`]: this process is in a
/// mount namespace of its own (checked by [`crate::root::JailRoot::enter`]).
static IN_OWN_MOUNT_NAMESPACE: AtomicBool = AtomicBool::new(false);

/// Whether [`enter_new_namespaces`] put this process in a new mount namespace.
pub(crate) fn in_own_mount_namespace() -> bool {
    IN_OWN_MOUNT_NAMESPACE.load(Ordering::Relaxed)
}

/// The signals the outer process passes on to the inner one.
pub const FORWARDED_SIGNALS: [Signal; 4] = [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGQUIT];

/// Which side of the fork in [`enter_new_namespaces`] the caller is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The original process, still in the host's PID namespace (but in the new
    /// mount, IPC and UTS namespaces). It should only supervise: call
    /// [`forward_and_wait`] with `child`, then [`exit_like`] with the result.
    /// [`FORWARDED_SIGNALS`] and `SIGCHLD` are blocked in it so that none is
    /// lost before [`forward_and_wait`] starts.
    /// It should not fork again: its new children would land in the new PID
    /// namespace too.
    Outer {
        /// The inner process, as the host numbers it.
        child: Pid,
    },
    /// The new process: PID 1 of the new PID namespace, with the signal mask it
    /// had before the call. It goes on to build its jail (see
    /// [`crate::root::JailRoot`]). It is killed (`SIGKILL`) when the outer
    /// process dies. As PID 1 it ignores signals it has no handler for, and
    /// would have to reap any process it starts.
    Inner {
        /// The outer process's pid, as the host numbers it (inside the new
        /// namespace it has no pid, so this is only useful for logs).
        outer_pid: Pid,
    },
}

/// How the inner process ended, as [`forward_and_wait`] saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildExit {
    /// It exited with this code.
    Exited(i32),
    /// A signal killed it.
    Signaled(Signal),
}

/// The number of threads of the calling process, from `/proc/self/task`.
///
/// Several operations of this crate (unshare of a PID namespace followed by a
/// fork, dropping capabilities, which are per thread) are only correct in a
/// single-threaded process; they check this first.
pub fn thread_count() -> Result<usize, Error> {
    let entries = std::fs::read_dir("/proc/self/task").map_err(|e| Error::io("reading /proc/self/task", e))?;
    let mut count = 0;
    for entry in entries {
        entry.map_err(|e| Error::io("reading /proc/self/task", e))?;
        count += 1;
    }
    Ok(count)
}

/// Fails unless the calling process has a single thread; `what` names the
/// operation that needs it.
pub(crate) fn require_single_threaded(what: &str) -> Result<(), Error> {
    let threads = thread_count()?;
    if threads != 1 {
        return Err(Error::Unsupported(format!(
            "{what} must be done while the process is single-threaded, but it has {threads} threads \
             (do it before starting any runtime, logger or other thread)"
        )));
    }
    Ok(())
}

fn forwarded_and_chld() -> SigSet {
    let mut set = SigSet::empty();
    for sig in FORWARDED_SIGNALS {
        set.add(sig);
    }
    set.add(Signal::SIGCHLD);
    set
}

/// Forks into new mount, PID, IPC and UTS namespaces: returns
/// [`Role::Outer`] in the original process (which stays in the host's
/// namespaces) and [`Role::Inner`] in the new one, PID 1 of the new PID
/// namespace.
///
/// Must be called while the process is single-threaded (checked: otherwise an
/// error says so), because only the calling thread survives the fork and locks
/// held by other threads would stay locked forever in the child. Needs
/// `CAP_SYS_ADMIN`.
///
/// The inner process gets `PR_SET_PDEATHSIG` = `SIGKILL`, so it never outlives
/// the outer one; the window between the fork and that `prctl` is closed with a
/// pipe whose write end the outer process keeps open for its whole life (it is
/// close-on-exec, so it does not leak into programs it runs).
pub fn enter_new_namespaces() -> Result<Role, Error> {
    require_single_threaded("entering new namespaces")?;
    let outer_pid = nix::unistd::getpid();

    // A new PID namespace takes effect for the children of the caller; the
    // other namespaces are entered by the child alone (below), so the outer
    // process keeps the host's file system: it removes the sandbox's cgroup
    // and reports on it after the inner process has `pivot_root`ed away.
    // SAFETY: unshare only changes the calling process's namespaces; the flag
    // is a valid constant.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWPID) };
    if rc != 0 {
        return Err(Error::sys("unshare(pid namespace)", Errno::last()));
    }

    // Tells the inner process whether the outer one is still alive: the outer
    // process never writes nor closes `alive_w`, so the read end only reports
    // hang-up once it is dead.
    let (alive_r, alive_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::sys("pipe2 for the liveness pipe", e))?;

    // Block the forwarded signals before forking, so one that arrives while the
    // outer process is not yet in forward_and_wait stays pending instead of
    // killing it (and, through PDEATHSIG, the inner process).
    let mut old_mask = SigSet::empty();
    signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&forwarded_and_chld()), Some(&mut old_mask))
        .map_err(|e| Error::sys("blocking signals before fork", e))?;

    // SAFETY: the process is single-threaded (checked above), so the child
    // cannot inherit a lock held by another thread.
    let forked = unsafe { nix::unistd::fork() };
    match forked {
        Err(e) => {
            let _ = signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old_mask), None);
            Err(Error::sys("fork into the new PID namespace", e))
        }
        Ok(ForkResult::Parent { child }) => {
            drop(alive_r);
            // Kept open (never closed) until this process ends: see above.
            let _ = alive_w.into_raw_fd();
            tracing::debug!(inner = child.as_raw(), "entered new namespaces; supervising the inner process");
            Ok(Role::Outer { child })
        }
        Ok(ForkResult::Child) => {
            drop(alive_w);
            if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
                return Err(Error::sys("prctl(PR_SET_PDEATHSIG)", e));
            }
            // getppid() is 0 in the new PID namespace, so it cannot tell whether
            // the parent died before the prctl above; the pipe can.
            if outer_dead(alive_r)? {
                tracing::error!("the outer process died before the inner one was set up; exiting");
                // SAFETY: _exit ends the process without running anything.
                unsafe { libc::_exit(1) };
            }
            // SAFETY: as above.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS) };
            if rc != 0 {
                return Err(Error::sys("unshare(mount, ipc, uts namespaces)", Errno::last()));
            }
            signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old_mask), None)
                .map_err(|e| Error::sys("restoring the signal mask", e))?;
            IN_OWN_MOUNT_NAMESPACE.store(true, Ordering::Relaxed);
            Ok(Role::Inner { outer_pid })
        }
    }
}

/// Whether the write end of the liveness pipe is closed, i.e. the outer
/// process is gone.
fn outer_dead(alive_r: OwnedFd) -> Result<bool, Error> {
    let mut fds = [libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(&alive_r), events: libc::POLLIN, revents: 0 }];
    // SAFETY: `fds` is a valid array of one pollfd that outlives the call.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
    if rc < 0 {
        return Err(Error::sys("poll on the liveness pipe", Errno::last()));
    }
    Ok(fds[0].revents & (libc::POLLHUP | libc::POLLIN) != 0)
}

/// Supervises the inner process from the outer one: passes each of
/// [`FORWARDED_SIGNALS`] it receives on to `child`, and returns how `child`
/// ended once it has.
///
/// Expects the signal mask set by [`enter_new_namespaces`] (those signals and
/// `SIGCHLD` blocked) and leaves it so: the caller is expected to end with
/// [`exit_like`] right away.
pub fn forward_and_wait(child: Pid) -> Result<ChildExit, Error> {
    let set = forwarded_and_chld();
    // Already blocked when called after enter_new_namespaces; blocking again is
    // harmless and makes the function correct on its own.
    signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None)
        .map_err(|e| Error::sys("blocking forwarded signals", e))?;
    loop {
        // A SIGCHLD that came before the mask was set was discarded, so look
        // before waiting (and after each signal).
        match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => {
                tracing::debug!(code, "inner process exited");
                return Ok(ChildExit::Exited(code));
            }
            Ok(WaitStatus::Signaled(_, sig, _)) => {
                tracing::debug!(signal = %sig, "inner process killed by a signal");
                return Ok(ChildExit::Signaled(sig));
            }
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(Error::sys("waitpid on the inner process", e)),
        }
        let sig = match set.wait() {
            Ok(sig) => sig,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(Error::sys("sigwait in the outer process", e)),
        };
        if sig != Signal::SIGCHLD {
            tracing::debug!(signal = %sig, "forwarding a signal to the inner process");
            match signal::kill(child, sig) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(e) => return Err(Error::sys(format!("forwarding {sig} to the inner process"), e)),
            }
        }
    }
}

/// Ends the calling process the way the inner process ended: with the same
/// exit code, or killed by the same signal (re-raised with its default
/// disposition, unblocked; a signal whose default is not to kill falls back to
/// exit code 128 + its number, the shell's convention).
pub fn exit_like(status: ChildExit) -> ! {
    match status {
        ChildExit::Exited(code) => std::process::exit(code),
        ChildExit::Signaled(sig) => {
            // Don't leave a core of the supervisor for a signal that killed the
            // inner process.
            let no_core = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            // SAFETY: setrlimit reads a valid rlimit struct.
            unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
            // SAFETY: restoring the default disposition installs no handler.
            let _ = unsafe { signal::signal(sig, signal::SigHandler::SigDfl) };
            let mut only = SigSet::empty();
            only.add(sig);
            let _ = signal::sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&only), None);
            let _ = signal::raise(sig);
            std::process::exit(128 + sig as i32)
        }
    }
}
