//! Virtio devices (virtio 1.2, modern only) and the virtio-mmio transport that puts them on the
//! MMIO bus.
//!
//! A device implements [`VirtioDevice`]; [`mmio::MmioTransport`] runs the register interface,
//! feature negotiation and queue setup, and on DRIVER_OK hands the device its queues, guest
//! memory and a [`VirtioInterrupt`].

pub mod block;
pub mod interrupt;
pub mod mmio;
pub mod queue;

#[cfg(test)]
mod mmio_tests;
#[cfg(test)]
mod state_tests;
/// The driver's side of a virtqueue, for tests (here and in crates that drive these devices
/// against real trackers): enable the `test-utils` feature.
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;

use std::sync::Arc;

use virtio_queue::{Queue, QueueState};

use crate::state::DeviceStateError;
use crate::GuestMemory;

pub use block::{Block, BlockState};
pub use interrupt::VirtioInterrupt;
pub use mmio::{mmio_cmdline_arg, MmioTransport, MmioTransportState, QueueSnapshot};

/// VIRTIO_F_VERSION_1 (bit 32): the device is a modern one. The only kind this crate has.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// VIRTIO_F_RING_EVENT_IDX (bit 29): used_event / avail_event notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error("queue {0} is not ready")]
    QueueNotReady(u16),
    #[error("no queue {0}")]
    NoSuchQueue(u16),
    #[error("expected {expected} queues, got {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("the device is not activated")]
    NotActivated,
    #[error("queue {0} is corrupt: its available index runs more than a queue size ahead")]
    QueueCorrupt(u16),
    #[error("virtio queue: {0}")]
    Queue(#[from] virtio_queue::Error),
    #[error("raising the virtio interrupt: {0}")]
    Interrupt(#[source] std::io::Error),
}

/// A virtio device model, driven by a transport.
///
/// Lifecycle: the transport reads `device_type`, `queue_max_sizes`, `features` and the config
/// space during negotiation; on DRIVER_OK it calls `activate` once; then `process_queue` for each
/// queue notification; on a driver reset it calls `reset`, after which `activate` may come again.
///
/// Migration (vCPUs paused): the transport saves `queue_states` and `save_snapshot`; on the
/// destination it calls `restore_snapshot`, then `activate` with queues already at the saved
/// ring positions, so `activate` must take its queues as given and not reset them.
pub trait VirtioDevice: Send {
    /// Virtio device ID (virtio 1.2 §5), e.g. `VIRTIO_ID_BLOCK`.
    fn device_type(&self) -> u32;

    /// Maximum size of each queue (powers of two); the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Feature bits the device offers. The transport adds `VIRTIO_F_VERSION_1`.
    fn features(&self) -> u64;

    /// Reads device config space at `offset`; bytes beyond the config space read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes device config space; a device with nothing writable ignores this.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Starts the device with the negotiated `features` and its `queues` (one per entry of
    /// `queue_max_sizes`, in order, each `ready()` or not as the driver left it, with
    /// EVENT_IDX already set up on them when negotiated).
    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
        features: u64,
    ) -> Result<(), VirtioError>;

    /// Returns the device to its state before `activate`, dropping queues and memory.
    fn reset(&mut self);

    /// Services queue `index` after the driver notified it. An error means the device cannot go
    /// on; the transport then sets DEVICE_NEEDS_RESET.
    fn process_queue(&mut self, index: u16) -> Result<(), VirtioError>;

    /// The queues handed over by `activate` as they stand now (ring positions included), in
    /// order; empty while not activated.
    fn queue_states(&self) -> Vec<QueueState>;

    /// The device's own migratable state (not its queues: the transport saves those).
    fn save_snapshot(&self) -> DeviceSnapshot;

    /// Loads a snapshot taken by `save_snapshot` on the source, before the transport
    /// re-activates the device. Checks it first; on error nothing has changed.
    fn restore_snapshot(&mut self, snapshot: &DeviceSnapshot) -> Result<(), DeviceStateError>;

    /// The device model its transport's state is saved as ("virtio-blk").
    fn kind(&self) -> &'static str;
}

/// A virtio device's own state, tagged with its kind so that a state cannot be loaded into a
/// device of another kind.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum DeviceSnapshot {
    Block(BlockState),
}

impl DeviceSnapshot {
    /// The virtio device ID of the device the snapshot was taken from.
    pub fn device_type(&self) -> u32 {
        match self {
            DeviceSnapshot::Block(_) => virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK,
        }
    }
}
