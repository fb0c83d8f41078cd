//! The proxy's HTTP/1.1 response head parser (servers' answers): no panic, and no ambiguous framing accepted.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nonstop_proxy::fuzzing::response_head(data));
