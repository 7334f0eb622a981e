//! A whole VM: guest RAM, KVM state, devices on their buses, vCPU threads, and the main thread's
//! event loop (console input, vCPU stops). `run` builds it from a `VmConfig`, runs it to its end
//! and says how it ended; `assemble` resumes one from a description and its saved state
//! (restore, incoming migration). Layers above (migration, API, snapshots) reach in through
//! `RunHooks` and plain data (`description`, `saved_state`, `progress`), never the reverse.

pub mod assemble;
pub mod build;
pub mod console;
pub mod content_truth;
pub mod description;
pub mod device_truth;
pub mod devices_setup;
pub mod final_dump;
pub mod pci;
pub mod progress;
pub mod report;
pub mod run;
pub mod saved_state;
pub mod shared;
pub mod stdin;
pub mod terminate;
pub mod tracking_session;

use std::path::PathBuf;
use std::time::Instant;

use crate::boot::linux::{LinuxBoot, LinuxBootError};
use crate::boot::micro::MicroBootError;
use crate::boot::mptable::MpTableError;
use crate::memory::MemoryError;
use crate::tracking::TrackingError;
use crate::vstate::cpuid::CpuidError;
use crate::vstate::regs::RegsError;
use crate::vstate::vm::VmError;

pub use build::Machine;
pub use console::ConsoleOutput;
pub use report::{Outcome, RunReport};
pub use run::{RunHooks, ServeApi};
pub use tracking_session::{Round, TrackingOptions, TrackingReport};

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("--vcpus must be between 1 and {max}, got {got}")]
    VcpuCount { got: u32, max: u8 },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Linux(#[from] LinuxBootError),
    #[error(transparent)]
    Micro(#[from] MicroBootError),
    #[error(transparent)]
    MpTable(#[from] MpTableError),
    #[error(transparent)]
    Regs(#[from] RegsError),
    #[error(transparent)]
    Cpuid(#[from] CpuidError),
    #[error("writing page tables into guest memory failed: {0}")]
    PageTables(vm_memory::GuestMemoryError),
    #[error(transparent)]
    Devices(#[from] devices_setup::DeviceSetupError),
    #[error("cannot open the console output: {0}")]
    Console(std::io::Error),
    #[error("event loop: {0}")]
    EventLoop(#[source] event_manager::Error),
    #[error("cannot start a vCPU thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    #[error("cannot install the SIGTERM/SIGINT handlers: {0}")]
    Terminate(std::io::Error),
    #[error(transparent)]
    Tracking(#[from] TrackingError),
    #[error("control API socket: {0}")]
    Api(std::io::Error),
    #[error("sandbox: {0}")]
    Sandbox(crate::seccomp::SeccompError),
    #[error("an API socket was asked for, but this run was given no API server")]
    NoApiServer,
    #[error("mapping the dirty ring of vCPU {id}: {source}")]
    RingMap {
        id: u8,
        source: crate::sys::SysError,
    },
}

/// Largest vCPU count: the MP table must fit in the EBDA KiB.
pub const MAX_VCPUS: u8 = 32;

/// What runs in the guest.
#[derive(Debug, Clone)]
pub enum GuestConfig {
    Linux(LinuxBoot),
    /// A raw payload entered in long mode at CPL0 (see `boot::micro`), with its mailbox page and
    /// the workload region it writes, if any (checked against guest RAM).
    Micro {
        payload: Vec<u8>,
        mailbox: Vec<u8>,
        region: Option<(u64, u64)>,
        /// Checked against guest RAM when the guest exits with status 0: the check the run
        /// starts with (`--verify`, or the source's); a `finish` replaces it in the run's
        /// `micro_finish::MicroBudget`.
        expected: Option<crate::micro_check::Expected>,
    },
}

/// A virtio-blk disk.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
}

#[derive(Debug, Clone)]
pub struct VmConfig {
    pub vcpus: u32,
    pub mem_bytes: u64,
    pub guest: GuestConfig,
    pub disks: Vec<DiskConfig>,
    /// The guest's physical address bits, when fewer than the host gives (`--phys-bits`).
    pub phys_bits: Option<u8>,
    /// PCI functions passed through (`--device`), in bus order.
    pub devices: Vec<pci::DeviceSpec>,
    pub console: ConsoleOutput,
    /// Feed vmm's stdin to the guest console.
    pub console_input: bool,
    /// Dirty tracking during the run, if any.
    pub tracking: Option<TrackingOptions>,
    /// Create the VM with a dirty ring (so a migration can track with `ring`).
    pub dirty_ring: bool,
    /// Serve the control API (pause, resume, status, migrate, console) on this Unix socket.
    pub api_socket: Option<PathBuf>,
}

/// Builds the VM described by `cfg`, boots it, runs it to its end and reports how it went.
/// `start` is the process start, the zero of every time in the report. Serves no API (see
/// `RunHooks::api`).
pub fn run(cfg: &VmConfig, start: Instant) -> Result<RunReport, MachineError> {
    Machine::build_and_boot(cfg, start)?.run(RunHooks::default())
}
