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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{CpuId, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use libc::{c_int, c_void, siginfo_t};
use tracing::{debug, warn};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::signal::{register_signal_handler, unblock_signal, Killable, SIGRTMIN};

use crate::arch::{cpuid, msr, regs};
use crate::devices::bus::Bus;
use crate::error::{kvm, Error, Result};
use crate::lock;
use crate::vstate::exit::{ExitReason, ExitSignal};
use crate::vstate::state::{self, VcpuState};

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
    /// What a snapshot saves of this vCPU's MSRs.
    msr_indices: Arc<[u32]>,
    /// KVM_CAP_XSAVE2's size (0 without it).
    xsave_size: usize,
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
    /// The MSRs a snapshot saves ([`state::msrs_to_save`]).
    pub msr_indices: Arc<[u32]>,
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
        let vcpu = Self::create(setup, id)?;
        vcpu.fd.set_cpuid2(&cpuid::for_vcpu(setup.supported_cpuid, id, setup.count)).map_err(kvm("KVM_SET_CPUID2"))?;
        msr::setup(&vcpu.fd)?;
        regs::setup(&vcpu.fd, (id == 0).then_some(setup.entry))?;
        Ok(vcpu)
    }

    /// Creates vCPU `id` and gives it the state saved in a snapshot (which
    /// holds its CPUID too).
    pub fn restored(setup: &VcpuSetup<'_>, saved: &VcpuState) -> Result<Self> {
        let vcpu = Self::create(setup, saved.id)?;
        state::restore_vcpu(&vcpu.fd, saved)?;
        Ok(vcpu)
    }

    fn create(setup: &VcpuSetup<'_>, id: u8) -> Result<Self> {
        let fd = setup.vm.create_vcpu(u64::from(id)).map_err(kvm("KVM_CREATE_VCPU"))?;
        Ok(Self {
            id,
            fd,
            pio: setup.pio.clone(),
            mmio: setup.mmio.clone(),
            mem: setup.mem.clone(),
            msr_indices: setup.msr_indices.clone(),
            xsave_size: state::xsave_size(setup.vm),
        })
    }

    /// This vCPU's index.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Runs the guest until the VM is asked to end (by anyone, or by this
    /// vCPU), pausing whenever `pause` asks for it.
    pub fn run(mut self, exit: &ExitSignal, pause: &PauseControl) {
        if let Err(e) = unblock_signal(kick_signal()) {
            warn!("vcpu{}: cannot unblock the kick signal: {e}", self.id);
        }
        while !exit.is_stopping() {
            if pause.requested() {
                let saved = self.pause();
                pause.paused(self.id, saved, exit);
                continue;
            }
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

    /// Stops at a point where the state can be saved, and saves it. A
    /// KVM_RUN with `immediate_exit` completes the port or MMIO access of
    /// the last exit (on real KVM, RIP still points at that instruction
    /// until then) and returns at once without running the guest.
    fn pause(&mut self) -> Result<VcpuState> {
        self.fd.set_kvm_immediate_exit(1);
        let completed = self.fd.run().map(|exit| format!("{exit:?}"));
        self.fd.set_kvm_immediate_exit(0);
        match completed {
            Err(e) if e.errno() == libc::EINTR => {}
            Err(source) => return Err(Error::VcpuRun { vcpu: self.id, source }),
            Ok(exit) => {
                return Err(Error::UnexpectedExit {
                    vcpu: self.id,
                    exit: format!("{exit} while pausing"),
                    registers: self.describe_registers(),
                })
            }
        }
        state::save_vcpu(&self.fd, self.id, &self.msr_indices, self.xsave_size)
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
    pause: Arc<PauseControl>,
    threads: Vec<(u8, JoinHandle<()>)>,
}

/// How the event loop pauses the vCPU threads and lets them go on.
///
/// To pause, the event loop sets the request flag and kicks every thread
/// out of KVM_RUN until each has saved its state and reported it; a
/// paused thread waits here until the pause ends (or the VM stops).
#[derive(Debug, Default)]
pub struct PauseControl {
    requested: AtomicBool,
    inner: Mutex<PauseInner>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct PauseInner {
    /// The state each paused vCPU reported, by arrival.
    reports: Vec<(u8, Result<VcpuState>)>,
}

impl PauseControl {
    fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Called by a vCPU thread: reports its state and waits until the pause ends.
    fn paused(&self, id: u8, saved: Result<VcpuState>, exit: &ExitSignal) {
        let mut inner = lock(&self.inner);
        inner.reports.push((id, saved));
        self.changed.notify_all();
        while self.requested() && !exit.is_stopping() {
            inner = match self.changed.wait_timeout(inner, Duration::from_millis(50)) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    /// Lets paused vCPU threads go on (or see that the VM is stopping).
    fn release(&self) {
        let mut inner = lock(&self.inner);
        self.requested.store(false, Ordering::SeqCst);
        inner.reports.clear();
        self.changed.notify_all();
    }
}

impl VcpuThreads {
    /// Starts one thread per vCPU. A thread that cannot be started, or a vCPU
    /// that panics, ends the VM with an error.
    /// Each thread installs `filter` on itself before its first `KVM_RUN`.
    pub fn start(vcpus: Vec<Vcpu>, exit: &Arc<ExitSignal>, filter: Option<seccompiler::BpfProgram>) -> Self {
        let pause = Arc::new(PauseControl::default());
        let mut threads = Vec::with_capacity(vcpus.len());
        for vcpu in vcpus {
            let id = vcpu.id();
            let vcpu_exit = exit.clone();
            let vcpu_pause = pause.clone();
            let filter = filter.clone();
            let spawned = std::thread::Builder::new().name(format!("vcpu{id}")).spawn(move || {
                if let Some(filter) = &filter {
                    if let Err(source) = seccompiler::apply_filter(filter) {
                        vcpu_exit.request(Err(Error::Seccomp { thread: format!("vCPU {id}"), source }));
                        return;
                    }
                }
                let run = std::panic::AssertUnwindSafe(|| vcpu.run(&vcpu_exit, &vcpu_pause));
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
        Self { exit: exit.clone(), pause, threads }
    }

    /// Pauses every vCPU and returns their saved states, in vCPU order.
    /// Each thread is kicked out of KVM_RUN (a halted vCPU sits in it) until
    /// it reports. On an error the vCPUs are let go again.
    pub fn pause(&self) -> Result<Vec<VcpuState>> {
        self.pause.requested.store(true, Ordering::SeqCst);
        let result = self.collect();
        if result.is_err() {
            self.resume();
        }
        result
    }

    fn collect(&self) -> Result<Vec<VcpuState>> {
        let started = Instant::now();
        loop {
            let reported: Vec<u8> = lock(&self.pause.inner).reports.iter().map(|(id, _)| *id).collect();
            if reported.len() == self.threads.len() {
                break;
            }
            if self.exit.is_stopping() {
                return Err(Error::VmNotRunning);
            }
            for (id, thread) in &self.threads {
                if reported.contains(id) {
                    continue;
                }
                if thread.is_finished() {
                    return Err(Error::VmNotRunning);
                }
                if let Err(e) = thread.kill(kick_signal()) {
                    warn!("vcpu{id}: cannot signal the thread: {e}");
                }
            }
            let inner = lock(&self.pause.inner);
            if inner.reports.len() < self.threads.len() {
                let _ = self.pause.changed.wait_timeout(inner, Duration::from_millis(1));
            }
            if started.elapsed() > Duration::from_secs(10) {
                return Err(Error::Io {
                    what: "pausing the vCPUs",
                    source: std::io::Error::new(std::io::ErrorKind::TimedOut, "a vCPU did not pause within 10 s"),
                });
            }
        }
        let mut reports = std::mem::take(&mut lock(&self.pause.inner).reports);
        reports.sort_by_key(|(id, _)| *id);
        reports.into_iter().map(|(_, state)| state).collect()
    }

    /// Ends a pause: the vCPUs run on (or stop, if the VM is ending).
    pub fn resume(&self) {
        self.pause.release();
    }
}

impl Drop for VcpuThreads {
    /// Kicks each thread out of KVM_RUN until it has left its run loop, then joins it.
    fn drop(&mut self) {
        // Normally the VM is already ending and this changes nothing.
        self.exit.request(Ok(ExitReason::StopRequested));
        self.pause.release();
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
