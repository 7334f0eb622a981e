//! COM1: a 16550A UART (vm-superio's model) whose interrupt is an eventfd the VMM registers as a
//! KVM irqfd on GSI 4, and whose output goes to any writer (stdout, a file).
//!
//! vm-superio 0.8.2 raises THRE whenever the guest enables it in IER (the transmitter is always
//! empty in its model) and after every byte written to THR, which Linux's 8250 driver needs or
//! user-space tty output stalls. It writes output one byte at a time and flushes after each one;
//! `ConsoleOut` batches that into lines.

use std::io::{self, Write};

use vm_superio::serial::{Error as UartError, SerialEvents};
use vm_superio::Trigger;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::{BusDevice, VcpuAction};

/// Register offsets the wrapper cares about (see the 16550 data sheet).
const IER_OFFSET: u8 = 1;
/// The UART decodes eight ports.
const REGISTER_COUNT: u64 = 8;
/// Emit buffered output once this much has piled up without a newline.
const EMIT_THRESHOLD: usize = 4096;

/// Called with each chunk of console output as it is emitted (normally one or more whole lines;
/// a line longer than 4 KiB is cut). Lets the VMM spot markers such as "Kernel panic - not
/// syncing" or the agent's ready marker without parsing the output stream itself. Chunks end at
/// newlines, but also where the guest rewrites IER (end of a console message or of a tty
/// transmit burst) and at 4 KiB, so an observer that must never miss a marker should keep the
/// unterminated tail of the previous chunk and match across it.
///
/// It runs in the vCPU thread that wrote the byte, with the `Serial`'s lock held: keep it quick
/// (send on a channel, set a flag) and never touch the `Serial` from it.
pub type OutputObserver = Box<dyn FnMut(&[u8]) + Send>;

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("creating the input-drained eventfd: {0}")]
    EventFd(#[source] io::Error),
    #[error("raising the UART interrupt: {0}")]
    Trigger(#[source] io::Error),
}

/// The UART's interrupt line: an eventfd KVM turns into an edge on GSI 4.
struct IrqTrigger(EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Signals `drained` whenever the guest has read the receive FIFO empty, so the VMM knows it can
/// feed more console input (the FIFO holds only 64 bytes).
struct InputEvents {
    drained: EventFd,
}

impl SerialEvents for InputEvents {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Err(e) = self.drained.write(1) {
            tracing::warn!("signalling console input drained: {e}");
        }
    }
}

/// Line-buffers the UART's byte-at-a-time output in front of the real writer.
///
/// vm-superio calls `flush` after every byte; passing that through would cost a syscall per
/// byte, so `flush` is a no-op here and output is emitted on a newline, when
/// [`EMIT_THRESHOLD`] bytes have piled up, when the guest writes IER (Linux does that at the end
/// of every console message and when the tty's transmit buffer runs empty, so prompts without a
/// newline still show), on [`Serial::flush_output`], and on drop.
struct ConsoleOut {
    out: Box<dyn Write + Send>,
    pending: Vec<u8>,
    observer: Option<OutputObserver>,
}

impl ConsoleOut {
    fn emit(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        if let Some(observer) = &mut self.observer {
            observer(&self.pending);
        }
        let res = self
            .out
            .write_all(&self.pending)
            .and_then(|_| self.out.flush());
        // On failure the bytes are dropped: the guest cannot be made to wait for the console.
        self.pending.clear();
        res
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.pending.extend_from_slice(buf);
        if buf.contains(&b'\n') || self.pending.len() >= EMIT_THRESHOLD {
            self.emit()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ConsoleOut {
    fn drop(&mut self) {
        if let Err(e) = self.emit() {
            tracing::warn!("console output lost at shutdown: {e}");
        }
    }
}

/// The COM1 UART, mapped by the VMM at `guest_abi::ports::COM1` (8 ports).
pub struct Serial {
    uart: vm_superio::Serial<IrqTrigger, InputEvents, ConsoleOut>,
}

impl Serial {
    /// `irq` is signalled whenever the UART raises its interrupt: register it (or a clone) as a
    /// KVM irqfd on GSI `guest_abi::ports::COM1_IRQ`. Output goes to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Result<Self, SerialError> {
        let drained = EventFd::new(EFD_NONBLOCK).map_err(SerialError::EventFd)?;
        let out = ConsoleOut {
            out,
            pending: Vec::new(),
            observer: None,
        };
        Ok(Self {
            uart: vm_superio::Serial::with_events(IrqTrigger(irq), InputEvents { drained }, out),
        })
    }

    /// Installs `observer`, called with every chunk of output (see [`OutputObserver`]).
    pub fn set_observer(&mut self, observer: OutputObserver) {
        self.uart.writer_mut().observer = Some(observer);
    }

    /// The interrupt eventfd (for irqfd registration).
    pub fn irq_evt(&self) -> &EventFd {
        &self.uart.interrupt_evt().0
    }

    /// Signalled each time the guest empties the receive FIFO: a cue to feed more input.
    pub fn input_drained_evt(&self) -> &EventFd {
        &self.uart.events().drained
    }

    /// Free space in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues console input for the guest and raises the receive interrupt if it is enabled.
    /// Returns how many bytes fitted (0 when the FIFO is full); the caller keeps the rest and
    /// retries after [`Self::input_drained_evt`] fires.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> Result<usize, SerialError> {
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => Ok(n),
            Err(UartError::FullFifo) => Ok(0),
            Err(UartError::Trigger(e)) => Err(SerialError::Trigger(e)),
            // Input does not write anything; keep the arm in case a version starts to.
            Err(UartError::IOError(e)) => Err(SerialError::Trigger(e)),
        }
    }

    /// Emits output still held back waiting for a newline.
    pub fn flush_output(&mut self) -> io::Result<()> {
        self.uart.writer_mut().emit()
    }
}

/// The register a one-byte access at `offset` addresses, if it is one.
fn register(offset: u64, len: usize) -> Option<u8> {
    if len != 1 || offset >= REGISTER_COUNT {
        tracing::warn!(offset, len, "bad UART access ignored");
        return None;
    }
    u8::try_from(offset).ok()
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = register(offset, data.len()).map_or(0, |reg| self.uart.read(reg));
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> VcpuAction {
        let (Some(reg), [value]) = (register(offset, data.len()), data) else {
            return VcpuAction::Continue;
        };
        match self.uart.write(reg, *value) {
            Ok(()) => {}
            Err(UartError::IOError(e)) => tracing::warn!("console output lost: {e}"),
            Err(UartError::Trigger(e)) => tracing::warn!("raising the UART interrupt: {e}"),
            Err(UartError::FullFifo) => {}
        }
        if reg == IER_OFFSET {
            if let Err(e) = self.flush_output() {
                tracing::warn!("console output lost: {e}");
            }
        }
        VcpuAction::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    const THR: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LSR: u64 = 5;
    const IER_RDA: u8 = 0x01;
    const IER_THRE: u8 = 0x02;
    const IIR_THRE: u8 = 0x02;

    /// A writer whose contents the test can still see after handing it to the UART.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        fn take(&self) -> Vec<u8> {
            std::mem::take(&mut self.0.lock().unwrap())
        }
    }

    fn serial() -> (Serial, Shared) {
        let out = Shared::default();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        (Serial::new(irq, Box::new(out.clone())).unwrap(), out)
    }

    fn read_reg(s: &mut Serial, offset: u64) -> u8 {
        let mut data = [0u8];
        s.read(offset, &mut data);
        data[0]
    }

    /// Interrupts raised since the last call (0 when none).
    fn irqs(s: &Serial) -> u64 {
        s.irq_evt().read().unwrap_or(0)
    }

    #[test]
    fn thr_write_produces_output_and_thre_interrupt() {
        let (mut s, out) = serial();
        // Enabling THRE with the transmitter empty raises it at once (what Linux waits for).
        s.write(IER, &[IER_THRE]);
        assert_eq!(irqs(&s), 1);
        assert_eq!(read_reg(&mut s, IIR) & 0x0f, IIR_THRE);

        for &b in b"hi\n" {
            assert_eq!(s.write(THR, &[b]), VcpuAction::Continue);
        }
        assert_eq!(out.take(), b"hi\n");
        assert!(irqs(&s) >= 1, "THRE must be raised after a THR write");
        // The transmitter always reads as empty.
        assert_eq!(read_reg(&mut s, LSR) & 0x60, 0x60);
    }

    #[test]
    fn no_interrupt_while_thre_disabled() {
        let (mut s, out) = serial();
        s.write(THR, b"x");
        s.write(THR, b"\n");
        assert_eq!(out.take(), b"x\n");
        assert_eq!(irqs(&s), 0);
    }

    #[test]
    fn output_is_held_until_newline_ier_write_or_flush() {
        let (mut s, out) = serial();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen_by_observer = seen.clone();
        s.set_observer(Box::new(move |chunk| {
            seen_by_observer.lock().unwrap().push(chunk.to_vec())
        }));

        s.write(THR, b"$");
        s.write(THR, b" ");
        assert!(out.take().is_empty());
        // Linux rewrites IER when its transmit buffer runs empty: the prompt appears.
        s.write(IER, &[0]);
        assert_eq!(out.take(), b"$ ");

        s.write(THR, b"a");
        s.flush_output().unwrap();
        assert_eq!(out.take(), b"a");

        for &b in b"VMM-AGENT-READY\n" {
            s.write(THR, &[b]);
        }
        assert_eq!(out.take(), b"VMM-AGENT-READY\n");
        let seen = seen.lock().unwrap();
        assert_eq!(
            *seen,
            vec![b"$ ".to_vec(), b"a".to_vec(), b"VMM-AGENT-READY\n".to_vec()]
        );
    }

    #[test]
    fn pending_output_is_emitted_on_drop() {
        let (mut s, out) = serial();
        s.write(THR, b"z");
        drop(s);
        assert_eq!(out.take(), b"z");
    }

    #[test]
    fn input_reaches_the_guest_with_interrupts() {
        let (mut s, _out) = serial();
        s.write(IER, &[IER_RDA]);
        assert_eq!(irqs(&s), 0);
        assert_eq!(s.enqueue_input(b"ok").unwrap(), 2);
        assert_eq!(irqs(&s), 1);
        assert_eq!(read_reg(&mut s, LSR) & 1, 1, "data ready");
        assert_eq!(read_reg(&mut s, THR), b'o');
        assert_eq!(read_reg(&mut s, THR), b'k');
        assert_eq!(read_reg(&mut s, LSR) & 1, 0);
        assert_eq!(s.input_drained_evt().read().unwrap(), 1);
    }

    #[test]
    fn full_fifo_accepts_nothing_more() {
        let (mut s, _out) = serial();
        let cap = s.input_capacity();
        assert_eq!(s.enqueue_input(&vec![b'x'; cap + 10]).unwrap(), cap);
        assert_eq!(s.enqueue_input(b"y").unwrap(), 0);
    }

    #[test]
    fn bad_accesses_are_ignored() {
        let (mut s, out) = serial();
        let mut wide = [0xffu8; 2];
        s.read(THR, &mut wide);
        assert_eq!(wide, [0, 0]);
        let mut data = [0xffu8];
        s.read(8, &mut data);
        assert_eq!(data, [0]);
        s.read(u64::MAX, &mut data);
        assert_eq!(s.write(THR, b"\n\n"), VcpuAction::Continue);
        assert_eq!(s.write(9, b"\n"), VcpuAction::Continue);
        assert_eq!(s.write(THR, &[]), VcpuAction::Continue);
        assert!(out.take().is_empty());
    }

    #[test]
    fn broken_output_does_not_stop_the_uart() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from(io::ErrorKind::BrokenPipe))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(irq, Box::new(Broken)).unwrap();
        s.write(IER, &[IER_THRE]);
        assert_eq!(irqs(&s), 1);
        read_reg(&mut s, IIR);
        assert_eq!(s.write(THR, b"\n"), VcpuAction::Continue);
        assert_eq!(irqs(&s), 1, "THRE is raised even when the byte is lost");
    }
}
