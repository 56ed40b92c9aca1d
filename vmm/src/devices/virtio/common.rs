//! What every virtio device keeps and does the same way: its identity,
//! offered features, read-only configuration space and queue eventfds; its
//! activation state (the guest memory, queues, interrupt and acked features
//! the transport handed over); and what it does after serving its queues
//! (interrupt the driver, come back for more, or give up on a broken queue
//! until the driver resets the device). Devices embed a [`VirtioCommon`]
//! and delegate the generic parts of [`VirtioDevice`](super::VirtioDevice)
//! to it.

use std::io;

use tracing::{debug, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::queue::{QueueError, QueueOutcome};
use super::{read_config_bytes, ActivateError, Activation};

/// Where a device is in its life cycle.
#[derive(Debug)]
pub enum DeviceState {
    /// Not set up by the driver (or reset).
    Inactive,
    /// Running with what the transport handed over.
    Active(Activation),
    /// The driver broke a queue; the device is idle until it resets.
    Broken,
}

/// The state shared by all virtio devices.
#[derive(Debug)]
pub struct VirtioCommon {
    name: &'static str,
    device_type: u32,
    features: u64,
    queue_sizes: Vec<u16>,
    queue_events: Vec<EventFd>,
    config: Vec<u8>,
    state: DeviceState,
}

impl VirtioCommon {
    /// An inactive device of `device_type` (named `name` in logs) offering
    /// `features`, with one queue of each of `queue_sizes`, and `config` as
    /// its configuration space (the driver cannot write it).
    pub fn new(
        name: &'static str,
        device_type: u32,
        features: u64,
        queue_sizes: &[u16],
        config: Vec<u8>,
    ) -> io::Result<Self> {
        Ok(Self {
            name,
            device_type,
            features,
            queue_sizes: queue_sizes.to_vec(),
            queue_events: queue_sizes.iter().map(|_| EventFd::new(EFD_NONBLOCK)).collect::<io::Result<_>>()?,
            config,
            state: DeviceState::Inactive,
        })
    }

    /// The virtio device ID.
    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    /// The features offered.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Maximum size of each queue.
    pub fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    /// One eventfd per queue.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// Reads the configuration space.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    /// Ignores a driver's write to the configuration space.
    pub fn write_config(&self, offset: u64, data: &[u8]) {
        debug!("{}: ignoring {}-byte config write at {offset:#x}", self.name, data.len());
    }

    /// Where the device is in its life cycle.
    pub fn state(&self) -> &DeviceState {
        &self.state
    }

    /// What the transport handed over, if the device is active.
    pub fn active_mut(&mut self) -> Option<&mut Activation> {
        match &mut self.state {
            DeviceState::Active(activation) => Some(activation),
            _ => None,
        }
    }

    /// Takes over the driver's setup, and schedules a pass over queue
    /// `first` to serve what the driver queued before DRIVER_OK.
    pub fn activate(&mut self, activation: Activation, first: usize) -> Result<(), ActivateError> {
        if !matches!(self.state, DeviceState::Inactive) {
            return Err(ActivateError::AlreadyActive);
        }
        let (expected, got) = (self.queue_sizes.len(), activation.queues.len());
        if got != expected {
            return Err(ActivateError::QueueCount { expected, got });
        }
        self.state = DeviceState::Active(activation);
        self.kick(first)?;
        Ok(())
    }

    /// Returns to the pre-activation state.
    pub fn reset(&mut self) {
        self.state = DeviceState::Inactive;
    }

    /// Schedules a pass over queue `index` on the event loop.
    pub fn kick(&self, index: usize) -> io::Result<()> {
        match self.queue_events.get(index) {
            Some(event) => event.write(1),
            None => Err(io::Error::from(io::ErrorKind::NotFound)),
        }
    }

    /// Acts on passes over the queues, given as (queue index, outcome):
    /// interrupts the driver once if any pass asks for it and reschedules
    /// the queues whose pass used up its budget. On an error the device
    /// breaks until the driver resets it; returns false then.
    pub fn conclude<I>(&mut self, passes: Result<I, QueueError>) -> bool
    where
        I: IntoIterator<Item = (usize, QueueOutcome)>,
    {
        let passes = match passes {
            Ok(passes) => passes,
            Err(e) => {
                warn!("{}: queue is broken, ignoring the device until the driver resets it: {e}", self.name);
                self.state = DeviceState::Broken;
                return false;
            }
        };
        let mut notify = false;
        for (index, outcome) in passes {
            notify |= outcome.notify;
            if outcome.more {
                if let Err(e) = self.kick(index) {
                    warn!("{}: cannot reschedule queue {index}: {e}", self.name);
                }
            }
        }
        if let (true, DeviceState::Active(active)) = (notify, &self.state) {
            if let Err(e) = active.interrupt.signal_used_queue() {
                warn!("{}: cannot interrupt the guest: {e}", self.name);
            }
        }
        true
    }
}
