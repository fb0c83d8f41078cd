//! The chunked decoder of servers' response bodies: no panic, progress, and the same outcome however the bytes
//! arrive.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nonstop_proxy::fuzzing::chunked_body(data));
