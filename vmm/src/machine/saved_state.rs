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
    /// The user had paused the guest (`pause` through the API): it resumes paused, until
    /// its own `resume`. Absent in older states, which always resume running.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
}

impl VmSnapshot {
    /// Everything but the vCPUs (saved by their own threads when they parked).
    pub fn capture(shared: &Shared, vcpus: Vec<VcpuState>) -> Result<VmSnapshot, SnapshotError> {
        let vm = state::save_vm(shared.vm.fd()).map_err(SnapshotError::SaveVm)?;
        let devices = shared
            .device_states
            .save()
            .map_err(SnapshotError::Devices)?;
        Ok(VmSnapshot {
            vcpus,
            vm,
            devices,
            paused: false,
        })
    }

    pub fn encode(&self) -> Result<Vec<u8>, SnapshotError> {
        serde_json::to_vec(self).map_err(SnapshotError::Encode)
    }

    pub fn decode(bytes: &[u8]) -> Result<VmSnapshot, SnapshotError> {
        serde_json::from_slice(bytes).map_err(SnapshotError::Decode)
    }

    /// Every check of the saved data that needs no VM: `vcpus` vCPU states (the described
    /// VM's count), each as `restore_vcpu` wants it for a KVM holding `xsave_words` words of
    /// XSAVE area, and the VM-wide state. Run before anything reads the state (the
    /// keep-present walks of a lazy restore or a postcopy switch), as well as at restore.
    pub fn check(&self, vcpus: usize, xsave_words: usize) -> Result<(), SnapshotError> {
        if self.vcpus.len() != vcpus {
            return Err(SnapshotError::Shape {
                what: "vCPUs",
                found: self.vcpus.len(),
                expected: vcpus,
            });
        }
        state::check_vm(&self.vm).map_err(SnapshotError::RestoreVm)?;
        for (id, v) in self.vcpus.iter().enumerate() {
            state::check_vcpu(v, xsave_words)
                .map_err(|source| SnapshotError::RestoreVcpu { id, source })?;
        }
        Ok(())
    }

    /// [`VmSnapshot::check`] for this host's KVM.
    pub fn check_here(&self, vcpus: usize) -> Result<(), SnapshotError> {
        let words = state::host_xsave_words().map_err(SnapshotError::RestoreVm)?;
        self.check(vcpus, words)
    }

    /// Loads this state into a built, not yet running machine.
    pub fn restore(&self, m: &Machine) -> Result<(), SnapshotError> {
        // All of it before the first ioctl: a bad vCPU state must not leave the VM-wide
        // state half restored.
        self.check_here(m.runners.len())?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE};

    /// A state that passes every check: one vCPU with one CPUID entry and the legacy
    /// XSAVE area, interrupt controllers with their ids.
    fn valid() -> VmSnapshot {
        let chip = |chip_id| kvm_bindings::kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        VmSnapshot {
            vcpus: vec![VcpuState {
                cpuid: vec![Default::default()],
                mp_state: Default::default(),
                regs: Default::default(),
                sregs: Default::default(),
                xsave: Some(vec![0; 1024]),
                fpu: None,
                xcrs: None,
                debugregs: None,
                lapic: Default::default(),
                msrs: Vec::new(),
                vcpu_events: None,
                tsc_khz: None,
            }],
            vm: VmState {
                pic_master: chip(KVM_IRQCHIP_PIC_MASTER),
                pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE),
                ioapic: chip(KVM_IRQCHIP_IOAPIC),
                pit: Default::default(),
                clock: Default::default(),
            },
            devices: Default::default(),
            paused: false,
        }
    }

    #[test]
    fn a_paused_guest_says_so_and_a_state_without_the_field_resumes_running() {
        let running = valid();
        let json = running.encode().expect("encodes");
        // A running guest's state is as before the field existed, for older destinations.
        assert!(!String::from_utf8_lossy(&json).contains("paused"));
        assert!(!VmSnapshot::decode(&json).expect("decodes").paused);
        let paused = VmSnapshot {
            paused: true,
            ..valid()
        };
        let decoded = VmSnapshot::decode(&paused.encode().expect("encodes")).expect("decodes");
        assert!(decoded.paused);
    }

    #[test]
    fn check_refuses_bad_saved_state_without_kvm() {
        let ok = valid();
        ok.check(1, 1024).expect("a valid state passes");
        let decoded = VmSnapshot::decode(&ok.encode().expect("encodes")).expect("decodes");
        decoded.check(1, 1024).expect("and still passes after JSON");

        assert!(matches!(
            ok.check(2, 1024),
            Err(SnapshotError::Shape { .. })
        ));
        let mut s = valid();
        s.vm.ioapic.chip_id = 7;
        assert!(matches!(s.check(1, 1024), Err(SnapshotError::RestoreVm(_))));
        let mut s = valid();
        s.vcpus[0].cpuid.clear();
        assert!(matches!(
            s.check(1, 1024),
            Err(SnapshotError::RestoreVcpu { id: 0, .. })
        ));
        let mut s = valid();
        s.vcpus[0].xsave = Some(vec![1; 2048]);
        assert!(
            s.check(1, 1024).is_err(),
            "state past this host's XSAVE size"
        );
        let mut s = valid();
        s.vcpus[0].msrs = vec![state::Msr { index: 0, data: 0 }; 5000];
        assert!(s.check(1, 1024).is_err(), "more MSRs than any KVM lists");
    }
}
