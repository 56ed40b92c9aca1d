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

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Error;

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

/// SHA-256 digests of the kernel and disks a VM is built from.
pub(crate) fn digests(kernel: &Path, disks: &[PathBuf]) -> Result<vmm::Digests, Error> {
    Ok(vmm::Digests {
        kernel: Some(vmm::snapshot::sha256_file(kernel)?),
        disks: disks.iter().map(|d| vmm::snapshot::sha256_file(d).map(Some)).collect::<Result<_, _>>()?,
    })
}
