//! The passthrough device against the real `vmm-gpu-test-device` over vfio-user: ids and BARs
//! through the shadow, VRAM mapped from its mmappable piece, guest RAM DMA-mapped by fd, a DMA
//! each way, and the completion's MSI-X vector arriving on the eventfd the route listens on.
//!
//! The binary is a sibling of this test's target directory (build it first:
//! `cargo build -p gpu-test-device`), or named by VMM_GPU_TEST_DEVICE; without it the test
//! says so and skips.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::pci::{BarKind, BarSlot, MsiMessage, PciDevice, RouteError, VectorRoutes};
use devices::vfio::passthrough::{PassthroughDevice, PassthroughRoutes, UserTransport};
use gpu_test_device::{pci, regs};
use vm_memory::{Bytes, FileOffset, GuestAddress, VolatileSlice};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const VRAM: u64 = 64 << 20;
const RAM_GPA: u64 = 0x1_0000_0000;
const RAM_SIZE: u64 = 4 << 20;

fn binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("VMM_GPU_TEST_DEVICE") {
        return Some(PathBuf::from(p));
    }
    // target/<profile>/deps/<this test> -> target/<profile>/vmm-gpu-test-device
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.parent()?.join("vmm-gpu-test-device");
    bin.exists().then_some(bin)
}

struct Server {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(bin: &PathBuf) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let socket = dir.path().join("gpu.sock");
        let mut child = Command::new(bin)
            .arg("--socket")
            .arg(&socket)
            .args(["--json", "--vram-size", "64M"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the device binary");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("status line");
        assert!(line.contains("\"ready\":true"), "not ready: {line:?}");
        Self {
            child,
            socket,
            _dir: dir,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The owner's routes: record unmasks, one eventfd per vector.
#[derive(Clone, Default)]
struct Routes {
    unmasked: Arc<Mutex<Vec<(u16, MsiMessage)>>>,
    fds: Arc<Mutex<Vec<EventFd>>>,
}

impl VectorRoutes for Routes {
    fn unmask(&mut self, vector: u16, msg: MsiMessage) -> Result<(), RouteError> {
        self.unmasked.lock().unwrap().push((vector, msg));
        Ok(())
    }
    fn mask(&mut self, _vector: u16) -> Result<(), RouteError> {
        Ok(())
    }
    fn trigger(&mut self, _vector: u16) -> Result<(), RouteError> {
        Ok(())
    }
}

impl PassthroughRoutes for Routes {
    fn eventfd(&mut self, _vector: u16) -> Result<EventFd, RouteError> {
        let fd = EventFd::new(EFD_NONBLOCK)?;
        let clone = fd.try_clone()?;
        self.fds.lock().unwrap().push(fd);
        Ok(clone)
    }
}

fn cfg32(dev: &mut PassthroughDevice, offset: usize) -> u32 {
    let mut b = [0; 4];
    dev.config_read(offset, &mut b);
    u32::from_le_bytes(b)
}

fn reg(dev: &mut PassthroughDevice, offset: u64) -> u32 {
    let mut b = [0; 4];
    dev.bar_read(BarSlot::Bar(0), offset, &mut b);
    u32::from_le_bytes(b)
}

fn set_reg(dev: &mut PassthroughDevice, offset: u64, value: u32) {
    dev.bar_write(BarSlot::Bar(0), offset, &value.to_le_bytes());
}

fn dma(dev: &mut PassthroughDevice, src: u64, dst: u64, len: u32, dir: u32) -> u32 {
    for (lo, v) in [
        (regs::DMA_SRC_LO, src),
        (regs::DMA_DST_LO, dst),
        (regs::DMA_LEN_LO, u64::from(len)),
    ] {
        set_reg(dev, lo, v as u32);
        set_reg(dev, lo + 4, (v >> 32) as u32);
    }
    set_reg(dev, regs::DMA_DIR, dir);
    set_reg(dev, regs::DMA_DOORBELL, 1);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = reg(dev, regs::DMA_STATUS);
        if status != regs::STATUS_BUSY {
            return status;
        }
        assert!(Instant::now() < deadline, "DMA still busy");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn the_gpu_test_device_passes_through_over_vfio_user() {
    let Some(bin) = binary() else {
        eprintln!(
            "skipped: no vmm-gpu-test-device binary next to the test (cargo build -p \
             gpu-test-device) and VMM_GPU_TEST_DEVICE unset"
        );
        return;
    };
    let server = Server::start(&bin);
    let transport = UserTransport::connect(&server.socket).expect("connect");
    let routes = Routes::default();
    let mut dev =
        PassthroughDevice::new(Box::new(transport), Box::new(routes.clone())).expect("open");

    // Ids and BARs through the shadow.
    let ids = u32::from(pci::DEFAULT_DEVICE_ID) << 16 | u32::from(pci::DEFAULT_VENDOR_ID);
    assert_eq!(cfg32(&mut dev, 0), ids);
    assert_eq!(cfg32(&mut dev, 0x08) >> 8, pci::CLASS_CODE);
    let layout = dev.bar_layout();
    let bars: Vec<_> = layout
        .bars()
        .iter()
        .map(|b| (b.index, b.kind, b.size))
        .collect();
    let pf64 = BarKind::Mem64 { prefetchable: true };
    assert_eq!(
        bars,
        [
            (
                0,
                BarKind::Mem32 {
                    prefetchable: false
                },
                pci::BAR0_SIZE
            ),
            (1, pf64, VRAM),
            (3, pf64, pci::BAR3_SIZE)
        ]
    );
    dev.config_write(0x18, &u32::MAX.to_le_bytes());
    dev.config_write(0x14, &u32::MAX.to_le_bytes());
    let size = u64::from(cfg32(&mut dev, 0x18)) << 32 | u64::from(cfg32(&mut dev, 0x14) & !0xf);
    assert_eq!(!size + 1, VRAM, "VRAM sized through the shadow");
    dev.set_bar_address(BarSlot::Bar(0), 0xc000_0000).unwrap();
    dev.set_bar_address(BarSlot::Bar(1), 0x40_0000_0000)
        .unwrap();
    assert_eq!(cfg32(&mut dev, 0x10), 0xc000_0000);
    assert_eq!(cfg32(&mut dev, 0x18), 0x40);
    dev.config_write(0x04, &0x0006u16.to_le_bytes()); // memory + bus master

    // Registers through trapped BAR0 accesses.
    assert_eq!(reg(&mut dev, regs::ID), regs::ID_VALUE);
    set_reg(&mut dev, regs::SCRATCH, 0x5a5a_1234);
    assert_eq!(reg(&mut dev, regs::SCRATCH), 0x5a5a_1234);

    // The mmappable pieces: BAR0 around the register page and the MSI-X pages; all of VRAM.
    let pieces = dev.map_bars().expect("map the BARs");
    let bar0: Vec<_> = pieces
        .iter()
        .filter(|p| p.slot == BarSlot::Bar(0))
        .map(|p| (p.bar_offset, p.size))
        .collect();
    assert_eq!(
        bar0,
        [(0x1000, 0xb8f000), (0xb91000, 0xf000), (0xba1000, 0x45f000)]
    );
    let vram = *pieces
        .iter()
        .find(|p| p.slot == BarSlot::Bar(1))
        .expect("a VRAM piece");
    assert_eq!((vram.bar_offset, vram.size), (0, VRAM));
    assert_eq!(vram.host_addr as u64 % VRAM, 0, "VRAM mapped size-aligned");
    // SAFETY: `vram` is a live shared mapping of VRAM_SIZE bytes that `dev` keeps until it is
    // dropped, after this slice's last use; the device writes it concurrently, which volatile
    // accesses allow.
    let vram_mem = unsafe { VolatileSlice::new(vram.host_addr as *mut u8, vram.size as usize) };

    // Guest RAM from a regular file, DMA-mapped at IOVA = GPA (vfio-user sends the fd).
    let file = tempfile::tempfile().expect("RAM file");
    file.set_len(RAM_SIZE).expect("size RAM");
    let ram = devices::GuestMemory::from_ranges_with_files([(
        GuestAddress(RAM_GPA),
        RAM_SIZE as usize,
        Some(FileOffset::new(file.try_clone().expect("dup"), 0)),
    )])
    .expect("map RAM");
    dev.map_guest_memory(&ram).expect("DMA map");

    // MSI-X on, vector 2 programmed and unmasked: a route, on the eventfd the device has.
    let cap = usize::from(pci::MSIX_CAP_OFFSET);
    dev.config_write(cap + 2, &0x8000u16.to_le_bytes());
    let msg = MsiMessage {
        address: 0xfee0_0000,
        data: 0x42,
    };
    let entry = pci::MSIX_TABLE_OFFSET + 2 * 16;
    dev.bar_write(BarSlot::Bar(0), entry, &msg.address.to_le_bytes());
    dev.bar_write(BarSlot::Bar(0), entry + 8, &msg.data.to_le_bytes());
    dev.bar_write(BarSlot::Bar(0), entry + 12, &0u32.to_le_bytes());
    assert_eq!(*routes.unmasked.lock().unwrap(), [(2, msg)]);
    set_reg(&mut dev, regs::IRQ_VECTOR, 2);
    set_reg(&mut dev, regs::IRQ_ENABLE, regs::IRQ_DMA);

    // RAM -> VRAM: the device's write shows through our VRAM mapping.
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    ram.write_slice(&pattern, GuestAddress(RAM_GPA + 0x100))
        .expect("fill RAM");
    let status = dma(
        &mut dev,
        RAM_GPA + 0x100,
        0x2000,
        4096,
        regs::DIR_RAM_TO_VRAM,
    );
    assert_eq!(status, regs::STATUS_DONE);
    let mut seen = vec![0u8; 4096];
    vram_mem
        .subslice(0x2000, 4096)
        .expect("VRAM slice")
        .copy_to(&mut seen[..]);
    assert_eq!(seen, pattern, "VRAM through the mapped piece");

    // The completion raised vector 2 on its eventfd.
    let deadline = Instant::now() + Duration::from_secs(10);
    let signalled = loop {
        let n = routes.fds.lock().unwrap()[2].read().unwrap_or(0);
        if n > 0 || Instant::now() > deadline {
            break n;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    assert!(signalled >= 1, "vector 2's eventfd was not signalled");

    // Our write through the mapping -> VRAM -> RAM by DMA.
    let marker = [0xabu8; 64];
    vram_mem
        .subslice(0x8000, 64)
        .expect("VRAM slice")
        .copy_from(&marker[..]);
    let status = dma(
        &mut dev,
        0x8000,
        RAM_GPA + 0x3000,
        64,
        regs::DIR_VRAM_TO_RAM,
    );
    assert_eq!(status, regs::STATUS_DONE);
    let mut back = [0u8; 64];
    ram.read_slice(&mut back, GuestAddress(RAM_GPA + 0x3000))
        .expect("read RAM");
    assert_eq!(back, marker);

    assert!(dev.take_errors().is_empty());
    let errors = dev.teardown();
    assert!(errors.is_empty(), "teardown: {errors:?}");
    drop(dev);
    drop::<File>(file);
}

/// A server that stops answering (SIGSTOP) makes the call in flight fail within the reply
/// timeout; when it resumes, its late reply is never taken for the next call's: the
/// connection is lost, and every later call says so at once.
#[test]
fn a_server_that_stops_answering_loses_the_connection_for_good() {
    let Some(bin) = binary() else {
        eprintln!("skip: vmm-gpu-test-device not built (cargo build -p gpu-test-device)");
        return;
    };
    let server = Server::start(&bin);
    let t = UserTransport::connect(&server.socket).expect("connect");
    let mut dev = PassthroughDevice::new(Box::new(t), Box::new(Routes::default())).expect("device");
    assert_eq!(reg(&mut dev, regs::ID), regs::ID_VALUE);

    let pid = server.child.id() as libc::pid_t;
    // SAFETY: signals the child this test spawned and still owns.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let start = Instant::now();
    assert_eq!(reg(&mut dev, regs::ID), u32::MAX, "no answer: all-ones");
    let waited = start.elapsed();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    assert!(waited < Duration::from_secs(30), "waited {waited:?}");

    // The server answers the stale read now; the next access must not take that reply.
    std::thread::sleep(Duration::from_millis(200));
    let start = Instant::now();
    assert_eq!(reg(&mut dev, regs::SCRATCH), u32::MAX);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "a lost connection waited again"
    );
    let errors: Vec<String> = dev
        .take_errors()
        .iter()
        .map(|e| devices::vfio::passthrough::chain(e))
        .collect();
    assert!(
        errors.iter().any(|e| e.contains("lost earlier")),
        "{errors:#?}"
    );
}
