//! Command-line input the binary refuses, with the message it gives.

mod common;

use std::os::unix::net::UnixListener;
use std::process::{Command, Output};

use common::BIN;

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run the binary")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn an_existing_regular_file_is_not_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("precious");
    std::fs::write(&path, "keep me").expect("write");
    let output = run(&["--socket", path.to_str().expect("utf-8"), "--json"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains(&format!(
            "{}: exists and is not a socket; refusing to replace it",
            path.display()
        )),
        "{}",
        stderr(&output)
    );
    assert!(output.stdout.is_empty(), "no ready line");
    assert_eq!(std::fs::read_to_string(&path).expect("read"), "keep me");
}

#[test]
fn a_symlink_is_neither_followed_nor_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("target");
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&target, &link).expect("symlink");
    let output = run(&["--socket", link.to_str().expect("utf-8")]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("is a symbolic link; refusing to follow or replace it"),
        "{}",
        stderr(&output)
    );
    assert!(!target.exists(), "nothing created through the link");
}

#[test]
fn a_live_socket_is_refused_and_a_stale_one_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gpu.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let output = run(&["--socket", path.to_str().expect("utf-8")]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("a server is already listening there"),
        "{}",
        stderr(&output)
    );

    // The listener goes, its socket file stays: the device takes the path over.
    drop(listener);
    assert!(path.exists());
    let mut child = Command::new(BIN)
        .args([
            "--socket",
            path.to_str().expect("utf-8"),
            "--json",
            "--vram-size",
            "1M",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    let stdout = child.stdout.take().expect("stdout");
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).expect("line");
    let _ = child.kill();
    let _ = child.wait();
    let status: serde_json::Value = serde_json::from_str(&line).expect("JSON status");
    assert_eq!(status["ready"], true);
    assert_eq!(status["vram_size"], 1 << 20);
    assert_eq!(status["vendor_id"], "0x1234");
}

#[test]
fn vram_sizes_that_cannot_be_a_bar_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gpu.sock");
    let socket = path.to_str().expect("utf-8");
    for (size, message) in [
        (
            "0",
            "VRAM size must be a power of two from 4K to 1T (a BAR's size), got 0 bytes",
        ),
        ("3G", "got 3221225472 bytes"),
        ("2T", "got 2199023255552 bytes"),
        ("lots", "not a size: \"lots\""),
    ] {
        let output = run(&["--socket", socket, "--vram-size", size]);
        assert_eq!(output.status.code(), Some(2), "--vram-size {size}");
        let text = stderr(&output);
        assert!(text.contains("--vram-size"), "{text}");
        assert!(text.contains(message), "--vram-size {size}: {text}");
    }
    assert!(!path.exists(), "no socket created");
}

#[test]
fn ids_and_vector_counts_are_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gpu.sock");
    let socket = path.to_str().expect("utf-8");
    let output = run(&["--socket", socket, "--vendor", "0xffff"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("0xffff means \"no device\""),
        "{}",
        stderr(&output)
    );
    let output = run(&["--socket", socket, "--device", "0x10000"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("not a 16-bit id"),
        "{}",
        stderr(&output)
    );
    let output = run(&["--socket", socket, "--msix-vectors", "0"]);
    assert_eq!(output.status.code(), Some(2));
}
