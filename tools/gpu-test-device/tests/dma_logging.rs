//! DMA logging over vfio-user (DEVICE_FEATURE DMA_LOGGING_START/STOP/REPORT): the guest-RAM
//! pages the DMA engine and the page writer write inside a logged range are reported, once;
//! writes elsewhere are not; bad requests get an errno and the connection goes on.

mod common;

use common::*;
use gpu_test_device::regs;
use vfio_user::{Client, DmaLoggingRange, Error, MAX_DMA_LOGGING_BITMAP};

const PAGE: u64 = 4096;

fn range(iova: u64, length: u64) -> DmaLoggingRange {
    DmaLoggingRange { iova, length }
}

/// The page numbers whose bits are set.
fn pages(bitmap: &[u8]) -> Vec<u64> {
    (0..bitmap.len() as u64 * 8)
        .filter(|&n| bitmap[(n / 8) as usize] & (1 << (n % 8)) != 0)
        .collect()
}

/// Runs the page writer over `pages` pages from `base`, every `stride`th, `limit` writes.
fn page_writer(client: &mut Client, base: u64, pages: u32, stride: u32, limit: u32) {
    write64(client, regs::PW_BASE_LO, base);
    write32(client, regs::PW_PAGES, pages);
    write32(client, regs::PW_STRIDE, stride);
    write32(client, regs::PW_RATE, 0);
    write32(client, regs::PW_LIMIT, limit);
    write32(client, regs::PW_CTRL, regs::CTRL_START);
    assert_eq!(
        wait_not_busy(client, regs::PW_STATUS),
        regs::STATUS_DONE,
        "page writer"
    );
}

fn errno(result: Result<impl std::fmt::Debug, Error>) -> u32 {
    match result {
        Err(Error::ErrorReply { errno, .. }) => errno,
        other => panic!("expected an error reply, got {other:?}"),
    }
}

#[test]
fn exactly_the_written_pages_are_reported_then_cleared() {
    let device = DeviceProcess::start(&[]);
    let mut client = device.connect();
    let _ram = guest_ram(&mut client);
    assert!(client.dma_logging_probe().expect("probe"));
    let window = 1 << 20;
    let chosen = client
        .dma_logging_start(PAGE, &[range(RAM_IOVA, window)])
        .expect("start");
    assert_eq!(chosen, PAGE);

    // Page writer: pages 2, 5, 8, 11 (10 pages from page 2, every third, 4 writes).
    page_writer(&mut client, RAM_IOVA + 2 * PAGE, 10, 3, 4);
    // DMA VRAM->RAM of two pages from inside page 20: pages 20, 21, 22.
    let to_ram = dma(
        &mut client,
        0,
        RAM_IOVA + 20 * PAGE + 100,
        2 * PAGE,
        regs::DIR_VRAM_TO_RAM,
    );
    assert_eq!(to_ram, regs::STATUS_DONE);
    // DMA RAM->VRAM reads guest RAM: not a write, not logged.
    let from_ram = dma(
        &mut client,
        RAM_IOVA + 40 * PAGE,
        0,
        PAGE,
        regs::DIR_RAM_TO_VRAM,
    );
    assert_eq!(from_ram, regs::STATUS_DONE);

    let bitmap = client
        .dma_logging_report(RAM_IOVA, window, PAGE)
        .expect("report");
    assert_eq!(bitmap.len(), (window / PAGE / 8) as usize);
    assert_eq!(pages(&bitmap), vec![2, 5, 8, 11, 20, 21, 22]);

    let again = client
        .dma_logging_report(RAM_IOVA, window, PAGE)
        .expect("second report");
    assert!(pages(&again).is_empty(), "reported bits are cleared");

    // A coarser report page merges: 8 KiB pages 10 and 11 hold 4 KiB pages 20..=22.
    let to_ram = dma(
        &mut client,
        0,
        RAM_IOVA + 20 * PAGE,
        3 * PAGE,
        regs::DIR_VRAM_TO_RAM,
    );
    assert_eq!(to_ram, regs::STATUS_DONE);
    let coarse = client
        .dma_logging_report(RAM_IOVA, window, 2 * PAGE)
        .expect("8 KiB report");
    assert_eq!(pages(&coarse), vec![10, 11]);
}

#[test]
fn writes_outside_the_logged_range_are_not_reported() {
    let device = DeviceProcess::start(&[]);
    let mut client = device.connect();
    let _ram = guest_ram(&mut client);
    let logged = range(RAM_IOVA + (1 << 20), 1 << 20);
    client.dma_logging_start(PAGE, &[logged]).expect("start");

    let below = dma(&mut client, 0, RAM_IOVA, 4 * PAGE, regs::DIR_VRAM_TO_RAM);
    assert_eq!(below, regs::STATUS_DONE);
    page_writer(&mut client, RAM_IOVA + (2 << 20), 16, 1, 16);
    let report = client
        .dma_logging_report(logged.iova, logged.length, PAGE)
        .expect("report");
    assert!(pages(&report).is_empty(), "{:?}", pages(&report));

    // A transfer straddling the range's start: only its pages inside are reported.
    let straddle = dma(
        &mut client,
        0,
        logged.iova - PAGE,
        2 * PAGE,
        regs::DIR_VRAM_TO_RAM,
    );
    assert_eq!(straddle, regs::STATUS_DONE);
    let report = client
        .dma_logging_report(logged.iova, logged.length, PAGE)
        .expect("report");
    assert_eq!(pages(&report), vec![0]);
}

#[test]
fn report_after_stop_is_refused_and_logging_restarts() {
    let device = DeviceProcess::start(&[]);
    let mut client = device.connect();
    let _ram = guest_ram(&mut client);
    let logged = range(RAM_IOVA, 1 << 20);
    client.dma_logging_start(PAGE, &[logged]).expect("start");
    page_writer(&mut client, RAM_IOVA, 1, 1, 1);
    client.dma_logging_stop().expect("stop");
    let report = client.dma_logging_report(logged.iova, logged.length, PAGE);
    assert_eq!(errno(report), libc::EINVAL as u32);
    client.dma_logging_stop().expect("stopping again is fine");

    // Restarted, the log begins empty: the write before the stop is gone.
    client.dma_logging_start(PAGE, &[logged]).expect("restart");
    let report = client
        .dma_logging_report(logged.iova, logged.length, PAGE)
        .expect("report");
    assert!(pages(&report).is_empty());
}

#[test]
fn bad_requests_are_refused_and_the_connection_still_serves() {
    let device = DeviceProcess::start(&[]);
    let mut client = device.connect();
    let _ram = guest_ram(&mut client);
    let einval = libc::EINVAL as u32;
    let logged = range(RAM_IOVA, 1 << 20);

    // Before any start, a report has nothing to report from.
    assert_eq!(
        errno(client.dma_logging_report(RAM_IOVA, PAGE, PAGE)),
        einval
    );
    // Page sizes: under 4 KiB, not a power of two.
    for page_size in [0, 0x800, 0x3000] {
        let start = client.dma_logging_start(page_size, &[logged]);
        assert_eq!(errno(start), einval, "page size {page_size:#x}");
    }
    let bad_ranges: [&[DmaLoggingRange]; 5] = [
        &[],
        &[range(RAM_IOVA, 0)],
        &[range(RAM_IOVA + 0x800, PAGE)],
        &[range(RAM_IOVA, 2 * PAGE), range(RAM_IOVA + PAGE, PAGE)],
        // 2^24 + 1 pages: over the device's bound on the bits it keeps.
        &[range(0, ((1 << 24) + 1) * PAGE)],
    ];
    for ranges in bad_ranges {
        let start = client.dma_logging_start(PAGE, ranges);
        assert_eq!(errno(start), einval, "ranges {ranges:?}");
    }

    client.dma_logging_start(PAGE, &[logged]).expect("start");
    let twice = client.dma_logging_start(PAGE, &[logged]);
    assert_eq!(errno(twice), libc::EBUSY as u32);
    let windows = [
        (RAM_IOVA - PAGE, 2 * PAGE, PAGE),  // starts before the range
        (RAM_IOVA + (1 << 20), PAGE, PAGE), // after it
        (RAM_IOVA + 0x800, PAGE, PAGE),     // unaligned
        (RAM_IOVA, 0, PAGE),                // empty
        (RAM_IOVA, PAGE, 0x3000),           // page size not a power of two
        (RAM_IOVA, PAGE, 0x800),            // page size under 4 KiB
    ];
    for (iova, length, page_size) in windows {
        let report = client.dma_logging_report(iova, length, page_size);
        assert_eq!(
            errno(report),
            einval,
            "window {iova:#x}+{length:#x}/{page_size:#x}"
        );
    }
    // Bitmaps the client will not ask for: page size 0, over the bound.
    let over = (MAX_DMA_LOGGING_BITMAP as u64 * 8 + 1) * PAGE;
    for (length, page_size) in [(PAGE, 0), (over, PAGE)] {
        assert!(matches!(
            client.dma_logging_report(RAM_IOVA, length, page_size),
            Err(Error::InvalidInput)
        ));
    }

    // Still in step: registers answer and logging works.
    assert_eq!(read32(&mut client, regs::ID), regs::ID_VALUE);
    page_writer(&mut client, RAM_IOVA + 3 * PAGE, 1, 1, 1);
    let report = client
        .dma_logging_report(logged.iova, logged.length, PAGE)
        .expect("report");
    assert_eq!(pages(&report), vec![3]);
}

#[test]
fn logging_ends_with_the_client() {
    let device = DeviceProcess::start(&[]);
    {
        let mut client = device.connect();
        let _ram = guest_ram(&mut client);
        client
            .dma_logging_start(PAGE, &[range(RAM_IOVA, 1 << 20)])
            .expect("start");
    }
    let mut client = device.connect();
    let _ram = guest_ram(&mut client);
    let report = client.dma_logging_report(RAM_IOVA, 1 << 20, PAGE);
    assert_eq!(
        errno(report),
        libc::EINVAL as u32,
        "not started for this client"
    );
}
