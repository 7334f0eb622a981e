//! Migration v2 over vfio-user: one device's state moves to a second device while its engines
//! run and the CPU writes its VRAM mmap; the second continues exactly where the first stopped.
//! Broken streams and invalid transitions are refused with an errno, without a panic.

mod common;

use std::time::{Duration, Instant};

use common::*;
use gpu_test_device::regs;
use vfio_bindings::bindings::vfio::*;
use vfio_user::{Client, Error, MAX_MIG_DATA_CHUNK};
use vm_memory::MmapRegion;

const STOP: u32 = vfio_device_mig_state_VFIO_DEVICE_STATE_STOP;
const RUNNING: u32 = vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING;
const STOP_COPY: u32 = vfio_device_mig_state_VFIO_DEVICE_STATE_STOP_COPY;
const RESUMING: u32 = vfio_device_mig_state_VFIO_DEVICE_STATE_RESUMING;
const PRE_COPY: u32 = vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY;
const ERROR: u32 = vfio_device_mig_state_VFIO_DEVICE_STATE_ERROR;

const PAGE: usize = 4096;
const VRAM: &str = "64M";
const PW_PAGES: u32 = 64;

fn errno(result: Result<impl std::fmt::Debug, Error>) -> i32 {
    match result {
        Err(Error::ErrorReply { errno, .. }) => errno as i32,
        other => panic!("expected an error reply, got {other:?}"),
    }
}

fn vram_map(client: &Client) -> MmapRegion<()> {
    let vram = client.region(VFIO_PCI_BAR1_REGION_INDEX).expect("VRAM");
    let file_offset = vram.file_offset.as_ref().expect("VRAM fd");
    map(file_offset.file(), file_offset.start(), vram.size)
}

#[allow(clippy::mut_from_ref)]
fn bytes(map: &MmapRegion<()>) -> &mut [u8] {
    // SAFETY: the mapping is shared memory that lives as long as the borrow; like the device
    // process writing it concurrently, these tests see it as plain bytes whose values change.
    unsafe { std::slice::from_raw_parts_mut(map.as_ptr(), map.size()) }
}

/// Reads until a short reply: one PRE_COPY round, or the rest of STOP_COPY.
fn read_round(client: &mut Client) -> Vec<u8> {
    let mut stream = Vec::new();
    loop {
        let chunk = client
            .mig_data_read(MAX_MIG_DATA_CHUNK as u32)
            .expect("MIG_DATA_READ");
        stream.extend_from_slice(&chunk);
        if chunk.len() < MAX_MIG_DATA_CHUNK {
            return stream;
        }
    }
}

/// Writes `stream` in pieces of `piece` bytes (records split anywhere).
fn write_all(client: &mut Client, stream: &[u8], piece: usize) -> Result<(), Error> {
    for chunk in stream.chunks(piece) {
        client.mig_data_write(chunk)?;
    }
    Ok(())
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn read64(client: &mut Client, offset: u64) -> u64 {
    u64::from(read32(client, offset)) | u64::from(read32(client, offset + 4)) << 32
}

/// The registers a migration must carry, by offset.
fn registers(client: &mut Client) -> Vec<(u64, u32)> {
    let offsets = [
        regs::SCRATCH,
        regs::IRQ_ENABLE,
        regs::IRQ_VECTOR,
        regs::PW_BASE_LO,
        regs::PW_PAGES,
        regs::PW_RATE,
        regs::PW_STATUS,
        regs::PW_WRITTEN_LO,
        regs::K_OFFSET_LO,
        regs::K_LEN_LO,
        regs::K_PATTERN,
        regs::K_STATUS,
        regs::K_PASSES,
        regs::DMA_COMPLETIONS,
    ];
    offsets.iter().map(|&o| (o, read32(client, o))).collect()
}

#[test]
fn running_engines_and_vram_move_to_a_second_device() {
    let source = DeviceProcess::start(&["--vram-size", VRAM]);
    let mut src = source.connect();
    assert_eq!(
        src.migration_flags().expect("flags"),
        Some(u64::from(
            VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY
        ))
    );
    assert_eq!(src.mig_state().expect("state"), RUNNING);
    let src_ram = guest_ram(&mut src);
    let src_vram = vram_map(&src);
    let vram = bytes(&src_vram);

    // CPU writes through the mmap (invisible to the device), a vfio-user write, a DMA.
    for (i, byte) in vram[100 * PAGE..110 * PAGE].iter_mut().enumerate() {
        *byte = (i % 251) as u8 + 1;
    }
    src.region_write(VFIO_PCI_BAR1_REGION_INDEX, 5 << 20, b"through the socket")
        .expect("VRAM write");
    bytes(&src_ram.map)[..PAGE].fill(0x5a);
    let status = dma(
        &mut src,
        RAM_IOVA,
        6 << 20,
        PAGE as u64,
        regs::DIR_RAM_TO_VRAM,
    );
    assert_eq!(status, regs::STATUS_DONE);
    write32(&mut src, regs::SCRATCH, 0xabcd_0123);
    src.region_write(VFIO_PCI_CONFIG_REGION_INDEX, 4, &[0x06, 0])
        .expect("command register");

    // The kernel fills 1 MiB pass after pass; the page writer stamps 64 pages at a rate.
    write64(&mut src, regs::K_OFFSET_LO, 32 << 20);
    write64(&mut src, regs::K_LEN_LO, 1 << 20);
    write32(&mut src, regs::K_PATTERN, 0x1122_3344);
    write32(&mut src, regs::K_CTRL, regs::CTRL_START);
    write64(&mut src, regs::PW_BASE_LO, RAM_IOVA);
    write32(&mut src, regs::PW_PAGES, PW_PAGES);
    write32(&mut src, regs::PW_STRIDE, 1);
    write32(&mut src, regs::PW_RATE, 5000);
    write32(&mut src, regs::PW_LIMIT, 0);
    write32(&mut src, regs::PW_CTRL, regs::CTRL_START);
    wait_for("page writes", || {
        read64(&mut src, regs::PW_WRITTEN_LO) > 100
    });

    src.set_mig_state(PRE_COPY).expect("PRE_COPY");
    let mut stream = read_round(&mut src);
    assert!(
        stream.len() > 11 * PAGE,
        "first round sends the written pages"
    );
    assert!(stream.len() < 8 << 20, "zero pages go as compact records");
    // Changes after the first round: a CPU write, a new kernel pattern.
    vram[200 * PAGE + 7] = 0x77;
    write32(&mut src, regs::K_PATTERN, 0x5566_7788);
    wait_for("a kernel pass", || read32(&mut src, regs::K_PASSES) > 2);
    let second = read_round(&mut src);
    assert!(
        second.len() > 1 << 20,
        "the kernel's range and the CPU write are resent"
    );
    stream.extend_from_slice(&second);
    // Only the digests can see these: written after the last PRE_COPY read.
    vram[300 * PAGE + 9] = 0x99;
    vram[105 * PAGE] ^= 0xff;
    assert!(src.mig_data_size().expect("size").expect("supported") > 0);

    src.set_mig_state(STOP_COPY).expect("STOP_COPY");
    let written = read64(&mut src, regs::PW_WRITTEN_LO);
    let passes = read32(&mut src, regs::K_PASSES);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(read64(&mut src, regs::PW_WRITTEN_LO), written, "stopped");
    assert_eq!(read32(&mut src, regs::K_PASSES), passes, "stopped");
    stream.extend_from_slice(&read_round(&mut src));
    assert!(src.mig_data_read(4096).expect("read at the end").is_empty());
    let src_regs = registers(&mut src);
    let src_config = config_read(&mut src, 0, 256);
    src.set_mig_state(STOP).expect("STOP");

    // The destination: guest RAM copied as the VMM would, then the stream in odd pieces.
    let target = DeviceProcess::start(&["--vram-size", VRAM]);
    let mut dst = target.connect();
    let dst_ram = guest_ram(&mut dst);
    bytes(&dst_ram.map).copy_from_slice(bytes(&src_ram.map));
    dst.set_mig_state(RESUMING).expect("RUNNING -> RESUMING");
    write_all(&mut dst, &stream, 7777).expect("stream");
    dst.set_mig_state(STOP).expect("RESUMING -> STOP");
    let dst_vram = vram_map(&dst);
    assert!(bytes(&dst_vram) == bytes(&src_vram), "VRAM differs");
    assert_eq!(registers(&mut dst), src_regs);
    assert_eq!(config_read(&mut dst, 0, 256), src_config);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(
        read64(&mut dst, regs::PW_WRITTEN_LO),
        written,
        "still stopped"
    );

    dst.set_mig_state(RUNNING).expect("RUNNING");
    wait_for("page writes on the destination", || {
        read64(&mut dst, regs::PW_WRITTEN_LO) > written + 2 * u64::from(PW_PAGES)
    });
    wait_for("kernel passes on the destination", || {
        read32(&mut dst, regs::K_PASSES) > passes + 1
    });
    write32(&mut dst, regs::PW_CTRL, regs::CTRL_STOP);
    let last = read64(&mut dst, regs::PW_WRITTEN_LO);
    // Every page holds the latest stamp it should: the sequence went on without a restart.
    let ram = bytes(&dst_ram.map);
    for page in 0..u64::from(PW_PAGES) {
        let at = page as usize * PAGE;
        let seq = u64::from_le_bytes(ram[at..at + 8].try_into().expect("8 bytes"));
        let magic = u64::from_le_bytes(ram[at + 8..at + 16].try_into().expect("8 bytes"));
        let expected = last - (last - 1 - page) % u64::from(PW_PAGES);
        assert_eq!((seq, magic), (expected, regs::PW_MAGIC), "page {page}");
    }
    let kernel = &bytes(&dst_vram)[32 << 20..33 << 20];
    assert!(kernel
        .chunks_exact(4)
        .all(|w| w == 0x5566_7788u32.to_le_bytes()));
}

/// A valid stream of a small idle device, and the device it came from.
fn small_stream(vram: &str) -> Vec<u8> {
    let device = DeviceProcess::start(&["--vram-size", vram]);
    let mut client = device.connect();
    client
        .region_write(VFIO_PCI_BAR1_REGION_INDEX, 8192, &[1; 100])
        .expect("VRAM write");
    client
        .set_mig_state(STOP_COPY)
        .expect("RUNNING -> STOP_COPY");
    let stream = read_round(&mut client);
    assert_eq!(client.mig_state().expect("state"), STOP_COPY);
    stream
}

fn record(kind: u32, payload: &[u8]) -> Vec<u8> {
    [
        &kind.to_le_bytes()[..],
        &(payload.len() as u32).to_le_bytes(),
        payload,
    ]
    .concat()
}

#[test]
fn malformed_streams_are_refused_and_the_device_goes_on() {
    let good = small_stream("1M");
    let header = &good[..8 + 32];
    let vram_size = 1u64 << 20;
    let mut bad_magic = good.clone();
    bad_magic[8] ^= 1;
    let outside = [&vram_size.to_le_bytes()[..], &1u64.to_le_bytes()].concat();
    let overflow = [&4096u64.to_le_bytes()[..], &u64::MAX.to_le_bytes()].concat();
    let huge_data = [&0u64.to_le_bytes()[..], &u32::MAX.to_le_bytes(), &[0; 4]].concat();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", good[..good.len() - 4].to_vec()),
        ("no end", good[..good.len() - 8].to_vec()),
        ("bad magic", bad_magic),
        ("no header", good[40..].to_vec()),
        ("offset past VRAM", [header, &record(3, &outside)].concat()),
        (
            "count overflowing",
            [header, &record(3, &overflow)].concat(),
        ),
        ("huge data count", [header, &record(2, &huge_data)].concat()),
        (
            "huge record",
            [header, &(2u32.to_le_bytes()), &u32::MAX.to_le_bytes()].concat(),
        ),
        ("unknown kind", [header, &record(99, &[])].concat()),
        ("end without state", [header, &record(5, &[])].concat()),
        ("trailing bytes", [&good[..], &[0]].concat()),
        ("other VRAM size", small_stream("2M")),
    ];
    let device = DeviceProcess::start(&["--vram-size", "1M"]);
    let mut client = device.connect();
    for (what, stream) in cases {
        client.set_mig_state(RESUMING).expect("RESUMING");
        let written = write_all(&mut client, &stream, 1000);
        if let Err(e) = written {
            assert_eq!(errno(Err::<(), _>(e)), libc::EINVAL, "{what}");
        }
        assert_eq!(errno(client.set_mig_state(STOP)), libc::EINVAL, "{what}");
        assert_eq!(client.mig_state().expect("state"), ERROR, "{what}");
        assert_eq!(errno(client.set_mig_state(RUNNING)), libc::EINVAL, "{what}");
        client.reset().expect("reset leaves ERROR");
        assert_eq!(client.mig_state().expect("state"), RUNNING, "{what}");
    }
    // The good stream, split at every 13th byte, is taken.
    client.set_mig_state(RESUMING).expect("RESUMING");
    write_all(&mut client, &good, 13).expect("good stream");
    client
        .set_mig_state(RUNNING)
        .expect("RESUMING -> STOP -> RUNNING");
    let mut data = [0; 100];
    client
        .region_read(VFIO_PCI_BAR1_REGION_INDEX, 8192, &mut data)
        .expect("VRAM read");
    assert_eq!(data, [1; 100]);
    assert!(
        device.stderr().contains("migration"),
        "refusals are reported"
    );
}

#[test]
fn invalid_transitions_and_misplaced_data_are_refused() {
    let device = DeviceProcess::start(&["--vram-size", "1M"]);
    let mut client = device.connect();
    for target in [ERROR, 5, 7, 8, 1000] {
        assert_eq!(
            errno(client.set_mig_state(target)),
            libc::EINVAL,
            "{target}"
        );
        assert_eq!(client.mig_state().expect("state"), RUNNING);
    }
    assert_eq!(errno(client.mig_data_read(16)), libc::EINVAL);
    assert_eq!(errno(client.mig_data_write(b"x")), libc::EINVAL);
    client.set_mig_state(STOP).expect("STOP");
    assert_eq!(errno(client.mig_data_read(16)), libc::EINVAL);
    // Registers keep working while stopped.
    write32(&mut client, regs::SCRATCH, 7);
    assert_eq!(read32(&mut client, regs::SCRATCH), 7);
    client.set_mig_state(RESUMING).expect("RESUMING");
    assert_eq!(errno(client.mig_data_read(16)), libc::EINVAL);
    // Shortest path: RESUMING -> STOP (fails: no stream) is not taken silently.
    assert_eq!(errno(client.set_mig_state(PRE_COPY)), libc::EINVAL);
    assert_eq!(client.mig_state().expect("state"), ERROR);
    client.reset().expect("reset");
    client
        .set_mig_state(STOP_COPY)
        .expect("RUNNING -> STOP -> STOP_COPY");
    client
        .set_mig_state(PRE_COPY)
        .expect("STOP_COPY -> STOP -> RUNNING -> PRE_COPY");
    assert_eq!(client.mig_state().expect("state"), PRE_COPY);
    client.set_mig_state(STOP).expect("PRE_COPY -> STOP");
}

#[test]
fn no_migration_answers_enotsup() {
    let device = DeviceProcess::start(&["--vram-size", "1M", "--no-migration"]);
    assert_eq!(device.status["migration"], false);
    let mut client = device.connect();
    assert_eq!(client.migration_flags().expect("flags"), None);
    assert_eq!(client.mig_data_size().expect("size"), None);
    assert_eq!(errno(client.set_mig_state(STOP)), libc::ENOTSUP);
    assert_eq!(errno(client.mig_state()), libc::ENOTSUP);
    assert_eq!(errno(client.mig_data_read(16)), libc::ENOTSUP);
    // DMA logging stays.
    assert!(client.dma_logging_probe().expect("probe"));
}
