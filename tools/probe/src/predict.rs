//! TRACKING.md's predictions ("Predicted results on a GPU host", and its userfaultfd section for
//! MINOR), for the memory rows this version probes. The CPU-write part of each prediction is
//! what a host without a GPU can confirm; the "G-miss" part needs a GPU and is not judged here.

use crate::report::{Mechanism, Outcome};

/// Which row of TRACKING.md's table a memory kind falls in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Row {
    /// "anonymous / memfd RAM": anonymous 4 KiB, THP and memfd.
    AnonMemfd,
    Hugetlb,
    GuestMemfd,
    /// "vfio-pci BAR (VRAM)": a BAR mmap'd through a VFIO device fd.
    VfioBar,
    /// "nvidia.ko BAR mmap": memory nvidia.ko maps itself (cuMemHostAlloc's mapping).
    NvidiaMmap,
    /// "UVM managed memory" (cuMemAllocManaged).
    UvmManaged,
    /// "HMM malloc range": plain anonymous memory a GPU reaches through UVM's HMM mode.
    HmmMalloc,
    /// "pinned host memory written by GPU DMA" (cuMemHostRegister over anonymous memory).
    PinnedHost,
    /// Kinds the table has no row for (a regular file mapping).
    None,
}

/// What outcome a prediction stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Works,
    Einval,
    /// "ok*": works with CONFIG_MEM_SOFT_DIRTY, silently misses without it (these hosts).
    WorksOrSilentMissWithoutConfig,
    /// A prediction that cannot be compared with one cell's outcome.
    NotComparable,
    /// Device writes are not seen (G-miss): a silent miss is the predicted outcome.
    SilentMiss,
    /// The device's access to memory armed with userfaultfd fails (an errno).
    DeviceRefused,
}

pub struct Prediction {
    pub text: &'static str,
    expect: Expect,
}

impl Prediction {
    /// Whether `outcome` agrees; None where there is nothing to compare (no prediction, the
    /// experiment could not be set up, or the prediction is not about a single outcome).
    pub fn matches(&self, outcome: &Outcome) -> Option<bool> {
        if matches!(
            outcome,
            Outcome::Unavailable { .. } | Outcome::NotApplicable
        ) {
            return None;
        }
        match self.expect {
            Expect::Works => Some(*outcome == Outcome::Works),
            Expect::Einval => {
                Some(matches!(outcome, Outcome::Errno { code, .. } if *code == libc::EINVAL))
            }
            Expect::WorksOrSilentMissWithoutConfig => {
                Some(matches!(outcome, Outcome::Works | Outcome::SilentMiss))
            }
            Expect::NotComparable => None,
            Expect::SilentMiss => Some(*outcome == Outcome::SilentMiss),
            Expect::DeviceRefused => Some(matches!(
                outcome,
                Outcome::Errno { .. } | Outcome::DeviceFault { .. }
            )),
        }
    }
}

pub fn predict(row: Row, mech: Mechanism) -> Prediction {
    use Mechanism::*;
    let (text, expect) = match (row, mech) {
        (Row::AnonMemfd, UffdMissing | UffdWp) => ("ok, G-miss", Expect::Works),
        (Row::AnonMemfd, UffdWpAsync | PagemapScan) => ("ok, G-miss", Expect::Works),
        (Row::AnonMemfd, SoftDirty) => (
            "ok*, G-miss (* needs CONFIG_MEM_SOFT_DIRTY; silent miss without it)",
            Expect::WorksOrSilentMissWithoutConfig,
        ),
        (Row::Hugetlb, UffdMissing | UffdWp) => ("ok (aligned), G-miss", Expect::Works),
        (Row::Hugetlb, UffdWpAsync | PagemapScan) => ("ok, G-miss", Expect::Works),
        (Row::Hugetlb, SoftDirty) => ("per-VMA only", Expect::NotComparable),
        (Row::GuestMemfd, UffdMissing | UffdWp | UffdWpAsync | PagemapScan) => {
            ("EINVAL", Expect::Einval)
        }
        (Row::GuestMemfd, UffdMinor) => (
            "EINVAL (guest_memfd mappings are refused; TRACKING.md userfaultfd section)",
            Expect::Einval,
        ),
        (Row::GuestMemfd, SoftDirty) => ("-", Expect::NotComparable),
        // "KVM bitmap/ring" column: vCPU stores are logged; device writes are not (unverified
        // here). guest_memfd + dirty logging: EINVAL (PLATFORM.md §4).
        (Row::AnonMemfd | Row::Hugetlb, KvmDirtyBitmap | KvmDirtyBitmapManual | KvmDirtyRing) => {
            ("vCPU, G-miss", Expect::Works)
        }
        (Row::GuestMemfd, KvmDirtyBitmap | KvmDirtyBitmapManual | KvmDirtyRing) => ("EINVAL", Expect::Einval),
        // MINOR is not in the table; TRACKING.md's userfaultfd section: shmem/hugetlb only.
        (Row::AnonMemfd | Row::Hugetlb, UffdMinor) => (
            "shmem/hugetlb only (TRACKING.md userfaultfd section): ok on memfd/hugetlbfs, EINVAL on anonymous",
            Expect::NotComparable,
        ),
        (Row::VfioBar, UffdMissing | UffdWp | UffdMinor) => ("EINVAL", Expect::Einval),
        (Row::VfioBar, UffdWpAsync | PagemapScan) => ("EINVAL / skipped", Expect::Einval),
        (Row::VfioBar, SoftDirty) => ("never dirty", Expect::SilentMiss),
        (Row::VfioBar, KvmDirtyBitmap | KvmDirtyBitmapManual | KvmDirtyRing) => ("vCPU stores only", Expect::Works),
        (Row::NvidiaMmap | Row::UvmManaged, UffdMissing | UffdWp | UffdMinor) => {
            ("EINVAL", Expect::Einval)
        }
        (Row::NvidiaMmap | Row::UvmManaged, UffdWpAsync | PagemapScan) => {
            ("EINVAL", Expect::Einval)
        }
        (Row::NvidiaMmap, SoftDirty) => ("never dirty", Expect::SilentMiss),
        (Row::UvmManaged, SoftDirty) => ("CPU-resident only", Expect::NotComparable),
        (Row::HmmMalloc | Row::PinnedHost, UffdMissing | UffdWp | UffdWpAsync | PagemapScan) => {
            ("ok (registers; CPU writes seen)", Expect::Works)
        }
        (Row::HmmMalloc | Row::PinnedHost, SoftDirty) => (
            "ok* for CPU writes (anonymous memory)",
            Expect::WorksOrSilentMissWithoutConfig,
        ),
        (Row::HmmMalloc | Row::PinnedHost, UffdMinor) => (
            "EINVAL (anonymous memory; MINOR is shmem/hugetlb only)",
            Expect::Einval,
        ),
        (Row::HmmMalloc, KvmDirtyBitmap | KvmDirtyBitmapManual | KvmDirtyRing) => ("vCPU, G-miss", Expect::Works),
        (Row::PinnedHost, KvmDirtyBitmap | KvmDirtyBitmapManual | KvmDirtyRing) => {
            ("G-miss (vCPU stores logged)", Expect::Works)
        }
        (_, IommufdHwDirty | VfioType1Dirty | VfioDmaLogging) => predict_dma(row, mech),
        (Row::NvidiaMmap | Row::UvmManaged, KvmDirtyBitmap | KvmDirtyBitmapManual | KvmDirtyRing) => {
            ("-", Expect::NotComparable)
        }
        (Row::None, _) => ("-", Expect::NotComparable),
    };
    Prediction { text, expect }
}

/// The iommufd and VFIO columns, for the DMA mechanisms' cells (whose outcome here is about
/// enabling the mechanism, with no device DMA the probe can cause).
fn predict_dma(row: Row, mech: Mechanism) -> (&'static str, Expect) {
    use Mechanism::*;
    match (row, mech) {
        (Row::AnonMemfd | Row::Hugetlb, IommufdHwDirty) => ("sees GPU DMA", Expect::NotComparable),
        (Row::PinnedHost, IommufdHwDirty) => ("only one that sees it", Expect::NotComparable),
        (Row::AnonMemfd | Row::Hugetlb | Row::PinnedHost, VfioType1Dirty) => {
            ("all-dirty", Expect::NotComparable)
        }
        (Row::VfioBar, IommufdHwDirty) => ("never (not DMA)", Expect::NotComparable),
        (Row::VfioBar, VfioType1Dirty) => ("meaningless", Expect::NotComparable),
        (_, VfioDmaLogging) => (
            "mlx5/pds variant drivers only (TRACKING.md: DMA section); vfio-pci: refused",
            Expect::NotComparable,
        ),
        _ => ("-", Expect::NotComparable),
    }
}

/// Whether a mechanism armed over `row` reports writes made by the device (a GPU kernel, DMA)
/// rather than the CPU: the "G-miss" half of TRACKING.md's cells.
pub fn predict_device_write(row: Row, mech: Mechanism) -> Prediction {
    use Mechanism::*;
    let (text, expect) = match (row, mech) {
        (Row::HmmMalloc, UffdWp | UffdMissing | UffdWpAsync | PagemapScan) => (
            "registers; GPU access then faults fatally (HMM malloc range row)",
            Expect::DeviceRefused,
        ),
        (Row::HmmMalloc, SoftDirty | KvmDirtyBitmap | KvmDirtyBitmapManual | KvmDirtyRing) => {
            ("G-miss", Expect::SilentMiss)
        }
        (Row::PinnedHost | Row::AnonMemfd | Row::Hugetlb, IommufdHwDirty) => {
            ("sees GPU DMA", Expect::Works)
        }
        (Row::PinnedHost | Row::AnonMemfd | Row::Hugetlb, VfioType1Dirty) => {
            ("all-dirty", Expect::NotComparable)
        }
        (Row::PinnedHost | Row::AnonMemfd | Row::Hugetlb, _) => ("G-miss", Expect::SilentMiss),
        (Row::UvmManaged, SoftDirty) => (
            "CPU-resident only: a GPU write migrates the page away",
            Expect::SilentMiss,
        ),
        (Row::VfioBar | Row::NvidiaMmap, SoftDirty) => ("never dirty", Expect::SilentMiss),
        (Row::VfioBar, KvmDirtyBitmap | KvmDirtyBitmapManual | KvmDirtyRing) => (
            "vCPU stores only: the GPU's own writes never",
            Expect::SilentMiss,
        ),
        _ => ("-", Expect::NotComparable),
    };
    Prediction { text, expect }
}

/// The steps of the HMM life cycle (hmm.rs), each a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HmmStep {
    MigrateToDevice,
    DeviceWriteOnDevice,
    CpuWriteMigratesBack,
    CpuWriteAgain,
    DeviceWriteInRam,
}

/// TRACKING.md's "HMM malloc range" row (uffd: "registers; GPU access then faults fatally",
/// WP_ASYNC + PAGEMAP_SCAN: "same", soft-dirty: "G-miss"); CPU writes as its anonymous row
/// ("ok"); a migration is no write, so nothing should be reported for it.
pub fn predict_hmm(mech: Mechanism, step: HmmStep) -> Prediction {
    use HmmStep::*;
    let device = matches!(step, DeviceWriteOnDevice | DeviceWriteInRam);
    let (text, expect) = match (mech, step) {
        (_, MigrateToDevice) => (
            "not a write: nothing reported (no TRACKING.md cell)",
            Expect::Works,
        ),
        (Mechanism::UffdWp | Mechanism::PagemapScan, _) if device => (
            "registers; GPU access then faults fatally (HMM malloc range row)",
            Expect::DeviceRefused,
        ),
        (Mechanism::SoftDirty, _) if device => {
            ("G-miss (HMM malloc range row)", Expect::SilentMiss)
        }
        (_, CpuWriteMigratesBack | CpuWriteAgain) => {
            ("ok: CPU writes seen (anonymous row)", Expect::Works)
        }
        _ => ("-", Expect::NotComparable),
    };
    Prediction { text, expect }
}

/// MINOR's prediction depends on anonymous vs shmem inside the "anonymous / memfd" row.
pub fn predict_minor(row: Row, shmem_backed: bool) -> Prediction {
    match row {
        Row::AnonMemfd | Row::Hugetlb if shmem_backed || row == Row::Hugetlb => Prediction {
            text: "ok (MINOR: shmem/hugetlb; TRACKING.md userfaultfd section)",
            expect: Expect::Works,
        },
        Row::AnonMemfd => Prediction {
            text: "EINVAL (MINOR: shmem/hugetlb only; TRACKING.md userfaultfd section)",
            expect: Expect::Einval,
        },
        _ => predict(row, Mechanism::UffdMinor),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_memfd_predicts_einval_and_compares_errno() {
        let p = predict(Row::GuestMemfd, Mechanism::UffdMissing);
        assert_eq!(p.matches(&Outcome::errno(libc::EINVAL)), Some(true));
        assert_eq!(p.matches(&Outcome::errno(libc::EPERM)), Some(false));
        assert_eq!(p.matches(&Outcome::Works), Some(false));
    }

    #[test]
    fn kvm_dirty_logging_predictions() {
        for mech in [
            Mechanism::KvmDirtyBitmap,
            Mechanism::KvmDirtyBitmapManual,
            Mechanism::KvmDirtyRing,
        ] {
            let p = predict(Row::AnonMemfd, mech);
            assert_eq!(p.text, "vCPU, G-miss");
            assert_eq!(p.matches(&Outcome::Works), Some(true));
            assert_eq!(p.matches(&Outcome::SilentMiss), Some(false));
            let p = predict(Row::GuestMemfd, mech);
            assert_eq!(p.matches(&Outcome::errno(libc::EINVAL)), Some(true));
            assert_eq!(predict(Row::None, mech).matches(&Outcome::Works), None);
        }
    }

    #[test]
    fn unavailable_is_never_judged() {
        let p = predict(Row::AnonMemfd, Mechanism::UffdWp);
        let o = Outcome::Unavailable { why: "x".into() };
        assert_eq!(p.matches(&o), None);
    }
}
