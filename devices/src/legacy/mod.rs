//! Legacy PC devices: the COM1 UART and the i8042 reset line on port I/O, and the boot-timer
//! pseudo device on MMIO.

pub mod boot_timer;
pub mod i8042;
pub mod serial;

pub use boot_timer::BootTimer;
pub use i8042::I8042;
pub use serial::{OutputObserver, Serial, SerialError, SerialState};
