//! The virtio-vsock tx path with guest memory fully controlled by the input:
//! tx and rx descriptor tables and rings, packet headers (CIDs, ports, ops,
//! lengths, credit fields) and payloads. Packets go to a real muxer with a
//! listening host socket on port 5002, and whatever it answers is written
//! back through the rx queue. Whatever the bytes, this must not panic or
//! hang, and must not touch memory outside the guest's.
#![no_main]

use std::os::unix::net::UnixListener;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::devices::virtio::vsock::packet::MAX_PAYLOAD;
use vmm::devices::virtio::vsock::{process_rx, process_tx, Muxer, VsockBackend};

const MEM_SIZE: usize = 0x1_0000;
const QUEUE_SIZE: u16 = 16;
const GUEST_CID: u64 = 3;
/// (descriptor table, available ring, used ring) of the tx and rx queues.
const TX_RINGS: (u64, u64, u64) = (0x0, 0x100, 0x200);
const RX_RINGS: (u64, u64, u64) = (0x400, 0x500, 0x600);

fn queue((desc, avail, used): (u64, u64, u64), event_idx: bool) -> Option<Queue> {
    let mut queue = Queue::new(QUEUE_SIZE).ok()?;
    queue.set_desc_table_address(Some(desc as u32), Some(0));
    queue.set_avail_ring_address(Some(avail as u32), Some(0));
    queue.set_used_ring_address(Some(used as u32), Some(0));
    queue.set_event_idx(event_idx);
    queue.set_ready(true);
    Some(queue)
}

fn socket_dir() -> Option<&'static tempfile::TempDir> {
    static DIR: OnceLock<Option<tempfile::TempDir>> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().ok()).as_ref()
}

fuzz_target!(|data: &[u8]| {
    // First byte: bit 0 event-index notifications.
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
    let (Some(mut tx), Some(mut rx)) = (queue(TX_RINGS, flags & 1 != 0), queue(RX_RINGS, flags & 1 != 0)) else {
        return;
    };

    let Some(dir) = socket_dir() else {
        return;
    };
    let dir = dir.path();
    let uds = dir.join("vsock.sock");
    let port_path = dir.join("vsock.sock_5002");
    let _ = std::fs::remove_file(&uds);
    let _ = std::fs::remove_file(&port_path);
    let Ok(mut muxer) = Muxer::new(GUEST_CID, &uds) else {
        return;
    };
    let Ok(_listener) = UnixListener::bind(&port_path) else {
        return;
    };

    let mut tx_buf = Vec::new();
    let mut rx_buf = vec![0u8; MAX_PAYLOAD as usize];
    for _ in 0..4 {
        let Ok(tx_outcome) = process_tx(&mut tx, &mem, &mut muxer, &mut tx_buf) else {
            break;
        };
        muxer.process_events();
        let Ok(rx_outcome) = process_rx(&mut rx, &mem, &mut muxer, &mut rx_buf) else {
            break;
        };
        if !tx_outcome.more && !tx_outcome.stalled && !rx_outcome.more {
            break;
        }
    }
    let _ = std::fs::remove_file(&port_path);
});
