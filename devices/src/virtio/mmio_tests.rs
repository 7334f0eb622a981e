//! The virtio-mmio register interface driven the way Linux's virtio_mmio driver drives it,
//! against a fake device that records what the transport hands it.

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};

use super::mmio::{mmio_cmdline_arg, MmioTransport, MMIO_MAGIC};
use super::test_utils::{guest_memory, reg_read, reg_write, DriverQueue};
use super::{DeviceSnapshot, VirtioDevice, VirtioError, VirtioInterrupt, VIRTIO_RING_F_EVENT_IDX};
use crate::bus::{BusDevice, VcpuAction};
use crate::interrupt::IrqLine;
use crate::state::DeviceStateError;
use crate::GuestMemory;

const FAKE_ID: u32 = 42;
/// A device feature in the low page, to see both pages at work.
const FAKE_FEATURE: u64 = 1 << 3;

#[derive(Debug, Clone, PartialEq)]
struct SeenQueue {
    ready: bool,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    event_idx: bool,
}

#[derive(Default)]
struct Seen {
    activations: Vec<(u64, Vec<SeenQueue>)>,
    resets: usize,
    notified: Vec<u16>,
    config_writes: Vec<(u64, Vec<u8>)>,
}

struct Fake {
    seen: Arc<Mutex<Seen>>,
    sizes: Vec<u16>,
    interrupt: Option<Arc<VirtioInterrupt>>,
    fail_processing: bool,
}

impl VirtioDevice for Fake {
    fn device_type(&self) -> u32 {
        FAKE_ID
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn features(&self) -> u64 {
        FAKE_FEATURE | VIRTIO_RING_F_EVENT_IDX
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // Config byte i reads as 0x80 + i, for the first 8 bytes.
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset + i as u64;
            *b = if at < 8 { 0x80 + at as u8 } else { 0 };
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.seen
            .lock()
            .unwrap()
            .config_writes
            .push((offset, data.to_vec()));
    }
    fn activate(
        &mut self,
        _mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
        features: u64,
    ) -> Result<(), VirtioError> {
        let queues = queues
            .iter()
            .map(|q| SeenQueue {
                ready: q.ready(),
                size: q.size(),
                desc: q.desc_table(),
                avail: q.avail_ring(),
                used: q.used_ring(),
                event_idx: q.event_idx_enabled(),
            })
            .collect();
        self.seen
            .lock()
            .unwrap()
            .activations
            .push((features, queues));
        self.interrupt = Some(interrupt);
        Ok(())
    }
    fn reset(&mut self) {
        self.seen.lock().unwrap().resets += 1;
        self.interrupt = None;
    }
    fn process_queue(&mut self, index: u16) -> Result<(), VirtioError> {
        self.seen.lock().unwrap().notified.push(index);
        if self.fail_processing {
            return Err(VirtioError::QueueCorrupt(index));
        }
        if let Some(irq) = &self.interrupt {
            irq.signal_used_queue().map_err(VirtioError::Interrupt)?;
        }
        Ok(())
    }
    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        Vec::new()
    }
    fn save_snapshot(&self) -> DeviceSnapshot {
        unreachable!("the register tests never migrate")
    }
    fn restore_snapshot(&mut self, _: &DeviceSnapshot) -> Result<(), DeviceStateError> {
        unreachable!("the register tests never migrate")
    }
    fn kind(&self) -> &'static str {
        "virtio-test"
    }
}

struct Setup {
    t: MmioTransport,
    seen: Arc<Mutex<Seen>>,
    mem: GuestMemory,
}

fn setup_with(sizes: Vec<u16>, fail_processing: bool) -> Setup {
    let mem = guest_memory(1 << 20);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let fake = Fake {
        seen: seen.clone(),
        sizes,
        interrupt: None,
        fail_processing,
    };
    let irq = Arc::new(IrqLine::new(5).unwrap());
    let t = MmioTransport::new(Box::new(fake), mem.clone(), irq).unwrap();
    Setup { t, seen, mem }
}

fn setup() -> Setup {
    setup_with(vec![256, 16], false)
}

const S_ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const S_DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const S_FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const S_DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const S_NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;

/// ACKNOWLEDGE, DRIVER, accept `features`, FEATURES_OK; returns the status read back.
fn negotiate(t: &mut MmioTransport, features: u64) -> u32 {
    reg_write(t, VIRTIO_MMIO_STATUS, S_ACK);
    reg_write(t, VIRTIO_MMIO_STATUS, S_ACK | S_DRIVER);
    reg_write(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    reg_write(t, VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
    reg_write(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    reg_write(t, VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
    reg_write(t, VIRTIO_MMIO_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    reg_read(t, VIRTIO_MMIO_STATUS)
}

/// Programs queue `sel` with `q`'s layout and sets it ready; returns QueueReady read back.
pub fn setup_queue(t: &mut MmioTransport, sel: u32, q: &DriverQueue) -> u32 {
    reg_write(t, VIRTIO_MMIO_QUEUE_SEL, sel);
    reg_write(t, VIRTIO_MMIO_QUEUE_NUM, u32::from(q.size));
    for (low, addr) in [
        (VIRTIO_MMIO_QUEUE_DESC_LOW, q.desc),
        (VIRTIO_MMIO_QUEUE_AVAIL_LOW, q.avail),
        (VIRTIO_MMIO_QUEUE_USED_LOW, q.used),
    ] {
        reg_write(t, low, addr as u32);
        reg_write(t, low + 4, (addr >> 32) as u32);
    }
    reg_write(t, VIRTIO_MMIO_QUEUE_READY, 1);
    reg_read(t, VIRTIO_MMIO_QUEUE_READY)
}

fn irq_count(t: &MmioTransport) -> u64 {
    t.interrupt().eventfd().unwrap().read().unwrap_or(0)
}

#[test]
fn identity_registers() {
    let Setup { mut t, .. } = setup();
    assert_eq!(reg_read(&mut t, VIRTIO_MMIO_MAGIC_VALUE), MMIO_MAGIC);
    assert_eq!(MMIO_MAGIC.to_le_bytes(), *b"virt");
    assert_eq!(reg_read(&mut t, VIRTIO_MMIO_VERSION), 2);
    assert_eq!(reg_read(&mut t, VIRTIO_MMIO_DEVICE_ID), FAKE_ID);
    assert_eq!(reg_read(&mut t, VIRTIO_MMIO_VENDOR_ID), 0);

    reg_write(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    let low = reg_read(&mut t, VIRTIO_MMIO_DEVICE_FEATURES);
    assert_eq!(u64::from(low), FAKE_FEATURE | VIRTIO_RING_F_EVENT_IDX);
    reg_write(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    assert_eq!(
        reg_read(&mut t, VIRTIO_MMIO_DEVICE_FEATURES),
        1,
        "VERSION_1 is bit 32"
    );
    reg_write(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
    assert_eq!(reg_read(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 0);

    for (sel, max) in [(0, 256), (1, 16), (2, 0), (u32::MAX, 0)] {
        reg_write(&mut t, VIRTIO_MMIO_QUEUE_SEL, sel);
        assert_eq!(reg_read(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), max);
        assert_eq!(reg_read(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
    }
    assert_eq!(reg_read(&mut t, VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);
    assert_eq!(reg_read(&mut t, VIRTIO_MMIO_CONFIG_GENERATION), 0);
    assert_eq!(reg_read(&mut t, VIRTIO_MMIO_STATUS), 0);
    assert_eq!(reg_read(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
}

#[test]
fn config_space_goes_to_the_device_at_any_width() {
    let Setup { mut t, seen, .. } = setup();
    let mut one = [0u8; 1];
    t.read(0x103, &mut one);
    assert_eq!(one, [0x83]);
    let mut eight = [0u8; 8];
    t.read(0x100, &mut eight);
    assert_eq!(eight, [0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87]);
    assert_eq!(reg_read(&mut t, 0x104), 0x8786_8584);
    t.read(0xfff, &mut one);
    assert_eq!(one, [0]);
    assert_eq!(t.write(0x102, &[1, 2]), VcpuAction::Continue);
    assert_eq!(seen.lock().unwrap().config_writes, vec![(2, vec![1, 2])]);
}

#[test]
fn full_handshake_activates_the_device_and_routes_notifications() {
    let Setup {
        mut t, seen, mem, ..
    } = setup();
    let features = super::VIRTIO_F_VERSION_1 | FAKE_FEATURE | VIRTIO_RING_F_EVENT_IDX;
    let status = negotiate(&mut t, features);
    assert_eq!(status, S_ACK | S_DRIVER | S_FEATURES_OK);

    let q0 = DriverQueue::new(&mem, 0x1_0000, 256);
    let q1 = DriverQueue::new(&mem, 0x2_0000, 16);
    assert_eq!(setup_queue(&mut t, 0, &q0), 1);
    assert_eq!(setup_queue(&mut t, 1, &q1), 1);
    assert!(!t.is_activated());
    reg_write(&mut t, VIRTIO_MMIO_STATUS, status | S_DRIVER_OK);
    assert!(t.is_activated());
    assert_eq!(reg_read(&mut t, VIRTIO_MMIO_STATUS), status | S_DRIVER_OK);

    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.activations.len(), 1);
        let (acked, queues) = &seen.activations[0];
        assert_eq!(*acked, features);
        let expect = |q: &DriverQueue| SeenQueue {
            ready: true,
            size: q.size,
            desc: q.desc,
            avail: q.avail,
            used: q.used,
            event_idx: true,
        };
        assert_eq!(*queues, vec![expect(&q0), expect(&q1)]);
    }

    // QueueNotify runs the device's queue processing right here; it raises the interrupt.
    reg_write(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
    assert_eq!(seen.lock().unwrap().notified, vec![1]);
    assert_eq!(irq_count(&t), 1);
    assert_eq!(reg_read(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 1);
    reg_write(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, 1);
    assert_eq!(reg_read(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);

    // Queues are frozen once running.
    reg_write(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
    reg_write(&mut t, VIRTIO_MMIO_QUEUE_READY, 0);
    assert_eq!(reg_read(&mut t, VIRTIO_MMIO_QUEUE_READY), 1);
    // So are features.
    reg_write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 0);
    reg_write(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_eq!(seen.lock().unwrap().notified, vec![1, 0]);
}

#[test]
fn features_ok_is_refused_without_version_1() {
    let Setup { mut t, .. } = setup();
    let status = negotiate(&mut t, FAKE_FEATURE);
    assert_eq!(status & S_FEATURES_OK, 0);
    // DRIVER_OK without FEATURES_OK does not start the device either.
    reg_write(&mut t, VIRTIO_MMIO_STATUS, status | S_DRIVER_OK);
    assert!(!t.is_activated());
}

#[test]
fn features_never_offered_are_dropped() {
    let Setup { mut t, seen, mem } = setup();
    let all = u64::MAX;
    let status = negotiate(&mut t, all);
    assert_ne!(status & S_FEATURES_OK, 0);
    let q0 = DriverQueue::new(&mem, 0x1_0000, 256);
    setup_queue(&mut t, 0, &q0);
    reg_write(&mut t, VIRTIO_MMIO_STATUS, status | S_DRIVER_OK);
    let seen = seen.lock().unwrap();
    assert_eq!(
        seen.activations[0].0,
        super::VIRTIO_F_VERSION_1 | FAKE_FEATURE | VIRTIO_RING_F_EVENT_IDX
    );
    // The queue left unconfigured is handed over not ready.
    assert!(!seen.activations[0].1[1].ready);
}

#[test]
fn bad_queue_configurations_are_refused_and_flag_needs_reset() {
    let mem_size = 1u64 << 20;
    type Spoil = Box<dyn Fn(&mut MmioTransport)>;
    let bad: Vec<(&str, Spoil)> = vec![
        (
            "size not a power of two",
            Box::new(|t| reg_write(t, VIRTIO_MMIO_QUEUE_NUM, 100)),
        ),
        (
            "size above the maximum",
            Box::new(|t| reg_write(t, VIRTIO_MMIO_QUEUE_NUM, 512)),
        ),
        (
            "size that does not fit a u16",
            Box::new(|t| reg_write(t, VIRTIO_MMIO_QUEUE_NUM, 0x1_0000)),
        ),
        (
            "descriptor table outside guest memory",
            Box::new(move |t| reg_write(t, VIRTIO_MMIO_QUEUE_DESC_LOW, mem_size as u32 - 0x800)),
        ),
        (
            "used ring above 4 GiB",
            Box::new(|t| reg_write(t, VIRTIO_MMIO_QUEUE_USED_HIGH, 1)),
        ),
        (
            "misaligned descriptor table",
            Box::new(|t| reg_write(t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1_0008)),
        ),
    ];
    for (what, spoil) in bad {
        let Setup { mut t, mem, seen } = setup();
        let status = negotiate(&mut t, super::VIRTIO_F_VERSION_1);
        let q = DriverQueue::new(&mem, 0x1_0000, 256);
        reg_write(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        reg_write(&mut t, VIRTIO_MMIO_QUEUE_NUM, 256);
        for (low, addr) in [
            (VIRTIO_MMIO_QUEUE_DESC_LOW, q.desc),
            (VIRTIO_MMIO_QUEUE_AVAIL_LOW, q.avail),
            (VIRTIO_MMIO_QUEUE_USED_LOW, q.used),
        ] {
            reg_write(&mut t, low, addr as u32);
        }
        spoil(&mut t);
        reg_write(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(reg_read(&mut t, VIRTIO_MMIO_QUEUE_READY), 0, "{what}");
        assert_ne!(
            reg_read(&mut t, VIRTIO_MMIO_STATUS) & S_NEEDS_RESET,
            0,
            "{what}"
        );
        assert_eq!(reg_read(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 2, "{what}");
        assert_eq!(irq_count(&t), 1, "{what}");
        // The driver's later status writes keep the device's NEEDS_RESET.
        reg_write(&mut t, VIRTIO_MMIO_STATUS, status | S_DRIVER_OK);
        assert_ne!(
            reg_read(&mut t, VIRTIO_MMIO_STATUS) & S_NEEDS_RESET,
            0,
            "{what}"
        );
        // Our fake accepts a missing queue; the notify is still refused while NEEDS_RESET.
        reg_write(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert!(seen.lock().unwrap().notified.is_empty(), "{what}");
    }
}

#[test]
fn status_zero_resets_everything() {
    let Setup { mut t, seen, mem } = setup();
    let status = negotiate(&mut t, super::VIRTIO_F_VERSION_1);
    let q0 = DriverQueue::new(&mem, 0x1_0000, 256);
    setup_queue(&mut t, 0, &q0);
    reg_write(&mut t, VIRTIO_MMIO_STATUS, status | S_DRIVER_OK);
    reg_write(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_eq!(reg_read(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 1);

    reg_write(&mut t, VIRTIO_MMIO_STATUS, 0);
    assert!(!t.is_activated());
    assert_eq!(seen.lock().unwrap().resets, 1);
    assert_eq!(reg_read(&mut t, VIRTIO_MMIO_STATUS), 0);
    assert_eq!(reg_read(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    reg_write(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
    assert_eq!(reg_read(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);

    // And the device can be brought up again.
    let status = negotiate(&mut t, super::VIRTIO_F_VERSION_1);
    assert_eq!(setup_queue(&mut t, 0, &q0), 1);
    reg_write(&mut t, VIRTIO_MMIO_STATUS, status | S_DRIVER_OK);
    assert!(t.is_activated());
    assert_eq!(seen.lock().unwrap().activations.len(), 2);
}

#[test]
fn status_bits_cannot_be_cleared_without_reset() {
    let Setup { mut t, .. } = setup();
    let status = negotiate(&mut t, super::VIRTIO_F_VERSION_1);
    reg_write(&mut t, VIRTIO_MMIO_STATUS, S_ACK);
    assert_eq!(reg_read(&mut t, VIRTIO_MMIO_STATUS), status);
}

#[test]
fn processing_error_sets_needs_reset() {
    let Setup { mut t, seen, mem } = setup_with(vec![16], true);
    let status = negotiate(&mut t, super::VIRTIO_F_VERSION_1);
    let q0 = DriverQueue::new(&mem, 0x1_0000, 16);
    setup_queue(&mut t, 0, &q0);
    reg_write(&mut t, VIRTIO_MMIO_STATUS, status | S_DRIVER_OK);
    reg_write(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_ne!(reg_read(&mut t, VIRTIO_MMIO_STATUS) & S_NEEDS_RESET, 0);
    assert_eq!(reg_read(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 2);
    // Further notifies are not passed on to a broken device.
    reg_write(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_eq!(seen.lock().unwrap().notified, vec![0]);
}

#[test]
fn bad_register_accesses_are_ignored() {
    let Setup { mut t, seen, .. } = setup();
    // Wrong widths and misaligned offsets read as zero.
    let mut two = [0xffu8; 2];
    t.read(u64::from(VIRTIO_MMIO_MAGIC_VALUE), &mut two);
    assert_eq!(two, [0, 0]);
    let mut eight = [0xffu8; 8];
    t.read(u64::from(VIRTIO_MMIO_MAGIC_VALUE), &mut eight);
    assert_eq!(eight, [0; 8]);
    assert_eq!(reg_read(&mut t, VIRTIO_MMIO_MAGIC_VALUE + 1), 0);
    // Write-only and unknown registers read as zero.
    assert_eq!(reg_read(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY), 0);
    assert_eq!(reg_read(&mut t, 0xf0), 0);
    t.read(u64::MAX, &mut eight);
    // Writes of the wrong width, to read-only registers, or before the device runs do nothing.
    assert_eq!(
        t.write(u64::from(VIRTIO_MMIO_STATUS), &[1]),
        VcpuAction::Continue
    );
    assert_eq!(reg_read(&mut t, VIRTIO_MMIO_STATUS), 0);
    reg_write(&mut t, VIRTIO_MMIO_MAGIC_VALUE, 0);
    reg_write(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    reg_write(&mut t, VIRTIO_MMIO_QUEUE_SEL, 9);
    reg_write(&mut t, VIRTIO_MMIO_QUEUE_NUM, 16);
    reg_write(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
    reg_write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 7);
    reg_write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, u32::MAX);
    assert_eq!(t.write(u64::MAX, &[0; 4]), VcpuAction::Continue);
    assert_eq!(reg_read(&mut t, VIRTIO_MMIO_MAGIC_VALUE), MMIO_MAGIC);
    assert!(seen.lock().unwrap().notified.is_empty());
}

#[test]
fn notify_of_a_missing_queue_is_ignored() {
    let Setup { mut t, seen, mem } = setup();
    let status = negotiate(&mut t, super::VIRTIO_F_VERSION_1);
    setup_queue(&mut t, 0, &DriverQueue::new(&mem, 0x1_0000, 256));
    reg_write(&mut t, VIRTIO_MMIO_STATUS, status | S_DRIVER_OK);
    reg_write(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 2);
    reg_write(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0x1_0000);
    assert!(seen.lock().unwrap().notified.is_empty());
    assert_eq!(reg_read(&mut t, VIRTIO_MMIO_STATUS) & S_NEEDS_RESET, 0);
}

#[test]
fn cmdline_arg_names_size_base_and_irq() {
    assert_eq!(
        mmio_cmdline_arg(0xd000_1000, 0x1000, 5),
        "virtio_mmio.device=4K@0xd0001000:5"
    );
    assert_eq!(
        mmio_cmdline_arg(0xc000_1000, 0x1000, 6),
        "virtio_mmio.device=4K@0xc0001000:6"
    );
    assert_eq!(
        mmio_cmdline_arg(0x1000, 0x200000, 9),
        "virtio_mmio.device=2M@0x1000:9"
    );
    assert_eq!(
        mmio_cmdline_arg(0x1000, 100, 9),
        "virtio_mmio.device=100@0x1000:9"
    );
}

#[test]
fn devices_with_bad_queue_sizes_are_refused() {
    for sizes in [vec![0], vec![100], vec![256, 65535]] {
        let mem = guest_memory(1 << 16);
        let fake = Fake {
            seen: Arc::default(),
            sizes,
            interrupt: None,
            fail_processing: false,
        };
        let irq = Arc::new(IrqLine::new(5).unwrap());
        assert!(MmioTransport::new(Box::new(fake), mem, irq).is_err());
    }
}
