//! Demand paging: "these guest pages are missing; tell me when a vCPU (or the VMM) touches one;
//! I install it". Postcopy migration (and, later, lazy snapshot restore) is written against the
//! `DemandPager` trait so that other ways of catching the first touch can plug in beside
//! userfaultfd MISSING: MINOR + CONTINUE, real KVM_MEM_USERFAULT exits, or their emulation with
//! memslot holes on stock kernels (issue 6).

pub mod demand_kind;
pub mod exits;
pub mod inject;
pub mod keep_present;
pub mod kvm_userfault;
pub mod memslot_exits;
pub mod operands;
pub mod uffd_minor;
pub mod uffd_missing;
pub mod vcpu_exits;

use std::sync::Arc;
use std::time::{Duration, Instant};

pub use demand_kind::{DemandKind, UnknownDemand};
pub use exits::{DemandExits, ExitPager, ExitStats, Fetch};
pub use memslot_exits::MemslotExits;
pub use vcpu_exits::PagerExits;

pub use uffd_minor::UffdMinor;
pub use uffd_missing::UffdMissing;

#[derive(Debug, thiserror::Error)]
pub enum UserfaultError {
    #[error(transparent)]
    Sys(#[from] crate::sys::SysError),
    /// A userfaultfd ioctl refused with an errno.
    #[error("{what} failed: {source}")]
    Uffd {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A userfaultfd crate error that carries no errno.
    #[error("{what} failed: {source}")]
    UffdCrate {
        what: &'static str,
        #[source]
        source: userfaultfd::Error,
    },
    #[error("install failed: the pager is disarmed (writing now could overwrite guest data)")]
    Disarmed,
    #[error("GPA range 0x{gpa:x}+0x{len:x} is not guest RAM")]
    NotRam { gpa: u64, len: u64 },
    #[error("poll on the userfaultfd: {0}")]
    Poll(#[source] std::io::Error),
    /// A description of the event the kernel sent against the protocol (the crate's `Event`,
    /// or a fault outside guest RAM), not a flattened error.
    #[error("unexpected userfaultfd event: {0}")]
    Event(String),
    #[error("{what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{what}: {source}")]
    Memslot {
        what: &'static str,
        source: crate::vstate::resources::memslots::MemSlotError,
    },
    /// `reason` is the page source's account of a failed fetch as the pager was told it (the
    /// fail reason every waiter shares, a peer's message); a local I/O failure is `RamFile`.
    #[error("fetching guest pages 0x{gpa:x}+0x{len:x}: {reason}")]
    Fetch { gpa: u64, len: u64, reason: String },
    #[error("fetching guest pages 0x{gpa:x}+0x{len:x}: {what}: {source}")]
    RamFile {
        gpa: u64,
        len: u64,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// What this host or this VM lacks for a backend, or a precondition a caller broke: a
    /// message, not a flattened error.
    #[error("{0}")]
    Unsupported(String),
    #[error("demand chunk must be a power of two from 4 KiB to 2 MiB, got {bytes} bytes")]
    BadChunk { bytes: u64 },
    #[error("kvm-userfault is not available: {0}")]
    KvmUserfaultMissing(#[source] Box<UserfaultError>),
}

/// A touch of a missing page.
#[derive(Debug, Clone, Copy)]
pub struct Fault {
    /// Page-aligned guest physical address.
    pub gpa: u64,
    pub write: bool,
    /// When the fault was read (its latency is measured from here).
    pub seen: Instant,
}

/// What an install found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installed {
    /// The pages were missing and are now present; waiters were woken.
    Now,
    /// Some were already present (installed by a racing path): nothing was overwritten.
    AlreadyPresent,
}

pub trait DemandPager: Send + Sync {
    fn name(&self) -> &'static str;
    /// Waits up to `timeout` for the next touch of a missing page.
    fn next_fault(&self, timeout: Duration) -> Result<Option<Fault>, UserfaultError>;
    /// Installs whole pages at `gpa` atomically and wakes whoever waits on them. Never
    /// overwrites a page that is already present.
    fn install(&self, gpa: u64, data: &[u8]) -> Result<Installed, UserfaultError>;
    /// Installs `pages` zero pages at `gpa`.
    fn install_zero(&self, gpa: u64, pages: u64) -> Result<Installed, UserfaultError>;
    /// Wakes waiters on pages that are present already (a fault that raced with an install).
    fn wake(&self, gpa: u64, pages: u64) -> Result<(), UserfaultError>;
    /// Stops catching faults: every later access behaves as on ordinary memory.
    fn disarm(&self) -> Result<(), UserfaultError>;
    /// These pending pages turned out to be zero: nothing needs installing (a hole reads as
    /// zero), but a backend that tracks missing pages itself must stop waiting for them.
    fn note_zero(&self, _gpa: u64, _pages: u64) {}
    /// For backends whose vCPU accesses to missing pages exit to userspace (memslot holes, KVM
    /// Userfault): the handle the vCPU threads resolve those exits through.
    fn exits(&self) -> Option<Arc<dyn ExitPager>> {
        None
    }
}

/// What arming a backend needs from the machine.
pub struct ArmArgs<'a> {
    pub vm: std::sync::Arc<crate::vstate::vm::Vm>,
    pub ranges: &'a [crate::memory::RamRange],
    pub host_addrs: &'a [u64],
    pub memfd: &'a std::fs::File,
    /// Pages (gpa, count) that are missing; already punched out of `memfd`.
    pub pending: &'a [(u64, u64)],
    /// Bytes brought in per exit (exit backends).
    pub chunk: u64,
    /// Memslots used before chunks are merged (memslot-exits).
    pub soft_slots: usize,
}

/// Arms the backend `kind` over guest RAM.
pub fn arm(kind: DemandKind, a: ArmArgs<'_>) -> Result<Arc<dyn DemandPager>, UserfaultError> {
    match kind {
        DemandKind::UffdMissing => Ok(Arc::new(UffdMissing::arm(a.ranges, a.host_addrs)?)),
        DemandKind::UffdMinor => Ok(Arc::new(UffdMinor::arm(
            a.ranges,
            a.host_addrs,
            a.memfd,
            a.pending,
        )?)),
        DemandKind::MemslotExits => Ok(Arc::new(MemslotExits::arm(
            a.vm,
            a.ranges,
            a.host_addrs,
            a.memfd,
            a.pending,
            a.chunk,
            a.soft_slots,
        )?)),
        DemandKind::KvmUserfault => Ok(Arc::new(kvm_userfault::KvmUserfault::arm(
            a.vm,
            a.ranges,
            a.host_addrs,
            a.memfd,
            a.pending,
            a.chunk,
        )?)),
    }
}

/// Whether this kernel has KVM Userfault (tries the memslot flag on a throwaway VM).
pub fn kvm_userfault_support() -> Result<(), UserfaultError> {
    kvm_userfault::support()
}

/// The errno a userfaultfd crate error carries, if any.
pub fn errno_of(e: &userfaultfd::Error) -> Option<i32> {
    match e {
        userfaultfd::Error::SystemError(n)
        | userfaultfd::Error::CopyFailed(n)
        | userfaultfd::Error::ZeropageFailed(n) => Some(*n as i32),
        _ => None,
    }
}

/// A userfaultfd ioctl's failure, naming the errno (the crate's own text, "Copy failed", does
/// not).
pub(crate) fn uffd_err(what: &'static str, e: userfaultfd::Error) -> UserfaultError {
    match errno_of(&e) {
        Some(n) => UserfaultError::Uffd {
            what,
            source: std::io::Error::from_raw_os_error(n),
        },
        None => UserfaultError::UffdCrate { what, source: e },
    }
}
