//! The proxy's HTTP/1.1 request head parser: no panic, and no accepted head whose length another reading of the
//! same bytes could take otherwise.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nonstop_proxy::fuzzing::request_head(data));
