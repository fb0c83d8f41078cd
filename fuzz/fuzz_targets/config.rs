//! The config parser: any text gives a config or a list of errors, never a panic; every error has a line.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(errors) = nonstop_config::Config::parse(text) {
            assert!(!errors.to_string().is_empty());
        }
    }
});
