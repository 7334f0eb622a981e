//! The control API as a careless script or another local user would try it (README, "The
//! control API socket"): the socket's mode and directory, what may already lie at its path, who
//! may connect and for how long, how many at once, output paths that are links or exist
//! already, and SIGTERM leaving no socket behind.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vmm_tests::process::{free_port, remote, wait_api, Bg};
use vmm_tests::{vmm, vmm_bin};

const MICRO: [&str; 9] = [
    "--micro",
    "--pattern",
    "random",
    "--region-mib",
    "4",
    "--param",
    "256",
    "--console",
    "none",
];

fn micro_cmd(sock: &Path, timeout_ms: Option<u64>) -> Command {
    let mut cmd = Command::new(vmm_bin());
    cmd.arg("run")
        .args(MICRO)
        .args(["--passes", "0", "--json", "--api-socket"])
        .arg(sock);
    if let Some(ms) = timeout_ms {
        cmd.env("VMM_API_REQUEST_TIMEOUT_MS", ms.to_string());
    }
    cmd
}

/// A micro guest running until told, its API at DIR/NAME; returns once the API answers.
fn start(dir: &Path, name: &str, timeout_ms: Option<u64>) -> (Bg, PathBuf) {
    let sock = dir.join(name);
    let bg = Bg::spawn(name, micro_cmd(&sock, timeout_ms));
    wait_api(&sock, Duration::from_secs(20));
    (bg, sock)
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

/// The one line the server sends on `s` before closing it (within `limit`).
fn read_reply(s: &UnixStream, limit: Duration) -> serde_json::Value {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

fn error_of(v: &serde_json::Value) -> &str {
    v["error"].as_str().unwrap_or_default()
}

/// Ends a micro guest started with `start` (SIGTERM: the test of that is below).
fn stop(bg: Bg) {
    // SAFETY: kill(2) on a child process we spawned and have not reaped.
    unsafe { libc::kill(bg.pid() as i32, libc::SIGTERM) };
    let _ = bg.finish(Duration::from_secs(30));
}

#[test]
fn the_socket_is_owner_only_and_our_own_uid_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let (bg, sock) = start(dir.path(), "api.sock", None);
    assert_eq!(mode(&sock), 0o600);
    // Nothing but the socket: the private directory it was bound in is gone.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["api.sock"]);
    let (code, v, _) = remote(&sock, &["status", "--json"]);
    assert_eq!((code, &v["ok"]), (Some(0), &serde_json::json!(true)), "{v}");
    stop(bg);
}

#[test]
fn an_idle_client_is_dropped_after_the_request_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (bg, sock) = start(dir.path(), "api.sock", Some(300));
    let t0 = Instant::now();
    let idle = UnixStream::connect(&sock).unwrap();
    let v = read_reply(&idle, Duration::from_secs(10));
    let took = t0.elapsed();
    assert!(error_of(&v).contains("no complete request within"), "{v}");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // Closed after the reply.
    let mut rest = Vec::new();
    assert_eq!((&idle).read_to_end(&mut rest).unwrap(), 0);
    // Others are served as before.
    let (code, _, err) = remote(&sock, &["status", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    stop(bg);
}

#[test]
fn the_17th_connection_is_answered_busy() {
    let dir = tempfile::tempdir().unwrap();
    let (bg, sock) = start(dir.path(), "api.sock", Some(60_000));
    let mut open: Vec<UnixStream> = Vec::new();
    for _ in 0..16 {
        let s = UnixStream::connect(&sock).unwrap();
        // Served: a status answered on each, so all 16 hold a slot before the next connects.
        (&s).write_all(b"{\"cmd\":\"status\"}\n").unwrap();
        assert_eq!(read_reply(&s, Duration::from_secs(10))["ok"], true);
        open.push(s);
    }
    let extra = UnixStream::connect(&sock).unwrap();
    let v = read_reply(&extra, Duration::from_secs(10));
    assert!(error_of(&v).starts_with("busy: 16 API connections"), "{v}");
    // One closes: a slot frees.
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, v, _) = remote(&sock, &["status", "--json"]);
        if code == Some(0) {
            break;
        }
        assert!(Instant::now() < deadline, "no slot freed: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(open);
    stop(bg);
}

/// `vmm run` with its socket at `sock` fails before the guest runs, saying `needle`.
fn refused(sock: &Path, needle: &str) {
    let mut args = vec!["run"];
    args.extend(MICRO);
    args.extend(["--passes", "1", "--api-socket", sock.to_str().unwrap()]);
    let run = vmm(&args);
    run.assert_no_panic();
    assert_eq!(run.code(), Some(1), "{}", run.stderr);
    assert!(
        run.stderr.contains(needle),
        "expected '{needle}':\n{}",
        run.stderr
    );
}

#[test]
fn only_a_stale_socket_at_the_socket_path_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    std::fs::write(p("file"), b"keep").unwrap();
    refused(&p("file"), "a regular file is there");
    assert_eq!(std::fs::read(p("file")).unwrap(), b"keep");
    std::fs::create_dir(p("dir")).unwrap();
    refused(&p("dir"), "a directory is there");
    symlink(p("file"), p("link")).unwrap();
    refused(&p("link"), "a symbolic link is there");
    assert_eq!(std::fs::read(p("file")).unwrap(), b"keep");
    let live = UnixListener::bind(p("live.sock")).unwrap();
    refused(&p("live.sock"), "another process is serving on this socket");
    drop(live);
    // Now stale (its listener is gone): taken over.
    let (bg, sock) = start(dir.path(), "live.sock", None);
    assert_eq!(mode(&sock), 0o600);
    stop(bg);
}

#[test]
fn a_socket_directory_others_may_write_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    refused(&shared.join("api.sock"), "writable by no one else");
    assert!(!shared.join("api.sock").exists());
}

#[test]
fn sigterm_removes_the_socket_and_the_run_ends_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (bg, sock) = start(dir.path(), "api.sock", None);
    // SAFETY: kill(2) on a child process we spawned and have not reaped.
    assert_eq!(unsafe { libc::kill(bg.pid() as i32, libc::SIGTERM) }, 0);
    let (code, rep, err) = bg.finish(Duration::from_secs(30));
    assert_eq!(code, Some(128 + libc::SIGTERM), "{err}\n{rep}");
    assert_eq!(rep["outcome"]["kind"], "terminated", "{rep}");
    assert!(
        std::fs::symlink_metadata(&sock).is_err(),
        "the socket is still there"
    );
}

#[test]
fn output_paths_are_never_followed_or_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    std::fs::write(p("precious"), b"keep me").unwrap();
    let (bg, sock) = start(dir.path(), "api.sock", None);
    let snapshot = |to: &Path| remote(&sock, &["snapshot", "--to", to.to_str().unwrap(), "--json"]);

    // The old attack: a snapshot directory prepared with `memory` linked elsewhere.
    std::fs::create_dir(p("prepared")).unwrap();
    symlink(p("precious"), p("prepared/memory")).unwrap();
    let (code, v, _) = snapshot(&p("prepared"));
    assert_eq!(code, Some(1), "{v}");
    assert!(
        error_of(&v).contains("prepared: a directory is there already"),
        "{v}"
    );
    // The directory itself a link.
    symlink(p("prepared"), p("linked")).unwrap();
    let (_, v, _) = snapshot(&p("linked"));
    assert!(
        error_of(&v).contains("linked: a symbolic link is there already"),
        "{v}"
    );
    assert_eq!(std::fs::read(p("precious")).unwrap(), b"keep me");

    // A good one: a 0700 directory of 0600 files.
    let (code, v, err) = snapshot(&p("snap"));
    assert_eq!(code, Some(0), "{v}\n{err}");
    assert_eq!(mode(&p("snap")), 0o700);
    for f in ["memory", "vm.json"] {
        assert_eq!(mode(&p("snap").join(f)), 0o600, "{f}");
    }

    // migrate --dump-memory at a link: refused when the dump is written, guest resumed here.
    let port = free_port();
    let mut dst_cmd = Command::new(vmm_bin());
    dst_cmd
        .args(["run", "--incoming", &format!("tcp://127.0.0.1:{port}")])
        .arg("--insecure")
        .args(["--console", "none", "--json"]);
    let mut dst = Bg::spawn("destination", dst_cmd);
    dst.wait_for("waiting for an incoming migration", Duration::from_secs(20));
    symlink(p("precious"), p("dump-link")).unwrap();
    let (code, v, _) = remote(
        &sock,
        &[
            "migrate",
            "--insecure",
            "--to",
            &format!("tcp://127.0.0.1:{port}"),
            "--dump-memory",
            p("dump-link").to_str().unwrap(),
            "--json",
        ],
    );
    assert_ne!(code, Some(0), "{v}");
    assert!(
        error_of(&v).contains("dump-link: a symbolic link is there already"),
        "{v}"
    );
    assert_eq!(std::fs::read(p("precious")).unwrap(), b"keep me");
    let (_, s, _) = remote(&sock, &["status", "--json"]);
    assert_eq!(s["state"], "running", "{s}");
    let _ = dst.finish(Duration::from_secs(30));
    stop(bg);

    // --dump-memory and --dump-final of a restore: an existing file is not truncated. The
    // restore serves an API too, and SIGTERM removes its socket as well.
    std::fs::write(p("old.bin"), b"old").unwrap();
    let restore_sock = p("restore.sock");
    let mut cmd = Command::new(vmm_bin());
    cmd.arg("restore")
        .arg(p("snap"))
        .args(["--console", "none", "--json", "--api-socket"])
        .arg(&restore_sock)
        .arg("--dump-memory")
        .arg(p("old.bin"));
    let (status, _, err) = Bg::spawn("restore", cmd).wait_output(Duration::from_secs(60));
    assert_ne!(status.code(), Some(0), "{err}");
    assert!(err.contains("a file is there already"), "{err}");
    assert_eq!(std::fs::read(p("old.bin")).unwrap(), b"old");

    let mut cmd = Command::new(vmm_bin());
    cmd.arg("restore")
        .arg(p("snap"))
        .args(["--console", "none", "--json", "--api-socket"])
        .arg(&restore_sock);
    let restored = Bg::spawn("restore", cmd);
    wait_api(&restore_sock, Duration::from_secs(20));
    // SAFETY: kill(2) on a child process we spawned and have not reaped.
    unsafe { libc::kill(restored.pid() as i32, libc::SIGTERM) };
    let (code, rep, err) = restored.finish(Duration::from_secs(30));
    assert_eq!(code, Some(128 + libc::SIGTERM), "{err}\n{rep}");
    assert!(std::fs::symlink_metadata(&restore_sock).is_err());
}

#[test]
fn a_client_of_another_uid_is_refused() {
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/usr/bin/setpriv").exists() {
        eprintln!("skipped: needs root and setpriv to connect as another uid (nobody)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (bg, sock) = start(dir.path(), "api.sock", None);
    // Opened up after the start, as a careless admin might: the uid check still holds.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let as_nobody = |args: &[&str]| {
        Command::new("/usr/bin/setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(vmm_bin())
            .args(args)
            .output()
            .unwrap()
    };
    if !as_nobody(&["--version"]).status.success() {
        eprintln!("skipped: uid 65534 cannot run {}", vmm_bin().display());
        stop(bg);
        return;
    }
    let sock_s = sock.to_str().unwrap();
    let out = as_nobody(&["remote", "--api-socket", sock_s, "status", "--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("uid 65534 may not use this API"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The refusal is logged by the VMM, which goes on serving its own uid.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !bg.stderr().contains("refused a client of uid 65534") {
        assert!(Instant::now() < deadline, "{}", bg.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, _, err) = remote(&sock, &["status", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    stop(bg);
}
