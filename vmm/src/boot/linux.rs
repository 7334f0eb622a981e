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
    #[error("the thread loading the kernel panicked")]
    LoaderThread,
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

impl LoadedImages {
    /// Guest address and size of the initramfs, if one was loaded.
    pub fn initrd(&self) -> Option<(u64, u64)> {
        self.initrd
    }
}

/// A kernel `load_kernel` put in guest RAM.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    entry: u64,
    setup_header: Option<setup_header>,
    /// Guest address where its last segment ends in memory (.bss included).
    end: u64,
}

/// Puts the kernel and the initramfs in guest RAM (`low_end`: where low RAM ends, below the
/// MMIO hole), side by side: the kernel on a thread of its own through the memfd
/// (`load_kernel`), the initramfs on this one through the mapping (`load_initrd`). Needs nothing
/// of the VM; a fresh boot splits the same two steps around making the VM
/// (`Machine::build_and_boot`).
pub fn load_images(
    mem: &GuestMemory,
    low_end: u64,
    boot: &LinuxBoot,
) -> Result<LoadedImages, LinuxBootError> {
    std::thread::scope(|scope| {
        let kernel = scope.spawn(|| load_kernel(mem, boot));
        load_initrd_beside(mem, low_end, boot, || {
            kernel.join().map_err(|_| LinuxBootError::LoaderThread)?
        })
    })
}

/// The second half of `load_images`, for a caller that started `load_kernel` itself: loads the
/// initramfs on this thread, then takes the kernel's result from `kernel` (its thread's join)
/// and puts the two together.
pub fn load_initrd_beside(
    mem: &GuestMemory,
    low_end: u64,
    boot: &LinuxBoot,
    kernel: impl FnOnce() -> Result<LoadedKernel, LinuxBootError>,
) -> Result<LoadedImages, LinuxBootError> {
    let initrd = boot
        .initrd
        .as_deref()
        .map(|path| load_initrd(mem, low_end, path))
        .transpose();
    combine(kernel()?, initrd?, boot, low_end)
}

/// Puts the kernel in guest RAM through RAM's memfd (`ImageReader`).
///
/// Kernel and initramfs go in side by side through different paths on purpose: `pwrite`s hold
/// the memfd's inode lock, the mapping's page faults do not, so the two copies use both CPUs.
/// Linux guest set-up, PVM host, 15 runs each interleaved, medians: 9.1 ms this way, 10.7 ms
/// one image after the other, 11.2 ms with both through `pwrite` on two threads.
pub fn load_kernel(mem: &GuestMemory, boot: &LinuxBoot) -> Result<LoadedKernel, LinuxBootError> {
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
    let (entry, r) = match format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut file, himem).map_err(load_err)?;
            (r.kernel_load.raw_value(), r)
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut file, himem).map_err(load_err)?;
            // 64-bit entry of the protected-mode part: startup_64 sits 0x200 in.
            (r.kernel_load.raw_value() + 0x200, r)
        }
    };
    Ok(LoadedKernel {
        entry,
        setup_header: r.setup_header,
        // linux-loader's `kernel_end` is already a guest address.
        end: r.kernel_end,
    })
}

/// Kernel and initramfs together, once both are in RAM: the initramfs was placed without
/// knowing where the kernel ends, so an initramfs that reaches down into the kernel is refused
/// here (bytes written over each other only ever reach a guest that is never started).
fn combine(
    kernel: LoadedKernel,
    initrd: Option<(u64, u64)>,
    boot: &LinuxBoot,
    low_end: u64,
) -> Result<LoadedImages, LinuxBootError> {
    if let (Some(path), Some((addr, size))) = (&boot.initrd, initrd) {
        if addr < kernel.end {
            return Err(LinuxBootError::InitrdTooBig {
                path: path.clone(),
                size,
                limit: low_end.min(INITRD_END_MAX),
            });
        }
    }
    Ok(LoadedImages {
        entry: kernel.entry,
        setup_header: kernel.setup_header,
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

/// Where the initramfs must end at the latest: modern kernels' initrd_addr_max (0x7fffffff,
/// its last byte) plus one.
const INITRD_END_MAX: u64 = 0x8000_0000;

/// Places the initramfs as high as possible in low RAM (where the kernel looks first), page
/// aligned, through RAM's mapping (see `load_kernel`); `combine` checks that it stays above the
/// kernel. Returns its guest address and size.
fn load_initrd(mem: &GuestMemory, low_end: u64, path: &Path) -> Result<(u64, u64), LinuxBootError> {
    let mut f = crate::host_file::open_regular(path, "initramfs")?;
    let size = f
        .seek(SeekFrom::End(0))
        .and_then(|s| f.seek(SeekFrom::Start(0)).map(|_| s))
        .map_err(|source| LinuxBootError::SizeInitrd {
            path: path.to_owned(),
            source,
        })?;
    // Below initrd_addr_max and below the hole.
    let limit = low_end.min(INITRD_END_MAX);
    let addr = limit
        .checked_sub(size)
        .ok_or_else(|| LinuxBootError::InitrdTooBig {
            path: path.to_owned(),
            size,
            limit,
        })?
        & !0xfff;
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

    /// A minimal ELF64 vmlinux: one PT_LOAD segment of `payload` at 16 MiB (its entry), whose
    /// memory size is a page more than its file size (a .bss).
    fn tiny_vmlinux(payload: &[u8]) -> tempfile::NamedTempFile {
        const LOAD: u64 = 0x100_0000;
        let mut elf = vec![0u8; 0x1000];
        elf[..8].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
        let put16 =
            |e: &mut Vec<u8>, at: usize, v: u16| e[at..at + 2].copy_from_slice(&v.to_le_bytes());
        let put32 =
            |e: &mut Vec<u8>, at: usize, v: u32| e[at..at + 4].copy_from_slice(&v.to_le_bytes());
        let put64 =
            |e: &mut Vec<u8>, at: usize, v: u64| e[at..at + 8].copy_from_slice(&v.to_le_bytes());
        put16(&mut elf, 16, 2); // ET_EXEC
        put16(&mut elf, 18, 62); // EM_X86_64
        put32(&mut elf, 20, 1);
        put64(&mut elf, 24, LOAD); // e_entry
        put64(&mut elf, 32, 64); // e_phoff
        put16(&mut elf, 52, 64); // e_ehsize
        put16(&mut elf, 54, 56); // e_phentsize
        put16(&mut elf, 56, 1); // e_phnum
        let ph = 64;
        put32(&mut elf, ph, 1); // PT_LOAD
        put32(&mut elf, ph + 4, 5);
        put64(&mut elf, ph + 8, 0x1000); // p_offset
        put64(&mut elf, ph + 16, LOAD); // p_vaddr
        put64(&mut elf, ph + 24, LOAD); // p_paddr
        put64(&mut elf, ph + 32, payload.len() as u64); // p_filesz
        put64(&mut elf, ph + 40, payload.len() as u64 + 0x1000); // p_memsz
        put64(&mut elf, ph + 48, 0x1000);
        elf.extend_from_slice(payload);
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&elf).unwrap();
        f
    }

    fn file_of(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    /// Kernel and initramfs, loaded side by side, are each where the zero page will say, byte
    /// for byte; the initramfs ends at the top of low RAM.
    #[test]
    fn kernel_and_initramfs_land_where_the_zero_page_says() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let kernel: Vec<u8> = (0..3 * 4096 + 17).map(|i| (i % 241) as u8).collect();
        let initrd: Vec<u8> = (0..5 * 4096 + 3).map(|i| (i % 239) as u8).collect();
        let (k, i) = (tiny_vmlinux(&kernel), file_of(&initrd));
        let boot = LinuxBoot {
            kernel: k.path().to_owned(),
            initrd: Some(i.path().to_owned()),
            cmdline: String::new(),
        };
        let images = load_images(ram.memory(), ram.low_end(), &boot).unwrap();
        assert_eq!(images.entry, 0x100_0000);
        let (addr, size) = images.initrd.unwrap();
        assert_eq!(size, initrd.len() as u64);
        assert!(addr + size <= ram.low_end() && ram.low_end() - (addr + size) < 4096);
        let mut back = vec![0u8; kernel.len()];
        ram.memory()
            .read_slice(&mut back, GuestAddress(0x100_0000))
            .unwrap();
        assert_eq!(back, kernel);
        let mut back = vec![0u8; initrd.len()];
        ram.memory()
            .read_slice(&mut back, GuestAddress(addr))
            .unwrap();
        assert_eq!(back, initrd);
    }

    /// An initramfs that fits below the top of low RAM but reaches down into the kernel (its
    /// memory size, .bss included) is refused, as is one larger than low RAM.
    #[test]
    fn an_initramfs_over_the_kernel_is_refused() {
        let ram = GuestRam::new(32 << 20).unwrap();
        let kernel = vec![0x90u8; 4 << 20];
        let k = tiny_vmlinux(&kernel);
        // Kernel: 16 MiB to 20 MiB + a page; RAM ends at 32 MiB. 12 MiB - a page fits...
        let fits = file_of(&vec![1u8; (12 << 20) - 0x1000]);
        // ...one more page reaches the .bss.
        let over = file_of(&vec![1u8; (12 << 20) - 0x1000 + 1]);
        let huge = file_of(&vec![1u8; 33 << 20]);
        let boot = |i: &tempfile::NamedTempFile| LinuxBoot {
            kernel: k.path().to_owned(),
            initrd: Some(i.path().to_owned()),
            cmdline: String::new(),
        };
        load_images(ram.memory(), ram.low_end(), &boot(&fits)).unwrap();
        for bad in [&over, &huge] {
            let e = load_images(ram.memory(), ram.low_end(), &boot(bad));
            assert!(
                matches!(e, Err(LinuxBootError::InitrdTooBig { .. })),
                "{e:?}"
            );
        }
    }

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
