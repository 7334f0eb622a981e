//! What the probe makes through the driver, each undone on drop: the primary context, the
//! module, a stream, and the memory of each kind. [`Health`] is shared by all of them: after a
//! sticky fault the context is reset before it is released; while a kernel has never completed
//! nothing that would wait on it is freed (the memory is left to process exit rather than
//! risking a hang).
//!
//! Never run on a GPU here (no GPU machine was lent to this task): its first GPU run is its
//! real test.

use std::cell::RefCell;
use std::ffi::{c_void, CStr};
use std::mem::ManuallyDrop;

use crate::cuda::driver::{
    CuContext, CuDevice, CuDevicePtr, CuFunction, CuModule, CuStream, Driver,
    CU_MEMHOSTALLOC_DEVICEMAP, CU_MEMHOSTREGISTER_DEVICEMAP, CU_MEM_ATTACH_GLOBAL,
    CU_STREAM_NON_BLOCKING,
};
use crate::cuda::error::CudaError;
use crate::kinds::Mapping;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
enum State {
    #[default]
    Usable,
    /// A kernel has not completed (why); its stream and memory may still be in use.
    Stuck(String),
    /// A sticky error (why): every later call fails the same way.
    Lost(String),
}

/// The context's state, as the kernel writer found it.
#[derive(Debug, Default)]
pub struct Health(RefCell<State>);

impl Health {
    pub fn lose(&self, why: String) {
        *self.0.borrow_mut() = State::Lost(why);
    }

    /// Stuck unless already lost (a loss says more).
    pub fn stick(&self, why: String) {
        let mut s = self.0.borrow_mut();
        if *s == State::Usable {
            *s = State::Stuck(why);
        }
    }

    /// The stuck kernel completed after all.
    pub fn unstick(&self) {
        let mut s = self.0.borrow_mut();
        if matches!(*s, State::Stuck(_)) {
            *s = State::Usable;
        }
    }

    pub fn lost(&self) -> Option<String> {
        match &*self.0.borrow() {
            State::Lost(why) => Some(why.clone()),
            _ => None,
        }
    }

    pub fn stuck(&self) -> Option<String> {
        match &*self.0.borrow() {
            State::Stuck(why) => Some(why.clone()),
            _ => None,
        }
    }

    /// Why nothing more can be done on this context, if so.
    pub fn unusable(&self) -> Option<String> {
        match &*self.0.borrow() {
            State::Usable => None,
            State::Stuck(why) => Some(format!("a GPU kernel never completed ({why})")),
            State::Lost(why) => Some(format!(
                "the CUDA context was lost to an earlier fault ({why})"
            )),
        }
    }
}

/// The device's primary context, retained and current on this thread.
pub struct PrimaryContext<'a> {
    drv: &'a Driver,
    health: &'a Health,
    dev: CuDevice,
}

impl<'a> PrimaryContext<'a> {
    pub fn retain(drv: &'a Driver, health: &'a Health, dev: CuDevice) -> Result<Self, CudaError> {
        let mut ctx: CuContext = std::ptr::null_mut();
        // SAFETY: writes one context handle; `dev` came from cuDeviceGet.
        let r = unsafe { (drv.api.cu_device_primary_ctx_retain)(&mut ctx, dev) };
        drv.check("cuDevicePrimaryCtxRetain", r)?;
        let guard = PrimaryContext { drv, health, dev };
        // SAFETY: `ctx` is the context just retained, alive until the guard releases it.
        let r = unsafe { (drv.api.cu_ctx_set_current)(ctx) };
        drv.check("cuCtxSetCurrent", r)?;
        Ok(guard)
    }
}

impl Drop for PrimaryContext<'_> {
    fn drop(&mut self) {
        if self.health.stuck().is_some() {
            // Destroying a context under a running kernel may wait on it for ever: left to
            // process exit.
            return;
        }
        let api = &self.drv.api;
        if self.health.lost().is_some() {
            // SAFETY: destroys every allocation of this process's primary context, all of whose
            // guards have been dropped (they borrow `drv` for less than this guard lives).
            unsafe { (api.cu_device_primary_ctx_reset)(self.dev) };
        }
        // SAFETY: balances the retain above.
        unsafe { (api.cu_device_primary_ctx_release)(self.dev) };
    }
}

/// A module loaded from PTX text (JIT-compiled by the driver).
pub struct Module<'a> {
    drv: &'a Driver,
    health: &'a Health,
    module: CuModule,
}

impl<'a> Module<'a> {
    pub fn load(drv: &'a Driver, health: &'a Health, ptx: &CStr) -> Result<Self, CudaError> {
        let mut module: CuModule = std::ptr::null_mut();
        // SAFETY: `ptx` is NUL-terminated PTX text, read by the driver during the call only.
        let r = unsafe { (drv.api.cu_module_load_data)(&mut module, ptx.as_ptr().cast()) };
        drv.check("cuModuleLoadData (JIT of the PTX kernel)", r)?;
        Ok(Module {
            drv,
            health,
            module,
        })
    }

    /// A kernel of this module: valid while the module is loaded, so its users borrow the
    /// module too.
    pub fn function(&self, name: &CStr) -> Result<CuFunction, CudaError> {
        let mut f: CuFunction = std::ptr::null_mut();
        // SAFETY: `name` is NUL-terminated; `self.module` is loaded.
        let r =
            unsafe { (self.drv.api.cu_module_get_function)(&mut f, self.module, name.as_ptr()) };
        self.drv.check("cuModuleGetFunction", r).map(|()| f)
    }
}

impl Drop for Module<'_> {
    fn drop(&mut self) {
        if self.health.stuck().is_none() {
            // SAFETY: the module was loaded by this guard; no kernel of it is running (not
            // stuck) and no function handle outlives the guard's borrow.
            unsafe { (self.drv.api.cu_module_unload)(self.module) };
        }
    }
}

/// A stream that does not synchronise with the legacy default stream.
pub struct Stream<'a> {
    drv: &'a Driver,
    pub stream: CuStream,
}

impl<'a> Stream<'a> {
    pub fn new(drv: &'a Driver) -> Result<Self, CudaError> {
        let mut stream: CuStream = std::ptr::null_mut();
        // SAFETY: writes one stream handle, in the current context.
        let r = unsafe { (drv.api.cu_stream_create)(&mut stream, CU_STREAM_NON_BLOCKING) };
        drv.check("cuStreamCreate", r)?;
        Ok(Stream { drv, stream })
    }
}

impl Drop for Stream<'_> {
    fn drop(&mut self) {
        // SAFETY: the stream is this guard's. cuStreamDestroy does not wait: resources of work
        // still running are released when it completes, so this is safe even when stuck.
        unsafe { (self.drv.api.cu_stream_destroy)(self.stream) };
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// cuMemAllocManaged or cuMemAlloc: cuMemFree.
    Device,
    /// cuMemHostAlloc: cuMemFreeHost.
    Host,
}

/// CUDA memory: managed, device-only or pinned host memory, of the length asked for. `host` is
/// its CPU address (0 for device-only memory), `device` the address a kernel uses.
pub struct Allocation<'a> {
    drv: &'a Driver,
    health: &'a Health,
    owner: Owner,
    pub host: usize,
    pub device: CuDevicePtr,
}

impl<'a> Allocation<'a> {
    /// cuMemAllocManaged(CU_MEM_ATTACH_GLOBAL): one address for CPU and GPU.
    pub fn managed(drv: &'a Driver, health: &'a Health, len: usize) -> Result<Self, CudaError> {
        let mut p: CuDevicePtr = 0;
        // SAFETY: writes one device pointer; the memory is owned by the returned guard.
        let r = unsafe { (drv.api.cu_mem_alloc_managed)(&mut p, len, CU_MEM_ATTACH_GLOBAL) };
        drv.check("cuMemAllocManaged", r)?;
        Ok(Allocation {
            drv,
            health,
            owner: Owner::Device,
            host: p as usize,
            device: p,
        })
    }

    /// cuMemAlloc: VRAM with no CPU mapping.
    pub fn device(drv: &'a Driver, health: &'a Health, len: usize) -> Result<Self, CudaError> {
        let mut p: CuDevicePtr = 0;
        // SAFETY: writes one device pointer; the memory is owned by the returned guard.
        let r = unsafe { (drv.api.cu_mem_alloc)(&mut p, len) };
        drv.check("cuMemAlloc", r)?;
        Ok(Allocation {
            drv,
            health,
            owner: Owner::Device,
            host: 0,
            device: p,
        })
    }

    /// cuMemHostAlloc(DEVICEMAP): pinned host memory nvidia.ko maps into the process, and its
    /// device address.
    pub fn pinned(drv: &'a Driver, health: &'a Health, len: usize) -> Result<Self, CudaError> {
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: writes one host pointer; the memory is owned by the guard made below.
        let r = unsafe { (drv.api.cu_mem_host_alloc)(&mut p, len, CU_MEMHOSTALLOC_DEVICEMAP) };
        drv.check("cuMemHostAlloc(DEVICEMAP)", r)?;
        let mut a = Allocation {
            drv,
            health,
            owner: Owner::Host,
            host: p as usize,
            device: 0,
        };
        a.device = device_pointer(drv, p)?;
        Ok(a)
    }
}

/// The device address of mapped host memory (equal to the host address under UVA).
fn device_pointer(drv: &Driver, host: *mut c_void) -> Result<CuDevicePtr, CudaError> {
    let mut d: CuDevicePtr = 0;
    // SAFETY: writes one device pointer; `host` is memory allocated or registered with
    // DEVICEMAP by the caller; flags must be 0.
    let r = unsafe { (drv.api.cu_mem_host_get_device_pointer)(&mut d, host, 0) };
    drv.check("cuMemHostGetDevicePointer", r).map(|()| d)
}

impl Drop for Allocation<'_> {
    fn drop(&mut self) {
        if self.health.stuck().is_some() {
            // A kernel that never completed may still write here, and the free would wait
            // for it: left to process exit.
            return;
        }
        let api = &self.drv.api;
        match self.owner {
            // SAFETY: allocated by this guard; no kernel is running (not stuck) and the CPU
            // no longer touches it (external::probe has returned).
            Owner::Device => unsafe { (api.cu_mem_free)(self.device) },
            // SAFETY: as above, for cuMemHostAlloc memory.
            Owner::Host => unsafe { (api.cu_mem_free_host)(self.host as *mut c_void) },
        };
    }
}

/// A plain anonymous mapping registered with cuMemHostRegister(DEVICEMAP): pinned, and
/// reachable by a kernel at `device`.
pub struct Registration<'a> {
    drv: &'a Driver,
    health: &'a Health,
    map: ManuallyDrop<Mapping>,
    pub device: CuDevicePtr,
}

impl<'a> Registration<'a> {
    pub fn new(drv: &'a Driver, health: &'a Health, map: Mapping) -> Result<Self, CudaError> {
        let p: *mut c_void = map.ptr.cast();
        // SAFETY: `map` is a live private anonymous mapping of `map.len` bytes, unregistered
        // before it is unmapped (Drop below).
        let r = unsafe { (drv.api.cu_mem_host_register)(p, map.len, CU_MEMHOSTREGISTER_DEVICEMAP) };
        drv.check("cuMemHostRegister(DEVICEMAP)", r)?;
        let mut reg = Registration {
            drv,
            health,
            map: ManuallyDrop::new(map),
            device: 0,
        };
        reg.device = device_pointer(drv, p)?;
        Ok(reg)
    }

    pub fn host(&self) -> usize {
        self.map.ptr as usize
    }

    pub fn len(&self) -> usize {
        self.map.len
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        if self.health.stuck().is_some() {
            // Neither unregistered nor unmapped while a kernel may still write it.
            return;
        }
        // SAFETY: registered by this guard; no kernel is running (not stuck).
        unsafe { (self.drv.api.cu_mem_host_unregister)(self.map.ptr.cast()) };
        // SAFETY: dropped once, here, after the unregistration.
        unsafe { ManuallyDrop::drop(&mut self.map) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loss_outranks_being_stuck_and_is_never_undone() {
        let h = Health::default();
        assert_eq!(h.unusable(), None);
        h.stick("no completion".into());
        assert!(h.stuck().is_some());
        h.unstick();
        assert_eq!(h.unusable(), None);
        h.stick("no completion".into());
        h.lose("cuStreamQuery: CUDA_ERROR_ILLEGAL_ADDRESS (700)".into());
        h.stick("again".into());
        h.unstick();
        assert!(h.stuck().is_none());
        let why = h.unusable().unwrap();
        assert!(
            why.starts_with("the CUDA context was lost to an earlier fault (cuStreamQuery"),
            "{why}"
        );
    }
}
