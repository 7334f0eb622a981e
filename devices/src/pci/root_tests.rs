//! The root through configuration mechanism #1 on a port bus: the host bridge, byte/word/dword
//! accesses, the enable bit, absent functions, and a BAR move reaching the owner, who relocates
//! the BAR's range on the MMIO bus from inside the guest's config write.

use std::sync::{Arc, Mutex};

use super::bar::BarSlot;
use super::conf1::*;
use super::config::{ConfigEvent, BAR0, COMMAND, COMMAND_MEMORY};
use super::device::{BarRange, PciDevice};
use super::host_bridge::*;
use super::root::*;
use super::test_device::{MockRoutes, TestDevice};
use crate::bus::{Bus, BusDevice};

fn port_bus() -> (Bus, Arc<Mutex<PciRoot>>) {
    let root = Arc::new(Mutex::new(PciRoot::new()));
    let mut bus = Bus::new();
    bus.insert(
        Arc::new(Mutex::new(ConfigIo::new(root.clone()))),
        CONFIG_ADDRESS_PORT,
        CONFIG_IO_LEN,
    )
    .unwrap();
    (bus, root)
}

fn select(bus: &Bus, device: u8, function: u8, register: u8) {
    let a =
        CONFIG_ENABLE | u32::from(device) << 11 | u32::from(function) << 8 | u32::from(register);
    bus.write(0xcf8, &a.to_le_bytes()).unwrap();
}

fn read(bus: &Bus, port: u64, len: usize) -> u32 {
    let mut b = [0; 4];
    bus.read(port, &mut b[..len]).unwrap();
    u32::from_le_bytes(b)
}

fn read_config(bus: &Bus, device: u8, register: u8) -> u32 {
    select(bus, device, 0, register);
    read(bus, 0xcfc, 4)
}

#[test]
fn the_host_bridge_answers_at_00_00_0() {
    let (bus, _) = port_bus();
    let id = u32::from(HOST_BRIDGE_DEVICE_ID) << 16 | u32::from(HOST_BRIDGE_VENDOR_ID);
    assert_eq!(read_config(&bus, 0, 0x00), id);
    assert_eq!(
        read_config(&bus, 0, 0x08) >> 16,
        0x0600,
        "class: host bridge"
    );
    assert_eq!(read_config(&bus, 0, 0x0c) >> 16 & 0x7f, 0, "header type 0");
    // No BARs: every BAR register sizes to 0.
    for bar in 0..6u8 {
        select(&bus, 0, 0, BAR0 as u8 + 4 * bar);
        bus.write(0xcfc, &u32::MAX.to_le_bytes()).unwrap();
        assert_eq!(read(&bus, 0xcfc, 4), 0, "BAR{bar}");
    }
}

#[test]
fn the_address_register_reads_back_without_its_reserved_bits() {
    let (bus, _) = port_bus();
    bus.write(0xcf8, &u32::MAX.to_le_bytes()).unwrap();
    assert_eq!(read(&bus, 0xcf8, 4), 0x80ff_fffc);
    // Linux's check: write 0x80000000, read it back.
    bus.write(0xcf8, &CONFIG_ENABLE.to_le_bytes()).unwrap();
    assert_eq!(read(&bus, 0xcf8, 4), CONFIG_ENABLE);
    // A byte write changes that byte only.
    bus.write(0xcf9, &[0x08]).unwrap();
    assert_eq!(read(&bus, 0xcf8, 4), 0x8000_0800);
    assert_eq!(read(&bus, 0xcfb, 1), 0x80);
}

#[test]
fn byte_word_and_dword_data_accesses_reach_each_register_byte() {
    let (bus, _) = port_bus();
    select(&bus, 0, 0, 0x00);
    let bytes: Vec<u32> = (0xcfc..0xd00).map(|p| read(&bus, p, 1)).collect();
    assert_eq!(bytes, [0x86, 0x80, 0x57, 0x0d]);
    assert_eq!(read(&bus, 0xcfc, 2), 0x8086);
    assert_eq!(read(&bus, 0xcfd, 2), 0x5780);
    assert_eq!(read(&bus, 0xcfe, 2), 0x0d57);
    // A byte write through 0xCFD lands in the command register's upper byte.
    select(&bus, 0, 0, COMMAND as u8);
    bus.write(0xcfd, &[0x04]).unwrap();
    assert_eq!(read(&bus, 0xcfc, 2), 0x0400);
    bus.write(0xcfc, &[0x02]).unwrap();
    assert_eq!(read(&bus, 0xcfc, 4) & 0xffff, 0x0402);
}

#[test]
fn with_the_enable_bit_clear_data_reads_all_ones_and_writes_are_dropped() {
    let (bus, _) = port_bus();
    bus.write(0xcf8, &(COMMAND as u32).to_le_bytes()).unwrap();
    assert_eq!(read(&bus, 0xcfc, 4), u32::MAX);
    bus.write(0xcfc, &[0x02]).unwrap();
    assert_eq!(read_config(&bus, 0, COMMAND as u8) & 0xffff, 0);
}

#[test]
fn absent_functions_read_all_ones_and_ignore_writes() {
    let (bus, _) = port_bus();
    assert_eq!(read_config(&bus, 5, 0), u32::MAX);
    select(&bus, 0, 3, 0);
    assert_eq!(read(&bus, 0xcfc, 4), u32::MAX, "function 3 of the bridge");
    bus.write(0xcf8, &(CONFIG_ENABLE | 1 << 16).to_le_bytes())
        .unwrap();
    assert_eq!(read(&bus, 0xcfc, 4), u32::MAX, "bus 1");
    assert_eq!(read(&bus, 0xcfe, 2), 0xffff);
    bus.write(0xcfc, &[0xff; 4]).unwrap();
    assert_eq!(read(&bus, 0xcfc, 4), u32::MAX);
}

#[test]
fn port_accesses_of_any_size_and_offset_never_panic() {
    let root = Arc::new(Mutex::new(PciRoot::new()));
    let mut io = ConfigIo::new(root);
    for address in [0, CONFIG_ENABLE, CONFIG_ENABLE | 0xfc, u32::MAX] {
        io.write(0, &address.to_le_bytes());
        for offset in (0..12).chain([u64::MAX - 1, u64::MAX]) {
            for size in 0..=9 {
                let mut buf = vec![0; size];
                io.read(offset, &mut buf);
                io.write(offset, &buf);
            }
        }
    }
    let mut b = [0; 4];
    io.read(2, &mut b);
    assert_eq!(b, [0xff; 4], "an access running past 0xCFB is refused");
}

#[test]
fn devices_take_free_slots_and_taken_or_invalid_ones_are_refused() {
    let mut root = PciRoot::new();
    let dev = || Arc::new(Mutex::new(HostBridge::new())) as Arc<Mutex<dyn PciDevice>>;
    assert_eq!(root.add_device(dev()), Ok(PciAddress::new(0, 1, 0)));
    root.add_device_at(PciAddress::new(0, 2, 1), dev()).unwrap();
    assert_eq!(
        root.add_device(dev()),
        Ok(PciAddress::new(0, 3, 0)),
        "02 has a function"
    );
    let a = PciAddress::new(0, 1, 0);
    assert_eq!(
        root.add_device_at(a, dev()).err(),
        Some(RootError::Taken(a))
    );
    for bad in [
        PciAddress::new(1, 0, 0),
        PciAddress::new(0, 32, 0),
        PciAddress::new(0, 1, 8),
    ] {
        assert_eq!(
            root.add_device_at(bad, dev()).err(),
            Some(RootError::BadAddress(bad))
        );
    }
    root.remove_device(a).unwrap();
    assert_eq!(root.remove_device(a).err(), Some(RootError::NotFound(a)));
    assert_eq!(root.add_device(dev()), Ok(a), "the lowest free slot");
    for d in 4..32 {
        assert_eq!(root.add_device(dev()), Ok(PciAddress::new(0, d, 0)));
    }
    assert_eq!(root.add_device(dev()).err(), Some(RootError::Full));
}

/// The owner: relocates BAR ranges on the MMIO bus and records every event.
struct Owner {
    mmio: Bus,
    seen: Arc<Mutex<Vec<(PciAddress, ConfigEvent)>>>,
}

impl PciEvents for Owner {
    fn config_event(&mut self, function: PciAddress, event: ConfigEvent) {
        if let ConfigEvent::BarMoved { from, to, .. } = event {
            self.mmio.relocate(from, to).unwrap();
        }
        self.seen.lock().unwrap().push((function, event));
    }
}

#[test]
fn a_bar_move_reaches_the_owner_who_relocates_it_on_the_bus() {
    let (ports, root) = port_bus();
    let dev = Arc::new(Mutex::new(TestDevice::new(MockRoutes::default())));
    dev.lock()
        .unwrap()
        .set_bar_address(BarSlot::Bar(0), 0xc000_0000)
        .unwrap();
    let mut mmio = Bus::new();
    let range = BarRange::new(dev.clone(), BarSlot::Bar(0));
    mmio.insert(Arc::new(Mutex::new(range)), 0xc000_0000, 16 << 20)
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let addr = {
        let mut r = root.lock().unwrap();
        r.set_events(Box::new(Owner {
            mmio: mmio.clone(),
            seen: seen.clone(),
        }));
        r.add_device(dev.clone()).unwrap()
    };
    assert_eq!(read_config(&ports, addr.device, 0), 0x2330_10de);
    // The guest moves BAR0 and turns memory decode on.
    select(&ports, addr.device, 0, BAR0 as u8);
    ports.write(0xcfc, &0xd000_0000u32.to_le_bytes()).unwrap();
    select(&ports, addr.device, 0, COMMAND as u8);
    ports.write(0xcfc, &[COMMAND_MEMORY as u8]).unwrap();
    let moved = ConfigEvent::BarMoved {
        slot: BarSlot::Bar(0),
        from: 0xc000_0000,
        to: 0xd000_0000,
    };
    assert_eq!(
        *seen.lock().unwrap(),
        [(addr, moved), (addr, ConfigEvent::MemoryDecode(true))]
    );
    // BAR0 now answers at its new address, beyond the MSI-X table and PBA.
    mmio.write(0xd002_0000, &[7, 7, 7, 7]).unwrap();
    assert_eq!(dev.lock().unwrap().bar0[0x2_0000..0x2_0004], [7; 4]);
    let mut b = [0; 4];
    assert!(
        mmio.read(0xc002_0000, &mut b).is_err(),
        "nothing at the old one"
    );
}
