//! The complete state of a paused VM other than RAM: every vCPU, the VM-wide interrupt
//! controllers, PIT and clock, and the devices. Sent as JSON in the `State` frame; validated
//! again at restore, since it comes from the network.

use serde::{Deserialize, Serialize};

use crate::machine::shared::Shared;
use crate::machine::Machine;
use crate::vstate::state::{self, VcpuState, VmState};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("saving the VM state: {0}")]
    SaveVm(String),
    #[error("restoring the VM state: {0}")]
    RestoreVm(String),
    #[error("restoring vcpu{id}: {reason}")]
    RestoreVcpu { id: usize, reason: String },
    #[error("restoring {device}: {reason}")]
    RestoreDevice { device: String, reason: String },
    #[error("the state has {found} {what}, this VM has {expected}")]
    Shape {
        what: &'static str,
        found: usize,
        expected: usize,
    },
    #[error("decoding the state: {0}")]
    Decode(serde_json::Error),
    #[error("encoding the state: {0}")]
    Encode(serde_json::Error),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmSnapshot {
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub serial: devices::legacy::serial::SerialState,
    pub transports: Vec<devices::virtio::mmio::MmioTransportState>,
    pub micro_passes: u64,
}

impl VmSnapshot {
    /// Everything but the vCPUs (saved by their own threads when they parked).
    pub fn capture(shared: &Shared, vcpus: Vec<VcpuState>) -> Result<VmSnapshot, SnapshotError> {
        let vm =
            state::save_vm(shared.vm.fd()).map_err(|e| SnapshotError::SaveVm(e.to_string()))?;
        let serial = shared
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .save_state();
        let transports = shared
            .transports
            .iter()
            .map(|t| t.lock().unwrap_or_else(|p| p.into_inner()).save_state())
            .collect();
        Ok(VmSnapshot {
            vcpus,
            vm,
            serial,
            transports,
            micro_passes: shared.micro_passes(),
        })
    }

    pub fn encode(&self) -> Result<Vec<u8>, SnapshotError> {
        serde_json::to_vec(self).map_err(SnapshotError::Encode)
    }

    pub fn decode(bytes: &[u8]) -> Result<VmSnapshot, SnapshotError> {
        serde_json::from_slice(bytes).map_err(SnapshotError::Decode)
    }

    /// Loads this state into a built, not yet running machine.
    pub fn restore(&self, m: &Machine) -> Result<(), SnapshotError> {
        if self.vcpus.len() != m.runners.len() {
            return Err(SnapshotError::Shape {
                what: "vCPUs",
                found: self.vcpus.len(),
                expected: m.runners.len(),
            });
        }
        if self.transports.len() != m.devs.transports.len() {
            return Err(SnapshotError::Shape {
                what: "virtio devices",
                found: self.transports.len(),
                expected: m.devs.transports.len(),
            });
        }
        state::restore_vm(m.vm.fd(), &self.vm)
            .map_err(|e| SnapshotError::RestoreVm(e.to_string()))?;
        for (id, (runner, s)) in m.runners.iter().zip(&self.vcpus).enumerate() {
            state::restore_vcpu(&runner.fd, s).map_err(|e| SnapshotError::RestoreVcpu {
                id,
                reason: e.to_string(),
            })?;
        }
        m.devs
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .restore_state(&self.serial)
            .map_err(|e| SnapshotError::RestoreDevice {
                device: "serial".into(),
                reason: e.to_string(),
            })?;
        for (i, (t, s)) in m.devs.transports.iter().zip(&self.transports).enumerate() {
            t.lock()
                .unwrap_or_else(|p| p.into_inner())
                .restore_state(s)
                .map_err(|e| SnapshotError::RestoreDevice {
                    device: format!("virtio device {i}"),
                    reason: e.to_string(),
                })?;
        }
        m.micro_passes
            .store(self.micro_passes, std::sync::atomic::Ordering::Release);
        Ok(())
    }
}
