//! vCPUs: configuration, the KVM_RUN loop on a thread of its own, and stopping.
//!
//! Port I/O and MMIO exits go to the buses. A triple fault, a shutdown or
//! reset system event, or a HLT exit (which KVM only reports without an
//! in-kernel APIC) ends the VM as a guest shutdown; any other exit is a fatal
//! error that carries the registers and the bytes at RIP. A guest that halts
//! with interrupts off inside the in-kernel APIC causes no exit at all: only
//! the host can end it, through its stop handle. To stop a vCPU the VM sets
//! the exit flag and sends the thread [`kick_signal`] until it leaves KVM_RUN.

use std::fmt::Write as _;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{CpuId, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use libc::{c_int, c_void, siginfo_t};
use tracing::{debug, warn};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::signal::{register_signal_handler, unblock_signal, Killable, SIGRTMIN};

use crate::arch::{cpuid, msr, regs};
use crate::devices::bus::Bus;
use crate::error::{kvm, Error, Result};
use crate::vstate::exit::{ExitReason, ExitSignal};

/// The signal that interrupts a vCPU thread's KVM_RUN.
pub fn kick_signal() -> c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: c_int, _: *mut siginfo_t, _: *mut c_void) {
    // Only here so that the signal interrupts KVM_RUN with EINTR.
}

/// Installs the (empty) handler for [`kick_signal`]; without SA_RESTART, so
/// KVM_RUN returns EINTR.
pub fn install_kick_handler() -> Result<()> {
    register_signal_handler(kick_signal(), on_kick)
        .map_err(|e| Error::Io { what: "installing the vCPU kick signal handler", source: e.into() })
}

/// A configured vCPU, ready to run on its own thread.
#[derive(Debug)]
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    mem: GuestMemoryMmap,
}

/// What every vCPU of a VM is created with.
#[derive(Debug)]
pub struct VcpuSetup<'a> {
    /// The VM.
    pub vm: &'a VmFd,
    /// Number of vCPUs.
    pub count: u8,
    /// The host's supported CPUID.
    pub supported_cpuid: &'a CpuId,
    /// The kernel's PVH entry point.
    pub entry: GuestAddress,
    /// Port I/O devices.
    pub pio: Arc<Bus>,
    /// MMIO devices.
    pub mmio: Arc<Bus>,
    /// Guest memory.
    pub mem: GuestMemoryMmap,
}

/// What the run loop does after an exit.
enum Next {
    Continue,
    Stop(Result<ExitReason>),
    InternalError,
    FailEntry(u64),
    Unexpected(String),
}

impl Vcpu {
    /// Creates vCPU `id` with its CPUID, MSRs, FPU and LAPIC set up; the
    /// bootstrap vCPU (id 0) also gets the PVH entry registers.
    pub fn new(setup: &VcpuSetup<'_>, id: u8) -> Result<Self> {
        let fd = setup.vm.create_vcpu(u64::from(id)).map_err(kvm("KVM_CREATE_VCPU"))?;
        fd.set_cpuid2(&cpuid::for_vcpu(setup.supported_cpuid, id, setup.count)).map_err(kvm("KVM_SET_CPUID2"))?;
        msr::setup(&fd)?;
        regs::setup(&fd, (id == 0).then_some(setup.entry))?;
        Ok(Self { id, fd, pio: setup.pio.clone(), mmio: setup.mmio.clone(), mem: setup.mem.clone() })
    }

    /// This vCPU's index.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Runs the guest until the VM is asked to end (by anyone, or by this vCPU).
    pub fn run(mut self, exit: &ExitSignal) {
        if let Err(e) = unblock_signal(kick_signal()) {
            warn!("vcpu{}: cannot unblock the kick signal: {e}", self.id);
        }
        while !exit.is_stopping() {
            match self.run_once() {
                Next::Continue => {}
                Next::Stop(outcome) => {
                    exit.request(outcome);
                    return;
                }
                Next::InternalError => {
                    exit.request(Err(self.internal_error()));
                    return;
                }
                Next::FailEntry(reason) => {
                    exit.request(Err(Error::FailEntry { vcpu: self.id, reason, registers: self.describe_registers() }));
                    return;
                }
                Next::Unexpected(what) => {
                    exit.request(Err(Error::UnexpectedExit {
                        vcpu: self.id,
                        exit: what,
                        registers: self.describe_registers(),
                    }));
                    return;
                }
            }
        }
    }

    fn run_once(&mut self) -> Next {
        let id = self.id;
        match self.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                if !self.pio.write(u64::from(port), data) {
                    debug!("vcpu{id}: write {data:x?} to unhandled port {port:#x}");
                }
                Next::Continue
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                if !self.pio.read(u64::from(port), data) {
                    // Nothing answers: an ISA bus floats high.
                    data.fill(0xff);
                }
                Next::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !self.mmio.write(addr, data) {
                    debug!("vcpu{id}: write {data:x?} to unhandled MMIO address {addr:#x}");
                }
                Next::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !self.mmio.read(addr, data) {
                    debug!("vcpu{id}: read from unhandled MMIO address {addr:#x}");
                    data.fill(0);
                }
                Next::Continue
            }
            Ok(VcpuExit::Hlt) | Ok(VcpuExit::Shutdown) => Next::Stop(Ok(ExitReason::GuestShutdown)),
            Ok(VcpuExit::SystemEvent(kind, _))
                if kind == KVM_SYSTEM_EVENT_SHUTDOWN || kind == KVM_SYSTEM_EVENT_RESET =>
            {
                Next::Stop(Ok(ExitReason::GuestShutdown))
            }
            Ok(VcpuExit::InternalError) => Next::InternalError,
            Ok(VcpuExit::FailEntry(reason, _)) => Next::FailEntry(reason),
            Ok(VcpuExit::Intr) => Next::Continue,
            Ok(other) => Next::Unexpected(format!("{other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Next::Continue,
            Err(source) => Next::Stop(Err(Error::VcpuRun { vcpu: id, source })),
        }
    }

    /// The error for a KVM_EXIT_INTERNAL_ERROR, with KVM's details and the registers.
    fn internal_error(&mut self) -> Error {
        let run = self.fd.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, for which KVM
        // fills in the `internal` member of the exit union.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let count = (internal.ndata as usize).min(internal.data.len());
        Error::EmulationFailure {
            vcpu: self.id,
            suberror: internal.suberror,
            data: internal.data[..count].to_vec(),
            registers: self.describe_registers(),
        }
    }

    /// General and control registers, and the code bytes at RIP when they can be read.
    fn describe_registers(&self) -> String {
        let mut out = String::new();
        let mut rip = None;
        match self.fd.get_regs() {
            Ok(r) => {
                rip = Some(r.rip);
                let _ = write!(
                    out,
                    "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rbp={:#x} r8={:#x} r9={:#x} r10={:#x} r11={:#x} r12={:#x} r13={:#x} r14={:#x} r15={:#x}",
                    r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp,
                    r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15
                );
            }
            Err(e) => {
                let _ = write!(out, "registers unavailable ({e})");
            }
        }
        if let Ok(s) = self.fd.get_sregs() {
            let _ = write!(
                out,
                " cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x} (cpl {}, {}-bit)",
                s.cr0,
                s.cr2,
                s.cr3,
                s.cr4,
                s.efer,
                s.cs.selector,
                s.cs.dpl,
                if s.cs.l == 1 {
                    64
                } else if s.cs.db == 1 {
                    32
                } else {
                    16
                }
            );
        }
        if let Some(code) = rip.and_then(|rip| self.code_at(rip)) {
            let _ = write!(out, " code at rip: {code:02x?}");
        }
        out
    }

    /// Up to 16 bytes of guest code at linear address `rip`.
    fn code_at(&self, rip: u64) -> Option<Vec<u8>> {
        let translation = self.fd.translate_gva(rip).ok()?;
        if translation.valid == 0 {
            return None;
        }
        let mut code = vec![0u8; 16];
        let n = self.mem.read(&mut code, GuestAddress(translation.physical_address)).ok()?;
        code.truncate(n);
        Some(code)
    }
}

/// The running vCPU threads. Dropping this stops and joins them, also when
/// the event loop unwinds from a panic.
#[derive(Debug)]
pub struct VcpuThreads {
    exit: Arc<ExitSignal>,
    threads: Vec<(u8, JoinHandle<()>)>,
}

impl VcpuThreads {
    /// Starts one thread per vCPU. A thread that cannot be started, or a vCPU
    /// that panics, ends the VM with an error.
    /// Each thread installs `filter` on itself before its first `KVM_RUN`.
    pub fn start(vcpus: Vec<Vcpu>, exit: &Arc<ExitSignal>, filter: Option<seccompiler::BpfProgram>) -> Self {
        let mut threads = Vec::with_capacity(vcpus.len());
        for vcpu in vcpus {
            let id = vcpu.id();
            let vcpu_exit = exit.clone();
            let filter = filter.clone();
            let spawned = std::thread::Builder::new().name(format!("vcpu{id}")).spawn(move || {
                if let Some(filter) = &filter {
                    if let Err(source) = seccompiler::apply_filter(filter) {
                        vcpu_exit.request(Err(Error::Seccomp { thread: format!("vCPU {id}"), source }));
                        return;
                    }
                }
                let run = std::panic::AssertUnwindSafe(|| vcpu.run(&vcpu_exit));
                if std::panic::catch_unwind(run).is_err() {
                    vcpu_exit.request(Err(Error::VcpuPanic(id)));
                }
            });
            match spawned {
                Ok(handle) => threads.push((id, handle)),
                Err(source) => {
                    exit.request(Err(Error::Io { what: "starting a vCPU thread", source }));
                    break;
                }
            }
        }
        Self { exit: exit.clone(), threads }
    }
}

impl Drop for VcpuThreads {
    /// Kicks each thread out of KVM_RUN until it has left its run loop, then joins it.
    fn drop(&mut self) {
        // Normally the VM is already ending and this changes nothing.
        self.exit.request(Ok(ExitReason::StopRequested));
        for (id, thread) in self.threads.drain(..) {
            while !thread.is_finished() {
                if let Err(e) = thread.kill(kick_signal()) {
                    warn!("vcpu{id}: cannot signal the thread: {e}");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            // The thread body catches panics; nothing is left to report here.
            let _ = thread.join();
        }
    }
}
