//! Guest root images: `default`, a path to a filesystem image file, or an
//! OCI image (a registry reference, `oci:<dir>[:tag]`, `docker-archive:<file>`).
//!
//! An OCI image is pulled into the image cache (`$SANDBOX_CACHE/oci`) on
//! first use and converted to a read-only erofs file. The guest then boots
//! from the default image (which holds the sandbox's init and proxies) and
//! overlays the OCI image, attached as a second read-only disk (`/dev/vdb`),
//! as its root: nothing is added to the cached image.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::{paths, Error};

/// A guest root image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Image {
    /// The built-in image (busybox and the sandbox's own guest programs).
    Default,
    /// An erofs or ext4 image file.
    File(PathBuf),
    /// An OCI image reference (`python:3.12-slim`, `oci:<dir>[:tag]`,
    /// `docker-archive:<file>`), pulled and converted on first use.
    Oci(String),
    /// A container's root file system as an erofs image file (`rootfs:<file>`),
    /// with no image config: overlaid as the guest's root as an OCI image is,
    /// over the default image that holds the sandbox's own programs. The
    /// containerd shim boots its containers' bundles this way.
    Rootfs(PathBuf),
}

/// What a sandbox boots: its root disk and, for OCI images, the image disk
/// overlaid as the root and the image's run settings.
#[derive(Debug, Clone)]
pub(crate) struct BootImage {
    pub root_disk: PathBuf,
    pub rootfs: RootFs,
    pub image_disk: Option<PathBuf>,
    pub config: Option<rootfs::ImageConfig>,
}

/// The cache of converted OCI images (`$SANDBOX_CACHE/oci`).
pub fn image_store() -> rootfs::Store {
    rootfs::Store::new(paths::cache_dir().join("oci"))
}

/// Filesystems the guest kernel can mount as its root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootFs {
    Erofs,
    Ext4,
}

impl RootFs {
    /// The `rootfstype=` name.
    pub fn kernel_name(self) -> &'static str {
        match self {
            RootFs::Erofs => "erofs",
            RootFs::Ext4 => "ext4",
        }
    }
}

impl std::fmt::Display for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Image::Default => f.write_str("default"),
            Image::File(p) => write!(f, "{}", p.display()),
            Image::Oci(name) => f.write_str(name),
            Image::Rootfs(p) => write!(f, "rootfs:{}", p.display()),
        }
    }
}

impl Image {
    /// `default`; a file path (an existing file, or a name starting with `/`
    /// or `.`); else an OCI image reference.
    pub fn parse(name: &str) -> Image {
        if name == "default" {
            Image::Default
        } else if let Some(path) = name.strip_prefix("rootfs:") {
            Image::Rootfs(PathBuf::from(path))
        } else if name.starts_with("oci:") || name.starts_with("docker-archive:") {
            Image::Oci(name.to_string())
        } else if name.starts_with('/') || name.starts_with('.') || Path::new(name).is_file() {
            Image::File(PathBuf::from(name))
        } else {
            Image::Oci(name.to_string())
        }
    }

    /// The image file and its filesystem, checked (an OCI image is pulled
    /// if it is not cached).
    pub fn resolve(&self) -> Result<(PathBuf, RootFs), Error> {
        let path = match self {
            Image::Default => paths::default_image()?,
            Image::File(p) | Image::Rootfs(p) => p.clone(),
            Image::Oci(name) => Self::pull(name)?.1,
        };
        let fs = detect(&path)?;
        Ok((path, fs))
    }

    fn pull(name: &str) -> Result<(rootfs::ImageRecord, PathBuf), Error> {
        let source = rootfs::ImageSource::parse(name)?;
        Ok(image_store().ensure(&source, &rootfs::PullOptions::default())?)
    }

    /// The disks to boot and, for OCI images, the image's run settings.
    pub(crate) fn boot(&self) -> Result<BootImage, Error> {
        match self {
            Image::Oci(name) => {
                let (record, image) = Self::pull(name)?;
                let root_disk = paths::default_image()?;
                let rootfs = detect(&root_disk)?;
                Ok(BootImage { root_disk, rootfs, image_disk: Some(image), config: Some(record.config) })
            }
            Image::Rootfs(path) => {
                if detect(path)? != RootFs::Erofs {
                    return Err(Error::BadImage {
                        path: path.clone(),
                        reason: "a container root file system must be an erofs image".into(),
                    });
                }
                let root_disk = paths::default_image()?;
                let rootfs = detect(&root_disk)?;
                Ok(BootImage { root_disk, rootfs, image_disk: Some(path.clone()), config: None })
            }
            _ => {
                let (root_disk, rootfs) = self.resolve()?;
                Ok(BootImage { root_disk, rootfs, image_disk: None, config: None })
            }
        }
    }
}

/// Both superblocks sit 1024 bytes in: erofs's magic first, ext4's at +56.
fn detect(path: &Path) -> Result<RootFs, Error> {
    let bad = |reason: &str| Error::BadImage { path: path.to_path_buf(), reason: reason.to_string() };
    let mut f = std::fs::File::open(path).map_err(|e| bad(&e.to_string()))?;
    if !f.metadata().map_err(|e| bad(&e.to_string()))?.is_file() {
        return Err(bad("not a regular file"));
    }
    let mut head = [0u8; 1024 + 64];
    f.read_exact(&mut head).map_err(|_| bad("too small to hold a filesystem"))?;
    let erofs = u32::from_le_bytes([head[1024], head[1025], head[1026], head[1027]]);
    let ext4 = u16::from_le_bytes([head[1024 + 56], head[1024 + 57]]);
    if erofs == 0xE0F5_E1E2 {
        Ok(RootFs::Erofs)
    } else if ext4 == 0xEF53 {
        Ok(RootFs::Ext4)
    } else {
        Err(bad("not an erofs or ext4 filesystem image"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image_with(bytes_at_1024: &[u8], offset: usize) -> tempfile::NamedTempFile {
        let mut data = vec![0u8; 4096];
        data[1024 + offset..1024 + offset + bytes_at_1024.len()].copy_from_slice(bytes_at_1024);
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), data).unwrap();
        f
    }

    #[test]
    fn recognises_erofs_and_ext4() {
        let erofs = image_with(&0xE0F5_E1E2u32.to_le_bytes(), 0);
        assert_eq!(detect(erofs.path()).unwrap(), RootFs::Erofs);
        let ext4 = image_with(&0xEF53u16.to_le_bytes(), 56);
        assert_eq!(detect(ext4.path()).unwrap(), RootFs::Ext4);
    }

    #[test]
    fn rejects_what_is_not_an_image() {
        let zeros = image_with(&[], 0);
        let err = detect(zeros.path()).unwrap_err().to_string();
        assert!(err.contains("not an erofs or ext4"), "{err}");
        let tiny = tempfile::NamedTempFile::new().unwrap();
        let err = detect(tiny.path()).unwrap_err().to_string();
        assert!(err.contains("too small"), "{err}");
        let err = detect(Path::new("/nonexistent/image")).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/image"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        assert!(detect(dir.path()).is_err());
    }

    #[test]
    fn default_is_a_name_and_anything_else_a_path() {
        assert_eq!(Image::parse("default"), Image::Default);
        assert_eq!(Image::parse("./default"), Image::File("./default".into()));
        assert_eq!(Image::parse("/no/such.erofs"), Image::File("/no/such.erofs".into()));
        assert_eq!(Image::parse("python:3.12-slim"), Image::Oci("python:3.12-slim".into()));
        assert_eq!(Image::parse("oci:./layout:v1"), Image::Oci("oci:./layout:v1".into()));
        assert_eq!(Image::parse("docker-archive:a.tar"), Image::Oci("docker-archive:a.tar".into()));
        let rootfs = Image::parse("rootfs:/var/lib/x.erofs");
        assert_eq!(rootfs, Image::Rootfs("/var/lib/x.erofs".into()));
        assert_eq!(Image::parse(&rootfs.to_string()), rootfs);
    }
}
