//! KVM dirty logging on one memory kind: a scratch VM with the kind's memory as a memslot with
//! KVM_MEM_LOG_DIRTY_PAGES, chosen pages written through the vCPU, then the dirty bitmap
//! (KVM_GET_DIRTY_LOG) or the vCPU's dirty ring harvested and compared with what was written.
//!
//! The write source is a real guest: `kvm_guest` runs one store per chosen unit at CPL3
//! (natively on this host) into the logged slot, and then the same stores again from CPL0
//! (KVM's emulator on PVM hosts: a guest kernel's path), each pass harvested and judged. Only
//! where that guest cannot run does KVM write instead (KVM_SET_MSRS of MSR_KVM_WALL_CLOCK_NEW on
//! the vCPU writes the wall clock at a guest address with the vCPU loaded, logged like a guest
//! store); the evidence names the source and, for the fallback, why the guest did not run.
//! guest_memfd kinds get their own guest_memfd on the scratch VM (a guest_memfd is bound to the
//! VM that created it) and are registered with KVM_SET_USER_MEMORY_REGION2. Everything is
//! dropped on return: ring mapping, vCPU, VM, guest_memfd, mappings.

use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use kvm_bindings::{
    kvm_msr_entry, kvm_userspace_memory_region, kvm_userspace_memory_region2, Msrs,
    KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm::sys::kvm_dirty::{
    clear_dirty_log, dirty_ring_caps, enable_dirty_ring, enable_manual_protect,
    manual_protect_supported, reset_dirty_rings, DirtyRingMap, DIRTY_GFN_SIZE,
    MANUAL_PROTECT_ENABLE,
};

use crate::kinds::{self, Kind, Region, GUEST_MEMFD_FLAG_MMAP, SMALL};
use crate::kvm_guest;
use crate::report::{errno_name, Outcome};
use crate::uffd::Finding;

/// Where the slot sits in guest-physical space: 1 GiB, 2 MiB aligned so huge kinds can be
/// mapped huge.
const GPA: u64 = 0x4000_0000;
const SLOT: u32 = 0;
/// A second slot, used only as the guest_memfd control (same fd, no dirty logging).
const GMEM_CONTROL_SLOT: u32 = 1;
const GMEM_CONTROL_GPA: u64 = 0x8000_0000;
/// MSR_KVM_WALL_CLOCK_NEW: writing it makes KVM write a pvclock_wall_clock at that GPA.
const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
/// Offset inside each written unit (not the page base, so a smeared report would show).
const WRITE_OFF: u64 = 0x40;
/// Ring entries per vCPU: far more than the few writes here, so the ring can never fill
/// (PLATFORM.md §5).
const RING_ENTRIES: u32 = 4096;

const WRITE_SOURCE: &str =
    "write source: KVM's own write (KVM_SET_MSRS MSR_KVM_WALL_CLOCK_NEW on the vCPU), not a guest store";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Log {
    Bitmap,
    /// MANUAL_DIRTY_LOG_PROTECT2 (without INITIALLY_SET): GET_DIRTY_LOG no longer clears, and
    /// each harvest clears (and re-protects) what it took with CLEAR_DIRTY_LOG.
    BitmapManual,
    Ring,
}

impl Log {
    fn name(self) -> &'static str {
        match self {
            Log::Bitmap => "KVM_GET_DIRTY_LOG",
            Log::BitmapManual => "KVM_GET_DIRTY_LOG + KVM_CLEAR_DIRTY_LOG",
            Log::Ring => "dirty ring",
        }
    }

    /// The log behind a KVM mechanism (the bitmap for any other).
    pub fn of(mech: crate::report::Mechanism) -> Log {
        use crate::report::Mechanism;
        match mech {
            Mechanism::KvmDirtyRing => Log::Ring,
            Mechanism::KvmDirtyBitmapManual => Log::BitmapManual,
            _ => Log::Bitmap,
        }
    }
}

fn kvm_err(op: &str, e: &kvm_ioctls::Error) -> Finding {
    let code = e.errno();
    (
        Outcome::errno(code),
        format!("{op}: {} ({e})", errno_name(code)),
    )
}

fn unavailable(why: String) -> Finding {
    (Outcome::Unavailable { why: why.clone() }, why)
}

/// The units written: as pagemap.rs, first-but-one, a neighbour and the last-but-one.
fn chosen(units: usize) -> BTreeSet<usize> {
    [1, 2, units.saturating_sub(2)].into_iter().collect()
}

/// Guest memory for the slot, held until the end of the experiment.
enum Memory {
    Region(Region),
    GuestMemfd { _map: kinds::Mapping, _fd: OwnedFd },
}

/// A scratch VM and its one vCPU (and ring, when `log` is Ring). Field order is drop order.
struct Vm {
    ring: Option<DirtyRingMap>,
    vcpu: VcpuFd,
    vm: VmFd,
    /// The guest's code and page tables, mapped by a memslot: dropped after the VM.
    control: Option<kvm_guest::Control>,
    /// The logged slot's memory: dropped after the VM, also on every early return.
    memory: Option<Memory>,
    kvm: Kvm,
    ring_note: String,
}

fn scratch_vm(log: Log) -> Result<Vm, Finding> {
    let kvm = Kvm::new().map_err(|e| unavailable(format!("/dev/kvm: {e}")))?;
    let vm = kvm
        .create_vm()
        .map_err(|e| unavailable(format!("scratch VM: {e}")))?;
    let mut ring_note = String::new();
    if log == Log::Ring {
        let caps = dirty_ring_caps(&vm);
        let bytes = RING_ENTRIES * DIRTY_GFN_SIZE as u32;
        let acq_rel = caps.acq_rel_max_bytes >= bytes;
        if !acq_rel && caps.plain_max_bytes < bytes {
            return Err(unavailable(format!(
                "no dirty ring of {bytes} bytes here: {caps:?}"
            )));
        }
        if let Err(e) = enable_dirty_ring(&vm, bytes, acq_rel) {
            return Err(match e.errno() {
                Some(code) => (
                    Outcome::errno(code),
                    format!("KVM_ENABLE_CAP(dirty ring): {e}"),
                ),
                None => unavailable(e.to_string()),
            });
        }
        ring_note = format!(
            "{} ring of {RING_ENTRIES} entries",
            if acq_rel { "ACQ_REL" } else { "plain" }
        );
    }
    if log == Log::BitmapManual {
        let offered = manual_protect_supported(&vm);
        if offered & MANUAL_PROTECT_ENABLE == 0 {
            return Err(unavailable(format!(
                "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 not offered (flags {offered:#x})"
            )));
        }
        enable_manual_protect(&vm, MANUAL_PROTECT_ENABLE).map_err(|e| match e.errno() {
            Some(code) => (Outcome::errno(code), e.to_string()),
            None => unavailable(e.to_string()),
        })?;
        ring_note = "manual clear (MANUAL_DIRTY_LOG_PROTECT2 = ENABLE)".into();
    }
    let vcpu = vm
        .create_vcpu(0)
        .map_err(|e| unavailable(format!("KVM_CREATE_VCPU: {e}")))?;
    let ring = if log == Log::Ring {
        Some(
            DirtyRingMap::map(&vcpu, RING_ENTRIES)
                .map_err(|e| unavailable(format!("mapping the dirty ring: {e}")))?,
        )
    } else {
        None
    };
    Ok(Vm {
        ring,
        vcpu,
        vm,
        control: None,
        memory: None,
        kvm,
        ring_note,
    })
}

/// Registers `addr..addr+len` as the logged slot.
///
/// # Safety
/// The caller keeps `addr..addr+len` mapped until the VM is closed (for a kind: Vm's field
/// order; for external memory: its owner, across `dirty_log_external`); the guest stores only
/// single bytes at the chosen offsets, which Rust code never references while KVM_RUN runs.
unsafe fn add_logged_slot(vm: &VmFd, addr: u64, len: usize) -> Result<(), Finding> {
    let region = kvm_userspace_memory_region {
        slot: SLOT,
        flags: KVM_MEM_LOG_DIRTY_PAGES,
        guest_phys_addr: GPA,
        memory_size: len as u64,
        userspace_addr: addr,
    };
    // SAFETY: the caller's contract above.
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| kvm_err("KVM_SET_USER_MEMORY_REGION(LOG_DIRTY_PAGES)", &e))
}

fn region2(
    slot: u32,
    gpa: u64,
    flags: u32,
    len: usize,
    addr: u64,
    fd: &OwnedFd,
) -> kvm_userspace_memory_region2 {
    kvm_userspace_memory_region2 {
        slot,
        flags,
        guest_phys_addr: gpa,
        memory_size: len as u64,
        userspace_addr: addr,
        guest_memfd_offset: 0,
        guest_memfd: fd.as_raw_fd() as u32,
        ..Default::default()
    }
}

/// Creates a guest_memfd of `flags` on `vm` and tries to register it with dirty logging. Ok:
/// registered (the experiment goes on); Err: the finding (the expected EINVAL, with a control
/// registration of the same fd without LOG_DIRTY_PAGES to show which flag is refused).
fn add_guest_memfd_slot(vm: &VmFd, flags: u64, len: usize) -> Result<Memory, Finding> {
    let req = kvm_bindings::kvm_create_guest_memfd {
        size: len as u64,
        flags,
        reserved: [0; 6],
    };
    // A refusal here is not the experiment's errno: the kind cannot be made at all.
    let raw = vm.create_guest_memfd(req).map_err(|e| {
        unavailable(format!(
            "KVM_CREATE_GUEST_MEMFD flags={flags:#x}: {} ({e})",
            errno_name(e.errno())
        ))
    })?;
    // SAFETY: KVM_CREATE_GUEST_MEMFD returned a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // The shared (userspace_addr) side: the guest_memfd's own mapping where it can be mmap'd,
    // otherwise plain anonymous memory, as a VMM would give.
    let map = if flags & GUEST_MEMFD_FLAG_MMAP != 0 {
        kinds::Mapping::new(len, libc::MAP_SHARED, Some(&fd))
    } else {
        kinds::Mapping::new(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, None)
    }
    .map_err(|e| unavailable(format!("mmap for userspace_addr: {e}")))?;
    let addr = map.ptr as u64;
    let logged = region2(
        SLOT,
        GPA,
        KVM_MEM_GUEST_MEMFD | KVM_MEM_LOG_DIRTY_PAGES,
        len,
        addr,
        &fd,
    );
    // SAFETY: `map` and `fd` are live and kept (in the returned Memory, held until after the VM
    // is closed, or until this function returns, after which no vCPU uses the slot); the guest
    // stores only single bytes that Rust code never references.
    match unsafe { vm.set_user_memory_region2(logged) } {
        Ok(()) => Ok(Memory::GuestMemfd { _map: map, _fd: fd }),
        Err(e) => {
            let code = e.errno();
            let control = region2(
                GMEM_CONTROL_SLOT,
                GMEM_CONTROL_GPA,
                KVM_MEM_GUEST_MEMFD,
                len,
                addr,
                &fd,
            );
            // SAFETY: as above; the control slot dies with the VM, which the caller drops
            // before anything else could reuse `map` (it is unmapped on return here, after
            // which no vCPU runs and KVM never touches the slot's memory again).
            let ctl = match unsafe { vm.set_user_memory_region2(control) } {
                Ok(()) => "accepted: the fd is a valid slot, LOG_DIRTY_PAGES is what is refused"
                    .to_string(),
                Err(c) => format!(
                    "also refused ({}): this VM takes no guest_memfd slot at all",
                    errno_name(c.errno())
                ),
            };
            Err((
                Outcome::errno(code),
                format!(
                    "guest_memfd flags={flags:#x} created on the scratch VM; \
                     KVM_SET_USER_MEMORY_REGION2(GUEST_MEMFD|LOG_DIRTY_PAGES): {} ({e}); \
                     control without LOG_DIRTY_PAGES {ctl}",
                    errno_name(code)
                ),
            ))
        }
    }
}

/// Makes KVM write the wall clock at `gpa`; Err when KVM did not take the MSR.
fn kvm_writes(vcpu: &VcpuFd, gpa: u64) -> Result<(), String> {
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_KVM_WALL_CLOCK_NEW,
        data: gpa,
        ..Default::default()
    }])
    .map_err(|e| format!("Msrs: {e:?}"))?;
    match vcpu.set_msrs(&msrs) {
        Ok(1) => Ok(()),
        Ok(n) => Err(format!("KVM_SET_MSRS(MSR_KVM_WALL_CLOCK_NEW) set {n} of 1")),
        Err(e) => Err(format!("KVM_SET_MSRS(MSR_KVM_WALL_CLOCK_NEW): {e}")),
    }
}

/// Pages (4 KiB, slot-relative) reported dirty since the last harvest; also resets.
fn harvest(v: &Vm, log: Log, len: usize, other: &mut usize) -> Result<BTreeSet<u64>, Finding> {
    let mut pages = BTreeSet::new();
    match (log, &v.ring) {
        (Log::Bitmap | Log::BitmapManual, _) => {
            let bitmap =
                v.vm.get_dirty_log(SLOT, len)
                    .map_err(|e| kvm_err("KVM_GET_DIRTY_LOG", &e))?;
            if log == Log::BitmapManual {
                // The slot ends where the bitmap does, so any page count is accepted.
                let pages = u32::try_from(len / SMALL)
                    .map_err(|_| unavailable(format!("slot of {len} bytes too large")))?;
                clear_dirty_log(&v.vm, SLOT, 0, pages, &bitmap).map_err(|e| match e.errno() {
                    Some(code) => (Outcome::errno(code), e.to_string()),
                    None => unavailable(e.to_string()),
                })?;
            }
            for (w, word) in bitmap.iter().enumerate() {
                for b in 0..64 {
                    if word & (1 << b) != 0 {
                        pages.insert((w * 64 + b) as u64);
                    }
                }
            }
        }
        (Log::Ring, Some(ring)) => {
            // The ring holds far more entries than are ever published here, so every index is
            // looked at: `pop` takes only entries with DIRTY set, and entries harvested before
            // have been RESET and then recycled by KVM_RESET_DIRTY_RINGS.
            for i in 0..ring.entries() {
                match ring.pop(i) {
                    Some((slot, off)) if slot == SLOT => {
                        pages.insert(off);
                    }
                    Some(_) => *other += 1,
                    None => {}
                }
            }
            reset_dirty_rings(&v.vm).map_err(|e| match e.errno() {
                Some(code) => (Outcome::errno(code), format!("KVM_RESET_DIRTY_RINGS: {e}")),
                None => unavailable(e.to_string()),
            })?;
        }
        (Log::Ring, None) => return Err(unavailable("no ring mapped".into())),
    }
    Ok(pages)
}

/// Runs the experiment for `kind` with `log`.
pub fn dirty_log(kind: Kind, log: Log, file_dir: &Path) -> Finding {
    let len = kind.units() * kind.unit();
    let region = match kind {
        Kind::GuestMemfd { .. } => None,
        _ => match kinds::create(kind, file_dir) {
            Ok(r) => Some(r),
            Err(why) => return unavailable(why),
        },
    };
    let mut v = match scratch_vm(log) {
        Ok(v) => v,
        Err(f) => return f,
    };
    // Held by `v`, whose field order drops it after the VM.
    v.memory = Some(match (kind, region) {
        (Kind::GuestMemfd { flags }, _) => match add_guest_memfd_slot(&v.vm, flags, len) {
            Ok(m) => m,
            Err(f) => return f,
        },
        (_, Some(r)) => {
            if r.cpu_access {
                // Present pages (THP huge, hugetlb faulted) before KVM maps them; these host
                // stores are not KVM's and must not show up in the log.
                r.populate();
            }
            // SAFETY: `r` is moved into `v.memory`, which Vm's field order drops after the VM.
            if let Err(f) = unsafe { add_logged_slot(&v.vm, r.addr() as u64, r.len) } {
                return f;
            }
            Memory::Region(r)
        }
        (_, None) => return unavailable("no memory".into()),
    });
    let mut other_slots = 0;
    let baseline = match harvest(&v, log, len, &mut other_slots) {
        Ok(p) => p,
        Err(f) => return f,
    };
    let units = chosen(kind.units());
    let unit = kind.unit() as u64;
    let offsets: Vec<u64> = units.iter().map(|&u| u as u64 * unit + WRITE_OFF).collect();
    let gpas: Vec<u64> = offsets.iter().map(|o| GPA + o).collect();
    // A real guest store first; KVM's own write only where the guest cannot run.
    let source = match kvm_guest::load(&v.kvm, &v.vm, &v.vcpu, &gpas) {
        Ok(control) => {
            v.control = Some(control);
            kvm_guest::run(&mut v.vcpu).map(|cpl| {
                format!(
                    "write source: guest stores (mov byte [rax], {:#x}) at CPL{cpl}, one per \
                     written unit",
                    kvm_guest::STORED
                )
            })
        }
        Err(e) => Err(e),
    };
    let (source, guest_stored) = match source {
        Ok(s) => (s, true),
        Err(why) => {
            for &gpa in &gpas {
                if let Err(e) = kvm_writes(&v.vcpu, gpa) {
                    return unavailable(format!("guest could not run ({why}); {e}"));
                }
            }
            (
                format!("guest could not run ({why}); {WRITE_SOURCE}"),
                false,
            )
        }
    };
    let seen = match harvest(&v, log, len, &mut other_slots) {
        Ok(p) => p,
        Err(f) => return f,
    };
    let written: BTreeSet<u64> = offsets.iter().map(|o| o / SMALL as u64).collect();
    let landed = host_view(&v, &offsets, guest_stored);
    let misses: Vec<_> = written.difference(&seen).collect();
    let extra: Vec<_> = seen.difference(&written).collect();
    // The same stores from CPL0: a guest kernel's path, through KVM's emulator on PVM hosts.
    let (cpl0, cpl0_misses, cpl0_extra) = if guest_stored {
        match cpl0_pass(&mut v, log, len, &written, &offsets, &mut other_slots) {
            Ok(r) => r,
            Err(f) => return f,
        }
    } else {
        (String::new(), 0, 0)
    };
    let evidence = format!(
        "{source}; slot {SLOT} at GPA {GPA:#x}, {} 4K pages{}; baseline {} pages dirty; \
         wrote 4K pages {written:?} (units {units:?}); {} reported pages {seen:?}{}: {} misses, \
         {} false positives{landed}{cpl0}",
        len / SMALL,
        if v.ring_note.is_empty() {
            String::new()
        } else {
            format!(", {}", v.ring_note)
        },
        baseline.len(),
        log.name(),
        if other_slots > 0 {
            format!(" (+{other_slots} entries for other slots)")
        } else {
            String::new()
        },
        misses.len(),
        extra.len()
    );
    drop(v);
    // Only an exact log works: a page reported that no pass wrote is a false positive.
    (
        Outcome::of_write_check(misses.len() + cpl0_misses, extra.len() + cpl0_extra),
        evidence,
    )
}

/// What the host reads at the written offsets, for the evidence: the bytes the guest stored,
/// or the wall-clock versions KVM wrote.
fn host_view(v: &Vm, offsets: &[u64], guest_stored: bool) -> String {
    let Some(Memory::Region(r)) = &v.memory else {
        return String::new();
    };
    if !r.cpu_access {
        return String::new();
    }
    let values: Vec<u32> = offsets
        .iter()
        .map(|&o| {
            // SAFETY: `o` + 4 lies inside the region's mapping (a unit is at least a page and
            // WRITE_OFF is small); the writes are complete (KVM_RUN or the ioctl returned).
            unsafe { std::ptr::read_volatile(r.addr().add(o as usize).cast::<u32>()) }
        })
        .collect();
    if guest_stored {
        let bytes: Vec<String> = values
            .iter()
            .map(|v| format!("{:#04x}", *v as u8))
            .collect();
        format!("; host view of the written bytes: [{}]", bytes.join(", "))
    } else {
        format!("; host view of the written offsets: wall-clock versions {values:?}")
    }
}

/// The loaded guest's stores again from CPL0, and the log harvested after them: the evidence
/// text, the number of written pages the log missed and the number it reported unwritten. A
/// guest that cannot run at CPL0 is said in the text and judged on its CPL3 stores alone.
fn cpl0_pass(
    v: &mut Vm,
    log: Log,
    len: usize,
    written: &BTreeSet<u64>,
    offsets: &[u64],
    other_slots: &mut usize,
) -> Result<(String, usize, usize), Finding> {
    let cpl = match kvm_guest::rerun_at_cpl0(&mut v.vcpu) {
        Ok(cpl) => cpl,
        Err(why) => {
            return Ok((
                format!("; then the same stores from CPL0 could not run ({why})"),
                0,
                0,
            ))
        }
    };
    let seen = harvest(v, log, len, other_slots)?;
    let misses = written.difference(&seen).count();
    let extra = seen.difference(written).count();
    let view = host_view(v, offsets, true);
    Ok((
        format!(
            "; then the same stores of {:#x} at CPL{cpl} (KVM's emulator on PVM hosts): {} \
             reported pages {seen:?}: {misses} misses, {extra} false positives{view}",
            kvm_guest::STORED_CPL0,
            log.name()
        ),
        misses,
        extra,
    ))
}

/// The most of an external range put in the slot: a BAR can be many GiB, and the bitmap and
/// the guest's identity map only need to cover the pages written.
const EXTERNAL_SLOT_MAX: usize = 64 << 20;

/// KVM dirty logging on memory the probe did not create (external.rs): a slot with
/// LOG_DIRTY_PAGES over (the start of) `addr..addr+len`, then either `device` writes through
/// its own path (`device(addr)`: a GPU kernel, DMA) and the log is judged against
/// external::DEVICE_PAGES, or, where `cpu_writes`, the guest stores as in [`dirty_log`].
pub fn dirty_log_external(
    addr: usize,
    len: usize,
    log: Log,
    cpu_writes: bool,
    device: Option<&mut dyn FnMut(usize) -> Result<(), crate::external::DeviceFailure>>,
) -> Finding {
    let len = len.min(EXTERNAL_SLOT_MAX);
    let mut v = match scratch_vm(log) {
        Ok(v) => v,
        Err(f) => return f,
    };
    // SAFETY: the caller (external.rs's owner of the memory) keeps `addr..addr+len` mapped
    // until after this function returns, and `v` (the VM) is dropped before that.
    if let Err(f) = unsafe { add_logged_slot(&v.vm, addr as u64, len) } {
        return f;
    }
    let mut other_slots = 0;
    let baseline = match harvest(&v, log, len, &mut other_slots) {
        Ok(p) => p,
        Err(f) => return f,
    };
    let slot_note = format!(
        "slot {SLOT} with LOG_DIRTY_PAGES over {} 4K pages at GPA {GPA:#x}{}; baseline {} dirty",
        len / SMALL,
        if v.ring_note.is_empty() {
            String::new()
        } else {
            format!(", {}", v.ring_note)
        },
        baseline.len()
    );
    // Set when the guest stored (then its CPL0 pass follows).
    let mut guest_stored = false;
    let (written, source): (BTreeSet<u64>, String) = match device {
        Some(write) => {
            if let Err(e) = write(addr) {
                let why = format!("{slot_note}; the device's write failed: {}", e.why);
                return match (e.faulted, e.errno) {
                    (true, _) => (Outcome::DeviceFault { why: e.why }, why),
                    (false, Some(code)) => (Outcome::errno(code), why),
                    (false, None) => (Outcome::Unavailable { why: e.why }, why),
                };
            }
            (
                crate::external::DEVICE_PAGES
                    .iter()
                    .map(|&p| p as u64)
                    .collect(),
                "device stores (not through KVM)".into(),
            )
        }
        None if cpu_writes => {
            let units = chosen(len / SMALL);
            let gpas: Vec<u64> = units
                .iter()
                .map(|&u| GPA + (u * SMALL) as u64 + WRITE_OFF)
                .collect();
            let ran = kvm_guest::load(&v.kvm, &v.vm, &v.vcpu, &gpas).and_then(|control| {
                v.control = Some(control);
                kvm_guest::run(&mut v.vcpu)
            });
            match ran {
                Ok(cpl) => {
                    guest_stored = true;
                    (
                        units.iter().map(|&u| u as u64).collect(),
                        format!("guest stores at CPL{cpl}"),
                    )
                }
                Err(why) => {
                    return unavailable(format!("{slot_note}; the guest could not run: {why}"))
                }
            }
        }
        None => {
            let why = format!(
                "{slot_note}: the slot is accepted; no vCPU store made (CPU writes to this \
                 memory are not allowed)"
            );
            return (Outcome::Unavailable { why: why.clone() }, why);
        }
    };
    let seen = match harvest(&v, log, len, &mut other_slots) {
        Ok(p) => p,
        Err(f) => return f,
    };
    let misses = written.difference(&seen).count();
    let extra = seen.difference(&written).count();
    // No host view of the bytes: the memory is not the scratch VM's (`v.memory` is empty).
    let (cpl0, cpl0_misses, cpl0_extra) = if guest_stored {
        match cpl0_pass(&mut v, log, len, &written, &[], &mut other_slots) {
            Ok(r) => r,
            Err(f) => return f,
        }
    } else {
        (String::new(), 0, 0)
    };
    drop(v);
    let evidence = format!(
        "{slot_note}; {source} to pages {written:?}; {} reported {seen:?}: {misses} misses, \
         {extra} false positives{cpl0}",
        log.name()
    );
    (
        Outcome::of_write_check(misses + cpl0_misses, extra + cpl0_extra),
        evidence,
    )
}
