//! The loop every device runs when a queue is notified: pop each available chain, hand it to the
//! device, publish it in the used ring, and decide whether the driver wants an interrupt.
//!
//! virtio-queue gives the pieces; this puts them together in the one order that neither loses
//! a notification (re-enable, then re-check) nor spins on a ring the guest has corrupted.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_queue::{DescriptorChain, Queue, QueueT};

use super::VirtioError;
use crate::GuestMemory;

/// Services every chain available in `queue`. `handle` processes one chain and returns the
/// number of bytes it wrote into the chain's device-writable buffers (the used length).
///
/// Returns whether the driver must be interrupted (something was used and, with EVENT_IDX,
/// the driver's used_event asks for it). An error means the queue cannot be trusted any more.
pub fn drain_queue<F>(
    queue: &mut Queue,
    index: u16,
    mem: &GuestMemory,
    mut handle: F,
) -> Result<bool, VirtioError>
where
    F: FnMut(DescriptorChain<&GuestMemory>) -> u32,
{
    let mut used_any = false;
    let mut idle_rounds = 0u32;
    loop {
        // virtio-queue's iterator refuses an available index more than a queue size ahead of
        // ours, but reports that only by yielding nothing, while the re-check below would keep
        // seeing work: catch it here instead of looping forever.
        let avail = queue.avail_idx(mem, Ordering::Acquire)?;
        if (avail - Wrapping(queue.next_avail())).0 > queue.size() {
            return Err(VirtioError::QueueCorrupt(index));
        }

        queue.disable_notification(mem)?;
        let mut popped = 0u32;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let used_len = handle(chain);
            // A head index outside the queue cannot be put in the used ring: the driver broke
            // the queue, and the error says so.
            queue.add_used(mem, head, used_len)?;
            popped += 1;
        }
        used_any |= popped > 0;

        // Re-enable notifications, then look again: the driver may have added a chain after
        // our last pop and before it could see notifications were wanted.
        if !queue.enable_notification(mem)? {
            break;
        }
        // A legitimate race always leaves something to pop in the next round.
        idle_rounds = if popped == 0 { idle_rounds + 1 } else { 0 };
        if idle_rounds > 1 {
            return Err(VirtioError::QueueCorrupt(index));
        }
    }
    if used_any {
        Ok(queue.needs_notification(mem)?)
    } else {
        Ok(false)
    }
}
