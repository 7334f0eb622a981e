//! Fuzzes the control API's request parsing: one JSON line into a `Request`, and for a
//! migration the option parsing the server does before anything starts.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::api::Request;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    match serde_json::from_str::<Request>(line.trim()) {
        Ok(Request::Migrate(params)) => {
            if let Err(e) = params.options() {
                let _ = e.to_string();
            }
        }
        Ok(req) => {
            // What parses must round-trip: the client sends what the server reads.
            let text = serde_json::to_string(&req).expect("a request encodes");
            let again: Request = serde_json::from_str(&text).expect("an encoded request parses");
            assert_eq!(again, req);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
