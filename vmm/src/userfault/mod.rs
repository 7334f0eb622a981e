//! Demand paging: "these guest pages are missing; tell me when a vCPU (or the VMM) touches one;
//! I install it". Postcopy migration (and, later, lazy snapshot restore) is written against the
//! `DemandPager` trait so that other ways of catching the first touch can plug in beside
//! userfaultfd MISSING: MINOR + CONTINUE, real KVM_MEM_USERFAULT exits, or their emulation with
//! memslot holes on stock kernels (issue 6).

pub mod uffd_missing;

use std::time::{Duration, Instant};

pub use uffd_missing::UffdMissing;

#[derive(Debug, thiserror::Error)]
pub enum UserfaultError {
    #[error(transparent)]
    Sys(#[from] crate::sys::SysError),
    #[error("{what} failed: {errno}")]
    Uffd { what: &'static str, errno: String },
    #[error("GPA range 0x{gpa:x}+0x{len:x} is not guest RAM")]
    NotRam { gpa: u64, len: u64 },
    #[error("poll on the userfaultfd: {0}")]
    Poll(std::io::Error),
    #[error("unexpected userfaultfd event: {0}")]
    Event(String),
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
}

/// Names `vmm` accepts for `--demand`.
pub const BACKENDS: &[&str] = &["uffd-missing"];
