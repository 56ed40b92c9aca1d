//! A feasibility probe for VM snapshots on the host's KVM: runs a tiny
//! counting guest in VM A, saves every piece of KVM state a snapshot needs
//! (vCPU and VM level) with the VMM's own functions (`vmm::snapshot::kvm`,
//! what `Vm` snapshots and restores with) plus guest memory, restores it
//! into a fresh VM B whose memory is a private copy-on-write mapping of the
//! saved memory file, and checks that B goes on counting where A stopped
//! while A, resumed, diverges on its own. Two more tests restore a vCPU
//! halted at the snapshot (an NMI wakes it) and a guest taking PIT
//! interrupts (they keep coming). Prints a table of each step and of what
//! the host offers; docs/snapshots-probe.md records the findings. Needs
//! /dev/kvm; skips without it, or fails with `SANDBOX_REQUIRE_VM=1`
//! (./test.sh).
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
#[path = "../../tests/common/vm.rs"]
mod vm;

use std::fmt::Debug;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kvm_bindings::{
    kvm_msr_entry, kvm_pit_config, kvm_regs, kvm_segment, kvm_sregs, kvm_userspace_memory_region, CpuId, Msrs,
    KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_HALTED, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vmm::snapshot::kvm as snapshot_kvm;
use vmm::snapshot::kvm::{VcpuState, VmKvmState};

const MEM_SIZE: usize = 2 << 20;
const GDT_ADDR: usize = 0x500;
const IDT_ADDR: usize = 0x600;
const CODE_ADDR: usize = 0x1000;
const NMI_HANDLER_ADDR: usize = 0x1100;
const TIMER_HANDLER_ADDR: usize = 0x1200;
const TIMER_SETUP_ADDR: usize = 0x1300;
const COUNTER_ADDR: usize = 0x2000;
/// Where the timer handler counts the interrupts it took.
const TICKS_ADDR: usize = 0x2004;
/// The vector the guest programs the master PIC to give IRQ 0 (the PIT).
const TIMER_VECTOR: usize = 0x20;
const STACK_TOP: u64 = 0x8000;
const PORT: u16 = 0x3f8;
const NMI_PORT: u16 = 0x3f9;
/// The guest reports on `PORT` every this many increments.
const EVERY: u32 = 256;

/// 32-bit, paging off: `loop: inc dword [COUNTER]; mov eax, [COUNTER];
/// test eax, EVERY-1; jnz loop; inc ebx; mov dx, PORT; out dx, eax; jmp loop`.
/// The count lives in memory (tests the memory copy), the number of reports
/// in EBX (tests the registers).
const COUNTING: &[u8] = &[
    0xff, 0x05, 0x00, 0x20, 0x00, 0x00, // inc dword [0x2000]
    0xa1, 0x00, 0x20, 0x00, 0x00, // mov eax, [0x2000]
    0xa9, 0xff, 0x00, 0x00, 0x00, // test eax, 0xff
    0x75, 0xee, // jnz loop
    0x43, // inc ebx
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xef, // out dx, eax
    0xeb, 0xe6, // jmp loop
];

/// Like `COUNTING`, but halts (interrupts off) after each report:
/// `...; out dx, eax; cli; hlt; jmp loop`. Only an NMI wakes it.
const COUNTING_THEN_HALT: &[u8] = &[
    0xff, 0x05, 0x00, 0x20, 0x00, 0x00, // inc dword [0x2000]
    0xa1, 0x00, 0x20, 0x00, 0x00, // mov eax, [0x2000]
    0xa9, 0xff, 0x00, 0x00, 0x00, // test eax, 0xff
    0x75, 0xee, // jnz loop
    0x43, // inc ebx
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xef, // out dx, eax
    0xfa, // cli
    0xf4, // hlt
    0xeb, 0xe4, // jmp loop
];

/// NMI handler: `mov eax, [COUNTER]; mov dx, NMI_PORT; out dx, eax;
/// add esp, 12; push CODE; ret`: reports, drops the interrupt frame and goes
/// back to the loop. It does not `iret`: KVM's instruction emulator, which
/// runs guest CPL0 code here, handles IRET only in real mode (an emulation
/// failure, with or without a snapshot); NMIs stay blocked afterwards, which
/// this test does not mind.
const NMI_HANDLER: &[u8] = &[
    0xa1, 0x00, 0x20, 0x00, 0x00, // mov eax, [0x2000]
    0x66, 0xba, 0xf9, 0x03, // mov dx, 0x3f9
    0xef, // out dx, eax
    0x83, 0xc4, 0x0c, // add esp, 12
    0x68, 0x00, 0x10, 0x00, 0x00, // push 0x1000
    0xc3, // ret
];

/// `loop: rdtsc; mov dx, TSC_PORT; out dx, eax; mov eax, edx; out dx, eax; jmp loop`.
const READ_TSC: &[u8] = &[
    0x0f, 0x31, // rdtsc
    0x66, 0xba, 0xfa, 0x03, // mov dx, 0x3fa
    0xef, // out dx, eax
    0x89, 0xd0, // mov eax, edx
    0xef, // out dx, eax
    0xeb, 0xf4, // jmp loop
];
const TSC_PORT: u16 = 0x3fa;

/// The TSC as the guest's RDTSC sees it, after the host wrote `value` into
/// IA32_TSC with KVM_SET_MSRS. Informational: the TSC a restore can give.
fn guest_tsc_after_host_write(kvm: &Kvm, value: u64, t: &mut Table) -> u64 {
    let mut c = machine(kvm, Memory::anonymous(MEM_SIZE), None, t);
    boot(&c, READ_TSC);
    let one = Msrs::from_entries(&[kvm_msr_entry { index: 0x10, data: value, ..Default::default() }]).unwrap();
    t.note("C: SET IA32_TSC", format!("{:?} written ({value})", c.vcpu.set_msrs(&one)));
    let mut halves = Vec::new();
    while halves.len() < 2 {
        match c.vcpu.run() {
            Ok(VcpuExit::IoOut(TSC_PORT, data)) if data.len() == 4 => {
                halves.push(u64::from(u32::from_le_bytes(data.try_into().unwrap())))
            }
            other => panic!("unexpected exit: {other:?}"),
        }
    }
    halves[0] | (halves[1] << 32)
}

/// MSRs the probe sets in VM A before the snapshot (SYSENTER_EIP,
/// KERNEL_GS_BASE, PAT, MTRRdefType, an MTRR base) to see them in VM B.
const MARKED_MSRS: [(u32, u64); 5] = [
    (0x176, 0x1234_5678),
    (0xc000_0102, 0xffff_8880_dead_0000),
    (0x277, 0x0007_0406_0007_0106),
    (0x2ff, 0xc06),
    (0x200, 0x8000_0006),
];

/// Programs the PICs (IRQ 0 at vector 0x20, every other IRQ masked) and PIT
/// channel 0 (mode 2, 1193 counts: ~1 kHz), enables interrupts and jumps to
/// the counting loop at `CODE_ADDR`.
const TIMER_SETUP: &[u8] = &[
    0xb0, 0x11, 0xe6, 0x20, // ICW1: edge, cascade, ICW4 needed
    0xb0, 0x20, 0xe6, 0x21, // ICW2: vector base 0x20
    0xb0, 0x04, 0xe6, 0x21, // ICW3: slave on IRQ 2
    0xb0, 0x01, 0xe6, 0x21, // ICW4: 8086 mode
    0xb0, 0xfe, 0xe6, 0x21, // OCW1: only IRQ 0 unmasked
    0xb0, 0xff, 0xe6, 0xa1, // slave: all masked
    0xb0, 0x34, 0xe6, 0x43, // PIT channel 0, lo/hi, mode 2
    0xb0, 0xa9, 0xe6, 0x40, // count 0x04a9, low byte
    0xb0, 0x04, 0xe6, 0x40, // high byte
    0xfb, // sti
    0xb8, 0x00, 0x10, 0x00, 0x00, // mov eax, 0x1000
    0xff, 0xe0, // jmp eax
];

/// Timer handler: `inc dword [TICKS]; EOI to the master PIC; add esp, 12;
/// sti; push CODE; ret` (no IRET, see `NMI_HANDLER`): back to the loop's
/// start, which only costs a few repeated increments.
const TIMER_HANDLER: &[u8] = &[
    0xff, 0x05, 0x04, 0x20, 0x00, 0x00, // inc dword [0x2004]
    0xb0, 0x20, 0xe6, 0x20, // mov al, 0x20; out 0x20, al
    0x83, 0xc4, 0x0c, // add esp, 12
    0xfb, // sti
    0x68, 0x00, 0x10, 0x00, 0x00, // push 0x1000
    0xc3, // ret
];

/// One line of the probe's table: what was tried and how it went.
#[derive(Default)]
struct Table(Vec<(String, String)>);

impl Table {
    fn note(&mut self, step: &str, outcome: impl Into<String>) {
        self.0.push((step.to_owned(), outcome.into()));
    }

    /// Records `result` under `step` and returns its value, if any.
    fn rec<T, E: Debug>(&mut self, step: &str, result: Result<T, E>) -> Option<T> {
        match result {
            Ok(v) => {
                self.note(step, "ok");
                Some(v)
            }
            Err(e) => {
                self.note(step, format!("FAILED: {e:?}"));
                None
            }
        }
    }

    fn ok(&self, step: &str) -> bool {
        self.0.iter().any(|(s, o)| s == step && o == "ok")
    }

    fn print(&self, title: &str) {
        let mut out = std::io::stdout().lock();
        writeln!(out, "\n== {title} ==").unwrap();
        for (step, outcome) in &self.0 {
            writeln!(out, "{step:<44} {outcome}").unwrap();
        }
    }
}

/// Guest memory: a mapping that the VM's slot 0 points at.
struct Memory {
    ptr: *mut u8,
    len: usize,
}

impl Memory {
    fn anonymous(len: usize) -> Memory {
        // SAFETY: a fresh anonymous mapping; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
        Memory { ptr: ptr.cast(), len }
    }

    /// A private (copy-on-write) mapping of `file`: guest writes never reach it.
    fn private_file(file: &std::fs::File, len: usize) -> Memory {
        // SAFETY: maps `len` bytes of an open file; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
        Memory { ptr: ptr.cast(), len }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `len` bytes long and lives as long as `self`;
        // the guest may write it concurrently only while a vCPU runs, and the
        // probe reads it only between KVM_RUN calls on its single thread.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn write(&self, addr: usize, data: &[u8]) {
        assert!(addr + data.len() <= self.len);
        // SAFETY: in bounds (checked above) of a live, writable mapping.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(addr), data.len()) };
    }

    fn read_u32(&self, addr: usize) -> u32 {
        u32::from_le_bytes(self.bytes()[addr..addr + 4].try_into().unwrap())
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping this value owns; VMs using it are dropped first.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A VM with an in-kernel irqchip and PIT, one memory slot and one vCPU.
/// Field order matters: the vCPU and VM close before the memory is unmapped.
struct Machine {
    vcpu: VcpuFd,
    vm: VmFd,
    mem: Memory,
}

/// `cpuid`: the saved one for a restore, else what KVM supports.
fn machine(kvm: &Kvm, mem: Memory, cpuid: Option<&CpuId>, table: &mut Table) -> Machine {
    let vm = kvm.create_vm().unwrap();
    vm.set_tss_address(0xfffb_d000).unwrap();
    vm.set_identity_map_address(0xfffb_c000).unwrap();
    table.rec("KVM_CREATE_IRQCHIP", vm.create_irq_chip()).unwrap();
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    table.rec("KVM_CREATE_PIT2", vm.create_pit2(pit)).unwrap();
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: mem.len as u64,
        userspace_addr: mem.ptr as u64,
        flags: 0,
    };
    // SAFETY: the region is a live mapping owned by the returned Machine,
    // whose field order closes the VM before the mapping goes.
    unsafe { vm.set_user_memory_region(region) }.unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    let cpuid = cpuid.unwrap_or(&supported);
    table.rec("KVM_SET_CPUID2", vcpu.set_cpuid2(cpuid)).unwrap();
    Machine { vcpu, vm, mem }
}

fn segment(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Loads `code`, a GDT and an IDT whose NMI gate points at `NMI_HANDLER`, and
/// points the vCPU at `code` in flat 32-bit protected mode.
fn boot(m: &Machine, code: &[u8]) {
    let gdt: [u64; 4] = [0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x0000_8b00_0000_0067];
    for (i, e) in gdt.iter().enumerate() {
        m.mem.write(GDT_ADDR + 8 * i, &e.to_le_bytes());
    }
    for (vector, handler) in [(2, NMI_HANDLER_ADDR as u64), (TIMER_VECTOR, TIMER_HANDLER_ADDR as u64)] {
        let gate = (handler & 0xffff) | (0x08 << 16) | (0x8e00 << 32) | ((handler >> 16) << 48);
        m.mem.write(IDT_ADDR + 8 * vector, &gate.to_le_bytes());
    }
    m.mem.write(CODE_ADDR, code);
    m.mem.write(NMI_HANDLER_ADDR, NMI_HANDLER);
    m.mem.write(TIMER_HANDLER_ADDR, TIMER_HANDLER);
    m.mem.write(TIMER_SETUP_ADDR, TIMER_SETUP);

    let mut sregs: kvm_sregs = m.vcpu.get_sregs().unwrap();
    sregs.cs = segment(0x08, 0xb);
    let data = segment(0x10, 0x3);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = kvm_segment { limit: 0x67, s: 0, g: 0, db: 0, ..segment(0x18, 0xb) };
    sregs.gdt.base = GDT_ADDR as u64;
    sregs.gdt.limit = 31;
    sregs.idt.base = IDT_ADDR as u64;
    sregs.idt.limit = (8 * (TIMER_VECTOR + 1) - 1) as u16;
    (sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer) = (1, 0, 0, 0);
    m.vcpu.set_sregs(&sregs).unwrap();
    let regs = kvm_regs { rip: CODE_ADDR as u64, rsp: STACK_TOP, rflags: 2, ..Default::default() };
    m.vcpu.set_regs(&regs).unwrap();
}

/// Runs the vCPU until it has reported `n` times on `PORT`; returns the
/// values reported. Reports from the NMI handler go to `nmi`.
fn run_reports(vcpu: &mut VcpuFd, n: usize, nmi: &mut Vec<u32>) -> Vec<u32> {
    try_reports(vcpu, n, nmi).unwrap()
}

/// As `run_reports`, but any other exit is an error that describes it.
fn try_reports(vcpu: &mut VcpuFd, n: usize, nmi: &mut Vec<u32>) -> Result<Vec<u32>, String> {
    let mut seen = Vec::new();
    while seen.len() < n {
        let value = match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) if data.len() == 4 => (port, u32::from_le_bytes(data.try_into().unwrap())),
            Ok(VcpuExit::InternalError) => {
                // SAFETY: the exit reason says the `internal` member is the valid one.
                let internal = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal };
                let ndata = (internal.ndata as usize).min(internal.data.len());
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or_default();
                return Err(format!(
                    "internal error, suberror {} data {:x?} rip {rip:#x}",
                    internal.suberror,
                    &internal.data[..ndata]
                ));
            }
            Ok(other) => return Err(format!("unexpected exit: {other:?}")),
            Err(e) => return Err(format!("KVM_RUN: {e}")),
        };
        match value {
            (PORT, v) => seen.push(v),
            (NMI_PORT, v) => nmi.push(v),
            (other, _) => return Err(format!("unexpected out to port {other:#x}")),
        }
    }
    Ok(seen)
}

/// Completes the I/O the last exit left pending, the way a VMM pauses a vCPU:
/// KVM_RUN with `immediate_exit` set, which returns EINTR at once.
fn pause(vcpu: &mut VcpuFd) -> Result<(), String> {
    vcpu.set_kvm_immediate_exit(1);
    let result = match vcpu.run() {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Err(e) => Err(format!("errno {}", e.errno())),
        Ok(exit) => Err(format!("unexpected exit {exit:?}")),
    };
    vcpu.set_kvm_immediate_exit(0);
    result
}

/// Everything a snapshot holds: the VMM's saved vCPU and VM state
/// (`vmm::snapshot::kvm`, the code `Vm` snapshots with), and memory.
struct Saved {
    vcpu: VcpuState,
    vm: VmKvmState,
    memory: Vec<u8>,
}

/// Saves A's state with the VMM's own functions, noting what the host
/// offers on the way (XSAVE size, MSRs, TSC rate, clock flags).
fn save(kvm: &Kvm, m: &Machine, t: &mut Table) -> Saved {
    let xsave_size = snapshot_kvm::xsave_size(&m.vm);
    t.note("KVM_CAP_XSAVE2 (size)", xsave_size.to_string());
    let indices = snapshot_kvm::msrs_to_save(kvm).unwrap();
    let listed = kvm.get_msr_index_list().unwrap().as_slice().len();
    t.note("MSR indices to save", format!("{} ({listed} listed by KVM, plus the unlisted ones)", indices.len()));
    let vcpu =
        t.rec("save vCPU (save_vcpu: all GETs)", snapshot_kvm::save_vcpu(&m.vcpu, 0, &indices, xsave_size)).unwrap();
    let unreadable: Vec<String> =
        indices.iter().filter(|i| !vcpu.msrs.iter().any(|e| e.index == **i)).map(|i| format!("{i:#x}")).collect();
    t.note("  MSRs read", format!("{} of {}; unreadable: {unreadable:?}", vcpu.msrs.len(), indices.len()));
    t.note("  tsc_khz", format!("{:?}", vcpu.tsc_khz));
    t.note("  xsave words", vcpu.xsave.len().to_string());
    let vm = t.rec("save VM (save_vm: irqchips, pit2, clock)", snapshot_kvm::save_vm(&m.vm)).unwrap();
    t.note("  clock flags", format!("{:#x} (clock {} ns)", vm.clock.flags, vm.clock.clock));
    Saved { vcpu, vm, memory: m.mem.bytes().to_vec() }
}

/// Restores `s` into the fresh machine `m` with the VMM's own functions, in
/// Firecracker's order: the vCPU (CPUID, mp_state, regs, sregs, xsave,
/// xcrs, debugregs, lapic, MSRs, vcpu_events, TSC rate), then the VM (pit2,
/// clock, irqchips).
fn restore(m: &Machine, s: &Saved, t: &mut Table) {
    t.rec("restore vCPU (restore_vcpu: all SETs)", snapshot_kvm::restore_vcpu(&m.vcpu, &s.vcpu));
    t.rec("restore VM (restore_vm)", snapshot_kvm::restore_vm(&m.vm, &s.vm));
}

/// Writes the saved memory to a file and maps it privately for VM B.
fn memory_file(s: &Saved) -> (tempfile::NamedTempFile, Memory) {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(&s.memory).unwrap();
    file.flush().unwrap();
    let mem = Memory::private_file(file.as_file(), s.memory.len());
    (file, mem)
}

#[test]
fn kvm_state_saved_from_a_running_vm_restores_into_a_fresh_one_that_continues() {
    if !vm::vm_available([]) {
        return;
    }
    let kvm = Kvm::new().unwrap();
    let mut t = Table::default();
    let mut a = machine(&kvm, Memory::anonymous(MEM_SIZE), None, &mut t);
    boot(&a, COUNTING);
    let mut nmi = Vec::new();
    let reports = run_reports(&mut a.vcpu, 5, &mut nmi);
    t.note("A: reports before the snapshot", format!("{reports:?}"));
    assert_eq!(reports, [256, 512, 768, 1024, 1280]);
    let rip_at_exit = a.vcpu.get_regs().unwrap().rip;
    let paused = pause(&mut a.vcpu);
    let rip_paused = a.vcpu.get_regs().unwrap().rip;
    t.note(
        "A: pause (KVM_RUN with immediate_exit)",
        format!("{paused:?}; rip {rip_at_exit:#x} at the OUT exit -> {rip_paused:#x} after"),
    );

    // Non-default values in a few MSRs, so that their restore shows.
    let marked =
        Msrs::from_entries(&MARKED_MSRS.map(|(index, data)| kvm_msr_entry { index, data, ..Default::default() }))
            .unwrap();
    assert_eq!(a.vcpu.set_msrs(&marked).unwrap(), MARKED_MSRS.len());
    let started = std::time::Instant::now();
    let saved = save(&kvm, &a, &mut t);
    t.note("save: all GETs + 2 MiB copy took", format!("{:?}", started.elapsed()));
    let stopped_at = a.mem.read_u32(COUNTER_ADDR);
    let ebx_a = saved.vcpu.regs.rbx;
    t.note("A: counter / ebx at the snapshot", format!("{stopped_at} / {ebx_a}"));

    let (file, mem) = memory_file(&saved);
    let mut b = machine(&kvm, mem, None, &mut t);
    let started = std::time::Instant::now();
    restore(&b, &saved, &mut t);
    t.note("restore: all SETs took", format!("{:?}", started.elapsed()));
    let clock_b = b.vm.get_clock().unwrap().clock;
    t.note("B: KVM_GET_CLOCK after restore (ns)", format!("{clock_b} (saved {})", saved.vm.clock.clock));
    let tsc = |v: &VcpuFd| {
        let mut m = Msrs::from_entries(&[kvm_msr_entry { index: 0x10, ..Default::default() }]).unwrap();
        v.get_msrs(&mut m).unwrap();
        m.as_slice()[0].data
    };
    let saved_tsc = saved.vcpu.msrs.iter().find(|e| e.index == 0x10).map(|e| e.data);
    let (tsc_b, tsc_a) = (tsc(&b.vcpu), tsc(&a.vcpu));
    t.note("B: IA32_TSC after restore", format!("{tsc_b} (saved {saved_tsc:?}, A now {tsc_a})"));
    // What KVM_CLOCK_REALTIME does: with it, SET_CLOCK adds the wall time
    // elapsed since the GET; without it the clock resumes at the saved value.
    let clock = saved.vm.clock;
    let plain = kvm_bindings::kvm_clock_data { flags: 0, ..clock };
    let r = b.vm.set_clock(&plain).map(|()| b.vm.get_clock().unwrap().clock);
    t.note("B: SET clock flags 0, then GET (ns)", format!("{r:?}"));
    let r = b.vm.set_clock(&clock).map(|()| b.vm.get_clock().unwrap().clock);
    t.note("B: SET clock flags as read, then GET (ns)", format!("{r:?}"));
    let mut in_b =
        Msrs::from_entries(&MARKED_MSRS.map(|(index, _)| kvm_msr_entry { index, ..Default::default() })).unwrap();
    b.vcpu.get_msrs(&mut in_b).unwrap();
    let in_b: Vec<(u32, u64)> = in_b.as_slice().iter().map(|e| (e.index, e.data)).collect();
    t.note("B: marked MSRs after restore", format!("{in_b:x?}"));
    let b_reports = run_reports(&mut b.vcpu, 3, &mut nmi);
    let ebx_b = b.vcpu.get_regs().unwrap().rbx;
    t.note("B: reports after the restore", format!("{b_reports:?}, ebx {ebx_b}"));

    // A goes on by itself; B's writes must not show in A nor in the file.
    b.mem.write(COUNTER_ADDR + 0x100, &[0xbb; 4]);
    let a_reports = run_reports(&mut a.vcpu, 2, &mut nmi);
    let a_counter = a.mem.read_u32(COUNTER_ADDR);
    let b_counter = b.mem.read_u32(COUNTER_ADDR);
    let file_counter =
        u32::from_le_bytes(std::fs::read(file.path()).unwrap()[COUNTER_ADDR..COUNTER_ADDR + 4].try_into().unwrap());
    t.note("A: reports after resuming", format!("{a_reports:?}"));
    t.note("counters A / B / file", format!("{a_counter} / {b_counter} / {file_counter}"));
    // Does a host write of IA32_TSC move the guest TSC at all?
    let one = Msrs::from_entries(&[kvm_msr_entry { index: 0x10, data: 1_000_000_000, ..Default::default() }]).unwrap();
    let written = a.vcpu.set_msrs(&one);
    t.note("A: SET IA32_TSC = 1e9, then GET", format!("{written:?} written, reads {}", tsc(&a.vcpu)));
    let seen = guest_tsc_after_host_write(&kvm, 1_000_000_000, &mut t);
    t.note("C: guest RDTSC (CPL0) after that write", seen.to_string());
    t.print("snapshot probe: running guest");

    // Every GET of the save and every SET of the restore worked (each
    // function stops at the first that fails, naming it).
    for step in [
        "save vCPU (save_vcpu: all GETs)",
        "save VM (save_vm: irqchips, pit2, clock)",
        "restore vCPU (restore_vcpu: all SETs)",
        "restore VM (restore_vm)",
    ] {
        assert!(t.ok(step), "{step} failed");
    }
    // Every MSR the VMM saves was readable, and all of them were written
    // back (restore_vcpu fails on the first MSR KVM refuses).
    assert_eq!(saved.vcpu.msrs.len(), snapshot_kvm::msrs_to_save(&kvm).unwrap().len());
    assert_eq!(in_b, MARKED_MSRS);
    assert_eq!(paused, Ok(()));
    // B continues from A's count, not from 0, and its registers came along.
    let next = stopped_at + EVERY;
    assert_eq!(b_reports, [next, next + EVERY, next + 2 * EVERY]);
    assert_eq!(ebx_b, ebx_a + 3);
    // A diverges on its own from the same point; the saved file is untouched.
    assert_eq!(a_reports, [next, next + EVERY]);
    assert_eq!(file_counter, stopped_at);
    assert_eq!(a.mem.read_u32(COUNTER_ADDR + 0x100), 0);
    assert!(nmi.is_empty());
}

/// Sends SIGUSR1 to `thread` until `done`: kicks a vCPU out of a KVM_RUN
/// that blocks in HLT (KVM_RUN returns EINTR).
fn kicker(thread: libc::pthread_t, done: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    extern "C" fn noop(_: libc::c_int) {}
    // SAFETY: installs a handler that does nothing, without SA_RESTART, so
    // that a blocked KVM_RUN returns EINTR.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = noop as extern "C" fn(libc::c_int) as usize;
        libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut());
    }
    std::thread::spawn(move || {
        while !done.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
            // SAFETY: `thread` is the test's thread, alive until it sets `done`
            // and joins this one.
            unsafe { libc::pthread_kill(thread, libc::SIGUSR1) };
        }
    })
}

/// Runs until KVM_RUN returns EINTR (the kicker's signal); panics on any exit.
fn run_until_kicked(vcpu: &mut VcpuFd) {
    match vcpu.run() {
        Err(e) if e.errno() == libc::EINTR => {}
        other => panic!("a halted vCPU exited: {other:?}"),
    }
}

#[test]
fn a_vcpu_halted_at_the_snapshot_stays_halted_and_an_nmi_wakes_it() {
    if !vm::vm_available([]) {
        return;
    }
    let kvm = Kvm::new().unwrap();
    let mut t = Table::default();
    let mut a = machine(&kvm, Memory::anonymous(MEM_SIZE), None, &mut t);
    boot(&a, COUNTING_THEN_HALT);
    let mut nmi = Vec::new();
    let first = run_reports(&mut a.vcpu, 1, &mut nmi);
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() };
    let done = Arc::new(AtomicBool::new(false));
    let kick = kicker(me, done.clone());
    run_until_kicked(&mut a.vcpu);
    let mp_a = a.vcpu.get_mp_state().unwrap().mp_state;
    t.note("A: report, then mp_state after the kick", format!("{first:?}, {mp_a}"));

    let saved = save(&kvm, &a, &mut t);
    let (_file, mem) = memory_file(&saved);
    let mut b = machine(&kvm, mem, None, &mut t);
    restore(&b, &saved, &mut t);
    run_until_kicked(&mut b.vcpu);
    let mp_b = b.vcpu.get_mp_state().unwrap().mp_state;
    t.note("B: still halted after the restore (mp_state)", mp_b.to_string());
    done.store(true, Ordering::SeqCst);
    kick.join().unwrap();

    // Control: the same NMI into A, which was never restored.
    t.rec("A: KVM_NMI", a.vcpu.nmi());
    let mut a_nmi = Vec::new();
    let a_after = try_reports(&mut a.vcpu, 1, &mut a_nmi);
    t.note("A: after the NMI: NMI handler / next report", format!("{a_nmi:?} / {a_after:?}"));
    t.rec("B: KVM_NMI", b.vcpu.nmi());
    let b_after = try_reports(&mut b.vcpu, 1, &mut nmi);
    t.note("B: after the NMI: NMI handler / next report", format!("{nmi:?} / {b_after:?}"));
    t.print("snapshot probe: halted guest");

    assert_eq!(first, [EVERY]);
    assert_eq!(mp_a, KVM_MP_STATE_HALTED);
    assert_eq!(mp_b, KVM_MP_STATE_HALTED);
    assert!(t.ok("restore vCPU (restore_vcpu: all SETs)") && t.ok("restore VM (restore_vm)"));
    assert_eq!(a_nmi, [EVERY]);
    assert_eq!(a_after, Ok(vec![2 * EVERY]));
    assert_eq!(nmi, [EVERY]);
    assert_eq!(b_after, Ok(vec![2 * EVERY]));
}

/// Runs until the guest's tick count reaches `ticks` or it made `max` reports.
fn run_until_ticks(m: &mut Machine, ticks: u32, max: usize) -> (u32, usize) {
    let mut nmi = Vec::new();
    let mut reports = 0;
    while m.mem.read_u32(TICKS_ADDR) < ticks && reports < max {
        reports += run_reports(&mut m.vcpu, 1, &mut nmi).len();
    }
    (m.mem.read_u32(TICKS_ADDR), reports)
}

#[test]
fn timer_interrupts_from_the_restored_pit_and_pic_keep_coming() {
    if !vm::vm_available([]) {
        return;
    }
    let kvm = Kvm::new().unwrap();
    let mut t = Table::default();
    let mut a = machine(&kvm, Memory::anonymous(MEM_SIZE), None, &mut t);
    boot(&a, COUNTING);
    let mut regs = a.vcpu.get_regs().unwrap();
    regs.rip = TIMER_SETUP_ADDR as u64;
    a.vcpu.set_regs(&regs).unwrap();
    let (ticks_a, reports_a) = run_until_ticks(&mut a, 5, 5000);
    t.note("A: timer ticks / reports before the snapshot", format!("{ticks_a} / {reports_a}"));
    pause(&mut a.vcpu).unwrap();
    let saved = save(&kvm, &a, &mut t);
    let saved_ticks = a.mem.read_u32(TICKS_ADDR);
    let saved_count = a.mem.read_u32(COUNTER_ADDR);

    let (_file, mem) = memory_file(&saved);
    let mut b = machine(&kvm, mem, None, &mut t);
    restore(&b, &saved, &mut t);
    let mut nmi = Vec::new();
    let first_b = run_reports(&mut b.vcpu, 1, &mut nmi);
    let (ticks_b, reports_b) = run_until_ticks(&mut b, saved_ticks + 5, 5000);
    t.note(
        "B: first report / ticks / reports after the restore",
        format!("{first_b:?} / {saved_ticks} -> {ticks_b} / {reports_b}"),
    );
    t.print("snapshot probe: guest taking PIT interrupts");

    assert!(ticks_a >= 5, "the guest took no timer interrupts before the snapshot");
    // The loop restarts after each tick, so a report may come a little late,
    // but never from a count below the saved one.
    assert!(first_b[0] > saved_count);
    assert!(ticks_b >= saved_ticks + 5, "the restored PIT/PIC delivered {} ticks", ticks_b - saved_ticks);
}
