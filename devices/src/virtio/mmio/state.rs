//! Saving and restoring a virtio-mmio transport and its device, for live migration.
//!
//! The registers are saved as the driver wrote them; a live queue (ready, device activated)
//! also carries its ring positions, read from the device that owns it. Restoring activates the
//! device again with queues rebuilt at those positions, so processing resumes where the source
//! stopped: nothing is reset, nothing is re-read from the rings, and the only interrupt raised
//! is one for status bits the driver had not acknowledged yet.
//!
//! A queue's positions are all the in-flight state there is: the device runs every request to
//! completion inside the notify (see `virtio::block`), so when the vCPUs are paused every
//! chain taken from the avail ring is already in the used ring. For the same reason
//! virtio-queue's `num_added` (used entries not yet weighed for an interrupt) is always 0
//! between notifies and is rightly absent from `QueueState`.

use std::num::Wrapping;

use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK};
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::{MmioTransport, QueueRegs};
use crate::state::{self, DeviceStateError, Ring, Stateful};
use crate::virtio::{DeviceSnapshot, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use crate::GuestMemory;

/// One queue: its registers, plus its ring positions while it is live.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueSnapshot {
    /// QueueNumMax: must match the device it is restored into.
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    /// The next avail ring entry the device will take. 0 unless the queue is live.
    pub next_avail: u16,
    /// The next used ring entry the device will fill. 0 unless the queue is live.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX in force on the queue. false unless the queue is live.
    pub event_idx: bool,
}

impl QueueSnapshot {
    fn from_regs(regs: &QueueRegs) -> Self {
        Self {
            max_size: regs.max_size,
            size: regs.size,
            ready: regs.ready,
            desc_table: regs.desc,
            avail_ring: regs.driver,
            used_ring: regs.device,
            next_avail: 0,
            next_used: 0,
            event_idx: false,
        }
    }

    fn regs(&self) -> QueueRegs {
        QueueRegs {
            max_size: self.max_size,
            size: self.size,
            ready: self.ready,
            desc: self.desc_table,
            driver: self.avail_ring,
            device: self.used_ring,
        }
    }

    fn queue_state(&self) -> QueueState {
        QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        }
    }
}

/// A transport with its device. ConfigGeneration is not saved: the config space never changes
/// under the driver, so it always reads 0.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MmioTransportState {
    /// The device status register (virtio 1.2 §2.1), NEEDS_RESET included.
    pub status: u32,
    /// The device runs. Not implied by DRIVER_OK, which stays set when activation failed.
    pub activated: bool,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    /// The features the driver accepted (only offered ones are ever kept).
    pub driver_features: u64,
    pub queue_sel: u32,
    /// InterruptStatus bits the driver has not acknowledged.
    pub interrupt_status: u32,
    pub queues: Vec<QueueSnapshot>,
    pub device: DeviceSnapshot,
}

impl MmioTransport {
    /// The transport's and its device's state. Call it with the vCPUs paused, so that the
    /// driver cannot move the rings or the registers underneath.
    pub fn save_state(&self) -> MmioTransportState {
        let live = if self.activated {
            self.device.queue_states()
        } else {
            Vec::new()
        };
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(index, regs)| {
                let mut snapshot = QueueSnapshot::from_regs(regs);
                if let (true, Some(queue)) = (regs.ready, live.get(index)) {
                    snapshot.next_avail = queue.next_avail;
                    snapshot.next_used = queue.next_used;
                    snapshot.event_idx = queue.event_idx_enabled;
                }
                snapshot
            })
            .collect();
        MmioTransportState {
            status: self.status,
            activated: self.activated,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            queues,
            device: self.device.save_snapshot(),
        }
    }

    /// Loads `state` (from the network: checked against this device and guest memory first)
    /// and, if the device was running on the source, activates it again at the saved ring
    /// positions. A check failing leaves everything as it was; should the device then refuse
    /// activation, the transport is left reset.
    pub fn restore_state(&mut self, state: &MmioTransportState) -> Result<(), DeviceStateError> {
        let live_queues = self.check_state(state)?;
        self.device.restore_snapshot(&state.device)?;

        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        self.queues = state.queues.iter().map(QueueSnapshot::regs).collect();
        self.queue_sel = state.queue_sel;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.status = state.status;
        self.interrupt.clear();

        if let Some(queues) = live_queues {
            if let Err(e) = self.device.activate(
                self.mem.clone(),
                queues,
                self.interrupt.clone(),
                self.driver_features,
            ) {
                self.reset();
                return Err(DeviceStateError::Activate(e));
            }
            self.activated = true;
        }
        self.interrupt
            .restore(state.interrupt_status)
            .map_err(DeviceStateError::Interrupt)
    }

    /// Checks `state` against this transport; returns the queues to activate the device with
    /// when it was activated.
    fn check_state(
        &self,
        state: &MmioTransportState,
    ) -> Result<Option<Vec<Queue>>, DeviceStateError> {
        let expected = self.device.device_type();
        let got = state.device.device_type();
        if got != expected {
            return Err(DeviceStateError::DeviceKind { expected, got });
        }
        if state.queues.len() != self.queues.len() {
            return Err(DeviceStateError::QueueCount {
                expected: self.queues.len(),
                got: state.queues.len(),
            });
        }
        let unknown = state.driver_features & !self.offered_features();
        if unknown != 0 {
            return Err(DeviceStateError::UnknownFeatures { unknown });
        }
        if state.interrupt_status & !(VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG) != 0 {
            return Err(DeviceStateError::InterruptStatus(state.interrupt_status));
        }
        check_status(state)?;

        let event_idx = state.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = Vec::new();
        for (index, (snapshot, regs)) in state.queues.iter().zip(&self.queues).enumerate() {
            if snapshot.max_size != regs.max_size {
                return Err(DeviceStateError::QueueMaxSize {
                    index,
                    expected: regs.max_size,
                    got: snapshot.max_size,
                });
            }
            // A queue that is not ready holds whatever the driver wrote; the transport checks
            // that when the driver sets QueueReady, as it would have on the source.
            if snapshot.ready {
                check_layout(index, snapshot, &self.mem)?;
            }
            let live = state.activated && snapshot.ready;
            if live {
                check_positions(index, snapshot, event_idx)?;
            } else if snapshot.next_avail != 0 || snapshot.next_used != 0 || snapshot.event_idx {
                return Err(DeviceStateError::IdleQueuePosition { index });
            }
            if state.activated {
                // What activation hands the device for a queue the driver left unready.
                let queue = if live {
                    Queue::try_from(snapshot.queue_state())
                } else {
                    Queue::new(snapshot.max_size)
                };
                queues.push(queue.map_err(|source| DeviceStateError::Queue { index, source })?);
            }
        }
        Ok(state.activated.then_some(queues))
    }
}

/// The layout of [`MmioTransportState`] and of every [`DeviceSnapshot`] inside it: bump it when
/// either changes.
const MMIO_STATE_VERSION: u32 = 1;

/// Saved under the kind of the device behind the transport, so that a virtio-blk state never
/// lands on another virtio device (`check_state` refuses that too, by device type).
impl Stateful for MmioTransport {
    fn kind(&self) -> &'static str {
        self.device.kind()
    }

    fn state_version(&self) -> u32 {
        MMIO_STATE_VERSION
    }

    fn save(&self) -> Result<serde_json::Value, DeviceStateError> {
        state::to_data(&self.save_state())
    }

    fn restore(&mut self, data: &serde_json::Value) -> Result<(), DeviceStateError> {
        self.restore_state(&state::from_data(data)?)
    }
}

/// The status rules `write_status` keeps on the source.
fn check_status(state: &MmioTransportState) -> Result<(), DeviceStateError> {
    let status = state.status;
    if status & VIRTIO_CONFIG_S_FEATURES_OK != 0 && state.driver_features & VIRTIO_F_VERSION_1 == 0
    {
        return Err(DeviceStateError::Status {
            status,
            why: "FEATURES_OK without VIRTIO_F_VERSION_1 negotiated",
        });
    }
    let running = VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK;
    if state.activated && status & running != running {
        return Err(DeviceStateError::Status {
            status,
            why: "device activated without FEATURES_OK and DRIVER_OK",
        });
    }
    Ok(())
}

/// A ready queue's size and rings, as `QueueRegs::build` checks them on the source.
fn check_layout(
    index: usize,
    q: &QueueSnapshot,
    mem: &GuestMemory,
) -> Result<(), DeviceStateError> {
    if q.size == 0 || !q.size.is_power_of_two() || q.size > q.max_size {
        return Err(DeviceStateError::QueueSize {
            index,
            size: q.size,
            max: q.max_size,
        });
    }
    let n = u64::from(q.size);
    // Split virtqueue layout (virtio 1.2 §2.7): 16-byte descriptors; the rings' flags, idx and
    // the event word around 2-byte avail and 8-byte used entries.
    let rings = [
        (Ring::Descriptors, q.desc_table, 16, 16 * n),
        (Ring::Avail, q.avail_ring, 2, 6 + 2 * n),
        (Ring::Used, q.used_ring, 4, 6 + 8 * n),
    ];
    for (ring, addr, align, len) in rings {
        if addr % align != 0 {
            return Err(DeviceStateError::QueueAlignment {
                index,
                ring,
                addr,
                align,
            });
        }
        let inside = addr.checked_add(len).is_some()
            && usize::try_from(len).is_ok_and(|len| mem.check_range(GuestAddress(addr), len));
        if !inside {
            return Err(DeviceStateError::QueueOutsideMemory {
                index,
                ring,
                addr,
                len,
            });
        }
    }
    Ok(())
}

fn check_positions(
    index: usize,
    q: &QueueSnapshot,
    event_idx: bool,
) -> Result<(), DeviceStateError> {
    if q.event_idx != event_idx {
        return Err(DeviceStateError::QueueEventIdx {
            index,
            got: q.event_idx,
        });
    }
    // The device cannot have taken more than a ring's worth of chains it has not returned.
    let taken = (Wrapping(q.next_avail) - Wrapping(q.next_used)).0;
    if taken > q.size {
        return Err(DeviceStateError::QueuePosition {
            index,
            next_avail: q.next_avail,
            next_used: q.next_used,
            size: q.size,
        });
    }
    Ok(())
}
