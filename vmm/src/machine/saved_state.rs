//! The complete state of a paused VM other than RAM: every vCPU, the VM-wide interrupt
//! controllers, PIT and clock, and every stateful device's state under its id. Sent as JSON in
//! the `State` frame; validated again at restore, since it comes from the network.

use devices::device_states::{DeviceStates, StatesError};
use serde::{Deserialize, Serialize};

use crate::machine::shared::Shared;
use crate::machine::Machine;
use crate::vstate::state::{self, VcpuState, VmState};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("saving the VM state: {0}")]
    SaveVm(#[source] state::StateError),
    #[error("restoring the VM state: {0}")]
    RestoreVm(#[source] state::StateError),
    #[error("restoring vcpu{id}: {source}")]
    RestoreVcpu {
        id: usize,
        #[source]
        source: state::StateError,
    },
    #[error(transparent)]
    Devices(StatesError),
    #[error("the state has {found} {what}, this VM has {expected}")]
    Shape {
        what: &'static str,
        found: usize,
        expected: usize,
    },
    #[error("decoding the state: {0}")]
    Decode(#[source] serde_json::Error),
    #[error("encoding the state: {0}")]
    Encode(#[source] serde_json::Error),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmSnapshot {
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    /// By device id (`machine::devices_setup` names them).
    pub devices: DeviceStates,
}

impl VmSnapshot {
    /// Everything but the vCPUs (saved by their own threads when they parked).
    pub fn capture(shared: &Shared, vcpus: Vec<VcpuState>) -> Result<VmSnapshot, SnapshotError> {
        let vm = state::save_vm(shared.vm.fd()).map_err(SnapshotError::SaveVm)?;
        let devices = shared
            .device_states
            .save()
            .map_err(SnapshotError::Devices)?;
        Ok(VmSnapshot { vcpus, vm, devices })
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
        // Before anything changes: every device of the state is here, of its kind and version.
        m.devs
            .states
            .check(&self.devices)
            .map_err(SnapshotError::Devices)?;
        state::restore_vm(m.vm.fd(), &self.vm).map_err(SnapshotError::RestoreVm)?;
        for (id, (runner, s)) in m.runners.iter().zip(&self.vcpus).enumerate() {
            state::restore_vcpu(&runner.fd, s)
                .map_err(|source| SnapshotError::RestoreVcpu { id, source })?;
        }
        m.devs
            .states
            .restore(&self.devices)
            .map_err(SnapshotError::Devices)
    }
}
