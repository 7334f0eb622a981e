//! The device half of external.rs's experiment: a GPU kernel (ptx.rs) that stores into the
//! pages asked for, launched on its own stream and polled with a deadline, so a GPU stuck on a
//! fault (e.g. waiting on a userfaultfd the probe itself holds) is given up on instead of
//! hanging the probe. `write_pages` gets host addresses; each range the writer may be asked
//! about is mapped to its device address first ([`Translation`]).
//!
//! Never run on a GPU here (no GPU machine was lent to this task): its first GPU run is its
//! real test.

use std::ffi::{c_uint, c_void};
use std::time::{Duration, Instant};

use crate::cuda::driver::{CuDevicePtr, CuFunction, CuResult, Driver};
use crate::cuda::error::{
    is_memory_fault, is_sticky, CudaError, CUDA_ERROR_NOT_READY, CUDA_SUCCESS,
};
use crate::cuda::ptx::{page_mask, ENTRY, THREADS};
use crate::cuda::resources::{Health, Module, Stream};
use crate::external::DeviceFailure;
use crate::kinds::SMALL;

/// How long a kernel of 64 stores may take before the GPU is taken to be stuck.
pub const DEADLINE: Duration = Duration::from_secs(10);
/// How long a later write waits for a kernel given up on (it may have been released since,
/// e.g. by the tracker it waited on being disarmed).
const GRACE: Duration = Duration::from_secs(1);

/// A host range and the address a kernel reaches it at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    pub host: usize,
    pub len: usize,
    pub device: CuDevicePtr,
}

/// The device address of page 0 at host `addr`, where `addr` and every page in `pages` lie in
/// one of `ranges`.
pub fn translate(
    ranges: &[Translation],
    addr: usize,
    pages: &[usize],
) -> Result<CuDevicePtr, CudaError> {
    let first = pages.iter().copied().min().unwrap_or(0);
    let last = pages.iter().copied().max().unwrap_or(0);
    let end = (last + 1)
        .checked_mul(SMALL)
        .and_then(|n| addr.checked_add(n));
    ranges
        .iter()
        .find(|r| addr >= r.host && end.is_some_and(|end| end <= r.host.saturating_add(r.len)))
        .map(|r| r.device + (addr - r.host) as u64)
        .ok_or(CudaError::NoTranslation { addr, first, last })
}

/// How polling a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waited {
    Done,
    Failed(CuResult),
    TimedOut,
}

/// Polls `query` (cuStreamQuery) until it is no longer CUDA_ERROR_NOT_READY or `deadline`
/// has passed; never blocks in the driver, unlike cuStreamSynchronize.
pub fn wait(mut query: impl FnMut() -> CuResult, deadline: Duration) -> Waited {
    let start = Instant::now();
    let mut pause = Duration::from_micros(50);
    loop {
        match query() {
            CUDA_SUCCESS => return Waited::Done,
            CUDA_ERROR_NOT_READY => {}
            code => return Waited::Failed(code),
        }
        if start.elapsed() >= deadline {
            return Waited::TimedOut;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(10));
    }
}

/// A driver error as external.rs's failure: a fault on the memory is `faulted`; a sticky one
/// also marks the context lost.
pub fn failure(health: &Health, e: &CudaError) -> DeviceFailure {
    let why = e.to_string();
    if e.code().is_some_and(is_sticky) {
        health.lose(why.clone());
    }
    DeviceFailure {
        errno: None,
        why,
        faulted: e.code().is_some_and(is_memory_fault),
    }
}

/// The write was not issued, for a reason that is not about the memory.
fn refused(why: String) -> DeviceFailure {
    DeviceFailure {
        errno: None,
        why,
        faulted: false,
    }
}

pub struct KernelWriter<'a> {
    drv: &'a Driver,
    health: &'a Health,
    /// Keeps the module (and so `function`) loaded while the writer exists.
    _module: &'a Module<'a>,
    function: CuFunction,
    stream: Stream<'a>,
    ranges: Vec<Translation>,
    device_name: String,
    deadline: Duration,
}

impl<'a> KernelWriter<'a> {
    pub fn new(
        drv: &'a Driver,
        health: &'a Health,
        module: &'a Module<'a>,
        device_name: String,
    ) -> Result<Self, CudaError> {
        let function = module.function(ENTRY)?;
        let stream = Stream::new(drv)?;
        Ok(KernelWriter {
            drv,
            health,
            _module: module,
            function,
            stream,
            ranges: Vec::new(),
            device_name,
            deadline: DEADLINE,
        })
    }

    pub fn map(&mut self, t: Translation) {
        self.unmap(t.host);
        self.ranges.push(t);
    }

    pub fn unmap(&mut self, host: usize) {
        self.ranges.retain(|r| r.host != host);
    }

    /// Before memory a kernel may have used is freed: waits, bounded, for a kernel given up on.
    pub fn settle(&self) {
        self.recheck(self.deadline);
    }

    fn recheck(&self, within: Duration) {
        if self.health.stuck().is_none() {
            return;
        }
        match self.poll(within) {
            Waited::Done => self.health.unstick(),
            // Nobody to report to: `failure` marks the context lost if the error is sticky.
            Waited::Failed(code) => {
                failure(self.health, &self.drv.error("cuStreamQuery (late)", code));
            }
            Waited::TimedOut => {}
        }
    }

    fn poll(&self, within: Duration) -> Waited {
        let (query, stream) = (self.drv.api.cu_stream_query, self.stream.stream);
        // SAFETY: the stream is alive (owned by self) and cuStreamQuery only reads its state.
        wait(|| unsafe { query(stream) }, within)
    }

    fn launch(&self, base: CuDevicePtr, mask: u64, value: u64) -> Result<(), CudaError> {
        let mut args: [u64; 3] = [base, mask, value];
        let [a, b, c] = &mut args;
        let mut params: [*mut c_void; 3] = [
            std::ptr::from_mut(a).cast(),
            std::ptr::from_mut(b).cast(),
            std::ptr::from_mut(c).cast(),
        ];
        // SAFETY: `function` belongs to the module `_module` keeps loaded and takes three u64
        // params (ptx.rs), each pointed to by `params` for the duration of the call (the driver
        // copies parameter values before returning); one block of THREADS threads, no shared
        // memory, our own stream, no `extra`.
        let r = unsafe {
            (self.drv.api.cu_launch_kernel)(
                self.function,
                1,
                1,
                1,
                THREADS as c_uint,
                1,
                1,
                0,
                self.stream.stream,
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        };
        self.drv.check("cuLaunchKernel", r)
    }
}

impl crate::external::DeviceWriter for KernelWriter<'_> {
    fn name(&self) -> String {
        format!(
            "GPU kernel {} (PTX, cuLaunchKernel) on {}",
            ENTRY.to_string_lossy(),
            self.device_name
        )
    }

    fn write_pages(
        &mut self,
        addr: usize,
        pages: &[usize],
        value: u64,
    ) -> Result<(), DeviceFailure> {
        self.recheck(GRACE);
        if let Some(why) = self.health.unusable() {
            return Err(refused(format!("{why}; no kernel launched")));
        }
        let mask = page_mask(pages).map_err(|e| refused(e.to_string()))?;
        let base = translate(&self.ranges, addr, pages).map_err(|e| refused(e.to_string()))?;
        self.launch(base, mask, value)
            .map_err(|e| failure(self.health, &e))?;
        match self.poll(self.deadline) {
            Waited::Done => {
                // Managed memory without concurrent access is the CPU's again only after a
                // context-wide synchronisation; elsewhere this returns at once.
                // SAFETY: no arguments; the context is current on this thread.
                let r = unsafe { (self.drv.api.cu_ctx_synchronize)() };
                self.drv
                    .check("cuCtxSynchronize", r)
                    .map_err(|e| failure(self.health, &e))
            }
            Waited::Failed(code) => Err(failure(
                self.health,
                &self.drv.error("cuStreamQuery after the kernel", code),
            )),
            Waited::TimedOut => {
                let why = format!(
                    "no completion within {} s: the GPU is stuck on a fault",
                    self.deadline.as_secs()
                );
                self.health.stick(why.clone());
                Err(DeviceFailure {
                    errno: None,
                    why,
                    faulted: true,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RANGE: Translation = Translation {
        host: 0x7f00_0000_0000,
        len: 16 * SMALL,
        device: 0x2_0000_0000,
    };

    #[test]
    fn host_addresses_translate_by_the_ranges_offset() {
        assert_eq!(translate(&[RANGE], RANGE.host, &[1, 5]), Ok(RANGE.device));
        let inner = RANGE.host + 2 * SMALL;
        assert_eq!(
            translate(&[RANGE], inner, &[13]),
            Ok(RANGE.device + 2 * SMALL as u64)
        );
    }

    #[test]
    fn pages_past_the_range_or_unknown_ranges_are_refused() {
        assert!(translate(&[RANGE], RANGE.host, &[15]).is_ok());
        assert_eq!(
            translate(&[RANGE], RANGE.host, &[1, 16]),
            Err(CudaError::NoTranslation {
                addr: RANGE.host,
                first: 1,
                last: 16
            })
        );
        assert!(translate(&[], RANGE.host, &[1]).is_err());
        assert!(translate(&[RANGE], RANGE.host - SMALL, &[0]).is_err());
        assert!(translate(&[RANGE], usize::MAX - SMALL, &[1]).is_err());
    }

    #[test]
    fn polling_ends_on_success_on_an_error_or_at_the_deadline() {
        let mut answers = [CUDA_ERROR_NOT_READY, CUDA_ERROR_NOT_READY, CUDA_SUCCESS].into_iter();
        let done = wait(|| answers.next().unwrap(), Duration::from_secs(5));
        assert_eq!(done, Waited::Done);
        assert_eq!(wait(|| 700, Duration::from_secs(5)), Waited::Failed(700));
        let start = Instant::now();
        let stuck = wait(|| CUDA_ERROR_NOT_READY, Duration::from_millis(50));
        assert_eq!(stuck, Waited::TimedOut);
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    fn call_error(code: CuResult) -> CudaError {
        CudaError::Call {
            call: "cuStreamQuery",
            code,
            name: crate::cuda::error::result_name(code).unwrap().into(),
            text: "(test)".into(),
        }
    }

    #[test]
    fn a_fault_is_faulted_and_loses_the_context() {
        let h = Health::default();
        let f = failure(&h, &call_error(700));
        assert!(f.faulted);
        assert!(
            f.why.contains("CUDA_ERROR_ILLEGAL_ADDRESS (700)"),
            "{}",
            f.why
        );
        assert!(h.lost().is_some());
    }

    #[test]
    fn a_refusal_before_running_is_not_a_fault_and_keeps_the_context() {
        let h = Health::default();
        let f = failure(&h, &call_error(1));
        assert!(!f.faulted);
        assert_eq!(h.unusable(), None);
        // Sticky but not about memory: the context is gone, the memory not to blame.
        let f = failure(&h, &call_error(715));
        assert!(!f.faulted);
        assert!(h.lost().is_some());
    }
}
