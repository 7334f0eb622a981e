//! Loading a Linux kernel (uncompressed ELF vmlinux or bzImage) with linux-loader, and the
//! 64-bit boot protocol's zero page: setup header, command line, initramfs, e820 map.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use guest_abi::layout;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress};

use super::image_reader::ImageReader;
use super::EntryPoint;
use crate::memory::{GuestMemory, GuestRam};

/// x86's COMMAND_LINE_SIZE (arch/x86/include/asm/setup.h), NUL included.
pub const X86_COMMAND_LINE_SIZE: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum LinuxBootError {
    /// Missing, unreadable, or not a regular file (a FIFO is refused, never waited on).
    #[error(transparent)]
    File(#[from] crate::host_file::HostFileError),
    #[error("cannot read kernel image {path}: {source}")]
    ReadKernel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not a kernel image: neither an ELF vmlinux nor a bzImage (no ELF magic, no 'HdrS' setup header)")]
    NotAKernel(PathBuf),
    #[error("loading kernel {path} failed: {source}")]
    Load {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    #[error(
        "the kernel command line is {len} bytes, but this kernel takes at most {limit} (the \
         rest would be dropped without a word: shorten the --agent script or the cmdline)"
    )]
    CmdlineTooLong { len: usize, limit: usize },
    #[error("cannot size initramfs {path}: {source}")]
    SizeInitrd {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initramfs {path} ({size} bytes) does not fit in guest memory below 0x{limit:x} above the kernel")]
    InitrdTooBig {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("reading initramfs {path} into guest memory failed: {source}")]
    ReadInitrd {
        path: PathBuf,
        source: vm_memory::GuestMemoryError,
    },
    #[error("kernel command line rejected: {0}")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("kernel command line rejected: {0}")]
    LoadCmdline(#[source] linux_loader::loader::Error),
    #[error("writing boot structures into guest memory failed: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// Which format a kernel file is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

/// Looks at the file's magic numbers, so a wrong file gets a precise error before any loading.
pub fn detect_format(path: &Path) -> Result<KernelFormat, LinuxBootError> {
    let mut f = crate::host_file::open_regular(path, "kernel image")?;
    let mut head = vec![0u8; 0x210];
    let mut got = 0;
    while got < head.len() {
        let n = f
            .read(&mut head[got..])
            .map_err(|source| LinuxBootError::ReadKernel {
                path: path.to_owned(),
                source,
            })?;
        if n == 0 {
            break;
        }
        got += n;
    }
    head.truncate(got);
    if head.len() >= 4 && &head[..4] == b"\x7fELF" {
        return Ok(KernelFormat::Elf);
    }
    if head.len() >= 0x206 && &head[0x202..0x206] == b"HdrS" {
        return Ok(KernelFormat::BzImage);
    }
    Err(LinuxBootError::NotAKernel(path.to_owned()))
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct LinuxBoot {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
}

/// The kernel command line every guest needs on PVM hosts (PLATFORM.md §2-§3): a serial console,
/// reset through the keyboard controller, and CPU features the emulator cannot run hidden.
/// `clocksource=kvm-clock`: kvmclock is what a migratable guest should keep, and it avoids the
/// later switch to the TSC, whose stop_machine rendezvous took 750 s with 2 vCPUs on a loaded
/// PVM host (both vCPUs spinning in emulated ring 0). `rcu_cpu_stall_suppress`: emulated ring 0
/// legitimately holds a CPU for longer than RCU's 21 s (unpacking the initramfs), and each stall
/// report is a backtrace printed through the emulated UART, slowing the boot further.
/// `no-kvmapf`: with KVM's async page faults on, every guest fault the host cannot resolve at
/// once (a userfaultfd write-protect fault of uffd-wp tracking, a postcopy or lazy-restore page
/// still missing) becomes guest-kernel work: a "page not present" event, a reschedule and a
/// "page ready" interrupt, which PVM runs in its emulator. Measured with uffd-wp tracking two
/// 4 MiB passes (agent workload, 1,024 pages): 33,657 ms and 10,215 pages reported with async
/// PF on, 266.6 ms and 1,213 pages with it off, in the same boot configuration (README,
/// "The uffd-wp cliff").
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 noxsave \
clearcpuid=151,288,308,158,306 tsc=reliable clocksource=kvm-clock \
rcupdate.rcu_cpu_stall_suppress=1 no-kvmapf";

const BOOT_FLAG: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448;
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const KERNEL_ALIGNMENT: u32 = 0x0100_0000;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const CAN_USE_HEAP: u8 = 0x80;

/// Loads kernel, initramfs and command line; writes the zero page. Returns the entry point.
pub fn load(ram: &GuestRam, boot: &LinuxBoot) -> Result<EntryPoint, LinuxBootError> {
    let images = load_images(ram.memory(), ram.low_end(), boot)?;
    write_boot_params(ram, boot, &images)
}

/// What `load_images` put in guest RAM, for the zero page.
#[derive(Debug, Clone, Copy)]
pub struct LoadedImages {
    entry: u64,
    setup_header: Option<setup_header>,
    /// Guest address and size of the initramfs.
    initrd: Option<(u64, u64)>,
}

/// Puts the kernel and the initramfs in guest RAM (`low_end`: where low RAM ends, below the
/// MMIO hole). Needs nothing of the VM: a fresh boot runs it while the VM is being made.
pub fn load_images(
    mem: &GuestMemory,
    low_end: u64,
    boot: &LinuxBoot,
) -> Result<LoadedImages, LinuxBootError> {
    let format = detect_format(&boot.kernel)?;
    let file = crate::host_file::open_regular(&boot.kernel, "kernel image")?;
    let mut file = ImageReader::new(file, mem).map_err(|source| LinuxBootError::ReadKernel {
        path: boot.kernel.clone(),
        source,
    })?;
    let load_err = |source: linux_loader::loader::Error| LinuxBootError::Load {
        path: boot.kernel.clone(),
        source,
    };
    let himem = Some(GuestAddress(layout::HIMEM_START));
    let (result, entry) = match format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut file, himem).map_err(load_err)?;
            let entry = r.kernel_load.raw_value();
            (r, entry)
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut file, himem).map_err(load_err)?;
            // 64-bit entry of the protected-mode part: startup_64 sits 0x200 in.
            let entry = r.kernel_load.raw_value() + 0x200;
            (r, entry)
        }
    };
    let initrd = match &boot.initrd {
        Some(initrd) => {
            let kernel_end = result.kernel_load.raw_value() + result.kernel_end;
            Some(load_initrd(mem, low_end, initrd, kernel_end)?)
        }
        None => None,
    };
    Ok(LoadedImages {
        entry,
        setup_header: result.setup_header,
        initrd,
    })
}

/// The command line and the zero page for images `load_images` loaded; the entry point.
pub fn write_boot_params(
    ram: &GuestRam,
    boot: &LinuxBoot,
    images: &LoadedImages,
) -> Result<EntryPoint, LinuxBootError> {
    let mem = ram.memory();
    // The kernel copies at most this many bytes (its COMMAND_LINE_SIZE less the NUL): the
    // bzImage header says so; an ELF vmlinux has no header, and x86's size is 2048.
    let limit = images
        .setup_header
        .map(|h| h.cmdline_size as usize)
        .filter(|&n| n > 0)
        .unwrap_or(X86_COMMAND_LINE_SIZE - 1);
    if boot.cmdline.len() > limit {
        return Err(LinuxBootError::CmdlineTooLong {
            len: boot.cmdline.len(),
            limit,
        });
    }
    let mut cmdline = Cmdline::new(layout::CMDLINE_MAX).map_err(LinuxBootError::Cmdline)?;
    cmdline
        .insert_str(&boot.cmdline)
        .map_err(LinuxBootError::Cmdline)?;
    load_cmdline(mem, GuestAddress(layout::CMDLINE_GPA), &cmdline)
        .map_err(LinuxBootError::LoadCmdline)?;

    let mut params = boot_params::default();
    if let Some(hdr) = images.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG;
    params.hdr.header = HDRS_MAGIC;
    params.hdr.cmd_line_ptr = layout::CMDLINE_GPA as u32;
    params.hdr.cmdline_size = boot.cmdline.len() as u32 + 1;
    params.hdr.loadflags |= CAN_USE_HEAP;
    params.hdr.heap_end_ptr = 0xfe00;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_ALIGNMENT;
    }

    if let Some((addr, size)) = images.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let mut e820 = vec![
        (0, layout::MPTABLE_GPA, E820_RAM),
        (
            layout::MPTABLE_GPA,
            layout::EBDA_END - layout::MPTABLE_GPA,
            E820_RESERVED,
        ),
    ];
    for r in ram.ranges() {
        let start = r.gpa.max(layout::HIMEM_START);
        if r.end() > start {
            e820.push((start, r.end() - start, E820_RAM));
        }
    }
    for (i, (addr, size, type_)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *type_,
        };
    }
    params.e820_entries = e820.len() as u8;
    mem.write_obj(params, GuestAddress(layout::ZERO_PAGE_GPA))?;

    Ok(EntryPoint {
        rip: images.entry,
        rsp: layout::BOOT_STACK_GPA,
        rsi: layout::ZERO_PAGE_GPA,
    })
}

/// Places the initramfs as high as possible in low RAM (where the kernel looks first), page
/// aligned, above the kernel.
fn load_initrd(
    mem: &GuestMemory,
    low_end: u64,
    path: &Path,
    kernel_end: u64,
) -> Result<(u64, u64), LinuxBootError> {
    let f = crate::host_file::open_regular(path, "initramfs")?;
    let size_err = |source| LinuxBootError::SizeInitrd {
        path: path.to_owned(),
        source,
    };
    let mut f = ImageReader::new(f, mem).map_err(size_err)?;
    let size = f
        .seek(SeekFrom::End(0))
        .and_then(|s| f.seek(SeekFrom::Start(0)).map(|_| s))
        .map_err(size_err)?;
    // initrd_addr_max of modern kernels is 0x7fffffff; stay below it and below the hole.
    let limit = low_end.min(0x8000_0000);
    let too_big = || LinuxBootError::InitrdTooBig {
        path: path.to_owned(),
        size,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_big)? & !0xfff;
    if addr < kernel_end {
        return Err(too_big());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|source| LinuxBootError::ReadInitrd {
            path: path.to_owned(),
            source,
        })?;
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn formats_are_told_apart() {
        let dir = std::env::temp_dir().join(format!("vmm-fmt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let elf = dir.join("elf");
        std::fs::File::create(&elf)
            .unwrap()
            .write_all(b"\x7fELF\x02\x01")
            .unwrap();
        assert_eq!(detect_format(&elf).unwrap(), KernelFormat::Elf);
        let bz = dir.join("bz");
        let mut img = vec![0u8; 0x300];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        std::fs::write(&bz, &img).unwrap();
        assert_eq!(detect_format(&bz).unwrap(), KernelFormat::BzImage);
        let junk = dir.join("junk");
        std::fs::write(&junk, b"hello world").unwrap();
        assert!(matches!(
            detect_format(&junk),
            Err(LinuxBootError::NotAKernel(_))
        ));
        assert!(matches!(
            detect_format(&dir.join("missing")),
            Err(LinuxBootError::File(_))
        ));
        // A FIFO is refused at once, never waited on for a writer.
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo touches nothing else.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = detect_format(&fifo).unwrap_err().to_string();
        assert!(e.contains("FIFO"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
