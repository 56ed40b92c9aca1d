//! Snapshots of the real guest: boots the guest kernel with the built
//! default image until its agent answers on vsock port 5000, leaves a mark
//! in the guest (a file in its /tmp), snapshots and stops it, restores the
//! snapshot into a new VM with another vsock socket and console, and checks
//! that the restored guest's agent answers a command over a new vsock
//! connection and still has the mark. Prints how long boot, save and
//! restore took and the sizes of the files.
//!
//! Needs /dev/kvm, the kernel (`kernel-config/build.sh`, or SANDBOX_KERNEL)
//! and the default image (`./setup.sh`, or SANDBOX_IMAGE). Without them the
//! test skips, or fails with `SANDBOX_REQUIRE_VM=1`.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
#[path = "../../tests/common/vm.rs"]
mod vm;

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[path = "support/agent.rs"]
mod agent;

use agent::{sh, wait_for_agent};
use vmm::{AfterSnapshot, Digests, ExitReason, SnapshotFiles, Vm, VmConfig, VsockConfig};

fn cached(var: &str, under_cache: &str) -> PathBuf {
    std::env::var_os(var).map_or_else(
        || Path::new(&std::env::var_os("HOME").expect("HOME is not set")).join(".cache/sandbox").join(under_cache),
        PathBuf::from,
    )
}

fn kernel() -> PathBuf {
    cached("SANDBOX_KERNEL", "kernel/vmlinux")
}

fn image() -> PathBuf {
    cached("SANDBOX_IMAGE", "images/default.erofs")
}

/// Console output, kept for failure messages.
#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Console {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

fn config(uds: &Path, console: &Console) -> VmConfig {
    VmConfig {
        kernel: kernel(),
        cmdline: format!("{} root=/dev/vda ro rootfstype=erofs init=/sbin/sandbox-init", vmm::cmdline::base_args()),
        memory_mib: 256,
        vcpus: 2,
        root_disk: image(),
        extra_disks: Vec::new(),
        vsock: Some(VsockConfig { guest_cid: 3, uds_path: uds.to_path_buf() }),
        serial: Box::new(console.clone()),
        seccomp: Default::default(),
    }
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn a_booted_guest_is_snapshotted_stopped_and_restored_and_its_agent_answers_on_a_new_connection() {
    if !vm::vm_available(
        vm::missing_file(&kernel(), "build the guest kernel with kernel-config/build.sh (or set SANDBOX_KERNEL)")
            .into_iter()
            .chain(vm::missing_file(&image(), "build the default image with ./setup.sh (or set SANDBOX_IMAGE)")),
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for sub in ["a", "b", "snap"] {
        std::fs::create_dir(dir.path().join(sub)).unwrap();
    }
    let uds_a = dir.path().join("a/vsock.sock");
    let uds_b = dir.path().join("b/vsock.sock");
    let files = SnapshotFiles::in_dir(dir.path().join("snap"));
    println!("host load before: {}", load());

    // A: boot until the agent answers.
    let console_a = Console::default();
    let booted = Instant::now();
    let vm_a = Vm::create(config(&uds_a, &console_a)).unwrap();
    let controller = vm_a.controller();
    let run_a = std::thread::spawn(move || vm_a.run());
    let boot_to_agent = wait_for_agent(&uds_a, &|| console_a.text(), Duration::from_secs(600));
    let boot_to_agent = boot_to_agent.max(booted.elapsed());
    let (status, out) = sh(&uds_a, "echo before-the-snapshot > /tmp/mark && cat /tmp/mark");
    assert_eq!((status, out.as_str()), (0, "before-the-snapshot\n"));

    // Snapshot and stop A.
    let digests = Digests {
        kernel: Some(vmm::snapshot::sha256_file(&kernel()).unwrap()),
        disks: vec![Some(vmm::snapshot::sha256_file(&image()).unwrap())],
    };
    let saving = Instant::now();
    let info = controller.snapshot(&files, AfterSnapshot::Stop, digests.clone()).unwrap();
    let save_took = saving.elapsed();
    let reason = run_a.join().unwrap();
    assert_eq!(reason.unwrap(), ExitReason::StopRequested, "console:\n{}", console_a.text());
    let memory_allocated = std::fs::metadata(&files.memory).unwrap().blocks() * 512;

    // B: restored from the snapshot, with its own socket and console.
    let console_b = Console::default();
    let restoring = Instant::now();
    let vm_b = Vm::restore(config(&uds_b, &console_b), &files, &digests).unwrap();
    let restore_took = restoring.elapsed();
    let stop_b = vm_b.stop_handle();
    let run_b = std::thread::spawn(move || vm_b.run());
    let agent_after = wait_for_agent(&uds_b, &|| console_b.text(), Duration::from_secs(120));
    let restore_to_agent = restoring.elapsed();
    let (status, out) = sh(&uds_b, "cat /tmp/mark && echo after-the-restore && cat /proc/uptime");
    println!("restored guest answered: {out:?}");
    stop_b.stop();
    let reason = run_b.join().unwrap();

    println!(
        "boot to agent: {:.2} s | save: {:.1} ms (vCPUs paused {:.1} ms after the request, then {:.1} ms) | \
         restore (Vm::restore): {:.1} ms, to agent answering: {:.1} ms (first answer after {:.1} ms of running) | \
         ratio restore/boot: {:.4}",
        boot_to_agent.as_secs_f64(),
        save_took.as_secs_f64() * 1e3,
        info.pause_took.as_secs_f64() * 1e3,
        info.paused_for.as_secs_f64() * 1e3,
        restore_took.as_secs_f64() * 1e3,
        restore_to_agent.as_secs_f64() * 1e3,
        agent_after.as_secs_f64() * 1e3,
        restore_to_agent.as_secs_f64() / boot_to_agent.as_secs_f64()
    );
    println!(
        "state file: {} bytes | memory file: {} bytes ({} MiB), {} bytes written, {} bytes allocated on disk",
        info.state_bytes,
        info.memory_bytes,
        info.memory_bytes >> 20,
        info.memory_written_bytes,
        memory_allocated
    );
    println!("host load after: {}", load());
    assert_eq!(reason.unwrap(), ExitReason::StopRequested, "console:\n{}", console_b.text());
    assert_eq!(status, 0, "{out}");
    assert!(out.starts_with("before-the-snapshot\nafter-the-restore\n"), "{out}");
}
