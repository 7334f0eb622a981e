//! virtio-blk requests driven end to end: a driver-side queue laid out in guest memory, the
//! device brought up through the virtio-mmio registers, requests kicked through QueueNotify.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_RO, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::*;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::tempfile::TempFile;

use super::{Block, QUEUE_SIZE, SECTOR_SIZE};
use crate::bus::BusDevice;
use crate::interrupt::IrqLine;
use crate::virtio::test_utils::{guest_memory, reg_read, reg_write, Buf, DriverQueue};
use crate::virtio::{MmioTransport, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use crate::GuestMemory;

const DISK_SECTORS: u64 = 64;
const MEM_SIZE: usize = 1 << 20;
const QUEUE_BASE: u64 = 0x1000;
const HEADER: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const SERIAL: &str = "vmm-test-disk";

/// Byte `i` of the disk image.
fn disk_byte(i: u64) -> u8 {
    (i % 251) as u8
}

fn disk_image() -> (File, File) {
    let file = TempFile::new().unwrap().into_file();
    let contents: Vec<u8> = (0..DISK_SECTORS * SECTOR_SIZE).map(disk_byte).collect();
    (&file).write_all(&contents).unwrap();
    let check = file.try_clone().unwrap();
    (file, check)
}

struct Harness {
    mem: GuestMemory,
    t: MmioTransport,
    q: DriverQueue,
    /// Another handle on the image, to look at it with positional reads.
    disk: File,
}

impl Harness {
    fn new(read_only: bool, features: u64, queue_size: u16) -> Self {
        let (file, disk) = disk_image();
        let block = Block::new(file, read_only, SERIAL).unwrap();
        let mem = guest_memory(MEM_SIZE);
        let irq = Arc::new(IrqLine::new(5).unwrap());
        let mut t = MmioTransport::new(Box::new(block), mem.clone(), irq).unwrap();
        let q = DriverQueue::new(&mem, QUEUE_BASE, queue_size);

        let mut status = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
        reg_write(&mut t, VIRTIO_MMIO_STATUS, status);
        reg_write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        reg_write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        reg_write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        reg_write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        status |= VIRTIO_CONFIG_S_FEATURES_OK;
        reg_write(&mut t, VIRTIO_MMIO_STATUS, status);
        assert_eq!(reg_read(&mut t, VIRTIO_MMIO_STATUS), status);

        reg_write(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(
            reg_read(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX),
            u32::from(QUEUE_SIZE)
        );
        reg_write(&mut t, VIRTIO_MMIO_QUEUE_NUM, u32::from(queue_size));
        reg_write(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, q.desc as u32);
        reg_write(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, q.avail as u32);
        reg_write(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, q.used as u32);
        reg_write(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        reg_write(
            &mut t,
            VIRTIO_MMIO_STATUS,
            status | VIRTIO_CONFIG_S_DRIVER_OK,
        );
        assert!(t.is_activated());
        Self { mem, t, q, disk }
    }

    fn default() -> Self {
        Self::new(false, VIRTIO_F_VERSION_1, QUEUE_SIZE)
    }

    fn header(&self, request_type: u32, sector: u64) {
        self.mem
            .write_obj(request_type.to_le(), GuestAddress(HEADER))
            .unwrap();
        self.mem.write_obj(0u32, GuestAddress(HEADER + 4)).unwrap();
        self.mem
            .write_obj(sector.to_le(), GuestAddress(HEADER + 8))
            .unwrap();
        // A status the device must overwrite.
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    fn notify(&mut self) {
        reg_write(&mut self.t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    }

    fn status_byte(&self) -> u32 {
        u32::from(self.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap())
    }

    fn irqs(&self) -> u64 {
        self.t.interrupt().eventfd().unwrap().read().unwrap_or(0)
    }

    fn clear_dirty(&self) {
        for region in self.mem.iter() {
            region.get_mmap().bitmap().reset();
        }
    }

    fn dirty(&self, addr: u64) -> bool {
        let region = self.mem.find_region(GuestAddress(addr)).unwrap();
        region
            .bitmap()
            .dirty_at((addr - region.start_addr().0) as usize)
    }

    fn disk_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.disk.read_exact_at(&mut buf, offset).unwrap();
        buf
    }

    fn guest_bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    /// Submits one request (header already written) and returns (status byte, used length).
    fn submit(&mut self, bufs: &[Buf]) -> (u32, u32) {
        let head = self.q.add_chain(&self.mem, bufs);
        self.kick(head)
    }

    /// Notifies the device of the chain at `head` (already published) and checks it came back.
    fn kick(&mut self, head: u16) -> (u32, u32) {
        let before = self.q.used_idx(&self.mem);
        self.notify();
        assert_eq!(self.q.used_idx(&self.mem), before.wrapping_add(1));
        let (id, len) = self.q.used_elem(&self.mem, before);
        assert_eq!(id, u32::from(head));
        (self.status_byte(), len)
    }
}

#[test]
fn in_request_fills_guest_memory_and_marks_it_dirty() {
    let mut h = Harness::default();
    h.header(VIRTIO_BLK_T_IN, 2);
    let bufs = [
        Buf::ro(HEADER, 16),
        Buf::wo(DATA, 512),
        Buf::wo(DATA + 0x1000, 1024),
        Buf::wo(STATUS, 1),
    ];
    let head = h.q.add_chain(&h.mem, &bufs);
    // Forget the driver's own writes: from here on only the device writes guest memory.
    h.clear_dirty();
    let (status, used_len) = h.kick(head);

    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(used_len, 512 + 1024 + 1);
    let start = 2 * SECTOR_SIZE;
    assert_eq!(h.guest_bytes(DATA, 512), h.disk_bytes(start, 512));
    assert_eq!(
        h.guest_bytes(DATA + 0x1000, 1024),
        h.disk_bytes(start + 512, 1024)
    );
    assert_eq!(
        h.guest_bytes(DATA, 4),
        [4, 5, 6, 7].map(|i| disk_byte(1020 + i))
    );

    // One interrupt, reported as a used-buffer one.
    assert_eq!(h.irqs(), 1);
    assert_eq!(reg_read(&mut h.t, VIRTIO_MMIO_INTERRUPT_STATUS), 1);

    // Every page the device wrote is in vm-memory's dirty bitmap; pages it only read are not.
    assert!(h.dirty(DATA), "first data buffer");
    assert!(h.dirty(DATA + 0x1000), "second data buffer");
    assert!(h.dirty(STATUS), "status byte");
    assert!(h.dirty(h.q.used), "used ring");
    assert!(!h.dirty(HEADER), "header was only read");
    assert!(!h.dirty(DATA + 0x2000), "untouched page");
    assert!(!h.dirty(h.q.desc), "descriptor table was only read");
}

#[test]
fn out_request_writes_guest_data_to_the_disk() {
    let mut h = Harness::default();
    h.header(VIRTIO_BLK_T_OUT, 5);
    let payload: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
    h.mem
        .write_slice(&payload[..512], GuestAddress(DATA))
        .unwrap();
    h.mem
        .write_slice(&payload[512..], GuestAddress(DATA + 0x1000))
        .unwrap();
    let bufs = [
        Buf::ro(HEADER, 16),
        Buf::ro(DATA, 512),
        Buf::ro(DATA + 0x1000, 512),
        Buf::wo(STATUS, 1),
    ];
    let head = h.q.add_chain(&h.mem, &bufs);
    h.clear_dirty();
    let (status, used_len) = h.kick(head);

    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(used_len, 1);
    assert_eq!(h.disk_bytes(5 * SECTOR_SIZE, 1024), payload);
    // The neighbours are untouched.
    assert_eq!(
        h.disk_bytes(4 * SECTOR_SIZE, 512),
        (4 * SECTOR_SIZE..5 * SECTOR_SIZE)
            .map(disk_byte)
            .collect::<Vec<_>>()
    );
    assert_eq!(
        h.disk_bytes(7 * SECTOR_SIZE, 512),
        (7 * SECTOR_SIZE..8 * SECTOR_SIZE)
            .map(disk_byte)
            .collect::<Vec<_>>()
    );
    assert!(!h.dirty(DATA), "the device only read the data");
    assert!(h.dirty(STATUS));
    assert_eq!(h.irqs(), 1);

    // Read it back through the device.
    h.header(VIRTIO_BLK_T_IN, 5);
    h.mem
        .write_slice(&[0u8; 1024], GuestAddress(DATA + 0x4000))
        .unwrap();
    let (status, _) = h.submit(&[
        Buf::ro(HEADER, 16),
        Buf::wo(DATA + 0x4000, 1024),
        Buf::wo(STATUS, 1),
    ]);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(h.guest_bytes(DATA + 0x4000, 1024), payload);
}

#[test]
fn flush_and_get_id() {
    let mut h = Harness::default();
    h.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(
        h.submit(&[Buf::ro(HEADER, 16), Buf::wo(STATUS, 1)]),
        (VIRTIO_BLK_S_OK, 1)
    );

    h.header(VIRTIO_BLK_T_GET_ID, 0);
    h.mem.write_slice(&[0xaa; 20], GuestAddress(DATA)).unwrap();
    let (status, used_len) =
        h.submit(&[Buf::ro(HEADER, 16), Buf::wo(DATA, 20), Buf::wo(STATUS, 1)]);
    assert_eq!((status, used_len), (VIRTIO_BLK_S_OK, 21));
    let mut expect = [0u8; 20];
    expect[..SERIAL.len()].copy_from_slice(SERIAL.as_bytes());
    assert_eq!(h.guest_bytes(DATA, 20), expect);

    // A shorter buffer gets a prefix.
    h.header(VIRTIO_BLK_T_GET_ID, 0);
    let (status, used_len) = h.submit(&[
        Buf::ro(HEADER, 16),
        Buf::wo(DATA + 0x100, 4),
        Buf::wo(STATUS, 1),
    ]);
    assert_eq!((status, used_len), (VIRTIO_BLK_S_OK, 5));
    assert_eq!(h.guest_bytes(DATA + 0x100, 4), SERIAL.as_bytes()[..4]);
}

#[test]
fn unknown_request_type_is_unsupported() {
    let mut h = Harness::default();
    // DISCARD (11) is not offered; nor is anything made up.
    for request_type in [11, 2, 0xdead] {
        h.header(request_type, 0);
        let (status, used_len) = h.submit(&[Buf::ro(HEADER, 16), Buf::wo(STATUS, 1)]);
        assert_eq!(
            (status, used_len),
            (VIRTIO_BLK_S_UNSUPP, 1),
            "type {request_type}"
        );
    }
}

#[test]
fn malformed_requests_get_ioerr_and_no_panic() {
    let mut h = Harness::default();
    let last_sector = DISK_SECTORS - 1;
    let cases: Vec<(&str, u32, u64, Vec<Buf>)> = vec![
        ("status only", VIRTIO_BLK_T_IN, 0, vec![Buf::wo(STATUS, 1)]),
        (
            "write-only header",
            VIRTIO_BLK_T_IN,
            0,
            vec![Buf::wo(HEADER, 16), Buf::wo(DATA, 512), Buf::wo(STATUS, 1)],
        ),
        (
            "short header",
            VIRTIO_BLK_T_IN,
            0,
            vec![Buf::ro(HEADER, 8), Buf::wo(DATA, 512), Buf::wo(STATUS, 1)],
        ),
        (
            "read past the end",
            VIRTIO_BLK_T_IN,
            last_sector,
            vec![Buf::ro(HEADER, 16), Buf::wo(DATA, 1024), Buf::wo(STATUS, 1)],
        ),
        (
            "sector far out",
            VIRTIO_BLK_T_OUT,
            DISK_SECTORS,
            vec![Buf::ro(HEADER, 16), Buf::ro(DATA, 512), Buf::wo(STATUS, 1)],
        ),
        (
            "sector * 512 overflows",
            VIRTIO_BLK_T_IN,
            u64::MAX / 2,
            vec![Buf::ro(HEADER, 16), Buf::wo(DATA, 512), Buf::wo(STATUS, 1)],
        ),
        (
            "IN into a read-only buffer",
            VIRTIO_BLK_T_IN,
            0,
            vec![Buf::ro(HEADER, 16), Buf::ro(DATA, 512), Buf::wo(STATUS, 1)],
        ),
        (
            "OUT from a write-only buffer",
            VIRTIO_BLK_T_OUT,
            0,
            vec![Buf::ro(HEADER, 16), Buf::wo(DATA, 512), Buf::wo(STATUS, 1)],
        ),
        (
            "length not a whole sector",
            VIRTIO_BLK_T_IN,
            0,
            vec![Buf::ro(HEADER, 16), Buf::wo(DATA, 100), Buf::wo(STATUS, 1)],
        ),
        (
            "data outside guest memory",
            VIRTIO_BLK_T_IN,
            0,
            vec![
                Buf::ro(HEADER, 16),
                Buf::wo(MEM_SIZE as u64 - 256, 512),
                Buf::wo(STATUS, 1),
            ],
        ),
        (
            "header outside guest memory",
            VIRTIO_BLK_T_IN,
            0,
            vec![
                Buf::ro(u64::MAX - 8, 16),
                Buf::wo(DATA, 512),
                Buf::wo(STATUS, 1),
            ],
        ),
        (
            "GET_ID without a buffer",
            VIRTIO_BLK_T_GET_ID,
            0,
            vec![Buf::ro(HEADER, 16), Buf::wo(STATUS, 1)],
        ),
    ];
    let untouched = vec![0x5au8; 1024];
    for (what, request_type, sector, bufs) in cases {
        h.header(request_type, sector);
        h.mem.write_slice(&untouched, GuestAddress(DATA)).unwrap();
        let (status, used_len) = h.submit(&bufs);
        assert_eq!((status, used_len), (VIRTIO_BLK_S_IOERR, 1), "{what}");
        if what != "data outside guest memory" {
            assert_eq!(
                h.guest_bytes(DATA, 1024),
                untouched,
                "{what}: buffer changed"
            );
        }
    }
    // Nothing was written to the disk either.
    assert_eq!(
        h.disk_bytes(0, (DISK_SECTORS * SECTOR_SIZE) as usize),
        (0..DISK_SECTORS * SECTOR_SIZE)
            .map(disk_byte)
            .collect::<Vec<_>>()
    );
    // And the device still works.
    h.header(VIRTIO_BLK_T_IN, last_sector);
    let (status, _) = h.submit(&[Buf::ro(HEADER, 16), Buf::wo(DATA, 512), Buf::wo(STATUS, 1)]);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(
        reg_read(&mut h.t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
        0
    );
}

#[test]
fn chain_without_a_writable_status_is_returned_unanswered() {
    let mut h = Harness::default();
    h.header(VIRTIO_BLK_T_IN, 0);
    let (status, used_len) =
        h.submit(&[Buf::ro(HEADER, 16), Buf::wo(DATA, 512), Buf::ro(STATUS, 1)]);
    assert_eq!(
        (status, used_len),
        (0xff, 0),
        "status left alone, nothing written"
    );
    h.header(VIRTIO_BLK_T_IN, 0);
    let (status, used_len) =
        h.submit(&[Buf::ro(HEADER, 16), Buf::wo(DATA, 512), Buf::wo(STATUS, 0)]);
    assert_eq!((status, used_len), (0xff, 0));
}

#[test]
fn looping_chain_ends() {
    let mut h = Harness::new(false, VIRTIO_F_VERSION_1, 16);
    h.header(VIRTIO_BLK_T_IN, 0);
    // 0 -> 1 -> 0 -> ... : the chain iterator stops after a queue size of descriptors.
    h.q.write_desc(&h.mem, 0, HEADER, 16, 1, 1);
    h.q.write_desc(&h.mem, 1, DATA, 512, 1 | 2, 0);
    h.q.publish(&h.mem, 0);
    h.notify();
    assert_eq!(h.q.used_idx(&h.mem), 1);
    assert_eq!(h.status_byte(), 0xff);
}

#[test]
fn read_only_disk_refuses_writes() {
    let mut h = Harness::new(
        true,
        VIRTIO_F_VERSION_1 | (1 << VIRTIO_BLK_F_RO),
        QUEUE_SIZE,
    );
    reg_write(&mut h.t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    assert_ne!(
        reg_read(&mut h.t, VIRTIO_MMIO_DEVICE_FEATURES) & (1 << VIRTIO_BLK_F_RO),
        0
    );
    h.header(VIRTIO_BLK_T_OUT, 0);
    h.mem.write_slice(&[0u8; 512], GuestAddress(DATA)).unwrap();
    let (status, _) = h.submit(&[Buf::ro(HEADER, 16), Buf::ro(DATA, 512), Buf::wo(STATUS, 1)]);
    assert_eq!(status, VIRTIO_BLK_S_IOERR);
    assert_eq!(h.disk_bytes(0, 4), [0, 1, 2, 3]);
    // Reads and flushes still work.
    h.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(
        h.submit(&[Buf::ro(HEADER, 16), Buf::wo(STATUS, 1)]).0,
        VIRTIO_BLK_S_OK
    );
    h.header(VIRTIO_BLK_T_IN, 0);
    let (status, _) = h.submit(&[Buf::ro(HEADER, 16), Buf::wo(DATA, 512), Buf::wo(STATUS, 1)]);
    assert_eq!(status, VIRTIO_BLK_S_OK);
}

#[test]
fn event_idx_suppresses_interrupts_until_used_event() {
    let mut h = Harness::new(false, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX, 16);
    let flush = [Buf::ro(HEADER, 16), Buf::wo(STATUS, 1)];
    h.header(VIRTIO_BLK_T_FLUSH, 0);

    // The driver wants an interrupt only once used.idx passes 2.
    h.q.set_used_event(&h.mem, 2);
    h.submit(&flush);
    assert_eq!(h.irqs(), 0, "used.idx 1: not yet");
    // The device asks to be notified at the next available entry.
    assert_eq!(h.q.avail_event(&h.mem), 1);
    h.submit(&flush);
    assert_eq!(h.irqs(), 0, "used.idx 2: not yet");
    h.submit(&flush);
    assert_eq!(h.irqs(), 1, "used.idx 3 passed used_event 2");
    assert_eq!(h.q.avail_event(&h.mem), 3);
}

#[test]
fn many_requests_in_one_notify_wrap_the_ring() {
    let mut h = Harness::new(false, VIRTIO_F_VERSION_1, 16);
    let flush = [Buf::ro(HEADER, 16), Buf::wo(STATUS, 1)];
    h.header(VIRTIO_BLK_T_FLUSH, 0);
    for round in 0..5u16 {
        for _ in 0..8 {
            h.q.add_chain(&h.mem, &flush);
        }
        h.notify();
        assert_eq!(h.q.used_idx(&h.mem), 8 * (round + 1));
        assert_eq!(h.irqs(), 1, "one interrupt per batch");
    }
}

#[test]
fn corrupt_rings_set_needs_reset_instead_of_hanging() {
    // avail.idx far ahead of anything published.
    let mut h = Harness::new(false, VIRTIO_F_VERSION_1, 16);
    h.q.set_avail_idx(&h.mem, 1000);
    h.notify();
    assert_ne!(
        reg_read(&mut h.t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
        0
    );
    assert_eq!(reg_read(&mut h.t, VIRTIO_MMIO_INTERRUPT_STATUS) & 2, 2);

    // A head index outside the queue.
    let mut h = Harness::new(false, VIRTIO_F_VERSION_1, 16);
    h.q.publish(&h.mem, 40);
    h.notify();
    assert_ne!(
        reg_read(&mut h.t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
        0
    );
    assert_eq!(h.q.used_idx(&h.mem), 0);
}

#[test]
fn config_space_reports_capacity_seg_max_and_block_size() {
    let mut h = Harness::default();
    let mut capacity = [0u8; 8];
    h.t.read(0x100, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), DISK_SECTORS);
    assert_eq!(reg_read(&mut h.t, 0x100), DISK_SECTORS as u32);
    assert_eq!(reg_read(&mut h.t, 0x104), 0);
    assert_eq!(reg_read(&mut h.t, 0x10c), u32::from(QUEUE_SIZE) - 2);
    assert_eq!(reg_read(&mut h.t, 0x114), 512);
    assert_eq!(reg_read(&mut h.t, 0x118), 0, "past the end reads zero");
    let mut far = [0xffu8; 4];
    h.t.read(0xffc, &mut far);
    assert_eq!(far, [0; 4]);
}

#[test]
fn reset_stops_the_device_until_it_is_set_up_again() {
    let mut h = Harness::default();
    reg_write(&mut h.t, VIRTIO_MMIO_STATUS, 0);
    h.header(VIRTIO_BLK_T_FLUSH, 0);
    h.q.add_chain(&h.mem, &[Buf::ro(HEADER, 16), Buf::wo(STATUS, 1)]);
    h.notify();
    assert_eq!(h.q.used_idx(&h.mem), 0, "a reset device does not process");
}

#[test]
fn open_derives_a_serial_and_sizes_the_disk() {
    let tmp = TempFile::new().unwrap();
    tmp.as_file().set_len(10 * SECTOR_SIZE + 100).unwrap();
    let block = Block::open(tmp.as_path(), true).unwrap();
    assert_eq!(block.capacity(), 10, "a partial last sector is not exposed");
    assert!(block.is_read_only());
    assert!(Block::open(std::path::Path::new("/nonexistent/disk.img"), false).is_err());
    let file = TempFile::new().unwrap().into_file();
    assert!(Block::new(file, false, "a serial that is far too long").is_err());
}
