//! The boot-timer pseudo device (Firecracker's idea): the guest's init writes
//! `guest_abi::boot_timer::MAGIC` to the first byte of the page at `boot_timer::GPA`, and the
//! VMM learns how long the guest took to reach user space, measured from the VMM's own start.

use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use guest_abi::boot_timer::MAGIC;

use crate::bus::{BusDevice, VcpuAction};

/// Records the time of the guest's magic write. Reads return zeros; other writes are ignored.
///
/// Migration: nothing to save. The guest can never read anything back from it, and the boot
/// time it keeps is a measurement of the source VMM's own start, meaningless on another host.
#[derive(Debug)]
pub struct BootTimer {
    start: Instant,
    boot_time: Option<Duration>,
    report: Option<Sender<Duration>>,
}

impl BootTimer {
    /// `start` is the instant the VMM process started (or whatever origin its report uses).
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            boot_time: None,
            report: None,
        }
    }

    /// Also sends each measurement on `report`, so the VMM can react without polling.
    pub fn with_sender(mut self, report: Sender<Duration>) -> Self {
        self.report = Some(report);
        self
    }

    /// Time from `start` to the guest's latest magic write, if there was one.
    pub fn boot_time(&self) -> Option<Duration> {
        self.boot_time
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> VcpuAction {
        if offset != 0 || data != [MAGIC] {
            tracing::debug!(offset, ?data, "boot-timer write ignored");
            return VcpuAction::Continue;
        }
        let elapsed = self.start.elapsed();
        // A second write (a guest that rebooted) replaces the first: it measures that boot.
        self.boot_time = Some(elapsed);
        tracing::info!(
            "guest boot-timer: {} ms since vmm start",
            elapsed.as_millis()
        );
        if let Some(report) = &self.report {
            // The receiver may have gone away; the measurement is still kept and logged.
            let _ = report.send(elapsed);
        }
        VcpuAction::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn magic_write_records_and_reports_the_time() {
        let start = Instant::now() - Duration::from_millis(50);
        let (tx, rx) = channel();
        let mut timer = BootTimer::new(start).with_sender(tx);
        assert_eq!(timer.boot_time(), None);

        assert_eq!(timer.write(0, &[MAGIC]), VcpuAction::Continue);
        let recorded = timer.boot_time().unwrap();
        assert!(recorded >= Duration::from_millis(50));
        assert_eq!(rx.try_recv(), Ok(recorded));
    }

    #[test]
    fn other_accesses_are_ignored() {
        let mut timer = BootTimer::new(Instant::now());
        timer.write(0, &[MAGIC.wrapping_add(1)]);
        timer.write(1, &[MAGIC]);
        timer.write(0, &[MAGIC, 0]);
        timer.write(0, &[]);
        assert_eq!(timer.boot_time(), None);
        let mut data = [0xffu8; 4];
        timer.read(0, &mut data);
        assert_eq!(data, [0; 4]);
    }

    #[test]
    fn dropped_receiver_is_harmless() {
        let (tx, rx) = channel();
        drop(rx);
        let mut timer = BootTimer::new(Instant::now()).with_sender(tx);
        assert_eq!(timer.write(0, &[MAGIC]), VcpuAction::Continue);
        assert!(timer.boot_time().is_some());
    }
}
