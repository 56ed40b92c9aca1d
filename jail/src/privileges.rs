//! Giving up root: the holder's own uid and gid, no capabilities (now or ever),
//! no other open files, and resource limits.
//!
//! The usual order in the inner process, after [`crate::root::JailRoot::enter`]:
//! [`set_rlimits`] (raising a hard limit needs root), [`close_other_fds`], then
//! [`drop_privileges`], all before any thread is started.

use std::os::fd::RawFd;

use nix::errno::Errno;
use nix::unistd::{Gid, Uid};

use crate::Error;

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit capability sets as two 32-bit words.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The highest capability number this kernel knows, from
/// `/proc/sys/kernel/cap_last_cap`, or by probing `PR_CAPBSET_READ` when
/// `/proc` is not mounted (as in a jail without [`crate::root::JailRoot::proc`]).
fn cap_last_cap() -> u32 {
    let from_proc = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap").ok().and_then(|t| t.trim().parse().ok());
    if let Some(n) = from_proc {
        return n;
    }
    let mut last = 0;
    for cap in 0..64u32 {
        // SAFETY: PR_CAPBSET_READ only reads the calling thread's bounding set.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_READ, libc::c_ulong::from(cap), 0, 0, 0) };
        if rc < 0 {
            break;
        }
        last = cap;
    }
    last
}

fn prctl(what: &str, option: libc::c_int, arg2: libc::c_ulong, arg3: libc::c_ulong) -> Result<libc::c_int, Error> {
    // SAFETY: every option used in this module takes integer arguments only.
    let rc = unsafe { libc::prctl(option, arg2, arg3, 0 as libc::c_ulong, 0 as libc::c_ulong) };
    if rc < 0 {
        Err(Error::sys(what, Errno::last()))
    } else {
        Ok(rc)
    }
}

fn capget() -> Result<[CapData; 2], Error> {
    let mut header = CapHeader { version: CAPABILITY_VERSION_3, pid: 0 };
    let mut data = [CapData::default(); 2];
    // SAFETY: header and data are valid for the version-3 layout (two data
    // structs) and outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header as *mut CapHeader, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(Error::sys("capget", Errno::last()));
    }
    Ok(data)
}

/// Makes the calling process run as `uid`:`gid` (real, effective and saved,
/// with `gid` as its only group) and gives up every capability for good.
///
/// In order: empties the capability bounding set (so no later `execve` of a
/// set-uid or file-capability program can give any back; this needs
/// `CAP_SETPCAP`, so comes first), sets the groups, gids and uids, clears the
/// ambient, effective, permitted and inheritable sets, sets
/// `PR_SET_NO_NEW_PRIVS` (no `execve` can raise privileges; also what lets a
/// seccomp filter be installed without privileges), and `PR_SET_DUMPABLE` 0.
///
/// Not dumpable means: no core dumps (which would hold guest memory), and
/// other processes of the same uid cannot `ptrace` it or read its
/// `/proc/<pid>/mem`. The trade-off: its `/proc/self` files become root's, so
/// it can no longer read some of them itself (`/proc/self/fd`, `/proc/self/mem`;
/// `/proc/self/status` stays readable), and debuggers need root.
///
/// Then checks the result through the kernel (`capget`, `PR_CAPBSET_READ`,
/// `PR_CAP_AMBIENT_IS_SET`, `PR_GET_NO_NEW_PRIVS`, `getresuid`/`getresgid`) and,
/// when `/proc` is mounted, in `/proc/self/status`; any leftover is an error.
///
/// Capabilities are per thread: the process must be single-threaded (checked),
/// so every thread started afterwards inherits the empty sets.
pub fn drop_privileges(uid: u32, gid: u32) -> Result<(), Error> {
    crate::namespaces::require_single_threaded("dropping privileges")?;
    if uid == 0 || gid == 0 {
        return Err(Error::Unsupported("dropping privileges to uid or gid 0 would drop nothing".into()));
    }
    let last = cap_last_cap();
    for cap in 0..=last {
        match prctl("prctl(PR_CAPBSET_DROP)", libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0) {
            Ok(_) => {}
            // A capability this kernel does not know: nothing to drop.
            Err(Error::Sys { source: Errno::EINVAL, .. }) => {}
            Err(e) => return Err(e),
        }
    }

    let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
    nix::unistd::setgroups(&[gid]).map_err(|e| Error::sys("setgroups", e))?;
    nix::unistd::setresgid(gid, gid, gid).map_err(|e| Error::sys("setresgid", e))?;
    nix::unistd::setresuid(uid, uid, uid).map_err(|e| Error::sys("setresuid", e))?;

    prctl("prctl(PR_CAP_AMBIENT_CLEAR_ALL)", libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong, 0)?;
    let mut header = CapHeader { version: CAPABILITY_VERSION_3, pid: 0 };
    let data = [CapData::default(); 2];
    // SAFETY: header and data are valid for the version-3 layout (two data
    // structs) and outlive the call; capset only reads them.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut CapHeader, data.as_ptr()) };
    if rc != 0 {
        return Err(Error::sys("capset to empty sets", Errno::last()));
    }
    prctl("prctl(PR_SET_NO_NEW_PRIVS)", libc::PR_SET_NO_NEW_PRIVS, 1, 0)?;
    prctl("prctl(PR_SET_DUMPABLE, 0)", libc::PR_SET_DUMPABLE, 0, 0)?;

    verify(uid, gid, last)?;
    tracing::debug!(uid = uid.as_raw(), gid = gid.as_raw(), "privileges dropped");
    Ok(())
}

fn verify(uid: Uid, gid: Gid, last: u32) -> Result<(), Error> {
    let fail = |what: String| Err(Error::Unsupported(format!("privileges were not fully dropped: {what}")));
    let ids = nix::unistd::getresuid().map_err(|e| Error::sys("getresuid", e))?;
    if [ids.real, ids.effective, ids.saved] != [uid; 3] {
        return fail(format!("uids are {ids:?}"));
    }
    let gids = nix::unistd::getresgid().map_err(|e| Error::sys("getresgid", e))?;
    if [gids.real, gids.effective, gids.saved] != [gid; 3] {
        return fail(format!("gids are {gids:?}"));
    }
    for (i, d) in capget()?.iter().enumerate() {
        if d.effective != 0 || d.permitted != 0 || d.inheritable != 0 {
            return fail(format!("capability word {i} still set"));
        }
    }
    for cap in 0..=last {
        let c = libc::c_ulong::from(cap);
        if prctl("prctl(PR_CAPBSET_READ)", libc::PR_CAPBSET_READ, c, 0)? != 0 {
            return fail(format!("capability {cap} still in the bounding set"));
        }
        let ambient = prctl(
            "prctl(PR_CAP_AMBIENT_IS_SET)",
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_IS_SET as libc::c_ulong,
            c,
        )?;
        if ambient != 0 {
            return fail(format!("capability {cap} still ambient"));
        }
    }
    if prctl("prctl(PR_GET_NO_NEW_PRIVS)", libc::PR_GET_NO_NEW_PRIVS, 0, 0)? != 1 {
        return fail("no_new_privs is not set".into());
    }
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        check_status(&status).or_else(fail)?;
    }
    Ok(())
}

/// The value of `key` in a `/proc/<pid>/status` text, trimmed.
pub(crate) fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status.lines().find_map(|line| line.strip_prefix(key)?.strip_prefix(':')).map(str::trim)
}

/// Checks the capability lines of a `/proc/<pid>/status` text are all zero
/// and `NoNewPrivs` is 1; returns what is not.
fn check_status(status: &str) -> Result<(), String> {
    let field =
        |key| status_field(status, key).ok_or_else(|| "/proc/self/status lacks some capability lines".to_string());
    for key in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        let value = field(key)?;
        if value.chars().any(|c| c != '0') {
            return Err(format!("/proc/self/status has {key}: {value}"));
        }
    }
    match field("NoNewPrivs")? {
        "1" => Ok(()),
        value => Err(format!("/proc/self/status has NoNewPrivs: {value}")),
    }
}

/// Closes every file descriptor of the process except 0, 1, 2 and `keep`, so
/// nothing the parent left open (by mistake or not) is reachable from the
/// jail.
///
/// Uses `close_range` (Linux 5.9), falling back to listing `/proc/self/fd`.
/// Must run before anything else in the process holds descriptors it still
/// needs (it is meant for the start of the inner process).
pub fn close_other_fds(keep: &[RawFd]) -> Result<(), Error> {
    let mut keep: Vec<u32> = keep.iter().filter_map(|&fd| u32::try_from(fd).ok()).chain([0, 1, 2]).collect();
    keep.sort_unstable();
    keep.dedup();
    // Ranges between kept descriptors: [k+1, next-1], and after the last one.
    let mut ranges = Vec::new();
    for pair in keep.windows(2) {
        if pair[1] > pair[0] + 1 {
            ranges.push((pair[0] + 1, pair[1] - 1));
        }
    }
    if let Some(&last) = keep.last() {
        ranges.push((last + 1, u32::MAX));
    }
    for (first, last) in ranges {
        // SAFETY: close_range only closes descriptors; the caller asked for
        // every one outside `keep` to be closed.
        let rc = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
        if rc != 0 {
            let err = Errno::last();
            if err == Errno::ENOSYS {
                return close_listed_fds(&keep);
            }
            return Err(Error::sys(format!("close_range({first}, {last})"), err));
        }
    }
    Ok(())
}

fn close_listed_fds(keep: &[u32]) -> Result<(), Error> {
    let dir = std::fs::read_dir("/proc/self/fd").map_err(|e| Error::io("listing /proc/self/fd", e))?;
    // Collect first: the directory's own descriptor is among those listed.
    let fds: Vec<u32> = dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
    for fd in fds {
        if !keep.contains(&fd) {
            let Ok(fd) = RawFd::try_from(fd) else { continue };
            // SAFETY: closing a descriptor the caller asked to be closed; an
            // already closed one (the listing's) only yields EBADF.
            unsafe { libc::close(fd) };
        }
    }
    Ok(())
}

fn set_rlimit(what: &str, resource: libc::__rlimit_resource_t, value: u64) -> Result<(), Error> {
    let limit = libc::rlimit { rlim_cur: value, rlim_max: value };
    // SAFETY: setrlimit reads a valid rlimit struct.
    if unsafe { libc::setrlimit(resource, &limit) } != 0 {
        return Err(Error::sys(format!("setrlimit({what}, {value})"), Errno::last()));
    }
    Ok(())
}

/// Sets the process's resource limits, soft and hard (so they cannot be
/// raised again after [`drop_privileges`]):
///
/// - `RLIMIT_NOFILE` to `nofile`: open files, per process.
/// - `RLIMIT_CORE` to 0: no core dumps (they would hold guest memory).
/// - `RLIMIT_NPROC` to `nproc` if given: counted per real uid over the whole
///   host, and threads count, so with a uid of its own per sandbox (see
///   [`crate::uids`]) it caps the holder's threads and processes. The check is
///   made at `clone` time and not for root, so it takes effect once the
///   privileges are dropped.
pub fn set_rlimits(nofile: u64, nproc: Option<u64>) -> Result<(), Error> {
    set_rlimit("RLIMIT_NOFILE", libc::RLIMIT_NOFILE, nofile)?;
    set_rlimit("RLIMIT_CORE", libc::RLIMIT_CORE, 0)?;
    if let Some(nproc) = nproc {
        set_rlimit("RLIMIT_NPROC", libc::RLIMIT_NPROC, nproc)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_check_wants_zero_caps_and_no_new_privs() {
        let good = "Name:\tx\nCapInh:\t0000000000000000\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\n\
                    CapBnd:\t0000000000000000\nCapAmb:\t0000000000000000\nNoNewPrivs:\t1\n";
        assert_eq!(check_status(good), Ok(()));
        assert!(check_status(&good.replace("CapBnd:\t0000000000000000", "CapBnd:\t000001ffffffffff")).is_err());
        assert!(check_status(&good.replace("NoNewPrivs:\t1", "NoNewPrivs:\t0")).is_err());
        assert!(check_status("Name:\tx\n").is_err());
    }

    #[test]
    fn cap_last_cap_is_known() {
        assert!(cap_last_cap() >= 37);
    }
}
