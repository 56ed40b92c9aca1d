//! Boot time and memory overhead of this VMM against QEMU's `microvm`
//! machine, same kernel, same root image, same command line, alternating runs.
//!
//! Prints, per VMM, the median time from process start to the guest's first
//! line from /init and to the line /init prints after its command has
//! exited, the ratios (ours / QEMU), and the VMM's own memory: peak resident
//! set minus the resident part of the guest RAM mapping. For our VMM it also
//! prints how long the guest's reboot and the teardown take after that.
//! `BOOT_BENCH_ROUNDS` sets the number of rounds (default 3).
//!
//! CPU time (all threads, until the command has exited) is printed too: it
//! varies less than wall-clock time when other work shares the machine.
//!
//! QEMU is killed once the command has exited: its microvm machine has no
//! i8042, so the guest's `reboot=k` would first spin on the missing
//! controller for tens of seconds before falling back to another method.
//!
//! Our VMM runs in a child process (this binary re-executed with
//! `VMM_BENCH_CHILD=1`) so that both are measured the same way from outside.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const MEMORY_MIB: u32 = 128;
const READY_LINE: &str = "init: started";
const DONE_LINE: &str = "init: command exited";
const INIT: &str = r#"#!/bin/busybox sh
echo "init: started"
/bin/busybox uname -r
echo "init: command exited"
/bin/busybox reboot -f
"#;

fn main() -> ExitCode {
    if std::env::var_os("VMM_BENCH_CHILD").is_some() {
        return child();
    }
    match bench() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("boot benchmark: {e}");
            ExitCode::FAILURE
        }
    }
}

fn cmdline() -> String {
    format!("{} root=/dev/vda ro rootfstype=erofs init=/init", vmm::cmdline::base_args())
}

/// Runs one VM with its console on stdout: `<kernel> <image>`.
fn child() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(kernel), Some(image)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: VMM_BENCH_CHILD=1 boot <kernel> <image>");
        return ExitCode::FAILURE;
    };
    let config = vmm::VmConfig {
        kernel: kernel.into(),
        cmdline: cmdline(),
        memory_mib: MEMORY_MIB,
        vcpus: 1,
        root_disk: image.into(),
        extra_disks: Vec::new(),
        vsock: None,
        serial: Box::new(std::io::stdout()),
        seccomp: Default::default(),
    };
    match vmm::Vm::create(config).and_then(vmm::Vm::run) {
        Ok(vmm::ExitReason::GuestShutdown) => ExitCode::SUCCESS,
        Ok(other) => {
            eprintln!("unexpected exit: {other:?}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn kernel() -> Result<PathBuf, String> {
    let path = match std::env::var_os("SANDBOX_KERNEL") {
        Some(p) => PathBuf::from(p),
        None => {
            let home = std::env::var_os("HOME").ok_or("HOME is not set")?;
            Path::new(&home).join(".cache/sandbox/kernel/vmlinux")
        }
    };
    if path.exists() {
        Ok(path)
    } else {
        Err(format!("kernel {} not found: build it with kernel-config/build.sh", path.display()))
    }
}

fn root_image(dir: &Path) -> Result<PathBuf, String> {
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("bin")).map_err(|e| e.to_string())?;
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .map_err(|e| format!("/bin/busybox: {e} (apt-get install busybox-static)"))?;
    let init = root.join("init");
    std::fs::write(&init, INIT).map_err(|e| e.to_string())?;
    std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755)).map_err(|e| e.to_string())?;
    let image = dir.join("root.erofs");
    let status = Command::new("mkfs.erofs")
        .args(["--quiet", "--all-root"])
        .arg(&image)
        .arg(&root)
        .status()
        .map_err(|e| format!("mkfs.erofs: {e} (apt-get install erofs-utils)"))?;
    if !status.success() {
        return Err("mkfs.erofs failed".into());
    }
    Ok(image)
}

/// User plus system CPU time of a process (all its threads), in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Resident kiB of the whole process and of its guest-RAM-sized anonymous mapping.
fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let guest_kib = u64::from(MEMORY_MIB) * 1024;
    let mut total = 0;
    let mut guest = 0;
    let mut current_is_guest = false;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        match fields.next() {
            Some("Size:") => {
                current_is_guest = fields.next().and_then(|v| v.parse::<u64>().ok()) == Some(guest_kib);
            }
            Some("Rss:") => {
                let rss: u64 = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                total += rss;
                if current_is_guest {
                    guest += rss;
                }
            }
            _ => {}
        }
    }
    Some((total, guest))
}

struct Run {
    ready: Duration,
    done: Duration,
    /// When the VMM process exited by itself (`None` if it was killed after the command).
    exit: Option<Duration>,
    cpu: Duration,
    overhead_kib: u64,
}

/// Runs a VMM and times the guest's markers. With `kill_after_done`, the VMM
/// is killed once the guest's command has exited instead of waiting for its
/// own exit.
fn measure(mut command: Command, kill_after_done: bool) -> Result<Run, String> {
    let start = Instant::now();
    let mut child: Child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start {command:?}: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel();
    let pid = child.id();
    let reader = std::thread::spawn(move || {
        let mut log = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            for marker in [READY_LINE, DONE_LINE] {
                if line.contains(marker) {
                    let _ = tx.send((marker, start.elapsed(), cpu_ticks(pid)));
                }
            }
            log.push_str(&line);
            log.push('\n');
        }
        log
    });
    let mut overhead_kib = 0;
    let mut marks: Vec<(&str, Duration, Option<u64>)> = Vec::new();
    let mut killed = false;
    let status = loop {
        if let Some((total, guest)) = memory_kib(pid) {
            overhead_kib = overhead_kib.max(total.saturating_sub(guest));
        }
        marks.extend(rx.try_iter());
        if kill_after_done && !killed && marks.iter().any(|(m, _, _)| *m == DONE_LINE) {
            let _ = child.kill();
            killed = true;
        }
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() > Duration::from_secs(300) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("guest did not finish within 300 s".into());
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e.to_string()),
        }
    };
    let exit = (!killed).then(|| start.elapsed());
    let log = reader.join().map_err(|_| "console reader panicked")?;
    marks.extend(rx.try_iter());
    let ticks = marks.iter().find(|(m, _, _)| *m == DONE_LINE).and_then(|(_, _, ticks)| *ticks).unwrap_or(0);
    let at = |marker: &str| {
        marks
            .iter()
            .find(|(m, _, _)| *m == marker)
            .map(|(_, t, _)| *t)
            .ok_or_else(|| format!("guest never printed {marker:?} ({status}); console:\n{log}"))
    };
    Ok(Run {
        ready: at(READY_LINE)?,
        done: at(DONE_LINE)?,
        exit,
        // USER_HZ is 100 on Linux.
        cpu: Duration::from_millis(ticks * 10),
        overhead_kib,
    })
}

fn ours(kernel: &Path, image: &Path) -> Result<Command, String> {
    let mut command = Command::new(std::env::current_exe().map_err(|e| e.to_string())?);
    command.env("VMM_BENCH_CHILD", "1").arg(kernel).arg(image);
    Ok(command)
}

fn qemu(kernel: &Path, image: &Path) -> Command {
    let mut command = Command::new("qemu-system-x86_64");
    command
        .args(["-enable-kvm", "-M", "microvm,acpi=off", "-cpu", "host,-arch-capabilities"])
        .args(["-m", &MEMORY_MIB.to_string(), "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot"])
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", &cmdline()])
        .arg("-drive")
        .arg(format!("id=root,file={},format=raw,if=none,readonly=on", image.display()))
        .args(["-device", "virtio-blk-device,drive=root"]);
    command
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn bench() -> Result<(), String> {
    if !Path::new("/dev/kvm").exists() {
        return Err("/dev/kvm does not exist".into());
    }
    let kernel = kernel()?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let image = root_image(dir.path())?;
    let rounds: usize = std::env::var("BOOT_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3).max(1);

    let mut mine = Vec::new();
    let mut reference = Vec::new();
    for round in 1..=rounds {
        let a = measure(ours(&kernel, &image)?, false)?;
        let b = measure(qemu(&kernel, &image), true)?;
        println!(
            "round {round}: vmm ready {:.2} s done {:.2} s exit {:.2} s cpu {:.2} s overhead {} KiB | qemu ready {:.2} s done {:.2} s cpu {:.2} s overhead {} KiB",
            a.ready.as_secs_f64(),
            a.done.as_secs_f64(),
            a.exit.map_or(f64::NAN, |t| t.as_secs_f64()),
            a.cpu.as_secs_f64(),
            a.overhead_kib,
            b.ready.as_secs_f64(),
            b.done.as_secs_f64(),
            b.cpu.as_secs_f64(),
            b.overhead_kib
        );
        mine.push(a);
        reference.push(b);
    }
    let med = |runs: &[Run], f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
    let ready = |r: &Run| r.ready.as_secs_f64();
    let done = |r: &Run| r.done.as_secs_f64();
    let overhead = |r: &Run| r.overhead_kib as f64 / 1024.0;
    let cpu = |r: &Run| r.cpu.as_secs_f64();
    for (what, f) in [("first /init line", ready as fn(&Run) -> f64), ("command exit", done)] {
        println!(
            "median time to {what}: vmm {:.2} s, qemu {:.2} s, ratio {:.3}",
            med(&mine, f),
            med(&reference, f),
            med(&mine, f) / med(&reference, f)
        );
    }
    println!(
        "median time from command exit to VMM exit (guest reboot, VM teardown): vmm {:.2} s",
        med(&mine, |r| r.exit.map_or(f64::NAN, |t| (t - r.done).as_secs_f64()))
    );
    println!(
        "median CPU time until command exit (less sensitive to other load): vmm {:.2} s, qemu {:.2} s, ratio {:.3}",
        med(&mine, cpu),
        med(&reference, cpu),
        med(&mine, cpu) / med(&reference, cpu)
    );
    println!(
        "VMM memory overhead (RSS minus resident guest RAM): vmm {:.1} MiB, qemu {:.1} MiB",
        med(&mine, overhead),
        med(&reference, overhead)
    );
    Ok(())
}
