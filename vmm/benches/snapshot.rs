//! Cold boot against snapshot restore, in one run on the same machine: the
//! default image booted until its agent has run `true` (exec-ready), and
//! the same point reached by restoring a snapshot of that guest.
//!
//! One VM is booted to exec-ready and snapshotted (printing the save time
//! and the file sizes); then, for each round, a cold boot and a restore are
//! timed from `Vm::create` / `Vm::restore` to `true` having exited in the
//! guest. Prints the medians, their ratio, and the host's load average
//! (the test bed is shared: absolute times vary, the ratio less).
//! `SNAPSHOT_BENCH_ROUNDS` sets the rounds (default 3). Then
//! `SNAPSHOT_BENCH_COPIES` (default 3) copies are restored at once, brought
//! to exec-ready and left idle for a few seconds, and the guest memory
//! mapping of each is read from /proc/self/smaps: how much of it is shared
//! with the snapshot's page cache and how much the copy has made private.
//! Needs /dev/kvm, the kernel and the default image (as
//! `vmm/tests/snapshot_boot.rs`).
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
#[path = "../tests/support/agent.rs"]
mod agent;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm::{AfterSnapshot, Digests, SnapshotFiles, Vm, VmConfig, VsockConfig};

const MEMORY_MIB: u32 = 256;
const VCPUS: u8 = 2;

fn cached(var: &str, under_cache: &str) -> Result<PathBuf, String> {
    let path = match std::env::var_os(var) {
        Some(p) => PathBuf::from(p),
        None => Path::new(&std::env::var_os("HOME").ok_or("HOME is not set")?).join(".cache/sandbox").join(under_cache),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!("{} not found (set {var}, or build it: kernel-config/build.sh, ./setup.sh)", path.display()))
    }
}

#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Setup {
    kernel: PathBuf,
    image: PathBuf,
}

impl Setup {
    fn config(&self, uds: &Path, console: &Console) -> VmConfig {
        VmConfig {
            kernel: self.kernel.clone(),
            cmdline: format!("{} root=/dev/vda ro rootfstype=erofs init=/sbin/sandbox-init", vmm::cmdline::base_args()),
            memory_mib: MEMORY_MIB,
            vcpus: VCPUS,
            root_disk: self.image.clone(),
            extra_disks: Vec::new(),
            vsock: Some(VsockConfig { guest_cid: 3, uds_path: uds.to_path_buf() }),
            serial: Box::new(console.clone()),
            seccomp: Default::default(),
        }
    }
}

/// Runs `vm` until `true` has run in it; returns that time (from `started`),
/// and the VM still running.
fn until_exec_ready(
    vm: Vm,
    uds: &Path,
    console: &Console,
    started: Instant,
) -> (Duration, vmm::VmController, vmm::StopHandle, std::thread::JoinHandle<vmm::Result<vmm::ExitReason>>) {
    let controller = vm.controller();
    let stop = vm.stop_handle();
    let thread = std::thread::spawn(move || vm.run());
    let text = || String::from_utf8_lossy(&console.0.lock().unwrap()).into_owned();
    agent::wait_for_agent(uds, &text, Duration::from_secs(600));
    let (status, out) = agent::sh(uds, "true");
    assert_eq!(status, 0, "{out}");
    (started.elapsed(), controller, stop, thread)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn bench() -> Result<(), String> {
    let setup = Setup {
        kernel: cached("SANDBOX_KERNEL", "kernel/vmlinux")?,
        image: cached("SANDBOX_IMAGE", "images/default.erofs")?,
    };
    let rounds: usize = std::env::var("SNAPSHOT_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3).max(1);
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let uds = |name: &str| -> PathBuf {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        d.join("vsock.sock")
    };
    let files = SnapshotFiles::in_dir(dir.path());
    println!("host load average at start: {}", load());

    // The snapshot: a guest booted to exec-ready.
    let console = Console::default();
    let started = Instant::now();
    let vm = Vm::create(setup.config(&uds("first"), &console)).map_err(|e| e.to_string())?;
    let (first_boot, controller, _stop, thread) = until_exec_ready(vm, &uds("first"), &console, started);
    let saving = Instant::now();
    let info = controller.snapshot(&files, AfterSnapshot::Stop, Digests::default()).map_err(|e| e.to_string())?;
    let save = saving.elapsed();
    thread.join().unwrap().map_err(|e| e.to_string())?;
    let allocated = std::fs::metadata(&files.memory).map_err(|e| e.to_string())?.blocks() * 512;
    println!(
        "snapshot of a guest {:.2} s after its boot: save {:.1} ms (guest paused {:.1} ms); state file {} KiB; \
         memory file {} MiB, {:.1} MiB of it written and allocated",
        first_boot.as_secs_f64(),
        save.as_secs_f64() * 1e3,
        (info.pause_took + info.paused_for).as_secs_f64() * 1e3,
        info.state_bytes / 1024,
        info.memory_bytes >> 20,
        allocated as f64 / f64::from(1 << 20),
    );

    let (mut boots, mut restores) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let console = Console::default();
        let path = uds(&format!("boot{round}"));
        let started = Instant::now();
        let vm = Vm::create(setup.config(&path, &console)).map_err(|e| e.to_string())?;
        let (boot, _, stop, thread) = until_exec_ready(vm, &path, &console, started);
        stop.stop();
        thread.join().unwrap().map_err(|e| e.to_string())?;

        let console = Console::default();
        let path = uds(&format!("restore{round}"));
        let started = Instant::now();
        let vm = Vm::restore(setup.config(&path, &console), &files, &Digests::default()).map_err(|e| e.to_string())?;
        let built = started.elapsed();
        let (restore, _, stop, thread) = until_exec_ready(vm, &path, &console, started);
        stop.stop();
        thread.join().unwrap().map_err(|e| e.to_string())?;
        println!(
            "round {round}: cold boot to exec-ready {:.3} s | restore to exec-ready {:.3} s (Vm::restore {:.1} ms) | load {}",
            boot.as_secs_f64(),
            restore.as_secs_f64(),
            built.as_secs_f64() * 1e3,
            load()
        );
        boots.push(boot.as_secs_f64());
        restores.push(restore.as_secs_f64());
    }
    copies(&setup, &files, &uds)?;
    let (boot, restore) = (median(boots), median(restores));
    println!(
        "median to exec-ready: cold boot {boot:.3} s, restore {:.1} ms, ratio restore/boot {:.4}",
        restore * 1e3,
        restore / boot
    );
    println!("host load average at end: {}", load());
    Ok(())
}

/// (Rss, Shared_Clean + Shared_Dirty, Private_Dirty) in KiB of each
/// mapping of `file` in this process.
fn mappings_of(file: &Path) -> Vec<(u64, u64, u64)> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let name = file.display().to_string();
    let mut out = Vec::new();
    let mut current: Option<(u64, u64, u64)> = None;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        if !first.ends_with(':') || first.contains('-') {
            // A mapping's header line: "start-end perms offset dev inode path".
            out.extend(current.take());
            if line.ends_with(&name) {
                current = Some((0, 0, 0));
            }
            continue;
        }
        let kib: u64 = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        if let Some(m) = current.as_mut() {
            match first {
                "Rss:" => m.0 = kib,
                "Shared_Clean:" | "Shared_Dirty:" => m.1 += kib,
                "Private_Dirty:" => m.2 = kib,
                _ => {}
            }
        }
    }
    out.extend(current);
    out
}

/// Restores several copies at once, lets them idle, and prints how much of
/// each one's guest memory is shared and how much private.
fn copies(setup: &Setup, files: &SnapshotFiles, uds: &dyn Fn(&str) -> PathBuf) -> Result<(), String> {
    let n: usize = std::env::var("SNAPSHOT_BENCH_COPIES").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let mut running = Vec::new();
    let started = Instant::now();
    for i in 0..n {
        let console = Console::default();
        let path = uds(&format!("copy{i}"));
        let mut config = setup.config(&path, &console);
        config.vsock = Some(VsockConfig { guest_cid: 10 + i as u32, uds_path: path.clone() });
        let vm = Vm::restore(config, files, &Digests::default()).map_err(|e| e.to_string())?;
        let stop = vm.stop_handle();
        running.push((path, console, stop, std::thread::spawn(move || vm.run())));
    }
    for (path, console, _, _) in &running {
        let text = || String::from_utf8_lossy(&console.0.lock().unwrap()).into_owned();
        agent::wait_for_agent(path, &text, Duration::from_secs(600));
        assert_eq!(agent::sh(path, "true").0, 0);
    }
    let ready = started.elapsed();
    std::thread::sleep(Duration::from_secs(5));
    let maps = mappings_of(&files.memory);
    println!(
        "{n} copies restored at once, all exec-ready after {:.2} s, then idle 5 s; guest memory per copy \
         (RSS / shared with the page cache / private), MiB:",
        ready.as_secs_f64()
    );
    for (i, (rss, shared, private)) in maps.iter().enumerate() {
        println!(
            "  copy {i}: {:.1} / {:.1} / {:.1}",
            *rss as f64 / 1024.0,
            *shared as f64 / 1024.0,
            *private as f64 / 1024.0
        );
    }
    for (_, _, stop, thread) in running {
        stop.stop();
        thread.join().unwrap().map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn main() -> ExitCode {
    match bench() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("snapshot benchmark: {e}");
            ExitCode::FAILURE
        }
    }
}
