//! vmm loads the real guest kernel (ELF vmlinux and bzImage) and initramfs through the RAM's
//! memfd, on two threads (`boot::linux::load_images`); this checks the result byte for byte
//! against linux-loader reading the same files into the mapping, the way it does on its own.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};
use vmm::boot::linux::{load_images, LinuxBoot};
use vmm::memory::GuestRam;

const MEM: u64 = 128 << 20;
/// Where vmm asks linux-loader to keep the kernel above (guest-abi's HIMEM_START).
const HIMEM: u64 = guest_abi::layout::HIMEM_START;

fn whole_ram(ram: &GuestRam) -> Vec<u8> {
    let mut bytes = Vec::new();
    let mut f = ram.file().try_clone().unwrap();
    f.read_to_end(&mut bytes).unwrap();
    bytes
}

/// linux-loader alone, from a plain `File`, and the initramfs read where vmm put it.
fn reference(kernel: &Path, initrd: &Path, initrd_at: u64, bz: bool) -> GuestRam {
    let ram = GuestRam::new(MEM).unwrap();
    let mut f = File::open(kernel).unwrap();
    let himem = Some(GuestAddress(HIMEM));
    if bz {
        BzImage::load(ram.memory(), None, &mut f, himem).unwrap();
    } else {
        Elf::load(ram.memory(), None, &mut f, himem).unwrap();
    }
    let mut i = File::open(initrd).unwrap();
    let size = i.metadata().unwrap().len() as usize;
    ram.memory()
        .read_exact_volatile_from(GuestAddress(initrd_at), &mut i, size)
        .unwrap();
    ram
}

#[test]
fn the_guest_images_load_byte_for_byte_as_linux_loader_loads_them() {
    let images = vmm_tests::images();
    let bz_image = images.kernel.with_file_name("bzImage");
    let mut kernels = vec![(images.kernel.clone(), false)];
    if bz_image.is_file() {
        kernels.push((bz_image, true));
    }
    for (kernel, bz) in kernels {
        let ram = GuestRam::new(MEM).unwrap();
        let boot = LinuxBoot {
            kernel: kernel.clone(),
            initrd: Some(images.initramfs.clone()),
            cmdline: String::new(),
        };
        let loaded = load_images(ram.memory(), ram.low_end(), &boot).unwrap();
        let (initrd_at, initrd_size) = loaded.initrd().unwrap();
        assert_eq!(
            initrd_size,
            std::fs::metadata(&images.initramfs).unwrap().len()
        );
        let expected = reference(&kernel, &images.initramfs, initrd_at, bz);
        let (got, want) = (whole_ram(&ram), whole_ram(&expected));
        assert_eq!(got.len(), want.len());
        if let Some(at) = got.iter().zip(&want).position(|(a, b)| a != b) {
            panic!(
                "{}: guest RAM differs from linux-loader's at 0x{at:x}",
                kernel.display()
            );
        }
        assert!(got.iter().any(|&b| b != 0), "nothing was loaded");
    }
}
