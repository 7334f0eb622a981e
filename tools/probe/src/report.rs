//! The probe's findings: one `Cell` per (memory kind, mechanism) tried, each with what was done,
//! what was seen, and TRACKING.md's prediction for it. Serialised as JSON (schema in
//! `report.schema.json`), rendered as text and Markdown by `render`.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// Bumped whenever a field is added, removed or changes meaning; the schema pins it.
pub const REPORT_VERSION: u32 = 5;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub version: u32,
    pub host: HostInfo,
    /// Every memory kind the probe tried to create, with why not where it could not.
    pub kinds: Vec<KindStatus>,
    pub cells: Vec<Cell>,
    /// GPU, VFIO and HMM devices: looked for, one line each.
    pub devices: Vec<DeviceLine>,
    /// What this version of the probe does not try yet, so a reader never mistakes absence of a
    /// row for a clean result.
    pub not_covered: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostInfo {
    pub kernel: String,
    /// /proc/version: the build (compiler, build number and date) the cells came from.
    #[serde(default)]
    pub kernel_build: Option<String>,
    /// The kernel's configuration: where it was read and its SHA-256 (`sha256sum`), or, for
    /// the lab guest, the image cache entry and fragments it was built from (filled in by the
    /// host side, in_guest.rs, which has the files). None where neither is known.
    #[serde(default)]
    pub kernel_config: Option<String>,
    /// UFFDIO_API features offered, hex; None when userfaultfd itself could not be opened.
    pub uffd_features: Option<String>,
    pub uffd_feature_names: Vec<String>,
    pub uffd_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KindStatus {
    pub memory: String,
    pub available: bool,
    /// How it was created (and checked), or why it could not be.
    pub note: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceLine {
    pub device: String,
    pub found: bool,
    pub line: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mechanism {
    UffdMissing,
    UffdWp,
    UffdMinor,
    UffdWpAsync,
    PagemapScan,
    SoftDirty,
    KvmDirtyBitmap,
    /// The bitmap with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: GET_DIRTY_LOG, then CLEAR_DIRTY_LOG
    /// re-protects only the pages reported (what a migration with manual clear does).
    KvmDirtyBitmapManual,
    KvmDirtyRing,
    /// iommufd hardware dirty tracking (IOMMU_HWPT_ALLOC_DIRTY_TRACKING and friends).
    IommufdHwDirty,
    /// VFIO type1 VFIO_IOMMU_DIRTY_PAGES on a legacy container.
    VfioType1Dirty,
    /// VFIO device DMA logging (VFIO_DEVICE_FEATURE_DMA_LOGGING_*), in the device's driver.
    VfioDmaLogging,
}

impl Mechanism {
    pub const ALL: [Mechanism; 9] = [
        Mechanism::UffdMissing,
        Mechanism::UffdWp,
        Mechanism::UffdMinor,
        Mechanism::UffdWpAsync,
        Mechanism::PagemapScan,
        Mechanism::SoftDirty,
        Mechanism::KvmDirtyBitmap,
        Mechanism::KvmDirtyBitmapManual,
        Mechanism::KvmDirtyRing,
    ];

    /// The mechanisms that watch DMA rather than CPU page tables: tried only where a VFIO
    /// device is bound.
    pub const DMA: [Mechanism; 3] = [
        Mechanism::IommufdHwDirty,
        Mechanism::VfioType1Dirty,
        Mechanism::VfioDmaLogging,
    ];

    /// Mechanisms that act on a memslot rather than on the CPU mapping: they apply to
    /// guest_memfd even where it cannot be mmap'd.
    pub fn is_kvm(self) -> bool {
        matches!(
            self,
            Mechanism::KvmDirtyBitmap | Mechanism::KvmDirtyBitmapManual | Mechanism::KvmDirtyRing
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Mechanism::UffdMissing => "uffd MISSING",
            Mechanism::UffdWp => "uffd WP",
            Mechanism::UffdMinor => "uffd MINOR",
            Mechanism::UffdWpAsync => "uffd WP_ASYNC",
            Mechanism::PagemapScan => "PAGEMAP_SCAN written",
            Mechanism::SoftDirty => "soft-dirty",
            Mechanism::KvmDirtyBitmap => "KVM dirty bitmap",
            Mechanism::KvmDirtyBitmapManual => "KVM bitmap, manual",
            Mechanism::KvmDirtyRing => "KVM dirty ring",
            Mechanism::IommufdHwDirty => "iommufd HW dirty",
            Mechanism::VfioType1Dirty => "VFIO type1 dirty",
            Mechanism::VfioDmaLogging => "VFIO DMA logging",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    /// The mechanism registered and its real check saw exactly what happened.
    Works,
    /// The kernel refused, with this errno.
    Errno { name: String, code: i32 },
    /// No error, but writes that happened were not reported: the worst kind of finding.
    SilentMiss,
    /// Writes reported that never happened (e.g. a page migration reported as a write).
    FalsePositive,
    /// The device's own access failed because of the mechanism (a GPU fault, a failed DMA):
    /// TRACKING.md's "GPU access then faults fatally".
    DeviceFault { why: String },
    /// The mechanism has nothing to act on here (e.g. memory the CPU may not map).
    NotApplicable,
    /// The probe could not set the experiment up.
    Unavailable { why: String },
}

impl Outcome {
    pub fn errno(code: i32) -> Outcome {
        Outcome::Errno {
            name: errno_name(code).to_string(),
            code,
        }
    }

    pub fn short(&self) -> String {
        match self {
            Outcome::Works => "works".into(),
            Outcome::Errno { name, .. } => name.clone(),
            Outcome::SilentMiss => "SILENT MISS".into(),
            Outcome::FalsePositive => "FALSE POSITIVE".into(),
            Outcome::DeviceFault { .. } => "DEVICE FAULT".into(),
            Outcome::NotApplicable => "n/a".into(),
            Outcome::Unavailable { .. } => "unavailable".into(),
        }
    }

    /// A write check's verdict: a missed write outranks a reported one that never happened.
    pub fn of_write_check(missed: usize, false_positives: usize) -> Outcome {
        if missed > 0 {
            Outcome::SilentMiss
        } else if false_positives > 0 {
            Outcome::FalsePositive
        } else {
            Outcome::Works
        }
    }
}

/// Pages written against pages a mechanism reported: the verdict and the evidence line.
pub fn judge<T: Ord + std::fmt::Debug>(
    written: &BTreeSet<T>,
    seen: &BTreeSet<T>,
) -> (Outcome, String) {
    let missed = written.difference(seen).count();
    let extra = seen.difference(written).count();
    (
        Outcome::of_write_check(missed, extra),
        format!(
            "wrote pages {written:?}, reported {seen:?}: {missed} missed, {extra} false positives"
        ),
    )
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cell {
    pub memory: String,
    pub mechanism: Mechanism,
    /// For life-cycle rows (HMM): which step of the life cycle this row is; None otherwise.
    pub step: Option<String>,
    pub outcome: Outcome,
    /// What was written and what was seen.
    pub evidence: String,
    /// TRACKING.md's prediction for this cell ("-" where it makes none).
    pub predicted: String,
    /// None where there is no prediction or the outcome cannot be compared with it.
    pub matches_prediction: Option<bool>,
    /// For write-protect and written-page cells: how the memory was armed for the writes this
    /// cell judges, e.g. "UFFDIO_WRITEPROTECT" for a first arming, or "PAGEMAP_SCAN
    /// PM_SCAN_WP_MATCHING (the previous harvest)" where a harvest re-armed it, as the tracking
    /// backends do from their second harvest on. None for cells that arm nothing of the kind.
    #[serde(default)]
    pub armed_by: Option<String>,
    /// How many write-and-harvest cycles this cell's verdict covers (each one re-armed by the
    /// harvest before it); None where the cell is not a write-and-harvest check.
    #[serde(default)]
    pub cycles: Option<u32>,
}

impl Cell {
    /// The memory column as shown: the memory kind, and the step where there is one.
    pub fn label(&self) -> String {
        match &self.step {
            Some(step) => format!("{}: {step}", self.memory),
            None => self.memory.clone(),
        }
    }
}

/// Symbolic name of the errnos these interfaces return; anything else is shown by number.
pub fn errno_name(code: i32) -> &'static str {
    match code {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::E2BIG => "E2BIG",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::ENOSPC => "ENOSPC",
        libc::ENOTTY => "ENOTTY",
        libc::ENOSYS => "ENOSYS",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ESRCH => "ESRCH",
        _ => "errno",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_serialises_with_a_kind_tag() {
        let json = serde_json::to_value(Outcome::errno(libc::EINVAL)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"kind": "errno", "name": "EINVAL", "code": 22})
        );
        let json = serde_json::to_value(Outcome::SilentMiss).unwrap();
        assert_eq!(json, serde_json::json!({"kind": "silent_miss"}));
    }
}
