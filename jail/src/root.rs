//! The holder's whole file system view, replaced by a small tmpfs that holds
//! only what it needs.
//!
//! [`JailRoot`] is a builder used by the inner process (see
//! [`crate::namespaces`]) inside its own mount namespace: it mounts a tmpfs on
//! an empty host directory, bind-mounts the listed host files and directories
//! into it, creates the listed device nodes, optionally mounts a fresh `/proc`,
//! and makes the tmpfs the root with `pivot_root`. The old root is then
//! detached: everything that was not listed is not hidden but gone from this
//! process's view.

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{mknod, Mode, SFlag};
use nix::unistd::{chown, Gid, Uid};

use crate::Error;

/// Size of the root tmpfs: it only holds mount points and device nodes.
const ROOT_TMPFS_SIZE: &str = "1m";

#[derive(Debug, Clone)]
enum Entry {
    Bind { host: PathBuf, jail: PathBuf, writable: bool },
    Device { jail: PathBuf, host: PathBuf, uid: u32, gid: u32, mode: u32 },
}

/// A builder for the jail's root file system; see the module documentation.
///
/// Paths in the jail must be absolute and plain (no `.` or `..`). Host paths
/// are resolved when [`JailRoot::enter`] runs, before the root changes.
#[derive(Debug, Clone)]
pub struct JailRoot {
    new_root: PathBuf,
    entries: Vec<Entry>,
    proc: bool,
    hostname: Option<String>,
}

impl JailRoot {
    /// A jail whose root will be a tmpfs mounted on `new_root`, an existing
    /// empty directory on the host (such as `<sandbox dir>/root`). The host
    /// never sees the tmpfs: it is mounted in the process's own mount
    /// namespace.
    pub fn new(new_root: impl Into<PathBuf>) -> Self {
        JailRoot { new_root: new_root.into(), entries: Vec::new(), proc: false, hostname: None }
    }

    /// Makes the host file or directory `host` visible at `jail`, read-only,
    /// and without set-uid bits, device nodes or execution (`nosuid`, `nodev`,
    /// `noexec`). A directory's own submounts are not included.
    pub fn bind_read_only(mut self, host: impl Into<PathBuf>, jail: impl Into<PathBuf>) -> Self {
        self.entries.push(Entry::Bind { host: host.into(), jail: jail.into(), writable: false });
        self
    }

    /// Makes the host directory `host` visible at `jail`, writable (as far as
    /// its owner and mode let the jail's uid write), `nosuid`, `nodev` and
    /// `noexec`.
    pub fn bind_writable(mut self, host: impl Into<PathBuf>, jail: impl Into<PathBuf>) -> Self {
        self.entries.push(Entry::Bind { host: host.into(), jail: jail.into(), writable: true });
        self
    }

    /// Creates at `jail` a character device node with the same major and minor
    /// numbers as the host's `host` (e.g. `/dev/kvm`), owned by `uid`:`gid`
    /// with permission bits `mode`, so the jail's uid can open it after
    /// dropping root even though the host's node is root's only.
    ///
    /// With any device, the root tmpfs cannot be `nodev`; it stays `nosuid`,
    /// `noexec` and ends read-only, and only this process can create nodes on
    /// it (and only before it drops its capabilities).
    pub fn device(mut self, jail: impl Into<PathBuf>, host: impl Into<PathBuf>, uid: u32, gid: u32, mode: u32) -> Self {
        self.entries.push(Entry::Device { jail: jail.into(), host: host.into(), uid, gid, mode });
        self
    }

    /// Mounts a fresh procfs at `/proc` (`nosuid`, `nodev`, `noexec`). It shows
    /// only the processes of the new PID namespace, so it reveals nothing of
    /// the host's processes.
    pub fn proc(mut self) -> Self {
        self.proc = true;
        self
    }

    /// Sets the host name seen in the jail (in the new UTS namespace; the
    /// host's is unchanged).
    pub fn hostname(mut self, name: impl Into<String>) -> Self {
        self.hostname = Some(name.into());
        self
    }

    /// Builds the jail and makes it the process's root: makes every mount
    /// private (so nothing done here propagates to the host), mounts the
    /// tmpfs, creates the bind mounts and device nodes, sets the host name,
    /// `pivot_root`s into the tmpfs, detaches the old root, `chdir("/")`s and
    /// remounts the tmpfs read-only.
    ///
    /// Refuses to run in the host's mount namespace (it would change the
    /// host's mounts): call [`crate::namespaces::enter_new_namespaces`] first.
    /// Needs `CAP_SYS_ADMIN` (and `CAP_MKNOD` for devices).
    pub fn enter(self) -> Result<(), Error> {
        check_own_mount_namespace()?;
        let root = &self.new_root;

        mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
            .map_err(|e| Error::sys("making all mounts private", e))?;

        let has_devices = self.entries.iter().any(|e| matches!(e, Entry::Device { .. }));
        let mut root_flags = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
        if !has_devices {
            root_flags |= MsFlags::MS_NODEV;
        }
        let options = format!("size={ROOT_TMPFS_SIZE},mode=0755");
        mount(Some("tmpfs"), root, Some("tmpfs"), root_flags, Some(options.as_str()))
            .map_err(|e| Error::sys(format!("mounting the root tmpfs on {}", root.display()), e))?;

        for entry in &self.entries {
            match entry {
                Entry::Bind { host, jail, writable } => bind(root, host, jail, *writable)?,
                Entry::Device { jail, host, uid, gid, mode } => device(root, jail, host, *uid, *gid, *mode)?,
            }
        }
        if self.proc {
            let target = under(root, Path::new("/proc"))?;
            make_dir(&target)?;
            mount(
                Some("proc"),
                &target,
                Some("proc"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                None::<&str>,
            )
            .map_err(|e| Error::sys("mounting /proc in the jail", e))?;
        }
        if let Some(name) = &self.hostname {
            nix::unistd::sethostname(name).map_err(|e| Error::sys(format!("sethostname({name})"), e))?;
        }

        // pivot_root(".", "."): the old root ends up stacked under the new one
        // at "/", where it is detached right away; no directory for it is
        // needed in the jail (see pivot_root(2)).
        nix::unistd::chdir(root).map_err(|e| Error::sys(format!("chdir({})", root.display()), e))?;
        nix::unistd::pivot_root(".", ".").map_err(|e| Error::sys("pivot_root into the jail", e))?;
        umount2(".", MntFlags::MNT_DETACH).map_err(|e| Error::sys("detaching the old root", e))?;
        nix::unistd::chdir("/").map_err(|e| Error::sys("chdir(/) in the jail", e))?;

        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | root_flags,
            None::<&str>,
        )
        .map_err(|e| Error::sys("remounting the jail's root read-only", e))?;
        tracing::debug!(entries = self.entries.len(), proc = self.proc, "entered the jail's root");
        Ok(())
    }
}

/// Fails unless the process is known to be in a mount namespace of its own:
/// entered with [`crate::namespaces::enter_new_namespaces`], or different from
/// that of the host's init (when its `/proc/1/ns/mnt` can be read at all).
fn check_own_mount_namespace() -> Result<(), Error> {
    if crate::namespaces::in_own_mount_namespace() {
        return Ok(());
    }
    let refuse = |why: String| {
        Err(Error::Unsupported(format!(
            "building a jail root needs a mount namespace of its own ({why}); call enter_new_namespaces first"
        )))
    };
    let own = std::fs::read_link("/proc/self/ns/mnt").map_err(|e| Error::io("reading /proc/self/ns/mnt", e))?;
    match std::fs::read_link("/proc/1/ns/mnt") {
        Ok(init) if init == own => refuse("this process shares the host init's".into()),
        Ok(_) => Ok(()),
        Err(e) => refuse(format!("cannot compare with the host init's: {e}")),
    }
}

/// `jail` (absolute, plain) as a path under `root`.
fn under(root: &Path, jail: &Path) -> Result<PathBuf, Error> {
    let mut out = root.to_path_buf();
    let mut components = jail.components();
    if components.next() != Some(Component::RootDir) {
        return Err(Error::Unsupported(format!("path in the jail must be absolute: {}", jail.display())));
    }
    let mut any = false;
    for c in components {
        match c {
            Component::Normal(part) => {
                out.push(part);
                any = true;
            }
            _ => {
                return Err(Error::Unsupported(format!(
                    "path in the jail must not contain . or ..: {}",
                    jail.display()
                )));
            }
        }
    }
    if !any {
        return Err(Error::Unsupported("a jail entry cannot be / itself".into()));
    }
    Ok(out)
}

fn make_dir(path: &Path) -> Result<(), Error> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .map_err(|e| Error::io(format!("creating {}", path.display()), e))
}

fn make_parent(path: &Path) -> Result<(), Error> {
    match path.parent() {
        Some(parent) => make_dir(parent),
        None => Ok(()),
    }
}

fn bind(root: &Path, host: &Path, jail: &Path, writable: bool) -> Result<(), Error> {
    let target = under(root, jail)?;
    let meta = std::fs::metadata(host).map_err(|e| Error::io(format!("bind source {}", host.display()), e))?;
    if meta.is_dir() {
        make_dir(&target)?;
    } else {
        make_parent(&target)?;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&target)
            .map_err(|e| Error::io(format!("creating mount point {}", target.display()), e))?;
    }
    mount(Some(host), &target, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(|e| Error::sys(format!("bind-mounting {} at {}", host.display(), jail.display()), e))?;

    // A bind mount starts with its source's flags; the wanted ones only take
    // effect with a remount. Flags the source has that the kernel may lock
    // (in a user namespace) are kept, or the remount would fail.
    let mut flags =
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if !writable {
        flags |= MsFlags::MS_RDONLY;
    }
    flags |= kept_flags(&target)?;
    mount(None::<&str>, &target, None::<&str>, flags, None::<&str>)
        .map_err(|e| Error::sys(format!("remounting {} with restrictions", jail.display()), e))?;
    tracing::debug!(host = %host.display(), jail = %jail.display(), writable, "bound into the jail");
    Ok(())
}

/// The atime flags of the mount at `path`, to keep across a remount.
fn kept_flags(path: &Path) -> Result<MsFlags, Error> {
    let st = nix::sys::statvfs::statvfs(path).map_err(|e| Error::sys(format!("statvfs({})", path.display()), e))?;
    let have = st.flags();
    use nix::sys::statvfs::FsFlags;
    let mut flags = MsFlags::empty();
    if have.contains(FsFlags::ST_NOATIME) {
        flags |= MsFlags::MS_NOATIME;
    }
    if have.contains(FsFlags::ST_NODIRATIME) {
        flags |= MsFlags::MS_NODIRATIME;
    }
    if have.contains(FsFlags::ST_RELATIME) {
        flags |= MsFlags::MS_RELATIME;
    }
    Ok(flags)
}

fn device(root: &Path, jail: &Path, host: &Path, uid: u32, gid: u32, mode: u32) -> Result<(), Error> {
    let target = under(root, jail)?;
    let meta = std::fs::metadata(host).map_err(|e| Error::io(format!("device {}", host.display()), e))?;
    if !meta.file_type().is_char_device() {
        return Err(Error::Unsupported(format!("{} is not a character device", host.display())));
    }
    make_parent(&target)?;
    let perm = Mode::from_bits_truncate(mode & 0o777);
    mknod(&target, SFlag::S_IFCHR, perm, meta.rdev())
        .map_err(|e| Error::sys(format!("mknod({}) like {}", jail.display(), host.display()), e))?;
    chown(&target, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
        .map_err(|e| Error::sys(format!("chown({})", jail.display()), e))?;
    // mknod's mode is filtered by the umask; set it exactly.
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode & 0o777))
        .map_err(|e| Error::io(format!("chmod({})", jail.display()), e))?;
    tracing::debug!(host = %host.display(), jail = %jail.display(), uid, "device node created in the jail");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jail_paths_must_be_absolute_and_plain() {
        let root = Path::new("/r");
        assert_eq!(under(root, Path::new("/dev/kvm")).unwrap(), Path::new("/r/dev/kvm"));
        assert!(under(root, Path::new("dev/kvm")).is_err());
        assert!(under(root, Path::new("/dev/../etc")).is_err());
        assert!(under(root, Path::new("/")).is_err());
    }
}
