//! The GPU-shaped test device's layout: PCI identity, BARs and the BAR0 register map.
//!
//! The device itself is the `vmm-gpu-test-device` binary (a vfio-user server); this library
//! holds only what a client needs to drive it, so tests and the VMM import the same numbers.
//! README.md describes the behaviour behind each register.

/// PCI identity and layout.
pub mod pci {
    /// Default vendor id: 0x1234, which QEMU uses for its own emulated devices; no Linux driver
    /// binds 0x1234:0x7e57, so a guest leaves the device to vfio-pci or a test program.
    pub const DEFAULT_VENDOR_ID: u16 = 0x1234;
    /// Default device id ("7e57": test).
    pub const DEFAULT_DEVICE_ID: u16 = 0x7e57;
    /// Revision id.
    pub const REVISION_ID: u8 = 0x01;
    /// Class code: display controller (0x03), 3D controller (0x02), prog-if 0: as an H100.
    pub const CLASS_CODE: u32 = 0x03_02_00;

    /// Size of the config space region (conventional PCI; no extended capabilities).
    pub const CONFIG_SIZE: u64 = 256;
    /// Offset of the MSI-X capability in config space (the only capability).
    pub const MSIX_CAP_OFFSET: u8 = 0x40;

    /// BAR0: 32-bit non-prefetchable registers, MSI-X table and PBA.
    pub const BAR0_SIZE: u64 = 16 << 20;
    /// BAR1 (with BAR2 as its upper half): 64-bit prefetchable VRAM, size chosen at start.
    pub const VRAM_BAR: u32 = 1;
    /// BAR3 (with BAR4): 64-bit prefetchable, 32 MiB, plain memory.
    pub const BAR3: u32 = 3;
    /// Size of BAR3.
    pub const BAR3_SIZE: u64 = 32 << 20;
    /// Default VRAM size: 1 GiB.
    pub const DEFAULT_VRAM_SIZE: u64 = 1 << 30;

    /// Offset of the MSI-X table in BAR0: not page aligned, so a VMM must trap the page
    /// around it (real GPUs put it deep inside BAR0 too: 0xb90000 on an H100).
    pub const MSIX_TABLE_OFFSET: u64 = 0x00b9_0800;
    /// Offset of the MSI-X pending bit array in BAR0 (its own page).
    pub const MSIX_PBA_OFFSET: u64 = 0x00ba_0000;
    /// Default and largest number of MSI-X vectors.
    pub const DEFAULT_MSIX_VECTORS: u16 = 8;
    /// The table must fit in the rest of its page: 128 entries of 16 bytes from 0x800.
    pub const MAX_MSIX_VECTORS: u16 = 128;

    /// Page size of the device: BAR0 trapped pages, page writer granule.
    pub const PAGE_SIZE: u64 = 4096;
}

/// BAR0 registers: 32 bits each, little endian, in the first page of BAR0. 64-bit values are
/// `_LO`/`_HI` pairs, which may also be accessed as one aligned 8-byte access at `_LO`.
pub mod regs {
    /// Size of the trapped register page at the start of BAR0.
    pub const REGS_SIZE: u64 = 0x1000;

    /// RO: device magic, "GPUT".
    pub const ID: u64 = 0x000;
    /// Value of [`ID`].
    pub const ID_VALUE: u32 = 0x4750_5554;
    /// RO: register map version.
    pub const VERSION: u64 = 0x004;
    /// Value of [`VERSION`].
    pub const VERSION_VALUE: u32 = 1;
    /// RW: scratch, no effect.
    pub const SCRATCH: u64 = 0x008;
    /// RO: number of MSI-X vectors.
    pub const MSIX_VECTORS: u64 = 0x00c;
    /// RO: VRAM size in bytes.
    pub const VRAM_SIZE_LO: u64 = 0x010;
    /// RO: upper half of the VRAM size.
    pub const VRAM_SIZE_HI: u64 = 0x014;

    /// RW: interrupt-on-completion enable, one bit per engine (`IRQ_*`).
    pub const IRQ_ENABLE: u64 = 0x020;
    /// RW: MSI-X vector raised on completion; a value >= the vector count is ignored.
    pub const IRQ_VECTOR: u64 = 0x024;
    /// RO: interrupts raised (eventfd signalled) since reset.
    pub const IRQ_COUNT: u64 = 0x028;
    /// [`IRQ_ENABLE`] bit: DMA transfer finished (done or error).
    pub const IRQ_DMA: u32 = 1 << 0;
    /// [`IRQ_ENABLE`] bit: page writer finished (limit reached or error).
    pub const IRQ_PAGE_WRITER: u32 = 1 << 1;
    /// [`IRQ_ENABLE`] bit: kernel finished a single pass (or failed).
    pub const IRQ_KERNEL: u32 = 1 << 2;

    /// RW: DMA source, a guest IOVA or a VRAM offset (see [`DMA_DIR`]).
    pub const DMA_SRC_LO: u64 = 0x100;
    /// RW: upper half.
    pub const DMA_SRC_HI: u64 = 0x104;
    /// RW: DMA destination, a VRAM offset or a guest IOVA.
    pub const DMA_DST_LO: u64 = 0x108;
    /// RW: upper half.
    pub const DMA_DST_HI: u64 = 0x10c;
    /// RW: DMA length in bytes.
    pub const DMA_LEN_LO: u64 = 0x110;
    /// RW: upper half.
    pub const DMA_LEN_HI: u64 = 0x114;
    /// RW: direction, `DIR_*`.
    pub const DMA_DIR: u64 = 0x118;
    /// [`DMA_DIR`]: guest RAM (IOVA) to VRAM (offset).
    pub const DIR_RAM_TO_VRAM: u32 = 0;
    /// [`DMA_DIR`]: VRAM (offset) to guest RAM (IOVA).
    pub const DIR_VRAM_TO_RAM: u32 = 1;
    /// WO: any write starts the transfer described above (ignored, counted as an error, while
    /// one is running).
    pub const DMA_DOORBELL: u64 = 0x11c;
    /// RO: `STATUS_*` of the last transfer.
    pub const DMA_STATUS: u64 = 0x120;
    /// RO: transfers completed successfully since reset.
    pub const DMA_COMPLETIONS: u64 = 0x124;
    /// RO: transfers failed (or refused) since reset.
    pub const DMA_ERRORS: u64 = 0x128;
    /// RO: nanoseconds the engine spent copying the last successful transfer (its own clock,
    /// from the first byte to the last: no doorbell or status access in it).
    pub const DMA_LAST_NS_LO: u64 = 0x130;
    /// RO: upper half.
    pub const DMA_LAST_NS_HI: u64 = 0x134;

    /// RW: page writer range start, a page-aligned guest IOVA.
    pub const PW_BASE_LO: u64 = 0x200;
    /// RW: upper half.
    pub const PW_BASE_HI: u64 = 0x204;
    /// RW: pages in the range.
    pub const PW_PAGES: u64 = 0x208;
    /// RW: distance between written pages, in pages (0 counts as 1).
    pub const PW_STRIDE: u64 = 0x20c;
    /// RW: pages written per second (0: as fast as it can).
    pub const PW_RATE: u64 = 0x210;
    /// RW: stop after this many page writes (0: run until stopped).
    pub const PW_LIMIT: u64 = 0x214;
    /// RW: write [`CTRL_START`] to start (from the first page), [`CTRL_STOP`] to stop;
    /// reads 1 while running.
    pub const PW_CTRL: u64 = 0x218;
    /// RO: `STATUS_*`.
    pub const PW_STATUS: u64 = 0x21c;
    /// RO: page writes done since the last start.
    pub const PW_WRITTEN_LO: u64 = 0x220;
    /// RO: upper half.
    pub const PW_WRITTEN_HI: u64 = 0x224;
    /// Each page write stores this magic at byte 8 of the page...
    pub const PW_MAGIC: u64 = 0x5047_5752_4954_4552;
    // ...and the write's sequence number (from 1) at byte 0, both little endian.

    /// RW: kernel range start, a VRAM offset (4-byte aligned).
    pub const K_OFFSET_LO: u64 = 0x300;
    /// RW: upper half.
    pub const K_OFFSET_HI: u64 = 0x304;
    /// RW: kernel range length in bytes (a multiple of 4).
    pub const K_LEN_LO: u64 = 0x308;
    /// RW: upper half.
    pub const K_LEN_HI: u64 = 0x30c;
    /// RW: the 32-bit word the kernel fills its range with (read again at every pass).
    pub const K_PATTERN: u64 = 0x310;
    /// RW: [`CTRL_START`] runs passes until [`CTRL_STOP`]; [`CTRL_ONCE`] runs one pass;
    /// reads 1 while running.
    pub const K_CTRL: u64 = 0x314;
    /// RO: `STATUS_*`.
    pub const K_STATUS: u64 = 0x318;
    /// RO: passes completed since the last start.
    pub const K_PASSES: u64 = 0x31c;

    /// Control value: stop.
    pub const CTRL_STOP: u32 = 0;
    /// Control value: start.
    pub const CTRL_START: u32 = 1;
    /// Control value: one pass (kernel only).
    pub const CTRL_ONCE: u32 = 2;

    /// Status: never started.
    pub const STATUS_IDLE: u32 = 0;
    /// Status: running.
    pub const STATUS_BUSY: u32 = 1;
    /// Status: finished (or stopped) without error.
    pub const STATUS_DONE: u32 = 2;
    /// Status: an IOVA was outside every DMA_MAP region.
    pub const STATUS_ERR_UNMAPPED: u32 = 0x10;
    /// Status: a VRAM range was outside VRAM.
    pub const STATUS_ERR_VRAM_RANGE: u32 = 0x11;
    /// Status: unknown direction, misaligned or empty range.
    pub const STATUS_ERR_INVALID: u32 = 0x12;
    /// Status: a write to a region mapped without write permission.
    pub const STATUS_ERR_READ_ONLY: u32 = 0x13;
}
