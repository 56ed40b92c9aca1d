//! virtio-blk: a disk image as a block device, read-only or writable.
//!
//! One request queue. The device offers VIRTIO_BLK_F_RO for read-only images
//! (writes then fail with IOERR), VIRTIO_BLK_F_FLUSH for writable ones,
//! VIRTIO_BLK_F_SEG_MAX so the driver sends large scattered requests in one
//! chain, and event-index notification suppression. Requests are served on the
//! event loop thread when the driver notifies the queue's ioeventfd.

pub mod disk;
pub mod request;

use event_manager::{EventOps, Events, MutEventSubscriber};
use tracing::{debug, warn};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use vmm_sys_util::epoll::EventSet;

use self::disk::DiskImage;
use super::common::VirtioCommon;
use super::queue::drain_queue;
use super::{ActivateError, Activation, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most data buffers per request offered to the driver (the chain also holds
/// the header and the status byte).
pub const SEG_MAX: u32 = 128;

/// A virtio block device.
#[derive(Debug)]
pub struct Block {
    disk: DiskImage,
    common: VirtioCommon,
}

impl Block {
    /// A device serving `disk`.
    pub fn new(disk: DiskImage) -> std::io::Result<Self> {
        let mut features = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | (1 << VIRTIO_BLK_F_SEG_MAX);
        features |= if disk.read_only() { 1 << VIRTIO_BLK_F_RO } else { 1 << VIRTIO_BLK_F_FLUSH };
        // struct virtio_blk_config: capacity (le64), size_max (le32), seg_max (le32).
        let mut config = vec![0u8; 16];
        config[..8].copy_from_slice(&disk.sectors().to_le_bytes());
        config[12..].copy_from_slice(&SEG_MAX.to_le_bytes());
        let common = VirtioCommon::new("virtio-blk", VIRTIO_ID_BLOCK, features, &[QUEUE_SIZE], config)?;
        Ok(Self { disk, common })
    }

    fn process(&mut self) {
        let Some(active) = self.common.active_mut() else {
            debug!("virtio-blk: queue notified while the device is not active");
            return;
        };
        let result = drain_queue(&mut active.queues[0], &active.mem, &mut self.disk);
        self.common.conclude(result.map(|outcome| [(0, outcome)]));
    }
}

impl VirtioDevice for Block {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.common.activate(activation, 0)
    }

    fn reset(&mut self) {
        self.common.reset();
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.common.queue_events()[0], EventSet::IN)) {
            warn!("virtio-blk: cannot poll the queue event: {e}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // The only event is the queue notification.
        let _ = self.common.queue_events()[0].read();
        Block::process(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::common::DeviceState;
    use crate::devices::virtio::Interrupt;
    use std::io::Write;
    use std::sync::Arc;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::GuestMemoryMmap;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn disk(read_only: bool, sectors: u64) -> DiskImage {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&vec![0u8; (sectors * 512) as usize]).unwrap();
        DiskImage::from_file(file, read_only).unwrap()
    }

    #[test]
    fn features_follow_the_image_mode() {
        let ro = Block::new(disk(true, 4)).unwrap();
        assert_ne!(ro.features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(ro.features() & (1 << VIRTIO_BLK_F_FLUSH), 0);
        let rw = Block::new(disk(false, 4)).unwrap();
        assert_eq!(rw.features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(rw.features() & (1 << VIRTIO_BLK_F_FLUSH), 0);
        for dev in [&ro, &rw] {
            assert_ne!(dev.features() & VIRTIO_F_VERSION_1, 0);
            assert_eq!(dev.device_type(), 2);
            assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE]);
        }
    }

    #[test]
    fn config_space_holds_capacity_and_seg_max() {
        let dev = Block::new(disk(true, 9)).unwrap();
        let mut capacity = [0u8; 8];
        dev.read_config(0, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), 9);
        let mut seg_max = [0u8; 4];
        dev.read_config(12, &mut seg_max);
        assert_eq!(u32::from_le_bytes(seg_max), SEG_MAX);
        let mut beyond = [0xffu8; 4];
        dev.read_config(64, &mut beyond);
        assert_eq!(beyond, [0; 4]);
    }

    #[test]
    fn activation_needs_exactly_one_queue_and_kicks_the_queue() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let mut dev = Block::new(disk(true, 1)).unwrap();
        let activation = |queues| Activation {
            mem: mem.clone(),
            queues,
            interrupt: interrupt.clone(),
            acked_features: VIRTIO_F_VERSION_1,
        };
        assert!(matches!(dev.activate(activation(vec![])), Err(ActivateError::QueueCount { expected: 1, got: 0 })));
        dev.activate(activation(vec![Queue::new(QUEUE_SIZE).unwrap()])).unwrap();
        assert_eq!(dev.queue_events()[0].read().unwrap(), 1);
        assert!(matches!(
            dev.activate(activation(vec![Queue::new(QUEUE_SIZE).unwrap()])),
            Err(ActivateError::AlreadyActive)
        ));
        dev.reset();
        dev.activate(activation(vec![Queue::new(QUEUE_SIZE).unwrap()])).unwrap();
    }

    #[test]
    fn a_broken_queue_stops_the_device_until_reset() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let mut dev = Block::new(disk(true, 1)).unwrap();
        let mut queue = Queue::new(16).unwrap();
        queue.set_desc_table_address(Some(0x1000), Some(0));
        queue.set_avail_ring_address(Some(0x2000), Some(0));
        queue.set_used_ring_address(Some(0x3000), Some(0));
        queue.set_ready(true);
        // The available index claims 100 requests in a 16-entry queue.
        mem.write_obj(100u16, GuestAddress(0x2002)).unwrap();
        dev.activate(Activation {
            mem: mem.clone(),
            queues: vec![queue],
            interrupt,
            acked_features: VIRTIO_F_VERSION_1,
        })
        .unwrap();
        Block::process(&mut dev);
        assert!(matches!(dev.common.state(), DeviceState::Broken));
        dev.reset();
        assert!(matches!(dev.common.state(), DeviceState::Inactive));
    }
}
