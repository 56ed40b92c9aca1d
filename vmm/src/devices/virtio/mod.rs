//! Virtio devices and their MMIO transport.
//!
//! A device implements [`VirtioDevice`] (what the transport needs: type,
//! queues, features, config space, activation, reset) and
//! `event_manager::MutEventSubscriber` (how it does its work on the event
//! loop thread: its queue eventfds, and whatever host-side descriptors its
//! backend has). The transport ([`mmio::MmioTransport`]) owns the register
//! state, negotiates features with the driver, and hands the device its
//! queues when the driver sets DRIVER_OK. Each device lives in its own
//! directory (`block/`, `vsock/`), embeds a [`common::VirtioCommon`] for
//! the state and life cycle all devices share, and serves its queues with
//! the budgeted loop in [`queue`].

pub mod block;
pub mod common;
pub mod mmio;
pub mod queue;
pub mod vsock;

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1 as VERSION_1_BIT;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX as EVENT_IDX_BIT;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use self::common::VirtioCommon;

/// VIRTIO_F_VERSION_1: the device speaks virtio 1.x (no legacy interface).
pub const VIRTIO_F_VERSION_1: u64 = 1 << VERSION_1_BIT;
/// VIRTIO_RING_F_EVENT_IDX: used/avail event indices suppress notifications.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << EVENT_IDX_BIT;

/// Interrupt status bit: a used ring was updated.
pub const INTERRUPT_VRING: u32 = 0x1;
/// Interrupt status bit: the configuration space changed.
pub const INTERRUPT_CONFIG: u32 = 0x2;

/// A device's interrupt: the status bits the driver reads and acknowledges
/// through the transport, and the irqfd that raises its interrupt line.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    /// An interrupt raised through `irqfd`.
    pub fn new(irqfd: EventFd) -> Self {
        Self { status: AtomicU32::new(0), irqfd }
    }

    fn raise(&self, bit: u32) -> io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.irqfd.write(1)
    }

    /// Tells the driver that a used ring has new entries.
    pub fn signal_used_queue(&self) -> io::Result<()> {
        self.raise(INTERRUPT_VRING)
    }

    /// Tells the driver that the configuration space or device status changed.
    pub fn signal_config_change(&self) -> io::Result<()> {
        self.raise(INTERRUPT_CONFIG)
    }

    /// The pending interrupt status bits.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears the acknowledged status bits.
    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// Sets the status bits a snapshot saved (without raising the line: the
    /// interrupt controller's saved state holds what was pending there).
    fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }
}

/// What a device receives when the driver has finished setting it up.
#[derive(Debug)]
pub struct Activation {
    /// Guest memory, for the queues and the buffers they point at.
    pub mem: GuestMemoryMmap,
    /// The configured queues, in queue-index order.
    pub queues: Vec<Queue>,
    /// The device's interrupt.
    pub interrupt: Arc<Interrupt>,
    /// The features the driver accepted.
    pub acked_features: u64,
}

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up a different number of queues than the device has.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues handed over.
        got: usize,
    },
    /// The device was already active.
    #[error("device is already active")]
    AlreadyActive,
    /// A host resource failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// The transport's view of a virtio device. The generic parts come from
/// the [`VirtioCommon`] the device embeds.
pub trait VirtioDevice: Send {
    /// The state shared by all devices.
    fn common(&self) -> &VirtioCommon;
    /// The virtio device ID (2 = block, 19 = vsock, ...).
    fn device_type(&self) -> u32 {
        self.common().device_type()
    }
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16] {
        self.common().queue_max_sizes()
    }
    /// One eventfd per queue, signalled when the driver notifies that queue.
    /// The transport registers them with KVM as ioeventfds.
    fn queue_events(&self) -> &[EventFd] {
        self.common().queue_events()
    }
    /// The features the device offers.
    fn features(&self) -> u64 {
        self.common().features()
    }
    /// Reads the device-specific configuration space; bytes past its end read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.common().read_config(offset, data);
    }
    /// Writes the device-specific configuration space (read-only by default).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.common().write_config(offset, data);
    }
    /// The state of the queues an active device works on (with the indices
    /// it has reached), or `None` if the device is not active.
    fn active_queues(&self) -> Option<Vec<virtio_queue::QueueState>> {
        match self.common().state() {
            common::DeviceState::Active(active) => Some(active.queues.iter().map(Queue::state).collect()),
            _ => None,
        }
    }
    /// Starts the device with its queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Returns the device to its pre-activation state.
    fn reset(&mut self);
}

/// Copies `config[offset..]` into `data`, reading zeros past the end.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(available) = config.get(start..) {
        let n = available.len().min(data.len());
        data[..n].copy_from_slice(&available[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn config_reads_are_clamped_to_the_config_space() {
        let config = [1u8, 2, 3, 4];
        let mut data = [0xffu8; 4];
        read_config_bytes(&config, 2, &mut data);
        assert_eq!(data, [3, 4, 0, 0]);
        read_config_bytes(&config, 4, &mut data);
        assert_eq!(data, [0; 4]);
        read_config_bytes(&config, u64::MAX, &mut data);
        assert_eq!(data, [0; 4]);
    }

    #[test]
    fn interrupt_sets_status_bits_and_fires_the_irqfd() {
        let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
        let interrupt = Interrupt::new(irqfd.try_clone().unwrap());
        interrupt.signal_used_queue().unwrap();
        interrupt.signal_config_change().unwrap();
        assert_eq!(interrupt.status(), INTERRUPT_VRING | INTERRUPT_CONFIG);
        assert_eq!(irqfd.read().unwrap(), 2);
        interrupt.acknowledge(INTERRUPT_VRING);
        assert_eq!(interrupt.status(), INTERRUPT_CONFIG);
        interrupt.clear();
        assert_eq!(interrupt.status(), 0);
    }
}
