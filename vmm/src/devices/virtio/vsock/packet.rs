//! Vsock packets in guest memory: reading them from tx descriptor chains and
//! writing them into rx descriptor chains.
//!
//! A packet is a 44-byte little-endian header (`struct virtio_vsock_hdr`)
//! followed by `len` payload bytes. The driver may split header and payload
//! over any number of descriptors (Linux puts them in one or two, more with
//! scatter-gather), so both directions treat a chain as one byte stream
//! rather than expecting a fixed descriptor layout; this is why the
//! `virtio-vsock` crate's packet type (header and data each in exactly one
//! contiguous descriptor) is not used here.
//!
//! Every chain comes from the guest and is checked before it is used: it must
//! end (no loop, no descriptor index past the table, no unreadable
//! descriptor), every descriptor must have the direction of its queue (tx:
//! device-readable, rx: device-writable) and lie in guest memory, the header
//! must be complete, and a tx payload may be at most [`MAX_PAYLOAD`] bytes and
//! must be present in full. Failures are [`PacketError`]s, never panics.

use std::ops::Deref;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestMemory, GuestMemoryBackend, GuestMemoryMmap};

/// Size of `struct virtio_vsock_hdr`.
pub const HEADER_SIZE: usize = 44;
/// Largest payload of one packet (Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PAYLOAD: u32 = 64 * 1024;

/// The address of the host (`VMADDR_CID_HOST`).
pub const HOST_CID: u64 = 2;

/// `type` of a stream socket packet; the only type this device carries.
pub const TYPE_STREAM: u16 = 1;

/// Packet operations (`VIRTIO_VSOCK_OP_*`).
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection refused or torn down.
    pub const RST: u16 = 3;
    /// The sender stops receiving and/or sending (see [`super::shutdown`]).
    pub const SHUTDOWN: u16 = 4;
    /// Stream data.
    pub const RW: u16 = 5;
    /// The sender's buffer space, unsolicited or in answer to a request.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Asks the receiver for a credit update.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// `flags` of a SHUTDOWN packet (`VIRTIO_VSOCK_SHUTDOWN_*`).
pub mod shutdown {
    /// The sender will receive no more data.
    pub const RCV: u32 = 1;
    /// The sender will send no more data.
    pub const SEND: u32 = 2;
    /// Both directions.
    pub const BOTH: u32 = RCV | SEND;
}

/// A packet header, in host byte order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Source context ID.
    pub src_cid: u64,
    /// Destination context ID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type ([`TYPE_STREAM`]).
    pub type_: u16,
    /// Operation ([`op`]).
    pub op: u16,
    /// Operation flags ([`shutdown`] for SHUTDOWN).
    pub flags: u32,
    /// The sender's receive buffer size for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, ever (wrapping).
    pub fwd_cnt: u32,
}

fn le_u64(b: &[u8; HEADER_SIZE], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

fn le_u32(b: &[u8; HEADER_SIZE], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

fn le_u16(b: &[u8; HEADER_SIZE], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

impl Header {
    /// Decodes the wire format.
    pub fn from_bytes(b: &[u8; HEADER_SIZE]) -> Self {
        Self {
            src_cid: le_u64(b, 0),
            dst_cid: le_u64(b, 8),
            src_port: le_u32(b, 16),
            dst_port: le_u32(b, 20),
            len: le_u32(b, 24),
            type_: le_u16(b, 28),
            op: le_u16(b, 30),
            flags: le_u32(b, 32),
            buf_alloc: le_u32(b, 36),
            fwd_cnt: le_u32(b, 40),
        }
    }

    /// Encodes the wire format.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Why a chain does not hold a usable packet.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// The chain does not end: it loops, names a descriptor past the table,
    /// or a descriptor cannot be read.
    #[error("descriptor chain is broken (loop, index out of range, or unreadable descriptor)")]
    BrokenChain,
    /// A descriptor has the wrong direction for its queue.
    #[error("descriptor {index} of the chain is device-{}, expected device-{}", if *.writable { "writable" } else { "readable" }, if *.writable { "readable" } else { "writable" })]
    WrongDirection {
        /// Position of the descriptor in the chain.
        index: usize,
        /// Whether it was device-writable.
        writable: bool,
    },
    /// A descriptor lies (partly) outside guest memory.
    #[error("buffer {addr:#x}+{len:#x} is not in guest memory")]
    OutOfGuestMemory {
        /// Guest address of the buffer.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// The chain holds fewer bytes than a header.
    #[error("the chain holds {0} bytes, less than a {HEADER_SIZE}-byte header")]
    ShortHeader(usize),
    /// The header announces more payload than a packet may carry.
    #[error("payload of {} bytes exceeds the {MAX_PAYLOAD}-byte maximum", .0.len)]
    Oversized(Header),
    /// The chain ends before the announced payload does.
    #[error("the header announces {} payload bytes but the chain holds {available}", header.len)]
    ShortPayload {
        /// The packet's header.
        header: Header,
        /// Payload bytes present in the chain.
        available: usize,
    },
}

impl PacketError {
    /// The header of the refused packet, when it could be read.
    pub fn header(&self) -> Option<&Header> {
        match self {
            PacketError::Oversized(header) | PacketError::ShortPayload { header, .. } => Some(header),
            _ => None,
        }
    }
}

/// Walks `chain` to its end, checking each descriptor's direction and that
/// it lies in guest memory.
fn checked_descriptors<M>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<M>,
    writable: bool,
) -> Result<Vec<Descriptor>, PacketError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let descriptors: Vec<Descriptor> = chain.collect();
    // The iterator stops early, without an error, on a loop (after
    // queue-size descriptors), an out-of-range index, an unreadable
    // descriptor or a bad indirect table; the descriptor it stopped after
    // then still has NEXT set.
    if descriptors.last().is_none_or(Descriptor::has_next) {
        return Err(PacketError::BrokenChain);
    }
    for (index, desc) in descriptors.iter().enumerate() {
        if desc.is_write_only() != writable {
            return Err(PacketError::WrongDirection { index, writable: desc.is_write_only() });
        }
        let len = desc.len();
        if len != 0 && !GuestMemoryBackend::check_range(mem, desc.addr(), len as usize) {
            return Err(PacketError::OutOfGuestMemory { addr: desc.addr().raw_value(), len });
        }
    }
    Ok(descriptors)
}

/// Copies the bytes of `descriptors`, starting `skip` bytes in, into `out`
/// until it is full; returns the bytes copied.
fn gather(mem: &GuestMemoryMmap, descriptors: &[Descriptor], mut skip: usize, out: &mut [u8]) -> usize {
    let mut filled = 0;
    for desc in descriptors {
        if filled == out.len() {
            break;
        }
        let len = desc.len() as usize;
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = (len - skip).min(out.len() - filled);
        // The range was checked in `checked_descriptors`; a failure leaves
        // the chain short, which the caller reports.
        let Some(addr) = desc.addr().checked_add(skip as u64) else {
            break;
        };
        if mem.read_slice(&mut out[filled..filled + n], addr).is_err() {
            break;
        }
        filled += n;
        skip = 0;
    }
    filled
}

/// Reads the packet in a tx chain: returns its header and leaves its payload
/// (`header.len` bytes) in `payload`. Bytes past the payload are ignored.
pub fn read_tx<M>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<M>,
    payload: &mut Vec<u8>,
) -> Result<Header, PacketError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    payload.clear();
    let descriptors = checked_descriptors(mem, chain, false)?;
    let mut raw = [0u8; HEADER_SIZE];
    let got = gather(mem, &descriptors, 0, &mut raw);
    if got < HEADER_SIZE {
        return Err(PacketError::ShortHeader(got));
    }
    let header = Header::from_bytes(&raw);
    if header.len > MAX_PAYLOAD {
        return Err(PacketError::Oversized(header));
    }
    payload.resize(header.len as usize, 0);
    let available = gather(mem, &descriptors, HEADER_SIZE, payload);
    if available < payload.len() {
        payload.clear();
        return Err(PacketError::ShortPayload { header, available });
    }
    Ok(header)
}

/// A validated rx chain: device-writable guest buffers with room for a header.
#[derive(Debug)]
pub struct RxBuffer {
    descriptors: Vec<Descriptor>,
    capacity: usize,
}

impl RxBuffer {
    /// Validates an rx chain.
    pub fn new<M>(mem: &GuestMemoryMmap, chain: DescriptorChain<M>) -> Result<Self, PacketError>
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        let descriptors = checked_descriptors(mem, chain, true)?;
        let capacity = descriptors.iter().map(|d| d.len() as usize).sum();
        if capacity < HEADER_SIZE {
            return Err(PacketError::ShortHeader(capacity));
        }
        Ok(Self { descriptors, capacity })
    }

    /// The most payload bytes this buffer can take (at most [`MAX_PAYLOAD`]).
    pub fn payload_capacity(&self) -> usize {
        (self.capacity - HEADER_SIZE).min(MAX_PAYLOAD as usize)
    }

    /// Writes a packet; `header.len` is set to the payload length. Returns
    /// the bytes written, for the used ring.
    pub fn write(&self, mem: &GuestMemoryMmap, header: &Header, payload: &[u8]) -> Result<u32, PacketError> {
        let payload = &payload[..payload.len().min(self.payload_capacity())];
        let mut header = *header;
        // Bounded by MAX_PAYLOAD just above.
        header.len = payload.len() as u32;
        let raw = header.to_bytes();
        let mut pieces = [&raw[..], payload];
        let mut written = 0usize;
        for desc in &self.descriptors {
            let mut room = desc.len() as usize;
            let mut at = desc.addr();
            while room > 0 {
                let Some(piece) = pieces.iter_mut().find(|p| !p.is_empty()) else {
                    break;
                };
                let n = room.min(piece.len());
                mem.write_slice(&piece[..n], at)
                    .map_err(|_| PacketError::OutOfGuestMemory { addr: at.raw_value(), len: n as u32 })?;
                *piece = &piece[n..];
                room -= n;
                written += n;
                at = at.unchecked_add(n as u64);
            }
        }
        // written <= HEADER_SIZE + MAX_PAYLOAD.
        Ok(written as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const MEM_SIZE: usize = 0x40_0000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    fn sample_header(len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1234,
            dst_port: 5002,
            len,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 77,
        }
    }

    /// Writes `bytes` across the given (addr, len) buffers in order.
    fn scatter(mem: &GuestMemoryMmap, bufs: &[(u64, u32)], bytes: &[u8]) {
        let mut rest = bytes;
        for &(addr, len) in bufs {
            let n = rest.len().min(len as usize);
            mem.write_slice(&rest[..n], GuestAddress(addr)).unwrap();
            rest = &rest[n..];
        }
        assert!(rest.is_empty());
    }

    fn packet_bytes(header: &Header, payload: &[u8]) -> Vec<u8> {
        let mut v = header.to_bytes().to_vec();
        v.extend_from_slice(payload);
        v
    }

    /// Builds a chain from buffers (addr, len, flags) and reads it as tx.
    fn tx(mem: &GuestMemoryMmap, bufs: &[(u64, u32, u16)]) -> (Result<Header, PacketError>, Vec<u8>) {
        let q = MockSplitQueue::new(mem, 16);
        let descs: Vec<_> = bufs.iter().map(|&(a, l, f)| desc(a, l, f, 0)).collect();
        let chain = q.build_desc_chain(&descs).unwrap();
        let mut payload = Vec::new();
        let r = read_tx(mem, chain, &mut payload);
        (r, payload)
    }

    #[test]
    fn header_round_trips_through_the_wire_format() {
        let h = sample_header(9);
        let b = h.to_bytes();
        assert_eq!(Header::from_bytes(&b), h);
        // Field offsets from struct virtio_vsock_hdr.
        assert_eq!(&b[16..20], &1234u32.to_le_bytes());
        assert_eq!(&b[30..32], &op::RW.to_le_bytes());
        assert_eq!(&b[40..44], &77u32.to_le_bytes());
    }

    #[test]
    fn header_and_payload_in_one_descriptor() {
        let m = mem();
        let payload: Vec<u8> = (0..100u8).collect();
        let bytes = packet_bytes(&sample_header(100), &payload);
        scatter(&m, &[(0x10_0000, 200)], &bytes);
        let (h, p) = tx(&m, &[(0x10_0000, 200, 0)]);
        assert_eq!(h.unwrap(), sample_header(100));
        assert_eq!(p, payload);
    }

    #[test]
    fn fragmented_chain_is_reassembled() {
        let m = mem();
        let payload: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let bytes = packet_bytes(&sample_header(3000), &payload);
        // The header itself is split 10 + 20 + 14, the payload over three
        // more descriptors of uneven sizes, scattered in memory.
        let bufs =
            [(0x10_0000, 10), (0x20_0000, 20), (0x11_0000, 14), (0x30_0000, 1), (0x12_0000, 2000), (0x13_0000, 1500)];
        scatter(&m, &bufs, &bytes);
        let chain: Vec<_> = bufs.iter().map(|&(a, l)| (a, l, 0)).collect();
        let (h, p) = tx(&m, &chain);
        assert_eq!(h.unwrap().len, 3000);
        assert_eq!(p, payload);
    }

    #[test]
    fn zero_length_chain_is_refused() {
        let m = mem();
        assert_eq!(tx(&m, &[(0x10_0000, 0, 0)]).0, Err(PacketError::ShortHeader(0)));
        assert_eq!(tx(&m, &[(0x10_0000, 20, 0), (0x11_0000, 0, 0)]).0, Err(PacketError::ShortHeader(20)));
    }

    #[test]
    fn header_only_packet_has_empty_payload() {
        let m = mem();
        let mut h = sample_header(0);
        h.op = op::CREDIT_UPDATE;
        scatter(&m, &[(0x10_0000, 44)], &h.to_bytes());
        let (r, p) = tx(&m, &[(0x10_0000, 44, 0)]);
        assert_eq!(r.unwrap(), h);
        assert!(p.is_empty());
    }

    #[test]
    fn oversized_payload_is_refused_with_its_header() {
        let m = mem();
        let h = sample_header(MAX_PAYLOAD + 1);
        scatter(&m, &[(0x10_0000, 44)], &h.to_bytes());
        let (r, p) = tx(&m, &[(0x10_0000, 44, 0), (0x20_0000, MAX_PAYLOAD + 1, 0)]);
        let err = r.unwrap_err();
        assert_eq!(err, PacketError::Oversized(h));
        assert_eq!(err.header(), Some(&h));
        assert!(p.is_empty());
        // Exactly the maximum is fine.
        let h = sample_header(MAX_PAYLOAD);
        scatter(&m, &[(0x10_0000, 44)], &h.to_bytes());
        let (r, p) = tx(&m, &[(0x10_0000, 44, 0), (0x20_0000, MAX_PAYLOAD, 0)]);
        assert_eq!(r.unwrap(), h);
        assert_eq!(p.len(), MAX_PAYLOAD as usize);
    }

    #[test]
    fn payload_shorter_than_announced_is_refused() {
        let m = mem();
        let h = sample_header(500);
        scatter(&m, &[(0x10_0000, 44)], &h.to_bytes());
        let (r, p) = tx(&m, &[(0x10_0000, 44, 0), (0x20_0000, 499, 0)]);
        assert_eq!(r, Err(PacketError::ShortPayload { header: h, available: 499 }));
        assert!(p.is_empty());
    }

    #[test]
    fn writable_descriptor_in_tx_chain_is_refused() {
        let m = mem();
        let r = tx(&m, &[(0x10_0000, 44, 0), (0x20_0000, 10, F_WRITE)]).0;
        assert_eq!(r, Err(PacketError::WrongDirection { index: 1, writable: true }));
    }

    #[test]
    fn out_of_range_addresses_are_refused() {
        let m = mem();
        let end = MEM_SIZE as u64;
        assert_eq!(tx(&m, &[(end - 10, 44, 0)]).0, Err(PacketError::OutOfGuestMemory { addr: end - 10, len: 44 }));
        assert!(matches!(
            tx(&m, &[(0x10_0000, 44, 0), (u64::MAX - 4, 8, 0)]).0,
            Err(PacketError::OutOfGuestMemory { .. })
        ));
    }

    #[test]
    fn descriptor_loops_are_refused() {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        // 0 -> 1 -> 0 -> ...
        q.add_desc_chains(&[desc(0x10_0000, 44, F_NEXT, 1), desc(0x11_0000, 8, F_NEXT, 0)], 0).unwrap();
        let mut queue: virtio_queue::Queue = q.create_queue().unwrap();
        let chain = virtio_queue::QueueT::pop_descriptor_chain(&mut queue, &m).unwrap();
        let mut payload = Vec::new();
        assert_eq!(read_tx(&m, chain, &mut payload), Err(PacketError::BrokenChain));
    }

    #[test]
    fn next_index_past_the_table_is_refused() {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        q.add_desc_chains(&[desc(0x10_0000, 44, F_NEXT, 200)], 0).unwrap();
        let mut queue: virtio_queue::Queue = q.create_queue().unwrap();
        let chain = virtio_queue::QueueT::pop_descriptor_chain(&mut queue, &m).unwrap();
        let mut payload = Vec::new();
        assert_eq!(read_tx(&m, chain, &mut payload), Err(PacketError::BrokenChain));
    }

    fn rx(m: &GuestMemoryMmap, bufs: &[(u64, u32, u16)]) -> Result<RxBuffer, PacketError> {
        let q = MockSplitQueue::new(m, 16);
        let descs: Vec<_> = bufs.iter().map(|&(a, l, f)| desc(a, l, f, 0)).collect();
        RxBuffer::new(m, q.build_desc_chain(&descs).unwrap())
    }

    #[test]
    fn rx_packet_is_scattered_over_the_chain() {
        let m = mem();
        let bufs = [(0x10_0000u64, 30u32), (0x20_0000, 20), (0x30_0000, 4096)];
        let chain: Vec<_> = bufs.iter().map(|&(a, l)| (a, l, F_WRITE)).collect();
        let buffer = rx(&m, &chain).unwrap();
        assert_eq!(buffer.payload_capacity(), 30 + 20 + 4096 - HEADER_SIZE);
        let payload: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let mut h = sample_header(0);
        h.len = 12345; // replaced by the payload length
        let used = buffer.write(&m, &h, &payload).unwrap();
        assert_eq!(used as usize, HEADER_SIZE + 1000);
        // Read it back as the driver would: one byte stream.
        let mut back = vec![0u8; HEADER_SIZE + 1000];
        let mut at = 0;
        for &(addr, len) in &bufs {
            let n = (len as usize).min(back.len() - at);
            m.read_slice(&mut back[at..at + n], GuestAddress(addr)).unwrap();
            at += n;
        }
        let got = Header::from_bytes(back[..HEADER_SIZE].try_into().unwrap());
        assert_eq!(got.len, 1000);
        assert_eq!(got.fwd_cnt, h.fwd_cnt);
        assert_eq!(&back[HEADER_SIZE..], &payload[..]);
    }

    #[test]
    fn rx_payload_is_cut_to_the_buffer() {
        let m = mem();
        let buffer = rx(&m, &[(0x10_0000, 100, F_WRITE)]).unwrap();
        assert_eq!(buffer.payload_capacity(), 56);
        let used = buffer.write(&m, &sample_header(0), &[9u8; 500]).unwrap();
        assert_eq!(used, 100);
        let mut raw = [0u8; HEADER_SIZE];
        m.read_slice(&mut raw, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(Header::from_bytes(&raw).len, 56);
    }

    #[test]
    fn rx_capacity_is_capped_at_the_maximum_payload() {
        let m = mem();
        let buffer = rx(&m, &[(0x10_0000, 44, F_WRITE), (0x20_0000, 0x20_0000, F_WRITE)]).unwrap();
        assert_eq!(buffer.payload_capacity(), MAX_PAYLOAD as usize);
    }

    #[test]
    fn bad_rx_chains_are_refused() {
        let m = mem();
        assert_eq!(rx(&m, &[(0x10_0000, 43, F_WRITE)]).unwrap_err(), PacketError::ShortHeader(43));
        assert_eq!(
            rx(&m, &[(0x10_0000, 44, F_WRITE), (0x20_0000, 100, 0)]).unwrap_err(),
            PacketError::WrongDirection { index: 1, writable: false }
        );
        assert!(matches!(
            rx(&m, &[(MEM_SIZE as u64 - 8, 64, F_WRITE)]).unwrap_err(),
            PacketError::OutOfGuestMemory { .. }
        ));
    }
}
