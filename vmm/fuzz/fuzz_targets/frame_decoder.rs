//! Fuzzes the migration frame decoder (`FrameReader::recv`).
//!
//! Each input is decoded twice: as a raw byte stream, and after `seal_frames` has cut it into
//! frames with a valid header and CRC, because random bytes almost never pass the CRC and the
//! payload decoders would go unexercised. Every message that decodes must re-encode with
//! `FrameWriter` and decode again to itself.

#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;

// The protocol file itself rather than the vmm crate: the build stays small (no KVM, VFIO or
// plotting crates under the sanitizer) and is not broken by unrelated work in vmm.
#[path = "../../src/peer_text.rs"]
mod peer_text;

#[path = "../../src/migration"]
mod migration {
    #[allow(dead_code)]
    pub mod protocol;
}

use migration::protocol::{
    FrameReader, FrameWriter, ProtocolError, HEADER_LEN, MAGIC, MAX_PAGES_PER_FRAME, PAGE_SIZE,
    VERSION,
};

fuzz_target!(|data: &[u8]| {
    drain(data);
    drain(&seal_frames(data));
});

fn drain(bytes: &[u8]) {
    let mut reader = FrameReader::new(Cursor::new(bytes));
    let mut writer = FrameWriter::new(Vec::new());
    let mut decoded = Vec::new();
    let err = loop {
        match reader.recv() {
            Ok(msg) => {
                if let Err(e) = writer.send(&msg) {
                    panic!("{} decoded but does not re-encode: {e}", msg.name());
                }
                decoded.push(msg);
            }
            Err(e) => break e,
        }
    };
    // Formatting every error path is part of what must not panic.
    let _ = err.to_string();
    assert!(reader.bytes_received() <= bytes.len() as u64);
    if matches!(err, ProtocolError::Closed) {
        assert_eq!(reader.bytes_received(), bytes.len() as u64);
    }

    let again = writer.into_inner();
    let mut reader = FrameReader::new(Cursor::new(&again));
    for msg in &decoded {
        match reader.recv() {
            Ok(m) => assert_eq!(&m, msg),
            Err(e) => panic!("re-encoded {} does not decode: {e}", msg.name()),
        }
    }
    assert!(matches!(reader.recv(), Err(ProtocolError::Closed)));
}

/// Cuts the input into frames with correct magic, version and CRC. Per frame, one control byte:
/// low 4 bits = kind (0..=15; 0 with 0x10 set is 16, Alive; 0 alone stays unknown), 0x80 = wrong sequence number, 0x40 = for
/// kind 5 (Pages), synthesise page data so that whole pages fit the default input size (0x20
/// then adds a stray byte, 0x10 allows more than 3 pages). Then a u16 length (or page count) and that much payload.
const SYNTH_PAGE_BUDGET: usize = MAX_PAGES_PER_FRAME + 3;

fn seal_frames(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = data;
    let mut seq = 0u64;
    let mut synthesised = 0usize;
    while let [ctl, l0, l1, tail @ ..] = rest {
        let kind = match u16::from(ctl & 0x0f) {
            0 if ctl & 0x10 != 0 => 16,
            k => k,
        };
        let n = usize::from(u16::from_le_bytes([*l0, *l1]));
        let payload: Vec<u8>;
        if kind == 5 && ctl & 0x40 != 0 {
            let (gpa, after) = tail.split_at(tail.len().min(8));
            let (fill, after) = after.split_first().map_or((0, after), |(f, a)| (*f, a));
            // Mostly a few pages; a full or oversized frame needs 0x10, and every input has a
            // page budget, since megabytes per input slow the fuzzer many times over.
            let mut pages = n % (MAX_PAGES_PER_FRAME + 4);
            if ctl & 0x10 == 0 {
                pages %= 4;
            }
            if synthesised + pages > SYNTH_PAGE_BUDGET {
                pages = 0;
            }
            synthesised += pages;
            let data_len = pages * PAGE_SIZE as usize + usize::from(ctl & 0x20 != 0);
            // vec! of a byte is one memset; a fill loop would be instrumented per byte.
            let mut p = vec![fill; gpa.len() + data_len];
            p[..gpa.len()].copy_from_slice(gpa);
            payload = p;
            rest = after;
        } else {
            let (p, after) = tail.split_at(tail.len().min(n));
            payload = p.to_vec();
            rest = after;
        }
        let frame_seq = if ctl & 0x80 != 0 { seq ^ 1 } else { seq };
        push_frame(&mut out, kind, frame_seq, &payload);
        seq += 1;
    }
    out.extend_from_slice(rest);
    out
}

fn push_frame(out: &mut Vec<u8>, kind: u16, seq: u64, payload: &[u8]) {
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&out[start..]);
    crc.update(payload);
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    debug_assert_eq!(out.len() - start, HEADER_LEN);
    out.extend_from_slice(payload);
}
