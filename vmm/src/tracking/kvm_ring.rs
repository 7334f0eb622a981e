//! `ring`: the KVM dirty ring. Each vCPU has a ring of dirtied GFNs mmapped from its fd; a
//! reaper thread collects them continuously and calls KVM_RESET_DIRTY_RINGS, so the rings stay
//! far from full (PLATFORM.md §5: on PVM the batch emulator can push past the soft limit, which
//! WARNs in the host kernel and livelocks the vCPU). A vCPU that still gets
//! KVM_EXIT_DIRTY_RING_FULL collects the rings itself (`DirtyRings::collect`) and re-enters.
//!
//! Ordering (TRACKING.md): entries are taken in order without skipping, flags are read with
//! load-acquire and set to RESET with store-release (in `sys::kvm_dirty::DirtyRingMap::pop`), and
//! KVM_RESET_DIRTY_RINGS runs before a harvest returns, i.e. before the caller reads the pages.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::kvm_bitmap::logging;
use super::{
    thread_cpu_ns, DirtySet, DirtyTracker, KickFn, TrackContext, TrackedSlot, TrackerKind,
    TrackingError,
};
use crate::sys::kvm_dirty::{self, DirtyRingMap, DIRTY_GFN_SIZE};
use crate::sys::SysError;
use crate::vstate::vm::Vm;

const KIND: TrackerKind = TrackerKind::Ring;
/// Entries per vCPU ring: 64 Ki (1 MiB per vCPU), as PLATFORM.md §5 advises. At the ~2.7 us a
/// logged write costs here a vCPU needs ~175 ms to fill it; the reaper wakes every few ms.
pub const RING_ENTRIES: u32 = 64 * 1024;
/// The reaper's longest sleep, when the rings stay empty.
const REAP_IDLE_MAX: Duration = Duration::from_millis(5);
/// Its shortest sleep, after a sweep that found a few entries.
const REAP_IDLE_MIN: Duration = Duration::from_millis(1);
/// A sweep that found at least this share of a ring (1/`REAP_BURST_DIVISOR`) is followed by
/// another at once: the ring is filling fast. Lower thresholds (256 entries, 50 us sleeps) kept
/// the reaper spinning through every micro-guest pass, costing ~600 ms of CPU per round and
/// 1.4-1.7x the guest slowdown, without preventing the Linux-boot overflow (measured).
const REAP_BURST_DIVISOR: u64 = 4;

/// What the host offers: `Ok((bytes, acq_rel))` for the ring size vmm will use.
pub fn host_ring(vm: &kvm_ioctls::VmFd) -> Result<(u32, bool), TrackingError> {
    let unsupported = |reason: String| TrackingError::Unsupported {
        backend: KIND,
        reason,
    };
    let caps = kvm_dirty::dirty_ring_caps(vm);
    let want = RING_ENTRIES * DIRTY_GFN_SIZE as u32;
    let (max, acq_rel) = if caps.acq_rel_max_bytes > 0 {
        (caps.acq_rel_max_bytes, true)
    } else {
        (caps.plain_max_bytes, false)
    };
    if max == 0 {
        return Err(unsupported(
            "neither KVM_CAP_DIRTY_LOG_RING_ACQ_REL (223) nor KVM_CAP_DIRTY_LOG_RING (192) is offered"
                .into(),
        ));
    }
    // The largest power of two both allow.
    let bytes = want.min(1 << (31 - max.leading_zeros()));
    if bytes < 4096 {
        return Err(unsupported(format!(
            "the host's dirty ring is at most {max} bytes"
        )));
    }
    Ok((bytes, acq_rel))
}

pub fn check_host() -> Result<(), TrackingError> {
    host_ring(&super::scratch_vm(KIND)?).map(|_| ())
}

/// Enables the ring on a fresh VM (before any vCPU exists); returns entries per ring.
pub fn enable(vm: &kvm_ioctls::VmFd) -> Result<u32, TrackingError> {
    let (bytes, acq_rel) = host_ring(vm)?;
    kvm_dirty::enable_dirty_ring(vm, bytes, acq_rel).map_err(|source| TrackingError::Sys {
        backend: KIND,
        op: if acq_rel {
            "enabling KVM_CAP_DIRTY_LOG_RING_ACQ_REL"
        } else {
            "enabling KVM_CAP_DIRTY_LOG_RING"
        },
        source,
    })?;
    Ok(bytes / DIRTY_GFN_SIZE as u32)
}

struct Ring {
    map: DirtyRingMap,
    /// Index of the next entry to look at (free-running, wraps with the ring).
    next: u32,
}

struct Collected {
    /// Where collected pages go while a ring tracker is active; `None`: entries are reset and
    /// dropped (logging is off then, so only stragglers arrive).
    set: Option<DirtySet>,
    /// The active tracker's slots (from the VM's registry): ring entries name slot ids, which
    /// are looked up here (the registry hands them out; nothing says they are 0..n).
    slots: Vec<TrackedSlot>,
}

/// The VM's dirty rings, shared by the vCPU threads (ring-full exits), the reaper and the
/// tracker.
pub struct DirtyRings {
    vm: Arc<Vm>,
    rings: Mutex<Vec<Ring>>,
    collected: Mutex<Collected>,
    entries: u32,
    /// Entries naming a slot or page outside guest RAM (should never happen).
    bad_entries: AtomicU64,
    /// The most entries one sweep of one ring found: how close a ring came to full.
    peak: AtomicU64,
    /// KVM_EXIT_DIRTY_RING_FULL exits seen by the vCPUs.
    full_exits: AtomicU64,
}

/// How the rings fared, for reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RingStats {
    pub entries_per_ring: u32,
    /// Most entries found in one ring at one sweep.
    pub peak_entries: u64,
    pub full_exits: u64,
    pub bad_entries: u64,
}

impl DirtyRings {
    pub fn new(vm: Arc<Vm>, entries: u32) -> DirtyRings {
        DirtyRings {
            vm,
            rings: Mutex::new(Vec::new()),
            collected: Mutex::new(Collected {
                set: None,
                slots: Vec::new(),
            }),
            entries,
            bad_entries: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            full_exits: AtomicU64::new(0),
        }
    }

    /// Maps the ring of a newly created vCPU.
    pub fn add_vcpu(&self, vcpu: &kvm_ioctls::VcpuFd) -> Result<(), SysError> {
        let map = DirtyRingMap::map(vcpu, self.entries)?;
        lock(&self.rings).push(Ring { map, next: 0 });
        Ok(())
    }

    pub fn entries(&self) -> u32 {
        self.entries
    }

    pub fn vcpus(&self) -> usize {
        lock(&self.rings).len()
    }

    /// Takes every dirty entry of every ring and resets them in KVM; the pages go to the
    /// active tracker's set. Returns the number of entries taken.
    pub fn collect(&self) -> Result<u64, SysError> {
        self.sweep(true)
    }

    /// Like `collect`, but the pages are dropped (the raw-ioctl baseline: pop, mark RESET,
    /// reset).
    fn collect_raw(&self) -> Result<u64, SysError> {
        self.sweep(false)
    }

    fn sweep(&self, record: bool) -> Result<u64, SysError> {
        let mut rings = lock(&self.rings);
        let mut collected = lock(&self.collected);
        let Collected { set, slots } = &mut *collected;
        let mut set = set.as_mut().filter(|_| record);
        let mut n = 0u64;
        for ring in rings.iter_mut() {
            let before = n;
            while let Some((slot, offset)) = ring.map.pop(ring.next) {
                ring.next = ring.next.wrapping_add(1);
                n += 1;
                if let Some(set) = set.as_deref_mut() {
                    // slot is as_id << 16 | slot id; vmm uses address space 0 only.
                    let ok = slots
                        .iter()
                        .position(|s| s.slot == slot)
                        .is_some_and(|index| set.set_page(index, offset));
                    if !ok {
                        self.bad_entries.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            self.peak.fetch_max(n - before, Ordering::Relaxed);
        }
        if n > 0 {
            kvm_dirty::reset_dirty_rings(self.vm.fd())?;
        }
        Ok(n)
    }

    /// Starts collecting into a set over `slots` (the tracker's, so its harvests can OR the
    /// set in slot for slot), or with `None` stops.
    fn activate(&self, slots: Option<&[TrackedSlot]>) {
        let mut c = lock(&self.collected);
        if let Some(slots) = slots {
            c.slots = slots.to_vec();
        }
        c.set = slots.map(DirtySet::new);
    }

    /// Moves the collected pages into `into`.
    fn drain_into(&self, into: &mut DirtySet) {
        let mut c = lock(&self.collected);
        if let Some(set) = c.set.as_mut() {
            into.union_with(set);
            set.clear();
        }
    }

    /// Empties the collected set; returns how many pages it held.
    fn discard(&self) -> u64 {
        let mut c = lock(&self.collected);
        match c.set.as_mut() {
            Some(set) => {
                let n = set.count();
                set.clear();
                n
            }
            None => 0,
        }
    }

    /// Counts a KVM_EXIT_DIRTY_RING_FULL (called by each vCPU's `RingFullExits`).
    pub fn note_full_exit(&self) {
        self.full_exits.fetch_add(1, Ordering::Relaxed);
    }

    pub fn stats(&self) -> RingStats {
        RingStats {
            entries_per_ring: self.entries,
            peak_entries: self.peak.load(Ordering::Relaxed),
            full_exits: self.full_exits.load(Ordering::Relaxed),
            bad_entries: self.bad_entries.load(Ordering::Relaxed),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct KvmRing {
    vm: Arc<Vm>,
    slots: Vec<TrackedSlot>,
    rings: Arc<DirtyRings>,
    kick: Option<KickFn>,
    reaper: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
    reaper_cpu_ns: Arc<AtomicU64>,
    reaper_error: Arc<Mutex<Option<SysError>>>,
}

impl KvmRing {
    pub fn new(ctx: &TrackContext) -> Result<Self, TrackingError> {
        let rings = ctx
            .rings
            .clone()
            .ok_or_else(|| TrackingError::Unsupported {
                backend: KIND,
                reason:
                    "this VM was created without the dirty ring; it must be enabled before any \
                     vCPU exists (vmm run --track ring does that)"
                        .into(),
            })?;
        Ok(KvmRing {
            vm: ctx.vm.clone(),
            slots: ctx.slots.clone(),
            rings,
            kick: ctx.kick.clone(),
            reaper: None,
            reaper_cpu_ns: Arc::new(AtomicU64::new(0)),
            reaper_error: Arc::new(Mutex::new(None)),
        })
    }

    fn check_reaper(&self) -> Result<(), TrackingError> {
        match lock(&self.reaper_error).take() {
            Some(source) => Err(TrackingError::Sys {
                backend: KIND,
                op: "the reaper thread collecting the dirty rings",
                source,
            }),
            None => Ok(()),
        }
    }
}

impl DirtyTracker for KvmRing {
    fn kind(&self) -> TrackerKind {
        KIND
    }

    fn start(&mut self) -> Result<(), TrackingError> {
        // Drop stragglers from before, then log into a fresh set.
        self.rings
            .collect()
            .map_err(TrackingError::sys(KIND, "collecting the dirty rings"))?;
        self.rings.activate(Some(&self.slots));
        logging(KIND, &self.vm, true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (rings, flag, cpu, err) = (
            self.rings.clone(),
            stop.clone(),
            self.reaper_cpu_ns.clone(),
            self.reaper_error.clone(),
        );
        let handle = std::thread::Builder::new()
            .name("dirty-ring-reaper".into())
            .spawn(move || {
                crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Tracking);
                let base = thread_cpu_ns();
                let mut idle = REAP_IDLE_MIN;
                while !flag.load(Ordering::Acquire) {
                    let n = match rings.collect() {
                        Ok(n) => n,
                        Err(e) => {
                            *lock(&err) = Some(e);
                            break;
                        }
                    };
                    cpu.store(thread_cpu_ns() - base, Ordering::Relaxed);
                    // Adaptive: PVM's emulator pushes an entry per emulated write, not per page,
                    // and does not stop at the ring's soft limit, so an emulated guest kernel
                    // clearing pages can fill 64 Ki entries within milliseconds (an overflow
                    // WARNed in the host kernel with a fixed 5 ms period). Sweep again at once
                    // during a burst; back off to 5 ms when idle.
                    if n >= u64::from(rings.entries()) / REAP_BURST_DIVISOR {
                        idle = REAP_IDLE_MIN;
                        std::thread::yield_now();
                        continue;
                    }
                    idle = if n > 0 {
                        REAP_IDLE_MIN
                    } else {
                        (idle * 2).min(REAP_IDLE_MAX)
                    };
                    std::thread::sleep(idle);
                }
            })
            .map_err(|source| TrackingError::Io {
                backend: KIND,
                op: "starting the reaper thread",
                source,
            })?;
        self.reaper = Some((stop, handle));
        Ok(())
    }

    fn harvest(&mut self, into: &mut DirtySet) -> Result<(), TrackingError> {
        if self.reaper.is_none() {
            return Err(TrackingError::NotStarted(KIND));
        }
        self.check_reaper()?;
        if let Some(kick) = &self.kick {
            kick();
        }
        self.rings
            .collect()
            .map_err(TrackingError::sys(KIND, "collecting the dirty rings"))?;
        self.rings.drain_into(into);
        Ok(())
    }

    fn harvest_raw(&mut self) -> Result<u64, TrackingError> {
        if let Some(kick) = &self.kick {
            kick();
        }
        let n = self
            .rings
            .collect_raw()
            .map_err(TrackingError::sys(KIND, "collecting the dirty rings"))?;
        // What the reaper gathered since the last harvest belongs to this round too: drop it,
        // or the next harvest would report this round's pages.
        Ok(n + self.rings.discard())
    }

    fn stop(&mut self) -> Result<(), TrackingError> {
        if let Some((stop, handle)) = self.reaper.take() {
            stop.store(true, Ordering::Release);
            let _ = handle.join();
            logging(KIND, &self.vm, false)?;
            self.rings
                .collect()
                .map_err(TrackingError::sys(KIND, "collecting the dirty rings"))?;
            self.rings.activate(None);
        }
        self.check_reaper()
    }

    fn memory_overhead_bytes(&self) -> u64 {
        let rings =
            self.rings.vcpus() as u64 * u64::from(self.rings.entries()) * DIRTY_GFN_SIZE as u64;
        rings + super::bitmap_bytes(&self.slots)
    }

    fn background_cpu_ns(&self) -> u64 {
        self.reaper_cpu_ns.load(Ordering::Relaxed)
    }
}

impl Drop for KvmRing {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!("{e}");
        }
    }
}
