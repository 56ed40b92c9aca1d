//! A task's root file system as a read-only erofs image for the guest.
//!
//! containerd passes the snapshot as mounts (for the overlayfs snapshotter,
//! one `overlay` mount whose `lowerdir` layers are committed, immutable
//! snapshots and whose `upperdir` is the container's new, empty, writable
//! one). The shim mounts them on `<bundle>/rootfs`, runs `mkfs.erofs` on the
//! tree (uncompressed: decompression in the guest is emulated kernel code)
//! and unmounts them again: the guest writes to a tmpfs layer of its own,
//! never to the snapshot.
//!
//! Images are cached in `<data dir>/images/` by the snapshot's lower
//! layers when the upper layer is empty, so every container of one image
//! boots the same file (and the same warm snapshot); anything else is
//! converted for the task alone and removed with it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use containerd_shim::protos::types::mount::Mount;
use sha2::{Digest, Sha256};

use crate::Error;

/// The erofs image a task boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootImage {
    pub path: PathBuf,
    /// Shared with other tasks (kept when the task is deleted).
    pub cached: bool,
}

/// Mount `mounts` (if any) on `root`, build the image under `images_dir`
/// (or reuse the cached one), unmount. `task` names a task's own image.
pub fn prepare(root: &Path, mounts: &[Mount], images_dir: &Path, task: &str) -> Result<RootImage, Error> {
    std::fs::create_dir_all(images_dir).map_err(Error::io(format!("create {}", images_dir.display())))?;
    let key = cache_key(mounts, upper_is_empty);
    let (path, cached) = match &key {
        Some(key) => (images_dir.join(format!("{key}.erofs")), true),
        None => (images_dir.join(format!("task-{}.erofs", hex_digest(task.as_bytes()))), false),
    };
    if cached && path.is_file() {
        return Ok(RootImage { path, cached });
    }
    let mounted = !mounts.is_empty();
    if mounted {
        mount_all(root, mounts)?;
    }
    let built = build(root, &path);
    if mounted {
        unmount(root, mounts.len());
    }
    built?;
    Ok(RootImage { path, cached })
}

/// How many mounts a shim that crashed while building a task's image may
/// have left on the bundle's `rootfs` (containerd passes one or a few).
pub const LEFT_MOUNTED_AT_MOST: usize = 8;

/// Detach the `times` top mounts on `root` (fewer if there are fewer).
pub fn unmount(root: &Path, times: usize) {
    for _ in 0..times {
        if nix::mount::umount2(root, nix::mount::MntFlags::MNT_DETACH).is_err() {
            break;
        }
    }
}

fn mount_all(root: &Path, mounts: &[Mount]) -> Result<(), Error> {
    std::fs::create_dir_all(root).map_err(Error::io(format!("create {}", root.display())))?;
    for (i, m) in mounts.iter().enumerate() {
        let (flags, data) = mount_options(&m.options);
        let fs_type = Some(m.type_.as_str()).filter(|t| !t.is_empty() && *t != "bind");
        let source = Some(m.source.as_str()).filter(|s| !s.is_empty());
        let data = Some(data.as_str()).filter(|d| !d.is_empty());
        if let Err(e) = nix::mount::mount(source, root, fs_type, flags, data) {
            unmount(root, i);
            return Err(Error::InvalidArgument(format!(
                "mounting the task's root file system ({} {} on {}): {e}",
                m.type_,
                m.source,
                root.display()
            )));
        }
    }
    Ok(())
}

/// A mount's options as mount(2) takes them: the flags it knows, and the
/// rest as the file system's data. (The shim mounts itself rather than
/// through containerd-shim's helper, which forks and waits for the
/// crate's reaper; this shim leaves child processes to the library.)
fn mount_options(options: &[String]) -> (nix::mount::MsFlags, String) {
    use nix::mount::MsFlags;
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for option in options {
        match option.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" | "defaults" => {}
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            other => data.push(other),
        }
    }
    (flags, data.join(","))
}

/// Build the erofs image `out` from the tree at `root`, atomically.
fn build(root: &Path, out: &Path) -> Result<(), Error> {
    if !root.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "the task's root file system {} is not a directory: containerd passed no rootfs mounts and the bundle has none",
            root.display()
        )));
    }
    let started = Instant::now();
    let tmp = out.with_extension(format!("tmp-{}", std::process::id()));
    let output = Command::new("mkfs.erofs")
        .arg("--quiet")
        .arg(&tmp)
        .arg(root)
        .output()
        .map_err(|e| Error::Image(format!("could not start mkfs.erofs ({e}); install erofs-utils")))?;
    if !output.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::Image(format!(
            "mkfs.erofs {} failed ({}): {}",
            root.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    std::fs::rename(&tmp, out).map_err(Error::io(format!("rename {} to {}", tmp.display(), out.display())))?;
    containerd_shim::info!("built {} from {} in {:?}", out.display(), root.display(), started.elapsed());
    Ok(())
}

/// The cache key of a snapshot: one overlay mount whose upper layer
/// (if any) is still empty, keyed by its lower layers. `None`: not cached.
fn cache_key(mounts: &[Mount], upper_empty: impl Fn(&Path) -> bool) -> Option<String> {
    let [mount] = mounts else { return None };
    if mount.type_ != "overlay" {
        return None;
    }
    let option = |name: &str| mount.options.iter().find_map(|o| o.strip_prefix(name)?.strip_prefix('='));
    let lower = option("lowerdir")?;
    if option("upperdir").is_some_and(|upper| !upper_empty(Path::new(upper))) {
        return None;
    }
    Some(hex_digest(format!("overlay\0{lower}").as_bytes()))
}

fn upper_is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).map(|mut entries| entries.next().is_none()).unwrap_or(false)
}

fn hex_digest(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlay(options: &[&str]) -> Mount {
        Mount {
            type_: "overlay".into(),
            source: "overlay".into(),
            options: options.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn mount_options_split_into_flags_and_data() {
        use nix::mount::MsFlags;
        let options: Vec<String> =
            ["ro", "nosuid", "index=off", "lowerdir=/a:/b"].iter().map(|s| s.to_string()).collect();
        let (flags, data) = mount_options(&options);
        assert_eq!(flags, MsFlags::MS_RDONLY | MsFlags::MS_NOSUID);
        assert_eq!(data, "index=off,lowerdir=/a:/b");
        let (flags, data) = mount_options(&["rbind".to_string()]);
        assert_eq!(flags, MsFlags::MS_BIND | MsFlags::MS_REC);
        assert_eq!(data, "");
    }

    #[test]
    fn the_same_lower_layers_share_an_image() {
        let a = overlay(&["index=off", "workdir=/s/2/work", "upperdir=/s/2/fs", "lowerdir=/s/1/fs"]);
        let b = overlay(&["workdir=/s/3/work", "upperdir=/s/3/fs", "lowerdir=/s/1/fs"]);
        let key = cache_key(std::slice::from_ref(&a), |_| true);
        assert!(key.is_some());
        assert_eq!(key, cache_key(&[b], |_| true));
        let other = overlay(&["upperdir=/s/4/fs", "lowerdir=/s/9/fs:/s/1/fs"]);
        assert_ne!(key, cache_key(&[other], |_| true));
    }

    #[test]
    fn written_or_unknown_snapshots_are_not_cached() {
        let a = overlay(&["upperdir=/s/2/fs", "lowerdir=/s/1/fs"]);
        assert_eq!(cache_key(std::slice::from_ref(&a), |_| false), None);
        let bind = Mount { type_: "bind".into(), source: "/s/1/fs".into(), ..Default::default() };
        assert_eq!(cache_key(&[bind], |_| true), None);
        assert_eq!(cache_key(&[], |_| true), None);
        assert_eq!(cache_key(&[overlay(&["upperdir=/u"])], |_| true), None);
    }

    #[test]
    fn a_directory_becomes_an_erofs_image() {
        if Command::new("mkfs.erofs").arg("--help").output().is_err() {
            eprintln!("skipped: mkfs.erofs is not installed (apt-get install erofs-utils)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("rootfs");
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::write(root.join("bin/hello"), b"hello").unwrap();
        let images = dir.path().join("images");
        let image = prepare(&root, &[], &images, "ns/t1").unwrap();
        assert!(!image.cached);
        let bytes = std::fs::read(&image.path).unwrap();
        assert_eq!(&bytes[1024..1028], &0xE0F5_E1E2u32.to_le_bytes());
        let err = prepare(&dir.path().join("missing"), &[], &images, "ns/t2").unwrap_err().to_string();
        assert!(err.contains("not a directory"), "{err}");
    }
}
