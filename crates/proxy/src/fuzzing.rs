//! Entry points for the fuzz targets in `fuzz/` (cargo-fuzz): the proxy's HTTP/1.1 request head parser, its
//! response head parser and its chunked decoder, each fed arbitrary bytes and checked against the invariants that
//! keep framing unambiguous. Not part of the proxy's API.

use http::Method;

use crate::framing::{content_length, transfer_coding, TransferCoding};

/// The header values of `name` in a raw head (`name: value` lines), for the checks.
fn raw_values<'a>(head: &'a [u8], name: &[u8]) -> Vec<&'a [u8]> {
    let mut headers = [httparse::EMPTY_HEADER; 256];
    let mut req = httparse::Request::new(&mut headers);
    let mut resp_headers = [httparse::EMPTY_HEADER; 256];
    let mut resp = httparse::Response::new(&mut resp_headers);
    let found: &[httparse::Header] = if matches!(req.parse(head), Ok(httparse::Status::Complete(_))) {
        req.headers
    } else if matches!(resp.parse(head), Ok(httparse::Status::Complete(_))) {
        resp.headers
    } else {
        &[]
    };
    found.iter().filter(|h| h.name.as_bytes().eq_ignore_ascii_case(name)).map(|h| h.value).collect()
}

/// Parses `data` as a request head the way the proxy's own HTTP/1.1 server does. Panics when a head it accepts
/// has a length another reading of the same bytes could take otherwise.
pub fn request_head(data: &[u8]) {
    let limits = crate::h1down::Limits {
        header_read_timeout: std::time::Duration::from_secs(1),
        header_bytes_max: 8192,
        header_count_max: 100,
    };
    if let Some((len, content_length_taken)) = crate::h1down::parse_for_fuzzing(data, &limits) {
        assert!(len <= data.len() && len <= limits.header_bytes_max);
        let head = &data[..len];
        let lengths = raw_values(head, b"content-length");
        for v in &lengths {
            assert_eq!(content_length(v), Some(content_length_taken), "a Content-Length read two ways");
            assert!(v.iter().all(|b| b.is_ascii_digit() || matches!(b, b' ' | b'\t' | b',')));
        }
        if lengths.is_empty() {
            assert_eq!(content_length_taken, 0);
        }
        assert!(raw_values(head, b"transfer-encoding").is_empty(), "chunked requests are hyper's");
    }
}

/// Parses `data` as a response head, to GET and to HEAD. Panics when a head it accepts is ambiguous.
pub fn response_head(data: &[u8]) {
    for method in [Method::GET, Method::HEAD] {
        let Some((status, length)) = crate::h1up::parse_for_fuzzing(data, &method) else { continue };
        assert_ne!(status, 101, "an unasked 101 is never passed on");
        let lengths = raw_values(data, b"content-length");
        let codings = raw_values(data, b"transfer-encoding");
        assert!(lengths.is_empty() || codings.is_empty(), "Content-Length and Transfer-Encoding both accepted");
        if !codings.is_empty() {
            assert_eq!(transfer_coding(codings.iter().copied()), TransferCoding::Chunked);
        }
        if let Some(n) = length {
            for v in &lengths {
                assert_eq!(content_length(v), Some(n), "a Content-Length read two ways");
            }
        }
    }
}

/// Decodes `data` as a chunked body, fed in pieces whose size comes from the first byte, and again all at once.
/// Panics when the decoder yields more bytes than it was given, or when the outcome depends on how the bytes
/// arrived.
pub fn chunked_body(data: &[u8]) {
    let Some((&split, body)) = data.split_first() else { return };
    let whole = crate::h1up::dechunk_for_fuzzing(body, body.len().max(1));
    let pieces = crate::h1up::dechunk_for_fuzzing(body, usize::from(split).max(1));
    // A line longer than a response head is refused while it arrives; whole, it may be seen complete.
    if body.len() < crate::h1up::HEAD_BYTES_MAX {
        assert_eq!(whole, pieces, "the outcome depends on how the bytes arrived");
    }
    if let Ok(Some(decoded)) = whole {
        assert!(decoded.len() <= body.len());
    }
}

#[cfg(test)]
mod tests {
    /// A fuzz target's name and its check.
    type Target = (&'static str, fn(&[u8]));

    /// The committed fuzz corpus (fuzz/corpus) passes the same checks in every test run, not only when fuzzing.
    #[test]
    fn the_fuzz_corpus_passes_its_checks() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
        let targets: [Target; 3] = [
            ("h1_request", super::request_head),
            ("h1_response", super::response_head),
            ("chunked", super::chunked_body),
        ];
        for (target, check) in targets {
            let dir = root.join(target);
            let entries: Vec<_> =
                std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).collect();
            assert!(!entries.is_empty(), "no corpus for {target}");
            for entry in entries {
                let path = entry.expect("corpus entry").path();
                check(&std::fs::read(&path).expect("read corpus entry"));
            }
        }
    }
}
