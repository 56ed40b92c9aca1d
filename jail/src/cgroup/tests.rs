use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::*;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A group name no other test (in this run or a parallel one) uses.
fn unique(tag: &str) -> String {
    format!("test-{tag}-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

const MIB: u64 = 1024 * 1024;

fn limits(memory_bytes: u64, cpu_quota: Option<f64>, pids: u64) -> Limits {
    Limits { memory_bytes, cpu_quota, pids }
}

/// Starts `sh -c script` that waits until it has been moved into `group`.
fn spawn_in(group: &Cgroup, script: &str) -> Child {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("read _go; {script}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    group.add_process(child.id()).unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"go\n").unwrap();
    child
}

fn gone(pid: u32) -> bool {
    kill(Pid::from_raw(i32::try_from(pid).unwrap()), None) == Err(Errno::ESRCH)
}

#[test]
fn mountinfo_is_parsed_with_escapes() {
    let text = "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu,cpuacct\n\
                35 31 0:32 / /sys/fs/cgroup/mem\\040ory rw,relatime shared:5 - cgroup cgroup rw,memory\n\
                41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
                garbage\n";
    let mounts = parse_mountinfo(text);
    assert_eq!(mounts.len(), 3);
    assert_eq!(mounts[0].mount_point, PathBuf::from("/sys/fs/cgroup/cpu"));
    assert_eq!(mounts[0].super_options, ["rw", "cpu", "cpuacct"]);
    assert_eq!(mounts[1].mount_point, PathBuf::from("/sys/fs/cgroup/mem ory"));
    assert_eq!(mounts[2].fstype, "cgroup2");
    // No pids hierarchy and a v2 one without controllers: nothing to use, and the error says so.
    let err = detect_from(&mounts).unwrap_err().to_string();
    assert!(err.contains("pids"), "{err}");
}

#[test]
fn v2_with_the_controllers_is_preferred() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap().to_string();
    fs::write(dir.path().join("cgroup.controllers"), "cpuset cpu io memory hugetlb pids rdma misc\n").unwrap();
    let text = format!(
        "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n\
         35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
         36 31 0:33 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n\
         41 31 0:38 / {root} rw - cgroup2 cgroup2 rw,nsdelegate\n"
    );
    let layout = detect_from(&parse_mountinfo(&text)).unwrap();
    assert!(matches!(&layout, Layout::V2 { root: r, controllers } if r == dir.path() && controllers.len() == 8));
    // Without pids in the v2 root, the v1 hierarchies are used.
    fs::write(dir.path().join("cgroup.controllers"), "cpu memory\n").unwrap();
    let layout = detect_from(&parse_mountinfo(&text)).unwrap();
    assert_eq!(
        layout,
        Layout::V1 {
            memory: "/sys/fs/cgroup/memory".into(),
            pids: "/sys/fs/cgroup/pids".into(),
            cpu: "/sys/fs/cgroup/cpu".into()
        }
    );
}

#[test]
fn counters_are_parsed() {
    let events = "low 0\nhigh 0\nmax 7\noom 2\noom_kill 1\n";
    assert_eq!(parse_counter(events, "max"), Some(7));
    assert_eq!(parse_counter(events, "oom_kill"), Some(1));
    assert_eq!(parse_counter(events, "oom_group_kill"), None);
}

#[test]
fn bad_names_and_limits_are_refused() {
    let ok = limits(64 * MIB, None, 8);
    for name in ["", ".", "..", "a/b", "../x", "x/../y", ".hidden", "sp ace", "nul\0"] {
        assert!(Cgroup::create(name, &ok).is_err(), "{name:?} was accepted");
    }
    let name = unique("limits");
    assert!(Cgroup::create(&name, &limits(0, None, 8)).is_err());
    assert!(Cgroup::create(&name, &limits(MIB, None, 0)).is_err());
    assert!(Cgroup::create(&name, &limits(MIB, Some(0.0), 8)).is_err());
    assert!(Cgroup::create(&name, &limits(MIB, Some(f64::NAN), 8)).is_err());
}

#[test]
fn memory_limit_oom_kills_inside_only() {
    let group = Cgroup::create(&unique("mem"), &limits(64 * MIB, None, 64)).unwrap();
    let paths = group.paths().to_vec();
    assert!(paths.iter().all(|p| p.is_dir()));
    // The shell keeps 200 MB of command substitution output in its own memory.
    let inside = spawn_in(&group, "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived");
    // The same 100 MB (more than the group's limit) outside the group is fine.
    let outside =
        Command::new("sh").arg("-c").arg("x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo ${#x}").output().unwrap();
    let inside = inside.wait_with_output().unwrap();
    assert_eq!(inside.status.signal(), Some(libc::SIGKILL), "{inside:?}");
    assert!(inside.stdout.is_empty());
    assert!(outside.status.success(), "{outside:?}");
    assert_eq!(String::from_utf8_lossy(&outside.stdout).trim(), "100000000");
    assert!(group.oom_kills() >= 1);
    assert!(group.memory_limit_hit());
    group.remove().unwrap();
    assert!(paths.iter().all(|p| !p.exists()), "{paths:?} left behind");
}

#[test]
fn pids_limit_stops_forks() {
    let group = Cgroup::create(&unique("pids"), &limits(64 * MIB, None, 5)).unwrap();
    assert!(!group.pids_limit_hit());
    let child =
        spawn_in(&group, "i=0; while [ $i -lt 20 ]; do sleep 5 >/dev/null 2>&1 & i=$((i+1)); done; echo all forked");
    let out = child.wait_with_output().unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains("all forked"), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).to_lowercase().contains("fork"), "{out:?}");
    let left = group.processes().unwrap();
    assert!(!left.is_empty() && left.len() <= 5, "{left:?}");
    assert!(group.pids_limit_hit());
    group.remove().unwrap();
}

#[test]
fn cpu_quota_throttles() {
    let group = Cgroup::create(&unique("cpu"), &limits(64 * MIB, Some(0.2), 8)).unwrap();
    let mut child = spawn_in(&group, "while :; do :; done");
    std::thread::sleep(Duration::from_secs(1));
    let stat = fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    // utime and stime are fields 14 and 15; the text after ')' starts at field 3.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let cpu = ticks as f64 / hz as f64;
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(cpu <= 0.3, "{cpu} s of CPU in 1 s with a quota of 0.2 CPUs");
    assert!(cpu >= 0.05, "{cpu} s of CPU: did the loop run?");
    group.remove().unwrap();
}

#[test]
fn remove_kills_what_is_left() {
    let group = Cgroup::create(&unique("kill"), &limits(64 * MIB, None, 16)).unwrap();
    let paths = group.paths().to_vec();
    let mut child = spawn_in(&group, "sleep 100 & sleep 100 & wait");
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut pids = group.processes().unwrap();
    while pids.len() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        pids = group.processes().unwrap();
    }
    assert_eq!(pids.len(), 3, "{pids:?}");
    group.remove().unwrap();
    assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
    assert!(paths.iter().all(|p| !p.exists()));
    // The orphaned sleepers are reaped by whoever adopted them.
    let deadline = Instant::now() + Duration::from_secs(2);
    while !pids.iter().all(|&pid| gone(pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    for pid in pids.into_iter().filter(|&pid| pid != child.id()) {
        assert!(gone(pid), "pid {pid} survived");
    }
}

#[test]
fn stale_group_is_recreated_and_drop_removes() {
    let name = unique("stale");
    let first = Cgroup::create(&name, &limits(32 * MIB, Some(0.5), 4)).unwrap();
    let paths = first.paths().to_vec();
    let mut sleeper = spawn_in(&first, "sleep 100");
    // A crashed run: the group is never removed.
    std::mem::forget(first);
    let second = Cgroup::create(&name, &limits(48 * MIB, None, 6)).unwrap();
    assert_eq!(sleeper.wait().unwrap().signal(), Some(libc::SIGKILL));
    assert!(second.processes().unwrap().is_empty());
    let (pids_max, memory) = match second.layout() {
        Layout::V2 { .. } => ("pids.max", "memory.max"),
        Layout::V1 { .. } => ("pids.max", "memory.limit_in_bytes"),
    };
    assert_eq!(fs::read_to_string(second.pids.join(pids_max)).unwrap().trim(), "6");
    assert_eq!(fs::read_to_string(second.memory.join(memory)).unwrap().trim(), (48 * MIB).to_string());
    drop(second);
    assert!(paths.iter().all(|p| !p.exists()));
}
