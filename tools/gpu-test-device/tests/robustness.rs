//! Clients that misbehave. The contract (README.md, "Lifecycle"): the server outlives any
//! client. Garbage gets error replies (or, when a message's size cannot be trusted, an error
//! reply and a closed connection); a client that leaves, cleanly or mid-run, has its engines
//! stopped, DMA regions and eventfds dropped and the device reset, and the server waits for the
//! next one. With `--once` it exits with status 0 instead, removing its socket.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use gpu_test_device::{pci, regs};
use vm_memory::VolatileMemory;

const REPLY: u32 = 1;
const ERROR: u32 = 1 << 5;

fn header(id: u16, command: u16, size: u32) -> Vec<u8> {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&id.to_le_bytes());
    bytes.extend_from_slice(&command.to_le_bytes());
    bytes.extend_from_slice(&size.to_le_bytes());
    bytes.extend_from_slice(&0u32.to_le_bytes());
    bytes.extend_from_slice(&0u32.to_le_bytes());
    bytes
}

/// Reads one 16-byte reply header: (id, command, flags, errno).
fn reply(stream: &mut UnixStream) -> (u16, u16, u32, u32) {
    let mut bytes = [0; 16];
    stream.read_exact(&mut bytes).expect("reply header");
    let u32_at =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    (
        u16::from_le_bytes([bytes[0], bytes[1]]),
        u16::from_le_bytes([bytes[2], bytes[3]]),
        u32_at(8),
        u32_at(12),
    )
}

fn raw_connection(device: &DeviceProcess) -> UnixStream {
    let stream = UnixStream::connect(&device.socket).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream
}

#[test]
fn garbage_gets_error_replies_and_the_server_serves_the_next_client() {
    let mut device = DeviceProcess::start(&[]);

    // A size no message can have: error reply, then the server hangs up.
    let mut stream = raw_connection(&device);
    stream
        .write_all(&header(1, 0x7777, u32::MAX))
        .expect("send");
    let (id, command, flags, errno) = reply(&mut stream);
    assert_eq!((id, command), (1, 0x7777));
    assert_eq!(flags, REPLY | ERROR);
    assert_eq!(errno, libc::EINVAL as u32);
    assert_eq!(
        stream.read(&mut [0; 1]).expect("EOF"),
        0,
        "connection closed"
    );

    // Well-framed nonsense: each gets its error reply and the stream stays in step.
    let mut stream = raw_connection(&device);
    stream.write_all(&header(2, 1, 16)).expect("send"); // VERSION without its fields
    assert_eq!(
        reply(&mut stream),
        (2, 1, REPLY | ERROR, libc::EINVAL as u32)
    );
    let mut unknown = header(3, 0x55, 24);
    unknown.extend_from_slice(b"12345678");
    stream.write_all(&unknown).expect("send");
    assert_eq!(
        reply(&mut stream),
        (3, 0x55, REPLY | ERROR, libc::ENOTSUP as u32)
    );
    let mut version = header(4, 1, 28);
    version.extend_from_slice(&[0, 0, 1, 0]);
    version.extend_from_slice(b"{\"no\":0}"); // capabilities without their NUL
    stream.write_all(&version).expect("send");
    assert_eq!(
        reply(&mut stream),
        (4, 1, REPLY | ERROR, libc::EINVAL as u32)
    );
    drop(stream);

    // Noise, then a half-sent message and a hang-up.
    let mut stream = raw_connection(&device);
    let noise: Vec<u8> = (0u32..1000)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let _ = stream.write_all(&noise);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    drop(stream);

    assert!(
        device.child.try_wait().expect("try_wait").is_none(),
        "still running"
    );
    let mut client = device.connect();
    assert_eq!(read32(&mut client, regs::ID), regs::ID_VALUE);
}

#[test]
fn a_client_leaving_mid_run_leaves_a_reset_device_for_the_next() {
    let device = DeviceProcess::start(&[]);
    let mut client = device.connect();
    let ram = guest_ram(&mut client);
    write32(&mut client, regs::SCRATCH, 5);
    write64(&mut client, regs::PW_BASE_LO, RAM_IOVA);
    write32(&mut client, regs::PW_PAGES, 16);
    write32(&mut client, regs::PW_RATE, 2000);
    write32(&mut client, regs::PW_CTRL, regs::CTRL_START);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(read32(&mut client, regs::PW_CTRL), 1, "running");
    drop(client);

    // The next client finds a fresh device...
    let mut client = device.connect();
    assert_eq!(read32(&mut client, regs::SCRATCH), 0);
    assert_eq!(read32(&mut client, regs::PW_STATUS), regs::STATUS_IDLE);
    assert_eq!(
        dma(&mut client, RAM_IOVA, 0, 64, regs::DIR_RAM_TO_VRAM),
        regs::STATUS_ERR_UNMAPPED,
        "the old client's DMA regions are gone"
    );
    // ...and the old client's memory is no longer written.
    let stamps = |ram: &GuestRam| -> Vec<u8> {
        let mut data = vec![0; 16 * pci::PAGE_SIZE as usize];
        ram.map
            .get_slice(0, data.len())
            .expect("slice")
            .copy_to(&mut data[..]);
        data
    };
    let before = stamps(&ram);
    assert!(before.iter().any(|&b| b != 0), "it was written");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(stamps(&ram), before);
}

#[test]
fn with_once_a_client_leaving_mid_run_ends_the_server_cleanly() {
    let mut device = DeviceProcess::start(&["--once"]);
    let mut client = device.connect();
    let _ram = guest_ram(&mut client);
    write64(&mut client, regs::K_LEN_LO, 1 << 20);
    write32(&mut client, regs::K_CTRL, regs::CTRL_START);
    write64(&mut client, regs::PW_BASE_LO, RAM_IOVA);
    write32(&mut client, regs::PW_PAGES, 16);
    write32(&mut client, regs::PW_CTRL, regs::CTRL_START);
    drop(client);

    let status = device.wait_exit(Duration::from_secs(10)).expect("exited");
    assert!(status.success(), "{status}: {}", device.stderr());
    assert!(!device.socket.exists(), "socket removed");
}
