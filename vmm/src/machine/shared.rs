//! What a running VM exposes to the control API and to migration: its memory, KVM handles,
//! devices, the pause control, and a way to end the run (after the guest moved away).

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::devices_setup::Devices;
use super::stdin::InputSink;
use crate::machine::description::VmDescription;
use crate::machine::progress::Progress;
use crate::memory::{GuestMemory, RamRange};
use crate::micro_finish::MicroBudget;
use crate::tracking::{self, DirtyRings, TrackContext, TrackedSlot};
use crate::vstate::kick::Kicker;
use crate::vstate::pause::PauseControl;
use crate::vstate::vcpu::{VcpuEvent, VcpuStop};
use crate::vstate::vm::Vm;

/// What only the micro guest has: its pass counter and its workload's budget and check.
pub struct MicroGuest {
    /// Passes the guest has reported through its port.
    pub passes: Arc<AtomicU64>,
    /// The current budget and end-of-run check (`finish` changes both).
    pub budget: MicroBudget,
}

/// Handles on a running VM. Field order matters for drop: the VM goes before guest memory.
pub struct Shared {
    pub vm: Arc<Vm>,
    pub memory: GuestMemory,
    pub ranges: Vec<RamRange>,
    /// The memfd behind guest RAM (holes are punched in it for postcopy).
    pub memfd: File,
    pub rings: Option<Arc<DirtyRings>>,
    pub kicker: Arc<Kicker>,
    pub pause: Arc<PauseControl>,
    /// The stateful devices by id, saved and restored as a set.
    pub device_states: devices::device_states::StateRegistry,
    /// The VM as it started; `describe` gives it as it is now.
    pub description: VmDescription,
    pub micro: MicroGuest,
    /// A `--track` session owns the tracking backends while it runs.
    pub tracking_active: bool,
    pub start: Instant,
    /// Set while guest memory is still being paged in (lazy restore, postcopy): the memory
    /// file then has holes where pages are missing, so nothing may read it as the guest's RAM.
    pub paging_in: Arc<std::sync::atomic::AtomicBool>,
    /// The exit-based demand pager, if one was armed (its memslot layout may need settling).
    pub demand: crate::userfault::DemandExits,
    pub migration: Mutex<Progress>,
    /// The passed-through devices, in `--device` order: a migration moves their state over
    /// VFIO migration; a snapshot refuses them.
    pub passthrough: Vec<crate::machine::pci::passthrough::PassthroughHandle>,
    console_input: Mutex<InputSink>,
    events: Mutex<Sender<VcpuEvent>>,
    exit_evt: EventFd,
}

pub struct SharedParts {
    pub vm: Arc<Vm>,
    pub memory: GuestMemory,
    pub ranges: Vec<RamRange>,
    pub memfd: File,
    pub rings: Option<Arc<DirtyRings>>,
    pub kicker: Arc<Kicker>,
    pub pause: Arc<PauseControl>,
    pub micro_passes: Arc<AtomicU64>,
    pub description: VmDescription,
    pub micro_budget: MicroBudget,
    pub tracking_active: bool,
    pub start: Instant,
    pub paging_in: Arc<std::sync::atomic::AtomicBool>,
    pub demand: crate::userfault::DemandExits,
    pub events: Sender<VcpuEvent>,
    pub exit_evt: EventFd,
}

impl Shared {
    pub fn new(p: SharedParts, devs: &Devices) -> Shared {
        Shared {
            vm: p.vm,
            memory: p.memory,
            ranges: p.ranges,
            memfd: p.memfd,
            paging_in: p.paging_in,
            demand: p.demand,
            rings: p.rings,
            kicker: p.kicker,
            pause: p.pause,
            device_states: devs.states.clone(),
            description: p.description,
            micro: MicroGuest {
                passes: p.micro_passes,
                budget: p.micro_budget,
            },
            tracking_active: p.tracking_active,
            start: p.start,
            migration: Mutex::new(Progress::default()),
            passthrough: devs.passthrough.iter().map(|a| a.handle()).collect(),
            console_input: Mutex::new(devs.console_input()),
            events: Mutex::new(p.events),
            exit_evt: p.exit_evt,
        }
    }

    /// The VM as a migration's Hello or a snapshot's vm.json describes it: as it started, with
    /// the micro guest's budget and check as they are now (waits for a `finish` in progress).
    pub fn describe(&self) -> VmDescription {
        let mut d = self.micro.budget.describe(&self.description);
        d.passthrough = self
            .passthrough
            .iter()
            .map(crate::machine::pci::mig_v2::function_ids)
            .collect();
        d
    }

    /// The VM's RAM memslots as its registry has them now (after `settle_memslots`, the
    /// layout dirty tracking needs).
    pub fn ram_slots(&self) -> Vec<TrackedSlot> {
        tracking::slots_of(&self.vm)
    }

    /// What the dirty trackers need to run on this VM.
    pub fn track_context(&self) -> TrackContext {
        let k = self.kicker.clone();
        TrackContext {
            vm: self.vm.clone(),
            slots: self.ram_slots(),
            memory: self.memory.clone(),
            rings: self.rings.clone(),
            kick: Some(Arc::new(move || {
                if !k.kick_all_and_wait(Duration::from_millis(500)) {
                    tracing::warn!("a vCPU did not leave guest mode within 500 ms of a kick");
                }
            })),
        }
    }

    /// Ends the run as if a vCPU had stopped for `why` (the guest now lives elsewhere).
    pub fn end_run(&self, why: VcpuStop) {
        let tx = self.events.lock().unwrap_or_else(|p| p.into_inner());
        let _ = tx.send(VcpuEvent::Stopped { id: 0, why });
        let _ = self.exit_evt.write(1);
    }

    /// Refuses, with the reason, to read guest RAM from the memory file while pages are still
    /// missing from it (snapshot, migration). The `String` is that message (the callers' `Busy`
    /// variants show it), with no error underneath.
    pub fn memory_complete(&self) -> Result<(), String> {
        if self.paging_in.load(Ordering::Acquire) {
            return Err(
                "guest memory is still being paged in (lazy restore or postcopy): \
                        pages missing from it would be read as zeros; wait until every page \
                        is here (restore with --prefetch)"
                    .into(),
            );
        }
        Ok(())
    }

    /// After demand paging with an exit backend, gives the VM back its one-memslot-per-RAM-range
    /// layout, which dirty tracking and later migrations rely on. Replacing slots while vCPUs
    /// run would make KVM's own accesses fail in the gap, so every vCPU is paused for it.
    /// Fails with the pause's or the backend's own error, in the caller's error type (as
    /// `assemble::resume` does); a failed settle still resumes, and reports the settle's error.
    pub fn settle_memslots<E>(&self) -> Result<(), E>
    where
        E: From<crate::vstate::pause::PauseError> + From<crate::userfault::UserfaultError>,
    {
        let Some(exits) = self.demand.get() else {
            return Ok(());
        };
        if exits.layout_settled() {
            return Ok(());
        }
        self.pause.pause(
            &self.kicker,
            crate::vstate::pause::Owner::Migration,
            false,
            std::time::Duration::from_secs(5),
        )?;
        let settled = exits.settle_layout();
        let resumed = self.pause.resume(crate::vstate::pause::Owner::Migration);
        settled?;
        Ok(resumed?)
    }

    /// Types `bytes` on the guest's console.
    pub fn console_input(&self, bytes: &[u8]) {
        let mut sink = self.console_input.lock().unwrap_or_else(|p| p.into_inner());
        sink(bytes);
    }

    pub fn progress(&self) -> MutexGuard<'_, Progress> {
        self.migration.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn micro_passes(&self) -> u64 {
        self.micro.passes.load(Ordering::Acquire)
    }

    /// [(gpa, size)] of every RAM range, as the wire protocol checks them.
    pub fn ram_table(&self) -> Vec<(u64, u64)> {
        self.ranges.iter().map(|r| (r.gpa, r.size)).collect()
    }
}
