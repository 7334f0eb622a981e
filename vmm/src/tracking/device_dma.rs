//! ORs device DMA into every harvest. A passed-through device writes guest RAM behind KVM's
//! back: no CPU backend sees it (TRACKING.md; `bench tracking --device-scenario` measures
//! that). Each [`DmaDirtySource`] reports what its device wrote; this wrapper adds its pages to
//! whatever the CPU backend found, as `vmm_writes` adds the VMM's own.
//!
//! Sources: VFIO device DMA logging (kernel VFIO and vfio-user alike, through the transport,
//! `migration::devices`) and [`AllPinned`], the honest fallback when a device cannot log:
//! every page it may reach (all of guest RAM, pinned for DMA) counts as written at every
//! harvest, so nothing is missed and precopy never converges on its own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{DirtySet, DirtyTracker, TrackedSlot, TrackerKind, TrackingError};
use crate::memory::PAGE_SIZE;

/// What one device's DMA wrote since the previous report.
pub trait DmaDirtySource: Send {
    /// For messages: the device.
    fn name(&self) -> String;
    /// Starts logging over `ranges` (gpa = IOVA, bytes).
    fn start(&mut self, ranges: &[(u64, u64)]) -> Result<(), String>;
    /// The pages of `[gpa, gpa + pages * 4 KiB)` written since the last report, one bit per
    /// page in `DirtySet` word layout; reported pages are cleared.
    fn report(&mut self, gpa: u64, pages: u64) -> Result<Vec<u64>, String>;
    fn stop(&mut self) -> Result<(), String>;
}

/// Every page is dirty at every harvest.
pub struct AllPinned {
    pub device: String,
}

impl DmaDirtySource for AllPinned {
    fn name(&self) -> String {
        format!("{} (all pinned pages)", self.device)
    }
    fn start(&mut self, _: &[(u64, u64)]) -> Result<(), String> {
        Ok(())
    }
    fn report(&mut self, _gpa: u64, pages: u64) -> Result<Vec<u64>, String> {
        let mut words = vec![u64::MAX; pages.div_ceil(64) as usize];
        if pages % 64 != 0 {
            if let Some(last) = words.last_mut() {
                *last = (1u64 << (pages % 64)) - 1;
            }
        }
        Ok(words)
    }
    fn stop(&mut self) -> Result<(), String> {
        Ok(())
    }
}

/// What the device sources reported, readable while the tracker is boxed away.
#[derive(Debug, Default)]
pub struct DmaStats {
    /// Pages the devices reported over all harvests.
    pub pages: AtomicU64,
    pub harvests: AtomicU64,
    /// Time spent reading the devices' logs, in ns.
    pub ns: AtomicU64,
}

/// A CPU backend with the devices' DMA ORed into each harvest.
pub struct WithDeviceDma {
    inner: Box<dyn DirtyTracker>,
    sources: Vec<Box<dyn DmaDirtySource>>,
    slots: Vec<TrackedSlot>,
    stats: Arc<DmaStats>,
    started: bool,
}

impl WithDeviceDma {
    pub fn new(
        inner: Box<dyn DirtyTracker>,
        sources: Vec<Box<dyn DmaDirtySource>>,
        slots: Vec<TrackedSlot>,
        stats: Arc<DmaStats>,
    ) -> Self {
        Self {
            inner,
            sources,
            slots,
            stats,
            started: false,
        }
    }

    fn fail(source: &dyn DmaDirtySource, what: &str, why: String) -> TrackingError {
        TrackingError::Device(format!("{}: {what}: {why}", source.name()))
    }
}

impl DirtyTracker for WithDeviceDma {
    fn kind(&self) -> TrackerKind {
        self.inner.kind()
    }

    fn start(&mut self) -> Result<(), TrackingError> {
        // Devices first: a DMA write between the CPU backend's start and theirs would be seen
        // by neither.
        let ranges: Vec<(u64, u64)> = self
            .slots
            .iter()
            .map(|s| (s.gpa, s.pages() * PAGE_SIZE))
            .collect();
        for i in 0..self.sources.len() {
            if let Err(why) = self.sources[i].start(&ranges) {
                for s in &mut self.sources[..i] {
                    let _ = s.stop();
                }
                return Err(Self::fail(
                    self.sources[i].as_ref(),
                    "starting DMA logging",
                    why,
                ));
            }
        }
        if let Err(e) = self.inner.start() {
            for s in &mut self.sources {
                let _ = s.stop();
            }
            return Err(e);
        }
        self.started = true;
        Ok(())
    }

    fn harvest(&mut self, into: &mut DirtySet) -> Result<(), TrackingError> {
        self.inner.harvest(into)?;
        let t = std::time::Instant::now();
        for source in &mut self.sources {
            for slot in &self.slots {
                let Some(index) = into.slot_index_of(slot.gpa) else {
                    continue;
                };
                let words = source
                    .report(slot.gpa, slot.pages())
                    .map_err(|why| Self::fail(source.as_ref(), "reading the DMA log", why))?;
                let pages: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
                self.stats.pages.fetch_add(pages, Ordering::Relaxed);
                into.or_words(index, &words);
            }
        }
        self.stats
            .ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.stats.harvests.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn harvest_raw(&mut self) -> Result<u64, TrackingError> {
        self.inner.harvest_raw()
    }

    fn stop(&mut self) -> Result<(), TrackingError> {
        let mut first = None;
        if std::mem::take(&mut self.started) {
            for s in &mut self.sources {
                if let Err(why) = s.stop() {
                    first.get_or_insert(Self::fail(s.as_ref(), "stopping DMA logging", why));
                }
            }
        }
        self.inner.stop()?;
        first.map_or(Ok(()), Err)
    }

    fn memory_overhead_bytes(&self) -> u64 {
        self.inner.memory_overhead_bytes()
    }

    fn background_cpu_ns(&self) -> u64 {
        self.inner.background_cpu_ns()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A CPU backend that finds page 1 of the first slot each harvest.
    struct OnePage;
    impl DirtyTracker for OnePage {
        fn kind(&self) -> TrackerKind {
            TrackerKind::Bitmap
        }
        fn start(&mut self) -> Result<(), TrackingError> {
            Ok(())
        }
        fn harvest(&mut self, into: &mut DirtySet) -> Result<(), TrackingError> {
            into.set_page(0, 1);
            Ok(())
        }
        fn harvest_raw(&mut self) -> Result<u64, TrackingError> {
            Ok(1)
        }
        fn stop(&mut self) -> Result<(), TrackingError> {
            Ok(())
        }
        fn memory_overhead_bytes(&self) -> u64 {
            0
        }
    }

    /// A device whose log holds `pages` until reported; records its calls.
    struct Log {
        pages: Vec<u64>,
        calls: Arc<Mutex<Vec<String>>>,
        fail_start: bool,
    }
    impl DmaDirtySource for Log {
        fn name(&self) -> String {
            "gpu0".into()
        }
        fn start(&mut self, ranges: &[(u64, u64)]) -> Result<(), String> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("start {ranges:x?}"));
            if self.fail_start {
                Err("ENOTSUP".into())
            } else {
                Ok(())
            }
        }
        fn report(&mut self, gpa: u64, pages: u64) -> Result<Vec<u64>, String> {
            let mut words = vec![0u64; pages.div_ceil(64) as usize];
            for p in self.pages.drain(..) {
                let i = (p - gpa) / PAGE_SIZE;
                words[(i / 64) as usize] |= 1 << (i % 64);
            }
            Ok(words)
        }
        fn stop(&mut self) -> Result<(), String> {
            self.calls.lock().unwrap().push("stop".into());
            Ok(())
        }
    }

    fn slots() -> Vec<TrackedSlot> {
        vec![TrackedSlot {
            slot: 0,
            gpa: 0x10_0000,
            size: 128 * PAGE_SIZE,
            host: 0,
        }]
    }

    #[test]
    fn device_pages_join_the_cpu_backends_harvest_and_are_counted() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let log = Log {
            pages: vec![0x10_0000 + 5 * PAGE_SIZE, 0x10_0000 + 100 * PAGE_SIZE],
            calls: calls.clone(),
            fail_start: false,
        };
        let stats = Arc::new(DmaStats::default());
        let mut t = WithDeviceDma::new(
            Box::new(OnePage),
            vec![Box::new(log)],
            slots(),
            stats.clone(),
        );
        t.start().unwrap();
        let mut set = DirtySet::new(&slots());
        t.harvest(&mut set).unwrap();
        let pages: Vec<u64> = set
            .runs()
            .iter()
            .map(|r| (r.0 - 0x10_0000) / PAGE_SIZE)
            .collect();
        assert_eq!(pages, vec![1, 5, 100]);
        assert_eq!(stats.pages.load(Ordering::Relaxed), 2);
        assert_eq!(stats.harvests.load(Ordering::Relaxed), 1);
        // Reported pages were cleared on the device: the next harvest has the CPU's alone.
        let mut set = DirtySet::new(&slots());
        t.harvest(&mut set).unwrap();
        assert_eq!(set.count(), 1);
        t.stop().unwrap();
        t.stop().unwrap();
        let calls = calls.lock().unwrap().clone();
        assert_eq!(
            calls,
            vec![format!("start [(100000, 80000)]"), "stop".to_string()]
        );
    }

    #[test]
    fn a_device_that_cannot_log_fails_the_start_and_leaves_the_others_stopped() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let good = Log {
            pages: vec![],
            calls: calls.clone(),
            fail_start: false,
        };
        let bad = Log {
            pages: vec![],
            calls: calls.clone(),
            fail_start: true,
        };
        let mut t = WithDeviceDma::new(
            Box::new(OnePage),
            vec![Box::new(good), Box::new(bad)],
            slots(),
            Arc::default(),
        );
        let err = t.start().unwrap_err().to_string();
        assert!(err.contains("gpu0: starting DMA logging: ENOTSUP"), "{err}");
        let calls = calls.lock().unwrap().clone();
        assert_eq!(calls.len(), 3, "{calls:?}");
        assert_eq!(calls[2], "stop", "the device that started is stopped again");
    }

    #[test]
    fn all_pinned_reports_every_page_and_nothing_past_the_end() {
        let mut s = AllPinned {
            device: "gpu".into(),
        };
        assert_eq!(s.report(0, 64).unwrap(), vec![u64::MAX]);
        assert_eq!(s.report(0, 70).unwrap(), vec![u64::MAX, 0x3f]);
        assert_eq!(s.report(0, 3).unwrap(), vec![0x7]);
        assert!(s.report(0, 0).unwrap().is_empty());
    }
}
