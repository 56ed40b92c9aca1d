//! Shared helpers: images the tests build, and a look inside erofs images.

#![allow(clippy::unwrap_used, dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use rootfs::fixtures::{ImageBuilder, LayerBuilder};

/// Mounts an erofs image read-only (loop) for the guard's lifetime.
pub struct Mounted {
    pub dir: tempfile::TempDir,
}

impl Mounted {
    pub fn new(image: &Path) -> Mounted {
        let dir = tempfile::tempdir().unwrap();
        let out =
            Command::new("mount").args(["-t", "erofs", "-o", "loop,ro"]).arg(image).arg(dir.path()).output().unwrap();
        assert!(out.status.success(), "mount {}: {}", image.display(), String::from_utf8_lossy(&out.stderr));
        Mounted { dir }
    }
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Two layers exercising every rule of the conversion.
pub fn layered_image() -> ImageBuilder {
    let base = LayerBuilder::new()
        .dir("bin", 0o755, 0, 0)
        .file("bin/tool", b"#!/bin/sh\necho tool\n", 0o4755, 0, 0)
        .dir("etc", 0o755, 0, 0)
        .file("etc/keep", b"keep", 0o644, 0, 0)
        .file("etc/gone", b"gone", 0o644, 0, 0)
        .dir("opq", 0o755, 0, 0)
        .file("opq/old", b"old", 0o644, 0, 0)
        .dir("opq/sub", 0o755, 0, 0)
        .file("opq/sub/old2", b"old2", 0o644, 0, 0)
        .dir("home/user", 0o750, 1000, 1000)
        .file("home/user/f", b"mine", 0o600, 1000, 1000)
        .dir("dev", 0o755, 0, 0)
        .char_device("dev/null2", 1, 3)
        .dir("usr/lib", 0o755, 0, 0)
        .symlink("lib", "usr/lib")
        .file("usr/lib/libx", b"x", 0o644, 0, 0)
        .file_with_xattrs("etc/attrs", b"a", &[("user.test", b"value"), ("trusted.t", b"t")])
        .finish();
    let top = LayerBuilder::new()
        .whiteout("etc/gone")
        .file("opq/new", b"new", 0o644, 0, 0)
        .opaque("opq")
        .file("lib/liby", b"y", 0o644, 0, 0)
        .hardlink("bin/tool2", "bin/tool")
        .file("etc/keep", b"kept and changed", 0o644, 0, 0)
        .finish();
    ImageBuilder::new()
        .layer(base)
        .layer_uncompressed(top)
        .env("PATH=/bin")
        .env("GREETING=hello")
        .working_dir("/home/user")
        .cmd(&["/bin/tool"])
}

/// Checks the tree `layered_image` must produce.
pub fn check_layered(m: &Mounted) {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    assert!(!m.path("etc/gone").exists(), "whiteout not applied");
    assert_eq!(std::fs::read(m.path("etc/keep")).unwrap(), b"kept and changed");
    assert!(!m.path("opq/old").exists() && !m.path("opq/sub").exists(), "opaque dir kept lower entries");
    assert_eq!(std::fs::read(m.path("opq/new")).unwrap(), b"new");
    let tool = std::fs::metadata(m.path("bin/tool")).unwrap();
    assert_eq!(tool.mode() & 0o7777, 0o4755, "setuid bit lost");
    let tool2 = std::fs::metadata(m.path("bin/tool2")).unwrap();
    assert_eq!(tool.ino(), tool2.ino(), "hard link became a copy");
    assert_eq!(tool.nlink(), 2);
    let f = std::fs::metadata(m.path("home/user/f")).unwrap();
    assert_eq!((f.uid(), f.gid(), f.mode() & 0o777), (1000, 1000, 0o600));
    let home = std::fs::metadata(m.path("home/user")).unwrap();
    assert_eq!((home.uid(), home.mode() & 0o777), (1000, 0o750));
    let dev = std::fs::symlink_metadata(m.path("dev/null2")).unwrap();
    assert!(dev.file_type().is_char_device());
    assert_eq!(dev.rdev(), nix_makedev(1, 3));
    assert_eq!(std::fs::read_link(m.path("lib")).unwrap(), Path::new("usr/lib"));
    assert_eq!(std::fs::read(m.path("usr/lib/liby")).unwrap(), b"y", "write through an inside symlink");
    assert_eq!(xattr::get(m.path("etc/attrs"), "user.test").unwrap().as_deref(), Some(&b"value"[..]), "xattr lost");
    assert_eq!(xattr::get(m.path("etc/attrs"), "trusted.t").unwrap().as_deref(), Some(&b"t"[..]), "xattr lost");
}

fn nix_makedev(major: u64, minor: u64) -> u64 {
    ((major & 0xfff) << 8) | (minor & 0xff) | ((minor & !0xff) << 12) | ((major & !0xfff) << 32)
}
