//! What a VMM's PCI layer sees before it touches the device: device info, config space, BARs,
//! regions with their sparse mmap areas, interrupts; then the registers and VRAM through both
//! paths (messages and mmap).

mod common;

use common::*;
use gpu_test_device::{pci, regs};
use vfio_bindings::bindings::vfio::*;
use vm_memory::VolatileMemory;

#[test]
fn device_is_pci_resettable_with_nine_regions() {
    let device = DeviceProcess::start(&[]);
    let client = device.connect();
    assert!(client.resettable(), "VFIO_DEVICE_FLAGS_RESET announced");
    for index in 0..=VFIO_PCI_VGA_REGION_INDEX {
        assert!(client.region(index).is_some(), "region {index}");
    }
    assert!(client.region(VFIO_PCI_VGA_REGION_INDEX + 1).is_none());
}

#[test]
fn config_space_is_a_3d_controller_with_msix() {
    let device = DeviceProcess::start(&["--vendor", "0x1b36", "--device", "0x0042"]);
    let mut client = device.connect();
    assert_eq!(config32(&mut client, 0x00), 0x0042_1b36);
    assert_eq!(config32(&mut client, 0x08) >> 8, pci::CLASS_CODE);
    assert_eq!(config_read(&mut client, 0x0e, 1)[0], 0, "header type 0");
    assert_ne!(
        config32(&mut client, 0x04) >> 16 & 0x10,
        0,
        "capability list"
    );
    assert_eq!(config_read(&mut client, 0x3d, 1)[0], 0, "no INTx pin");

    let cap = u64::from(config_read(&mut client, 0x34, 1)[0]);
    assert_eq!(cap, u64::from(pci::MSIX_CAP_OFFSET));
    let header = config32(&mut client, cap);
    assert_eq!(header & 0xff, 0x11, "MSI-X capability id");
    assert_eq!(header >> 8 & 0xff, 0, "last capability");
    assert_eq!(
        (header >> 16 & 0x7ff) + 1,
        u32::from(pci::DEFAULT_MSIX_VECTORS)
    );
    let table = config32(&mut client, cap + 4);
    assert_eq!(
        (table & 7, u64::from(table & !7)),
        (0, pci::MSIX_TABLE_OFFSET)
    );
    assert_ne!(
        pci::MSIX_TABLE_OFFSET % pci::PAGE_SIZE,
        0,
        "table not page aligned"
    );
    let pba = config32(&mut client, cap + 8);
    assert_eq!((pba & 7, u64::from(pba & !7)), (0, pci::MSIX_PBA_OFFSET));
}

#[test]
fn bar_sizing_probe_gives_sizes_and_flags() {
    let device = DeviceProcess::start(&["--vram-size", "64G"]);
    let mut client = device.connect();
    for bar in 0..6 {
        client
            .region_write(VFIO_PCI_CONFIG_REGION_INDEX, 0x10 + 4 * bar, &[0xff; 4])
            .expect("probe write");
    }
    let bars: Vec<u32> = (0..6)
        .map(|bar| config32(&mut client, 0x10 + 4 * bar))
        .collect();
    // BAR0: 16 MiB, 32-bit, not prefetchable.
    assert_eq!(bars[0], 0xff00_0000);
    // BAR1/2: 64 GiB, 64-bit prefetchable.
    assert_eq!(bars[1], 0x0000_000c);
    assert_eq!(bars[2], 0xffff_fff0);
    // BAR3/4: 32 MiB, 64-bit prefetchable.
    assert_eq!(bars[3], 0xfe00_000c);
    assert_eq!(bars[4], 0xffff_ffff);
    assert_eq!(bars[5], 0);
}

#[test]
fn regions_announce_sizes_flags_and_sparse_mmap_areas() {
    let device = DeviceProcess::start(&["--vram-size", "256M"]);
    let client = device.connect();
    let mmap =
        VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE | VFIO_REGION_INFO_FLAG_MMAP;

    let bar0 = client.region(VFIO_PCI_BAR0_REGION_INDEX).expect("BAR0");
    assert_eq!(bar0.size, pci::BAR0_SIZE);
    assert_eq!(bar0.flags & mmap, mmap);
    assert!(bar0.file_offset.is_some(), "BAR0 fd for its sparse areas");
    let areas: Vec<(u64, u64)> = bar0
        .sparse_areas
        .iter()
        .map(|a| (a.offset, a.size))
        .collect();
    // Everything but the register page and the pages holding the MSI-X table and PBA.
    assert_eq!(
        areas,
        vec![
            (0x1000, 0xb90000 - 0x1000),
            (0xb91000, 0xba0000 - 0xb91000),
            (0xba1000, pci::BAR0_SIZE - 0xba1000),
        ]
    );
    for (offset, size) in &areas {
        let end = offset + size;
        for trapped in [0, pci::MSIX_TABLE_OFFSET, pci::MSIX_PBA_OFFSET] {
            assert!(trapped < *offset || trapped >= end, "{trapped:#x} mappable");
        }
    }

    let vram = client.region(VFIO_PCI_BAR1_REGION_INDEX).expect("VRAM");
    assert_eq!(vram.size, 256 << 20);
    assert_eq!(vram.flags & mmap, mmap);
    assert_eq!(vram.sparse_areas.len(), 1);
    assert_eq!(
        (vram.sparse_areas[0].offset, vram.sparse_areas[0].size),
        (0, 256 << 20)
    );
    assert!(vram.file_offset.is_some());

    let bar3 = client.region(VFIO_PCI_BAR3_REGION_INDEX).expect("BAR3");
    assert_eq!(bar3.size, pci::BAR3_SIZE);
    assert!(bar3.file_offset.is_some());

    let config = client.region(VFIO_PCI_CONFIG_REGION_INDEX).expect("config");
    assert_eq!(config.size, pci::CONFIG_SIZE);
    assert_eq!(config.flags & VFIO_REGION_INFO_FLAG_MMAP, 0);
    assert!(config.file_offset.is_none());

    for empty in [2, 4, 5, 6, 8] {
        assert_eq!(
            client.region(empty).expect("region").size,
            0,
            "region {empty}"
        );
    }
}

#[test]
fn irq_info_offers_only_msix_vectors() {
    let device = DeviceProcess::start(&["--msix-vectors", "32"]);
    let mut client = device.connect();
    let msix = client
        .get_irq_info(VFIO_PCI_MSIX_IRQ_INDEX)
        .expect("MSI-X info");
    assert_eq!(msix.count, 32);
    assert_ne!(msix.flags & VFIO_IRQ_INFO_EVENTFD, 0);
    for index in [VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSI_IRQ_INDEX] {
        assert_eq!(client.get_irq_info(index).expect("info").count, 0);
    }
    assert_eq!(read32(&mut client, regs::MSIX_VECTORS), 32);
}

#[test]
fn registers_identify_the_device_and_scratch_holds() {
    let device = DeviceProcess::start(&["--vram-size", "8G"]);
    let mut client = device.connect();
    assert_eq!(read32(&mut client, regs::ID), regs::ID_VALUE);
    assert_eq!(read32(&mut client, regs::VERSION), regs::VERSION_VALUE);
    assert_eq!(read32(&mut client, regs::VRAM_SIZE_LO), 0);
    assert_eq!(read32(&mut client, regs::VRAM_SIZE_HI), 2);
    write32(&mut client, regs::SCRATCH, 0xdead_beef);
    assert_eq!(read32(&mut client, regs::SCRATCH), 0xdead_beef);
    write32(&mut client, regs::ID, 0);
    assert_eq!(read32(&mut client, regs::ID), regs::ID_VALUE, "read only");
}

#[test]
fn msix_table_is_trapped_storage_and_starts_masked() {
    let device = DeviceProcess::start(&[]);
    let mut client = device.connect();
    let entry = pci::MSIX_TABLE_OFFSET + 16;
    let mut control = [0; 4];
    client
        .region_read(VFIO_PCI_BAR0_REGION_INDEX, entry + 12, &mut control)
        .expect("vector control");
    assert_eq!(u32::from_le_bytes(control), 1, "masked at reset");
    let message = [
        0x00, 0x00, 0xe0, 0xfe, 0, 0, 0, 0, 0x41, 0, 0, 0, 0, 0, 0, 0,
    ];
    client
        .region_write(VFIO_PCI_BAR0_REGION_INDEX, entry, &message)
        .expect("table write");
    let mut back = [0; 16];
    client
        .region_read(VFIO_PCI_BAR0_REGION_INDEX, entry, &mut back)
        .expect("table read");
    assert_eq!(back, message);
}

#[test]
fn vram_writes_are_seen_through_mmap_and_messages_both_ways() {
    let device = DeviceProcess::start(&["--vram-size", "64M"]);
    let mut client = device.connect();
    let vram = client.region(VFIO_PCI_BAR1_REGION_INDEX).expect("VRAM");
    let file_offset = vram.file_offset.as_ref().expect("VRAM fd");
    let mapped = map(file_offset.file(), file_offset.start(), vram.size);

    // Through the mapping, then read with a message.
    let near_end = (63 << 20) + 123;
    mapped
        .get_slice(near_end, 16)
        .expect("slice")
        .copy_from(b"from the mapping");
    let mut seen = [0; 16];
    client
        .region_read(VFIO_PCI_BAR1_REGION_INDEX, near_end as u64, &mut seen)
        .expect("region read");
    assert_eq!(&seen, b"from the mapping");

    // With a message, then read through the mapping.
    client
        .region_write(VFIO_PCI_BAR1_REGION_INDEX, 4096, b"from a message!!")
        .expect("region write");
    let mut seen = [0; 16];
    mapped
        .get_slice(4096, 16)
        .expect("slice")
        .copy_to(&mut seen[..]);
    assert_eq!(&seen, b"from a message!!");
}
