//! Creates the guest's devices and places them on the port-I/O and MMIO buses, and registers
//! each stateful one under its id: the one place that names the VM's devices. Their MMIO slots
//! and interrupts come from the VM's resources (`vstate::resources`); fixed ISA ports and the
//! boot timer's page are where the guest expects them (`guest_abi`). Every VM has PCI bus 0
//! (host bridge, mechanism #1 at 0xCF8: `machine::pci`); PCI functions are added to it.

use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::bus::{Bus, BusError};
use devices::device_states::{StateRegistry, StatesError};
use devices::interrupt::Interrupt;
use devices::legacy::boot_timer::BootTimer;
use devices::legacy::i8042::I8042;
use devices::legacy::serial::{OutputObserver, Serial};
use devices::virtio::block::Block;
use devices::virtio::mmio::{mmio_cmdline_arg, MmioTransport};
use guest_abi::{boot_timer, ports};

use super::pci::{self, AttachError, Attached, DeviceSpec, Pci, PciError};
use super::stdin::InputSink;
use super::DiskConfig;
use crate::memory::GuestMemory;
use crate::micro_port::MicroPort;
use crate::vstate::resources::{AddressError, InterruptError};
use crate::vstate::vm::Vm;

#[derive(Debug, thiserror::Error)]
pub enum DeviceSetupError {
    #[error("wiring the interrupt of {what}: {source}")]
    Interrupt {
        what: String,
        #[source]
        source: InterruptError,
    },
    /// Boxed: address errors are large, and this one rides inside every machine error.
    #[error("placing {what}: {source}")]
    Address {
        what: String,
        #[source]
        source: Box<AddressError>,
    },
    #[error("placing {what} on the bus failed: {source}")]
    Bus {
        what: String,
        #[source]
        source: BusError,
    },
    #[error("UART: {0}")]
    Serial(#[source] devices::legacy::serial::SerialError),
    #[error(transparent)]
    Disk(#[from] crate::host_file::HostFileError),
    #[error("virtio-blk {path}: {source}")]
    Block {
        path: PathBuf,
        #[source]
        source: devices::virtio::block::BlockError,
    },
    #[error("virtio-blk {path}: {source}")]
    Transport {
        path: PathBuf,
        #[source]
        source: devices::virtio::mmio::MmioError,
    },
    #[error("at most {MAX_DISKS} disks are supported, got {got}")]
    TooManyDisks { got: usize },
    #[error("registering device state: {0}")]
    State(#[source] StatesError),
    /// Boxed: PCI errors are large (BAR and memslot details).
    #[error("PCI: {0}")]
    Pci(#[source] Box<PciError>),
    /// Boxed: kept small (clippy result_large_err).
    #[error("passing a device through")]
    Passthrough(#[source] Box<AttachError>),
}

pub const SERIAL_ID: &str = "serial0";
pub const I8042_ID: &str = "i8042";
pub const BOOT_TIMER_ID: &str = "boot-timer";
pub const MICRO_PORT_ID: &str = "micro-port";

/// The id of the virtio-blk device for disk `index`.
pub fn blk_id(index: usize) -> String {
    format!("virtio-blk{index}")
}

/// The ids of the devices `create` builds (stateful or not), in order, for a guest with or
/// without the micro guest's port and with `disks` disks: what a migration's Hello lists and
/// what its destination checks that list against.
pub fn device_ids(micro: bool, disks: usize) -> Vec<String> {
    let mut ids = vec![SERIAL_ID.to_string(), I8042_ID.into(), BOOT_TIMER_ID.into()];
    if micro {
        ids.push(MICRO_PORT_ID.into());
    }
    ids.extend((0..disks).map(blk_id));
    ids
}

/// The state id of the `i`th passed-through function (`--device` order).
pub fn passthrough_id(i: usize) -> String {
    format!("passthrough{i}")
}

/// Most virtio-blk disks: their GSIs (5, 6, ...) then stay among the ISA-range IRQs 5-12, the
/// ones guests have been booted with. The pin allocator alone would allow 19.
pub const MAX_DISKS: usize = 8;

pub struct DeviceOptions<'a> {
    pub console: Box<dyn std::io::Write + Send>,
    pub observer: OutputObserver,
    pub disks: &'a [DiskConfig],
    /// PCI functions to pass through.
    pub passthrough: &'a [DeviceSpec],
    /// For the micro guest: its port device (pass counter, hook at each pass, vCPU count).
    pub micro: Option<MicroPort>,
    pub start: Instant,
    pub boot_timer: Sender<Duration>,
}

/// The buses every vCPU thread dispatches to, the UART for console input, and the stateful
/// devices by id (for snapshots and migration).
pub struct Devices {
    pub pio: Bus,
    pub mmio: Bus,
    pub serial: Arc<Mutex<Serial>>,
    /// PCI bus 0: where PCI functions (passthrough) are added.
    pub pci: Pci,
    /// The passed-through functions on it (dropping one takes it off the bus).
    pub passthrough: Vec<Attached>,
    pub states: StateRegistry,
    /// The kernel command-line argument announcing each virtio-mmio transport, in disk order.
    pub virtio_cmdline: Vec<String>,
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
    vm: &Arc<Vm>,
    mem: &GuestMemory,
    opts: DeviceOptions<'_>,
) -> Result<Devices, DeviceSetupError> {
    let mut pio = Bus::new();
    let mut mmio = Bus::new();
    let mut states = StateRegistry::new();
    let mut register = |id: &str, dev: Arc<Mutex<dyn devices::Stateful>>| {
        states.add(id, dev).map_err(DeviceSetupError::State)
    };
    let mut virtio_cmdline = Vec::new();
    let resources = vm.resources();

    let com1_irq = resources
        .interrupts()
        .isa_line(vm.fd(), ports::COM1_IRQ)
        .map_err(|source| DeviceSetupError::Interrupt {
            what: "COM1".to_string(),
            source,
        })?;
    let mut serial = Serial::new(com1_irq, opts.console).map_err(DeviceSetupError::Serial)?;
    serial.set_observer(opts.observer);
    let serial = Arc::new(Mutex::new(serial));
    place(
        &mut pio,
        "COM1 UART",
        serial.clone(),
        ports::COM1 as u64,
        ports::COM1_LEN as u64,
    )?;
    register(SERIAL_ID, serial.clone())?;

    // One device over 0x60..0x65 so that both the data (0x60) and command (0x64) ports reach it.
    let i8042 = Arc::new(Mutex::new(I8042::new()));
    let i8042_len = (ports::I8042_CMD - ports::I8042_DATA + 1) as u64;
    place(
        &mut pio,
        I8042_ID,
        i8042,
        ports::I8042_DATA as u64,
        i8042_len,
    )?;

    if let Some(port) = opts.micro {
        let port = Arc::new(Mutex::new(port));
        place(
            &mut pio,
            "micro guest ports",
            port.clone(),
            ports::MICRO_PASS as u64,
            ports::MICRO_LEN as u64,
        )?;
        register(MICRO_PORT_ID, port)?;
    }

    let pci =
        Pci::new(vm.clone(), &mut pio, &mmio).map_err(|e| DeviceSetupError::Pci(Box::new(e)))?;

    let timer = BootTimer::new(opts.start).with_sender(opts.boot_timer);
    place(
        &mut mmio,
        BOOT_TIMER_ID,
        Arc::new(Mutex::new(timer)),
        boot_timer::GPA,
        boot_timer::SIZE,
    )?;

    if opts.disks.len() > MAX_DISKS {
        return Err(DeviceSetupError::TooManyDisks {
            got: opts.disks.len(),
        });
    }
    for (i, disk) in opts.disks.iter().enumerate() {
        let what = format!("virtio-blk {}", disk.path.display());
        let file = crate::host_file::open_disk(&disk.path, disk.read_only)?;
        let serial = format!("vmm-disk{i}");
        let block = Block::new(file, disk.read_only, &serial).map_err(|source| {
            DeviceSetupError::Block {
                path: disk.path.clone(),
                source,
            }
        })?;
        let slot = resources
            .addresses()
            .allocate_virtio_mmio()
            .map_err(|source| DeviceSetupError::Address {
                what: what.clone(),
                source: Box::new(source),
            })?;
        let irq = resources.interrupts().irq_line(vm.fd()).map_err(|source| {
            DeviceSetupError::Interrupt {
                what: what.clone(),
                source,
            }
        })?;
        let gsi = irq.gsi();
        let transport =
            MmioTransport::new(Box::new(block), mem.clone(), irq).map_err(|source| {
                DeviceSetupError::Transport {
                    path: disk.path.clone(),
                    source,
                }
            })?;
        let transport = Arc::new(Mutex::new(transport));
        place(&mut mmio, &what, transport.clone(), slot.base, slot.size)?;
        tracing::debug!("{what}: registers at {:#x}, GSI {gsi}", slot.base);
        register(&blk_id(i), transport)?;
        virtio_cmdline.push(mmio_cmdline_arg(slot.base, slot.size, gsi));
    }
    let mut passthrough = Vec::new();
    for (i, spec) in opts.passthrough.iter().enumerate() {
        let attached = pci::passthrough::attach(vm, &pci, mem, spec)
            .map_err(|e| DeviceSetupError::Passthrough(Box::new(e)))?;
        let state = pci::passthrough_state::PassthroughState::new(
            pci.clone(),
            attached.function,
            attached.device.clone(),
        );
        register(&passthrough_id(i), Arc::new(Mutex::new(state)))?;
        passthrough.push(attached);
    }
    Ok(Devices {
        pio,
        mmio,
        serial,
        pci,
        passthrough,
        states,
        virtio_cmdline,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;

    /// The ids a Hello lists are those the VM registers its state under, so a destination that
    /// accepted the Hello has a device for every state the source sends.
    #[test]
    fn every_stateful_device_is_registered_under_an_id_the_description_lists() {
        let vm = Arc::new(Vm::new(16 << 20).unwrap());
        let ram = GuestRam::new(16 << 20).unwrap();
        let disk = tempfile::NamedTempFile::new().unwrap();
        disk.as_file().set_len(1 << 20).unwrap();
        let disks: Vec<DiskConfig> = (0..2)
            .map(|_| DiskConfig {
                path: disk.path().to_path_buf(),
                read_only: true,
            })
            .collect();
        let (boot_timer, _rx) = std::sync::mpsc::channel();
        let devs = create(
            &vm,
            ram.memory(),
            DeviceOptions {
                console: Box::new(std::io::sink()),
                observer: Box::new(|_| {}),
                disks: &disks,
                passthrough: &[],
                micro: Some(MicroPort::default()),
                start: Instant::now(),
                boot_timer,
            },
        )
        .unwrap();
        let registered = devs.states.devices();
        assert_eq!(
            registered,
            [
                (SERIAL_ID.to_string(), "serial"),
                (MICRO_PORT_ID.to_string(), "micro-port"),
                (blk_id(0), "virtio-blk"),
                (blk_id(1), "virtio-blk"),
            ]
        );
        let listed = device_ids(true, disks.len());
        for (id, _) in &registered {
            assert!(listed.contains(id), "{id} not in {listed:?}");
        }
    }
}
