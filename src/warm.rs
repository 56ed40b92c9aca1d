//! Warm starts: a cache of snapshots of freshly booted, idle sandboxes, one
//! per kernel, image, memory, vCPUs, writable-layer size and kernel command
//! line, so that a sandbox of the same kind is restored instead of booted
//! ([`crate::SandboxBuilder::warm`]).
//!
//! The cache is `<cache dir>/snapshots/` ([`crate::paths::cache_dir`]):
//! - `warm-<key>/`: a snapshot; `<key>` hashes the digests of the kernel
//!   and disks with the settings above and this crate's version, so a
//!   rebuilt image or kernel gets a snapshot of its own;
//! - `warm-<key>.lock`: held by the one process making that snapshot;
//!   others wait for it and then use what it made;
//! - `digests/`: SHA-256 digests of kernels and disks, each under a name
//!   hashed from the file's path, inode, size and times, so a file is read
//!   whole only once after it changes;
//! - `tmp-<random>/`: a snapshot being made (the data directory of the
//!   sandbox that makes it), renamed into place when complete. Its maker
//!   holds a lock on `tmp-<random>/maker.lock`; one whose lock is free was
//!   left by a maker that was killed, and the next maker removes it. (The
//!   name stays short: the VMM's sockets live below it, and a Unix socket's
//!   path has at most 107 bytes.)
//!
//! A snapshot is made by booting a sandbox in a holder (confined as the
//! caller's sandbox would be), waiting for its agent, and snapshotting it
//! with the VM stopped. A damaged snapshot is removed and made again.
//!
//! The cache keeps the [`KEEP`] snapshots used last (a use sets the
//! directory's modification time): making one more removes the least
//! recently used beyond that, so kernels and images that were rebuilt or
//! removed do not leave their snapshots behind for ever.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

use crate::{paths, Error, Snapshot};

/// What a warm snapshot is keyed by, besides the files' digests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WarmSettings<'a> {
    pub kernel: &'a Path,
    pub disks: &'a [PathBuf],
    pub memory_mib: u32,
    pub vcpus: u8,
    pub disk_mib: Option<u32>,
    pub cmdline: &'a str,
}

/// The cache's directory.
pub(crate) fn cache_root() -> PathBuf {
    paths::cache_dir().join("snapshots")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of the file at `path`, from the digest cache in `root` when
/// the file has not changed since it was computed.
pub(crate) fn file_digest(root: &Path, path: &Path) -> Result<String, Error> {
    let meta = std::fs::metadata(path).map_err(|e| Error::Io(format!("read {}", path.display()), e))?;
    let mut id = Sha256::new();
    id.update(path.as_os_str().as_encoded_bytes());
    for n in [meta.dev(), meta.ino(), meta.size()] {
        id.update(n.to_le_bytes());
    }
    for n in [meta.mtime(), meta.mtime_nsec(), meta.ctime(), meta.ctime_nsec()] {
        id.update(n.to_le_bytes());
    }
    let entry = root.join("digests").join(&hex(&id.finalize())[..32]);
    if let Ok(digest) = std::fs::read_to_string(&entry) {
        if digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(digest);
        }
    }
    let digest = vmm::snapshot::sha256_file(path)?;
    // A cache that cannot be written only costs the next caller a read.
    let _ = crate::instance::private_dir(&root.join("digests"))
        .and_then(|()| std::fs::write(&entry, &digest).map_err(|e| Error::Io(format!("write {}", entry.display()), e)));
    Ok(digest)
}

/// The warm snapshot's key for `settings`.
fn key(root: &Path, settings: &WarmSettings) -> Result<String, Error> {
    let mut key = Sha256::new();
    key.update(env!("CARGO_PKG_VERSION"));
    key.update(vmm::snapshot::FORMAT_VERSION.to_le_bytes());
    for file in std::iter::once(settings.kernel).chain(settings.disks.iter().map(PathBuf::as_path)) {
        key.update(file_digest(root, file)?);
    }
    key.update(settings.memory_mib.to_le_bytes());
    key.update([settings.vcpus]);
    key.update(settings.disk_mib.unwrap_or(0).to_le_bytes());
    key.update(settings.cmdline);
    Ok(hex(&key.finalize())[..16].to_string())
}

/// The cached snapshot for `settings`, made with `make` (which boots a
/// sandbox in the data directory it is given and returns it running) when
/// there is none.
pub(crate) fn snapshot(
    settings: &WarmSettings,
    make: impl FnOnce(&Path) -> Result<crate::Sandbox, Error>,
) -> Result<Snapshot, Error> {
    let root = cache_root();
    crate::instance::private_dir(&root)?;
    let key = key(&root, settings)?;
    let dir = root.join(format!("warm-{key}"));
    if let Ok(snapshot) = Snapshot::load(&dir) {
        touch(&dir);
        return Ok(snapshot);
    }
    let _lock = lock(&root.join(format!("warm-{key}.lock")), true)?;
    // Made while this process waited for the lock?
    match Snapshot::load(&dir) {
        Ok(snapshot) => {
            touch(&dir);
            return Ok(snapshot);
        }
        Err(e) if dir.exists() => {
            tracing::warn!(dir = %dir.display(), "the warm snapshot cannot be used; making it again: {e}");
            std::fs::remove_dir_all(&dir).map_err(|e| Error::Io(format!("remove {}", dir.display()), e))?;
        }
        Err(_) => {}
    }
    remove_abandoned(&root);
    tracing::info!(key, "making the warm snapshot (one cold boot)");
    let tmp = root.join(format!("tmp-{}", crate::instance::new_id()?));
    crate::instance::private_dir(&tmp)?;
    let maker = lock(&tmp.join(MAKER_LOCK), false);
    let made = maker.and_then(|_maker| make_in(&tmp, &dir, make));
    let _ = std::fs::remove_dir_all(&tmp);
    if made.is_ok() {
        remove_least_recently_used(&root, KEEP);
    }
    made
}

/// How many warm snapshots the cache keeps (each some 20 MiB on disk for
/// the default image).
pub const KEEP: usize = 16;

/// Mark the snapshot in `dir` as used now.
fn touch(dir: &Path) {
    if let Err(e) = File::open(dir).and_then(|d| d.set_modified(SystemTime::now())) {
        tracing::debug!(dir = %dir.display(), "cannot mark the warm snapshot as used: {e}");
    }
}

/// Remove the warm snapshots of `root` beyond the `keep` used last. One
/// whose lock another process holds is left alone. A sandbox restored from
/// a removed snapshot runs on: its files stay until it closes them.
fn remove_least_recently_used(root: &Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    let mut snapshots: Vec<(SystemTime, PathBuf, String)> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let is_snapshot = name.starts_with("warm-") && !name.ends_with(".lock");
            let used = entry.metadata().ok()?.modified().ok()?;
            is_snapshot.then(|| (used, entry.path(), name))
        })
        .collect();
    snapshots.sort_by_key(|(used, _, _)| std::cmp::Reverse(*used));
    for (_, path, name) in snapshots.into_iter().skip(keep) {
        let Ok(_lock) = lock(&root.join(format!("{name}.lock")), false) else { continue };
        tracing::info!(dir = %path.display(), "removing a warm snapshot not used for the longest time");
        if let Err(e) = std::fs::remove_dir_all(&path) {
            tracing::warn!(dir = %path.display(), "cannot remove a warm snapshot: {e}");
        }
    }
}

/// The lock a maker holds in its `tmp-<random>/` directory.
const MAKER_LOCK: &str = "maker.lock";

/// Remove what makers killed before they finished left behind: `tmp-*`
/// directories whose maker's lock is free. (One whose lock file is not
/// there yet is being set up, and left alone.)
fn remove_abandoned(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if !entry.file_name().to_str().is_some_and(|name| name.starts_with("tmp-")) {
            continue;
        }
        let lock_file = path.join(MAKER_LOCK);
        if !lock_file.exists() {
            continue;
        }
        if let Ok(_abandoned) = lock(&lock_file, false) {
            tracing::info!(dir = %path.display(), "removing an unfinished warm snapshot");
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

fn make_in(
    tmp: &Path,
    dir: &Path,
    make: impl FnOnce(&Path) -> Result<crate::Sandbox, Error>,
) -> Result<Snapshot, Error> {
    let sandbox = make(tmp)?;
    let written = tmp.join("snapshot");
    let snapshot = sandbox.snapshot(&written, crate::AfterSnapshot::Stop);
    if snapshot.is_err() {
        let _ = sandbox.stop(Duration::from_secs(30));
    }
    snapshot?;
    std::fs::rename(&written, dir).map_err(|e| Error::Io(format!("move the warm snapshot to {}", dir.display()), e))?;
    Snapshot::load(dir)
}

/// Hold the lock file at `path`, waiting for it unless `wait` is false
/// (then another holder is an error).
fn lock(path: &Path, wait: bool) -> Result<Flock<File>, Error> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| Error::Io(format!("open {}", path.display()), e))?;
    let how = if wait { FlockArg::LockExclusive } else { FlockArg::LockExclusiveNonblock };
    Flock::lock(file, how).map_err(|(_, e)| Error::Io(format!("lock {}", path.display()), std::io::Error::from(e)))
}

/// Remove every warm snapshot (and the digest cache); returns how many
/// snapshots there were. One being made is left alone.
pub fn clear() -> Result<usize, Error> {
    let root = cache_root();
    let entries = match std::fs::read_dir(&root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::Io(format!("read {}", root.display()), e)),
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("warm-") && !name.ends_with(".lock") {
            let Ok(_lock) = lock(&root.join(format!("{name}.lock")), false) else { continue };
            std::fs::remove_dir_all(entry.path())
                .map_err(|e| Error::Io(format!("remove {}", entry.path().display()), e))?;
            removed += 1;
        } else if name == "digests" {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn a_digest_is_computed_once_and_again_when_the_file_changes() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("disk");
        std::fs::write(&file, b"abc").unwrap();
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(file_digest(root.path(), &file).unwrap(), abc);
        // The cached digest is used while the file is unchanged...
        let entry = std::fs::read_dir(root.path().join("digests")).unwrap().next().unwrap().unwrap().path();
        std::fs::write(&entry, "0".repeat(64)).unwrap();
        assert_eq!(file_digest(root.path(), &file).unwrap(), "0".repeat(64));
        // ...and a damaged entry is recomputed.
        std::fs::write(&entry, "not a digest").unwrap();
        assert_eq!(file_digest(root.path(), &file).unwrap(), abc);
        // A changed file is read again.
        std::thread::sleep(Duration::from_millis(20));
        let mut f = OpenOptions::new().append(true).open(&file).unwrap();
        f.write_all(b"d").unwrap();
        drop(f);
        assert_ne!(file_digest(root.path(), &file).unwrap(), abc);
    }

    #[test]
    fn only_unfinished_snapshots_nobody_makes_are_removed() {
        let root = tempfile::tempdir().unwrap();
        for name in ["tmp-abandoned", "tmp-being-made", "tmp-just-created", "warm-aaaa"] {
            std::fs::create_dir(root.path().join(name)).unwrap();
        }
        drop(lock(&root.path().join("tmp-abandoned").join(MAKER_LOCK), false).unwrap());
        let _maker = lock(&root.path().join("tmp-being-made").join(MAKER_LOCK), false).unwrap();
        remove_abandoned(root.path());
        let mut left: Vec<String> =
            std::fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(left, ["tmp-being-made", "tmp-just-created", "warm-aaaa"]);
    }

    #[test]
    fn the_least_recently_used_snapshots_beyond_the_limit_are_removed() {
        let root = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        for (name, minutes_ago) in [("warm-a", 3), ("warm-b", 1), ("warm-c", 4), ("warm-d", 2), ("tmp-x", 9)] {
            let dir = root.path().join(name);
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join("vm.state"), b"s").unwrap();
            let used = now - Duration::from_secs(60 * minutes_ago);
            File::open(&dir).unwrap().set_modified(used).unwrap();
        }
        std::fs::write(root.path().join("warm-a.lock"), b"").unwrap();
        // warm-c, the oldest, is being made again by another process: kept.
        let _maker = lock(&root.path().join("warm-c.lock"), false).unwrap();
        touch(&root.path().join("warm-a"));
        remove_least_recently_used(root.path(), 2);
        let mut left: Vec<String> =
            std::fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(left, ["tmp-x", "warm-a", "warm-a.lock", "warm-b", "warm-c", "warm-c.lock", "warm-d.lock"]);
    }

    #[test]
    fn the_key_changes_with_every_setting() {
        let root = tempfile::tempdir().unwrap();
        let (kernel, disk) = (root.path().join("vmlinux"), root.path().join("disk"));
        std::fs::write(&kernel, b"k").unwrap();
        std::fs::write(&disk, b"d").unwrap();
        let disks = [disk.clone()];
        let base =
            WarmSettings { kernel: &kernel, disks: &disks, memory_mib: 256, vcpus: 1, disk_mib: None, cmdline: "x" };
        let k = key(root.path(), &base).unwrap();
        assert_eq!(k, key(root.path(), &base.clone()).unwrap());
        let others = [
            WarmSettings { memory_mib: 512, ..base.clone() },
            WarmSettings { vcpus: 2, ..base.clone() },
            WarmSettings { disk_mib: Some(64), ..base.clone() },
            WarmSettings { cmdline: "y", ..base.clone() },
            WarmSettings { disks: &[], ..base.clone() },
        ];
        for other in others {
            assert_ne!(key(root.path(), &other).unwrap(), k, "{other:?}");
        }
        let mut f = OpenOptions::new().append(true).open(&disk).unwrap();
        f.write_all(b"changed").unwrap();
        drop(f);
        assert_ne!(key(root.path(), &base).unwrap(), k, "a changed disk");
    }
}
