//! The CUDA driver API, opened at run time with dlopen (libloading): no CUDA at build time, and
//! a host without the library gets a clear reason instead of a link failure. Only the calls the
//! probe makes are resolved, each by the name libcuda exports (cuda.h `#define`s several to a
//! `_v2`), so a wrong or non-CUDA library is reported by the first missing symbol's name.
//!
//! Never run against a real libcuda here (no GPU machine was lent to this task): its first GPU
//! run is its real test.

use std::cell::Cell;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::mem::ManuallyDrop;
use std::path::Path;

use libloading::Library;

use crate::cuda::error::{result_name, CudaError, CUDA_SUCCESS};

pub type CuResult = c_int;
pub type CuDevice = c_int;
pub type CuDevicePtr = u64;
pub type CuContext = *mut c_void;
pub type CuModule = *mut c_void;
pub type CuFunction = *mut c_void;
pub type CuStream = *mut c_void;

pub const CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY: c_int = 19;
pub const CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING: c_int = 41;
pub const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: c_int = 75;
pub const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: c_int = 76;
pub const CU_DEVICE_ATTRIBUTE_PAGEABLE_MEMORY_ACCESS: c_int = 88;
pub const CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS: c_int = 89;
pub const CU_DEVICE_ATTRIBUTE_PAGEABLE_MEMORY_ACCESS_USES_HOST_PAGE_TABLES: c_int = 100;

pub const CU_MEM_ATTACH_GLOBAL: c_uint = 0x1;
pub const CU_MEMHOSTALLOC_DEVICEMAP: c_uint = 0x2;
pub const CU_MEMHOSTREGISTER_DEVICEMAP: c_uint = 0x2;
pub const CU_STREAM_NON_BLOCKING: c_uint = 0x1;

/// The entry points, with cuda.h's signatures (CUresult is a C enum: an int).
pub struct Api {
    pub cu_init: unsafe extern "C" fn(c_uint) -> CuResult,
    pub cu_driver_get_version: unsafe extern "C" fn(*mut c_int) -> CuResult,
    pub cu_get_error_name: unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult,
    pub cu_get_error_string: unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult,
    pub cu_device_get_count: unsafe extern "C" fn(*mut c_int) -> CuResult,
    pub cu_device_get: unsafe extern "C" fn(*mut CuDevice, c_int) -> CuResult,
    pub cu_device_get_name: unsafe extern "C" fn(*mut c_char, c_int, CuDevice) -> CuResult,
    pub cu_device_get_attribute: unsafe extern "C" fn(*mut c_int, c_int, CuDevice) -> CuResult,
    pub cu_device_primary_ctx_retain: unsafe extern "C" fn(*mut CuContext, CuDevice) -> CuResult,
    pub cu_device_primary_ctx_release: unsafe extern "C" fn(CuDevice) -> CuResult,
    pub cu_device_primary_ctx_reset: unsafe extern "C" fn(CuDevice) -> CuResult,
    pub cu_ctx_set_current: unsafe extern "C" fn(CuContext) -> CuResult,
    pub cu_ctx_synchronize: unsafe extern "C" fn() -> CuResult,
    pub cu_mem_alloc_managed: unsafe extern "C" fn(*mut CuDevicePtr, usize, c_uint) -> CuResult,
    pub cu_mem_alloc: unsafe extern "C" fn(*mut CuDevicePtr, usize) -> CuResult,
    pub cu_mem_free: unsafe extern "C" fn(CuDevicePtr) -> CuResult,
    pub cu_mem_host_alloc: unsafe extern "C" fn(*mut *mut c_void, usize, c_uint) -> CuResult,
    pub cu_mem_free_host: unsafe extern "C" fn(*mut c_void) -> CuResult,
    pub cu_mem_host_register: unsafe extern "C" fn(*mut c_void, usize, c_uint) -> CuResult,
    pub cu_mem_host_unregister: unsafe extern "C" fn(*mut c_void) -> CuResult,
    pub cu_mem_host_get_device_pointer:
        unsafe extern "C" fn(*mut CuDevicePtr, *mut c_void, c_uint) -> CuResult,
    pub cu_module_load_data: unsafe extern "C" fn(*mut CuModule, *const c_void) -> CuResult,
    pub cu_module_get_function:
        unsafe extern "C" fn(*mut CuFunction, CuModule, *const c_char) -> CuResult,
    pub cu_module_unload: unsafe extern "C" fn(CuModule) -> CuResult,
    pub cu_launch_kernel: unsafe extern "C" fn(
        CuFunction,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        CuStream,
        *mut *mut c_void,
        *mut *mut c_void,
    ) -> CuResult,
    pub cu_stream_create: unsafe extern "C" fn(*mut CuStream, c_uint) -> CuResult,
    pub cu_stream_query: unsafe extern "C" fn(CuStream) -> CuResult,
    pub cu_stream_destroy: unsafe extern "C" fn(CuStream) -> CuResult,
}

/// `T` must be the C signature of `name` as cuda.h declares it: every caller passes an `Api`
/// field's type, written from cuda.h above.
fn sym<T: Copy>(lib: &Library, library: &str, name: &'static str) -> Result<T, CudaError> {
    // SAFETY: `T` is the symbol's declared function type (see above); the pointer is copied out
    // and used only while the `Library` lives, which `Driver` guarantees by owning both.
    let s = unsafe { lib.get::<T>(name.as_bytes()) };
    s.map(|s| *s).map_err(|e| CudaError::Symbol {
        library: library.to_string(),
        symbol: name,
        why: e.to_string(),
    })
}

impl Api {
    /// cuInit first: a library that is not CUDA at all is named by it.
    fn resolve(lib: &Library, library: &str) -> Result<Api, CudaError> {
        Ok(Api {
            cu_init: sym(lib, library, "cuInit")?,
            cu_driver_get_version: sym(lib, library, "cuDriverGetVersion")?,
            cu_get_error_name: sym(lib, library, "cuGetErrorName")?,
            cu_get_error_string: sym(lib, library, "cuGetErrorString")?,
            cu_device_get_count: sym(lib, library, "cuDeviceGetCount")?,
            cu_device_get: sym(lib, library, "cuDeviceGet")?,
            cu_device_get_name: sym(lib, library, "cuDeviceGetName")?,
            cu_device_get_attribute: sym(lib, library, "cuDeviceGetAttribute")?,
            cu_device_primary_ctx_retain: sym(lib, library, "cuDevicePrimaryCtxRetain")?,
            cu_device_primary_ctx_release: sym(lib, library, "cuDevicePrimaryCtxRelease_v2")?,
            cu_device_primary_ctx_reset: sym(lib, library, "cuDevicePrimaryCtxReset_v2")?,
            cu_ctx_set_current: sym(lib, library, "cuCtxSetCurrent")?,
            cu_ctx_synchronize: sym(lib, library, "cuCtxSynchronize")?,
            cu_mem_alloc_managed: sym(lib, library, "cuMemAllocManaged")?,
            cu_mem_alloc: sym(lib, library, "cuMemAlloc_v2")?,
            cu_mem_free: sym(lib, library, "cuMemFree_v2")?,
            cu_mem_host_alloc: sym(lib, library, "cuMemHostAlloc")?,
            cu_mem_free_host: sym(lib, library, "cuMemFreeHost")?,
            cu_mem_host_register: sym(lib, library, "cuMemHostRegister_v2")?,
            cu_mem_host_unregister: sym(lib, library, "cuMemHostUnregister")?,
            cu_mem_host_get_device_pointer: sym(lib, library, "cuMemHostGetDevicePointer_v2")?,
            cu_module_load_data: sym(lib, library, "cuModuleLoadData")?,
            cu_module_get_function: sym(lib, library, "cuModuleGetFunction")?,
            cu_module_unload: sym(lib, library, "cuModuleUnload")?,
            cu_launch_kernel: sym(lib, library, "cuLaunchKernel")?,
            cu_stream_create: sym(lib, library, "cuStreamCreate")?,
            cu_stream_query: sym(lib, library, "cuStreamQuery")?,
            cu_stream_destroy: sym(lib, library, "cuStreamDestroy_v2")?,
        })
    }
}

/// The loaded library and its entry points.
pub struct Driver {
    pub api: Api,
    /// Closed on drop only if cuInit was never called: once the driver has started its
    /// threads and registered exit handlers, unloading it under them can crash the process.
    lib: ManuallyDrop<Library>,
    initialised: Cell<bool>,
}

impl Driver {
    pub fn load(path: &Path) -> Result<Driver, CudaError> {
        let library = path.display().to_string();
        // SAFETY: dlopen runs the library's initialisers; the library is the one the user named
        // as the CUDA driver (libcuda.so.1 by default), whose initialisers expect no more than a
        // normal process.
        let lib = unsafe { Library::new(path) }.map_err(|e| CudaError::Load {
            library: library.clone(),
            why: e.to_string(),
        })?;
        let api = Api::resolve(&lib, &library)?;
        Ok(Driver {
            api,
            lib: ManuallyDrop::new(lib),
            initialised: Cell::new(false),
        })
    }

    /// `call`'s result as a Result, named by the driver where it can.
    pub fn check(&self, call: &'static str, code: CuResult) -> Result<(), CudaError> {
        if code == CUDA_SUCCESS {
            return Ok(());
        }
        Err(self.error(call, code))
    }

    /// `code` (not CUDA_SUCCESS) as an error of `call`.
    pub fn error(&self, call: &'static str, code: CuResult) -> CudaError {
        let (name, text) = self.describe(code);
        CudaError::Call {
            call,
            code,
            name,
            text,
        }
    }

    /// cuGetErrorName / cuGetErrorString, falling back on cuda.h's names.
    pub fn describe(&self, code: CuResult) -> (String, String) {
        let ask = |f: unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult| {
            let mut p: *const c_char = std::ptr::null();
            // SAFETY: both calls take any code and store a pointer to a static NUL-terminated
            // string, or return an error and leave `p` alone (checked for null).
            let r = unsafe { f(code, &mut p) };
            if r != CUDA_SUCCESS || p.is_null() {
                return None;
            }
            // SAFETY: a non-null result points to the driver's static C string.
            Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
        };
        let name = ask(self.api.cu_get_error_name)
            .or_else(|| result_name(code).map(String::from))
            .unwrap_or_else(|| "unknown CUresult".to_string());
        let text = ask(self.api.cu_get_error_string).unwrap_or_else(|| "no description".into());
        (name, text)
    }

    pub fn init(&self) -> Result<(), CudaError> {
        self.initialised.set(true);
        // SAFETY: cuInit takes flags (must be 0) and nothing else.
        let r = unsafe { (self.api.cu_init)(0) };
        self.check("cuInit", r)
    }

    /// e.g. 12040 for CUDA 12.4.
    pub fn version(&self) -> Result<c_int, CudaError> {
        let mut v = 0;
        // SAFETY: writes one int to `v`.
        let r = unsafe { (self.api.cu_driver_get_version)(&mut v) };
        self.check("cuDriverGetVersion", r).map(|()| v)
    }

    /// The first device (the probe needs one, not all).
    pub fn first_device(&self) -> Result<CuDevice, CudaError> {
        let mut n = 0;
        // SAFETY: writes one int to `n`.
        let r = unsafe { (self.api.cu_device_get_count)(&mut n) };
        self.check("cuDeviceGetCount", r)?;
        if n < 1 {
            return Err(CudaError::NoDevice);
        }
        let mut dev = 0;
        // SAFETY: writes one CUdevice to `dev`; ordinal 0 exists (count >= 1).
        let r = unsafe { (self.api.cu_device_get)(&mut dev, 0) };
        self.check("cuDeviceGet", r).map(|()| dev)
    }

    pub fn device_name(&self, dev: CuDevice) -> Result<String, CudaError> {
        let mut buf = [0 as c_char; 256];
        // SAFETY: the driver writes at most `buf.len()` bytes, NUL-terminated, into `buf`.
        let r = unsafe { (self.api.cu_device_get_name)(buf.as_mut_ptr(), buf.len() as c_int, dev) };
        self.check("cuDeviceGetName", r)?;
        let bytes: Vec<u8> = buf
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    pub fn attribute(&self, dev: CuDevice, attr: c_int) -> Result<c_int, CudaError> {
        let mut v = 0;
        // SAFETY: writes one int to `v`; an unknown attribute is refused with an error code.
        let r = unsafe { (self.api.cu_device_get_attribute)(&mut v, attr, dev) };
        self.check("cuDeviceGetAttribute", r).map(|()| v)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if !self.initialised.get() {
            // SAFETY: dropped once, here; no function pointer from it is used after this (they
            // live in `self.api`, which goes with `self`).
            unsafe { ManuallyDrop::drop(&mut self.lib) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_named_with_dlopens_reason() {
        let err = Driver::load(Path::new("/nonexistent/libcuda.so.1"))
            .err()
            .unwrap();
        let text = err.to_string();
        assert!(
            text.starts_with("/nonexistent/libcuda.so.1 not loadable ("),
            "{text}"
        );
        assert!(text.contains("No such file"), "{text}");
    }

    #[test]
    fn a_library_that_is_not_cuda_is_named_by_its_first_missing_symbol() {
        let err = Driver::load(Path::new("libc.so.6")).err().unwrap();
        assert!(
            matches!(
                &err,
                CudaError::Symbol {
                    symbol: "cuInit",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("has no cuInit"), "{err}");
    }
}
