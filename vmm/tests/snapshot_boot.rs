//! Snapshots of the real guest: boots the guest kernel with the built
//! default image until its agent answers on vsock port 5000, leaves a mark
//! in the guest (a file in its /tmp), snapshots it once resuming (an agent
//! connection opened before still works after), then snapshots and stops
//! it, and restores
//! the snapshot twice, each time into a new VM with another vsock socket
//! and console: at once, and after the snapshot has waited on disk for
//! 45 s. Each restored guest's agent must answer a command over a new vsock
//! connection, still have the mark, and not have seen the wait (its uptime
//! goes on from the snapshot's), and read a file from its root disk that
//! the booted guest never read (virtio-blk after the restore; checked
//! against the image, extracted on the host). The second copy gets another
//! vsock CID, which the guest takes from the transport reset. Prints how
//! long boot, save and restore took and the sizes of the files.
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

use agent::{sh, sh_on, wait_for_agent};
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

/// A file of the default image that nothing reads while the guest boots
/// (the image's tools are static), so reading it after a restore goes
/// through the block device.
const UNREAD_FILE: &str = "/lib/x86_64-linux-gnu/libcrypto.so.3";

/// MD5 of a file of the image, from the image extracted on the host.
fn md5_in_image(dir: &Path, file: &str) -> String {
    let root = dir.join("extracted");
    let status = std::process::Command::new("fsck.erofs")
        .arg(format!("--extract={}", root.display()))
        .arg(image())
        .stdout(std::process::Stdio::null())
        .status()
        .expect("fsck.erofs is missing: apt-get install erofs-utils");
    assert!(status.success(), "fsck.erofs --extract failed");
    let out = std::process::Command::new("md5sum").arg(root.join(file.trim_start_matches('/'))).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    std::fs::remove_dir_all(&root).unwrap();
    text.split_whitespace().next().unwrap().to_string()
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

/// The guest's uptime in seconds, from the output of `cat /proc/uptime`.
fn uptime(out: &str) -> f64 {
    let line =
        out.lines().find(|l| l.split_whitespace().count() == 2).unwrap_or_else(|| panic!("no uptime in {out:?}"));
    line.split_whitespace().next().unwrap().parse().unwrap()
}

/// A VM restored from `files` with the vsock socket `uds` and the guest CID
/// `cid`, run until its agent answers; checks the mark and that
/// `UNREAD_FILE` reads as `md5`, returns the guest's uptime, then stops it.
/// Prints its timings under `name`.
fn restore_and_check(name: &str, files: &SnapshotFiles, digests: &Digests, uds: &Path, cid: u32, md5: &str) -> f64 {
    let console = Console::default();
    let restoring = Instant::now();
    let mut config = config(uds, &console);
    config.vsock = Some(VsockConfig { guest_cid: cid, uds_path: uds.to_path_buf() });
    let vm = Vm::restore(config, files, digests).unwrap();
    let built = restoring.elapsed();
    let stop = vm.stop_handle();
    let run = std::thread::spawn(move || vm.run());
    wait_for_agent(uds, &|| console.text(), Duration::from_secs(120));
    let to_agent = restoring.elapsed();
    let first = Instant::now();
    let (status, out) = sh(uds, "cat /tmp/mark && echo after-the-restore && cat /proc/uptime");
    let first = first.elapsed();
    let second = Instant::now();
    assert_eq!(sh(uds, "true").0, 0);
    let second = second.elapsed();
    let (md5_status, md5_out) = sh(uds, &format!("md5sum {UNREAD_FILE}"));
    stop.stop();
    let reason = run.join().unwrap();
    println!(
        "{name}: Vm::restore {:.1} ms, agent answering {:.1} ms after it; then a command took {:.1} ms, the next {:.1} ms",
        built.as_secs_f64() * 1e3,
        to_agent.as_secs_f64() * 1e3,
        first.as_secs_f64() * 1e3,
        second.as_secs_f64() * 1e3
    );
    assert_eq!(reason.unwrap(), ExitReason::StopRequested, "console:\n{}", console.text());
    assert_eq!(status, 0, "{out}");
    assert!(out.starts_with("before-the-snapshot\nafter-the-restore\n"), "{out}");
    assert_eq!(md5_status, 0, "{md5_out}");
    assert_eq!(md5_out.split_whitespace().next(), Some(md5), "{UNREAD_FILE} read after the restore: {md5_out}");
    uptime(&out)
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
    for sub in ["a", "b", "c", "snap"] {
        std::fs::create_dir(dir.path().join(sub)).unwrap();
    }
    let uds_a = dir.path().join("a/vsock.sock");
    let files = SnapshotFiles::in_dir(dir.path().join("snap"));
    println!("host load before: {}", load());

    // A: boot until the agent answers, and leave a mark.
    let console_a = Console::default();
    let booted = Instant::now();
    let vm_a = Vm::create(config(&uds_a, &console_a)).unwrap();
    let controller = vm_a.controller();
    let run_a = std::thread::spawn(move || vm_a.run());
    wait_for_agent(&uds_a, &|| console_a.text(), Duration::from_secs(600));
    let boot_to_agent = booted.elapsed();
    let (status, out) = sh(&uds_a, "echo before-the-snapshot > /tmp/mark && cat /tmp/mark && cat /proc/uptime");
    assert_eq!(status, 0, "{out}");
    assert!(out.starts_with("before-the-snapshot\n"), "{out}");
    let uptime_a = uptime(&out);
    let command_a = Instant::now();
    assert_eq!(sh(&uds_a, "true").0, 0);
    let command_a = command_a.elapsed();

    let digests = Digests {
        kernel: Some(vmm::snapshot::sha256_file(&kernel()).unwrap()),
        disks: vec![Some(vmm::snapshot::sha256_file(&image()).unwrap())],
    };
    // A snapshot that resumes leaves A as it was: a connection to its agent
    // opened before it still works after it.
    let open = agent::agent(&uds_a).unwrap();
    let resumed = SnapshotFiles::in_dir(dir.path().join("a"));
    let info = controller.snapshot(&resumed, AfterSnapshot::Resume, digests.clone()).unwrap();
    println!(
        "a snapshot that resumes paused the guest for {:.1} ms",
        (info.pause_took + info.paused_for).as_secs_f64() * 1e3
    );
    let (status, out) = sh_on(open, "cat /tmp/mark");
    assert_eq!((status, out.as_str()), (0, "before-the-snapshot\n"));

    // Snapshot and stop A.
    let saving = Instant::now();
    let info = controller.snapshot(&files, AfterSnapshot::Stop, digests.clone()).unwrap();
    let save_took = saving.elapsed();
    let reason = run_a.join().unwrap();
    assert_eq!(reason.unwrap(), ExitReason::StopRequested, "console:\n{}", console_a.text());
    let memory_allocated = std::fs::metadata(&files.memory).unwrap().blocks() * 512;
    println!("booted guest: a command (true) took {:.1} ms before the snapshot", command_a.as_secs_f64() * 1e3);
    println!(
        "boot to agent: {:.2} s | save: {:.1} ms (vCPUs paused {:.1} ms after the request, for {:.1} ms) | \
         state file {} bytes | memory file {} MiB, {} bytes written, {} bytes allocated on disk",
        boot_to_agent.as_secs_f64(),
        save_took.as_secs_f64() * 1e3,
        info.pause_took.as_secs_f64() * 1e3,
        info.paused_for.as_secs_f64() * 1e3,
        info.state_bytes,
        info.memory_bytes >> 20,
        info.memory_written_bytes,
        memory_allocated
    );

    // B at once, C after the snapshot has waited on disk, with another CID.
    let md5 = md5_in_image(dir.path(), UNREAD_FILE);
    let uds_b = dir.path().join("b/vsock.sock");
    let uptime_b = restore_and_check("restored at once", &files, &digests, &uds_b, 3, &md5);
    std::thread::sleep(Duration::from_secs(45));
    let uds_c = dir.path().join("c/vsock.sock");
    let uptime_c = restore_and_check("restored after 45 s, CID 4", &files, &digests, &uds_c, 4, &md5);
    println!(
        "guest uptime: {uptime_a:.2} s before the snapshot, {uptime_b:.2} s and {uptime_c:.2} s after the restores"
    );
    println!("host load after: {}", load());
    // The guests saw no time pass while the snapshot was on disk (kvmclock
    // resumes at its saved value): a restored guest is not flooded with
    // the expiries and stall reports of a clock that jumped.
    for after in [uptime_b, uptime_c] {
        assert!(after >= uptime_a && after < uptime_a + 30.0, "uptime {uptime_a} -> {after}");
    }
}
