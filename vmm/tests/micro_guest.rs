//! Runs tiny hand-assembled guests (a few bytes of 32-bit code in a minimal
//! ELF with a PVH note) on KVM: each takes milliseconds, and each drives one
//! way a VM can end. Needs /dev/kvm; skips without it, or fails with
//! `SANDBOX_REQUIRE_VM=1` (./test.sh).
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
#[path = "../../tests/common/vm.rs"]
mod vm;

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm::{Error, ExitReason, Vm, VmConfig};

const LOAD_ADDR: u64 = 0x10_0000;
const CODE_OFFSET: u64 = 0x1000;

/// A minimal ELF64 executable: `code` loaded at 1 MiB, with a Xen
/// PHYS32_ENTRY note pointing at it (or without the note).
fn elf(code: &[u8], with_pvh_note: bool) -> Vec<u8> {
    let phnum: u16 = if with_pvh_note { 2 } else { 1 };
    let mut out = Vec::new();
    out.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    out.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // e_entry
    out.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    out.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    out.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    out.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    out.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    out.extend_from_slice(&phnum.to_le_bytes());
    out.extend_from_slice(&[0; 6]); // no sections
    let note_offset = 64 + 56 * u64::from(phnum);
    let mut phdr = |kind: u32, flags: u32, offset: u64, addr: u64, size: u64| {
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&addr.to_le_bytes());
        out.extend_from_slice(&addr.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&0x1000u64.to_le_bytes());
    };
    phdr(1, 5, CODE_OFFSET, LOAD_ADDR, code.len() as u64); // PT_LOAD, R+X
    if with_pvh_note {
        phdr(4, 4, note_offset, 0, 20); // PT_NOTE
        out.extend_from_slice(&4u32.to_le_bytes()); // namesz
        out.extend_from_slice(&4u32.to_le_bytes()); // descsz
        out.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
        out.extend_from_slice(b"Xen\0");
        out.extend_from_slice(&(LOAD_ADDR as u32).to_le_bytes());
    }
    out.resize(CODE_OFFSET as usize, 0);
    out.extend_from_slice(code);
    out
}

/// Prints "hi\n" on the serial port, then asks the i8042 for a CPU reset.
const HELLO_AND_RESET: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'h', 0xee, // mov al, 'h'; out dx, al
    0xb0, b'i', 0xee, // mov al, 'i'; out dx, al
    0xb0, b'\n', 0xee, // mov al, '\n'; out dx, al
    0xb0, 0xfe, 0xe6, 0x64, // mov al, 0xfe; out 0x64, al
    0xf4, 0xeb, 0xfd, // hlt; jmp hlt
];
/// An invalid opcode with no usable IDT: #UD, #GP, #DF, triple fault.
const TRIPLE_FAULT: &[u8] = &[0x0f, 0x0b];
/// Halts with interrupts off: only the host can end this VM.
const HALT_FOREVER: &[u8] = &[0xfa, 0xf4, 0xeb, 0xfd];
/// Jumps to an address with no memory behind it.
const JUMP_TO_NOWHERE: &[u8] = &[0xb8, 0x00, 0x00, 0x00, 0xc0, 0xff, 0xe0];

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Guest {
    _dir: tempfile::TempDir,
    kernel: PathBuf,
    disk: PathBuf,
}

fn guest(elf_bytes: &[u8]) -> Guest {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("kernel.elf");
    std::fs::write(&kernel, elf_bytes).unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, [0u8; 4096]).unwrap();
    Guest { _dir: dir, kernel, disk }
}

fn config(guest: &Guest, vcpus: u8, sink: &Sink) -> VmConfig {
    VmConfig {
        kernel: guest.kernel.clone(),
        cmdline: "console=ttyS0".into(),
        memory_mib: 32,
        vcpus,
        root_disk: guest.disk.clone(),
        extra_disks: Vec::new(),
        vsock: None,
        serial: Box::new(sink.clone()),
        seccomp: Default::default(),
    }
}

#[test]
fn serial_output_reaches_the_sink_and_an_i8042_reset_ends_the_vm() {
    if !vm::vm_available([]) {
        return;
    }
    let g = guest(&elf(HELLO_AND_RESET, true));
    let sink = Sink::default();
    let reason = Vm::create(config(&g, 1, &sink)).unwrap().run().unwrap();
    assert_eq!(reason, ExitReason::GuestShutdown);
    assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
}

#[test]
fn a_guest_with_memory_above_the_mmio_gap_runs() {
    if !vm::vm_available([]) {
        return;
    }
    let g = guest(&elf(HELLO_AND_RESET, true));
    let sink = Sink::default();
    let mut config = config(&g, 1, &sink);
    config.memory_mib = 4096;
    let reason = Vm::create(config).unwrap().run().unwrap();
    assert_eq!(reason, ExitReason::GuestShutdown);
    assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
}

#[test]
fn a_triple_fault_ends_the_vm_as_a_guest_shutdown() {
    if !vm::vm_available([]) {
        return;
    }
    let g = guest(&elf(TRIPLE_FAULT, true));
    let reason = Vm::create(config(&g, 2, &Sink::default())).unwrap().run().unwrap();
    assert_eq!(reason, ExitReason::GuestShutdown);
}

#[test]
fn the_host_stops_a_halted_guest() {
    if !vm::vm_available([]) {
        return;
    }
    let g = guest(&elf(HALT_FOREVER, true));
    let vm = Vm::create(config(&g, 2, &Sink::default())).unwrap();
    let stop = vm.stop_handle();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        stop.stop();
    });
    assert_eq!(vm.run().unwrap(), ExitReason::StopRequested);
    stopper.join().unwrap();
}

#[test]
fn a_stop_requested_before_run_ends_it_at_once() {
    if !vm::vm_available([]) {
        return;
    }
    let g = guest(&elf(HALT_FOREVER, true));
    let vm = Vm::create(config(&g, 1, &Sink::default())).unwrap();
    vm.stop_handle().stop();
    assert_eq!(vm.run().unwrap(), ExitReason::StopRequested);
}

#[test]
fn executing_from_unbacked_memory_is_a_fatal_error_with_registers() {
    if !vm::vm_available([]) {
        return;
    }
    let g = guest(&elf(JUMP_TO_NOWHERE, true));
    let err = Vm::create(config(&g, 1, &Sink::default())).unwrap().run().unwrap_err();
    let text = err.to_string();
    println!("{text}");
    assert!(matches!(err, Error::EmulationFailure { vcpu: 0, .. }), "unexpected error: {text}");
    assert!(text.contains("rip=0xc0000000"), "{text}");
}

#[test]
fn kernels_that_are_not_pvh_elfs_are_rejected() {
    if !vm::vm_available([]) {
        return;
    }
    let g = guest(b"this is not an ELF file");
    let err = Vm::create(config(&g, 1, &Sink::default())).unwrap_err();
    assert!(matches!(err, Error::KernelLoad { .. }), "{err}");

    let g = guest(&elf(HALT_FOREVER, false));
    let err = Vm::create(config(&g, 1, &Sink::default())).unwrap_err();
    assert!(matches!(err, Error::NoPvhEntry { .. }), "{err}");
    assert!(err.to_string().contains("CONFIG_PVH"));
}

/// A filter that refuses one system call (with EPERM) and allows the rest.
fn refusing(syscall: i64) -> seccompiler::BpfProgram {
    let rules = [(syscall, Vec::new())].into_iter().collect();
    let filter = seccompiler::SeccompFilter::new(
        rules,
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(libc::EPERM as u32),
        seccompiler::TargetArch::x86_64,
    )
    .unwrap();
    filter.try_into().unwrap()
}

/// Each vCPU thread installs its filter before its first `KVM_RUN`: with one
/// that refuses `ioctl`, the guest never prints (it would at its first
/// instruction) and the VM ends with the refused ioctl.
#[test]
fn the_vcpu_filter_is_in_force_before_the_first_guest_instruction() {
    if !vm::vm_available([]) {
        return;
    }
    let g = guest(&elf(HELLO_AND_RESET, true));
    let sink = Sink::default();
    let mut config = config(&g, 1, &sink);
    config.seccomp.vcpu = Some(refusing(libc::SYS_ioctl));
    let err = Vm::create(config).unwrap().run().unwrap_err();
    assert!(err.to_string().contains("Operation not permitted"), "{err}");
    assert!(sink.0.lock().unwrap().is_empty(), "the guest ran");
}

/// The event loop installs its filter before it waits for a device event:
/// with one that refuses `epoll_wait`, the VM ends with the event loop's error.
#[test]
fn the_event_loop_filter_is_in_force_before_the_first_device_event() {
    if !vm::vm_available([]) {
        return;
    }
    let g = guest(&elf(HALT_FOREVER, true));
    let mut config = config(&g, 1, &Sink::default());
    config.seccomp.event_loop = Some(refusing(libc::SYS_epoll_wait));
    let vm = Vm::create(config).unwrap();
    // Without the filter the guest halts for good: stop it, and fail below.
    let stop = vm.stop_handle();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(5));
        stop.stop();
    });
    let err = vm.run().unwrap_err();
    assert!(matches!(err, Error::EventLoop(_)), "{err}");
}

/// Counts in memory at 0x2000 and, every 4096 increments, prints the count
/// on the serial port as a line of eight digits, most significant first,
/// each digit 0-15 as the character `'0' + digit` ('0'..='?'):
/// ```text
/// loop:  inc dword [0x2000]; mov eax, [0x2000]; test eax, 0xfff; jnz loop
///        mov ebx, eax; mov ecx, 8; mov dx, 0x3f8
/// digit: rol ebx, 4; mov al, bl; and al, 0xf; add al, '0'; out dx, al
///        dec ecx; jnz digit; mov al, '\n'; out dx, al; jmp loop
/// ```
const COUNT_AND_REPORT: &[u8] = &[
    0xff, 0x05, 0x00, 0x20, 0x00, 0x00, // inc dword [0x2000]
    0xa1, 0x00, 0x20, 0x00, 0x00, // mov eax, [0x2000]
    0xa9, 0xff, 0x0f, 0x00, 0x00, // test eax, 0xfff
    0x75, 0xee, // jnz loop
    0x89, 0xc3, // mov ebx, eax
    0xb9, 0x08, 0x00, 0x00, 0x00, // mov ecx, 8
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xc1, 0xc3, 0x04, // digit: rol ebx, 4
    0x88, 0xd8, // mov al, bl
    0x24, 0x0f, // and al, 0xf
    0x04, 0x30, // add al, '0'
    0xee, // out dx, al
    0x49, // dec ecx
    0x75, 0xf3, // jnz digit
    0xb0, 0x0a, // mov al, '\n'
    0xee, // out dx, al
    0xeb, 0xd1, // jmp loop
];
/// Where `COUNT_AND_REPORT` keeps its count (a guest physical address).
const COUNTER_ADDR: usize = 0x2000;
const REPORT_EVERY: u32 = 4096;

/// The counts in the complete report lines of `sink`, skipping a partial
/// first line (a restored guest may go on in the middle of one).
fn reports(sink: &Sink) -> Vec<u32> {
    let bytes = sink.0.lock().unwrap().clone();
    let text = String::from_utf8_lossy(&bytes);
    let mut lines: Vec<&str> = text.split('\n').collect();
    lines.pop(); // not ended yet
    lines
        .into_iter()
        .filter(|l| l.len() == 8)
        .map(|l| l.bytes().fold(0u32, |acc, c| (acc << 4) | u32::from(c - b'0')))
        .collect()
}

/// Waits until `sink` holds at least `n` reports.
fn wait_for_reports(sink: &Sink, n: usize) -> Vec<u32> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let got = reports(sink);
        if got.len() >= n {
            return got;
        }
        assert!(std::time::Instant::now() < deadline, "only {} reports: {got:?}", got.len());
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn assert_consecutive(reports: &[u32], who: &str) {
    for pair in reports.windows(2) {
        assert_eq!(pair[1], pair[0] + REPORT_EVERY, "{who} skipped or repeated a count: {reports:?}");
    }
}

fn counter_in(memory_file: &std::path::Path) -> u32 {
    let bytes = std::fs::read(memory_file).unwrap();
    u32::from_le_bytes(bytes[COUNTER_ADDR..COUNTER_ADDR + 4].try_into().unwrap())
}

/// A VM counting on its own thread.
struct Running {
    sink: Sink,
    stop: vmm::StopHandle,
    controller: vmm::VmController,
    thread: std::thread::JoinHandle<vmm::Result<ExitReason>>,
}

fn start(vm: Vm, sink: Sink) -> Running {
    let stop = vm.stop_handle();
    let controller = vm.controller();
    let thread = std::thread::spawn(move || vm.run());
    Running { sink, stop, controller, thread }
}

#[test]
fn a_snapshot_taken_mid_run_goes_on_in_a_restored_vm_while_the_original_runs_on_independently() {
    if !vm::vm_available([]) {
        return;
    }
    let g = guest(&elf(COUNT_AND_REPORT, true));
    let snap_dir = tempfile::tempdir().unwrap();
    let files = vmm::SnapshotFiles::in_dir(snap_dir.path());
    let sink_a = Sink::default();
    let a = start(Vm::create(config(&g, 1, &sink_a)).unwrap(), sink_a.clone());
    wait_for_reports(&a.sink, 3);

    let digests = vmm::Digests {
        kernel: Some(vmm::snapshot::sha256_file(&g.kernel).unwrap()),
        disks: vec![Some(vmm::snapshot::sha256_file(&g.disk).unwrap())],
    };
    let info = a.controller.snapshot(&files, vmm::AfterSnapshot::Resume, digests.clone()).unwrap();
    println!(
        "snapshot: paused after {:?}, paused for {:?}; state file {} bytes, memory file {} bytes ({} written)",
        info.pause_took, info.paused_for, info.state_bytes, info.memory_bytes, info.memory_written_bytes
    );
    assert_eq!(info.memory_bytes, 32 << 20);
    assert_eq!(std::fs::metadata(&files.memory).unwrap().len(), 32 << 20);
    assert_eq!(std::fs::metadata(&files.state).unwrap().len(), info.state_bytes);
    assert!(info.memory_written_bytes < info.memory_bytes / 4, "zero pages are left as holes");
    let header = vmm::snapshot::read_header(&files.state).unwrap();
    assert_eq!((header.memory_mib, header.vcpus), (32, 1));
    assert_eq!(header.digests, digests);
    let saved_count = counter_in(&files.memory);
    assert!(saved_count >= 3 * REPORT_EVERY, "the count in the memory file: {saved_count}");

    // B: a new VM from the snapshot, with its own console.
    let sink_b = Sink::default();
    let b = start(Vm::restore(config(&g, 1, &sink_b), &files, &digests).unwrap(), sink_b.clone());
    let from_b = wait_for_reports(&b.sink, 5);
    let reports_a_at_restore = reports(&a.sink).len();
    let from_a = wait_for_reports(&a.sink, reports_a_at_restore + 5);
    for vm in [&a, &b] {
        vm.stop.stop();
    }
    let (a, b) = (a.thread.join().unwrap(), b.thread.join().unwrap());
    assert_eq!(a.unwrap(), ExitReason::StopRequested);
    assert_eq!(b.unwrap(), ExitReason::StopRequested);

    // B went on from the saved count: its first report is the next
    // multiple of 4096 after it, not a count from zero.
    assert_eq!(from_b[0], (saved_count / REPORT_EVERY + 1) * REPORT_EVERY, "B: {from_b:?}");
    assert_consecutive(&from_b, "B");
    // A went on by itself: consecutive reports through the snapshot and
    // while B ran. Had the two shared memory, both would have incremented
    // one counter and skipped reports.
    assert_consecutive(&from_a, "A");
    assert!(from_a.contains(&from_b[0]) && from_a.len() > reports_a_at_restore);
    // Neither wrote into the snapshot's memory file.
    assert_eq!(counter_in(&files.memory), saved_count);
}

#[test]
fn a_snapshot_can_stop_the_vm_and_two_vms_restore_from_it_at_once() {
    if !vm::vm_available([]) {
        return;
    }
    let g = guest(&elf(COUNT_AND_REPORT, true));
    let snap_dir = tempfile::tempdir().unwrap();
    let files = vmm::SnapshotFiles::in_dir(snap_dir.path());
    let sink = Sink::default();
    let a = start(Vm::create(config(&g, 2, &sink)).unwrap(), sink.clone());
    wait_for_reports(&a.sink, 2);
    a.controller.snapshot(&files, vmm::AfterSnapshot::Stop, vmm::Digests::default()).unwrap();
    assert_eq!(a.thread.join().unwrap().unwrap(), ExitReason::StopRequested);
    let err = a.controller.snapshot(&files, vmm::AfterSnapshot::Resume, vmm::Digests::default()).unwrap_err();
    assert!(matches!(err, Error::VmNotRunning), "{err}");

    let saved_count = counter_in(&files.memory);
    let copies: Vec<Running> = (0..2)
        .map(|_| {
            let sink = Sink::default();
            start(Vm::restore(config(&g, 2, &sink), &files, &vmm::Digests::default()).unwrap(), sink)
        })
        .collect();
    let next = (saved_count / REPORT_EVERY + 1) * REPORT_EVERY;
    for copy in &copies {
        let got = wait_for_reports(&copy.sink, 3);
        assert_eq!(got[0], next);
        assert_consecutive(&got, "a copy");
    }
    // A copy will not write a snapshot over the memory file it runs from,
    // and runs on.
    let err = copies[0].controller.snapshot(&files, vmm::AfterSnapshot::Resume, vmm::Digests::default()).unwrap_err();
    assert!(err.to_string().contains("mapped from it"), "{err}");
    assert_eq!(counter_in(&files.memory), saved_count);
    let seen = reports(&copies[0].sink).len();
    wait_for_reports(&copies[0].sink, seen + 2);
    for copy in copies {
        copy.stop.stop();
        assert_eq!(copy.thread.join().unwrap().unwrap(), ExitReason::StopRequested);
    }
}

#[test]
fn a_halted_guest_is_snapshotted_and_stays_halted_after_the_restore() {
    if !vm::vm_available([]) {
        return;
    }
    let g = guest(&elf(HALT_FOREVER, true));
    let snap_dir = tempfile::tempdir().unwrap();
    let files = vmm::SnapshotFiles::in_dir(snap_dir.path());
    let a = start(Vm::create(config(&g, 1, &Sink::default())).unwrap(), Sink::default());
    std::thread::sleep(Duration::from_millis(100));
    a.controller.snapshot(&files, vmm::AfterSnapshot::Stop, vmm::Digests::default()).unwrap();
    assert_eq!(a.thread.join().unwrap().unwrap(), ExitReason::StopRequested);
    let b = start(Vm::restore(config(&g, 1, &Sink::default()), &files, &Default::default()).unwrap(), Sink::default());
    std::thread::sleep(Duration::from_millis(200));
    assert!(!b.thread.is_finished(), "the restored guest is still halted");
    b.controller
        .snapshot(&vmm::SnapshotFiles::in_dir(g._dir.path()), vmm::AfterSnapshot::Resume, Default::default())
        .unwrap();
    b.stop.stop();
    assert_eq!(b.thread.join().unwrap().unwrap(), ExitReason::StopRequested);
}

#[test]
fn corrupt_truncated_foreign_and_mismatched_snapshots_are_refused_with_distinct_errors() {
    if !vm::vm_available([]) {
        return;
    }
    let g = guest(&elf(COUNT_AND_REPORT, true));
    let snap_dir = tempfile::tempdir().unwrap();
    let files = vmm::SnapshotFiles::in_dir(snap_dir.path());
    let sink = Sink::default();
    let a = start(Vm::create(config(&g, 1, &sink)).unwrap(), sink);
    wait_for_reports(&a.sink, 1);
    let digests = vmm::Digests { kernel: Some("k".repeat(64)), disks: vec![Some("d".repeat(64))] };
    a.controller.snapshot(&files, vmm::AfterSnapshot::Stop, digests.clone()).unwrap();
    a.thread.join().unwrap().unwrap();
    let good = std::fs::read(&files.state).unwrap();
    let restore = |files: &vmm::SnapshotFiles, memory_mib: u32, digests: &vmm::Digests| {
        let mut c = config(&g, 1, &Sink::default());
        c.memory_mib = memory_mib;
        Vm::restore(c, files, digests).map(drop)
    };
    restore(&files, 32, &digests).unwrap();

    let bad_dir = tempfile::tempdir().unwrap();
    let bad = vmm::SnapshotFiles { state: bad_dir.path().join("vm.state"), memory: files.memory.clone() };
    let with_state = |bytes: &[u8]| {
        std::fs::write(&bad.state, bytes).unwrap();
        restore(&bad, 32, &digests).unwrap_err()
    };
    let truncated = with_state(&good[..good.len() - 100]);
    assert!(matches!(truncated, Error::SnapshotTruncated { .. }), "{truncated}");
    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 0x40;
    let checksum = with_state(&flipped);
    assert!(matches!(checksum, Error::SnapshotChecksum { .. }), "{checksum}");
    let mut other_version = good.clone();
    other_version[8..12].copy_from_slice(&99u32.to_le_bytes());
    let version = with_state(&other_version);
    assert!(matches!(version, Error::SnapshotVersion { found: 99, .. }), "{version}");
    let foreign = with_state(&std::fs::read(&g.kernel).unwrap());
    assert!(matches!(foreign, Error::SnapshotForeign { .. }), "{foreign}");

    let memory = restore(&files, 64, &digests).unwrap_err();
    assert!(matches!(memory, Error::SnapshotMismatch { .. }), "{memory}");
    assert!(memory.to_string().contains("memory size"), "{memory}");
    let other_kernel = vmm::Digests { kernel: Some("0".repeat(64)), ..digests.clone() };
    let kernel = restore(&files, 32, &other_kernel).unwrap_err();
    assert!(kernel.to_string().contains("kernel"), "{kernel}");
    let mut two_vcpus = config(&g, 2, &Sink::default());
    two_vcpus.memory_mib = 32;
    let vcpus = Vm::restore(two_vcpus, &files, &digests).unwrap_err();
    assert!(vcpus.to_string().contains("vCPU count"), "{vcpus}");

    // A memory file cut short.
    let short = vmm::SnapshotFiles { state: files.state.clone(), memory: bad_dir.path().join("short.mem") };
    std::fs::write(&short.memory, vec![0u8; 1 << 20]).unwrap();
    let cut = restore(&short, 32, &digests).unwrap_err();
    assert!(matches!(cut, Error::SnapshotTruncated { .. }), "{cut}");
    // Distinct messages for each.
    let messages: std::collections::HashSet<String> =
        [&truncated, &checksum, &version, &foreign, &memory].iter().map(|e| e.to_string()).collect();
    assert_eq!(messages.len(), 5);
    for e in [&truncated, &checksum, &version, &foreign, &memory, &kernel, &vcpus, &cut] {
        println!("refused: {e}");
    }
}
