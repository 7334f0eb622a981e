//! CPUID for each vCPU: what KVM supports, minus what the guest must not use, with the physical
//! address bits the guest's address map was sized for.
//! PVM honours only leaves 0, 0x8000_0001 and 0x8000_0008 (PLATFORM.md §2); the rest is still
//! set as on hardware so the same code is right there.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    Supported(kvm_ioctls::Error),
}

const LEAF1_ECX_CX16: u32 = 1 << 13;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// 0x8000_0008 EBX bit 2 (XSaveErPtr): without it the kernel takes an AMD path that runs `fnclex`.
const LEAF80000008_EBX_XSAVEERPTR: u32 = 1 << 2;

/// `phys_bits`: the VM's (its address map's: `Vm::phys_bits`), which the guest must see.
pub fn for_vcpu(kvm: &Kvm, id: u8, count: u8, phys_bits: u8) -> Result<CpuId, CpuidError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuidError::Supported)?;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                // cmpxchg16b cannot be emulated at CPL0 here.
                e.ecx &= !LEAF1_ECX_CX16;
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                e.ebx = (e.ebx & 0x0000_ffff) | ((id as u32) << 24) | ((count as u32) << 16);
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            0xb | 0x1f => {
                // Extended topology: the x2APIC id of this CPU.
                e.edx = id as u32;
            }
            0x8000_0008 => {
                e.ebx |= LEAF80000008_EBX_XSAVEERPTR;
                // EAX[7:0] physical address bits, EAX[15:8] linear (kept), EAX[23:16] guest
                // physical bits (0: the same as EAX[7:0]). A guest smaller than the host is
                // what QEMU's host-phys-bits-limit gives too.
                e.eax = (e.eax & 0x0000_ff00) | u32::from(phys_bits);
            }
            _ => {}
        }
    }
    Ok(cpuid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::resources::addresses::guest_phys_bits;
    use crate::vstate::resources::MIN_PHYS_BITS;
    use crate::vstate::vm::Vm;

    #[test]
    fn cx16_is_hidden_and_apic_id_set() {
        let kvm = Kvm::new().expect("/dev/kvm");
        let c = for_vcpu(&kvm, 3, 4, 40).unwrap();
        let leaf1 = c.as_slice().iter().find(|e| e.function == 1).unwrap();
        assert_eq!(leaf1.ecx & LEAF1_ECX_CX16, 0);
        assert_eq!(leaf1.ebx >> 24, 3);
    }

    #[test]
    fn guest_phys_bits_match_the_address_map() {
        let kvm = Kvm::new().expect("/dev/kvm");
        let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        let vm = Vm::new(128 << 20).unwrap();
        assert_eq!(vm.phys_bits(), guest_phys_bits(&supported));
        let c = for_vcpu(&kvm, 0, 1, vm.phys_bits()).unwrap();
        let leaf = c
            .as_slice()
            .iter()
            .find(|e| e.function == 0x8000_0008)
            .expect("KVM reports leaf 0x8000_0008");
        let host = supported
            .as_slice()
            .iter()
            .find(|e| e.function == 0x8000_0008)
            .unwrap();
        assert_eq!(leaf.eax & 0xff, u32::from(guest_phys_bits(&supported)));
        assert_eq!(leaf.eax & 0xff_0000, 0, "no separate guest-physical limit");
        assert_eq!(leaf.eax & 0xff00, host.eax & 0xff00, "linear bits kept");
        assert!(
            leaf.eax & 0xff <= host.eax & 0xff,
            "never more than the host"
        );
        assert_ne!(leaf.ebx & LEAF80000008_EBX_XSAVEERPTR, 0);
    }

    /// `--phys-bits`: the address map and the guest's CPUID agree on the limit; a limit the
    /// host cannot give, or too small for RAM above the 32-bit hole, is refused naming both.
    #[test]
    fn a_phys_bits_limit_reaches_the_map_and_cpuid_or_is_refused() {
        let kvm = Kvm::new().expect("/dev/kvm");
        let vm = Vm::with_phys_bits(128 << 20, Some(MIN_PHYS_BITS)).unwrap();
        assert_eq!(vm.phys_bits(), MIN_PHYS_BITS);
        let c = for_vcpu(&kvm, 0, 1, vm.phys_bits()).unwrap();
        let leaf = c
            .as_slice()
            .iter()
            .find(|e| e.function == 0x8000_0008)
            .unwrap();
        assert_eq!(leaf.eax & 0xff, u32::from(MIN_PHYS_BITS));
        let supported = vm.phys_bits().max(Vm::new(1 << 20).unwrap().phys_bits());
        for asked in [35, supported + 1] {
            let err = Vm::with_phys_bits(128 << 20, Some(asked))
                .err()
                .expect("refused")
                .to_string();
            assert!(
                err.contains(&format!("--phys-bits {asked}")) && err.contains("36 to"),
                "{err}"
            );
        }
    }
}
