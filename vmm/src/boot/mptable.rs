//! Intel MultiProcessor Specification 1.4 table: how a Linux guest without ACPI learns its CPUs,
//! the IOAPIC and the ISA interrupt routing. Without it there is no IOAPIC and boot on PVM is
//! ~4 s slower (PLATFORM.md §3). Hand-written: no maintained crate builds MP tables.

use guest_abi::layout;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemory;
use crate::vstate::resources::addresses::{IOAPIC_GPA, LAPIC_GPA};

#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("{0} vCPUs do not fit an MP table (at most 254)")]
    TooManyCpus(u8),
    #[error("the MP table does not fit below 0x{:x}", layout::EBDA_END)]
    TooBig,
    #[error("writing the MP table into guest memory failed: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// Number of IOAPIC pins KVM's in-kernel IOAPIC has.
const IOAPIC_PINS: u8 = crate::vstate::resources::interrupts::IOAPIC_PINS as u8;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
/// Family 6 stepping values; the kernel only prints these.
const CPU_SIGNATURE: u32 = 0x600;
/// FPU and APIC present.
const CPU_FEATURES: u32 = 0x201;
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |s, b| s.wrapping_sub(*b))
}

/// Builds the floating pointer and configuration table for `vcpus` CPUs, as one byte image to be
/// placed at `layout::MPTABLE_GPA`.
pub fn build(vcpus: u8) -> Result<Vec<u8>, MpTableError> {
    if vcpus == 0 || vcpus > 254 {
        return Err(MpTableError::TooManyCpus(vcpus));
    }
    let ioapic_id = vcpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        let mut e = [0u8; 20];
        e[0] = 0; // processor
        e[1] = id;
        e[2] = APIC_VERSION;
        e[3] = CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 };
        e[4..8].copy_from_slice(&CPU_SIGNATURE.to_le_bytes());
        e[8..12].copy_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&e);
        count += 1;
    }
    // Bus 0: ISA.
    entries.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    count += 1;
    // The IOAPIC.
    let mut io = [0u8; 8];
    io[0] = 2;
    io[1] = ioapic_id;
    io[2] = IOAPIC_VERSION;
    io[3] = 1; // enabled
    io[4..8].copy_from_slice(&(IOAPIC_GPA as u32).to_le_bytes());
    entries.extend_from_slice(&io);
    count += 1;
    // ISA IRQ n -> IOAPIC pin n, as the routing table (`resources::interrupts`) has it.
    for irq in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[3, MP_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: LINT0 ExtINT (the PIC), LINT1 NMI, on every local APIC.
    entries.extend_from_slice(&[4, MP_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, MP_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let header_len = 44usize;
    let table_len = header_len + entries.len();
    let mut table = vec![0u8; header_len];
    table[0..4].copy_from_slice(b"PCMP");
    table[4..6].copy_from_slice(&(table_len as u16).to_le_bytes());
    table[6] = 4; // spec revision 1.4
    table[8..16].copy_from_slice(b"VMM     ");
    table[16..28].copy_from_slice(b"000000000000");
    table[34..36].copy_from_slice(&count.to_le_bytes());
    table[36..40].copy_from_slice(&(LAPIC_GPA as u32).to_le_bytes());
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    // Floating pointer (16 bytes) first, then the table right after it.
    let table_gpa = layout::MPTABLE_GPA + 16;
    let mut fp = [0u8; 16];
    fp[0..4].copy_from_slice(b"_MP_");
    fp[4..8].copy_from_slice(&(table_gpa as u32).to_le_bytes());
    fp[8] = 1; // length in 16-byte units
    fp[9] = 4;
    fp[10] = checksum(&fp);

    let mut image = fp.to_vec();
    image.extend_from_slice(&table);
    if layout::MPTABLE_GPA + image.len() as u64 > layout::EBDA_END {
        return Err(MpTableError::TooBig);
    }
    Ok(image)
}

/// Writes the MP table for `vcpus` CPUs into guest memory.
pub fn write(mem: &GuestMemory, vcpus: u8) -> Result<(), MpTableError> {
    let image = build(vcpus)?;
    mem.write_slice(&image, GuestAddress(layout::MPTABLE_GPA))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_are_zero_and_sizes_fit() {
        for n in [1u8, 2, 4, 32] {
            let img = build(n).unwrap();
            assert_eq!(img[..16].iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
            let len = u16::from_le_bytes([img[20], img[21]]) as usize;
            assert_eq!(len, img.len() - 16);
            assert_eq!(img[16..].iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
        }
        assert!(build(0).is_err());
        assert!(matches!(build(64), Err(MpTableError::TooBig)));
        assert!(build(255).is_err());
    }
}
