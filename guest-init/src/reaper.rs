//! PID 1's reaper: one thread collects every child that exits (orphans
//! included) and hands each status to whoever started that process.
//!
//! Spawning goes through [`spawn`], which registers the child under the same
//! lock the reaper takes to deliver a status, so a child that exits at once
//! still finds its waiter.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::process::{Child, Command};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Condvar, Mutex, OnceLock};

use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};

#[derive(Default)]
struct Registry {
    waiters: HashMap<i32, Sender<i32>>,
    /// Bumped by every spawn, so the reaper knows when to look again.
    spawned: u64,
}

struct Reaper {
    registry: Mutex<Registry>,
    children: Condvar,
}

fn reaper() -> &'static Reaper {
    static REAPER: OnceLock<Reaper> = OnceLock::new();
    REAPER.get_or_init(|| {
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(reap_forever)
            .map_err(|e| crate::log(&format!("cannot start the reaper: {e}")))
            .ok();
        Reaper { registry: Mutex::new(Registry::default()), children: Condvar::new() }
    })
}

/// Start `cmd`; the receiver gets its status in shell convention.
pub(crate) fn spawn(cmd: &mut Command) -> io::Result<(Child, Receiver<i32>)> {
    spawn_inner(cmd, false).map(|(child, rx, _)| (child, rx))
}

/// [`spawn`], with a pidfd of the child (`None` where the kernel has none),
/// which becomes readable when it exits. It is opened before the reaper can
/// reap the child, so it can never name another process.
pub(crate) fn spawn_with_pidfd(cmd: &mut Command) -> io::Result<(Child, Receiver<i32>, Option<OwnedFd>)> {
    spawn_inner(cmd, true)
}

fn spawn_inner(cmd: &mut Command, want_pidfd: bool) -> io::Result<(Child, Receiver<i32>, Option<OwnedFd>)> {
    let r = reaper();
    let mut reg = r.registry.lock().map_err(|_| io::Error::other("reaper registry poisoned"))?;
    let child = cmd.spawn()?;
    let (tx, rx) = channel();
    let pid = i32::try_from(child.id()).map_err(|_| io::Error::other("pid out of range"))?;
    let pidfd = if want_pidfd { pidfd_open(pid) } else { None };
    reg.waiters.insert(pid, tx);
    reg.spawned += 1;
    r.children.notify_all();
    Ok((child, rx, pidfd))
}

fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // (close-on-exec) or -1; nothing is passed by pointer.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd).ok().filter(|&fd| fd >= 0)?;
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    Some(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Shell convention for a wait status, `None` for stops and continues.
pub(crate) fn shell_status(status: WaitStatus) -> Option<(i32, i32)> {
    match status {
        WaitStatus::Exited(pid, code) => Some((pid.as_raw(), code)),
        WaitStatus::Signaled(pid, sig, _) => Some((pid.as_raw(), 128 + sig as i32)),
        _ => None,
    }
}

fn reap_forever() {
    let r = reaper();
    let mut seen = 0;
    loop {
        // Peek at the next exited child without reaping it: std's spawn
        // reaps a child whose exec failed itself (and panics if it cannot),
        // so a child is only reaped once no spawn is in flight, under the lock.
        match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT | WaitPidFlag::__WALL) {
            Ok(peeked) => {
                let Some(pid) = peeked.pid() else { continue };
                let Ok(mut reg) = r.registry.lock() else { continue };
                // ECHILD here: std's spawn already reaped its failed child.
                let Ok(status) = waitpid(pid, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) else { continue };
                if let Some((pid, code)) = shell_status(status) {
                    if let Some(tx) = reg.waiters.remove(&pid) {
                        let _ = tx.send(code);
                    }
                }
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(nix::errno::Errno::ECHILD) => {
                // No children at all: sleep until the next spawn.
                if let Ok(reg) = r.registry.lock() {
                    if let Ok(reg) = r.children.wait_while(reg, |reg| reg.spawned == seen) {
                        seen = reg.spawned;
                    }
                }
            }
            Err(e) => {
                crate::log(&format!("reaper: waitid: {e}"));
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}
