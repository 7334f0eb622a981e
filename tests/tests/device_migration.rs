//! Live migration of a Linux guest with a passed-through device (the gpu-test-device over
//! vfio-user) between two network namespaces. Each side runs its own device server; the
//! device's state moves over VFIO migration v2 and its DMA into guest RAM is tracked by its DMA
//! log. Inside the guest the agent keeps three workloads running through every migration: the
//! device's page writer stamping guest pages by DMA, the device's kernel filling VRAM, and an
//! agent thread writing other VRAM pages through the BAR mmap; stopping them checks every page
//! each left against what it recorded.
//!
//! Also: the proof that the checks can fail (`--device-dirty off` loses DMA stamps and the
//! agent sees it), the refusal of a device without migration support, and device servers
//! killed mid-migration on either side. A Linux boot takes tens of seconds on PVM hosts, so
//! each test boots once.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_tests::console::{console, wait_agent};
use vmm_tests::migration::migrate_insecure;
use vmm_tests::netns::{Side, TwoHosts};
use vmm_tests::process::{remote, wait_api, Bg};
use vmm_tests::{agent_lines, gpu, vmm_bin};

const BDF: &str = "0000:00:01.0";
/// Small VRAM: the device digests all of it in every migration pass.
const VRAM: &str = "64M";
const BOOT: Duration = Duration::from_secs(300);
const WORKLOADS: &str = "vfio-workload 0000:00:01.0 stopped=";

/// The `key=value` token of a result line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|t| t.strip_prefix(key)?.strip_prefix('='))
}

/// Types `commands` and then `echo,TAG` on the guest's console through the API, and waits for
/// the echo: every line the commands printed is in the console by then.
fn run_agent(sock: &Path, log: &Path, commands: &str, tag: &str, vm: &mut Bg) {
    let line = if commands.is_empty() {
        format!("echo,{tag}")
    } else {
        format!("{commands};echo,{tag}")
    };
    let (c, _, e) = remote(sock, &["console", &line]);
    assert_eq!(c, Some(0), "console through the API: {e}");
    wait_agent(log, &format!("echo {tag}"), Duration::from_secs(120), vm);
}

/// The workload result lines and workload errors in the console at `log`.
fn workload_results(log: &Path) -> Vec<String> {
    agent_lines(&console(log))
        .into_iter()
        .filter(|l| l.starts_with(WORKLOADS) || l.starts_with("error vfio-workload"))
        .collect()
}

/// A device server on `side`, listening on DIR/NAME.sock.
fn start_device(
    hosts: &TwoHosts,
    side: Side,
    dir: &Path,
    name: &str,
    extra: &[&str],
) -> (Bg, PathBuf) {
    let sock = dir.join(format!("{name}.sock"));
    let mut cmd = hosts.command(side, gpu::device_bin());
    cmd.arg("--socket")
        .arg(&sock)
        .args(["--vram-size", VRAM])
        .args(extra);
    let mut bg = Bg::spawn(name, cmd);
    bg.wait_for("listening on", Duration::from_secs(20));
    (bg, sock)
}

/// A running VM: its process, API socket and console file.
struct Vm {
    bg: Bg,
    sock: PathBuf,
    log: PathBuf,
}

/// Boots the Linux guest on `side` with the device on `dev`; the agent binds it to vfio-pci
/// and runs `script`; returns once the agent printed `ready`.
fn boot(hosts: &TwoHosts, side: Side, dir: &Path, dev: &Path, script: &str, ready: &str) -> Vm {
    let sock = dir.join("vm0.sock");
    let log = dir.join("vm0.log");
    let script = format!("vfio-bind,{BDF};{script}");
    let mut cmd = hosts.command(side, vmm_bin());
    cmd.args(gpu::linux_run_args(dev, &script, &log))
        .args(["--json", "--api-socket"])
        .arg(&sock);
    let mut bg = Bg::spawn("vm0", cmd);
    wait_agent(&log, ready, BOOT, &mut bg);
    Vm { bg, sock, log }
}

/// `vmm run --incoming` on `side` with the device on `dev`, waiting for the source.
fn incoming(hosts: &TwoHosts, side: Side, dir: &Path, name: &str, port: u16, dev: &Path) -> Vm {
    let sock = dir.join(format!("{name}.sock"));
    let log = dir.join(format!("{name}.log"));
    let to = hosts.addr(side);
    let mut cmd = hosts.command(side, vmm_bin());
    cmd.args(["run", "--incoming", &format!("tcp://{to}:{port}"), "--json"])
        .arg("--insecure")
        .args(["--device", &gpu::spec(dev)])
        .arg("--api-socket")
        .arg(&sock)
        .arg("--console")
        .arg(format!("file:{}", log.display()));
    let mut bg = Bg::spawn(name, cmd);
    bg.wait_for("waiting for an incoming migration", Duration::from_secs(30));
    Vm { bg, sock, log }
}

fn other(side: Side) -> Side {
    match side {
        Side::A => Side::B,
        Side::B => Side::A,
    }
}

/// `migrate_insecure` in a thread of its own (it blocks until the migration ends), for faults
/// injected while it runs.
fn migrate_in_background(
    sock: &Path,
    to: String,
    mode: &'static str,
    extra: &'static [&'static str],
) -> std::thread::JoinHandle<(Option<i32>, serde_json::Value, String)> {
    let sock = sock.to_path_buf();
    std::thread::spawn(move || migrate_insecure(&sock, &to, mode, extra))
}

/// The three device workloads: the page writer (DMA into guest RAM), the VRAM kernel (the
/// device writing its VRAM) and the agent's CPU writer (VRAM through the BAR mapping).
fn start_workloads() -> String {
    format!(
        "vfio-workload,{BDF},start,dma,500;vfio-workload,{BDF},start,vram;\
         vfio-workload,{BDF},start,vram-cpu,500"
    )
}

/// Stops the three device workloads on `vm` and requires every check to pass.
fn stop_and_check(vm: &mut Vm, tag: &str) {
    run_agent(
        &vm.sock,
        &vm.log,
        &format!("vfio-workload,{BDF},stop"),
        tag,
        &mut vm.bg,
    );
    let results = workload_results(&vm.log);
    eprintln!("{tag}: {}", results.join("\n"));
    assert_eq!(results.len(), 3, "{tag}: {results:#?}");
    for kind in ["dma", "vram", "vram-cpu"] {
        let line = results
            .iter()
            .find(|l| l.starts_with(&format!("{WORKLOADS}{kind} ")))
            .unwrap_or_else(|| panic!("{tag}: no {kind} result: {results:#?}"));
        assert_eq!(field(line, "ok"), Some("true"), "{tag}: {line}");
    }
}

/// Four hops, A -> B -> A -> B -> A, precopy and hybrid in turn, with the device's DMA log,
/// while the page writer, the VRAM kernel, the CPU VRAM writer and the agent's RAM workload
/// run; after each hop every device check passes on the new host (then the device workloads
/// start again), and at the end the RAM workload verifies every checksum it recorded.
#[test]
fn precopy_and_hybrid_move_a_busy_device_four_times_and_every_ram_dma_and_vram_page_checks_out() {
    let hosts = TwoHosts::up("dmig1").expect("two network namespaces (needs root)");
    let dir = tempfile::tempdir().unwrap();
    let mut side = Side::A;
    let (mut server, dev) = start_device(&hosts, side, dir.path(), "dev0", &[]);
    let mut vm = boot(
        &hosts,
        side,
        dir.path(),
        &dev,
        &format!("workload,8,random,0,48;{}", start_workloads()),
        &format!("vfio-workload {BDF} started=vram-cpu"),
    );
    let mut dma_pages = 0;
    for (hop, mode) in ["precopy", "hybrid", "precopy", "hybrid"]
        .into_iter()
        .enumerate()
    {
        let hop = hop as u16 + 1;
        let to_side = other(side);
        let port = 7950 + hop;
        let (next_server, next_dev) =
            start_device(&hosts, to_side, dir.path(), &format!("dev{hop}"), &[]);
        let mut next = incoming(
            &hosts,
            to_side,
            dir.path(),
            &format!("vm{hop}"),
            port,
            &next_dev,
        );
        let t = Instant::now();
        let to = format!("tcp://{}:{port}", hosts.addr(to_side));
        let (code, reply, err) = migrate_insecure(&vm.sock, &to, mode, &[]);
        assert_eq!(code, Some(0), "hop {hop} ({mode}): {err}\n{reply}");
        let r = &reply["report"];
        let d = &r["devices"];
        eprintln!(
            "hop {hop} ({mode}): {:.1} s wall, total {:.0} ms, downtime {:.1} ms {}, rounds {}, \
             device precopy {} B, stop-copy {} B, dma pages {}, postcopy {}",
            t.elapsed().as_secs_f64(),
            r["total_ms"].as_f64().unwrap_or(0.0),
            r["downtime_ms"].as_f64().unwrap_or(0.0),
            r["downtime_parts"],
            r["rounds"],
            d["precopy_bytes"],
            d["stop_copy_bytes"],
            d["dma_pages"],
            r["postcopy"]
        );
        assert_eq!(d["devices"], 1, "hop {hop}: {r}");
        assert_eq!(d["dirty"], "log", "hop {hop}: {r}");
        assert!(
            d["stop_copy_bytes"].as_u64().unwrap_or(0) > 0,
            "hop {hop}: {r}"
        );
        if mode == "precopy" {
            assert!(r["downtime_parts"].is_object(), "hop {hop}: {r}");
        }
        dma_pages += d["dma_pages"].as_u64().unwrap_or(0);

        let (vcode, vrep, verr) = vm.bg.finish(Duration::from_secs(60));
        assert_eq!(
            vcode,
            Some(0),
            "hop {hop}: the source must exit cleanly:\n{verr}"
        );
        assert_eq!(vrep["outcome"]["kind"], "migrated", "{vrep}");
        drop(server);

        wait_api(&next.sock, Duration::from_secs(10));
        // Every DMA stamp, VRAM fill and CPU VRAM page as the source left it, on this host.
        stop_and_check(&mut next, &format!("hop-{hop}-checked"));
        run_agent(
            &next.sock,
            &next.log,
            &start_workloads(),
            &format!("hop-{hop}-restarted"),
            &mut next.bg,
        );
        vm = next;
        server = next_server;
        side = to_side;
    }
    assert!(dma_pages > 0, "the device's DMA log never reported a page");

    // The RAM workload ran through all four moves: every checksum it recorded holds.
    run_agent(
        &vm.sock,
        &vm.log,
        "workload-stop;workload-verify",
        "verified",
        &mut vm.bg,
    );
    let verify = wait_agent(
        &vm.log,
        "workload-verify",
        Duration::from_secs(120),
        &mut vm.bg,
    );
    assert!(
        verify.contains("ok=true"),
        "after four migrations: {verify}"
    );
    let (c, _, e) = remote(&vm.sock, &["console", "poweroff"]);
    assert_eq!(c, Some(0), "{e}");
    let (code, rep, err) = vm.bg.finish(Duration::from_secs(120));
    assert_eq!(code, Some(0), "{err}\n{rep}");
    drop(server);
}

/// With `--device-dirty off` the device's DMA is not tracked: stamps written after their page
/// was sent are lost, and the agent's check must say so (the proof that the check above can
/// fail). The page writer is slow (50 pages a second over a 256-page window) so that on the
/// destination it cannot go round the window and rewrite the lost pages before the check, and
/// the migration is made to take several rounds (bandwidth cap, 1 ms downtime target, 3
/// rounds) so that the writer always stamps pages after they were sent.
#[test]
fn precopy_without_device_dirty_tracking_loses_dma_stamps_and_the_agent_detects_it() {
    let hosts = TwoHosts::up("dmig2").expect("two network namespaces (needs root)");
    let dir = tempfile::tempdir().unwrap();
    let (_server, dev) = start_device(&hosts, Side::A, dir.path(), "dev0", &[]);
    let vm = boot(
        &hosts,
        Side::A,
        dir.path(),
        &dev,
        &format!(
            "vfio-workload,{BDF},start,dma,50;vfio-workload,{BDF},start,vram;\
             vfio-workload,{BDF},start,vram-cpu,500"
        ),
        &format!("vfio-workload {BDF} started=vram-cpu"),
    );
    let (_next_server, next_dev) = start_device(&hosts, Side::B, dir.path(), "dev1", &[]);
    let mut next = incoming(&hosts, Side::B, dir.path(), "vm1", 7960, &next_dev);
    let to = format!("tcp://{}:7960", hosts.addr(Side::B));
    let (code, reply, err) = migrate_insecure(
        &vm.sock,
        &to,
        "precopy",
        &[
            "--device-dirty",
            "off",
            "--downtime-ms",
            "1",
            "--max-rounds",
            "3",
            "--bandwidth-mib-s",
            "16",
        ],
    );
    assert_eq!(code, Some(0), "{err}\n{reply}");
    let r = &reply["report"];
    eprintln!(
        "total {:.0} ms, rounds {}, downtime {:.1} ms, devices {}",
        r["total_ms"].as_f64().unwrap_or(0.0),
        r["rounds"],
        r["downtime_ms"].as_f64().unwrap_or(0.0),
        r["devices"]
    );
    assert_eq!(r["devices"]["dirty"], "off", "{r}");
    assert_eq!(r["devices"]["dma_pages"], 0, "{r}");
    let (vcode, vrep, verr) = vm.bg.finish(Duration::from_secs(60));
    assert_eq!(vcode, Some(0), "{verr}");
    assert_eq!(vrep["outcome"]["kind"], "migrated", "{vrep}");

    // The page writer first, as soon as the guest answers: the longer it runs on the
    // destination, the more lost pages it rewrites.
    wait_api(&next.sock, Duration::from_secs(10));
    run_agent(
        &next.sock,
        &next.log,
        &format!("vfio-workload,{BDF},stop,dma;vfio-workload,{BDF},stop"),
        "stopped",
        &mut next.bg,
    );
    let results = workload_results(&next.log);
    eprintln!("{}", results.join("\n"));
    assert_eq!(results.len(), 3, "{results:#?}");
    let dma = &results[0];
    assert!(dma.starts_with(&format!("{WORKLOADS}dma ")), "{results:#?}");
    assert_eq!(
        field(dma, "ok"),
        Some("false"),
        "lost DMA stamps went unseen: {dma}"
    );
    assert!(
        field(dma, "bad_pages").is_some_and(|n| n.parse::<u64>().is_ok_and(|n| n > 0)),
        "{dma}"
    );
    // VRAM moves with the device's own state, whatever tracks DMA into RAM.
    for line in &results[1..] {
        assert_eq!(field(line, "ok"), Some("true"), "{line}");
    }
}

/// A device server without migration support: the migration is refused before anything
/// moves, naming the device and what it lacks; the destination never hears from the source,
/// and the source's guest goes on.
#[test]
fn migrating_a_device_without_migration_support_is_refused_before_anything_moves() {
    let hosts = TwoHosts::up("dmig3").expect("two network namespaces (needs root)");
    let dir = tempfile::tempdir().unwrap();
    let (_server, dev) = start_device(&hosts, Side::A, dir.path(), "dev0", &["--no-migration"]);
    let mut vm = boot(
        &hosts,
        Side::A,
        dir.path(),
        &dev,
        "echo,booted",
        "echo booted",
    );
    let (_next_server, next_dev) = start_device(&hosts, Side::B, dir.path(), "dev1", &[]);
    let mut next = incoming(&hosts, Side::B, dir.path(), "vm1", 7970, &next_dev);
    let to = format!("tcp://{}:7970", hosts.addr(Side::B));
    let (code, reply, err) = remote(&vm.sock, &["migrate", "--insecure", "--to", &to, "--json"]);
    eprintln!("refused: {err}{reply}");
    assert_ne!(code, Some(0), "{reply}");
    let said = format!("{err}{reply}");
    assert!(
        said.contains(&dev.display().to_string()),
        "names the device: {said}"
    );
    assert!(
        said.contains("no VFIO migration support"),
        "says what it lacks: {said}"
    );

    // Nothing connected to the destination, which still waits.
    assert!(next.bg.try_wait().is_none(), "{}", next.bg.stderr());
    assert!(
        !next.bg.stderr().contains("incoming migration from"),
        "{}",
        next.bg.stderr()
    );
    assert!(vm.bg.try_wait().is_none(), "{}", vm.bg.stderr());
    run_agent(&vm.sock, &vm.log, "", "still-here", &mut vm.bg);
    let (c, _, e) = remote(&vm.sock, &["console", "poweroff"]);
    assert_eq!(c, Some(0), "{e}");
    let (code, rep, err) = vm.bg.finish(Duration::from_secs(120));
    assert_eq!(code, Some(0), "{err}\n{rep}");
    drop(next);
}

/// Device servers killed while a (bandwidth-capped, so seconds-long) precopy runs: first the
/// destination's, then the source's. Each time the migration fails with an error and the
/// source's guest goes on; after the first its device still works and every check of its
/// workloads passes, after the second vmm stays up and says which device failed.
#[test]
fn a_device_server_killed_during_migration_fails_it_and_the_source_guest_goes_on() {
    let hosts = TwoHosts::up("dmig4").expect("two network namespaces (needs root)");
    let dir = tempfile::tempdir().unwrap();
    let (mut server, dev) = start_device(&hosts, Side::A, dir.path(), "dev0", &[]);
    let mut vm = boot(
        &hosts,
        Side::A,
        dir.path(),
        &dev,
        &format!(
            "vfio-workload,{BDF},start,dma,500;vfio-workload,{BDF},start,vram;\
             vfio-workload,{BDF},start,vram-cpu,500"
        ),
        &format!("vfio-workload {BDF} started=vram-cpu"),
    );
    let slow = |sock: &Path, port: u16| {
        let to = format!("tcp://{}:{port}", hosts.addr(Side::B));
        migrate_in_background(sock, to, "precopy", &["--bandwidth-mib-s", "8"])
    };

    // (1) The destination's device server dies while precopy runs.
    let (mut dst_server, dst_dev) = start_device(&hosts, Side::B, dir.path(), "dev1", &[]);
    let mut dst = incoming(&hosts, Side::B, dir.path(), "vm1", 7980, &dst_dev);
    let migration = slow(&vm.sock, 7980);
    dst.bg
        .wait_for("incoming migration from", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(1));
    dst_server.kill();
    let (code, reply, err) = migration.join().expect("migrate thread");
    eprintln!("destination device killed: {err}{reply}");
    assert_ne!(code, Some(0), "{reply}");
    let (dcode, _, derr) = dst.bg.finish(Duration::from_secs(60));
    eprintln!(
        "the destination ({dcode:?}): {}",
        derr.trim_end().lines().last().unwrap_or("")
    );
    assert_ne!(
        dcode,
        Some(0),
        "the destination cannot have run the guest:\n{derr}"
    );
    // The source says why, in the destination's words (its Abort, read after the link broke).
    let why = reply["error"].as_str().unwrap_or_default();
    assert!(
        why.contains("the other side aborted") && why.contains("passed-through device"),
        "{reply}"
    );
    assert!(vm.bg.try_wait().is_none(), "{}", vm.bg.stderr());
    // The source's device is intact: its workloads went on and check out.
    run_agent(
        &vm.sock,
        &vm.log,
        &format!("vfio-workload,{BDF},stop"),
        "checked",
        &mut vm.bg,
    );
    let results = workload_results(&vm.log);
    eprintln!("{}", results.join("\n"));
    assert_eq!(results.len(), 3, "{results:#?}");
    for line in &results {
        assert_eq!(field(line, "ok"), Some("true"), "{line}");
    }

    // (2) The source's device server dies while precopy runs.
    let (_dst_server, dst_dev) = start_device(&hosts, Side::B, dir.path(), "dev2", &[]);
    let mut dst = incoming(&hosts, Side::B, dir.path(), "vm2", 7981, &dst_dev);
    let migration = slow(&vm.sock, 7981);
    dst.bg
        .wait_for("incoming migration from", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(1));
    server.kill();
    let (code, reply, err) = migration.join().expect("migrate thread");
    eprintln!("source device killed: {err}{reply}");
    assert_ne!(code, Some(0), "{reply}");
    let said = format!("{err}{reply}");
    assert!(
        said.contains(&dev.display().to_string()),
        "the error names the device that failed: {said}"
    );
    let _ = dst.bg.finish(Duration::from_secs(60));
    // vmm is still up and its guest answers, with its device gone.
    assert!(vm.bg.try_wait().is_none(), "{}", vm.bg.stderr());
    wait_api(&vm.sock, Duration::from_secs(10));
    run_agent(&vm.sock, &vm.log, "", "still-here", &mut vm.bg);
    assert!(!vm.bg.stderr().contains("panicked"), "{}", vm.bg.stderr());
}

/// A device server that dies at the two steps a timed kill cannot hit reliably, with the micro
/// guest (fast to boot; its end state is checked against its model): the source's device at
/// STOP_COPY (inside the downtime, vCPUs paused), and the destination's when it is told to run
/// after its state was loaded (the end of the resume). Both times the migration fails, the
/// source resumes its guest, and the guest ends with its memory intact; after the destination's
/// failure the source's device is back to RUNNING and a second migration succeeds.
#[test]
fn a_device_server_dying_at_stop_copy_or_at_resume_fails_the_migration_and_the_source_goes_on() {
    use vmm_tests::micro::{finish_intact, micro_source, wait_some_passes};
    let dir = tempfile::tempdir().unwrap();
    let incoming = |name: &str, port: u16, dev: &Path| -> Bg {
        let mut cmd = std::process::Command::new(vmm_bin());
        cmd.args(["run", "--incoming", &format!("tcp://127.0.0.1:{port}")])
            .arg("--insecure")
            .args(["--device", &gpu::spec(dev), "--console", "none", "--json"])
            .arg("--api-socket")
            .arg(dir.path().join(format!("{name}.sock")));
        let mut bg = Bg::spawn(name, cmd);
        bg.wait_for("waiting for an incoming migration", Duration::from_secs(30));
        bg
    };
    let migrate = |sock: &Path, port: u16| {
        remote(
            sock,
            &[
                "migrate",
                "--insecure",
                "--to",
                &format!("tcp://127.0.0.1:{port}"),
                "--json",
            ],
        )
    };

    // The destination's device dies when told to run, after it loaded the source's state.
    let (_src_server, src_dev) = gpu::start(dir.path(), "src-dev", &["--vram-size", "16M"]);
    let (src, sock) = micro_source(dir.path(), &["--device", &gpu::spec(&src_dev)]);
    wait_some_passes(&sock, 5);
    let (_dst_server, dst_dev) = gpu::start(
        dir.path(),
        "dst-dev",
        &["--vram-size", "16M", "--crash-at", "running"],
    );
    let port = vmm_tests::process::free_port();
    let dst = incoming("dst", port, &dst_dev);
    let (code, reply, _) = migrate(&sock, port);
    assert_ne!(code, Some(0), "{reply}");
    let why = reply["error"].as_str().unwrap_or_default();
    assert!(why.contains("the other side aborted"), "{reply}");
    let (dcode, _, derr) = dst.finish(Duration::from_secs(60));
    assert_ne!(
        dcode,
        Some(0),
        "the destination cannot have run the guest:\n{derr}"
    );

    // The source's device runs again: a second migration, to a sound destination, succeeds.
    let (_ok_server, ok_dev) = gpu::start(dir.path(), "ok-dev", &["--vram-size", "16M"]);
    let port = vmm_tests::process::free_port();
    let ok = incoming("ok", port, &ok_dev);
    let (code, reply, err) = migrate(&sock, port);
    assert_eq!(code, Some(0), "{err}\n{reply}");
    let (scode, srep, serr) = src.finish(Duration::from_secs(60));
    assert_eq!(scode, Some(0), "{serr}");
    assert_eq!(srep["outcome"]["kind"], "migrated", "{srep}");
    let ok_sock = dir.path().join("ok.sock");
    wait_api(&ok_sock, Duration::from_secs(10));
    wait_some_passes(&ok_sock, 10);

    // Now the (new) source's device dies at STOP_COPY, inside the downtime.
    drop(finish_intact(ok, &ok_sock, 5));
    let dir2 = tempfile::tempdir().unwrap();
    let (_s2, dev2) = gpu::start(
        dir2.path(),
        "src2-dev",
        &["--vram-size", "16M", "--crash-at", "stop-copy"],
    );
    let (src2, sock2) = micro_source(dir2.path(), &["--device", &gpu::spec(&dev2)]);
    wait_some_passes(&sock2, 5);
    let (_d2, ddev2) = gpu::start(dir2.path(), "dst2-dev", &["--vram-size", "16M"]);
    let port = vmm_tests::process::free_port();
    let dst2 = incoming("dst2", port, &ddev2);
    let (code, reply, _) = migrate(&sock2, port);
    assert_ne!(code, Some(0), "{reply}");
    let why = reply["error"].as_str().unwrap_or_default();
    assert!(
        why.contains(&gpu::spec(&dev2)),
        "names the source's device: {reply}"
    );
    let (dcode, _, derr) = dst2.finish(Duration::from_secs(60));
    assert_ne!(dcode, Some(0), "{derr}");
    // The guest resumed here and ends with its memory as its model says (the device is gone).
    let (_, now, _) = remote(&sock2, &["status", "--json"]);
    let passes = now["micro_passes"].as_u64().unwrap_or(0);
    wait_some_passes(&sock2, passes + 5);
    let rep = finish_intact(src2, &sock2, 5);
    assert_eq!(rep["outcome"]["kind"], "micro-exit", "{rep}");
}
