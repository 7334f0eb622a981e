//! Passed-through devices in a live migration: VFIO migration v2 driven on both sides, the
//! device's data carried in `DeviceData` frames, its DMA logged into every harvest.
//!
//! Source, for each device (linux/vfio.h's state machine):
//! - before anything moves: the device must offer migration (STOP_COPY at least) and a DMA
//!   tracking source the user chose (`--device-dirty`): its own DMA log, or "all pinned pages
//!   dirty"; otherwise the migration is refused naming the device and what it lacks;
//! - precopy rounds: RUNNING -> PRE_COPY where the device has it, and each round sends what the
//!   device has ready (for the test device: VRAM pages changed since they were last read);
//! - the pause: vCPUs first, then the device to STOP_COPY (it stops writing guest RAM), then
//!   the final harvest (the DMA log's tail), the final pages, the device's stop-copy data;
//! - a failure before the point of no return puts each device back to RUNNING with the vCPUs.
//!
//! Destination: each device STOP -> RESUMING before any data, every `DeviceData` written in
//! order, RESUMING -> STOP at the end (the device checks the stream), the VMM-side view
//! (config space, MSI-X) restored with the rest of the device states, then RUNNING: just
//! before the vCPUs (precopy), or once every page is here (hybrid).
//!
//! Postcopy is refused with a device; hybrid is safe by keeping the device stopped on the
//! destination until its postcopy phase has brought in every page: a device never runs while
//! a page it may DMA is missing. The vCPUs run meanwhile, and what they write to the device's
//! trapped registers waits in the (stopped) device; the test device latches it and acts once
//! it runs. A real device's MMIO in STOP is device-specific (linux/vfio.h): such a device
//! would need those accesses held in the VMM, which is not done.

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::vfio::passthrough::{chain, MigState};

use crate::machine::pci::mig_v2::{MigDevice, MigV2Error, READ_CHUNK};
pub use crate::machine::pci::passthrough::PassthroughHandle;

use super::protocol::Message;
use super::source::Writer;
use super::{MigrationError, Mode};
use crate::memory::PAGE_SIZE;
use crate::tracking::device_dma::{AllPinned, DmaDirtySource};

/// The most device data one precopy round sends per device: a device whose state changes
/// faster than the link carries it still lets the round end.
const ROUND_BUDGET: u64 = 256 << 20;
/// The most data a stop-copy may produce per device (a bound on a misbehaving device, far above
/// any VRAM this VMM maps).
const STOP_COPY_LIMIT: u64 = 1 << 40;
/// Pages per DMA log report: 2 Mi pages (8 GiB), a 256 KiB bitmap, vfio-user's limit.
const REPORT_PAGES: u64 = 1 << 21;

/// How a migration learns what devices wrote into guest RAM (`--device-dirty`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceDirty {
    /// The device's own DMA log (VFIO DMA_LOGGING); refused when it has none.
    #[default]
    Log,
    /// The IOMMU's record of the device's writes (type1's dirty pages, iommufd's HWPT dirty
    /// tracking): kernel VFIO only, on hosts whose IOMMU can; refused otherwise.
    Iommu,
    /// Every page the device can reach (all guest RAM, pinned for its DMA) counts as written
    /// at every harvest: correct for any device, and precopy then never converges.
    AllPinned,
    /// Debugging only: device DMA is not tracked at all, so its writes after a page was sent
    /// are lost. Proves that the tests catch such a loss.
    Off,
}

impl FromStr for DeviceDirty {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "log" => Ok(Self::Log),
            "iommu" => Ok(Self::Iommu),
            "all-pinned" => Ok(Self::AllPinned),
            "off" => Ok(Self::Off),
            other => Err(format!(
                "unknown device DMA tracking '{other}' (expected log, iommu, all-pinned or off)"
            )),
        }
    }
}

impl std::fmt::Display for DeviceDirty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Log => "log",
            Self::Iommu => "iommu",
            Self::AllPinned => "all-pinned",
            Self::Off => "off",
        })
    }
}

impl From<MigV2Error> for MigrationError {
    fn from(e: MigV2Error) -> Self {
        MigrationError::Device(e.to_string())
    }
}

/// Reads until the device says there is no more for now, or `limit` bytes; sends it.
fn send_data(
    d: &mut MigDevice,
    index: u32,
    w: &mut Writer,
    limit: u64,
) -> Result<u64, MigrationError> {
    let mut buf = vec![0u8; READ_CHUNK];
    let mut sent = 0u64;
    while sent < limit {
        let n = d.read(&mut buf)?;
        if n > 0 {
            w.send(&Message::DeviceData {
                device: index,
                data: buf[..n].to_vec(),
            })?;
            sent += n as u64;
        }
        if n < buf.len() {
            break;
        }
    }
    Ok(sent)
}

/// The devices of a VM being migrated away, in `--device` order (the destination's order).
pub struct SourceDevices {
    devs: Vec<MigDevice>,
    /// Device data sent in precopy rounds and in the stop-copy.
    pub precopy_bytes: u64,
    pub stop_copy_bytes: u64,
    /// Time the devices took to reach STOP_COPY and hand over their data (part of downtime).
    pub stop_copy_ms: f64,
}

/// Reads the IOMMU's dirty bits for one device's DMA mappings through its transport.
struct IommuLog {
    handle: PassthroughHandle,
    how: &'static str,
}

impl DmaDirtySource for IommuLog {
    fn name(&self) -> String {
        format!("{} ({})", self.handle.spec, self.how)
    }

    fn start(&mut self, _ranges: &[(u64, u64)]) -> Result<(), String> {
        self.handle
            .lock()
            .migration()
            .iommu_dirty_start()
            .map_err(|e| chain(&e))
    }

    fn report(&mut self, gpa: u64, pages: u64) -> Result<Vec<u64>, String> {
        // Whole DMA mappings (type1 reports no less): the slots are guest RAM's ranges, each
        // mapped once at IOVA = GPA.
        let words = self
            .handle
            .lock()
            .migration()
            .iommu_dirty_report(gpa, pages * PAGE_SIZE)
            .map_err(|e| chain(&e))?;
        if words.len() as u64 != pages.div_ceil(64) {
            return Err(format!("{} words for {pages} pages", words.len()));
        }
        Ok(words)
    }

    fn stop(&mut self) -> Result<(), String> {
        self.handle
            .lock()
            .migration()
            .iommu_dirty_stop()
            .map_err(|e| chain(&e))
    }
}

/// Reads the DMA log of one device through its transport.
struct DeviceLog {
    handle: PassthroughHandle,
    page_size: u64,
}

impl DmaDirtySource for DeviceLog {
    fn name(&self) -> String {
        self.handle.spec.clone()
    }

    fn start(&mut self, ranges: &[(u64, u64)]) -> Result<(), String> {
        let chosen = self
            .handle
            .lock()
            .migration()
            .dma_logging_start(PAGE_SIZE, ranges)
            .map_err(|e| chain(&e))?;
        if !chosen.is_power_of_two() {
            return Err(format!("the device chose page size {chosen:#x}"));
        }
        self.page_size = chosen;
        Ok(())
    }

    fn report(&mut self, gpa: u64, pages: u64) -> Result<Vec<u64>, String> {
        // Asked at 4 KiB whatever the device logs at: it replicates coarser bits (as the
        // kernel's DMA_LOGGING_REPORT does), so the words fit the dirty set as they are.
        let mut words = Vec::with_capacity(pages.div_ceil(64) as usize);
        let mut done = 0u64;
        while done < pages {
            let n = (pages - done).min(REPORT_PAGES);
            let part = self
                .handle
                .lock()
                .migration()
                .dma_logging_report(gpa + done * PAGE_SIZE, n * PAGE_SIZE, PAGE_SIZE)
                .map_err(|e| chain(&e))?;
            if part.len() as u64 != n.div_ceil(64) {
                return Err(format!(
                    "a report of {n} pages came with {} words, {} expected",
                    part.len(),
                    n.div_ceil(64)
                ));
            }
            words.extend_from_slice(&part);
            done += n;
        }
        Ok(words)
    }

    fn stop(&mut self) -> Result<(), String> {
        self.handle
            .lock()
            .migration()
            .dma_logging_stop()
            .map_err(|e| chain(&e))
    }
}

impl SourceDevices {
    /// Checks every device against `mode` and `dirty` before anything moves: the devices, and
    /// the DMA sources for the dirty tracker. The refusal names the device and what it lacks.
    pub fn check(
        handles: &[PassthroughHandle],
        mode: Mode,
        dirty: DeviceDirty,
    ) -> Result<(Self, Vec<Box<dyn DmaDirtySource>>), MigrationError> {
        let mut devs = Vec::new();
        let mut sources: Vec<Box<dyn DmaDirtySource>> = Vec::new();
        for handle in handles {
            let name = &handle.spec;
            let refuse = |why: String| MigrationError::Busy(format!("{name}: {why}"));
            let dev = MigDevice::check(handle)
                .map_err(|e| MigrationError::Busy(format!("{e}; refused before anything moved")))?;
            if mode == Mode::Postcopy {
                return Err(refuse(
                    "postcopy is refused with a passed-through device: all guest RAM is pinned \
                     for its DMA, yet on the destination the pages not sent yet would be \
                     missing while it runs (its reads would see zeros, its writes would be \
                     overwritten); use precopy or hybrid"
                        .into(),
                ));
            }
            match dirty {
                DeviceDirty::Log => {
                    let can = handle
                        .lock()
                        .migration()
                        .dma_logging_supported()
                        .map_err(|e| refuse(format!("probing its DMA logging: {}", chain(&e))))?;
                    if !can {
                        return Err(refuse(
                            "the device cannot log its DMA writes (no VFIO DMA_LOGGING), so \
                             pages it writes during precopy would be lost; choose \
                             --device-dirty all-pinned to count every pinned page as written"
                                .into(),
                        ));
                    }
                    sources.push(Box::new(DeviceLog {
                        handle: handle.clone(),
                        page_size: PAGE_SIZE,
                    }));
                }
                DeviceDirty::Iommu => {
                    let how = handle
                        .lock()
                        .migration()
                        .iommu_dirty()
                        .map_err(|e| {
                            refuse(format!(
                                "asking its IOMMU for dirty tracking: {}",
                                chain(&e)
                            ))
                        })?
                        .ok_or_else(|| {
                            refuse(
                                "no IOMMU dirty tracking for this device (vfio-user has no \
                                 IOMMU; kernel VFIO needs type1's dirty pages or an iommufd \
                                 HWPT with dirty tracking, which this host's IOMMU lacks); \
                                 choose --device-dirty log or all-pinned"
                                    .into(),
                            )
                        })?;
                    sources.push(Box::new(IommuLog {
                        handle: handle.clone(),
                        how,
                    }));
                }
                DeviceDirty::AllPinned => sources.push(Box::new(AllPinned {
                    device: name.clone(),
                })),
                DeviceDirty::Off => tracing::warn!(
                    "{name}: device DMA is NOT tracked (--device-dirty off, a debugging aid): \
                     what it writes after a page was sent is lost"
                ),
            }
            devs.push(dev);
        }
        Ok((
            SourceDevices {
                devs,
                precopy_bytes: 0,
                stop_copy_bytes: 0,
                stop_copy_ms: 0.0,
            },
            sources,
        ))
    }

    pub fn is_empty(&self) -> bool {
        self.devs.is_empty()
    }

    pub fn len(&self) -> usize {
        self.devs.len()
    }

    /// RUNNING -> PRE_COPY for the devices that have it.
    pub fn start_precopy(&mut self) -> Result<(), MigrationError> {
        for d in &mut self.devs {
            if d.caps.pre_copy {
                d.set(MigState::PreCopy)?;
            }
        }
        Ok(())
    }

    /// One precopy round's device data: what each PRE_COPY device has ready, within the round
    /// budget. Returns the bytes sent.
    pub fn send_precopy(&mut self, w: &mut Writer) -> Result<u64, MigrationError> {
        let mut total = 0;
        for (i, d) in self.devs.iter_mut().enumerate() {
            if d.state == MigState::PreCopy {
                total += send_data(d, i as u32, w, ROUND_BUDGET)?;
            }
        }
        self.precopy_bytes += total;
        Ok(total)
    }

    /// What the devices still hold for the stop-copy, by their own estimate (0 when a device
    /// does not say): part of the downtime estimate.
    pub fn pending_bytes(&mut self) -> u64 {
        self.devs
            .iter()
            .map(|d| {
                d.handle
                    .lock()
                    .migration()
                    .migration_data_size()
                    .ok()
                    .flatten()
                    .unwrap_or(0)
            })
            .sum()
    }

    /// With the vCPUs paused: every device to STOP_COPY (it stops, so its DMA ends here).
    pub fn stop(&mut self) -> Result<(), MigrationError> {
        let t = Instant::now();
        for d in &mut self.devs {
            if d.state == MigState::Running {
                d.set(MigState::Stop)?;
            }
            d.set(MigState::StopCopy)?;
        }
        self.stop_copy_ms += t.elapsed().as_secs_f64() * 1000.0;
        Ok(())
    }

    /// The devices' stop-copy data, all of it.
    pub fn send_stop_copy(&mut self, w: &mut Writer) -> Result<u64, MigrationError> {
        let t = Instant::now();
        let mut total = 0;
        for (i, d) in self.devs.iter_mut().enumerate() {
            total += send_data(d, i as u32, w, STOP_COPY_LIMIT)?;
        }
        self.stop_copy_bytes += total;
        self.stop_copy_ms += t.elapsed().as_secs_f64() * 1000.0;
        Ok(total)
    }

    /// The migration failed before the point of no return: every device runs again.
    pub fn recover(&mut self) {
        for d in &mut self.devs {
            d.recover("a failed migration");
        }
    }

    /// The destination runs the guest: the devices here end their data transfer stopped.
    pub fn finish(&mut self) {
        for d in &mut self.devs {
            if d.state == MigState::StopCopy {
                if let Err(e) = d.set(MigState::Stop) {
                    tracing::warn!("after the migration: {e}");
                }
            }
        }
    }
}

/// The devices of an incoming VM, built from this side's own `--device` list.
pub struct DestDevices {
    devs: Vec<MigDevice>,
    pub bytes: u64,
    /// Time spent in RESUMING -> STOP and STOP -> RUNNING (ms), readable once `self` moved
    /// into a hook.
    pub times: Arc<Mutex<DeviceTimes>>,
}

/// The destination's device steps in its part of the downtime.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeviceTimes {
    pub load_ms: f64,
    pub run_ms: f64,
}

impl DestDevices {
    /// Puts every device in RESUMING; refuses (the message names the device) one that cannot.
    pub fn resuming(handles: &[PassthroughHandle]) -> Result<Self, MigrationError> {
        let mut devs = Vec::new();
        for handle in handles {
            let mut d = MigDevice::check(handle)
                .map_err(|e| MigrationError::Refused(format!("this destination's device: {e}")))?;
            d.set(MigState::Stop)
                .and_then(|()| d.set(MigState::Resuming))
                .map_err(|e| MigrationError::Refused(e.to_string()))?;
            devs.push(d);
        }
        Ok(DestDevices {
            devs,
            bytes: 0,
            times: Arc::default(),
        })
    }

    /// The next bytes of device `index`'s stream.
    pub fn write(&mut self, index: u32, data: &[u8]) -> Result<(), MigrationError> {
        let count = self.devs.len();
        let d = self.devs.get_mut(index as usize).ok_or_else(|| {
            MigrationError::Device(format!(
                "data for passed-through device {index}, this VM has {count}"
            ))
        })?;
        d.write(data)?;
        self.bytes += data.len() as u64;
        Ok(())
    }

    /// All data is in: RESUMING -> STOP, where each device checks what it got.
    pub fn loaded(&mut self) -> Result<(), MigrationError> {
        let t = Instant::now();
        for d in &mut self.devs {
            d.set(MigState::Stop)?;
        }
        self.lock_times().load_ms += t.elapsed().as_secs_f64() * 1000.0;
        Ok(())
    }

    fn lock_times(&self) -> std::sync::MutexGuard<'_, DeviceTimes> {
        self.times.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_empty(&self) -> bool {
        self.devs.is_empty()
    }

    /// STOP -> RUNNING, just before the vCPUs run.
    pub fn run(&mut self) -> Result<(), MigrationError> {
        let t = Instant::now();
        for d in &mut self.devs {
            d.set(MigState::Running)?;
        }
        self.lock_times().run_ms += t.elapsed().as_secs_f64() * 1000.0;
        Ok(())
    }
}
