//! The virtio-vsock device: three queues (rx, tx, event) between the guest
//! driver and the [`Muxer`].
//!
//! Work happens on the event loop thread, driven by four descriptors: the
//! ioeventfds of the rx and tx queues (the driver added buffers or packets),
//! the event queue's (ignored: the device never sends transport events), and
//! the muxer's epoll descriptor (a host socket is ready). A tx notification
//! moves guest packets into the muxer; anything the muxer has for the guest
//! is then written into rx buffers, and the guest is interrupted through the
//! irqfd when a used ring changed. Each call serves at most one queue's worth
//! of chains and reschedules itself, so one busy guest cannot starve the
//! other devices on the loop.
//!
//! When the muxer has too many RSTs waiting (the guest sends packets for
//! unknown connections faster than it reads replies), tx processing pauses
//! until the guest gives rx buffers back; a guest cannot make the host queue
//! replies without bound.

use std::io;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use tracing::{debug, warn};
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::muxer::Muxer;
use super::packet::{read_tx, RxBuffer, MAX_PAYLOAD};
use super::VsockConfig;
use crate::devices::virtio::{
    read_config_bytes, ActivateError, Activation, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};

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
/// Event-loop data of the muxer's descriptor (queue events use their index).
const BACKEND_EVENT: u32 = 3;

/// Why a queue could not be processed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The queue's rings could not be accessed.
    #[error("{0}")]
    Queue(#[from] virtio_queue::Error),
    /// The available index promises chains that cannot be fetched.
    #[error("the available ring index is invalid")]
    InvalidAvailIndex,
}

/// Result of one pass over a queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueOutcome {
    /// The driver must be interrupted.
    pub notify: bool,
    /// The pass used up its budget; call again.
    pub more: bool,
    /// tx only: the pass stopped because the muxer's replies are backlogged.
    pub stalled: bool,
}

fn add_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
) -> Result<(), QueueError> {
    match queue.add_used(mem, head, len) {
        Ok(()) => Ok(()),
        Err(virtio_queue::Error::InvalidDescriptorIndex) => {
            debug!("vsock: chain head {head} is not a descriptor of this queue");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Moves the guest's tx packets into `muxer`. `buf` is scratch space for
/// payloads.
pub fn process_tx(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    muxer: &mut Muxer,
    buf: &mut Vec<u8>,
) -> Result<QueueOutcome, QueueError> {
    let budget = queue.size();
    let mut served: u16 = 0;
    loop {
        queue.disable_notification(mem)?;
        let before = served;
        while served < budget {
            if muxer.rx_backlogged() {
                // Notifications stay off: the device resumes by itself once
                // the guest has taken the replies.
                let notify = served > 0 && queue.needs_notification(mem)?;
                return Ok(QueueOutcome {
                    notify,
                    more: false,
                    stalled: true,
                });
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            served += 1;
            let head = chain.head_index();
            match read_tx(mem, chain, buf) {
                Ok(header) => muxer.send_pkt(&header, buf),
                Err(e) => {
                    debug!("vsock: tx packet refused: {e}");
                    if let Some(header) = e.header() {
                        muxer.reject_pkt(header);
                    }
                }
            }
            add_used(queue, mem, head, 0)?;
        }
        if served == budget {
            let notify = queue.needs_notification(mem)?;
            return Ok(QueueOutcome {
                notify,
                more: true,
                stalled: false,
            });
        }
        if !queue.enable_notification(mem)? {
            break;
        }
        if served == before {
            // More is announced but nothing could be popped.
            return Err(QueueError::InvalidAvailIndex);
        }
    }
    let notify = served > 0 && queue.needs_notification(mem)?;
    Ok(QueueOutcome {
        notify,
        ..QueueOutcome::default()
    })
}

/// Writes what `muxer` has for the guest into rx buffers. `buf` is scratch
/// space for payloads, at least [`MAX_PAYLOAD`] bytes.
pub fn process_rx(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    muxer: &mut Muxer,
    buf: &mut [u8],
) -> Result<QueueOutcome, QueueError> {
    let budget = queue.size();
    let mut served: u16 = 0;
    let mut more = false;
    while muxer.has_pending_rx() {
        if served == budget {
            more = true;
            break;
        }
        let chain = match queue.pop_descriptor_chain(mem) {
            Some(chain) => chain,
            None => {
                // Out of buffers: ask to be told when the driver adds some,
                // and look again in case it just did.
                if !queue.enable_notification(mem)? {
                    break;
                }
                queue
                    .pop_descriptor_chain(mem)
                    .ok_or(QueueError::InvalidAvailIndex)?
            }
        };
        let head = chain.head_index();
        let used = match RxBuffer::new(mem, chain) {
            Ok(rx) => {
                let room = rx.payload_capacity().min(buf.len());
                let Some((header, len)) = muxer.recv_pkt(&mut buf[..room]) else {
                    // Nothing after all: the buffer stays with the device.
                    queue.go_to_previous_position();
                    break;
                };
                match rx.write(mem, &header, &buf[..len]) {
                    Ok(used) => used,
                    Err(e) => {
                        warn!("vsock: packet for the guest lost: {e}");
                        0
                    }
                }
            }
            Err(e) => {
                debug!("vsock: rx buffer refused: {e}");
                0
            }
        };
        served += 1;
        add_used(queue, mem, head, used)?;
    }
    let notify = served > 0 && queue.needs_notification(mem)?;
    Ok(QueueOutcome {
        notify,
        more,
        stalled: false,
    })
}

enum State {
    Inactive,
    Active {
        mem: GuestMemoryMmap,
        queues: Box<[Queue; 3]>,
        interrupt: Arc<Interrupt>,
    },
    /// The driver broke a queue; the device is idle until it resets.
    Broken,
}

/// A virtio-vsock device with its Unix-socket backend.
pub struct Vsock {
    guest_cid: u64,
    muxer: Muxer,
    queue_events: [EventFd; 3],
    state: State,
    /// Payload of the tx packet being handled.
    tx_buf: Vec<u8>,
    /// Payload of the rx packet being written ([`MAX_PAYLOAD`] bytes).
    rx_buf: Vec<u8>,
    /// tx processing paused on a backlog of replies.
    tx_stalled: bool,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("guest_cid", &self.guest_cid)
            .field("muxer", &self.muxer)
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
                format!(
                    "guest CID {} is reserved (use 3 to {})",
                    config.guest_cid,
                    u32::MAX - 1
                ),
            ));
        }
        let guest_cid = u64::from(config.guest_cid);
        Ok(Self {
            guest_cid,
            muxer: Muxer::new(guest_cid, &config.uds_path)?,
            queue_events: [
                EventFd::new(EFD_NONBLOCK)?,
                EventFd::new(EFD_NONBLOCK)?,
                EventFd::new(EFD_NONBLOCK)?,
            ],
            state: State::Inactive,
            tx_buf: Vec::with_capacity(MAX_PAYLOAD as usize),
            rx_buf: vec![0; MAX_PAYLOAD as usize],
            tx_stalled: false,
        })
    }

    /// Runs both directions: tx first (it may queue replies), then rx, then
    /// tx again if it was waiting for rx to drain.
    fn run_queues(&mut self, tx: bool) {
        let State::Active {
            mem,
            queues,
            interrupt,
        } = &mut self.state
        else {
            return;
        };
        let [rx_queue, tx_queue, _] = &mut **queues;
        let result = (|| -> Result<(bool, bool, bool), QueueError> {
            let mut notify = false;
            let (mut more_rx, mut more_tx) = (false, false);
            if tx || self.tx_stalled {
                let out = process_tx(tx_queue, mem, &mut self.muxer, &mut self.tx_buf)?;
                self.tx_stalled = out.stalled;
                notify |= out.notify;
                more_tx |= out.more;
            }
            let out = process_rx(rx_queue, mem, &mut self.muxer, &mut self.rx_buf)?;
            notify |= out.notify;
            more_rx |= out.more;
            if self.tx_stalled && !self.muxer.rx_backlogged() {
                let out = process_tx(tx_queue, mem, &mut self.muxer, &mut self.tx_buf)?;
                self.tx_stalled = out.stalled;
                notify |= out.notify;
                more_tx |= out.more;
                let out = process_rx(rx_queue, mem, &mut self.muxer, &mut self.rx_buf)?;
                notify |= out.notify;
                more_rx |= out.more;
            }
            Ok((notify, more_rx, more_tx))
        })();
        match result {
            Ok((notify, more_rx, more_tx)) => {
                if notify {
                    if let Err(e) = interrupt.signal_used_queue() {
                        warn!("vsock: cannot interrupt the guest: {e}");
                    }
                }
                for (more, index) in [(more_rx, RX_QUEUE), (more_tx, TX_QUEUE)] {
                    if more {
                        if let Err(e) = self.queue_events[index].write(1) {
                            warn!("vsock: cannot reschedule queue {index}: {e}");
                        }
                    }
                }
            }
            Err(e) => {
                warn!(
                    "vsock: queue is broken, ignoring the device until the driver resets it: {e}"
                );
                self.state = State::Broken;
                self.muxer.reset();
            }
        }
    }

    /// Handles one event-loop event, by its data.
    fn handle(&mut self, source: u32) {
        match source {
            BACKEND_EVENT => {
                self.muxer.process_events();
                self.run_queues(false);
            }
            index => {
                if let Some(event) = self.queue_events.get(index as usize) {
                    // Draining an eventfd that was not signalled is harmless.
                    let _ = event.read();
                }
                match index as usize {
                    RX_QUEUE => self.run_queues(false),
                    TX_QUEUE => self.run_queues(true),
                    // The driver's event buffers are kept for events this
                    // device never sends.
                    _ => {}
                }
            }
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[RX_QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config: guest_cid (le64).
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        debug!(
            "vsock: ignoring {}-byte config write at {offset:#x}",
            data.len()
        );
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        if !matches!(self.state, State::Inactive) {
            return Err(ActivateError::AlreadyActive);
        }
        let Activation {
            mem,
            queues,
            interrupt,
            ..
        } = activation;
        let got = queues.len();
        let queues = <[Queue; 3]>::try_from(queues)
            .map_err(|_| ActivateError::QueueCount { expected: 3, got })?;
        self.state = State::Active {
            mem,
            queues: Box::new(queues),
            interrupt,
        };
        // Serve what the driver queued before DRIVER_OK, and what host
        // clients asked for while the driver was not ready.
        self.queue_events[TX_QUEUE].write(1)?;
        Ok(())
    }

    fn reset(&mut self) {
        self.state = State::Inactive;
        self.tx_stalled = false;
        self.muxer.reset();
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        for (index, event) in self.queue_events.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(event, index as u32, EventSet::IN)) {
                warn!("vsock: cannot poll queue {index}: {e}");
            }
        }
        if let Err(e) = ops.add(Events::with_data(&self.muxer, BACKEND_EVENT, EventSet::IN)) {
            warn!("vsock: cannot poll the host sockets: {e}");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        self.handle(events.data());
    }
}

#[cfg(test)]
mod tests;
