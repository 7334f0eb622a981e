//! Shared test harness: the device binary on a temporary socket, a vfio-user client to it,
//! register helpers, and a memfd standing in for guest RAM.
//!
//! Everything goes through the vfio-user protocol (no in-process shortcut), so each test is a
//! script a driver could run against a real device.

#![allow(dead_code)]

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use gpu_test_device::regs;
use vfio_bindings::bindings::vfio::*;
use vfio_user::Client;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, MmapRegion};

pub const BIN: &str = env!("CARGO_BIN_EXE_vmm-gpu-test-device");

/// Where the tests map guest RAM: above 4 GiB, as a VMM maps IOVA = GPA.
pub const RAM_IOVA: u64 = 0x1_0000_0000;
pub const RAM_SIZE: u64 = 4 << 20;

/// The device binary, listening on a socket in its own temporary directory.
pub struct DeviceProcess {
    pub child: Child,
    pub socket: PathBuf,
    pub status: serde_json::Value,
    pub dir: tempfile::TempDir,
}

impl DeviceProcess {
    /// Starts the binary with `--json` and `extra` arguments; returns once it says it is ready.
    pub fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let socket = dir.path().join("gpu.sock");
        let stderr = File::create(dir.path().join("stderr")).expect("stderr file");
        let mut child = Command::new(BIN)
            .arg("--socket")
            .arg(&socket)
            .arg("--json")
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn the device binary");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("status line");
        let status: serde_json::Value = match serde_json::from_str(&line) {
            Ok(status) => status,
            Err(e) => {
                let _ = child.kill();
                panic!(
                    "no JSON status ({e}): {line:?}; stderr: {}",
                    std::fs::read_to_string(dir.path().join("stderr")).unwrap_or_default()
                );
            }
        };
        assert_eq!(status["ready"], true);
        Self {
            child,
            socket,
            status,
            dir,
        }
    }

    pub fn connect(&self) -> Client {
        Client::new(&self.socket).expect("connect and negotiate")
    }

    /// What the device wrote on stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for DeviceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn read32(client: &mut Client, offset: u64) -> u32 {
    let mut data = [0; 4];
    client
        .region_read(VFIO_PCI_BAR0_REGION_INDEX, offset, &mut data)
        .expect("register read");
    u32::from_le_bytes(data)
}

pub fn write32(client: &mut Client, offset: u64, value: u32) {
    client
        .region_write(VFIO_PCI_BAR0_REGION_INDEX, offset, &value.to_le_bytes())
        .expect("register write");
}

/// A 64-bit register pair written as one 8-byte access.
pub fn write64(client: &mut Client, offset: u64, value: u64) {
    client
        .region_write(VFIO_PCI_BAR0_REGION_INDEX, offset, &value.to_le_bytes())
        .expect("register write");
}

pub fn config_read(client: &mut Client, offset: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0; len];
    client
        .region_read(VFIO_PCI_CONFIG_REGION_INDEX, offset, &mut data)
        .expect("config read");
    data
}

pub fn config32(client: &mut Client, offset: u64) -> u32 {
    let data = config_read(client, offset, 4);
    u32::from_le_bytes([data[0], data[1], data[2], data[3]])
}

/// Polls `offset` until it is not `STATUS_BUSY`; returns the final status.
pub fn wait_not_busy(client: &mut Client, offset: u64) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = read32(client, offset);
        if status != regs::STATUS_BUSY {
            return status;
        }
        assert!(Instant::now() < deadline, "register {offset:#x} still busy");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Runs one DMA transfer and returns its final status.
pub fn dma(client: &mut Client, src: u64, dst: u64, len: u64, dir: u32) -> u32 {
    write64(client, regs::DMA_SRC_LO, src);
    write64(client, regs::DMA_DST_LO, dst);
    write64(client, regs::DMA_LEN_LO, len);
    write32(client, regs::DMA_DIR, dir);
    write32(client, regs::DMA_DOORBELL, 1);
    wait_not_busy(client, regs::DMA_STATUS)
}

/// A memfd of `size` bytes: the guest RAM a VMM would hand over with DMA_MAP.
pub fn memfd(size: u64) -> File {
    // SAFETY: the name is NUL-terminated; memfd_create returns a new fd or -1.
    let raw = unsafe { libc::memfd_create(c"gpu-test-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(
        raw >= 0,
        "memfd_create: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `raw` is a new fd that nothing else owns.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
    file.set_len(size).expect("size the memfd");
    file
}

/// A shared read-write mapping of `size` bytes of `file` from `offset`.
pub fn map(file: &File, offset: u64, size: u64) -> MmapRegion<()> {
    MmapRegionBuilder::new(size as usize)
        .with_file_offset(FileOffset::new(file.try_clone().expect("dup"), offset))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_SHARED)
        .build()
        .expect("mmap")
}

/// Guest RAM mapped both here and in the device at [`RAM_IOVA`].
pub struct GuestRam {
    pub file: File,
    pub map: MmapRegion<()>,
}

pub fn guest_ram(client: &mut Client) -> GuestRam {
    use std::os::fd::AsRawFd;
    let file = memfd(RAM_SIZE);
    client
        .dma_map(0, RAM_IOVA, RAM_SIZE, file.as_raw_fd())
        .expect("DMA_MAP guest RAM");
    let map = map(&file, 0, RAM_SIZE);
    GuestRam { file, map }
}

/// Binary path's socket parent, for tests that need to build paths next to it.
pub fn sibling(process: &DeviceProcess, name: &str) -> PathBuf {
    process
        .socket
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
        .join(name)
}
