//! A tiny long-mode guest for the KVM dirty-log cells: it stores one byte at each given guest
//! address and then writes an I/O port. It starts directly at CPL3 (user segments, U/S page
//! tables, IOPL=3 for the port write), so its stores run natively on this host. `rerun_at_cpl0`
//! then stores again from CPL0, where a PVM host runs the code in KVM's emulator (PLATFORM.md
//! §1): a guest kernel's stores take that path, and they reach memory through the emulator's
//! writes instead of through a write fault on a shadow page, so they are checked separately.
//! Page tables, GDT, TSS and code live in a small control slot that is not dirty-logged, so its
//! own writes (A/D bits) never show up.

use kvm_bindings::{kvm_segment, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use crate::kinds::Mapping;

/// The control slot: 64 KiB at GPA 0.
pub const CONTROL_SLOT: u32 = 2;
const CONTROL_LEN: usize = 64 << 10;
const GDT: u64 = 0x1000;
const TSS: u64 = 0x1800;
const PML4: u64 = 0x2000;
const PDPT: u64 = 0x3000;
/// Page directories for the first 4 GiB (2 MiB pages), at PD_BASE + i * 4 KiB.
const PD_BASE: u64 = 0x4000;
const PDS: u64 = 4;
const CODE: u64 = 0x8000;
/// The CPL0 pass's code.
const CODE0: u64 = 0xc000;
const STACK: u64 = 0xf000;
/// The port the guest writes when done.
const DONE_PORT: u16 = 0xf0;
/// The byte each store writes.
pub const STORED: u8 = 0xd1;
/// The byte each CPL0 store writes (another value, so the read-back shows that pass landed).
pub const STORED_CPL0: u8 = 0xd0;

const KERNEL_CS: u16 = 0x08;
const TSS_SEL: u16 = 0x10;
const USER_DS: u16 = 0x18 | 3;
const USER_CS: u16 = 0x20 | 3;
const KERNEL_DS: u16 = 0x28;

/// The guest's memory; keep it alive as long as the VM.
pub struct Control {
    map: Mapping,
}

impl Control {
    fn put(&self, gpa: u64, bytes: &[u8]) {
        assert!(gpa as usize + bytes.len() <= CONTROL_LEN);
        // SAFETY: the range lies inside the control mapping (checked above), which is live.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.map.ptr.add(gpa as usize),
                bytes.len(),
            )
        };
    }

    fn put_u64(&self, gpa: u64, v: u64) {
        self.put(gpa, &v.to_le_bytes());
    }
}

fn segment(selector: u16, type_: u8, dpl: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        ..Default::default()
    }
}

/// The guest's code: `mov rax, gpa; mov byte [rax], byte` per address, then `out DONE_PORT,
/// al` and a `jmp $` that is never reached.
fn code(gpas: &[u64], byte: u8) -> Vec<u8> {
    let mut c = Vec::new();
    for &gpa in gpas {
        c.extend_from_slice(&[0x48, 0xb8]);
        c.extend_from_slice(&gpa.to_le_bytes());
        c.extend_from_slice(&[0xc6, 0x00, byte]);
    }
    c.extend_from_slice(&[0xe6, DONE_PORT as u8, 0xeb, 0xfe]);
    c
}

/// Sets up the control slot and the vCPU so that the next KVM_RUN stores at `gpas` (all below
/// 4 GiB) from CPL3. The VM must have no slot at GPA 0..64 KiB.
pub fn load(kvm: &Kvm, vm: &VmFd, vcpu: &VcpuFd, gpas: &[u64]) -> Result<Control, String> {
    if let Some(g) = gpas.iter().find(|&&g| g >= PDS << 30) {
        return Err(format!(
            "GPA {g:#x} is above the guest's 4 GiB identity map"
        ));
    }
    let (cpl3, cpl0) = (code(gpas, STORED), code(gpas, STORED_CPL0));
    if cpl3.len() as u64 > CODE0 - CODE || cpl0.len() as u64 > STACK - 0x100 - CODE0 {
        return Err(format!(
            "{} stores do not fit the guest's code pages",
            gpas.len()
        ));
    }
    let map = Mapping::new(CONTROL_LEN, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, None)
        .map_err(|e| format!("mmap control memory: {e}"))?;
    let ctl = Control { map };
    // GDT: 64-bit kernel code, TSS (two slots), user data, 64-bit user code.
    ctl.put_u64(GDT + u64::from(KERNEL_CS), 0x00af_9b00_0000_ffff);
    let tss_lo = 0x67 | (TSS & 0xff_ffff) << 16 | 0x8b << 40 | (TSS >> 24 & 0xff) << 56;
    ctl.put_u64(GDT + u64::from(TSS_SEL), tss_lo);
    ctl.put_u64(GDT + u64::from(TSS_SEL) + 8, TSS >> 32);
    ctl.put_u64(GDT + u64::from(USER_DS & !3), 0x00cf_f300_0000_ffff);
    ctl.put_u64(GDT + u64::from(USER_CS & !3), 0x00af_fb00_0000_ffff);
    ctl.put_u64(GDT + u64::from(KERNEL_DS), 0x00cf_9300_0000_ffff);
    // Identity map of 4 GiB with 2 MiB pages, present, writable, user on every level.
    const P_RW_U: u64 = 0x7;
    const HUGE: u64 = 0x80;
    ctl.put_u64(PML4, PDPT | P_RW_U);
    for pd in 0..PDS {
        let pd_gpa = PD_BASE + pd * 4096;
        ctl.put_u64(PDPT + pd * 8, pd_gpa | P_RW_U);
        for i in 0..512 {
            ctl.put_u64(pd_gpa + i * 8, (pd * 512 + i) << 21 | HUGE | P_RW_U);
        }
    }
    ctl.put(CODE, &cpl3);
    ctl.put(CODE0, &cpl0);
    let region = kvm_userspace_memory_region {
        slot: CONTROL_SLOT,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: CONTROL_LEN as u64,
        userspace_addr: ctl.map.ptr as u64,
    };
    // SAFETY: the control mapping is returned to the caller, who keeps it until the VM is gone;
    // on the error path below the slot is deleted before the mapping is dropped.
    unsafe { vm.set_user_memory_region(region) }.map_err(|e| format!("control memslot: {e}"))?;
    if let Err(e) = enter_cpl3(kvm, vcpu) {
        let gone = kvm_userspace_memory_region {
            memory_size: 0,
            ..region
        };
        // SAFETY: deleting the slot (size 0) makes KVM drop its reference to the mapping, which
        // is unmapped only after this, when `ctl` goes out of scope.
        if let Err(d) = unsafe { vm.set_user_memory_region(gone) } {
            return Err(format!("{e}; deleting the control memslot: {d}"));
        }
        return Err(e);
    }
    Ok(ctl)
}

/// The vCPU's CPUID, segments, paging and registers for the CPL3 stores of `code`.
fn enter_cpl3(kvm: &Kvm, vcpu: &VcpuFd) -> Result<(), String> {
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID: {e}"))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(|e| format!("KVM_SET_CPUID2: {e}"))?;
    let mut sregs = vcpu.get_sregs().map_err(|e| format!("sregs: {e}"))?;
    sregs.cs = segment(USER_CS, 0xb, 3, true);
    let ds = segment(USER_DS, 0x3, 3, false);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (ds, ds, ds, ds, ds);
    sregs.tr = kvm_segment {
        base: TSS,
        limit: 0x67,
        selector: TSS_SEL,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
    sregs.gdt.base = GDT;
    sregs.gdt.limit = 0x2f;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr3 = PML4;
    sregs.cr4 = 1 << 5; // PAE
    sregs.cr0 = 1 | 1 << 4 | 1 << 5 | 1 << 31; // PE, ET, NE, PG
    sregs.efer = 1 << 8 | 1 << 10; // LME, LMA
    vcpu.set_sregs(&sregs)
        .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
    let mut regs = vcpu.get_regs().map_err(|e| format!("regs: {e}"))?;
    regs.rip = CODE;
    regs.rsp = STACK;
    regs.rflags = 0x3002; // IOPL=3: the port write is allowed at CPL3
    vcpu.set_regs(&regs)
        .map_err(|e| format!("KVM_SET_REGS: {e}"))
}

/// After a `run` of the loaded guest: the same stores again (of `STORED_CPL0`), from CPL0.
/// Returns the CPL they ran at.
pub fn rerun_at_cpl0(vcpu: &mut VcpuFd) -> Result<u8, String> {
    let mut sregs = vcpu.get_sregs().map_err(|e| format!("sregs: {e}"))?;
    sregs.cs = segment(KERNEL_CS, 0xb, 0, true);
    let ds = segment(KERNEL_DS, 0x3, 0, false);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (ds, ds, ds, ds, ds);
    vcpu.set_sregs(&sregs)
        .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
    let mut regs = vcpu.get_regs().map_err(|e| format!("regs: {e}"))?;
    regs.rip = CODE0;
    regs.rsp = STACK;
    regs.rflags = 0x2;
    vcpu.set_regs(&regs)
        .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
    run(vcpu)
}

/// Runs the loaded guest until it writes the done port; anything else is an error, described.
/// Returns the CPL the guest ran at.
pub fn run(vcpu: &mut VcpuFd) -> Result<u8, String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if std::time::Instant::now() > deadline {
            return Err("guest did not finish within 5 s".into());
        }
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, _)) if port == DONE_PORT => break,
            Ok(VcpuExit::IoOut(port, _)) => return Err(format!("unexpected OUT to {port:#x}")),
            Ok(other) => {
                let exit = format!("{other:?}");
                let rip = vcpu.get_regs().map_or(0, |r| r.rip);
                return Err(format!("guest exit {exit} at RIP {rip:#x}"));
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return Err(format!("KVM_RUN: {e}")),
        }
    }
    Ok(vcpu.get_sregs().map_or(u8::MAX, |s| s.cs.dpl))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_stores_at_each_address_then_writes_the_port() {
        let c = code(&[0x4000_0040, 0x4020_0040], STORED);
        // mov rax, imm64; mov byte [rax], imm8 (13 bytes) per address; out imm8, al; jmp $.
        assert_eq!(c.len(), 2 * 13 + 4);
        assert_eq!(&c[..2], &[0x48, 0xb8]);
        assert_eq!(&c[2..10], &0x4000_0040u64.to_le_bytes());
        assert_eq!(&c[10..13], &[0xc6, 0x00, STORED]);
        assert_eq!(&c[15..23], &0x4020_0040u64.to_le_bytes());
        assert_eq!(&c[26..], &[0xe6, DONE_PORT as u8, 0xeb, 0xfe]);
    }
}
