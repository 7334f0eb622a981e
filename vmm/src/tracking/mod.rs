//! Dirty-page tracking: every way Linux offers to learn which guest pages changed, behind one
//! trait, so benchmarks and migration can swap backends on the same running guest.
//!
//! A backend reports only what its kernel mechanism sees: vCPU stores (KVM logging) or CPU
//! page-table writes (userfaultfd, soft-dirty). `create` wraps every backend so that each
//! harvest also ORs in the pages the VMM itself wrote (device emulation, through vm-memory's
//! `AtomicBitmap`), which none of the kernel mechanisms sees reliably (TRACKING.md).
//!
//! Contract of a harvest: after `start`, each `harvest` returns every page written since the
//! previous harvest (or `start`) and re-arms tracking for it *before* returning, so a caller
//! that reads page contents after the harvest never misses a later write. A backend that
//! cannot work on this host fails `start` with `TrackingError::Unsupported` and the reason;
//! none returns an empty set silently.

pub mod bar_log;
pub mod device_dma;
mod dirty_set;
mod kvm_bitmap;
mod kvm_bitmap_manual;
mod kvm_ring;
mod ring_exits;
mod soft_dirty;
mod thread_cpu;
mod uffd_wp;
mod uffd_wp_async;
mod vmm_writes;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::Serialize;

pub use dirty_set::{DirtySet, SlotBits};
pub use kvm_ring::{DirtyRings, RingStats, RING_ENTRIES};
pub use ring_exits::{RingCollect, RingFullExits};
pub use thread_cpu::thread_cpu_ns;

use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::sys::SysError;
use crate::vstate::vm::Vm;

/// The backends, by the names the CLI and the API use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrackerKind {
    /// KVM_MEM_LOG_DIRTY_PAGES + KVM_GET_DIRTY_LOG (get re-protects).
    Bitmap,
    /// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 + KVM_CLEAR_DIRTY_LOG.
    BitmapManual,
    /// KVM dirty ring per vCPU, a reaper thread, KVM_RESET_DIRTY_RINGS.
    Ring,
    /// userfaultfd write-protect with a handler thread.
    UffdWp,
    /// userfaultfd WP_ASYNC, harvested with PAGEMAP_SCAN.
    UffdWpAsync,
    /// clear_refs + pagemap bit 55.
    SoftDirty,
}

impl TrackerKind {
    pub const ALL: [TrackerKind; 6] = [
        TrackerKind::Bitmap,
        TrackerKind::BitmapManual,
        TrackerKind::Ring,
        TrackerKind::UffdWp,
        TrackerKind::UffdWpAsync,
        TrackerKind::SoftDirty,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            TrackerKind::Bitmap => "bitmap",
            TrackerKind::BitmapManual => "bitmap-manual",
            TrackerKind::Ring => "ring",
            TrackerKind::UffdWp => "uffd-wp",
            TrackerKind::UffdWpAsync => "uffd-wp-async",
            TrackerKind::SoftDirty => "soft-dirty",
        }
    }

    /// The dirty ring must be enabled when the VM is created, before any vCPU exists; while it
    /// is on, the KVM bitmap backends cannot be used on that VM (GET_DIRTY_LOG gives ENXIO).
    pub const fn needs_dirty_ring(self) -> bool {
        matches!(self, TrackerKind::Ring)
    }

    /// What this host offers for the backend, checked without a VM where possible: `Err` has
    /// the missing capability or feature (`Unsupported`), or the failure that stopped the check
    /// (`HostSys`, `HostKvm`); [`TrackingError::reason`] gives it without the backend's name.
    pub fn check_host(self) -> Result<(), TrackingError> {
        match self {
            TrackerKind::Bitmap => Ok(()),
            TrackerKind::BitmapManual => kvm_bitmap_manual::check_host(),
            TrackerKind::Ring => kvm_ring::check_host(),
            TrackerKind::UffdWp => uffd_wp::check_host(),
            TrackerKind::UffdWpAsync => uffd_wp_async::check_host(),
            TrackerKind::SoftDirty => soft_dirty::check_host(),
        }
    }
}

impl fmt::Display for TrackerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TrackerKind {
    type Err = TrackingError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TrackerKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| TrackingError::UnknownBackend(s.to_owned()))
    }
}

/// Turns the dirty ring on for a VM that has no vCPU yet; returns the entries per ring.
pub fn enable_dirty_ring(vm: &kvm_ioctls::VmFd) -> Result<u32, TrackingError> {
    kvm_ring::enable(vm)
}

/// The names of all backends, for messages.
pub fn backend_names() -> String {
    TrackerKind::ALL.map(|k| k.name()).join(", ")
}

#[derive(Debug, thiserror::Error)]
pub enum TrackingError {
    /// The name the user gave (CLI, API), not a flattened error.
    #[error("unknown tracking backend '{0}' (expected one of: {names})", names = backend_names())]
    UnknownBackend(String),
    /// `reason` describes the missing capability or feature (or VM setup); it is a message,
    /// not a flattened error: a failed call is `HostSys`/`HostKvm`.
    #[error("{backend} is not available here: {reason}")]
    Unsupported {
        backend: TrackerKind,
        reason: String,
    },
    /// A host check could not ask the kernel.
    #[error("{backend} is not available here: {what}: {source}")]
    HostSys {
        backend: TrackerKind,
        what: &'static str,
        #[source]
        source: SysError,
    },
    /// A host check could not get a scratch VM from KVM.
    #[error("{backend} is not available here: {what}: {source}")]
    HostKvm {
        backend: TrackerKind,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{backend}: {op} failed: {source}")]
    Sys {
        backend: TrackerKind,
        op: &'static str,
        source: SysError,
    },
    #[error("{backend}: {op} failed: {source}")]
    Kvm {
        backend: TrackerKind,
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("{backend}: {op} failed: {source}")]
    Uffd {
        backend: TrackerKind,
        op: &'static str,
        source: userfaultfd::Error,
    },
    #[error("{backend}: {op} failed: {source}")]
    Io {
        backend: TrackerKind,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("{backend}: {op} failed: {source}")]
    Vm {
        backend: TrackerKind,
        op: &'static str,
        // Boxed: VmError is large, and MachineError carries this enum.
        source: Box<crate::vstate::vm::VmError>,
    },
    #[error("{backend}: the fault handler failed: un-protecting {page:#x}: {source}")]
    Unprotect {
        backend: TrackerKind,
        page: u64,
        source: userfaultfd::Error,
    },
    #[error("{0}: harvest or stop before start")]
    NotStarted(TrackerKind),
    /// A passed-through device's DMA log failed: the device, the step and its transport's
    /// words, as one message (the transport error chain is flattened by `chain`).
    #[error("device DMA tracking: {0}")]
    Device(String),
    /// A description of what went wrong (a protocol surprise), not a flattened error.
    #[error("{backend}: {message}")]
    Other {
        backend: TrackerKind,
        message: String,
    },
}

impl TrackingError {
    /// `map_err` adapter for a `sys` call of `backend`.
    pub fn sys(backend: TrackerKind, op: &'static str) -> impl FnOnce(SysError) -> TrackingError {
        move |source| TrackingError::Sys {
            backend,
            op,
            source,
        }
    }

    /// Why a backend is unavailable, without its name (what `vmm backends` lists); any other
    /// error as displayed.
    pub fn reason(&self) -> String {
        match self {
            TrackingError::Unsupported { reason, .. } => reason.clone(),
            TrackingError::HostSys { what, source, .. } => format!("{what}: {source}"),
            TrackingError::HostKvm { what, source, .. } => format!("{what}: {source}"),
            other => other.to_string(),
        }
    }

    /// `map_err` adapter for a host check of `backend` that could not ask the kernel.
    pub fn host_sys(
        backend: TrackerKind,
        what: &'static str,
    ) -> impl FnOnce(SysError) -> TrackingError {
        move |source| TrackingError::HostSys {
            backend,
            what,
            source,
        }
    }

    /// `map_err` adapter for a userfaultfd crate call of `backend`.
    pub fn uffd(
        backend: TrackerKind,
        op: &'static str,
    ) -> impl FnOnce(userfaultfd::Error) -> TrackingError {
        move |source| TrackingError::Uffd {
            backend,
            op,
            source,
        }
    }

    /// `map_err` adapter for a kvm-ioctls call of `backend`.
    pub fn kvm(
        backend: TrackerKind,
        op: &'static str,
    ) -> impl FnOnce(kvm_ioctls::Error) -> TrackingError {
        move |source| TrackingError::Kvm {
            backend,
            op,
            source,
        }
    }
}

/// One memslot of guest RAM as the trackers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackedSlot {
    pub slot: u32,
    pub gpa: u64,
    pub size: u64,
    /// Host virtual address of the slot's first byte.
    pub host: u64,
}

impl TrackedSlot {
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }
}

/// A throwaway VM for the host check of `backend` that only a VM fd can answer (capability
/// values).
fn scratch_vm(backend: TrackerKind) -> Result<kvm_ioctls::VmFd, TrackingError> {
    let host_kvm = |what| {
        move |source| TrackingError::HostKvm {
            backend,
            what,
            source,
        }
    };
    let kvm = kvm_ioctls::Kvm::new().map_err(host_kvm("cannot open /dev/kvm"))?;
    kvm.create_vm().map_err(host_kvm("KVM_CREATE_VM"))
}

/// Bytes of one dirty bitmap (a bit per page) over all of `slots`.
pub fn bitmap_bytes(slots: &[TrackedSlot]) -> u64 {
    slots.iter().map(|s| s.pages().div_ceil(64) * 8).sum()
}

/// The VM's RAM memslots as the trackers see them, in GPA order, with the ids the registry
/// gave them (a `DirtySet` indexes slots by this order, KVM's logs and rings by id).
pub fn slots_of(vm: &Vm) -> Vec<TrackedSlot> {
    vm.memslots()
        .ram()
        .into_iter()
        .map(|s| TrackedSlot {
            slot: s.id,
            gpa: s.gpa,
            size: s.size,
            host: s.host,
        })
        .collect()
}

/// Kicks every vCPU out of guest mode once (so hardware buffers such as Intel PML are flushed
/// into the dirty ring before a harvest).
pub type KickFn = Arc<dyn Fn() + Send + Sync>;

/// Everything a backend needs to know about the VM it tracks.
#[derive(Clone)]
pub struct TrackContext {
    pub vm: Arc<Vm>,
    pub slots: Vec<TrackedSlot>,
    pub memory: GuestMemory,
    /// The VM's dirty rings, if it was created with them.
    pub rings: Option<Arc<DirtyRings>>,
    pub kick: Option<KickFn>,
}

/// A dirty-page tracking backend. Implementations are `Send` so a harvester thread, a vCPU
/// thread at a sync point or a migration sender can drive them behind a mutex.
pub trait DirtyTracker: Send {
    fn kind(&self) -> TrackerKind;
    /// Begins tracking: writes from now on show up in the next harvest.
    fn start(&mut self) -> Result<(), TrackingError>;
    /// ORs into `into` every page written since `start` or the previous harvest, and re-arms
    /// tracking of those pages before returning.
    fn harvest(&mut self, into: &mut DirtySet) -> Result<(), TrackingError>;
    /// Only the kernel calls a harvest needs (same protocol, same re-arming), with none of the
    /// VMM's bookkeeping: the baseline that shows what the harvest path adds. Returns the
    /// number of dirty pages the kernel reported; the pages themselves are dropped.
    fn harvest_raw(&mut self) -> Result<u64, TrackingError>;
    /// Ends tracking and undoes what `start` armed; safe to call twice.
    fn stop(&mut self) -> Result<(), TrackingError>;
    /// Host memory the backend holds for tracking (bitmaps, rings, buffers), in bytes.
    fn memory_overhead_bytes(&self) -> u64;
    /// CPU time used so far by the backend's own threads (reaper, fault handler), in ns.
    fn background_cpu_ns(&self) -> u64 {
        0
    }
}

/// Builds the backend `kind` for the VM in `ctx`, wrapped so that every harvest also reports
/// the VMM's own writes. Nothing is armed until `start`.
pub fn create(
    kind: TrackerKind,
    ctx: &TrackContext,
) -> Result<Box<dyn DirtyTracker>, TrackingError> {
    let backend: Box<dyn DirtyTracker> = match kind {
        TrackerKind::Bitmap => Box::new(kvm_bitmap::KvmBitmap::new(ctx)?),
        TrackerKind::BitmapManual => Box::new(kvm_bitmap_manual::KvmBitmapManual::new(ctx)?),
        TrackerKind::Ring => Box::new(kvm_ring::KvmRing::new(ctx)?),
        TrackerKind::UffdWp => Box::new(uffd_wp::UffdWp::new(ctx)),
        TrackerKind::UffdWpAsync => Box::new(uffd_wp_async::UffdWpAsync::new(ctx)),
        TrackerKind::SoftDirty => Box::new(soft_dirty::SoftDirty::new(ctx)),
    };
    Ok(Box::new(vmm_writes::WithVmmWrites::new(
        backend,
        ctx.memory.clone(),
        ctx.slots.clone(),
    )))
}

/// Every backend with what stops it on this host (`Err`: the missing capability, feature or
/// errno, as [`TrackingError::reason`] words it) or `Ok` when it should work. Which of ring and
/// bitmap a given VM allows is decided at its creation (`kvm_bitmap::refuse_on_ring_vm`,
/// `KvmRing::new`). The `String` is the message `vmm backends` shows (its JSON `reason`), not an
/// error that travels on: [`TrackerKind::check_host`] has the typed error.
pub fn availability() -> Vec<(TrackerKind, Result<(), String>)> {
    TrackerKind::ALL
        .into_iter()
        .map(|k| (k, k.check_host().map_err(|e| e.reason())))
        .collect()
}

#[cfg(test)]
mod tests;
