//! What this host offers the sandbox and its jail: KVM, cgroups, namespaces,
//! seccomp, no_new_privs, root, pivot_root. Each is probed for real where
//! that is cheap (opening `/dev/kvm`, creating and removing a cgroup), and
//! anything missing comes with what to do about it.

use std::fmt;
use std::fs;
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::cgroup::{self, Cgroup, Layout, Limits};
use crate::privileges::status_field;
use crate::Error;

/// The outcome of one check: `Ok(what was found)` or `Err(what is missing, and what to do)`.
pub type Check = Result<String, String>;

/// What the host offers; see [`HostSupport::probe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSupport {
    /// `/dev/kvm` opens read-write and speaks KVM API version 12.
    pub kvm: Check,
    /// cgroup hierarchies with memory, pids and cpu, in which a group can be
    /// created under the `sandbox` parent and removed again.
    pub cgroups: Check,
    /// Mount, pid, ipc and uts namespaces exist and this process may create them (CAP_SYS_ADMIN).
    pub namespaces: Check,
    /// seccomp filters, with the `trap` and `kill_process` actions.
    pub seccomp: Check,
    /// `PR_SET_NO_NEW_PRIVS` is available.
    pub no_new_privs: Check,
    /// This process runs as root (effective uid 0).
    pub root: Check,
    /// `pivot_root` into a new root can work: root, a mount namespace, and a `/` that is not the initramfs.
    pub pivot_root: Check,
}

/// `KVM_GET_API_VERSION`, `_IO(KVMIO, 0x00)`.
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
/// The only KVM API version there has ever been.
const KVM_API_VERSION: i32 = 12;
/// `CAP_SYS_ADMIN`'s bit in the capability sets.
const CAP_SYS_ADMIN: u32 = 21;

static PROBES: AtomicU32 = AtomicU32::new(0);

impl HostSupport {
    /// Probes the host. Never fails: each item says what it found or what is missing.
    pub fn probe() -> HostSupport {
        let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
        let root = probe_root();
        let namespaces = probe_namespaces(&status);
        let pivot_root = probe_pivot_root(&root, &namespaces);
        let support = HostSupport {
            kvm: probe_kvm(Path::new("/dev/kvm")),
            cgroups: probe_cgroups(),
            namespaces,
            seccomp: probe_seccomp(&status),
            no_new_privs: probe_no_new_privs(),
            root,
            pivot_root,
        };
        tracing::debug!(%support, "probed the host");
        support
    }

    /// The checks in display order, with their names.
    pub fn checks(&self) -> [(&'static str, &Check); 7] {
        [
            ("kvm", &self.kvm),
            ("cgroups", &self.cgroups),
            ("namespaces", &self.namespaces),
            ("seccomp", &self.seccomp),
            ("no_new_privs", &self.no_new_privs),
            ("root", &self.root),
            ("pivot_root", &self.pivot_root),
        ]
    }

    /// Whether the jail (cgroups, namespaces, pivot_root, uid change, no_new_privs,
    /// seccomp) can be set up here; the error lists everything missing and what to do.
    /// KVM is not part of the jail: check [`HostSupport::kvm`] for running a sandbox at all.
    pub fn can_jail(&self) -> Result<(), Error> {
        let missing: Vec<String> = self
            .checks()
            .into_iter()
            .filter(|(name, _)| *name != "kvm")
            .filter_map(|(name, check)| check.as_ref().err().map(|what| format!("{name}: {what}")))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        Err(Error::Unsupported(format!("the sandbox jail cannot be set up on this host: {}", missing.join("; "))))
    }
}

impl fmt::Display for HostSupport {
    /// One line per check: `kvm          ok       /dev/kvm, API 12`, or `missing:` and what to do.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, check) in self.checks() {
            match check {
                Ok(detail) => writeln!(f, "{name:<13}ok       {detail}")?,
                Err(what) => writeln!(f, "{name:<13}missing: {what}")?,
            }
        }
        Ok(())
    }
}

fn probe_kvm(path: &Path) -> Check {
    let file = fs::OpenOptions::new().read(true).write(true).open(path).map_err(|e| match e.kind() {
        ErrorKind::NotFound => format!(
            "{} does not exist: load the KVM module (modprobe kvm_intel or kvm_amd), enable virtualisation in the \
             firmware, or enable nested virtualisation if this is a VM",
            path.display()
        ),
        ErrorKind::PermissionDenied => {
            format!("no permission to open {} read-write: run as root or join its group (usually kvm)", path.display())
        }
        _ => format!("cannot open {}: {e}", path.display()),
    })?;
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns a number; the fd is open for the call.
    let version = unsafe { libc::ioctl(file.as_raw_fd(), KVM_GET_API_VERSION as _, 0) };
    if version < 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!("{} is not a KVM device (KVM_GET_API_VERSION: {e})", path.display()));
    }
    if version != KVM_API_VERSION {
        return Err(format!(
            "{} speaks KVM API {version}, not {KVM_API_VERSION}: this kernel's KVM is not supported",
            path.display()
        ));
    }
    Ok(format!("{}, API {version}", path.display()))
}

fn probe_cgroups() -> Check {
    let layout = Layout::detect().map_err(|e| e.to_string())?;
    let summary = match &layout {
        Layout::V2 { controllers, .. } => format!("v2: {}", controllers.join(" ")),
        Layout::V1 { .. } => "v1: memory pids cpu".to_string(),
    };
    let name = format!("probe-{}-{}", std::process::id(), PROBES.fetch_add(1, Ordering::Relaxed));
    let limits = Limits { memory_bytes: 64 << 20, cpu_quota: Some(1.0), pids: 16 };
    let group = Cgroup::create(&name, &limits).map_err(|e| format!("{summary}, but a probe group fails: {e}"))?;
    group.remove().map_err(|e| format!("{summary}, but removing a probe group fails: {e}"))?;
    Ok(format!("{summary} (groups under {}/ can be made)", cgroup::PARENT))
}

/// The effective capability set from `/proc/self/status`.
fn effective_caps(status: &str) -> Option<u64> {
    u64::from_str_radix(status_field(status, "CapEff")?, 16).ok()
}

fn probe_namespaces(status: &str) -> Check {
    let kinds = [("mnt", "mount", "CONFIG_NAMESPACES"), ("pid", "pid", "CONFIG_PID_NS")];
    let kinds = kinds.into_iter().chain([("ipc", "ipc", "CONFIG_IPC_NS"), ("uts", "uts", "CONFIG_UTS_NS")]);
    let missing: Vec<String> = kinds
        .filter(|(file, _, _)| !Path::new("/proc/self/ns").join(file).exists())
        .map(|(_, name, config)| format!("{name} ({config})"))
        .collect();
    if !missing.is_empty() {
        return Err(format!("the kernel lacks namespaces: {}; rebuild it with them", missing.join(", ")));
    }
    match effective_caps(status) {
        Some(caps) if caps & (1 << CAP_SYS_ADMIN) != 0 => Ok("mount pid ipc uts, with CAP_SYS_ADMIN".to_string()),
        Some(_) => Err(format!(
            "mount pid ipc uts exist, but this process (uid {}) lacks CAP_SYS_ADMIN to create them: the jail needs \
             root (run the parent as root), or a delegated setup that grants it",
            nix::unistd::geteuid()
        )),
        None => Err("cannot read CapEff from /proc/self/status to tell whether namespaces can be created".to_string()),
    }
}

fn probe_seccomp(status: &str) -> Check {
    let Some(mode) = status_field(status, "Seccomp") else {
        return Err("the kernel has no seccomp (no Seccomp line in /proc/self/status): rebuild it with \
                    CONFIG_SECCOMP and CONFIG_SECCOMP_FILTER"
            .to_string());
    };
    let actions = fs::read_to_string("/proc/sys/kernel/seccomp/actions_avail").map_err(|e| {
        format!("cannot read /proc/sys/kernel/seccomp/actions_avail ({e}): the kernel lacks seccomp filters or is older than 4.14")
    })?;
    let missing: Vec<&str> =
        ["trap", "kill_process"].into_iter().filter(|want| !actions.split_whitespace().any(|a| a == *want)).collect();
    if !missing.is_empty() {
        return Err(format!(
            "seccomp lacks the {} action(s) (available: {}): use a kernel of 4.14 or later",
            missing.join(", "),
            actions.trim()
        ));
    }
    let already = if mode == "0" { String::new() } else { format!("; this process is already in mode {mode}") };
    Ok(format!("filters with trap and kill_process{already}"))
}

fn probe_no_new_privs() -> Check {
    // SAFETY: PR_GET_NO_NEW_PRIVS only returns this thread's flag; the unused arguments must be 0.
    let flag = unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) };
    match flag {
        0 => Ok("available".to_string()),
        1 => Ok("available (already set for this process)".to_string()),
        _ => Err(format!(
            "PR_GET_NO_NEW_PRIVS fails ({}): the kernel is older than 3.5; upgrade it",
            std::io::Error::last_os_error()
        )),
    }
}

fn probe_root() -> Check {
    let euid = nix::unistd::geteuid();
    if euid.is_root() {
        Ok("effective uid 0".to_string())
    } else {
        Err(format!(
            "running as uid {euid}: the jail needs root to create namespaces, pivot_root, switch to the holder's \
             own uid and write cgroups; run the parent (CLI or library user) as root"
        ))
    }
}

fn probe_pivot_root(root: &Check, namespaces: &Check) -> Check {
    if root.is_err() {
        return Err("needs root (see root)".to_string());
    }
    if !Path::new("/proc/self/ns/mnt").exists() {
        return Err("needs mount namespaces (see namespaces)".to_string());
    }
    if namespaces.is_err() {
        return Err("needs namespaces (see namespaces)".to_string());
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let root_fs = mountinfo
        .lines()
        .filter(|line| line.split(' ').nth(4) == Some("/"))
        .filter_map(|line| line.split_once(" - ").and_then(|(_, after)| after.split(' ').next()))
        .next_back();
    match root_fs {
        Some("rootfs") => Err("/ is the initramfs (rootfs), which pivot_root cannot move: boot with a real root \
                               file system, or switch_root into one before starting sandboxes"
            .to_string()),
        Some(fs) => Ok(format!("root, mount namespaces, / is {fs}")),
        None => Ok("root, mount namespaces".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_host_has_kvm_cgroups_and_seccomp() {
        let support = HostSupport::probe();
        let text = support.to_string();
        println!("{text}");
        assert_eq!(support.kvm.as_deref(), Ok("/dev/kvm, API 12"));
        assert!(support.cgroups.as_ref().is_ok_and(|c| c.starts_with("v1: memory pids cpu")), "{text}");
        assert!(support.seccomp.is_ok(), "{text}");
        assert!(text.contains("kvm          ok       /dev/kvm, API 12"), "{text}");
        assert!(text.lines().any(|l| l.starts_with("cgroups") && l.contains("ok       v1: memory pids cpu")), "{text}");
        assert!(text.lines().any(|l| l.starts_with("seccomp") && l.contains("ok ")), "{text}");
        // We run these tests as root.
        assert!(support.root.is_ok(), "{text}");
        support.can_jail().unwrap();
    }

    #[test]
    fn missing_items_are_listed_with_what_to_do() {
        let mut support = HostSupport::probe();
        support.root = Err("running as uid 1000: run as root".to_string());
        support.kvm = Err("/dev/kvm does not exist".to_string());
        let text = support.to_string();
        assert!(text.contains("root         missing: running as uid 1000: run as root"), "{text}");
        let err = support.can_jail().unwrap_err().to_string();
        assert!(err.contains("root: running as uid 1000"), "{err}");
        // KVM is not part of the jail.
        assert!(!err.contains("kvm"), "{err}");
    }

    #[test]
    fn kvm_probe_explains_a_missing_device() {
        let dir = tempfile::tempdir().unwrap();
        let err = probe_kvm(&dir.path().join("kvm")).unwrap_err();
        assert!(err.contains("modprobe"), "{err}");
        // A file that is not KVM.
        let err = probe_kvm(Path::new("/dev/null")).unwrap_err();
        assert!(err.contains("not a KVM device"), "{err}");
    }

    #[test]
    fn capabilities_are_parsed() {
        let status = "Name:\tx\nCapPrm:\t0\nCapEff:\t000001fffeffffff\n";
        let caps = effective_caps(status).unwrap();
        assert_ne!(caps & (1 << CAP_SYS_ADMIN), 0);
        assert_eq!(effective_caps("CapEff:\t0000000000000000\n"), Some(0));
        assert_eq!(effective_caps("Name:\tx\n"), None);
    }
}
