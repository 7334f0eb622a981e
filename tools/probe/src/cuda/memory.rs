//! The memory kinds made on the GPU, each run through external.rs and freed again (see the
//! module docs for the list and order). A kind that cannot be made is a `KindStatus` with the
//! driver's reason; once the context is unusable, later kinds say so instead of being tried.
//!
//! Never run on a GPU here (no GPU machine was lent to this task): its first GPU run is its
//! real test.

use crate::cuda::driver::{self, CuDevice, CuDevicePtr, Driver};
use crate::cuda::error::CudaError;
use crate::cuda::resources::{Allocation, Health, Registration};
use crate::cuda::writer::{KernelWriter, Translation};
use crate::cuda::{DEVICE_ONLY, HMM, LEN, MANAGED, PINNED, REGISTERED};
use crate::external::{self, External};
use crate::kinds::{Mapping, SMALL};
use crate::predict::Row;
use crate::report::{Cell, KindStatus};

/// Every kind, in order, with `writer` as the device writer; the kinds tried and the cells.
pub fn probe_all<'a>(
    drv: &'a Driver,
    health: &'a Health,
    dev: CuDevice,
    writer: KernelWriter<'a>,
) -> (Vec<KindStatus>, Vec<Cell>) {
    let mut s = Session {
        drv,
        health,
        dev,
        writer,
        kinds: Vec::new(),
        cells: Vec::new(),
    };
    s.managed();
    s.pinned();
    s.registered();
    s.device_only();
    // Last: TRACKING.md predicts fatal GPU faults here, which lose the context.
    s.hmm();
    (s.kinds, s.cells)
}

struct Session<'a> {
    drv: &'a Driver,
    health: &'a Health,
    dev: CuDevice,
    writer: KernelWriter<'a>,
    kinds: Vec<KindStatus>,
    cells: Vec<Cell>,
}

impl Session<'_> {
    fn unavailable(&mut self, memory: &str, note: String) {
        self.kinds.push(KindStatus {
            memory: memory.into(),
            available: false,
            note,
        });
    }

    /// True (and the kind recorded as not tried) once the context cannot be used.
    fn skip(&mut self, memory: &str) -> bool {
        match self.health.unusable() {
            Some(why) => {
                self.unavailable(memory, format!("not tried: {why}"));
                true
            }
            None => false,
        }
    }

    fn attribute(&self, attr: std::ffi::c_int) -> String {
        match self.drv.attribute(self.dev, attr) {
            Ok(0) => "no".into(),
            Ok(1) => "yes".into(),
            Ok(v) => v.to_string(),
            Err(e) => format!("unknown ({e})"),
        }
    }

    /// Records the kind and runs external.rs over `addr..addr+LEN`; with `device`, the kernel
    /// writes there at that device address. Every kind the kernel writes is CPU-mapped here;
    /// device-only memory (no `device` writer) is not.
    fn run(&mut self, memory: &str, row: Row, note: String, addr: usize, device: Option<u64>) {
        self.kinds.push(KindStatus {
            memory: memory.into(),
            available: true,
            note,
        });
        let cpu = device.is_some();
        let mut ext = External {
            memory: memory.into(),
            row,
            addr,
            len: LEN,
            cpu_access: cpu,
            cpu_writes: cpu,
            device: None,
        };
        if let Some(device) = device {
            self.writer.map(Translation {
                host: addr,
                len: LEN,
                device,
            });
            ext.device = Some(&mut self.writer);
        }
        self.cells.extend(external::probe(&mut ext));
        self.writer.unmap(addr);
        self.writer.settle();
    }

    fn managed(&mut self) {
        if self.skip(MANAGED) {
            return;
        }
        let mem = match Allocation::managed(self.drv, self.health, LEN) {
            Ok(m) => m,
            Err(e) => return self.unavailable(MANAGED, e.to_string()),
        };
        if let Err(e) = aligned("cuMemAllocManaged's memory", mem.device) {
            return self.unavailable(MANAGED, e.to_string());
        }
        let note = format!(
            "{} KiB at {:#x}, cuMemAllocManaged(CU_MEM_ATTACH_GLOBAL): one address for CPU and \
             GPU; concurrent managed access: {}",
            LEN >> 10,
            mem.host,
            self.attribute(driver::CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS)
        );
        self.run(MANAGED, Row::UvmManaged, note, mem.host, Some(mem.device));
    }

    fn pinned(&mut self) {
        if self.skip(PINNED) {
            return;
        }
        let mem = match Allocation::pinned(self.drv, self.health, LEN) {
            Ok(m) => m,
            Err(e) => return self.unavailable(PINNED, e.to_string()),
        };
        if let Err(e) = aligned("cuMemHostAlloc's memory", mem.host as u64) {
            return self.unavailable(PINNED, e.to_string());
        }
        let note = format!(
            "{} KiB at {:#x}, cuMemHostAlloc(DEVICEMAP), mapped into the process by nvidia.ko; \
             the kernel writes at device address {} (can map host memory: {})",
            LEN >> 10,
            mem.host,
            device_address(mem.device, mem.host),
            self.attribute(driver::CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY)
        );
        self.run(PINNED, Row::NvidiaMmap, note, mem.host, Some(mem.device));
    }

    fn registered(&mut self) {
        if self.skip(REGISTERED) {
            return;
        }
        let map = match Mapping::new(LEN, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, None) {
            Ok(m) => m,
            Err(e) => return self.unavailable(REGISTERED, format!("mmap anonymous: {e}")),
        };
        let reg = match Registration::new(self.drv, self.health, map) {
            Ok(r) => r,
            Err(e) => return self.unavailable(REGISTERED, e.to_string()),
        };
        let note = format!(
            "{} KiB private anonymous mmap at {:#x}, cuMemHostRegister(DEVICEMAP): pinned; the \
             kernel writes at device address {} (unified addressing: {})",
            reg.len() >> 10,
            reg.host(),
            device_address(reg.device, reg.host()),
            self.attribute(driver::CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING)
        );
        self.run(
            REGISTERED,
            Row::PinnedHost,
            note,
            reg.host(),
            Some(reg.device),
        );
    }

    fn device_only(&mut self) {
        if self.skip(DEVICE_ONLY) {
            return;
        }
        let mem = match Allocation::device(self.drv, self.health, LEN) {
            Ok(m) => m,
            Err(e) => return self.unavailable(DEVICE_ONLY, e.to_string()),
        };
        let note = format!(
            "{} KiB of GPU memory at device address {:#x} (cuMemAlloc): no CPU mapping, so no \
             CPU-side mechanism has anything to act on; the GPU's own writes to it change no CPU \
             page table and cross no IOMMU (TRACKING.md), so none is made",
            LEN >> 10,
            mem.device
        );
        self.run(DEVICE_ONLY, Row::None, note, mem.device as usize, None);
    }

    fn hmm(&mut self) {
        if self.skip(HMM) {
            return;
        }
        match self
            .drv
            .attribute(self.dev, driver::CU_DEVICE_ATTRIBUTE_PAGEABLE_MEMORY_ACCESS)
        {
            Ok(1) => {}
            Ok(v) => {
                return self.unavailable(
                    HMM,
                    format!(
                        "CU_DEVICE_ATTRIBUTE_PAGEABLE_MEMORY_ACCESS is {v}: the GPU cannot reach \
                         plain anonymous memory here (UVM's HMM mode needs CONFIG_HMM_MIRROR and \
                         CONFIG_DEVICE_PRIVATE, and a driver that enables it)"
                    ),
                )
            }
            Err(e) => return self.unavailable(HMM, e.to_string()),
        }
        let map = match Mapping::new(LEN, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, None) {
            Ok(m) => m,
            Err(e) => return self.unavailable(HMM, format!("mmap anonymous: {e}")),
        };
        let ats = self
            .attribute(driver::CU_DEVICE_ATTRIBUTE_PAGEABLE_MEMORY_ACCESS_USES_HOST_PAGE_TABLES);
        let note = format!(
            "{} KiB private anonymous mmap at {:#x}, never given to CUDA: the kernel stores to \
             its host address (pageable memory access: yes; through the CPU's page tables, i.e. \
             ATS rather than HMM: {ats})",
            map.len >> 10,
            map.ptr as usize
        );
        let host = map.ptr as usize;
        self.run(HMM, Row::HmmMalloc, note, host, Some(host as CuDevicePtr));
        if self.health.stuck().is_some() {
            // The GPU may still write it: unmapped only at process exit.
            std::mem::forget(map);
        }
    }
}

fn aligned(what: &'static str, addr: u64) -> Result<(), CudaError> {
    if addr % SMALL as u64 == 0 {
        Ok(())
    } else {
        Err(CudaError::Unaligned { what, addr })
    }
}

fn device_address(device: CuDevicePtr, host: usize) -> String {
    if device == host as CuDevicePtr {
        format!("{device:#x} (= the host address: UVA)")
    } else {
        format!("{device:#x} (not the host address)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misaligned_memory_is_refused() {
        assert!(aligned("x", 0x7f00_0000_1000).is_ok());
        let e = aligned("cuMemHostAlloc's memory", 0x7f00_0000_1008).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cuMemHostAlloc's memory at 0x7f0000001008 is not 4 KiB aligned"
        );
    }

    #[test]
    fn device_addresses_say_whether_they_are_the_host_address() {
        assert!(device_address(0x1000, 0x1000).contains("UVA"));
        assert!(device_address(0x2000, 0x1000).contains("not the host address"));
    }
}
