//! The guest's filesystems.
//!
//! The kernel mounts the read-only boot image (`/dev/vda`) as `/`. Init mounts
//! a tmpfs on `/run`, builds an overlay there (an image below, the tmpfs above)
//! and moves it over `/`, as switch_root does: the guest can write anywhere,
//! its writes live in guest RAM, and the image stays untouched and shareable.
//!
//! The image below is the boot image itself, or, when the kernel command
//! line says `sandbox.image=/dev/vdX`, a second read-only erofs disk (an OCI
//! image). Then the sandbox's own guest programs (the proxies) come from the
//! boot image, bind-mounted read-only at [`OWN_PROGRAMS`] in the new root:
//! nothing of the image is run by init.

use std::io;

use nix::mount::{mount, MsFlags};

const OVERLAY_BASE: &str = "/run";
const NEW_ROOT: &str = "/run/root";
const IMAGE_MOUNT: &str = "/run/image";
/// Where the boot image's own programs appear in an OCI image's root.
pub(crate) const OWN_PROGRAMS: &str = "/.sandbox";
/// Where they are in the boot image.
pub(crate) const BOOT_PROGRAMS: &str = "/usr/libexec/sandbox";

/// The `sandbox.image=` device of the kernel command line, if any.
pub(crate) fn image_device(cmdline: &str) -> Result<Option<&str>, String> {
    let Some(dev) = cmdline.split_ascii_whitespace().find_map(|arg| arg.strip_prefix("sandbox.image=")) else {
        return Ok(None);
    };
    let ok =
        dev.strip_prefix("/dev/vd").is_some_and(|rest| rest.len() == 1 && rest.bytes().all(|b| b.is_ascii_lowercase()));
    if ok {
        Ok(Some(dev))
    } else {
        Err(format!("sandbox.image={dev}: expected a virtio disk such as /dev/vdb"))
    }
}

fn err(what: &str, e: nix::Error) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

pub(crate) fn mount_proc(target: &str) -> io::Result<()> {
    mount(Some("proc"), target, Some("proc"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC, None::<&str>)
        .map_err(|e| err("mount proc", e))
}

/// The `sandbox.disk=` size of the writable layer in MiB, if the kernel
/// command line gives one (else the tmpfs default: half the guest's RAM).
pub(crate) fn disk_mib(cmdline: &str) -> Result<Option<u32>, String> {
    let Some(size) = cmdline.split_ascii_whitespace().find_map(|arg| arg.strip_prefix("sandbox.disk=")) else {
        return Ok(None);
    };
    match size.parse::<u32>() {
        Ok(mib) if mib > 0 => Ok(Some(mib)),
        _ => Err(format!("sandbox.disk={size}: expected a size in MiB")),
    }
}

/// Overlay the read-only root (or the read-only `image` disk) with a tmpfs
/// of `disk_mib` (or the default size) and make the overlay `/`.
pub(crate) fn overlay_root(image: Option<&str>, disk_mib: Option<u32>) -> io::Result<()> {
    let options = match disk_mib {
        Some(mib) => format!("mode=0755,size={mib}m"),
        None => "mode=0755".to_string(),
    };
    mount(Some("tmpfs"), OVERLAY_BASE, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some(options.as_str()))
        .map_err(|e| err("mount tmpfs on /run", e))?;
    for dir in ["/run/upper", "/run/work", NEW_ROOT] {
        std::fs::create_dir(dir)?;
    }
    let lower = match image {
        Some(dev) => {
            // The boot image's /dev holds only the console: find the disk in
            // a devtmpfs of its own, for as long as the mount takes.
            std::fs::create_dir(IMAGE_MOUNT)?;
            std::fs::create_dir("/run/dev")?;
            mount(Some("devtmpfs"), "/run/dev", Some("devtmpfs"), MsFlags::MS_NOSUID, None::<&str>)
                .map_err(|e| err("mount devtmpfs on /run/dev", e))?;
            let node = dev.replacen("/dev/", "/run/dev/", 1);
            let mounted = mount(Some(node.as_str()), IMAGE_MOUNT, Some("erofs"), MsFlags::MS_RDONLY, None::<&str>);
            let _ = nix::mount::umount2("/run/dev", nix::mount::MntFlags::MNT_DETACH);
            mounted.map_err(|e| err(&format!("mount the image {dev}"), e))?;
            IMAGE_MOUNT
        }
        None => "/",
    };
    mount(
        Some("overlay"),
        NEW_ROOT,
        Some("overlay"),
        MsFlags::empty(),
        Some(format!("lowerdir={lower},upperdir=/run/upper,workdir=/run/work").as_str()),
    )
    .map_err(|e| err("mount the overlay", e))?;
    if image.is_some() {
        bind_own_programs()?;
    }
    // The early /proc (used to read the command line) belongs to the old root.
    let _ = nix::mount::umount2("/proc", nix::mount::MntFlags::MNT_DETACH);
    std::env::set_current_dir(NEW_ROOT)?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(|e| err("move the overlay to /", e))?;
    nix::unistd::chroot(".").map_err(|e| err("chroot", e))?;
    std::env::set_current_dir("/")?;
    Ok(())
}

/// The boot image's programs, read-only at [`OWN_PROGRAMS`] in the new root.
/// Whatever the image has at that path is replaced (a symlink there must not
/// redirect the mount).
fn bind_own_programs() -> io::Result<()> {
    let target = format!("{NEW_ROOT}{OWN_PROGRAMS}");
    match std::fs::symlink_metadata(&target) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            std::fs::remove_file(&target)?;
            std::fs::create_dir(&target)?;
        }
        Err(_) => std::fs::create_dir(&target)?,
    }
    mount(Some(BOOT_PROGRAMS), target.as_str(), None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(|e| err("bind the sandbox programs", e))?;
    mount(
        None::<&str>,
        target.as_str(),
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(|e| err("make the sandbox programs read-only", e))
}

/// /proc, /sys, /dev (devtmpfs, devpts), /tmp and /run in the new root
/// (their directories are created if the image lacks them).
pub(crate) fn pseudo_filesystems() -> io::Result<()> {
    for dir in ["/proc", "/sys", "/dev", "/tmp", "/run", "/etc"] {
        if std::fs::symlink_metadata(dir).is_err() {
            std::fs::create_dir(dir)?;
        }
    }
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount_proc("/proc")?;
    mount(Some("sysfs"), "/sys", Some("sysfs"), nosuid | MsFlags::MS_NOEXEC, None::<&str>)
        .map_err(|e| err("mount sysfs", e))?;
    mount(Some("devtmpfs"), "/dev", Some("devtmpfs"), MsFlags::MS_NOSUID, Some("mode=0755"))
        .map_err(|e| err("mount devtmpfs", e))?;
    std::fs::create_dir_all("/dev/pts")?;
    mount(
        Some("devpts"),
        "/dev/pts",
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0620,ptmxmode=0666"),
    )
    .map_err(|e| err("mount devpts", e))?;
    mount(Some("tmpfs"), "/tmp", Some("tmpfs"), nosuid, Some("mode=1777")).map_err(|e| err("mount /tmp", e))?;
    mount(Some("tmpfs"), "/run", Some("tmpfs"), nosuid, Some("mode=0755")).map_err(|e| err("mount /run", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_device_from_the_command_line() {
        assert_eq!(image_device("quiet root=/dev/vda"), Ok(None));
        assert_eq!(image_device("quiet sandbox.image=/dev/vdb init=/x"), Ok(Some("/dev/vdb")));
        assert_eq!(disk_mib("quiet sandbox.disk=512 init=/x"), Ok(Some(512)));
        assert_eq!(disk_mib("quiet init=/x"), Ok(None));
        assert!(disk_mib("sandbox.disk=0").is_err());
        assert!(disk_mib("sandbox.disk=1g").is_err());
        for bad in ["sandbox.image=/etc/passwd", "sandbox.image=/dev/vdb1", "sandbox.image="] {
            assert!(image_device(bad).is_err(), "{bad}");
        }
    }
}
