//! A vCPU's first state: registers, segments and paging for 64-bit entry, FPU, MSRs, LAPIC.

use guest_abi::{gdt, layout};
use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::boot::{gdt as gdt_table, EntryPoint};
use crate::memory::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("{what} failed: {source}")]
    Ioctl {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("writing the GDT/IDT into guest memory failed: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
    #[error("building the MSR list failed")]
    MsrList,
}

fn ioctl(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Ioctl { what, source }
}

const X86_CR0_PE: u64 = 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Writes the GDT and an empty IDT into guest RAM.
pub fn write_descriptor_tables(mem: &GuestMemory) -> Result<(), RegsError> {
    for (i, d) in gdt_table::table().iter().enumerate() {
        mem.write_obj(*d, GuestAddress(layout::GDT_GPA + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(layout::IDT_GPA))?;
    Ok(())
}

/// Long mode, paging on, flat kernel segments, as the 64-bit boot protocol requires.
pub fn setup_boot_sregs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut sregs = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
    let table = gdt_table::table();
    let seg = |sel: u16| gdt_table::segment(sel, table[(sel >> 3) as usize]);
    let code = seg(gdt::KERNEL_CS);
    let data = seg(gdt::KERNEL_DS);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = seg(gdt::TSS);
    sregs.gdt.base = layout::GDT_GPA;
    sregs.gdt.limit = (gdt::ENTRIES * 8 - 1) as u16;
    sregs.idt.base = layout::IDT_GPA;
    sregs.idt.limit = 0;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG;
    sregs.cr3 = layout::PML4_GPA;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))
}

pub fn setup_boot_regs(vcpu: &VcpuFd, entry: &EntryPoint) -> Result<(), RegsError> {
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry.rip,
        rsp: entry.rsp,
        rbp: entry.rsp,
        rsi: entry.rsi,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(ioctl("KVM_SET_REGS"))
}

pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(ioctl("KVM_SET_FPU"))
}

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

/// The MSR values a freshly reset CPU would have that the kernel relies on.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::MsrList)?;
    let set = vcpu.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
    if set != entries.len() {
        // KVM stops at the first MSR it refuses; name it so a host difference is visible.
        tracing::warn!(
            "KVM accepted {set} of {} boot MSRs; first refused: 0x{:x}",
            entries.len(),
            entries[set].index
        );
    }
    Ok(())
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(regs: &[std::os::raw::c_char], off: usize) -> u32 {
    let b = |i: usize| regs[off + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}
fn set_lapic_reg(regs: &mut [std::os::raw::c_char], off: usize, v: u32) {
    for (i, byte) in v.to_le_bytes().iter().enumerate() {
        regs[off + i] = *byte as std::os::raw::c_char;
    }
}

/// LINT0 delivers the PIC's ExtINT, LINT1 delivers NMI, as the MP table says.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
    let set_mode = |v: u32, mode: u32| (v & !0x700) | (mode << 8);
    let lvt0 = lapic_reg(&lapic.regs, APIC_LVT0);
    set_lapic_reg(&mut lapic.regs, APIC_LVT0, set_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(&lapic.regs, APIC_LVT1);
    set_lapic_reg(&mut lapic.regs, APIC_LVT1, set_mode(lvt1, APIC_MODE_NMI));
    vcpu.set_lapic(&lapic).map_err(ioctl("KVM_SET_LAPIC"))
}
