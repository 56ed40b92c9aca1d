//! The filter of the VM's device event loop (the thread `vm-<id>`, running
//! `Vm::run`): virtio block and vsock, serial input, the i8042, over one
//! epoll loop; it also stops and joins the vCPU threads.
//!
//! How the list was made: the release CLI's holder was run under
//! `strace -f -ff` (two runs: boot; `exec`; DNS lookups, HTTPS to a local
//! upstream through the handlers; `cp` both ways; `stop`), threads told
//! apart by their `prctl(PR_SET_NAME)`. The event-loop thread made:
//! `epoll_wait`, `epoll_ctl`, `read`, `write`, `lseek` (the block device
//! reads and writes its image at an offset), `recvfrom`, `sendto`,
//! `accept4`, `socket(AF_UNIX)` + `connect` (guest connections to the
//! handlers' `vsock.sock_<port>`), `shutdown`, `close`, `ioctl(FIONBIO)`
//! (std's `set_nonblocking` on accepted streams), `timerfd_settime` (the
//! vsock timer), `unlink` (the vsock socket, when the device is dropped),
//! and while stopping the vCPUs: `getpid` + `tgkill` (the kick signal),
//! `clock_nanosleep`, `futex` (join). It also made `clone3` once: `Vm::run`
//! starts the vCPU threads on this thread, which is why this filter must be
//! installed after `VcpuThreads::start` (see the module docs).
//!
//! Added from reading vmm/src/devices: `readv`/`writev`, `pread64`/`pwrite64`
//! and their vector forms, `fsync`/`fdatasync` (block flush requests),
//! `recvmsg`/`sendmsg`, `getsockopt` (a connection's error),
//! `epoll_pwait` (the same wait through other libc paths), `fcntl`
//! (`F_GETFL`/`F_SETFL`: non-blocking streams, `F_GETFD`/`F_SETFD`),
//! `timerfd_gettime`.
//!
//! Added for snapshots (vmm/src/snapshot): the loop serves a
//! `VmController::snapshot` request between two device events. With the
//! vCPUs paused it reads the VM-wide state, `KVM_GET_IRQCHIP`,
//! `KVM_GET_PIT2` and `KVM_GET_CLOCK`, and writes the files the caller
//! opened (`pwrite64` for the memory pages, `write` for the state file),
//! all already allowed but these three ioctls.
//!
//! Not allowed: opening files, sockets other than AF_UNIX, `bind`/`listen`
//! (the listener exists before the loop starts), `clone`, KVM ioctls other
//! than the snapshot's three reads (the VM is set up by then),
//! `rt_sigaction`, `execve`, `kill`.

use super::rules::{common, fcntls, ioctl, ioctls, sockets, Rules};

/// The event-loop thread's list.
pub(crate) fn rules() -> Rules {
    let mut r = common();
    r.allow(&[
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_ctl,
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_lseek,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_accept4,
        libc::SYS_connect,
        libc::SYS_recvfrom,
        libc::SYS_recvmsg,
        libc::SYS_sendto,
        libc::SYS_sendmsg,
        libc::SYS_shutdown,
        libc::SYS_getsockopt,
        libc::SYS_timerfd_settime,
        libc::SYS_timerfd_gettime,
        libc::SYS_unlink,
    ]);
    sockets(&mut r, &[libc::AF_UNIX]);
    ioctls(&mut r, &[ioctl::FIONBIO, ioctl::FIOCLEX]);
    // A snapshot's reads of the VM-wide state (see the module docs).
    ioctls(&mut r, &[ioctl::KVM_GET_IRQCHIP, ioctl::KVM_GET_PIT2, ioctl::KVM_GET_CLOCK]);
    fcntls(&mut r, &[libc::F_GETFL, libc::F_SETFL, libc::F_GETFD, libc::F_SETFD]);
    r
}
