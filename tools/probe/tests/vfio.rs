//! The VFIO probe up to the hardware: discovery over fake /dev and /sys trees (as the kernel lays
//! them out), probe() on nodes that are not VFIO devices, the iommufd path through the crates up
//! to the kernel's refusal, and every hand-written ioctl on real fds that are not VFIO or
//! iommufd fds. No VFIO device exists on the machines this runs on.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use iommufd_ioctls::IommuFd;
use vmm_probe::vfio::discover::{discover, Access, VfioDev};
use vmm_probe::vfio::open::{derived_cdev, open, OpenError};
use vmm_probe::vfio::{errno_of, iommufd, region, type1};
use vmm_probe::ProbeOpts;

/// A temp tree, removed on drop.
struct Tree(PathBuf);

impl Tree {
    fn new(name: &str) -> Tree {
        let root =
            std::env::temp_dir().join(format!("vmm-probe-vfio-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        Tree(root)
    }

    fn file(&self, rel: &str, text: &str) {
        let p = self.0.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn link(&self, rel: &str, target: &str) {
        let p = self.0.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        symlink(target, p).unwrap();
    }

    fn dev(&self) -> PathBuf {
        self.0.join("dev")
    }

    fn sys(&self) -> PathBuf {
        self.0.join("sys")
    }

    fn opts(&self) -> ProbeOpts {
        ProbeOpts {
            dev_dir: self.dev(),
            sys_dir: self.sys(),
            ..ProbeOpts::default()
        }
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Two devices as sysfs shows them: 0000:01:00.0 (a GPU on vfio-pci, group 12) and
/// 0000:02:00.0 (an mlx5 VF on its variant driver, group 13); nodes left to each test.
fn sysfs(t: &Tree) {
    for (bdf, group, vendor, device, driver) in [
        ("0000:01:00.0", 12, "0x10de", "0x2330", "vfio-pci"),
        ("0000:02:00.0", 13, "0x15b3", "0x101e", "mlx5_vfio_pci"),
    ] {
        let dir = format!("sys/devices/pci0000:00/{bdf}");
        t.file(&format!("{dir}/vendor"), &format!("{vendor}\n"));
        t.file(&format!("{dir}/device"), &format!("{device}\n"));
        t.file(
            &format!("{dir}/resource"),
            "0x00000000fb000000 0x00000000fbffffff 0x0000000000040200\n\
             0x0000006000000000 0x00000067ffffffff 0x000000000014220c\n",
        );
        t.file(&format!("sys/bus/pci/drivers/{driver}/.keep"), "");
        t.link(
            &format!("{dir}/driver"),
            &format!("../../../bus/pci/drivers/{driver}"),
        );
        t.link(
            &format!("{dir}/iommu_group"),
            &format!("../../../kernel/iommu_groups/{group}"),
        );
        t.link(
            &format!("sys/kernel/iommu_groups/{group}/devices/{bdf}"),
            &format!("../../../../devices/pci0000:00/{bdf}"),
        );
    }
    // The VF's cdev: its class entry, and the device's own vfio-dev/ entry (which vfio-ioctls
    // derives the /dev/vfio/devices/ node from).
    std::fs::create_dir_all(t.0.join("sys/devices/pci0000:00/0000:02:00.0/vfio-dev/vfio0"))
        .unwrap();
    t.link(
        "sys/class/vfio-dev/vfio0/device",
        "../../../devices/pci0000:00/0000:02:00.0",
    );
}

#[test]
fn discovery_finds_group_and_cdev_devices_by_bdf() {
    let t = Tree::new("discover");
    sysfs(&t);
    t.file("dev/vfio/vfio", "");
    t.file("dev/vfio/12", "");
    t.file("dev/vfio/noiommu-0", "");
    t.file("dev/vfio/devices/vfio0", "");

    let d = discover(&t.dev(), &t.sys());
    assert!(d.vfio_dir);
    assert_eq!(d.nodes.len(), 3, "{:?}", d.nodes);
    let bdfs: Vec<&str> = d.devices.iter().map(|x| x.bdf.as_str()).collect();
    assert_eq!(bdfs, ["0000:01:00.0", "0000:02:00.0"]);
    let gpu = &d.devices[0];
    assert_eq!(gpu.group, Some(12));
    assert!(
        matches!(&gpu.access, Access::Group { id: 12, .. }),
        "{:?}",
        gpu.access
    );
    assert_eq!(gpu.describe(), "0000:01:00.0 [10de:2330, vfio-pci]");
    assert!(
        gpu.sysfs.ends_with("0000:01:00.0"),
        "{}",
        gpu.sysfs.display()
    );
    assert!(gpu.sysfs.join("iommu_group").exists());
    // The VF: a cdev, its group found through sysfs, but no /dev/iommu and no group node.
    let vf = &d.devices[1];
    assert_eq!(vf.group, Some(13));
    assert_eq!(vf.driver.as_deref(), Some("mlx5_vfio_pci"));
    assert!(matches!(&vf.access, Access::Neither { why } if why.contains("iommu")));
    assert!(
        d.notes.iter().any(|n| n.contains("noiommu-0")),
        "{:?}",
        d.notes
    );

    // With /dev/iommu the cdev is the way in, and its sysfs directory names the same cdev to
    // vfio-ioctls (under /dev, where vfio-ioctls looks).
    t.file("dev/iommu", "");
    let d = discover(&t.dev(), &t.sys());
    assert!(matches!(&d.devices[1].access, Access::Cdev { node, .. } if node.ends_with("vfio0")));
    assert_eq!(
        derived_cdev(&d.devices[1].sysfs).ok(),
        Some(PathBuf::from("/dev/vfio/devices/vfio0"))
    );
    assert!(derived_cdev(&d.devices[0].sysfs).is_err());
}

#[test]
fn nodes_that_are_not_devices_give_a_clear_per_device_error() {
    let t = Tree::new("regular");
    sysfs(&t);
    t.file("dev/vfio/vfio", "");
    t.file("dev/vfio/12", "");
    t.file("dev/vfio/devices/vfio0", "");
    t.file("dev/iommu", "");

    let f = vmm_probe::vfio::probe(&t.opts());
    assert!(f.line.found);
    assert_eq!(f.line.device, "VFIO");
    assert!(f.line.line.contains("2 device(s)"), "{}", f.line.line);
    assert!(
        f.line
            .line
            .contains("0000:01:00.0 [10de:2330, vfio-pci]: not opened"),
        "{}",
        f.line.line
    );
    assert!(
        f.line.line.contains("is not a character device"),
        "{}",
        f.line.line
    );
    assert!(
        f.cells.is_empty(),
        "nothing was tried, so no cell: {:?}",
        f.cells
    );
    assert_eq!(f.kinds.len(), 2);
    for k in &f.kinds {
        assert!(
            !k.available && k.note.contains("not a character device"),
            "{k:?}"
        );
    }
}

#[test]
fn character_devices_outside_dev_are_not_handed_to_vfio_ioctls() {
    // The nodes are /dev/null: character devices, but vfio-ioctls opens /dev/vfio/... itself,
    // so neither path goes on when the probe looks at another /dev.
    let t = Tree::new("chardev");
    sysfs(&t);
    t.link("dev/vfio/12", "/dev/null");
    t.link("dev/vfio/devices/vfio0", "/dev/null");
    t.link("dev/iommu", "/dev/null");

    let f = vmm_probe::vfio::probe(&t.opts());
    assert!(f.line.found);
    let line = &f.line.line;
    assert!(line.contains("vfio-ioctls opens /dev/vfio/vfio"), "{line}");
    assert!(
        line.contains("vfio-ioctls opens /dev/vfio/devices/<cdev> itself"),
        "{line}"
    );
    assert!(f.cells.is_empty());
}

#[test]
fn the_iommufd_path_runs_through_the_crates_to_the_kernels_enotty() {
    // A cdev device whose nodes are /dev/null under /dev: opened for real; iommufd-ioctls'
    // IOMMU_IOAS_ALLOC is refused by the kernel, and the device line says so.
    let dev = VfioDev {
        bdf: "0000:02:00.0".into(),
        sysfs: PathBuf::from("/nonexistent"),
        group: None,
        group_node: None,
        cdev_node: None,
        vendor: None,
        device: None,
        driver: None,
        access: Access::Cdev {
            node: PathBuf::from("/dev/null"),
            iommu: PathBuf::from("/dev/null"),
        },
    };
    let Err(e) = open(&dev, Path::new("/dev")) else {
        panic!("/dev/null opened as a VFIO device");
    };
    assert!(
        matches!(e, OpenError::Open(devices::vfio::OpenError::Iommufd { .. })),
        "{e}"
    );
    assert_eq!(errno_of(&e), Some(libc::ENOTTY), "{e}");
    assert!(e.to_string().starts_with("allocating an IOAS: "), "{e}");
}

#[test]
fn absent_trees_give_the_absent_lines() {
    let t = Tree::new("absent");
    let f = vmm_probe::vfio::probe(&t.opts());
    assert!(!f.line.found);
    assert_eq!(f.line.line, "no VFIO: /dev/vfio/ absent");
    assert!(f.kinds.is_empty() && f.cells.is_empty());

    // The module loaded: the container node and an empty devices/ are no device.
    t.file("dev/vfio/vfio", "");
    std::fs::create_dir_all(t.dev().join("vfio/devices")).unwrap();
    let f = vmm_probe::vfio::probe(&t.opts());
    assert!(!f.line.found);
    assert_eq!(
        f.line.line,
        "no VFIO device: /dev/vfio/ has no group or cdev"
    );
}

#[test]
fn this_machine_has_no_vfio() {
    if Path::new("/dev/vfio").exists() {
        eprintln!("skipped: /dev/vfio exists here; this test is for machines without VFIO");
        return;
    }
    let f = vmm_probe::vfio::probe(&ProbeOpts::default());
    assert!(!f.line.found);
    assert_eq!(f.line.line, "no VFIO: /dev/vfio/ absent");
}

fn memfd() -> std::fs::File {
    // SAFETY: a NUL-terminated name; the fd returned is checked and owned from here on.
    let fd = unsafe { libc::memfd_create(c"vmm-probe-vfio-test".as_ptr(), 0) };
    assert!(fd >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh fd nothing else owns.
    std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn enotty(e: &(dyn std::error::Error + 'static)) {
    assert_eq!(errno_of(e), Some(libc::ENOTTY), "{e}");
}

#[test]
fn every_hand_written_ioctl_on_a_memfd_is_enotty() {
    // The iommufd's: on IommuFd::as_raw_fd(), here a memfd's.
    let fd = IommuFd::new_from_fd(memfd());
    enotty(&iommufd::set_dirty_tracking(&fd, 3, true).unwrap_err());
    let mut bitmap = [0u64; 8];
    enotty(&iommufd::get_dirty_bitmap(&fd, 3, 1 << 32, 2 << 20, 4096, &mut bitmap).unwrap_err());
    // The crate's, as the cells call them.
    enotty(&iommufd::hw_info(&fd, 1).unwrap_err());
    enotty(&iommufd::alloc_dirty_hwpt(&fd, 1, 2).unwrap_err());
    enotty(&fd.destroy_iommu_object(2).unwrap_err());

    let m = memfd();
    enotty(&region::info(&m, 0).unwrap_err());
    enotty(&type1::info(&m).unwrap_err());
    enotty(&type1::start(&m).unwrap_err());
    enotty(&type1::stop(&m).unwrap_err());
    enotty(&type1::bitmap(&m, 1 << 32, 2 << 20, 4096, &mut bitmap).unwrap_err());
}
