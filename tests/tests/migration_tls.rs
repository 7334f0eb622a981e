//! Authenticated, encrypted migration (issue 18): TLS 1.3 with certificates (`--tls-dir`, QEMU's
//! layout, made here with rcgen) or a pre-shared key (`--tls-psk`), plain TCP only with
//! `--insecure`. The faults it closes, each shown refused: a plain-TCP fake source that once got
//! a whole VM run by a waiting destination, a wrong key, a client certificate from another CA,
//! a certificate `--tls-authz` does not name, and a migration with no choice made. A refused
//! source keeps its guest running; a refused destination ends with an error, having run
//! nothing. (precopy, postcopy and hybrid over `--tls-psk`: migration.rs.)

use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use vmm::migration::hello::Hello;
use vmm::migration::protocol::{FrameWriter, Message};
use vmm::migration::Mode;
use vmm_tests::micro::{
    assert_micro_exit, assert_same_memory, finish, finish_intact, micro_source, wait_some_passes,
    PASS_TIMEOUT,
};
use vmm_tests::migration::fake_vm;
use vmm_tests::process::{free_port, remote, wait_api, Bg};
use vmm_tests::tls::{psk_file, Ca};
use vmm_tests::vmm_bin;

/// `vmm run --incoming` on loopback with `creds`, waiting for a source.
fn destination(dir: &Path, port: u16, creds: &[&str]) -> Bg {
    let mut cmd = Command::new(vmm_bin());
    cmd.args(["run", "--incoming", &format!("tcp://127.0.0.1:{port}")])
        .args(["--console", "none", "--json", "--api-socket"])
        .arg(dir.join("dst.sock"))
        .arg("--dump-memory")
        .arg(dir.join("dst-received.bin"))
        .args(creds);
    let mut bg = Bg::spawn("destination", cmd);
    bg.wait_for("waiting for an incoming migration", Duration::from_secs(20));
    bg
}

fn migrate(
    sock: &Path,
    port: u16,
    creds: &[&str],
    dump: &Path,
) -> (Option<i32>, serde_json::Value, String) {
    let to = format!("tcp://127.0.0.1:{port}");
    let mut args = vec!["migrate", "--to", &to, "--json", "--dump-memory"];
    args.push(dump.to_str().unwrap());
    args.extend_from_slice(creds);
    remote(sock, &args)
}

/// A successful precopy with `src_creds` / `dst_creds`: the destination's RAM before it runs
/// equals the source's at its pause, its guest runs to the end, both reports name `transport`.
/// Returns the destination's stderr.
fn precopy_ok(dir: &Path, src_creds: &[&str], dst_creds: &[&str], transport: &str) -> String {
    let port = free_port();
    let dst = destination(dir, port, dst_creds);
    let (src, sock) = micro_source(dir, &[]);
    wait_some_passes(&sock, 20);
    let src_dump = dir.join("src.bin");
    let (code, reply, err) = migrate(&sock, port, src_creds, &src_dump);
    assert_eq!(code, Some(0), "migrate failed: {err}\n{reply}");
    assert_eq!(reply["report"]["ok"], true, "{reply}");
    assert_eq!(reply["report"]["transport"], transport, "{reply}");
    let (scode, srep, serr) = src.finish(Duration::from_secs(30));
    assert_eq!(scode, Some(0), "source:\n{serr}");
    assert_eq!(srep["outcome"]["kind"], "migrated", "{srep}");
    let dst_sock = dir.join("dst.sock");
    wait_api(&dst_sock, Duration::from_secs(20));
    let passes = finish(&dst_sock, 500);
    let (dcode, drep, derr) = dst.finish(PASS_TIMEOUT);
    assert_eq!(dcode, Some(0), "destination:\n{derr}\n{drep}");
    assert_eq!(drep["migration"]["transport"], transport, "{drep}");
    assert_micro_exit(transport, &drep, passes);
    assert_same_memory(
        &format!("{transport}: received vs the source at its pause"),
        &src_dump,
        &dir.join("dst-received.bin"),
    );
    derr
}

/// A refused migration: the source's migrate fails with an error containing one of
/// `src_says`, its guest answers and runs on to an intact end; the destination exits 1 with an
/// error containing `dst_says`, having accepted no VM.
fn refused(dir: &Path, src_creds: &[&str], dst_creds: &[&str], src_says: &[&str], dst_says: &str) {
    let port = free_port();
    let dst = destination(dir, port, dst_creds);
    let (src, sock) = micro_source(dir, &[]);
    wait_some_passes(&sock, 20);
    let (code, reply, err) = migrate(&sock, port, src_creds, &dir.join("src.bin"));
    assert_eq!(code, Some(1), "the migration must fail: {reply}\n{err}");
    let why = reply["error"].as_str().unwrap_or_default();
    assert!(src_says.iter().any(|s| why.contains(s)), "source: {why}");
    let (scode, status, _) = remote(&sock, &["status", "--json"]);
    assert_eq!(scode, Some(0));
    assert_eq!(status["state"], "running", "{status}");
    let (dcode, _, derr) = dst.finish(Duration::from_secs(30));
    assert_eq!(dcode, Some(1), "destination:\n{derr}");
    assert!(derr.contains(dst_says), "destination:\n{derr}");
    assert!(
        !derr.contains("accepted a"),
        "no VM may be accepted:\n{derr}"
    );
    let line = derr.lines().find(|l| l.starts_with("vmm: error:"));
    eprintln!("source: {why}\ndestination: {line:?}");
    finish_intact(src, &sock, 100);
}

/// In TLS 1.3 the source's handshake is over before the destination checks its certificate: the
/// source hears of a refusal as the destination's alert on its first read, or as a reset when
/// the destination closed with the source's Hello unread.
const AFTER_HANDSHAKE: &[&str] = &["alert", "reset", "closed"];

#[test]
fn precopy_over_tls_certificates_moves_memory_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("migration CA");
    let server = ca.server_dir(dir.path(), "dst-pki", &["127.0.0.1", "dst.example"]);
    let client = ca.client_dir(dir.path(), "src-pki", &ca, "source-1");
    let derr = precopy_ok(
        dir.path(),
        &["--tls-dir", client.to_str().unwrap()],
        &[
            "--tls-dir",
            server.to_str().unwrap(),
            "--tls-authz",
            "source-1",
        ],
        "tls-x509",
    );
    assert!(!derr.contains("--insecure"), "{derr}");
}

#[test]
fn insecure_is_named_in_the_log_and_both_reports() {
    let dir = tempfile::tempdir().unwrap();
    let derr = precopy_ok(dir.path(), &["--insecure"], &["--insecure"], "tcp-insecure");
    assert!(
        derr.contains("WARN") && derr.contains("plain TCP (--insecure)"),
        "{derr}"
    );
}

/// The fault of issue 18: a few lines writing a Hello on plain TCP got a destination to build
/// and run the VM it described. Now the handshake fails on the first bytes; nothing is read
/// as a frame, no VM is built.
#[test]
fn a_plain_tcp_fake_source_is_refused_before_its_hello_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let key = psk_file(dir.path(), "keys.psk");
    let port = free_port();
    let dst = destination(dir.path(), port, &["--tls-psk", key.to_str().unwrap()]);
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut w = FrameWriter::new(s.try_clone().unwrap());
    let hello = Hello {
        vm: fake_vm(),
        mode: Mode::Precopy,
        session: 7,
        source_host: "fake".into(),
        channels: 0,
    };
    // The write may already fail if the destination gave up first: either way it must not
    // have taken the VM.
    let _ = w.send(&Message::Hello(serde_json::to_vec(&hello).unwrap()));
    let (dcode, _, derr) = dst.finish(Duration::from_secs(30));
    assert_eq!(dcode, Some(1), "{derr}");
    assert!(derr.contains("TLS handshake with 127.0.0.1:"), "{derr}");
    assert!(derr.contains("--insecure"), "the hint: {derr}");
    assert!(!derr.contains("accepted a"), "{derr}");
    assert!(!dir.path().join("dst-received.bin").exists());
}

#[test]
fn a_wrong_pre_shared_key_fails_the_handshake_on_both_sides_and_the_source_runs_on() {
    let dir = tempfile::tempdir().unwrap();
    let ours = psk_file(dir.path(), "ours.psk");
    let theirs = psk_file(dir.path(), "theirs.psk");
    refused(
        dir.path(),
        &["--tls-psk", theirs.to_str().unwrap()],
        &["--tls-psk", ours.to_str().unwrap()],
        &["TLS handshake with 127.0.0.1:"],
        "TLS handshake with 127.0.0.1:",
    );
}

#[test]
fn a_client_certificate_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("migration CA");
    let rogue = Ca::new("rogue CA");
    let server = ca.server_dir(dir.path(), "dst-pki", &["127.0.0.1"]);
    // Trusts the right CA for the destination, but its own certificate is the rogue CA's.
    let client = rogue.client_dir(dir.path(), "src-pki", &ca, "source-1");
    refused(
        dir.path(),
        &["--tls-dir", client.to_str().unwrap()],
        &["--tls-dir", server.to_str().unwrap()],
        AFTER_HANDSHAKE,
        "TLS handshake with 127.0.0.1:",
    );
}

#[test]
fn a_certificate_tls_authz_does_not_name_is_refused_on_either_side() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("migration CA");
    let server = ca.server_dir(dir.path(), "dst-pki", &["127.0.0.1"]);
    let client = ca.client_dir(dir.path(), "src-pki", &ca, "source-1");
    // The destination admits only source-2.
    refused(
        dir.path(),
        &["--tls-dir", client.to_str().unwrap()],
        &[
            "--tls-dir",
            server.to_str().unwrap(),
            "--tls-authz",
            "source-2",
        ],
        AFTER_HANDSHAKE,
        "--tls-authz",
    );
    // The source goes only to a destination named other.example.
    let dir = tempfile::tempdir().unwrap();
    let server = ca.server_dir(dir.path(), "dst-pki", &["127.0.0.1"]);
    let client = ca.client_dir(dir.path(), "src-pki", &ca, "source-1");
    refused(
        dir.path(),
        &[
            "--tls-dir",
            client.to_str().unwrap(),
            "--tls-authz",
            "other.example",
        ],
        &["--tls-dir", server.to_str().unwrap()],
        &["--tls-authz"],
        "TLS handshake with 127.0.0.1:",
    );
}

#[test]
fn no_choice_of_credentials_is_a_clear_error_and_two_are_a_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    let to = format!("tcp://127.0.0.1:{port}");
    let run = vmm_tests::vmm(&["run", "--incoming", &to]);
    assert_eq!(run.code(), Some(1), "{}", run.stderr);
    for flag in ["--tls-dir", "--tls-psk", "--insecure"] {
        assert!(run.stderr.contains(flag), "{}", run.stderr);
    }
    // The source refuses before it reaches the VM (no VM at this socket).
    let sock = dir.path().join("none.sock");
    let (code, _, err) = remote(&sock, &["migrate", "--to", &to]);
    assert_eq!(code, Some(1), "{err}");
    for flag in ["--tls-dir", "--tls-psk", "--insecure"] {
        assert!(err.contains(flag), "{err}");
    }
    let key = psk_file(dir.path(), "keys.psk");
    let run = vmm_tests::vmm(&[
        "run",
        "--incoming",
        &to,
        "--insecure",
        "--tls-psk",
        key.to_str().unwrap(),
    ]);
    assert_eq!(run.code(), Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("cannot be used with"), "{}", run.stderr);
    // A key file others can read is refused, as ssh does.
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let run = vmm_tests::vmm(&["run", "--incoming", &to, "--tls-psk", key.to_str().unwrap()]);
    assert_eq!(run.code(), Some(1), "{}", run.stderr);
    assert!(run.stderr.contains("chmod 600"), "{}", run.stderr);
}
