//! The filter of the holder's main thread, installed before it starts any
//! other thread: every later thread inherits it, so it is the union of the
//! vCPU, event-loop and handler lists and what the main thread itself does
//! (and the threads that keep only this filter: the policy loader, the
//! signal thread, the threads that wait for guest processes).
//!
//! How the list was made: the release CLI's holder was run under
//! `strace -f -ff` (two runs: boot; `exec`; DNS and HTTPS to local servers
//! through the handlers; `cp` both ways; `stop`). After `execve`, leaving
//! out what only the dynamic loader and glibc's start did before `main`
//! (`arch_prctl`, `set_tid_address`, `prlimit64`, executable mappings of
//! the libraries), the main thread made:
//! - files: `openat`, `read`, `write`, `close`, `statx`, `newfstatat`,
//!   `getdents64` (image and certificate directories), `mkdir`, `rename`
//!   (the state file), `unlink`, `lseek`, `pread64`, `pwrite64`, `fsync`,
//!   `ftruncate`, `fcntl` (SQLite's locks, `F_GETFL`/`F_SETFL`,
//!   `F_DUPFD_CLOEXEC`), `geteuid` + `fchown` (SQLite as root), `dup2`
//!   (its output to sandbox.log);
//! - the VM's setup: `openat("/dev/kvm")` and the ioctls `KVM_CREATE_VM`,
//!   `KVM_CHECK_EXTENSION`, `KVM_GET_SUPPORTED_CPUID`,
//!   `KVM_GET_VCPU_MMAP_SIZE`, `KVM_SET_TSS_ADDR`,
//!   `KVM_SET_IDENTITY_MAP_ADDR`, `KVM_CREATE_IRQCHIP`, `KVM_CREATE_PIT2`,
//!   `KVM_SET_USER_MEMORY_REGION`, `KVM_IRQFD`, `KVM_IOEVENTFD`,
//!   `KVM_CREATE_VCPU`, `KVM_SET_CPUID2`, `KVM_SET_MSRS`, `KVM_SET_FPU`,
//!   `KVM_GET_LAPIC`/`KVM_SET_LAPIC`, `KVM_GET_SREGS`/`KVM_SET_SREGS`,
//!   `KVM_SET_REGS`; `eventfd2`, `timerfd_create`, `epoll_create1`,
//!   `epoll_ctl`, `mmap` (guest memory, the vCPU's run area);
//!   `rt_sigaction` (the vCPU kick handler, signal-hook);
//! - the agent: `socket(AF_UNIX)`, `connect`, `bind`, `listen` (the vsock
//!   socket), `socketpair`, `setsockopt(SO_RCVTIMEO)`, `sendto`, `recvfrom`,
//!   `poll`, `ioctl(FIONBIO, TCGETS)`;
//! - threads: `clone3` (answered ENOSYS by the filter, so glibc uses
//!   `clone`), `futex`, `clock_nanosleep`, `sysinfo`, `getrandom`,
//!   `getpid`.
//!
//! Added from reading the code: the KVM requests kvm-ioctls may also use
//! during setup (`KVM_GET_API_VERSION`, `KVM_GET_MSR_INDEX_LIST`,
//! `KVM_GET_MSRS`, `KVM_GET_FPU`, `KVM_IRQ_LINE`, `KVM_GET_REGS`),
//! `TIOCGWINSZ`; `dup`/`dup3`, `pipe2`, `getuid`/`getgid`/`getegid`,
//! `uname`, `fchmod`, `mkdirat`, `renameat`/`renameat2`, `unlinkat`,
//! `rmdir`: none of them gives anything the rest does not. (No `wait4`:
//! the holder starts no process.)
//!
//! Added for snapshots: `Vm::restore` sets every saved state on the
//! thread that builds the VM, before any vCPU thread starts:
//! `KVM_SET_MP_STATE`, `KVM_SET_XSAVE`, `KVM_SET_XCRS`,
//! `KVM_SET_DEBUGREGS`, `KVM_SET_VCPU_EVENTS`, `KVM_SET_TSC_KHZ` on each
//! vCPU (with the SETs already listed), then `KVM_SET_PIT2`,
//! `KVM_SET_CLOCK`, `KVM_SET_IRQCHIP` on the VM; it maps the memory file
//! `MAP_PRIVATE` (`openat`, `mmap`). Taking a snapshot opens and sizes the
//! two files on the caller's thread (`openat`, `ftruncate`).
//!
//! Not allowed, for any thread: `execve`/`execveat`, `fork`/`vfork` and
//! `clone` without `CLONE_THREAD`, `ptrace`, `process_vm_readv`/`writev`,
//! `kill` (only `tgkill`), `mount`/`umount2`/`pivot_root`/`chroot`,
//! `setns`/`unshare`, `bpf`, `perf_event_open`, `kexec_*`, modules,
//! `keyctl`, `userfaultfd`, `io_uring_*`, sockets other than AF_UNIX,
//! AF_INET, AF_INET6, executable mappings, uid and capability changes.

use super::rules::{common, fcntls, ioctl, ioctls, sockets, threads, Rules};
use super::{handlers, vcpu, vmm};

/// The holder's list: the union of every thread's.
pub(crate) fn rules() -> Rules {
    let mut r = common();
    r.merge(&vcpu::rules()).merge(&vmm::rules()).merge(&handlers::rules());
    threads(&mut r);
    r.allow(&[
        libc::SYS_rt_sigaction,
        libc::SYS_openat,
        libc::SYS_read,
        libc::SYS_statx,
        libc::SYS_newfstatat,
        libc::SYS_fstat,
        libc::SYS_getdents64,
        libc::SYS_mkdir,
        libc::SYS_mkdirat,
        libc::SYS_rename,
        libc::SYS_renameat,
        libc::SYS_renameat2,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        libc::SYS_rmdir,
        libc::SYS_fchmod,
        libc::SYS_fchown,
        libc::SYS_ftruncate,
        libc::SYS_fsync,
        libc::SYS_dup,
        libc::SYS_dup2,
        libc::SYS_dup3,
        libc::SYS_pipe2,
        libc::SYS_socketpair,
        libc::SYS_eventfd2,
        libc::SYS_timerfd_create,
        libc::SYS_epoll_create1,
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_connect,
        libc::SYS_setsockopt,
        libc::SYS_sysinfo,
        libc::SYS_uname,
        libc::SYS_getuid,
        libc::SYS_geteuid,
        libc::SYS_getgid,
        libc::SYS_getegid,
    ]);
    sockets(&mut r, &[libc::AF_UNIX]);
    r.allow_when(libc::SYS_socketpair, vec![super::rules::eq(0, libc::AF_UNIX as u64)]);
    ioctls(
        &mut r,
        &[
            ioctl::KVM_GET_API_VERSION,
            ioctl::KVM_CREATE_VM,
            ioctl::KVM_GET_MSR_INDEX_LIST,
            ioctl::KVM_CHECK_EXTENSION,
            ioctl::KVM_GET_VCPU_MMAP_SIZE,
            ioctl::KVM_GET_SUPPORTED_CPUID,
            ioctl::KVM_CREATE_VCPU,
            ioctl::KVM_SET_USER_MEMORY_REGION,
            ioctl::KVM_SET_TSS_ADDR,
            ioctl::KVM_SET_IDENTITY_MAP_ADDR,
            ioctl::KVM_CREATE_IRQCHIP,
            ioctl::KVM_IRQ_LINE,
            ioctl::KVM_IRQFD,
            ioctl::KVM_CREATE_PIT2,
            ioctl::KVM_IOEVENTFD,
            ioctl::KVM_SET_REGS,
            ioctl::KVM_SET_SREGS,
            ioctl::KVM_GET_MSRS,
            ioctl::KVM_SET_MSRS,
            ioctl::KVM_GET_FPU,
            ioctl::KVM_SET_FPU,
            ioctl::KVM_GET_LAPIC,
            ioctl::KVM_SET_LAPIC,
            ioctl::KVM_SET_CPUID2,
            // Vm::restore (see the module docs).
            ioctl::KVM_SET_MP_STATE,
            ioctl::KVM_SET_XSAVE,
            ioctl::KVM_SET_XCRS,
            ioctl::KVM_SET_DEBUGREGS,
            ioctl::KVM_SET_VCPU_EVENTS,
            ioctl::KVM_SET_TSC_KHZ,
            ioctl::KVM_SET_PIT2,
            ioctl::KVM_SET_CLOCK,
            ioctl::KVM_SET_IRQCHIP,
            ioctl::TCGETS,
            ioctl::TIOCGWINSZ,
            ioctl::FIONCLEX,
        ],
    );
    fcntls(&mut r, &[libc::F_DUPFD, libc::F_DUPFD_CLOEXEC]);
    r
}
