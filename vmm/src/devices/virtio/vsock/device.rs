//! The virtio-vsock device: three queues (rx, tx, event) between the guest
//! driver and a [`VsockBackend`] (the Unix-socket [`Muxer`] in production).
//!
//! Work happens on the event loop thread, driven by four descriptors: the
//! ioeventfds of the rx and tx queues (the driver added buffers or packets),
//! the event queue's (ignored: the driver's event buffers are kept for the
//! one event this device sends, the transport reset after a restore), and
//! the backend's descriptor (for the muxer: a host socket is ready). A tx
//! notification moves guest packets into the backend; anything the backend
//! has for the guest is then written into rx buffers, and the guest is
//! interrupted through the irqfd when a used ring changed. Each call serves
//! at most one queue's worth of chains and reschedules itself, so one busy
//! guest cannot starve the other devices on the loop.
//!
//! When the backend has too many replies waiting (the muxer: RSTs, when the
//! guest sends packets for unknown connections faster than it reads
//! replies), tx processing pauses until the guest gives rx buffers back; a
//! guest cannot make the host queue replies without bound.

use std::io;

use event_manager::{EventOps, Events, MutEventSubscriber};
use tracing::{debug, warn};
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::backend::VsockBackend;
use super::muxer::Muxer;
use super::packet::{read_tx, RxBuffer, MAX_PAYLOAD};
use super::VsockConfig;
use crate::devices::virtio::common::VirtioCommon;
use crate::devices::virtio::queue::{drain_queue, Chain, ChainHandler, QueueError, QueueOutcome};
use crate::devices::virtio::{ActivateError, Activation, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};

/// Size of the tx and event queues.
pub const QUEUE_SIZE: u16 = 256;
/// Size of the rx queue. The guest keeps every rx descriptor filled with a
/// receive buffer (32 KiB each with the sandbox kernel's `rx_buf_size`), so
/// this bounds the guest memory they hold: 4 MiB, far more than the 256 KiB
/// a connection may have in flight by default.
pub const RX_QUEUE_SIZE: u16 = 128;
/// Index of the rx queue (device to driver).
pub const RX_QUEUE: usize = 0;
/// Index of the tx queue (driver to device).
pub const TX_QUEUE: usize = 1;
/// Index of the event queue.
pub const EVENT_QUEUE: usize = 2;
/// Event-loop data of the backend's descriptor (queue events use their index).
const BACKEND_EVENT: u32 = 3;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`: the guest must drop its connected
/// sockets (its listening ones stay) and re-read its CID.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// Takes tx chains: guest packets into the backend.
struct TxHandler<'a, B> {
    backend: &'a mut B,
    buf: &'a mut Vec<u8>,
}

impl<B: VsockBackend> ChainHandler for TxHandler<'_, B> {
    fn ready(&self) -> bool {
        !self.backend.rx_backlogged()
    }

    fn serve(&mut self, mem: &GuestMemoryMmap, chain: Chain<'_>) -> Option<u32> {
        match read_tx(mem, chain, self.buf) {
            Ok(header) => self.backend.send_pkt(&header, self.buf),
            Err(e) => {
                debug!("vsock: tx packet refused: {e}");
                if let Some(header) = e.header() {
                    self.backend.reject_pkt(header);
                }
            }
        }
        Some(0)
    }
}

/// Fills rx chains with the backend's packets for the guest.
struct RxHandler<'a, B> {
    backend: &'a mut B,
    buf: &'a mut [u8],
}

impl<B: VsockBackend> ChainHandler for RxHandler<'_, B> {
    fn ready(&self) -> bool {
        self.backend.has_pending_rx()
    }

    fn serve(&mut self, mem: &GuestMemoryMmap, chain: Chain<'_>) -> Option<u32> {
        let rx = match RxBuffer::new(mem, chain) {
            Ok(rx) => rx,
            Err(e) => {
                debug!("vsock: rx buffer refused: {e}");
                return Some(0);
            }
        };
        let room = rx.payload_capacity().min(self.buf.len());
        // Nothing after all: the buffer stays with the device.
        let (header, len) = self.backend.recv_pkt(&mut self.buf[..room])?;
        Some(rx.write(mem, &header, &self.buf[..len]).unwrap_or_else(|e| {
            warn!("vsock: packet for the guest lost: {e}");
            0
        }))
    }
}

/// Asks the driver to notify the queue when it makes another buffer
/// available: with event indices, `avail_event` (after the used ring) set
/// to the driver's current available index; else the used ring's flags
/// cleared.
fn request_next_avail_notification(queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<(), QueueError> {
    if !queue.event_idx_enabled() {
        queue.enable_notification(mem)?;
        return Ok(());
    }
    let avail = queue.avail_idx(mem, std::sync::atomic::Ordering::Acquire)?;
    let at = GuestAddress(queue.used_ring())
        .checked_add(4 + 8 * u64::from(queue.size()))
        .ok_or(QueueError::Queue(virtio_queue::Error::InvalidSize))?;
    mem.write_obj(avail.0.to_le(), at).map_err(|e| QueueError::Queue(virtio_queue::Error::GuestMemory(e)))?;
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    Ok(())
}

/// Moves the guest's tx packets into `backend`. `buf` is scratch space for
/// payloads. The pass stalls while the backend's replies are backlogged.
pub fn process_tx<B: VsockBackend>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    backend: &mut B,
    buf: &mut Vec<u8>,
) -> Result<QueueOutcome, QueueError> {
    drain_queue(queue, mem, &mut TxHandler { backend, buf })
}

/// Writes what `backend` has for the guest into rx buffers. `buf` is scratch
/// space for payloads, at least [`MAX_PAYLOAD`] bytes. The pass ends
/// (stalled) when the backend has nothing more.
pub fn process_rx<B: VsockBackend>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    backend: &mut B,
    buf: &mut [u8],
) -> Result<QueueOutcome, QueueError> {
    drain_queue(queue, mem, &mut RxHandler { backend, buf })
}

/// A virtio-vsock device with its host side, by default the Unix-socket
/// [`Muxer`].
pub struct Vsock<B = Muxer> {
    common: VirtioCommon,
    guest_cid: u64,
    backend: B,
    /// Payload of the tx packet being handled.
    tx_buf: Vec<u8>,
    /// Payload of the rx packet being written ([`MAX_PAYLOAD`] bytes).
    rx_buf: Vec<u8>,
    /// tx processing paused on a backlog of replies.
    tx_stalled: bool,
    /// A transport reset event is with the guest, which has not yet
    /// handed the event buffer back: packets for the guest wait.
    reset_pending: bool,
}

impl<B: std::fmt::Debug> std::fmt::Debug for Vsock<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("guest_cid", &self.guest_cid)
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl Vsock {
    /// A device for `config`: binds `config.uds_path`. The CID must be at
    /// least 3 (0-2 are reserved) and not `u32::MAX` (`VMADDR_CID_ANY`).
    pub fn new(config: &VsockConfig) -> io::Result<Self> {
        if config.guest_cid < 3 || config.guest_cid == u32::MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("guest CID {} is reserved (use 3 to {})", config.guest_cid, u32::MAX - 1),
            ));
        }
        let guest_cid = u64::from(config.guest_cid);
        Self::with_backend(guest_cid, Muxer::new(guest_cid, &config.uds_path)?)
    }

    /// What a snapshot keeps of the device beyond its transport: where the
    /// host's port numbers go on (see [`Muxer::continue_host_ports_from`]).
    pub fn next_host_port(&self) -> u32 {
        self.backend.next_host_port()
    }

    /// Take up the numbering of host ports where a snapshot left it.
    pub fn continue_host_ports_from(&mut self, port: u32) {
        self.backend.continue_host_ports_from(port);
    }
}

impl<B: VsockBackend> Vsock<B> {
    /// A device for the guest `guest_cid` whose host side is `backend`.
    pub fn with_backend(guest_cid: u64, backend: B) -> io::Result<Self> {
        // struct virtio_vsock_config: guest_cid (le64).
        let common = VirtioCommon::new(
            "vsock",
            VIRTIO_ID_VSOCK,
            VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX,
            &[RX_QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE],
            guest_cid.to_le_bytes().to_vec(),
        )?;
        Ok(Self {
            common,
            guest_cid,
            backend,
            tx_buf: Vec::with_capacity(MAX_PAYLOAD as usize),
            rx_buf: vec![0; MAX_PAYLOAD as usize],
            tx_stalled: false,
            reset_pending: false,
        })
    }

    /// Runs both directions: tx first (it may queue replies), then rx, then
    /// tx again if it was waiting for rx to drain.
    fn run_queues(&mut self, tx: bool) {
        let Some(active) = self.common.active_mut() else {
            return;
        };
        let [rx_queue, tx_queue, _] = active.queues.as_mut_slice() else {
            return;
        };
        let mem = &active.mem;
        let (backend, tx_buf, rx_buf) = (&mut self.backend, &mut self.tx_buf, &mut self.rx_buf);
        let tx_stalled = &mut self.tx_stalled;
        let rx_allowed = !self.reset_pending;
        let result = (|| -> Result<_, QueueError> {
            let (mut rx_out, mut tx_out) = (QueueOutcome::default(), QueueOutcome::default());
            if tx || *tx_stalled {
                tx_out |= process_tx(tx_queue, mem, backend, tx_buf)?;
                *tx_stalled = tx_out.stalled;
            }
            if rx_allowed {
                rx_out |= process_rx(rx_queue, mem, backend, rx_buf)?;
            }
            if rx_allowed && *tx_stalled && !backend.rx_backlogged() {
                tx_out |= process_tx(tx_queue, mem, backend, tx_buf)?;
                *tx_stalled = tx_out.stalled;
                rx_out |= process_rx(rx_queue, mem, backend, rx_buf)?;
            }
            Ok([(RX_QUEUE, rx_out), (TX_QUEUE, tx_out)])
        })();
        if !self.common.conclude(result) {
            self.backend.reset();
        }
    }

    /// Drops every host-side connection and, if the driver is active, puts
    /// a transport reset event (`struct virtio_vsock_event`, a le32 id) in
    /// the first buffer of the event queue and interrupts the guest, as
    /// Firecracker does after restoring a snapshot: connections do not
    /// survive one. Returns whether the event reached the guest.
    ///
    /// Until the driver has handled the event, which it shows by handing
    /// the event buffer back (Linux refills and kicks the event queue right
    /// after handling it), packets for the guest wait: a host connection
    /// made meanwhile would otherwise reach the guest first and then be
    /// reset by the event without the host hearing of it.
    pub fn send_transport_reset(&mut self) -> bool {
        self.backend.reset();
        self.tx_stalled = false;
        self.reset_pending = false;
        let Some(active) = self.common.active_mut() else {
            return false;
        };
        let mem = &active.mem;
        let Some(queue) = active.queues.get_mut(EVENT_QUEUE) else {
            return false;
        };
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            warn!("vsock: the guest has no event buffer; it is not told that its connections were reset");
            return false;
        };
        let head = chain.head_index();
        let event = EVENT_TRANSPORT_RESET.to_le_bytes();
        let buffer = chain.clone().find(|d| d.is_write_only() && d.len() as usize >= event.len());
        let Some(buffer) = buffer else {
            warn!("vsock: the guest's event buffer is too small or not writable");
            let _ = queue.add_used(mem, head, 0);
            return false;
        };
        if let Err(e) = mem.write_slice(&event, buffer.addr()) {
            warn!("vsock: cannot write the transport reset event: {e}");
            return false;
        }
        if let Err(e) = queue.add_used(mem, head, event.len() as u32) {
            warn!("vsock: cannot return the event buffer: {e}");
            return false;
        }
        // Ask for a notification when the driver adds its next buffer. The
        // driver keeps its other event buffers available, so with event
        // indices the threshold is the driver's current available index,
        // not the device's position (virtio-queue's enable_notification).
        match request_next_avail_notification(queue, mem) {
            Ok(()) => self.reset_pending = true,
            Err(e) => warn!("vsock: cannot ask for event queue notifications: {e}"),
        }
        if let Err(e) = active.interrupt.signal_used_queue() {
            warn!("vsock: cannot interrupt the guest for the transport reset: {e}");
        }
        true
    }

    /// Handles one event-loop event, by its data.
    fn handle(&mut self, source: u32) {
        match source {
            BACKEND_EVENT => {
                self.backend.process_events();
                self.run_queues(false);
            }
            index => {
                if let Some(event) = self.common.queue_events().get(index as usize) {
                    // Draining an eventfd that was not signalled is harmless.
                    let _ = event.read();
                }
                match index as usize {
                    RX_QUEUE => self.run_queues(false),
                    TX_QUEUE => self.run_queues(true),
                    // The driver's event buffers are kept for the next
                    // transport reset; one handed back acknowledges the last.
                    EVENT_QUEUE if self.reset_pending => {
                        debug!("vsock: the guest handled the transport reset");
                        self.reset_pending = false;
                        self.run_queues(false);
                    }
                    _ => {}
                }
            }
        }
    }
}

impl<B: VsockBackend> VirtioDevice for Vsock<B> {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        // Serve what the driver queued before DRIVER_OK, and what host
        // clients asked for while the driver was not ready.
        self.common.activate(activation, TX_QUEUE)
    }

    fn reset(&mut self) {
        self.common.reset();
        self.tx_stalled = false;
        self.reset_pending = false;
        self.backend.reset();
    }
}

impl<B: VsockBackend> MutEventSubscriber for Vsock<B> {
    fn init(&mut self, ops: &mut EventOps) {
        for (index, event) in self.common.queue_events().iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(event, index as u32, EventSet::IN)) {
                warn!("vsock: cannot poll queue {index}: {e}");
            }
        }
        if let Err(e) = ops.add(Events::with_data(&self.backend, BACKEND_EVENT, EventSet::IN)) {
            warn!("vsock: cannot poll the backend: {e}");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        self.handle(events.data());
    }
}

#[cfg(test)]
mod tests;
