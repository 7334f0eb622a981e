//! The boot-timer write: `guest_abi::boot_timer::MAGIC` stored to guest-physical
//! `boot_timer::GPA` through /dev/mem, so the VMM can log the time from its start to user space.
//! Needs CONFIG_DEVMEM in the guest kernel.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;

use guest_abi::boot_timer;

use crate::vfio::mapping::Mapping;

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
    let map = Mapping::new(&file, boot_timer::GPA, 1)?;
    map.write_u8(0, boot_timer::MAGIC);
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
