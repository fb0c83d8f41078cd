//! Secret masking: every value of a secret, each line of a multi-line one, and their base64 forms become `***` in
//! a log line before it is stored or streamed.

use base64::Engine;

/// The text a secret is replaced with.
pub const MASK: &str = "***";
/// Shorter pieces are not masked (masking "a" would mask every a); a secret that short is reported at run start.
pub const PIECE_CHARS_MIN: usize = 3;
/// GNU base64 wraps its output at 76 characters: a long value's encoding shows as lines of this length.
const BASE64_WRAP: usize = 76;

/// Masks the secrets of one run.
#[derive(Debug, Default, Clone)]
pub struct Masker {
    /// Longest first, so that a piece that contains another is masked whole.
    needles: Vec<String>,
}

impl Masker {
    /// A masker for these secret values. Returns it and the values too short to mask, by index.
    pub fn new(values: &[String]) -> (Masker, Vec<usize>) {
        let mut needles = Vec::new();
        let mut short = Vec::new();
        for (i, v) in values.iter().enumerate() {
            let mut pieces = vec![v.clone()];
            // A multi-line value is logged line by line.
            pieces.extend(v.lines().map(|l| l.trim_end_matches('\r').to_string()));
            let engines = [
                base64::engine::general_purpose::STANDARD,
                base64::engine::general_purpose::STANDARD_NO_PAD,
                base64::engine::general_purpose::URL_SAFE,
                base64::engine::general_purpose::URL_SAFE_NO_PAD,
            ];
            // `echo "$S" | base64` encodes the trailing newline too.
            for raw in [v.clone(), format!("{v}\n")] {
                for e in &engines {
                    let encoded = e.encode(raw.as_bytes());
                    for chunk in encoded.as_bytes().chunks(BASE64_WRAP) {
                        pieces.push(String::from_utf8_lossy(chunk).into_owned());
                    }
                    pieces.push(encoded);
                }
            }
            let before = needles.len();
            for p in pieces {
                if p.chars().count() >= PIECE_CHARS_MIN && !needles.contains(&p) {
                    needles.push(p);
                }
            }
            if v.chars().count() < PIECE_CHARS_MIN || needles.len() == before {
                short.push(i);
            }
        }
        needles.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        (Masker { needles }, short)
    }

    /// The line with every secret piece replaced by [`MASK`].
    pub fn mask(&self, line: &str) -> String {
        let mut out = line.to_string();
        for n in &self.needles {
            if out.contains(n.as_str()) {
                out = out.replace(n.as_str(), MASK);
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.needles.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masker(values: &[&str]) -> Masker {
        Masker::new(&values.iter().map(|s| s.to_string()).collect::<Vec<_>>()).0
    }

    #[test]
    fn a_value_is_masked_wherever_it_appears() {
        let m = masker(&["hunter22"]);
        assert_eq!(m.mask("token=hunter22; again hunter22"), "token=***; again ***");
        assert_eq!(m.mask("nothing here"), "nothing here");
    }

    #[test]
    fn a_multi_line_value_is_masked_line_by_line() {
        let m = masker(&["-----BEGIN KEY-----\nAAAAsecretline\n-----END KEY-----"]);
        assert_eq!(m.mask("AAAAsecretline"), "***");
        assert_eq!(m.mask("x -----BEGIN KEY----- y"), "x *** y");
    }

    #[test]
    fn base64_forms_are_masked_even_when_wrapped() {
        let v = "a rather long secret value that base64 will wrap over more than one line of output";
        let m = masker(&[v]);
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{v}\n"));
        for line in b64.as_bytes().chunks(76) {
            let line = std::str::from_utf8(line).unwrap();
            assert_eq!(m.mask(line), MASK, "{line}");
        }
        let plain = base64::engine::general_purpose::STANDARD.encode(v);
        assert!(!m.mask(&format!("x {plain} y")).contains(&plain[..20]));
    }

    #[test]
    fn a_piece_inside_a_longer_one_is_masked_whole() {
        let m = masker(&["abcdef", "abcdefghij"]);
        assert_eq!(m.mask("abcdefghij"), "***");
    }

    #[test]
    fn too_short_values_are_reported_not_masked() {
        let (m, short) = Masker::new(&["ab".to_string(), "long enough".to_string()]);
        assert_eq!(short, vec![0]);
        assert_eq!(m.mask("ab"), "ab");
        assert_eq!(m.mask("long enough"), "***");
    }
}
