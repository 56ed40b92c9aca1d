//! Snapshots of running sandboxes, and sandboxes restored from them.
//!
//! A snapshot is a directory: the VMM's `vm.state` and `vm.mem` (see
//! docs/snapshots.md) and `snapshot.json`, a [`Snapshot`]: what a restored
//! sandbox is built from besides the VM's own state (the image by name, its
//! kernel and disks with their digests, its run settings, memory and
//! vCPUs). [`crate::Instance::snapshot`] writes one;
//! [`crate::Sandbox::from_snapshot`] starts a sandbox from it. Every restored
//! sandbox is a sandbox of its own: its own id, directory, `session.db`,
//! handlers and policy; once its agent answers, the guest is given a new
//! identity (fresh entropy and a reseeded random pool, the host's clock,
//! the current sandbox CA in place of the one it trusted) before the
//! sandbox is handed out.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{paths, Error};

/// The file in a snapshot directory that describes it.
const META_FILE: &str = "snapshot.json";

/// A snapshot on disk: what `snapshot.json` says, and where it is.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Snapshot {
    /// The snapshot's directory.
    #[serde(skip)]
    pub dir: PathBuf,
    /// The id of the sandbox it was taken from.
    pub source: String,
    /// The image, as it was named.
    pub image: String,
    /// The kernel and disks the VM was built from (read-only; a restored
    /// VM uses them again), root disk first.
    pub kernel: PathBuf,
    pub disks: Vec<PathBuf>,
    pub memory_mib: u32,
    pub vcpus: u8,
    /// The OCI image's run settings.
    pub image_config: Option<rootfs::ImageConfig>,
    /// Digests of the kernel and disks, checked again on restore.
    pub digests: vmm::Digests,
    /// Seconds since the Unix epoch.
    pub created: u64,
}

impl Snapshot {
    /// Read the snapshot in `dir`, checking its state file's header (magic,
    /// version, checksum) and that it matches `snapshot.json`.
    pub fn load(dir: impl AsRef<Path>) -> Result<Snapshot, Error> {
        // At its real path: a confined holder sees host files at those.
        let dir = &dir
            .as_ref()
            .canonicalize()
            .map_err(|e| Error::Io(format!("find the snapshot {}", dir.as_ref().display()), e))?;
        let meta = dir.join(META_FILE);
        let bytes = std::fs::read(&meta).map_err(|e| Error::Io(format!("read {}", meta.display()), e))?;
        let mut snapshot: Snapshot = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Config(format!("{} is not a snapshot description: {e}", meta.display())))?;
        snapshot.dir = dir.to_path_buf();
        let header = vmm::snapshot::read_header(&snapshot.files().state)?;
        if header.memory_mib != snapshot.memory_mib
            || header.vcpus != snapshot.vcpus
            || header.digests != snapshot.digests
        {
            return Err(Error::Config(format!(
                "{}: snapshot.json does not describe vm.state (memory, vCPUs or digests differ)",
                dir.display()
            )));
        }
        Ok(snapshot)
    }

    /// The named snapshot `name` in the data directory `data_dir` (where
    /// `sandbox snapshot --name` keeps them), or the snapshot in the
    /// directory `name` when it holds a `/`.
    pub fn find_in(data_dir: &Path, name: &str) -> Result<Snapshot, Error> {
        if name.contains('/') {
            return Snapshot::load(name);
        }
        if !valid_name(name) {
            return Err(Error::Config(format!("not a snapshot name: {name:?}")));
        }
        let dir = paths::snapshots_in(data_dir).join(name);
        if !dir.exists() {
            return Err(Error::Config(format!("no snapshot {name} (sandbox snapshots lists them)")));
        }
        Snapshot::load(dir)
    }

    /// Every snapshot in the data directory `data_dir`, newest first; the
    /// ones that cannot be read, each with why.
    pub fn list_in(data_dir: &Path) -> Result<(Vec<Snapshot>, Vec<Unreadable>), Error> {
        let root = paths::snapshots_in(data_dir);
        let entries = match std::fs::read_dir(&root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Default::default()),
            Err(e) => return Err(Error::Io(format!("read {}", root.display()), e)),
        };
        let (mut good, mut bad) = (Vec::new(), Vec::new());
        for entry in entries.flatten() {
            let name = entry.file_name();
            if !name.to_str().is_some_and(valid_name) {
                continue;
            }
            match Snapshot::load(entry.path()) {
                Ok(snapshot) => good.push(snapshot),
                Err(e) => bad.push((entry.path(), e)),
            }
        }
        good.sort_by(|a: &Snapshot, b| b.created.cmp(&a.created).then_with(|| a.dir.cmp(&b.dir)));
        Ok((good, bad))
    }

    /// The snapshot's name: its directory's.
    pub fn name(&self) -> String {
        self.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }

    /// Bytes the snapshot's files take on disk (the memory file is sparse:
    /// pages the guest never touched take none).
    pub fn disk_usage(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let files = self.files();
        [files.state, files.memory, self.dir.join(META_FILE)]
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.blocks() * 512)
            .sum()
    }

    /// Delete the snapshot. Sandboxes restored from it run on (their memory
    /// maps the file, which lives until they are gone).
    pub fn remove(self) -> Result<(), Error> {
        std::fs::remove_dir_all(&self.dir).map_err(|e| Error::Io(format!("remove {}", self.dir.display()), e))
    }

    /// Check that the kernel and disks the snapshot was taken with are
    /// still there, unchanged (their digests are those recorded).
    pub fn check_files(&self) -> Result<(), Error> {
        let now = digests(&self.kernel, &self.disks)?;
        if now != self.digests {
            return Err(Error::Config(format!(
                "the snapshot {} was taken with another kernel or disk than {} and {} are now; it cannot be restored",
                self.dir.display(),
                self.kernel.display(),
                self.disks.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
            )));
        }
        Ok(())
    }

    /// The VMM's files.
    pub fn files(&self) -> vmm::SnapshotFiles {
        vmm::SnapshotFiles::in_dir(&self.dir)
    }

    /// Write `snapshot.json` into [`Self::dir`].
    pub(crate) fn save(&self) -> Result<(), Error> {
        let path = self.dir.join(META_FILE);
        let json = serde_json::to_vec_pretty(self).map_err(|e| Error::Io("encode snapshot.json".into(), e.into()))?;
        std::fs::write(&path, json).map_err(|e| Error::Io(format!("write {}", path.display()), e))
    }
}

/// A snapshot directory that cannot be used, and why.
pub type Unreadable = (PathBuf, Error);

/// Is `name` a snapshot name: letters, digits, `.`, `_` and `-`, not
/// starting with `.` or `-`, at most 64 characters?
pub fn valid_name(name: &str) -> bool {
    name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Create the directory snapshots are kept in (mode 0700), if missing.
pub fn create_store(dir: &Path) -> Result<(), Error> {
    crate::instance::private_dir(dir)
}

/// Create the directory a snapshot is written to: `dir` itself, mode 0700
/// (the guest's memory is in it); its parent must exist.
pub(crate) fn create_dir(dir: &Path) -> Result<(), Error> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::Io(format!("create the snapshot directory {}", dir.display()), e))
}

/// Move the snapshot a holder wrote in `from` (inside its sandbox's
/// directory, its files owned by the holder's uid) to `to`, and make it
/// this process's: owned by its user, the files read-only. The directory
/// stays mode 0700; the files are readable by all, which lets a confined
/// holder restoring from it read the ones its jail binds (the directory
/// keeps everyone else out).
pub(crate) fn publish(from: &Path, to: &Path) -> Result<Snapshot, Error> {
    if let Err(e) = std::fs::rename(from, to) {
        if e.raw_os_error() != Some(libc::EXDEV) {
            return Err(Error::Io(format!("move the snapshot to {}", to.display()), e));
        }
        // Another file system: copy, then drop the original.
        create_dir(to)?;
        for entry in std::fs::read_dir(from).map_err(|e| Error::Io(format!("read {}", from.display()), e))?.flatten() {
            let target = to.join(entry.file_name());
            std::fs::copy(entry.path(), &target).map_err(|e| Error::Io(format!("write {}", target.display()), e))?;
        }
        std::fs::remove_dir_all(from).map_err(|e| Error::Io(format!("remove {}", from.display()), e))?;
    }
    let (uid, gid) = (nix::unistd::geteuid(), nix::unistd::getegid());
    let own = |path: &Path, mode: u32| {
        nix::unistd::chown(path, Some(uid), Some(gid))
            .map_err(std::io::Error::from)
            .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)))
            .map_err(|e| Error::Io(format!("take ownership of {}", path.display()), e))
    };
    own(to, 0o700)?;
    for entry in std::fs::read_dir(to).map_err(|e| Error::Io(format!("read {}", to.display()), e))?.flatten() {
        own(&entry.path(), 0o444)?;
    }
    Snapshot::load(to)
}

/// SHA-256 digests of the kernel and disks a VM is built from (from the
/// digest cache, [`crate::warm`], where this process can reach it).
pub(crate) fn digests(kernel: &Path, disks: &[PathBuf]) -> Result<vmm::Digests, Error> {
    let digest = |file: &Path| crate::warm::file_digest(&crate::warm::cache_root(), file);
    Ok(vmm::Digests {
        kernel: Some(digest(kernel)?),
        disks: disks.iter().map(|d| digest(d).map(Some)).collect::<Result<_, _>>()?,
    })
}
