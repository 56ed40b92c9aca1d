//! The guest's filesystems.
//!
//! The kernel mounts the read-only image (`/dev/vda`) as `/`. Init mounts a
//! tmpfs on `/run`, builds an overlay there (the image below, the tmpfs above)
//! and moves it over `/`, as switch_root does: the guest can write anywhere,
//! its writes live in guest RAM, and the image stays untouched and shareable.

use std::io;

use nix::mount::{mount, MsFlags};

const OVERLAY_BASE: &str = "/run";
const NEW_ROOT: &str = "/run/root";

fn err(what: &str, e: nix::Error) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

pub(crate) fn mount_proc(target: &str) -> io::Result<()> {
    mount(Some("proc"), target, Some("proc"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC, None::<&str>)
        .map_err(|e| err("mount proc", e))
}

/// Overlay the read-only root with a tmpfs and make the overlay `/`.
pub(crate) fn overlay_root() -> io::Result<()> {
    mount(Some("tmpfs"), OVERLAY_BASE, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0755"))
        .map_err(|e| err("mount tmpfs on /run", e))?;
    for dir in ["/run/upper", "/run/work", NEW_ROOT] {
        std::fs::create_dir(dir)?;
    }
    mount(
        Some("overlay"),
        NEW_ROOT,
        Some("overlay"),
        MsFlags::empty(),
        Some("lowerdir=/,upperdir=/run/upper,workdir=/run/work"),
    )
    .map_err(|e| err("mount the overlay", e))?;
    // The early /proc (used to read the command line) belongs to the old root.
    let _ = nix::mount::umount2("/proc", nix::mount::MntFlags::MNT_DETACH);
    std::env::set_current_dir(NEW_ROOT)?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(|e| err("move the overlay to /", e))?;
    nix::unistd::chroot(".").map_err(|e| err("chroot", e))?;
    std::env::set_current_dir("/")?;
    Ok(())
}

/// /proc, /sys, /dev (devtmpfs, devpts), /tmp and /run in the new root.
pub(crate) fn pseudo_filesystems() -> io::Result<()> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount_proc("/proc")?;
    mount(Some("sysfs"), "/sys", Some("sysfs"), nosuid | MsFlags::MS_NOEXEC, None::<&str>)
        .map_err(|e| err("mount sysfs", e))?;
    mount(Some("devtmpfs"), "/dev", Some("devtmpfs"), MsFlags::MS_NOSUID, Some("mode=0755"))
        .map_err(|e| err("mount devtmpfs", e))?;
    std::fs::create_dir_all("/dev/pts")?;
    mount(Some("devpts"), "/dev/pts", Some("devpts"), MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, Some("mode=0620,ptmxmode=0666"))
        .map_err(|e| err("mount devpts", e))?;
    mount(Some("tmpfs"), "/tmp", Some("tmpfs"), nosuid, Some("mode=1777")).map_err(|e| err("mount /tmp", e))?;
    mount(Some("tmpfs"), "/run", Some("tmpfs"), nosuid, Some("mode=0755")).map_err(|e| err("mount /run", e))?;
    Ok(())
}
