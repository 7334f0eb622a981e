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

#[derive(Debug, thiserror::Error)]
pub enum DeviceStateError {
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
    #[error("raising the virtio interrupt after restore: {0}")]
    Interrupt(#[source] io::Error),

    #[error("disk capacity: {got} sectors in the state, {expected} on this host")]
    DiskCapacity { expected: u64, got: u64 },
    #[error("disk read-only: {got} in the state, {expected} on this host")]
    DiskReadOnly { expected: bool, got: bool },
}
