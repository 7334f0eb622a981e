//! `vmm-probe`: which memory-tracking mechanisms (userspace ones and KVM dirty logging) work on
//! which memory kinds on this host, found by running each one for real (TRACKING.md's
//! predictions are compared, never assumed). Everything the probe creates (mappings, fds,
//! userfaultfds, scratch VMs with their vCPUs and dirty rings, a hugetlb reservation) is undone
//! by guards, also on error.
//!
//! Call [`run`] and render the [`Report`] with [`render::text`], [`render::markdown`] or serde.

pub mod cuda;
pub mod devices;
pub mod explain;
pub mod external;
pub mod frame;
pub mod hmm;
pub mod in_guest;
pub mod kinds;
pub mod kvm;
pub mod kvm_guest;
pub mod lab_init;
pub mod pagemap;
pub mod predict;
pub mod rearm;
pub mod render;
pub mod report;
pub mod thp;
pub mod uffd;
pub mod vfio;

use std::path::PathBuf;
use std::sync::Mutex;

use kinds::{HugepageReservation, Kind};
use report::{Cell, HostInfo, KindStatus, Mechanism, Outcome, Report, REPORT_VERSION};

/// The probe failing to run at all; a mechanism that fails is data in the report, not this.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot read {path}: {source}")]
    Proc {
        path: &'static str,
        source: std::io::Error,
    },
    #[error("serialising the report: {0}")]
    Json(#[from] serde_json::Error),
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: report version {found:?}, this probe reads version {}",
        report::REPORT_VERSION
    )]
    Version { path: PathBuf, found: Option<u64> },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
pub struct ProbeOpts {
    /// Where the file-mapping kind creates (and at once unlinks) its temp file. A disk
    /// filesystem, so "file" is not just shmem again (/tmp may be tmpfs).
    pub file_dir: PathBuf,
    /// Where to look for GPU/VFIO/HMM device nodes.
    pub dev_dir: PathBuf,
    /// Where VFIO groups' and cdevs' devices are described (normally /sys).
    pub sys_dir: PathBuf,
    /// The CUDA driver library, opened with dlopen at run time.
    pub cuda_library: PathBuf,
    /// Let the CPU and a KVM guest write prefetchable (memory, not register) BARs of a bound
    /// VFIO device. Off by default: the probe then only registers mechanisms on BARs.
    pub bar_writes: bool,
    /// Of the host memory kinds, only anonymous 4 KiB (the HMM life cycle and the GPU and VFIO
    /// devices are probed as usual): what a CI run of the lab guest needs, in a fraction of
    /// the emulated-ring-0 time.
    pub quick: bool,
    /// Create an instance of each kernel sample mdev with a framebuffer BAR (mbochs, mdpy;
    /// vfio/mdev.rs) before looking for VFIO devices, and remove them afterwards: the lab
    /// guest's real VFIO devices. Off by default: a host's devices are not the probe's to make.
    pub sample_mdevs: bool,
}

impl Default for ProbeOpts {
    fn default() -> Self {
        ProbeOpts {
            file_dir: PathBuf::from("/var/tmp"),
            dev_dir: PathBuf::from("/dev"),
            sys_dir: PathBuf::from("/sys"),
            cuda_library: PathBuf::from("libcuda.so.1"),
            bar_writes: false,
            quick: false,
            sample_mdevs: false,
        }
    }
}

/// Hugetlb pages the probe needs free at once: one region (a second view maps the same pages).
const HUGEPAGES_NEEDED: u64 = 4;

/// Set by the lab guest's init (lab_init.rs): progress lines on stderr (the console there), so
/// a run that hangs in the guest kernel shows where, and rows done so far are not lost.
pub static PROGRESS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

static STARTED: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// One progress line (prefix `VMM-PROBE-PROGRESS`, then seconds since the first line) when
/// [`PROGRESS`] is set.
pub fn progress(msg: std::fmt::Arguments) {
    if PROGRESS.load(std::sync::atomic::Ordering::Relaxed) {
        let t = STARTED.get_or_init(std::time::Instant::now).elapsed();
        eprintln!("VMM-PROBE-PROGRESS [{:.1} s] {msg}", t.as_secs_f64());
    }
}

/// Serialises runs in one process: two concurrent runs would fight over nr_hugepages and
/// clear each other's soft-dirty bits.
static RUN_LOCK: Mutex<()> = Mutex::new(());

pub fn run(opts: &ProbeOpts) -> Result<Report, ProbeError> {
    let _serial = RUN_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    // The one thing every mechanism here reads through: without it the probe cannot run.
    std::fs::File::open("/proc/self/pagemap").map_err(|source| ProbeError::Proc {
        path: "/proc/self/pagemap",
        source,
    })?;
    let host = host_info();
    let mut kinds_out = Vec::new();
    let mut cells = Vec::new();
    let kinds = if opts.quick {
        vec![Kind::Anon4k]
    } else {
        Kind::all()
    };
    for kind in kinds {
        // The hugetlb reservation lives exactly as long as the hugetlb regions.
        let _reservation = if kind == Kind::Hugetlb {
            match HugepageReservation::ensure(HUGEPAGES_NEEDED) {
                Ok(g) => Some(g),
                Err(why) => {
                    kinds_out.push(KindStatus {
                        memory: kind.name(),
                        available: false,
                        note: why,
                    });
                    continue;
                }
            }
        } else {
            None
        };
        // Likewise the THP policy, where it is `never`.
        let thp_policy = (kind == Kind::AnonThp).then(thp::ThpPolicy::ensure_madvise);
        let mut status = check_kind(kind, opts, _reservation.as_ref());
        if let Some(p) = &thp_policy {
            status.note = format!("{}; {}", status.note, p.describe());
        }
        let available = status.available;
        kinds_out.push(status);
        for mech in Mechanism::ALL {
            // A guest_memfd without a CPU mapping is still a memslot candidate: KVM's cells
            // are tried on it; every other mechanism needs the kind to exist as a mapping.
            let memslot_only = mech.is_kvm() && matches!(kind, Kind::GuestMemfd { .. });
            if available || memslot_only {
                let c = probe_cell(kind, mech, opts);
                progress(format_args!(
                    "{} / {}: {}",
                    c.memory,
                    mech.name(),
                    c.outcome.short()
                ));
                cells.push(c);
            }
            // The backends' write-and-harvest cycles: first arming, then re-arms by harvest.
            if available && rearm::TRACKERS.contains(&mech) {
                cells.extend(rearm::on_kind(kind, mech, opts));
            }
        }
    }
    // GPU (CUDA) and VFIO: each module makes its own memory kinds and cells, and its line.
    let mut devices = Vec::new();
    for found in [cuda::probe(opts), vfio::probe(opts)] {
        kinds_out.extend(found.kinds);
        cells.extend(found.cells);
        devices.push(found.line);
    }
    devices.push(devices::hmm_line(&opts.dev_dir));
    // HMM: the emulated device (test_hmm) is there in the lab guest; run the life cycle on it.
    if let Some(path) = hmm::find_device(&opts.dev_dir) {
        let rows = hmm::lifecycle(&path);
        for d in devices.iter_mut().filter(|d| d.device == "HMM") {
            d.line = format!(
                "present: {} life-cycle rows run on {} (test_hmm), see the HMM cells",
                rows.len(),
                path.display()
            );
        }
        cells.extend(rows);
    }
    Ok(Report {
        version: REPORT_VERSION,
        host,
        kinds: kinds_out,
        cells,
        devices,
        not_covered: not_covered(),
    })
}

fn host_info() -> HostInfo {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("unknown ({e})"));
    let kernel_build = std::fs::read_to_string("/proc/version")
        .ok()
        .map(|s| s.trim().to_string());
    let kernel_config = kernel_config(&kernel);
    match vmm::sys::uffd::available_features() {
        Ok(f) => HostInfo {
            kernel,
            kernel_build,
            kernel_config,
            uffd_features: Some(format!("{f:#x}")),
            uffd_feature_names: vmm::sys::uffd::feature_names(f)
                .into_iter()
                .map(String::from)
                .collect(),
            uffd_error: None,
        },
        Err(e) => HostInfo {
            kernel,
            kernel_build,
            kernel_config,
            uffd_features: None,
            uffd_feature_names: Vec::new(),
            uffd_error: Some(e.to_string()),
        },
    }
}

/// The SHA-256 of a file, by `sha256sum` (coreutils; absent in the lab guest's initramfs).
pub fn sha256_of(path: &std::path::Path) -> Option<String> {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let hex = text.split_whitespace().next()?;
    (out.status.success() && hex.len() == 64).then(|| hex.to_string())
}

/// The running kernel's config file and its hash, where the distribution keeps one.
fn kernel_config(release: &str) -> Option<String> {
    let candidates = [
        PathBuf::from(format!("/boot/config-{release}")),
        PathBuf::from("/proc/config.gz"),
    ];
    let path = candidates.into_iter().find(|p| p.exists())?;
    Some(match sha256_of(&path) {
        Some(h) => format!("{} sha256 {h}", path.display()),
        None => format!("{} (sha256sum unavailable)", path.display()),
    })
}

/// Creates the kind once to see whether it exists here (and for THP, whether it is huge).
fn check_kind(kind: Kind, opts: &ProbeOpts, res: Option<&HugepageReservation>) -> KindStatus {
    let name = kind.name();
    let region = match kinds::create(kind, &opts.file_dir) {
        Ok(r) => r,
        Err(why) => {
            return KindStatus {
                memory: name,
                available: false,
                note: why,
            }
        }
    };
    let mib = region.len >> 20;
    let kib = region.len >> 10;
    let note = match kind {
        Kind::AnonThp => {
            region.populate();
            match kinds::anon_huge_kb(region.addr()) {
                Ok(kb) if kb as usize == kib => {
                    format!("{mib} MiB, 2 MiB aligned, MADV_HUGEPAGE; AnonHugePages {kb} kB: huge")
                }
                Ok(kb) => format!(
                    "{mib} MiB, MADV_HUGEPAGE, but AnonHugePages is only {kb} of {kib} kB: \
                     NOT (all) huge, results below are for what the kernel gave; {}",
                    thp::pse()
                ),
                Err(e) => format!("{mib} MiB, MADV_HUGEPAGE; could not check hugeness: {e}"),
            }
        }
        Kind::Anon4k => format!("{kib} KiB private anonymous, MADV_NOHUGEPAGE"),
        Kind::Memfd => format!("{kib} KiB memfd (shmem), MAP_SHARED"),
        Kind::Hugetlb => format!(
            "{mib} MiB memfd MFD_HUGETLB, MAP_SHARED|MAP_HUGETLB; {}",
            res.map_or_else(String::new, |r| r.describe())
        ),
        Kind::GuestMemfd { flags } => format!(
            "{kib} KiB, KVM_CREATE_GUEST_MEMFD flags={flags:#x} on a scratch VM, mmap'd{}",
            if region.cpu_access {
                ""
            } else {
                "; no INIT_SHARED: pages are guest-private, the CPU never touches them"
            }
        ),
        Kind::File => format!(
            "{kib} KiB temp file in {} (unlinked at once), MAP_SHARED",
            opts.file_dir.display()
        ),
    };
    KindStatus {
        memory: name,
        available: true,
        note,
    }
}

/// One cell: a fresh region of `kind`, `mech` run on it, the region torn down.
fn probe_cell(kind: Kind, mech: Mechanism, opts: &ProbeOpts) -> Cell {
    let (outcome, evidence) = match mech {
        // KVM makes its own VM, memory and memslot (guest_memfd needs no CPU mapping).
        Mechanism::KvmDirtyBitmap => kvm::dirty_log(kind, kvm::Log::Bitmap, &opts.file_dir),
        Mechanism::KvmDirtyBitmapManual => {
            kvm::dirty_log(kind, kvm::Log::BitmapManual, &opts.file_dir)
        }
        Mechanism::KvmDirtyRing => kvm::dirty_log(kind, kvm::Log::Ring, &opts.file_dir),
        _ => match kinds::create(kind, &opts.file_dir) {
            Err(why) => (Outcome::Unavailable { why: why.clone() }, why),
            Ok(region) => match mech {
                Mechanism::UffdMissing => uffd::missing(&region),
                Mechanism::UffdWp => uffd::wp(&region),
                Mechanism::UffdMinor => uffd::minor(&region),
                Mechanism::UffdWpAsync => uffd::wp_async(&region),
                Mechanism::PagemapScan => pagemap::scan_written(&region),
                Mechanism::SoftDirty => pagemap::soft_dirty(&region),
                // Not in Mechanism::ALL: run only by the vfio module over a bound device.
                Mechanism::KvmDirtyBitmap
                | Mechanism::KvmDirtyBitmapManual
                | Mechanism::KvmDirtyRing
                | Mechanism::IommufdHwDirty
                | Mechanism::VfioType1Dirty
                | Mechanism::VfioDmaLogging => unreachable!(),
            },
        },
    };
    let prediction = if mech == Mechanism::UffdMinor {
        predict::predict_minor(kind.row(), matches!(kind, Kind::Memfd))
    } else {
        predict::predict(kind.row(), mech)
    };
    // How each write-protect / written-page check armed its memory (one write, one check).
    let armed_by = match mech {
        Mechanism::UffdWp => Some("UFFDIO_WRITEPROTECT over the region (sync WP uffd)"),
        Mechanism::UffdWpAsync => Some("UFFDIO_WRITEPROTECT over the region (WP_ASYNC uffd)"),
        Mechanism::PagemapScan => Some(
            "UFFDIO_WRITEPROTECT over the region (WP_ASYNC uffd), then a baseline PAGEMAP_SCAN \
             PM_SCAN_WP_MATCHING before the writes",
        ),
        Mechanism::SoftDirty => Some("clear_refs 4"),
        _ => None,
    };
    let armed = armed_by.is_some() && !matches!(outcome, Outcome::Unavailable { .. });
    Cell {
        memory: kind.name(),
        mechanism: mech,
        step: None,
        matches_prediction: prediction.matches(&outcome),
        predicted: prediction.text.to_string(),
        outcome,
        evidence,
        armed_by: armed.then(|| armed_by.map(String::from)).flatten(),
        cycles: armed.then_some(1),
    }
}

fn not_covered() -> Vec<String> {
    [
        "a mapping nvidia.ko makes of a BAR or of VRAM through /dev/nvidia* directly (it needs the driver's private RM allocation ioctls): the nvidia.ko row is probed through cuMemHostAlloc's mapping instead",
        "writes by a passed-through device's own DMA: the probe cannot make a bound device DMA without that device's driver, so the DMA mechanisms are enabled and read, and their detection of device writes is left untried (the lab guest's sample mdevs do no DMA: mtty, mbochs and mdpy pin no pages and write none)",
        "the VMM's emulated GPU test device (tools/gpu-test-device, vfio-user) bound to vfio-pci in no-IOMMU mode inside the lab guest, its BAR and its DMA into the probe's buffer (issue 16 item 3, third part): not built yet; the lab guest's VFIO rows are the sample mdevs' (mbochs: a framebuffer of RAM pages behind a fault handler; mdpy: vmalloc memory, VM_MIXEDMAP), neither the VM_IO|VM_PFNMAP mapping vfio-pci makes of a real BAR",
        "a device-private BAR mapping revoked under the probe (vfio-pci zaps BAR mappings on reset): the vanish check (VFIO self-test step mdev-vanish) removes the whole device instead",
        "HMM rows on host kernels without test_hmm: they run only where /dev/hmm_dmirror0 exists (the lab guest)",
        "uffd UFFDIO_MOVE and POISON",
    ]
    .into_iter()
    .map(String::from)
    .collect()
}
