//! nonstop's own known_hosts file (OpenSSH's format): the keys pinned per host, and the pure decision whether a
//! key a host offers is pinned, unknown or changed. There is no trust on first use: only `nonstop hosts trust`
//! adds a key.

use russh::keys::{HashAlg, PublicKey};

/// How a host appears in known_hosts: `host` on port 22, `[host]:port` otherwise (as OpenSSH writes it).
pub fn host_pattern(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_ascii_lowercase()
    } else {
        format!("[{}]:{port}", host.to_ascii_lowercase())
    }
}

/// The key's SHA-256 fingerprint as `ssh-keygen -l` prints it: `SHA256:` and unpadded base64.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// What the known_hosts file says of a key offered by a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyStatus {
    /// The offered key is pinned for this host.
    Pinned,
    /// Nothing is pinned for this host.
    Unknown,
    /// Other keys are pinned for this host (their fingerprints), not the offered one.
    Changed { pinned: Vec<String> },
}

/// One line of the file: the host patterns and the key.
#[derive(Debug, Clone)]
struct Entry {
    patterns: Vec<String>,
    key: PublicKey,
}

/// A parsed known_hosts file. Hashed names (`|1|...`), markers (`@cert-authority`, `@revoked`) and wildcards are
/// not written by nonstop and are not read either: such lines never match.
#[derive(Debug, Clone, Default)]
pub struct KnownHosts {
    entries: Vec<Entry>,
}

/// A line of the known_hosts file that is not `PATTERNS KEYTYPE BASE64 [COMMENT]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: not a known_hosts entry: {message}")]
pub struct KnownHostsError {
    pub line: usize,
    pub message: String,
}

impl KnownHosts {
    pub fn parse(text: &str) -> Result<KnownHosts, KnownHostsError> {
        let mut entries = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with('@') || line.starts_with('|') {
                continue;
            }
            let (patterns, key) = line
                .split_once(char::is_whitespace)
                .ok_or_else(|| KnownHostsError { line: i + 1, message: "no key".into() })?;
            let key = PublicKey::from_openssh(key.trim())
                .map_err(|e| KnownHostsError { line: i + 1, message: e.to_string() })?;
            let patterns = patterns.split(',').map(|p| p.to_ascii_lowercase()).collect();
            entries.push(Entry { patterns, key });
        }
        Ok(KnownHosts { entries })
    }

    /// Whether `offered` is pinned for `pattern` (see [`host_pattern`]).
    pub fn status(&self, pattern: &str, offered: &PublicKey) -> KeyStatus {
        let pinned: Vec<&Entry> = self.entries.iter().filter(|e| e.patterns.iter().any(|p| p == pattern)).collect();
        if pinned.is_empty() {
            KeyStatus::Unknown
        } else if pinned.iter().any(|e| e.key.key_data() == offered.key_data()) {
            KeyStatus::Pinned
        } else {
            KeyStatus::Changed { pinned: pinned.iter().map(|e| fingerprint(&e.key)).collect() }
        }
    }
}

/// The file's text with `key` as the one key pinned for `pattern`: the pattern is taken out of every other line
/// (a line left with no pattern goes), and `pattern KEY` is appended. Other lines are kept as they are.
pub fn pin(text: &str, pattern: &str, key: &PublicKey) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        let keep_as_is = trimmed.is_empty() || trimmed.starts_with(['#', '@', '|']);
        match trimmed.split_once(char::is_whitespace).filter(|_| !keep_as_is) {
            Some((patterns, rest)) if patterns.split(',').any(|p| p.eq_ignore_ascii_case(pattern)) => {
                let others: Vec<&str> = patterns.split(',').filter(|p| !p.eq_ignore_ascii_case(pattern)).collect();
                if !others.is_empty() {
                    out.push_str(&format!("{} {}\n", others.join(","), rest.trim_start()));
                }
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out.push_str(&format!("{pattern} {}\n", openssh_line(key)));
    out
}

/// `KEYTYPE BASE64`, without the comment.
pub fn openssh_line(key: &PublicKey) -> String {
    PublicKey::new(key.key_data().clone(), "").to_openssh().unwrap_or_default().trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEsrF+KS+MmnUvk++DIIOqxozMO4IAcolqI8QU4VcEfG";
    const B: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEmIIOrkUB6fLVPi9HIJTNeM/uQ1d8mgP4geMb8vYODw";

    fn key(s: &str) -> PublicKey {
        PublicKey::from_openssh(s).unwrap()
    }

    #[test]
    fn patterns_bracket_non_default_ports_as_openssh_does() {
        assert_eq!(host_pattern("10.0.0.5", 22), "10.0.0.5");
        assert_eq!(host_pattern("Web1.Example.com", 2222), "[web1.example.com]:2222");
    }

    #[test]
    fn a_key_is_pinned_unknown_or_changed() {
        let known =
            KnownHosts::parse(&format!("# comment\n\n[10.0.0.5]:2222 {A}\nother,10.0.0.6 {B} root@x\n")).unwrap();
        assert_eq!(known.status("[10.0.0.5]:2222", &key(A)), KeyStatus::Pinned);
        assert_eq!(known.status("10.0.0.6", &key(B)), KeyStatus::Pinned);
        assert_eq!(known.status("10.0.0.5", &key(A)), KeyStatus::Unknown, "port 22 is another entry");
        assert_eq!(known.status("[10.0.0.5]:2222", &key(B)), KeyStatus::Changed { pinned: vec![fingerprint(&key(A))] });
        assert_eq!(KnownHosts::default().status("10.0.0.6", &key(B)), KeyStatus::Unknown);
    }

    #[test]
    fn hashed_and_marker_lines_never_match_and_garbage_is_an_error() {
        let known = KnownHosts::parse(&format!("@revoked 10.0.0.5 {A}\n|1|abc=|def= {A}\n")).unwrap();
        assert_eq!(known.status("10.0.0.5", &key(A)), KeyStatus::Unknown);
        assert_eq!(KnownHosts::parse("10.0.0.5 ssh-ed25519 notbase64\n").unwrap_err().line, 1);
    }

    #[test]
    fn pinning_replaces_the_hosts_key_and_keeps_the_rest() {
        let text = format!("# mine\n[h]:2222 {A}\nh,other {A}\nkeep {B}\n");
        let new = pin(&text, "[h]:2222", &key(B));
        assert_eq!(new, format!("# mine\nh,other {A}\nkeep {B}\n[h]:2222 {B}\n"));
        let known = KnownHosts::parse(&new).unwrap();
        assert_eq!(known.status("[h]:2222", &key(B)), KeyStatus::Pinned);
        assert_eq!(known.status("h", &key(A)), KeyStatus::Pinned);
        let fingerprint = fingerprint(&key(A));
        assert!(fingerprint.starts_with("SHA256:") && !fingerprint.ends_with('='), "{fingerprint}");
    }
}
