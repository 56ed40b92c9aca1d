//! One vsock stream connection between a guest port and a host Unix stream.
//!
//! The connection owns the host end (a non-blocking [`UnixStream`]) and the
//! protocol state towards the guest: the handshake (REQUEST/RESPONSE), data
//! (RW), half-close (SHUTDOWN with RCV/SEND flags), teardown (RST) and
//! credit-based flow control in both directions:
//!
//! - guest to host: the device advertises [`TX_BUF_SIZE`] as `buf_alloc` and
//!   the count of guest bytes written to the Unix stream as `fwd_cnt`. Guest
//!   bytes the stream cannot take yet wait in a buffer that never holds more
//!   than `buf_alloc` bytes: a guest that sends beyond its credit breaks the
//!   protocol and the connection is reset. A CREDIT_UPDATE goes out when the
//!   guest's view of the free space falls below [`CREDIT_UPDATE_THRESHOLD`]
//!   (every packet to the guest carries the current `fwd_cnt` as well).
//! - host to guest: the device reads from the stream only when it has an rx
//!   buffer, and never more than the guest's credit (`buf_alloc` minus bytes
//!   in flight); when the credit runs out it stops reading and asks for an
//!   update with CREDIT_REQUEST.
//!
//! Half-close follows the stream: the guest's SHUTDOWN(SEND) becomes
//! `shutdown(Write)` on the stream once buffered bytes are flushed, and the
//! stream's end-of-file becomes SHUTDOWN(SEND) to the guest. The guest's
//! SHUTDOWN with both flags (its `close()`) is answered with RST once the
//! buffered bytes are flushed, as Linux expects.
//!
//! The connection does not know about queues or epoll: the muxer asks it what
//! to poll for ([`Connection::interest`]), tells it what happened, and asks it
//! for packets when the guest has rx buffers ([`Connection::next_rx`]).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use tracing::debug;
use vmm_sys_util::epoll::EventSet;

use super::packet::{op, shutdown, Header, HOST_CID, TYPE_STREAM};

/// Receive buffer the device offers the guest per connection (`buf_alloc`).
pub const TX_BUF_SIZE: u32 = 256 * 1024;
/// A credit update is sent when the guest believes less than this much of
/// [`TX_BUF_SIZE`] is free (and the device has freed some since it last said).
pub const CREDIT_UPDATE_THRESHOLD: u32 = 64 * 1024;
/// How long a closing connection may take to flush its buffered bytes to
/// the stream before it is reset anyway.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection's address: host port and guest port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    /// The host-side port.
    pub local_port: u32,
    /// The guest-side port.
    pub peer_port: u32,
}

/// Where the connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent (or about to be), awaiting RESPONSE.
    LocalInit,
    /// Data may flow (subject to each side's shutdown).
    Established,
}

/// What the muxer must do with the connection after an event.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It lives on.
    Keep,
    /// Remove it and send the guest an RST (an error, or the end of a
    /// graceful close).
    Reset,
    /// Remove it silently (the guest reset it).
    Remove,
}

/// Control packets waiting for an rx buffer, as bits.
mod pending {
    pub const REQUEST: u8 = 1 << 0;
    pub const RESPONSE: u8 = 1 << 1;
    pub const RW: u8 = 1 << 2;
    pub const SHUTDOWN: u8 = 1 << 3;
    pub const CREDIT_UPDATE: u8 = 1 << 4;
    pub const CREDIT_REQUEST: u8 = 1 << 5;
}

/// What [`Connection::next_rx`] produced.
#[derive(Debug, PartialEq, Eq)]
pub enum RxStep {
    /// A packet: header and payload length (the payload is in the buffer).
    Packet(Header, usize),
    /// Nothing to send right now.
    Idle,
    /// The stream failed: remove the connection and reset the guest side.
    Reset,
}

/// One connection.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    key: ConnKey,
    guest_cid: u64,
    state: State,
    /// Guest bytes not yet written to the stream.
    tx_buf: VecDeque<u8>,
    /// Guest bytes written to the stream, ever.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    last_fwd_cnt_sent: Wrapping<u32>,
    /// The guest's receive buffer, as it last said.
    peer_buf_alloc: u32,
    /// Bytes the guest has consumed, as it last said.
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest, ever.
    rx_cnt: Wrapping<u32>,
    /// SHUTDOWN flags received from the guest.
    peer_shutdown: u32,
    /// The stream reached end-of-file.
    local_eof: bool,
    /// `shutdown(Write)` was done on the stream.
    write_closed: bool,
    pending: u8,
    /// A CREDIT_REQUEST went out and no credit has come back yet.
    credit_requested: bool,
    deadline: Option<Instant>,
}

impl Connection {
    /// A connection the guest asked for (its REQUEST in `request`), to a host
    /// stream already connected; a RESPONSE is pending.
    pub fn peer_init(stream: UnixStream, guest_cid: u64, request: &Header) -> Self {
        let mut conn = Self::new(
            stream,
            guest_cid,
            ConnKey { local_port: request.dst_port, peer_port: request.src_port },
            State::Established,
        );
        conn.update_peer_credit(request);
        conn.pending = pending::RESPONSE;
        conn
    }

    /// A connection a host client asked for (`CONNECT`); a REQUEST is
    /// pending and the guest must answer before `deadline`.
    pub fn local_init(stream: UnixStream, guest_cid: u64, key: ConnKey, deadline: Instant) -> Self {
        let mut conn = Self::new(stream, guest_cid, key, State::LocalInit);
        conn.pending = pending::REQUEST;
        conn.deadline = Some(deadline);
        conn
    }

    fn new(stream: UnixStream, guest_cid: u64, key: ConnKey, state: State) -> Self {
        Self {
            stream,
            key,
            guest_cid,
            state,
            tx_buf: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            peer_shutdown: 0,
            local_eof: false,
            write_closed: false,
            pending: 0,
            credit_requested: false,
            deadline: None,
        }
    }

    /// The connection's address.
    pub fn key(&self) -> ConnKey {
        self.key
    }

    /// The host stream, for polling.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Its state.
    pub fn state(&self) -> State {
        self.state
    }

    /// When it must be reset if it has not moved on (no answer to a REQUEST,
    /// or a close whose buffered bytes never drain).
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Whether a packet is waiting for an rx buffer.
    pub fn has_pending_rx(&self) -> bool {
        self.pending != 0
    }

    /// Guest bytes buffered for the stream.
    pub fn buffered(&self) -> usize {
        self.tx_buf.len()
    }

    /// How many bytes the guest can take now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        // A guest claiming to have consumed more than was sent gets no credit.
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// The readiness to poll the stream for; empty means "do not poll".
    pub fn interest(&self) -> EventSet {
        let mut set = EventSet::empty();
        let may_read = self.state == State::Established
            && !self.local_eof
            && self.peer_shutdown & shutdown::RCV == 0
            && self.pending & pending::RW == 0
            && self.peer_credit() > 0;
        if may_read {
            set |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            set |= EventSet::OUT;
        }
        set
    }

    fn update_peer_credit(&mut self, header: &Header) {
        self.peer_buf_alloc = header.buf_alloc;
        self.peer_fwd_cnt = Wrapping(header.fwd_cnt);
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
    }

    /// Handles a packet the guest sent on this connection.
    pub fn recv_pkt(&mut self, header: &Header, payload: &[u8]) -> Verdict {
        self.update_peer_credit(header);
        match header.op {
            op::RESPONSE if self.state == State::LocalInit => self.established(),
            op::RW => self.recv_data(payload),
            op::CREDIT_UPDATE => Verdict::Keep,
            op::CREDIT_REQUEST => {
                self.pending |= pending::CREDIT_UPDATE;
                Verdict::Keep
            }
            op::SHUTDOWN => self.recv_shutdown(header.flags),
            op::RST => Verdict::Remove,
            other => {
                debug!("vsock: op {other} unexpected on {:?} in state {:?}", self.key, self.state);
                Verdict::Reset
            }
        }
    }

    fn established(&mut self) -> Verdict {
        self.state = State::Established;
        self.deadline = None;
        let reply = format!("OK {}\n", self.key.local_port);
        // The stream is fresh and its buffer empty: a short write means the
        // client is gone or misbehaving.
        match self.stream.write(reply.as_bytes()) {
            Ok(n) if n == reply.len() => Verdict::Keep,
            Ok(_) => Verdict::Reset,
            Err(e) => {
                debug!("vsock: {:?}: cannot confirm the connection: {e}", self.key);
                Verdict::Reset
            }
        }
    }

    fn recv_data(&mut self, payload: &[u8]) -> Verdict {
        if self.state != State::Established || self.peer_shutdown & shutdown::SEND != 0 {
            debug!("vsock: {:?}: data after the guest's end of stream", self.key);
            return Verdict::Reset;
        }
        if self.tx_buf.len() + payload.len() > TX_BUF_SIZE as usize {
            debug!(
                "vsock: {:?}: guest sent {} bytes with {} buffered, beyond its credit",
                self.key,
                payload.len(),
                self.tx_buf.len()
            );
            return Verdict::Reset;
        }
        let mut written = 0;
        if self.tx_buf.is_empty() && !payload.is_empty() {
            written = match write_nonblocking(&mut self.stream, payload) {
                Ok(n) => n,
                Err(e) => {
                    debug!("vsock: {:?}: writing to the host stream: {e}", self.key);
                    return Verdict::Reset;
                }
            };
            self.forwarded(written);
        }
        self.tx_buf.extend(&payload[written..]);
        Verdict::Keep
    }

    /// Counts `n` guest bytes as delivered to the stream.
    fn forwarded(&mut self, n: usize) {
        // `n` is at most one packet's payload or the buffer's length.
        self.fwd_cnt += n as u32;
        self.schedule_credit_update();
    }

    fn schedule_credit_update(&mut self) {
        let unseen = (self.fwd_cnt - self.last_fwd_cnt_sent).0;
        if unseen == 0 {
            return;
        }
        // What the guest believes is in our buffer: everything it sent
        // minus the fwd_cnt it last heard.
        let believed_used = unseen as usize + self.tx_buf.len();
        let believed_free = (TX_BUF_SIZE as usize).saturating_sub(believed_used);
        if believed_free < CREDIT_UPDATE_THRESHOLD as usize {
            self.pending |= pending::CREDIT_UPDATE;
        }
    }

    fn recv_shutdown(&mut self, flags: u32) -> Verdict {
        let new = flags & shutdown::BOTH & !self.peer_shutdown;
        self.peer_shutdown |= flags & shutdown::BOTH;
        if new & shutdown::RCV != 0 {
            // The guest reads no more: stop reading, and let the host peer's
            // writes fail rather than fill a buffer nobody drains.
            self.pending &= !pending::RW;
            let _ = self.stream.shutdown(Shutdown::Read);
        }
        self.after_flush()
    }

    /// Carries out the guest's shutdown once its bytes are all delivered.
    fn after_flush(&mut self) -> Verdict {
        if !self.tx_buf.is_empty() {
            if self.peer_shutdown == shutdown::BOTH && self.deadline.is_none() {
                self.deadline = Some(Instant::now() + CLOSE_TIMEOUT);
            }
            return Verdict::Keep;
        }
        if self.peer_shutdown == shutdown::BOTH {
            return Verdict::Reset;
        }
        if self.peer_shutdown & shutdown::SEND != 0 && !self.write_closed {
            self.write_closed = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        Verdict::Keep
    }

    /// Handles readiness of the stream.
    pub fn on_event(&mut self, events: EventSet) -> Verdict {
        if events.contains(EventSet::ERROR) {
            debug!("vsock: {:?}: error on the host stream", self.key);
            return Verdict::Reset;
        }
        if events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP)
            && self.interest().contains(EventSet::IN)
        {
            // Read when the guest has a buffer for it.
            self.pending |= pending::RW;
        }
        if events.intersects(EventSet::OUT | EventSet::HANG_UP) && !self.tx_buf.is_empty() {
            return self.flush();
        }
        Verdict::Keep
    }

    fn flush(&mut self) -> Verdict {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            let len = front.len();
            match write_nonblocking(&mut self.stream, front) {
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.forwarded(n);
                    if n < len {
                        break;
                    }
                }
                Err(e) => {
                    debug!("vsock: {:?}: writing to the host stream: {e}", self.key);
                    return Verdict::Reset;
                }
            }
        }
        if self.tx_buf.is_empty() {
            // Give back the memory of a burst.
            self.tx_buf = VecDeque::new();
        }
        self.after_flush()
    }

    /// Whether its deadline has passed.
    pub fn expired(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| d <= now)
    }

    fn header(&mut self, op: u16) -> Header {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        // Every packet carries the credit: no separate update needed.
        self.pending &= !pending::CREDIT_UPDATE;
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: TX_BUF_SIZE,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    fn take(&mut self, bit: u8) -> bool {
        let set = self.pending & bit != 0;
        self.pending &= !bit;
        set
    }

    /// The next packet for the guest, with its payload (if any) in `buf`.
    pub fn next_rx(&mut self, buf: &mut [u8]) -> RxStep {
        if self.take(pending::REQUEST) {
            return RxStep::Packet(self.header(op::REQUEST), 0);
        }
        if self.take(pending::RESPONSE) {
            return RxStep::Packet(self.header(op::RESPONSE), 0);
        }
        if self.take(pending::RW) {
            match self.read_stream(buf) {
                Ok(Some(n)) => {
                    let mut header = self.header(op::RW);
                    header.len = n as u32;
                    return RxStep::Packet(header, n);
                }
                Ok(None) => {}
                Err(()) => return RxStep::Reset,
            }
        }
        if self.take(pending::SHUTDOWN) {
            let mut header = self.header(op::SHUTDOWN);
            header.flags = shutdown::SEND;
            return RxStep::Packet(header, 0);
        }
        if self.take(pending::CREDIT_UPDATE) {
            return RxStep::Packet(self.header(op::CREDIT_UPDATE), 0);
        }
        if self.take(pending::CREDIT_REQUEST) {
            return RxStep::Packet(self.header(op::CREDIT_REQUEST), 0);
        }
        RxStep::Idle
    }

    /// Reads stream bytes for the guest: `Ok(Some(n))` for data, `Ok(None)`
    /// when there is nothing to send (no data yet, no credit, or end of
    /// stream, which queues a SHUTDOWN).
    fn read_stream(&mut self, buf: &mut [u8]) -> Result<Option<usize>, ()> {
        let may_read = self.state == State::Established && !self.local_eof && self.peer_shutdown & shutdown::RCV == 0;
        if !may_read {
            return Ok(None);
        }
        let credit = self.peer_credit() as usize;
        let want = buf.len().min(credit);
        if want == 0 {
            self.request_credit();
            return Ok(None);
        }
        loop {
            match self.stream.read(&mut buf[..want]) {
                Ok(0) => {
                    self.local_eof = true;
                    self.pending |= pending::SHUTDOWN;
                    return Ok(None);
                }
                Ok(n) => {
                    // n <= want <= peer credit, which fits in u32.
                    self.rx_cnt += n as u32;
                    if self.peer_credit() == 0 {
                        self.request_credit();
                    }
                    return Ok(Some(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!("vsock: {:?}: reading the host stream: {e}", self.key);
                    return Err(());
                }
            }
        }
    }

    fn request_credit(&mut self) {
        if !self.credit_requested {
            self.credit_requested = true;
            self.pending |= pending::CREDIT_REQUEST;
        }
    }
}

/// Writes as much of `data` as the non-blocking stream takes now.
fn write_nonblocking(stream: &mut UnixStream, data: &[u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < data.len() {
        match stream.write(&data[done..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST_CID: u64 = 3;

    fn guest(op: u16, len: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: 1000,
            dst_port: 5002,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 0,
        }
    }

    /// A guest-initiated connection and the host end of its stream.
    fn established() -> (Connection, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut conn = Connection::peer_init(ours, GUEST_CID, &guest(op::REQUEST, 0));
        let mut buf = [0u8; 64];
        match conn.next_rx(&mut buf) {
            RxStep::Packet(h, 0) => {
                assert_eq!(h.op, op::RESPONSE);
                assert_eq!((h.src_port, h.dst_port), (5002, 1000));
                assert_eq!((h.src_cid, h.dst_cid), (HOST_CID, GUEST_CID));
                assert_eq!(h.buf_alloc, TX_BUF_SIZE);
            }
            other => panic!("{other:?}"),
        }
        (conn, theirs)
    }

    #[test]
    fn guest_data_reaches_the_stream_and_counts_as_forwarded() {
        let (mut conn, mut theirs) = established();
        assert_eq!(conn.recv_pkt(&guest(op::RW, 5), b"hello"), Verdict::Keep);
        let mut got = [0u8; 5];
        theirs.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        let mut buf = [0u8; 16];
        conn.pending |= pending::CREDIT_UPDATE;
        match conn.next_rx(&mut buf) {
            RxStep::Packet(h, _) => assert_eq!((h.op, h.fwd_cnt), (op::CREDIT_UPDATE, 5)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn host_data_respects_the_guest_credit_and_asks_for_more() {
        let (mut conn, mut theirs) = established();
        theirs.write_all(&[7u8; 10_000]).unwrap();
        assert!(conn.interest().contains(EventSet::IN));
        assert_eq!(conn.on_event(EventSet::IN), Verdict::Keep);
        let mut buf = vec![0u8; 65536];
        // The guest offered 4096 bytes.
        match conn.next_rx(&mut buf) {
            RxStep::Packet(h, 4096) => assert_eq!((h.op, h.len), (op::RW, 4096)),
            other => panic!("{other:?}"),
        }
        assert_eq!(conn.peer_credit(), 0);
        assert!(!conn.interest().contains(EventSet::IN));
        match conn.next_rx(&mut buf) {
            RxStep::Packet(h, 0) => assert_eq!(h.op, op::CREDIT_REQUEST),
            other => panic!("{other:?}"),
        }
        // Asked once only.
        conn.pending |= pending::RW;
        assert_eq!(conn.next_rx(&mut buf), RxStep::Idle);
        // The guest consumed 1000 bytes.
        let mut update = guest(op::CREDIT_UPDATE, 0);
        update.fwd_cnt = 1000;
        assert_eq!(conn.recv_pkt(&update, &[]), Verdict::Keep);
        assert_eq!(conn.peer_credit(), 1000);
        assert!(conn.interest().contains(EventSet::IN));
        conn.on_event(EventSet::IN);
        match conn.next_rx(&mut buf) {
            RxStep::Packet(h, 1000) => assert_eq!(h.op, op::RW),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn lying_fwd_cnt_gives_no_credit() {
        let (mut conn, _theirs) = established();
        let mut h = guest(op::CREDIT_UPDATE, 0);
        h.fwd_cnt = 1_000_000;
        conn.recv_pkt(&h, &[]);
        assert_eq!(conn.peer_credit(), 0);
    }

    #[test]
    fn guest_bytes_are_buffered_up_to_the_credit_then_reset() {
        let (mut conn, _theirs) = established();
        let chunk = vec![1u8; 65536];
        // Fill the socket buffer until the stream stops taking bytes.
        while conn.buffered() == 0 {
            assert_eq!(conn.recv_pkt(&guest(op::RW, 65536), &chunk), Verdict::Keep);
        }
        while conn.buffered() + chunk.len() <= TX_BUF_SIZE as usize {
            assert_eq!(conn.recv_pkt(&guest(op::RW, 65536), &chunk), Verdict::Keep);
        }
        assert!(conn.interest().contains(EventSet::OUT));
        // One more packet exceeds what the device offered.
        assert_eq!(conn.recv_pkt(&guest(op::RW, 65536), &chunk), Verdict::Reset);
    }

    #[test]
    fn buffered_bytes_flush_when_the_stream_drains_and_credit_is_updated() {
        let (mut conn, mut theirs) = established();
        let chunk = vec![3u8; 65536];
        while conn.buffered() == 0 {
            conn.recv_pkt(&guest(op::RW, 65536), &chunk);
        }
        conn.recv_pkt(&guest(op::RW, 65536), &chunk);
        let total_sent = conn.fwd_cnt.0 as usize + conn.buffered();
        // The reader drains everything.
        let mut drained = 0;
        let mut sink = vec![0u8; 1 << 20];
        theirs.set_nonblocking(true).unwrap();
        while drained < total_sent {
            match theirs.read(&mut sink) {
                Ok(n) => drained += n,
                Err(_) => assert_eq!(conn.on_event(EventSet::OUT), Verdict::Keep),
            }
        }
        assert_eq!(conn.buffered(), 0);
        assert_eq!(conn.fwd_cnt.0 as usize, total_sent);
        assert!(!conn.interest().contains(EventSet::OUT));
        let mut buf = [0u8; 16];
        // The guest was told about the freed space.
        let mut saw_update = false;
        while let RxStep::Packet(h, _) = conn.next_rx(&mut buf) {
            if h.op == op::CREDIT_UPDATE {
                assert_eq!(h.fwd_cnt as usize, total_sent);
                saw_update = true;
            }
        }
        assert!(saw_update);
    }

    #[test]
    fn half_close_in_both_directions() {
        let (mut conn, mut theirs) = established();
        conn.recv_pkt(&guest(op::RW, 3), b"abc");
        let mut shut = guest(op::SHUTDOWN, 0);
        shut.flags = shutdown::SEND;
        assert_eq!(conn.recv_pkt(&shut, &[]), Verdict::Keep);
        // The handler reads the bytes then end-of-file, and can still answer.
        let mut got = Vec::new();
        theirs.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"abc");
        theirs.write_all(b"reply").unwrap();
        theirs.shutdown(Shutdown::Write).unwrap();
        conn.on_event(EventSet::IN);
        let mut buf = [0u8; 64];
        match conn.next_rx(&mut buf) {
            RxStep::Packet(h, 5) => assert_eq!(&buf[..5], b"reply", "{h:?}"),
            other => panic!("{other:?}"),
        }
        conn.on_event(EventSet::IN);
        match conn.next_rx(&mut buf) {
            RxStep::Packet(h, 0) => assert_eq!((h.op, h.flags), (op::SHUTDOWN, shutdown::SEND)),
            other => panic!("{other:?}"),
        }
        assert_eq!(conn.interest(), EventSet::empty());
        // Data after the guest's own SHUTDOWN(SEND) breaks the protocol.
        assert_eq!(conn.recv_pkt(&guest(op::RW, 1), b"x"), Verdict::Reset);
    }

    #[test]
    fn guest_close_is_answered_with_reset_after_the_flush() {
        let (mut conn, mut theirs) = established();
        let chunk = vec![5u8; 65536];
        while conn.buffered() == 0 {
            conn.recv_pkt(&guest(op::RW, 65536), &chunk);
        }
        let mut close = guest(op::SHUTDOWN, 0);
        close.flags = shutdown::BOTH;
        assert_eq!(conn.recv_pkt(&close, &[]), Verdict::Keep);
        assert!(conn.deadline().is_some());
        assert!(conn.expired(Instant::now() + CLOSE_TIMEOUT + Duration::from_millis(1)));
        theirs.set_nonblocking(true).unwrap();
        let mut sink = vec![0u8; 1 << 20];
        loop {
            let _ = theirs.read(&mut sink);
            match conn.on_event(EventSet::OUT) {
                Verdict::Keep => continue,
                Verdict::Reset => break,
                Verdict::Remove => panic!("unexpected"),
            }
        }
        assert_eq!(conn.buffered(), 0);
    }

    #[test]
    fn guest_close_without_buffered_bytes_resets_at_once() {
        let (mut conn, _theirs) = established();
        let mut close = guest(op::SHUTDOWN, 0);
        close.flags = shutdown::BOTH;
        assert_eq!(conn.recv_pkt(&close, &[]), Verdict::Reset);
    }

    #[test]
    fn guest_reset_removes_and_unexpected_ops_reset() {
        let (mut conn, _theirs) = established();
        assert_eq!(conn.recv_pkt(&guest(op::RST, 0), &[]), Verdict::Remove);
        let (mut conn, _theirs) = established();
        assert_eq!(conn.recv_pkt(&guest(op::REQUEST, 0), &[]), Verdict::Reset);
        let (mut conn, _theirs) = established();
        assert_eq!(conn.recv_pkt(&guest(op::RESPONSE, 0), &[]), Verdict::Reset);
        let (mut conn, _theirs) = established();
        assert_eq!(conn.recv_pkt(&guest(99, 0), &[]), Verdict::Reset);
    }

    #[test]
    fn host_initiated_connection_waits_for_the_response() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let key = ConnKey { local_port: 1 << 30, peer_port: 5000 };
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut conn = Connection::local_init(ours, GUEST_CID, key, deadline);
        let mut buf = [0u8; 16];
        match conn.next_rx(&mut buf) {
            RxStep::Packet(h, 0) => {
                assert_eq!(h.op, op::REQUEST);
                assert_eq!((h.src_port, h.dst_port), (1 << 30, 5000));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(conn.interest(), EventSet::empty());
        // Data before the response is a protocol error.
        let mut early = guest(op::RW, 1);
        early.src_port = 5000;
        early.dst_port = 1 << 30;
        let mut probe = Connection::local_init(UnixStream::pair().unwrap().0, GUEST_CID, key, deadline);
        assert_eq!(probe.recv_pkt(&early, b"x"), Verdict::Reset);

        assert_eq!(conn.recv_pkt(&guest(op::RESPONSE, 0), &[]), Verdict::Keep);
        assert_eq!(conn.state(), State::Established);
        assert_eq!(conn.deadline(), None);
        let mut line = [0u8; 14];
        theirs.read_exact(&mut line).unwrap();
        assert_eq!(&line, format!("OK {}\n", 1u32 << 30).as_bytes());
    }

    #[test]
    fn host_stream_error_resets() {
        let (mut conn, theirs) = established();
        drop(theirs);
        // Writing to a closed peer fails.
        assert_eq!(conn.recv_pkt(&guest(op::RW, 1), b"x"), Verdict::Reset);
        let (mut conn, _theirs) = established();
        assert_eq!(conn.on_event(EventSet::ERROR), Verdict::Reset);
    }

    #[test]
    fn credit_request_is_answered() {
        let (mut conn, _theirs) = established();
        conn.recv_pkt(&guest(op::CREDIT_REQUEST, 0), &[]);
        let mut buf = [0u8; 16];
        match conn.next_rx(&mut buf) {
            RxStep::Packet(h, 0) => {
                assert_eq!((h.op, h.buf_alloc), (op::CREDIT_UPDATE, TX_BUF_SIZE))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(conn.next_rx(&mut buf), RxStep::Idle);
    }
}
