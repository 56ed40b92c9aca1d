//! The host end of the vsock device: Unix sockets in Firecracker's convention.
//!
//! - Host-initiated: the muxer listens on `vsock.sock` (the configured
//!   path). A host client connects, sends `CONNECT <port>\n`, and once the
//!   guest accepts (RESPONSE) reads `OK <hostport>\n`, where `hostport` is an
//!   ephemeral port the muxer picked for the host end; from then on the Unix
//!   stream carries the connection's bytes. If the guest refuses (RST) or
//!   does not answer within [`Limits::connect_timeout`], the client's stream is
//!   closed without a reply.
//! - Guest-initiated: a REQUEST to host port `P` is connected to the Unix
//!   socket `<path>_P` (for example `vsock.sock_5002`). If nothing listens
//!   there, the guest gets an RST at once. The muxer connects nowhere else.
//!
//! Connections are keyed by (host port, guest port). Packets whose source is
//! not the guest's CID or whose destination is not the host are dropped;
//! packets for unknown connections are answered with RST (unless they are
//! RSTs themselves).
//!
//! A guest connection to a port without a listener and a packet addressed to
//! another CID are attempts to get past the handlers: each is logged as a
//! warning (the first [`RefusalLog::LOGGED`], then every
//! [`RefusalLog::EVERY`]th with the running count, so a guest cannot flood
//! the host's log).
//!
//! The muxer owns an epoll instance holding the listener, the clients in the
//! middle of their handshake, the connection streams (only while there is
//! something to poll for) and a timer for deadlines. Its descriptor
//! ([`AsRawFd`]) becomes readable when any of them is ready; the device's
//! event loop polls it and calls [`Muxer::process_events`], as Firecracker's
//! vsock backend does. Everything is bounded: connections
//! ([`Limits::max_connections`]), guest bytes buffered per connection
//! ([`TX_BUF_SIZE`](super::connection::TX_BUF_SIZE)), unfinished handshakes, and RSTs waiting for
//! rx buffers ([`Limits::max_pending_resets`]; beyond it
//! [`Muxer::rx_backlogged`] tells the device to stop taking tx packets until
//! the guest drains its rx queue).

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{debug, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::backend::VsockBackend;
use super::connection::{ConnKey, Connection, RxStep, Verdict};
use super::packet::{op, Header, HOST_CID, TYPE_STREAM};
use super::unix::{connect_nonblocking, ConnectLine, HandshakeError};

/// First ephemeral host port for host-initiated connections (ports below are
/// left to services, as in Firecracker).
pub const FIRST_EPHEMERAL_PORT: u32 = 1 << 30;

const LISTENER_TOKEN: u64 = 0;
const TIMER_TOKEN: u64 = 1;
const FIRST_TOKEN: u64 = 2;
/// Epoll events handled per [`Muxer::process_events`] call.
const EVENT_BATCH: usize = 64;

/// Resource bounds of a muxer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Open connections, in either direction. A guest REQUEST beyond it is
    /// reset; a host client beyond it is disconnected.
    pub max_connections: usize,
    /// Of `max_connections`, how many only host-initiated connections may
    /// use: the guest can open at most `max_connections -
    /// reserved_host_connections`, so a guest holding all it can still
    /// leaves room for the host's `CONNECT 5000` (agent, exec, shutdown).
    pub reserved_host_connections: usize,
    /// Host clients connected to `vsock.sock` that have not finished their
    /// `CONNECT` line.
    pub max_handshakes: usize,
    /// RSTs for unknown connections waiting for rx buffers before tx
    /// processing pauses.
    pub max_pending_resets: usize,
    /// How long the guest has to answer a host-initiated REQUEST.
    pub connect_timeout: Duration,
    /// How long a host client has to send its `CONNECT` line.
    pub handshake_timeout: Duration,
}

impl Default for Limits {
    /// With 256 KiB of buffered guest bytes at most per connection, 256
    /// connections bound that memory to 64 MiB; 16 of them are kept for
    /// host-initiated connections. The timeouts are generous because a guest
    /// kernel can be slow to schedule its vsock worker.
    fn default() -> Self {
        Self {
            max_connections: 256,
            reserved_host_connections: 16,
            max_handshakes: 32,
            max_pending_resets: 64,
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(5),
        }
    }
}

/// A packet waiting for an rx buffer.
#[derive(Debug)]
enum RxItem {
    /// The connection has something to send.
    Conn(ConnKey),
    /// An RST for a connection that does not exist (any more).
    Reset { key: ConnKey, type_: u16 },
}

#[derive(Debug)]
struct Entry {
    conn: Connection,
    token: u64,
    /// What the stream is registered for; empty means not registered.
    registered: EventSet,
    in_rxq: bool,
    /// The guest opened it (counts against the guest's share of the limit).
    guest_initiated: bool,
}

#[derive(Debug)]
struct Handshake {
    stream: UnixStream,
    line: ConnectLine,
    deadline: Instant,
}

/// The Unix-socket backend of a vsock device.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    timer: TimerFd,
    timer_armed: Option<Instant>,
    limits: Limits,
    conns: HashMap<ConnKey, Entry>,
    /// Epoll token of each connection stream.
    conn_tokens: HashMap<u64, ConnKey>,
    handshakes: HashMap<u64, Handshake>,
    rxq: VecDeque<RxItem>,
    pending_resets: usize,
    next_token: u64,
    next_local_port: u32,
    refusals: RefusalLog,
}

/// Counts what the guest tried and was refused, and logs it without letting
/// a guest flood the log.
#[derive(Debug, Default)]
struct RefusalLog {
    count: u64,
}

impl RefusalLog {
    /// Refusals logged one by one.
    const LOGGED: u64 = 32;
    /// After that, one line per this many refusals.
    const EVERY: u64 = 1024;

    fn record(&mut self, what: std::fmt::Arguments<'_>) {
        self.count += 1;
        if self.count <= Self::LOGGED || self.count.is_multiple_of(Self::EVERY) {
            warn!(refusals = self.count, "vsock: refused: {what}");
        }
    }
}

impl AsRawFd for Muxer {
    /// The epoll descriptor: readable when [`Muxer::process_events`] has work.
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.uds_path) {
            debug!("vsock: removing {}: {e}", self.uds_path.display());
        }
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl with F_GETFL takes no pointers; `fd` is open.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above, with an integer flag argument.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Muxer {
    /// A muxer for the guest `guest_cid`, listening on `uds_path` with the
    /// default [`Limits`].
    pub fn new(guest_cid: u64, uds_path: &Path) -> io::Result<Self> {
        Self::with_limits(guest_cid, uds_path, Limits::default())
    }

    /// A muxer with explicit limits.
    pub fn with_limits(guest_cid: u64, uds_path: &Path, limits: Limits) -> io::Result<Self> {
        let listener = UnixListener::bind(uds_path)?;
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        let timer = TimerFd::new()?;
        set_nonblocking(timer.as_raw_fd())?;
        epoll.ctl(ControlOperation::Add, listener.as_raw_fd(), EpollEvent::new(EventSet::IN, LISTENER_TOKEN))?;
        epoll.ctl(ControlOperation::Add, timer.as_raw_fd(), EpollEvent::new(EventSet::IN, TIMER_TOKEN))?;
        Ok(Self {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            epoll,
            timer,
            timer_armed: None,
            limits,
            conns: HashMap::new(),
            conn_tokens: HashMap::new(),
            handshakes: HashMap::new(),
            rxq: VecDeque::new(),
            pending_resets: 0,
            next_token: FIRST_TOKEN,
            next_local_port: FIRST_EPHEMERAL_PORT,
            refusals: RefusalLog::default(),
        })
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }
}

impl VsockBackend for Muxer {
    /// Whether a packet is waiting for an rx buffer.
    fn has_pending_rx(&self) -> bool {
        !self.rxq.is_empty()
    }

    /// Whether the device should stop taking tx packets until rx drains.
    fn rx_backlogged(&self) -> bool {
        self.pending_resets >= self.limits.max_pending_resets
    }

    /// Forgets every connection (the driver reset the device); host streams
    /// are closed. Host clients in their handshake are kept.
    fn reset(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove_conn(key);
        }
        self.rxq.clear();
        self.pending_resets = 0;
    }

    /// Handles the ready host descriptors (a batch; the epoll descriptor
    /// stays readable if more are ready).
    fn process_events(&mut self) {
        let mut events = [EpollEvent::default(); EVENT_BATCH];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    warn!("vsock: polling host sockets: {e}");
                }
                return;
            }
        };
        for event in &events[..n] {
            match event.data() {
                LISTENER_TOKEN => self.accept_clients(),
                TIMER_TOKEN => self.expire(),
                token => {
                    if self.handshakes.contains_key(&token) {
                        self.continue_handshake(token);
                    } else if let Some(&key) = self.conn_tokens.get(&token) {
                        self.on_stream_event(key, event.event_set());
                    }
                }
            }
        }
    }

    /// Handles a packet from the guest.
    fn send_pkt(&mut self, header: &Header, payload: &[u8]) {
        if !self.addressed_guest_to_host(header) {
            return;
        }
        let key = ConnKey { local_port: header.dst_port, peer_port: header.src_port };
        if header.type_ != TYPE_STREAM {
            debug!("vsock: socket type {} is not supported", header.type_);
            self.push_reset_for(header);
            return;
        }
        if let Some(entry) = self.conns.get_mut(&key) {
            let verdict = entry.conn.recv_pkt(header, payload);
            self.apply(key, verdict);
            return;
        }
        match header.op {
            op::REQUEST => self.guest_connect(header),
            op::RST => {}
            other => {
                debug!("vsock: op {other} for unknown connection {key:?}");
                self.push_reset_for(header);
            }
        }
    }

    /// Handles a packet from the guest whose header was readable but whose
    /// payload was not (too long, or cut short): the stream it belongs to
    /// cannot continue, so it is reset.
    fn reject_pkt(&mut self, header: &Header) {
        if !self.addressed_guest_to_host(header) || header.op == op::RST {
            return;
        }
        let key = ConnKey { local_port: header.dst_port, peer_port: header.src_port };
        if self.conns.contains_key(&key) {
            self.remove_conn(key);
        }
        self.push_reset_for(header);
    }

    /// The next packet for the guest, its payload (at most `buf.len()`
    /// bytes) in `buf`; `None` if nothing is waiting.
    fn recv_pkt(&mut self, buf: &mut [u8]) -> Option<(Header, usize)> {
        while let Some(item) = self.rxq.pop_front() {
            match item {
                RxItem::Reset { key, type_ } => {
                    self.pending_resets = self.pending_resets.saturating_sub(1);
                    return Some((self.reset_header(key, type_), 0));
                }
                RxItem::Conn(key) => {
                    let Some(entry) = self.conns.get_mut(&key) else {
                        continue;
                    };
                    entry.in_rxq = false;
                    match entry.conn.next_rx(buf) {
                        RxStep::Packet(header, len) => {
                            self.refresh(key);
                            return Some((header, len));
                        }
                        RxStep::Idle => self.refresh(key),
                        RxStep::Reset => {
                            self.remove_conn(key);
                            return Some((self.reset_header(key, TYPE_STREAM), 0));
                        }
                    }
                }
            }
        }
        None
    }
}

impl Muxer {
    fn addressed_guest_to_host(&mut self, header: &Header) -> bool {
        if header.src_cid != self.guest_cid || header.dst_cid != HOST_CID {
            self.refusals.record(format_args!(
                "guest packet from CID {} port {} to CID {} port {} dropped (guest is {}, only the host, CID {HOST_CID}, is reachable)",
                header.src_cid, header.src_port, header.dst_cid, header.dst_port, self.guest_cid
            ));
            return false;
        }
        true
    }

    fn reset_header(&self, key: ConnKey, type_: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            type_,
            op: op::RST,
            ..Header::default()
        }
    }

    /// Queues an RST answering `header` (unless it is an RST).
    fn push_reset_for(&mut self, header: &Header) {
        if header.op == op::RST {
            return;
        }
        let key = ConnKey { local_port: header.dst_port, peer_port: header.src_port };
        self.push_reset(key, header.type_);
    }

    fn push_reset(&mut self, key: ConnKey, type_: u16) {
        self.pending_resets += 1;
        self.rxq.push_back(RxItem::Reset { key, type_ });
    }

    /// The host socket for guest connections to host port `port`.
    fn port_path(&self, port: u32) -> PathBuf {
        let mut path = OsString::from(self.uds_path.as_os_str());
        path.push(format!("_{port}"));
        PathBuf::from(path)
    }

    /// Connections the guest opened.
    fn guest_connection_count(&self) -> usize {
        self.conns.values().filter(|e| e.guest_initiated).count()
    }

    fn guest_connect(&mut self, request: &Header) {
        let guest_limit = self.limits.max_connections.saturating_sub(self.limits.reserved_host_connections);
        let guest_conns = self.guest_connection_count();
        if self.conns.len() >= self.limits.max_connections || guest_conns >= guest_limit {
            debug!(
                "vsock: refusing guest connection to port {}: {} connections open, {} of the guest's {}",
                request.dst_port,
                self.conns.len(),
                guest_conns,
                guest_limit
            );
            self.push_reset_for(request);
            return;
        }
        let path = self.port_path(request.dst_port);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                let conn = Connection::peer_init(stream, self.guest_cid, request);
                self.insert(conn, true);
            }
            Err(e) => {
                self.refusals.record(format_args!(
                    "guest connection to host port {} (no handler: {}: {e})",
                    request.dst_port,
                    path.display()
                ));
                self.push_reset_for(request);
            }
        }
    }

    fn alloc_token(&mut self) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        token
    }

    fn insert(&mut self, conn: Connection, guest_initiated: bool) {
        let key = conn.key();
        let token = self.alloc_token();
        self.conn_tokens.insert(token, key);
        self.conns.insert(key, Entry { conn, token, registered: EventSet::empty(), in_rxq: false, guest_initiated });
        self.refresh(key);
    }

    fn remove_conn(&mut self, key: ConnKey) {
        let Some(entry) = self.conns.remove(&key) else {
            return;
        };
        self.conn_tokens.remove(&entry.token);
        if !entry.registered.is_empty() {
            // Closing the stream (dropping it) removes it from the epoll
            // set anyway; this keeps the set exact if a descriptor was shared.
            let _ = self.epoll.ctl(ControlOperation::Delete, entry.conn.stream().as_raw_fd(), EpollEvent::default());
        }
    }

    /// Acts on a connection's verdict.
    fn apply(&mut self, key: ConnKey, verdict: Verdict) {
        match verdict {
            Verdict::Keep => self.refresh(key),
            Verdict::Reset => {
                self.remove_conn(key);
                self.push_reset(key, TYPE_STREAM);
            }
            Verdict::Remove => self.remove_conn(key),
        }
    }

    /// Brings the muxer's view of a connection up to date: its epoll
    /// registration, its place in the rx queue, and its deadline.
    fn refresh(&mut self, key: ConnKey) {
        let Some(entry) = self.conns.get_mut(&key) else {
            return;
        };
        let wanted = entry.conn.interest();
        if wanted != entry.registered {
            let fd = entry.conn.stream().as_raw_fd();
            let result = if wanted.is_empty() {
                self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default())
            } else {
                let operation =
                    if entry.registered.is_empty() { ControlOperation::Add } else { ControlOperation::Modify };
                self.epoll.ctl(operation, fd, EpollEvent::new(wanted, entry.token))
            };
            if let Err(e) = result {
                warn!("vsock: cannot poll the host stream of {key:?}: {e}");
                self.apply(key, Verdict::Reset);
                return;
            }
            entry.registered = wanted;
        }
        if entry.conn.has_pending_rx() && !entry.in_rxq {
            entry.in_rxq = true;
            self.rxq.push_back(RxItem::Conn(key));
        }
        if let Some(deadline) = entry.conn.deadline() {
            self.arm_timer(deadline);
        }
    }

    fn on_stream_event(&mut self, key: ConnKey, events: EventSet) {
        if let Some(entry) = self.conns.get_mut(&key) {
            let verdict = entry.conn.on_event(events);
            self.apply(key, verdict);
        }
    }

    fn accept_clients(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => self.start_handshake(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    warn!("vsock: accepting on {}: {e}", self.uds_path.display());
                    return;
                }
            }
        }
    }

    fn start_handshake(&mut self, stream: UnixStream) {
        if self.handshakes.len() >= self.limits.max_handshakes {
            warn!("vsock: {} host clients are already in their handshake; closing a new one", self.handshakes.len());
            return;
        }
        if let Err(e) = stream.set_nonblocking(true) {
            warn!("vsock: host client socket: {e}");
            return;
        }
        let token = self.alloc_token();
        if let Err(e) = self.epoll.ctl(ControlOperation::Add, stream.as_raw_fd(), EpollEvent::new(EventSet::IN, token))
        {
            warn!("vsock: cannot poll a host client: {e}");
            return;
        }
        let deadline = Instant::now() + self.limits.handshake_timeout;
        self.handshakes.insert(token, Handshake { stream, line: ConnectLine::default(), deadline });
        self.arm_timer(deadline);
    }

    fn end_handshake(&mut self, token: u64) -> Option<UnixStream> {
        let handshake = self.handshakes.remove(&token)?;
        let _ = self.epoll.ctl(ControlOperation::Delete, handshake.stream.as_raw_fd(), EpollEvent::default());
        Some(handshake.stream)
    }

    fn continue_handshake(&mut self, token: u64) {
        let Some(handshake) = self.handshakes.get_mut(&token) else {
            return;
        };
        let port = match handshake.line.read_from(&mut handshake.stream) {
            Ok(None) => return,
            Ok(Some(port)) => port,
            // A client that connects and closes without a line is checking
            // that the VMM is up (`Sandbox::is_running`): not worth a warning.
            Err(e @ HandshakeError::Closed) => {
                tracing::debug!("vsock: host client on {}: {e}", self.uds_path.display());
                self.end_handshake(token);
                return;
            }
            Err(e) => {
                warn!("vsock: host client on {}: {e}", self.uds_path.display());
                self.end_handshake(token);
                return;
            }
        };
        let Some(stream) = self.end_handshake(token) else {
            return;
        };
        if self.conns.len() >= self.limits.max_connections {
            warn!("vsock: refusing host connection to guest port {port}: {} connections open", self.conns.len());
            return;
        }
        let Some(local_port) = self.alloc_local_port(port) else {
            warn!("vsock: no free host port for a connection to guest port {port}");
            return;
        };
        let key = ConnKey { local_port, peer_port: port };
        let deadline = Instant::now() + self.limits.connect_timeout;
        self.insert(Connection::local_init(stream, self.guest_cid, key, deadline), false);
    }

    /// The host port the next host-initiated connection will try first.
    pub fn next_host_port(&self) -> u32 {
        self.next_local_port
    }

    /// Go on numbering host-initiated connections from `port` (a value
    /// [`Self::next_host_port`] gave before a snapshot). A restored guest
    /// may still hold sockets of its connections from before the snapshot
    /// until its programs close them: a new connection that reused one of
    /// their host ports would be refused by the guest.
    pub fn continue_host_ports_from(&mut self, port: u32) {
        self.next_local_port =
            if (FIRST_EPHEMERAL_PORT..u32::MAX).contains(&port) { port } else { FIRST_EPHEMERAL_PORT };
    }

    /// An ephemeral host port not used towards `peer_port`.
    fn alloc_local_port(&mut self, peer_port: u32) -> Option<u32> {
        // At most `conns.len()` ports are taken, so this many tries find one.
        for _ in 0..=self.conns.len() {
            let port = self.next_local_port;
            // u32::MAX is VMADDR_PORT_ANY.
            self.next_local_port = if port >= u32::MAX - 1 { FIRST_EPHEMERAL_PORT } else { port + 1 };
            let key = ConnKey { local_port: port, peer_port };
            if !self.conns.contains_key(&key) {
                return Some(port);
            }
        }
        None
    }

    fn arm_timer(&mut self, deadline: Instant) {
        if self.timer_armed.is_some_and(|armed| armed <= deadline) {
            return;
        }
        // A zero duration would disarm the timer.
        let wait = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        match self.timer.reset(wait, None) {
            Ok(()) => self.timer_armed = Some(deadline),
            Err(e) => warn!("vsock: cannot arm the deadline timer: {e}"),
        }
    }

    /// Drops handshakes and resets connections whose deadline passed.
    fn expire(&mut self) {
        // The timer is non-blocking: reading it only clears its readiness.
        let _ = self.timer.wait();
        self.timer_armed = None;
        let now = Instant::now();
        let late: Vec<u64> =
            self.handshakes.iter().filter(|(_, h)| h.deadline <= now).map(|(&token, _)| token).collect();
        for token in late {
            warn!("vsock: host client sent no CONNECT line in time; closing it");
            self.end_handshake(token);
        }
        let late: Vec<ConnKey> = self.conns.values().filter(|e| e.conn.expired(now)).map(|e| e.conn.key()).collect();
        for key in late {
            debug!("vsock: {key:?} timed out");
            self.apply(key, Verdict::Reset);
        }
        let next = self
            .handshakes
            .values()
            .map(|h| h.deadline)
            .chain(self.conns.values().filter_map(|e| e.conn.deadline()))
            .min();
        if let Some(next) = next {
            self.arm_timer(next);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::path::Path;

    use crate::devices::virtio::vsock::connection::TX_BUF_SIZE;
    use crate::devices::virtio::vsock::packet::shutdown;

    const GUEST_CID: u64 = 3;

    fn limits() -> Limits {
        Limits {
            connect_timeout: Duration::from_millis(30),
            handshake_timeout: Duration::from_millis(30),
            ..Limits::default()
        }
    }

    fn guest(op: u16, src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 65536,
            ..Header::default()
        }
    }

    fn drain(m: &mut Muxer) -> Vec<(Header, Vec<u8>)> {
        let mut buf = vec![0u8; 65536];
        let mut out = Vec::new();
        while let Some((h, n)) = m.recv_pkt(&mut buf) {
            out.push((h, buf[..n].to_vec()));
        }
        out
    }

    /// Waits until the muxer's descriptor is readable, then processes it.
    fn pump(m: &mut Muxer) {
        let epoll = Epoll::new().unwrap();
        epoll.ctl(ControlOperation::Add, m.as_raw_fd(), EpollEvent::new(EventSet::IN, 0)).unwrap();
        let mut events = [EpollEvent::default(); 1];
        assert_eq!(epoll.wait(5000, &mut events).unwrap(), 1, "muxer never became ready");
        m.process_events();
    }

    fn ops(packets: &[(Header, Vec<u8>)]) -> Vec<u16> {
        packets.iter().map(|(h, _)| h.op).collect()
    }

    fn setup(dir: &Path, limits: Limits) -> (Muxer, PathBuf) {
        let path = dir.join("vsock.sock");
        (Muxer::with_limits(GUEST_CID, &path, limits).unwrap(), path)
    }

    #[test]
    fn guest_request_without_listener_is_reset_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, _) = setup(dir.path(), limits());
        m.send_pkt(&guest(op::REQUEST, 1234, 6000), &[]);
        let out = drain(&mut m);
        assert_eq!(ops(&out), [op::RST]);
        let rst = out[0].0;
        assert_eq!((rst.src_cid, rst.dst_cid), (HOST_CID, GUEST_CID));
        assert_eq!((rst.src_port, rst.dst_port), (6000, 1234));
        assert_eq!(m.connection_count(), 0);
    }

    #[test]
    fn guest_request_reaches_the_port_socket_and_data_flows() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, path) = setup(dir.path(), limits());
        let listener = UnixListener::bind(format!("{}_5002", path.display())).unwrap();
        m.send_pkt(&guest(op::REQUEST, 1234, 5002), &[]);
        let out = drain(&mut m);
        assert_eq!(ops(&out), [op::RESPONSE]);
        assert_eq!((out[0].0.src_port, out[0].0.dst_port), (5002, 1234));
        let (mut handler, _) = listener.accept().unwrap();
        let mut rw = guest(op::RW, 1234, 5002);
        rw.len = 5;
        m.send_pkt(&rw, b"hello");
        let mut got = [0u8; 5];
        handler.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        handler.write_all(b"world").unwrap();
        pump(&mut m);
        let out = drain(&mut m);
        assert_eq!(ops(&out), [op::RW]);
        assert_eq!(out[0].1, b"world");
        assert_eq!(m.connection_count(), 1);
        // The guest closes: RST, and the handler sees end-of-file.
        let mut close = guest(op::SHUTDOWN, 1234, 5002);
        close.flags = shutdown::BOTH;
        m.send_pkt(&close, &[]);
        assert_eq!(ops(&drain(&mut m)), [op::RST]);
        assert_eq!(m.connection_count(), 0);
        let mut rest = Vec::new();
        handler.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }

    #[test]
    fn packets_with_foreign_cids_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, _) = setup(dir.path(), limits());
        let mut spoofed = guest(op::REQUEST, 1, 6000);
        spoofed.src_cid = 4;
        m.send_pkt(&spoofed, &[]);
        let mut elsewhere = guest(op::REQUEST, 1, 6000);
        elsewhere.dst_cid = 5;
        m.send_pkt(&elsewhere, &[]);
        m.reject_pkt(&spoofed);
        assert!(!m.has_pending_rx());
    }

    #[test]
    fn unknown_connections_are_reset_but_resets_are_not_answered() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, _) = setup(dir.path(), limits());
        for op in [op::RW, op::SHUTDOWN, op::CREDIT_UPDATE, op::CREDIT_REQUEST, op::RESPONSE, 0, 42] {
            m.send_pkt(&guest(op, 10, 20), &[]);
        }
        let out = drain(&mut m);
        assert_eq!(ops(&out), [op::RST; 7]);
        m.send_pkt(&guest(op::RST, 10, 20), &[]);
        assert!(!m.has_pending_rx());
    }

    #[test]
    fn other_socket_types_are_reset_with_their_type() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, path) = setup(dir.path(), limits());
        let _listener = UnixListener::bind(format!("{}_5002", path.display())).unwrap();
        let mut seqpacket = guest(op::REQUEST, 1, 5002);
        seqpacket.type_ = 2;
        m.send_pkt(&seqpacket, &[]);
        let out = drain(&mut m);
        assert_eq!(ops(&out), [op::RST]);
        assert_eq!(out[0].0.type_, 2);
        assert_eq!(m.connection_count(), 0);
    }

    #[test]
    fn requests_beyond_the_connection_limit_are_reset() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, path) = setup(dir.path(), Limits { max_connections: 2, reserved_host_connections: 0, ..limits() });
        let _listener = UnixListener::bind(format!("{}_5002", path.display())).unwrap();
        for port in 1..=3 {
            m.send_pkt(&guest(op::REQUEST, port, 5002), &[]);
        }
        let out = drain(&mut m);
        assert_eq!(ops(&out), [op::RESPONSE, op::RESPONSE, op::RST]);
        assert_eq!(out[2].0.dst_port, 3);
        assert_eq!(m.connection_count(), 2);
        // A duplicate request on a live connection resets it.
        m.send_pkt(&guest(op::REQUEST, 1, 5002), &[]);
        assert_eq!(ops(&drain(&mut m)), [op::RST]);
        assert_eq!(m.connection_count(), 1);
    }

    #[test]
    fn host_connections_have_reserved_slots() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, path) =
            setup(dir.path(), Limits { max_connections: 4, reserved_host_connections: 1, ..Limits::default() });
        let listener = UnixListener::bind(format!("{}_5002", path.display())).unwrap();
        // The guest takes every connection it can get, and then some.
        for port in 1..=5 {
            m.send_pkt(&guest(op::REQUEST, port, 5002), &[]);
        }
        let out = drain(&mut m);
        assert_eq!(ops(&out), [op::RESPONSE, op::RESPONSE, op::RESPONSE, op::RST, op::RST]);
        let _held: Vec<UnixStream> = (0..3).map(|_| listener.accept().unwrap().0).collect();
        assert_eq!(m.connection_count(), 3);
        // The host's CONNECT 5000 still gets through to the guest.
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"CONNECT 5000\n").unwrap();
        let mut request = Vec::new();
        while request.is_empty() {
            pump(&mut m);
            request = drain(&mut m);
        }
        assert_eq!(ops(&request), [op::REQUEST]);
        assert_eq!(request[0].0.dst_port, 5000);
        assert_eq!(m.connection_count(), 4);
        // The guest's share frees up as its connections close.
        let mut close = guest(op::RST, 1, 5002);
        close.flags = 0;
        m.send_pkt(&close, &[]);
        m.send_pkt(&guest(op::REQUEST, 6, 5002), &[]);
        assert_eq!(ops(&drain(&mut m)), [op::RESPONSE]);
    }

    #[test]
    fn host_ports_go_on_from_where_a_snapshot_left_them() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, path) = setup(dir.path(), Limits::default());
        m.continue_host_ports_from(FIRST_EPHEMERAL_PORT + 7);
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"CONNECT 5000\n").unwrap();
        let mut requests = Vec::new();
        while requests.is_empty() {
            pump(&mut m);
            requests.extend(drain(&mut m));
        }
        assert_eq!(requests[0].0.src_port, FIRST_EPHEMERAL_PORT + 7);
        assert_eq!(m.next_host_port(), FIRST_EPHEMERAL_PORT + 8);
        // A value no muxer hands out starts the numbering over.
        for bad in [0, FIRST_EPHEMERAL_PORT - 1, u32::MAX] {
            m.continue_host_ports_from(bad);
            assert_eq!(m.next_host_port(), FIRST_EPHEMERAL_PORT);
        }
    }

    #[test]
    fn host_clients_connect_to_guest_ports_with_their_own_host_ports() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, path) = setup(dir.path(), Limits::default());
        let mut a = UnixStream::connect(&path).unwrap();
        let mut b = UnixStream::connect(&path).unwrap();
        a.write_all(b"CONNECT 5000\n").unwrap();
        b.write_all(b"connect 5000\nearly").unwrap();
        let mut requests = Vec::new();
        while requests.len() < 2 {
            pump(&mut m);
            requests.extend(drain(&mut m));
        }
        assert_eq!(ops(&requests), [op::REQUEST, op::REQUEST]);
        let ports: Vec<u32> = requests.iter().map(|(h, _)| h.src_port).collect();
        assert_ne!(ports[0], ports[1]);
        for (h, _) in &requests {
            assert!(h.src_port >= FIRST_EPHEMERAL_PORT);
            assert_eq!((h.dst_port, h.dst_cid), (5000, GUEST_CID));
            // The guest accepts.
            m.send_pkt(&guest(op::RESPONSE, 5000, h.src_port), &[]);
        }
        let mut replies = Vec::new();
        for client in [&mut a, &mut b] {
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            while byte[0] != b'\n' {
                client.read_exact(&mut byte).unwrap();
                line.push(byte[0]);
            }
            replies.push(String::from_utf8(line).unwrap());
        }
        let mut expected: Vec<String> = ports.iter().map(|p| format!("OK {p}\n")).collect();
        expected.sort();
        replies.sort();
        assert_eq!(replies, expected);
        // Bytes sent right after the CONNECT line are kept for the guest.
        let mut got = Vec::new();
        for _ in 0..100 {
            if got.iter().any(|(h, _): &(Header, Vec<u8>)| h.op == op::RW) {
                break;
            }
            pump(&mut m);
            got.extend(drain(&mut m));
        }
        let data: Vec<_> = got.iter().filter(|(h, _)| h.op == op::RW).collect();
        assert_eq!(data.len(), 1);
        assert_eq!(data[0].1, b"early");
    }

    #[test]
    fn refused_host_connection_closes_the_client() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, path) = setup(dir.path(), limits());
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"CONNECT 7\n").unwrap();
        let mut request = Vec::new();
        while request.is_empty() {
            pump(&mut m);
            request = drain(&mut m);
        }
        let port = request[0].0.src_port;
        m.send_pkt(&guest(op::RST, 7, port), &[]);
        assert_eq!(m.connection_count(), 0);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }

    #[test]
    fn unanswered_host_connection_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, path) = setup(dir.path(), limits());
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"CONNECT 7\n").unwrap();
        let mut request = Vec::new();
        while request.is_empty() {
            pump(&mut m);
            request = drain(&mut m);
        }
        assert_eq!(m.connection_count(), 1);
        // The deadline timer makes the muxer ready (first, perhaps, for the
        // handshake's deadline, which no longer matters).
        for _ in 0..3 {
            if m.connection_count() == 0 {
                break;
            }
            pump(&mut m);
        }
        assert_eq!(m.connection_count(), 0);
        let out = drain(&mut m);
        assert_eq!(ops(&out), [op::RST]);
        assert_eq!(out[0].0.src_port, request[0].0.src_port);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }

    #[test]
    fn bad_or_missing_handshakes_close_the_client() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, path) = setup(dir.path(), limits());
        let mut garbage = UnixStream::connect(&path).unwrap();
        garbage.write_all(b"GET / HTTP/1.1\r\n").unwrap();
        let mut silent = UnixStream::connect(&path).unwrap();
        // Accept both, read the garbage, then the silent one times out.
        for _ in 0..3 {
            pump(&mut m);
        }
        let mut rest = Vec::new();
        garbage.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        silent.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        assert!(!m.has_pending_rx());
        assert_eq!(m.connection_count(), 0);
    }

    #[test]
    fn handshakes_beyond_the_limit_are_closed() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, path) = setup(dir.path(), Limits { max_handshakes: 1, ..Limits::default() });
        let _first = UnixStream::connect(&path).unwrap();
        let mut second = UnixStream::connect(&path).unwrap();
        pump(&mut m);
        let mut rest = Vec::new();
        second.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }

    #[test]
    fn queued_resets_are_bounded_by_backpressure() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, _) = setup(dir.path(), Limits { max_pending_resets: 3, ..limits() });
        for port in 0..3 {
            assert!(!m.rx_backlogged());
            m.send_pkt(&guest(op::RW, port, 9), &[]);
        }
        assert!(m.rx_backlogged());
        let mut buf = [0u8; 16];
        m.recv_pkt(&mut buf).unwrap();
        assert!(!m.rx_backlogged());
    }

    #[test]
    fn malformed_packets_reset_their_connection() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, path) = setup(dir.path(), limits());
        let listener = UnixListener::bind(format!("{}_5002", path.display())).unwrap();
        m.send_pkt(&guest(op::REQUEST, 1, 5002), &[]);
        drain(&mut m);
        let (mut handler, _) = listener.accept().unwrap();
        let mut oversized = guest(op::RW, 1, 5002);
        oversized.len = u32::MAX;
        m.reject_pkt(&oversized);
        assert_eq!(ops(&drain(&mut m)), [op::RST]);
        assert_eq!(m.connection_count(), 0);
        let mut rest = Vec::new();
        handler.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }

    #[test]
    fn guest_exceeding_its_credit_is_reset_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, path) = setup(dir.path(), limits());
        let listener = UnixListener::bind(format!("{}_5002", path.display())).unwrap();
        m.send_pkt(&guest(op::REQUEST, 1, 5002), &[]);
        drain(&mut m);
        // The handler never reads.
        let (_handler, _) = listener.accept().unwrap();
        let chunk = vec![0u8; 65536];
        let mut rw = guest(op::RW, 1, 5002);
        rw.len = 65536;
        let mut sent = 0usize;
        while m.connection_count() == 1 {
            m.send_pkt(&rw, &chunk);
            sent += chunk.len();
            assert!(sent < 64 << 20, "never reset");
        }
        let out = drain(&mut m);
        assert_eq!(out.last().map(|(h, _)| h.op), Some(op::RST));
        // What was accepted never exceeded the socket buffer plus the credit.
        assert!(sent <= 16 << 20, "{sent} bytes accepted");
        assert!(sent > TX_BUF_SIZE as usize);
    }

    #[test]
    fn device_reset_forgets_connections_and_closes_streams() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, path) = setup(dir.path(), limits());
        let listener = UnixListener::bind(format!("{}_5002", path.display())).unwrap();
        m.send_pkt(&guest(op::REQUEST, 1, 5002), &[]);
        let (mut handler, _) = listener.accept().unwrap();
        m.reset();
        assert_eq!(m.connection_count(), 0);
        assert!(!m.has_pending_rx());
        let mut rest = Vec::new();
        handler.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }

    #[test]
    fn the_socket_file_goes_away_with_the_muxer() {
        let dir = tempfile::tempdir().unwrap();
        let (m, path) = setup(dir.path(), limits());
        assert!(path.exists());
        // A second muxer cannot take the same path.
        assert!(Muxer::new(GUEST_CID, &path).is_err());
        drop(m);
        assert!(!path.exists());
    }
}
