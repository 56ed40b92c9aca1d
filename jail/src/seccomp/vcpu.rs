//! The filter of a vCPU thread (`vcpu0`, `vcpu1`, ...): it runs the guest
//! and handles its port and MMIO exits, nothing more.
//!
//! How the list was made: the release CLI's holder was run under
//! `strace -f -ff` (two runs: boot; `exec`; DNS lookups, an allowed HTTPS
//! GET and POST and a refused one, to a local upstream on 127.83.0.1
//! through the handlers; `cp` both ways; `stop`) and the threads were told
//! apart by their `prctl(PR_SET_NAME)`. After its start (`rseq`,
//! `set_robust_list`, naming, the signal stack) a vCPU thread made:
//! `rt_sigprocmask` (unblocking the kick signal), `ioctl(KVM_RUN)` (1182 of
//! them), `rt_sigreturn` (the kick), `write` (8-byte writes to irqfds and
//! the event loop's eventfds), `close` (a virtio device reset by the
//! guest), and at its end `munmap`, `madvise`, `exit`.
//!
//! Then the code was read (vmm/src/vstate/vcpu.rs, devices/virtio/mmio.rs,
//! devices/virtio/vsock/muxer.rs) for what the run did not reach:
//! - all vCPU setup (`KVM_CREATE_VCPU`, `KVM_SET_CPUID2`, `KVM_SET_MSRS`,
//!   `KVM_SET_REGS`/`SREGS`/`FPU`/`LAPIC`) happens in `Vm::create` on the
//!   thread that creates the VM, not here; so the only KVM requests here are
//!   `KVM_RUN` and, to describe a failed entry or an unexpected exit,
//!   `KVM_GET_REGS`, `KVM_GET_SREGS` and `KVM_TRANSLATE`;
//! - the guest writing a virtio-mmio status activates or resets a device on
//!   this thread: a vsock reset drops its connections (`close`,
//!   `epoll_ctl` to deregister them, `shutdown`), re-arms its timer
//!   (`timerfd_settime`); a device's lock is a `futex`; an eventfd may be
//!   drained (`read`);
//! - the serial port and i8042 write to the console sink and the exit
//!   eventfd (`write`).
//!
//! - a device activated by that write starts serving at once, on this
//!   thread: the vsock device accepts the host clients that connected to
//!   `vsock.sock` while the guest booted (`accept4`, `fcntl(F_SETFL)`,
//!   `epoll_ctl`, `timerfd_settime`), which the traced runs did not hit
//!   and a loaded host does. So a vCPU may do whatever a device does on the
//!   event loop ([`super::vmm`]'s list), and runs the guest besides.
//!
//! - a snapshot (vmm/src/snapshot, `VmController::snapshot`) pauses each
//!   vCPU on its own thread: one more `KVM_RUN` (with `immediate_exit`),
//!   then the thread reads its own state: `KVM_GET_MP_STATE`,
//!   `KVM_GET_REGS`, `KVM_GET_SREGS`, `KVM_GET_XSAVE` (or `KVM_GET_XSAVE2`
//!   where the area is larger), `KVM_GET_XCRS`, `KVM_GET_DEBUGREGS`,
//!   `KVM_GET_LAPIC`, `KVM_GET_CPUID2`, `KVM_GET_TSC_KHZ`, `KVM_GET_MSRS`,
//!   `KVM_GET_VCPU_EVENTS`, and waits (`futex`) until the pause ends. Only
//!   reads: every SET of a restore happens before the vCPU threads start.
//!
//! Not allowed, among others: opening anything, sockets other than Unix,
//! `clone` (a vCPU starts no thread), `rt_sigaction`, any other ioctl,
//! `execve`, `kill`.

use super::rules::{ioctl, ioctls, Rules};

/// The vCPU thread's list.
pub(crate) fn rules() -> Rules {
    let mut r = super::vmm::rules();
    ioctls(&mut r, &[ioctl::KVM_RUN, ioctl::KVM_GET_REGS, ioctl::KVM_GET_SREGS, ioctl::KVM_TRANSLATE]);
    // A snapshot's reads of the vCPU's own state (see the module docs).
    ioctls(
        &mut r,
        &[
            ioctl::KVM_GET_MP_STATE,
            ioctl::KVM_GET_XSAVE,
            ioctl::KVM_GET_XSAVE2,
            ioctl::KVM_GET_XCRS,
            ioctl::KVM_GET_DEBUGREGS,
            ioctl::KVM_GET_LAPIC,
            ioctl::KVM_GET_CPUID2,
            ioctl::KVM_GET_TSC_KHZ,
            ioctl::KVM_GET_MSRS,
            ioctl::KVM_GET_VCPU_EVENTS,
        ],
    );
    r
}
