//! Creates the guest's devices and places them on the port-I/O and MMIO buses, with their
//! interrupts wired to KVM irqfds.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::bus::{Bus, BusError};
use devices::legacy::boot_timer::BootTimer;
use devices::legacy::i8042::I8042;
use devices::legacy::serial::{OutputObserver, Serial};
use devices::virtio::block::Block;
use devices::virtio::mmio::{mmio_cmdline_arg, MmioTransport};
use guest_abi::{boot_timer, ports, virtio_mmio};
use vmm_sys_util::eventfd::EventFd;

use super::stdin::InputSink;
use super::DiskConfig;
use crate::memory::GuestMemory;
use crate::micro_port::MicroPort;
use crate::vstate::vm::{Vm, VmError};

#[derive(Debug, thiserror::Error)]
pub enum DeviceSetupError {
    #[error("cannot create an interrupt eventfd: {0}")]
    EventFd(std::io::Error),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("placing {what} on the bus failed: {source}")]
    Bus { what: String, source: BusError },
    #[error("UART: {0}")]
    Serial(String),
    #[error("cannot open disk image {path}: {source}")]
    Disk {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("virtio-blk {path}: {reason}")]
    Block { path: PathBuf, reason: String },
    #[error("at most {max} disks are supported, got {got}", max = virtio_mmio::MAX_DEVICES)]
    TooManyDisks { got: usize },
}

pub struct DeviceOptions<'a> {
    pub console: Box<dyn std::io::Write + Send>,
    pub observer: OutputObserver,
    pub disks: &'a [DiskConfig],
    /// For the micro guest: its port device (pass counter, hook at each pass, vCPU count).
    pub micro: Option<MicroPort>,
    pub start: Instant,
    pub boot_timer: Sender<Duration>,
}

/// The buses every vCPU thread dispatches to, and the UART for console input.
pub struct Devices {
    pub pio: Bus,
    pub mmio: Bus,
    pub serial: Arc<Mutex<Serial>>,
    /// The virtio-mmio transports, in device order (for saving and restoring their state).
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
}

impl Devices {
    /// A sink that feeds console input bytes into the UART's receive queue.
    pub fn console_input(&self) -> InputSink {
        let serial = self.serial.clone();
        Box::new(move |bytes| {
            // The UART FIFO holds 64 bytes: hand over the rest as the guest drains it (its vCPU
            // threads take the interrupts, so waiting here is safe), giving up after ~1 s.
            let mut rest = bytes;
            let mut idle_ms = 0;
            while !rest.is_empty() && idle_ms < 1000 {
                let accepted = match serial.lock() {
                    Ok(mut s) => s.enqueue_input(rest).unwrap_or(0),
                    Err(_) => return,
                };
                rest = &rest[accepted..];
                if accepted == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                    idle_ms += 1;
                }
            }
            if !rest.is_empty() {
                tracing::warn!(
                    "console input: guest not reading, {} bytes dropped",
                    rest.len()
                );
            }
        })
    }
}

/// The kernel command-line argument announcing virtio-mmio device `index`.
pub fn virtio_cmdline(index: u32) -> String {
    mmio_cmdline_arg(
        virtio_mmio::BASE + index as u64 * virtio_mmio::SIZE,
        virtio_mmio::SIZE,
        virtio_mmio::FIRST_IRQ + index,
    )
}

fn irq(vm: &Vm, gsi: u32) -> Result<EventFd, DeviceSetupError> {
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceSetupError::EventFd)?;
    vm.register_irqfd(&evt, gsi)?;
    Ok(evt)
}

fn place(
    bus: &mut Bus,
    what: &str,
    dev: Arc<Mutex<dyn devices::bus::BusDevice>>,
    base: u64,
    len: u64,
) -> Result<(), DeviceSetupError> {
    bus.insert(dev, base, len)
        .map_err(|source| DeviceSetupError::Bus {
            what: what.to_string(),
            source,
        })
}

pub fn create(
    vm: &Vm,
    mem: &GuestMemory,
    opts: DeviceOptions<'_>,
) -> Result<Devices, DeviceSetupError> {
    let mut pio = Bus::new();
    let mut mmio = Bus::new();
    let mut transports = Vec::new();

    let mut serial = Serial::new(irq(vm, ports::COM1_IRQ)?, opts.console)
        .map_err(|e| DeviceSetupError::Serial(e.to_string()))?;
    serial.set_observer(opts.observer);
    let serial = Arc::new(Mutex::new(serial));
    place(
        &mut pio,
        "COM1 UART",
        serial.clone(),
        ports::COM1 as u64,
        ports::COM1_LEN as u64,
    )?;

    // One device over 0x60..0x65 so that both the data (0x60) and command (0x64) ports reach it.
    let i8042 = Arc::new(Mutex::new(I8042::new()));
    let i8042_len = (ports::I8042_CMD - ports::I8042_DATA + 1) as u64;
    place(
        &mut pio,
        "i8042",
        i8042,
        ports::I8042_DATA as u64,
        i8042_len,
    )?;

    if let Some(port) = opts.micro {
        let port = Arc::new(Mutex::new(port));
        place(
            &mut pio,
            "micro guest ports",
            port,
            ports::MICRO_PASS as u64,
            ports::MICRO_LEN as u64,
        )?;
    }

    let timer = BootTimer::new(opts.start).with_sender(opts.boot_timer);
    place(
        &mut mmio,
        "boot timer",
        Arc::new(Mutex::new(timer)),
        boot_timer::GPA,
        boot_timer::SIZE,
    )?;

    if opts.disks.len() > virtio_mmio::MAX_DEVICES as usize {
        return Err(DeviceSetupError::TooManyDisks {
            got: opts.disks.len(),
        });
    }
    for (i, disk) in opts.disks.iter().enumerate() {
        let file = OpenOptions::new()
            .read(true)
            .write(!disk.read_only)
            .open(&disk.path)
            .map_err(|source| DeviceSetupError::Disk {
                path: disk.path.clone(),
                source,
            })?;
        let serial = format!("vmm-disk{i}");
        let block =
            Block::new(file, disk.read_only, &serial).map_err(|e| DeviceSetupError::Block {
                path: disk.path.clone(),
                reason: e.to_string(),
            })?;
        let gsi = virtio_mmio::FIRST_IRQ + i as u32;
        let transport =
            MmioTransport::new(Box::new(block), mem.clone(), irq(vm, gsi)?).map_err(|e| {
                DeviceSetupError::Block {
                    path: disk.path.clone(),
                    reason: e.to_string(),
                }
            })?;
        let base = virtio_mmio::BASE + i as u64 * virtio_mmio::SIZE;
        let transport = Arc::new(Mutex::new(transport));
        place(
            &mut mmio,
            &format!("virtio-blk {}", disk.path.display()),
            transport.clone(),
            base,
            virtio_mmio::SIZE,
        )?;
        transports.push(transport);
    }
    Ok(Devices {
        pio,
        mmio,
        serial,
        transports,
    })
}
