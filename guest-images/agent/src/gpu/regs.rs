//! The gpu-test-device's BAR0 registers (tools/gpu-test-device/README.md). Copied from
//! `gpu_test_device::regs` because the agent builds with libc and guest-abi only; a unit test
//! checks every value against that crate.

pub const ID: u64 = 0x000;
pub const ID_VALUE: u32 = 0x4750_5554;
pub const SCRATCH: u64 = 0x008;
pub const VRAM_SIZE_LO: u64 = 0x010;

pub const IRQ_ENABLE: u64 = 0x020;
pub const IRQ_VECTOR: u64 = 0x024;
pub const IRQ_COUNT: u64 = 0x028;
pub const IRQ_DMA: u32 = 1 << 0;

pub const DMA_SRC_LO: u64 = 0x100;
pub const DMA_DST_LO: u64 = 0x108;
pub const DMA_LEN_LO: u64 = 0x110;
pub const DMA_DIR: u64 = 0x118;
pub const DIR_RAM_TO_VRAM: u32 = 0;
pub const DIR_VRAM_TO_RAM: u32 = 1;
pub const DMA_DOORBELL: u64 = 0x11c;
pub const DMA_STATUS: u64 = 0x120;
pub const DMA_LAST_NS_LO: u64 = 0x130;

pub const PW_BASE_LO: u64 = 0x200;
pub const PW_PAGES: u64 = 0x208;
pub const PW_STRIDE: u64 = 0x20c;
pub const PW_RATE: u64 = 0x210;
pub const PW_LIMIT: u64 = 0x214;
pub const PW_CTRL: u64 = 0x218;
pub const PW_STATUS: u64 = 0x21c;
pub const PW_WRITTEN_LO: u64 = 0x220;
pub const PW_MAGIC: u64 = 0x5047_5752_4954_4552;

pub const K_OFFSET_LO: u64 = 0x300;
pub const K_LEN_LO: u64 = 0x308;
pub const K_PATTERN: u64 = 0x310;
pub const K_CTRL: u64 = 0x314;
pub const K_STATUS: u64 = 0x318;
pub const K_PASSES: u64 = 0x31c;

pub const CTRL_STOP: u32 = 0;
pub const CTRL_START: u32 = 1;

pub const STATUS_BUSY: u32 = 1;
pub const STATUS_DONE: u32 = 2;

/// The `_HI` half of a `_LO` register.
pub const fn hi(lo: u64) -> u64 {
    lo + 4
}

/// A status value as the README names it.
pub fn status_name(status: u32) -> &'static str {
    match status {
        0 => "idle",
        STATUS_BUSY => "busy",
        STATUS_DONE => "done",
        0x10 => "unmapped IOVA",
        0x11 => "VRAM range",
        0x12 => "invalid",
        0x13 => "read-only",
        _ => "unknown",
    }
}

/// The BARs (vfio-pci region indexes) the agent uses.
pub const BAR_REGS: u32 = 0;
pub const BAR_VRAM: u32 = 1;

#[cfg(test)]
mod tests {
    use gpu_test_device::{pci, regs as dev};

    #[test]
    fn matches_the_device_crate() {
        let pairs: &[(u64, u64)] = &[
            (super::ID, dev::ID),
            (super::SCRATCH, dev::SCRATCH),
            (super::VRAM_SIZE_LO, dev::VRAM_SIZE_LO),
            (super::hi(super::VRAM_SIZE_LO), dev::VRAM_SIZE_HI),
            (super::IRQ_ENABLE, dev::IRQ_ENABLE),
            (super::IRQ_VECTOR, dev::IRQ_VECTOR),
            (super::IRQ_COUNT, dev::IRQ_COUNT),
            (super::DMA_SRC_LO, dev::DMA_SRC_LO),
            (super::hi(super::DMA_SRC_LO), dev::DMA_SRC_HI),
            (super::DMA_DST_LO, dev::DMA_DST_LO),
            (super::hi(super::DMA_DST_LO), dev::DMA_DST_HI),
            (super::DMA_LEN_LO, dev::DMA_LEN_LO),
            (super::hi(super::DMA_LEN_LO), dev::DMA_LEN_HI),
            (super::DMA_DIR, dev::DMA_DIR),
            (super::DMA_DOORBELL, dev::DMA_DOORBELL),
            (super::DMA_STATUS, dev::DMA_STATUS),
            (super::DMA_LAST_NS_LO, dev::DMA_LAST_NS_LO),
            (super::hi(super::DMA_LAST_NS_LO), dev::DMA_LAST_NS_HI),
            (super::PW_BASE_LO, dev::PW_BASE_LO),
            (super::hi(super::PW_BASE_LO), dev::PW_BASE_HI),
            (super::PW_PAGES, dev::PW_PAGES),
            (super::PW_STRIDE, dev::PW_STRIDE),
            (super::PW_RATE, dev::PW_RATE),
            (super::PW_LIMIT, dev::PW_LIMIT),
            (super::PW_CTRL, dev::PW_CTRL),
            (super::PW_STATUS, dev::PW_STATUS),
            (super::PW_WRITTEN_LO, dev::PW_WRITTEN_LO),
            (super::hi(super::PW_WRITTEN_LO), dev::PW_WRITTEN_HI),
            (super::K_OFFSET_LO, dev::K_OFFSET_LO),
            (super::hi(super::K_OFFSET_LO), dev::K_OFFSET_HI),
            (super::K_LEN_LO, dev::K_LEN_LO),
            (super::hi(super::K_LEN_LO), dev::K_LEN_HI),
            (super::K_PATTERN, dev::K_PATTERN),
            (super::K_CTRL, dev::K_CTRL),
            (super::K_STATUS, dev::K_STATUS),
            (super::K_PASSES, dev::K_PASSES),
            (super::PW_MAGIC, dev::PW_MAGIC),
        ];
        for (i, (ours, theirs)) in pairs.iter().enumerate() {
            assert_eq!(ours, theirs, "pair {i}");
        }
        let values: &[(u32, u32)] = &[
            (super::ID_VALUE, dev::ID_VALUE),
            (super::IRQ_DMA, dev::IRQ_DMA),
            (super::DIR_RAM_TO_VRAM, dev::DIR_RAM_TO_VRAM),
            (super::DIR_VRAM_TO_RAM, dev::DIR_VRAM_TO_RAM),
            (super::CTRL_STOP, dev::CTRL_STOP),
            (super::CTRL_START, dev::CTRL_START),
            (super::STATUS_BUSY, dev::STATUS_BUSY),
            (super::STATUS_DONE, dev::STATUS_DONE),
            (super::BAR_VRAM, pci::VRAM_BAR),
        ];
        for (i, (ours, theirs)) in values.iter().enumerate() {
            assert_eq!(ours, theirs, "value {i}");
        }
        assert_eq!(super::status_name(dev::STATUS_ERR_READ_ONLY), "read-only");
        assert_eq!(
            super::status_name(dev::STATUS_ERR_UNMAPPED),
            "unmapped IOVA"
        );
    }
}
