//! The virtio-blk request path with guest memory fully controlled by the
//! input: descriptor table, available ring (index and heads), headers, data
//! and status buffers. Whatever the bytes, serving the queue must not panic
//! or hang, and must not touch memory outside the guest's.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::devices::virtio::block::disk::DiskImage;
use vmm::devices::virtio::queue::drain_queue;

const MEM_SIZE: usize = 0x1_0000;
const QUEUE_SIZE: u16 = 16;
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x100;
const USED_RING: u64 = 0x200;
const DISK_SECTORS: usize = 16;

fuzz_target!(|data: &[u8]| {
    // First byte: bit 0 read-only disk, bit 1 event-index notifications.
    let Some((&flags, contents)) = data.split_first() else {
        return;
    };
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return;
    };
    let len = contents.len().min(MEM_SIZE);
    if mem.write_slice(&contents[..len], GuestAddress(0)).is_err() {
        return;
    }

    let Ok(mut file) = tempfile::tempfile() else {
        return;
    };
    if file.write_all(&[0x5a; DISK_SECTORS * 512]).is_err() {
        return;
    }
    let Ok(mut disk) = DiskImage::from_file(file, flags & 1 != 0) else {
        return;
    };

    let Ok(mut queue) = Queue::new(QUEUE_SIZE) else {
        return;
    };
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
    queue.set_event_idx(flags & 2 != 0);
    queue.set_ready(true);

    // Serve until the device has nothing left or gives up on the queue.
    for _ in 0..4 {
        match drain_queue(&mut queue, &mem, &mut disk) {
            Ok(outcome) if outcome.more => continue,
            _ => break,
        }
    }
});
