//! The passthrough device against the H100-shaped mock transport: the shadow, BARs, MSI-X,
//! DMA, reset, teardown, and bad answers from the device giving precise errors.

use std::sync::{Arc, Mutex};

use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::{PassthroughDevice, PassthroughError, PassthroughRoutes};
use super::mock::*;
use super::shadow::ShadowError;
use super::transport::{MSIX_IRQ, MSI_IRQ, ROM_REGION};
use crate::pci::bar::{BarError, BarKind, BarSlot};
use crate::pci::config::{ConfigEvent, COMMAND};
use crate::pci::device::PciDevice;
use crate::pci::msix::{MsixError, MSIX_ENABLE};
use crate::pci::vectors::{MsiMessage, RouteError, VectorRoutes};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Unmask(u16, MsiMessage),
    Mask(u16),
    Trigger(u16),
}

/// The owner's routes: records calls, hands out one eventfd per vector.
#[derive(Clone, Default)]
struct Routes {
    calls: Arc<Mutex<Vec<Route>>>,
    fds: Arc<Mutex<Vec<(u16, EventFd)>>>,
}

impl Routes {
    fn take(&self) -> Vec<Route> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
    /// Reads vector `v`'s eventfd: the count of signals since the last read.
    fn signalled(&self, v: u16) -> u64 {
        let fds = self.fds.lock().unwrap();
        let fd = &fds.iter().find(|(n, _)| *n == v).unwrap().1;
        fd.read().unwrap_or(0)
    }
}

impl VectorRoutes for Routes {
    fn unmask(&mut self, vector: u16, msg: MsiMessage) -> Result<(), RouteError> {
        self.calls.lock().unwrap().push(Route::Unmask(vector, msg));
        Ok(())
    }
    fn mask(&mut self, vector: u16) -> Result<(), RouteError> {
        self.calls.lock().unwrap().push(Route::Mask(vector));
        Ok(())
    }
    fn trigger(&mut self, vector: u16) -> Result<(), RouteError> {
        self.calls.lock().unwrap().push(Route::Trigger(vector));
        Ok(())
    }
}

impl PassthroughRoutes for Routes {
    fn eventfd(&mut self, vector: u16) -> Result<EventFd, RouteError> {
        let fd = EventFd::new(EFD_NONBLOCK)?;
        let clone = fd.try_clone()?;
        self.fds.lock().unwrap().push((vector, fd));
        Ok(clone)
    }
}

fn open() -> (PassthroughDevice, MockHandle, Routes) {
    let (t, h) = MockTransport::h100();
    let routes = Routes::default();
    let dev = PassthroughDevice::new(Box::new(t), Box::new(routes.clone())).unwrap();
    h.take_calls();
    (dev, h, routes)
}

/// Opens the mock after `change` to its state; the error it gives.
fn open_err(change: impl FnOnce(&mut MockState)) -> PassthroughError {
    let (t, h) = MockTransport::h100();
    change(&mut h.state());
    match PassthroughDevice::new(Box::new(t), Box::new(Routes::default())) {
        Ok(_) => panic!("opened a device with bad answers"),
        Err(e) => e,
    }
}

fn cfg32(dev: &mut PassthroughDevice, offset: usize) -> u32 {
    let mut b = [0; 4];
    dev.config_read(offset, &mut b);
    u32::from_le_bytes(b)
}

fn wcfg32(dev: &mut PassthroughDevice, offset: usize, v: u32) -> Vec<ConfigEvent> {
    dev.config_write(offset, &v.to_le_bytes())
}

/// Capabilities found: (id, offset).
type Walk<Id> = Vec<(Id, usize)>;

/// The capability lists as a guest walks them, through config reads.
fn guest_walk(dev: &mut PassthroughDevice) -> (Walk<u8>, Walk<u16>) {
    let mut standard = Vec::new();
    let mut ptr = (cfg32(dev, 0x34) & 0xfc) as usize;
    while ptr != 0 && standard.len() < 48 {
        let h = cfg32(dev, ptr);
        standard.push((h as u8, ptr));
        ptr = ((h >> 8) & 0xfc) as usize;
    }
    let mut extended = Vec::new();
    let mut ptr = 0x100;
    while ptr != 0 && extended.len() < 64 {
        let h = cfg32(dev, ptr);
        if h == 0 {
            break;
        }
        extended.push((h as u16, ptr));
        ptr = ((h >> 20) & 0xffc) as usize;
    }
    (standard, extended)
}

#[test]
fn the_shadow_shows_the_ids_and_never_a_host_bar_address() {
    let (mut dev, _, _) = open();
    assert_eq!(
        cfg32(&mut dev, 0),
        u32::from(DEVICE) << 16 | u32::from(VENDOR)
    );
    assert_eq!(cfg32(&mut dev, 0x08) >> 8, 0x030200, "class");
    assert_eq!(cfg32(&mut dev, 0x0c) >> 16 & 0xff, 0, "single function");
    let bars: Vec<u32> = (0..6).map(|i| cfg32(&mut dev, 0x10 + 4 * i)).collect();
    assert_eq!(bars, [0x0, 0xc, 0x0, 0xc, 0x0, 0x0], "type bits only");
    assert_eq!(cfg32(&mut dev, 0x30), 0, "ROM");
    assert_eq!(cfg32(&mut dev, 0x3c) >> 8 & 0xff, 0, "no INTx pin");
}

#[test]
fn sizing_probes_answer_the_region_sizes_without_reaching_the_device() {
    let (mut dev, h, _) = open();
    let mut sized = Vec::new();
    for reg in (0x10..0x28).step_by(4) {
        wcfg32(&mut dev, reg, u32::MAX);
        sized.push(cfg32(&mut dev, reg));
    }
    assert_eq!(
        sized,
        [
            !(BAR0_SIZE as u32 - 1),
            0xc,
            !((BAR1_SIZE - 1) >> 32) as u32,
            !(BAR3_SIZE as u32 - 1) | 0xc,
            u32::MAX,
            0
        ]
    );
    wcfg32(&mut dev, 0x30, 0xffff_f800);
    assert_eq!(cfg32(&mut dev, 0x30), !(ROM_SIZE as u32 - 1));
    assert!(h.take_calls().is_empty(), "BAR registers are the shadow's");
}

#[test]
fn the_layout_keeps_64bit_prefetchable_bars_and_the_rom() {
    let (dev, _, _) = open();
    let layout = dev.bar_layout();
    let kinds: Vec<_> = layout
        .bars()
        .iter()
        .map(|b| (b.index, b.kind, b.size))
        .collect();
    let pf64 = BarKind::Mem64 { prefetchable: true };
    assert_eq!(
        kinds,
        [
            (
                0,
                BarKind::Mem32 {
                    prefetchable: false
                },
                BAR0_SIZE
            ),
            (1, pf64, BAR1_SIZE),
            (3, pf64, BAR3_SIZE)
        ]
    );
    assert_eq!(layout.rom(), Some(ROM_SIZE));
    let reqs = layout.placement_requests();
    assert!(reqs[1].prefetchable && reqs[1].is_64bit && reqs[1].align == BAR1_SIZE);
}

#[test]
fn placed_and_moved_bars_stay_in_the_shadow() {
    let (mut dev, h, _) = open();
    dev.set_bar_address(BarSlot::Bar(1), 2 * BAR1_SIZE).unwrap();
    assert_eq!(cfg32(&mut dev, 0x14), 0xc);
    assert_eq!(cfg32(&mut dev, 0x18), ((2 * BAR1_SIZE) >> 32) as u32);
    let events = wcfg32(&mut dev, 0x10, 0xc000_0000);
    assert_eq!(
        events,
        [ConfigEvent::BarMoved {
            slot: BarSlot::Bar(0),
            from: 0,
            to: 0xc000_0000
        }]
    );
    assert!(h.take_calls().is_empty());
}

#[test]
fn hidden_capabilities_are_absent_from_the_guest_walk_and_the_others_keep_their_offsets() {
    let (mut dev, _, _) = open();
    let (standard, extended) = guest_walk(&mut dev);
    assert_eq!(
        standard,
        [
            (0x01, CAP_PM),
            (0x05, CAP_MSI),
            (0x10, CAP_PCIE),
            (0x11, CAP_MSIX)
        ]
    );
    // 0x100 (SR-IOV) becomes an empty header linking on.
    assert_eq!(
        extended,
        [(0, EXT_SRIOV), (0x01, EXT_AER), (0x0b, EXT_VSEC)]
    );
    assert_eq!(cfg32(&mut dev, EXT_SRIOV + 0x0c), 0, "SR-IOV body hidden");
    assert_eq!(
        cfg32(&mut dev, EXT_REBAR + 4),
        0,
        "Resizable BAR body hidden"
    );
    // The shadow's own walk agrees.
    let ids: Vec<_> = dev.config().capabilities().iter().map(|c| c.id).collect();
    assert_eq!(ids, [0x01, 0x05, 0x10, 0x11, 0, 0x01, 0x0b]);
}

#[test]
fn other_registers_pass_through_to_the_device() {
    let (mut dev, h, _) = open();
    assert_eq!(
        cfg32(&mut dev, CAP_PCIE + 4),
        0x1234_5678,
        "PCIe device caps"
    );
    assert_eq!(cfg32(&mut dev, EXT_AER + 4), 0xdead_beef);
    wcfg32(&mut dev, EXT_AER + 8, 0x55);
    let events = dev.config_write(COMMAND, &0x0006u16.to_le_bytes());
    assert_eq!(events, [ConfigEvent::MemoryDecode(true)]);
    assert_eq!(
        h.take_calls(),
        [
            Call::ConfigWrite {
                offset: (EXT_AER + 8) as u64,
                data: vec![0x55, 0, 0, 0]
            },
            Call::ConfigWrite {
                offset: COMMAND as u64,
                data: vec![6, 0]
            },
        ]
    );
    // A dword across a virtualized link byte: only the device's bytes go to it.
    dev.config_write(CAP_PM, &[0xff, 0xff, 0x12, 0x34]);
    assert_eq!(
        h.take_calls(),
        [Call::ConfigWrite {
            offset: (CAP_PM + 2) as u64,
            data: vec![0x12, 0x34]
        }]
    );
    assert_eq!(
        cfg32(&mut dev, CAP_PM) & 0xffff,
        u32::from(CAP_MSI as u8) << 8 | 1
    );
}

#[test]
fn mmappable_pieces_leave_out_the_msix_table_and_pba_pages() {
    let (dev, _, _) = open();
    let pieces: Vec<_> = dev
        .mmappable_pieces()
        .iter()
        .map(|p| (p.slot, p.bar_offset, p.size, p.file.offset))
        .collect();
    let bar0 = 0u64 << 40;
    let (t, p) = (u64::from(MSIX_TABLE), u64::from(MSIX_PBA));
    assert_eq!(
        pieces,
        [
            (BarSlot::Bar(0), 0, t & !0xfff, bar0),
            (
                BarSlot::Bar(0),
                (t & !0xfff) + 0x1000,
                p - (t & !0xfff) - 0x1000,
                (t & !0xfff) + 0x1000
            ),
            (
                BarSlot::Bar(0),
                p + 0x1000,
                BAR0_SIZE - p - 0x1000,
                p + 0x1000
            ),
            (BarSlot::Bar(1), 0, BAR1_SIZE, 1 << 40),
            (BarSlot::Bar(3), 0, BAR3_SIZE, 3 << 40),
        ]
    );
}

#[test]
fn trapped_accesses_reach_the_transport_except_the_msix_table() {
    let (mut dev, h, _) = open();
    dev.bar_write(BarSlot::Bar(0), 0x8, &0x0403_0201u32.to_le_bytes());
    let mut b = [0; 4];
    dev.bar_read(BarSlot::Bar(0), 0x8, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x0403_0201);
    // The table's page, below the table: the device's.
    let below = u64::from(MSIX_TABLE) - 0x10;
    dev.bar_read(BarSlot::Bar(0), below, &mut b);
    // The table itself: emulated (vector 0's control reads masked).
    dev.bar_read(BarSlot::Bar(0), u64::from(MSIX_TABLE) + 12, &mut b);
    assert_eq!(u32::from_le_bytes(b), 1);
    dev.bar_read(BarSlot::Rom, 0, &mut b);
    dev.bar_write(BarSlot::Rom, 0, &[1]);
    assert_eq!(
        h.take_calls(),
        [
            Call::RegionWrite {
                index: 0,
                offset: 8,
                data: vec![1, 2, 3, 4]
            },
            Call::RegionRead {
                index: 0,
                offset: 8,
                len: 4
            },
            Call::RegionRead {
                index: 0,
                offset: below,
                len: 4
            },
            Call::RegionRead {
                index: ROM_REGION,
                offset: 0,
                len: 4
            },
        ]
    );
}

fn msix_control(dev: &mut PassthroughDevice, value: u16) {
    dev.config_write(CAP_MSIX + 2, &value.to_le_bytes());
}

fn program_vector(dev: &mut PassthroughDevice, v: u16, msg: MsiMessage) {
    let base = u64::from(MSIX_TABLE) + 16 * u64::from(v);
    dev.bar_write(BarSlot::Bar(0), base, &msg.address.to_le_bytes());
    dev.bar_write(BarSlot::Bar(0), base + 8, &msg.data.to_le_bytes());
    dev.bar_write(BarSlot::Bar(0), base + 12, &0u32.to_le_bytes());
}

const MSG: MsiMessage = MsiMessage {
    address: 0xfee0_1000,
    data: 0x41,
};

#[test]
fn msix_enable_and_unmask_program_a_route_on_the_eventfd_the_device_signals() {
    let (mut dev, h, routes) = open();
    assert_eq!(dev.msix_vectors(), MSIX_VECTORS);
    msix_control(&mut dev, MSIX_ENABLE);
    assert_eq!(
        h.take_calls(),
        [Call::EnableIrqs {
            index: MSIX_IRQ,
            count: usize::from(MSIX_VECTORS)
        }]
    );
    program_vector(&mut dev, 3, MSG);
    assert_eq!(routes.take(), [Route::Unmask(3, MSG)]);
    assert!(h.take_calls().is_empty(), "the table is emulated");
    assert!(h.fire(3));
    assert_eq!(
        routes.signalled(3),
        1,
        "the device's eventfd is the route's"
    );
    msix_control(&mut dev, 0);
    assert_eq!(routes.take(), [Route::Mask(3)]);
    assert_eq!(h.take_calls(), [Call::DisableIrqs { index: MSIX_IRQ }]);
    assert!(dev.take_errors().is_empty());
}

#[test]
fn reset_turns_msix_off_and_resets_the_device() {
    let (mut dev, h, routes) = open();
    dev.config_write(COMMAND, &0x0006u16.to_le_bytes());
    msix_control(&mut dev, MSIX_ENABLE);
    program_vector(&mut dev, 0, MSG);
    h.take_calls();
    routes.take();
    dev.reset().unwrap();
    assert_eq!(routes.take(), [Route::Mask(0)]);
    assert_eq!(
        h.take_calls(),
        [Call::DisableIrqs { index: MSIX_IRQ }, Call::Reset]
    );
    assert_eq!(dev.config().read_u16(CAP_MSIX + 2) & MSIX_ENABLE, 0);
    assert_eq!(dev.config().read_u16(COMMAND), 0);
    // Enabling again hands the eventfds over again.
    msix_control(&mut dev, MSIX_ENABLE);
    assert_eq!(
        h.take_calls(),
        [Call::EnableIrqs {
            index: MSIX_IRQ,
            count: usize::from(MSIX_VECTORS)
        }]
    );
}

#[test]
fn a_device_that_cannot_reset_says_so() {
    let (mut dev, h, _) = open();
    h.state().resettable = false;
    assert!(matches!(dev.reset(), Err(PassthroughError::NotResettable)));
}

fn memory() -> crate::GuestMemory {
    crate::GuestMemory::from_ranges(&[
        (GuestAddress(0), 1 << 20),
        (GuestAddress(0x1_0000_0000), 2 << 20),
    ])
    .unwrap()
}

#[test]
fn guest_ram_is_dma_mapped_at_its_gpa_and_unmapped_on_drop() {
    let (mut dev, h, _) = open();
    dev.map_guest_memory(&memory()).unwrap();
    msix_control(&mut dev, MSIX_ENABLE);
    assert!(matches!(
        dev.map_guest_memory(&memory()),
        Err(PassthroughError::AlreadyMapped)
    ));
    drop(dev);
    let calls = h.take_calls();
    let dma = |iova, size, fd| Call::DmaMap { iova, size, fd };
    assert_eq!(
        calls,
        [
            dma(0, 1 << 20, false),
            dma(0x1_0000_0000, 2 << 20, false),
            Call::EnableIrqs {
                index: MSIX_IRQ,
                count: usize::from(MSIX_VECTORS)
            },
            Call::DisableIrqs { index: MSIX_IRQ },
            Call::DmaUnmap {
                iova: 0,
                size: 1 << 20
            },
            Call::DmaUnmap {
                iova: 0x1_0000_0000,
                size: 2 << 20
            },
        ]
    );
}

#[test]
fn a_failed_dma_map_unmaps_what_was_mapped_and_names_the_region() {
    let (mut dev, h, _) = open();
    let mem = memory();
    h.state().failing.push("dma_map");
    let e = dev.map_guest_memory(&mem).unwrap_err();
    assert!(
        matches!(e, PassthroughError::DmaMap { gpa: 0, size, .. } if size == 1 << 20),
        "{e}"
    );
    assert!(super::chain(&e).contains("EIO") || super::chain(&e).contains("Input/output"));
}

#[test]
fn transport_errors_in_guest_accesses_read_all_ones_and_are_kept() {
    let (mut dev, h, _) = open();
    h.state()
        .failing
        .extend(["region_read", "config_read", "enable_irqs"]);
    let mut b = [0; 4];
    dev.bar_read(BarSlot::Bar(3), 0, &mut b);
    assert_eq!(b, [0xff; 4]);
    assert_eq!(cfg32(&mut dev, CAP_PCIE + 4), u32::MAX);
    assert_eq!(
        cfg32(&mut dev, 0),
        u32::from(DEVICE) << 16 | u32::from(VENDOR),
        "shadowed"
    );
    msix_control(&mut dev, MSIX_ENABLE);
    let errors: Vec<String> = dev.take_errors().iter().map(|e| super::chain(e)).collect();
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(
        errors[0].starts_with("BAR read: region_read: "),
        "{errors:?}"
    );
    assert!(
        errors[1].starts_with("config read: config_read"),
        "{errors:?}"
    );
    assert!(
        errors[2].starts_with("enabling MSI-X: enable_irqs"),
        "{errors:?}"
    );
}

#[test]
fn bad_config_regions_are_refused_precisely() {
    let e = open_err(|s| s.regions[7].size = 64);
    assert!(
        matches!(
            e,
            PassthroughError::Shadow(ShadowError::ConfigTooSmall { size: 64 })
        ),
        "{e:?}"
    );
    let e = open_err(|s| s.failing.push("config_read"));
    assert!(
        matches!(e, PassthroughError::Shadow(ShadowError::ReadConfig(_))),
        "{e:?}"
    );
    let e = open_err(|s| s.failing.push("region_info"));
    assert!(
        matches!(
            e,
            PassthroughError::Shadow(ShadowError::RegionInfo { index: 7, .. })
        ),
        "{e:?}"
    );
    let e = open_err(|s| s.config[0x0e] = 0x81);
    assert!(
        matches!(e, PassthroughError::Shadow(ShadowError::NotType0(0x81))),
        "{e:?}"
    );
}

#[test]
fn regions_smaller_than_claimed_are_refused_precisely() {
    // An mmap area past its region.
    let e = open_err(|s| s.regions[3].size = 16 * MIB);
    assert!(
        matches!(
            e,
            PassthroughError::Shadow(ShadowError::AreaOutside { index: 3, .. })
        ),
        "{e:?}"
    );
    // BAR0 too small for the MSI-X table the capability places in it.
    let e = open_err(|s| {
        s.regions[0].size = 8 * MIB;
        s.regions[0].mmap_areas.clear();
    });
    assert!(
        matches!(
            e,
            PassthroughError::Shadow(ShadowError::Msix {
                source: MsixError::Outside { bar: 0, .. },
                ..
            })
        ),
        "{e:?}"
    );
    // A BAR size no BAR can have.
    let e = open_err(|s| {
        s.regions[3].size = 48 * MIB;
        s.regions[3].mmap_areas.clear();
    });
    assert!(
        matches!(
            e,
            PassthroughError::Shadow(ShadowError::Bars(BarError::NotPowerOfTwo { .. }))
        ),
        "{e:?}"
    );
    // Fewer MSI interrupts than the capability claims.
    let e = open_err(|s| s.msi_count = 2);
    assert!(
        matches!(
            e,
            PassthroughError::Shadow(ShadowError::MsiCount { cap: 4, irq: 2, .. })
        ),
        "{e:?}"
    );
    // An IRQ index the transport cannot describe.
    let e = open_err(|s| s.failing.push("irq_info"));
    assert!(
        matches!(
            e,
            PassthroughError::Shadow(ShadowError::IrqInfo {
                index: MSIX_IRQ,
                ..
            })
        ),
        "{e:?}"
    );
    // Fewer MSI-X interrupts than the capability claims.
    let e = open_err(|s| s.msix_count = 4);
    assert!(
        matches!(
            e,
            PassthroughError::Shadow(ShadowError::MsixCount {
                cap: 16,
                irq: 4,
                ..
            })
        ),
        "{e:?}"
    );
}

#[test]
fn capability_loops_and_wild_links_are_refused_precisely() {
    let e = open_err(|s| s.config[CAP_MSIX + 1] = CAP_PM as u8);
    assert!(
        matches!(
            e,
            PassthroughError::Shadow(ShadowError::CapabilityLoop {
                kind: "standard",
                offset: CAP_PM
            })
        ),
        "{e:?}"
    );
    let e = open_err(|s| s.config[CAP_PM + 1] = 0x20);
    assert!(
        matches!(
            e,
            PassthroughError::Shadow(ShadowError::CapabilityPointer { to: 0x20, .. })
        ),
        "{e:?}"
    );
    let e = open_err(|s| {
        let h = 0x0001_000b | (EXT_AER as u32) << 20;
        s.config[EXT_VSEC..EXT_VSEC + 4].copy_from_slice(&h.to_le_bytes());
    });
    assert!(
        matches!(
            e,
            PassthroughError::Shadow(ShadowError::CapabilityLoop {
                kind: "extended",
                offset: EXT_AER
            })
        ),
        "{e:?}"
    );
    let e = open_err(|s| {
        let h: u32 = 0x0001_000b | 0x80 << 20;
        s.config[EXT_VSEC..EXT_VSEC + 4].copy_from_slice(&h.to_le_bytes());
    });
    assert!(
        matches!(
            e,
            PassthroughError::Shadow(ShadowError::CapabilityPointer {
                kind: "extended",
                to: 0x80,
                ..
            })
        ),
        "{e:?}"
    );
}

#[test]
fn mapping_a_piece_the_file_cannot_back_names_the_bar() {
    // The mock's regions are /dev/null opened read-only: a writable shared mapping is refused.
    let (mut dev, _, _) = open();
    let e = dev.map_bars().unwrap_err();
    assert!(
        matches!(
            e,
            PassthroughError::Map {
                slot: BarSlot::Bar(0),
                bar_offset: 0,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(crate::vfio::errno_of(&e), Some(libc::EACCES));
}

#[test]
fn no_access_of_any_size_anywhere_shows_a_host_bar_or_panics() {
    let (mut dev, _, _) = open();
    // The host's words that cannot occur by chance (BAR1's low half is 0 plus flags).
    let host = [
        HOST_BAR0.to_le_bytes(),
        ((HOST_BAR1 >> 32) as u32).to_le_bytes(),
        (HOST_BAR3 as u32 | 0xc).to_le_bytes(),
        (HOST_ROM | 1).to_le_bytes(),
    ];
    for len in [1, 2, 4, 8] {
        let mut whole = Vec::new();
        for offset in (0..4096 + 16).step_by(len) {
            let mut b = vec![0; len];
            dev.config_read(offset, &mut b);
            whole.extend(b);
        }
        for h in &host {
            assert!(
                !whole.windows(4).any(|w| w == h),
                "{len}-byte reads show {h:x?}"
            );
        }
    }
    for offset in [0usize, 3, 0x11, 0xff, 0xffe, 0xfff, 0x1000, usize::MAX - 1] {
        dev.config_write(offset, &[0xff; 8]);
        let mut b = [0; 8];
        dev.config_read(offset, &mut b);
        dev.bar_read(BarSlot::Bar(0), u64::MAX - 2, &mut b);
        dev.bar_write(BarSlot::Bar(0), u64::MAX - 2, &b);
        dev.bar_read(BarSlot::Bar(5), 0, &mut b);
    }
}

mod vectors;
