//! The queue's stored encodings (a queued request, a delivery status): any bytes decode or are refused, never a
//! panic, and what decodes encodes back to bytes that decode to the same value.
#![no_main]
use nonstop_queue::{QueuedRequest, Status};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some(r) = QueuedRequest::decode(data) {
        assert_eq!(QueuedRequest::decode(&r.encode()).as_ref(), Some(&r));
    }
    if let Some(s) = Status::decode(data) {
        let again = Status::decode(&s.encode()).expect("an encoded status decodes");
        assert_eq!(again.encode(), s.encode());
    }
});
