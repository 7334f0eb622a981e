//! tools/two-hosts.sh and its wrapper: two network namespaces joined by a veth pair carry TCP
//! both from a program run inside one (`command`) and from a thread moved into one (`enter`),
//! and dropping the pair removes both namespaces, also when the test panics. Needs root.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use vmm_tests::netns::{namespace_exists, Side, TwoHosts};

/// A name no parallel test or run can share.
fn unique(tag: &str) -> String {
    format!("vt{tag}{}", std::process::id())
}

/// Listens on `hosts`' side B, accepts one connection and returns what it read until EOF.
fn listen_once(hosts: &TwoHosts) -> (SocketAddr, std::thread::JoinHandle<Vec<u8>>) {
    let ns_b = hosts.namespace(Side::B);
    let addr_b = hosts.addr_b;
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        vmm_tests::netns::enter_namespace(&ns_b).expect("enter namespace b");
        let listener = TcpListener::bind((addr_b, 0)).expect("bind on b's veth address");
        tx.send(listener.local_addr().expect("local addr"))
            .expect("send addr");
        let (mut conn, _) = listener.accept().expect("accept");
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut got = Vec::new();
        conn.read_to_end(&mut got).expect("read");
        got
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("listener ready");
    (addr, handle)
}

#[test]
fn tcp_crosses_the_veth_and_down_removes_everything() {
    // Arrange
    let hosts = TwoHosts::up(&unique("a")).expect("two-hosts.sh up (needs root)");
    let (ns_a, ns_b) = (hosts.namespace(Side::A), hosts.namespace(Side::B));
    assert!(namespace_exists(&ns_a) && namespace_exists(&ns_b));
    assert_ne!(hosts.addr_a, hosts.addr_b);

    // Act 1: a program inside namespace a (bash's /dev/tcp: no extra packages) connects to b.
    let (addr, server) = listen_once(&hosts);
    let status = hosts
        .command(Side::A, "bash")
        .arg("-c")
        .arg(format!(
            "printf from-a-by-bash >/dev/tcp/{}/{}",
            addr.ip(),
            addr.port()
        ))
        .status()
        .expect("spawn bash in namespace a");
    assert!(status.success(), "bash /dev/tcp in namespace a: {status}");
    assert_eq!(server.join().expect("server thread"), b"from-a-by-bash");

    // Act 2: a thread moved into namespace a connects to b.
    let (addr, server) = listen_once(&hosts);
    let ns_a2 = ns_a.clone();
    std::thread::spawn(move || {
        vmm_tests::netns::enter_namespace(&ns_a2).expect("enter namespace a");
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
        s.write_all(b"from-a-by-thread").expect("write");
    })
    .join()
    .expect("client thread");
    assert_eq!(server.join().expect("server thread"), b"from-a-by-thread");

    // b's address is not reachable from the root namespace: the pair is isolated.
    assert!(TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_err());

    // Assert: dropping removes both namespaces.
    drop(hosts);
    assert!(!namespace_exists(&ns_a), "{ns_a} still exists");
    assert!(!namespace_exists(&ns_b), "{ns_b} still exists");
}

#[test]
fn a_panicking_test_still_cleans_up() {
    let name = unique("p");
    let mut sleeper = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let hosts = TwoHosts::up(&name).expect("two-hosts.sh up (needs root)");
        // Something left running inside must not keep the namespace alive.
        sleeper = Some(
            hosts
                .command(Side::B, "sleep")
                .arg("600")
                .spawn()
                .expect("spawn sleep in namespace b"),
        );
        panic!("test body failed (on purpose)");
    }));
    assert!(result.is_err());
    assert!(!namespace_exists(&format!("{name}-a")));
    assert!(!namespace_exists(&format!("{name}-b")));
    // `down` ended the process left inside.
    let status = sleeper.expect("spawned").wait().expect("wait for sleep");
    assert!(!status.success(), "sleep was not killed: {status}");
}

#[test]
fn down_is_idempotent() {
    let name = unique("d");
    for _ in 0..2 {
        let status = std::process::Command::new(vmm_tests::netns::script())
            .args(["down", &name])
            .status()
            .expect("run two-hosts.sh down");
        assert!(status.success(), "down of an absent pair: {status}");
    }
}
