//! The building blocks of the per-thread lists: a set of allowed system
//! calls, each either unconditionally or under argument tests, and the
//! calls every thread of the holder makes whatever its job (glibc, Rust std,
//! the allocator, the panic and exit paths).

use std::collections::BTreeMap;

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::Error;

/// A test of one argument of a system call.
#[derive(Debug, Clone)]
pub(crate) struct Cond {
    arg: u8,
    op: SeccompCmpOp,
    value: u64,
}

/// Argument `arg` (as the kernel's 32-bit `int`/`unsigned int`) equals `value`.
pub(crate) fn eq(arg: u8, value: u64) -> Cond {
    Cond { arg, op: SeccompCmpOp::Eq, value }
}

/// The bits `mask` of argument `arg` are equal to those of `value`.
pub(crate) fn masked(arg: u8, mask: u64, value: u64) -> Cond {
    Cond { arg, op: SeccompCmpOp::MaskedEq(mask), value }
}

/// When a system call is allowed.
#[derive(Debug, Clone)]
enum Allow {
    /// Whatever its arguments.
    Always,
    /// When all the tests of one of the alternatives hold.
    When(Vec<Vec<Cond>>),
}

/// A set of allowed system calls (by number, for the architecture the
/// crate is built for). Anything else traps.
#[derive(Debug, Clone, Default)]
pub(crate) struct Rules(BTreeMap<i64, Allow>);

impl Rules {
    /// Allows these calls whatever their arguments.
    pub(crate) fn allow(&mut self, calls: &[libc::c_long]) -> &mut Self {
        for &nr in calls {
            self.0.insert(nr, Allow::Always);
        }
        self
    }

    /// Allows `nr` when all of `conds` hold (one more alternative beside the
    /// ones already there; nothing changes if it is allowed always).
    pub(crate) fn allow_when(&mut self, nr: libc::c_long, conds: Vec<Cond>) -> &mut Self {
        match self.0.entry(nr).or_insert_with(|| Allow::When(Vec::new())) {
            Allow::Always => {}
            Allow::When(alternatives) => alternatives.push(conds),
        }
        self
    }

    /// Allows `nr` when argument `arg` is one of `values`.
    pub(crate) fn allow_arg_in(&mut self, nr: libc::c_long, arg: u8, values: &[u64]) -> &mut Self {
        for &value in values {
            self.allow_when(nr, vec![eq(arg, value)]);
        }
        self
    }

    /// Everything `other` allows is allowed here too.
    pub(crate) fn merge(&mut self, other: &Rules) -> &mut Self {
        for (&nr, allow) in &other.0 {
            match allow {
                Allow::Always => {
                    self.0.insert(nr, Allow::Always);
                }
                Allow::When(alternatives) => {
                    for conds in alternatives {
                        self.allow_when(nr, conds.clone());
                    }
                }
            }
        }
        self
    }

    /// Is `nr` allowed at all (for some arguments)?
    #[cfg(test)]
    pub(crate) fn mentions(&self, nr: libc::c_long) -> bool {
        self.0.contains_key(&nr)
    }

    /// The numbers of the calls allowed for some arguments.
    #[cfg(test)]
    pub(crate) fn calls(&self) -> impl Iterator<Item = i64> + '_ {
        self.0.keys().copied()
    }

    /// The filter: allowed calls pass, anything else sends SIGSYS (see
    /// [`super::report`]), and `clone3` fails with ENOSYS whatever the
    /// list says, because its flags are behind a pointer that a filter
    /// cannot read (glibc then falls back to `clone`, whose flags it can).
    pub(crate) fn compile(&self) -> Result<BpfProgram, Error> {
        let mut map = BTreeMap::new();
        for (&nr, allow) in &self.0 {
            let rules = match allow {
                Allow::Always => Vec::new(),
                Allow::When(alternatives) => {
                    alternatives.iter().map(|conds| rule(conds)).collect::<Result<Vec<_>, Error>>()?
                }
            };
            map.insert(nr, rules);
        }
        let filter = SeccompFilter::new(map, SeccompAction::Trap, SeccompAction::Allow, TargetArch::x86_64)
            .map_err(|e| Error::Seccomp(format!("building the filter: {e}")))?;
        let program: BpfProgram =
            filter.try_into().map_err(|e| Error::Seccomp(format!("compiling the filter: {e}")))?;
        let mut out = clone3_enosys_prologue();
        out.extend(program);
        Ok(out)
    }
}

fn rule(conds: &[Cond]) -> Result<SeccompRule, Error> {
    let conds = conds
        .iter()
        .map(|c| SeccompCondition::new(c.arg, SeccompCmpArgLen::Dword, c.op.clone(), c.value))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Seccomp(format!("an argument test: {e}")))?;
    SeccompRule::new(conds).map_err(|e| Error::Seccomp(format!("a rule: {e}")))
}

/// `AUDIT_ARCH_X86_64` from linux/audit.h.
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// Offsets in `struct seccomp_data`.
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;

fn stmt(code: u32, k: u32) -> sock_filter {
    sock_filter { code: code as u16, jt: 0, jf: 0, k }
}

fn jump(code: u32, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code: code as u16, jt, jf, k }
}

/// Five instructions put before seccompiler's program (BPF jumps are
/// relative, so that program is unchanged by the shift): on x86_64, `clone3`
/// returns ENOSYS; everything else goes on to the program, which checks the
/// architecture itself.
fn clone3_enosys_prologue() -> BpfProgram {
    vec![
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, DATA_ARCH),
        jump(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, AUDIT_ARCH_X86_64, 0, 3),
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, DATA_NR),
        jump(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, libc::SYS_clone3 as u32, 0, 1),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ERRNO | (libc::ENOSYS as u32 & libc::SECCOMP_RET_DATA)),
    ]
}

/// A C `int` constant (`PR_SET_NAME`, `AF_INET`, ...) as the argument value a test compares with.
const fn arg(value: libc::c_int) -> u64 {
    value as u64
}

/// What every thread of the holder does whatever its job, once its filter
/// is in place (the thread's own start, before it installs its filter, is
/// not covered: `rseq`, `set_robust_list`, the `sigaltstack` mapping).
///
/// - memory: the allocator (`brk`, `mmap`, `munmap`, `mremap`, `madvise`)
///   and glibc's stacks and guard pages (`mprotect`); mappings and
///   protections never executable;
/// - waiting and waking: `futex`, `sched_yield`, `nanosleep`,
///   `clock_nanosleep`, and the clock calls the vDSO falls back to;
/// - signals: `rt_sigreturn` (the vCPU kick, the violation reporter),
///   `rt_sigprocmask`, `sigaltstack` (a thread's exit unmaps its signal
///   stack), `restart_syscall`;
/// - logs (`tracing`, panics) on stderr: `write`, `writev`;
/// - `close` (every drop of an owned descriptor), `getrandom` (hash seeds,
///   ring), `gettid`, `getpid`, `sched_getaffinity`
///   (`available_parallelism`);
/// - `tgkill`: `pthread_kill` (the vCPU kick) and `abort`;
/// - `prctl` only to name a thread or read its name (the violation
///   reporter reads it);
/// - `prctl(PR_SET_NO_NEW_PRIVS)` and `seccomp(SECCOMP_SET_MODE_FILTER)`:
///   a thread can add a filter of its own (filters only ever narrow; tokio
///   installs its workers' filter on threads that may already have it);
/// - the end: `exit` (a thread), `exit_group` (the process, also the
///   reporter's `_exit`).
pub(crate) fn common() -> Rules {
    let mut r = Rules::default();
    r.allow(&[
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_nanosleep,
        libc::SYS_clock_nanosleep,
        libc::SYS_clock_gettime,
        libc::SYS_clock_getres,
        libc::SYS_gettimeofday,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_restart_syscall,
        libc::SYS_write,
        libc::SYS_writev,
        libc::SYS_close,
        libc::SYS_getrandom,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_sched_getaffinity,
        libc::SYS_tgkill,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ]);
    // Never an executable mapping: neither a new one nor made so later.
    let no_exec = || vec![masked(2, arg(libc::PROT_EXEC), 0)];
    r.allow_when(libc::SYS_mmap, no_exec());
    r.allow_when(libc::SYS_mprotect, no_exec());
    r.allow_arg_in(libc::SYS_prctl, 0, &[arg(libc::PR_SET_NAME), arg(libc::PR_GET_NAME)]);
    r.allow_when(libc::SYS_prctl, vec![eq(0, arg(libc::PR_SET_NO_NEW_PRIVS)), eq(1, 1)]);
    r.allow_when(libc::SYS_seccomp, vec![eq(0, u64::from(libc::SECCOMP_SET_MODE_FILTER))]);
    r
}

/// `clone` for a thread only: `CLONE_THREAD` set (a new process, as `fork`
/// makes, has it clear). `clone3` is allowed here only so that the
/// prologue's ENOSYS, not a trap, answers it.
pub(crate) fn threads(r: &mut Rules) {
    let thread = arg(libc::CLONE_THREAD);
    r.allow_when(libc::SYS_clone, vec![masked(0, thread, thread)]);
    r.allow(&[libc::SYS_clone3, libc::SYS_set_robust_list, libc::SYS_rseq]);
}

/// `socket` (and `socketpair`) for these address families only.
pub(crate) fn sockets(r: &mut Rules, families: &[libc::c_int]) {
    for &family in families {
        r.allow_when(libc::SYS_socket, vec![eq(0, arg(family))]);
    }
}

/// `ioctl` with these requests only (compared as the kernel does, on the
/// low 32 bits).
pub(crate) fn ioctls(r: &mut Rules, requests: &[u64]) {
    r.allow_arg_in(libc::SYS_ioctl, 1, requests);
}

/// `fcntl` with these commands only.
pub(crate) fn fcntls(r: &mut Rules, commands: &[libc::c_int]) {
    for &cmd in commands {
        r.allow_when(libc::SYS_fcntl, vec![eq(1, arg(cmd))]);
    }
}

/// The ioctl requests the holder uses, from linux/kvm.h and asm-generic/ioctls.h
/// (x86_64 values, checked against the headers).
pub(crate) mod ioctl {
    /// `KVM_GET_API_VERSION` (on /dev/kvm).
    pub(crate) const KVM_GET_API_VERSION: u64 = 0xae00;
    /// `KVM_CREATE_VM` (on /dev/kvm).
    pub(crate) const KVM_CREATE_VM: u64 = 0xae01;
    /// `KVM_GET_MSR_INDEX_LIST` (on /dev/kvm).
    pub(crate) const KVM_GET_MSR_INDEX_LIST: u64 = 0xc004_ae02;
    /// `KVM_CHECK_EXTENSION` (on /dev/kvm and the VM).
    pub(crate) const KVM_CHECK_EXTENSION: u64 = 0xae03;
    /// `KVM_GET_VCPU_MMAP_SIZE` (on /dev/kvm).
    pub(crate) const KVM_GET_VCPU_MMAP_SIZE: u64 = 0xae04;
    /// `KVM_GET_SUPPORTED_CPUID` (on /dev/kvm).
    pub(crate) const KVM_GET_SUPPORTED_CPUID: u64 = 0xc008_ae05;
    /// `KVM_CREATE_VCPU` (on the VM).
    pub(crate) const KVM_CREATE_VCPU: u64 = 0xae41;
    /// `KVM_SET_USER_MEMORY_REGION` (on the VM).
    pub(crate) const KVM_SET_USER_MEMORY_REGION: u64 = 0x4020_ae46;
    /// `KVM_SET_TSS_ADDR` (on the VM).
    pub(crate) const KVM_SET_TSS_ADDR: u64 = 0xae47;
    /// `KVM_SET_IDENTITY_MAP_ADDR` (on the VM).
    pub(crate) const KVM_SET_IDENTITY_MAP_ADDR: u64 = 0x4008_ae48;
    /// `KVM_CREATE_IRQCHIP` (on the VM).
    pub(crate) const KVM_CREATE_IRQCHIP: u64 = 0xae60;
    /// `KVM_IRQ_LINE` (on the VM).
    pub(crate) const KVM_IRQ_LINE: u64 = 0x4008_ae61;
    /// `KVM_IRQFD` (on the VM).
    pub(crate) const KVM_IRQFD: u64 = 0x4020_ae76;
    /// `KVM_CREATE_PIT2` (on the VM).
    pub(crate) const KVM_CREATE_PIT2: u64 = 0x4040_ae77;
    /// `KVM_IOEVENTFD` (on the VM).
    pub(crate) const KVM_IOEVENTFD: u64 = 0x4040_ae79;
    /// `KVM_RUN` (on a vCPU).
    pub(crate) const KVM_RUN: u64 = 0xae80;
    /// `KVM_GET_REGS` (on a vCPU).
    pub(crate) const KVM_GET_REGS: u64 = 0x8090_ae81;
    /// `KVM_SET_REGS` (on a vCPU).
    pub(crate) const KVM_SET_REGS: u64 = 0x4090_ae82;
    /// `KVM_GET_SREGS` (on a vCPU).
    pub(crate) const KVM_GET_SREGS: u64 = 0x8138_ae83;
    /// `KVM_SET_SREGS` (on a vCPU).
    pub(crate) const KVM_SET_SREGS: u64 = 0x4138_ae84;
    /// `KVM_TRANSLATE` (on a vCPU).
    pub(crate) const KVM_TRANSLATE: u64 = 0xc018_ae85;
    /// `KVM_GET_MSRS` (on a vCPU).
    pub(crate) const KVM_GET_MSRS: u64 = 0xc008_ae88;
    /// `KVM_SET_MSRS` (on a vCPU).
    pub(crate) const KVM_SET_MSRS: u64 = 0x4008_ae89;
    /// `KVM_GET_FPU` (on a vCPU).
    pub(crate) const KVM_GET_FPU: u64 = 0x81a0_ae8c;
    /// `KVM_SET_FPU` (on a vCPU).
    pub(crate) const KVM_SET_FPU: u64 = 0x41a0_ae8d;
    /// `KVM_GET_LAPIC` (on a vCPU).
    pub(crate) const KVM_GET_LAPIC: u64 = 0x8400_ae8e;
    /// `KVM_SET_LAPIC` (on a vCPU).
    pub(crate) const KVM_SET_LAPIC: u64 = 0x4400_ae8f;
    /// `KVM_SET_CPUID2` (on a vCPU).
    pub(crate) const KVM_SET_CPUID2: u64 = 0x4008_ae90;
    /// `KVM_GET_MP_STATE` (on a vCPU; snapshots).
    pub(crate) const KVM_GET_MP_STATE: u64 = 0x8004_ae98;
    /// `KVM_SET_MP_STATE` (on a vCPU; restores).
    pub(crate) const KVM_SET_MP_STATE: u64 = 0x4004_ae99;
    /// `KVM_GET_CPUID2` (on a vCPU; snapshots).
    pub(crate) const KVM_GET_CPUID2: u64 = 0xc008_ae91;
    /// `KVM_GET_VCPU_EVENTS` (on a vCPU; snapshots).
    pub(crate) const KVM_GET_VCPU_EVENTS: u64 = 0x8040_ae9f;
    /// `KVM_SET_VCPU_EVENTS` (on a vCPU; restores).
    pub(crate) const KVM_SET_VCPU_EVENTS: u64 = 0x4040_aea0;
    /// `KVM_GET_DEBUGREGS` (on a vCPU; snapshots).
    pub(crate) const KVM_GET_DEBUGREGS: u64 = 0x8080_aea1;
    /// `KVM_SET_DEBUGREGS` (on a vCPU; restores).
    pub(crate) const KVM_SET_DEBUGREGS: u64 = 0x4080_aea2;
    /// `KVM_SET_TSC_KHZ` (on a vCPU; restores).
    pub(crate) const KVM_SET_TSC_KHZ: u64 = 0xaea2;
    /// `KVM_GET_TSC_KHZ` (on a vCPU; snapshots).
    pub(crate) const KVM_GET_TSC_KHZ: u64 = 0xaea3;
    /// `KVM_GET_XSAVE` (on a vCPU; snapshots).
    pub(crate) const KVM_GET_XSAVE: u64 = 0x9000_aea4;
    /// `KVM_SET_XSAVE` (on a vCPU; restores).
    pub(crate) const KVM_SET_XSAVE: u64 = 0x5000_aea5;
    /// `KVM_GET_XCRS` (on a vCPU; snapshots).
    pub(crate) const KVM_GET_XCRS: u64 = 0x8188_aea6;
    /// `KVM_SET_XCRS` (on a vCPU; restores).
    pub(crate) const KVM_SET_XCRS: u64 = 0x4188_aea7;
    /// `KVM_GET_XSAVE2` (on a vCPU; snapshots, where the XSAVE area is larger than 4 KiB).
    pub(crate) const KVM_GET_XSAVE2: u64 = 0x9000_aecf;
    /// `KVM_GET_IRQCHIP` (on the VM; snapshots).
    pub(crate) const KVM_GET_IRQCHIP: u64 = 0xc208_ae62;
    /// `KVM_SET_IRQCHIP` (on the VM; restores).
    pub(crate) const KVM_SET_IRQCHIP: u64 = 0x8208_ae63;
    /// `KVM_GET_PIT2` (on the VM; snapshots).
    pub(crate) const KVM_GET_PIT2: u64 = 0x8070_ae9f;
    /// `KVM_SET_PIT2` (on the VM; restores).
    pub(crate) const KVM_SET_PIT2: u64 = 0x4070_aea0;
    /// `KVM_GET_CLOCK` (on the VM; snapshots).
    pub(crate) const KVM_GET_CLOCK: u64 = 0x8030_ae7c;
    /// `KVM_SET_CLOCK` (on the VM; restores).
    pub(crate) const KVM_SET_CLOCK: u64 = 0x4030_ae7b;
    /// `TCGETS`: `isatty`.
    pub(crate) const TCGETS: u64 = 0x5401;
    /// `TIOCGWINSZ`: a terminal's size.
    pub(crate) const TIOCGWINSZ: u64 = 0x5413;
    /// `FIONREAD`: bytes ready to read.
    pub(crate) const FIONREAD: u64 = 0x541b;
    /// `FIONBIO`: std's `set_nonblocking`.
    pub(crate) const FIONBIO: u64 = 0x5421;
    /// `FIONCLEX`: clear close-on-exec.
    pub(crate) const FIONCLEX: u64 = 0x5450;
    /// `FIOCLEX`: set close-on-exec.
    pub(crate) const FIOCLEX: u64 = 0x5451;
}
