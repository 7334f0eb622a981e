//! The guest's address map as the host places it: RAM below the 32-bit hole (and above 4 GiB),
//! the 32-bit MMIO window in the hole with its fixed platform ranges, the 64-bit MMIO window
//! after RAM, and port I/O. Every address a device gets comes from one of the three
//! `vm-allocator` allocators here; nothing else picks device addresses.
//!
//! What the guest itself must know (the boot-timer page its agent writes, the ISA ports its
//! drivers probe, the micro guest's identity-mapped RAM) stays in `guest_abi`; this map reserves
//! those ranges so no allocation can land on them.

use std::fmt;

use kvm_bindings::CpuId;
use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};

/// Start of the 32-bit MMIO hole: RAM above this moves to 4 GiB.
pub const MMIO32_START: u64 = 0xc000_0000;
/// End of the hole (4 GiB).
pub const MMIO32_END: u64 = 1 << 32;
/// The architectural area at the top of the hole: IOAPIC, HPET's slot, the local APIC and MSI
/// address window (0xfee0_0000..0xfef0_0000), KVM's real-mode TSS pages (`vm::TSS_ADDRESS`) and
/// the reset vector's firmware area. Reserved whole: a device placed there would shadow one of
/// them or catch MSI writes.
pub const PLATFORM_START: u64 = 0xfec0_0000;
/// In-kernel IOAPIC and local APIC (fixed by the architecture; the MP table announces them).
pub const IOAPIC_GPA: u64 = 0xfec0_0000;
pub const LAPIC_GPA: u64 = 0xfee0_0000;
/// One virtio-mmio device's register window.
pub const VIRTIO_MMIO_SLOT: u64 = 0x1000;
/// Port I/O below this is the ISA range, where legacy devices sit at the ports guests probe
/// (`guest_abi::ports`); allocations (PCI I/O BARs) come from above it.
pub const PIO_ALLOC_START: u64 = 0x1000;
const PIO_END: u64 = 0x1_0000;

/// Physical address bits the guest gets at most. The 64-bit window ends at `2^bits`; KVM must
/// map all of it through the host's two-dimensional paging, which with 4-level EPT/NPT (the
/// common case, and what KVM uses unless the host has 5-level paging) reaches 48 bits. 46 is
/// Cloud Hypervisor's cap too: it leaves room below that limit and is still 64 TiB of window,
/// enough for hundreds of 128 GiB BARs.
pub const MAX_PHYS_BITS: u8 = 46;
/// What a CPU without leaf 0x8000_0008 has (Intel SDM: MAXPHYADDR defaults to 36).
const DEFAULT_PHYS_BITS: u8 = 36;
/// AMD reserves [0xfd_0000_0000, 1 TiB) for HyperTransport: a BAR there is unreachable on AMD
/// hosts. Reserved on every host so that a guest's map does not depend on the CPU vendor (it
/// would otherwise differ between the two ends of a migration).
const AMD_HT_HOLE: (u64, u64) = (0xfd_0000_0000, 1 << 40);
/// Memory BARs get at least a page of their own, so that each can be mapped or trapped alone.
const MIN_MEM_BAR_ALIGN: u64 = 4096;

// The micro guest keeps its workload in the RAM below `MICRO_REGION_END`, identity mapped: the
// hole must not start lower.
const _: () = assert!(MMIO32_START >= guest_abi::layout::MICRO_REGION_END);
// The boot timer's page, fixed in the guest ABI, must lie in the hole below the platform area.
const _: () = assert!(
    guest_abi::boot_timer::GPA >= MMIO32_START
        && guest_abi::boot_timer::GPA + guest_abi::boot_timer::SIZE <= PLATFORM_START
);

#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    #[error("cannot set up the {window} window [{start:#x}, {end:#x}): {source}")]
    Window {
        window: Window,
        start: u64,
        end: u64,
        #[source]
        source: vm_allocator::Error,
    },
    #[error("cannot reserve {what} at {base:#x} (+{size:#x}) in the {window} window: {source}")]
    Reserve {
        what: &'static str,
        window: Window,
        base: u64,
        size: u64,
        #[source]
        source: vm_allocator::Error,
    },
    #[error("no room for {what} ({}) in the {window} window: {source}", Size(*.size))]
    Exhausted {
        what: &'static str,
        window: Window,
        size: u64,
        #[source]
        source: vm_allocator::Error,
    },
    #[error("{device}: {bar} is {} bytes, not a power of two as PCI requires", .size)]
    BarSize {
        device: String,
        bar: BarSlot,
        size: u64,
    },
    #[error(
        "{} does not fit: it needs {}; {} ({}) finds no naturally aligned room in the {} window \
         {} of a guest with {} physical address bits",
        .unfit.device, Bars(&.unfit.bars), .unfit.bar, Size(.unfit.size), .unfit.window,
        WindowRange(.unfit.range), .unfit.phys_bits
    )]
    DeviceDoesNotFit {
        /// Boxed: the details are large, and every error on the way up carries this enum.
        unfit: Box<Unfit>,
        #[source]
        source: Option<vm_allocator::Error>,
    },
}

/// What [`AddressError::DeviceDoesNotFit`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unfit {
    pub device: String,
    pub bars: Vec<BarRequest>,
    /// The first region that found no room (larger ones are placed first).
    pub bar: BarSlot,
    pub size: u64,
    pub window: Window,
    /// The window's [start, end), if the guest has one of this kind at all.
    pub range: Option<(u64, u64)>,
    pub phys_bits: u8,
}

/// The address spaces devices are placed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    PortIo,
    Mmio32,
    Mmio64,
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Window::PortIo => "port I/O",
            Window::Mmio32 => "32-bit MMIO",
            Window::Mmio64 => "64-bit MMIO",
        })
    }
}

/// A placed range of guest-physical (or port) addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub base: u64,
    pub size: u64,
}

impl Range {
    pub fn end(&self) -> u64 {
        self.base + self.size
    }
    fn of(r: RangeInclusive) -> Self {
        Range {
            base: r.start(),
            size: r.len(),
        }
    }
    fn inclusive(&self) -> Option<RangeInclusive> {
        RangeInclusive::new(self.base, self.end().checked_sub(1)?).ok()
    }
}

/// Which register of a PCI function a region belongs to: the PCI model's own.
pub use devices::pci::BarSlot;

/// What kind of address a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    Io,
    Mem32,
    Mem64 { prefetchable: bool },
}

/// One region a device asks for: a BAR (or the expansion ROM, always 32-bit memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarRequest {
    pub slot: BarSlot,
    pub kind: BarKind,
    pub size: u64,
}

impl BarRequest {
    fn window(&self) -> Window {
        match (self.slot, self.kind) {
            (BarSlot::Rom, _) => Window::Mmio32,
            (_, BarKind::Io) => Window::PortIo,
            (_, BarKind::Mem32) => Window::Mmio32,
            (_, BarKind::Mem64 { .. }) => Window::Mmio64,
        }
    }
    /// Natural alignment (PCI decodes a BAR by its size), at least a page for memory.
    fn align(&self) -> u64 {
        match self.window() {
            Window::PortIo => self.size,
            _ => self.size.max(MIN_MEM_BAR_ALIGN),
        }
    }
}

impl fmt::Display for BarRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.slot, Size(self.size))?;
        match (self.slot, self.kind) {
            (BarSlot::Rom, _) => Ok(()),
            (_, BarKind::Io) => f.write_str(" (I/O)"),
            (_, BarKind::Mem32) => f.write_str(" (32-bit)"),
            (_, BarKind::Mem64 { prefetchable: true }) => f.write_str(" (64-bit, prefetchable)"),
            (
                _,
                BarKind::Mem64 {
                    prefetchable: false,
                },
            ) => f.write_str(" (64-bit)"),
        }
    }
}

/// Where one BAR went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarPlacement {
    pub request: BarRequest,
    pub range: Range,
}

/// The guest's physical address bits: what KVM supports (leaf 0x8000_0008; EAX[23:16], when
/// set, is the guest-physical limit KVM's paging imposes and wins over EAX[7:0]), capped at
/// [`MAX_PHYS_BITS`]. CPUID setup gives the guest this same value, so both sides agree by
/// construction.
pub fn guest_phys_bits(supported: &CpuId) -> u8 {
    let host = supported
        .as_slice()
        .iter()
        .find(|e| e.function == 0x8000_0008)
        .map(|e| {
            let phys = (e.eax & 0xff) as u8;
            match ((e.eax >> 16) & 0xff) as u8 {
                0 => phys,
                guest => guest.min(phys),
            }
        })
        .filter(|&bits| bits > 32)
        .unwrap_or(DEFAULT_PHYS_BITS);
    host.min(MAX_PHYS_BITS)
}

/// The host-side guest physical and port-I/O map of one VM.
#[derive(Debug)]
pub struct AddressMap {
    phys_bits: u8,
    pio: AddressAllocator,
    mmio32: AddressAllocator,
    /// None when RAM already reaches the top of the guest's physical address space.
    mmio64: Option<AddressAllocator>,
}

impl AddressMap {
    /// The map for a guest whose RAM ends (exclusive) at `ram_end` and whose CPUs have
    /// `phys_bits` physical address bits.
    pub fn new(ram_end: u64, phys_bits: u8) -> Result<Self, AddressError> {
        let window = |window, start: u64, end: u64| {
            AddressAllocator::new(start, end - start).map_err(|source| AddressError::Window {
                window,
                start,
                end,
                source,
            })
        };
        let pio = window(Window::PortIo, PIO_ALLOC_START, PIO_END)?;
        let mut mmio32 = window(Window::Mmio32, MMIO32_START, MMIO32_END)?;
        for (what, base, size) in [
            (
                "the boot timer",
                guest_abi::boot_timer::GPA,
                guest_abi::boot_timer::SIZE,
            ),
            (
                "the platform area (IOAPIC, LAPIC/MSI, firmware)",
                PLATFORM_START,
                MMIO32_END - PLATFORM_START,
            ),
        ] {
            reserve(&mut mmio32, Window::Mmio32, what, base, size)?;
        }
        let top = 1u64 << phys_bits.min(63);
        let start = ram_end.max(MMIO32_END);
        let mmio64 = if start < top {
            let mut a = window(Window::Mmio64, start, top)?;
            let (ht_start, ht_end) = AMD_HT_HOLE;
            let (lo, hi) = (ht_start.max(start), ht_end.min(top));
            if lo < hi {
                reserve(
                    &mut a,
                    Window::Mmio64,
                    "AMD's HyperTransport hole",
                    lo,
                    hi - lo,
                )?;
            }
            Some(a)
        } else {
            None
        };
        tracing::debug!(
            phys_bits,
            mmio64 = ?mmio64.as_ref().map(|a| (a.base(), a.end())),
            "guest address map"
        );
        Ok(Self {
            phys_bits,
            pio,
            mmio32,
            mmio64,
        })
    }

    pub fn phys_bits(&self) -> u8 {
        self.phys_bits
    }

    /// [start, end) of the 32-bit MMIO window (fixed reservations inside it included).
    pub fn mmio32_window(&self) -> (u64, u64) {
        (self.mmio32.base(), self.mmio32.end() + 1)
    }

    /// [start, end) of the 64-bit MMIO window, if the guest has one.
    pub fn mmio64_window(&self) -> Option<(u64, u64)> {
        self.mmio64.as_ref().map(|a| (a.base(), a.end() + 1))
    }

    /// A virtio-mmio register window, the lowest free page of the 32-bit window.
    pub fn allocate_virtio_mmio(&mut self) -> Result<Range, AddressError> {
        self.mmio32
            .allocate(VIRTIO_MMIO_SLOT, VIRTIO_MMIO_SLOT, AllocPolicy::FirstMatch)
            .map(Range::of)
            .map_err(|source| AddressError::Exhausted {
                what: "a virtio-mmio device",
                window: Window::Mmio32,
                size: VIRTIO_MMIO_SLOT,
                source,
            })
    }

    /// Places every BAR of one device, naturally aligned, or none of them: on failure the error
    /// names all the sizes the device needs and the guest's physical address bits. Larger BARs
    /// are placed first, so small ones do not break up room a large one needs.
    pub fn place_device(
        &mut self,
        device: &str,
        bars: &[BarRequest],
    ) -> Result<Vec<BarPlacement>, AddressError> {
        if let Some(bad) = bars.iter().find(|b| !b.size.is_power_of_two()) {
            return Err(AddressError::BarSize {
                device: device.to_string(),
                bar: bad.slot,
                size: bad.size,
            });
        }
        let mut order: Vec<&BarRequest> = bars.iter().collect();
        order.sort_by_key(|b| std::cmp::Reverse(b.size));
        let mut placed: Vec<BarPlacement> = Vec::with_capacity(bars.len());
        for bar in order {
            let window = bar.window();
            let allocated = match self.allocator(window) {
                Some(a) => a
                    .allocate(bar.size, bar.align(), AllocPolicy::FirstMatch)
                    .map_err(Some),
                None => Err(None),
            };
            match allocated {
                Ok(r) => placed.push(BarPlacement {
                    request: *bar,
                    range: Range::of(r),
                }),
                Err(source) => {
                    self.release_device(&placed);
                    let unfit = Unfit {
                        device: device.to_string(),
                        bars: bars.to_vec(),
                        bar: bar.slot,
                        size: bar.size,
                        window,
                        range: self.range_of(window),
                        phys_bits: self.phys_bits,
                    };
                    return Err(AddressError::DeviceDoesNotFit {
                        unfit: Box::new(unfit),
                        source,
                    });
                }
            }
        }
        // Back in the caller's order.
        placed.sort_by_key(|p| bars.iter().position(|b| *b == p.request));
        Ok(placed)
    }

    /// Gives back what `place_device` placed (a device removed, or a placement undone).
    pub fn release_device(&mut self, placed: &[BarPlacement]) {
        for p in placed {
            let window = p.request.window();
            let freed = match (self.allocator(window), p.range.inclusive()) {
                (Some(a), Some(r)) => a.free(&r),
                _ => Err(vm_allocator::Error::ResourceNotAvailable),
            };
            if let Err(e) = freed {
                tracing::warn!("releasing {} at {:#x}: {e}", p.request, p.range.base);
            }
        }
    }

    fn allocator(&mut self, window: Window) -> Option<&mut AddressAllocator> {
        match window {
            Window::PortIo => Some(&mut self.pio),
            Window::Mmio32 => Some(&mut self.mmio32),
            Window::Mmio64 => self.mmio64.as_mut(),
        }
    }

    fn range_of(&self, window: Window) -> Option<(u64, u64)> {
        match window {
            Window::PortIo => Some((self.pio.base(), self.pio.end() + 1)),
            Window::Mmio32 => Some(self.mmio32_window()),
            Window::Mmio64 => self.mmio64_window(),
        }
    }
}

fn reserve(
    a: &mut AddressAllocator,
    window: Window,
    what: &'static str,
    base: u64,
    size: u64,
) -> Result<(), AddressError> {
    a.allocate(size, MIN_MEM_BAR_ALIGN, AllocPolicy::ExactMatch(base))
        .map(|_| ())
        .map_err(|source| AddressError::Reserve {
            what,
            window,
            base,
            size,
            source,
        })
}

/// A size in the largest binary unit that divides it (`16 MiB`, `128 GiB`, `4097 bytes`).
struct Size(u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")];
        for (shift, unit) in units {
            if self.0 >= 1 << shift && self.0 % (1 << shift) == 0 {
                return write!(f, "{} {unit}", self.0 >> shift);
            }
        }
        write!(f, "{} bytes", self.0)
    }
}

struct Bars<'a>(&'a [BarRequest]);

impl fmt::Display for Bars<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, bar) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{bar}")?;
        }
        Ok(())
    }
}

struct WindowRange(Option<(u64, u64)>);

impl fmt::Display for WindowRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some((start, end)) => write!(f, "[{start:#x}, {end:#x})"),
            None => f.write_str("(none: RAM reaches the top of the address space)"),
        }
    }
}

#[cfg(test)]
#[path = "addresses_tests.rs"]
mod tests;
