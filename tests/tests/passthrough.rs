//! `vmm run --device`: the GPU-shaped test device (vfio-user) passed through to real guests on
//! /dev/kvm, and every bad input the passthrough issue lists, each refused with a precise
//! message, no panic, no hang, and the device server left serving.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use vmm_tests::gpu;
use vmm_tests::micro::{finish_intact, micro_source, wait_some_passes};
use vmm_tests::process::remote;
use vmm_tests::vmm;

fn micro_with(device: &str, extra: &[&str]) -> vmm_tests::Run {
    let mut args = vec![
        "run",
        "--micro",
        "--passes",
        "3",
        "--console",
        "none",
        "--device",
        device,
    ];
    args.extend_from_slice(extra);
    vmm(&args)
}

fn refused(run: &vmm_tests::Run, code: i32, says: &str) {
    run.assert_no_panic();
    assert_eq!(run.code(), Some(code), "{says}:\n{}", run.stderr);
    assert!(
        run.stderr.contains(says),
        "wanted '{says}' in:\n{}",
        run.stderr
    );
}

/// The server still serves a client after whatever the previous one did.
fn still_serves(sock: &Path) {
    let run = micro_with(&gpu::spec(sock), &[]);
    run.assert_no_panic();
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
    assert!(run.stderr.contains("1234:7e57"), "{}", run.stderr);
}

#[test]
fn bad_device_arguments_are_refused_before_the_guest_runs() {
    let dir = tempfile::tempdir().unwrap();
    let spec_err = vmm(&["run", "--micro", "--device", "gpu0"]);
    refused(&spec_err, 2, "expected vfio-user:SOCKET or vfio:");
    let opt_err = vmm(&["run", "--micro", "--device", "vfio:/sys/x,iommu=magic"]);
    refused(&opt_err, 2, "unknown option 'iommu=magic'");

    let missing = dir.path().join("none.sock");
    refused(
        &micro_with(&gpu::spec(&missing), &[]),
        1,
        "connecting to the vfio-user server at",
    );

    // A socket file nobody listens on (a killed server's).
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    refused(
        &micro_with(&gpu::spec(&stale), &[]),
        1,
        "Connection refused",
    );

    // Not a VFIO device: a directory, a path that does not exist.
    let d = format!("vfio:{}", dir.path().display());
    refused(
        &micro_with(&d, &[]),
        1,
        "is not a PCI device's sysfs directory",
    );
    refused(
        &micro_with("vfio:/sys/bus/pci/devices/0000:ff:1f.7", &[]),
        1,
        "cannot stat /sys/bus/pci/devices/0000:ff:1f.7",
    );
    // A real PCI device of this host that is not bound to vfio-pci, where the host has one.
    let bound_elsewhere = std::fs::read_dir("/sys/bus/pci/devices")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            std::fs::read_link(p.join("driver"))
                .map(|l| !l.ends_with("vfio-pci"))
                .unwrap_or(true)
        });
    match bound_elsewhere {
        Some(p) => refused(
            &micro_with(&format!("vfio:{}", p.display()), &[]),
            1,
            "not vfio-pci: bind it first",
        ),
        None => eprintln!("skip: this host has no PCI device outside vfio-pci"),
    }

    let bits = vmm(&["run", "--micro", "--passes", "1", "--phys-bits", "20"]);
    refused(&bits, 1, "--phys-bits 20: the guest can have 36 to");
}

#[test]
fn a_server_busy_with_another_client_is_refused_after_the_reply_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, sock) = gpu::start(dir.path(), "busy", &["--vram-size", "16M"]);
    // The server serves one client at a time: this connection holds it.
    let holder = UnixStream::connect(&sock).unwrap();
    let run = micro_with(&gpu::spec(&sock), &[]);
    refused(&run, 1, "did not answer within 10s");
    drop(holder);
    still_serves(&sock);
}

#[test]
fn a_server_answering_garbage_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for (name, reply) in [
        ("junk", vec![0xa5u8; 64]),
        // A header claiming a reply far larger than any message.
        ("huge", {
            let mut h = vec![0u8; 16];
            h[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
            h
        }),
        ("silent-close", Vec::new()),
    ] {
        let sock = dir.path().join(format!("{name}.sock"));
        let listener = UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(&reply);
            // Then hang up: the client must not wait for more.
        });
        let run = micro_with(&gpu::spec(&sock), &[]);
        run.assert_no_panic();
        assert_eq!(run.code(), Some(1), "{name}:\n{}", run.stderr);
        assert!(
            run.stderr
                .contains(&format!("vfio-user server at {}", sock.display())),
            "{name}:\n{}",
            run.stderr
        );
        server.join().unwrap();
    }
}

#[test]
fn a_bar_too_large_for_the_guest_address_space_is_refused_naming_sizes_and_bits() {
    let dir = tempfile::tempdir().unwrap();
    let (server, sock) = gpu::start(dir.path(), "big", &["--vram-size", "1T", "--once"]);
    let run = micro_with(&gpu::spec(&sock), &["--phys-bits", "36"]);
    refused(&run, 1, "BAR1 (1 TiB) finds no naturally aligned room");
    assert!(
        run.stderr.contains("36 physical address bits"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains("BAR0 16 MiB (32-bit), BAR1 1 TiB (64-bit, prefetchable)"),
        "{}",
        run.stderr
    );
    // The refused VM left the server cleanly: with --once it exits 0 when its client leaves.
    let (status, _, err) = server.wait_output(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{err}");
}

#[test]
fn a_server_dying_mid_run_leaves_the_vm_running_and_postcopy_and_iommu_tracking_are_refused_first()
{
    let dir = tempfile::tempdir().unwrap();
    let (mut server, dev) = gpu::start(dir.path(), "dies", &["--vram-size", "16M"]);
    let spec = gpu::spec(&dev);
    let (src, sock) = micro_source(dir.path(), &["--device", &spec]);
    wait_some_passes(&sock, 5);

    // Postcopy with a device that DMAs is refused before anything connects, naming the device;
    // a precopy to nowhere fails at the connection, with the device left running.
    let (code, reply, _) = remote(
        &sock,
        &[
            "migrate",
            "--insecure",
            "--to",
            "tcp://127.0.0.1:9",
            "--mode",
            "postcopy",
            "--json",
        ],
    );
    assert_ne!(code, Some(0), "{reply}");
    let err = reply["error"].as_str().unwrap_or_default().to_string();
    assert!(
        err.contains("postcopy is refused with a passed-through device") && err.contains(&spec),
        "{reply}"
    );
    // IOMMU dirty tracking asked of a vfio-user device (no IOMMU behind it): refused by name.
    let (code, reply, _) = remote(
        &sock,
        &[
            "migrate",
            "--insecure",
            "--to",
            "tcp://127.0.0.1:9",
            "--device-dirty",
            "iommu",
            "--json",
        ],
    );
    assert_ne!(code, Some(0), "{reply}");
    let err = reply["error"].as_str().unwrap_or_default().to_string();
    assert!(
        err.contains(&spec) && err.contains("no IOMMU dirty tracking for this device"),
        "{reply}"
    );
    let (code, reply, _) = remote(
        &sock,
        &[
            "migrate",
            "--insecure",
            "--to",
            "tcp://127.0.0.1:9",
            "--json",
        ],
    );
    assert_ne!(code, Some(0), "{reply}");
    let err = reply["error"].as_str().unwrap_or_default().to_string();
    assert!(err.contains("connecting to 127.0.0.1:9"), "{reply}");
    // The server dies without a word; the VM runs on and ends intact (teardown against a dead
    // socket must not hang).
    server.kill();
    let (_, now, _) = remote(&sock, &["status", "--json"]);
    let passes = now["micro_passes"].as_u64().unwrap_or(0);
    wait_some_passes(&sock, passes + 5);
    let rep = finish_intact(src, &sock, passes + 10);
    assert_eq!(rep["outcome"]["kind"], "micro-exit", "{rep}");
}

/// A server killed while a Linux guest uses its device: the guest sees the device gone
/// (config reads all-ones, no completion interrupt) while memory already mapped from the BARs
/// stays readable, the agent goes on, the guest powers off, and vmm ends with 0 without hanging
/// on the dead socket. The kernel's own PCI scan (before the kill) found the device where the
/// host placed it: BAR0 16 MiB below 4 GiB, the VRAM BAR 64-bit prefetchable above 4 GiB,
/// naturally aligned.
#[test]
fn a_server_killed_under_a_linux_guest_is_seen_as_gone_and_the_vm_runs_on() {
    const BDF: &str = "0000:00:01.0";
    let dir = tempfile::tempdir().unwrap();
    let (mut server, dev) = gpu::start(dir.path(), "gpu", &["--vram-size", "256M"]);
    let console = dir.path().join("console.txt");
    let script = [
        format!("vfio-bind,{BDF}"),
        format!("vfio-msix,{BDF},2"),
        "echo,kill-the-server-now".into(),
        "sleep,3000".into(),
        format!("vfio-dma,{BDF},4096"),
        "echo,still-here".into(),
        "poweroff".into(),
    ]
    .join(";");
    let mut cmd = std::process::Command::new(vmm_tests::vmm_bin());
    cmd.args(gpu::linux_run_args(&dev, &script, &console));
    let mut vm = vmm_tests::process::Bg::spawn("vmm", cmd);
    let read = || std::fs::read_to_string(&console).unwrap_or_default();
    let deadline = std::time::Instant::now() + vmm_tests::run_timeout();
    // The agent's echo (the kernel command line shows the script too, with a comma).
    while !read().contains("echo kill-the-server-now") {
        assert!(
            std::time::Instant::now() < deadline && vm.try_wait().is_none(),
            "the agent never got there:\n{}\n{}",
            read(),
            vm.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    server.kill();
    let (status, _, err) = vm.wait_output(vmm_tests::run_timeout());
    let text = read();
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(status.code(), Some(0), "{err}\nconsole:\n{text}");
    let lines = vmm_tests::agent_lines(&text);
    let before = lines
        .iter()
        .find(|l| l.starts_with("vfio-msix "))
        .unwrap_or_else(|| panic!("{lines:#?}"));
    assert!(
        before.contains("received=2") && before.contains("source=device"),
        "{before}\n{err}"
    );
    // After the kill: the DMA's doorbell and status go nowhere (reads are all-ones), so the
    // round trip fails; the agent goes on.
    let dma = lines
        .iter()
        .find(|l| l.starts_with("error vfio-dma:"))
        .unwrap_or_else(|| panic!("{lines:#?}\n{err}"));
    eprintln!("after the kill: {dma}");
    assert!(lines.iter().any(|l| l == "echo still-here"), "{lines:#?}");
    assert!(err.contains("passthrough:"), "failures not logged:\n{err}");

    let scan: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("pci 0000:00:01.0:"))
        .collect();
    assert!(
        scan.iter()
            .any(|l| l.contains("[1234:7e57] type 00 class 0x030200")),
        "{scan:#?}"
    );
    let bar = |n: u8| -> (u64, u64, String) {
        let l = scan
            .iter()
            .find(|l| l.contains(&format!("BAR {n} [mem ")))
            .unwrap_or_else(|| panic!("no BAR {n} in {scan:#?}"));
        let inner = l.split("[mem ").nth(1).unwrap().trim_end_matches(']');
        let (range, flags) = inner.split_once(' ').unwrap_or((inner, ""));
        let (a, b) = range.split_once('-').unwrap();
        let a = u64::from_str_radix(a.trim_start_matches("0x"), 16).unwrap();
        let b = u64::from_str_radix(b.trim_start_matches("0x"), 16).unwrap();
        (a, b - a + 1, flags.to_string())
    };
    let (b0, s0, f0) = bar(0);
    assert!(b0 < 1 << 32 && s0 == 16 << 20 && f0.is_empty(), "{scan:#?}");
    let (b1, s1, f1) = bar(1);
    assert!(
        b1 >= 1 << 32 && s1 == 256 << 20 && b1 % s1 == 0,
        "{scan:#?}"
    );
    assert_eq!(f1, "64bit pref");
}
