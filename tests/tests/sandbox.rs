//! The sandbox (README, "Sandbox"): every thread of a running vmm is under its seccomp filter
//! by default, a forbidden syscall is caught by the real filter of a real thread (named, exit
//! code 159) unless `--seccomp log` or `off` lets it run, and `--user` leaves a guest running as
//! another user for good.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use vmm_tests::micro::{finish_intact, micro_source, wait_some_passes};
use vmm_tests::process::{remote, wait_api, Bg};
use vmm_tests::snapshot::{assert_finished, snapshot_micro, Snap};
use vmm_tests::{run_with_timeout, vmm_bin, Run};

/// A short micro guest run with the self-test hook set to make a forbidden syscall (`socket`)
/// in the thread kind `kind`, right after that thread's filter went in.
fn selftest_run(kind: &str, mode: Option<&str>) -> Run {
    let mut cmd = Command::new(vmm_bin());
    cmd.env(vmm::seccomp::SELFTEST_ENV, kind).args([
        "run",
        "--micro",
        "--passes",
        "2",
        "--console",
        "none",
    ]);
    if let Some(m) = mode {
        cmd.args(["--seccomp", m]);
    }
    run_with_timeout(cmd, "vmm run (seccomp self-test)", vmm_tests::run_timeout())
}

#[test]
fn a_forbidden_syscall_is_caught_under_kill_and_runs_under_log_and_off() {
    // The default is kill: the handler names the thread and the syscall (socket is 41), and
    // the vmm exits with its own code.
    for (kind, thread) in [("vcpu", "vcpu0"), ("main", "main")] {
        let run = selftest_run(kind, None);
        run.assert_no_panic();
        assert_eq!(
            run.code(),
            Some(vmm::seccomp::EXIT_BAD_SYSCALL),
            "{kind}: stderr:\n{}",
            run.stderr
        );
        let expected = format!(
            "vmm: seccomp: thread '{thread}' made syscall {}, which its filter forbids",
            libc::SYS_socket
        );
        assert!(
            run.stderr.contains(&expected),
            "{kind}: stderr:\n{}",
            run.stderr
        );
        assert!(
            !run.stderr.contains("selftest: socket() in"),
            "{}",
            run.stderr
        );
    }
    assert_eq!(vmm::seccomp::EXIT_BAD_SYSCALL, 159);
    // log and off: the same call proceeds (a descriptor, not an error) and the guest ends well.
    for mode in ["log", "off"] {
        let run = selftest_run("vcpu", Some(mode));
        run.assert_no_panic();
        assert_eq!(run.code(), Some(0), "{mode}: stderr:\n{}", run.stderr);
        let line = run
            .stderr
            .lines()
            .find(|l| l.contains("seccomp selftest: socket() in a vcpu thread"))
            .unwrap_or_else(|| panic!("{mode}: no self-test line:\n{}", run.stderr));
        assert!(
            line.contains(&format!("ran under --seccomp {mode} (result ")),
            "{line}"
        );
        let result: i64 = line
            .rsplit_once("(result ")
            .and_then(|(_, r)| r.trim_end_matches(')').parse().ok())
            .unwrap_or(-1);
        assert!(result >= 0, "{mode}: socket() failed: {line}");
    }
}

/// (thread name, Seccomp mode, number of filters) of every thread of `pid` but KVM's own
/// (`kvm-nx-lpage-recovery`: a kernel worker in the process, which runs no vmm code).
fn threads(pid: u32) -> Vec<(String, u32, u32)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in dir.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        if field("Name:").starts_with("kvm-") {
            continue;
        }
        out.push((
            field("Name:"),
            field("Seccomp:").parse().unwrap_or(u32::MAX),
            field("Seccomp_filters:").parse().unwrap_or(u32::MAX),
        ));
    }
    out.sort();
    out
}

/// Waits until every thread of `pid` is in mode `want` (the main thread's filter goes in just
/// after the vCPU threads start); returns them.
fn wait_threads(pid: u32, want: u32) -> Vec<(String, u32, u32)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let t = threads(pid);
        if !t.is_empty() && t.iter().all(|&(_, mode, _)| mode == want) {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "threads of {pid} never all in seccomp mode {want}: {t:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn every_thread_of_a_running_vmm_is_filtered_by_default_and_none_with_off() {
    let dir = tempfile::tempdir().unwrap();
    let (bg, sock) = micro_source(dir.path(), &["--vcpus", "2"]);
    let t = wait_threads(bg.pid(), 2);
    let names: Vec<&str> = t.iter().map(|(n, _, _)| n.as_str()).collect();
    for name in ["vmm", "vcpu0", "vcpu1", "api"] {
        assert!(names.contains(&name), "no thread {name}: {t:?}");
    }
    assert!(t.iter().all(|&(_, _, n)| n >= 1), "{t:?}");
    // Requests are served by connection threads under the same filters, and the guest runs on.
    wait_some_passes(&sock, 3);
    finish_intact(bg, &sock, 2);

    let dir = tempfile::tempdir().unwrap();
    let (bg, sock) = micro_source(dir.path(), &["--seccomp", "off"]);
    let t = wait_threads(bg.pid(), 0);
    assert!(t.iter().all(|&(_, _, n)| n == 0), "{t:?}");
    finish_intact(bg, &sock, 2);
}

/// A `vmm page-server` (with `server_args`) for a fresh micro snapshot, and a lazy restore from
/// it, paused once its API answers; `listening` sees the server before any vmm connects.
fn paused_restore_from_a_page_server(
    dir: &Path,
    server_args: &[&str],
    listening: impl FnOnce(&Bg),
) -> (Snap, Bg, Bg, std::path::PathBuf) {
    let snap = snapshot_micro(dir, &[]);
    let sock = dir.join("pages.sock");
    let mut cmd = Command::new(vmm_bin());
    cmd.args(["page-server", "--json"])
        .args(server_args)
        .arg("--snapshot")
        .arg(&snap.dir)
        .arg("--socket")
        .arg(&sock);
    let server = Bg::spawn("page-server", cmd);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no page-server socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    listening(&server);
    let api = dir.join("restore.sock");
    let mut cmd = Command::new(vmm_bin());
    cmd.arg("restore")
        .arg(&snap.dir)
        .args(["--console", "none", "--json", "--lazy", "--prefetch"])
        .args(["--demand", "uffd-missing", "--page-server"])
        .arg(&sock)
        .arg("--api-socket")
        .arg(&api);
    let restore = Bg::spawn("restore", cmd);
    wait_api(&api, Duration::from_secs(20));
    // Held still while the processes are looked at: the guest would otherwise end soon.
    let (code, v, err) = remote(&api, &["pause"]);
    assert_eq!(code, Some(0), "pause: {err}\n{v}");
    (snap, server, restore, api)
}

/// Resumes the restore and checks both ends finished: the guest's memory is the snapshot's.
fn resume_and_finish(what: &str, snap: &Snap, server: Bg, restore: Bg, api: &Path) {
    let (code, v, err) = remote(api, &["resume"]);
    assert_eq!(code, Some(0), "resume: {err}\n{v}");
    let (code, rep, err) = restore.finish(Duration::from_secs(120));
    assert_finished(what, snap, code, &rep, &err);
    let (code, _, err) = server.finish(Duration::from_secs(20));
    assert_eq!(code, Some(0), "page server: {err}");
}

#[test]
fn a_lazy_restore_and_its_page_server_run_filtered_to_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let (snap, server, restore, api) = paused_restore_from_a_page_server(dir.path(), &[], |_| {});
    let r = wait_threads(restore.pid(), 2);
    assert!(r.iter().any(|(n, _, _)| n == "vcpu0"), "{r:?}");
    let s = wait_threads(server.pid(), 2);
    assert!(
        s.iter().any(|(n, _, _)| n.starts_with("page-server")),
        "{s:?}"
    );
    resume_and_finish("filtered lazy restore", &snap, server, restore, &api);
}

/// The Uid:, Gid: and Groups: lines of /proc/PID/status.
fn ids(pid: u32) -> (String, String, String) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    (field("Uid:"), field("Gid:"), field("Groups:"))
}

#[test]
fn user_drops_root_after_setup_and_the_guest_runs_on() {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test drops root: run the suite as root, as the guests need /dev/kvm");
    }
    let dir = tempfile::tempdir().unwrap();
    let (bg, sock) = micro_source(dir.path(), &["--user", "65534:65534"]);
    // The drop happens after the API socket is bound, before the first vCPU runs.
    let want = "65534 65534 65534 65534".to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = ids(bg.pid());
        if now == (want.clone(), want.clone(), String::new()) {
            break;
        }
        assert!(Instant::now() < deadline, "ids never dropped: {now:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    for (name, mode, _) in wait_threads(bg.pid(), 2) {
        assert_eq!(mode, 2, "{name}");
    }
    wait_some_passes(&sock, 3);
    let (code, v, err) = remote(&sock, &["status", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(v["state"], "running", "{v}");
    finish_intact(bg, &sock, 2);
}

/// `vmm page-server --user`: the server is nobody before it reads a byte of the restoring vmm
/// (checked while the restore is paused, the server's threads up), and still serves every page
/// of a lazy restore that ends with the snapshot's memory.
#[test]
fn a_page_server_given_user_drops_root_and_serves_the_restore() {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test drops root: run the suite as root, as the guests need /dev/kvm");
    }
    let dir = tempfile::tempdir().unwrap();
    let user = ["--user", "65534:65534"];
    let (snap, server, restore, api) =
        paused_restore_from_a_page_server(dir.path(), &user, |server| {
            // Root until a restoring vmm connects: nothing of a peer has been read yet.
            let before = ids(server.pid());
            assert!(before.0.starts_with("0 "), "{before:?}");
        });
    let want = "65534 65534 65534 65534".to_string();
    assert_eq!(ids(server.pid()), (want.clone(), want, String::new()));
    for (name, mode, _) in wait_threads(server.pid(), 2) {
        assert_eq!(mode, 2, "{name}");
    }
    let what = "lazy restore from a page server as nobody";
    resume_and_finish(what, &snap, server, restore, &api);
}

#[test]
fn user_is_refused_clearly_when_it_cannot_work() {
    let bad = |args: &[&str], text: &str| {
        let run = vmm_tests::vmm(args);
        run.assert_no_panic();
        assert_eq!(run.code(), Some(1), "{args:?}: {}", run.stderr);
        assert!(run.stderr.contains(text), "{args:?}: {}", run.stderr);
    };
    let micro = ["run", "--micro", "--console", "none", "--user"];
    bad(
        &[&micro[..], &["no-such-user-here"]].concat(),
        "no such user",
    );
    bad(
        &[&micro[..], &["0:0"]].concat(),
        "root is what --user gives up",
    );
    let run = vmm_tests::vmm(&["run", "--micro", "--seccomp", "strict"]);
    assert_eq!(run.code(), Some(2), "{}", run.stderr);
    assert!(
        run.stderr.contains("invalid value 'strict'"),
        "{}",
        run.stderr
    );
    // A vmm that is not root cannot change user: refused before anything is built.
    let mut cmd = Command::new(vmm_bin());
    std::os::unix::process::CommandExt::uid(&mut cmd, 65534);
    std::os::unix::process::CommandExt::gid(&mut cmd, 65534);
    cmd.args(["run", "--micro", "--console", "none", "--user", "65534"])
        .current_dir(Path::new("/"));
    let run = run_with_timeout(cmd, "vmm run --user as nobody", Duration::from_secs(60));
    run.assert_no_panic();
    assert_eq!(run.code(), Some(1), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("--user needs a vmm started as root (this one runs as uid 65534)"),
        "{}",
        run.stderr
    );
}
