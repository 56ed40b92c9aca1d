//! The virtio-mmio transport, version 2 (virtio 1.x, no legacy interface).
//!
//! One 4 KiB register window per device, announced to the kernel on its
//! command line. The driver walks the status bits ACKNOWLEDGE, DRIVER,
//! FEATURES_OK, DRIVER_OK; the transport refuses FEATURES_OK for feature sets
//! the device did not offer (or without VERSION_1), accepts queue setup only
//! between FEATURES_OK and DRIVER_OK, and activates the device on DRIVER_OK
//! when every queue is ready and lies in guest memory. Queue notifications
//! normally never reach this code: they are KVM ioeventfds on the
//! QueueNotify register that the device polls directly.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{Activation, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use crate::devices::bus::BusDevice;
use crate::lock;

/// "virt" in little-endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// The non-legacy register layout.
pub const VERSION: u32 = 2;
/// Vendor ID reported to the driver.
pub const VENDOR_ID: u32 = 0;

/// Register offsets within the window.
pub mod reg {
    #![allow(missing_docs)]
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    #![allow(missing_docs)]
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// What a snapshot saves of one virtqueue (virtio-queue's `QueueState`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Where the device goes on reading the available ring.
    pub next_avail: u16,
    /// Where the device goes on writing the used ring.
    pub next_used: u16,
    /// VIRTIO_RING_F_EVENT_IDX is in use.
    pub event_idx_enabled: bool,
    /// The size the driver chose.
    pub size: u16,
    /// The driver marked the queue ready.
    pub ready: bool,
    /// Guest address of the descriptor table.
    pub desc_table: u64,
    /// Guest address of the available ring.
    pub avail_ring: u64,
    /// Guest address of the used ring.
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(q: QueueSnapshot) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// What a snapshot saves of a virtio-mmio transport and the life cycle of
/// its device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioSnapshot {
    /// The device type behind the window (checked on restore).
    pub device_type: u32,
    /// The device status register.
    pub status: u32,
    /// The features the driver accepted.
    pub driver_features: u64,
    /// DeviceFeaturesSel.
    pub device_features_select: u32,
    /// DriverFeaturesSel.
    pub driver_features_select: u32,
    /// QueueSel.
    pub queue_select: u32,
    /// Interrupt status bits not yet acknowledged.
    pub interrupt_status: u32,
    /// ConfigGeneration (the configuration spaces here never change: 0).
    pub config_generation: u32,
    /// Every queue: the device's working copy if it is active (with its
    /// indices), else the driver's setup so far.
    pub queues: Vec<QueueSnapshot>,
    /// The device was active (DRIVER_OK accepted and not broken since).
    pub active: bool,
}

/// A virtio device's MMIO register window.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u32,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("status", &self.status)
            .field("driver_features", &self.driver_features)
            .field("queues", &self.queues.len())
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// The transport for `device`, interrupting through `interrupt`.
    pub fn new(device: Arc<Mutex<dyn VirtioDevice>>, mem: GuestMemoryMmap, interrupt: Arc<Interrupt>) -> Self {
        let queues = lock(&device)
            .queue_max_sizes()
            .iter()
            .filter_map(|&max| match Queue::new(max) {
                Ok(q) => Some(q),
                Err(e) => {
                    warn!("virtio-mmio: device declares an invalid queue size {max}: {e}");
                    None
                }
            })
            .collect();
        Self {
            device,
            mem,
            interrupt,
            queues,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
        }
    }

    /// The current device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The transport's and its device's state, for a snapshot. Only
    /// consistent while no vCPU and no device event runs (the VM is paused).
    pub fn snapshot(&self) -> MmioSnapshot {
        let device = lock(&self.device);
        let active = device.active_queues();
        let queues = match &active {
            Some(queues) => queues.iter().cloned().map(QueueSnapshot::from).collect(),
            None => self.queues.iter().map(|q| QueueSnapshot::from(q.state())).collect(),
        };
        MmioSnapshot {
            device_type: device.device_type(),
            status: self.status,
            driver_features: self.driver_features,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            queue_select: self.queue_select,
            interrupt_status: self.interrupt.status(),
            config_generation: 0,
            queues,
            active: active.is_some(),
        }
    }

    /// Puts a freshly created transport (and its device) in the state of
    /// `saved`: registers, queues with their indices, and, if the device
    /// was active, the device activated with those queues. Fails, leaving
    /// the device inactive, if `saved` does not fit this device.
    pub fn restore(&mut self, saved: &MmioSnapshot) -> Result<(), String> {
        let (device_type, max_sizes, offered) = {
            let device = lock(&self.device);
            (device.device_type(), device.queue_max_sizes().to_vec(), device.features())
        };
        if saved.device_type != device_type {
            return Err(format!("device type {} in the snapshot, {device_type} here", saved.device_type));
        }
        let saved_max: Vec<u16> = saved.queues.iter().map(|q| q.max_size).collect();
        if saved_max != max_sizes {
            return Err(format!("queue sizes {saved_max:?} in the snapshot, {max_sizes:?} here"));
        }
        if saved.driver_features & !offered != 0 {
            return Err(format!(
                "the driver accepted features {:#x} that this device does not offer",
                saved.driver_features & !offered
            ));
        }
        let mut queues = Vec::with_capacity(saved.queues.len());
        for (index, q) in saved.queues.iter().enumerate() {
            queues.push(Queue::try_from(QueueState::from(*q)).map_err(|e| format!("queue {index}: {e}"))?);
        }
        if saved.active {
            if let Some(index) = queues.iter().position(|q| !q.is_valid(&self.mem)) {
                return Err(format!("queue {index} is not ready or not in guest memory"));
            }
        }
        self.status = saved.status;
        self.driver_features = saved.driver_features;
        self.device_features_select = saved.device_features_select;
        self.driver_features_select = saved.driver_features_select;
        self.queue_select = saved.queue_select;
        self.interrupt.set_status(saved.interrupt_status);
        self.queues = saved.queues.iter().filter_map(|q| Queue::try_from(QueueState::from(*q)).ok()).collect();
        if saved.active {
            let activation = Activation {
                mem: self.mem.clone(),
                queues,
                interrupt: self.interrupt.clone(),
                acked_features: self.driver_features,
            };
            lock(&self.device).activate(activation).map_err(|e| format!("activation: {e}"))?;
        }
        Ok(())
    }

    fn has_status(&self, set: u32, clear: u32) -> bool {
        self.status & set == set && self.status & clear == 0
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        let index = usize::try_from(self.queue_select).ok()?;
        self.queues.get_mut(index)
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC_VALUE => MAGIC_VALUE,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => lock(&self.device).device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => {
                let features = lock(&self.device).features();
                match self.device_features_select {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => 0,
            _ => {
                debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let queue_setup_allowed = self.has_status(status::FEATURES_OK, status::DRIVER_OK | status::FAILED);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_select = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_select = value,
            reg::DRIVER_FEATURES => {
                if !self.has_status(status::DRIVER, status::FEATURES_OK | status::FAILED) {
                    debug!("virtio-mmio: driver features written in status {:#x}", self.status);
                    return;
                }
                let value = u64::from(value);
                match self.driver_features_select {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value,
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (value << 32),
                    select => debug!("virtio-mmio: driver features page {select} ignored"),
                }
            }
            reg::QUEUE_SEL => self.queue_select = value,
            reg::QUEUE_NOTIFY => self.notify(value),
            reg::INTERRUPT_ACK => self.interrupt.acknowledge(value),
            reg::STATUS => self.set_status(value),
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_AVAIL_LOW
            | reg::QUEUE_AVAIL_HIGH
            | reg::QUEUE_USED_LOW
            | reg::QUEUE_USED_HIGH => {
                if !queue_setup_allowed {
                    debug!("virtio-mmio: queue register {offset:#x} written in status {:#x}", self.status);
                    return;
                }
                let Some(queue) = self.selected_queue() else {
                    debug!("virtio-mmio: queue register {offset:#x} written for a queue that does not exist");
                    return;
                };
                match offset {
                    reg::QUEUE_NUM => queue.set_size(value.try_into().unwrap_or(0)),
                    reg::QUEUE_READY => queue.set_ready(value == 1),
                    reg::QUEUE_DESC_LOW => queue.set_desc_table_address(Some(value), None),
                    reg::QUEUE_DESC_HIGH => queue.set_desc_table_address(None, Some(value)),
                    reg::QUEUE_AVAIL_LOW => queue.set_avail_ring_address(Some(value), None),
                    reg::QUEUE_AVAIL_HIGH => queue.set_avail_ring_address(None, Some(value)),
                    reg::QUEUE_USED_LOW => queue.set_used_ring_address(Some(value), None),
                    _ => queue.set_used_ring_address(None, Some(value)),
                }
            }
            _ => debug!("virtio-mmio: write of {value:#x} to unknown register {offset:#x}"),
        }
    }

    /// A queue notification that reached the VMM instead of an ioeventfd.
    fn notify(&mut self, queue: u32) {
        let device = lock(&self.device);
        match usize::try_from(queue).ok().and_then(|i| device.queue_events().get(i)) {
            Some(event) => {
                if let Err(e) = event.write(1) {
                    warn!("virtio-mmio: cannot forward notification of queue {queue}: {e}");
                }
            }
            None => debug!("virtio-mmio: notification for a queue that does not exist ({queue})"),
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = lock(&self.device).features();
        let unoffered = self.driver_features & !offered;
        if unoffered != 0 {
            warn!("virtio-mmio: driver accepted features the device did not offer: {unoffered:#x}");
            return false;
        }
        if self.driver_features & VIRTIO_F_VERSION_1 == 0 {
            warn!("virtio-mmio: driver did not accept VIRTIO_F_VERSION_1; legacy drivers are not supported");
            return false;
        }
        true
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & self.status != self.status {
            warn!("virtio-mmio: driver tried to clear status bits ({:#x} -> {value:#x}) without a reset", self.status);
            return;
        }
        let mut value = value;
        let added = value & !self.status;
        if added & status::FEATURES_OK != 0 && !self.features_acceptable() {
            value &= !status::FEATURES_OK;
        }
        if added & status::DRIVER_OK != 0 {
            if value & status::FEATURES_OK == 0 {
                warn!("virtio-mmio: DRIVER_OK without FEATURES_OK");
                value &= !status::DRIVER_OK;
            } else if !self.activate() {
                value |= status::DEVICE_NEEDS_RESET;
                if let Err(e) = self.interrupt.signal_config_change() {
                    warn!("virtio-mmio: cannot signal the device failure: {e}");
                }
            }
        }
        self.status = value;
    }

    /// Hands the queues to the device; false if they are not usable.
    fn activate(&mut self) -> bool {
        for (index, queue) in self.queues.iter().enumerate() {
            if !queue.is_valid(&self.mem) {
                warn!("virtio-mmio: queue {index} is not ready or not in guest memory; device not activated");
                return false;
            }
        }
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (index, queue) in self.queues.iter().enumerate() {
            match Queue::try_from(queue.state()) {
                Ok(mut copy) => {
                    copy.set_event_idx(event_idx);
                    queues.push(copy);
                }
                Err(e) => {
                    warn!("virtio-mmio: queue {index} is invalid ({e}); device not activated");
                    return false;
                }
            }
        }
        let activation = Activation {
            mem: self.mem.clone(),
            queues,
            interrupt: self.interrupt.clone(),
            acked_features: self.driver_features,
        };
        match lock(&self.device).activate(activation) {
            Ok(()) => true,
            Err(e) => {
                warn!("virtio-mmio: device activation failed: {e}");
                false
            }
        }
    }

    fn reset(&mut self) {
        lock(&self.device).reset();
        for queue in &mut self.queues {
            queue.reset();
        }
        self.interrupt.clear();
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.status = 0;
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            lock(&self.device).read_config(offset - reg::CONFIG, data);
            return;
        }
        match <&mut [u8; 4]>::try_from(&mut *data) {
            Ok(word) if offset.is_multiple_of(4) => *word = self.read_register(offset).to_le_bytes(),
            _ => {
                debug!("virtio-mmio: {}-byte read at {offset:#x} ignored", data.len());
                data.fill(0);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            lock(&self.device).write_config(offset - reg::CONFIG, data);
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(word) if offset.is_multiple_of(4) => self.write_register(offset, u32::from_le_bytes(word)),
            _ => debug!("virtio-mmio: {}-byte write at {offset:#x} ignored", data.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::common::VirtioCommon;
    use crate::devices::virtio::{read_config_bytes, ActivateError, INTERRUPT_VRING};
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const FEATURE_X: u64 = 1 << 5;

    struct Dummy {
        common: VirtioCommon,
        config: [u8; 8],
        activated: Option<Activation>,
        resets: u32,
    }

    impl Dummy {
        fn new() -> Self {
            Self {
                common: VirtioCommon::new(
                    "dummy",
                    42,
                    VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | FEATURE_X,
                    &[16, 8],
                    Vec::new(),
                )
                .unwrap(),
                config: [1, 2, 3, 4, 5, 6, 7, 8],
                activated: None,
                resets: 0,
            }
        }
    }

    impl VirtioDevice for Dummy {
        fn common(&self) -> &VirtioCommon {
            &self.common
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            read_config_bytes(&self.config, offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            let start = offset as usize;
            self.config[start..start + data.len()].copy_from_slice(data);
        }
        fn active_queues(&self) -> Option<Vec<QueueState>> {
            self.activated.as_ref().map(|a| a.queues.iter().map(Queue::state).collect())
        }
        fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
            if self.activated.is_some() {
                return Err(ActivateError::AlreadyActive);
            }
            self.activated = Some(activation);
            Ok(())
        }
        fn reset(&mut self) {
            self.activated = None;
            self.resets += 1;
        }
    }

    struct Fixture {
        transport: MmioTransport,
        device: Arc<Mutex<Dummy>>,
        irqfd: EventFd,
    }

    fn fixture() -> Fixture {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let device = Arc::new(Mutex::new(Dummy::new()));
        let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(irqfd.try_clone().unwrap()));
        let transport = MmioTransport::new(device.clone(), mem, interrupt);
        Fixture { transport, device, irqfd }
    }

    fn read(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport, features: u64) {
        write(t, reg::STATUS, status::ACKNOWLEDGE);
        write(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        write(t, reg::DRIVER_FEATURES_SEL, 0);
        write(t, reg::DRIVER_FEATURES, features as u32);
        write(t, reg::DRIVER_FEATURES_SEL, 1);
        write(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
        write(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    }

    fn setup_queue(t: &mut MmioTransport, index: u32, base: u64) {
        write(t, reg::QUEUE_SEL, index);
        write(t, reg::QUEUE_NUM, 8);
        write(t, reg::QUEUE_DESC_LOW, base as u32);
        write(t, reg::QUEUE_DESC_HIGH, (base >> 32) as u32);
        write(t, reg::QUEUE_AVAIL_LOW, (base + 0x1000) as u32);
        write(t, reg::QUEUE_AVAIL_HIGH, 0);
        write(t, reg::QUEUE_USED_LOW, (base + 0x2000) as u32);
        write(t, reg::QUEUE_USED_HIGH, 0);
        write(t, reg::QUEUE_READY, 1);
    }

    const ALL_OK: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    /// Moves queue `index` of the activated dummy on as a device does:
    /// `served` chains taken from the available ring and returned used.
    fn advance(f: &Fixture, index: usize, served: u16) {
        let mut device = lock(&f.device);
        let queue = &mut device.activated.as_mut().unwrap().queues[index];
        queue.set_next_avail(queue.next_avail().wrapping_add(served));
        queue.set_next_used(queue.next_used().wrapping_add(served));
    }

    #[test]
    fn a_snapshot_carries_registers_and_live_queue_indices_into_a_new_transport() {
        let mut f = fixture();
        let t = &mut f.transport;
        negotiate(t, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
        setup_queue(t, 0, 0x1_0000);
        setup_queue(t, 1, 0x2_0000);
        write(t, reg::STATUS, ALL_OK);
        write(t, reg::QUEUE_SEL, 1);
        write(t, reg::DEVICE_FEATURES_SEL, 1);
        f.transport.interrupt.signal_used_queue().unwrap();
        advance(&f, 0, 7);
        advance(&f, 1, 300);

        let saved = f.transport.snapshot();
        assert!(saved.active);
        assert_eq!(saved.device_type, 42);
        assert_eq!(saved.status, ALL_OK);
        assert_eq!(saved.queue_select, 1);
        assert_eq!(saved.interrupt_status, INTERRUPT_VRING);
        assert_eq!((saved.queues[0].next_avail, saved.queues[0].next_used), (7, 7));
        assert_eq!((saved.queues[1].next_avail, saved.queues[1].next_used), (300, 300));
        assert!(saved.queues.iter().all(|q| q.ready && q.size == 8 && q.event_idx_enabled));
        assert_eq!(saved.queues[1].desc_table, 0x2_0000);

        // A new transport and device, as a restore creates them.
        let mut g = fixture();
        g.transport.restore(&saved).unwrap();
        let t = &mut g.transport;
        assert_eq!(read(t, reg::STATUS), ALL_OK);
        assert_eq!(read(t, reg::INTERRUPT_STATUS), INTERRUPT_VRING);
        assert_eq!(read(t, reg::QUEUE_READY), 1, "queue 1 is still selected");
        assert_eq!(read(t, reg::DEVICE_FEATURES), 1, "feature page 1 is still selected");
        {
            let device = lock(&g.device);
            let activation = device.activated.as_ref().expect("the restored device is active");
            assert_eq!(activation.acked_features, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
            assert_eq!(activation.queues[0].next_avail(), 7);
            assert_eq!(activation.queues[1].next_used(), 300);
            assert_eq!(activation.queues[1].avail_ring(), 0x2_1000);
            assert!(activation.queues[1].event_idx_enabled());
        }
        assert_eq!(g.transport.snapshot(), saved, "the restored transport saves the same state");
        // The driver can still reset and set the device up again.
        write(&mut g.transport, reg::STATUS, 0);
        assert!(lock(&g.device).activated.is_none());
    }

    #[test]
    fn an_inactive_device_is_restored_mid_setup_and_can_finish_it() {
        let mut f = fixture();
        negotiate(&mut f.transport, VIRTIO_F_VERSION_1);
        setup_queue(&mut f.transport, 0, 0x1_0000);
        let saved = f.transport.snapshot();
        assert!(!saved.active);
        let mut g = fixture();
        g.transport.restore(&saved).unwrap();
        assert!(lock(&g.device).activated.is_none());
        setup_queue(&mut g.transport, 1, 0x2_0000);
        write(&mut g.transport, reg::STATUS, ALL_OK);
        assert_eq!(read(&mut g.transport, reg::STATUS), ALL_OK);
        assert_eq!(lock(&g.device).activated.as_ref().unwrap().queues[0].desc_table(), 0x1_0000);
    }

    #[test]
    fn a_snapshot_that_does_not_fit_the_device_is_refused() {
        let mut f = fixture();
        negotiate(&mut f.transport, VIRTIO_F_VERSION_1);
        setup_queue(&mut f.transport, 0, 0x1_0000);
        setup_queue(&mut f.transport, 1, 0x2_0000);
        write(&mut f.transport, reg::STATUS, ALL_OK);
        let saved = f.transport.snapshot();

        let mut other = saved.clone();
        other.device_type = 2;
        assert!(fixture().transport.restore(&other).unwrap_err().contains("device type"));
        let mut other = saved.clone();
        other.queues.pop();
        assert!(fixture().transport.restore(&other).unwrap_err().contains("queue sizes"));
        let mut other = saved.clone();
        other.driver_features |= 1 << 40;
        assert!(fixture().transport.restore(&other).unwrap_err().contains("does not offer"));
        let mut other = saved.clone();
        other.queues[1].used_ring = 0x1_0000_0000;
        let mut g = fixture();
        assert!(g.transport.restore(&other).unwrap_err().contains("queue 1"));
        assert!(lock(&g.device).activated.is_none());
        let mut other = saved;
        other.queues[0].size = 6;
        assert!(fixture().transport.restore(&other).unwrap_err().contains("queue 0"));
    }

    #[test]
    fn identification_registers() {
        let mut f = fixture();
        let t = &mut f.transport;
        assert_eq!(read(t, reg::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(read(t, reg::VERSION), 2);
        assert_eq!(read(t, reg::DEVICE_ID), 42);
        assert_eq!(read(t, reg::VENDOR_ID), VENDOR_ID);
        write(t, reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(read(t, reg::DEVICE_FEATURES), (VIRTIO_RING_F_EVENT_IDX | FEATURE_X) as u32);
        write(t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(read(t, reg::DEVICE_FEATURES), 1);
        write(t, reg::DEVICE_FEATURES_SEL, 2);
        assert_eq!(read(t, reg::DEVICE_FEATURES), 0);
        write(t, reg::QUEUE_SEL, 1);
        assert_eq!(read(t, reg::QUEUE_NUM_MAX), 8);
        write(t, reg::QUEUE_SEL, 2);
        assert_eq!(read(t, reg::QUEUE_NUM_MAX), 0);
    }

    #[test]
    fn full_setup_activates_the_device_with_its_queues() {
        let mut f = fixture();
        let t = &mut f.transport;
        negotiate(t, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
        assert_ne!(read(t, reg::STATUS) & status::FEATURES_OK, 0);
        setup_queue(t, 0, 0x1_0000);
        setup_queue(t, 1, 0x2_0000);
        write(t, reg::QUEUE_SEL, 1);
        assert_eq!(read(t, reg::QUEUE_READY), 1);
        write(t, reg::STATUS, ALL_OK);
        assert_eq!(read(t, reg::STATUS), ALL_OK);

        let device = lock(&f.device);
        let activation = device.activated.as_ref().unwrap();
        assert_eq!(activation.acked_features, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
        assert_eq!(activation.queues.len(), 2);
        assert_eq!(activation.queues[1].desc_table(), 0x2_0000);
        assert_eq!(activation.queues[1].avail_ring(), 0x2_1000);
        assert_eq!(activation.queues[1].used_ring(), 0x2_2000);
        assert_eq!(activation.queues[0].size(), 8);
        assert!(activation.queues.iter().all(|q| q.event_idx_enabled()));
    }

    #[test]
    fn unoffered_features_or_missing_version_1_refuse_features_ok() {
        let mut f = fixture();
        negotiate(&mut f.transport, VIRTIO_F_VERSION_1 | (1 << 7));
        assert_eq!(read(&mut f.transport, reg::STATUS) & status::FEATURES_OK, 0);

        let mut f = fixture();
        negotiate(&mut f.transport, FEATURE_X);
        assert_eq!(read(&mut f.transport, reg::STATUS) & status::FEATURES_OK, 0);
        write(&mut f.transport, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK);
        assert_eq!(read(&mut f.transport, reg::STATUS) & status::DRIVER_OK, 0);
        assert!(lock(&f.device).activated.is_none());
    }

    #[test]
    fn queues_outside_guest_memory_fail_activation_with_needs_reset() {
        let mut f = fixture();
        let t = &mut f.transport;
        negotiate(t, VIRTIO_F_VERSION_1);
        setup_queue(t, 0, 0x1_0000);
        setup_queue(t, 1, 0x1_0000_0000);
        write(t, reg::STATUS, ALL_OK);
        assert_ne!(read(t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert!(lock(&f.device).activated.is_none());
        assert_ne!(read(t, reg::INTERRUPT_STATUS) & crate::devices::virtio::INTERRUPT_CONFIG, 0);
        assert!(f.irqfd.read().unwrap() >= 1);
    }

    #[test]
    fn a_queue_left_not_ready_fails_activation() {
        let mut f = fixture();
        let t = &mut f.transport;
        negotiate(t, VIRTIO_F_VERSION_1);
        setup_queue(t, 0, 0x1_0000);
        write(t, reg::STATUS, ALL_OK);
        assert!(lock(&f.device).activated.is_none());
    }

    #[test]
    fn queue_registers_are_ignored_outside_the_setup_phase() {
        let mut f = fixture();
        let t = &mut f.transport;
        write(t, reg::QUEUE_SEL, 0);
        write(t, reg::QUEUE_READY, 1);
        assert_eq!(read(t, reg::QUEUE_READY), 0, "before FEATURES_OK");
        negotiate(t, VIRTIO_F_VERSION_1);
        setup_queue(t, 0, 0x1_0000);
        setup_queue(t, 1, 0x2_0000);
        write(t, reg::STATUS, ALL_OK);
        write(t, reg::QUEUE_SEL, 0);
        write(t, reg::QUEUE_READY, 0);
        assert_eq!(read(t, reg::QUEUE_READY), 1, "after DRIVER_OK");
    }

    #[test]
    fn invalid_queue_size_is_not_accepted() {
        let mut f = fixture();
        let t = &mut f.transport;
        negotiate(t, VIRTIO_F_VERSION_1);
        setup_queue(t, 0, 0x1_0000);
        write(t, reg::QUEUE_NUM, 6);
        write(t, reg::QUEUE_NUM, 0x1_0000);
        setup_queue(t, 1, 0x2_0000);
        write(t, reg::STATUS, ALL_OK);
        let device = lock(&f.device);
        assert_eq!(device.activated.as_ref().unwrap().queues[0].size(), 8);
    }

    #[test]
    fn clearing_status_bits_needs_a_reset_and_reset_clears_everything() {
        let mut f = fixture();
        let t = &mut f.transport;
        negotiate(t, VIRTIO_F_VERSION_1);
        setup_queue(t, 0, 0x1_0000);
        setup_queue(t, 1, 0x2_0000);
        write(t, reg::STATUS, ALL_OK);
        write(t, reg::STATUS, status::ACKNOWLEDGE);
        assert_eq!(read(t, reg::STATUS), ALL_OK);

        t.interrupt.signal_used_queue().unwrap();
        write(t, reg::STATUS, 0);
        assert_eq!(read(t, reg::STATUS), 0);
        assert_eq!(read(t, reg::INTERRUPT_STATUS), 0);
        write(t, reg::QUEUE_SEL, 0);
        assert_eq!(read(t, reg::QUEUE_READY), 0);
        let device = lock(&f.device);
        assert!(device.activated.is_none());
        assert_eq!(device.resets, 1);
    }

    #[test]
    fn device_can_be_set_up_again_after_reset() {
        let mut f = fixture();
        let t = &mut f.transport;
        for _ in 0..2 {
            negotiate(t, VIRTIO_F_VERSION_1);
            setup_queue(t, 0, 0x1_0000);
            setup_queue(t, 1, 0x2_0000);
            write(t, reg::STATUS, ALL_OK);
            assert_eq!(read(t, reg::STATUS), ALL_OK);
            write(t, reg::STATUS, 0);
        }
        assert_eq!(lock(&f.device).resets, 2);
    }

    #[test]
    fn interrupt_status_is_acknowledged_bitwise() {
        let mut f = fixture();
        let t = &mut f.transport;
        t.interrupt.signal_used_queue().unwrap();
        t.interrupt.signal_config_change().unwrap();
        assert_eq!(read(t, reg::INTERRUPT_STATUS), 3);
        write(t, reg::INTERRUPT_ACK, INTERRUPT_VRING);
        assert_eq!(read(t, reg::INTERRUPT_STATUS), 2);
    }

    #[test]
    fn notify_register_forwards_to_the_queue_event() {
        let mut f = fixture();
        write(&mut f.transport, reg::QUEUE_NOTIFY, 1);
        write(&mut f.transport, reg::QUEUE_NOTIFY, 7);
        let device = lock(&f.device);
        assert_eq!(device.queue_events()[1].read().unwrap(), 1);
        assert!(device.queue_events()[0].read().is_err());
    }

    #[test]
    fn config_space_is_byte_addressable() {
        let mut f = fixture();
        let t = &mut f.transport;
        let mut byte = [0u8];
        t.read(reg::CONFIG + 2, &mut byte);
        assert_eq!(byte, [3]);
        t.write(reg::CONFIG + 1, &[9, 9]);
        let mut all = [0u8; 8];
        t.read(reg::CONFIG, &mut all);
        assert_eq!(all, [1, 9, 9, 4, 5, 6, 7, 8]);
        t.read(reg::CONFIG + 6, &mut all[..4]);
        assert_eq!(&all[..4], &[7, 8, 0, 0]);
    }

    #[test]
    fn misaligned_or_odd_sized_register_accesses_are_ignored() {
        let mut f = fixture();
        let t = &mut f.transport;
        let mut two = [0xffu8; 2];
        t.read(reg::MAGIC_VALUE, &mut two);
        assert_eq!(two, [0, 0]);
        let mut four = [0xffu8; 4];
        t.read(reg::MAGIC_VALUE + 1, &mut four);
        assert_eq!(four, [0; 4]);
        t.write(reg::STATUS, &[1, 0]);
        t.write(reg::STATUS + 2, &1u32.to_le_bytes());
        assert_eq!(read(t, reg::STATUS), 0);
        assert_eq!(read(t, 0x0f0), 0);
    }
}
