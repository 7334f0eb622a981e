use super::*;
use crate::memory::GuestRam;
use vm_memory::{Bytes, GuestAddress};

/// The handshake carries its descriptors across a socket; a userfaultfd received that way
/// serves faults of the sender's mappings (here the same process, through another fd).
#[test]
fn descriptors_travel_with_the_handshake_and_the_received_uffd_serves_faults() {
    let ram = GuestRam::new(8 << 20).unwrap();
    let hosts = ram.host_addrs();
    let armed = UffdMissing::arm(ram.ranges(), &hosts).unwrap();
    let (a, b) = UnixStream::pair().unwrap();
    let hello = Message::Hello(b"{\"x\":1}".to_vec());
    send_with_fds(&a, &hello, &[armed.raw_fd(), ram.file().as_raw_fd()]).unwrap();
    let (msg, mut fds) = recv_with_fds(&b).unwrap();
    assert_eq!(msg, hello);
    assert_eq!(fds.len(), 2);
    assert!(!is_userfaultfd(&fds[1]));
    assert!(is_userfaultfd(&fds[0]));
    fds.truncate(1);
    let uffd = fds.pop().unwrap();
    let pager = UffdMissing::from_fd(uffd, ram.ranges(), &hosts).unwrap();
    let mem = ram.memory().clone();
    let reader = std::thread::spawn(move || mem.read_obj::<u64>(GuestAddress(0x3000)).unwrap());
    let f = loop {
        if let Some(f) = pager.next_fault(Duration::from_secs(5)).unwrap() {
            break f;
        }
    };
    assert_eq!(f.gpa, 0x3000);
    pager.install(0x3000, &[7u8; 4096]).unwrap();
    assert_eq!(reader.join().unwrap(), 0x0707_0707_0707_0707);
    // A frame without descriptors, and a closed peer.
    send_with_fds(&a, &Message::Finish, &[]).unwrap();
    let (msg, fds) = recv_with_fds(&b).unwrap();
    assert_eq!((msg, fds.len()), (Message::Finish, 0));
    drop(a);
    assert!(matches!(
        recv_with_fds(&b),
        Err(PageServerError::Proto(ProtoError::Closed))
    ));
}

#[test]
fn handshakes_that_do_not_fit_the_snapshot_are_refused() {
    let r = WireRange {
        gpa: 0,
        size: 1 << 20,
        file_offset: 0,
        host: 0x7f00_0000_0000,
    };
    let hs = |backend: &str, fds: &[&str]| Handshake {
        backend: backend.into(),
        ranges: vec![r],
        pending: vec![(0x1000, 2)],
        chunk: 4096,
        prefetch: false,
        fds: fds.iter().map(|s| s.to_string()).collect(),
    };
    assert!(check_handshake(&hs("uffd-missing", &["uffd"]), 1 << 20, 1).is_ok());
    assert!(check_handshake(&hs("uffd-minor", &["uffd", "memfd"]), 1 << 20, 2).is_ok());
    // The old "dump" descriptor (guest RAM is now dumped by the restoring vmm itself).
    let e = check_handshake(&hs("uffd-minor", &["uffd", "memfd", "dump"]), 1 << 20, 3)
        .unwrap_err()
        .to_string();
    assert!(e.contains("expected"), "{e}");
    assert!(check_handshake(&hs("memslot-exits", &[]), 1 << 20, 0).is_ok());
    let e = check_handshake(&hs("uffd-missing", &["uffd"]), 4096, 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("outside the snapshot"), "{e}");
    let e = check_handshake(&hs("uffd-minor", &["uffd"]), 1 << 20, 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("expected"), "{e}");
    let e = check_handshake(&hs("uffd-missing", &["uffd"]), 1 << 20, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("received"), "{e}");
    let e = check_handshake(&hs("memslot-exits", &["dump"]), 1 << 20, 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("descriptors"), "{e}");
    let e = check_handshake(&hs("nope", &[]), 1 << 20, 0).unwrap_err();
    assert!(matches!(e, PageServerError::Backend(_)), "{e:?}");
    assert!(e.to_string().contains("unknown backend"), "{e}");
    let mut bad = hs("memslot-exits", &[]);
    bad.pending = vec![(0xff000, 2)];
    assert!(check_handshake(&bad, 1 << 20, 0).is_err());
    bad.pending = vec![(0x1000, u64::MAX)];
    assert!(check_handshake(&bad, 1 << 20, 0).is_err());
    bad.pending = vec![];
    bad.chunk = 3000;
    assert!(check_handshake(&bad, 1 << 20, 0).is_err());
}
