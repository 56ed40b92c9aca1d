//! Parsing and serving virtio-blk requests.
//!
//! A request is a descriptor chain: a device-readable 16-byte header (type,
//! reserved, sector), zero or more data buffers (device-writable for reads,
//! device-readable for writes), and a device-writable status byte in the last
//! descriptor. Everything in the chain comes from the guest and is checked
//! before any data moves: the chain must end (no loops, no index past the
//! queue), the header and status must have the right direction and size,
//! every buffer must lie in guest memory with the direction the request type
//! needs, and the accessed sectors must lie within the disk. A request that
//! fails a check is answered with `VIRTIO_BLK_S_IOERR` (or `_UNSUPP` for an
//! unknown type) if the chain has a usable status byte, and is returned to the
//! driver unanswered otherwise. Nothing here panics on guest input.

use std::ops::Deref;

use tracing::{debug, warn};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::disk::{DiskImage, SECTOR_SIZE};
use crate::devices::virtio::queue::{Chain, ChainHandler};

/// Size of `struct virtio_blk_outhdr`.
pub const HEADER_SIZE: u32 = 16;

/// What the driver asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// Read sectors into the data buffers.
    In,
    /// Write the data buffers to sectors.
    Out,
    /// Make previous writes durable.
    Flush,
}

/// Why a request is refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The chain does not end: it loops, names a descriptor past the queue, or
    /// a descriptor cannot be read.
    #[error("descriptor chain is broken (loop, index out of range, or unreadable descriptor)")]
    BrokenChain,
    /// The last descriptor is not a device-writable buffer of at least one byte in guest memory.
    #[error("the chain does not end in a writable status byte in guest memory")]
    NoStatus,
    /// The chain has a status byte but no header.
    #[error("the chain has no header")]
    NoHeader,
    /// The header is device-writable.
    #[error("the header descriptor is device-writable")]
    HeaderWritable,
    /// The header descriptor is shorter than 16 bytes.
    #[error("the header is {0} bytes, shorter than 16")]
    ShortHeader(u32),
    /// A descriptor lies (partly) outside guest memory.
    #[error("buffer {addr:#x}+{len:#x} is not in guest memory")]
    OutOfGuestMemory {
        /// Guest address of the buffer.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// A data buffer has the wrong direction for the request.
    #[error("data buffer {index} is device-{} but the request needs the opposite", if *.writable { "writable" } else { "readable" })]
    WrongDirection {
        /// Position of the buffer among the data buffers.
        index: usize,
        /// Whether it was device-writable.
        writable: bool,
    },
    /// The request touches sectors past the end of the disk.
    #[error("{len} bytes at sector {sector} go past the end of the disk ({sectors} sectors)")]
    BeyondDisk {
        /// First sector.
        sector: u64,
        /// Bytes accessed.
        len: u64,
        /// Disk size.
        sectors: u64,
    },
    /// A write to a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// A request type this device does not implement.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// The host failed to read, write or flush the image.
    #[error("disk I/O failed: {0}")]
    Io(String),
}

impl RequestError {
    /// The status byte reported to the driver.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A validated request.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// The operation.
    pub kind: RequestKind,
    /// First sector accessed.
    pub sector: u64,
    /// Data buffers in guest memory, in order.
    pub data: Vec<(GuestAddress, u32)>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

impl Request {
    /// Total bytes in the data buffers.
    pub fn data_len(&self) -> u64 {
        self.data.iter().map(|&(_, len)| u64::from(len)).sum()
    }
}

/// Walks the chain to its end; fails if it is cut short.
fn collect<M>(chain: DescriptorChain<M>) -> Result<Vec<Descriptor>, RequestError>
where
    M: Deref,
    M::Target: vm_memory::GuestMemory,
{
    let descriptors: Vec<Descriptor> = chain.collect();
    // The iterator stops early, without an error, on a loop (after queue-size
    // descriptors), an out-of-range index, or an unreadable descriptor; the
    // descriptor it stopped after then still has NEXT set.
    match descriptors.last() {
        Some(last) if !last.has_next() => Ok(descriptors),
        _ => Err(RequestError::BrokenChain),
    }
}

fn in_memory(mem: &GuestMemoryMmap, desc: &Descriptor) -> Result<(), RequestError> {
    let len = desc.len();
    if len == 0 || GuestMemoryBackend::check_range(mem, desc.addr(), len as usize) {
        Ok(())
    } else {
        Err(RequestError::OutOfGuestMemory { addr: desc.addr().raw_value(), len })
    }
}

/// Finds the status byte: the first byte of the last descriptor.
fn status_address(mem: &GuestMemoryMmap, descriptors: &[Descriptor]) -> Result<GuestAddress, RequestError> {
    match descriptors.last() {
        Some(last)
            if last.is_write_only() && last.len() >= 1 && GuestMemoryBackend::check_range(mem, last.addr(), 1) =>
        {
            Ok(last.addr())
        }
        _ => Err(RequestError::NoStatus),
    }
}

/// Validates the header and data buffers of a chain whose status byte is at `status`.
fn parse_body(
    mem: &GuestMemoryMmap,
    descriptors: &[Descriptor],
    status: GuestAddress,
    disk: &DiskImage,
) -> Result<Request, RequestError> {
    let Some((header, rest)) = descriptors.split_first() else {
        return Err(RequestError::NoHeader);
    };
    // The status byte is the last descriptor; the header must be another one.
    let Some((_status, data)) = rest.split_last() else {
        return Err(RequestError::NoHeader);
    };
    if header.is_write_only() {
        return Err(RequestError::HeaderWritable);
    }
    if header.len() < HEADER_SIZE {
        return Err(RequestError::ShortHeader(header.len()));
    }
    in_memory(mem, header)?;
    let read_err = |_| RequestError::OutOfGuestMemory { addr: header.addr().raw_value(), len: header.len() };
    let request_type = u32::from_le(mem.read_obj::<u32>(header.addr()).map_err(read_err)?);
    let sector_addr = header
        .addr()
        .checked_add(8)
        .ok_or(RequestError::OutOfGuestMemory { addr: header.addr().raw_value(), len: header.len() })?;
    let sector = u64::from_le(mem.read_obj::<u64>(sector_addr).map_err(read_err)?);

    let kind = match request_type {
        VIRTIO_BLK_T_IN => RequestKind::In,
        VIRTIO_BLK_T_OUT => RequestKind::Out,
        VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
        other => return Err(RequestError::Unsupported(other)),
    };

    let mut buffers = Vec::with_capacity(data.len());
    if kind != RequestKind::Flush {
        let needs_writable = kind == RequestKind::In;
        for (index, desc) in data.iter().enumerate() {
            if desc.is_write_only() != needs_writable {
                return Err(RequestError::WrongDirection { index, writable: desc.is_write_only() });
            }
            in_memory(mem, desc)?;
            buffers.push((desc.addr(), desc.len()));
        }
    }

    let request = Request { kind, sector, data: buffers, status };
    if kind != RequestKind::Flush {
        let len = request.data_len();
        let sectors = disk.sectors();
        let end = sector.checked_mul(SECTOR_SIZE).and_then(|start| start.checked_add(len));
        if end.is_none_or(|end| end > sectors * SECTOR_SIZE) {
            return Err(RequestError::BeyondDisk { sector, len, sectors });
        }
    }
    if kind == RequestKind::Out && disk.read_only() {
        return Err(RequestError::ReadOnly);
    }
    Ok(request)
}

/// Parses a chain. On failure, also returns where to report the error, if the
/// chain has a usable status byte.
pub fn parse<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    disk: &DiskImage,
) -> Result<Request, (RequestError, Option<GuestAddress>)>
where
    M: Deref,
    M::Target: vm_memory::GuestMemory,
{
    let descriptors = collect(chain).map_err(|e| (e, None))?;
    let status = status_address(mem, &descriptors).map_err(|e| (e, None))?;
    parse_body(mem, &descriptors, status, disk).map_err(|e| (e, Some(status)))
}

/// Carries out a validated request; returns the bytes written into guest data buffers.
fn execute(request: &Request, mem: &GuestMemoryMmap, disk: &mut DiskImage) -> Result<u32, RequestError> {
    let io_err = |e: std::io::Error| RequestError::Io(e.to_string());
    let mut offset = request.sector * SECTOR_SIZE;
    match request.kind {
        RequestKind::In => {
            for &(addr, len) in &request.data {
                disk.read_to_guest(offset, mem, addr, len as usize).map_err(io_err)?;
                offset += u64::from(len);
            }
            // The chain's total length fits in u32 (the descriptor iterator enforces it).
            Ok(u32::try_from(request.data_len()).unwrap_or(u32::MAX))
        }
        RequestKind::Out => {
            for &(addr, len) in &request.data {
                disk.write_from_guest(offset, mem, addr, len as usize).map_err(io_err)?;
                offset += u64::from(len);
            }
            Ok(0)
        }
        RequestKind::Flush => {
            disk.flush().map_err(io_err)?;
            Ok(0)
        }
    }
}

/// Serves one chain and returns the used length to report (bytes the device
/// wrote into the chain: data read plus the status byte; 0 if not even the
/// status could be written).
pub fn serve<M>(chain: DescriptorChain<M>, mem: &GuestMemoryMmap, disk: &mut DiskImage) -> u32
where
    M: Deref,
    M::Target: vm_memory::GuestMemory,
{
    let (status, written, status_addr) = match parse(chain, mem, disk) {
        Ok(request) => match execute(&request, mem, disk) {
            Ok(written) => (VIRTIO_BLK_S_OK as u8, written, request.status),
            Err(e) => {
                warn!("virtio-blk: {:?} at sector {}: {e}", request.kind, request.sector);
                (e.status(), 0, request.status)
            }
        },
        Err((e, Some(status_addr))) => {
            debug!("virtio-blk: request refused: {e}");
            (e.status(), 0, status_addr)
        }
        Err((e, None)) => {
            debug!("virtio-blk: request cannot be answered: {e}");
            return 0;
        }
    };
    match mem.write_obj(status, status_addr) {
        Ok(()) => written.saturating_add(1),
        Err(e) => {
            debug!("virtio-blk: cannot write the status byte: {e}");
            0
        }
    }
}

/// Requests are served by the shared queue loop
/// ([`drain_queue`](crate::devices::virtio::queue::drain_queue)).
impl ChainHandler for DiskImage {
    fn serve(&mut self, mem: &GuestMemoryMmap, chain: Chain<'_>) -> Option<u32> {
        Some(serve(chain, mem, self))
    }
}

#[cfg(test)]
mod tests;
