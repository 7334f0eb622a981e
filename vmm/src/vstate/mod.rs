//! KVM state: the VM (memslots, irqchip, PIT, and the guest's resources), vCPUs (boot registers,
//! CPUID, MSRs, the run loop).

pub mod cpuid;
pub mod exits;
pub mod kick;
pub mod pause;
pub mod regs;
pub mod resources;
pub mod state;
pub mod vcpu;
pub mod vm;
