//! The device driven through real split queues in guest memory, as the
//! guest driver would, against real Unix sockets on the host side.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent};

use super::*;
use crate::devices::virtio::common::DeviceState;
use crate::devices::virtio::vsock::connection::TX_BUF_SIZE;
use crate::devices::virtio::vsock::packet::{op, shutdown, Header, HEADER_SIZE, HOST_CID, TYPE_STREAM};
use crate::devices::virtio::vsock::Limits;
use crate::devices::virtio::Interrupt;
use std::sync::Arc;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const GUEST_CID: u64 = 3;
const MEM_SIZE: usize = 0x300_0000;
const RX_RING: u64 = 0x0;
const TX_RING: u64 = 0x4000;
const EVENT_RING: u64 = 0x8000;
const RX_AREA: (u64, u64) = (0x10_0000, 0x150_0000);
const TX_AREA: (u64, u64) = (0x160_0000, 0x2f0_0000);
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// The driver's side of one split queue.
struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl Ring {
    fn new(mem: &GuestMemoryMmap, start: u64) -> (Ring, Queue) {
        let mock = MockSplitQueue::create(mem, GuestAddress(start), QUEUE_SIZE);
        let mut queue: Queue = mock.create_queue().unwrap();
        // The mock puts the used ring `QUEUE_SIZE` bytes after the avail
        // ring, over its second half: put it after the whole avail ring
        // (4 + 2 * 256 + 2 bytes), so more than 128 chains can be in use.
        let used = start + 0x2000;
        assert!(used > mock.avail_addr().0 + 4 + 2 * u64::from(QUEUE_SIZE) + 2);
        queue.try_set_used_ring_address(GuestAddress(used)).unwrap();
        let ring = Ring {
            desc: mock.desc_table_addr().0,
            avail: mock.avail_addr().0,
            used,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        };
        (ring, queue)
    }

    fn write_desc(&self, mem: &GuestMemoryMmap, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(self.desc + 16 * u64::from(index));
        mem.write_obj(addr, at).unwrap();
        mem.write_obj(len, at.unchecked_add(8)).unwrap();
        mem.write_obj(flags, at.unchecked_add(12)).unwrap();
        mem.write_obj(next, at.unchecked_add(14)).unwrap();
    }

    /// Adds a chain of (addr, len, device-writable) buffers; returns its head.
    fn add(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> u16 {
        let n = bufs.len() as u16;
        if self.next_desc + n > QUEUE_SIZE {
            self.next_desc = 0;
        }
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let index = head + i as u16;
            let mut flags = if writable { F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= F_NEXT;
            }
            self.write_desc(mem, index, addr, len, flags, index + 1);
        }
        self.next_desc += n;
        self.publish(mem, head);
        head
    }

    fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = u64::from(self.avail_idx % QUEUE_SIZE);
        mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2)).unwrap();
    }

    /// New used entries: (head, length).
    fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u16, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let at = self.used + 4 + 8 * u64::from(self.used_seen % QUEUE_SIZE);
            let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((id as u16, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

/// A bump allocator over an area of guest memory, wrapping around.
struct Area {
    start: u64,
    end: u64,
    next: u64,
}

impl Area {
    fn new((start, end): (u64, u64)) -> Self {
        Self { start, end, next: start }
    }

    fn alloc(&mut self, len: u32) -> u64 {
        let len = u64::from(len.max(1));
        if self.next + len > self.end {
            self.next = self.start;
        }
        let addr = self.next;
        self.next += len;
        addr
    }
}

/// A guest driver and the device under test.
struct Guest<B = Muxer> {
    mem: GuestMemoryMmap,
    rx: Ring,
    tx: Ring,
    event: Ring,
    rx_area: Area,
    tx_area: Area,
    rx_bufs: HashMap<u16, Vec<(u64, u32)>>,
    irq: EventFd,
    dev: Vsock<B>,
    uds: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

fn packet(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        type_: TYPE_STREAM,
        op,
        buf_alloc: 256 * 1024,
        ..Header::default()
    }
}

fn ops(packets: &[(Header, Vec<u8>)]) -> Vec<u16> {
    packets.iter().map(|(h, _)| h.op).collect()
}

impl Guest {
    /// The device with its Unix-socket muxer in a private directory.
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let dev = Vsock::new(&VsockConfig { guest_cid: GUEST_CID as u32, uds_path: uds.clone() }).unwrap();
        Self { uds, _dir: Some(dir), ..Guest::with_device(dev) }
    }

    fn port_path(&self, port: u32) -> PathBuf {
        PathBuf::from(format!("{}_{port}", self.uds.display()))
    }

    /// Opens a guest connection from `port` to the host socket for 5002.
    fn connect(&mut self, port: u32, listener: &UnixListener) -> UnixStream {
        self.send(packet(op::REQUEST, port, 5002), &[]);
        self.post_rx(1, 4096);
        let out = self.recv();
        assert_eq!(ops(&out), [op::RESPONSE]);
        listener.accept().unwrap().0
    }
}

impl<B: VsockBackend> Guest<B> {
    /// A driver that has set up and activated `dev`.
    fn with_device(mut dev: Vsock<B>) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let (rx, rx_queue) = Ring::new(&mem, RX_RING);
        let (tx, tx_queue) = Ring::new(&mem, TX_RING);
        let (event, event_queue) = Ring::new(&mem, EVENT_RING);
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        dev.activate(Activation {
            mem: mem.clone(),
            queues: vec![rx_queue, tx_queue, event_queue],
            interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
            acked_features: VIRTIO_F_VERSION_1,
        })
        .unwrap();
        // Activation schedules a tx pass.
        assert_eq!(dev.queue_events()[TX_QUEUE].read().unwrap(), 1);
        Self {
            mem,
            rx,
            tx,
            event,
            rx_area: Area::new(RX_AREA),
            tx_area: Area::new(TX_AREA),
            rx_bufs: HashMap::new(),
            irq,
            dev,
            uds: PathBuf::new(),
            _dir: None,
        }
    }

    /// Queues a tx chain of raw (addr, len, writable) buffers without kicking.
    fn queue_raw(&mut self, bufs: &[(u64, u32, bool)]) {
        self.tx.add(&self.mem, bufs);
    }

    /// Puts `bytes` in guest memory split into pieces of the given sizes;
    /// returns the chain.
    fn scatter(&mut self, bytes: &[u8], pieces: &[usize]) -> Vec<(u64, u32, bool)> {
        let mut chain = Vec::new();
        let mut rest = bytes;
        for &size in pieces {
            let n = size.min(rest.len());
            let addr = self.tx_area.alloc(n as u32);
            self.mem.write_slice(&rest[..n], GuestAddress(addr)).unwrap();
            chain.push((addr, n as u32, false));
            rest = &rest[n..];
        }
        assert!(rest.is_empty());
        chain
    }

    /// Queues a packet the way Linux lays it out (header, then payload).
    fn queue(&mut self, mut header: Header, payload: &[u8]) {
        header.len = payload.len() as u32;
        let mut bytes = header.to_bytes().to_vec();
        bytes.extend_from_slice(payload);
        let pieces: &[usize] = if payload.is_empty() { &[HEADER_SIZE] } else { &[HEADER_SIZE, payload.len()] };
        let chain = self.scatter(&bytes, pieces);
        self.queue_raw(&chain);
    }

    fn send(&mut self, header: Header, payload: &[u8]) {
        self.queue(header, payload);
        self.kick_tx();
    }

    fn kick_tx(&mut self) {
        self.dev.queue_events()[TX_QUEUE].write(1).unwrap();
        self.dev.handle(TX_QUEUE as u32);
    }

    fn kick_rx(&mut self) {
        self.dev.queue_events()[RX_QUEUE].write(1).unwrap();
        self.dev.handle(RX_QUEUE as u32);
    }

    /// Offers `n` rx buffers of `data_len` payload bytes each (header and
    /// data in separate descriptors, as Linux does) and kicks the queue.
    fn post_rx(&mut self, n: usize, data_len: u32) {
        for _ in 0..n {
            let bufs = [
                (self.rx_area.alloc(HEADER_SIZE as u32), HEADER_SIZE as u32),
                (self.rx_area.alloc(data_len), data_len),
            ];
            let chain: Vec<_> = bufs.iter().map(|&(a, l)| (a, l, true)).collect();
            let head = self.rx.add(&self.mem, &chain);
            self.rx_bufs.insert(head, bufs.to_vec());
        }
        self.kick_rx();
    }

    /// The packets the device wrote into rx buffers since the last call.
    fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        for (head, len) in self.rx.take_used(&self.mem) {
            let bufs = self.rx_bufs.remove(&head).unwrap();
            let mut bytes = Vec::new();
            for (addr, size) in bufs {
                let mut chunk = vec![0u8; size as usize];
                self.mem.read_slice(&mut chunk, GuestAddress(addr)).unwrap();
                bytes.extend(chunk);
            }
            if len == 0 {
                continue;
            }
            let header = Header::from_bytes(bytes[..HEADER_SIZE].try_into().unwrap());
            assert_eq!(len as usize, HEADER_SIZE + header.len as usize);
            out.push((header, bytes[HEADER_SIZE..len as usize].to_vec()));
        }
        out
    }

    fn tx_used(&mut self) -> Vec<(u16, u32)> {
        self.tx.take_used(&self.mem)
    }

    fn backend(&mut self) {
        self.dev.handle(BACKEND_EVENT);
    }

    /// Waits for the host sockets to be ready, then handles them.
    fn wait_backend(&mut self) {
        let epoll = Epoll::new().unwrap();
        epoll.ctl(ControlOperation::Add, self.dev.backend.as_raw_fd(), EpollEvent::new(EventSet::IN, 0)).unwrap();
        let mut events = [EpollEvent::default(); 1];
        assert_eq!(epoll.wait(5000, &mut events).unwrap(), 1, "host sockets never became ready");
        self.backend();
    }

    fn interrupted(&self) -> bool {
        self.irq.read().is_ok()
    }
}

#[test]
fn device_identity_and_config_space() {
    let g = Guest::new();
    assert_eq!(g.dev.device_type(), 19);
    assert_eq!(g.dev.queue_max_sizes(), &[RX_QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]);
    assert_eq!(g.dev.queue_events().len(), 3);
    assert_ne!(g.dev.features() & VIRTIO_F_VERSION_1, 0);
    let mut cid = [0u8; 8];
    g.dev.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST_CID);
    let mut high = [0xffu8; 4];
    g.dev.read_config(4, &mut high);
    assert_eq!(high, [0; 4]);
    let mut beyond = [0xffu8; 4];
    g.dev.read_config(8, &mut beyond);
    assert_eq!(beyond, [0; 4]);
}

#[test]
fn reserved_cids_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for cid in [0, 1, 2, u32::MAX] {
        let err = Vsock::new(&VsockConfig { guest_cid: cid, uds_path: dir.path().join("v.sock") }).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{cid}");
    }
}

#[test]
fn activation_needs_three_queues_and_reset_deactivates() {
    let mut g = Guest::new();
    let mem = g.mem.clone();
    let activation = |count| Activation {
        mem: mem.clone(),
        queues: (0..count).map(|_| Ring::new(&mem, EVENT_RING).1).collect(),
        interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
        acked_features: VIRTIO_F_VERSION_1,
    };
    assert!(matches!(g.dev.activate(activation(3)), Err(ActivateError::AlreadyActive)));
    g.dev.reset();
    assert!(matches!(g.dev.common.state(), DeviceState::Inactive));
    assert!(matches!(g.dev.activate(activation(1)), Err(ActivateError::QueueCount { expected: 3, got: 1 })));
    g.dev.activate(activation(3)).unwrap();
    assert!(matches!(g.dev.common.state(), DeviceState::Active(_)));
}

#[test]
fn guest_connection_to_a_host_socket_carries_data_both_ways() {
    let mut g = Guest::new();
    let listener = UnixListener::bind(g.port_path(5002)).unwrap();
    g.send(packet(op::REQUEST, 40000, 5002), &[]);
    assert_eq!(g.tx_used().len(), 1);
    // No rx buffer yet: the response waits.
    assert!(g.recv().is_empty());
    g.post_rx(4, 4096);
    let out = g.recv();
    assert_eq!(ops(&out), [op::RESPONSE]);
    let response = out[0].0;
    assert_eq!((response.src_cid, response.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!((response.src_port, response.dst_port), (5002, 40000));
    assert_eq!(response.buf_alloc, TX_BUF_SIZE);
    assert!(g.interrupted());

    let (mut handler, _) = listener.accept().unwrap();
    g.send(packet(op::RW, 40000, 5002), b"GET / HTTP/1.1\r\n\r\n");
    let mut got = [0u8; 18];
    handler.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"GET / HTTP/1.1\r\n\r\n");

    handler.write_all(b"HTTP/1.1 200 OK\r\n").unwrap();
    g.wait_backend();
    let out = g.recv();
    assert_eq!(ops(&out), [op::RW]);
    assert_eq!(out[0].1, b"HTTP/1.1 200 OK\r\n");
    assert!(g.interrupted());

    // The handler half-closes; the guest sees SHUTDOWN(SEND) and can still send.
    handler.shutdown(std::net::Shutdown::Write).unwrap();
    g.wait_backend();
    let out = g.recv();
    assert_eq!(ops(&out), [op::SHUTDOWN]);
    assert_eq!(out[0].0.flags, shutdown::SEND);
    g.send(packet(op::RW, 40000, 5002), b"late");
    let mut late = [0u8; 4];
    handler.read_exact(&mut late).unwrap();
    assert_eq!(&late, b"late");

    // The guest closes: RST, and the handler reads end-of-file.
    let mut close = packet(op::SHUTDOWN, 40000, 5002);
    close.flags = shutdown::BOTH;
    g.send(close, &[]);
    assert_eq!(ops(&g.recv()), [op::RST]);
    let mut rest = Vec::new();
    handler.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn connecting_to_a_port_nobody_listens_on_is_reset_at_once() {
    let mut g = Guest::new();
    g.post_rx(2, 4096);
    g.send(packet(op::REQUEST, 40000, 5009), &[]);
    let out = g.recv();
    assert_eq!(ops(&out), [op::RST]);
    assert_eq!((out[0].0.src_port, out[0].0.dst_port), (5009, 40000));
}

#[test]
fn packets_for_unknown_connections_are_reset() {
    let mut g = Guest::new();
    g.post_rx(4, 4096);
    g.send(packet(op::RW, 1, 2), b"data");
    g.send(packet(op::SHUTDOWN, 3, 4), &[]);
    g.send(packet(op::RST, 5, 6), &[]);
    let out = g.recv();
    assert_eq!(ops(&out), [op::RST, op::RST]);
    assert_eq!(out[0].0.dst_port, 1);
    assert_eq!(out[1].0.dst_port, 3);
}

#[test]
fn fragmented_chains_carry_whole_packets() {
    let mut g = Guest::new();
    let listener = UnixListener::bind(g.port_path(5002)).unwrap();
    let mut handler = g.connect(7, &listener);
    let payload: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
    let mut header = packet(op::RW, 7, 5002);
    header.len = payload.len() as u32;
    let mut bytes = header.to_bytes().to_vec();
    bytes.extend_from_slice(&payload);
    // The header over three descriptors, the payload over four.
    let chain = g.scatter(&bytes, &[1, 40, 3, 5000, 7, 2, 4991]);
    g.queue_raw(&chain);
    g.kick_tx();
    let mut got = vec![0u8; payload.len()];
    handler.read_exact(&mut got).unwrap();
    assert_eq!(got, payload);

    // An rx chain in many small pieces gets the packet scattered over it.
    handler.write_all(&payload[..3000]).unwrap();
    let pieces = [(10u32), 34, 1, 999, 2000];
    let bufs: Vec<(u64, u32)> = pieces.iter().map(|&l| (g.rx_area.alloc(l), l)).collect();
    let chain: Vec<_> = bufs.iter().map(|&(a, l)| (a, l, true)).collect();
    let head = g.rx.add(&g.mem, &chain);
    g.rx_bufs.insert(head, bufs);
    g.wait_backend();
    let out = g.recv();
    assert_eq!(ops(&out), [op::RW]);
    assert_eq!(out[0].1, &payload[..3000]);
}

#[test]
fn malformed_tx_chains_are_consumed_and_the_device_carries_on() {
    let mut g = Guest::new();
    let listener = UnixListener::bind(g.port_path(5002)).unwrap();
    let mut handler = g.connect(7, &listener);
    g.post_rx(8, 4096);
    g.tx_used();
    let end = MEM_SIZE as u64;

    // Zero-length packet.
    let empty = g.tx_area.alloc(1);
    g.queue_raw(&[(empty, 0, false)]);
    // Header cut short.
    let short = g.scatter(&packet(op::RW, 7, 5002).to_bytes()[..30], &[30]);
    g.queue_raw(&short);
    // Device-writable buffer in a tx chain.
    let header = g.scatter(&packet(op::RW, 7, 5002).to_bytes(), &[HEADER_SIZE]);
    let writable = g.tx_area.alloc(8);
    g.queue_raw(&[header[0], (writable, 8, true)]);
    // Buffer outside guest memory.
    g.queue_raw(&[(end - 16, 44, false)]);
    g.queue_raw(&[header[0], (u64::MAX - 8, 16, false)]);
    // A descriptor loop: 250 -> 251 -> 250.
    let addr = g.tx_area.alloc(HEADER_SIZE as u32);
    g.tx.write_desc(&g.mem, 250, addr, HEADER_SIZE as u32, F_NEXT, 251);
    g.tx.write_desc(&g.mem, 251, addr, HEADER_SIZE as u32, F_NEXT, 250);
    g.tx.publish(&g.mem, 250);
    // A next index past the table.
    g.tx.write_desc(&g.mem, 252, addr, HEADER_SIZE as u32, F_NEXT, 999);
    g.tx.publish(&g.mem, 252);
    g.kick_tx();
    let used = g.tx_used();
    assert_eq!(used.len(), 7);
    assert!(used.iter().all(|&(_, len)| len == 0));
    // None of it touched the connection.
    assert!(g.recv().is_empty());
    assert_eq!(g.dev.backend.connection_count(), 1);

    // An oversized packet breaks the stream it belongs to: it is reset.
    let mut big = packet(op::RW, 7, 5002);
    big.len = 70_000;
    let chain = g.scatter(&big.to_bytes(), &[HEADER_SIZE]);
    let data = g.tx_area.alloc(70_000);
    g.queue_raw(&[chain[0], (data, 70_000, false)]);
    g.kick_tx();
    let out = g.recv();
    assert_eq!(ops(&out), [op::RST]);
    assert_eq!(out[0].0.dst_port, 7);
    assert_eq!(g.dev.backend.connection_count(), 0);
    let mut rest = Vec::new();
    handler.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());

    // The device still works.
    g.send(packet(op::REQUEST, 8, 5002), &[]);
    assert_eq!(ops(&g.recv()), [op::RESPONSE]);
}

#[test]
fn unusable_rx_buffers_are_returned_empty_and_the_packet_waits() {
    let mut g = Guest::new();
    g.send(packet(op::REQUEST, 1, 5009), &[]);
    // Too small for a header, read-only, and outside guest memory.
    let small = g.rx_area.alloc(20);
    g.rx.add(&g.mem, &[(small, 20, true)]);
    let ro = g.rx_area.alloc(4096);
    g.rx.add(&g.mem, &[(ro, 4096, false)]);
    g.rx.add(&g.mem, &[(MEM_SIZE as u64 - 8, 4096, true)]);
    g.kick_rx();
    let used = g.rx.take_used(&g.mem);
    assert_eq!(used.len(), 3);
    assert!(used.iter().all(|&(_, len)| len == 0));
    g.post_rx(1, 4096);
    assert_eq!(ops(&g.recv()), [op::RST]);
}

#[test]
fn guest_credit_is_respected_and_recovers() {
    let mut g = Guest::new();
    let listener = UnixListener::bind(g.port_path(5002)).unwrap();
    let mut request = packet(op::REQUEST, 7, 5002);
    request.buf_alloc = 8192;
    g.send(request, &[]);
    g.post_rx(1, 4096);
    assert_eq!(ops(&g.recv()), [op::RESPONSE]);
    let (mut handler, _) = listener.accept().unwrap();
    let data: Vec<u8> = (0..20_000u32).map(|i| (i * 31 % 256) as u8).collect();
    handler.write_all(&data).unwrap();

    let mut received = Vec::new();
    g.post_rx(8, 4096);
    for _ in 0..4 {
        g.backend();
    }
    let out = g.recv();
    for (h, payload) in &out {
        if h.op == op::RW {
            received.extend_from_slice(payload);
        }
    }
    // Exactly the credit, then a request for more.
    assert_eq!(received.len(), 8192);
    assert_eq!(out.last().unwrap().0.op, op::CREDIT_REQUEST);
    for _ in 0..4 {
        g.backend();
        g.kick_rx();
    }
    assert!(g.recv().is_empty(), "sent beyond the credit");

    // The guest's application consumed everything: credit is back.
    let mut update = packet(op::CREDIT_UPDATE, 7, 5002);
    update.buf_alloc = 8192;
    update.fwd_cnt = 8192;
    g.send(update, &[]);
    for _ in 0..4 {
        g.backend();
    }
    let out = g.recv();
    let more: usize = out.iter().filter(|(h, _)| h.op == op::RW).map(|(_, p)| p.len()).sum();
    assert_eq!(more, 8192);
    for (_, p) in out.iter().filter(|(h, _)| h.op == op::RW) {
        received.extend_from_slice(p);
    }
    assert_eq!(received, data[..16384]);
}

#[test]
fn megabyte_guest_to_host_honours_credit_and_gets_updates() {
    let mut g = Guest::new();
    let listener = UnixListener::bind(g.port_path(5002)).unwrap();
    let mut handler = g.connect(7, &listener);
    handler.set_nonblocking(true).unwrap();
    let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let (mut sent, mut tx_cnt) = (0usize, 0u32);
    let (mut peer_buf_alloc, mut peer_fwd_cnt) = (TX_BUF_SIZE, 0u32);
    let mut got = Vec::new();
    let mut updates = 0;
    let mut buf = vec![0u8; 1 << 20];
    g.post_rx(64, 4096);
    for _ in 0..100_000 {
        if got.len() == data.len() {
            break;
        }
        let credit = peer_buf_alloc - tx_cnt.wrapping_sub(peer_fwd_cnt);
        let n = (data.len() - sent).min(credit as usize).min(65536);
        if n > 0 {
            g.send(packet(op::RW, 7, 5002), &data[sent..sent + n]);
            sent += n;
            tx_cnt = tx_cnt.wrapping_add(n as u32);
        }
        match handler.read(&mut buf) {
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => assert_eq!(e.kind(), ErrorKind::WouldBlock),
        }
        g.backend();
        let out = g.recv();
        for (h, _) in &out {
            assert_eq!(h.op, op::CREDIT_UPDATE);
            peer_buf_alloc = h.buf_alloc;
            peer_fwd_cnt = h.fwd_cnt;
            updates += 1;
        }
        if !out.is_empty() {
            g.post_rx(out.len(), 4096);
        }
    }
    assert_eq!(got.len(), data.len());
    assert!(got == data, "bytes differ");
    assert!(updates > 0);
    assert_eq!(g.dev.backend.connection_count(), 1);
}

#[test]
fn megabyte_host_to_guest_with_credit_updates() {
    let mut g = Guest::new();
    let listener = UnixListener::bind(g.port_path(5002)).unwrap();
    let mut request = packet(op::REQUEST, 7, 5002);
    request.buf_alloc = 64 * 1024;
    g.send(request, &[]);
    g.post_rx(1, 4096);
    assert_eq!(ops(&g.recv()), [op::RESPONSE]);
    let (mut handler, _) = listener.accept().unwrap();
    let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i.wrapping_mul(40503) >> 8) as u8).collect();
    let expected = data.clone();
    let writer = std::thread::spawn(move || {
        handler.write_all(&data).unwrap();
        // End of stream.
    });
    let mut got = Vec::new();
    let mut fwd_cnt = 0u32;
    let mut shut = false;
    g.post_rx(32, 65536);
    while !shut {
        g.wait_backend();
        let out = g.recv();
        for (h, payload) in &out {
            match h.op {
                op::RW => got.extend_from_slice(payload),
                op::SHUTDOWN => shut = true,
                op::CREDIT_REQUEST => {}
                other => panic!("unexpected op {other}"),
            }
        }
        assert!(got.len() <= expected.len());
        if !out.is_empty() {
            // The application read it all: tell the device.
            fwd_cnt = got.len() as u32;
            let mut update = packet(op::CREDIT_UPDATE, 7, 5002);
            update.buf_alloc = 64 * 1024;
            update.fwd_cnt = fwd_cnt;
            g.send(update, &[]);
            g.post_rx(out.len(), 65536);
        }
    }
    writer.join().unwrap();
    assert_eq!(fwd_cnt as usize, expected.len());
    assert!(got == expected, "bytes differ");
}

#[test]
fn host_client_connects_to_a_guest_port_through_the_queues() {
    let mut g = Guest::new();
    g.post_rx(4, 4096);
    let mut client = UnixStream::connect(&g.uds).unwrap();
    client.write_all(b"CONNECT 5000\n").unwrap();
    let mut out = Vec::new();
    while out.is_empty() {
        g.wait_backend();
        out = g.recv();
    }
    assert_eq!(ops(&out), [op::REQUEST]);
    let request = out[0].0;
    assert_eq!((request.dst_cid, request.dst_port), (GUEST_CID, 5000));
    let host_port = request.src_port;
    g.send(packet(op::RESPONSE, 5000, host_port), &[]);
    let mut line = vec![0u8; format!("OK {host_port}\n").len()];
    client.read_exact(&mut line).unwrap();
    assert_eq!(line, format!("OK {host_port}\n").as_bytes());
    // Host to guest.
    client.write_all(b"exec true").unwrap();
    g.wait_backend();
    let out = g.recv();
    assert_eq!(ops(&out), [op::RW]);
    assert_eq!(out[0].1, b"exec true");
    assert_eq!((out[0].0.src_port, out[0].0.dst_port), (host_port, 5000));
    // Guest to host.
    g.send(packet(op::RW, 5000, host_port), b"exit 0");
    let mut reply = [0u8; 6];
    client.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"exit 0");
}

#[test]
fn reply_backlog_pauses_tx_until_the_guest_reads() {
    let mut g = Guest::new();
    let limit = Limits::default().max_pending_resets;
    for port in 0..100 {
        g.queue(packet(op::RW, port, 9), b"x");
    }
    g.kick_tx();
    // Tx stops once `limit` resets wait for rx buffers.
    assert_eq!(g.tx_used().len(), limit);
    g.kick_tx();
    assert!(g.tx_used().is_empty());
    // Reading the replies resumes tx by itself.
    g.post_rx(200, 64);
    assert_eq!(g.tx_used().len(), 100 - limit);
    let out = g.recv();
    assert_eq!(out.len(), 100);
    assert!(out.iter().all(|(h, _)| h.op == op::RST));
    let ports: Vec<u32> = out.iter().map(|(h, _)| h.dst_port).collect();
    assert_eq!(ports, (0..100).collect::<Vec<_>>());
}

#[test]
fn a_broken_avail_index_stops_the_device_until_reset() {
    let mut g = Guest::new();
    // The driver claims 1000 chains in a 256-entry queue.
    g.mem.write_obj(1000u16, GuestAddress(g.tx.avail + 2)).unwrap();
    g.kick_tx();
    assert!(matches!(g.dev.common.state(), DeviceState::Broken));
    g.kick_tx();
    g.dev.reset();
    assert!(matches!(g.dev.common.state(), DeviceState::Inactive));
}

#[test]
fn a_guest_holding_every_connection_does_not_lock_out_connect_5000() {
    let mut g = Guest::new();
    let listener = UnixListener::bind(g.port_path(5002)).unwrap();
    let limits = Limits::default();
    let guest_share = limits.max_connections - limits.reserved_host_connections;
    // The guest opens as many connections as the device has room for.
    let mut held = Vec::new();
    for i in 0..limits.max_connections {
        g.send(packet(op::REQUEST, 40000 + i as u32, 5002), &[]);
        g.post_rx(1, 4096);
        let out = g.recv();
        if i < guest_share {
            assert_eq!(ops(&out), [op::RESPONSE], "guest connection {i}");
            held.push(listener.accept().unwrap().0);
        } else {
            assert_eq!(ops(&out), [op::RST], "guest connection {i}");
        }
    }
    assert_eq!(g.dev.backend.connection_count(), guest_share);
    // The host's agent connection still reaches the guest and is answered.
    g.post_rx(4, 4096);
    let mut client = UnixStream::connect(&g.uds).unwrap();
    client.write_all(b"CONNECT 5000\n").unwrap();
    let mut out = Vec::new();
    for _ in 0..10 {
        g.wait_backend();
        out = g.recv();
        if !out.is_empty() {
            break;
        }
    }
    assert_eq!(ops(&out), [op::REQUEST]);
    let request = out[0].0;
    assert_eq!((request.dst_cid, request.dst_port), (GUEST_CID, 5000));
    g.send(packet(op::RESPONSE, 5000, request.src_port), &[]);
    let expected = format!("OK {}\n", request.src_port);
    let mut line = vec![0u8; expected.len()];
    client.read_exact(&mut line).unwrap();
    assert_eq!(line, expected.as_bytes());
}

/// A host side that records what the device hands it and offers the guest
/// what the test queued, so the device's queue handling can be checked
/// without host sockets.
#[derive(Debug)]
struct FakeBackend {
    event: EventFd,
    sent: Vec<(Header, Vec<u8>)>,
    rejected: Vec<Header>,
    /// Packets for the guest; `None` claims a pending packet that turns out
    /// to be nothing (a connection without credit, say).
    pending: VecDeque<Option<(Header, Vec<u8>)>>,
    backlogged: bool,
    events: usize,
    resets: usize,
}

impl AsRawFd for FakeBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }
}

impl VsockBackend for FakeBackend {
    fn send_pkt(&mut self, header: &Header, payload: &[u8]) {
        self.sent.push((*header, payload.to_vec()));
    }

    fn reject_pkt(&mut self, header: &Header) {
        self.rejected.push(*header);
    }

    fn recv_pkt(&mut self, buf: &mut [u8]) -> Option<(Header, usize)> {
        let (header, payload) = self.pending.pop_front()??;
        let len = payload.len().min(buf.len());
        buf[..len].copy_from_slice(&payload[..len]);
        Some((header, len))
    }

    fn has_pending_rx(&self) -> bool {
        !self.pending.is_empty()
    }

    fn rx_backlogged(&self) -> bool {
        self.backlogged
    }

    fn process_events(&mut self) {
        self.events += 1;
        let _ = self.event.read();
    }

    fn reset(&mut self) {
        self.resets += 1;
        self.pending.clear();
    }
}

fn fake_guest() -> Guest<FakeBackend> {
    let backend = FakeBackend {
        event: EventFd::new(EFD_NONBLOCK).unwrap(),
        sent: Vec::new(),
        rejected: Vec::new(),
        pending: VecDeque::new(),
        backlogged: false,
        events: 0,
        resets: 0,
    };
    Guest::with_device(Vsock::with_backend(GUEST_CID, backend).unwrap())
}

fn for_guest(op: u16, len: u32) -> Header {
    Header {
        src_cid: HOST_CID,
        dst_cid: GUEST_CID,
        src_port: 5000,
        dst_port: 40000,
        type_: TYPE_STREAM,
        op,
        len,
        ..Header::default()
    }
}

#[test]
fn fake_backend_tx_packets_reach_the_backend() {
    let mut g = fake_guest();
    g.send(packet(op::RW, 40000, 5002), b"hello");
    g.send(packet(op::REQUEST, 40001, 5003), &[]);
    let sent = &g.dev.backend.sent;
    assert_eq!(sent.len(), 2);
    assert_eq!((sent[0].0.op, sent[0].0.len), (op::RW, 5));
    assert_eq!((sent[0].0.src_port, sent[0].0.dst_port), (40000, 5002));
    assert_eq!(sent[0].1, b"hello");
    assert_eq!((sent[1].0.op, sent[1].1.len()), (op::REQUEST, 0));
    assert_eq!(g.tx_used().iter().map(|&(_, len)| len).collect::<Vec<_>>(), [0, 0]);
    assert!(g.interrupted());

    // A readable header whose payload is cut short is rejected, not sent.
    let mut short = packet(op::RW, 40000, 5002);
    short.len = 100;
    let chain = g.scatter(&[short.to_bytes().as_slice(), &[7; 10]].concat(), &[HEADER_SIZE, 10]);
    g.queue_raw(&chain);
    g.kick_tx();
    assert_eq!(g.dev.backend.sent.len(), 2);
    assert_eq!(g.dev.backend.rejected.len(), 1);
    assert_eq!(g.dev.backend.rejected[0].len, 100);
    assert_eq!(g.tx_used().len(), 1);
}

#[test]
fn fake_backend_pending_rx_waits_for_a_buffer_then_lands_in_the_rx_queue() {
    let mut g = fake_guest();
    g.dev.backend.pending.push_back(Some((for_guest(op::RW, 0), b"from the host".to_vec())));
    g.backend();
    assert_eq!(g.dev.backend.events, 1);
    // No rx buffer: the packet stays pending and the guest hears nothing.
    assert!(g.recv().is_empty());
    assert!(!g.interrupted());
    assert!(g.dev.backend.has_pending_rx());

    g.post_rx(2, 4096);
    let out = g.recv();
    assert_eq!(ops(&out), [op::RW]);
    assert_eq!(out[0].0.len, 13, "the device sets the payload length");
    assert_eq!(out[0].1, b"from the host");
    assert_eq!((out[0].0.src_port, out[0].0.dst_port), (5000, 40000));
    assert!(g.interrupted());
    assert!(!g.dev.backend.has_pending_rx());

    // The second buffer is still the device's: the next packet uses it.
    g.dev.backend.pending.push_back(Some((for_guest(op::CREDIT_UPDATE, 0), Vec::new())));
    g.backend();
    assert_eq!(ops(&g.recv()), [op::CREDIT_UPDATE]);
}

#[test]
fn fake_backend_with_nothing_after_all_leaves_the_buffer_with_the_device() {
    let mut g = fake_guest();
    g.dev.backend.pending.push_back(None);
    g.post_rx(1, 4096);
    assert!(g.rx.take_used(&g.mem).is_empty());
    assert!(!g.interrupted());
    g.dev.backend.pending.push_back(Some((for_guest(op::RW, 0), b"late".to_vec())));
    g.backend();
    let out = g.recv();
    assert_eq!(ops(&out), [op::RW]);
    assert_eq!(out[0].1, b"late");
}

#[test]
fn fake_backend_backlog_pauses_tx_until_rx_drains() {
    let mut g = fake_guest();
    g.dev.backend.backlogged = true;
    g.send(packet(op::RW, 1, 2), b"x");
    assert!(g.dev.backend.sent.is_empty());
    assert!(g.tx_used().is_empty());
    // The backlog clears; the next rx pass resumes tx by itself.
    g.dev.backend.backlogged = false;
    g.kick_rx();
    assert_eq!(g.dev.backend.sent.len(), 1);
    assert_eq!(g.tx_used().len(), 1);
}

#[test]
fn fake_backend_event_queue_buffers_are_kept_and_reset_reaches_the_backend() {
    let mut g = fake_guest();
    // The device sends transport events only when told to (after a
    // restore): the driver's event buffers stay with it until then.
    let buf = g.rx_area.alloc(8);
    g.event.add(&g.mem, &[(buf, 8, true)]);
    g.dev.queue_events()[EVENT_QUEUE].write(1).unwrap();
    g.dev.handle(EVENT_QUEUE as u32);
    assert!(g.event.take_used(&g.mem).is_empty());
    assert!(!g.interrupted());

    g.dev.backend.pending.push_back(None);
    g.dev.reset();
    assert_eq!(g.dev.backend.resets, 1);
    assert!(!g.dev.backend.has_pending_rx());
    assert!(matches!(g.dev.common.state(), DeviceState::Inactive));
}

#[test]
fn a_transport_reset_drops_host_connections_and_fills_an_event_buffer() {
    let mut g = Guest::new();
    let listener = UnixListener::bind(g.port_path(5002)).unwrap();
    let mut handler = g.connect(40000, &listener);
    let _ = g.interrupted();

    // No event buffer: nothing reaches the guest, but the connections go.
    assert!(!g.dev.send_transport_reset());
    let mut rest = Vec::new();
    handler.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "the host side of the connection was closed");

    let mut handler = g.connect(40001, &listener);
    let _ = g.interrupted();
    let event_buf = g.rx_area.alloc(8);
    g.mem.write_obj(0xffff_ffffu32, GuestAddress(event_buf)).unwrap();
    let head = g.event.add(&g.mem, &[(event_buf, 8, true)]);
    assert!(g.dev.send_transport_reset());
    assert_eq!(g.event.take_used(&g.mem), [(head, 4)]);
    let id: u32 = g.mem.read_obj(GuestAddress(event_buf)).unwrap();
    assert_eq!(id, EVENT_TRANSPORT_RESET);
    assert!(g.interrupted());
    handler.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());

    // The guest's packets for the old connection are refused, but the
    // answer waits until the guest has handled the reset: it hands an
    // event buffer back.
    g.send(packet(op::RW, 40001, 5002), b"stale");
    g.post_rx(1, 4096);
    assert!(g.recv().is_empty(), "nothing reaches the guest before it has handled the reset");
    let event_buf = g.rx_area.alloc(8);
    g.event.add(&g.mem, &[(event_buf, 8, true)]);
    g.dev.queue_events()[EVENT_QUEUE].write(1).unwrap();
    g.dev.handle(EVENT_QUEUE as u32);
    assert_eq!(ops(&g.recv()), [op::RST]);
    let mut fresh = g.connect(40002, &listener);
    g.send(packet(op::RW, 40002, 5002), b"new");
    let mut got = [0u8; 3];
    fresh.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"new");
}

#[test]
fn with_event_indices_the_next_buffer_the_driver_adds_is_notified() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let (mut ring, mut queue) = Ring::new(&mem, EVENT_RING);
    queue.set_event_idx(true);
    for i in 0..3 {
        ring.add(&mem, &[(0x8_0000 + 8 * i, 8, true)]);
    }
    assert!(queue.pop_descriptor_chain(&mem).is_some());
    request_next_avail_notification(&mut queue, &mem).unwrap();
    // avail_event is the driver's available index (3), not the device's
    // position (1): Linux kicks when the index moves past it.
    let avail_event: u16 = mem.read_obj(GuestAddress(ring.used + 4 + 8 * u64::from(QUEUE_SIZE))).unwrap();
    assert_eq!(avail_event, 3);
}

#[test]
fn fake_backend_is_reset_when_the_driver_breaks_a_queue() {
    let mut g = fake_guest();
    g.mem.write_obj(1000u16, GuestAddress(g.tx.avail + 2)).unwrap();
    g.kick_tx();
    assert!(matches!(g.dev.common.state(), DeviceState::Broken));
    assert_eq!(g.dev.backend.resets, 1);
}
