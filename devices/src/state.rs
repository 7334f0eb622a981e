//! Saving and restoring device state for live migration.
//!
//! Each device with guest-visible state has a `save_state(&self) -> XState` and a
//! `restore_state(&mut self, &XState)`; the state types are plain serde data. A restored state
//! comes from the network, so `restore_state` checks it against the device it lands on (and
//! against guest memory) before changing anything, and refuses it with a [`DeviceStateError`]
//! naming what is wrong.
//!
//! Host-side plumbing (eventfds, the console writer and its observer, the disk file, guest
//! memory) is not state: the destination builds its devices with its own, then restores into
//! them.
//!
//! [`Stateful`] is the one interface the VMM sees: a device's kind, the version of its saved
//! layout, and that state as JSON. The VMM keeps its stateful devices by id in a
//! [`StateRegistry`](crate::device_states::StateRegistry), so a VM's device state is the set of
//! those, whatever the device types.

use std::fmt;
use std::io;

use crate::virtio::VirtioError;

/// One of a split virtqueue's three areas, to say which one a bad address belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ring {
    Descriptors,
    Avail,
    Used,
}

impl fmt::Display for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Ring::Descriptors => "descriptor table",
            Ring::Avail => "available ring",
            Ring::Used => "used ring",
        })
    }
}

/// A device whose guest-visible state moves with the VM (snapshot, migration).
///
/// `save` and `restore` carry the device's own state type as JSON, so the VMM needs no field
/// per device type. The registry restores only a state of the same `kind` and `state_version`;
/// a device that changes its layout bumps its version.
pub trait Stateful: Send {
    /// The device model ("serial", "virtio-blk"): a state restores only into its own kind.
    fn kind(&self) -> &'static str;
    /// The version of the layout `save` writes and `restore` reads.
    fn state_version(&self) -> u32;
    /// The state, with the vCPUs paused so that the guest cannot change it underneath.
    fn save(&self) -> Result<serde_json::Value, DeviceStateError>;
    /// Loads a state `save` wrote on the source (from the network: checked first, as the
    /// device's own `restore_state` does; on error nothing has changed).
    fn restore(&mut self, data: &serde_json::Value) -> Result<(), DeviceStateError>;
}

/// `state` as a device's saved data.
pub fn to_data<T: serde::Serialize>(state: &T) -> Result<serde_json::Value, DeviceStateError> {
    serde_json::to_value(state).map_err(DeviceStateError::Encode)
}

/// A device's saved data as its state type; a field missing or of the wrong type is refused.
pub fn from_data<T: serde::de::DeserializeOwned>(
    data: &serde_json::Value,
) -> Result<T, DeviceStateError> {
    T::deserialize(data).map_err(DeviceStateError::Decode)
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceStateError {
    #[error("encoding the state: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("decoding the state: {0}")]
    Decode(#[source] serde_json::Error),

    #[error("UART receive FIFO holds {got} bytes, more than its {max}")]
    SerialFifo { got: usize, max: usize },
    #[error("raising the UART interrupt after restore: {0}")]
    SerialInterrupt(#[source] io::Error),

    #[error("state is for virtio device type {got}, but this transport has type {expected}")]
    DeviceKind { expected: u32, got: u32 },
    #[error("state has {got} queues, the device has {expected}")]
    QueueCount { expected: usize, got: usize },
    #[error("queue {index}: maximum size {got} in the state, {expected} on this device")]
    QueueMaxSize {
        index: usize,
        expected: u16,
        got: u16,
    },
    #[error("queue {index}: size {size} is not a power of two in 1..={max}")]
    QueueSize { index: usize, size: u16, max: u16 },
    #[error("queue {index}: {ring} address {addr:#x} is not {align}-byte aligned")]
    QueueAlignment {
        index: usize,
        ring: Ring,
        addr: u64,
        align: u64,
    },
    #[error("queue {index}: {ring} at {addr:#x} ({len} bytes) is not inside guest memory")]
    QueueOutsideMemory {
        index: usize,
        ring: Ring,
        addr: u64,
        len: u64,
    },
    #[error(
        "queue {index}: next_avail {next_avail} is more than the queue size {size} ahead of \
         next_used {next_used}"
    )]
    QueuePosition {
        index: usize,
        next_avail: u16,
        next_used: u16,
        size: u16,
    },
    #[error(
        "queue {index} is not live (not ready or device not activated) but has ring positions"
    )]
    IdleQueuePosition { index: usize },
    #[error("queue {index}: event_idx {got} disagrees with the negotiated features")]
    QueueEventIdx { index: usize, got: bool },
    #[error("queue {index}: {source}")]
    Queue {
        index: usize,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("driver features {unknown:#x} were never offered by this device")]
    UnknownFeatures { unknown: u64 },
    #[error("interrupt status {0:#x} has bits other than used-buffer (1) and config (2)")]
    InterruptStatus(u32),
    #[error("device status {status:#x}: {why}")]
    Status { status: u32, why: &'static str },
    #[error("reactivating the device: {0}")]
    Activate(#[source] VirtioError),
    /// A passed-through function's saved view does not fit the function here: what differs.
    #[error("passed-through function: {0}")]
    Passthrough(String),
    #[error("raising the virtio interrupt after restore: {0}")]
    Interrupt(#[source] io::Error),

    #[error("disk capacity: {got} sectors in the state, {expected} on this host")]
    DiskCapacity { expected: u64, got: u64 },
    #[error("disk read-only: {got} in the state, {expected} on this host")]
    DiskReadOnly { expected: bool, got: bool },
}
