//! Pages that must be present before the vCPUs run under an exit backend (`memslot-exits`),
//! because KVM itself touches them and a missing one would never reach the VMM:
//!
//! - **Guest page tables.** Under shadow paging KVM walks them itself; on hardware the walk
//!   goes through EPT/NPT. A page-table page in no memslot makes the guest take a #PF that
//!   never happened, with no exit (measured on PVM, PLATFORM.md §8). Which pages are page
//!   tables is guest knowledge the VMM does not have, so we keep a superset present: every
//!   non-zero page in which each 8-byte word that has the present bit (bit 0) set also has its
//!   reserved physical-address bits (MAXPHYADDR..51) clear. Every valid x86-64 page-table page
//!   passes (an entry with a reserved bit set faults on use); random data and text almost never
//!   do (each odd word must have 52 - MAXPHYADDR zero bits). Pages that become page tables
//!   later are written by the guest first (zeroing, or copying the kernel half), which brings
//!   them in through an ordinary exit.
//! - **Descriptor tables, the TSS and the stacks events are delivered on**: KVM reads the GDT,
//!   IDT, LDT and TSS (the I/O permission bitmap on every CPL3 port access) and pushes
//!   exception frames on the TSS's RSP0 and IST stacks itself, and, for an event that arrives
//!   at CPL0, on the stack the vCPU is on. That last one matters for a vCPU saved in `hlt`:
//!   after the restore the first thing it does is take an interrupt, before any instruction of
//!   its own has touched (and so brought in) its stack. A missing frame page there makes the
//!   guest take a double fault (measured on PVM with a Linux guest saved idle: every lazy
//!   restore with memslot-exits died of one in the idle task, RIP and RSP as saved).
//! - **Paravirtual pages KVM writes**: kvmclock (MSR_KVM_SYSTEM_TIME_NEW), steal time, PV EOI
//!   and async-PF, named by MSRs in the saved vCPU state. A guest that moves them later, to a
//!   page still missing, would lose KVM's writes; Linux sets them once per CPU at boot.

use crate::vstate::state::VcpuState;

const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
const MSR_KVM_ASYNC_PF_EN: u32 = 0x4b56_4d02;
const MSR_KVM_STEAL_TIME: u32 = 0x4b56_4d03;
const MSR_KVM_PV_EOI_EN: u32 = 0x4b56_4d04;
const MSR_KVM_SYSTEM_TIME: u32 = 0x12;

/// At most this many page-table pages per walk (256 MiB of tables): a bound on the work a
/// crafted guest memory can cause, far above what one real address space uses.
const MAX_TABLES: usize = 1 << 16;
/// Descriptor-table and TSS limits are 20 bits (with G=1 KVM reports the scaled limit, which
/// the architecture caps at 4 GiB; no real table is larger than a MiB).
const MAX_LIMIT: u64 = 1 << 20;

/// Every page KVM itself touches in this saved state (see the module doc), sorted and
/// deduplicated. `read` returns a guest-physical page's content (None outside RAM).
pub fn kvm_touched(vcpus: &[VcpuState], read: &mut dyn FnMut(u64) -> Option<Vec<u8>>) -> Vec<u64> {
    let mut pages = pv_pages(vcpus);
    for v in vcpus {
        pages.extend(walk_page_tables(&v.sregs, read));
        pages.extend(cpu_structure_pages(&v.sregs, read));
        pages.extend(current_stack_pages(v, read));
    }
    pages.sort_unstable();
    pages.dedup();
    pages
}

/// The guest's physical-address width (CPUID 0x8000_0008 EAX[7:0]; the guest sees the host's
/// value on these machines), 52 when unknown (which keeps every candidate: safe, not lazy).
pub fn guest_phys_bits(vcpu: Option<&VcpuState>) -> u32 {
    vcpu.and_then(|v| {
        v.cpuid
            .iter()
            .find(|e| e.function == 0x8000_0008)
            .map(|e| e.eax & 0xff)
    })
    .filter(|&b| (32..=52).contains(&b))
    .unwrap_or(52)
}

/// Whether `page` (4 KiB) could be an x86-64 page-table page (see the module doc).
pub fn could_be_page_table(page: &[u8], phys_bits: u32) -> bool {
    let reserved: u64 = if phys_bits >= 52 {
        0
    } else {
        ((1u64 << 52) - 1) & !((1u64 << phys_bits) - 1)
    };
    let mut any = false;
    for w in page.chunks_exact(8) {
        let v = u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        if v != 0 {
            any = true;
        }
        if v & 1 != 0 && v & reserved != 0 {
            return false;
        }
    }
    any
}

/// The page-table pages reachable from a vCPU's CR3 (exact for the address space it is in:
/// enough for a guest with one address space, like the micro guest). `read` returns a page's
/// content, None outside RAM or for a zero page. Non-paged or 32-bit guests have none.
pub fn walk_page_tables(
    sregs: &kvm_bindings::kvm_sregs,
    read: &mut dyn FnMut(u64) -> Option<Vec<u8>>,
) -> Vec<u64> {
    let paging = sregs.cr0 & (1 << 31) != 0;
    let long = sregs.efer & (1 << 10) != 0 && sregs.cr4 & (1 << 5) != 0;
    if !paging || !long {
        return Vec::new();
    }
    let levels = if sregs.cr4 & (1 << 12) != 0 { 5 } else { 4 };
    // Deduplicated at push time with a set: a crafted memory whose every word points at a
    // distinct page would otherwise queue 512 entries per table and compare each against
    // every table seen (billions of steps before the cap below is reached).
    let root = sregs.cr3 & 0x000f_ffff_ffff_f000;
    let mut tables = std::collections::BTreeSet::from([root]);
    let mut todo = vec![(root, levels)];
    while let Some((gpa, level)) = todo.pop() {
        if level == 1 {
            continue;
        }
        let Some(page) = read(gpa) else { continue };
        for w in page.chunks_exact(8) {
            let e = u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
            let huge = e & (1 << 7) != 0 && level <= 3;
            if e & 1 != 0 && !huge {
                if tables.len() >= MAX_TABLES {
                    break;
                }
                let next = e & 0x000f_ffff_ffff_f000;
                if tables.insert(next) {
                    todo.push((next, level - 1));
                }
            }
        }
    }
    tables.into_iter().collect()
}

/// Entry `i` of a table page; None if `read` returned a short page.
fn entry(page: &[u8], i: usize) -> Option<u64> {
    let w = page.get(i * 8..i * 8 + 8)?;
    Some(u64::from_le_bytes([
        w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7],
    ]))
}

/// Translates a linear address through the guest's page tables (as read by `read`).
pub fn translate(
    sregs: &kvm_bindings::kvm_sregs,
    linear: u64,
    read: &mut dyn FnMut(u64) -> Option<Vec<u8>>,
) -> Option<u64> {
    if sregs.cr0 & (1 << 31) == 0 {
        return Some(linear);
    }
    if sregs.efer & (1 << 10) == 0 {
        return None;
    }
    let levels: u32 = if sregs.cr4 & (1 << 12) != 0 { 5 } else { 4 };
    let mut table = sregs.cr3 & 0x000f_ffff_ffff_f000;
    for level in (1..=levels).rev() {
        let shift = 12 + 9 * (level - 1);
        let idx = ((linear >> shift) & 0x1ff) as usize;
        let e = entry(&read(table)?, idx)?;
        if e & 1 == 0 {
            return None;
        }
        let base = e & 0x000f_ffff_ffff_f000;
        if level == 1 || (e & (1 << 7) != 0 && level <= 3) {
            let mask = (1u64 << shift) - 1;
            return Some((base & !mask) | (linear & mask));
        }
        table = base;
    }
    None
}

/// Pages of the descriptor tables, the TSS and the event-delivery stacks (RSP0-2, IST1-7, the
/// top page of each and the one below it), as guest-physical addresses.
pub fn cpu_structure_pages(
    sregs: &kvm_bindings::kvm_sregs,
    read: &mut dyn FnMut(u64) -> Option<Vec<u8>>,
) -> Vec<u64> {
    let mut linear: Vec<(u64, u64)> = vec![
        (sregs.gdt.base, sregs.gdt.limit as u64),
        (sregs.idt.base, sregs.idt.limit as u64),
    ];
    if sregs.ldt.present != 0 {
        linear.push((sregs.ldt.base, sregs.ldt.limit as u64));
    }
    if sregs.tr.present != 0 || sregs.tr.limit != 0 {
        linear.push((sregs.tr.base, sregs.tr.limit as u64));
    }
    let mut pages = Vec::new();
    for (base, limit) in linear {
        // A page count, not an end address: with a base near 2^64 the end saturates while the
        // cursor wraps to 0, and a `cursor <= end` loop never ends (a crafted state did that).
        // Linear addresses wrap like the CPU's; the count is capped by the 20-bit limit.
        let first = base & !0xfff;
        let count = ((base & 0xfff) + limit.min(MAX_LIMIT)) / 0x1000 + 1;
        for i in 0..count {
            let at = first.wrapping_add(i * 0x1000);
            if let Some(g) = translate(sregs, at, read) {
                pages.push(g & !0xfff);
            }
        }
    }
    // The 64-bit TSS: RSP0-2 at 4, 12, 20; IST1-7 at 36.. (unaligned u64s).
    if sregs.tr.limit >= 0x67 {
        let mut tss = [0u8; 0x68];
        let mut ok = true;
        for (i, b) in tss.iter_mut().enumerate() {
            let lin = sregs.tr.base.wrapping_add(i as u64);
            let byte = translate(sregs, lin, read)
                .and_then(|g| read(g & !0xfff)?.get((g & 0xfff) as usize).copied());
            match byte {
                Some(v) => *b = v,
                None => ok = false,
            }
        }
        if ok {
            for off in [4usize, 12, 20, 36, 44, 52, 60, 68, 76, 84] {
                let mut w = [0u8; 8];
                w.copy_from_slice(&tss[off..off + 8]);
                let sp = u64::from_le_bytes(w);
                if sp == 0 {
                    continue;
                }
                for lin in [sp.wrapping_sub(1), sp.wrapping_sub(0x1001)] {
                    if let Some(g) = translate(sregs, lin, read) {
                        pages.push(g & !0xfff);
                    }
                }
            }
        }
    }
    pages
}

/// The pages an event frame pushed on the vCPU's current stack lands in: the one holding the
/// top of the stack and the one below it (a 64-bit frame is at most 48 bytes, after aligning
/// RSP down to 16; the page below also covers a handler's first pushes). Harmless when the
/// vCPU is at CPL3, where events switch to the TSS stacks instead.
pub fn current_stack_pages(
    vcpu: &VcpuState,
    read: &mut dyn FnMut(u64) -> Option<Vec<u8>>,
) -> Vec<u64> {
    let sregs = &vcpu.sregs;
    let long = sregs.efer & (1 << 10) != 0 && sregs.cs.l != 0;
    let sp = if long {
        vcpu.regs.rsp
    } else {
        // Outside 64-bit code the stack is SS-relative (and ESP 32 bits wide).
        sregs.ss.base.wrapping_add(vcpu.regs.rsp & 0xffff_ffff)
    };
    let mut pages = Vec::new();
    for lin in [sp.wrapping_sub(1), sp.wrapping_sub(0x1001)] {
        if let Some(g) = translate(sregs, lin, read) {
            pages.push(g & !0xfff);
        }
    }
    pages
}

/// Guest-physical pages named by the paravirtual MSRs of every vCPU (enabled ones only).
pub fn pv_pages(vcpus: &[VcpuState]) -> Vec<u64> {
    let mut pages = Vec::new();
    for v in vcpus {
        for msr in [
            MSR_KVM_SYSTEM_TIME_NEW,
            MSR_KVM_SYSTEM_TIME,
            MSR_KVM_ASYNC_PF_EN,
            MSR_KVM_STEAL_TIME,
            MSR_KVM_PV_EOI_EN,
        ] {
            if let Some(val) = v.msr(msr) {
                if val & 1 != 0 {
                    // Each structure is at most 64 bytes: it may still straddle two pages.
                    // The MSR value comes from the saved state: wrap, as a GPA past 2^64
                    // names no page in RAM anyway.
                    let gpa = val & !0x3f;
                    pages.push(gpa & !0xfff);
                    pages.push(gpa.wrapping_add(63) & !0xfff);
                }
            }
        }
    }
    pages.sort_unstable();
    pages.dedup();
    pages
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(words: &[(usize, u64)]) -> Vec<u8> {
        let mut p = vec![0u8; 4096];
        for &(i, v) in words {
            p[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        p
    }

    #[test]
    fn the_walk_finds_every_table_of_one_address_space() {
        // PML4 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> (2 MiB leaf, PT 0x4000 -> 4 KiB leaf).
        let mem = std::collections::HashMap::from([
            (0x1000u64, page(&[(0, 0x2003)])),
            (0x2000, page(&[(0, 0x3003)])),
            (0x3000, page(&[(0, 0x20_0083), (1, 0x4003)])),
            (0x4000, page(&[(0, 0x5003)])),
        ]);
        let sregs = kvm_bindings::kvm_sregs {
            cr0: 1 << 31 | 1,
            cr3: 0x1000,
            cr4: 1 << 5,
            efer: 1 << 10 | 1 << 8,
            ..Default::default()
        };
        let found = walk_page_tables(&sregs, &mut |g| mem.get(&g).cloned());
        assert_eq!(found, vec![0x1000, 0x2000, 0x3000, 0x4000]);
        let real_mode = kvm_bindings::kvm_sregs::default();
        assert!(walk_page_tables(&real_mode, &mut |g| mem.get(&g).cloned()).is_empty());
    }

    #[test]
    fn a_vcpu_keeps_the_stack_it_is_on_present() {
        // Linux's idle task in miniature: RSP 0xffffffff81a03ed0 in the kernel image (2 MiB
        // leaf at GPA 0x1a00000), and a vCPU whose RSP sits at the very top of a page.
        let pml4 = 0x1000u64;
        let mem = std::collections::HashMap::from([
            (pml4, page(&[(511, 0x2003)])),
            (0x2000, page(&[(510, 0x3003)])),
            (0x3000, page(&[(13, 0x1a0_0083)])),
        ]);
        let mut vcpu = VcpuState {
            cpuid: Vec::new(),
            mp_state: kvm_bindings::kvm_mp_state { mp_state: 3 },
            regs: kvm_bindings::kvm_regs {
                rsp: 0xffff_ffff_81a0_3ed0,
                ..Default::default()
            },
            sregs: kvm_bindings::kvm_sregs {
                cr0: 1 << 31 | 1,
                cr3: pml4,
                cr4: 1 << 5,
                efer: 1 << 10 | 1 << 8,
                cs: kvm_bindings::kvm_segment {
                    l: 1,
                    ..Default::default()
                },
                ..Default::default()
            },
            xsave: None,
            fpu: None,
            xcrs: None,
            debugregs: None,
            lapic: Default::default(),
            msrs: Vec::new(),
            vcpu_events: None,
            tsc_khz: None,
        };
        let mut read = |g: u64| mem.get(&g).cloned().or_else(|| Some(vec![0u8; 4096]));
        assert_eq!(
            current_stack_pages(&vcpu, &mut read),
            vec![0x1a0_3000, 0x1a0_2000]
        );
        let all = kvm_touched(std::slice::from_ref(&vcpu), &mut read);
        for p in [pml4, 0x2000, 0x3000, 0x1a0_3000, 0x1a0_2000] {
            assert!(all.contains(&p), "0x{p:x} missing from {all:x?}");
        }
        // At the top of a page the frame goes into the page below: both kept.
        vcpu.regs.rsp = 0xffff_ffff_81a0_4000;
        assert_eq!(
            current_stack_pages(&vcpu, &mut read),
            vec![0x1a0_3000, 0x1a0_2000]
        );
        // Unpaged 32-bit code: SS base + ESP, identity-mapped.
        vcpu.sregs = kvm_bindings::kvm_sregs {
            cr0: 1,
            ss: kvm_bindings::kvm_segment {
                base: 0x10_0000,
                ..Default::default()
            },
            ..Default::default()
        };
        vcpu.regs.rsp = 0xdead_0000_0000_8000;
        assert_eq!(
            current_stack_pages(&vcpu, &mut read),
            vec![0x10_7000, 0x10_6000]
        );
    }

    #[test]
    fn page_tables_pass_and_data_fails() {
        // A PML4/PD as Linux or the micro guest builds them: present entries, NX and software
        // bits, 2 MiB leaves, a non-present swap-like entry.
        let pt = page(&[
            (0, 0x0000_0000_0000_a003),
            (1, 0x8000_0000_0020_00e3),
            (2, 0x0400_0000_1234_5067),
            (3, 0x0000_0000_dead_be00),
            (511, 0x0000_0000_0000_b023),
        ]);
        assert!(could_be_page_table(&pt, 46));
        assert!(
            !could_be_page_table(&vec![0u8; 4096], 46),
            "zero pages never"
        );
        // Random data: an odd word with high physical bits set.
        let mut rnd = vec![0u8; 4096];
        let mut x = 0x1234_5678_9abc_def1u64;
        for w in rnd.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        assert!(!could_be_page_table(&rnd, 46));
        // Text.
        let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog. "
            .iter()
            .cycle()
            .take(4096)
            .copied()
            .collect();
        assert!(!could_be_page_table(&text, 46));
        // The micro guest's workload stamp: (pass << 32) | i at offset 0, rest zero.
        let stamp = page(&[(0, (7u64 << 32) | 3)]);
        assert!(
            could_be_page_table(&stamp, 46),
            "small values pass: kept, safely"
        );
        // Unknown width keeps everything non-zero.
        assert!(could_be_page_table(&rnd, 52));
    }

    /// Runs `f` on its own thread and fails the test if it takes longer than 20 s, so that a
    /// walker that loops forever on crafted state fails instead of hanging the suite.
    fn within_20s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        match rx.recv_timeout(std::time::Duration::from_secs(20)) {
            Ok(v) => v,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("still running after 20 s"),
            Err(e) => panic!("the walker panicked: {e}"),
        }
    }

    fn vcpu_with(sregs: kvm_bindings::kvm_sregs) -> VcpuState {
        VcpuState {
            cpuid: Vec::new(),
            mp_state: kvm_bindings::kvm_mp_state { mp_state: 0 },
            regs: Default::default(),
            sregs,
            xsave: None,
            fpu: None,
            xcrs: None,
            debugregs: None,
            lapic: Default::default(),
            msrs: Vec::new(),
            vcpu_events: None,
            tsc_khz: None,
        }
    }

    #[test]
    fn a_gdt_based_near_the_top_of_the_address_space_ends() {
        // The crafted state of issue 18: unpaged (every linear address "translates"), GDT and
        // IDT ending past 2^64. The old loop's cursor wrapped to 0 below a saturated end.
        let mut sregs = kvm_bindings::kvm_sregs {
            cr0: 1,
            ..Default::default()
        };
        sregs.gdt.base = u64::MAX - 0x10;
        sregs.gdt.limit = 0xffff;
        sregs.idt.base = 0xffff_ffff_ffff_f000;
        sregs.idt.limit = 0xfff;
        sregs.tr.base = u64::MAX - 3;
        sregs.tr.limit = 0xffff_ffff;
        let pages = within_20s(move || cpu_structure_pages(&sregs, &mut |_| Some(vec![0u8; 4096])));
        // GDT: 0x...f000 then 16 pages wrapped from 0; IDT: one page; TSS: capped at 1 MiB.
        assert!(pages.contains(&0xffff_ffff_ffff_f000));
        assert!(pages.contains(&0xf000));
        assert!(pages.len() <= 17 + 1 + 257 + 20, "{} pages", pages.len());
    }

    #[test]
    fn a_page_table_walk_over_crafted_memory_is_capped() {
        // Every page is a full table of present entries, each naming a page no other entry
        // names: an unbounded tree. The walk must stop at MAX_TABLES, quickly.
        let sregs = kvm_bindings::kvm_sregs {
            cr0: 1 << 31 | 1,
            cr3: 0x1000,
            cr4: 1 << 5,
            efer: 1 << 10 | 1 << 8,
            ..Default::default()
        };
        let found = within_20s(move || {
            walk_page_tables(&sregs, &mut |gpa| {
                let mut p = vec![0u8; 4096];
                for (i, w) in p.chunks_exact_mut(8).enumerate() {
                    let next = ((gpa >> 12) * 512 + i as u64 + 2) << 12;
                    w.copy_from_slice(&((next & 0x000f_ffff_ffff_f000) | 3).to_le_bytes());
                }
                Some(p)
            })
        });
        assert_eq!(found.len(), MAX_TABLES);
        assert!(
            found.windows(2).all(|w| w[0] < w[1]),
            "sorted, no duplicates"
        );
    }

    #[test]
    fn crafted_msrs_tss_and_short_pages_do_not_panic() {
        // A kvmclock MSR at the top of the address space (gpa + 63 overflowed), a TSS whose
        // 0x68 bytes cross 2^64 (tr.base + i overflowed), and a reader returning short pages
        // (indexing past them panicked).
        let mut sregs = kvm_bindings::kvm_sregs {
            cr0: 1 << 31 | 1,
            cr3: 0x1000,
            cr4: 1 << 5,
            efer: 1 << 10 | 1 << 8,
            ..Default::default()
        };
        sregs.tr.base = u64::MAX - 0x20;
        sregs.tr.limit = 0x67;
        sregs.tr.present = 1;
        let mut v = vcpu_with(sregs);
        v.msrs.push(crate::vstate::state::Msr {
            index: MSR_KVM_SYSTEM_TIME_NEW,
            data: u64::MAX,
        });
        assert!(pv_pages(std::slice::from_ref(&v)).contains(&0xffff_ffff_ffff_f000));
        let short = kvm_touched(std::slice::from_ref(&v), &mut |_| Some(vec![3u8; 16]));
        assert!(short.contains(&0xffff_ffff_ffff_f000));
        v.sregs.cr0 = 1;
        let unpaged = kvm_touched(std::slice::from_ref(&v), &mut |_| Some(vec![0xffu8; 4096]));
        assert!(unpaged.contains(&0xffff_ffff_ffff_f000));
    }
}
