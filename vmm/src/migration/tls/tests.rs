use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::psk::{derive_identity, parse_psk, PinnedKey};
use super::x509::authorized;
use super::*;

#[test]
fn psk_files_parse_as_qemu_writes_them_and_short_or_odd_keys_are_refused() {
    let key = "00112233445566778899aabbccddeeff";
    assert_eq!(parse_psk(key.as_bytes()).unwrap().len(), 16);
    let qemu = format!("qemu:{key}00\nother:{key}\n");
    assert_eq!(parse_psk(qemu.as_bytes()).unwrap().len(), 17);
    assert!(parse_psk(b"qemu:0011").is_err());
    assert!(parse_psk(b"zz112233445566778899aabbccddeeff").is_err());
    assert!(parse_psk(b"\n\n").is_err());
    assert!(parse_psk(b"0011223344556677889").is_err());
}

#[test]
fn one_psk_derives_one_key_and_another_a_different_one() {
    let a = derive_identity(&[7u8; 32]).unwrap();
    let b = derive_identity(&[7u8; 32]).unwrap();
    let c = derive_identity(&[8u8; 32]).unwrap();
    assert_eq!(a.spki, b.spki);
    assert_ne!(a.spki, c.spki);
    let pin = PinnedKey::new(a.spki.clone(), &provider());
    assert!(pin.check(&b.cert).is_ok());
    assert!(pin.check(&c.cert).is_err());
}

#[test]
fn exactly_one_choice_and_x509_flags_only_with_certificates() {
    let none = TransportArgs::default();
    assert!(matches!(
        Transport::choose(&none, None, None),
        Err(TlsError::NoChoice)
    ));
    let msg = TlsError::NoChoice.to_string();
    for flag in ["--tls-dir", "--tls-psk", "--insecure"] {
        assert!(msg.contains(flag), "{msg}");
    }
    let both = TransportArgs {
        tls_psk: Some("k".into()),
        insecure: true,
        ..Default::default()
    };
    assert!(matches!(
        Transport::choose(&both, None, None),
        Err(TlsError::Conflict)
    ));
    let psk = TransportArgs {
        tls_psk: Some("k".into()),
        ..Default::default()
    };
    assert!(Transport::choose(&psk, Some("src"), None).is_err());
    assert_eq!(
        Transport::choose(&TransportArgs::insecure(), None, None)
            .unwrap()
            .name(),
        "tcp-insecure"
    );
    assert_eq!(host_of("[::1]:7000"), "::1");
    assert_eq!(host_of("h.example:7"), "h.example");
}

fn psk_file(dir: &Path, name: &str, key: &str, mode: u32) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, key).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

/// A listener on loopback whose first connection is accepted with `server` in a thread.
fn serve(server: Transport) -> (String, std::thread::JoinHandle<Result<Link, TlsError>>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let acceptor = server.acceptor().unwrap();
    let t = std::thread::spawn(move || {
        let (s, peer) = l.accept().unwrap();
        acceptor.accept(s, &peer.to_string())
    });
    (addr, t)
}

#[test]
fn a_psk_link_carries_both_directions_at_once_and_a_wrong_key_fails_both_sides() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let good = psk_file(
        dir.path(),
        "a",
        "id:00112233445566778899aabbccddeeff\n",
        0o600,
    );
    let psk = Transport::Psk { file: good.clone() };
    let (addr, t) = serve(psk.clone());
    let sock = TcpStream::connect(&addr).unwrap();
    let mut client = psk.connector(&addr).unwrap().connect(sock, &addr).unwrap();
    let mut server = t.join().unwrap().unwrap();
    assert!(client.is_tls() && server.is_tls());
    // A reader blocked on each side must not hold up that side's writer.
    let mut server_r = server.try_clone().unwrap();
    let mut client_r = client.try_clone().unwrap();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let expect = data.clone();
    let got_s = std::thread::spawn(move || {
        let mut v = vec![0; expect.len()];
        server_r.read_exact(&mut v).unwrap();
        assert!(v == expect);
    });
    let expect = data.clone();
    let got_c = std::thread::spawn(move || {
        let mut v = vec![0; expect.len()];
        client_r.read_exact(&mut v).unwrap();
        assert!(v == expect);
    });
    let d = data.clone();
    let send_s = std::thread::spawn(move || server.write_all(&d).unwrap());
    client.write_all(&data).unwrap();
    send_s.join().unwrap();
    got_s.join().unwrap();
    got_c.join().unwrap();
    // EOF reads as EOF.
    drop(client);

    let bad = psk_file(dir.path(), "b", "ffeeddccbbaa99887766554433221100", 0o600);
    let (addr, t) = serve(psk);
    let sock = TcpStream::connect(&addr).unwrap();
    let e = Transport::Psk { file: bad }
        .connector(&addr)
        .unwrap()
        .connect(sock, &addr)
        .err()
        .unwrap();
    assert!(e.to_string().contains("--tls-psk"), "{e}");
    let e = t.join().unwrap().err().unwrap();
    assert!(matches!(e, TlsError::Handshake { .. }), "{e}");
}

#[test]
fn plain_tcp_to_a_tls_side_is_refused_and_open_key_files_are_refused() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let key = psk_file(dir.path(), "a", "00112233445566778899aabbccddeeff", 0o600);
    let (addr, t) = serve(Transport::Psk { file: key });
    let mut sock = TcpStream::connect(&addr).unwrap();
    sock.write_all(b"VMMG\x01\x00 a Hello frame, raw").unwrap();
    let e = t.join().unwrap().err().unwrap().to_string();
    assert!(e.contains("--insecure"), "{e}");
    let open = psk_file(dir.path(), "b", "00112233445566778899aabbccddeeff", 0o644);
    let e = Transport::Psk { file: open }.acceptor().err().unwrap();
    assert!(matches!(e, TlsError::Permissions { .. }), "{e}");
}

/// A peer that connects and says nothing, or trickles a byte at a time, is given up on
/// at the deadline of the whole handshake, named.
#[test]
fn a_silent_or_trickling_peer_times_out_the_handshake() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let key = psk_file(dir.path(), "a", "00112233445566778899aabbccddeeff", 0o600);
    let Acceptor(Some(config)) = (Transport::Psk { file: key }).acceptor().unwrap() else {
        panic!("no TLS config")
    };
    for trickle in [false, true] {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut peer = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, from) = l.accept().unwrap();
        let t = std::thread::spawn(move || {
            // A TLS record header, then one byte of its body every 50 ms.
            if trickle {
                let _ = peer.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]);
                for _ in 0..20 {
                    std::thread::sleep(Duration::from_millis(50));
                    let _ = peer.write_all(&[0]);
                }
            }
            std::thread::sleep(Duration::from_millis(600));
        });
        let conn = rustls::ServerConnection::new(config.clone()).unwrap();
        let started = Instant::now();
        let e = handshake_within(
            s,
            conn.into(),
            &from.to_string(),
            Duration::from_millis(300),
        )
        .err()
        .unwrap();
        assert!(matches!(e, TlsError::HandshakeTimeout { .. }), "{e}");
        assert!(e.to_string().contains(&from.to_string()), "{e}");
        assert!(started.elapsed() < Duration::from_millis(500), "{e}");
        t.join().unwrap();
    }
}

#[test]
fn a_subjects_common_names_are_found() {
    let mut params = rcgen::CertificateParams::new(vec!["dns.example".into()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "source-1");
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "lab");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let cert = params.self_signed(&key).unwrap();
    assert!(authorized(cert.der(), "source-1").is_ok());
    assert!(authorized(cert.der(), "dns.example").is_ok());
    assert!(authorized(cert.der(), "lab").is_err());
    assert!(authorized(cert.der(), "source").is_err());
}
