//! Identity page tables for the first 4 GiB (2 MiB pages), written into guest RAM.

use guest_abi::layout;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemory;

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const HUGE: u64 = 1 << 7;

/// Writes PML4, PDPT and the page directories. With `user`, every level allows CPL3 access
/// (the micro guest drops to CPL3 and runs natively; Linux builds its own tables at once).
pub fn write_identity_map(
    mem: &GuestMemory,
    user: bool,
) -> Result<(), vm_memory::GuestMemoryError> {
    let u = if user { USER } else { 0 };
    mem.write_obj(
        layout::PDPT_GPA | PRESENT | WRITABLE | u,
        GuestAddress(layout::PML4_GPA),
    )?;
    for pd in 0..layout::PD_COUNT {
        let pd_gpa = layout::PD_GPA + pd * 0x1000;
        mem.write_obj(
            pd_gpa | PRESENT | WRITABLE | u,
            GuestAddress(layout::PDPT_GPA + pd * 8),
        )?;
        for i in 0..512u64 {
            let phys = (pd << 30) | (i << 21);
            mem.write_obj(
                phys | PRESENT | WRITABLE | HUGE | u,
                GuestAddress(pd_gpa + i * 8),
            )?;
        }
    }
    Ok(())
}
