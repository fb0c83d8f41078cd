//! Which answer a GET or HEAD of a file gets from its validators and the request's conditions (RFC 9110 §13 and
//! §14): the whole file, one range of it, 304, 412 or 416. Pure: the caller reads the headers and the file's
//! metadata, and passes them in.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What identifies one version of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validators {
    /// A strong entity tag, quoted (`"5f3a1b2c-1a2b"`).
    pub etag: String,
    /// The file's modification time, to the second (as HTTP dates carry it).
    pub modified: SystemTime,
    pub len: u64,
}

impl Validators {
    /// The validators of a file of `len` bytes modified at `modified`; `tag` tells apart variants of one file
    /// (a precompressed sibling is another representation, with an ETag of its own).
    pub fn new(len: u64, modified: SystemTime, tag: &str) -> Validators {
        let since = modified.duration_since(UNIX_EPOCH).unwrap_or_default();
        let modified = UNIX_EPOCH + Duration::from_secs(since.as_secs());
        let etag = if tag.is_empty() {
            format!("\"{:x}-{:x}\"", since.as_secs(), len)
        } else {
            format!("\"{:x}-{:x}-{tag}\"", since.as_secs(), len)
        };
        Validators { etag, modified, len }
    }

    pub fn last_modified(&self) -> String {
        httpdate::fmt_http_date(self.modified)
    }
}

/// The request's conditional and range headers, as sent (`None`: absent).
#[derive(Debug, Clone, Copy, Default)]
pub struct Conditions<'a> {
    pub if_match: Option<&'a str>,
    pub if_none_match: Option<&'a str>,
    pub if_modified_since: Option<&'a str>,
    pub if_unmodified_since: Option<&'a str>,
    pub if_range: Option<&'a str>,
    pub range: Option<&'a str>,
}

/// The answer to give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// 200 with the whole file.
    Full,
    /// 206 with the bytes `start..=end`.
    Partial { start: u64, end: u64 },
    /// 304.
    NotModified,
    /// 412.
    PreconditionFailed,
    /// 416 (with `Content-Range: bytes */len`).
    RangeNotSatisfiable,
}

/// Decides a GET (`head == false`) or HEAD of a file, in the order RFC 9110 §13.2.2 gives.
pub fn decide(head: bool, c: &Conditions<'_>, v: &Validators) -> Decision {
    if let Some(im) = c.if_match {
        if !list_matches(im, &v.etag, true) {
            return Decision::PreconditionFailed;
        }
    } else if let Some(date) = c.if_unmodified_since.and_then(parse_date) {
        if v.modified > date {
            return Decision::PreconditionFailed;
        }
    }
    if let Some(inm) = c.if_none_match {
        if list_matches(inm, &v.etag, false) {
            return Decision::NotModified;
        }
    } else if let Some(date) = c.if_modified_since.and_then(parse_date) {
        if v.modified <= date {
            return Decision::NotModified;
        }
    }
    // A range is only for GET, and only when If-Range (if any) names this very version.
    let Some(range) = c.range.filter(|_| !head) else { return Decision::Full };
    if let Some(ir) = c.if_range {
        let current = match ir.trim() {
            t if t.starts_with('"') => t == v.etag,
            t => parse_date(t) == Some(v.modified),
        };
        if !current {
            return Decision::Full;
        }
    }
    match parse_range(range, v.len) {
        RangeSpec::Ignore => Decision::Full,
        RangeSpec::Unsatisfiable => Decision::RangeNotSatisfiable,
        RangeSpec::Bytes(start, end) => Decision::Partial { start, end },
    }
}

fn parse_date(s: &str) -> Option<SystemTime> {
    httpdate::parse_http_date(s.trim()).ok()
}

/// Whether an If-Match or If-None-Match list names `etag`: strongly (both strong, same) or weakly (same opaque
/// part, either weak).
fn list_matches(list: &str, etag: &str, strong: bool) -> bool {
    list.split(',').map(str::trim).any(|t| {
        if t == "*" {
            return true;
        }
        match t.strip_prefix("W/") {
            Some(weak) => !strong && weak == etag,
            None => t == etag,
        }
    })
}

enum RangeSpec {
    /// Not a single byte range this server serves (another unit, several ranges, bad syntax): send it all.
    Ignore,
    Unsatisfiable,
    Bytes(u64, u64),
}

/// Parses `bytes=a-b`, `bytes=a-` or `bytes=-n` against a length. Several ranges are answered with the whole file,
/// which RFC 9110 §14.2 allows, rather than a multipart body.
fn parse_range(s: &str, len: u64) -> RangeSpec {
    let Some(spec) = s.trim().strip_prefix("bytes=") else { return RangeSpec::Ignore };
    if spec.contains(',') {
        return RangeSpec::Ignore;
    }
    let Some((a, b)) = spec.trim().split_once('-') else { return RangeSpec::Ignore };
    let num = |t: &str| -> Option<u64> {
        let t = t.trim();
        (!t.is_empty() && t.bytes().all(|c| c.is_ascii_digit())).then(|| t.parse().ok()).flatten()
    };
    match (a.trim().is_empty(), num(a), num(b)) {
        // bytes=-n: the last n bytes.
        (true, _, Some(n)) => {
            if n == 0 || len == 0 {
                RangeSpec::Unsatisfiable
            } else {
                RangeSpec::Bytes(len.saturating_sub(n), len - 1)
            }
        }
        (false, Some(start), end) if b.trim().is_empty() || end.is_some() => {
            if end.is_some_and(|e| e < start) {
                return RangeSpec::Ignore;
            }
            if start >= len {
                return RangeSpec::Unsatisfiable;
            }
            RangeSpec::Bytes(start, end.map_or(len - 1, |e| e.min(len - 1)))
        }
        _ => RangeSpec::Ignore,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v() -> Validators {
        Validators::new(1000, UNIX_EPOCH + Duration::from_millis(1_700_000_000_750), "")
    }

    fn get(c: Conditions<'_>) -> Decision {
        decide(false, &c, &v())
    }

    #[test]
    fn validators_are_to_the_second() {
        let v = v();
        assert_eq!(v.etag, format!("\"{:x}-3e8\"", 1_700_000_000u64));
        assert_eq!(v.last_modified(), "Tue, 14 Nov 2023 22:13:20 GMT");
        assert_ne!(Validators::new(1000, v.modified, "br").etag, v.etag);
    }

    #[test]
    fn if_none_match_and_if_modified_since_give_304() {
        let v = v();
        assert_eq!(get(Conditions { if_none_match: Some(&v.etag), ..Default::default() }), Decision::NotModified);
        let weak = format!("W/{}", v.etag);
        let list = format!("\"other\", {weak}");
        assert_eq!(get(Conditions { if_none_match: Some(&list), ..Default::default() }), Decision::NotModified);
        assert_eq!(get(Conditions { if_none_match: Some("*"), ..Default::default() }), Decision::NotModified);
        assert_eq!(get(Conditions { if_none_match: Some("\"other\""), ..Default::default() }), Decision::Full);
        let lm = v.last_modified();
        assert_eq!(get(Conditions { if_modified_since: Some(&lm), ..Default::default() }), Decision::NotModified);
        let before = "Tue, 14 Nov 2023 22:13:19 GMT";
        assert_eq!(get(Conditions { if_modified_since: Some(before), ..Default::default() }), Decision::Full);
        // If-None-Match wins over If-Modified-Since when both are sent.
        let c = Conditions { if_none_match: Some("\"other\""), if_modified_since: Some(&lm), ..Default::default() };
        assert_eq!(get(c), Decision::Full);
        // A date that does not parse is ignored.
        assert_eq!(get(Conditions { if_modified_since: Some("yesterday"), ..Default::default() }), Decision::Full);
    }

    #[test]
    fn if_match_and_if_unmodified_since_give_412() {
        let v = v();
        assert_eq!(get(Conditions { if_match: Some("\"other\""), ..Default::default() }), Decision::PreconditionFailed);
        let weak = format!("W/{}", v.etag);
        assert_eq!(get(Conditions { if_match: Some(&weak), ..Default::default() }), Decision::PreconditionFailed);
        assert_eq!(get(Conditions { if_match: Some(&v.etag), ..Default::default() }), Decision::Full);
        let before = "Tue, 14 Nov 2023 22:13:19 GMT";
        let c = Conditions { if_unmodified_since: Some(before), ..Default::default() };
        assert_eq!(get(c), Decision::PreconditionFailed);
        let lm = v.last_modified();
        assert_eq!(get(Conditions { if_unmodified_since: Some(&lm), ..Default::default() }), Decision::Full);
    }

    #[test]
    fn ranges() {
        let r = |s: &'static str| get(Conditions { range: Some(s), ..Default::default() });
        assert_eq!(r("bytes=0-499"), Decision::Partial { start: 0, end: 499 });
        assert_eq!(r("bytes=500-"), Decision::Partial { start: 500, end: 999 });
        assert_eq!(r("bytes=-100"), Decision::Partial { start: 900, end: 999 });
        assert_eq!(r("bytes=-5000"), Decision::Partial { start: 0, end: 999 });
        assert_eq!(r("bytes=900-5000"), Decision::Partial { start: 900, end: 999 });
        assert_eq!(r("bytes=1000-"), Decision::RangeNotSatisfiable);
        assert_eq!(r("bytes=-0"), Decision::RangeNotSatisfiable);
        for ignored in ["bytes=5-1", "bytes=0-1,5-9", "items=0-1", "bytes=a-b", "bytes=-", "bytes=+1-2"] {
            assert_eq!(r(ignored), Decision::Full, "{ignored}");
        }
        // HEAD never gets a range.
        let c = Conditions { range: Some("bytes=0-1"), ..Default::default() };
        assert_eq!(decide(true, &c, &v()), Decision::Full);
        let empty = Validators::new(0, UNIX_EPOCH, "");
        assert_eq!(decide(false, &c, &empty), Decision::RangeNotSatisfiable);
    }

    #[test]
    fn if_range_must_name_this_version() {
        let v = v();
        let lm = v.last_modified();
        let c = |ir: &str| get(Conditions { if_range: Some(ir), range: Some("bytes=0-9"), ..Default::default() });
        assert_eq!(c(&v.etag), Decision::Partial { start: 0, end: 9 });
        assert_eq!(c(&lm), Decision::Partial { start: 0, end: 9 });
        assert_eq!(c("\"old\""), Decision::Full);
        assert_eq!(c("Tue, 14 Nov 2023 22:13:19 GMT"), Decision::Full);
    }
}
