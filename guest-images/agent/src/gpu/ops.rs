//! `vfio-dma`, `vfio-vram` and `vfio-msix`: one-shot checks of the DMA engine, the VRAM BAR
//! and the MSI-X completion interrupts.

use std::time::Instant;

use guest_abi::pattern::{fill_pattern, fnv1a64};

use super::regs::*;
use super::session::Session;
use crate::pagemap::DmaBuffer;
use crate::sysinfo::meminfo_kib;

/// The largest transfer a command takes: DMA buffers are locked guest RAM.
pub const MAX_BYTES: u64 = 64 << 20;
/// What must stay free in the guest after the buffers are made (an out-of-memory init panics
/// the kernel).
const HEADROOM_KIB: u64 = 16 << 10;
/// The most interrupts `vfio-msix` raises in one command.
pub const MAX_IRQS: u64 = 1_000_000;

/// Refuses `total` bytes of new buffers that would not fit in MemAvailable minus a headroom.
fn check_memory(total: u64) -> Result<(), String> {
    let Some(avail_kib) = meminfo_kib("MemAvailable") else {
        return Ok(()); // nothing to go by; mmap or mlock will say no
    };
    if total / 1024 + HEADROOM_KIB > avail_kib {
        return Err(format!(
            "{total} bytes of DMA buffers do not fit in {avail_kib} KiB available"
        ));
    }
    Ok(())
}

fn check_len(bytes: u64) -> Result<usize, String> {
    if bytes == 0 || bytes > MAX_BYTES {
        return Err(format!("BYTES must be 1..={MAX_BYTES}, got {bytes}"));
    }
    usize::try_from(bytes).map_err(|_| format!("bad length {bytes}"))
}

/// The first byte at which two buffers differ (or the shorter length).
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or((a.len() != b.len()).then(|| a.len().min(b.len())))
}

/// Transfers every physically contiguous piece of `buf` to or from VRAM at `vram` + its offset;
/// returns (transfers, interrupts counted).
fn transfer(s: &Session, buf: &DmaBuffer, dir: u32, vram: u64) -> Result<(u64, u64), String> {
    let (mut transfers, mut irqs) = (0, 0);
    for seg in buf.segments() {
        let at = vram + seg.offset as u64;
        let (src, dst) = match dir {
            DIR_RAM_TO_VRAM => (seg.phys, at),
            _ => (at, seg.phys),
        };
        irqs += s.dma(dir, src, dst, seg.len as u64, 0)?;
        transfers += 1;
    }
    Ok((transfers, irqs))
}

/// `vfio-dma`: a pattern from one buffer into VRAM at 0 and back into a second buffer.
pub fn dma_round_trip(s: &mut Session, bytes: u64) -> Result<String, String> {
    s.require_test_device()?;
    let len = check_len(bytes)?;
    let vram_size = s.vram_size()?;
    if bytes > vram_size {
        return Err(format!(
            "{bytes} bytes do not fit in {vram_size} bytes of VRAM"
        ));
    }
    check_memory(2 * bytes)?;
    let mut data = vec![0u8; len];
    fill_pattern(s.next_seed(), &mut data);
    let mut src = DmaBuffer::new(len)?;
    src.write(&data);
    let dst = DmaBuffer::new(len)?;
    s.drain()?;
    let device_before = s.read(IRQ_COUNT)?;
    let start = Instant::now();
    let (t_in, irq_in) = transfer(s, &src, DIR_RAM_TO_VRAM, 0)?;
    let (t_out, irq_out) = transfer(s, &dst, DIR_VRAM_TO_RAM, 0)?;
    let ns = start.elapsed().as_nanos();
    let stray = s.drain()?;
    let device_irqs = s.read(IRQ_COUNT)?.wrapping_sub(device_before);
    src.check_frames()?;
    dst.check_frames()?;
    if let Some(at) = first_difference(&data, &dst.read()) {
        return Err(format!(
            "{}: round trip differs at byte {at} of {bytes}",
            s.bdf()
        ));
    }
    let (transfers, irqs) = (t_in + t_out, irq_in + irq_out + stray);
    if irqs != transfers {
        return Err(format!("{transfers} transfers but {irqs} interrupts"));
    }
    Ok(format!(
        "vfio-dma {} bytes={bytes} ok=true transfers={transfers} irqs={irqs} \
         device_irqs={device_irqs} elapsed_ns={ns} fnv64={:016x}",
        s.bdf(),
        fnv1a64(&data)
    ))
}

/// `vfio-vram`: a pattern written through an mmap of the VRAM BAR, read back through it, then
/// read by the device (DMA VRAM -> RAM).
pub fn vram_check(s: &mut Session, offset: u64, bytes: u64) -> Result<String, String> {
    s.require_test_device()?;
    let len = check_len(bytes)?;
    if offset % 8 != 0 || bytes % 8 != 0 {
        return Err("OFFSET and BYTES must be multiples of 8".into());
    }
    let size = s.vram.size;
    if offset.checked_add(bytes).is_none_or(|end| end > size) {
        return Err(format!(
            "{bytes} bytes at {offset:#x} beyond the VRAM BAR ({size:#x} bytes)"
        ));
    }
    check_memory(bytes)?;
    let mut data = vec![0u8; len];
    fill_pattern(s.next_seed(), &mut data);
    let map = s.dev.map(&s.vram, offset, len)?;
    map.write_bytes(0, &data);
    let mut back = vec![0u8; len];
    map.read_bytes(0, &mut back);
    drop(map);
    if let Some(at) = first_difference(&data, &back) {
        return Err(format!("mmap read-back differs at byte {at} of {bytes}"));
    }
    let buf = DmaBuffer::new(len)?;
    s.drain()?;
    let (transfers, irqs) = transfer(s, &buf, DIR_VRAM_TO_RAM, offset)?;
    buf.check_frames()?;
    if let Some(at) = first_difference(&data, &buf.read()) {
        return Err(format!(
            "device read of VRAM (DMA to RAM) differs at byte {at} of {bytes}"
        ));
    }
    Ok(format!(
        "vfio-vram {} offset={offset:#x} bytes={bytes} mmap=ok dma=ok transfers={transfers} \
         irqs={irqs} fnv64={:016x}",
        s.bdf(),
        fnv1a64(&data)
    ))
}

/// `vfio-msix`: COUNT interrupts, each on the next vector in turn and each awaited before the
/// next (two MSIs of one vector pending at once would merge in the local APIC). Exactly COUNT
/// must arrive. On the gpu-test-device each is the completion of a small DMA (64 bytes of
/// VRAM into a scratch page): `source=device`, the whole path from the device through the host
/// VMM and the guest's vfio-pci. On any other device the guest's vfio-pci signals the eventfd
/// itself (`VFIO_IRQ_SET_DATA_NONE`): `source=loopback`, which shows only that the guest could
/// enable the vectors.
pub fn msix(s: &mut Session, count: u64) -> Result<String, String> {
    if count == 0 || count > MAX_IRQS {
        return Err(format!("COUNT must be 1..={MAX_IRQS}, got {count}"));
    }
    if !s.test_device {
        return msix_loopback(s, count);
    }
    let scratch = DmaBuffer::new(64)?;
    let phys = scratch
        .segments()
        .first()
        .map(|seg| seg.phys)
        .ok_or("empty scratch buffer")?;
    s.drain()?;
    let device_before = s.read(IRQ_COUNT)?;
    let vectors = s.vectors();
    let start = Instant::now();
    let mut received = 0;
    for i in 0..count {
        received += s.dma(DIR_VRAM_TO_RAM, 0, phys, 64, (i % vectors as u64) as usize)?;
    }
    let ns = start.elapsed().as_nanos();
    received += s.drain()?;
    let device_irqs = s.read(IRQ_COUNT)?.wrapping_sub(device_before);
    if received != count {
        return Err(format!("raised {count} interrupts, {received} arrived"));
    }
    Ok(format!(
        "vfio-msix {} count={count} received={received} vectors={vectors} source=device \
         device_irqs={device_irqs} elapsed_ns={ns} ok=true",
        s.bdf()
    ))
}

fn msix_loopback(s: &mut Session, count: u64) -> Result<String, String> {
    s.drain()?;
    let vectors = s.vectors();
    let start = Instant::now();
    let mut received = 0;
    for i in 0..count {
        let vector = (i % vectors as u64) as usize;
        s.trigger(vector)?;
        received += s.wait_irq(vector)?;
    }
    let ns = start.elapsed().as_nanos();
    received += s.drain()?;
    if received != count {
        return Err(format!("triggered {count} interrupts, {received} arrived"));
    }
    Ok(format!(
        "vfio-msix {} count={count} received={received} vectors={vectors} source=loopback \
         elapsed_ns={ns} ok=true",
        s.bdf()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_first_difference() {
        assert_eq!(first_difference(b"abc", b"abc"), None);
        assert_eq!(first_difference(b"abc", b"abd"), Some(2));
        assert_eq!(first_difference(b"abc", b"ab"), Some(2));
        assert_eq!(first_difference(b"", b""), None);
    }

    #[test]
    fn bounds_lengths() {
        assert!(check_len(0).is_err());
        assert!(check_len(MAX_BYTES + 1).is_err());
        assert_eq!(check_len(4096), Ok(4096));
        assert!(check_memory(u64::MAX / 2).is_err());
        assert!(check_memory(4096).is_ok());
    }
}
