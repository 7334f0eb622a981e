//! What one exit means for its vCPU, as a function of the exit alone: port and MMIO accesses go
//! to the buses, MMIO into RAM and the other memory exits to the vCPU's `ExitHandler`, and the
//! rest end the vCPU with a reason. No KVM here, so every arm is testable with made-up exits
//! (as Firecracker's `handle_kvm_exit`).

use devices::bus::{Bus, VcpuAction};

use super::VcpuStop;
use crate::memory::RamRange;
use crate::vstate::exits::{ExitHandler, GuestCpu, Outcome, RamAccess};

/// A KVM exit, reduced to what dispatching it needs.
pub enum Exit<'a> {
    IoIn(u16, &'a mut [u8]),
    IoOut(u16, &'a [u8]),
    MmioRead(u64, &'a mut [u8]),
    MmioWrite(u64, &'a [u8]),
    /// KVM_INTERNAL_ERROR_EMULATION: the instruction bytes when KVM reported them, and the vCPU
    /// to inspect (the exit carries no address).
    EmulationFailure {
        cpu: &'a dyn GuestCpu,
        insn: Option<&'a [u8]>,
    },
    /// Any other KVM_EXIT_INTERNAL_ERROR.
    InternalError,
    MemoryFault {
        flags: u64,
        gpa: u64,
        size: u64,
    },
    DirtyRingFull,
    Hlt,
    Shutdown,
    FailEntry(u64),
    SystemEvent(u32),
    /// Exits that need nothing (EOI broadcast, interrupt window, host interrupt).
    Nothing,
    /// A raw exit reason kvm-ioctls does not decode.
    Unsupported(u32),
    /// An exit this VMM never asks for, described (its `Debug`): part of a stop reason shown to
    /// users, not an error.
    Unexpected(String),
}

/// Where the accesses of an exit go.
pub struct AddressSpace<'a> {
    pub pio: &'a Bus,
    pub mmio: &'a Bus,
    pub ram: &'a [RamRange],
}

/// What the vCPU does next.
#[derive(Debug)]
pub enum Next {
    Continue,
    /// KVM_RUN returned EINTR (a kick, or immediate_exit): no exit to handle.
    Interrupted,
    Stop(VcpuStop),
    /// The guest stops with this reason, the vCPU's id and its registers: a stop reason shown
    /// to users (`VcpuStop::Fault`), not an error.
    Fault(String),
    /// KVM_EXIT_INTERNAL_ERROR no handler resolved: reported from kvm_run's details.
    InternalError,
}

pub fn dispatch(
    id: u8,
    exit: Exit<'_>,
    space: &AddressSpace<'_>,
    handler: &mut dyn ExitHandler,
) -> Next {
    if !matches!(exit, Exit::DirtyRingFull) {
        handler.progress();
    }
    match exit {
        Exit::IoIn(port, data) => {
            if space.pio.read(port.into(), data).is_err() {
                // No device: the bus floats high, as on real hardware; guests probe ports.
                data.fill(0xff);
                tracing::trace!("vcpu{id}: in from unclaimed port 0x{port:x}");
            }
            Next::Continue
        }
        Exit::IoOut(port, data) => match space.pio.write(port.into(), data) {
            Ok(action) => action_next(action),
            Err(_) => {
                tracing::trace!("vcpu{id}: out to unclaimed port 0x{port:x}");
                Next::Continue
            }
        },
        Exit::MmioRead(addr, data) => {
            if in_ram(space.ram, addr) {
                return ram_access(id, handler, addr, RamAccess::Read(data));
            }
            if space.mmio.read(addr, data).is_err() {
                data.fill(0xff);
                tracing::debug!("vcpu{id}: MMIO read from unclaimed 0x{addr:x}");
            }
            Next::Continue
        }
        Exit::MmioWrite(addr, data) => {
            if in_ram(space.ram, addr) {
                return ram_access(id, handler, addr, RamAccess::Write(data));
            }
            match space.mmio.write(addr, data) {
                Ok(action) => action_next(action),
                Err(_) => {
                    tracing::debug!("vcpu{id}: MMIO write to unclaimed 0x{addr:x}");
                    Next::Continue
                }
            }
        }
        Exit::EmulationFailure { cpu, insn } => {
            answer(id, handler.emulation_failure(cpu, insn), || {
                Next::InternalError
            })
        }
        Exit::InternalError => Next::InternalError,
        // KVM Userfault: the access never executed; once the page is in, re-enter.
        Exit::MemoryFault { flags, gpa, size } => {
            answer(id, handler.memory_fault(flags, gpa, size), || {
                Next::Fault(format!(
                    "KVM_EXIT_MEMORY_FAULT at 0x{gpa:x}+0x{size:x}, flags 0x{flags:x} \
                     (no demand pager handles it)"
                ))
            })
        }
        Exit::DirtyRingFull => answer(id, handler.ring_full(), || {
            stop(id, "KVM_EXIT_DIRTY_RING_FULL on a VM without dirty rings")
        }),
        Exit::Hlt => stop(
            id,
            "KVM_EXIT_HLT with the in-kernel irqchip: the vCPU halted with nothing able to wake it",
        ),
        Exit::Shutdown => Next::Fault(
            "triple fault (KVM_EXIT_SHUTDOWN): the guest hit an exception it could not handle"
                .into(),
        ),
        Exit::FailEntry(reason) => Next::Fault(format!(
            "KVM_EXIT_FAIL_ENTRY, hardware entry failure reason 0x{reason:x}"
        )),
        Exit::SystemEvent(kind) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Next::Stop(VcpuStop::Poweroff),
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => Next::Stop(VcpuStop::Reset),
            other => stop(
                id,
                &format!("guest system event {other} (crash or unsupported)"),
            ),
        },
        Exit::Nothing => Next::Continue,
        Exit::Unsupported(reason) => stop(id, &format!("unhandled KVM exit reason {reason}")),
        Exit::Unexpected(what) => stop(id, &format!("unexpected KVM exit {what}")),
    }
}

/// An MMIO exit into guest RAM. A demand pager completes it; without one, PVM reports a guest
/// access whose host mapping faults this way: never a device access, and never something to
/// emulate (PLATFORM.md §5).
fn ram_access(id: u8, handler: &mut dyn ExitHandler, addr: u64, access: RamAccess<'_>) -> Next {
    let dir = access.direction();
    answer(id, handler.ram_access(addr, access), || {
        stop(
            id,
            &format!(
                "MMIO {dir} exit at 0x{addr:x}, which is guest RAM: the host mapping of that \
                 page failed, not a device access"
            ),
        )
    })
}

fn answer(id: u8, outcome: Outcome, declined: impl FnOnce() -> Next) -> Next {
    match outcome {
        Outcome::Resume => Next::Continue,
        Outcome::Declined => declined(),
        Outcome::Stop(why) => stop(id, &why),
        Outcome::StopWithRegisters(why) => Next::Fault(why),
    }
}

fn stop(id: u8, why: &str) -> Next {
    Next::Stop(VcpuStop::Fault(format!("vcpu{id}: {why}")))
}

fn in_ram(ram: &[RamRange], gpa: u64) -> bool {
    ram.iter().any(|r| r.contains(gpa))
}

fn action_next(action: VcpuAction) -> Next {
    match action {
        VcpuAction::Continue => Next::Continue,
        VcpuAction::Reset => Next::Stop(VcpuStop::Reset),
        VcpuAction::Exit(code) => Next::Stop(VcpuStop::DeviceExit(code)),
    }
}

#[cfg(test)]
#[path = "dispatch_tests.rs"]
mod tests;
