//! Fuzzes the page-server protocol decoder (`page_proto::recv`) on a byte stream. Each frame
//! that decodes must re-encode and decode to itself.

#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use vmm::snapshot::page_proto::{self, ProtoError};

fuzz_target!(|data: &[u8]| {
    let mut r = Cursor::new(data);
    // Each frame consumes at least a header, so this loop ends; the bound says so.
    for _ in 0..=data.len() {
        match page_proto::recv(&mut r) {
            Ok((id, msg)) => {
                let frame = page_proto::encode(id, &msg).expect("a decoded message encodes");
                let (id2, msg2) =
                    page_proto::recv(&mut Cursor::new(&frame)).expect("re-encoded decodes");
                assert_eq!((id2, &msg2), (id, &msg));
            }
            Err(e) => {
                let _ = e.to_string();
                if matches!(e, ProtoError::Closed) {
                    assert_eq!(r.position(), data.len() as u64);
                }
                return;
            }
        }
    }
    panic!("more frames than bytes");
});
