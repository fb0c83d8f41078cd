//! A request path turned into the segments of a file under the root, refusing every way out of it.
//!
//! Each `/`-separated segment is percent-decoded on its own, so an encoded slash (`%2F`) or backslash stays inside
//! one segment and is refused there, never split into a new one. Empty and `.` segments are dropped (as nginx
//! merges slashes); `..`, NUL, `/` or `\` inside a segment, and hidden names (unless allowed) are refused. What
//! this cannot see, a symlink under the root that points out of it, the I/O shell checks on the real path.

use std::fmt;

/// Why a request path names no file under the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// A `..` segment (plain or encoded).
    Parent,
    /// A segment that decodes to a `/`, a `\` or a NUL byte.
    BadByte,
    /// A segment that is not UTF-8 once decoded.
    NotUtf8,
    /// A hidden name (`.git`, `.env`), which the route does not serve.
    Hidden(String),
    /// A path deeper than [`SEGMENTS_MAX`].
    TooDeep,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refused::Parent => f.write_str("the path has a \"..\" segment"),
            Refused::BadByte => f.write_str("a path segment decodes to a slash, a backslash or a NUL byte"),
            Refused::NotUtf8 => f.write_str("a path segment is not UTF-8 once percent-decoded"),
            Refused::Hidden(s) => write!(f, "{s:?} is a hidden name, which this route does not serve"),
            Refused::TooDeep => write!(f, "the path has more than {SEGMENTS_MAX} segments"),
        }
    }
}

/// The most segments a served path may have.
pub const SEGMENTS_MAX: usize = 64;

/// The segments of the file a request path names, relative to the root, and whether the path ends in `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relative {
    pub segments: Vec<String>,
    pub trailing_slash: bool,
}

/// Maps a request path (as sent, still percent-encoded, without the query) to segments under the root.
pub fn relative(path: &str, hidden_allowed: bool) -> Result<Relative, Refused> {
    let mut segments = Vec::new();
    for raw in path.split('/') {
        if raw.is_empty() {
            continue;
        }
        let bytes: Vec<u8> = percent_encoding::percent_decode_str(raw).collect();
        if bytes.iter().any(|&b| b == b'/' || b == b'\\' || b == 0) {
            return Err(Refused::BadByte);
        }
        let seg = String::from_utf8(bytes).map_err(|_| Refused::NotUtf8)?;
        match seg.as_str() {
            "." => continue,
            ".." => return Err(Refused::Parent),
            s if s.starts_with('.') && !hidden_allowed => return Err(Refused::Hidden(seg)),
            _ => {}
        }
        segments.push(seg);
        if segments.len() > SEGMENTS_MAX {
            return Err(Refused::TooDeep);
        }
    }
    Ok(Relative { segments, trailing_slash: path.ends_with('/') })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(p: &str) -> Vec<String> {
        relative(p, false).unwrap().segments
    }

    #[test]
    fn plain_paths_map_to_their_segments() {
        assert_eq!(segs("/a/b.css"), ["a", "b.css"]);
        assert_eq!(segs("//a///./b"), ["a", "b"]);
        assert_eq!(segs("/"), Vec::<String>::new());
        assert_eq!(segs("/caf%C3%A9%20menu.txt"), ["café menu.txt"]);
        assert!(relative("/docs/", false).unwrap().trailing_slash);
        assert!(!relative("/docs", false).unwrap().trailing_slash);
    }

    #[test]
    fn every_way_up_is_refused() {
        for p in [
            "/..",
            "/../etc/passwd",
            "/a/../../etc/passwd",
            "/%2e%2e/etc/passwd",
            "/%2E%2E/etc/passwd",
            "/.%2e/x",
            "/a/%2e%2e",
        ] {
            assert_eq!(relative(p, true), Err(Refused::Parent), "{p}");
        }
        for p in ["/..%2fetc%2fpasswd", "/a%2F..%2F..%2Fetc", "/..%5c..%5cwindows", "/a%00.txt", "/x%5C"] {
            assert_eq!(relative(p, true), Err(Refused::BadByte), "{p}");
        }
        assert_eq!(relative("/%ff%fe", true), Err(Refused::NotUtf8));
    }

    #[test]
    fn hidden_names_only_when_allowed() {
        assert_eq!(relative("/.git/config", false), Err(Refused::Hidden(".git".into())));
        assert_eq!(relative("/a/%2eenv", false), Err(Refused::Hidden(".env".into())));
        assert_eq!(relative("/.well-known/x", true).unwrap().segments, [".well-known", "x"]);
    }

    #[test]
    fn depth_is_bounded() {
        let deep = "/a".repeat(SEGMENTS_MAX + 1);
        assert_eq!(relative(&deep, false), Err(Refused::TooDeep));
        assert!(relative(&"/a".repeat(SEGMENTS_MAX), false).is_ok());
    }
}
