//! seccomp filters, one per thread type of the holder process.
//!
//! Each thread of the holder gets a list of the system calls its job needs,
//! with argument tests where they matter (`ioctl` requests, `socket`
//! families, `clone` only for threads, `prctl` only to name a thread,
//! mappings never executable). A call outside the list sends the thread
//! SIGSYS (`SECCOMP_RET_TRAP`, as Firecracker does); the handler from
//! [`install_violation_reporter`] says which call on which thread on
//! stderr and ends the process with [`BAD_SYSCALL_STATUS`]. (A forbidden
//! call made while SIGSYS is blocked, as glibc blocks every signal around
//! the `clone` of `pthread_create`, kills the process with SIGSYS instead,
//! without a report.) `clone3`
//! always fails with ENOSYS: a filter cannot read its flags (they are
//! behind a pointer), and glibc then starts threads with `clone`, whose
//! flags it can.
//!
//! The lists, one reviewed file each, say how they were derived:
//! - [`ThreadKind::Vcpu`] (`vcpu.rs`): `KVM_RUN` and the vCPU's exits;
//! - [`ThreadKind::Vmm`] (`vmm.rs`): the device event loop `vm-<id>`;
//! - [`ThreadKind::Handlers`] (`handlers.rs`): the handlers' tokio threads
//!   (`handlers-<id>`, `net`) and the session database writer;
//! - [`ThreadKind::Holder`] (`holder.rs`): the main thread, and the union
//!   of all the others.
//!
//! # Stacking
//!
//! Filters stack: a thread started after a filter is installed inherits
//! it, a thread may add filters of its own, and the kernel runs all of a
//! thread's filters on each call, the strictest answer winning (a trap
//! beats an error, which beats allowing). So a thread can only ever narrow
//! what it may do. The holder uses that in two steps:
//!
//! 1. its main thread calls [`install_violation_reporter`], then
//!    [`install`]`(ThreadKind::Holder)` before it starts any thread
//!    (after the rest of the jail is set up, and after anything that needs
//!    more, such as pulling an image): every thread started later has at
//!    most the union of what the threads need;
//! 2. each thread calls [`install`] with its own kind first thing when it
//!    starts, before it handles anything from the guest (a vCPU thread
//!    before its first `KVM_RUN`). Its effective list is then the
//!    intersection: `Holder` ∩ its own.
//!
//! The order matters where a thread starts others: a thread's children
//! inherit its narrowed filter. The VM thread starts the vCPU threads, so it
//! must install [`ThreadKind::Vmm`] after starting them (the Vmm list has no
//! `KVM_RUN` and no `clone`); tokio's worker and blocking threads may be
//! started by threads that already have the Handlers filter, and adding
//! the same filter again changes nothing (every list allows a thread to add
//! a filter, which can only narrow). [`install`] affects the calling thread
//! only: `apply_filter` without TSYNC, after `PR_SET_NO_NEW_PRIVS` (which
//! seccompiler sets, and which installing a filter without `CAP_SYS_ADMIN`
//! requires).
//!
//! # Where the calls go
//!
//! Only a process that exists to hold a sandbox installs filters (a
//! holder: `sandbox-holder` or `sandbox holder`, started by
//! `SandboxBuilder::spawn`, or the CLI's foreground `run`), never a program
//! that embeds the library:
//! - [`install_violation_reporter`] and `install(Holder)`: src/confine.rs,
//!   `confine`, in the jailed child once its root and privileges are set
//!   (after the image is resolved: pulling an image resolves names through
//!   NSS, which maps libraries executable), before `Instance::start` starts
//!   any thread;
//! - `install(Vcpu)`: at the top of the closure of each `vcpu<n>` thread in
//!   `VcpuThreads::start` (vmm/src/vstate/vcpu.rs), before `vcpu.run`;
//! - `install(Vmm)`: in `Vm::run` (vmm/src/vm.rs), right after
//!   `VcpuThreads::start`, before the event loop (not at the start of the
//!   `vm-<id>` thread: the vCPU threads would inherit it);
//! - `install(Handlers)`: in `HandlerHost::start` (src/instance.rs), as the
//!   runtime builder's `on_thread_start` (workers and blocking threads) and
//!   first thing in the `handlers-<id>` thread; and in `open_session`
//!   (src/instance.rs), first thing in the short-lived thread that opens the
//!   session database, whose `session-db-writer` thread inherits it;
//! - the policy loader, the signal thread and the threads that wait for
//!   guest processes keep the holder's filter.
//!
//! The lists are built for x86_64 (the only architecture the VMM runs on);
//! elsewhere [`filter`] and [`install`] return [`Error::Unsupported`].

#[cfg(target_arch = "x86_64")]
mod handlers;
#[cfg(target_arch = "x86_64")]
mod holder;
mod report;
#[cfg(target_arch = "x86_64")]
mod rules;
#[cfg(target_arch = "x86_64")]
mod vcpu;
#[cfg(target_arch = "x86_64")]
mod vmm;

#[cfg(test)]
#[cfg(target_arch = "x86_64")]
mod tests;

pub use report::{install_violation_reporter, BAD_SYSCALL_STATUS};
pub use seccompiler::BpfProgram;

use crate::Error;

/// The kinds of thread of the holder process, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The main thread, installed before any other thread starts: the
    /// union of every other kind's list and the main thread's own needs
    /// (opening files, setting up the VM, the agent connection).
    Holder,
    /// The VM's device event loop (`vm-<id>`).
    Vmm,
    /// A vCPU thread (`vcpu<n>`).
    Vcpu,
    /// The host handlers' threads: `handlers-<id>`, the tokio workers and
    /// blocking threads (`net`), the session database writer.
    Handlers,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 4] = [ThreadKind::Holder, ThreadKind::Vmm, ThreadKind::Vcpu, ThreadKind::Handlers];

    /// A short name, for logs.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Holder => "holder",
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Handlers => "handlers",
        }
    }
}

impl std::fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The compiled filter of `kind`'s threads (a BPF program; anything not on
/// the list traps, `clone3` returns ENOSYS).
#[cfg(target_arch = "x86_64")]
pub fn filter(kind: ThreadKind) -> Result<BpfProgram, Error> {
    rules(kind).compile()
}

/// The compiled filter of `kind`'s threads: only x86_64 has lists.
#[cfg(not(target_arch = "x86_64"))]
pub fn filter(kind: ThreadKind) -> Result<BpfProgram, Error> {
    Err(Error::Unsupported(format!("no seccomp filter for {kind} threads on {}", std::env::consts::ARCH)))
}

#[cfg(target_arch = "x86_64")]
fn rules(kind: ThreadKind) -> rules::Rules {
    match kind {
        ThreadKind::Holder => holder::rules(),
        ThreadKind::Vmm => vmm::rules(),
        ThreadKind::Vcpu => vcpu::rules(),
        ThreadKind::Handlers => handlers::rules(),
    }
}

/// Installs `kind`'s filter on the calling thread (only: other threads
/// keep theirs; threads it starts later inherit it). It stacks on any
/// filter the thread already has, so it can only narrow. Sets
/// `PR_SET_NO_NEW_PRIVS` for the thread first, as installing a filter
/// without `CAP_SYS_ADMIN` requires.
pub fn install(kind: ThreadKind) -> Result<(), Error> {
    let program = filter(kind)?;
    seccompiler::apply_filter(&program)
        .map_err(|e| Error::Seccomp(format!("installing the {kind} filter on this thread: {e}")))?;
    tracing::debug!(kind = kind.name(), instructions = program.len(), "seccomp filter installed");
    Ok(())
}
