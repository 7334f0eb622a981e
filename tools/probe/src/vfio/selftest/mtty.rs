//! mtty's own part of the self-test: its serial port's registers (8250 offsets in BAR0), the
//! interrupt it raises on IER THRI, and the port state a migration must carry (LCR, scratch
//! register, loopback FIFO), written on the source and checked on the destination.

use devices::vfio::passthrough::transport::{DeviceMigration, MigState, VfioTransport};
use devices::vfio::passthrough::KernelTransport;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{check, BoxError};

pub(super) const BAR0: u32 = 0;
pub(super) const INTX_IRQ: u32 = 0;
// 8250 register offsets in mtty's BAR0 (include/uapi/linux/serial_reg.h).
const UART_RX_TX: u64 = 0;
const UART_IER: u64 = 1;
const UART_FCR: u64 = 2;
const UART_LCR: u64 = 3;
const UART_LSR: u64 = 5;
pub(super) const UART_SCR: u64 = 7;
const UART_IER_THRI: u8 = 0x02;
/// FIFO on, both FIFOs cleared.
const UART_FCR_ON_CLEAR: u8 = 0x07;
const UART_LSR_DR: u8 = 0x01;

pub(super) fn read_reg(t: &mut KernelTransport, reg: u64) -> Result<u8, BoxError> {
    // mtty's registers are bytes: a wider access reaches only its first byte.
    let mut b = [0u8; 1];
    t.region_read(BAR0, reg, &mut b)?;
    Ok(b[0])
}

pub(super) fn write_reg(t: &mut KernelTransport, reg: u64, v: u8) -> Result<(), BoxError> {
    t.region_write(BAR0, reg, &[v])?;
    Ok(())
}

/// Whether the eventfd was signalled (reading it clears it).
fn fired(fd: &EventFd) -> Result<Option<u64>, BoxError> {
    match fd.read() {
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The serial-port state written on the source and checked on the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PortState {
    lcr: u8,
    scr: u8,
    /// Bytes in mtty's loopback FIFO (written to TX, read back from RX).
    fifo: [u8; 3],
}

fn put_state(t: &mut KernelTransport, s: &PortState) -> Result<(), BoxError> {
    write_reg(t, UART_FCR, UART_FCR_ON_CLEAR)?;
    write_reg(t, UART_LCR, s.lcr)?;
    write_reg(t, UART_SCR, s.scr)?;
    for b in s.fifo {
        write_reg(t, UART_RX_TX, b)?;
    }
    Ok(())
}

/// Reads the state back (draining the FIFO).
fn take_state(t: &mut KernelTransport) -> Result<(PortState, u8), BoxError> {
    let lcr = read_reg(t, UART_LCR)?;
    let scr = read_reg(t, UART_SCR)?;
    let lsr = read_reg(t, UART_LSR)?;
    let mut fifo = [0u8; 3];
    for b in &mut fifo {
        *b = read_reg(t, UART_RX_TX)?;
    }
    Ok((PortState { lcr, scr, fifo }, lsr))
}

/// Drains the migration data fd.
fn read_all(t: &mut KernelTransport) -> Result<Vec<u8>, BoxError> {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = t.migration_read(&mut buf)?;
        data.extend_from_slice(&buf[..n]);
        if n < buf.len() {
            return Ok(data);
        }
    }
}

/// Loads `data` into `dst` (RESUMING, then STOP loads it, then RUNNING) and checks that the
/// port reads back as `want`.
fn resume_and_check(
    dst: &mut KernelTransport,
    data: &[u8],
    want: &PortState,
) -> Result<String, BoxError> {
    dst.set_migration_state(MigState::Resuming)?;
    dst.migration_write(data)?;
    dst.set_migration_state(MigState::Stop)?;
    dst.set_migration_state(MigState::Running)?;
    let (got, lsr) = take_state(dst)?;
    check(got == *want, || {
        format!("destination reads {got:x?}, the source had {want:x?}")
    })?;
    check(lsr & UART_LSR_DR != 0, || {
        format!("destination LSR {lsr:#x} has no data ready")
    })?;
    Ok(format!(
        "destination reads LCR {:#04x} SCR {:#04x} FIFO {:?} (LSR {lsr:#04x} before draining)",
        got.lcr,
        got.scr,
        String::from_utf8_lossy(&got.fifo)
    ))
}

pub(super) fn irq(t: &mut KernelTransport, index: u32) -> Result<((), String), BoxError> {
    let info = t.irq_info(index)?;
    check(info.count >= 1, || {
        format!("IRQ index {index} has no vectors")
    })?;
    let fd = EventFd::new(EFD_NONBLOCK)?;
    t.enable_irqs(index, &[&fd])?;
    // IER with THRI while the loopback FIFO is empty: mtty raises the interrupt at once.
    write_reg(t, UART_FCR, UART_FCR_ON_CLEAR)?;
    write_reg(t, UART_IER, 0)?;
    write_reg(t, UART_IER, UART_IER_THRI)?;
    let count = fired(&fd)?;
    write_reg(t, UART_IER, 0)?;
    t.disable_irqs(index)?;
    let count = count.ok_or("the eventfd was not signalled after IER THRI was set")?;
    Ok((
        (),
        format!(
            "index {index}: {} vector(s), flags {:#x}; eventfd signalled (count {count}) on IER THRI; disabled",
            info.count, info.flags
        ),
    ))
}

pub(super) fn precopy(
    src: &mut KernelTransport,
    dst: &mut KernelTransport,
) -> Result<((), String), BoxError> {
    let want = PortState {
        lcr: 0x1b,
        scr: 0xc3,
        fifo: *b"pre",
    };
    put_state(src, &want)?;
    src.set_migration_state(MigState::PreCopy)?;
    let first = src.precopy_info()?.ok_or("no VFIO_MIG_GET_PRECOPY_INFO")?;
    let mut data = read_all(src)?;
    let after = src.precopy_info()?.ok_or("no VFIO_MIG_GET_PRECOPY_INFO")?;
    check(
        first.initial_bytes == data.len() as u64 && after.initial_bytes == 0,
        || {
            format!(
                "precopy_info said {first:?}, {} bytes read, then {after:?}",
                data.len()
            )
        },
    )?;
    let precopied = data.len();
    src.set_migration_state(MigState::StopCopy)?;
    data.extend(read_all(src)?);
    src.set_migration_state(MigState::Stop)?;
    let checked = resume_and_check(dst, &data, &want)?;
    // Back to RUNNING for the next steps (STOP -> RUNNING drops the data fd).
    src.set_migration_state(MigState::Running)?;
    Ok((
        (),
        format!(
            "PRE_COPY: precopy_info initial {} dirty {}, read {precopied} bytes, then initial {} dirty {}; \
             STOP_COPY: {} more bytes; {checked}",
            first.initial_bytes,
            first.dirty_bytes,
            after.initial_bytes,
            after.dirty_bytes,
            data.len() - precopied
        ),
    ))
}

pub(super) fn stop_copy(
    src: &mut KernelTransport,
    dst: &mut KernelTransport,
) -> Result<((), String), BoxError> {
    let want = PortState {
        lcr: 0x03,
        scr: 0x3c,
        fifo: *b"vmm",
    };
    put_state(src, &want)?;
    // RUNNING -> STOP_COPY: the kernel walks through STOP.
    src.set_migration_state(MigState::StopCopy)?;
    let data = read_all(src)?;
    src.set_migration_state(MigState::Stop)?;
    let state = src.migration_state()?;
    // The destination ran since the precopy step: RESUMING starts afresh from RUNNING.
    let checked = resume_and_check(dst, &data, &want)?;
    src.set_migration_state(MigState::Running)?;
    Ok((
        (),
        format!(
            "{} bytes read in STOP_COPY, source then {state:?}; {checked}",
            data.len()
        ),
    ))
}
