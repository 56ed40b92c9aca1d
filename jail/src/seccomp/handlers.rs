//! The filter of the host handlers: the thread `handlers-<id>` (it owns
//! the tokio runtime and runs `block_on`), the runtime's workers and
//! blocking threads (all named `net`), and the session database's writer
//! (`session-db-writer`, rusqlite with bundled SQLite). DNS (hickory), the
//! TLS interception (rustls, ring) and the upstream client (hyper) run on
//! them: the code that parses what the guest sends, over Unix sockets, and
//! talks to upstreams over TCP and UDP.
//!
//! How the list was made: the release CLI's holder was run under
//! `strace -f -ff` (two runs: boot; `exec`; DNS A and AAAA lookups through
//! a local DNS server on 127.0.0.1; an HTTPS GET and POST allowed to a
//! local upstream on 127.83.0.1 (own CA), one refused by the policy, one
//! failing certificate verification; `cp` both ways; `stop`), threads told
//! apart by their `prctl(PR_SET_NAME)`. These threads made:
//! - `net`: `epoll_wait`, `epoll_ctl`, `futex`, `sched_yield`, `write`
//!   (the runtime's eventfd waker), `writev`, `recvfrom`, `sendto`,
//!   `accept4`, `socket(AF_INET, SOCK_DGRAM|SOCK_STREAM)`, `bind`,
//!   `connect`, `getsockopt(SO_ERROR)`, `setsockopt(TCP_NODELAY)`,
//!   `getpeername`, `shutdown`, `close`, `getrandom` (ring, rustls);
//! - `handlers-<id>`: `socket(AF_UNIX)`, `bind`, `listen` (the
//!   `vsock.sock_<port>` listeners), `epoll_ctl`, `unlink`, `futex`, `brk`;
//! - `session-db-writer`: `pwrite64`, `pread64`, `fcntl(F_SETLK, F_GETLK)`
//!   (SQLite's locks), `fsync`, `ftruncate`, `newfstatat`, `unlink` (the
//!   rollback journal), `clock_nanosleep`, `futex`.
//!
//! Added from reading the libraries, for paths the runs did not take:
//! `socket(AF_INET6)` (IPv6 upstreams and DNS servers), `recvmsg`/`sendmsg`
//! and their `mmsg` forms (UDP), `getsockname`, `poll`/`ppoll`; tokio's
//! blocking pool starting threads (`clone` with `CLONE_THREAD` only); SQLite:
//! `openat` (journal and WAL files, reopening the database: which paths can
//! be opened is the mount namespace's business), `read`, `lseek`,
//! `fdatasync`, `fallocate`, `fstat`, `statx`, `access`, `getcwd`,
//! `readlink`, `geteuid` + `fchown` (SQLite running as root gives a new
//! journal or WAL file the database's owner; seen on the thread that opened
//! the database), `fcntl` lock and flag
//! commands (`F_SETLKW`, `F_OFD_*`, `F_GETFL`/`F_SETFL`, `F_GETFD`/`F_SETFD`,
//! `F_DUPFD_CLOEXEC`); mio and std: `ioctl(FIONBIO, FIONREAD, FIOCLEX)`,
//! `epoll_pwait`; `eventfd2`/`epoll_create1` (a runtime built on this
//! thread).
//!
//! Not allowed: AF_NETLINK, AF_PACKET and other families, `execve`,
//! `ptrace`, `fork`-style `clone`, `kill`, `mount`, `bpf`, `process_vm_*`,
//! `rt_sigaction`, KVM ioctls, `mkdir`, `rename`.

use super::rules::{common, fcntls, ioctl, ioctls, sockets, threads, Rules};

/// The handlers' list.
pub(crate) fn rules() -> Rules {
    let mut r = common();
    threads(&mut r);
    r.allow(&[
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_create1,
        libc::SYS_eventfd2,
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_lseek,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_ftruncate,
        libc::SYS_fallocate,
        libc::SYS_openat,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_access,
        libc::SYS_getcwd,
        libc::SYS_readlink,
        libc::SYS_geteuid,
        libc::SYS_fchown,
        libc::SYS_unlink,
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_accept4,
        libc::SYS_connect,
        libc::SYS_getsockname,
        libc::SYS_getpeername,
        libc::SYS_getsockopt,
        libc::SYS_setsockopt,
        libc::SYS_shutdown,
        libc::SYS_recvfrom,
        libc::SYS_recvmsg,
        libc::SYS_recvmmsg,
        libc::SYS_sendto,
        libc::SYS_sendmsg,
        libc::SYS_sendmmsg,
    ]);
    sockets(&mut r, &[libc::AF_UNIX, libc::AF_INET, libc::AF_INET6]);
    ioctls(&mut r, &[ioctl::FIONBIO, ioctl::FIONREAD, ioctl::FIOCLEX]);
    fcntls(
        &mut r,
        &[
            libc::F_GETFL,
            libc::F_SETFL,
            libc::F_GETFD,
            libc::F_SETFD,
            libc::F_DUPFD_CLOEXEC,
            libc::F_GETLK,
            libc::F_SETLK,
            libc::F_SETLKW,
            libc::F_OFD_GETLK,
            libc::F_OFD_SETLK,
            libc::F_OFD_SETLKW,
        ],
    );
    r
}
