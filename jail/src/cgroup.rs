//! cgroup limits for a holder process: memory (swap cannot extend it), number
//! of processes and threads, and CPU time.
//!
//! Every sandbox gets its own group `sandbox/<name>` under one parent group
//! `sandbox` at the root of the hierarchy. On a cgroup v2 host (a `cgroup2`
//! file system whose root offers the `memory`, `pids` and `cpu` controllers)
//! that is one directory; on a cgroup v1 host it is one directory in each of
//! the `memory`, `pids` and `cpu` hierarchies, found from
//! `/proc/self/mountinfo`.
//!
//! The process that creates a [`Cgroup`] (normally the root parent that starts
//! the holder) does every write; the holder itself needs no access to the
//! cgroup file system.

use std::fmt;
use std::fs;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::Error;

/// The name of the group every sandbox's group is created under.
pub const PARENT: &str = "sandbox";

/// The CPU bandwidth period, in microseconds (100 ms, the kernel's default).
pub const CPU_PERIOD_US: u64 = 100_000;

/// How long [`Cgroup::remove`] waits for the killed processes to leave the group.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The limits of one sandbox's group.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Memory the group's processes may use, in bytes (anonymous memory, page
    /// cache and kernel memory charged to the group). Swap cannot extend it.
    /// Must be more than 0.
    pub memory_bytes: u64,
    /// CPU time, in CPUs (e.g. `1.5` is one and a half CPUs' worth of time per
    /// period); `None` for no limit. At least 0.01 (the kernel's 1 ms quota minimum).
    pub cpu_quota: Option<f64>,
    /// Processes and threads the group may hold at once. Must be more than 0.
    pub pids: u64,
}

/// Which cgroup hierarchies this host has for the limits, as found in `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// One cgroup v2 hierarchy whose root offers at least `memory`, `pids` and `cpu`.
    V2 {
        /// Where the `cgroup2` file system is mounted.
        root: PathBuf,
        /// The controllers its root offers (`cgroup.controllers`).
        controllers: Vec<String>,
    },
    /// cgroup v1 hierarchies (possibly the same one for several controllers).
    V1 {
        /// Where the hierarchy with the `memory` controller is mounted.
        memory: PathBuf,
        /// Where the hierarchy with the `pids` controller is mounted.
        pids: PathBuf,
        /// Where the hierarchy with the `cpu` controller is mounted.
        cpu: PathBuf,
    },
}

/// The controllers the limits need.
const CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

impl Layout {
    /// Finds the hierarchies: a cgroup v2 one with `memory`, `pids` and `cpu`
    /// available is preferred (the one at `/sys/fs/cgroup` if there are
    /// several), else the v1 hierarchies of those three controllers.
    pub fn detect() -> Result<Layout, Error> {
        let text = fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| Error::io("reading /proc/self/mountinfo to find the cgroup hierarchies", e))?;
        detect_from(&parse_mountinfo(&text))
    }

    /// A one-line description, e.g. `v2 at /sys/fs/cgroup: cpu memory pids` or `v1: memory pids cpu`.
    pub fn describe(&self) -> String {
        match self {
            Layout::V2 { root, controllers } => format!("v2 at {}: {}", root.display(), controllers.join(" ")),
            Layout::V1 { memory, pids, cpu } => {
                format!("v1: memory ({}) pids ({}) cpu ({})", memory.display(), pids.display(), cpu.display())
            }
        }
    }

    /// The hierarchy roots, each once.
    fn roots(&self) -> Vec<PathBuf> {
        match self {
            Layout::V2 { root, .. } => vec![root.clone()],
            Layout::V1 { memory, pids, cpu } => dedup(vec![memory.clone(), pids.clone(), cpu.clone()]),
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// One line of `/proc/self/mountinfo`, the fields this module needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    mount_point: PathBuf,
    fstype: String,
    super_options: Vec<String>,
}

/// Parses `/proc/self/mountinfo`; lines that do not parse are skipped.
fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let mount_point = before.split(' ').nth(4)?;
            let mut after = after.split(' ');
            let fstype = after.next()?;
            let _source = after.next()?;
            let super_options = after.next().unwrap_or("");
            Some(Mount {
                mount_point: PathBuf::from(unescape_mountinfo(mount_point)),
                fstype: fstype.to_string(),
                super_options: super_options.split(',').map(str::to_string).collect(),
            })
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space, and so on).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let value = std::str::from_utf8(&bytes[i + 1..i + 4]).ok().and_then(|d| u8::from_str_radix(d, 8).ok());
            if let Some(value) = value {
                out.push(value);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Picks the layout from the mounts (see [`Layout::detect`]).
fn detect_from(mounts: &[Mount]) -> Result<Layout, Error> {
    let mut v2_notes = Vec::new();
    let mut v2: Vec<&Mount> = mounts.iter().filter(|m| m.fstype == "cgroup2").collect();
    // The conventional place first.
    v2.sort_by_key(|m| m.mount_point != Path::new("/sys/fs/cgroup"));
    for mount in v2 {
        let file = mount.mount_point.join("cgroup.controllers");
        let controllers: Vec<String> = match fs::read_to_string(&file) {
            Ok(text) => text.split_whitespace().map(str::to_string).collect(),
            Err(e) => {
                v2_notes.push(format!("cannot read {}: {e}", file.display()));
                continue;
            }
        };
        let missing: Vec<&str> =
            CONTROLLERS.iter().copied().filter(|c| !controllers.iter().any(|have| have == c)).collect();
        if missing.is_empty() {
            return Ok(Layout::V2 { root: mount.mount_point.clone(), controllers });
        }
        v2_notes.push(format!(
            "the cgroup2 hierarchy at {} lacks {} (they are bound to v1 hierarchies or not built in)",
            mount.mount_point.display(),
            missing.join(", ")
        ));
    }

    let find_v1 = |controller: &str| {
        mounts
            .iter()
            .find(|m| m.fstype == "cgroup" && m.super_options.iter().any(|o| o == controller))
            .map(|m| m.mount_point.clone())
    };
    match (find_v1("memory"), find_v1("pids"), find_v1("cpu")) {
        (Some(memory), Some(pids), Some(cpu)) => Ok(Layout::V1 { memory, pids, cpu }),
        (memory, pids, cpu) => {
            let missing: Vec<&str> = [("memory", memory.is_none()), ("pids", pids.is_none()), ("cpu", cpu.is_none())]
                .into_iter()
                .filter_map(|(name, absent)| absent.then_some(name))
                .collect();
            let v2_note =
                if v2_notes.is_empty() { "no cgroup2 file system is mounted".to_string() } else { v2_notes.join("; ") };
            Err(Error::Unsupported(format!(
                "no cgroup hierarchy for the sandbox limits: {v2_note}, and no cgroup v1 hierarchy is mounted for {}; \
                 boot with cgroup v2 (systemd.unified_cgroup_hierarchy=1) so /sys/fs/cgroup offers memory, pids \
                 and cpu, or mount the v1 controllers (mount -t cgroup -o <controller> cgroup /sys/fs/cgroup/<controller>)",
                missing.join(", ")
            )))
        }
    }
}

fn dedup(paths: Vec<PathBuf>) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::with_capacity(paths.len());
    for path in paths {
        if !out.contains(&path) {
            out.push(path);
        }
    }
    out
}

/// Checks a sandbox's group name: 1 to 128 of `A-Z a-z 0-9 - _ .`, not starting with `.`
/// (so neither `/` nor `..` can take the group elsewhere in the hierarchy).
pub fn validate_name(name: &str) -> Result<(), Error> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || name.len() > 128 || name.starts_with('.') || !name.chars().all(ok_char) {
        return Err(Error::Unsupported(format!(
            "cgroup name {name:?} is not allowed: use 1 to 128 characters of A-Z, a-z, 0-9, '-', '_' and '.', \
             not starting with '.' (no '/' or '..')"
        )));
    }
    Ok(())
}

impl Limits {
    /// Checks the limits, and returns the CPU quota in microseconds per [`CPU_PERIOD_US`].
    fn validate(&self) -> Result<Option<u64>, Error> {
        if self.memory_bytes == 0 {
            return Err(Error::Unsupported("memory limit of 0 bytes: give the sandbox some memory".into()));
        }
        if self.pids == 0 {
            return Err(Error::Unsupported("pids limit of 0: the holder needs at least one process".into()));
        }
        match self.cpu_quota {
            None => Ok(None),
            Some(cpus) if (0.01..=1e6).contains(&cpus) => {
                // Bounded above, so the conversion cannot overflow; the kernel's minimum is 1000 us.
                let quota = (cpus * CPU_PERIOD_US as f64).round() as u64;
                Ok(Some(quota.max(1000)))
            }
            Some(cpus) => Err(Error::Unsupported(format!(
                "CPU quota of {cpus} CPUs is not allowed: give a number of CPUs of at least 0.01, or no quota"
            ))),
        }
    }
}

/// One sandbox's cgroup (`sandbox/<name>` in each hierarchy the limits need).
///
/// Dropping it removes it like [`Cgroup::remove`] (killing what is left in
/// it), logging rather than returning a failure; only the process that
/// created it does that, so a forked child that drops its copy leaves the
/// group alone.
#[derive(Debug)]
pub struct Cgroup {
    name: String,
    layout: Layout,
    /// The group's directory in the hierarchy of each controller.
    memory: PathBuf,
    pids: PathBuf,
    cpu: PathBuf,
    /// The distinct directories (one on v2).
    dirs: Vec<PathBuf>,
    /// The process that created the group: the only one whose drop removes it.
    owner: Pid,
    removed: bool,
}

impl Cgroup {
    /// Creates the group `sandbox/<name>` (and the parent `sandbox` if
    /// missing) and writes the limits.
    ///
    /// A group of the same name left by a crashed run is emptied (its
    /// processes are killed) and created afresh, so no stale limit or
    /// counter carries over.
    pub fn create(name: &str, limits: &Limits) -> Result<Cgroup, Error> {
        validate_name(name)?;
        let quota_us = limits.validate()?;
        let layout = Layout::detect()?;
        if let Layout::V2 { root, .. } = &layout {
            prepare_v2_parent(root)?;
        }
        for root in layout.roots() {
            create_dir(&root.join(PARENT))?;
        }
        let at = |root: &PathBuf| root.join(PARENT).join(name);
        let (memory, pids, cpu) = match &layout {
            Layout::V2 { root, .. } => (at(root), at(root), at(root)),
            Layout::V1 { memory, pids, cpu } => (at(memory), at(pids), at(cpu)),
        };
        let dirs = dedup(vec![memory.clone(), pids.clone(), cpu.clone()]);
        let mut group = Cgroup {
            name: name.to_string(),
            layout,
            memory,
            pids,
            cpu,
            dirs: Vec::new(),
            owner: nix::unistd::getpid(),
            removed: false,
        };
        for dir in &dirs {
            if dir.exists() {
                tracing::warn!(group = %dir.display(), "a cgroup of this name was left by an earlier run; emptying and recreating it");
                let mut stale = group.clone_paths();
                stale.dirs = vec![dir.clone()];
                stale.removed = true;
                stale.kill_and_rmdir()?;
            }
            create_dir(dir)?;
            // From here on, a failure removes what was made.
            group.dirs.push(dir.clone());
        }
        group.write_limits(limits, quota_us)?;
        tracing::debug!(name, layout = %group.layout, ?limits, "created the sandbox's cgroup");
        Ok(group)
    }

    fn clone_paths(&self) -> Cgroup {
        Cgroup {
            name: self.name.clone(),
            layout: self.layout.clone(),
            memory: self.memory.clone(),
            pids: self.pids.clone(),
            cpu: self.cpu.clone(),
            dirs: self.dirs.clone(),
            owner: self.owner,
            removed: self.removed,
        }
    }

    fn write_limits(&self, limits: &Limits, quota_us: Option<u64>) -> Result<(), Error> {
        let memory = limits.memory_bytes.to_string();
        match self.layout {
            Layout::V2 { .. } => {
                write_file(&self.memory.join("memory.max"), &memory)?;
                let swap = self.memory.join("memory.swap.max");
                if swap.exists() {
                    write_file(&swap, "0")?;
                }
                write_file(&self.pids.join("pids.max"), &limits.pids.to_string())?;
                let cpu = match quota_us {
                    Some(quota) => format!("{quota} {CPU_PERIOD_US}"),
                    None => format!("max {CPU_PERIOD_US}"),
                };
                write_file(&self.cpu.join("cpu.max"), &cpu)?;
            }
            Layout::V1 { .. } => {
                // The memory limit first: memsw must never be below it.
                write_file(&self.memory.join("memory.limit_in_bytes"), &memory)?;
                let memsw = self.memory.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write_file(&memsw, &memory)?;
                }
                write_file(&self.pids.join("pids.max"), &limits.pids.to_string())?;
                write_file(&self.cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                let quota = quota_us.map_or_else(|| "-1".to_string(), |q| q.to_string());
                write_file(&self.cpu.join("cpu.cfs_quota_us"), &quota)?;
            }
        }
        Ok(())
    }

    /// The sandbox's name (the last component of the group's path).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The hierarchies the group lives in.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The group's directories, each once (one on v2; one per distinct hierarchy on v1).
    pub fn paths(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Moves a process (all its threads) into the group, in every hierarchy.
    /// Its children from then on are born in the group.
    pub fn add_process(&self, pid: u32) -> Result<(), Error> {
        for dir in &self.dirs {
            write_file(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Moves the calling process into the group ([`Cgroup::add_process`] of its own pid).
    pub fn add_self(&self) -> Result<(), Error> {
        self.add_process(std::process::id())
    }

    /// The processes in the group now (thread group ids, without repeats).
    pub fn processes(&self) -> Result<Vec<u32>, Error> {
        let mut all = Vec::new();
        for dir in &self.dirs {
            for pid in read_procs(dir)? {
                if !all.contains(&pid) {
                    all.push(pid);
                }
            }
        }
        Ok(all)
    }

    /// How many times the kernel's OOM killer has killed a process of the group.
    ///
    /// v2: `oom_kill` of `memory.events`. v1: `oom_kill` of `memory.oom_control`
    /// (Linux 4.13 and later); on an older kernel that has no such line this is
    /// 0, and only [`Cgroup::memory_limit_hit`] tells that the limit was reached.
    /// A counter that cannot be read counts as 0 (and is logged).
    pub fn oom_kills(&self) -> u64 {
        let file = match self.layout {
            Layout::V2 { .. } => self.memory.join("memory.events"),
            Layout::V1 { .. } => self.memory.join("memory.oom_control"),
        };
        read_counter(&file, "oom_kill").unwrap_or(0)
    }

    /// Whether the group's memory use has reached its limit at least once
    /// (the kernel then reclaims, and kills if it cannot): any OOM kill, or
    /// v2's `max` of `memory.events`, or v1's `memory.failcnt` above 0 (on v1
    /// that also counts times page cache was reclaimed at the limit, so it is
    /// a hint rather than proof that the sandbox ran out of memory).
    pub fn memory_limit_hit(&self) -> bool {
        if self.oom_kills() > 0 {
            return true;
        }
        match self.layout {
            Layout::V2 { .. } => read_counter(&self.memory.join("memory.events"), "max").unwrap_or(0) > 0,
            Layout::V1 { .. } => read_single(&self.memory.join("memory.failcnt")).unwrap_or(0) > 0,
        }
    }

    /// Whether a fork or clone in the group has failed because of the pids
    /// limit (`max` of `pids.events`, on v1 and v2). Unreadable counts as no.
    pub fn pids_limit_hit(&self) -> bool {
        read_counter(&self.pids.join("pids.events"), "max").unwrap_or(0) > 0
    }

    /// Kills every process left in the group, waits (a few seconds at most)
    /// until it is empty, and removes its directories.
    ///
    /// Refuses if the calling process is itself in the group.
    pub fn remove(mut self) -> Result<(), Error> {
        let result = self.kill_and_rmdir();
        self.removed = true;
        result
    }

    /// What [`Cgroup::remove`] and drop do.
    fn kill_and_rmdir(&self) -> Result<(), Error> {
        let me = std::process::id();
        if self.processes()?.contains(&me) {
            return Err(Error::Unsupported(format!(
                "cannot remove cgroup {}: the calling process (pid {me}) is in it; remove it from another process \
                 once this one has exited",
                self.name
            )));
        }
        let deadline = Instant::now() + REMOVE_TIMEOUT;
        let cgroup_kill = match self.layout {
            Layout::V2 { .. } => Some(self.memory.join("cgroup.kill")).filter(|p| p.exists()),
            Layout::V1 { .. } => None,
        };
        // Kill until empty: a process may fork between the listing and the kill.
        loop {
            let left = self.processes()?;
            if left.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                return Err(Error::Unsupported(format!(
                    "cgroup {} still holds processes {left:?} {} s after they were sent SIGKILL \
                     (stuck in the kernel, e.g. in uninterruptible I/O); remove {} by hand once they are gone",
                    self.name,
                    REMOVE_TIMEOUT.as_secs(),
                    self.dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(" and ")
                )));
            }
            match &cgroup_kill {
                Some(file) => write_file(file, "1")?,
                None => {
                    for pid in left {
                        let Ok(raw) = i32::try_from(pid) else { continue };
                        match kill(Pid::from_raw(raw), Signal::SIGKILL) {
                            Ok(()) | Err(Errno::ESRCH) => {}
                            Err(e) => {
                                return Err(Error::sys(format!("killing pid {pid} left in cgroup {}", self.name), e))
                            }
                        }
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        for dir in &self.dirs {
            loop {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == ErrorKind::NotFound => break,
                    // An exited process can keep the group busy for a moment.
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => {
                        return Err(Error::io(
                            format!("removing cgroup {} (does it hold child groups? remove them first)", dir.display()),
                            e,
                        ))
                    }
                }
            }
        }
        tracing::debug!(name = %self.name, "removed the sandbox's cgroup");
        Ok(())
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if self.removed || self.dirs.is_empty() || nix::unistd::getpid() != self.owner {
            return;
        }
        self.removed = true;
        if let Err(e) = self.kill_and_rmdir() {
            tracing::warn!(name = %self.name, error = %e, "could not remove the sandbox's cgroup");
        }
    }
}

/// Makes the controllers available to `sandbox/*` on a v2 hierarchy: enabled
/// in the root's and in `sandbox`'s `cgroup.subtree_control`.
fn prepare_v2_parent(root: &Path) -> Result<(), Error> {
    enable_controllers(root)?;
    let parent = root.join(PARENT);
    create_dir(&parent)?;
    enable_controllers(&parent)
}

fn enable_controllers(dir: &Path) -> Result<(), Error> {
    let file = dir.join("cgroup.subtree_control");
    let enabled = fs::read_to_string(&file).map_err(|e| Error::io(format!("reading {}", file.display()), e))?;
    let missing: Vec<String> = CONTROLLERS
        .iter()
        .filter(|c| !enabled.split_whitespace().any(|have| have == **c))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    write_file(&file, &missing.join(" ")).map_err(|e| {
        Error::Unsupported(format!(
            "{e}; a cgroup v2 group with processes of its own cannot enable controllers for its children: \
             move the processes of {} into a leaf group (or delegate a subtree to this service)",
            dir.display()
        ))
    })
}

fn create_dir(dir: &Path) -> Result<(), Error> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::io(
            format!("creating cgroup {} (the jail needs root or write access to the cgroup hierarchy)", dir.display()),
            e,
        )),
    }
}

/// Writes a value to a cgroup file in one `write`.
fn write_file(file: &Path, value: &str) -> Result<(), Error> {
    fs::OpenOptions::new()
        .write(true)
        .open(file)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|e| Error::io(format!("writing {value:?} to {}", file.display()), e))
}

fn read_procs(dir: &Path) -> Result<Vec<u32>, Error> {
    let file = dir.join("cgroup.procs");
    match fs::read_to_string(&file) {
        Ok(text) => Ok(text.split_whitespace().filter_map(|pid| pid.parse().ok()).collect()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(Error::io(format!("reading {}", file.display()), e)),
    }
}

/// Reads `key value` from a flat-keyed cgroup file, logging a failure.
fn read_counter(file: &Path, key: &str) -> Option<u64> {
    let text = fs::read_to_string(file)
        .map_err(|e| tracing::warn!(file = %file.display(), error = %e, "cannot read a cgroup counter"))
        .ok()?;
    parse_counter(&text, key)
}

fn parse_counter(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        if k == key {
            v.trim().parse().ok()
        } else {
            None
        }
    })
}

/// Reads a file holding one number, logging a failure.
fn read_single(file: &Path) -> Option<u64> {
    fs::read_to_string(file)
        .map_err(|e| tracing::warn!(file = %file.display(), error = %e, "cannot read a cgroup counter"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests;
