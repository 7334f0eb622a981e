//! The VM-wide state KVM emulates in the kernel: interrupt controllers, PIT and kvmclock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::{ioctl, StateError};

/// The in-kernel irqchip, PIT and clock of a VM created like [`crate::vstate::vm::Vm`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    /// The kvmclock base. Where the saving kernel set `KVM_CLOCK_REALTIME`, restore advances
    /// the clock by the wall-clock time that passed since the save (the guest sees the pause
    /// as time that went by, as after a real pause); clear that flag to resume the clock where
    /// it stopped instead. Either way it needs host clocks in sync (NTP) across hosts.
    pub clock: kvm_clock_data,
}

/// Saves the VM-wide state. Stop the vCPUs first: a running vCPU changes all of it.
pub fn save_vm(fd: &VmFd) -> Result<VmState, StateError> {
    let chip = |chip_id| -> Result<kvm_irqchip, StateError> {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        fd.get_irqchip(&mut chip)
            .map_err(ioctl("KVM_GET_IRQCHIP"))?;
        Ok(chip)
    };
    Ok(VmState {
        // The clock first: it is the one piece whose value moves on by itself.
        clock: fd.get_clock().map_err(ioctl("KVM_GET_CLOCK"))?,
        pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
        pit: fd.get_pit2().map_err(ioctl("KVM_GET_PIT2"))?,
    })
}

/// Every check [`restore_vm`] makes before its first ioctl (no /dev/kvm needed).
pub fn check_vm(state: &VmState) -> Result<(), StateError> {
    for (chip, want, name) in [
        (&state.pic_master, KVM_IRQCHIP_PIC_MASTER, "PIC master"),
        (&state.pic_slave, KVM_IRQCHIP_PIC_SLAVE, "PIC slave"),
        (&state.ioapic, KVM_IRQCHIP_IOAPIC, "IOAPIC"),
    ] {
        if chip.chip_id != want {
            return Err(StateError::Invalid(format!(
                "the {name} state carries chip id {} (expected {want})",
                chip.chip_id
            )));
        }
    }
    Ok(())
}

/// Restores the VM-wide state into a fresh VM that has its irqchip and PIT created. Call it
/// before restoring the vCPUs: each vCPU's LAPIC state then replaces whatever the restored
/// PIT delivered before the vCPUs were restored.
pub fn restore_vm(fd: &VmFd, state: &VmState) -> Result<(), StateError> {
    check_vm(state)?;
    restore_clock(fd, &state.clock)?;
    // The interrupt controllers before the PIT, so that ticks of the restored PIT land in
    // the restored controllers rather than in fresh ones about to be overwritten.
    for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
        fd.set_irqchip(chip).map_err(ioctl("KVM_SET_IRQCHIP"))?;
    }
    fd.set_pit2(&state.pit).map_err(ioctl("KVM_SET_PIT2"))?;
    Ok(())
}

/// KVM_SET_CLOCK takes only `KVM_CLOCK_REALTIME` as input (the other flags KVM_GET_CLOCK sets
/// describe the source host), and kernels before 5.16 take no flags at all.
fn restore_clock(fd: &VmFd, saved: &kvm_clock_data) -> Result<(), StateError> {
    let clock = kvm_clock_data {
        clock: saved.clock,
        flags: saved.flags & KVM_CLOCK_REALTIME,
        realtime: saved.realtime,
        ..Default::default()
    };
    match fd.set_clock(&clock) {
        Err(e) if e.errno() == libc::EINVAL && clock.flags != 0 => {
            tracing::debug!("KVM_SET_CLOCK refused KVM_CLOCK_REALTIME ({e}); resuming the clock where it stopped");
            let plain = kvm_clock_data { flags: 0, ..clock };
            fd.set_clock(&plain).map_err(ioctl("KVM_SET_CLOCK"))
        }
        other => other.map_err(ioctl("KVM_SET_CLOCK")),
    }
}
