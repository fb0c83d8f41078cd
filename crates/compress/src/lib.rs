//! Response compression: which coding a client gets ([`negotiate`], RFC 9110 §12.5.3), which responses are worth
//! compressing ([`Settings::eligible`]), both pure, and a streaming [`Encoder`] for gzip, brotli and zstd whose
//! memory is bounded by its window (32 KiB for gzip, 64 KiB for brotli, 128 KiB for zstd), whatever the size of
//! the body. The proxy feeds it the server's body as it arrives and sends what comes out.

use std::io::Write;

/// A content coding nonstop can apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Zstd,
    Br,
    Gzip,
}

impl Coding {
    /// The token in Accept-Encoding and Content-Encoding.
    pub fn token(self) -> &'static str {
        match self {
            Coding::Zstd => "zstd",
            Coding::Br => "br",
            Coding::Gzip => "gzip",
        }
    }

    pub fn from_token(s: &str) -> Option<Coding> {
        [Coding::Zstd, Coding::Br, Coding::Gzip].into_iter().find(|c| c.token().eq_ignore_ascii_case(s))
    }
}

/// The coding to send a client whose Accept-Encoding values are `accept`: the one it weighs highest among
/// `offered` (ties go to the earlier in `offered`, the server's preference). `q=0` refuses a coding, `*` stands for
/// any coding not named. No header, or nothing acceptable: `None` (identity).
pub fn negotiate<'a>(accept: impl IntoIterator<Item = &'a str>, offered: &[Coding]) -> Option<Coding> {
    let mut named: Vec<(String, u16)> = Vec::new();
    let mut star: Option<u16> = None;
    for value in accept {
        for item in value.split(',') {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            if coding.is_empty() {
                continue;
            }
            let mut q = 1000u16;
            for p in parts {
                if let Some(v) = p.trim().strip_prefix("q=").or_else(|| p.trim().strip_prefix("Q=")) {
                    q = parse_q(v.trim()).unwrap_or(0);
                }
            }
            if coding == "*" {
                star = Some(q);
            } else {
                named.push((coding, q));
            }
        }
    }
    let weight = |c: Coding| {
        named.iter().find(|(n, _)| n == c.token() || (c == Coding::Gzip && n == "x-gzip")).map(|(_, q)| *q).or(star)
    };
    let mut best: Option<(Coding, u16)> = None;
    for &c in offered {
        if let Some(q) = weight(c).filter(|&q| q > 0) {
            if best.is_none_or(|(_, b)| q > b) {
                best = Some((c, q));
            }
        }
    }
    best.map(|(c, _)| c)
}

/// A qvalue in thousandths: `1`, `0.8`, `0.125`.
fn parse_q(v: &str) -> Option<u16> {
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let whole: u16 = match int {
        "0" => 0,
        "1" => 1000,
        _ => return None,
    };
    let f: u16 = if frac.is_empty() { 0 } else { format!("{frac:0<3}").parse().ok()? };
    if whole == 1000 && f > 0 {
        return None;
    }
    Some(whole + f)
}

/// Which responses a route compresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// In the server's order of preference.
    pub codings: Vec<Coding>,
    /// Media types, lower-case: `text/html`, or `text/*` for a whole type.
    pub types: Vec<String>,
    /// Responses declaring a shorter Content-Length are sent as they are (too small to gain).
    pub bytes_min: u64,
}

/// The types compressed when a route names none: text, and the structured formats that are text.
pub const DEFAULT_TYPES: &[&str] = &[
    "text/html",
    "text/plain",
    "text/css",
    "text/javascript",
    "text/xml",
    "text/csv",
    "text/markdown",
    "application/json",
    "application/javascript",
    "application/xml",
    "application/xhtml+xml",
    "application/rss+xml",
    "application/atom+xml",
    "application/problem+json",
    "application/ld+json",
    "application/manifest+json",
    "application/wasm",
    "image/svg+xml",
];

/// What [`Settings::eligible`] reads of a response.
#[derive(Debug, Clone, Copy, Default)]
pub struct Response<'a> {
    pub status: u16,
    pub content_type: Option<&'a str>,
    /// Any Content-Encoding already there.
    pub content_encoding: Option<&'a str>,
    pub content_length: Option<u64>,
    pub cache_control: Option<&'a str>,
    pub content_range: bool,
}

impl Settings {
    /// Whether this response is one to compress (for a client that accepts a coding), so that it also carries
    /// `Vary: Accept-Encoding` for clients that do not.
    pub fn eligible(&self, r: &Response<'_>) -> bool {
        // A body that is already encoded, partial, or that its sender forbids to transform stays as it is; so do
        // bodiless and interim answers, and event streams, which must not wait for a compressor's buffer.
        if !(200..300).contains(&r.status) || r.status == 204 || r.status == 206 || r.content_range {
            return false;
        }
        if r.content_encoding.is_some_and(|e| !e.trim().eq_ignore_ascii_case("identity")) {
            return false;
        }
        if r.cache_control.is_some_and(|c| c.split(',').any(|d| d.trim().eq_ignore_ascii_case("no-transform"))) {
            return false;
        }
        if r.content_length.is_some_and(|n| n < self.bytes_min) {
            return false;
        }
        let Some(ct) = r.content_type else { return false };
        let media = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        if media == "text/event-stream" {
            return false;
        }
        let (top, _) = media.split_once('/').unwrap_or((&media, ""));
        self.types.iter().any(|t| *t == media || t.strip_suffix("/*").is_some_and(|p| p == top))
    }
}

/// The compression levels: fast ones, for a proxy that compresses on the fly (nginx's gzip_comp_level is 1 by
/// default; these give most of the gain at a small cost).
const GZIP_LEVEL: u32 = 4;
const BROTLI_QUALITY: u32 = 4;
const BROTLI_WINDOW_LOG: u32 = 16;
const ZSTD_LEVEL: i32 = 3;
const ZSTD_WINDOW_LOG: u32 = 17;

enum Inner {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Br(Box<brotli::CompressorWriter<Vec<u8>>>),
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
}

/// A streaming compressor: bytes in, compressed bytes out as the coding produces them.
pub struct Encoder {
    inner: Inner,
    /// Input given since the last output was taken, that a flush would push out.
    unflushed: bool,
}

impl Encoder {
    pub fn new(coding: Coding) -> std::io::Result<Encoder> {
        let inner = match coding {
            Coding::Gzip => {
                Inner::Gzip(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(GZIP_LEVEL)))
            }
            Coding::Br => {
                Inner::Br(Box::new(brotli::CompressorWriter::new(Vec::new(), 4096, BROTLI_QUALITY, BROTLI_WINDOW_LOG)))
            }
            Coding::Zstd => {
                let mut e = zstd::stream::write::Encoder::new(Vec::new(), ZSTD_LEVEL)?;
                e.window_log(ZSTD_WINDOW_LOG)?;
                Inner::Zstd(e)
            }
        };
        Ok(Encoder { inner, unflushed: false })
    }

    fn out(&mut self) -> &mut Vec<u8> {
        match &mut self.inner {
            Inner::Gzip(e) => e.get_mut(),
            Inner::Br(e) => e.get_mut(),
            Inner::Zstd(e) => e.get_mut(),
        }
    }

    /// Compresses `data`; returns what the coding has produced so far (often nothing for small inputs).
    pub fn write(&mut self, data: &[u8]) -> std::io::Result<Vec<u8>> {
        match &mut self.inner {
            Inner::Gzip(e) => e.write_all(data)?,
            Inner::Br(e) => e.write_all(data)?,
            Inner::Zstd(e) => e.write_all(data)?,
        }
        self.unflushed = true;
        Ok(std::mem::take(self.out()))
    }

    /// Whether input went in since the last flush (so that a pause in the body should flush it).
    pub fn unflushed(&self) -> bool {
        self.unflushed
    }

    /// Pushes out everything written so far, decodable as it stands (a sync flush): for a body that pauses.
    pub fn flush(&mut self) -> std::io::Result<Vec<u8>> {
        match &mut self.inner {
            Inner::Gzip(e) => e.flush()?,
            Inner::Br(e) => e.flush()?,
            Inner::Zstd(e) => e.flush()?,
        }
        self.unflushed = false;
        Ok(std::mem::take(self.out()))
    }

    /// Ends the stream: the last bytes (and the coding's trailer).
    pub fn finish(self) -> std::io::Result<Vec<u8>> {
        match self.inner {
            Inner::Gzip(e) => e.finish(),
            Inner::Br(e) => Ok(e.into_inner()),
            Inner::Zstd(e) => e.finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    const ALL: &[Coding] = &[Coding::Zstd, Coding::Br, Coding::Gzip];

    #[test]
    fn the_clients_weights_choose_and_ties_go_to_the_servers_order() {
        assert_eq!(negotiate(["gzip, deflate, br, zstd"], ALL), Some(Coding::Zstd));
        assert_eq!(negotiate(["gzip, deflate, br"], ALL), Some(Coding::Br));
        assert_eq!(negotiate(["gzip;q=1.0, br;q=0.5"], ALL), Some(Coding::Gzip));
        assert_eq!(negotiate(["br;q=0, gzip;q=0.1"], ALL), Some(Coding::Gzip));
        assert_eq!(negotiate(["gzip"], &[Coding::Br]), None, "nothing offered is acceptable");
        assert_eq!(negotiate(["identity"], ALL), None);
        assert_eq!(negotiate([], ALL), None, "no Accept-Encoding: identity");
        assert_eq!(negotiate(["*"], ALL), Some(Coding::Zstd));
        assert_eq!(negotiate(["*;q=0.5, zstd;q=0"], ALL), Some(Coding::Br));
        assert_eq!(negotiate(["x-gzip"], ALL), Some(Coding::Gzip));
        assert_eq!(negotiate(["GZIP;Q=0.9", "br;q=0.8"], ALL), Some(Coding::Gzip), "several header lines");
        assert_eq!(negotiate(["gzip;q=2"], ALL), None, "a malformed weight refuses");
    }

    fn settings() -> Settings {
        Settings { codings: ALL.to_vec(), types: vec!["text/*".into(), "application/json".into()], bytes_min: 1024 }
    }

    #[test]
    fn only_whole_successful_unencoded_responses_of_a_listed_type_and_size_are_compressed() {
        let s = settings();
        let ok = Response { status: 200, content_type: Some("text/html; charset=utf-8"), ..Default::default() };
        assert!(s.eligible(&ok));
        assert!(s.eligible(&Response { content_type: Some("application/json"), ..ok }));
        assert!(s.eligible(&Response { content_length: Some(1024), ..ok }));
        assert!(!s.eligible(&Response { content_length: Some(1023), ..ok }), "too small to gain");
        assert!(!s.eligible(&Response { content_type: Some("image/png"), ..ok }));
        assert!(!s.eligible(&Response { content_type: None, ..ok }));
        assert!(!s.eligible(&Response { content_encoding: Some("gzip"), ..ok }), "never twice");
        assert!(s.eligible(&Response { content_encoding: Some("identity"), ..ok }));
        assert!(!s.eligible(&Response { cache_control: Some("public, no-transform"), ..ok }));
        assert!(!s.eligible(&Response { status: 206, content_range: true, ..ok }));
        assert!(!s.eligible(&Response { status: 304, ..ok }));
        assert!(!s.eligible(&Response { status: 404, ..ok }));
        assert!(!s.eligible(&Response { content_type: Some("text/event-stream"), ..ok }), "streams must not wait");
    }

    fn decode(coding: Coding, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        match coding {
            Coding::Gzip => {
                flate2::read::GzDecoder::new(bytes).read_to_end(&mut out).unwrap();
            }
            Coding::Br => {
                brotli::Decompressor::new(bytes, 4096).read_to_end(&mut out).unwrap();
            }
            Coding::Zstd => {
                zstd::stream::read::Decoder::new(bytes).unwrap().read_to_end(&mut out).unwrap();
            }
        }
        out
    }

    #[test]
    fn a_body_fed_in_pieces_comes_out_whole_and_smaller_in_every_coding() {
        let body: Vec<u8> = (0..20_000).flat_map(|i| format!("line {i}: the quick brown fox\n").into_bytes()).collect();
        for &c in ALL {
            let mut e = Encoder::new(c).unwrap();
            let mut out = Vec::new();
            for piece in body.chunks(7_001) {
                out.extend(e.write(piece).unwrap());
            }
            out.extend(e.finish().unwrap());
            assert!(out.len() * 10 < body.len(), "{c:?}: {} bytes from {}", out.len(), body.len());
            assert_eq!(decode(c, &out), body, "{c:?}");
        }
    }

    #[test]
    fn a_flush_makes_what_was_written_decodable_before_the_end() {
        for &c in ALL {
            let mut e = Encoder::new(c).unwrap();
            let mut out = e.write(b"data: first event\n\n").unwrap();
            assert!(e.unflushed());
            out.extend(e.flush().unwrap());
            assert!(!e.unflushed());
            // A streaming decoder gets the first event from the flushed bytes alone.
            let mut got = vec![0u8; 19];
            match c {
                Coding::Gzip => flate2::read::GzDecoder::new(&out[..]).read_exact(&mut got).unwrap(),
                Coding::Br => brotli::Decompressor::new(&out[..], 4096).read_exact(&mut got).unwrap(),
                Coding::Zstd => zstd::stream::read::Decoder::new(&out[..]).unwrap().read_exact(&mut got).unwrap(),
            }
            assert_eq!(&got, b"data: first event\n\n", "{c:?}");
            out.extend(e.write(b"more").unwrap());
            out.extend(e.finish().unwrap());
            assert_eq!(decode(c, &out), b"data: first event\n\nmore");
        }
    }
}
