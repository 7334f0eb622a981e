//! The BAR0 register file: values, reads, and writes that turn into engine actions.
//!
//! Offsets and meanings are in the library (`gpu_test_device::regs`) and README.md.

use gpu_test_device::regs::*;

/// A register access the device refuses (the client gets EINVAL).
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("register access {offset:#x}+{len}: only aligned 4- and 8-byte accesses")]
    Unaligned { offset: u64, len: usize },
}

/// What a register write asks of the device beyond storing a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    None,
    DmaDoorbell,
    PageWriter(u32),
    Kernel(u32),
}

/// Register values. Counters the engines bump often live outside (atomics in `Shared`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Registers {
    pub scratch: u32,
    pub irq_enable: u32,
    pub irq_vector: u32,
    pub irq_count: u32,
    pub dma_src: u64,
    pub dma_dst: u64,
    pub dma_len: u64,
    pub dma_dir: u32,
    pub dma_status: u32,
    pub dma_completions: u32,
    pub dma_errors: u32,
    pub dma_last_ns: u64,
    pub pw_base: u64,
    pub pw_pages: u32,
    pub pw_stride: u32,
    pub pw_rate: u32,
    pub pw_limit: u32,
    pub pw_status: u32,
    pub k_offset: u64,
    pub k_len: u64,
    pub k_pattern: u32,
    pub k_status: u32,
}

/// Values read from outside the register file: fixed facts and the engines' counters.
#[derive(Debug, Clone, Copy)]
pub struct Live {
    pub msix_vectors: u16,
    pub vram_size: u64,
    pub pw_written: u64,
    pub k_passes: u32,
}

/// Splits an access into the 32-bit registers it touches: one for 4 bytes, two for 8.
pub fn words(offset: u64, len: usize) -> Result<impl Iterator<Item = u64>, RegisterError> {
    let count = match len {
        4 if offset % 4 == 0 => 1,
        8 if offset % 8 == 0 => 2,
        _ => return Err(RegisterError::Unaligned { offset, len }),
    };
    Ok((0..count).map(move |i| offset + 4 * i))
}

fn lo(value: u64) -> u32 {
    value as u32
}

fn hi(value: u64) -> u32 {
    (value >> 32) as u32
}

fn set_lo(target: &mut u64, value: u32) {
    *target = (*target & !0xffff_ffff) | u64::from(value);
}

fn set_hi(target: &mut u64, value: u32) {
    *target = (*target & 0xffff_ffff) | (u64::from(value) << 32);
}

impl Registers {
    /// The 32-bit register at `offset`; unknown offsets read 0.
    pub fn read(&self, offset: u64, live: Live) -> u32 {
        match offset {
            ID => ID_VALUE,
            VERSION => VERSION_VALUE,
            SCRATCH => self.scratch,
            MSIX_VECTORS => u32::from(live.msix_vectors),
            VRAM_SIZE_LO => lo(live.vram_size),
            VRAM_SIZE_HI => hi(live.vram_size),
            IRQ_ENABLE => self.irq_enable,
            IRQ_VECTOR => self.irq_vector,
            IRQ_COUNT => self.irq_count,
            DMA_SRC_LO => lo(self.dma_src),
            DMA_SRC_HI => hi(self.dma_src),
            DMA_DST_LO => lo(self.dma_dst),
            DMA_DST_HI => hi(self.dma_dst),
            DMA_LEN_LO => lo(self.dma_len),
            DMA_LEN_HI => hi(self.dma_len),
            DMA_DIR => self.dma_dir,
            DMA_STATUS => self.dma_status,
            DMA_COMPLETIONS => self.dma_completions,
            DMA_ERRORS => self.dma_errors,
            DMA_LAST_NS_LO => lo(self.dma_last_ns),
            DMA_LAST_NS_HI => hi(self.dma_last_ns),
            PW_BASE_LO => lo(self.pw_base),
            PW_BASE_HI => hi(self.pw_base),
            PW_PAGES => self.pw_pages,
            PW_STRIDE => self.pw_stride,
            PW_RATE => self.pw_rate,
            PW_LIMIT => self.pw_limit,
            PW_CTRL => u32::from(self.pw_status == STATUS_BUSY),
            PW_STATUS => self.pw_status,
            PW_WRITTEN_LO => lo(live.pw_written),
            PW_WRITTEN_HI => hi(live.pw_written),
            K_OFFSET_LO => lo(self.k_offset),
            K_OFFSET_HI => hi(self.k_offset),
            K_LEN_LO => lo(self.k_len),
            K_LEN_HI => hi(self.k_len),
            K_PATTERN => self.k_pattern,
            K_CTRL => u32::from(self.k_status == STATUS_BUSY),
            K_STATUS => self.k_status,
            K_PASSES => live.k_passes,
            _ => 0,
        }
    }

    /// Stores `value` at `offset`; read-only and unknown offsets ignore it. `msix_vectors`
    /// bounds the vector selection.
    pub fn write(&mut self, offset: u64, value: u32, msix_vectors: u16) -> Action {
        match offset {
            SCRATCH => self.scratch = value,
            IRQ_ENABLE => self.irq_enable = value & (IRQ_DMA | IRQ_PAGE_WRITER | IRQ_KERNEL),
            IRQ_VECTOR if value < u32::from(msix_vectors) => self.irq_vector = value,
            DMA_SRC_LO => set_lo(&mut self.dma_src, value),
            DMA_SRC_HI => set_hi(&mut self.dma_src, value),
            DMA_DST_LO => set_lo(&mut self.dma_dst, value),
            DMA_DST_HI => set_hi(&mut self.dma_dst, value),
            DMA_LEN_LO => set_lo(&mut self.dma_len, value),
            DMA_LEN_HI => set_hi(&mut self.dma_len, value),
            DMA_DIR => self.dma_dir = value,
            DMA_DOORBELL => return Action::DmaDoorbell,
            PW_BASE_LO => set_lo(&mut self.pw_base, value),
            PW_BASE_HI => set_hi(&mut self.pw_base, value),
            PW_PAGES => self.pw_pages = value,
            PW_STRIDE => self.pw_stride = value,
            PW_RATE => self.pw_rate = value,
            PW_LIMIT => self.pw_limit = value,
            PW_CTRL => return Action::PageWriter(value),
            K_OFFSET_LO => set_lo(&mut self.k_offset, value),
            K_OFFSET_HI => set_hi(&mut self.k_offset, value),
            K_LEN_LO => set_lo(&mut self.k_len, value),
            K_LEN_HI => set_hi(&mut self.k_len, value),
            K_PATTERN => self.k_pattern = value,
            K_CTRL => return Action::Kernel(value),
            _ => {}
        }
        Action::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIVE: Live = Live {
        msix_vectors: 8,
        vram_size: 1 << 30,
        pw_written: 0,
        k_passes: 0,
    };

    #[test]
    fn halves_of_64_bit_registers_compose() {
        let mut regs = Registers::default();
        regs.write(DMA_SRC_LO, 0x8765_4321, 8);
        regs.write(DMA_SRC_HI, 0x1, 8);
        assert_eq!(regs.dma_src, 0x1_8765_4321);
        assert_eq!(regs.read(DMA_SRC_HI, LIVE), 1);
    }

    #[test]
    fn vector_beyond_the_table_is_ignored() {
        let mut regs = Registers::default();
        regs.write(IRQ_VECTOR, 3, 8);
        regs.write(IRQ_VECTOR, 8, 8);
        assert_eq!(regs.irq_vector, 3);
    }

    #[test]
    fn identity_is_read_only() {
        let mut regs = Registers::default();
        regs.write(ID, 0, 8);
        assert_eq!(regs.read(ID, LIVE), ID_VALUE);
        assert_eq!(regs.read(VRAM_SIZE_LO, LIVE), 1 << 30);
    }

    #[test]
    fn only_aligned_words_and_double_words() {
        assert_eq!(words(8, 8).unwrap().collect::<Vec<_>>(), vec![8, 12]);
        assert!(words(4, 8).is_err());
        assert!(words(2, 4).is_err());
        assert!(words(0, 1).is_err());
    }
}
