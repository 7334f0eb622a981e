//! Why a cell contradicts TRACKING.md, for the contradictions the probe has met (the report
//! lists every contradicting cell; this says why where the reason is known). Matched on what
//! the cell is (memory, step, mechanism, outcome), never on host names; a contradiction with no
//! entry here is listed as unexplained, so a new one cannot hide behind an old reason.

use crate::report::{Cell, Mechanism, Outcome};

fn is_mdev_bar(c: &Cell) -> bool {
    c.memory.starts_with("VFIO ") && c.memory.contains(" BAR")
}

/// The reason `c` contradicts its prediction, where known.
pub fn why(c: &Cell) -> Option<&'static str> {
    let step = c.step.as_deref().unwrap_or("");
    let device_step = step.contains("device writes");
    match (c.mechanism, &c.outcome) {
        (Mechanism::UffdWpAsync | Mechanism::PagemapScan, Outcome::Works)
            if is_mdev_bar(c) && !device_step =>
        {
            Some(
                "the BAR is not a VM_IO|VM_PFNMAP mapping: mbochs maps RAM pages from its own \
                 fault handler, and 6.12's vma_can_userfault refuses only VM_SPECIAL (and \
                 shadow-stack, droppable) VMAs, letting a WP_ASYNC-only registration take any \
                 other; vfio-pci's BAR mmap (and mdpy's VM_MIXEDMAP) are VM_SPECIAL: EINVAL",
            )
        }
        (Mechanism::SoftDirty, Outcome::Works) if is_mdev_bar(c) && !device_step => Some(
            "clear_refs skips only VM_PFNMAP VMAs: pages behind a fault handler (mbochs) or \
             vm_insert_page (mdpy, VM_MIXEDMAP) are write-protected and soft-dirtied by the next \
             CPU store. A vfio-pci BAR is VM_PFNMAP and never dirty; the device's own writes are \
             missed here too (the device-write cells)",
        ),
        (Mechanism::SoftDirty, Outcome::Errno { .. })
            if c.memory.starts_with("HMM") && step.contains("device-private") =>
        {
            Some(
                "clear_refs write-protected the device-private entries and test_hmm's device \
                 write cannot upgrade them (hmm_range_fault with a write request on a read-only \
                 device-private entry): the write is refused, not missed",
            )
        }
        (Mechanism::SoftDirty | Mechanism::PagemapScan, Outcome::Works)
            if c.memory.starts_with("HMM") && step.contains("in RAM") =>
        {
            Some(
                "test_hmm's device write reaches a RAM page through hmm_range_fault, which takes \
                 a CPU write fault on the armed PTE first: the CPU-side trackers see it. A GPU \
                 writing through HMM faults the same way; TRACKING.md's G-miss holds for DMA to \
                 pinned pages, and its 'faults fatally' for UVM, which refuses uffd-armed VMAs \
                 (test_hmm does not)",
            )
        }
        (Mechanism::SoftDirty, Outcome::SilentMiss)
            if c.memory.starts_with("HMM") && step.contains("migrate back") =>
        {
            Some(
                "armed after migration, clear_refs cleared the soft-dirty bit of the \
                 device-private entries; the page comes back to RAM through migrate_vma with a \
                 writable PTE built from that entry, so the CPU store sets only the hardware \
                 dirty bit and takes no write-protect fault: soft-dirty never learns of it (uffd \
                 WP and PAGEMAP_SCAN see the same writes)",
            )
        }
        (Mechanism::UffdMissing, Outcome::SilentMiss)
            if c.memory == "anon THP" && c.evidence.contains("no event within") =>
        {
            Some(
                "a timeout, not a kernel finding, if the wait was short: a MISSING fault on a \
                 huge page in emulated guest ring 0 on a loaded PVM host took over 2 s (the \
                 probe's wait was 2 s then, 10 s now; the cell works in other saved runs)",
            )
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(memory: &str, step: Option<&str>, mechanism: Mechanism, outcome: Outcome) -> Cell {
        Cell {
            memory: memory.into(),
            mechanism,
            step: step.map(String::from),
            outcome,
            evidence: String::new(),
            predicted: "-".into(),
            matches_prediction: Some(false),
            armed_by: None,
            cycles: None,
        }
    }

    #[test]
    fn known_contradictions_are_explained_and_others_are_not() {
        let bar = "VFIO 0c9e5a1e-16b0-4a7c-9d1e-0000000000b1 BAR0 (4 MiB, prefetchable)";
        let c = cell(bar, None, Mechanism::PagemapScan, Outcome::Works);
        assert!(why(&c).is_some_and(|w| w.contains("vma_can_userfault")));
        let c = cell(bar, None, Mechanism::SoftDirty, Outcome::Works);
        assert!(why(&c).is_some_and(|w| w.contains("VM_PFNMAP")));
        // The device's writes missed are no contradiction to explain away.
        let c = cell(
            bar,
            Some("device writes (x)"),
            Mechanism::SoftDirty,
            Outcome::Works,
        );
        assert_eq!(why(&c), None);
        let c = cell("anon 4K", None, Mechanism::UffdWp, Outcome::SilentMiss);
        assert_eq!(why(&c), None);
    }
}
