//! The boot GDT. Hand-written: a few descriptors, no crate covers this for a VMM.

use guest_abi::{gdt, layout};
use kvm_bindings::kvm_segment;

/// Builds a descriptor from the packed access/flags word (`0xa09b` = 64-bit code, etc.).
pub const fn entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The table written at `layout::GDT_GPA`: selectors as in `guest_abi::gdt`.
pub fn table() -> [u64; gdt::ENTRIES] {
    let tss_limit = 0x67u32;
    let tss_base = layout::TSS_GPA as u32;
    [
        0,
        0,
        entry(0xa09b, 0, 0xfffff),          // 0x10 kernel code, 64-bit
        entry(0xc093, 0, 0xfffff),          // 0x18 kernel data
        entry(0x008b, tss_base, tss_limit), // 0x20 TSS, busy 64-bit (low half)
        0,                                  // TSS high half: base bits 63..32 = 0
        entry(0xc0f3, 0, 0xfffff),          // 0x30 user data, DPL3
        entry(0xa0fb, 0, 0xfffff),          // 0x38 user code, 64-bit, DPL3
    ]
}

/// The KVM segment register value matching a descriptor.
pub fn segment(selector: u16, descriptor: u64) -> kvm_segment {
    let field = |shift: u32, bits: u32| ((descriptor >> shift) & ((1 << bits) - 1)) as u8;
    let base = ((descriptor >> 16) & 0xff_ffff) | ((descriptor >> 32) & 0xff00_0000);
    let limit = (descriptor & 0xffff) | ((descriptor >> 32) & 0xf_0000);
    let g = field(55, 1);
    kvm_segment {
        base,
        // KVM wants the limit in bytes: expand page granularity.
        limit: if g == 1 {
            ((limit as u32) << 12) | 0xfff
        } else {
            limit as u32
        },
        selector,
        type_: field(40, 4),
        present: field(47, 1),
        dpl: field(45, 2),
        db: field(54, 1),
        s: field(44, 1),
        l: field(53, 1),
        g,
        avl: field(52, 1),
        unusable: if field(47, 1) == 0 { 1 } else { 0 },
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_decodes() {
        let t = table();
        let cs = segment(gdt::KERNEL_CS, t[(gdt::KERNEL_CS >> 3) as usize]);
        assert_eq!(
            (cs.l, cs.present, cs.dpl, cs.s, cs.type_),
            (1, 1, 0, 1, 0xb)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let ucs = segment(gdt::USER_CS, t[(gdt::USER_CS >> 3) as usize]);
        assert_eq!((ucs.l, ucs.dpl), (1, 3));
        let tss = segment(gdt::TSS, t[(gdt::TSS >> 3) as usize]);
        assert_eq!((tss.type_, tss.s, tss.base), (0xb, 0, layout::TSS_GPA));
    }
}
