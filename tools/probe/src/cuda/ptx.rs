//! The GPU kernel that makes the device writes, as PTX text: the driver JIT-compiles it for
//! whatever GPU is there (cuModuleLoadData), so no CUDA toolkit is needed to build the probe.
//! ISA 7.0 / sm_52 keeps it loadable by any driver from CUDA 11.0 on and any GPU from Maxwell.
//!
//! Checked by hand, by the structural tests below, against what LLVM's NVPTX backend emits for
//! the same code (llc -mcpu=sm_52 -mattr=+ptx70: the same instruction forms), and by a parser
//! generated from the PTX ISA (the ptx-90-parser crate, outside this repository: every one of
//! the 14 instructions recognised). Never JIT-compiled here (no GPU machine was lent to this
//! task): its first GPU run is its real test.

use std::ffi::CStr;

use crate::cuda::error::CudaError;

/// Threads in the one block launched: thread i owns page i of the range.
pub const THREADS: usize = 64;

pub const ENTRY: &CStr = c"vmm_probe_store";

/// `vmm_probe_store(base, mask, value)`: thread i stores the 8-byte `value` at
/// `base + i * 4096` when bit i of `mask` is set. The store is generic (not `st.global`):
/// `base` may be a host address reached through UVA, a pinned mapping or HMM. `membar.sys`
/// orders the store before the kernel's completion is visible to the CPU.
pub const PTX: &CStr = c"
.version 7.0
.target sm_52
.address_size 64

.visible .entry vmm_probe_store(
	.param .u64 vmm_probe_store_base,
	.param .u64 vmm_probe_store_mask,
	.param .u64 vmm_probe_store_value
)
{
	.reg .pred %p<2>;
	.reg .b32 %r<2>;
	.reg .b64 %rd<9>;

	ld.param.u64 %rd1, [vmm_probe_store_base];
	ld.param.u64 %rd2, [vmm_probe_store_mask];
	ld.param.u64 %rd3, [vmm_probe_store_value];
	mov.u32 %r1, %tid.x;
	// bit i of the mask, i = %tid.x (< 64: one block of THREADS)
	shr.u64 %rd4, %rd2, %r1;
	and.b64 %rd5, %rd4, 1;
	setp.eq.s64 %p1, %rd5, 0;
	@%p1 bra SKIP;
	// base + i * 4096
	cvt.u64.u32 %rd6, %r1;
	shl.b64 %rd7, %rd6, 12;
	add.s64 %rd8, %rd1, %rd7;
	st.volatile.u64 [%rd8], %rd3;
	membar.sys;
SKIP:
	ret;
}
";

/// The kernel's `mask` for `pages`: bit i set for page i.
pub fn page_mask(pages: &[usize]) -> Result<u64, CudaError> {
    pages.iter().try_fold(0u64, |mask, &page| {
        if page >= THREADS {
            return Err(CudaError::PageOutOfReach {
                page,
                threads: THREADS,
            });
        }
        Ok(mask | 1 << page)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text() -> &'static str {
        PTX.to_str().unwrap()
    }

    #[test]
    fn header_names_isa_target_and_address_size() {
        let lines: Vec<&str> = text().lines().map(str::trim).collect();
        assert!(lines.contains(&".version 7.0"));
        assert!(lines.contains(&".target sm_52"));
        assert!(lines.contains(&".address_size 64"));
    }

    #[test]
    fn the_entry_has_three_u64_params_in_order() {
        let t = text();
        let entry = format!(".visible .entry {}(", ENTRY.to_str().unwrap());
        let start = t.find(&entry).unwrap() + entry.len();
        let params: Vec<&str> = t[start..start + t[start..].find(')').unwrap()]
            .split(',')
            .map(str::trim)
            .collect();
        assert_eq!(
            params,
            [
                ".param .u64 vmm_probe_store_base",
                ".param .u64 vmm_probe_store_mask",
                ".param .u64 vmm_probe_store_value"
            ]
        );
        for p in ["base", "mask", "value"] {
            assert!(
                t.contains(&format!("[vmm_probe_store_{p}]")),
                "{p} is never loaded"
            );
        }
    }

    #[test]
    fn braces_and_parentheses_balance() {
        let count = |c| text().chars().filter(|&x| x == c).count();
        assert_eq!(count('{'), count('}'));
        assert_eq!(count('('), count(')'));
        assert_eq!(count('['), count(']'));
    }

    /// Every %p/%r/%rd register used is below its `.reg` declaration's count.
    #[test]
    fn registers_used_are_declared() {
        let t = text();
        for (prefix, declared) in [("%rd", 9), ("%r", 2), ("%p", 2)] {
            assert!(t.contains(&format!("{prefix}<{declared}>;")), "{prefix}");
            let mut rest = t;
            while let Some(i) = rest.find(prefix) {
                rest = &rest[i + prefix.len()..];
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                // "%r" also matches the start of "%rd"; "<" is the declaration itself.
                if digits.is_empty() {
                    continue;
                }
                let n: usize = digits.parse().unwrap();
                assert!(n < declared, "{prefix}{n} used, {declared} declared");
            }
        }
    }

    #[test]
    fn every_instruction_ends_with_a_semicolon_and_the_branch_target_exists() {
        for line in text().lines().map(str::trim) {
            let code = line.split("//").next().unwrap().trim();
            if code.is_empty() || code.starts_with('.') && !code.starts_with(".reg") {
                continue;
            }
            if matches!(code, "{" | "}" | ")") || code.ends_with(':') {
                continue;
            }
            assert!(code.ends_with(';'), "no semicolon: {code:?}");
        }
        assert!(text().contains("bra SKIP;") && text().contains("\nSKIP:"));
        assert!(text().contains("membar.sys;"));
    }

    #[test]
    fn pages_become_mask_bits_and_page_64_is_refused() {
        assert_eq!(page_mask(&[1, 5]).unwrap(), 0b10_0010);
        assert_eq!(page_mask(&[]).unwrap(), 0);
        assert_eq!(page_mask(&[63]).unwrap(), 1 << 63);
        assert_eq!(
            page_mask(&[1, 64]),
            Err(CudaError::PageOutOfReach {
                page: 64,
                threads: 64
            })
        );
    }
}
