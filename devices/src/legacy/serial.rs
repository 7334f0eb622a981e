//! COM1: a 16550A UART (vm-superio's model) whose interrupt is an [`Interrupt`] the VMM wires to
//! GSI 4, and whose output goes to any writer (stdout, a file).
//!
//! vm-superio 0.8.2 raises THRE whenever the guest enables it in IER (the transmitter is always
//! empty in its model) and after every byte written to THR, which Linux's 8250 driver needs or
//! user-space tty output stalls. It writes output one byte at a time and flushes after each one;
//! `ConsoleOut` batches that into lines.

use std::io::{self, Write};
use std::sync::Arc;

use vm_superio::serial::{Error as UartError, SerialEvents};
use vm_superio::Trigger;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::{BusDevice, VcpuAction};
use crate::interrupt::Interrupt;
use crate::state::{self, DeviceStateError, Stateful};

/// Register offsets the wrapper cares about (see the 16550 data sheet).
const IER_OFFSET: u8 = 1;
/// The UART decodes eight ports.
const REGISTER_COUNT: u64 = 8;
/// Emit buffered output once this much has piled up without a newline.
const EMIT_THRESHOLD: usize = 4096;
/// vm-superio's receive FIFO size (private there), which it enforces on restore.
const FIFO_SIZE: usize = 64;

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

/// The UART's interrupt line, as vm-superio wants it. Shared so that a restore can rebuild the
/// vm-superio model around the very line the VMM wired.
struct IrqTrigger(Arc<dyn Interrupt>);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

/// Signals `drained` whenever the guest has read the receive FIFO empty, so the VMM knows it can
/// feed more console input (the FIFO holds only 64 bytes).
struct InputEvents {
    drained: Arc<EventFd>,
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
    /// `irq` is triggered whenever the UART raises its interrupt (COM1's is ISA IRQ 4). Output
    /// goes to `out`.
    pub fn new(irq: Arc<dyn Interrupt>, out: Box<dyn Write + Send>) -> Result<Self, SerialError> {
        let drained = EventFd::new(EFD_NONBLOCK).map_err(SerialError::EventFd)?;
        let out = ConsoleOut {
            out,
            pending: Vec::new(),
            observer: None,
        };
        let events = InputEvents {
            drained: Arc::new(drained),
        };
        Ok(Self {
            uart: vm_superio::Serial::with_events(IrqTrigger(irq), events, out),
        })
    }

    /// Installs `observer`, called with every chunk of output (see [`OutputObserver`]).
    pub fn set_observer(&mut self, observer: OutputObserver) {
        self.uart.writer_mut().observer = Some(observer);
    }

    /// The interrupt the UART raises.
    pub fn interrupt(&self) -> &Arc<dyn Interrupt> {
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

    /// The guest-visible registers and the receive FIFO. Output held back for a newline is
    /// host-side: it was the guest's output on this host and is emitted here.
    pub fn save_state(&self) -> SerialState {
        SerialState::from(self.uart.state())
    }

    /// Loads `state`, keeping this UART's eventfds, output writer and observer. Raises the
    /// interrupt once if the state has one pending and enabled, as the guest may not have taken
    /// it before the pause. On error nothing has changed.
    pub fn restore_state(&mut self, state: &SerialState) -> Result<(), DeviceStateError> {
        if state.in_buffer.len() > FIFO_SIZE {
            return Err(DeviceStateError::SerialFifo {
                got: state.in_buffer.len(),
                max: FIFO_SIZE,
            });
        }
        let trigger = IrqTrigger(self.uart.interrupt_evt().0.clone());
        let events = InputEvents {
            drained: self.uart.events().drained.clone(),
        };
        // A stand-in writer, swapped for the real one only once the new model exists, so a
        // failure cannot lose the console.
        let stand_in = ConsoleOut {
            out: Box::new(io::sink()),
            pending: Vec::new(),
            observer: None,
        };
        let mut uart = vm_superio::Serial::from_state(&state.to_uart(), trigger, events, stand_in)
            .map_err(|e| match e {
                UartError::Trigger(e) | UartError::IOError(e) => {
                    DeviceStateError::SerialInterrupt(e)
                }
                UartError::FullFifo => DeviceStateError::SerialFifo {
                    got: state.in_buffer.len(),
                    max: FIFO_SIZE,
                },
            })?;
        std::mem::swap(uart.writer_mut(), self.uart.writer_mut());
        self.uart = uart;
        Ok(())
    }
}

impl Stateful for Serial {
    fn kind(&self) -> &'static str {
        "serial"
    }

    /// The layout of [`SerialState`]: bump it when a field changes.
    fn state_version(&self) -> u32 {
        1
    }

    fn save(&self) -> Result<serde_json::Value, DeviceStateError> {
        state::to_data(&self.save_state())
    }

    fn restore(&mut self, data: &serde_json::Value) -> Result<(), DeviceStateError> {
        self.restore_state(&state::from_data(data)?)
    }
}

/// vm-superio's `SerialState`, which has no serde support, field for field.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// Received bytes the guest has not read yet, oldest first.
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::serial::SerialState> for SerialState {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl SerialState {
    fn to_uart(&self) -> vm_superio::serial::SerialState {
        vm_superio::serial::SerialState {
            baud_divisor_low: self.baud_divisor_low,
            baud_divisor_high: self.baud_divisor_high,
            interrupt_enable: self.interrupt_enable,
            interrupt_identification: self.interrupt_identification,
            line_control: self.line_control,
            line_status: self.line_status,
            modem_control: self.modem_control,
            modem_status: self.modem_status,
            scratch: self.scratch,
            in_buffer: self.in_buffer.clone(),
        }
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
    use crate::interrupt::IrqLine;
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
        let irq = Arc::new(IrqLine::new(4).unwrap());
        (Serial::new(irq, Box::new(out.clone())).unwrap(), out)
    }

    fn read_reg(s: &mut Serial, offset: u64) -> u8 {
        let mut data = [0u8];
        s.read(offset, &mut data);
        data[0]
    }

    /// Interrupts raised since the last call (0 when none).
    fn irqs(s: &Serial) -> u64 {
        s.interrupt().eventfd().unwrap().read().unwrap_or(0)
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
    fn state_round_trips_through_serde_into_a_new_uart() {
        const LCR: u64 = 3;
        const MCR: u64 = 4;
        const MSR: u64 = 6;
        const SCR: u64 = 7;
        const LCR_DLAB: u8 = 0x80;
        const LCR_8N1: u8 = 0x03;

        let (mut src, _) = serial();
        src.write(LCR, &[LCR_DLAB]);
        src.write(0, &[0x0c]); // divisor 12: 9600 baud
        src.write(1, &[0x00]);
        src.write(LCR, &[LCR_8N1]);
        src.write(IER, &[IER_RDA]);
        src.write(MCR, &[0x0b]);
        src.write(SCR, &[0x5a]);
        assert_eq!(src.enqueue_input(b"abc").unwrap(), 3);
        irqs(&src);

        let json = serde_json::to_string(&src.save_state()).unwrap();
        let state: SerialState = serde_json::from_str(&json).unwrap();
        let irq = Arc::new(IrqLine::new(4).unwrap());
        let registered = irq.clone();
        let out = Shared::default();
        let mut dst = Serial::new(irq, Box::new(out.clone())).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen_by_observer = seen.clone();
        dst.set_observer(Box::new(move |chunk| {
            seen_by_observer.lock().unwrap().extend_from_slice(chunk)
        }));
        dst.restore_state(&state).unwrap();

        assert_eq!(dst.save_state(), state);
        assert_eq!(
            registered.eventfd().unwrap().read().unwrap(),
            1,
            "the pending receive interrupt is raised again, on the registered eventfd"
        );
        for reg in [IER, IIR, LCR, MCR, LSR, MSR, SCR] {
            assert_eq!(
                read_reg(&mut dst, reg),
                read_reg(&mut src, reg),
                "reg {reg}"
            );
        }
        for s in [&mut src, &mut dst] {
            s.write(LCR, &[LCR_DLAB | LCR_8N1]);
        }
        assert_eq!(read_reg(&mut dst, 0), 0x0c);
        assert_eq!(read_reg(&mut dst, 1), 0x00);
        for s in [&mut src, &mut dst] {
            s.write(LCR, &[LCR_8N1]);
        }
        let input: Vec<u8> = (0..3).map(|_| read_reg(&mut dst, THR)).collect();
        assert_eq!(input, b"abc");
        assert_eq!(dst.input_drained_evt().read().unwrap(), 1);

        // Output still reaches the destination's own writer and observer.
        dst.write(THR, b"!");
        dst.write(THR, b"\n");
        assert_eq!(out.take(), b"!\n");
        assert_eq!(*seen.lock().unwrap(), b"!\n");
    }

    #[test]
    fn overfull_fifo_state_is_refused_and_the_uart_keeps_working() {
        let (mut s, out) = serial();
        let mut state = s.save_state();
        state.scratch = 0x77;
        state.in_buffer = vec![b'x'; FIFO_SIZE + 1];
        assert!(matches!(
            s.restore_state(&state),
            Err(DeviceStateError::SerialFifo { got: 65, max: 64 })
        ));
        assert_eq!(read_reg(&mut s, 7), 0, "scratch untouched");
        s.write(THR, b"\n");
        assert_eq!(out.take(), b"\n");
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
        let irq = Arc::new(IrqLine::new(4).unwrap());
        let mut s = Serial::new(irq, Box::new(Broken)).unwrap();
        s.write(IER, &[IER_THRE]);
        assert_eq!(irqs(&s), 1);
        read_reg(&mut s, IIR);
        assert_eq!(s.write(THR, b"\n"), VcpuAction::Continue);
        assert_eq!(irqs(&s), 1, "THRE is raised even when the byte is lost");
    }
}
