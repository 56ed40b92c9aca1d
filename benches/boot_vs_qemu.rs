//! Boot benchmark: our VMM against QEMU's `microvm` machine, same kernel,
//! same image, same kernel arguments, alternating in one run.
//!
//! Prints, per round and as medians, the time to the guest's first console
//! byte and to the end of the command (`/bin/true`), the ratio ours / QEMU,
//! and the VMM's own memory: peak RSS minus the guest RAM it has touched
//! (the resident part of the guest-memory mapping), for both VMMs.
//!
//!   cargo bench --bench boot_vs_qemu            (BOOT_BENCH_ROUNDS=3 by default)
//!
//! Needs /dev/kvm, ./setup.sh's artefacts and qemu-system-x86_64
//! (`apt-get install qemu-system-x86`).
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guest_protocol::LaunchSpec;
use sandbox::{Image, Sandbox, Status};

const MEMORY_MIB: u32 = 128;

#[derive(Debug, Clone, Copy)]
struct Sample {
    first_byte: Duration,
    exit: Duration,
    overhead_kib: u64,
}

/// Records when the first byte arrives.
struct FirstByte(Arc<Mutex<Option<Instant>>>);

impl Write for FirstByte {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut t = self.0.lock().unwrap();
        if t.is_none() && !buf.is_empty() {
            *t = Some(Instant::now());
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Peak of (total RSS - RSS of the guest-memory mapping) of `pid`, in KiB,
/// sampled every 20 ms until `stop` is set.
fn sample_overhead(pid: u32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let guest_kib = u64::from(MEMORY_MIB) * 1024;
        let mut peak = 0;
        while !stop.load(Ordering::Relaxed) {
            if let Ok(smaps) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) {
                let (mut total, mut guest, mut in_guest_map) = (0u64, 0u64, false);
                for line in smaps.lines() {
                    if let Some(v) = line.strip_prefix("Size:") {
                        in_guest_map = kib(v) == guest_kib;
                    } else if let Some(v) = line.strip_prefix("Rss:") {
                        total += kib(v);
                        if in_guest_map {
                            guest += kib(v);
                        }
                    }
                }
                peak = peak.max(total.saturating_sub(guest));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        peak
    })
}

fn kib(v: &str) -> u64 {
    v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0)
}

fn ours() -> Sample {
    let first = Arc::new(Mutex::new(None));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_overhead(std::process::id(), Arc::clone(&stop));
    let start = Instant::now();
    let run = Sandbox::builder(Image::Default)
        .memory_mib(MEMORY_MIB)
        .console(FirstByte(Arc::clone(&first)))
        .stdout(FirstByte(Arc::clone(&first)))
        .timeout(Duration::from_secs(600))
        .run(["/bin/true"])
        .unwrap();
    let exit = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    assert_eq!(run.status, Status::Exited(0));
    let first_byte = first.lock().unwrap().map(|t| t - start).unwrap_or(exit);
    Sample { first_byte, exit, overhead_kib: sampler.join().unwrap() }
}

fn qemu(kernel: &Path, image: &Path, cmdline: &str) -> Sample {
    let start = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-enable-kvm", "-M", "microvm,acpi=off", "-cpu", "host,-arch-capabilities", "-m"])
        .arg(MEMORY_MIB.to_string())
        .args(["-smp", "1", "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot", "-kernel"])
        .arg(kernel)
        .arg("-append")
        .arg(cmdline)
        .arg("-drive")
        .arg(format!("id=root,file={},format=raw,if=none,readonly=on", image.display()))
        .args(["-device", "virtio-blk-device,drive=root"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64 (apt-get install qemu-system-x86)");
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_overhead(child.id(), Arc::clone(&stop));
    let mut stdout = child.stdout.take().unwrap();
    let mut first_byte = None;
    let mut output = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stdout.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                first_byte.get_or_insert_with(|| start.elapsed());
                output.extend_from_slice(&buf[..n]);
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    child.wait().unwrap();
    let exit = start.elapsed();
    let marker = guest_protocol::console::exit_marker(0);
    assert!(output.windows(marker.len()).any(|w| w == marker), "QEMU guest did not report exit 0:\n{}", String::from_utf8_lossy(&output));
    Sample { first_byte: first_byte.unwrap_or(exit), exit, overhead_kib: sampler.join().unwrap() }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::var("BOOT_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let kernel = sandbox::paths::kernel().unwrap();
    let (image, rootfs) = Image::Default.resolve().unwrap();
    let spec = LaunchSpec { argv: vec!["/bin/true".into()], env: vec![], cwd: "/".into(), hostname: "sandbox".into() };
    let cmdline = format!(
        "{} root=/dev/vda ro rootfstype={} init=/sbin/sandbox-init {}",
        vmm::cmdline::base_args(),
        rootfs.kernel_name(),
        spec.to_cmdline_arg().unwrap()
    );
    let (mut ours_s, mut qemu_s) = (Vec::new(), Vec::new());
    println!("round  vmm   first-byte  exit     overhead");
    for round in 1..=rounds {
        let o = ours();
        println!("{round:>5}  ours  {:>9.2}s  {:>6.2}s  {:>6} KiB", o.first_byte.as_secs_f64(), o.exit.as_secs_f64(), o.overhead_kib);
        let q = qemu(&kernel, &image, &cmdline);
        println!("{round:>5}  qemu  {:>9.2}s  {:>6.2}s  {:>6} KiB", q.first_byte.as_secs_f64(), q.exit.as_secs_f64(), q.overhead_kib);
        ours_s.push(o);
        qemu_s.push(q);
    }
    let m = |v: &[Sample], f: fn(&Sample) -> f64| median(v.iter().map(f).collect());
    let first = m(&ours_s, |s| s.first_byte.as_secs_f64()) / m(&qemu_s, |s| s.first_byte.as_secs_f64());
    let exit = m(&ours_s, |s| s.exit.as_secs_f64()) / m(&qemu_s, |s| s.exit.as_secs_f64());
    println!("median ratio ours/qemu: first byte {first:.2}, command exit {exit:.2}");
    println!(
        "median VMM overhead (RSS minus touched guest RAM): ours {:.1} MiB, qemu {:.1} MiB",
        m(&ours_s, |s| s.overhead_kib as f64) / 1024.0,
        m(&qemu_s, |s| s.overhead_kib as f64) / 1024.0
    );
}
