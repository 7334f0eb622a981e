//! The vCPU exits that are not device I/O: a vCPU touching guest RAM that is not mapped for it
//! yet (demand paging) and a full dirty ring (tracking). The run loop knows neither; whoever
//! armed the mechanism hands each vCPU an `ExitHandler` and the loop asks it. An exit no handler
//! takes is reported as it would be without one.

use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;

/// What a handler made of an exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Dealt with: re-enter the guest.
    Resume,
    /// Not this handler's exit (nothing armed, or not memory it serves): the next handler, or
    /// the vCPU's own report, has it.
    Declined,
    /// The guest cannot go on; the vCPU reports this reason after its id.
    Stop(String),
    /// As `Stop`, followed by the vCPU's registers: the guest's state explains the failure.
    StopWithRegisters(String),
}

/// A guest access that KVM reported as MMIO but that falls in guest RAM.
pub enum RamAccess<'a> {
    /// A load: its data goes back to the guest through this buffer.
    Read(&'a mut [u8]),
    /// A store, already retired: its data must reach memory here.
    Write(&'a [u8]),
}

impl RamAccess<'_> {
    pub fn len(&self) -> usize {
        match self {
            RamAccess::Read(d) => d.len(),
            RamAccess::Write(d) => d.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// "read" or "write", for reports.
    pub fn direction(&self) -> &'static str {
        match self {
            RamAccess::Read(_) => "read",
            RamAccess::Write(_) => "write",
        }
    }
}

/// What a handler may ask of the vCPU whose emulation failed (an exit that carries no address).
/// A trait so that handlers are testable without KVM.
pub trait GuestCpu {
    fn regs(&self) -> Option<kvm_regs>;
    fn sregs(&self) -> Option<kvm_sregs>;
    /// The guest-physical address of linear address `gva`, if the guest's page tables map it.
    fn translate(&self, gva: u64) -> Option<u64>;
}

impl GuestCpu for VcpuFd {
    fn regs(&self) -> Option<kvm_regs> {
        self.get_regs().ok()
    }

    fn sregs(&self) -> Option<kvm_sregs> {
        self.get_sregs().ok()
    }

    fn translate(&self, gva: u64) -> Option<u64> {
        match self.translate_gva(gva) {
            Ok(t) if t.valid != 0 => Some(t.physical_address),
            _ => None,
        }
    }
}

/// One vCPU's handler for the exits above. Each vCPU gets its own (so a handler may count per
/// vCPU); every method declines unless overridden.
pub trait ExitHandler: Send {
    /// An MMIO exit at `gpa`, which is guest RAM.
    fn ram_access(&mut self, _gpa: u64, _access: RamAccess<'_>) -> Outcome {
        Outcome::Declined
    }

    /// KVM_EXIT_MEMORY_FAULT, with the exit's raw fields.
    fn memory_fault(&mut self, _flags: u64, _gpa: u64, _size: u64) -> Outcome {
        Outcome::Declined
    }

    /// An emulation failure (KVM_INTERNAL_ERROR_EMULATION): `insn` holds the instruction bytes
    /// when KVM reported them.
    fn emulation_failure(&mut self, _cpu: &dyn GuestCpu, _insn: Option<&[u8]>) -> Outcome {
        Outcome::Declined
    }

    /// KVM_EXIT_DIRTY_RING_FULL.
    fn ring_full(&mut self) -> Outcome {
        Outcome::Declined
    }

    /// Any other exit: the guest made progress since the last of the above.
    fn progress(&mut self) {}

    /// A line for the report of an emulation failure no handler resolved (what was armed and
    /// why it could not help).
    fn failure_note(&self) -> Option<String> {
        None
    }
}

/// Several handlers, asked in order; the first that does not decline answers.
#[derive(Default)]
pub struct Handlers(pub Vec<Box<dyn ExitHandler>>);

impl Handlers {
    fn first(&mut self, mut ask: impl FnMut(&mut dyn ExitHandler) -> Outcome) -> Outcome {
        for h in &mut self.0 {
            match ask(h.as_mut()) {
                Outcome::Declined => {}
                answer => return answer,
            }
        }
        Outcome::Declined
    }
}

impl ExitHandler for Handlers {
    fn ram_access(&mut self, gpa: u64, mut access: RamAccess<'_>) -> Outcome {
        self.first(|h| {
            let again = match &mut access {
                RamAccess::Read(d) => RamAccess::Read(d),
                RamAccess::Write(d) => RamAccess::Write(d),
            };
            h.ram_access(gpa, again)
        })
    }

    fn memory_fault(&mut self, flags: u64, gpa: u64, size: u64) -> Outcome {
        self.first(|h| h.memory_fault(flags, gpa, size))
    }

    fn emulation_failure(&mut self, cpu: &dyn GuestCpu, insn: Option<&[u8]>) -> Outcome {
        self.first(|h| h.emulation_failure(cpu, insn))
    }

    fn ring_full(&mut self) -> Outcome {
        self.first(|h| h.ring_full())
    }

    fn progress(&mut self) {
        for h in &mut self.0 {
            h.progress();
        }
    }

    fn failure_note(&self) -> Option<String> {
        self.0.iter().find_map(|h| h.failure_note())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers ring-full exits and counts what it was asked.
    struct Ring(Outcome, u32);
    impl ExitHandler for Ring {
        fn ring_full(&mut self) -> Outcome {
            self.1 += 1;
            self.0.clone()
        }
        fn progress(&mut self) {
            self.1 = 0;
        }
    }

    /// Fills reads with its byte.
    struct Pages(u8);
    impl ExitHandler for Pages {
        fn ram_access(&mut self, _gpa: u64, access: RamAccess<'_>) -> Outcome {
            match access {
                RamAccess::Read(d) => {
                    d.fill(self.0);
                    Outcome::Resume
                }
                RamAccess::Write(_) => Outcome::Declined,
            }
        }
        fn failure_note(&self) -> Option<String> {
            Some(format!("pages {}", self.0))
        }
    }

    #[test]
    fn handlers_answer_with_the_first_that_does_not_decline() {
        let mut hs = Handlers(vec![
            Box::new(Ring(Outcome::Stop("full".into()), 0)),
            Box::new(Pages(1)),
            Box::new(Pages(2)),
        ]);
        let mut data = [0u8; 4];
        assert_eq!(
            hs.ram_access(0x1000, RamAccess::Read(&mut data)),
            Outcome::Resume
        );
        assert_eq!(data, [1; 4], "the second handler answered, not the third");
        assert_eq!(
            hs.ram_access(0x1000, RamAccess::Write(&[9])),
            Outcome::Declined
        );
        assert_eq!(hs.ring_full(), Outcome::Stop("full".into()));
        assert_eq!(hs.memory_fault(0, 0x1000, 8), Outcome::Declined);
        assert_eq!(hs.failure_note().as_deref(), Some("pages 1"));
        assert!(Handlers::default().failure_note().is_none());
    }
}
