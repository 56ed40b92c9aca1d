//! The host side of a block device: a disk image file, moved to and from
//! guest memory without intermediate copies.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Bytes per sector, the unit of virtio-blk addresses and capacity.
pub const SECTOR_SIZE: u64 = 512;

/// A disk image opened read-only or read-write.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    read_only: bool,
    sectors: u64,
}

fn memory_error(e: vm_memory::GuestMemoryError) -> io::Error {
    match e {
        vm_memory::GuestMemoryError::IOError(e) => e,
        other => io::Error::other(other),
    }
}

impl DiskImage {
    /// Serves an open image file (opened read-write unless `read_only`). Trailing bytes that do not fill a sector
    /// are not visible to the guest.
    pub fn from_file(file: File, read_only: bool) -> io::Result<Self> {
        let sectors = file.metadata()?.len() / SECTOR_SIZE;
        Ok(Self { file, read_only, sectors })
    }

    /// Size in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Whether the guest may only read.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Copies `len` bytes at byte `offset` of the image into guest memory at `addr`.
    pub fn read_to_guest(
        &mut self,
        offset: u64,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        len: usize,
    ) -> io::Result<()> {
        self.file.seek(SeekFrom::Start(offset))?;
        mem.read_exact_volatile_from(addr, &mut self.file, len).map_err(memory_error)
    }

    /// Copies `len` bytes of guest memory at `addr` to byte `offset` of the image.
    pub fn write_from_guest(
        &mut self,
        offset: u64,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        len: usize,
    ) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        self.file.seek(SeekFrom::Start(offset))?;
        mem.write_all_volatile_to(addr, &mut self.file, len).map_err(memory_error)
    }

    /// Makes completed writes durable.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn image(bytes: &[u8]) -> File {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(bytes).unwrap();
        file
    }

    #[test]
    fn capacity_counts_whole_sectors() {
        let disk = DiskImage::from_file(image(&[0; 1300]), true).unwrap();
        assert_eq!(disk.sectors(), 2);
    }

    #[test]
    fn data_moves_between_image_and_guest_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut content = vec![0u8; 1024];
        content[512..516].copy_from_slice(b"abcd");
        let mut file = image(&content);
        let mut disk = DiskImage::from_file(file.try_clone().unwrap(), false).unwrap();

        disk.read_to_guest(512, &mem, GuestAddress(0x100), 4).unwrap();
        let mut got = [0u8; 4];
        mem.read_slice(&mut got, GuestAddress(0x100)).unwrap();
        assert_eq!(&got, b"abcd");

        mem.write_slice(b"wxyz", GuestAddress(0x200)).unwrap();
        disk.write_from_guest(0, &mem, GuestAddress(0x200), 4).unwrap();
        disk.flush().unwrap();
        let mut start = [0u8; 4];
        file.seek(SeekFrom::Start(0)).unwrap();
        file.read_exact(&mut start).unwrap();
        assert_eq!(&start, b"wxyz");
    }

    #[test]
    fn read_only_images_refuse_writes_and_short_images_fail_reads() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut disk = DiskImage::from_file(image(&[7; 512]), true).unwrap();
        assert!(disk.read_only());
        assert!(disk.write_from_guest(0, &mem, GuestAddress(0), 512).is_err());
        assert!(disk.read_to_guest(256, &mem, GuestAddress(0), 512).is_err());
        assert!(disk.read_to_guest(0, &mem, GuestAddress(0xff00), 512).is_err());
        disk.flush().unwrap();
    }
}
