//! The budgeted loop every device runs over a queue: pop the chains the
//! driver made available, hand each to the device, return it in the used
//! ring, and tell the caller whether to interrupt the driver and whether to
//! come back for more.
//!
//! A pass serves at most one queue's worth of chains, so one busy device
//! cannot monopolize the event loop. Notifications are suppressed while the
//! pass runs and re-enabled once the queue is empty; a driver whose available
//! index promises chains that cannot be fetched breaks the queue
//! ([`QueueError::InvalidAvailIndex`]) instead of making the device spin.

use std::ops::BitOrAssign;

use tracing::debug;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

/// A descriptor chain popped from a queue.
pub type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

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
    /// The pass stopped because the handler could take no more chains (see
    /// [`ChainHandler::ready`]) while the driver may have made some available.
    pub stalled: bool,
}

impl BitOrAssign for QueueOutcome {
    /// Accumulates a later pass over the same queue: interrupt or come back
    /// if any pass asked to; stalled as the later pass left it.
    fn bitor_assign(&mut self, later: Self) {
        self.notify |= later.notify;
        self.more |= later.more;
        self.stalled = later.stalled;
    }
}

/// What a device does with the chains of one queue.
pub trait ChainHandler {
    /// Whether the handler takes another chain now (checked before each).
    fn ready(&self) -> bool {
        true
    }

    /// Serves one chain and returns the used length to report (bytes written
    /// into the chain), or `None` to leave the chain in the queue and end
    /// the pass.
    fn serve(&mut self, mem: &GuestMemoryMmap, chain: Chain<'_>) -> Option<u32>;
}

/// Returns the chain at `head` to the driver with `len` bytes used. A head
/// that is not a descriptor of the queue cannot be returned and is skipped.
fn add_used(queue: &mut Queue, mem: &GuestMemoryMmap, head: u16, len: u32) -> Result<(), QueueError> {
    match queue.add_used(mem, head, len) {
        Ok(()) => Ok(()),
        Err(virtio_queue::Error::InvalidDescriptorIndex) => {
            debug!("virtio: chain head {head} is not a descriptor of this queue");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Serves the available chains of `queue` with `handler`, at most one
/// queue's worth per call.
pub fn drain_queue<H: ChainHandler>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    handler: &mut H,
) -> Result<QueueOutcome, QueueError> {
    let budget = queue.size();
    let mut served: u16 = 0;
    let mut stalled = false;
    let mut first_round = true;
    'rounds: loop {
        queue.disable_notification(mem)?;
        let before = served;
        loop {
            if !handler.ready() {
                // Notifications stay off: the device comes back by itself
                // once the handler can take chains again.
                stalled = true;
                break 'rounds;
            }
            if served == budget {
                let notify = queue.needs_notification(mem)?;
                return Ok(QueueOutcome { notify, more: true, stalled: false });
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let Some(len) = handler.serve(mem, chain) else {
                queue.go_to_previous_position();
                break 'rounds;
            };
            served += 1;
            add_used(queue, mem, head, len)?;
        }
        if !queue.enable_notification(mem)? {
            break;
        }
        // More is announced. The driver may have added it after the queue
        // looked empty; if a round after such an announcement finds nothing
        // either, the index is bogus.
        if served == before && !first_round {
            return Err(QueueError::InvalidAvailIndex);
        }
        first_round = false;
    }
    let notify = served > 0 && queue.needs_notification(mem)?;
    Ok(QueueOutcome { notify, more: false, stalled })
}
