//! The device's migration requests: state transitions, saving and loading its stream.

use std::sync::atomic::Ordering;

use gpu_test_device::regs::STATUS_BUSY;

use super::{lock, Device, DeviceError};
use crate::config_space::ConfigSpace;
use crate::engines::KernelResume;
use crate::migration::states::{ERROR, PRE_COPY, RESUMING, RUNNING, STOP, STOP_COPY};
use crate::migration::stream::{DeviceState, RECORD_HEADER};
use crate::migration::{engines_run, next_step, Loader, MigrationError, Saver};

impl Device {
    /// MIG_DEVICE_STATE SET: walks to `target` one direct transition at a time.
    pub(super) fn set_state(&mut self, target: u32) -> Result<(), DeviceError> {
        if self.migration.crash_at == Some(target) && self.migration.state != target {
            eprintln!("vmm-gpu-test-device: --crash-at: exiting on the request for state {target}");
            std::process::exit(3);
        }
        while self.migration.state != target {
            let from = self.migration.state;
            let step =
                next_step(from, target).ok_or(MigrationError::Transition { from, to: target })?;
            self.transition(step)?;
        }
        Ok(())
    }

    /// One direct transition from the current state to `to`.
    fn transition(&mut self, to: u32) -> Result<(), DeviceError> {
        let from = self.migration.state;
        let identity = self.identity;
        match (from, to) {
            (RUNNING, PRE_COPY) => {
                // A new stream sends every page: older marks say nothing more.
                self.shared.vram_written.clear();
                self.migration.saver = Some(Saver::new(&identity));
            }
            (STOP, STOP_COPY) => {
                self.shared.vram_written.clear();
                let mut saver = Saver::new(&identity);
                saver.begin_final();
                self.migration.saver = Some(saver);
            }
            (PRE_COPY, STOP_COPY) => {
                self.shared.gate.close();
                if let Some(saver) = &mut self.migration.saver {
                    saver.begin_final();
                }
            }
            (PRE_COPY, RUNNING) | (PRE_COPY, STOP) | (STOP_COPY, STOP) => {
                self.migration.saver = None;
            }
            (STOP, RESUMING) => self.migration.loader = Some(Loader::new(identity)),
            (RESUMING, STOP) => {
                let loaded = self.migration.loader.take().map_or(
                    Err(crate::migration::stream::StreamError::Incomplete),
                    |l| l.finish(),
                );
                let restored = loaded
                    .map_err(|e| DeviceError::from(MigrationError::from(e)))
                    .and_then(|state| self.restore(state));
                if let Err(e) = restored {
                    // VRAM may hold part of the stream: only a reset leaves ERROR.
                    self.migration.state = ERROR;
                    return Err(e);
                }
            }
            _ => {}
        }
        // Engines wait at the gate outside RUNNING and PRE_COPY.
        if engines_run(to) {
            self.shared.gate.open();
        } else {
            self.shared.gate.close();
        }
        self.migration.state = to;
        Ok(())
    }

    /// Everything but memory, taken while the engines wait at the closed gate.
    fn snapshot(&self) -> DeviceState {
        let regs = lock(&self.shared.regs).clone();
        let jobs = *lock(&self.shared.jobs);
        let shared = &self.shared;
        let busy = |status| status == STATUS_BUSY;
        DeviceState {
            pw_written: shared.pw_written.load(Ordering::Relaxed),
            k_passes: shared.k_passes.load(Ordering::Relaxed),
            dma: jobs
                .dma
                .filter(|_| busy(regs.dma_status))
                .map(|job| (job, shared.dma_done.load(Ordering::Relaxed))),
            page_writer: jobs.page_writer.filter(|_| busy(regs.pw_status)),
            kernel: jobs.kernel.filter(|_| busy(regs.k_status)).map(|job| {
                let at = shared.k_at.load(Ordering::Relaxed);
                (job, at, shared.k_pass_pattern.load(Ordering::Relaxed))
            }),
            regs,
            config: self.config.bytes().to_vec(),
            msix_table: self.msix_table.clone(),
        }
    }

    /// Takes a loaded state: checked first (nothing changes if it is refused), then the
    /// engines are replaced by the source's, waiting at the gate where the source stopped.
    fn restore(&mut self, state: DeviceState) -> Result<(), DeviceError> {
        let mut config = ConfigSpace::new(self.identity);
        config
            .restore(&state.config)
            .map_err(MigrationError::from)?;
        self.dma_worker.halt();
        self.page_writer.halt();
        self.kernel.halt();
        let shared = &self.shared;
        *lock(&shared.regs) = state.regs;
        shared.pw_written.store(state.pw_written, Ordering::Relaxed);
        shared.k_passes.store(state.k_passes, Ordering::Relaxed);
        self.config = config;
        self.msix_table = state.msix_table;
        if let Some((job, done)) = state.dma {
            self.start_dma(job, done)?;
        }
        if let Some(job) = state.page_writer {
            self.start_page_writer(job)?;
        }
        if let Some((job, at, pattern)) = state.kernel {
            // At 0 the next pass begins, and reads the pattern register as any pass does.
            let pattern = (at != 0).then_some(pattern);
            self.start_kernel(job, KernelResume { at, pattern })?;
        }
        Ok(())
    }

    /// MIG_DATA_READ: the source's stream, in PRE_COPY and STOP_COPY.
    pub(super) fn read_data(&mut self, buf: &mut [u8]) -> Result<usize, DeviceError> {
        let state = self.migration.state;
        let mut saver = match self.migration.saver.take() {
            Some(saver) if state == PRE_COPY || state == STOP_COPY => saver,
            other => {
                self.migration.saver = other;
                return Err(MigrationError::WrongState("read", state).into());
            }
        };
        let snapshot = || self.snapshot().encode();
        let read = saver.read(buf, &self.shared.vram, &self.shared.vram_written, &snapshot);
        self.migration.saver = Some(saver);
        Ok(read)
    }

    /// MIG_DATA_WRITE: the destination's stream, in RESUMING.
    pub(super) fn write_data(&mut self, data: &[u8]) -> Result<(), DeviceError> {
        let state = self.migration.state;
        let loader = self
            .migration
            .loader
            .as_mut()
            .filter(|_| state == RESUMING)
            .ok_or(MigrationError::WrongState("write", state))?;
        loader
            .write(data, &self.shared.vram)
            .map_err(|e| MigrationError::from(e).into())
    }

    /// MIG_DATA_SIZE: what STOP_COPY would still send, as far as the device knows.
    pub(super) fn data_size(&self) -> u64 {
        // The state and end records (the state is small: encoding it is cheap).
        let tail = (self.snapshot().encode().len() + 2 * RECORD_HEADER) as u64;
        match &self.migration.saver {
            Some(saver) => saver.estimate(&self.shared.vram_written, tail),
            None => self.identity.vram_size + tail,
        }
    }
}
