//! `PagerExits` against a made-up pager and vCPU: no KVM, no guest.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use kvm_bindings::{kvm_regs, kvm_sregs};

use super::*;
use crate::userfault::{ExitStats, Fetch};

/// Serves guest RAM below 1 MiB; every page reads as its own page number; `broken` fails every
/// resolve.
#[derive(Default)]
struct Pager {
    mapped: Mutex<HashSet<u64>>,
    resolved: Mutex<Vec<(u64, u64)>>,
    written: Mutex<Vec<(u64, Vec<u8>)>>,
    ifetch: AtomicU64,
    decoded: AtomicU64,
    broken: bool,
}

const RAM_END: u64 = 0x10_0000;

impl ExitPager for Pager {
    fn name(&self) -> &'static str {
        "test-pager"
    }
    fn covers(&self, gpa: u64) -> bool {
        gpa < RAM_END
    }
    fn resolve(&self, _vcpu: u8, gpa: u64, len: u64) -> Result<bool, UserfaultError> {
        if self.broken {
            return Err(UserfaultError::NotRam { gpa, len });
        }
        if !self.covers(gpa) {
            return Ok(false);
        }
        self.resolved.lock().unwrap().push((gpa, len));
        self.mapped.lock().unwrap().insert(gpa & !(PAGE - 1));
        Ok(true)
    }
    fn keep_mapped(&self, gpa: u64) -> Result<bool, UserfaultError> {
        self.resolve(0, gpa, 1)
    }
    fn mapped(&self, gpa: u64) -> bool {
        self.mapped.lock().unwrap().contains(&(gpa & !(PAGE - 1)))
    }
    fn complete_read(&self, gpa: u64, data: &mut [u8]) -> Result<(), UserfaultError> {
        data.fill((gpa / PAGE) as u8);
        Ok(())
    }
    fn complete_write(&self, gpa: u64, data: &[u8]) -> Result<(), UserfaultError> {
        self.written.lock().unwrap().push((gpa, data.to_vec()));
        Ok(())
    }
    fn set_fetch(&self, _fetch: Arc<dyn Fetch>) {}
    fn stats(&self) -> ExitStats {
        ExitStats::default()
    }
    fn note_ifetch(&self) {
        self.ifetch.fetch_add(1, Ordering::Relaxed);
    }
    fn note_decoded(&self) {
        self.decoded.fetch_add(1, Ordering::Relaxed);
    }
}

/// A vCPU in long mode at `rip`, whose page tables map linear = physical below 16 MiB.
struct Cpu {
    rip: u64,
    rax: u64,
}

impl GuestCpu for Cpu {
    fn regs(&self) -> Option<kvm_regs> {
        Some(kvm_regs {
            rip: self.rip,
            rax: self.rax,
            ..Default::default()
        })
    }
    fn sregs(&self) -> Option<kvm_sregs> {
        let mut s = kvm_sregs {
            efer: 1 << 10,
            ..Default::default()
        };
        s.cs.l = 1;
        Some(s)
    }
    fn translate(&self, gva: u64) -> Option<u64> {
        (gva < 0x100_0000).then_some(gva)
    }
}

fn armed(pager: Pager) -> (Arc<Pager>, PagerExits) {
    let pager = Arc::new(pager);
    let slot: DemandExits = Arc::new(OnceLock::new());
    let exits = PagerExits::new(2, slot.clone());
    let _ = slot.set(pager.clone());
    (pager, exits)
}

#[test]
fn every_exit_is_declined_until_a_pager_is_armed_and_then_found() {
    let slot: DemandExits = Arc::new(OnceLock::new());
    let mut exits = PagerExits::new(0, slot.clone());
    let mut data = [0u8; 4];
    let cpu = Cpu {
        rip: 0x3000,
        rax: 0,
    };
    assert_eq!(
        exits.ram_access(0x3000, RamAccess::Read(&mut data)),
        Outcome::Declined
    );
    assert_eq!(exits.memory_fault(1 << 3, 0x3000, 8), Outcome::Declined);
    assert_eq!(exits.emulation_failure(&cpu, None), Outcome::Declined);
    assert!(exits.failure_note().is_none());

    // Armed after the handler exists, as lazy restore and postcopy do.
    let pager = Arc::new(Pager::default());
    let _ = slot.set(pager.clone());
    assert_eq!(
        exits.ram_access(0x3000, RamAccess::Read(&mut data)),
        Outcome::Resume
    );
    assert_eq!(data, [3; 4]);
    let note = exits.failure_note().unwrap_or_default();
    assert!(note.starts_with("test-pager is armed"), "{note}");
}

#[test]
fn ram_accesses_bring_the_page_in_and_complete_against_memory() {
    let (pager, mut exits) = armed(Pager::default());
    let mut data = [0u8; 2];
    assert_eq!(
        exits.ram_access(0x5ffe, RamAccess::Read(&mut data)),
        Outcome::Resume
    );
    assert_eq!(data, [5, 5]);
    assert_eq!(
        exits.ram_access(0x7000, RamAccess::Write(&[1, 2, 3])),
        Outcome::Resume
    );
    assert_eq!(*pager.resolved.lock().unwrap(), [(0x5ffe, 2), (0x7000, 3)]);
    assert_eq!(*pager.written.lock().unwrap(), [(0x7000, vec![1, 2, 3])]);
    // Not RAM this pager serves: not its exit.
    assert_eq!(
        exits.ram_access(RAM_END, RamAccess::Write(&[1])),
        Outcome::Declined
    );

    let (_, mut broken) = armed(Pager {
        broken: true,
        ..Default::default()
    });
    let why = broken.ram_access(0x7000, RamAccess::Write(&[1]));
    assert!(
        matches!(&why, Outcome::Stop(m) if m.starts_with("test-pager could not bring in the page of a guest write at 0x7000")),
        "{why:?}"
    );
}

#[test]
fn only_userfault_memory_faults_are_resolved() {
    let userfault = crate::sys::kvm_userfault::KVM_MEMORY_EXIT_FLAG_USERFAULT;
    let (pager, mut exits) = armed(Pager::default());
    assert_eq!(exits.memory_fault(0, 0x9000, 0x1000), Outcome::Declined);
    assert!(pager.resolved.lock().unwrap().is_empty());
    assert_eq!(
        exits.memory_fault(userfault, 0x9000, 0x1000),
        Outcome::Resume
    );
    assert_eq!(*pager.resolved.lock().unwrap(), [(0x9000, 0x1000)]);
    let why = exits.memory_fault(userfault, RAM_END, 8);
    assert_eq!(
        why,
        Outcome::Stop(format!(
            "KVM userfault exit at 0x{RAM_END:x}, outside guest RAM"
        ))
    );
}

#[test]
fn a_fetch_from_an_unmapped_code_page_brings_it_in() {
    let (pager, mut exits) = armed(Pager::default());
    // The instruction may span into the next page: both are brought in.
    let cpu = Cpu {
        rip: 0x4ffa,
        rax: 0,
    };
    assert_eq!(exits.emulation_failure(&cpu, None), Outcome::Resume);
    assert_eq!(*pager.resolved.lock().unwrap(), [(0x4ffa, 1), (0x5008, 1)]);
    assert_eq!(pager.ifetch.load(Ordering::Relaxed), 2);
    assert_eq!(pager.decoded.load(Ordering::Relaxed), 0);
}

#[test]
fn mapped_code_is_retried_once_per_rip_then_reported() {
    let (pager, mut exits) = armed(Pager::default());
    pager.mapped.lock().unwrap().extend([0x4000, 0x5000]);
    let cpu = Cpu {
        rip: 0x4100,
        rax: 0,
    };
    // A race with a memslot update: re-enter once.
    assert_eq!(exits.emulation_failure(&cpu, None), Outcome::Resume);
    // The same RIP again, nothing to bring in: a real emulation failure.
    assert_eq!(exits.emulation_failure(&cpu, None), Outcome::Declined);
    assert!(pager.resolved.lock().unwrap().is_empty());
}

#[test]
fn an_sse_load_from_a_missing_page_is_decoded_and_its_operand_brought_in() {
    let (pager, mut exits) = armed(Pager::default());
    pager.mapped.lock().unwrap().extend([0x4000]);
    // movdqu xmm0, [rax]: 16 bytes at 0x8ff8, across two pages.
    let insn = [0xf3, 0x0f, 0x6f, 0x00];
    let cpu = Cpu {
        rip: 0x4100,
        rax: 0x8ff8,
    };
    assert_eq!(exits.emulation_failure(&cpu, Some(&insn)), Outcome::Resume);
    assert_eq!(*pager.resolved.lock().unwrap(), [(0x8000, 1), (0x9000, 1)]);
    assert_eq!(pager.decoded.load(Ordering::Relaxed), 1);
    assert_eq!(pager.ifetch.load(Ordering::Relaxed), 0);

    // Undecodable bytes: the accesses cannot be known, so the guest stops with the reason.
    let why = exits.emulation_failure(&cpu, Some(&[0x0f, 0xff]));
    assert!(
        matches!(&why, Outcome::StopWithRegisters(m)
            if m.starts_with("emulation failure with test-pager armed: cannot decode")),
        "{why:?}"
    );
}
