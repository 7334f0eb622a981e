//! Complete save and restore of vCPU and VM state, so that a guest paused on one VM resumes on a
//! freshly created VM (on this host or another) and sees only a pause.
//!
//! What is saved, and why some of it is optional:
//! - per vCPU ([`VcpuState`]): CPUID, MP state, general and special registers, the extended FPU
//!   state (XSAVE, or the legacy FPU area where KVM has no XSAVE), XCRs, debug registers, the
//!   local APIC, every MSR KVM lists and can read (kvmclock and the TSC included), pending
//!   events, and the TSC frequency. Pieces a KVM cannot provide (no capability) are `None`, and
//!   restore leaves them at the fresh vCPU's values.
//! - per VM ([`VmState`]): both 8259 PICs, the IOAPIC, the PIT and the kvmclock base.
//!
//! The saved structures come back over the network at restore time: restore validates every
//! length and identifier before any ioctl and never panics on odd input.
//!
//! The caller must stop every vCPU (out of KVM_RUN, with [`complete_pending_io`] run after a
//! port or MMIO exit) before saving, and must restore into vCPUs that have not run yet.

mod vcpu_state;
mod vm_state;

#[cfg(test)]
mod tests;

use kvm_ioctls::{VcpuExit, VcpuFd};

pub use vcpu_state::{
    check_vcpu, host_xsave_words, restore_vcpu, save_vcpu, FpuState, Msr, VcpuState,
};
pub use vm_state::{check_vm, restore_vm, save_vm, VmState};

/// The one error type of state save and restore.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The kernel refused an ioctl; `source` carries its errno.
    #[error("{ioctl} failed: {source}")]
    Ioctl {
        ioctl: &'static str,
        source: kvm_ioctls::Error,
    },
    /// KVM_SET_MSRS stops at the first MSR it refuses and returns how many it took.
    #[error("KVM_SET_MSRS accepted {accepted} of {total} MSRs; it refused MSR 0x{index:x} (value 0x{data:x})")]
    MsrRefused {
        index: u32,
        data: u64,
        accepted: usize,
        total: usize,
    },
    /// The vCPU runs at a TSC frequency other than the saved one and KVM cannot scale it.
    #[error(
        "KVM_SET_TSC_KHZ to the saved {saved} kHz failed (this vCPU runs at {here} kHz): {source}"
    )]
    TscKhz {
        saved: u32,
        here: u32,
        source: kvm_ioctls::Error,
    },
    /// KVM_RUN with `immediate_exit` set returned an exit instead of EINTR: the guest's
    /// instruction needs another round trip (a string I/O instruction, say). Handle that exit
    /// and call `complete_pending_io` again.
    #[error(
        "KVM_RUN with immediate_exit returned exit {exit} instead of EINTR; handle it and retry"
    )]
    PendingExit { exit: String },
    /// Saved data that cannot be right: checked before any ioctl touches the vCPU or VM. A
    /// description of what is wrong with the data, not a flattened error.
    #[error("invalid saved state: {0}")]
    Invalid(String),
    /// A KVM buffer (CPUID, XSAVE, MSRs) could not be built for `count` items.
    #[error("invalid saved state: {count} {what}: {source}")]
    Fam {
        what: &'static str,
        count: usize,
        #[source]
        source: vmm_sys_util::fam::Error,
    },
}

impl StateError {
    /// The kernel's errno, when the kernel was the one to refuse.
    pub fn errno(&self) -> Option<i32> {
        match self {
            StateError::Ioctl { source, .. } | StateError::TscKhz { source, .. } => {
                Some(source.errno())
            }
            _ => None,
        }
    }
}

/// Maps a kvm-ioctls error to [`StateError::Ioctl`] naming `ioctl`.
fn ioctl(ioctl: &'static str) -> impl Fn(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Ioctl { ioctl, source }
}

/// Lets KVM finish the instruction behind the last port-I/O or MMIO exit without entering the
/// guest again.
///
/// After such an exit the instruction is only half done: KVM completes it (writes the data of an
/// IN or an MMIO load into the register, advances RIP) at the start of the next KVM_RUN. Saved
/// state taken before that would lose the access, or repeat it. With `immediate_exit` set,
/// KVM_RUN completes the pending access and returns EINTR before guest entry. For an IN or an
/// MMIO read, fill the exit's data first, as for any exit. Harmless when nothing is pending.
pub fn complete_pending_io(fd: &mut VcpuFd) -> Result<(), StateError> {
    fd.set_kvm_immediate_exit(1);
    let result = match fd.run() {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Err(source) => Err(StateError::Ioctl {
            ioctl: "KVM_RUN (immediate_exit)",
            source,
        }),
        Ok(exit) => Err(StateError::PendingExit {
            exit: describe_exit(&exit),
        }),
    };
    fd.set_kvm_immediate_exit(0);
    result
}

fn describe_exit(exit: &VcpuExit) -> String {
    match exit {
        VcpuExit::IoIn(port, data) => format!("IoIn(port 0x{port:x}, {} bytes)", data.len()),
        VcpuExit::IoOut(port, data) => format!("IoOut(port 0x{port:x}, {data:x?})"),
        VcpuExit::MmioRead(addr, data) => format!("MmioRead(0x{addr:x}, {} bytes)", data.len()),
        VcpuExit::MmioWrite(addr, data) => format!("MmioWrite(0x{addr:x}, {data:x?})"),
        other => format!("{other:?}"),
    }
}
