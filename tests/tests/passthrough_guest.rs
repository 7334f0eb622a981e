//! The guest drives the passed-through test device from user space (issue 14): the Linux
//! guest's agent binds it to vfio-pci in no-IOMMU mode, takes MSI-X completions on eventfds,
//! moves data by device DMA between guest RAM and VRAM, writes VRAM through the BAR, and runs
//! the device's page writer and VRAM kernel. One boot carries every check (a boot takes tens of
//! seconds where the guest kernel is emulated).

use std::time::Duration;

use vmm_tests::{agent_lines, gpu, vmm};

const BDF: &str = "0000:00:01.0";
const VRAM: u64 = 256 << 20;

/// The `key=value` token of a result line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|t| t.strip_prefix(key)?.strip_prefix('='))
}

fn number(text: &str) -> u64 {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    }
    .unwrap_or_else(|e| panic!("{text:?}: {e}"))
}

/// `barN=0xADDR+0xSIZE:KIND[:pf]` -> (address, size, "KIND[:pf]").
fn bar(line: &str, n: u8) -> (u64, u64, String) {
    let tok = field(line, &format!("bar{n}")).unwrap_or_else(|| panic!("no bar{n}: {line}"));
    let (range, kind) = tok.split_once(':').unwrap_or((tok, ""));
    let (addr, size) = range.split_once('+').unwrap_or_else(|| panic!("{tok}"));
    (number(addr), number(size), kind.to_string())
}

/// The one result line of command `name` (the line after the command's own output).
fn result<'a>(lines: &'a [String], prefix: &str) -> &'a str {
    lines
        .iter()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no '{prefix}' line in {lines:#?}"))
}

#[test]
fn the_guest_binds_the_test_device_to_vfio_pci_and_drives_dma_vram_and_msix() {
    let dir = tempfile::tempdir().unwrap();
    let (server, dev) = gpu::start(dir.path(), "gpu", &["--vram-size", "256M", "--once"]);
    let console = dir.path().join("console.txt");
    let script = [
        "pci-list".to_string(),
        // Refused before the bind: not on vfio-pci; a function that does not exist.
        format!("vfio-dma,{BDF},4096"),
        "vfio-bind,0000:00:02.0".into(),
        format!("vfio-bind,{BDF}"),
        format!("vfio-msix,{BDF},16"),
        format!("vfio-dma,{BDF},262144"),
        format!("vfio-vram,{BDF},0x1000,65536"),
        // The last 64 KiB of VRAM, then one byte past its end (refused).
        format!("vfio-vram,{BDF},{},65536", VRAM - 65536),
        format!("vfio-vram,{BDF},{},8", VRAM),
        format!("vfio-workload,{BDF},start,dma,2000"),
        "sleep,300".into(),
        format!("vfio-workload,{BDF},stop"),
        format!("vfio-workload,{BDF},start,vram"),
        "sleep,50".into(),
        format!("vfio-workload,{BDF},stop"),
        format!("vfio-workload,{BDF},stop"),
        "poweroff".into(),
    ]
    .join(";");
    let args = gpu::linux_run_args(&dev, &script, &console);
    let run = vmm(&args.iter().map(String::as_str).collect::<Vec<_>>());
    run.assert_no_panic();
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    assert_eq!(run.code(), Some(0), "{}\nconsole:\n{text}", run.stderr);
    let lines = agent_lines(&text);
    eprintln!("{}", lines.join("\n"));

    // The guest sees the device as the host placed it.
    let pci = result(&lines, &format!("pci-list {BDF} "));
    assert_eq!(field(pci, "vendor"), Some("0x1234"), "{pci}");
    assert_eq!(field(pci, "device"), Some("0x7e57"), "{pci}");
    assert_eq!(field(pci, "class"), Some("0x030200"), "{pci}");
    assert_eq!(field(pci, "msix"), Some("8"), "{pci}");
    let (b0, s0, k0) = bar(pci, 0);
    assert!(b0 < 1 << 32 && s0 == 16 << 20 && k0 == "mem32", "{pci}");
    let (b1, s1, k1) = bar(pci, 1);
    assert!(b1 >= 1 << 32 && s1 == VRAM && k1 == "mem64:pf", "{pci}");
    let (_, s3, k3) = bar(pci, 3);
    assert!(s3 == 32 << 20 && k3 == "mem64:pf", "{pci}");
    assert!(
        result(&lines, "pci-list count=").ends_with("=2"),
        "{lines:#?}"
    );

    // Refusals, each an error line with the agent going on.
    let early = result(&lines, "error vfio-dma:");
    assert!(early.contains("not vfio-pci"), "{early}");
    let missing = result(&lines, "error vfio-bind:");
    assert!(
        missing.contains("no PCI function 0000:00:02.0"),
        "{missing}"
    );
    let beyond = result(&lines, "error vfio-vram:");
    assert!(beyond.contains("beyond the VRAM BAR"), "{beyond}");

    let bind = result(&lines, &format!("vfio-bind {BDF} "));
    assert_eq!(field(bind, "driver"), Some("vfio-pci"), "{bind}");
    assert!(
        field(bind, "group").is_some_and(|g| g.starts_with("/dev/vfio/noiommu-")),
        "{bind}"
    );

    // Exactly one interrupt per completion, from the device, on every vector in turn.
    let msix = result(&lines, "vfio-msix ");
    for (k, v) in [
        ("count", "16"),
        ("received", "16"),
        ("vectors", "8"),
        ("source", "device"),
        ("device_irqs", "16"),
        ("ok", "true"),
    ] {
        assert_eq!(field(msix, k), Some(v), "{k} in {msix}");
    }

    // RAM -> VRAM -> RAM byte-exact, one interrupt per transfer.
    let dma = result(&lines, "vfio-dma ");
    assert_eq!(field(dma, "bytes"), Some("262144"), "{dma}");
    assert_eq!(field(dma, "ok"), Some("true"), "{dma}");
    assert_eq!(field(dma, "irqs"), field(dma, "transfers"), "{dma}");
    assert!(number(field(dma, "elapsed_ns").unwrap()) > 0, "{dma}");

    // VRAM through the BAR mapping, read back there and by the device, at both ends.
    let vram: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("vfio-vram "))
        .collect();
    assert_eq!(vram.len(), 2, "{lines:#?}");
    for l in &vram {
        assert_eq!(field(l, "mmap"), Some("ok"), "{l}");
        assert_eq!(field(l, "dma"), Some("ok"), "{l}");
    }

    // The page writer stamped guest pages for 300 ms at 2000 pages/s, each stamp as expected;
    // the kernel filled VRAM at least once.
    let pw = result(&lines, "vfio-workload 0000:00:01.0 stopped=dma");
    assert_eq!(field(pw, "ok"), Some("true"), "{pw}");
    assert!(number(field(pw, "written").unwrap()) >= 100, "{pw}");
    let k = result(&lines, "vfio-workload 0000:00:01.0 stopped=vram");
    assert_eq!(field(k, "ok"), Some("true"), "{k}");
    assert!(number(field(k, "passes").unwrap()) >= 1, "{k}");
    let again = result(&lines, "error vfio-workload:");
    assert!(again.contains("no workload runs"), "{again}");

    assert_eq!(
        lines.last().map(String::as_str),
        Some("poweroff"),
        "{lines:#?}"
    );
    let (status, _, err) = server.wait_output(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{err}");
}
