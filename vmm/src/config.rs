//! What a VM is made of, and the checks that run before anything is created.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::arch::mptable;
use crate::devices::virtio::block::disk::DiskImage;
use crate::devices::virtio::vsock::VsockConfig;
use crate::error::{Error, Result};

/// Smallest guest memory: enough for the kernel to boot a small user space.
pub const MIN_MEMORY_MIB: u32 = 32;
/// Largest guest memory.
pub const MAX_MEMORY_MIB: u32 = 64 * 1024;
/// Most vCPUs: as many as the MP table has room for.
pub const MAX_VCPUS: u8 = mptable::max_vcpus();

/// A VM to create.
pub struct VmConfig {
    /// Uncompressed kernel ELF (`vmlinux`) with a PVH entry point.
    pub kernel: PathBuf,
    /// Kernel command line (for example [`crate::cmdline::base_args`] plus
    /// root and init arguments). The VMM appends the virtio-mmio device arguments.
    pub cmdline: String,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Root disk image, attached read-only as the first virtio-blk device (`/dev/vda`).
    pub root_disk: PathBuf,
    /// More disks after the root, in order (`/dev/vdb`, `/dev/vdc`, ...): for
    /// example a read-only image to overlay, or a writable scratch disk.
    pub extra_disks: Vec<ExtraDisk>,
    /// Optional virtio-vsock device (the guest's CID and its host Unix socket).
    pub vsock: Option<VsockConfig>,
    /// Where the guest's serial console output goes. Writes should not block
    /// for long: a vCPU waits for each byte.
    pub serial: Box<dyn Write + Send>,
    /// seccomp filters the VMM's threads install on themselves (none: no filter).
    pub seccomp: ThreadFilters,
}

/// seccomp filters for the VMM's own threads. Each thread installs its
/// filter on itself before it does anything for the guest: a vCPU thread
/// before its first `KVM_RUN`, the event loop after it has started the vCPU
/// threads (which must not inherit it) and before it handles a device event.
#[derive(Debug, Clone, Default)]
pub struct ThreadFilters {
    /// For each vCPU thread.
    pub vcpu: Option<seccompiler::BpfProgram>,
    /// For the thread running [`crate::Vm::run`] (the device event loop).
    pub event_loop: Option<seccompiler::BpfProgram>,
}

impl std::fmt::Debug for VmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmConfig")
            .field("kernel", &self.kernel)
            .field("cmdline", &self.cmdline)
            .field("memory_mib", &self.memory_mib)
            .field("vcpus", &self.vcpus)
            .field("root_disk", &self.root_disk)
            .field("extra_disks", &self.extra_disks)
            .field("vsock", &self.vsock)
            .finish_non_exhaustive()
    }
}

/// A virtio-blk disk besides the root disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraDisk {
    /// The image file.
    pub path: PathBuf,
    /// Attach it read-only (the guest's writes fail; the file is opened read-only).
    pub read_only: bool,
}

impl ExtraDisk {
    /// A disk the guest can only read.
    pub fn read_only(path: impl Into<PathBuf>) -> ExtraDisk {
        ExtraDisk { path: path.into(), read_only: true }
    }
    /// A disk the guest can write (a scratch disk).
    pub fn writable(path: impl Into<PathBuf>) -> ExtraDisk {
        ExtraDisk { path: path.into(), read_only: false }
    }
}

/// The files of a validated configuration, opened.
#[derive(Debug)]
pub(crate) struct OpenedFiles {
    pub kernel: File,
    pub root: DiskImage,
    pub extra: Vec<DiskImage>,
}

/// Host physical memory in MiB, if the system reports it.
fn host_memory_mib() -> Option<u64> {
    // SAFETY: sysconf only reads system configuration values.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let pages = u64::try_from(pages).ok()?;
    let page_size = u64::try_from(page_size).ok()?;
    Some(pages.checked_mul(page_size)? >> 20)
}

fn file_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::File { what, path: path.to_path_buf(), source }
}

fn open_regular(what: &'static str, path: &Path, open: impl FnOnce(&Path) -> std::io::Result<File>) -> Result<File> {
    let metadata = std::fs::metadata(path).map_err(file_error(what, path))?;
    if !metadata.is_file() {
        return Err(Error::File {
            what,
            path: path.to_path_buf(),
            source: std::io::Error::other("not a regular file"),
        });
    }
    open(path).map_err(file_error(what, path))
}

fn open_disk(what: &'static str, path: &Path, read_only: bool) -> Result<DiskImage> {
    let file = open_regular(what, path, |p| std::fs::OpenOptions::new().read(true).write(!read_only).open(p))?;
    let disk = DiskImage::from_file(file, read_only).map_err(file_error(what, path))?;
    if disk.sectors() == 0 {
        return Err(Error::EmptyDisk { what, path: path.to_path_buf() });
    }
    Ok(disk)
}

impl VmConfig {
    /// Checks the numbers against the supported ranges.
    pub fn validate_sizes(&self) -> Result<()> {
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(Error::MemorySize { got: self.memory_mib, min: MIN_MEMORY_MIB, max: MAX_MEMORY_MIB });
        }
        if let Some(host) = host_memory_mib() {
            if u64::from(self.memory_mib) > host {
                return Err(Error::MemoryExceedsHost { got: self.memory_mib, host });
            }
        }
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(Error::VcpuCount { got: self.vcpus, max: MAX_VCPUS });
        }
        Ok(())
    }

    /// Opens the kernel and disk images, failing with the file's role and path.
    pub(crate) fn open_files(&self) -> Result<OpenedFiles> {
        let kernel = open_regular("kernel", &self.kernel, |p| File::open(p))?;
        let (root, extra) = self.open_disks()?;
        Ok(OpenedFiles { kernel, root, extra })
    }

    /// Opens the disk images (the root disk, then the others in order).
    pub(crate) fn open_disks(&self) -> Result<(DiskImage, Vec<DiskImage>)> {
        let root = open_disk("root disk image", &self.root_disk, true)?;
        let extra = self
            .extra_disks
            .iter()
            .map(|d| {
                let what = if d.read_only { "read-only disk image" } else { "scratch disk image" };
                open_disk(what, &d.path, d.read_only)
            })
            .collect::<Result<_>>()?;
        Ok((root, extra))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> VmConfig {
        let kernel = dir.join("vmlinux");
        let root = dir.join("root.img");
        std::fs::write(&kernel, b"\x7fELF").unwrap();
        std::fs::File::create(&root).unwrap().write_all(&[0; 4096]).unwrap();
        VmConfig {
            kernel,
            cmdline: String::new(),
            memory_mib: 128,
            vcpus: 1,
            root_disk: root,
            extra_disks: Vec::new(),
            vsock: None,
            serial: Box::new(std::io::sink()),
            seccomp: Default::default(),
        }
    }

    #[test]
    fn sizes_are_checked_against_their_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path());
        c.validate_sizes().unwrap();
        c.memory_mib = MIN_MEMORY_MIB - 1;
        assert!(matches!(c.validate_sizes(), Err(Error::MemorySize { got: 31, .. })));
        c.memory_mib = MAX_MEMORY_MIB + 1;
        assert!(matches!(c.validate_sizes(), Err(Error::MemorySize { .. })));
        c.memory_mib = 128;
        c.vcpus = 0;
        assert!(matches!(c.validate_sizes(), Err(Error::VcpuCount { got: 0, .. })));
        c.vcpus = MAX_VCPUS + 1;
        assert!(matches!(c.validate_sizes(), Err(Error::VcpuCount { .. })));
        c.vcpus = MAX_VCPUS;
        c.validate_sizes().unwrap();
    }

    #[test]
    fn memory_beyond_the_host_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path());
        let host = host_memory_mib().unwrap();
        if host < u64::from(MAX_MEMORY_MIB) {
            c.memory_mib = u32::try_from(host + 1).unwrap();
            let err = c.validate_sizes().unwrap_err();
            assert!(matches!(err, Error::MemoryExceedsHost { .. }), "{err}");
        }
    }

    #[test]
    fn files_are_opened_with_their_roles() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path());
        let opened = c.open_files().unwrap();
        assert!(opened.root.read_only());
        assert_eq!(opened.root.sectors(), 8);
        assert!(opened.extra.is_empty());

        let scratch = dir.path().join("scratch.img");
        std::fs::write(&scratch, [0u8; 1024]).unwrap();
        c.extra_disks = vec![ExtraDisk::read_only(&c.root_disk), ExtraDisk::writable(scratch)];
        let opened = c.open_files().unwrap();
        assert!(opened.extra[0].read_only());
        assert!(!opened.extra[1].read_only());
    }

    #[test]
    fn missing_and_unusable_files_name_their_role_and_path() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path());
        c.kernel = dir.path().join("no-such-kernel");
        let err = c.open_files().unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("kernel ") && text.contains("no-such-kernel"), "{text}");

        let mut c = config(dir.path());
        c.root_disk = dir.path().to_path_buf();
        let text = c.open_files().unwrap_err().to_string();
        assert!(text.contains("root disk image") && text.contains("not a regular file"), "{text}");

        let mut c = config(dir.path());
        let empty = dir.path().join("empty.img");
        std::fs::write(&empty, [0u8; 100]).unwrap();
        c.root_disk = empty;
        assert!(matches!(c.open_files().unwrap_err(), Error::EmptyDisk { .. }));

        let mut c = config(dir.path());
        c.extra_disks = vec![ExtraDisk::writable(dir.path().join("missing-scratch.img"))];
        let text = c.open_files().unwrap_err().to_string();
        assert!(text.starts_with("scratch disk image "), "{text}");
    }
}
