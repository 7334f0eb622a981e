//! Passing a PCI function through to the guest (`vmm run --device`): a vfio-user server's
//! device (`vfio-user:SOCKET`) or a host device bound to vfio-pci (`vfio:SYSFS_DIR`), opened
//! over its transport, wrapped in a [`PassthroughDevice`], with all guest RAM DMA-mapped at
//! IOVA = GPA, its BARs placed on bus 0 and its mmappable BAR pieces mapped as `DeviceBar`
//! memslots. Its MSI/MSI-X vectors are KVM routes whose irqfds listen on the eventfds VFIO
//! signals ([`MsiRoutes`]), so interrupts never pass through the VMM.
//!
//! A server that dies while the guest runs: every trapped access then fails in the transport,
//! so the guest reads all-ones (the "device gone" answer of PCI) and its writes are dropped;
//! the failures are logged (the first ones kept) and the VM keeps running. The mapped BAR
//! pieces stay valid memory (our mapping holds the server's file), so nothing faults.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use devices::pci::{PciAddress, PciDevice};
use devices::vfio::open::{self, OpenError, Prefer};
use devices::vfio::passthrough::{
    chain, KernelError, KernelTransport, PassthroughDevice, PassthroughError, UserError,
    UserTransport, VfioTransport,
};

use super::{MsiRoutes, Pci, PciError};
use crate::machine::report::PassthroughReport;
use crate::memory::GuestMemory;
use crate::vstate::vm::Vm;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// What `--device` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    /// A device served over vfio-user on this Unix socket.
    VfioUser(PathBuf),
    /// A host PCI device bound to vfio-pci: its sysfs directory, and how to open it.
    Vfio { sysfs: PathBuf, prefer: Prefer },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error(
        "'{0}': expected vfio-user:SOCKET or vfio:/sys/bus/pci/devices/DDDD:BB:DD.F[,iommu=group|iommufd]"
    )]
    Kind(String),
    #[error("'{0}': the path is empty")]
    EmptyPath(String),
    #[error("'{spec}': unknown option '{option}' (expected iommu=group or iommu=iommufd)")]
    Option { spec: String, option: String },
}

impl FromStr for DeviceSpec {
    type Err = SpecError;

    fn from_str(spec: &str) -> Result<Self, SpecError> {
        let (kind, rest) = spec
            .split_once(':')
            .ok_or_else(|| SpecError::Kind(spec.to_string()))?;
        match kind {
            "vfio-user" if !rest.is_empty() => Ok(DeviceSpec::VfioUser(rest.into())),
            "vfio" => {
                let mut parts = rest.split(',');
                let path = parts.next().unwrap_or_default();
                if path.is_empty() {
                    return Err(SpecError::EmptyPath(spec.to_string()));
                }
                let mut prefer = Prefer::Any;
                for option in parts {
                    prefer = match option {
                        "iommu=group" => Prefer::Group,
                        "iommu=iommufd" => Prefer::Iommufd,
                        _ => {
                            return Err(SpecError::Option {
                                spec: spec.to_string(),
                                option: option.to_string(),
                            })
                        }
                    };
                }
                Ok(DeviceSpec::Vfio {
                    sysfs: path.into(),
                    prefer,
                })
            }
            "vfio-user" => Err(SpecError::EmptyPath(spec.to_string())),
            _ => Err(SpecError::Kind(spec.to_string())),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::VfioUser(p) => write!(f, "vfio-user:{}", p.display()),
            DeviceSpec::Vfio { sysfs, prefer } => {
                write!(f, "vfio:{}", sysfs.display())?;
                match prefer {
                    Prefer::Any => Ok(()),
                    Prefer::Group => write!(f, ",iommu=group"),
                    Prefer::Iommufd => write!(f, ",iommu=iommufd"),
                }
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("{spec}: {source}")]
    Connect {
        spec: String,
        #[source]
        source: UserError,
    },
    #[error("{spec}: {source}")]
    Open {
        spec: String,
        #[source]
        source: OpenError,
    },
    #[error("{spec}: {source}")]
    Kernel {
        spec: String,
        #[source]
        source: KernelError,
    },
    #[error("{spec}: {what}: {}", chain(source))]
    Device {
        spec: String,
        what: &'static str,
        source: PassthroughError,
    },
    /// Its messages name the device already.
    #[error("{source}")]
    Pci {
        spec: String,
        #[source]
        source: Box<PciError>,
    },
}

/// A passed-through function as the running VM holds it for migration (`Shared`).
#[derive(Clone)]
pub struct PassthroughHandle {
    /// The `--device` spec, for messages.
    pub spec: String,
    pub device: Arc<Mutex<PassthroughDevice>>,
}

impl PassthroughHandle {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, PassthroughDevice> {
        self.device.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A passed-through function on bus 0. Dropping it takes the function off the bus, its
/// memslots first; the device (DMA unmapped, MSI-X off, transport closed, BAR mappings gone)
/// drops with the last reference.
pub struct Attached {
    pci: Pci,
    pub spec: DeviceSpec,
    pub function: PciAddress,
    pub device: Arc<Mutex<PassthroughDevice>>,
    /// What DMA-mapping guest RAM cost (for the run's report).
    pub dma_map: PassthroughReport,
}

impl fmt::Debug for Attached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attached")
            .field("spec", &self.spec)
            .field("function", &self.function)
            .finish()
    }
}

fn transport(spec: &DeviceSpec) -> Result<Box<dyn VfioTransport>, AttachError> {
    let name = spec.to_string();
    match spec {
        DeviceSpec::VfioUser(socket) => UserTransport::connect(socket)
            .map(|t| Box::new(t) as Box<dyn VfioTransport>)
            .map_err(|source| AttachError::Connect { spec: name, source }),
        DeviceSpec::Vfio { sysfs, prefer } => {
            let open_err = |source| AttachError::Open {
                spec: name.clone(),
                source,
            };
            let (real, access) = open::access_of(sysfs, *prefer).map_err(open_err)?;
            let opened = open::open(&real, &access, Path::new("/dev")).map_err(open_err)?;
            tracing::info!("{name}: opened {}", opened.describe());
            KernelTransport::new(opened)
                .map(|t| Box::new(t) as Box<dyn VfioTransport>)
                .map_err(|source| AttachError::Kernel { spec: name, source })
        }
    }
}

/// Opens `spec`, puts the function on `pci` with guest RAM `mem` DMA-mapped and its BAR pieces
/// mapped into the guest. All of it or nothing: on an error nothing stays on the buses, in
/// memslots or mapped.
pub fn attach(
    vm: &Arc<Vm>,
    pci: &Pci,
    mem: &GuestMemory,
    spec: &DeviceSpec,
) -> Result<Attached, AttachError> {
    let name = spec.to_string();
    let device_err = |what| {
        let spec = name.clone();
        move |source| AttachError::Device { spec, what, source }
    };
    let transport = transport(spec)?;
    let routes = Box::new(MsiRoutes::new(vm.clone()));
    let mut device =
        PassthroughDevice::new(transport, routes).map_err(device_err("reading the device"))?;
    let mapping = std::time::Instant::now();
    device
        .map_guest_memory(mem)
        .map_err(device_err("DMA-mapping guest RAM"))?;
    let dma_map = PassthroughReport::new(
        name.clone(),
        match spec {
            DeviceSpec::VfioUser(_) => "vfio-user",
            DeviceSpec::Vfio { .. } => "vfio",
        },
        mem.iter().map(|r| r.len()).sum(),
        mapping.elapsed().as_secs_f64() * 1000.0,
    );
    tracing::info!(
        "{name}: DMA-mapped {} MiB of guest RAM in {:.3} ms ({:.3} ms per GiB)",
        dma_map.dma_mapped_bytes >> 20,
        dma_map.dma_map_ms,
        dma_map.dma_map_ms_per_gib
    );
    // Placed before anything is mapped: a BAR too large for this guest's address space is
    // refused naming the sizes and the physical address bits, not as a failed mmap.
    let device = Arc::new(Mutex::new(device));
    let as_pci: Arc<Mutex<dyn PciDevice>> = device.clone();
    let function = pci
        .add_device(&name, as_pci)
        .map_err(|source| AttachError::Pci {
            spec: name.clone(),
            source: Box::new(source),
        })?;
    let pci_err = |source: PciError| AttachError::Pci {
        spec: name.clone(),
        source: Box::new(source),
    };
    let pieces = device.lock().unwrap_or_else(|p| p.into_inner()).map_bars();
    let pieces = match pieces {
        Ok(p) => p,
        Err(e) => {
            let _ = pci.remove_device(function);
            return Err(device_err("mapping the BARs")(e));
        }
    };
    for piece in &pieces {
        if !piece.writable {
            // A writable memslot over a read-only mapping faults the vCPU on a guest write;
            // trapped, the write goes to the transport, which refuses it as the device would.
            tracing::debug!(
                "{name}: {} +{:#x} is read-only: left trapped",
                piece.slot,
                piece.bar_offset
            );
            continue;
        }
        // SAFETY: the piece is mapped by the device and stays mapped until the device drops;
        // `Attached` holds the device and its Drop removes the function's memslots first.
        let mapped = unsafe {
            pci.bars().map(
                function,
                piece.slot,
                piece.bar_offset,
                piece.size,
                piece.host_addr as u64,
            )
        };
        if let Err(source) = mapped {
            let _ = pci.remove_device(function);
            return Err(pci_err(PciError::Bars {
                device: name.clone(),
                source,
            }));
        }
    }
    tracing::info!("{name}: {}", summary(&device, function, pci));
    Ok(Attached {
        pci: pci.clone(),
        spec: spec.clone(),
        function,
        device,
        dma_map,
    })
}

/// "00:01.0 1234:7e57, BAR0 16M at 0xc1000000 (1 piece mapped), ..." from the device's view.
fn summary(device: &Arc<Mutex<PassthroughDevice>>, function: PciAddress, pci: &Pci) -> String {
    let mut dev = device.lock().unwrap_or_else(|p| p.into_inner());
    let mut ids = [0u8; 4];
    dev.config_read(0, &mut ids);
    let mut out = format!(
        "{function} {:04x}:{:04x}",
        u16::from_le_bytes([ids[0], ids[1]]),
        u16::from_le_bytes([ids[2], ids[3]])
    );
    let layout = dev.bar_layout();
    drop(dev);
    let bars = pci.bars();
    for req in layout.placement_requests() {
        let slot = req.slot;
        let base = bars.base(function, slot).unwrap_or_default();
        let pieces = bars.pieces(function, slot).len();
        out.push_str(&format!(
            ", {slot} {} at {base:#x} ({pieces} mapped)",
            human(req.size)
        ));
    }
    out
}

fn human(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "T"),
        (1 << 30, "G"),
        (1 << 20, "M"),
        (1 << 10, "K"),
    ];
    for (unit, name) in UNITS {
        if bytes >= unit && bytes % unit == 0 {
            return format!("{}{name}", bytes / unit);
        }
    }
    format!("{bytes}B")
}

impl Attached {
    /// The function as a migration or snapshot drives it.
    pub fn handle(&self) -> PassthroughHandle {
        PassthroughHandle {
            spec: self.spec.to_string(),
            device: self.device.clone(),
        }
    }

    /// The device's memory the VMM maps into the guest: the mapped pieces of all its memory
    /// BARs (on a GPU, VRAM and whatever else its BARs expose; on the test device BAR0's memory
    /// pages, BAR1 VRAM and BAR3), as the content truth of the device tracking scenario
    /// watches it. All of them rather than a guess at which BAR is VRAM: the size does not
    /// tell (the test device's BAR3 may be larger than its VRAM).
    pub fn device_memory(&self) -> Option<crate::machine::device_truth::DeviceMemory> {
        let layout = self
            .device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .bar_layout();
        let function = self.function;
        let slots: Vec<_> = layout
            .placement_requests()
            .into_iter()
            .map(|r| r.slot)
            .filter(|&slot| !self.pci.bars().pieces(function, slot).is_empty())
            .collect();
        if slots.is_empty() {
            return None;
        }
        let name = format!(
            "{function} {}",
            slots
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join("+")
        );
        let pci = self.pci.clone();
        Some(crate::machine::device_truth::DeviceMemory {
            name,
            pieces: Arc::new(move || {
                let bars = pci.bars();
                slots
                    .iter()
                    .flat_map(|&slot| bars.pieces(function, slot))
                    .collect()
            }),
        })
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if let Err(e) = self.pci.remove_device(self.function) {
            tracing::warn!("{}: removing {}: {e}", self.spec, self.function);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs_parse_and_print_back() {
        for s in [
            "vfio-user:/tmp/gpu.sock",
            "vfio:/sys/bus/pci/devices/0000:01:00.0",
            "vfio:/sys/bus/pci/devices/0000:01:00.0,iommu=group",
            "vfio:/sys/bus/pci/devices/0000:01:00.0,iommu=iommufd",
        ] {
            let spec: DeviceSpec = s.parse().unwrap();
            assert_eq!(spec.to_string(), s);
        }
    }

    #[test]
    fn bad_device_specs_are_refused_precisely() {
        let err = |s: &str| s.parse::<DeviceSpec>().unwrap_err().to_string();
        assert!(err("gpu0").contains("expected vfio-user:SOCKET or vfio:"));
        assert!(err("pci:/x").contains("expected vfio-user:SOCKET"));
        assert!(err("vfio-user:").contains("the path is empty"));
        assert!(err("vfio:").contains("the path is empty"));
        assert!(err("vfio:/sys/x,iommu=magic").contains("unknown option 'iommu=magic'"));
    }

    #[test]
    fn sizes_print_in_their_largest_whole_unit() {
        assert_eq!(human(16 << 20), "16M");
        assert_eq!(human(128 << 30), "128G");
        assert_eq!(human(1 << 40), "1T");
        assert_eq!(human(4096), "4K");
        assert_eq!(human(1000), "1000B");
    }
}
