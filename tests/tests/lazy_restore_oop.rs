//! Lazy restore of the micro guest with the fault handler in a separate `vmm page-server`
//! process (the userfaultfd handed over with SCM_RIGHTS for the uffd backends; page requests
//! for the exit backends): the workload must finish and match its model, and the guest's RAM
//! at the end (`--dump-final`, read through the restoring vmm's mapping: a page still missing
//! is served by the page server like a guest touch) must be that of a run never snapshotted,
//! byte for byte, with and without --prefetch. A page server that dies or speaks
//! nonsense must stop the restore with a clear error, never leave it hanging or running on.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use vmm_tests::micro::{assert_same_memory, reference_final};
use vmm_tests::process::Bg;
use vmm_tests::snapshot::{assert_finished, snapshot_micro};
use vmm_tests::{vmm, vmm_bin};

fn wait_socket(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts `vmm page-server` for `snap` on `sock`.
fn page_server(snap: &Path, sock: &Path) -> Bg {
    let mut cmd = Command::new(vmm_bin());
    cmd.args(["page-server", "--json", "--snapshot"])
        .arg(snap)
        .arg("--socket")
        .arg(sock);
    let bg = Bg::spawn("page-server", cmd);
    wait_socket(sock);
    bg
}

/// `vmm restore SNAP --lazy ... --page-server SOCK --json` in the background.
fn restore_bg(snap: &Path, sock: &Path, args: &[&str]) -> Bg {
    restore_bg_with(snap, sock, args, Command::new(vmm_bin()))
}

fn restore_bg_with(snap: &Path, sock: &Path, args: &[&str], mut cmd: Command) -> Bg {
    cmd.arg("restore")
        .arg(snap)
        .args(["--console", "none", "--json", "--lazy", "--page-server"])
        .arg(sock)
        .args(args);
    Bg::spawn("restore", cmd)
}

const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn out_of_process_lazy_restores_end_with_the_ram_of_a_run_never_snapshotted() {
    let dir = tempfile::tempdir().unwrap();
    let snap = snapshot_micro(dir.path(), &[]);
    let reference = reference_final(dir.path(), snap.passes, &[]);
    for backend in ["uffd-missing", "uffd-minor", "memslot-exits"] {
        let sock = dir.path().join(format!("{backend}.sock"));
        let server = page_server(&snap.dir, &sock);
        let dump = dir.path().join(format!("{backend}.bin"));
        let args = ["--demand", backend, "--dump-final", dump.to_str().unwrap()];
        let (code, rep, err) = restore_bg(&snap.dir, &sock, &args).finish(LIMIT);
        assert_finished(backend, &snap, code, &rep, &err);
        assert_same_memory(backend, &reference, &dump);
        let d = &rep["demand"];
        assert_eq!(d["backend"], backend, "{d}");
        assert!(d["faults"].as_u64().unwrap_or(0) > 0, "{backend}: {d}");
        assert!(d["fault_us"]["p50"].as_f64().is_some(), "{backend}: {d}");
        let ps = &d["page_server"];
        let mode = if backend.starts_with("uffd") {
            "uffd"
        } else {
            "exits"
        };
        assert_eq!(ps["mode"], mode, "{backend}: {d}");
        if mode == "exits" {
            assert!(ps["requests"].as_u64().unwrap_or(0) > 0, "{backend}: {d}");
        }
        let (scode, srep, serr) = server.finish(Duration::from_secs(20));
        assert_eq!(scode, Some(0), "{backend} page server: {serr}");
        assert_eq!(srep["backend"], backend, "{srep}");
        eprintln!(
            "{backend} out of process: {} faults, fault p50 {} us p99 {} us",
            d["faults"], d["fault_us"]["p50"], d["fault_us"]["p99"]
        );

        let sock = dir.path().join(format!("{backend}-pf.sock"));
        let server = page_server(&snap.dir, &sock);
        let dump = dir.path().join(format!("{backend}-pf.bin"));
        let (code, rep, err) = restore_bg(
            &snap.dir,
            &sock,
            &[
                "--demand",
                backend,
                "--prefetch",
                "--dump-final",
                dump.to_str().unwrap(),
            ],
        )
        .finish(LIMIT);
        assert_finished(&format!("{backend} --prefetch"), &snap, code, &rep, &err);
        assert_eq!(
            rep["demand"]["pages_installed"], rep["demand"]["data_pages"],
            "{backend}: {rep}"
        );
        let (scode, _, serr) = server.finish(Duration::from_secs(20));
        assert_eq!(scode, Some(0), "{backend} page server: {serr}");
        assert_same_memory(&format!("{backend} --prefetch"), &reference, &dump);
    }
}

/// A frame as the page server sends it (see vmm/src/snapshot/page_proto.rs).
fn frame(kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = b"VPSF".to_vec();
    f.extend_from_slice(&1u16.to_le_bytes());
    f.extend_from_slice(&kind.to_le_bytes());
    f.extend_from_slice(&0u32.to_le_bytes());
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(payload);
    f
}

/// A fake page server: accepts the restoring vmm, reads its handshake, answers `reply`, then
/// closes every connection (`Ready` then nothing: a server that died after the handshake).
fn fake_server(sock: &Path, reply: Vec<u8>) -> std::thread::JoinHandle<String> {
    let listener = UnixListener::bind(sock).unwrap();
    std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        let hello = answer_handshake(&mut c, &reply);
        drop(c);
        hello
    })
}

/// Reads the restoring vmm's handshake frame from `c`, answers `reply`; returns the handshake.
fn answer_handshake(c: &mut std::os::unix::net::UnixStream, reply: &[u8]) -> String {
    let mut h = [0u8; 16];
    c.read_exact(&mut h).unwrap();
    let len = u32::from_le_bytes([h[12], h[13], h[14], h[15]]) as usize;
    let mut hello = vec![0u8; len];
    c.read_exact(&mut hello).unwrap();
    c.write_all(reply).unwrap();
    String::from_utf8_lossy(&hello).into_owned()
}

#[test]
fn a_dead_or_garbled_page_server_stops_the_restore_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let snap = snapshot_micro(dir.path(), &[]);
    let ready = frame(2, br#"{"session":1,"pid":1}"#);
    for backend in ["uffd-missing", "uffd-minor", "memslot-exits"] {
        // Dies right after the handshake: the guest must not run on, the restore must end.
        let sock = dir.path().join(format!("dead-{backend}.sock"));
        let fake = fake_server(&sock, ready.clone());
        let (code, rep, err) = restore_bg(&snap.dir, &sock, &["--demand", backend]).finish(LIMIT);
        let hello = fake.join().unwrap();
        assert!(hello.contains(backend), "{hello}");
        assert_ne!(code, Some(0), "{backend}: {err}\n{rep}");
        assert!(err.contains("page server"), "{backend}: {err}");
        assert_ne!(
            rep["run"]["micro_passes"].as_u64(),
            Some(snap.passes),
            "{rep}"
        );
    }
    // Not a page server, and a future version of one: refused before the guest runs.
    let sock = dir.path().join("garbage.sock");
    let fake = fake_server(&sock, b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec());
    let (code, _, err) = restore_bg(&snap.dir, &sock, &["--demand", "uffd-missing"]).finish(LIMIT);
    fake.join().unwrap();
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("bad frame magic"), "{err}");
    let sock = dir.path().join("future.sock");
    let mut f = frame(2, b"{}");
    f[4] = 9;
    let fake = fake_server(&sock, f);
    let (code, _, err) = restore_bg(&snap.dir, &sock, &["--demand", "memslot-exits"]).finish(LIMIT);
    fake.join().unwrap();
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("version 9"), "{err}");
    // No server at all.
    let (code, _, err) = restore_bg(&snap.dir, &dir.path().join("none.sock"), &[]).finish(LIMIT);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("connecting to the page server"), "{err}");
    // A page server given a snapshot that is not there refuses at once.
    let missing = dir.path().join("missing");
    let x = dir.path().join("x.sock");
    let run = vmm(&[
        "page-server",
        "--snapshot",
        missing.to_str().unwrap(),
        "--socket",
        x.to_str().unwrap(),
    ]);
    assert_eq!(run.code(), Some(1), "{}", run.stderr);
    assert!(run.stderr.contains("vm.json"), "{}", run.stderr);
}

/// A page server that answers the handshake and then says nothing, holding the connection
/// open (a stopped or hung process): with the uffd backends only the server reads the
/// userfaultfd, so the guest's first fault would block forever. The restoring vmm must notice
/// the missing heartbeat, stop the guest and end with an error that names the server and the
/// silence.
#[test]
fn a_silent_page_server_ends_the_restore_with_who_and_how_long() {
    let dir = tempfile::tempdir().unwrap();
    let snap = snapshot_micro(dir.path(), &[]);
    let ready = frame(2, br#"{"session":1,"pid":4242}"#);
    for backend in ["uffd-missing", "memslot-exits"] {
        let sock = dir.path().join(format!("silent-{backend}.sock"));
        let listener = UnixListener::bind(&sock).unwrap();
        let reply = ready.clone();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let fake = std::thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            answer_handshake(&mut c, &reply);
            // Silent, connection open, until the test is done with it.
            let _ = done_rx.recv_timeout(LIMIT);
            drop((c, listener));
        });
        let mut cmd = Command::new(vmm_bin());
        cmd.env("VMM_PAGE_SERVER_SILENCE_MS", "3000");
        let t = Instant::now();
        let (code, rep, err) =
            restore_bg_with(&snap.dir, &sock, &["--demand", backend], cmd).finish(LIMIT);
        let took = t.elapsed();
        let _ = done_tx.send(());
        fake.join().unwrap();
        assert_eq!(code, Some(1), "{backend} ({took:?}): {err}\n{rep}");
        assert!(
            err.contains(&format!("page server {}", sock.display()))
                && err.contains("sent nothing for")
                && err.contains("pid 4242"),
            "{backend}: {err}"
        );
        assert_ne!(
            rep["run"]["micro_passes"].as_u64(),
            Some(snap.passes),
            "{rep}"
        );
    }
}

/// Four vCPUs faulting at once: each data connection serves one caller (exit backends), the
/// server's one fault thread serves them all (uffd); every page lands, the workload finishes.
#[test]
fn four_vcpus_restore_out_of_process_with_every_backend() {
    let dir = tempfile::tempdir().unwrap();
    let snap = snapshot_micro(dir.path(), &["--vcpus", "4"]);
    let reference = reference_final(dir.path(), snap.passes, &["--vcpus", "4"]);
    for backend in ["uffd-missing", "uffd-minor", "memslot-exits"] {
        let sock = dir.path().join(format!("{backend}.sock"));
        let server = page_server(&snap.dir, &sock);
        let dump = dir.path().join(format!("{backend}.bin"));
        let (code, rep, err) = restore_bg(
            &snap.dir,
            &sock,
            &[
                "--demand",
                backend,
                "--prefetch",
                "--dump-final",
                dump.to_str().unwrap(),
            ],
        )
        .finish(LIMIT);
        assert_finished(&format!("{backend} 4 vCPUs"), &snap, code, &rep, &err);
        assert_eq!(rep["run"]["vcpus"], 4, "{rep}");
        let (scode, _, serr) = server.finish(Duration::from_secs(20));
        assert_eq!(scode, Some(0), "{backend} page server: {serr}");
        assert_same_memory(backend, &reference, &dump);
    }
}
