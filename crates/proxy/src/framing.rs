//! Message framing read strictly (RFC 9110 §8.6, RFC 9112 §6): the Content-Length and Transfer-Encoding values
//! that decide where a message ends, on requests from clients and on responses from servers alike. A value
//! another parser could read differently is refused, never passed on: that difference is request smuggling.

/// The length a Content-Length field value declares: `1*DIGIT`, or a comma-separated list of equal `1*DIGIT`
/// values (which RFC 9110 lets a recipient merge). Leading zeros are digits and allowed; a sign, any other
/// character, Unicode white space, an empty element, an overflow or differing values give `None`.
pub fn content_length(value: &[u8]) -> Option<u64> {
    let mut found: Option<u64> = None;
    for part in value.split(|&b| b == b',') {
        let digits = trim_ows(part);
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let mut n = 0u64;
        for &d in digits {
            n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        }
        if found.replace(n).is_some_and(|m| m != n) {
            return None;
        }
    }
    found
}

/// Whether `value` is already the canonical form of its length: digits only, no leading zero (but "0").
pub fn is_canonical_length(value: &[u8]) -> bool {
    !value.is_empty() && value.iter().all(u8::is_ascii_digit) && (value[0] != b'0' || value.len() == 1)
}

/// What the Transfer-Encoding values of a message, taken together, say about its framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferCoding {
    /// `chunked` is the last coding, and it appears only once.
    Chunked,
    /// Something else: a coding list that does not end in `chunked`, `chunked` twice, an empty element, or a
    /// name that merely contains `chunked` (`xchunked`).
    Invalid,
}

/// Reads every Transfer-Encoding value of a message, in order.
pub fn transfer_coding<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> TransferCoding {
    let mut codings = 0usize;
    let mut chunked_at = None;
    for value in values {
        for part in value.split(|&b| b == b',') {
            let token = trim_ows(part);
            // Parameters (`gzip;q=1`) are not allowed on transfer codings in a message; a token is a name.
            if token.is_empty() || !token.iter().all(|&b| is_tchar(b)) {
                return TransferCoding::Invalid;
            }
            if token.eq_ignore_ascii_case(b"chunked") {
                if chunked_at.is_some() {
                    return TransferCoding::Invalid;
                }
                chunked_at = Some(codings);
            }
            codings += 1;
        }
    }
    match chunked_at {
        Some(at) if at + 1 == codings => TransferCoding::Chunked,
        _ => TransferCoding::Invalid,
    }
}

/// The size of a chunk from its size line (without CRLF): hex digits, then optional extensions after `;`.
/// `None` for anything else: no digit, a non-hex digit, white space before the digits, or an overflow.
pub fn chunk_size(line: &[u8]) -> Option<u64> {
    let end = line.iter().position(|&b| b == b';').unwrap_or(line.len());
    // BWS is allowed before an extension's `;`, nothing else after the digits.
    let digits = trim_trailing_ws(&line[..end]);
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    let mut n = 0u64;
    for &d in digits {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            b'A'..=b'F' => d - b'A' + 10,
            _ => return None,
        };
        n = n.checked_mul(16)?.checked_add(u64::from(v))?;
    }
    if end < line.len() && line[end + 1..].iter().any(|&b| b == b'\r' || b == b'\n' || b == 0) {
        return None;
    }
    Some(n)
}

fn trim_ows(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| b != b' ' && b != b'\t').unwrap_or(s.len());
    trim_trailing_ws(&s[start..])
}

fn trim_trailing_ws(s: &[u8]) -> &[u8] {
    let end = s.iter().rposition(|&b| b != b' ' && b != b'\t').map_or(0, |i| i + 1);
    &s[..end]
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_is_digits_only() {
        assert_eq!(content_length(b"5"), Some(5));
        assert_eq!(content_length(b"0"), Some(0));
        assert_eq!(content_length(b"005"), Some(5));
        assert_eq!(content_length(b" 12\t"), Some(12));
        assert_eq!(content_length(b"7, 7,7"), Some(7));
        for bad in [
            &b""[..],
            b"+5",
            b"-5",
            b"5\xc2\xa0",
            b"\xc2\xa05",
            b"0x5",
            b"5 5",
            b"5,",
            b",5",
            b"5,6",
            b"1e3",
            b"5\x0b",
            b"99999999999999999999999",
        ] {
            assert_eq!(content_length(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn canonical_lengths() {
        assert!(is_canonical_length(b"0") && is_canonical_length(b"120"));
        assert!(!is_canonical_length(b"012") && !is_canonical_length(b"") && !is_canonical_length(b"1,1"));
    }

    #[test]
    fn chunked_must_be_the_last_coding_and_a_whole_token() {
        let one = |v: &'static [u8]| transfer_coding([v]);
        assert_eq!(one(b"chunked"), TransferCoding::Chunked);
        assert_eq!(one(b"CHUNKED"), TransferCoding::Chunked);
        assert_eq!(one(b"gzip, chunked"), TransferCoding::Chunked);
        assert_eq!(transfer_coding([&b"gzip"[..], b"chunked"]), TransferCoding::Chunked);
        for bad in [&b"xchunked"[..], b"chunkedx", b"chunked, gzip", b"chunked, chunked", b"", b"gzip", b"chunked;x=1"]
        {
            assert_eq!(one(bad), TransferCoding::Invalid, "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(transfer_coding([&b"chunked"[..], b"chunked"]), TransferCoding::Invalid);
        assert_eq!(transfer_coding(std::iter::empty()), TransferCoding::Invalid);
    }

    #[test]
    fn chunk_sizes_are_hex_with_optional_extensions() {
        assert_eq!(chunk_size(b"0"), Some(0));
        assert_eq!(chunk_size(b"1f"), Some(31));
        assert_eq!(chunk_size(b"A;name=value"), Some(10));
        assert_eq!(chunk_size(b"a ;ext"), Some(10));
        for bad in [&b""[..], b" a", b"+a", b"0x1", b"g", b"11111111111111111", b"a b", b";ext"] {
            assert_eq!(chunk_size(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
