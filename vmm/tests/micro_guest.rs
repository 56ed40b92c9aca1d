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
