//! The PCI wiring on a real KVM VM (in-kernel irqchip, no vCPU): the guest's side is played
//! through the port bus (mechanism #1) and the MMIO bus, as a vCPU's exits would.

use std::sync::{Arc, Mutex};

use devices::bus::{Bus, BusError};
use devices::pci::msix::{MSIX_ENABLE, MSIX_ENTRY_SIZE, MSIX_VECTOR_MASKED};
use devices::pci::test_device::{MockRoutes, TestDevice, GIB, MIB};
use devices::pci::{BarSlot, MsiMessage, PciAddress, PciDevice, VectorRoutes};

use super::*;
use crate::vstate::resources::addresses::{MMIO32_START, PLATFORM_START};
use crate::vstate::resources::interrupts::{self, Route};
use crate::vstate::resources::memslots::SlotKind;

struct Rig {
    vm: Arc<Vm>,
    pio: Bus,
    mmio: Bus,
    pci: Pci,
}

fn rig() -> Rig {
    let vm = Arc::new(Vm::new(64 << 20).expect("a KVM VM"));
    let mut pio = Bus::new();
    let mmio = Bus::new();
    let pci = Pci::new(vm.clone(), &mut pio, &mmio).unwrap();
    Rig { vm, pio, mmio, pci }
}

fn config_address(f: PciAddress, reg: u8) -> u32 {
    0x8000_0000
        | u32::from(f.bus) << 16
        | u32::from(f.device) << 11
        | u32::from(f.function) << 8
        | u32::from(reg)
}

/// A dword config read through 0xCF8/0xCFC, as a guest driver makes it.
fn cfg_read(pio: &Bus, f: PciAddress, reg: u8) -> u32 {
    pio.write(0xcf8, &config_address(f, reg).to_le_bytes())
        .unwrap();
    let mut data = [0u8; 4];
    pio.read(0xcfc, &mut data).unwrap();
    u32::from_le_bytes(data)
}

fn cfg_write(pio: &Bus, f: PciAddress, reg: u8, value: u32) {
    pio.write(0xcf8, &config_address(f, reg).to_le_bytes())
        .unwrap();
    pio.write(0xcfc, &value.to_le_bytes()).unwrap();
}

/// BAR `index`'s address as the guest reads it (both halves of a 64-bit BAR).
fn bar_address(pio: &Bus, f: PciAddress, index: u8) -> u64 {
    let reg = 0x10 + 4 * index;
    let lo = cfg_read(pio, f, reg);
    if lo & 0x4 != 0 {
        u64::from(lo & !0xf) | u64::from(cfg_read(pio, f, reg + 4)) << 32
    } else {
        u64::from(lo & !0xf)
    }
}

fn test_device() -> Arc<Mutex<TestDevice>> {
    Arc::new(Mutex::new(TestDevice::new(MockRoutes::default())))
}

/// Two pages of anonymous memory standing in for a passed-through BAR's mmap.
struct HostPages {
    addr: *mut libc::c_void,
    len: usize,
}

impl HostPages {
    fn new(len: usize) -> Self {
        // SAFETY: a fresh private anonymous mapping; checked below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        Self { addr, len }
    }
}

impl Drop for HostPages {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

#[test]
fn the_host_bridge_answers_at_00_00_0_and_absent_functions_read_all_ones() {
    let r = rig();
    let bridge = PciAddress::new(0, 0, 0);
    assert_eq!(cfg_read(&r.pio, bridge, 0x00), 0x0d57_8086);
    assert_eq!(
        cfg_read(&r.pio, bridge, 0x08) >> 16,
        0x0600,
        "host bridge class"
    );
    assert_eq!(cfg_read(&r.pio, PciAddress::new(0, 1, 0), 0x00), u32::MAX);
    // Linux's check of mechanism #1: the address register reads back what was written.
    r.pio.write(0xcf8, &0x8000_0000u32.to_le_bytes()).unwrap();
    let mut data = [0u8; 4];
    r.pio.read(0xcf8, &mut data).unwrap();
    assert_eq!(u32::from_le_bytes(data), 0x8000_0000);
}

#[test]
fn a_function_s_bars_are_placed_programmed_and_put_on_the_buses() {
    let r = rig();
    let dev = test_device();
    let f = r.pci.add_device("test-gpu", dev.clone()).unwrap();
    assert_eq!(f, PciAddress::new(0, 1, 0));
    assert_eq!(cfg_read(&r.pio, f, 0x00), 0x2330_10de);

    let bar0 = bar_address(&r.pio, f, 0);
    let bar1 = bar_address(&r.pio, f, 1);
    let bar3 = bar_address(&r.pio, f, 3);
    let rom = u64::from(cfg_read(&r.pio, f, 0x30) & !0x7ff);
    let bars = r.pci.bars();
    for (slot, address) in [
        (BarSlot::Bar(0), bar0),
        (BarSlot::Bar(1), bar1),
        (BarSlot::Bar(3), bar3),
        (BarSlot::Rom, rom),
    ] {
        assert_eq!(bars.base(f, slot), Some(address), "{slot}");
    }
    drop(bars);
    // 32-bit BAR0 and the ROM in the hole below the platform area; the 64-bit BARs above
    // 4 GiB; each naturally aligned.
    for (address, size) in [(bar0, 16 * MIB), (rom, 512 * 1024)] {
        assert!(
            (MMIO32_START..PLATFORM_START).contains(&address),
            "{address:#x}"
        );
        assert_eq!(address % size, 0);
    }
    for (address, size) in [(bar1, 128 * GIB), (bar3, 32 * MIB)] {
        assert!(address >= 1 << 32, "{address:#x}");
        assert_eq!(address % size, 0);
    }

    // The MMIO bus reaches the function at its BARs (BAR0 past MSI-X is plain storage).
    r.mmio.write(bar0 + 0x2_0000, &[1, 2, 3, 4]).unwrap();
    assert_eq!(dev.lock().unwrap().bar0[0x2_0000..0x2_0004], [1, 2, 3, 4]);
    let mut data = [0u8; 4];
    r.mmio.read(bar0 + 0x2_0000, &mut data).unwrap();
    assert_eq!(data, [1, 2, 3, 4]);
    r.mmio.read(bar1 + 128 * GIB - 4, &mut data).unwrap();
    r.mmio.read(rom, &mut data).unwrap();

    // Removing it gives every range back: a second function gets the same addresses.
    r.pci.remove_device(f).unwrap();
    assert_eq!(r.mmio.read(bar0, &mut data), Err(BusError::NoDevice(bar0)));
    assert_eq!(cfg_read(&r.pio, f, 0x00), u32::MAX);
    let again = r.pci.add_device("test-gpu", test_device()).unwrap();
    assert_eq!(bar_address(&r.pio, again, 1), bar1);
    assert_eq!(bar_address(&r.pio, again, 0), bar0);
}

#[test]
fn a_guest_bar_move_relocates_the_bus_range_and_the_bar_memslot() {
    let r = rig();
    let dev = test_device();
    let f = r.pci.add_device("test-gpu", dev.clone()).unwrap();
    let old = bar_address(&r.pio, f, 3);
    let host = HostPages::new(0x2000);
    // SAFETY: `host` stays mapped until the end of the test, after the `unmap` below deletes
    // the slot (and no vCPU exists to touch it).
    let id = unsafe {
        r.pci
            .bars()
            .map(f, BarSlot::Bar(3), 0x1000, 0x2000, host.addr as u64)
    }
    .unwrap();
    let id = id.expect("decoding: a memslot");
    let slot = r.vm.memslots().get(id).unwrap();
    assert_eq!(
        (slot.kind, slot.gpa, slot.size),
        (SlotKind::DeviceBar, old + 0x1000, 0x2000)
    );

    // A sizing probe is not a move: all ones, read back the size mask, restore.
    cfg_write(&r.pio, f, 0x1c, u32::MAX);
    cfg_write(&r.pio, f, 0x20, u32::MAX);
    assert_eq!(cfg_read(&r.pio, f, 0x1c) & !0xf, !(32 * MIB as u32 - 1));
    cfg_write(&r.pio, f, 0x1c, old as u32);
    cfg_write(&r.pio, f, 0x20, (old >> 32) as u32);
    assert_eq!(r.pci.bars().base(f, BarSlot::Bar(3)), Some(old));
    assert_eq!(r.vm.memslots().get(id).map(|s| s.gpa), Some(old + 0x1000));

    // The guest moves BAR3 (lower half, then upper half).
    let new = old + 64 * MIB;
    cfg_write(&r.pio, f, 0x1c, new as u32);
    cfg_write(&r.pio, f, 0x20, (new >> 32) as u32);
    assert_eq!(bar_address(&r.pio, f, 3), new);
    assert_eq!(r.pci.bars().base(f, BarSlot::Bar(3)), Some(new));
    let mut data = [0u8; 4];
    assert_eq!(r.mmio.read(old, &mut data), Err(BusError::NoDevice(old)));
    r.mmio.read(new + 32 * MIB - 4, &mut data).unwrap();
    assert!(r.vm.memslots().at(old + 0x1000).is_none(), "old slot gone");
    let moved =
        r.vm.memslots()
            .at(new + 0x1000)
            .expect("slot at the new address");
    assert_eq!(
        (moved.kind, moved.gpa, moved.size, moved.host),
        (SlotKind::DeviceBar, new + 0x1000, 0x2000, host.addr as u64)
    );
    let pieces = r.pci.bars().pieces(f, BarSlot::Bar(3));
    assert_eq!(pieces.len(), 1);
    assert_eq!(pieces[0].slot, Some(moved.id));

    // Unmapping deletes the memslot; the BAR stays on the bus.
    r.pci.bars().unmap(f, BarSlot::Bar(3)).unwrap();
    assert!(r.vm.memslots().at(new + 0x1000).is_none());
    r.mmio.read(new, &mut data).unwrap();
}

#[test]
fn a_move_onto_another_bar_waits_until_that_bar_moves_away() {
    let r = rig();
    let f = r.pci.add_device("test-gpu", test_device()).unwrap();
    let bar0 = bar_address(&r.pio, f, 0);
    let bar3 = bar_address(&r.pio, f, 3);
    // The ROM out of the way first (the firmware placement put it right after BAR0).
    cfg_write(&r.pio, f, 0x30, 0xe100_0000);
    assert_eq!(r.pci.bars().base(f, BarSlot::Rom), Some(0xe100_0000));
    // BAR3 (32 MiB) onto BAR0's range: refused by the bus for now.
    let target = bar0 & !(32 * MIB - 1);
    cfg_write(&r.pio, f, 0x1c, target as u32);
    cfg_write(&r.pio, f, 0x20, 0);
    assert_eq!(r.pci.bars().base(f, BarSlot::Bar(3)), Some(bar3));
    // BAR0 leaves (to the top of the free part of the hole): BAR3 follows at once.
    let away = 0xe000_0000;
    cfg_write(&r.pio, f, 0x10, away as u32);
    assert_eq!(r.pci.bars().base(f, BarSlot::Bar(0)), Some(away));
    assert_eq!(r.pci.bars().base(f, BarSlot::Bar(3)), Some(target));
    let mut data = [0u8; 4];
    r.mmio.read(target + 32 * MIB - 4, &mut data).unwrap();
    r.mmio.read(away, &mut data).unwrap();
}

fn msg(data: u32) -> MsiMessage {
    MsiMessage {
        address: 0xfee0_0000,
        data,
    }
}

/// Writes MSI-X table entry `vector` through BAR0, as the guest's driver does.
fn write_entry(dev: &mut TestDevice<MsiRoutes>, vector: u16, m: MsiMessage, masked: bool) {
    let base = u64::from(vector) * MSIX_ENTRY_SIZE;
    let slot = BarSlot::Bar(0);
    dev.bar_write(slot, base, &(m.address as u32).to_le_bytes());
    dev.bar_write(slot, base + 4, &((m.address >> 32) as u32).to_le_bytes());
    dev.bar_write(slot, base + 8, &m.data.to_le_bytes());
    let control = if masked { MSIX_VECTOR_MASKED } else { 0 };
    dev.bar_write(slot, base + 12, &control.to_le_bytes());
}

#[test]
fn msix_vectors_become_kvm_msi_routes_with_irqfds() {
    let vm = Arc::new(Vm::new(64 << 20).unwrap());
    let mut dev = TestDevice::new(MsiRoutes::new(vm.clone()));
    let cap = dev.msix.cap_offset();
    dev.config_write(cap + 2, &MSIX_ENABLE.to_le_bytes());
    assert_eq!(dev.routes.gsi(3), None, "masked vectors take no GSI");

    write_entry(&mut dev, 3, msg(0x41), false);
    let gsi = dev.routes.gsi(3).expect("unmasked: a GSI");
    assert!(gsi >= interrupts::FIRST_MSI_GSI);
    assert!(dev.routes.is_live(3));
    let kvm_msg = |data| {
        Route::Msi(interrupts::MsiMessage {
            address: 0xfee0_0000,
            data,
        })
    };
    assert_eq!(vm.resources().interrupts().routes(gsi), [kvm_msg(0x41)]);
    // Live: KVM's irqfd takes the count off the eventfd (no vCPU receives it).
    dev.routes.trigger(3).unwrap();
    assert!(
        dev.routes.eventfd_of(3).unwrap().read().is_err(),
        "consumed by KVM"
    );

    // Masked: the irqfd is gone, the GSI and route stay, a trigger stays counted.
    write_entry(&mut dev, 3, msg(0x41), true);
    assert!(!dev.routes.is_live(3));
    assert_eq!(dev.routes.gsi(3), Some(gsi));
    assert_eq!(vm.resources().interrupts().routes(gsi), [kvm_msg(0x41)]);
    dev.routes.trigger(3).unwrap();
    assert_eq!(dev.routes.eventfd_of(3).unwrap().read().unwrap(), 1);

    // A new message while masked, then unmasked: same GSI, route updated, irqfd back.
    write_entry(&mut dev, 3, msg(0x42), false);
    assert_eq!(dev.routes.gsi(3), Some(gsi));
    assert!(dev.routes.is_live(3));
    assert_eq!(vm.resources().interrupts().routes(gsi), [kvm_msg(0x42)]);

    // A second vector gets its own GSI; a vector never unmasked cannot be triggered.
    write_entry(&mut dev, 5, msg(0x43), false);
    let gsi5 = dev.routes.gsi(5).unwrap();
    assert_ne!(gsi5, gsi);
    assert!(dev.routes.trigger(7).is_err());

    // Dropping the routes releases every GSI.
    drop(dev);
    assert!(vm.resources().interrupts().routes(gsi).is_empty());
    assert!(vm.resources().interrupts().routes(gsi5).is_empty());
}

/// Memory decode off (command register): the mapped pieces lose their memslots, so accesses
/// trap to the function (a kernel-VFIO BAR mapping is revoked then, and a memslot over it would
/// fail the vCPU); a move meanwhile adds none; decode on puts them back at the current address.
#[test]
fn memory_decode_off_takes_the_bar_memslots_away_until_it_is_on_again() {
    const COMMAND: u8 = 0x04;
    let r = rig();
    let f = r.pci.add_device("test-gpu", test_device()).unwrap();
    let old = bar_address(&r.pio, f, 3);
    let host = HostPages::new(0x2000);
    // SAFETY: `host` outlives the VM's use of it: the rig (and its memslots) drops first.
    unsafe {
        r.pci
            .bars()
            .map(f, BarSlot::Bar(3), 0x1000, 0x2000, host.addr as u64)
    }
    .unwrap();
    cfg_write(&r.pio, f, COMMAND, 0x2); // memory on
    assert!(r.vm.memslots().at(old + 0x1000).is_some());
    cfg_write(&r.pio, f, COMMAND, 0x0); // memory off
    assert!(r.vm.memslots().at(old + 0x1000).is_none(), "slot kept");
    assert_eq!(r.pci.bars().pieces(f, BarSlot::Bar(3))[0].slot, None);

    let new = old + 64 * MIB;
    cfg_write(&r.pio, f, 0x1c, new as u32);
    cfg_write(&r.pio, f, 0x20, (new >> 32) as u32);
    assert!(
        r.vm.memslots().at(new + 0x1000).is_none(),
        "added while off"
    );

    cfg_write(&r.pio, f, COMMAND, 0x2);
    let back = r.vm.memslots().at(new + 0x1000).expect("slot back");
    assert_eq!((back.gpa, back.host), (new + 0x1000, host.addr as u64));
    assert!(r.vm.memslots().at(old + 0x1000).is_none());
    drop(r);
}
