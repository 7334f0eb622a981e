//! The vCPU side of exit-based demand paging: each vCPU's `ExitHandler` over the machine's exit
//! pager (armed after the vCPUs exist, so looked up on every exit). An MMIO exit into RAM, a KVM
//! Userfault exit and an instruction fetch from unmapped RAM are missing pages to bring in, not
//! faults.

use kvm_bindings::{kvm_regs, kvm_sregs};

use super::exits::{DemandExits, ExitPager};
use super::operands::{self, OperandError};
use super::UserfaultError;
use crate::sys::kvm_userfault::MemoryFault;
use crate::vstate::exits::{ExitHandler, GuestCpu, Outcome, RamAccess};

const PAGE: u64 = 4096;

/// Why the pages an instruction touches could not be brought in.
#[derive(Debug, thiserror::Error)]
pub enum VcpuExitError {
    #[error(transparent)]
    Operands(#[from] OperandError),
    #[error("bringing in 0x{gpa:x}: {source}")]
    BringIn {
        gpa: u64,
        #[source]
        source: UserfaultError,
    },
}

/// One vCPU's demand-paging exits.
pub struct PagerExits {
    id: u8,
    pager: DemandExits,
    /// RIP of the last emulation failure re-entered because its code page was being remapped.
    code_retry: Option<u64>,
}

impl PagerExits {
    /// For vCPU `id`, resolving through whatever pager is (or later gets) armed in `pager`.
    pub fn new(id: u8, pager: DemandExits) -> PagerExits {
        PagerExits {
            id,
            pager,
            code_retry: None,
        }
    }
}

impl ExitHandler for PagerExits {
    /// Brings the page in, then completes the access against memory exactly as KVM would have
    /// (a load's data goes back through kvm_run; a store, whose RIP is already past it, is
    /// applied here). Completing rather than replaying matters: a load replayed without its data
    /// retires without writing its register (PLATFORM.md §8).
    fn ram_access(&mut self, gpa: u64, access: RamAccess<'_>) -> Outcome {
        let Some(pager) = self.pager.get() else {
            return Outcome::Declined;
        };
        let dir = access.direction();
        let done = pager
            .resolve(self.id, gpa, access.len() as u64)
            .and_then(|served| {
                if !served {
                    return Ok(false);
                }
                match access {
                    RamAccess::Read(data) => pager.complete_read(gpa, data)?,
                    RamAccess::Write(data) => pager.complete_write(gpa, data)?,
                }
                Ok(true)
            });
        match done {
            Ok(true) => Outcome::Resume,
            Ok(false) => Outcome::Declined,
            Err(e) => Outcome::Stop(format!(
                "{} could not bring in the page of a guest {dir} at 0x{gpa:x}: {e}; the guest \
                 stops rather than run on without it",
                pager.name()
            )),
        }
    }

    /// KVM Userfault: the access never executed; once the page is in, the vCPU re-enters.
    fn memory_fault(&mut self, flags: u64, gpa: u64, size: u64) -> Outcome {
        let fault = MemoryFault::from_fields(flags, gpa, size);
        let Some(pager) = self.pager.get().filter(|_| fault.userfault) else {
            return Outcome::Declined;
        };
        match pager.resolve(self.id, gpa, size) {
            Ok(true) => Outcome::Resume,
            Ok(false) => Outcome::Stop(format!(
                "KVM userfault exit at 0x{gpa:x}, outside guest RAM"
            )),
            Err(e) => Outcome::Stop(format!(
                "{} could not bring in 0x{gpa:x}: {e}; the guest stops rather than run on \
                 without it",
                pager.name()
            )),
        }
    }

    /// KVM reports an instruction fetch from a page in no memslot as an emulation failure,
    /// without a GPA. Translate the RIP (and the last byte an instruction there could span),
    /// bring in whatever is missing and re-enter; KVM then fetches the instruction again. When
    /// the code is all mapped, the instruction itself touched an unmapped page in a way KVM
    /// cannot emulate (SSE/AVX): decode its operands and bring their pages in. Otherwise it is
    /// a real emulation failure, declined so the vCPU reports it in full.
    fn emulation_failure(&mut self, cpu: &dyn GuestCpu, insn: Option<&[u8]>) -> Outcome {
        let Some(pager) = self.pager.get().cloned() else {
            return Outcome::Declined;
        };
        let pager = pager.as_ref();
        let (Some(regs), Some(sregs)) = (cpu.regs(), cpu.sregs()) else {
            return Outcome::Declined;
        };
        let long_mode = sregs.efer & (1 << 10) != 0 && sregs.cs.l != 0;
        let linear = if long_mode {
            regs.rip
        } else {
            sregs.cs.base.wrapping_add(regs.rip)
        };
        let mut brought = false;
        let mut raced = false;
        for at in [linear, linear.wrapping_add(14)] {
            let Some(gpa) = cpu.translate(at) else {
                continue;
            };
            if !pager.covers(gpa) {
                continue;
            }
            // Mapped now: the fetch may have raced with a memslot merge, which `mapped` waited
            // out. Re-enter once; the same RIP failing again is a real emulation failure.
            if pager.mapped(gpa) {
                raced = true;
                continue;
            }
            match pager.resolve(self.id, gpa, 1) {
                Ok(true) => {
                    pager.note_ifetch();
                    brought = true
                }
                Ok(false) => {}
                Err(e) => {
                    return Outcome::StopWithRegisters(format!(
                        "{} could not bring in the code page at 0x{gpa:x}: {e}",
                        pager.name()
                    ))
                }
            }
        }
        if !brought {
            let bitness = if long_mode {
                64
            } else if sregs.cs.db != 0 {
                32
            } else {
                16
            };
            let operands = Operands {
                id: self.id,
                cpu,
                regs: &regs,
                sregs: &sregs,
                bitness,
            };
            match operands.bring_in(pager, insn) {
                Ok(b) => {
                    if b {
                        pager.note_decoded();
                    }
                    brought = b
                }
                Err(e) => {
                    return Outcome::StopWithRegisters(format!(
                        "emulation failure with {} armed: {e}",
                        pager.name()
                    ))
                }
            }
        }
        if brought {
            self.code_retry = None;
            Outcome::Resume
        } else if raced && self.code_retry != Some(regs.rip) {
            self.code_retry = Some(regs.rip);
            Outcome::Resume
        } else {
            Outcome::Declined
        }
    }

    fn failure_note(&self) -> Option<String> {
        self.pager.get().map(|p| {
            format!(
                "{} is armed and the code here is mapped: if this instruction reads or writes a \
                 page not mapped yet in a way KVM cannot emulate, e.g. a SIMD/VEX access, the \
                 exit carries no address and this backend cannot serve it; restore with \
                 --demand uffd-missing",
                p.name()
            )
        })
    }
}

/// The instruction whose emulation failed, on the vCPU that ran it.
struct Operands<'a> {
    id: u8,
    cpu: &'a dyn GuestCpu,
    regs: &'a kvm_regs,
    sregs: &'a kvm_sregs,
    bitness: u32,
}

impl Operands<'_> {
    /// The pages the instruction's memory operands touch, brought in when unmapped.
    /// Ok(false): no instruction bytes, or all mapped (a real emulation failure).
    fn bring_in(&self, pager: &dyn ExitPager, insn: Option<&[u8]>) -> Result<bool, VcpuExitError> {
        let Some(bytes) = insn else {
            return Ok(false);
        };
        let accesses = operands::memory_accesses(bytes, self.bitness, self.regs, self.sregs)?;
        tracing::debug!(
            "vcpu{}: emulation failure at 0x{:x}: operands {accesses:x?}",
            self.id,
            self.regs.rip
        );
        let mut brought = false;
        for a in accesses {
            let mut page = a.linear & !(PAGE - 1);
            let end = a.linear.saturating_add(a.len);
            while page < end {
                let Some(gpa) = self.cpu.translate(page).map(|g| g & !(PAGE - 1)) else {
                    tracing::debug!("vcpu{}: 0x{page:x} does not translate", self.id);
                    page += PAGE;
                    continue;
                };
                tracing::debug!(
                    "vcpu{}: operand page 0x{page:x} -> 0x{gpa:x}, mapped {}",
                    self.id,
                    pager.mapped(gpa)
                );
                if pager.covers(gpa) && !pager.mapped(gpa) {
                    pager
                        .resolve(self.id, gpa, 1)
                        .map_err(|source| VcpuExitError::BringIn { gpa, source })?;
                    brought = true;
                }
                page += PAGE;
            }
        }
        Ok(brought)
    }
}

#[cfg(test)]
#[path = "vcpu_exits_tests.rs"]
mod tests;
