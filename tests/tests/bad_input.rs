//! Bad input gets a precise error and a non-zero exit, never a panic.

use vmm_tests::vmm;

fn expect_error(args: &[&str], needle: &str) {
    let run = vmm(args);
    run.assert_no_panic();
    assert_ne!(run.code(), Some(0), "{args:?} succeeded");
    assert!(
        run.stderr.contains(needle),
        "{args:?}: expected '{needle}' in:\n{}",
        run.stderr
    );
}

#[test]
fn missing_kernel() {
    expect_error(
        &["run", "--kernel", "/nonexistent/vmlinux"],
        "--kernel /nonexistent/vmlinux: no such kernel file",
    );
}

#[test]
fn a_file_that_is_not_a_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("notakernel");
    std::fs::write(&junk, vec![0x5au8; 8192]).unwrap();
    expect_error(
        &["run", "--kernel", junk.to_str().unwrap()],
        "is not a kernel image",
    );
    // A truncated ELF header is caught by the loader with its own message.
    let elf = dir.path().join("truncated-elf");
    std::fs::write(&elf, b"\x7fELF\x02\x01\x01").unwrap();
    expect_error(
        &["run", "--kernel", elf.to_str().unwrap()],
        "loading kernel",
    );
}

#[test]
fn zero_memory() {
    expect_error(
        &["run", "--micro", "--mem", "0"],
        "--mem: guest memory size must be greater than 0",
    );
    expect_error(
        &["run", "--micro", "--mem", "lots"],
        "--mem: 'lots' is not a size",
    );
    expect_error(
        &["run", "--micro", "--mem", "1M"],
        "guest memory size must be at least",
    );
}

#[test]
fn zero_vcpus() {
    expect_error(
        &["run", "--micro", "--vcpus", "0"],
        "--vcpus must be between 1 and 32, got 0",
    );
    expect_error(
        &["run", "--micro", "--vcpus", "33"],
        "--vcpus must be between 1 and 32, got 33",
    );
}

#[test]
fn missing_disk_image() {
    expect_error(
        &["run", "--micro", "--disk", "/nonexistent/disk.img"],
        "--disk /nonexistent/disk.img: no such disk image file",
    );
    expect_error(
        &["run", "--micro", "--disk", "/etc/hostname,fast"],
        "unknown option 'fast'",
    );
}

#[test]
fn nothing_to_boot_and_bad_payload() {
    expect_error(&["run"], "nothing to boot");
    expect_error(
        &["run", "--payload", "/nonexistent.bin"],
        "cannot read payload",
    );
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.bin");
    std::fs::write(&empty, b"").unwrap();
    expect_error(&["run", "--payload", empty.to_str().unwrap()], "is empty");
    expect_error(
        &["run", "--micro", "--pattern", "zigzag"],
        "unknown micro guest pattern",
    );
    expect_error(
        &["run", "--micro", "--region-mib", "200", "--mem", "64M"],
        "is not inside guest RAM",
    );
}

#[test]
fn usage_errors_exit_2() {
    let run = vmm(&["run", "--no-such-flag"]);
    run.assert_no_panic();
    assert_eq!(run.code(), Some(2));
}

/// A command line longer than the kernel takes (x86: 2047 bytes) would be cut by the kernel
/// without a word, dropping the end of an agent script: refused, naming both lengths.
#[test]
fn a_command_line_the_kernel_would_truncate() {
    let img = vmm_tests::images();
    let script = vec!["echo,padding-padding-padding-padding"; 80].join(";");
    expect_error(
        &[
            "run",
            "--kernel",
            img.kernel.to_str().unwrap(),
            "--initrd",
            img.initramfs.to_str().unwrap(),
            "--agent",
            &script,
        ],
        "but this kernel takes at most 2047",
    );
}

fn mkfifo(path: &std::path::Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("mkfifo runs");
    assert!(status.success(), "mkfifo {}", path.display());
}

/// `expect_error`, and quickly: a special file is refused by its type, never read or waited on.
fn expect_quick_error(args: &[&str], needle: &str) {
    let start = std::time::Instant::now();
    expect_error(args, needle);
    assert!(
        start.elapsed() < std::time::Duration::from_secs(10),
        "{args:?} took {:?}",
        start.elapsed()
    );
}

#[test]
fn a_fifo_or_dev_zero_as_payload_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("payload.fifo");
    mkfifo(&fifo);
    expect_quick_error(
        &["run", "--payload", fifo.to_str().unwrap()],
        "is a FIFO, not a regular file",
    );
    expect_quick_error(
        &["run", "--payload", "/dev/zero"],
        "/dev/zero is a character device, not a regular file",
    );
    expect_quick_error(
        &["run", "--payload", dir.path().to_str().unwrap()],
        "is a directory, not a regular file",
    );
    // Larger than fits at the payload's load address: refused before reading.
    let big = dir.path().join("big.bin");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(1 << 30).unwrap();
    expect_quick_error(
        &["run", "--payload", big.to_str().unwrap()],
        "is 1073741824 bytes; at most 1048576 are read",
    );
}

#[test]
fn a_fifo_as_kernel_initramfs_or_disk_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("image.fifo");
    mkfifo(&fifo);
    let fifo = fifo.to_str().unwrap();
    let images = vmm_tests::images();
    let kernel = images.kernel.to_str().unwrap();
    expect_quick_error(
        &["run", "--kernel", fifo, "--console", "none"],
        &format!("--kernel {fifo}: is a FIFO, not a regular file"),
    );
    expect_quick_error(
        &["run", "--kernel", kernel, "--initrd", fifo],
        &format!("--initrd {fifo}: is a FIFO, not a regular file"),
    );
    expect_quick_error(
        &["run", "--micro", "--disk", fifo],
        &format!("--disk {fifo}: is a FIFO, not a regular file or block device"),
    );
    expect_quick_error(
        &["run", "--micro", "--disk", "/dev/zero"],
        "--disk /dev/zero: is a character device, not a regular file or block device",
    );
}

#[test]
fn a_fifo_or_dev_zero_as_a_snapshots_vm_json_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo_snap = dir.path().join("fifo-snap");
    std::fs::create_dir(&fifo_snap).unwrap();
    mkfifo(&fifo_snap.join("vm.json"));
    expect_quick_error(
        &["restore", fifo_snap.to_str().unwrap()],
        "is a FIFO, not a regular file",
    );
    let zero_snap = dir.path().join("zero-snap");
    std::fs::create_dir(&zero_snap).unwrap();
    std::os::unix::fs::symlink("/dev/zero", zero_snap.join("vm.json")).unwrap();
    expect_quick_error(
        &["restore", zero_snap.to_str().unwrap()],
        "is a character device, not a regular file",
    );
    // A regular vm.json too large to be one is refused before it is read.
    let big_snap = dir.path().join("big-snap");
    std::fs::create_dir(&big_snap).unwrap();
    let f = std::fs::File::create(big_snap.join("vm.json")).unwrap();
    f.set_len(1 << 30).unwrap();
    expect_quick_error(
        &["restore", big_snap.to_str().unwrap()],
        "at most 16777216 are read",
    );
}
