//! The module's one error type, and what the CUresult codes the probe meets mean: their
//! cuda.h names, which are faults on memory, and which leave the context unusable.
//!
//! The codes were taken from cuda.h; which ones a real GPU returns for the probe's faults has
//! never been seen here (no GPU machine was lent to this task): its first GPU run will tell.

use crate::cuda::driver::CuResult;

pub const CUDA_SUCCESS: CuResult = 0;
pub const CUDA_ERROR_NOT_READY: CuResult = 600;
pub const CUDA_ERROR_ILLEGAL_ADDRESS: CuResult = 700;
pub const CUDA_ERROR_LAUNCH_TIMEOUT: CuResult = 702;
pub const CUDA_ERROR_ECC_UNCORRECTABLE: CuResult = 214;
pub const CUDA_ERROR_ASSERT: CuResult = 710;
pub const CUDA_ERROR_HARDWARE_STACK_ERROR: CuResult = 714;
pub const CUDA_ERROR_ILLEGAL_INSTRUCTION: CuResult = 715;
pub const CUDA_ERROR_MISALIGNED_ADDRESS: CuResult = 716;
pub const CUDA_ERROR_INVALID_ADDRESS_SPACE: CuResult = 717;
pub const CUDA_ERROR_INVALID_PC: CuResult = 718;
pub const CUDA_ERROR_LAUNCH_FAILED: CuResult = 719;

/// The errors of the cuda module: loading, the driver's refusals, and the probe's own checks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CudaError {
    #[error("{library} not loadable ({why})")]
    Load { library: String, why: String },
    #[error("{library} is not the CUDA driver: it has no {symbol} ({why})")]
    Symbol {
        library: String,
        symbol: &'static str,
        why: String,
    },
    #[error("{call}: {name} ({code}): {text}")]
    Call {
        call: &'static str,
        code: CuResult,
        name: String,
        text: String,
    },
    #[error("no CUDA device: cuDeviceGetCount found 0")]
    NoDevice,
    #[error("page {page} is beyond the kernel's {threads} threads (one page each)")]
    PageOutOfReach { page: usize, threads: usize },
    #[error("{what} at {addr:#x} is not 4 KiB aligned")]
    Unaligned { what: &'static str, addr: u64 },
    #[error("no device address is known for host pages {first}..={last} at {addr:#x}")]
    NoTranslation {
        addr: usize,
        first: usize,
        last: usize,
    },
}

impl CudaError {
    pub fn code(&self) -> Option<CuResult> {
        match self {
            CudaError::Call { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// An error a kernel's memory access causes: the device faulted on the memory.
pub fn is_memory_fault(code: CuResult) -> bool {
    matches!(
        code,
        CUDA_ERROR_ILLEGAL_ADDRESS
            | CUDA_ERROR_MISALIGNED_ADDRESS
            | CUDA_ERROR_INVALID_ADDRESS_SPACE
            | CUDA_ERROR_LAUNCH_FAILED
    )
}

/// Errors after which cuda.h says the context "cannot be used" and must be destroyed: every
/// later call returns the same error.
pub fn is_sticky(code: CuResult) -> bool {
    is_memory_fault(code)
        || matches!(
            code,
            CUDA_ERROR_HARDWARE_STACK_ERROR
                | CUDA_ERROR_ILLEGAL_INSTRUCTION
                | CUDA_ERROR_INVALID_PC
                // A display watchdog ended the kernel: sticky, but not the memory's doing.
                | CUDA_ERROR_LAUNCH_TIMEOUT
                | CUDA_ERROR_ECC_UNCORRECTABLE
                | CUDA_ERROR_ASSERT
        )
}

/// cuda.h's names for the codes the probe is likely to meet, for when cuGetErrorName has none
/// (or the library is not there to ask).
pub fn result_name(code: CuResult) -> Option<&'static str> {
    Some(match code {
        0 => "CUDA_SUCCESS",
        1 => "CUDA_ERROR_INVALID_VALUE",
        2 => "CUDA_ERROR_OUT_OF_MEMORY",
        3 => "CUDA_ERROR_NOT_INITIALIZED",
        4 => "CUDA_ERROR_DEINITIALIZED",
        100 => "CUDA_ERROR_NO_DEVICE",
        101 => "CUDA_ERROR_INVALID_DEVICE",
        200 => "CUDA_ERROR_INVALID_IMAGE",
        201 => "CUDA_ERROR_INVALID_CONTEXT",
        209 => "CUDA_ERROR_NO_BINARY_FOR_GPU",
        218 => "CUDA_ERROR_INVALID_PTX",
        222 => "CUDA_ERROR_UNSUPPORTED_PTX_VERSION",
        400 => "CUDA_ERROR_INVALID_HANDLE",
        500 => "CUDA_ERROR_NOT_FOUND",
        CUDA_ERROR_NOT_READY => "CUDA_ERROR_NOT_READY",
        CUDA_ERROR_ILLEGAL_ADDRESS => "CUDA_ERROR_ILLEGAL_ADDRESS",
        701 => "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES",
        CUDA_ERROR_LAUNCH_TIMEOUT => "CUDA_ERROR_LAUNCH_TIMEOUT",
        712 => "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED",
        713 => "CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED",
        CUDA_ERROR_HARDWARE_STACK_ERROR => "CUDA_ERROR_HARDWARE_STACK_ERROR",
        CUDA_ERROR_ILLEGAL_INSTRUCTION => "CUDA_ERROR_ILLEGAL_INSTRUCTION",
        CUDA_ERROR_MISALIGNED_ADDRESS => "CUDA_ERROR_MISALIGNED_ADDRESS",
        CUDA_ERROR_INVALID_ADDRESS_SPACE => "CUDA_ERROR_INVALID_ADDRESS_SPACE",
        CUDA_ERROR_INVALID_PC => "CUDA_ERROR_INVALID_PC",
        CUDA_ERROR_LAUNCH_FAILED => "CUDA_ERROR_LAUNCH_FAILED",
        800 => "CUDA_ERROR_NOT_PERMITTED",
        801 => "CUDA_ERROR_NOT_SUPPORTED",
        802 => "CUDA_ERROR_SYSTEM_NOT_READY",
        803 => "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH",
        999 => "CUDA_ERROR_UNKNOWN",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_named_as_cuda_h_does() {
        assert_eq!(result_name(700), Some("CUDA_ERROR_ILLEGAL_ADDRESS"));
        assert_eq!(result_name(719), Some("CUDA_ERROR_LAUNCH_FAILED"));
        assert_eq!(result_name(600), Some("CUDA_ERROR_NOT_READY"));
        assert_eq!(result_name(100), Some("CUDA_ERROR_NO_DEVICE"));
        assert_eq!(result_name(12345), None);
    }

    #[test]
    fn faults_are_sticky_and_not_ready_is_neither() {
        for code in [700, 716, 717, 719] {
            assert!(is_memory_fault(code) && is_sticky(code), "{code}");
        }
        for code in [714, 715, 718, 702, 214, 710] {
            assert!(is_sticky(code) && !is_memory_fault(code), "{code}");
        }
        for code in [0, 1, 2, 600, 801] {
            assert!(!is_sticky(code) && !is_memory_fault(code), "{code}");
        }
    }

    #[test]
    fn a_call_error_reads_call_name_code_and_text() {
        let e = CudaError::Call {
            call: "cuStreamQuery",
            code: 700,
            name: "CUDA_ERROR_ILLEGAL_ADDRESS".into(),
            text: "an illegal memory access was encountered".into(),
        };
        assert_eq!(
            e.to_string(),
            "cuStreamQuery: CUDA_ERROR_ILLEGAL_ADDRESS (700): an illegal memory access was \
             encountered"
        );
        assert_eq!(e.code(), Some(700));
    }
}
