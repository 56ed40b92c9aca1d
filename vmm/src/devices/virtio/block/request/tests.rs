//! Request parsing and serving against real guest memory and a real image file.

use std::io::{Read, Seek, SeekFrom, Write};

use super::*;
use crate::devices::virtio::queue::{drain_queue, QueueError, QueueOutcome};
use virtio_queue::{Queue, QueueT};

const QUEUE_SIZE: u16 = 16;
const DESC_TABLE: u64 = 0x1000;
const AVAIL_RING: u64 = 0x2000;
const USED_RING: u64 = 0x3000;
const HEADER: u64 = 0x4000;
const DATA: u64 = 0x8000;
const STATUS: u64 = 0x6000;
const MEM_SIZE: u64 = 0x20000;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

const DISK_SECTORS: u64 = 8;

struct Harness {
    mem: GuestMemoryMmap,
    queue: Queue,
    file: std::fs::File,
    disk: DiskImage,
    next_desc: u16,
    avail_idx: u16,
    headers: u64,
}

/// A buffer of a chain: address, length, device-writable.
type Buf = (u64, u32, bool);

fn status_buf() -> Buf {
    (STATUS, 1, true)
}

impl Harness {
    fn new(read_only: bool) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let mut file = tempfile::tempfile().unwrap();
        let content: Vec<u8> = (0..DISK_SECTORS * SECTOR_SIZE).map(|i| (i / SECTOR_SIZE) as u8 + 1).collect();
        file.write_all(&content).unwrap();
        let disk = DiskImage::from_file(file.try_clone().unwrap(), read_only).unwrap();
        let mut queue = Queue::new(QUEUE_SIZE).unwrap();
        queue.set_size(QUEUE_SIZE);
        queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
        queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
        queue.set_ready(true);
        assert!(queue.is_valid(&mem));
        Self { mem, queue, file, disk, next_desc: 0, avail_idx: 0, headers: 0 }
    }

    fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(DESC_TABLE + 16 * u64::from(index));
        self.mem.write_obj(addr, at).unwrap();
        self.mem.write_obj(len, at.unchecked_add(8)).unwrap();
        self.mem.write_obj(flags, at.unchecked_add(12)).unwrap();
        self.mem.write_obj(next, at.unchecked_add(14)).unwrap();
    }

    fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % QUEUE_SIZE);
        self.mem.write_obj(head, GuestAddress(AVAIL_RING + 4 + 2 * slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem.write_obj(self.avail_idx, GuestAddress(AVAIL_RING + 2)).unwrap();
    }

    /// Writes a request header into a fresh slot and returns its address.
    fn header_at(&mut self, kind: u32, sector: u64) -> u64 {
        let at = HEADER + 16 * self.headers;
        self.headers += 1;
        self.mem.write_obj(kind, GuestAddress(at)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
        at
    }

    /// A fresh, well-formed header buffer.
    fn hdr(&mut self, kind: u32, sector: u64) -> Buf {
        (self.header_at(kind, sector), 16, false)
    }

    /// Writes a well-linked chain and makes it available.
    /// Descriptor slots are reused from 0 when the table is full, so a test
    /// pushing more than a table's worth must consume chains in between.
    fn push(&mut self, bufs: &[Buf]) -> u16 {
        if usize::from(self.next_desc) + bufs.len() > usize::from(QUEUE_SIZE) {
            self.next_desc = 0;
        }
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let index = head + i as u16;
            let last = i + 1 == bufs.len();
            let flags = if writable { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            self.write_desc(index, addr, len, flags, index + 1);
        }
        self.next_desc += bufs.len() as u16;
        self.publish(head);
        head
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn used(&self, n: u16) -> (u32, u32) {
        let at = USED_RING + 4 + 8 * u64::from(n);
        (self.mem.read_obj(GuestAddress(at)).unwrap(), self.mem.read_obj(GuestAddress(at + 4)).unwrap())
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED_RING + 2)).unwrap()
    }

    /// Pops the next chain and parses it.
    fn parse_next(&mut self) -> Result<Request, (RequestError, Option<GuestAddress>)> {
        let chain = self.queue.pop_descriptor_chain(&self.mem).unwrap();
        parse(chain, &self.mem, &self.disk)
    }

    /// Pops the next chain and serves it; returns the used length.
    fn serve_next(&mut self) -> u32 {
        let chain = self.queue.pop_descriptor_chain(&self.mem).unwrap();
        serve(chain, &self.mem, &mut self.disk)
    }

    fn disk_bytes(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        self.file.seek(SeekFrom::Start(0)).unwrap();
        self.file.read_to_end(&mut out).unwrap();
        out
    }

    fn set_status_marker(&self) {
        self.mem.write_obj(0xaau8, GuestAddress(STATUS)).unwrap();
    }
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn read_request_copies_sectors_into_guest_buffers() {
    let mut h = Harness::new(true);
    let hd = h.hdr(VIRTIO_BLK_T_IN, 2);
    h.push(&[hd, (DATA, 512, true), (DATA + 0x1000, 1024, true), status_buf()]);
    let used = h.serve_next();
    assert_eq!(h.status(), OK);
    assert_eq!(used, 512 + 1024 + 1);
    let mut first = vec![0u8; 512];
    h.mem.read_slice(&mut first, GuestAddress(DATA)).unwrap();
    assert!(first.iter().all(|&b| b == 3), "sector 2 holds 3s");
    let mut rest = vec![0u8; 1024];
    h.mem.read_slice(&mut rest, GuestAddress(DATA + 0x1000)).unwrap();
    assert!(rest[..512].iter().all(|&b| b == 4));
    assert!(rest[512..].iter().all(|&b| b == 5));
}

#[test]
fn parse_reports_kind_sector_buffers_and_status() {
    let mut h = Harness::new(true);
    let hd = h.hdr(VIRTIO_BLK_T_IN, 1);
    h.push(&[hd, (DATA, 512, true), status_buf()]);
    let request = h.parse_next().unwrap();
    assert_eq!(
        request,
        Request {
            kind: RequestKind::In,
            sector: 1,
            data: vec![(GuestAddress(DATA), 512)],
            status: GuestAddress(STATUS),
        }
    );
}

#[test]
fn write_request_reaches_a_writable_image() {
    let mut h = Harness::new(false);
    h.mem.write_slice(&[0xee; 512], GuestAddress(DATA)).unwrap();
    let hd = h.hdr(VIRTIO_BLK_T_OUT, 7);
    h.push(&[hd, (DATA, 512, false), status_buf()]);
    assert_eq!(h.serve_next(), 1);
    assert_eq!(h.status(), OK);
    let disk = h.disk_bytes();
    assert!(disk[7 * 512..].iter().all(|&b| b == 0xee));
    assert!(disk[6 * 512..7 * 512].iter().all(|&b| b == 7));
}

#[test]
fn write_to_a_read_only_image_fails_with_ioerr_and_changes_nothing() {
    let mut h = Harness::new(true);
    let before = h.disk_bytes();
    h.mem.write_slice(&[0xee; 512], GuestAddress(DATA)).unwrap();
    let hd = h.hdr(VIRTIO_BLK_T_OUT, 0);
    h.push(&[hd, (DATA, 512, false), status_buf()]);
    assert_eq!(h.parse_next().unwrap_err(), (RequestError::ReadOnly, Some(GuestAddress(STATUS))));
    let hd = h.hdr(VIRTIO_BLK_T_OUT, 0);
    h.push(&[hd, (DATA, 512, false), status_buf()]);
    assert_eq!(h.serve_next(), 1);
    assert_eq!(h.status(), IOERR);
    assert_eq!(h.disk_bytes(), before);
}

#[test]
fn flush_succeeds_on_both_kinds_of_image() {
    for read_only in [true, false] {
        let mut h = Harness::new(read_only);
        let hd = h.hdr(VIRTIO_BLK_T_FLUSH, 0);
        h.push(&[hd, status_buf()]);
        h.set_status_marker();
        assert_eq!(h.serve_next(), 1);
        assert_eq!(h.status(), OK);
    }
}

#[test]
fn unknown_request_types_are_unsupported() {
    let mut h = Harness::new(true);
    let hd = h.hdr(0x1234, 0);
    h.push(&[hd, status_buf()]);
    assert_eq!(h.serve_next(), 1);
    assert_eq!(h.status(), UNSUPP);
}

#[test]
fn a_looping_chain_is_refused_without_an_answer() {
    let mut h = Harness::new(true);
    h.write_desc(0, HEADER, 16, F_NEXT, 1);
    h.write_desc(1, DATA, 512, F_NEXT | F_WRITE, 0);
    h.publish(0);
    h.set_status_marker();
    assert_eq!(h.parse_next().unwrap_err(), (RequestError::BrokenChain, None));
    h.publish(0);
    assert_eq!(h.serve_next(), 0);
    assert_eq!(h.status(), 0xaa);
}

#[test]
fn a_self_loop_is_refused() {
    let mut h = Harness::new(true);
    h.write_desc(3, STATUS, 1, F_NEXT | F_WRITE, 3);
    h.publish(3);
    assert_eq!(h.parse_next().unwrap_err().0, RequestError::BrokenChain);
}

#[test]
fn a_next_index_past_the_queue_is_refused() {
    let mut h = Harness::new(true);
    h.write_desc(0, HEADER, 16, F_NEXT, QUEUE_SIZE + 4);
    h.publish(0);
    assert_eq!(h.parse_next().unwrap_err().0, RequestError::BrokenChain);
}

#[test]
fn a_head_index_past_the_queue_is_refused() {
    let mut h = Harness::new(true);
    h.publish(QUEUE_SIZE);
    assert_eq!(h.parse_next().unwrap_err().0, RequestError::BrokenChain);
}

#[test]
fn data_buffers_outside_guest_memory_give_ioerr() {
    let mut h = Harness::new(true);
    let hd = h.hdr(VIRTIO_BLK_T_IN, 0);
    h.push(&[hd, (MEM_SIZE + 0x1000, 512, true), status_buf()]);
    assert_eq!(h.parse_next().unwrap_err().0, RequestError::OutOfGuestMemory { addr: MEM_SIZE + 0x1000, len: 512 });
    // Straddling the end of memory.
    let hd = h.hdr(VIRTIO_BLK_T_IN, 0);
    h.push(&[hd, (MEM_SIZE - 256, 512, true), status_buf()]);
    assert_eq!(h.serve_next(), 1);
    assert_eq!(h.status(), IOERR);
    // At the top of the address space.
    let hd = h.hdr(VIRTIO_BLK_T_IN, 0);
    h.push(&[hd, (u64::MAX - 10, 512, true), status_buf()]);
    assert_eq!(h.serve_next(), 1);
    assert_eq!(h.status(), IOERR);
}

#[test]
fn a_header_outside_guest_memory_gives_ioerr() {
    let mut h = Harness::new(true);
    h.push(&[(MEM_SIZE - 8, 16, false), status_buf()]);
    h.set_status_marker();
    assert!(matches!(h.parse_next().unwrap_err().0, RequestError::OutOfGuestMemory { .. }));
}

#[test]
fn wrong_data_directions_give_ioerr() {
    let mut h = Harness::new(false);
    let hd = h.hdr(VIRTIO_BLK_T_IN, 0);
    h.push(&[hd, (DATA, 512, true), (DATA + 512, 512, false), status_buf()]);
    assert_eq!(h.parse_next().unwrap_err().0, RequestError::WrongDirection { index: 1, writable: false });
    let hd = h.hdr(VIRTIO_BLK_T_OUT, 0);
    h.push(&[hd, (DATA, 512, true), status_buf()]);
    let before = h.disk_bytes();
    assert_eq!(h.serve_next(), 1);
    assert_eq!(h.status(), IOERR);
    assert_eq!(h.disk_bytes(), before);
}

#[test]
fn a_writable_or_short_header_gives_ioerr() {
    let mut h = Harness::new(true);
    let at = h.header_at(VIRTIO_BLK_T_IN, 0);
    h.push(&[(at, 16, true), (DATA, 512, true), status_buf()]);
    assert_eq!(h.parse_next().unwrap_err().0, RequestError::HeaderWritable);
    let at = h.header_at(VIRTIO_BLK_T_IN, 0);
    h.push(&[(at, 8, false), (DATA, 512, true), status_buf()]);
    assert_eq!(h.parse_next().unwrap_err().0, RequestError::ShortHeader(8));
    h.push(&[(HEADER, 8, false), status_buf()]);
    h.set_status_marker();
    assert_eq!(h.serve_next(), 1);
    assert_eq!(h.status(), IOERR);
}

#[test]
fn a_chain_with_only_a_status_byte_gives_ioerr() {
    let mut h = Harness::new(true);
    h.push(&[status_buf()]);
    assert_eq!(h.parse_next().unwrap_err(), (RequestError::NoHeader, Some(GuestAddress(STATUS))));
}

#[test]
fn a_read_only_or_unmapped_status_byte_leaves_the_request_unanswered() {
    let mut h = Harness::new(true);
    let hd = h.hdr(VIRTIO_BLK_T_IN, 0);
    h.push(&[hd, (DATA, 512, true), (STATUS, 1, false)]);
    h.set_status_marker();
    assert_eq!(h.serve_next(), 0);
    assert_eq!(h.status(), 0xaa);
    let hd = h.hdr(VIRTIO_BLK_T_IN, 0);
    h.push(&[hd, (DATA, 512, true), (MEM_SIZE, 1, true)]);
    assert_eq!(h.parse_next().unwrap_err(), (RequestError::NoStatus, None));
    let hd = h.hdr(VIRTIO_BLK_T_IN, 0);
    h.push(&[hd, (DATA, 512, true), (STATUS, 0, true)]);
    assert_eq!(h.parse_next().unwrap_err(), (RequestError::NoStatus, None));
}

#[test]
fn accesses_past_the_end_of_the_disk_give_ioerr() {
    let mut h = Harness::new(false);
    // The last sector is fine; one more byte is not.
    let hd = h.hdr(VIRTIO_BLK_T_IN, DISK_SECTORS - 1);
    h.push(&[hd, (DATA, 512, true), status_buf()]);
    assert!(h.parse_next().is_ok());
    let hd = h.hdr(VIRTIO_BLK_T_IN, DISK_SECTORS - 1);
    h.push(&[hd, (DATA, 513, true), status_buf()]);
    assert!(matches!(h.parse_next().unwrap_err().0, RequestError::BeyondDisk { .. }));
    let hd = h.hdr(VIRTIO_BLK_T_OUT, DISK_SECTORS);
    h.push(&[hd, (DATA, 512, false), status_buf()]);
    assert!(matches!(h.parse_next().unwrap_err().0, RequestError::BeyondDisk { .. }));
    // Sector numbers whose byte offset overflows.
    for sector in [u64::MAX, u64::MAX / 512 + 1, u64::MAX / 512] {
        let hd = h.hdr(VIRTIO_BLK_T_IN, sector);
        h.push(&[hd, (DATA, 512, true), status_buf()]);
        assert_eq!(h.serve_next(), 1, "sector {sector}");
        assert_eq!(h.status(), IOERR);
    }
}

#[test]
fn drain_queue_serves_everything_and_fills_the_used_ring() {
    let mut h = Harness::new(false);
    h.mem.write_slice(&[0x55; 512], GuestAddress(DATA)).unwrap();
    let hd = h.hdr(VIRTIO_BLK_T_OUT, 3);
    let a = h.push(&[hd, (DATA, 512, false), status_buf()]);
    let hd = h.hdr(VIRTIO_BLK_T_IN, 3);
    let b = h.push(&[hd, (DATA + 0x1000, 512, true), status_buf()]);
    let hd = h.hdr(0xdead, 0);
    let c = h.push(&[hd, status_buf()]);
    let outcome = drain_queue(&mut h.queue, &h.mem, &mut h.disk).unwrap();
    assert_eq!(outcome, QueueOutcome { notify: true, ..QueueOutcome::default() });
    assert_eq!(h.used_idx(), 3);
    assert_eq!(h.used(0), (u32::from(a), 1));
    assert_eq!(h.used(1), (u32::from(b), 513));
    assert_eq!(h.used(2), (u32::from(c), 1));
    let mut back = [0u8; 512];
    h.mem.read_slice(&mut back, GuestAddress(DATA + 0x1000)).unwrap();
    assert_eq!(back, [0x55; 512]);

    let outcome = drain_queue(&mut h.queue, &h.mem, &mut h.disk).unwrap();
    assert_eq!(outcome, QueueOutcome::default());
}

#[test]
fn drain_queue_returns_malformed_chains_and_continues() {
    let mut h = Harness::new(true);
    h.publish(QUEUE_SIZE + 1); // head index that is not a descriptor
    h.write_desc(0, HEADER, 16, F_NEXT, 0); // self loop
    h.publish(0);
    h.next_desc = 1;
    let hd = h.hdr(VIRTIO_BLK_T_IN, 0);
    let good = h.push(&[hd, (DATA, 512, true), status_buf()]);
    let outcome = drain_queue(&mut h.queue, &h.mem, &mut h.disk).unwrap();
    assert!(outcome.notify);
    assert_eq!(h.used_idx(), 2, "the bogus head cannot be returned");
    assert_eq!(h.used(0), (0, 0));
    assert_eq!(h.used(1), (u32::from(good), 513));
    assert_eq!(h.status(), OK);
}

#[test]
fn an_avail_index_running_ahead_is_an_error_not_a_hang() {
    let mut h = Harness::new(true);
    h.mem.write_obj(QUEUE_SIZE + 5, GuestAddress(AVAIL_RING + 2)).unwrap();
    assert!(matches!(drain_queue(&mut h.queue, &h.mem, &mut h.disk), Err(QueueError::InvalidAvailIndex)));
}

#[test]
fn a_full_queue_is_served_in_budgeted_rounds() {
    let mut h = Harness::new(true);
    for _ in 0..QUEUE_SIZE {
        h.write_desc(0, STATUS, 1, F_WRITE, 0);
        h.publish(0);
    }
    let outcome = drain_queue(&mut h.queue, &h.mem, &mut h.disk).unwrap();
    assert!(outcome.more);
    assert_eq!(h.used_idx(), QUEUE_SIZE);
    let outcome = drain_queue(&mut h.queue, &h.mem, &mut h.disk).unwrap();
    assert_eq!(outcome, QueueOutcome::default());
}
