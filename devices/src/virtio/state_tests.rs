//! Migration of a virtio-blk device over virtio-mmio: a transport brought up and used by a
//! driver, saved, sent through serde_json, restored into a fresh transport and block device
//! over the same guest memory and disk, and used again. Then states that must be refused.

use std::fs::File;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_RO, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueState};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempfile::TempFile;

use super::block::{Block, SECTOR_SIZE};
use super::test_utils::{guest_memory, reg_read, reg_write, Buf, DriverQueue};
use super::{
    DeviceSnapshot, MmioTransport, MmioTransportState, VirtioDevice, VirtioError, VirtioInterrupt,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::interrupt::IrqLine;
use crate::state::{DeviceStateError, Ring};
use crate::GuestMemory;

const MEM_SIZE: usize = 1 << 20;
const QUEUE_BASE: u64 = 0x1000;
const QUEUE_SIZE: u16 = 16;
const HEADER: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const DISK_SECTORS: u64 = 32;
const FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX;

/// A disk image; each device gets its own descriptor on it, as source and destination would.
fn disk(sectors: u64) -> TempFile {
    let tmp = TempFile::new().unwrap();
    tmp.as_file().set_len(sectors * SECTOR_SIZE).unwrap();
    tmp
}

fn transport(mem: &GuestMemory, file: &File, serial: &str) -> MmioTransport {
    let block = Block::new(file.try_clone().unwrap(), false, serial).unwrap();
    let irq = Arc::new(IrqLine::new(5).unwrap());
    MmioTransport::new(Box::new(block), mem.clone(), irq).unwrap()
}

/// The driver's handshake up to (not including) DRIVER_OK, with the queue set up and ready.
fn negotiate(t: &mut MmioTransport, q: &DriverQueue, features: u64) -> u32 {
    let status = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
    reg_write(t, VIRTIO_MMIO_STATUS, status);
    for page in 0..2 {
        reg_write(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, page);
        reg_write(
            t,
            VIRTIO_MMIO_DRIVER_FEATURES,
            (features >> (32 * page)) as u32,
        );
    }
    let status = status | VIRTIO_CONFIG_S_FEATURES_OK;
    reg_write(t, VIRTIO_MMIO_STATUS, status);
    reg_write(t, VIRTIO_MMIO_QUEUE_SEL, 0);
    reg_write(t, VIRTIO_MMIO_QUEUE_NUM, u32::from(q.size));
    reg_write(t, VIRTIO_MMIO_QUEUE_DESC_LOW, q.desc as u32);
    reg_write(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, q.avail as u32);
    reg_write(t, VIRTIO_MMIO_QUEUE_USED_LOW, q.used as u32);
    reg_write(t, VIRTIO_MMIO_QUEUE_READY, 1);
    status
}

fn bring_up(t: &mut MmioTransport, q: &DriverQueue) {
    let status = negotiate(t, q, FEATURES);
    reg_write(t, VIRTIO_MMIO_STATUS, status | VIRTIO_CONFIG_S_DRIVER_OK);
    assert!(t.is_activated());
}

/// Writes a request header at `header` and a status byte the device must overwrite at `status`.
fn header_at(mem: &GuestMemory, header: u64, status: u64, request_type: u32, sector: u64) {
    mem.write_obj(request_type.to_le(), GuestAddress(header))
        .unwrap();
    mem.write_obj(0u32, GuestAddress(header + 4)).unwrap();
    mem.write_obj(sector.to_le(), GuestAddress(header + 8))
        .unwrap();
    mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
}

fn header(mem: &GuestMemory, request_type: u32, sector: u64) {
    header_at(mem, HEADER, STATUS, request_type, sector);
}

fn status_byte(mem: &GuestMemory) -> u32 {
    u32::from(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap())
}

fn irqs(t: &MmioTransport) -> u64 {
    t.interrupt().eventfd().unwrap().read().unwrap_or(0)
}

fn round_trip(state: &MmioTransportState) -> MmioTransportState {
    serde_json::from_str(&serde_json::to_string(state).unwrap()).unwrap()
}

#[test]
fn block_device_resumes_after_restore_where_the_source_stopped() {
    let mem = guest_memory(MEM_SIZE);
    let image = disk(DISK_SECTORS);
    let mut src = transport(&mem, image.as_file(), "source-disk");
    let mut q = DriverQueue::new(&mem, QUEUE_BASE, QUEUE_SIZE);
    bring_up(&mut src, &q);
    // EVENT_IDX: interrupt whenever used.idx moves past its previous value.
    q.set_used_event(&mem, 0);

    // The first request has buffers of its own, so that running it again would show.
    let (header1, data1, status1) = (HEADER + 0x100, DATA + 0x1000, STATUS + 0x100);
    let payload: Vec<u8> = (0..512u32).map(|i| (i * 13 + 1) as u8).collect();
    header_at(&mem, header1, status1, VIRTIO_BLK_T_OUT, 3);
    mem.write_slice(&payload, GuestAddress(data1)).unwrap();
    q.add_chain(
        &mem,
        &[
            Buf::ro(header1, 16),
            Buf::ro(data1, 512),
            Buf::wo(status1, 1),
        ],
    );
    reg_write(&mut src, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_eq!(q.used_idx(&mem), 1);
    let status1_byte = mem.read_obj::<u8>(GuestAddress(status1)).unwrap();
    assert_eq!(u32::from(status1_byte), VIRTIO_BLK_S_OK);
    // The driver has taken the completion; a device running it again would rewrite this.
    mem.write_obj(0xeeu8, GuestAddress(status1)).unwrap();
    assert_eq!(irqs(&src), 1);
    // Paused before the driver acknowledged the interrupt.
    let state = round_trip(&src.save_state());
    assert_eq!(state.interrupt_status, VIRTIO_MMIO_INT_VRING);
    assert_eq!(
        (state.queues[0].next_avail, state.queues[0].next_used),
        (1, 1)
    );

    let mut dst = transport(&mem, image.as_file(), "destination-disk");
    dst.restore_state(&state).unwrap();
    assert!(dst.is_activated());
    assert_eq!(
        reg_read(&mut dst, VIRTIO_MMIO_STATUS),
        reg_read(&mut src, VIRTIO_MMIO_STATUS)
    );
    assert_eq!(irqs(&dst), 1, "the unacknowledged interrupt is raised once");
    assert_eq!(reg_read(&mut dst, VIRTIO_MMIO_INTERRUPT_STATUS), 1);
    reg_write(&mut dst, VIRTIO_MMIO_INTERRUPT_ACK, 1);

    // The next request lands in used ring slot 1 and reads what the source wrote.
    q.set_used_event(&mem, 1);
    header(&mem, VIRTIO_BLK_T_IN, 3);
    mem.write_slice(&[0u8; 512], GuestAddress(DATA)).unwrap();
    let head = q.add_chain(
        &mem,
        &[Buf::ro(HEADER, 16), Buf::wo(DATA, 512), Buf::wo(STATUS, 1)],
    );
    reg_write(&mut dst, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_eq!(q.used_idx(&mem), 2);
    assert_eq!(q.used_elem(&mem, 1), (u32::from(head), 512 + 1));
    assert_eq!(status_byte(&mem), VIRTIO_BLK_S_OK);
    let mut read_back = vec![0u8; 512];
    mem.read_slice(&mut read_back, GuestAddress(DATA)).unwrap();
    assert_eq!(read_back, payload);
    assert_eq!(irqs(&dst), 1);
    assert_eq!(reg_read(&mut dst, VIRTIO_MMIO_INTERRUPT_STATUS), 1);
    assert_eq!(q.avail_event(&mem), 2, "EVENT_IDX carried over");
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(status1)).unwrap(),
        0xee,
        "the first request was not run again"
    );
    assert_eq!(irqs(&src), 0, "the source saw nothing of it");

    // The guest still sees the source's disk serial.
    header(&mem, VIRTIO_BLK_T_GET_ID, 0);
    q.add_chain(
        &mem,
        &[Buf::ro(HEADER, 16), Buf::wo(DATA, 20), Buf::wo(STATUS, 1)],
    );
    reg_write(&mut dst, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    let mut id = [0u8; 11];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"source-disk");
}

#[test]
fn handshake_interrupted_by_migration_completes_on_the_destination() {
    let mem = guest_memory(MEM_SIZE);
    let image = disk(DISK_SECTORS);
    let mut src = transport(&mem, image.as_file(), "disk");
    let mut q = DriverQueue::new(&mem, QUEUE_BASE, QUEUE_SIZE);
    let status = negotiate(&mut src, &q, VIRTIO_F_VERSION_1);
    let state = round_trip(&src.save_state());
    assert!(!state.activated);

    let mut dst = transport(&mem, image.as_file(), "disk");
    dst.restore_state(&state).unwrap();
    assert!(!dst.is_activated());
    assert_eq!(irqs(&dst), 0, "nothing pending, nothing raised");
    reg_write(&mut dst, VIRTIO_MMIO_QUEUE_SEL, 0);
    assert_eq!(reg_read(&mut dst, VIRTIO_MMIO_QUEUE_READY), 1);
    reg_write(
        &mut dst,
        VIRTIO_MMIO_STATUS,
        status | VIRTIO_CONFIG_S_DRIVER_OK,
    );
    assert!(dst.is_activated());

    header(&mem, VIRTIO_BLK_T_IN, 0);
    q.add_chain(
        &mem,
        &[Buf::ro(HEADER, 16), Buf::wo(DATA, 512), Buf::wo(STATUS, 1)],
    );
    reg_write(&mut dst, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_eq!(q.used_idx(&mem), 1);
    assert_eq!(status_byte(&mem), VIRTIO_BLK_S_OK);
    assert_eq!(irqs(&dst), 1);
}

/// A good state of a running device, to spoil one field at a time.
fn running_state(mem: &GuestMemory, image: &TempFile) -> MmioTransportState {
    let mut src = transport(mem, image.as_file(), "disk");
    let q = DriverQueue::new(mem, QUEUE_BASE, QUEUE_SIZE);
    bring_up(&mut src, &q);
    src.save_state()
}

/// Restores `state` into a fresh destination, which must refuse it and stay untouched.
fn refused(mem: &GuestMemory, image: &TempFile, state: &MmioTransportState) -> DeviceStateError {
    let mut dst = transport(mem, image.as_file(), "disk");
    let err = dst.restore_state(state).unwrap_err();
    assert!(!dst.is_activated());
    assert_eq!(reg_read(&mut dst, VIRTIO_MMIO_STATUS), 0);
    err
}

#[test]
fn bad_queue_layouts_are_refused() {
    let mem = guest_memory(MEM_SIZE);
    let image = disk(DISK_SECTORS);
    let good = running_state(&mem, &image);
    let spoilt = |spoil: &dyn Fn(&mut MmioTransportState)| {
        let mut state = good.clone();
        spoil(&mut state);
        refused(&mem, &image, &state)
    };

    let err = spoilt(&|s| s.queues[0].size = 12);
    assert!(
        matches!(
            err,
            DeviceStateError::QueueSize {
                index: 0,
                size: 12,
                max: 256
            }
        ),
        "{err}"
    );
    let err = spoilt(&|s| s.queues[0].size = 512);
    assert!(
        matches!(err, DeviceStateError::QueueSize { size: 512, .. }),
        "{err}"
    );
    let err = spoilt(&|s| s.queues[0].size = 0);
    assert!(
        matches!(err, DeviceStateError::QueueSize { size: 0, .. }),
        "{err}"
    );
    let err = spoilt(&|s| s.queues[0].used_ring = MEM_SIZE as u64 - 64);
    assert!(
        matches!(
            err,
            DeviceStateError::QueueOutsideMemory {
                ring: Ring::Used,
                len: 134,
                ..
            }
        ),
        "{err}"
    );
    let err = spoilt(&|s| s.queues[0].desc_table = u64::MAX - 15);
    assert!(
        matches!(
            err,
            DeviceStateError::QueueOutsideMemory {
                ring: Ring::Descriptors,
                ..
            }
        ),
        "{err}"
    );
    let err = spoilt(&|s| s.queues[0].avail_ring += 1);
    assert!(
        matches!(
            err,
            DeviceStateError::QueueAlignment {
                ring: Ring::Avail,
                align: 2,
                ..
            }
        ),
        "{err}"
    );
    let err = spoilt(&|s| s.queues[0].max_size = 128);
    assert!(
        matches!(
            err,
            DeviceStateError::QueueMaxSize {
                expected: 256,
                got: 128,
                ..
            }
        ),
        "{err}"
    );
    let err = spoilt(&|s| s.queues[0].next_avail = 40);
    assert!(
        matches!(err, DeviceStateError::QueuePosition { next_avail: 40, .. }),
        "{err}"
    );
    let err = spoilt(&|s| s.queues[0].event_idx = false);
    assert!(
        matches!(err, DeviceStateError::QueueEventIdx { .. }),
        "{err}"
    );
    let err = spoilt(&|s| {
        s.activated = false;
        s.status &= !VIRTIO_CONFIG_S_DRIVER_OK;
    });
    assert!(
        matches!(err, DeviceStateError::IdleQueuePosition { index: 0 }),
        "{err}"
    );
    // Positions check out, but virtio-blk cannot run without its queue.
    let err = spoilt(&|s| {
        s.queues[0].ready = false;
        s.queues[0].event_idx = false;
    });
    assert!(
        matches!(
            err,
            DeviceStateError::Activate(VirtioError::QueueNotReady(0))
        ),
        "{err}"
    );
    let err = spoilt(&|s| s.queues.push(s.queues[0].clone()));
    assert!(
        matches!(
            err,
            DeviceStateError::QueueCount {
                expected: 1,
                got: 2
            }
        ),
        "{err}"
    );

    // The destination was left usable by every refusal.
    let mut dst = transport(&mem, image.as_file(), "disk");
    dst.restore_state(&good).unwrap();
    assert!(dst.is_activated());
}

#[test]
fn bad_features_status_and_interrupt_bits_are_refused() {
    let mem = guest_memory(MEM_SIZE);
    let image = disk(DISK_SECTORS);
    let good = running_state(&mem, &image);
    let spoilt = |spoil: &dyn Fn(&mut MmioTransportState)| {
        let mut state = good.clone();
        spoil(&mut state);
        refused(&mem, &image, &state)
    };

    // RO exists but is not offered for a writable disk; bit 40 is offered by nothing.
    let err = spoilt(&|s| s.driver_features |= 1 << VIRTIO_BLK_F_RO);
    assert!(
        matches!(err, DeviceStateError::UnknownFeatures { unknown } if unknown == 1 << VIRTIO_BLK_F_RO),
        "{err}"
    );
    let err = spoilt(&|s| s.driver_features |= 1 << 40);
    assert!(
        matches!(err, DeviceStateError::UnknownFeatures { unknown } if unknown == 1 << 40),
        "{err}"
    );
    let err = spoilt(&|s| s.interrupt_status = 4);
    assert!(matches!(err, DeviceStateError::InterruptStatus(4)), "{err}");
    let err = spoilt(&|s| s.status &= !VIRTIO_CONFIG_S_DRIVER_OK);
    assert!(matches!(err, DeviceStateError::Status { .. }), "{err}");
    let err = spoilt(&|s| s.driver_features &= !VIRTIO_F_VERSION_1);
    assert!(matches!(err, DeviceStateError::Status { .. }), "{err}");
}

#[test]
fn state_of_another_device_or_disk_is_refused() {
    let mem = guest_memory(MEM_SIZE);
    let image = disk(DISK_SECTORS);
    let good = running_state(&mem, &image);

    let irq = Arc::new(IrqLine::new(5).unwrap());
    let mut net = MmioTransport::new(Box::new(NotABlock), mem.clone(), irq).unwrap();
    let err = net.restore_state(&good).unwrap_err();
    assert!(
        matches!(
            err,
            DeviceStateError::DeviceKind {
                expected: 1,
                got: 2
            }
        ),
        "{err}"
    );

    let bigger = disk(2 * DISK_SECTORS);
    let err = refused(&mem, &bigger, &good);
    assert!(
        matches!(
            err,
            DeviceStateError::DiskCapacity {
                expected: 64,
                got: 32
            }
        ),
        "{err}"
    );

    let block = Block::new(image.as_file().try_clone().unwrap(), true, "disk").unwrap();
    let irq = Arc::new(IrqLine::new(5).unwrap());
    let mut read_only = MmioTransport::new(Box::new(block), mem.clone(), irq).unwrap();
    let err = read_only.restore_state(&good).unwrap_err();
    assert!(
        matches!(
            err,
            DeviceStateError::DiskReadOnly {
                expected: true,
                got: false
            }
        ),
        "{err}"
    );
    assert!(!read_only.is_activated());
}

/// A device of another kind than virtio-blk, never run.
struct NotABlock;

impl VirtioDevice for NotABlock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256]
    }
    fn features(&self) -> u64 {
        0
    }
    fn read_config(&self, _: u64, _: &mut [u8]) {}
    fn write_config(&mut self, _: u64, _: &[u8]) {}
    fn activate(
        &mut self,
        _: GuestMemory,
        _: Vec<Queue>,
        _: Arc<VirtioInterrupt>,
        _: u64,
    ) -> Result<(), VirtioError> {
        Ok(())
    }
    fn reset(&mut self) {}
    fn process_queue(&mut self, _: u16) -> Result<(), VirtioError> {
        Ok(())
    }
    fn queue_states(&self) -> Vec<QueueState> {
        Vec::new()
    }
    fn save_snapshot(&self) -> DeviceSnapshot {
        unreachable!("never saved")
    }
    fn restore_snapshot(&mut self, _: &DeviceSnapshot) -> Result<(), DeviceStateError> {
        unreachable!("the transport refuses a block state before this")
    }
    fn kind(&self) -> &'static str {
        "virtio-test"
    }
}
