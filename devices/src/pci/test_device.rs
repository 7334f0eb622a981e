//! A test function: the H100's BAR shape with MSI-X in BAR0, and a mock of the owner's routes
//! that records every call, for the tests of the PCI layer. The function takes any
//! [`VectorRoutes`], so the VMM's tests can drive its real routes through the MSI-X emulation.
//! Test code: a route failure panics (the test sees it at once).

use std::sync::{Arc, Mutex};

use super::bar::{Bar, BarKind, BarLayout, BarSlot};
use super::config::{ConfigError, ConfigEvent, ConfigHeader, ConfigSpace};
use super::device::PciDevice;
use super::msix::{Msix, MsixLayout, MSIX_CAP_ID};
use super::vectors::{MsiMessage, RouteError, VectorRoutes};

pub const GIB: u64 = 1 << 30;
pub const MIB: u64 = 1 << 20;

/// One call the owner got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Unmask(u16, MsiMessage),
    Mask(u16),
    Trigger(u16),
}

/// Records calls; fails every call for a vector in `failing`.
#[derive(Debug, Clone, Default)]
pub struct MockRoutes {
    pub calls: Arc<Mutex<Vec<Call>>>,
    pub failing: Vec<u16>,
}

impl MockRoutes {
    pub fn take(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
    fn record(&mut self, vector: u16, call: Call) -> Result<(), RouteError> {
        if self.failing.contains(&vector) {
            return Err(std::io::Error::other(format!("no route for {vector}")).into());
        }
        self.calls.lock().unwrap().push(call);
        Ok(())
    }
}

impl VectorRoutes for MockRoutes {
    fn unmask(&mut self, vector: u16, msg: MsiMessage) -> Result<(), RouteError> {
        self.record(vector, Call::Unmask(vector, msg))
    }
    fn mask(&mut self, vector: u16) -> Result<(), RouteError> {
        self.record(vector, Call::Mask(vector))
    }
    fn trigger(&mut self, vector: u16) -> Result<(), RouteError> {
        self.record(vector, Call::Trigger(vector))
    }
}

/// BAR0 16 MiB (MSI-X table at 0, PBA at 64 KiB), BAR1 128 GiB 64-bit prefetchable, BAR3
/// 32 MiB 64-bit prefetchable, a 512 KiB ROM: the H100's.
pub fn h100_layout() -> BarLayout {
    BarLayout::new(
        &[
            Bar {
                index: 0,
                kind: BarKind::Mem32 {
                    prefetchable: false,
                },
                size: 16 * MIB,
            },
            Bar {
                index: 1,
                kind: BarKind::Mem64 { prefetchable: true },
                size: 128 * GIB,
            },
            Bar {
                index: 3,
                kind: BarKind::Mem64 { prefetchable: true },
                size: 32 * MIB,
            },
        ],
        Some(512 * 1024),
    )
    .unwrap()
}

pub const MSIX_VECTORS: u16 = 70;
pub const PBA_OFFSET: u32 = 0x1_0000;

/// A function with the H100's BARs and MSI-X; BAR accesses outside MSI-X land in `bar0`.
pub struct TestDevice<R = MockRoutes> {
    pub cfg: ConfigSpace,
    pub msix: Msix,
    pub routes: R,
    pub bar0: Vec<u8>,
}

impl<R: VectorRoutes> TestDevice<R> {
    pub fn new(routes: R) -> Self {
        let header = ConfigHeader {
            vendor_id: 0x10de,
            device_id: 0x2330,
            class_code: 0x03,
            subclass: 0x02,
            ..ConfigHeader::default()
        };
        let mut cfg = ConfigSpace::new(&header, h100_layout(), true);
        let layout = MsixLayout {
            vectors: MSIX_VECTORS,
            table_bar: 0,
            table_offset: 0,
            pba_bar: 0,
            pba_offset: PBA_OFFSET,
        };
        let msix = Msix::new(layout, &mut cfg).unwrap();
        Self {
            cfg,
            msix,
            routes,
            bar0: vec![0; 0x2_1000],
        }
    }
}

impl<R: VectorRoutes + Send> PciDevice for TestDevice<R> {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.cfg.read(offset, data);
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) -> Vec<ConfigEvent> {
        let events = self.cfg.write(offset, data);
        for e in &events {
            if let ConfigEvent::Capability { id, .. } = e {
                if *id == u16::from(MSIX_CAP_ID) {
                    self.msix
                        .config_written(&self.cfg, &mut self.routes)
                        .unwrap();
                }
            }
        }
        events
    }
    fn bar_read(&mut self, slot: BarSlot, offset: u64, data: &mut [u8]) {
        if slot == BarSlot::Bar(0) && self.msix.bar_read(0, offset, data) {
            return;
        }
        data.fill(0);
        if let (BarSlot::Bar(0), Ok(o)) = (slot, usize::try_from(offset)) {
            if let Some(src) = self.bar0.get(o..o + data.len()) {
                data.copy_from_slice(src);
            }
        }
    }
    fn bar_write(&mut self, slot: BarSlot, offset: u64, data: &[u8]) {
        if slot == BarSlot::Bar(0)
            && self
                .msix
                .bar_write(0, offset, data, &mut self.routes)
                .unwrap()
        {
            return;
        }
        if let (BarSlot::Bar(0), Ok(o)) = (slot, usize::try_from(offset)) {
            if let Some(dst) = self.bar0.get_mut(o..o + data.len()) {
                dst.copy_from_slice(data);
            }
        }
    }
    fn bar_layout(&self) -> BarLayout {
        self.cfg.bar_layout().clone()
    }
    fn set_bar_address(&mut self, slot: BarSlot, address: u64) -> Result<(), ConfigError> {
        self.cfg.set_bar_address(slot, address)
    }
}
