use super::*;

/// The `resource` file of a gpu-test-device function as Linux 6.1 writes it: BAR0 32-bit,
/// BAR1/2 64-bit prefetchable VRAM above 4 GiB, BAR3/4 64-bit prefetchable, no BAR5, no ROM.
const GPU_RESOURCE: &str = "\
0x00000000fd000000 0x00000000fdffffff 0x0000000000040200
0x0000000800000000 0x000000083fffffff 0x000000000014220c
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000840000000 0x0000000841ffffff 0x000000000014220c
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
";

/// 256 bytes of config space with an MSI-X capability at 0x40 (8 vectors, table in BAR0 at
/// 0xb90800) and an MSI capability at 0x50 (4 vectors, 64-bit, enabled).
fn gpu_config() -> Vec<u8> {
    let mut c = vec![0u8; 256];
    c[0..2].copy_from_slice(&0x1234u16.to_le_bytes());
    c[2..4].copy_from_slice(&0x7e57u16.to_le_bytes());
    c[0x06] = STATUS_CAP_LIST;
    c[0x34] = 0x40;
    c[0x40] = CAP_ID_MSIX;
    c[0x41] = 0x50;
    c[0x42..0x44].copy_from_slice(&7u16.to_le_bytes());
    c[0x44..0x48].copy_from_slice(&0x00b9_0800u32.to_le_bytes());
    c[0x48..0x4c].copy_from_slice(&0x00ba_0000u32.to_le_bytes());
    c[0x50] = CAP_ID_MSI;
    c[0x51] = 0;
    c[0x52..0x54].copy_from_slice(&(0x80u16 | (2 << 1) | 1).to_le_bytes());
    c
}

#[test]
fn normalises_and_checks_addresses() {
    let ok = |s| Bdf::parse(s).expect(s).to_string();
    assert_eq!(ok("0000:00:01.0"), "0000:00:01.0");
    assert_eq!(ok("00:1F.7"), "0000:00:1f.7");
    assert_eq!(ok("1:2:3.4"), "0001:02:03.4");
    for bad in [
        "",
        "00:01",
        "00:20.0",
        "00:01.8",
        "0000:00:01.0:1",
        "../..:00.0",
        "00:0x.0",
        "00:01.",
        "+0:01.0",
        "10000:00:01.0",
    ] {
        assert!(Bdf::parse(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn reads_bars_from_a_resource_file() {
    let bars = parse_resource(GPU_RESOURCE).expect("parse");
    assert_eq!(bars.len(), 3, "{bars:?}");
    assert_eq!(
        bars[0],
        Bar {
            index: 0,
            addr: 0xfd00_0000,
            size: 16 << 20,
            kind: BarKind::Mem32,
            prefetchable: false,
            unset: false
        }
    );
    assert_eq!(bars[1].to_string(), "bar1=0x800000000+0x40000000:mem64:pf");
    assert_eq!(bars[2].to_string(), "bar3=0x840000000+0x2000000:mem64:pf");
}

#[test]
fn reads_io_and_unassigned_bars() {
    let text = "0x0000000000001000 0x000000000000101f 0x0000000000040101\n\
                0x0000000000000000 0x000000000000ffff 0x0000000020040200\n";
    let bars = parse_resource(text).expect("parse");
    assert_eq!(bars[0].to_string(), "bar0=0x1000+0x20:io");
    assert_eq!(bars[1].to_string(), "bar1=0x0+0x10000:mem32:unset");
}

#[test]
fn refuses_a_malformed_resource_file() {
    assert!(parse_resource("0x0 0x1\n").is_err());
    assert!(parse_resource("0x0 0x1 zz\n").is_err());
    assert!(parse_resource("0x0 0x1 0x200 0x4\n").is_err());
    // An end before the start is skipped, not a wrapped size.
    assert_eq!(parse_resource("0x10 0x1 0x200\n"), Ok(vec![]));
    assert_eq!(parse_resource(""), Ok(vec![]));
}

#[test]
fn finds_msix_and_msi_capabilities() {
    let caps = parse_caps(&gpu_config());
    assert_eq!(
        caps.msix,
        Some(MsixCap {
            offset: 0x40,
            vectors: 8,
            enabled: false,
            table_bir: 0,
            table_offset: 0xb9_0800
        })
    );
    assert_eq!(
        caps.msi,
        Some(MsiCap {
            offset: 0x50,
            vectors: 4,
            addr64: true,
            enabled: true
        })
    );
}

#[test]
fn survives_hostile_capability_lists() {
    // No capability list bit.
    let mut c = gpu_config();
    c[0x06] = 0;
    assert_eq!(parse_caps(&c), Caps::default());
    // A loop: the MSI-X capability points at itself.
    let mut c = gpu_config();
    c[0x41] = 0x40;
    assert_eq!(parse_caps(&c).msix.map(|m| m.vectors), Some(8));
    // A pointer at the last byte, and a truncated (non-root, 64-byte) read.
    let mut c = gpu_config();
    c[0x34] = 0xfc;
    c[0xfc] = CAP_ID_MSIX;
    assert_eq!(parse_caps(&c), Caps::default());
    assert_eq!(parse_caps(&gpu_config()[..64]), Caps::default());
    assert_eq!(parse_caps(&[]), Caps::default());
}

/// A made-up /sys/bus/pci/devices with the GPU (bound to vfio-pci) and a host bridge.
fn fake_sysfs() -> std::path::PathBuf {
    let root = std::env::temp_dir().join(format!(
        "vmm-agent-pci-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = fs::remove_dir_all(&root);
    let gpu = root.join("0000:00:01.0");
    let bridge = root.join("0000:00:00.0");
    for d in [&gpu, &bridge] {
        fs::create_dir_all(d).expect("mkdir");
    }
    let write = |dir: &Path, name: &str, data: &[u8]| fs::write(dir.join(name), data).expect(name);
    write(&gpu, "vendor", b"0x1234\n");
    write(&gpu, "device", b"0x7e57\n");
    write(&gpu, "class", b"0x030200\n");
    write(&gpu, "resource", GPU_RESOURCE.as_bytes());
    write(&gpu, "config", &gpu_config());
    // As in sysfs, a relative link; its target need not exist for the name to be read.
    std::os::unix::fs::symlink("../../../bus/pci/drivers/vfio-pci", gpu.join("driver"))
        .expect("symlink");
    write(&bridge, "vendor", b"0x8086\n");
    write(&bridge, "device", b"0x0d57\n");
    write(&bridge, "class", b"0x060000\n");
    write(&bridge, "resource", b"");
    write(&bridge, "config", &[0u8; 64]);
    root
}

#[test]
fn lists_a_made_up_sysfs_tree() {
    let root = fake_sysfs();
    let functions = list(&root).expect("list");
    assert_eq!(functions.len(), 2);
    assert_eq!(
        functions[0].to_string(),
        "0000:00:00.0 vendor=0x8086 device=0x0d57 class=0x060000 driver=none msix=none msi=none"
    );
    assert_eq!(
        functions[1].to_string(),
        "0000:00:01.0 vendor=0x1234 device=0x7e57 class=0x030200 driver=vfio-pci \
         bar0=0xfd000000+0x1000000:mem32 bar1=0x800000000+0x40000000:mem64:pf \
         bar3=0x840000000+0x2000000:mem64:pf msix=8 msix_table=bar0+0xb90800 msi=4"
    );
    let missing = read_function(&root, &Bdf::parse("00:02.0").expect("bdf"));
    assert!(missing.expect_err("missing").contains("no PCI function"));
    fs::write(root.join("0000:00:01.0/vendor"), b"0x12345\n").expect("write");
    assert!(list(&root).expect_err("range").contains("out of range"));
    fs::write(root.join("0000:00:01.0/vendor"), b"pci\n").expect("write");
    assert!(list(&root).expect_err("garbage").contains("bad number"));
    fs::remove_dir_all(&root).expect("cleanup");
    assert!(list(&root).is_err());
}
