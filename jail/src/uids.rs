//! A uid (and the gid of the same number) of its own for each sandbox's holder.
//!
//! With its own uid, a holder that a guest has taken over can neither signal,
//! `ptrace` nor read the files of another sandbox's holder, and
//! `RLIMIT_NPROC` becomes a per-sandbox limit. Uids are leased from a range
//! that no user or system account uses; a lease is an exclusive `flock` on
//! `<lock dir>/<uid>.lock`, so it needs no shared state beyond a directory and
//! ends by itself when every process holding the lock file has exited.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;

use crate::Error;

/// A range of uids to lease from; each uid is used as the gid too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    first: u32,
    count: u32,
}

impl UidRange {
    /// The first uid of the default range: above the ids distributions give to
    /// users and system accounts (below 60000) and above the subordinate ids
    /// `useradd` hands out for user namespaces by default (100000 + 65536 per
    /// user, so the first 13 or so users); well below the 32-bit limit.
    pub const DEFAULT_FIRST: u32 = 1_000_000;
    /// The size of the default range: 65536 sandboxes at once.
    pub const DEFAULT_COUNT: u32 = 65_536;

    /// The uids `first .. first + count`. Fails if the range is empty,
    /// includes 0 (root) or goes past `u32::MAX - 1` (`-1` means "unchanged"
    /// to `setresuid`).
    pub fn new(first: u32, count: u32) -> Result<Self, Error> {
        if count == 0 || first == 0 || first.checked_add(count).is_none_or(|end| end > u32::MAX - 1) {
            return Err(Error::Unsupported(format!(
                "uid range {first}+{count} must be non-empty, exclude 0 and end below {}",
                u32::MAX
            )));
        }
        Ok(UidRange { first, count })
    }

    /// The first uid of the range.
    pub fn first(&self) -> u32 {
        self.first
    }

    /// How many uids the range holds.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Whether `uid` is in the range.
    pub fn contains(&self, uid: u32) -> bool {
        uid >= self.first && uid - self.first < self.count
    }

    /// Leases a uid of the range that no other lease (in any process) holds,
    /// using lock files in `lock_dir` (created, mode 0700, if missing; it must
    /// be the same directory for every user of the range).
    ///
    /// Starts at a random uid of the range so concurrent callers rarely try the
    /// same ones; fails with a clear error when every uid is leased.
    pub fn lease(&self, lock_dir: &Path) -> Result<UidLease, Error> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(lock_dir)
            .map_err(|e| Error::io(format!("creating uid lock directory {}", lock_dir.display()), e))?;
        let start = random_u32() % self.count;
        for i in 0..self.count {
            let uid = self.first + (start + i) % self.count;
            let path = lock_dir.join(format!("{uid}.lock"));
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)
                .map_err(|e| Error::io(format!("opening uid lock file {}", path.display()), e))?;
            // SAFETY: flock on a descriptor `file` owns.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                tracing::debug!(uid, "uid leased");
                return Ok(UidLease { uid, file, path });
            }
            match Errno::last() {
                Errno::EWOULDBLOCK => continue,
                e => return Err(Error::sys(format!("flock({})", path.display()), e)),
            }
        }
        Err(Error::Unsupported(format!(
            "all {} uids of the range {}..{} are leased (lock files in {}): too many sandboxes at once, \
             or a larger range is needed",
            self.count,
            self.first,
            u64::from(self.first) + u64::from(self.count),
            lock_dir.display()
        )))
    }
}

impl Default for UidRange {
    /// [`UidRange::DEFAULT_FIRST`], [`UidRange::DEFAULT_COUNT`] uids.
    fn default() -> Self {
        UidRange { first: Self::DEFAULT_FIRST, count: Self::DEFAULT_COUNT }
    }
}

/// A leased uid (and gid of the same number), reserved as long as the lock
/// file's descriptor is open in some process: this lease, or a process that
/// inherited it (see [`UidLease::set_inheritable`]).
#[derive(Debug)]
pub struct UidLease {
    uid: u32,
    file: File,
    path: PathBuf,
}

impl UidLease {
    /// The leased uid.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// The gid that goes with it: the same number.
    pub fn gid(&self) -> u32 {
        self.uid
    }

    /// The lock file that holds the lease.
    pub fn lock_path(&self) -> &Path {
        &self.path
    }

    /// Whether the lock file's descriptor survives `execve`, so a holder
    /// process started by the lease's owner keeps the uid reserved for its own
    /// lifetime even after the owner drops the lease (the lock belongs to the
    /// open file, shared by every inherited copy of the descriptor). Off by
    /// default.
    pub fn set_inheritable(&self, inheritable: bool) -> Result<(), Error> {
        let flags = if inheritable { nix::fcntl::FdFlag::empty() } else { nix::fcntl::FdFlag::FD_CLOEXEC };
        nix::fcntl::fcntl(&self.file, nix::fcntl::FcntlArg::F_SETFD(flags))
            .map_err(|e| Error::sys("fcntl(F_SETFD) on the uid lock file", e))?;
        Ok(())
    }
}

impl AsFd for UidLease {
    /// The lock file's descriptor (to pass to a child process).
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for UidLease {
    /// The lock file's descriptor number (to name it to a child process).
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// A random number, for the starting point of a lease search; falls back on
/// the clock and pid when `getrandom` is unavailable.
fn random_u32() -> u32 {
    let mut buf = [0u8; 4];
    // SAFETY: getrandom writes at most buf.len() bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), libc::GRND_NONBLOCK) };
    if n == 4 {
        return u32::from_ne_bytes(buf);
    }
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    nanos ^ std::process::id().rotate_left(16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked() {
        assert!(UidRange::new(0, 10).is_err());
        assert!(UidRange::new(5, 0).is_err());
        assert!(UidRange::new(u32::MAX - 5, 10).is_err());
        let r = UidRange::new(100, 2).unwrap();
        assert!(r.contains(100) && r.contains(101) && !r.contains(102) && !r.contains(99));
        let d = UidRange::default();
        assert_eq!((d.first(), d.count()), (1_000_000, 65_536));
    }

    #[test]
    fn leases_differ_and_are_reused_after_drop() {
        let dir = tempfile::tempdir().unwrap();
        let range = UidRange::new(2_000_000, 2).unwrap();
        let a = range.lease(dir.path()).unwrap();
        let b = range.lease(dir.path()).unwrap();
        assert_ne!(a.uid(), b.uid());
        assert!(range.contains(a.uid()) && range.contains(b.uid()));
        assert_eq!(a.gid(), a.uid());

        let err = range.lease(dir.path()).unwrap_err().to_string();
        assert!(err.contains("all 2 uids"), "{err}");

        let freed = a.uid();
        drop(a);
        let c = range.lease(dir.path()).unwrap();
        assert_eq!(c.uid(), freed);
    }

    #[test]
    fn inheritable_toggles_cloexec() {
        let dir = tempfile::tempdir().unwrap();
        let lease = UidRange::new(3_000_000, 4).unwrap().lease(dir.path()).unwrap();
        let cloexec = |l: &UidLease| {
            let flags = nix::fcntl::fcntl(l, nix::fcntl::FcntlArg::F_GETFD).unwrap();
            nix::fcntl::FdFlag::from_bits_truncate(flags).contains(nix::fcntl::FdFlag::FD_CLOEXEC)
        };
        assert!(cloexec(&lease));
        lease.set_inheritable(true).unwrap();
        assert!(!cloexec(&lease));
        lease.set_inheritable(false).unwrap();
        assert!(cloexec(&lease));
    }
}
