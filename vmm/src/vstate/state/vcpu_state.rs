//! One vCPU's complete architectural state, as KVM exposes it.

use std::sync::OnceLock;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, Xsave,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use super::{ioctl, StateError};

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// MSRs restored after all others. The TSC deadline is an absolute guest TSC value that KVM
/// turns into a host timer only if the LAPIC timer is already in deadline mode (set by
/// KVM_SET_LAPIC) and relative to the guest TSC (MSR_IA32_TSC, restored in an earlier batch).
const DEFERRED_MSRS: [u32; 1] = [MSR_IA32_TSC_DEADLINE];

/// MSRs KVM emulates but leaves out of KVM_GET_MSR_INDEX_LIST, which a guest kernel sets
/// and never re-reads: the MTRRs (default type, fixed ranges, the 8 variable ranges KVM has)
/// and TSC_AUX (RDTSCP/RDPID's CPU number). Those this vCPU refuses are skipped like any other.
const UNLISTED_MSRS: [u32; 28] = [
    0x2ff, 0x250, 0x258, 0x259, 0x268, 0x269, 0x26a, 0x26b, 0x26c, 0x26d, 0x26e, 0x26f, 0x200,
    0x201, 0x202, 0x203, 0x204, 0x205, 0x206, 0x207, 0x208, 0x209, 0x20a, 0x20b, 0x20c, 0x20d,
    0x20e, 0x20f,
];
const MSR_TSC_AUX: u32 = 0xc000_0103;

/// KVM_GET/SET_MSRS refuse `nmsrs >= MAX_IO_MSRS` (256) with E2BIG.
const MSR_BATCH: usize = 255;

/// More MSRs than any KVM lists (a few hundred at most): a longer list is not a saved state.
const MAX_SAVED_MSRS: usize = 4096;

/// The legacy `kvm_xsave` area, in 32-bit words.
const XSAVE_LEGACY_WORDS: usize = std::mem::size_of::<kvm_xsave>() / 4;

/// A saved TSC frequency within this many parts per million of the local one needs no
/// scaling: hosts calibrate the same crystal slightly differently at boot.
const TSC_KHZ_TOLERANCE_PPM: u64 = 250;

/// One MSR and its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Msr {
    pub index: u32,
    pub data: u64,
}

/// The legacy FPU/SSE state (`kvm_fpu`), kept only where KVM refuses KVM_GET_XSAVE. A lesser
/// substitute: KVM_GET/SET_FPU do not carry MXCSR (KVM never copies `kvm_fpu.mxcsr`; measured,
/// it reads back 0). kvm-bindings does not serialize `kvm_fpu`, hence this mirror.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

impl From<kvm_fpu> for FpuState {
    fn from(f: kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<FpuState> for kvm_fpu {
    fn from(f: FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// Everything KVM holds for one vCPU. `None` marks a piece this KVM could not provide.
///
/// kvm-bindings serializes the plain structures but not its FAM wrappers (`CpuId`, `Msrs`,
/// `Xsave`: vmm-sys-util's `with-serde` is not enabled), so those are kept as vectors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The whole `kvm_xsave` area (4 KiB, more with dynamically enabled features), in words.
    pub xsave: Option<Vec<u32>>,
    /// Only when XSAVE is unavailable: the legacy FPU/SSE state instead.
    pub fpu: Option<FpuState>,
    pub xcrs: Option<kvm_xcrs>,
    pub debugregs: Option<kvm_debugregs>,
    pub lapic: kvm_lapic_state,
    /// Every MSR in KVM_GET_MSR_INDEX_LIST that KVM would read, in that order, then the MTRRs
    /// and TSC_AUX.
    pub msrs: Vec<Msr>,
    pub vcpu_events: Option<kvm_vcpu_events>,
    pub tsc_khz: Option<u32>,
}

impl VcpuState {
    /// The saved value of one MSR.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|m| m.index == index).map(|m| m.data)
    }
}

/// Saves the complete state of a vCPU that is out of KVM_RUN (see
/// [`super::complete_pending_io`] for a vCPU that stopped on an I/O exit).
pub fn save_vcpu(kvm: &Kvm, fd: &VcpuFd) -> Result<VcpuState, StateError> {
    // KVM_GET_MP_STATE comes first: it makes the LAPIC accept pending INIT/SIPI events, which
    // can rewrite registers and the LAPIC that the reads below must see as they will be.
    let mp_state = fd.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(ioctl("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
    let xsave = save_xsave(kvm, fd)?;
    let fpu = match xsave {
        Some(_) => None,
        None => Some(fd.get_fpu().map_err(ioctl("KVM_GET_FPU"))?.into()),
    };
    let xcrs = if kvm.check_extension(Cap::Xcrs) {
        Some(fd.get_xcrs().map_err(ioctl("KVM_GET_XCRS"))?)
    } else {
        None
    };
    let debugregs = if kvm.check_extension_raw(kvm_bindings::KVM_CAP_DEBUGREGS.into()) > 0 {
        Some(fd.get_debug_regs().map_err(ioctl("KVM_GET_DEBUGREGS"))?)
    } else {
        None
    };
    let lapic = fd.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
    let tsc_khz = if kvm.check_extension(Cap::GetTscKhz) {
        // Fails where the host TSC is unstable; the state is still complete without it.
        fd.get_tsc_khz()
            .inspect_err(|e| tracing::debug!("KVM_GET_TSC_KHZ: {e}; TSC frequency not saved"))
            .ok()
    } else {
        None
    };
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(ioctl("KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    let msrs = save_msrs(kvm, fd)?;
    // Events last: anything the reads above made pending is then included.
    let vcpu_events = if kvm.check_extension(Cap::VcpuEvents) {
        Some(fd.get_vcpu_events().map_err(ioctl("KVM_GET_VCPU_EVENTS"))?)
    } else {
        None
    };
    Ok(VcpuState {
        cpuid,
        mp_state,
        regs,
        sregs,
        xsave,
        fpu,
        xcrs,
        debugregs,
        lapic,
        msrs,
        vcpu_events,
        tsc_khz,
    })
}

/// Restores `state` into a vCPU that has not run since it was created.
pub fn restore_vcpu(fd: &VcpuFd, state: &VcpuState) -> Result<(), StateError> {
    // Validate everything that comes from the wire before the first ioctl, so a bad state
    // leaves the vCPU untouched.
    let (cpuid, xsave, msr_batches) = checked_buffers(state, host_xsave_words()?)?;

    // The order matters:
    // - CPUID first: KVM derives from it what the other ioctls accept (XSAVE components and
    //   XCR0, MSRs such as TSC_DEADLINE or the kvmclock ones, CR4 bits in SREGS).
    // - The TSC frequency before any TSC value: KVM computes the TSC offset with the ratio.
    // - MP state before registers (the BSP/INIT logic can reset registers); REGS before
    //   VCPU_EVENTS, because KVM_SET_REGS clears a pending exception that the events restore.
    // - SREGS before the LAPIC: SREGS carries the APIC base MSR, and changing it resets the
    //   LAPIC.
    // - The LAPIC before the MSRs: TSC_DEADLINE only arms a timer in deadline mode.
    // - VCPU_EVENTS last, so nothing after it clears a pending exception, NMI or interrupt.
    fd.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
    if let Some(saved) = state.tsc_khz {
        restore_tsc_khz(fd, saved)?;
    }
    fd.set_mp_state(state.mp_state)
        .map_err(ioctl("KVM_SET_MP_STATE"))?;
    fd.set_regs(&state.regs).map_err(ioctl("KVM_SET_REGS"))?;
    fd.set_sregs(&state.sregs).map_err(ioctl("KVM_SET_SREGS"))?;
    match (xsave, state.fpu) {
        (Some(xsave), _) => {
            // SAFETY: `xsave_fit` sized the buffer to what this host's KVM reads (the
            // KVM_CAP_XSAVE2 size, at least the legacy 4 KiB).
            unsafe { fd.set_xsave2(&xsave) }.map_err(ioctl("KVM_SET_XSAVE"))?
        }
        (None, Some(fpu)) => fd.set_fpu(&fpu.into()).map_err(ioctl("KVM_SET_FPU"))?,
        (None, None) => {}
    }
    if let Some(xcrs) = &state.xcrs {
        fd.set_xcrs(xcrs).map_err(ioctl("KVM_SET_XCRS"))?;
    }
    if let Some(debugregs) = &state.debugregs {
        fd.set_debug_regs(debugregs)
            .map_err(ioctl("KVM_SET_DEBUGREGS"))?;
    }
    fd.set_lapic(&state.lapic).map_err(ioctl("KVM_SET_LAPIC"))?;
    let mut accepted = 0;
    for batch in &msr_batches {
        let set = fd.set_msrs(batch).map_err(ioctl("KVM_SET_MSRS"))?;
        let entries = batch.as_slice();
        if let Some(refused) = entries.get(set) {
            return Err(StateError::MsrRefused {
                index: refused.index,
                data: refused.data,
                accepted: accepted + set,
                total: state.msrs.len(),
            });
        }
        accepted += set;
    }
    check_tsc(fd, state);
    if let Some(events) = &state.vcpu_events {
        fd.set_vcpu_events(events)
            .map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
    }
    // Tells a kvmclock guest it was paused, so its soft-lockup watchdog does not fire on the
    // gap. KVM refuses (EINVAL) when the guest never enabled kvmclock.
    if let Err(e) = fd.kvmclock_ctrl() {
        tracing::debug!("KVM_KVMCLOCK_CTRL: {e} (the guest has no kvmclock)");
    }
    Ok(())
}

/// Every check [`restore_vcpu`] makes before its first ioctl, for a host whose KVM holds
/// `xsave_words` words of XSAVE area. Needs no /dev/kvm, so the fuzzer reaches it.
pub fn check_vcpu(state: &VcpuState, xsave_words: usize) -> Result<(), StateError> {
    checked_buffers(state, xsave_words).map(|_| ())
}

/// The KVM buffers `restore_vcpu` hands to KVM, built from validated saved data.
fn checked_buffers(
    state: &VcpuState,
    xsave_words: usize,
) -> Result<(CpuId, Option<Xsave>, Vec<Msrs>), StateError> {
    let cpuid = cpuid_wrapper(&state.cpuid)?;
    let xsave = match &state.xsave {
        Some(words) => Some(xsave_fit(words, xsave_words)?),
        None => None,
    };
    if xsave.is_none() && state.fpu.is_none() {
        return Err(StateError::Invalid(
            "neither an XSAVE area nor an FPU state".into(),
        ));
    }
    Ok((cpuid, xsave, msr_batches(&state.msrs)?))
}

/// Maps a FAM buffer error to [`StateError::Fam`] for `count` `what`.
fn fam(what: &'static str, count: usize) -> impl Fn(vmm_sys_util::fam::Error) -> StateError {
    move |source| StateError::Fam {
        what,
        count,
        source,
    }
}

fn cpuid_wrapper(entries: &[kvm_cpuid_entry2]) -> Result<CpuId, StateError> {
    if entries.is_empty() || entries.len() > KVM_MAX_CPUID_ENTRIES {
        return Err(StateError::Invalid(format!(
            "{} CPUID entries (1 to {KVM_MAX_CPUID_ENTRIES} expected)",
            entries.len()
        )));
    }
    CpuId::from_entries(entries).map_err(fam("CPUID entries", entries.len()))
}

/// The XSAVE area size this KVM reads and writes, in words. KVM_SET_XSAVE copies exactly that
/// many bytes from the caller, so every buffer handed to it must be at least this long.
fn xsave_words(kvm: &Kvm) -> usize {
    let bytes = usize::try_from(kvm.check_extension_int(Cap::Xsave2)).unwrap_or(0);
    bytes.div_ceil(4).max(XSAVE_LEGACY_WORDS)
}

/// As [`xsave_words`], for restore, which has no `Kvm` at hand. Cached: the size changes only
/// if the process asks for more XSAVE features (arch_prctl), which vmm never does.
pub fn host_xsave_words() -> Result<usize, StateError> {
    static WORDS: OnceLock<usize> = OnceLock::new();
    if let Some(words) = WORDS.get() {
        return Ok(*words);
    }
    let kvm = Kvm::new().map_err(ioctl("open /dev/kvm (for KVM_CAP_XSAVE2)"))?;
    Ok(*WORDS.get_or_init(|| xsave_words(&kvm)))
}

fn save_xsave(kvm: &Kvm, fd: &VcpuFd) -> Result<Option<Vec<u32>>, StateError> {
    // No KVM_CAP_XSAVE check: current kernels serve KVM_GET_XSAVE even on CPUs without XSAVE
    // (the legacy area, converted from FXSAVE), and it is the only way to carry MXCSR.
    let words = xsave_words(kvm);
    let mut xsave = Xsave::new(words - XSAVE_LEGACY_WORDS).map_err(fam("XSAVE words", words))?;
    let got = if words > XSAVE_LEGACY_WORDS {
        // SAFETY: the buffer holds the KVM_CAP_XSAVE2 size, all that KVM_GET_XSAVE2 writes.
        unsafe { fd.get_xsave2(&mut xsave) }.map_err(ioctl("KVM_GET_XSAVE2"))
    } else {
        // No dynamic features: KVM_GET_XSAVE (the older ioctl) fills the legacy area.
        fd.get_xsave()
            .map(|legacy| {
                // SAFETY: only the area is written, never the FAM length.
                unsafe { xsave.as_mut_fam_struct() }.xsave.region = legacy.region;
            })
            .map_err(ioctl("KVM_GET_XSAVE"))
    };
    match got {
        Ok(()) => {
            let mut area = xsave.as_fam_struct_ref().xsave.region.to_vec();
            area.extend_from_slice(xsave.as_slice());
            Ok(Some(area))
        }
        Err(e) => {
            // The capability is there but the vCPU refuses: the FPU state still moves, without
            // the AVX and later components.
            tracing::debug!("{e}: saving the legacy FPU state instead");
            Ok(None)
        }
    }
}

/// Fits a saved XSAVE area to this host's size (`words`): shorter areas are zero-extended (absent
/// components are in their initial state); longer ones may only carry zeros past it.
fn xsave_fit(saved: &[u32], words: usize) -> Result<Xsave, StateError> {
    let words = words.max(XSAVE_LEGACY_WORDS);
    if saved.len() < XSAVE_LEGACY_WORDS {
        return Err(StateError::Invalid(format!(
            "XSAVE area of {} words (at least {XSAVE_LEGACY_WORDS} expected)",
            saved.len()
        )));
    }
    if saved.iter().skip(words).any(|w| *w != 0) {
        return Err(StateError::Invalid(format!(
            "XSAVE area of {} words has state beyond the {words} words this host's KVM holds",
            saved.len()
        )));
    }
    let mut xsave = Xsave::new(words - XSAVE_LEGACY_WORDS).map_err(fam("XSAVE words", words))?;
    let (legacy, extra) = saved.split_at(XSAVE_LEGACY_WORDS);
    // SAFETY: only the area is written, never the FAM length.
    unsafe { xsave.as_mut_fam_struct() }
        .xsave
        .region
        .copy_from_slice(legacy);
    for (dst, src) in xsave.as_mut_slice().iter_mut().zip(extra) {
        *dst = *src;
    }
    Ok(xsave)
}

/// Reads every MSR KVM lists, and the [`UNLISTED_MSRS`]. KVM_GET_MSRS stops at the first MSR it refuses and returns how
/// many it read; the refused one is skipped and the read resumes after it, so each refusal
/// costs one extra ioctl.
fn save_msrs(kvm: &Kvm, fd: &VcpuFd) -> Result<Vec<Msr>, StateError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(ioctl("KVM_GET_MSR_INDEX_LIST"))?;
    let mut indices = list.as_slice().to_vec();
    for index in UNLISTED_MSRS.into_iter().chain([MSR_TSC_AUX]) {
        if !indices.contains(&index) {
            indices.push(index);
        }
    }
    let (saved, refused) = read_msrs(fd, &indices)?;
    if !refused.is_empty() {
        tracing::debug!(
            "this vCPU will not read {} MSR(s), not saved: {:x?}",
            refused.len(),
            refused
        );
    }
    Ok(saved)
}

/// Reads `indices`; returns the MSRs read and the indices KVM refused.
pub(super) fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<(Vec<Msr>, Vec<u32>), StateError> {
    let mut saved = Vec::with_capacity(indices.len());
    let mut refused = Vec::new();
    let mut pos = 0;
    while pos < indices.len() {
        let end = (pos + MSR_BATCH).min(indices.len());
        let entries: Vec<kvm_msr_entry> = indices[pos..end]
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut batch =
            Msrs::from_entries(&entries).map_err(fam("MSRs in a batch", entries.len()))?;
        let read = fd.get_msrs(&mut batch).map_err(ioctl("KVM_GET_MSRS"))?;
        let got = batch.as_slice();
        saved.extend(got.iter().take(read).map(|e| Msr {
            index: e.index,
            data: e.data,
        }));
        match got.get(read) {
            Some(e) => {
                refused.push(e.index);
                pos += read + 1;
            }
            None => pos = end,
        }
    }
    Ok((saved, refused))
}

/// The saved MSRs in restore order (see [`DEFERRED_MSRS`]), in batches KVM accepts.
fn msr_batches(msrs: &[Msr]) -> Result<Vec<Msrs>, StateError> {
    if msrs.len() > MAX_SAVED_MSRS {
        return Err(StateError::Invalid(format!(
            "{} MSRs (at most {MAX_SAVED_MSRS} expected)",
            msrs.len()
        )));
    }
    let entry = |m: &Msr| kvm_msr_entry {
        index: m.index,
        data: m.data,
        ..Default::default()
    };
    let deferred = |m: &&Msr| DEFERRED_MSRS.contains(&m.index);
    let mut ordered: Vec<kvm_msr_entry> = msrs.iter().filter(|m| !deferred(m)).map(entry).collect();
    // In a batch of their own, so that TSC (any batch before) is in place first.
    let first_deferred = ordered.len();
    ordered.extend(msrs.iter().filter(deferred).map(entry));
    let (normal, late) = ordered.split_at(first_deferred);
    normal
        .chunks(MSR_BATCH)
        .chain(late.chunks(MSR_BATCH))
        .map(|chunk| Msrs::from_entries(chunk).map_err(fam("MSRs", chunk.len())))
        .collect()
}

/// Says so when KVM accepted the saved TSC but the vCPU does not run on it. Measured on PVM:
/// the guest TSC is the host's (guest RDTSC runs natively at CPL3, nothing offsets it), so
/// after a migration the guest's TSC jumps to the destination host's.
fn check_tsc(fd: &VcpuFd, state: &VcpuState) {
    let Some(saved) = state.msr(MSR_IA32_TSC) else {
        return;
    };
    let Ok((read, _)) = read_msrs(fd, &[MSR_IA32_TSC]) else {
        return;
    };
    let Some(now) = read.first().map(|m| m.data) else {
        return;
    };
    // More than a second (at the saved rate, else 1 GHz) off: not just the time restore took.
    let second = u64::from(state.tsc_khz.unwrap_or(1_000_000)) * 1000;
    if now.abs_diff(saved) > second {
        tracing::warn!(
            "restored the guest TSC as 0x{saved:x} but it reads 0x{now:x}: this KVM does not \
             offset the TSC (PVM?); the guest sees its TSC jump"
        );
    }
}

/// Makes the vCPU's TSC tick at the saved rate, if it differs by more than calibration noise.
fn restore_tsc_khz(fd: &VcpuFd, saved: u32) -> Result<(), StateError> {
    let here = fd.get_tsc_khz().unwrap_or(0);
    let diff = u64::from(here.abs_diff(saved));
    if diff * 1_000_000 <= u64::from(saved) * TSC_KHZ_TOLERANCE_PPM {
        return Ok(());
    }
    fd.set_tsc_khz(saved).map_err(|source| StateError::TscKhz {
        saved,
        here,
        source,
    })
}
