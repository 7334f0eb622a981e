//! tools/host-check.sh: on this host its verdict agrees with what /sys and /dev show; against a
//! fake /sys, /proc and /dev (--root) it reports an H100-shaped function's group, driver and BAR
//! sizes, finds a group with a member on another driver not viable, sees when a 128 GiB BAR
//! does not fit the guest's address bits, writes exactly the sysfs files a bind needs, and checks
//! a guest's agent output (a stand-in vmm writes it); bad input is refused precisely. No test
//! here changes the real host: --bind and --boot run only against the fake tree.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use vmm_tests::workspace_root;

/// vmm-probe of the same build profile as this test (the script asks it how each bound device
/// would be opened).
fn probe_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .join("vmm-probe");
    assert!(
        bin.is_file(),
        "{} is missing: build it first (`cargo build --workspace --bins`, as tools/test.sh does)",
        bin.display()
    );
    bin
}

fn host_check(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new("bash");
    cmd.arg(workspace_root().join("tools/host-check.sh"))
        .arg("--probe")
        .arg(probe_bin())
        .args(args)
        .env_remove("HOST_CHECK_ROOT")
        .env_remove("VMM_BIN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run tools/host-check.sh")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn json(o: &Output) -> Value {
    let (out, err) = text(o);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}\nstderr: {err}"))
}

/// Entries of a directory (none when it does not exist).
fn entries(dir: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn this_host_verdict_agrees_with_the_evidence() {
    // Arrange: what this host has, read directly.
    let groups = entries("/sys/kernel/iommu_groups");
    let vfio_nodes: Vec<String> = entries("/dev/vfio")
        .into_iter()
        .filter(|n| n != "vfio" && n != "devices")
        .chain(entries("/dev/vfio/devices"))
        .collect();
    let none = groups.is_empty() && vfio_nodes.is_empty();

    // Act
    let out = host_check(&[], &[]);
    let js = host_check(&["--json"], &[]);

    // Assert
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "exit {:?}: {stderr}", out.status);
    assert!(js.status.success(), "--json exit {:?}", js.status);
    for section in ["== IOMMU", "== VFIO", "== Host", "== Devices", "== Verdict"] {
        assert!(stdout.contains(section), "no {section} section:\n{stdout}");
    }
    // What it looked for is named.
    for path in [
        "/sys/kernel/iommu_groups",
        "/sys/class/iommu",
        "/dev/vfio",
        "/dev/iommu",
        "/proc/cpuinfo address sizes",
        "ulimit -l",
    ] {
        assert!(stdout.contains(path), "{path} not named:\n{stdout}");
    }
    assert_eq!(
        stdout.contains("no IOMMU/VFIO on this host"),
        none,
        "groups {groups:?}, vfio nodes {vfio_nodes:?}:\n{stdout}"
    );
    let report = json(&js);
    assert_eq!(report["no_iommu_vfio"], none, "{report}");
    assert_eq!(
        report["iommu"]["groups"].as_array().map(Vec::len),
        Some(groups.len())
    );
    if none {
        assert!(stdout.contains("looked for:"), "{stdout}");
        assert_eq!(report["verdict"], "no IOMMU/VFIO on this host");
    }
}

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// A fake /sys, /proc and /dev as the kernel lays them out.
struct Fake {
    dir: tempfile::TempDir,
}

impl Fake {
    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn file(&self, rel: &str, bytes: &[u8]) {
        let p = self.root().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }

    fn link(&self, rel: &str, target: &str) {
        let p = self.root().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        symlink(target, p).unwrap();
    }

    fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.root().join(rel)).unwrap_or_default()
    }

    /// One PCI function: sysfs directory, bus and group links, driver, `resource` with the given
    /// BARs (index, size, 64-bit prefetchable) and a config space with an MSI-X capability.
    fn function(
        &self,
        bdf: &str,
        group: u32,
        ids: (u16, u16),
        driver: &str,
        bars: &[(usize, u64, bool)],
    ) {
        let dir = format!("sys/devices/pci0000:00/{bdf}");
        self.file(
            &format!("{dir}/vendor"),
            format!("{:#06x}\n", ids.0).as_bytes(),
        );
        self.file(
            &format!("{dir}/device"),
            format!("{:#06x}\n", ids.1).as_bytes(),
        );
        self.file(&format!("{dir}/class"), b"0x030200\n");
        let mut resource = String::new();
        let mut base = 0x60_0000_0000u64;
        for i in 0..13 {
            match bars.iter().find(|b| b.0 == i) {
                Some(&(_, size, pf64)) => {
                    let flags = if pf64 { 0x14220c } else { 0x40200 };
                    resource += &format!("{base:#018x} {:#018x} {flags:#018x}\n", base + size - 1);
                    base += size;
                }
                None => resource += "0x0000000000000000 0x0000000000000000 0x0000000000000000\n",
            }
        }
        self.file(&format!("{dir}/resource"), resource.as_bytes());
        let mut config = vec![0u8; 256];
        config[0..2].copy_from_slice(&ids.0.to_le_bytes());
        config[2..4].copy_from_slice(&ids.1.to_le_bytes());
        config[6] = 0x10; // capability list
        config[0x34] = 0x60;
        config[0x60] = 0x05; // MSI, then
        config[0x61] = 0xb0;
        config[0xb0] = 0x11; // MSI-X: 38 vectors, the last capability
        config[0xb2..0xb4].copy_from_slice(&37u16.to_le_bytes());
        self.file(&format!("{dir}/config"), &config);
        self.file(&format!("sys/bus/pci/drivers/{driver}/bind"), b"");
        self.link(
            &format!("{dir}/driver"),
            &format!("../../../bus/pci/drivers/{driver}"),
        );
        self.link(
            &format!("{dir}/iommu_group"),
            &format!("../../../kernel/iommu_groups/{group}"),
        );
        self.link(
            &format!("sys/kernel/iommu_groups/{group}/devices/{bdf}"),
            &format!("../../../../devices/pci0000:00/{bdf}"),
        );
        self.link(
            &format!("sys/bus/pci/devices/{bdf}"),
            &format!("../../../devices/pci0000:00/{bdf}"),
        );
    }

    fn cpuinfo(&self, bits: u32) {
        self.file(
            "proc/cpuinfo",
            format!("processor\t: 0\naddress sizes\t: {bits} bits physical, 48 bits virtual\n")
                .as_bytes(),
        );
    }

    /// Group 12: an H100-shaped GPU (BAR0 16 MiB, BAR1 128 GiB and BAR3 32 MiB 64-bit
    /// prefetchable) and its audio function, both on vfio-pci, /dev/vfio/12 present. Group 13:
    /// the same GPU on vfio-pci beside an audio function still on snd_hda_intel.
    fn gpus() -> Fake {
        let f = Fake {
            dir: tempfile::tempdir().unwrap(),
        };
        let gpu_bars = [
            (0, 16 * MIB, false),
            (1, 128 * GIB, true),
            (3, 32 * MIB, true),
        ];
        f.function("0000:01:00.0", 12, (0x10de, 0x2330), "vfio-pci", &gpu_bars);
        f.function(
            "0000:01:00.1",
            12,
            (0x10de, 0x22a3),
            "vfio-pci",
            &[(0, 16 * 1024, false)],
        );
        f.function("0000:02:00.0", 13, (0x10de, 0x2330), "vfio-pci", &gpu_bars);
        f.function(
            "0000:02:00.1",
            13,
            (0x10de, 0x22a3),
            "snd_hda_intel",
            &[(0, 16 * 1024, false)],
        );
        f.file("dev/vfio/vfio", b"");
        f.file("dev/vfio/12", b"");
        f.file(
            "proc/cmdline",
            b"BOOT_IMAGE=/vmlinuz intel_iommu=on iommu=pt quiet\n",
        );
        f.file(
            "proc/meminfo",
            b"HugePages_Total:       8\nHugePages_Free:        6\nHugepagesize:       2048 kB\n",
        );
        f.file(
            "proc/self/limits",
            b"Max locked memory         unlimited            unlimited            bytes\n",
        );
        f.file("sys/class/iommu/dmar0/.keep", b"");
        f.cpuinfo(52);
        f
    }
}

fn device<'a>(report: &'a Value, bdf: &str) -> &'a Value {
    report["devices"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["bdf"] == bdf))
        .unwrap_or_else(|| panic!("{bdf} not in {report}"))
}

#[test]
fn fake_tree_sizes_groups_drivers_and_viability() {
    // Arrange
    let f = Fake::gpus();
    let root = f.root().to_str().unwrap();

    // Act
    let out = host_check(&["--root", root], &[]);
    let js = host_check(&["--root", root, "--json"], &[]);

    // Assert: text
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "exit {:?}: {stderr}\n{stdout}",
        out.status
    );
    for line in [
        "  0000:01:00.0 [10de:2330] class 030200",
        "    driver: vfio-pci",
        "    IOMMU group 12: 2 member(s)",
        "    BAR0: 16 MiB (16777216 bytes), 32-bit",
        "    BAR1: 128 GiB (137438953472 bytes), 64-bit prefetchable",
        "    BAR3: 32 MiB (33554432 bytes), 64-bit prefetchable",
        "    MSI-X: 38 vectors",
        "    ready for passthrough: tools/host-check.sh --boot 0000:01:00.0",
        "      0000:02:00.1: driver snd_hda_intel (keeps the group from VFIO)",
        "    group NOT viable: 0000:02:00.1 (snd_hda_intel) must be unbound or bound to vfio-pci (--bind BDF)",
        "/proc/cmdline: intel_iommu=on iommu=pt",
        "groups: 12",
        "== Verdict: IOMMU present; ready for passthrough: 0000:01:00.0 0000:01:00.1",
    ] {
        assert!(stdout.contains(line), "missing {line:?}:\n{stdout}");
    }
    assert!(!stdout.contains("no IOMMU/VFIO"), "{stdout}");
    // vmm-probe's discovery of the bound devices is shown.
    assert!(
        stdout.contains("0000:01:00.0 [10de:2330, vfio-pci]: group 12"),
        "{stdout}"
    );

    // Assert: JSON
    let r = json(&js);
    assert_eq!(r["no_iommu_vfio"], false);
    assert_eq!(r["host"]["guest_phys_bits"], 46, "capped at vmm's 46 bits");
    assert_eq!(r["host"]["memlock_kib"], "unlimited");
    assert_eq!(r["host"]["hugepages_total"], 8);
    let gpu = device(&r, "0000:01:00.0");
    assert_eq!(gpu["driver"], "vfio-pci");
    assert_eq!(gpu["iommu_group"], 12);
    assert_eq!(gpu["viable"], true);
    assert_eq!(gpu["ready"], true);
    assert_eq!(gpu["msix_vectors"], 38);
    let bars: Vec<(u64, u64, bool, bool)> = gpu["bars"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["index"].as_u64().unwrap(),
                b["size"].as_u64().unwrap(),
                b["mem64"].as_bool().unwrap(),
                b["prefetchable"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        bars,
        [
            (0, 16 * MIB, false, false),
            (1, 128 * GIB, true, true),
            (3, 32 * MIB, true, true)
        ]
    );
    let blocked = device(&r, "0000:02:00.0");
    assert_eq!(blocked["driver"], "vfio-pci");
    assert_eq!(blocked["viable"], false);
    assert_eq!(blocked["ready"], false);
    let members = blocked["group_members"].as_array().unwrap();
    assert_eq!(members.len(), 2);
    assert!(members
        .iter()
        .any(|m| m["bdf"] == "0000:02:00.1" && m["driver"] == "snd_hda_intel" && m["ok"] == false));
    let probed = r["vfio"]["probe"]["devices"].as_array().unwrap();
    assert!(
        probed
            .iter()
            .any(|d| d["bdf"] == "0000:01:00.0" && d["access"] == "group" && d["group"] == 12),
        "{}",
        r["vfio"]["probe"]
    );
}

#[test]
fn a_128_gib_bar_beyond_the_guests_address_bits_is_not_ready() {
    // Arrange: 36 physical address bits leave a 60 GiB 64-bit window.
    let f = Fake::gpus();
    f.cpuinfo(36);

    // Act
    let out = host_check(&["--root", f.root().to_str().unwrap(), "--json"], &[]);

    // Assert
    let r = json(&out);
    assert_eq!(r["host"]["guest_phys_bits"], 36);
    let gpu = device(&r, "0000:01:00.0");
    assert_eq!(gpu["bars_fit"], false);
    assert_eq!(gpu["ready"], false);
    assert!(
        gpu["not_ready"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w == "BARs do not fit"),
        "{gpu}"
    );
    let audio = device(&r, "0000:01:00.1");
    assert_eq!(audio["ready"], true, "a 16 KiB 32-bit BAR fits");
}

#[test]
fn bind_writes_override_unbind_and_probe_in_order() {
    // Arrange: 0000:02:00.1 is on snd_hda_intel.
    let f = Fake::gpus();
    let root = f.root().to_str().unwrap();

    // Act
    let out = host_check(&["--root", root, "--bind", "02:00.1"], &[]);

    // Assert: each write printed and made; a fake kernel binds nothing, and that is reported.
    let (stdout, stderr) = text(&out);
    let dev = format!("{root}/sys/bus/pci/devices/0000:02:00.1");
    let writes = [
        format!("  write 'vfio-pci' > {dev}/driver_override"),
        format!("  write '0000:02:00.1' > {dev}/driver/unbind"),
        format!("  write '0000:02:00.1' > {root}/sys/bus/pci/drivers_probe"),
    ];
    let at: Vec<usize> = writes
        .iter()
        .map(|w| {
            stdout
                .find(w.as_str())
                .unwrap_or_else(|| panic!("no {w:?}:\n{stdout}"))
        })
        .collect();
    assert!(
        at.windows(2).all(|p| p[0] < p[1]),
        "out of order:\n{stdout}"
    );
    assert_eq!(
        f.read("sys/bus/pci/devices/0000:02:00.1/driver_override"),
        "vfio-pci"
    );
    assert_eq!(
        f.read("sys/bus/pci/drivers/snd_hda_intel/unbind"),
        "0000:02:00.1"
    );
    assert_eq!(f.read("sys/bus/pci/drivers_probe"), "0000:02:00.1");
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stderr.contains("0000:02:00.1 is on 'snd_hda_intel' after drivers_probe, not vfio-pci"),
        "{stderr}"
    );

    // A device already on vfio-pci: nothing written.
    let again = host_check(&["--root", root, "--bind", "0000:01:00.0"], &[]);
    let (stdout, _) = text(&again);
    assert!(again.status.success());
    assert!(
        stdout.contains("already on vfio-pci: nothing written"),
        "{stdout}"
    );
    assert!(!stdout.contains("  write "), "{stdout}");
}

/// A stand-in vmm: answers `run --help` with a --device option, records its arguments and
/// writes `console` as the guest's console output.
fn fake_vmm(dir: &Path, console: &str) -> PathBuf {
    let vmm = dir.join("vmm");
    std::fs::write(dir.join("console.txt"), console).unwrap();
    std::fs::write(
        &vmm,
        "#!/usr/bin/env bash\n\
         if [[ $1 == run && $2 == --help ]]; then echo '      --device <SPEC>'; exit 0; fi\n\
         here=$(dirname \"$0\")\n\
         printf '%s\\n' \"$@\" > \"$here/args\"\n\
         for a in \"$@\"; do [[ $a == file:* ]] && cp \"$here/console.txt\" \"${a#file:}\"; done\n\
         exit 0\n",
    )
    .unwrap();
    std::fs::set_permissions(&vmm, std::fs::Permissions::from_mode(0o755)).unwrap();
    vmm
}

#[test]
fn boot_checks_the_guests_ids_bar_sizes_and_msix() {
    // Arrange
    let f = Fake::gpus();
    let root = f.root().to_str().unwrap();
    let bin = tempfile::tempdir().unwrap();
    let (kernel, initrd) = (bin.path().join("vmlinux"), bin.path().join("initramfs"));
    std::fs::write(&kernel, b"").unwrap();
    std::fs::write(&initrd, b"").unwrap();
    // The console logs go into the temp dir too.
    let images: [(&str, &Path); 3] = [
        ("VMM_KERNEL", &kernel),
        ("VMM_INITRAMFS", &initrd),
        ("TMPDIR", bin.path()),
    ];
    let good = "VMM-AGENT-READY\n\
        AGENT: pci-list 0000:00:00.0 vendor=0x8086 device=0x0d57 class=0x060000 driver=none msix=none msi=none\n\
        AGENT: pci-list 0000:00:01.0 vendor=0x10de device=0x2330 class=0x030200 driver=none \
        bar0=0xc0000000+0x1000000:mem32 bar1=0x2000000000+0x2000000000:mem64:pf \
        bar3=0x4000000000+0x2000000:mem64:pf msix=38 msix_table=bar0+0xb90000 msi=none\n\
        AGENT: vfio-bind 0000:00:01.0 ok\n\
        AGENT: vfio-msix 0000:00:01.0 vectors=4 fired=4 ok=true\n\
        AGENT: poweroff\n";

    // Act
    let vmm = fake_vmm(bin.path(), good);
    let out = host_check(
        &[
            "--root",
            root,
            "--boot",
            "0000:01:00.0",
            "--vmm",
            vmm.to_str().unwrap(),
        ],
        &images,
    );

    // Assert
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "exit {:?}: {stderr}\n{stdout}",
        out.status
    );
    for line in [
        "  ok   pci-list: ids 10de:2330",
        "  ok   pci-list: BAR0 16 MiB",
        "  ok   pci-list: BAR1 128 GiB",
        "  ok   pci-list: BAR3 32 MiB",
        "  ok   pci-list: MSI-X 38 vectors",
        "  ok   vfio-bind",
        "  ok   vfio-msix",
    ] {
        assert!(stdout.contains(line), "missing {line:?}:\n{stdout}");
    }
    let args = std::fs::read_to_string(bin.path().join("args")).unwrap();
    let args: Vec<&str> = args.lines().collect();
    let after = |flag: &str| args[args.iter().position(|a| *a == flag).unwrap() + 1];
    assert_eq!(
        after("--device"),
        format!("vfio:{root}/sys/bus/pci/devices/0000:01:00.0")
    );
    assert_eq!(
        after("--agent"),
        "pci-list;vfio-bind,0000:00:01.0;vfio-msix,0000:00:01.0,4;poweroff",
        "MSI-X count capped at 4 of the 38 vectors"
    );

    // A guest that sees a 64 GiB BAR1 and no interrupts fails, naming both.
    let bad = good
        .replace("+0x2000000000:", "+0x1000000000:")
        .replace("fired=4 ok=true", "fired=0 ok=false");
    let vmm = fake_vmm(bin.path(), &bad);
    let out = host_check(
        &[
            "--root",
            root,
            "--boot",
            "0000:01:00.0",
            "--vmm",
            vmm.to_str().unwrap(),
        ],
        &images,
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("FAIL pci-list: BAR1 expected 137438953472 bytes, guest says 68719476736"),
        "{stdout}"
    );
    assert!(stdout.contains("FAIL vfio-msix"), "{stdout}");
    assert!(
        stderr.contains("2 check(s) failed in the guest"),
        "{stderr}"
    );

    // --boot of a device in a group that is not viable is refused before any vmm runs.
    let out = host_check(
        &[
            "--root",
            root,
            "--boot",
            "0000:02:00.0",
            "--vmm",
            vmm.to_str().unwrap(),
        ],
        &images,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out)
            .1
            .contains("IOMMU group 13 of 0000:02:00.0 is not viable"),
        "{}",
        text(&out).1
    );
}

#[test]
fn bad_input_is_refused_precisely() {
    let f = Fake::gpus();
    let root = f.root().to_str().unwrap();
    let cases: [(&[&str], i32, &str); 7] = [
        (
            &["--bind", "0000:09:00.0"],
            1,
            "no PCI device 0000:09:00.0: ",
        ),
        (
            &["--bind", "1:00.0"],
            2,
            "--bind: '1:00.0' is not a PCI address",
        ),
        (
            &["--device", "0000:01:00.8"],
            2,
            "--device: '0000:01:00.8' is not a PCI address",
        ),
        (&["--bind"], 2, "--bind needs a value"),
        (&["--frobnicate"], 2, "unknown option '--frobnicate'"),
        (&["--mem", "12Q"], 2, "--mem: '12Q' is not a size"),
        (
            &["--boot", "0000:0a:00.0"],
            1,
            "no PCI device 0000:0a:00.0: ",
        ),
    ];
    for (args, code, message) in cases {
        let mut all = vec!["--root", root];
        all.extend_from_slice(args);
        let out = host_check(&all, &[]);
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        if code == 2 {
            assert!(stdout.is_empty(), "{args:?}: usage errors print no report");
        }
    }
    let out = host_check(&["--root", "/nonexistent-host-check-root"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out)
        .1
        .contains("--root: '/nonexistent-host-check-root' is not a directory"));
}
