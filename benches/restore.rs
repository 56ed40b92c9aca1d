//! Sandboxes restored from a snapshot against cold boots, through the
//! library, in one run on one host: the default image, 256 MiB, 1 vCPU.
//!
//!   cargo build --release --bin sandbox-holder && cargo bench --bench restore
//!
//! A source sandbox is booted and, idle, saved with
//! `Instance::snapshot(dir, AfterSnapshot::Resume)`. Then it prints:
//!
//! 1. exec-ready: from the call until `output(Command::new("/bin/true"))`
//!    has returned, for (a) a cold boot (`Sandbox::builder(..).start()`),
//!    (b) a restore in this process (`Sandbox::from_snapshot(..).start()`)
//!    and (c) a restore in a confined holder (`.spawn()`), alternated
//!    `RESTORE_BENCH_ROUNDS` times (default 3); median, min and max of
//!    each, and the ratios (b)/(a) and (c)/(a) of the medians (goal <= 0.1).
//! 2. snapshot save: how long `Instance::snapshot` took, and the size of
//!    `vm.mem` and `vm.state` on disk, apparent and allocated.
//! 3. memory: `RESTORE_BENCH_COPIES` (default 10) sandboxes restored at
//!    once in confined holders, and one cold-booted sandbox in a holder,
//!    idle for `RESTORE_BENCH_IDLE_S` seconds (default 10); for each, from
//!    `/proc/<pid>/smaps_rollup`, the private memory (Private_Clean +
//!    Private_Dirty), Pss and Rss of the outer holder process (the pid in
//!    its state.json) and of the confined process that holds the VM (its
//!    child), and their total private memory (goal <= 16 MiB per restored
//!    idle sandbox); then the mappings of one restored and the cold holder
//!    with the most private memory. Also the CPU time each VM's process
//!    used over the idle window, and how long each stop took (a stop that
//!    had to kill its holder shows as 60 s, with a warning on stderr).
//!
//! The host's load average is printed at the start and at the end: the
//! test bed is shared, so compare the ratios of one run, not absolute
//! times. Needs root, /dev/kvm, ./setup.sh's kernel and default image
//! (skips with a message without them) and the `sandbox-holder` binary
//! (`$SANDBOX_HOLDER`, else the target directory's release build).
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use common::{env_count, holder_program, load_average, missing, stats};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use sandbox::{AfterSnapshot, Command, Image, Sandbox, Snapshot, Status};

const MEMORY_MIB: u32 = 256;
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Apparent and allocated size of a file, in bytes.
fn file_size(path: &Path) -> (u64, u64) {
    let meta = std::fs::metadata(path).unwrap();
    (meta.len(), meta.blocks() * 512)
}

/// `/proc/<pid>/smaps_rollup` (or one mapping of `/proc/<pid>/smaps`), in KiB.
#[derive(Debug, Default, Clone, Copy)]
struct Mem {
    rss: u64,
    pss: u64,
    private_clean: u64,
    private_dirty: u64,
}

impl Mem {
    fn private(&self) -> u64 {
        self.private_clean + self.private_dirty
    }

    /// Take in one `Name:   123 kB` line.
    fn add_line(&mut self, line: &str) {
        let mut words = line.split_whitespace();
        let (Some(name), Some(kib)) = (words.next(), words.next().and_then(|v| v.parse::<u64>().ok())) else {
            return;
        };
        match name {
            "Rss:" => self.rss += kib,
            "Pss:" => self.pss += kib,
            "Private_Clean:" => self.private_clean += kib,
            "Private_Dirty:" => self.private_dirty += kib,
            _ => {}
        }
    }

    fn of(pid: u32) -> Mem {
        let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
        let mut mem = Mem::default();
        text.lines().for_each(|l| mem.add_line(l));
        mem
    }

    fn show(&self) -> String {
        format!(
            "private {:.1} MiB (clean {:.1}, dirty {:.1}), Pss {:.1} MiB, Rss {:.1} MiB",
            mib(self.private()),
            mib(self.private_clean),
            mib(self.private_dirty),
            mib(self.pss),
            mib(self.rss)
        )
    }
}

/// The mappings of `pid` with the most private memory: (mapping, memory).
fn top_mappings(pid: u32, n: usize) -> Vec<(String, Mem)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut maps: Vec<(String, Mem)> = Vec::new();
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.ends_with(':') {
            if let Some((_, mem)) = maps.last_mut() {
                mem.add_line(line);
            }
        } else {
            // "start-end perms offset dev inode [path]"
            let words: Vec<&str> = line.split_whitespace().collect();
            let (start, end) = first.split_once('-').unwrap_or(("0", "0"));
            let size =
                u64::from_str_radix(end, 16).unwrap_or(0).saturating_sub(u64::from_str_radix(start, 16).unwrap_or(0));
            let name = words.get(5..).map(|w| w.join(" ")).filter(|s| !s.is_empty()).unwrap_or_else(|| "[anon]".into());
            maps.push((format!("{name} {} {} KiB", words.get(1).unwrap_or(&""), size / 1024), Mem::default()));
        }
    }
    maps.sort_by_key(|(_, mem)| std::cmp::Reverse(mem.private()));
    maps.truncate(n);
    maps
}

/// The descendants of process `pid` (children of all its threads, theirs, ...).
fn descendants(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let tasks =
        std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.flatten().collect::<Vec<_>>()).unwrap_or_default();
    for task in tasks {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for child in children.split_whitespace().filter_map(|p| p.parse::<u32>().ok()) {
            found.push(child);
            found.extend(descendants(child));
        }
    }
    found
}

/// CPU time (user + system, all threads) process `pid` has used, in clock
/// ticks (1/100 s on Linux).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields 14 and 15, counted from 1; the command name (2) may hold spaces.
    let rest = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
    rest.split_whitespace().skip(11).take(2).filter_map(|v| v.parse::<u64>().ok()).sum()
}

/// The process that holds the VM of a sandbox in a holder: the last one
/// under the outer holder.
fn vm_process(sandbox: &Sandbox) -> u32 {
    let outer = sandbox.state().pid;
    descendants(outer).last().copied().unwrap_or(outer)
}

/// One holder's memory: the outer process, and the processes under it.
struct Held {
    outer: (u32, Mem),
    inner: Vec<(u32, Mem)>,
}

impl Held {
    fn of(sandbox: &Sandbox) -> Held {
        let outer = sandbox.state().pid;
        Held {
            outer: (outer, Mem::of(outer)),
            inner: descendants(outer).into_iter().map(|p| (p, Mem::of(p))).collect(),
        }
    }

    fn total_private(&self) -> u64 {
        self.outer.1.private() + self.inner.iter().map(|(_, m)| m.private()).sum::<u64>()
    }

    /// The process that holds the VM: the last one under the outer holder.
    fn vm_pid(&self) -> u32 {
        self.inner.last().map_or(self.outer.0, |&(pid, _)| pid)
    }

    fn print(&self, name: &str) {
        println!("  {name}: total private {:.1} MiB", mib(self.total_private()));
        println!("    outer holder {}: {}", self.outer.0, self.outer.1.show());
        for (pid, mem) in &self.inner {
            println!("    inner holder {pid}: {}", mem.show());
        }
    }
}

fn print_top_mappings(name: &str, pid: u32) {
    println!("  mappings of {name} (pid {pid}) with the most private memory:");
    for (map, mem) in top_mappings(pid, 6) {
        println!(
            "    {:>7.1} MiB private ({:.1} dirty), Rss {:>6.1} MiB: {map}",
            mib(mem.private()),
            mib(mem.private_dirty),
            mib(mem.rss)
        );
    }
}

/// Stops `sandbox` and says how long that took.
fn stop(sandbox: &Sandbox) -> Duration {
    let t = Instant::now();
    sandbox.stop(STOP_TIMEOUT).unwrap();
    t.elapsed()
}

/// Runs `/bin/true` and checks that it exited 0.
fn exec_true(sandbox: &Sandbox) {
    let out = sandbox.output(Command::new("/bin/true")).unwrap();
    assert_eq!(out.status, Status::Exited(0), "{}", String::from_utf8_lossy(&out.stderr));
}

fn print_stats(name: &str, times: &mut [Duration]) -> Duration {
    let (med, min, max) = stats(times);
    println!(
        "{name}: median {:.2} s, min {:.2} s, max {:.2} s over {} runs",
        secs(med),
        secs(min),
        secs(max),
        times.len()
    );
    med
}

fn main() {
    // On stderr: the library's warnings (a holder that had to be killed)
    // and why a stop could not ask the guest to power off.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,sandbox::sandbox=debug".into()),
        )
        .init();
    if let Some(why) = missing() {
        eprintln!("skipped: restore benchmark: {why}");
        return;
    }
    let holder = holder_program();
    let rounds = env_count("RESTORE_BENCH_ROUNDS", 3);
    let copies = env_count("RESTORE_BENCH_COPIES", 10);
    let idle = Duration::from_secs(env_count("RESTORE_BENCH_IDLE_S", 10) as u64);
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let no_args = std::iter::empty::<&str>;
    println!(
        "default image, {MEMORY_MIB} MiB, 1 vCPU; {rounds} rounds, {copies} copies; load average at start {}",
        load_average()
    );

    // The snapshot: a booted sandbox, idle.
    let source = Sandbox::builder(Image::Default).memory_mib(MEMORY_MIB).vcpus(1).data_dir(&data).start().unwrap();
    println!("source sandbox booted in {:.1} s (to its agent)", secs(source.boot_time()));
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    let snapshot = source.snapshot(work.path().join("snap"), AfterSnapshot::Resume).unwrap();
    let save = t.elapsed();
    let files = snapshot.files();
    let ((mem_len, mem_alloc), (state_len, state_alloc)) = (file_size(&files.memory), file_size(&files.state));
    println!(
        "snapshot save: {:.0} ms; vm.mem {:.1} MiB apparent, {:.1} MiB allocated; vm.state {:.1} KiB apparent, {:.1} KiB allocated",
        save.as_secs_f64() * 1e3,
        mem_len as f64 / 1048576.0,
        mem_alloc as f64 / 1048576.0,
        state_len as f64 / 1024.0,
        state_alloc as f64 / 1024.0
    );
    exec_true(&source); // it runs on after the save
    source.shutdown().unwrap();
    let snapshot = Snapshot::load(&snapshot.dir).unwrap();

    // 1. exec-ready, alternated so that a change of load hits all three.
    let (mut cold, mut restored, mut held) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        let t = Instant::now();
        let instance =
            Sandbox::builder(Image::Default).memory_mib(MEMORY_MIB).vcpus(1).data_dir(&data).start().unwrap();
        exec_true(&instance);
        cold.push(t.elapsed());
        instance.shutdown().unwrap();

        let t = Instant::now();
        let instance = Sandbox::from_snapshot(snapshot.clone()).data_dir(&data).start().unwrap();
        exec_true(&instance);
        restored.push(t.elapsed());
        instance.shutdown().unwrap();

        let t = Instant::now();
        let sandbox = Sandbox::from_snapshot(snapshot.clone())
            .data_dir(&data)
            .holder_program(&holder, no_args())
            .spawn()
            .unwrap();
        exec_true(&sandbox);
        held.push(t.elapsed());
        let stopped = stop(&sandbox);
        println!(
            "round {round}: (a) cold {:.2} s, (b) restored {:.2} s, (c) restored in a holder {:.2} s (stopped in {:.1} s); load average {}",
            secs(cold[cold.len() - 1]),
            secs(restored[restored.len() - 1]),
            secs(held[held.len() - 1]),
            secs(stopped),
            load_average()
        );
    }
    println!("exec-ready (until output(/bin/true) has returned):");
    let cold_med = print_stats("  (a) cold boot, start()", &mut cold);
    let restored_med = print_stats("  (b) restored, start()", &mut restored);
    let held_med = print_stats("  (c) restored, spawn() in a confined holder", &mut held);
    println!(
        "  ratios of the medians: (b)/(a) = {:.3}, (c)/(a) = {:.3} (goal <= 0.1)",
        secs(restored_med) / secs(cold_med),
        secs(held_med) / secs(cold_med)
    );

    // 3. Memory of idle sandboxes in confined holders.
    let t = Instant::now();
    let cold_held = Sandbox::builder(Image::Default)
        .memory_mib(MEMORY_MIB)
        .vcpus(1)
        .data_dir(&data)
        .holder_program(&holder, no_args())
        .spawn()
        .unwrap();
    println!("1 cold-booted sandbox in a holder ready in {:.1} s", secs(t.elapsed()));
    let t = Instant::now();
    let copies: Vec<Sandbox> = std::thread::scope(|s| {
        let spawned: Vec<_> = (0..copies)
            .map(|_| {
                s.spawn(|| {
                    Sandbox::from_snapshot(snapshot.clone())
                        .data_dir(&data)
                        .holder_program(&holder, no_args())
                        .spawn()
                        .unwrap()
                })
            })
            .collect();
        spawned.into_iter().map(|h| h.join().unwrap()).collect()
    });
    println!("{} sandboxes restored at once in holders, all ready in {:.1} s", copies.len(), secs(t.elapsed()));
    let idle_cpu = |sandboxes: &[&Sandbox]| {
        let pids: Vec<u32> = sandboxes.iter().map(|s| vm_process(s)).collect();
        let before: Vec<u64> = pids.iter().map(|&p| cpu_ticks(p)).collect();
        std::thread::sleep(idle);
        pids.iter().zip(before).map(|(&p, b)| cpu_ticks(p).saturating_sub(b) * 10).collect::<Vec<u64>>()
    };
    let all: Vec<&Sandbox> = copies.iter().chain([&cold_held]).collect();
    let cpu_ms = idle_cpu(&all);
    let shown: Vec<String> = cpu_ms.iter().map(u64::to_string).collect();
    println!(
        "CPU time of each VM's process over {} s idle, ms (restored #1.., then cold; ~1.5 % of a core is usual): {}",
        idle.as_secs(),
        shown.join(" ")
    );
    println!("memory after {} s idle (MiB = 1024 KiB x 1024):", idle.as_secs());
    let helds: Vec<Held> = copies.iter().map(Held::of).collect();
    for (i, h) in helds.iter().enumerate() {
        h.print(&format!("restored #{}", i + 1));
    }
    let cold_mem = Held::of(&cold_held);
    cold_mem.print("cold-booted");
    let mut totals: Vec<u64> = helds.iter().map(Held::total_private).collect();
    totals.sort_unstable();
    let vm_private = |h: &Held| h.inner.last().map_or(0, |(_, m)| m.private());
    let mut inner: Vec<u64> = helds.iter().map(vm_private).collect();
    inner.sort_unstable();
    println!(
        "private memory per restored idle sandbox: median {:.1} MiB, min {:.1}, max {:.1} (goal <= 16 MiB); the VM's process alone: median {:.1} MiB",
        mib(totals[totals.len() / 2]),
        mib(totals[0]),
        mib(totals[totals.len() - 1]),
        mib(inner[inner.len() / 2])
    );
    println!(
        "cold-booted idle sandbox: {:.1} MiB private (the VM's process alone {:.1} MiB); ratio restored/cold {:.2}",
        mib(cold_mem.total_private()),
        mib(vm_private(&cold_mem)),
        totals[totals.len() / 2] as f64 / cold_mem.total_private().max(1) as f64
    );
    print_top_mappings("restored #1", helds[0].vm_pid());
    print_top_mappings("the cold-booted holder", cold_mem.vm_pid());

    // One at a time: a stop that needs the holder killed shows as >= 60 s.
    let stops: Vec<String> = copies.iter().chain([&cold_held]).map(|s| format!("{:.1}", secs(stop(s)))).collect();
    println!("stopped (restored #1.., then cold), seconds each: {}", stops.join(" "));
    println!("load average at end: {}", load_average());
}
