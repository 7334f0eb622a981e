//! The one way to bring up a VM that is resumed rather than booted (eager and lazy restore,
//! incoming precopy and postcopy):
//!
//! 1. `config`: its description (a snapshot's vm.json, a migration's Hello) checked against
//!    what this side allows, then `Machine::build`;
//! 2. the caller fills guest RAM (copies a snapshot, receives pages) and leaves holes where
//!    pages are still missing; `Machine::arm_demand` arms a `DemandPager` over those;
//! 3. `keep_mapped`: under an exit backend, the pages KVM touches itself are mapped first;
//! 4. `resume`: the saved state restored, `--dump-final` armed, the vCPUs run with the caller's
//!    hooks, and the run's report.
//!
//! The callers keep only what is theirs: reading snapshot files or a page server, the
//! migration wire protocol.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::description::{Constraints, VmDescription};
use super::final_dump::{Fill, FinalDump};
use super::run::{OnRunning, RunHooks, ServeApi};
use super::saved_state::{SnapshotError, VmSnapshot};
use super::{ConsoleOutput, Machine, MachineError, RunReport, VmConfig};
use crate::userfault::{self, ArmArgs, DemandKind, DemandPager, ExitPager, UserfaultError};

#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    /// This side cannot host the described VM.
    #[error("{reason}")]
    Refused { reason: String },
    /// The description itself is unusable (a malformed micro-guest mailbox).
    #[error("{reason}")]
    Config { reason: String },
    #[error("building the VM: {0}")]
    Build(#[source] MachineError),
    #[error("restoring the saved state: {0}")]
    Restore(#[source] SnapshotError),
    /// The run could not start (API socket, threads): no vCPU ran.
    #[error("starting the VM: {0}")]
    Run(#[source] MachineError),
    #[error("{reason}")]
    FinalDump { reason: String },
}

/// What this side adds to a description: its limits and disks, console and API socket.
#[derive(Debug, Clone)]
pub struct Here {
    pub constraints: Constraints,
    pub console: ConsoleOutput,
    pub console_input: bool,
    pub api_socket: Option<PathBuf>,
}

/// The VM to build here for `desc`, or why this side refuses it.
pub fn config(desc: &VmDescription, here: &Here) -> Result<VmConfig, AssembleError> {
    let disks = desc
        .check(&here.constraints)
        .map_err(|reason| AssembleError::Refused { reason })?;
    desc.config(
        disks,
        here.constraints.devices.clone(),
        here.console.clone(),
        here.console_input,
        here.api_socket.clone(),
    )
    .map_err(|reason| AssembleError::Config { reason })
}

/// A demand-paging backend and its tuning (`--demand`, `--demand-chunk`, soft slots).
#[derive(Debug, Clone)]
pub struct Demand {
    pub backend: DemandKind,
    /// Bytes brought in per exit (exit backends).
    pub chunk: u64,
    /// Memslots used before chunks are merged (memslot-exits).
    pub soft_slots: usize,
}

impl Default for Demand {
    fn default() -> Self {
        Demand {
            backend: DemandKind::UffdMissing,
            chunk: 4096,
            soft_slots: userfault::memslot_exits::DEFAULT_SOFT_LIMIT,
        }
    }
}

impl Machine {
    /// Arms `demand` over guest RAM, whose `pending` pages (gpa, count) are holes in the memfd
    /// already. From here the memory file is not the guest's RAM (`paging_in`) until whoever
    /// brings the pages in says so; an exit backend's vCPU exits resolve through the pager.
    pub fn arm_demand(
        &self,
        demand: &Demand,
        pending: &[(u64, u64)],
    ) -> Result<Arc<dyn DemandPager>, UserfaultError> {
        let pager = userfault::arm(
            demand.backend,
            ArmArgs {
                vm: self.vm.clone(),
                ranges: self.ram.ranges(),
                host_addrs: &self.ram.host_addrs(),
                memfd: self.ram.file(),
                pending,
                chunk: demand.chunk,
                soft_slots: demand.soft_slots,
            },
        )?;
        if let Some(exits) = pager.exits() {
            let _ = self.demand.set(exits);
        }
        self.paging_in.store(true, Ordering::Release);
        Ok(pager)
    }
}

/// Exit backends never see KVM's own accesses (page-table walks, descriptor tables, PV pages):
/// maps those of `pages` the pager covers before any vCPU runs.
pub fn keep_mapped(exits: &dyn ExitPager, pages: &[u64]) -> Result<(), UserfaultError> {
    for &gpa in pages {
        if exits.covers(gpa) {
            exits.keep_mapped(gpa)?;
        }
    }
    Ok(())
}

/// Told why the guest never ran.
pub type NotStarted<'a> = Box<dyn FnOnce(&AssembleError) + 'a>;

/// The last step: how the caller takes part in the run of the resumed VM. `E` is the caller's
/// error, which its own hooks return.
pub struct Resume<'a, E> {
    pub state: &'a VmSnapshot,
    /// Serves `VmConfig::api_socket`.
    pub api: Option<ServeApi>,
    pub on_running: OnRunning,
    /// `--dump-final`: the file, and what brings in the pages still missing first (None: guest
    /// RAM is whole once the state is restored).
    pub final_dump: Option<(PathBuf, Option<Fill>)>,
    /// After the state is restored, just before the vCPUs start (the end of the restore).
    pub restored: Option<Box<dyn FnOnce() -> Result<(), E> + 'a>>,
    /// The guest never ran (its state or the run failed): tell whoever waits for it.
    pub not_started: Option<NotStarted<'a>>,
    /// Once the run is over (or failed to start), before the final dump is read.
    pub ended: Option<Box<dyn FnOnce() + 'a>>,
}

impl<'a, E> Resume<'a, E> {
    /// No hooks but `on_running`; API served by `api`.
    pub fn new(state: &'a VmSnapshot, api: Option<ServeApi>, on_running: OnRunning) -> Self {
        Resume {
            state,
            api,
            on_running,
            final_dump: None,
            restored: None,
            not_started: None,
            ended: None,
        }
    }
}

/// Restores the saved state into `machine` and runs it to its end.
pub fn resume<E: From<AssembleError>>(
    mut machine: Machine,
    r: Resume<'_, E>,
) -> Result<RunReport, E> {
    let mut not_started = r.not_started;
    let mut fail = move |e: AssembleError| -> E {
        if let Some(f) = not_started.take() {
            f(&e);
        }
        e.into()
    };
    if let Err(e) = r.state.restore(&machine) {
        return Err(fail(AssembleError::Restore(e)));
    }
    if let Some(f) = r.restored {
        f()?;
    }
    let final_dump = r.final_dump.map(|(path, fill)| match fill {
        Some(fill) => FinalDump::arm(&mut machine, path, fill),
        None => FinalDump::arm_whole(&mut machine, path),
    });
    if r.state.paused {
        machine.pause.hold(crate::vstate::pause::Owner::Api);
    }
    let run = machine.run(RunHooks {
        api: r.api,
        on_running: Some(r.on_running),
    });
    if let Some(f) = r.ended {
        f();
    }
    let run = run.map_err(|e| fail(AssembleError::Run(e)))?;
    if let Some(d) = final_dump {
        d.result()
            .map_err(|reason| AssembleError::FinalDump { reason })?;
    }
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::description::GuestDesc;

    fn desc(guest: GuestDesc) -> VmDescription {
        let micro = matches!(guest, GuestDesc::Micro { .. });
        VmDescription {
            vcpus: 2,
            mem_bytes: 64 << 20,
            ram: crate::memory::ram_layout(64 << 20)
                .iter()
                .map(|r| (r.gpa, r.size))
                .collect(),
            guest,
            disks: vec![],
            devices: crate::machine::devices_setup::device_ids(micro, 0),
            dirty_ring: false,
            phys_bits: None,
            passthrough: Vec::new(),
        }
    }

    fn here(vcpus: Option<u32>) -> Here {
        Here {
            constraints: Constraints {
                vcpus,
                ..Default::default()
            },
            console: ConsoleOutput::Null,
            console_input: false,
            api_socket: None,
        }
    }

    fn linux() -> GuestDesc {
        GuestDesc::Linux {
            kernel: "vmlinux".into(),
        }
    }

    #[test]
    fn a_matching_description_gives_its_config_with_this_sides_console() {
        let cfg = config(&desc(linux()), &here(Some(2))).unwrap();
        assert_eq!((cfg.vcpus, cfg.mem_bytes), (2, 64 << 20));
        assert_eq!(cfg.console, ConsoleOutput::Null);
        assert!(cfg.tracking.is_none());
    }

    #[test]
    fn a_vm_this_side_cannot_host_is_refused_with_the_reason() {
        match config(&desc(linux()), &here(Some(1))) {
            Err(AssembleError::Refused { reason }) => {
                assert!(reason.contains("vCPU count differs"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_malformed_micro_mailbox_is_a_config_error() {
        let micro = GuestDesc::Micro {
            mailbox: vec![0; 3],
            region: Some((1 << 20, 1 << 20)),
            verify: true,
        };
        match config(&desc(micro), &here(None)) {
            Err(AssembleError::Config { reason }) => {
                assert!(reason.contains("mailbox"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }
}
