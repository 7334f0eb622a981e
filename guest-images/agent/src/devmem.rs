//! The boot-timer write: `guest_abi::boot_timer::MAGIC` stored to guest-physical
//! `boot_timer::GPA` through /dev/mem, so the VMM can log the time from its start to user space.
//! Needs CONFIG_DEVMEM in the guest kernel.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::ptr;

use guest_abi::boot_timer;

pub const DEV_MEM: &str = "/dev/mem";

/// Maps the boot-timer page of `path` (/dev/mem, or a file standing in for it in tests) and
/// stores the magic byte there.
pub fn write_boot_timer(path: &str) -> io::Result<()> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        // Uncached access to device memory.
        .custom_flags(libc::O_SYNC)
        .open(path)?;
    let len = boot_timer::SIZE as usize;
    let offset = libc::off_t::try_from(boot_timer::GPA)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "GPA beyond off_t"))?;
    // SAFETY: a new shared mapping of one page of the file; nothing else refers to it.
    let addr = unsafe {
        libc::mmap(
            ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            offset,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `addr` is a writable mapping of `len` >= 1 bytes; volatile because this is an
    // MMIO register whose write the device must see.
    unsafe { ptr::write_volatile(addr.cast::<u8>(), boot_timer::MAGIC) };
    // SAFETY: unmaps exactly the mapping made above.
    unsafe { libc::munmap(addr, len) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_magic_at_the_gpa_of_a_stand_in_file() {
        let path = std::env::temp_dir().join(format!("vmm-agent-devmem-{}", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("create");
        // Sparse: only the page that is written takes space.
        file.set_len(boot_timer::GPA + boot_timer::SIZE)
            .expect("size");
        let path = path.to_string_lossy().into_owned();
        write_boot_timer(&path).expect("write");
        let mut byte = [0u8; 2];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut byte, boot_timer::GPA).expect("read");
        assert_eq!(byte, [boot_timer::MAGIC, 0]);
        std::fs::remove_file(&path).expect("cleanup");
    }

    #[test]
    fn reports_a_missing_device() {
        assert!(write_boot_timer("/nonexistent/mem").is_err());
    }
}
