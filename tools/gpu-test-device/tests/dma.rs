//! The engines against guest RAM given with DMA_MAP: DMA round trip, completion interrupt,
//! unmapped IOVA, page writer, VRAM kernel; and error replies surfaced by the client.

mod common;

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use common::*;
use gpu_test_device::{pci, regs};
use vfio_bindings::bindings::vfio::*;
use vfio_user::{Client, Error};
use vm_memory::VolatileMemory;
use vmm_sys_util::eventfd::EventFd;

fn ram_bytes(ram: &GuestRam, offset: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0; len];
    ram.map
        .get_slice(offset as usize, len)
        .expect("slice")
        .copy_to(&mut data[..]);
    data
}

/// One eventfd per vector, handed to the device for all of them.
fn msix_eventfds(client: &mut Client, vectors: usize) -> Vec<EventFd> {
    let fds: Vec<EventFd> = (0..vectors)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
        .collect();
    let raw: Vec<i32> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    client
        .set_irqs(
            VFIO_PCI_MSIX_IRQ_INDEX,
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            0,
            vectors as u32,
            &raw,
        )
        .expect("SET_IRQS");
    fds
}

/// Waits until the device counts `count` interrupts raised (it raises after the status).
fn wait_irq_count(client: &mut Client, count: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while read32(client, regs::IRQ_COUNT) < count {
        assert!(Instant::now() < deadline, "{count} interrupts");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Signals counted on `fd` so far (0 if none).
fn signals(fd: &EventFd) -> u64 {
    fd.read().unwrap_or(0)
}

#[test]
fn dma_round_trip_is_byte_exact() {
    let device = DeviceProcess::start(&["--vram-size", "64M"]);
    let mut client = device.connect();
    let ram = guest_ram(&mut client);
    let len = 3 * 4096 + 17;
    let pattern: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
    ram.map
        .get_slice(100, len)
        .expect("slice")
        .copy_from(&pattern);

    let vram_offset = (32 << 20) + 5;
    let status = dma(
        &mut client,
        RAM_IOVA + 100,
        vram_offset,
        len as u64,
        regs::DIR_RAM_TO_VRAM,
    );
    assert_eq!(status, regs::STATUS_DONE);
    let mut in_vram = vec![0; len];
    client
        .region_read(
            VFIO_PCI_BAR1_REGION_INDEX,
            vram_offset,
            &mut in_vram[..4096],
        )
        .expect("VRAM read");
    assert_eq!(in_vram[..4096], pattern[..4096]);

    let back = RAM_IOVA + (2 << 20) + 3;
    let status = dma(
        &mut client,
        vram_offset,
        back,
        len as u64,
        regs::DIR_VRAM_TO_RAM,
    );
    assert_eq!(status, regs::STATUS_DONE);
    assert_eq!(ram_bytes(&ram, (2 << 20) + 3, len), pattern);
    // Nothing around the copy was touched.
    assert_eq!(ram_bytes(&ram, (2 << 20) + 2, 1), [0]);
    assert_eq!(ram_bytes(&ram, (2 << 20) + 3 + len as u64, 1), [0]);
    assert_eq!(read32(&mut client, regs::DMA_COMPLETIONS), 2);
    assert_eq!(read32(&mut client, regs::DMA_ERRORS), 0);
    // The engine timed the copy on its own clock.
    let ns = u64::from(read32(&mut client, regs::DMA_LAST_NS_LO))
        | u64::from(read32(&mut client, regs::DMA_LAST_NS_HI)) << 32;
    assert!(ns > 0, "DMA_LAST_NS is 0 after a transfer");
}

#[test]
fn completion_raises_the_selected_vector_once_per_transfer() {
    let device = DeviceProcess::start(&["--msix-vectors", "4"]);
    let mut client = device.connect();
    let _ram = guest_ram(&mut client);
    let fds = msix_eventfds(&mut client, 4);
    write32(&mut client, regs::IRQ_VECTOR, 2);

    // Disabled: the transfer completes silently.
    let status = dma(&mut client, RAM_IOVA, 0, 4096, regs::DIR_RAM_TO_VRAM);
    assert_eq!(status, regs::STATUS_DONE);
    assert_eq!(signals(&fds[2]), 0);

    write32(&mut client, regs::IRQ_ENABLE, regs::IRQ_DMA);
    for _ in 0..3 {
        let status = dma(&mut client, 0, RAM_IOVA, 4096, regs::DIR_VRAM_TO_RAM);
        assert_eq!(status, regs::STATUS_DONE);
    }
    wait_irq_count(&mut client, 3);
    assert_eq!(signals(&fds[2]), 3);
    assert_eq!(read32(&mut client, regs::IRQ_COUNT), 3);
    for other in [0, 1, 3] {
        assert_eq!(signals(&fds[other]), 0, "vector {other}");
    }
    assert_eq!(read32(&mut client, regs::DMA_COMPLETIONS), 4);
}

/// More vectors than the 16 fds the unpatched server could receive in one message: all of
/// them are taken, and a completion on a high vector reaches its eventfd.
#[test]
fn set_irqs_with_more_than_16_vectors_is_taken_whole() {
    let device = DeviceProcess::start(&["--msix-vectors", "64"]);
    let mut client = device.connect();
    let _ram = guest_ram(&mut client);
    let fds = msix_eventfds(&mut client, 64);
    write32(&mut client, regs::IRQ_VECTOR, 40);
    write32(&mut client, regs::IRQ_ENABLE, regs::IRQ_DMA);
    let status = dma(&mut client, 0, RAM_IOVA, 4096, regs::DIR_VRAM_TO_RAM);
    assert_eq!(status, regs::STATUS_DONE);
    wait_irq_count(&mut client, 1);
    assert_eq!(signals(&fds[40]), 1);
}

#[test]
fn dma_to_an_unmapped_iova_sets_an_error_status() {
    let device = DeviceProcess::start(&[]);
    let mut client = device.connect();
    let _ram = guest_ram(&mut client);
    let fds = msix_eventfds(&mut client, 1);
    write32(&mut client, regs::IRQ_ENABLE, regs::IRQ_DMA);

    // Entirely outside, and running off the end of the mapped region.
    let outside = dma(&mut client, 0, 0x1000, 4096, regs::DIR_VRAM_TO_RAM);
    assert_eq!(outside, regs::STATUS_ERR_UNMAPPED);
    let straddling = dma(
        &mut client,
        RAM_IOVA + RAM_SIZE - 4096,
        0,
        8192,
        regs::DIR_RAM_TO_VRAM,
    );
    assert_eq!(straddling, regs::STATUS_ERR_UNMAPPED);
    let past_vram = dma(&mut client, RAM_IOVA, 1 << 30, 1, regs::DIR_RAM_TO_VRAM);
    assert_eq!(past_vram, regs::STATUS_ERR_VRAM_RANGE);
    assert_eq!(read32(&mut client, regs::DMA_ERRORS), 3);

    // The device lives on: a good transfer still works, and errors interrupted too.
    assert_eq!(
        dma(&mut client, RAM_IOVA, 0, 64, regs::DIR_RAM_TO_VRAM),
        regs::STATUS_DONE
    );
    wait_irq_count(&mut client, 4);
    assert_eq!(signals(&fds[0]), 4);

    // After DMA_UNMAP the same IOVA is unmapped.
    client.dma_unmap(RAM_IOVA, RAM_SIZE).expect("DMA_UNMAP");
    assert_eq!(
        dma(&mut client, RAM_IOVA, 0, 64, regs::DIR_RAM_TO_VRAM),
        regs::STATUS_ERR_UNMAPPED
    );
}

#[test]
fn page_writer_touches_exactly_the_chosen_pages() {
    let device = DeviceProcess::start(&[]);
    let mut client = device.connect();
    let ram = guest_ram(&mut client);
    let fds = msix_eventfds(&mut client, 1);
    write32(&mut client, regs::IRQ_ENABLE, regs::IRQ_PAGE_WRITER);

    // Pages 10, 13, 16, 19 of a 10-page window from page 10, each written twice.
    write64(
        &mut client,
        regs::PW_BASE_LO,
        RAM_IOVA + 10 * pci::PAGE_SIZE,
    );
    write32(&mut client, regs::PW_PAGES, 10);
    write32(&mut client, regs::PW_STRIDE, 3);
    write32(&mut client, regs::PW_LIMIT, 8);
    write32(&mut client, regs::PW_CTRL, regs::CTRL_START);
    assert_eq!(
        wait_not_busy(&mut client, regs::PW_STATUS),
        regs::STATUS_DONE
    );
    assert_eq!(read32(&mut client, regs::PW_WRITTEN_LO), 8);

    let pages = RAM_SIZE / pci::PAGE_SIZE;
    let touched: Vec<u64> = (0..pages)
        .filter(|page| {
            ram_bytes(&ram, page * pci::PAGE_SIZE, pci::PAGE_SIZE as usize)
                .iter()
                .any(|&b| b != 0)
        })
        .collect();
    assert_eq!(touched, vec![10, 13, 16, 19]);
    // Second round: sequence numbers 5..8, with the magic.
    for (i, page) in touched.iter().enumerate() {
        let stamp = ram_bytes(&ram, page * pci::PAGE_SIZE, 16);
        assert_eq!(stamp[..8], (i as u64 + 5).to_le_bytes());
        assert_eq!(stamp[8..], regs::PW_MAGIC.to_le_bytes());
    }
    wait_irq_count(&mut client, 1);
    assert_eq!(signals(&fds[0]), 1, "one interrupt at the limit");
}

#[test]
fn page_writer_keeps_its_rate_and_stops_on_request() {
    let device = DeviceProcess::start(&[]);
    let mut client = device.connect();
    let _ram = guest_ram(&mut client);
    write64(&mut client, regs::PW_BASE_LO, RAM_IOVA);
    write32(&mut client, regs::PW_PAGES, 64);
    write32(&mut client, regs::PW_RATE, 200);
    let started = Instant::now();
    write32(&mut client, regs::PW_CTRL, regs::CTRL_START);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(read32(&mut client, regs::PW_CTRL), 1, "running");
    write32(&mut client, regs::PW_CTRL, regs::CTRL_STOP);
    let elapsed = started.elapsed().as_secs_f64();
    let written = read32(&mut client, regs::PW_WRITTEN_LO);
    // Never faster than asked (one write is due at time 0).
    assert!(
        f64::from(written) <= 200.0 * elapsed + 1.0,
        "{written} in {elapsed}s"
    );
    assert!(written >= 10, "only {written} in {elapsed}s");
    assert_eq!(read32(&mut client, regs::PW_STATUS), regs::STATUS_DONE);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(read32(&mut client, regs::PW_WRITTEN_LO), written, "stopped");
}

#[test]
fn page_writer_past_the_mapping_reports_unmapped() {
    let device = DeviceProcess::start(&[]);
    let mut client = device.connect();
    let _ram = guest_ram(&mut client);
    let last = RAM_SIZE / pci::PAGE_SIZE - 2;
    write64(
        &mut client,
        regs::PW_BASE_LO,
        RAM_IOVA + last * pci::PAGE_SIZE,
    );
    write32(&mut client, regs::PW_PAGES, 4);
    write32(&mut client, regs::PW_CTRL, regs::CTRL_START);
    assert_eq!(
        wait_not_busy(&mut client, regs::PW_STATUS),
        regs::STATUS_ERR_UNMAPPED
    );
    assert_eq!(read32(&mut client, regs::PW_WRITTEN_LO), 2);
}

/// A window whose pages run past 2^64 (guest-chosen base) ends invalid, without a panic in
/// the engine, and the device goes on serving.
#[test]
fn page_writer_window_past_2_64_is_invalid() {
    let device = DeviceProcess::start(&[]);
    let mut client = device.connect();
    let _ram = guest_ram(&mut client);
    write64(&mut client, regs::PW_BASE_LO, 0xffff_ffff_ffff_f000);
    write32(&mut client, regs::PW_PAGES, 4);
    write32(&mut client, regs::PW_CTRL, regs::CTRL_START);
    // The first page is at the base itself (unmapped); stride 2 puts the next past 2^64.
    assert_eq!(
        wait_not_busy(&mut client, regs::PW_STATUS),
        regs::STATUS_ERR_UNMAPPED
    );
    write32(&mut client, regs::PW_STRIDE, 1);
    write64(&mut client, regs::PW_BASE_LO, 0xffff_ffff_ffff_f000);
    write32(&mut client, regs::PW_CTRL, regs::CTRL_START);
    let st = wait_not_busy(&mut client, regs::PW_STATUS);
    assert!(
        st == regs::STATUS_ERR_UNMAPPED || st == regs::STATUS_ERR_INVALID,
        "{st:#x}"
    );
    assert_eq!(read32(&mut client, regs::ID), regs::ID_VALUE);
}

#[test]
fn kernel_fills_vram_seen_through_the_mapping() {
    let device = DeviceProcess::start(&["--vram-size", "16M"]);
    let mut client = device.connect();
    let fds = msix_eventfds(&mut client, 1);
    write32(&mut client, regs::IRQ_ENABLE, regs::IRQ_KERNEL);
    let vram = client.region(VFIO_PCI_BAR1_REGION_INDEX).expect("VRAM");
    let file_offset = vram.file_offset.as_ref().expect("VRAM fd");
    let mapped = map(file_offset.file(), file_offset.start(), vram.size);

    write64(&mut client, regs::K_OFFSET_LO, 1 << 20);
    write64(&mut client, regs::K_LEN_LO, 3 << 20);
    write32(&mut client, regs::K_PATTERN, 0xcafe_f00d);
    write32(&mut client, regs::K_CTRL, regs::CTRL_ONCE);
    assert_eq!(
        wait_not_busy(&mut client, regs::K_STATUS),
        regs::STATUS_DONE
    );
    assert_eq!(read32(&mut client, regs::K_PASSES), 1);

    let mut words = vec![0u8; 4 << 20];
    mapped
        .get_slice(0, 4 << 20)
        .expect("slice")
        .copy_to(&mut words[..]);
    let word =
        |at: usize| u32::from_le_bytes([words[at], words[at + 1], words[at + 2], words[at + 3]]);
    assert_eq!(word((1 << 20) - 4), 0, "before the range");
    assert_eq!(word(1 << 20), 0xcafe_f00d);
    assert_eq!(word((4 << 20) - 4), 0xcafe_f00d);
    assert!((1 << 20..4 << 20)
        .step_by(4)
        .all(|at| word(at) == 0xcafe_f00d));
    wait_irq_count(&mut client, 1);
    assert_eq!(signals(&fds[0]), 1);

    // Running continuously, it picks up a new pattern at its next pass.
    write32(&mut client, regs::K_CTRL, regs::CTRL_START);
    write32(&mut client, regs::K_PATTERN, 0x1234_5678);
    let deadline = Instant::now() + Duration::from_secs(10);
    while read32(&mut client, regs::K_PASSES) < 3 {
        assert!(Instant::now() < deadline, "kernel passes");
        std::thread::sleep(Duration::from_millis(5));
    }
    write32(&mut client, regs::K_CTRL, regs::CTRL_STOP);
    assert_eq!(read32(&mut client, regs::K_CTRL), 0);
    let mut sample = [0u8; 4];
    mapped
        .get_slice((2 << 20) + 8, 4)
        .expect("slice")
        .copy_to(&mut sample[..]);
    assert_eq!(u32::from_le_bytes(sample), 0x1234_5678);
}

#[test]
fn error_replies_are_surfaced_and_the_session_goes_on() {
    let device = DeviceProcess::start(&[]);
    let mut client = device.connect();
    let ram = guest_ram(&mut client);

    // A register access that is not an aligned word.
    let mut odd = [0; 3];
    let error = client
        .region_read(VFIO_PCI_BAR0_REGION_INDEX, regs::SCRATCH, &mut odd)
        .expect_err("3-byte register read");
    assert!(
        matches!(error, Error::ErrorReply { errno, .. } if errno == libc::EINVAL as u32),
        "{error:?}"
    );
    // Past the end of config space, and of VRAM.
    let error = client
        .region_write(VFIO_PCI_CONFIG_REGION_INDEX, 254, &[0; 4])
        .expect_err("config write past the end");
    assert!(matches!(error, Error::ErrorReply { .. }), "{error:?}");
    // Overlapping DMA_MAP.
    let error = client
        .dma_map(0, RAM_IOVA + 4096, 4096, ram.file.as_raw_fd())
        .expect_err("overlapping DMA_MAP");
    assert!(
        matches!(error, Error::ErrorReply { errno, .. } if errno == libc::EEXIST as u32),
        "{error:?}"
    );
    // A region larger than its file: touching the rest would be SIGBUS in the device.
    let small = memfd(4096);
    let error = client
        .dma_map(0, 0x3_0000_0000, 1 << 30, small.as_raw_fd())
        .expect_err("DMA_MAP past the end of its file");
    assert!(
        matches!(error, Error::ErrorReply { errno, .. } if errno == libc::EINVAL as u32),
        "{error:?}"
    );
    // SET_IRQS for more vectors than the table has.
    let error = client
        .set_irqs(
            VFIO_PCI_MSIX_IRQ_INDEX,
            VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
            0,
            1000,
            &[],
        )
        .expect_err("SET_IRQS beyond the table");
    assert!(matches!(error, Error::ErrorReply { .. }), "{error:?}");

    // Every reply stayed in step: the next commands work.
    write32(&mut client, regs::SCRATCH, 7);
    assert_eq!(read32(&mut client, regs::SCRATCH), 7);
    client.reset().expect("reset");
    assert_eq!(
        read32(&mut client, regs::SCRATCH),
        0,
        "reset clears registers"
    );
}

#[test]
fn a_transfer_spans_contiguous_dma_regions() {
    let device = DeviceProcess::start(&["--vram-size", "16M"]);
    let mut client = device.connect();
    // Two separate files, back to back in IOVA: as two guest RAM slots.
    let base = 0x2_0000_0000;
    let (first, second) = (memfd(1 << 20), memfd(1 << 20));
    client
        .dma_map(0, base, 1 << 20, first.as_raw_fd())
        .expect("DMA_MAP first");
    client
        .dma_map(0, base + (1 << 20), 1 << 20, second.as_raw_fd())
        .expect("DMA_MAP second");
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8).collect();
    client
        .region_write(VFIO_PCI_BAR1_REGION_INDEX, 0, &pattern)
        .expect("VRAM write");

    let at = base + (1 << 20) - 4096;
    let status = dma(&mut client, 0, at, 8192, regs::DIR_VRAM_TO_RAM);
    assert_eq!(status, regs::STATUS_DONE);
    let mut tail = vec![0; 4096];
    map(&first, 0, 1 << 20)
        .get_slice((1 << 20) - 4096, 4096)
        .expect("slice")
        .copy_to(&mut tail[..]);
    let mut head = vec![0; 4096];
    map(&second, 0, 1 << 20)
        .get_slice(0, 4096)
        .expect("slice")
        .copy_to(&mut head[..]);
    assert_eq!(tail, pattern[..4096]);
    assert_eq!(head, pattern[4096..]);
}
