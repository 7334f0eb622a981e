//! Just enough of the i8042 keyboard controller for Linux to reset the machine through it.
//!
//! Hand-written rather than vm-superio's `I8042Device`: that one reports the reset through an
//! event trigger and models a keyboard, while here the reset must come back from the port write
//! as a [`VcpuAction`] and the guest has no keyboard (CONFIG_SERIO is off). With `reboot=k`
//! Linux reboots by writing 0xfe to the command port; the triple-fault path would run `int3`,
//! which PVM cannot emulate.

use guest_abi::ports::{I8042_CMD, I8042_DATA, I8042_RESET_CMD};

use crate::bus::{BusDevice, VcpuAction};

/// Offset of the command/status port from the data port (0x64 - 0x60). The VMM maps one device
/// over `0x60..0x65`.
pub const CMD_OFFSET: u64 = (I8042_CMD - I8042_DATA) as u64;
/// Length of the port window the VMM maps.
pub const LEN: u64 = CMD_OFFSET + 1;

/// The i8042 controller: reads return 0 (no data, input buffer empty), a write of 0xfe to the
/// command port asks for a CPU reset, anything else is ignored.
///
/// Migration: it has no state at all (every read answers 0, no write is remembered), so it has
/// no `save_state`; the destination's fresh one is the same device.
#[derive(Debug, Default)]
pub struct I8042;

impl I8042 {
    pub fn new() -> Self {
        Self
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty (nothing to read), input buffer empty (ready for a
        // command). The data port has nothing to give either.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> VcpuAction {
        if offset == CMD_OFFSET && data == [I8042_RESET_CMD] {
            tracing::info!("guest requested a CPU reset through the i8042");
            return VcpuAction::Reset;
        }
        tracing::debug!(offset, ?data, "i8042 write ignored");
        VcpuAction::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_asks_for_reset() {
        let mut dev = I8042::new();
        assert_eq!(dev.write(CMD_OFFSET, &[0xfe]), VcpuAction::Reset);
    }

    #[test]
    fn other_writes_are_ignored_and_reads_are_zero() {
        let mut dev = I8042::new();
        assert_eq!(dev.write(0, &[0xfe]), VcpuAction::Continue);
        assert_eq!(dev.write(CMD_OFFSET, &[0xd1]), VcpuAction::Continue);
        assert_eq!(dev.write(CMD_OFFSET, &[0xfe, 0]), VcpuAction::Continue);
        assert_eq!(dev.write(CMD_OFFSET, &[]), VcpuAction::Continue);
        let mut data = [0xffu8; 1];
        dev.read(CMD_OFFSET, &mut data);
        assert_eq!(data, [0]);
        data = [0xff];
        dev.read(0, &mut data);
        assert_eq!(data, [0]);
    }

    /// Mapped at the data port with `LEN`, as the VMM maps it, the device answers both ports by
    /// their absolute numbers and nothing past the command port.
    #[test]
    fn window_covers_both_ports() {
        use crate::bus::Bus;
        use std::sync::{Arc, Mutex};
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(I8042::new())), I8042_DATA.into(), LEN)
            .unwrap();
        let mut data = [0xffu8];
        bus.read(I8042_DATA.into(), &mut data).unwrap();
        assert_eq!(data, [0]);
        data = [0xff];
        bus.read(I8042_CMD.into(), &mut data).unwrap();
        assert_eq!(data, [0]);
        assert_eq!(
            bus.write(I8042_CMD.into(), &[I8042_RESET_CMD]).unwrap(),
            VcpuAction::Reset
        );
        assert!(bus.write(u64::from(I8042_CMD) + 1, &[0]).is_err());
    }
}
