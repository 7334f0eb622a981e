//! Everything needed to put a guest in its first runnable state: kernel or payload in RAM, boot
//! parameters, MP table, GDT and identity page tables.

pub mod gdt;
pub mod image_reader;
pub mod linux;
pub mod micro;
pub mod mptable;
pub mod paging;

/// Where the boot vCPU starts, and the registers the boot protocol defines.
#[derive(Debug, Clone, Copy)]
pub struct EntryPoint {
    pub rip: u64,
    pub rsp: u64,
    /// Linux 64-bit boot protocol: RSI points at the zero page.
    pub rsi: u64,
}
