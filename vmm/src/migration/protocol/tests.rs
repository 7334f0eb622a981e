use std::io::{Cursor, Read};

use super::*;

fn page_data(pages: usize, seed: u8) -> Vec<u8> {
    (0..pages * PAGE_SIZE as usize)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn every_message() -> Vec<Message> {
    vec![
        Message::Hello(br#"{"vcpus":2,"mem_mib":128}"#.to_vec()),
        Message::Hello(Vec::new()),
        Message::Accept,
        Message::AcceptWith(br#"{"presend_page_tables":true}"#.to_vec()),
        Message::Refuse("not enough memory".into()),
        Message::Channel {
            session: 0xdead_beef_0123_4567,
            role: Role::Urgent,
        },
        Message::Channel {
            session: 0,
            role: Role::Main,
        },
        Message::Channel {
            session: 7,
            role: Role::Data(0),
        },
        Message::Channel {
            session: 7,
            role: Role::Data(MAX_DATA_CHANNELS - 1),
        },
        Message::Alive,
        Message::Pages {
            gpa: 0x10_0000,
            data: page_data(3, 7),
        },
        Message::Pages {
            gpa: 0,
            data: page_data(MAX_PAGES_PER_FRAME, 1),
        },
        Message::Zero {
            gpa: 0x20_0000,
            pages: 512,
        },
        Message::RoundEnd {
            round: 3,
            pages: 1234,
        },
        Message::State(br#"{"vcpus":[{"rip":4096}]}"#.to_vec()),
        Message::PostcopyStart {
            pending: vec![(0, 1), (0x1000_0000, 77), (0xffff_ffff_ffff_e000, 1)],
        },
        Message::PostcopyStart {
            pending: Vec::new(),
        },
        Message::PageRequest {
            gpa: 0x7000,
            pages: 16,
        },
        Message::Complete,
        Message::Resumed,
        Message::Abort("source: dirty rate above bandwidth".into()),
        Message::Stats(br#"{"restore_ms":12.5}"#.to_vec()),
        Message::DeviceData {
            device: 2,
            data: b"GPUT migration stream".to_vec(),
        },
    ]
}

fn encode(msgs: &[Message]) -> Vec<u8> {
    let mut w = FrameWriter::new(Vec::new());
    for m in msgs {
        w.send(m).unwrap();
    }
    w.into_inner()
}

/// A frame with a correct CRC around an arbitrary payload, to reach the payload checks.
fn raw_frame(kind: u16, seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(HEADER_LEN + payload.len());
    f.extend_from_slice(&MAGIC);
    f.extend_from_slice(&VERSION.to_le_bytes());
    f.extend_from_slice(&kind.to_le_bytes());
    f.extend_from_slice(&seq.to_le_bytes());
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&f);
    h.update(payload);
    f.extend_from_slice(&h.finalize().to_le_bytes());
    f.extend_from_slice(payload);
    f
}

fn recv_one(bytes: &[u8]) -> Result<Message, ProtocolError> {
    FrameReader::new(Cursor::new(bytes)).recv()
}

fn gpa_and(gpa: u64, tail: &[u8]) -> Vec<u8> {
    let mut p = gpa.to_le_bytes().to_vec();
    p.extend_from_slice(tail);
    p
}

fn assert_malformed(r: Result<Message, ProtocolError>, kind: &str, needle: &str) {
    match r {
        Err(ProtocolError::Malformed {
            kind: k, reason, ..
        }) => {
            assert_eq!(k, kind);
            assert!(
                reason.contains(needle),
                "reason {reason:?} lacks {needle:?}"
            );
        }
        other => panic!("expected Malformed {kind} ({needle}), got {other:?}"),
    }
}

#[test]
fn every_message_round_trips_in_order() {
    let msgs = every_message();
    let mut w = FrameWriter::new(Vec::new());
    for m in &msgs {
        w.send(m).unwrap();
    }
    assert_eq!(w.next_seq(), msgs.len() as u64);
    let sent = w.bytes_sent();
    let bytes = w.into_inner();
    assert_eq!(sent, bytes.len() as u64);

    let mut r = FrameReader::new(Cursor::new(&bytes));
    for m in &msgs {
        assert_eq!(&r.recv().unwrap(), m);
    }
    assert!(matches!(r.recv(), Err(ProtocolError::Closed)));
    assert_eq!(r.bytes_received(), sent);
    assert_eq!(r.next_seq(), msgs.len() as u64);
}

#[test]
fn send_pages_writes_the_same_frame_as_send() {
    let data = page_data(2, 9);
    let mut a = FrameWriter::new(Vec::new());
    a.send_pages(0x3000, &data).unwrap();
    let b = encode(&[Message::Pages { gpa: 0x3000, data }]);
    assert_eq!(a.into_inner(), b);
}

#[test]
fn header_layout_is_as_documented() {
    let f = encode(&[Message::Zero {
        gpa: 0x5000,
        pages: 2,
    }]);
    assert_eq!(&f[0..4], b"VMMF");
    assert_eq!(f[4..6], 3u16.to_le_bytes());
    assert_eq!(f[6..8], 6u16.to_le_bytes());
    assert_eq!(f[8..16], 0u64.to_le_bytes());
    assert_eq!(f[16..20], 16u32.to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&f[..20]);
    h.update(&f[24..]);
    assert_eq!(f[20..24], h.finalize().to_le_bytes());
    assert_eq!(f[24..32], 0x5000u64.to_le_bytes());
    assert_eq!(f[32..40], 2u64.to_le_bytes());
}

#[test]
fn message_names_match_variants() {
    let names: Vec<_> = every_message().iter().map(Message::name).collect();
    assert!(names.contains(&"PostcopyStart"));
    assert_eq!(Message::Resumed.name(), "Resumed");
    let e = ProtocolError::unexpected("Accept", &Message::Refuse("x".into()));
    assert_eq!(e.to_string(), "expected Accept, got Refuse");
}

#[test]
fn any_corrupted_byte_is_an_error_not_a_panic() {
    let frames = [
        encode(&[Message::Zero {
            gpa: 0x1000,
            pages: 1,
        }]),
        encode(&[Message::Pages {
            gpa: 0x2000,
            data: page_data(1, 3),
        }]),
        encode(&[Message::PostcopyStart {
            pending: vec![(0x1000, 2), (0x8000, 1)],
        }]),
        encode(&[Message::Accept]),
    ];
    for frame in &frames {
        for i in 0..frame.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = frame.clone();
                bad[i] ^= flip;
                let r = recv_one(&bad);
                let ok = match i {
                    0..=3 => matches!(r, Err(ProtocolError::BadMagic { .. })),
                    4..=5 => matches!(r, Err(ProtocolError::Version { .. })),
                    16..=19 => matches!(
                        r,
                        Err(ProtocolError::TooLarge { .. }
                            | ProtocolError::Truncated { .. }
                            | ProtocolError::Checksum { .. })
                    ),
                    _ => matches!(r, Err(ProtocolError::Checksum { .. })),
                };
                assert!(ok, "byte {i} ^ {flip:#x}: {r:?}");
            }
        }
    }
}

#[test]
fn wrong_version_names_both_versions() {
    let mut f = encode(&[Message::Accept]);
    f[4..6].copy_from_slice(&7u16.to_le_bytes());
    let e = recv_one(&f).unwrap_err();
    assert!(matches!(
        e,
        ProtocolError::Version {
            found: 7,
            supported: VERSION
        }
    ));
    let text = e.to_string();
    assert!(
        text.contains("version 7") && text.contains(&format!("version {VERSION}")),
        "{text}"
    );
}

#[test]
fn a_stream_from_the_previous_version_is_refused_naming_both_versions() {
    let mut f = encode(&[Message::Accept]);
    f[4..6].copy_from_slice(&2u16.to_le_bytes());
    let text = recv_one(&f).unwrap_err().to_string();
    assert_eq!(
        text,
        "peer speaks migration protocol version 2; this build supports version 3"
    );
}

/// Serves a header, then fails the test if anyone asks for more.
struct HeaderOnly(Cursor<Vec<u8>>);

impl Read for HeaderOnly {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        assert!(
            self.0.position() < HEADER_LEN as u64,
            "the reader went on to read the payload"
        );
        self.0.read(buf)
    }
}

#[test]
fn oversized_len_is_refused_before_reading_or_allocating_the_payload() {
    for len in [MAX_PAYLOAD as u32 + 1, u32::MAX] {
        let mut f = raw_frame(KIND_STATE, 0, &[]);
        f[16..20].copy_from_slice(&len.to_le_bytes());
        let mut r = FrameReader::new(HeaderOnly(Cursor::new(f)));
        match r.recv() {
            Err(ProtocolError::TooLarge {
                len: l,
                max,
                kind,
                seq: 0,
            }) => {
                assert_eq!(l, u64::from(len));
                assert_eq!(max, MAX_PAYLOAD);
                assert_eq!(kind, KIND_STATE);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(r.bytes_received(), HEADER_LEN as u64);
    }
}

#[test]
fn exactly_max_payload_is_accepted() {
    let state = vec![b'x'; MAX_PAYLOAD];
    let f = encode(&[Message::State(state.clone())]);
    assert_eq!(recv_one(&f).unwrap(), Message::State(state));
}

#[test]
fn sender_refuses_oversized_messages_without_writing() {
    let mut w = FrameWriter::new(Vec::new());
    let e = w
        .send(&Message::Hello(vec![0; MAX_PAYLOAD + 1]))
        .unwrap_err();
    assert!(
        matches!(
            e,
            ProtocolError::TooLarge {
                kind: KIND_HELLO,
                seq: 0,
                ..
            }
        ),
        "{e:?}"
    );
    let many = vec![(0u64, 1u64); MAX_PAYLOAD / 16];
    let e = w
        .send(&Message::PostcopyStart { pending: many })
        .unwrap_err();
    assert!(matches!(e, ProtocolError::TooLarge { .. }), "{e:?}");
    assert_eq!(w.bytes_sent(), 0);
    assert_eq!(w.next_seq(), 0);
    assert!(w.get_ref().is_empty());
}

#[test]
fn truncated_header_and_payload() {
    let f = encode(&[Message::Pages {
        gpa: 0x4000,
        data: page_data(1, 5),
    }]);
    for cut in [1, 10, HEADER_LEN - 1] {
        match recv_one(&f[..cut]) {
            Err(ProtocolError::Truncated {
                part: "header",
                got,
                expected: HEADER_LEN,
                kind: None,
                seq: None,
            }) => assert_eq!(got, cut),
            other => panic!("cut {cut}: {other:?}"),
        }
    }
    // Inside the gpa prefix, right after it, and one byte short of the end.
    for cut in [HEADER_LEN, HEADER_LEN + 3, HEADER_LEN + 8, f.len() - 1] {
        match recv_one(&f[..cut]) {
            Err(
                e @ ProtocolError::Truncated {
                    part: "payload",
                    kind: Some(KIND_PAGES),
                    seq: Some(0),
                    ..
                },
            ) => {
                let ProtocolError::Truncated { got, expected, .. } = e else {
                    unreachable!()
                };
                assert_eq!(got, cut - HEADER_LEN);
                assert_eq!(expected, f.len() - HEADER_LEN);
                assert!(e.to_string().contains("frame 0, Pages"), "{e}");
            }
            other => panic!("cut {cut}: {other:?}"),
        }
    }
}

#[test]
fn eof_at_a_frame_boundary_is_closed() {
    assert!(matches!(recv_one(&[]), Err(ProtocolError::Closed)));
    let f = encode(&[Message::Complete]);
    let mut r = FrameReader::new(Cursor::new(&f));
    assert_eq!(r.recv().unwrap(), Message::Complete);
    assert!(matches!(r.recv(), Err(ProtocolError::Closed)));
}

#[test]
fn out_of_order_sequence_numbers_are_refused() {
    // Two writers both start at 0: the second frame repeats seq 0.
    let mut f = encode(&[Message::Accept]);
    f.extend(encode(&[Message::Complete]));
    let mut r = FrameReader::new(Cursor::new(&f));
    r.recv().unwrap();
    assert!(matches!(
        r.recv(),
        Err(ProtocolError::Sequence {
            expected: 1,
            found: 0
        })
    ));
    // A gap.
    assert!(matches!(
        recv_one(&raw_frame(KIND_ACCEPT, 5, &[])),
        Err(ProtocolError::Sequence {
            expected: 0,
            found: 5
        })
    ));
}

#[test]
fn malformed_pages_are_refused_on_both_sides() {
    let too_many = page_data(MAX_PAGES_PER_FRAME + 1, 0);
    let cases: [(u64, &[u8], &str); 5] = [
        (0x1001, &[0; 4096], "not aligned"),
        (0x1000, &[], "no page data"),
        (0x1000, &[0; 4097], "not a multiple"),
        (0x1000, &too_many, "more than the 256"),
        (0xffff_ffff_ffff_f000, &[0; 4096], "overflows"),
    ];
    for (gpa, data, needle) in cases {
        assert_malformed(
            recv_one(&raw_frame(KIND_PAGES, 0, &gpa_and(gpa, data))),
            "Pages",
            needle,
        );
        let mut w = FrameWriter::new(Vec::new());
        let e = w.send_pages(gpa, data).map(|_| Message::Accept);
        assert_malformed(e, "Pages", needle);
        assert!(w.get_ref().is_empty());
    }
    // Shorter than the gpa itself.
    assert_malformed(
        recv_one(&raw_frame(KIND_PAGES, 0, &[1, 2, 3])),
        "Pages",
        "8-byte gpa",
    );
}

#[test]
fn zero_and_page_request_spans_are_checked() {
    let top = 0xffff_ffff_ffff_e000u64;
    assert_eq!(
        recv_one(&encode(&[Message::Zero { gpa: top, pages: 1 }])).unwrap(),
        Message::Zero { gpa: top, pages: 1 }
    );
    let zero = |gpa: u64, pages: u64| {
        let mut p = gpa.to_le_bytes().to_vec();
        p.extend_from_slice(&pages.to_le_bytes());
        recv_one(&raw_frame(KIND_ZERO, 0, &p))
    };
    assert_malformed(zero(top, 2), "Zero", "overflows");
    assert_malformed(zero(0, u64::MAX / 2), "Zero", "overflows");
    assert_malformed(zero(0x1000, 0), "Zero", "zero pages");
    assert_malformed(zero(0x10, 1), "Zero", "not aligned");
    let mut w = FrameWriter::new(Vec::new());
    let e = w
        .send(&Message::Zero { gpa: top, pages: 2 })
        .map(|_| Message::Accept);
    assert_malformed(e, "Zero", "overflows");

    let req = |gpa: u64, pages: u32| {
        let mut p = gpa.to_le_bytes().to_vec();
        p.extend_from_slice(&pages.to_le_bytes());
        recv_one(&raw_frame(KIND_PAGE_REQUEST, 0, &p))
    };
    assert_malformed(req(0x1000, 0), "PageRequest", "zero pages");
    assert_malformed(req(0x1234, 1), "PageRequest", "not aligned");
    assert_malformed(req(top, 3), "PageRequest", "overflows");
}

#[test]
fn fixed_layouts_must_have_exact_lengths() {
    // Accept carries options (JSON) or nothing; the source parses the options.
    assert_eq!(
        recv_one(&raw_frame(KIND_ACCEPT, 0, b"{}")).unwrap(),
        Message::AcceptWith(b"{}".to_vec())
    );
    assert_malformed(
        recv_one(&raw_frame(KIND_COMPLETE, 0, &[0; 3])),
        "Complete",
        "3 bytes",
    );
    assert_malformed(
        recv_one(&raw_frame(KIND_RESUMED, 0, &[0])),
        "Resumed",
        "expected 0",
    );
    assert_malformed(
        recv_one(&raw_frame(KIND_ZERO, 0, &[0; 17])),
        "Zero",
        "expected 16",
    );
    assert_malformed(
        recv_one(&raw_frame(KIND_ROUND_END, 0, &[0; 11])),
        "RoundEnd",
        "expected 12",
    );
    assert_malformed(
        recv_one(&raw_frame(KIND_PAGE_REQUEST, 0, &[0; 16])),
        "PageRequest",
        "expected 12",
    );
    assert_malformed(
        recv_one(&raw_frame(KIND_CHANNEL, 0, &[0; 10])),
        "Channel",
        "expected 9",
    );
    let mut bad_role = 9u64.to_le_bytes().to_vec();
    bad_role.push(2 + MAX_DATA_CHANNELS);
    assert_malformed(
        recv_one(&raw_frame(KIND_CHANNEL, 0, &bad_role)),
        "Channel",
        "role 10",
    );
}

#[test]
fn postcopy_start_count_must_match_the_payload() {
    let ranges = |count: u32, body: &[(u64, u64)], extra: &[u8]| {
        let mut p = count.to_le_bytes().to_vec();
        for (g, n) in body {
            p.extend_from_slice(&g.to_le_bytes());
            p.extend_from_slice(&n.to_le_bytes());
        }
        p.extend_from_slice(extra);
        recv_one(&raw_frame(KIND_POSTCOPY_START, 0, &p))
    };
    assert_malformed(
        ranges(2, &[(0, 1)], &[]),
        "PostcopyStart",
        "2 ranges need 36 bytes",
    );
    assert_malformed(ranges(1, &[(0, 1)], &[0]), "PostcopyStart", "payload is 21");
    assert_malformed(ranges(u32::MAX, &[], &[]), "PostcopyStart", "ranges need");
    assert_malformed(
        ranges(1, &[(0x1000, 0)], &[]),
        "PostcopyStart",
        "zero pages",
    );
    assert_malformed(
        recv_one(&raw_frame(KIND_POSTCOPY_START, 0, &[1, 0])),
        "PostcopyStart",
        "4-byte count",
    );
    let mut w = FrameWriter::new(Vec::new());
    let e = w
        .send(&Message::PostcopyStart {
            pending: vec![(0, 1), (0x1001, 1)],
        })
        .map(|_| Message::Accept);
    assert_malformed(e, "PostcopyStart", "not aligned");
    assert!(w.get_ref().is_empty());
}

#[test]
fn unknown_kinds_are_refused() {
    for kind in [0u16, 17, u16::MAX] {
        assert!(matches!(
            recv_one(&raw_frame(kind, 0, &[1, 2])),
            Err(ProtocolError::UnknownKind { kind: k, seq: 0 }) if k == kind
        ));
    }
}

#[test]
fn reasons_decode_lossily() {
    let f = raw_frame(KIND_REFUSE, 0, b"bad \xff byte");
    assert_eq!(
        recv_one(&f).unwrap(),
        Message::Refuse("bad \u{fffd} byte".into())
    );
    let f = raw_frame(KIND_ABORT, 0, b"");
    assert_eq!(recv_one(&f).unwrap(), Message::Abort(String::new()));
}

/// Hands out one byte per call and an `Interrupted` error in between, like a slow socket.
struct Trickle {
    data: Vec<u8>,
    pos: usize,
    interrupt: bool,
}

impl Read for Trickle {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.interrupt = !self.interrupt;
        if self.interrupt {
            return Err(std::io::ErrorKind::Interrupted.into());
        }
        match (self.data.get(self.pos), buf.first_mut()) {
            (Some(b), Some(slot)) => {
                *slot = *b;
                self.pos += 1;
                Ok(1)
            }
            _ => Ok(0),
        }
    }
}

#[test]
fn short_reads_and_interrupts_are_retried() {
    let msgs = every_message();
    let data = encode(&msgs[..8]);
    let len = data.len() as u64;
    let mut r = FrameReader::new(Trickle {
        data,
        pos: 0,
        interrupt: false,
    });
    for m in &msgs[..8] {
        assert_eq!(&r.recv().unwrap(), m);
    }
    assert!(matches!(r.recv(), Err(ProtocolError::Closed)));
    assert_eq!(r.bytes_received(), len);
}

#[test]
fn io_errors_pass_through() {
    struct Broken;
    impl Read for Broken {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::ConnectionReset.into())
        }
    }
    let e = FrameReader::new(Broken).recv().unwrap_err();
    assert!(
        matches!(&e, ProtocolError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionReset)
    );
}

#[test]
fn checksum_error_names_frame_and_both_crcs() {
    let mut f = encode(&[Message::RoundEnd { round: 1, pages: 2 }]);
    let last = f.len() - 1;
    f[last] ^= 1;
    let e = recv_one(&f).unwrap_err();
    let ProtocolError::Checksum {
        kind,
        seq,
        expected,
        found,
    } = e
    else {
        panic!("{e:?}")
    };
    assert_eq!((kind, seq), (KIND_ROUND_END, 0));
    assert_ne!(expected, found);
    let text = e.to_string();
    assert!(
        text.contains("RoundEnd") && text.contains(&format!("{expected:#010x}")),
        "{text}"
    );
}

const RAM: [(u64, u64); 2] = [(0, 0xc000_0000), (0x1_0000_0000, 0x4000_0000)];

#[test]
fn check_range_edges() {
    // Whole first region, ending exactly at its end.
    check_range(&RAM, 0, 0xc000_0000).unwrap();
    check_range(&RAM, 0xbfff_f000, 0x1000).unwrap();
    // One byte past the end, and starting at the end.
    assert!(matches!(
        check_range(&RAM, 0xbfff_f000, 0x1001),
        Err(ProtocolError::OutOfRange {
            gpa: 0xbfff_f000,
            len: 0x1001
        })
    ));
    check_range(&RAM, 0xc000_0000, 0x1000).unwrap_err();
    // The hole between the regions, and a range spanning the hole.
    check_range(&RAM, 0xd000_0000, 0x1000).unwrap_err();
    check_range(&RAM, 0xbfff_f000, 0x4000_2000).unwrap_err();
    // Second region, start and exact end.
    check_range(&RAM, 0x1_0000_0000, 0x1000).unwrap();
    check_range(&RAM, 0x1_3fff_f000, 0x1000).unwrap();
    check_range(&RAM, 0x1_3fff_f000, 0x1001).unwrap_err();
    // Overflow of gpa + len must not wrap into the first region.
    check_range(&RAM, u64::MAX - 0xfff, 0x2000).unwrap_err();
    check_range(&RAM, 0x1000, u64::MAX).unwrap_err();
    // Empty ranges and empty RAM.
    check_range(&RAM, 0x1000, 0).unwrap_err();
    check_range(&[], 0, 0x1000).unwrap_err();
    // A region reaching the top of the address space.
    let top = [(0xffff_ffff_ffff_0000u64, 0x1_0000u64)];
    check_range(&top, 0xffff_ffff_ffff_e000, 0x1000).unwrap();
    check_range(&top, 0xffff_ffff_ffff_f000, 0x1000).unwrap_err();
}

#[test]
fn device_data_carries_its_index_and_is_never_empty() {
    let frame = raw_frame(15, 0, &7u32.to_le_bytes());
    assert_malformed(recv_one(&frame), "DeviceData", "no device data");
    let frame = raw_frame(15, 0, &[1, 2]);
    assert_malformed(
        recv_one(&frame),
        "DeviceData",
        "shorter than the 4-byte device index",
    );
    let mut payload = 7u32.to_le_bytes().to_vec();
    payload.extend_from_slice(b"abc");
    match recv_one(&raw_frame(15, 0, &payload)) {
        Ok(Message::DeviceData { device, data }) => {
            assert_eq!((device, data.as_slice()), (7, &b"abc"[..]));
        }
        other => panic!("{other:?}"),
    }
    let mut w = FrameWriter::new(Vec::new());
    let empty = Message::DeviceData {
        device: 0,
        data: Vec::new(),
    };
    assert!(w.send(&empty).is_err());
    assert!(
        w.into_inner().is_empty(),
        "nothing written for a refused message"
    );
}

#[test]
fn data_channel_roles_stay_within_the_limit() {
    // The sender refuses an index past the limit; the receiver refuses its wire byte.
    let mut w = FrameWriter::new(Vec::new());
    let e = w
        .send(&Message::Channel {
            session: 1,
            role: Role::Data(MAX_DATA_CHANNELS),
        })
        .map(|_| Message::Accept);
    assert_malformed(e, "Channel", "data channel");
    assert!(w.get_ref().is_empty());
    let mut p = [0u8; 9];
    p[8] = 2 + MAX_DATA_CHANNELS;
    let e = recv_one(&raw_frame(KIND_CHANNEL, 0, &p));
    assert_malformed(e, "Channel", "role");
    p[8] = 2 + MAX_DATA_CHANNELS - 1;
    assert_eq!(
        recv_one(&raw_frame(KIND_CHANNEL, 0, &p)).unwrap(),
        Message::Channel {
            session: 0,
            role: Role::Data(MAX_DATA_CHANNELS - 1)
        }
    );
}

#[test]
fn alive_has_no_payload() {
    let e = recv_one(&raw_frame(KIND_ALIVE, 0, &[0]));
    assert_malformed(e, "Alive", "");
}
