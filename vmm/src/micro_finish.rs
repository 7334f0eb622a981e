//! Ending a running micro guest after a chosen number of passes (the API's `finish`), and the
//! budget and end-of-run check that move with the guest.
//!
//! The payload reads its budget (`guest_abi::micro::OFF_PASSES`, 0 = forever) from the mailbox
//! after every pass. `finish --after N` pauses every vCPU, reads each one's current pass from
//! its mailbox field, sets the budget to T = max(current passes) + N, arms the end-of-run check
//! with the model of T passes (computed in the background) and resumes: every vCPU then ends
//! after exactly pass T, so the final memory is the model's for T passes whatever the timing.
//!
//! `MicroBudget` is the run's slot for the current mailbox (with the budget) and the check: the
//! end of the run checks against it, and a migration or snapshot describes the VM with it
//! (`Shared::describe`), so the destination or restored VM checks against the same budget.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use guest_abi::{layout, micro};
use micro_guest::{Workload, WorkloadError, MAILBOX_SIZE};
use vm_memory::{Bytes, GuestAddress};

use crate::machine::description::VmDescription;
use crate::machine::progress::Phase;
use crate::machine::shared::Shared;
use crate::machine::GuestConfig;
use crate::memory::GuestMemory;
use crate::micro_check::{check_run, CheckResult, Expected};
use crate::vstate::pause::{Owner, PauseError};

/// How long `finish` waits for every vCPU to pause.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum FinishError {
    #[error("--after must be at least 1: the guest ends after pass (current pass + N)")]
    ZeroAfter,
    #[error("finish is for the micro guest (vmm run --micro); this VM runs Linux")]
    NotMicro,
    #[error(
        "this VM runs a raw --payload, not the built-in micro guest: nothing says it reads its \
         budget from the mailbox"
    )]
    RawPayload,
    /// `Shared::memory_complete`'s refusal: a message about the machine's state, no error
    /// underneath.
    #[error("cannot finish now: {0}")]
    Busy(String),
    #[error(
        "the micro guest already reached its budget of {budget} passes (a vCPU is at pass \
         {current}, and may have ended)"
    )]
    AtBudget { budget: u64, current: u64 },
    #[error("pass {current} + {after} passes does not fit in 64 bits")]
    Overflow { current: u64, after: u64 },
    #[error("the micro guest's mailbox in guest memory: {0}")]
    Mailbox(WorkloadError),
    #[error("{what} guest memory at {gpa:#x}: {source}")]
    Memory {
        what: &'static str,
        gpa: u64,
        source: vm_memory::GuestMemoryError,
    },
    #[error("pausing the guest: {0}")]
    Pause(PauseError),
}

/// The budget T for `finish --after after`: `after` passes beyond the furthest vCPU's current
/// pass. `budget` is the mailbox's budget now (0 = forever); once a vCPU has reached it, that
/// vCPU may already have read it and be on its way out, so a new budget could not hold it.
pub fn target(budget: u64, current_passes: &[u64], after: u64) -> Result<u64, FinishError> {
    if after == 0 {
        return Err(FinishError::ZeroAfter);
    }
    let current = current_passes.iter().copied().max().unwrap_or(0);
    if budget != 0 && current >= budget {
        return Err(FinishError::AtBudget { budget, current });
    }
    current
        .checked_add(after)
        .ok_or(FinishError::Overflow { current, after })
}

/// From the mailbox as it is in guest memory (every vCPU paused): the budget T and the workload
/// with that budget (whose model the run is then checked against).
pub fn plan(mailbox: &[u8; MAILBOX_SIZE], after: u64) -> Result<(u64, Workload), FinishError> {
    let w = Workload::from_mailbox(mailbox).map_err(FinishError::Mailbox)?;
    let current: Vec<u64> = (0..w.vcpus())
        .map(|v| micro_guest::vcpu_current_pass(mailbox, v))
        .collect();
    let t = target(w.passes(), &current, after)?;
    Ok((t, with_passes(&w, t)?))
}

/// `w` with a budget of `passes`.
fn with_passes(w: &Workload, passes: u64) -> Result<Workload, FinishError> {
    Workload::new(
        w.region_gpa(),
        w.pages(),
        w.pattern(),
        passes,
        w.param(),
        w.seed(),
    )
    .and_then(|n| n.with_vcpus(w.vcpus(), w.shared_gpa(), w.shared_pages()))
    .map_err(FinishError::Mailbox)
}

/// Whether the VM's state lets `finish` pause it: Ok(true) when the user paused it (finish
/// then works in that pause and leaves the guest paused), Ok(false) when it runs.
pub fn may_finish(phase: Phase, owner: Option<Owner>) -> Result<bool, FinishError> {
    match phase {
        Phase::Connecting | Phase::Precopy | Phase::StopAndCopy | Phase::Postcopy => {
            return Err(FinishError::Busy(
                "a migration is in progress (its destination can finish the guest)".into(),
            ))
        }
        Phase::Incoming => {
            return Err(FinishError::Busy(
                "the guest is still arriving (postcopy brings its memory in)".into(),
            ))
        }
        Phase::Completed => {
            return Err(FinishError::Busy(
                "this VM was migrated away (finish it on the destination)".into(),
            ))
        }
        Phase::None | Phase::Failed => {}
    }
    match owner {
        None => Ok(false),
        Some(Owner::Api) => Ok(true),
        Some(other) => Err(FinishError::Busy(format!(
            "the guest is paused by {other} (a migration or snapshot is in progress)"
        ))),
    }
}

/// Whether `code` (guest memory at the load address) is the built-in micro guest.
pub fn is_builtin(code: &[u8]) -> bool {
    code == micro_guest::PAYLOAD
}

/// The run's micro guest mailbox with its current budget, and the check armed for the end.
struct Slot {
    /// The mailbox page vmm wrote at boot (or that the source described), with the budget
    /// `finish` set since.
    mailbox: Vec<u8>,
    /// Checked against guest RAM when every vCPU exits with status 0; None: no check.
    expected: Option<Expected>,
}

/// The run's slot for the micro guest's budget and end-of-run check (None inside for Linux).
pub struct MicroBudget {
    slot: Mutex<Option<Slot>>,
}

impl MicroBudget {
    /// The slot as the VM starts: the mailbox and check of `guest` (`--verify`, or what the
    /// source's description armed).
    pub fn of(guest: &GuestConfig) -> MicroBudget {
        let slot = match guest {
            GuestConfig::Micro {
                mailbox, expected, ..
            } => Some(Slot {
                mailbox: mailbox.clone(),
                expected: expected.clone(),
            }),
            GuestConfig::Linux(_) => None,
        };
        MicroBudget {
            slot: Mutex::new(slot),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Slot>> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The micro guest's budget now (0 = forever); None for Linux or an unreadable mailbox.
    pub fn passes(&self) -> Option<u64> {
        let g = self.lock();
        let off = micro::OFF_PASSES as usize;
        let bytes = g.as_ref()?.mailbox.get(off..off + 8)?;
        Some(u64::from_le_bytes(bytes.try_into().ok()?))
    }

    /// `base` with the current mailbox and check (see `VmDescription::with_micro`). Waits for a
    /// `finish` in progress, so a description never misses a budget the guest already has.
    pub fn describe(&self, base: &VmDescription) -> VmDescription {
        match self.lock().as_ref() {
            Some(s) => base.clone().with_micro(&s.mailbox, s.expected.is_some()),
            None => base.clone(),
        }
    }

    /// The end-of-run check of guest memory, if one is armed.
    pub fn check(&self, mem: &GuestMemory) -> Option<CheckResult> {
        let g = self.lock();
        let s = g.as_ref()?;
        let expected = s.expected.as_ref()?;
        Some(check_run(mem, expected, &s.mailbox))
    }
}

/// `finish --after after` on the VM behind `shared`: returns the budget T set. Refused, with
/// nothing changed, for a Linux guest, a raw payload, during a migration or snapshot, for
/// `after` 0, a budget already reached, or a T beyond 64 bits.
pub fn finish(shared: &Shared, after: u64) -> Result<u64, FinishError> {
    if after == 0 {
        return Err(FinishError::ZeroAfter);
    }
    // Held throughout: a migration or snapshot describing the VM waits for the new budget.
    let mut slot = shared.micro.budget.lock();
    let Some(slot) = slot.as_mut() else {
        return Err(FinishError::NotMicro);
    };
    let phase = shared.progress().phase;
    let user_paused = may_finish(phase, shared.pause.owner())?;
    shared.memory_complete().map_err(FinishError::Busy)?;
    let mut code = vec![0; micro_guest::PAYLOAD.len()];
    read(&shared.memory, layout::MICRO_LOAD_GPA, &mut code)?;
    if !is_builtin(&code) {
        return Err(FinishError::RawPayload);
    }

    let owner = if user_paused {
        Owner::Api
    } else {
        shared
            .pause
            .pause(&shared.kicker, Owner::Finish, false, PAUSE_TIMEOUT)
            .map_err(FinishError::Pause)?;
        Owner::Finish
    };
    let set = shared
        .pause
        .while_paused(owner, || set_budget(&shared.memory, slot, after))
        .map_err(FinishError::Pause)
        .and_then(|r| r);
    if owner == Owner::Finish {
        if let Err(e) = shared.pause.resume(Owner::Finish) {
            // Only when the VM is ending (its pauses were all lifted): nothing left to resume.
            tracing::warn!("finish: resuming the guest: {e}");
        }
    }
    let t = set?;
    tracing::info!("micro guest: finishing after pass {t}");
    Ok(t)
}

/// With every vCPU parked: reads the mailbox from guest memory, plans T, arms the check for T
/// and writes T to the guest's budget, last, so a failure leaves everything as it was.
fn set_budget(mem: &GuestMemory, slot: &mut Slot, after: u64) -> Result<u64, FinishError> {
    let mut mailbox = [0u8; MAILBOX_SIZE];
    read(mem, layout::MICRO_MAILBOX_GPA, &mut mailbox)?;
    let (t, workload) = plan(&mailbox, after)?;
    let expected = Expected::in_background(workload.region_gpa(), workload);
    let gpa = layout::MICRO_MAILBOX_GPA + micro::OFF_PASSES;
    mem.write_obj(t, GuestAddress(gpa))
        .map_err(|source| FinishError::Memory {
            what: "writing",
            gpa,
            source,
        })?;
    // The copy that describes the VM: the boot mailbox with the new budget.
    let off = micro::OFF_PASSES as usize;
    if let Some(field) = slot.mailbox.get_mut(off..off + 8) {
        field.copy_from_slice(&t.to_le_bytes());
    }
    slot.expected = expected;
    Ok(t)
}

fn read(mem: &GuestMemory, gpa: u64, buf: &mut [u8]) -> Result<(), FinishError> {
    mem.read_slice(buf, GuestAddress(gpa))
        .map_err(|source| FinishError::Memory {
            what: "reading",
            gpa,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::description::GuestDesc;
    use micro_guest::Pattern;

    fn set(mailbox: &mut [u8; MAILBOX_SIZE], off: u64, value: u64) {
        mailbox[off as usize..off as usize + 8].copy_from_slice(&value.to_le_bytes());
    }

    #[test]
    fn the_budget_is_the_furthest_pass_plus_n_and_checked() {
        assert_eq!(target(0, &[5, 9, 7], 50).unwrap(), 59);
        // Before any pass, and with no vCPU fields at all.
        assert_eq!(target(0, &[0, 0], 1).unwrap(), 1);
        assert_eq!(target(0, &[], 3).unwrap(), 3);
        // A finite budget not reached yet may move either way.
        assert_eq!(target(100, &[10, 12], 5).unwrap(), 17);
        assert_eq!(target(100, &[98, 99], 50).unwrap(), 149);
        assert!(matches!(target(0, &[5], 0), Err(FinishError::ZeroAfter)));
        assert!(matches!(
            target(10, &[3, 10], 5),
            Err(FinishError::AtBudget {
                budget: 10,
                current: 10
            })
        ));
        assert!(matches!(
            target(0, &[u64::MAX - 4], 5),
            Err(FinishError::Overflow { .. })
        ));
        assert_eq!(target(0, &[u64::MAX - 5], 5).unwrap(), u64::MAX);
    }

    #[test]
    fn the_plan_reads_every_vcpus_pass_from_the_mailbox() {
        let region = layout::MICRO_REGION_GPA;
        let w = Workload::new(region, 16, Pattern::Random, 0, 40, 3)
            .and_then(|w| w.with_vcpus(3, region + 48 * 4096, 2))
            .expect("valid");
        let mut mb = w.mailbox();
        for (vcpu, pass) in [(0, 11), (1, 14), (2, 12)] {
            set(&mut mb, micro::vcpu_pass_offset(vcpu), pass);
        }
        let (t, planned) = plan(&mb, 50).expect("plan");
        assert_eq!(t, 64);
        assert_eq!(planned.passes(), 64);
        assert_eq!(with_passes(&planned, 0).expect("valid"), w);
        // A vCPU beyond the count does not count.
        set(&mut mb, micro::vcpu_pass_offset(3), 1000);
        assert_eq!(plan(&mb, 50).expect("plan").0, 64);
        // A junk mailbox is refused.
        set(&mut mb, micro::OFF_MAGIC, 0);
        assert!(matches!(plan(&mb, 1), Err(FinishError::Mailbox(_))));
    }

    #[test]
    fn finish_is_refused_while_the_vm_moves_or_is_paused_by_another() {
        assert!(!may_finish(Phase::None, None).unwrap());
        assert!(may_finish(Phase::None, Some(Owner::Api)).unwrap());
        assert!(!may_finish(Phase::Failed, None).unwrap());
        for phase in [
            Phase::Connecting,
            Phase::Precopy,
            Phase::StopAndCopy,
            Phase::Postcopy,
            Phase::Completed,
            Phase::Incoming,
        ] {
            assert!(
                matches!(may_finish(phase, None), Err(FinishError::Busy(_))),
                "{phase:?}"
            );
        }
        for owner in [Owner::Migration, Owner::Finish] {
            let e = may_finish(Phase::None, Some(owner)).unwrap_err();
            assert!(e.to_string().contains("migration or snapshot"), "{e}");
        }
        assert!(is_builtin(micro_guest::PAYLOAD));
        assert!(!is_builtin(&[0xeb, 0xfe]));
        let mut other = micro_guest::PAYLOAD.to_vec();
        other[20] ^= 1;
        assert!(!is_builtin(&other));
    }

    /// The slot: Linux has none; the budget and check a finish sets are what the VM is then
    /// described with.
    #[test]
    fn the_slot_describes_the_current_budget() {
        let region = layout::MICRO_REGION_GPA;
        let w = Workload::new(region, 4, Pattern::Sweep, 0, 0, 1).expect("valid");
        let guest = GuestConfig::Micro {
            payload: Vec::new(),
            mailbox: w.mailbox().to_vec(),
            region: Some((region, 4 * 4096)),
            expected: None,
        };
        let budget = MicroBudget::of(&guest);
        assert_eq!(budget.passes(), Some(0));
        let mut slot = budget.lock();
        let s = slot.as_mut().expect("micro");
        s.mailbox[micro::OFF_PASSES as usize..][..8].copy_from_slice(&7u64.to_le_bytes());
        s.expected = Expected::in_background(region, with_passes(&w, 7).expect("valid"));
        drop(slot);
        assert_eq!(budget.passes(), Some(7));
        let base = VmDescription {
            vcpus: 1,
            mem_bytes: 64 << 20,
            ram: vec![(0, 64 << 20)],
            guest: GuestDesc::Micro {
                mailbox: w.mailbox().to_vec(),
                region: Some((region, 4 * 4096)),
                verify: false,
            },
            disks: vec![],
            devices: vec![],
            dirty_ring: false,
            phys_bits: None,
            passthrough: vec![],
        };
        let now = budget.describe(&base);
        let GuestDesc::Micro {
            mailbox, verify, ..
        } = &now.guest
        else {
            panic!("not a micro guest")
        };
        let mb = <&[u8; MAILBOX_SIZE]>::try_from(mailbox.as_slice()).expect("a page");
        assert_eq!(Workload::from_mailbox(mb).expect("valid").passes(), 7);
        assert!(*verify);
        // The destination (or restore) built from it checks against 7 passes.
        let cfg = now
            .config(
                vec![],
                vec![],
                crate::machine::ConsoleOutput::Null,
                false,
                None,
            )
            .expect("config");
        let GuestConfig::Micro {
            expected: Some(e), ..
        } = &cfg.guest
        else {
            panic!("no check armed")
        };
        assert_eq!(e.pages().len(), 4);
        assert_eq!(budget.describe(&base).guest, now.guest);
        let linux = GuestConfig::Linux(crate::boot::linux::LinuxBoot {
            kernel: "vmlinux".into(),
            initrd: None,
            cmdline: String::new(),
        });
        assert_eq!(MicroBudget::of(&linux).passes(), None);
    }
}
