//! HTTP Basic authentication (RFC 7617) against hashed passwords: argon2 (PHC strings, as `nonstop
//! hash-password` makes) and bcrypt (`htpasswd -B`). Verifying a hash is slow on purpose, so the proxy runs
//! [`Users::verify`] off the event loop and remembers what passed in [`Verified`], bounded.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use base64::Engine;
use sha2::Digest;

/// A stored password hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hash {
    /// `$argon2id$v=19$m=...,t=...,p=...$salt$hash` (or argon2i, argon2d).
    Argon2(String),
    /// `$2b$10$...` (or `$2a$`, `$2y$`), 60 characters.
    Bcrypt(String),
}

impl Hash {
    /// Parses a stored hash, saying what is wrong with one nonstop cannot check.
    pub fn parse(s: &str) -> Result<Hash, String> {
        let s = s.trim();
        if s.starts_with("$argon2") {
            return match argon2::password_hash::phc::PasswordHash::new(s) {
                Ok(h) if h.hash.is_some() && h.salt.is_some() => Ok(Hash::Argon2(s.to_string())),
                Ok(_) => Err("an argon2 hash without its salt or output".to_string()),
                Err(e) => Err(format!("not a valid argon2 PHC string: {e}")),
            };
        }
        if ["$2a$", "$2b$", "$2y$"].iter().any(|p| s.starts_with(p)) {
            return match s.parse::<bcrypt::HashParts>() {
                Ok(_) => Ok(Hash::Bcrypt(s.to_string())),
                Err(e) => Err(format!("not a valid bcrypt hash: {e}")),
            };
        }
        let why = if s.starts_with("$apr1$") {
            "Apache's MD5 ($apr1$) is too weak to accept"
        } else if s.starts_with("{SHA}") {
            "an unsalted SHA-1 ({SHA}) is too weak to accept"
        } else if s.starts_with("$1$") || s.starts_with("$5$") || s.starts_with("$6$") {
            "crypt(3) hashes are not accepted"
        } else {
            "not a password hash (a password must never be written in the clear)"
        };
        Err(format!("{why}: hash it with `nonstop hash-password` (argon2id) or `htpasswd -nB USER` (bcrypt)"))
    }

    /// Whether `password` is the one hashed. Slow (tens of milliseconds): not for an event loop.
    pub fn verify(&self, password: &[u8]) -> bool {
        match self {
            Hash::Argon2(s) => {
                use argon2::password_hash::PasswordVerifier;
                let Ok(h) = argon2::password_hash::phc::PasswordHash::new(s) else { return false };
                argon2::Argon2::default().verify_password(password, &h).is_ok()
            }
            Hash::Bcrypt(s) => bcrypt::verify(password, s).unwrap_or(false),
        }
    }
}

/// Hashes `password` with argon2id and a random salt, as a PHC string to put in a config.
pub fn hash_password(password: &[u8]) -> Result<String, String> {
    use argon2::password_hash::PasswordHasher;
    argon2::Argon2::default().hash_password(password).map(|h| h.to_string()).map_err(|e| e.to_string())
}

/// Who may log in, by user name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Users {
    users: BTreeMap<String, Hash>,
}

/// A hash that matches no password, verified for an unknown user so that a wrong name takes as long to refuse as
/// a wrong password (argon2id of a random password).
const NOBODY: &str = "$argon2id$v=19$m=19456,t=2,p=1$bm9ib2R5bm9ib2R5$Y3S0Hwb1pM0zCxF4m5wE3a9jV0Gd0pKQq2vG3G4n9mE";

impl Users {
    pub fn insert(&mut self, user: String, hash: Hash) -> Option<Hash> {
        self.users.insert(user, hash)
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Whether `user` has this `password`. Slow: see [`Hash::verify`].
    pub fn verify(&self, user: &str, password: &str) -> bool {
        match self.users.get(user) {
            Some(h) => h.verify(password.as_bytes()),
            None => {
                let _ = Hash::Argon2(NOBODY.to_string()).verify(password.as_bytes());
                false
            }
        }
    }
}

/// A bad line of an htpasswd file: its number (from 1) and what is wrong with it.
pub type LineError = (usize, String);

/// Parses an htpasswd file (`user:hash` per line; blank lines and `#` comments skipped), giving each bad line's
/// number and what is wrong with it.
pub fn parse_htpasswd(text: &str) -> Result<Vec<(String, Hash)>, Vec<LineError>> {
    let (mut out, mut errors) = (Vec::new(), Vec::new());
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_once(':') {
            Some((user, hash)) if is_user_name(user) => match Hash::parse(hash) {
                Ok(h) => out.push((user.to_string(), h)),
                Err(e) => errors.push((i + 1, format!("user {user:?}: {e}"))),
            },
            Some((user, _)) => errors.push((i + 1, format!("{user:?} is not a user name ({USER_RULE})"))),
            None => errors.push((i + 1, "not of the form USER:HASH".to_string())),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// What a user name may be.
pub const USER_RULE: &str = "1 to 64 characters, none of them a colon or a control character";

pub fn is_user_name(s: &str) -> bool {
    !s.is_empty() && s.chars().count() <= 64 && !s.chars().any(|c| c == ':' || c.is_control())
}

/// Why a request's credentials were not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Missing,
    NotBasic,
    Malformed,
    Wrong,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::Missing => "credentials are required (Authorization: Basic)",
            Refusal::NotBasic => "the Authorization header is not of the Basic scheme",
            Refusal::Malformed => "the Basic credentials are not base64 of USER:PASSWORD in UTF-8",
            Refusal::Wrong => "wrong user name or password",
        })
    }
}

/// The user name and password of an `Authorization: Basic ...` value.
pub fn credentials(value: &[u8]) -> Result<(String, String), Refusal> {
    let value = std::str::from_utf8(value).map_err(|_| Refusal::Malformed)?.trim();
    let (scheme, rest) = value.split_once(' ').ok_or(Refusal::NotBasic)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(Refusal::NotBasic);
    }
    let raw = base64::engine::general_purpose::STANDARD.decode(rest.trim()).map_err(|_| Refusal::Malformed)?;
    let text = String::from_utf8(raw).map_err(|_| Refusal::Malformed)?;
    let (user, password) = text.split_once(':').ok_or(Refusal::Malformed)?;
    Ok((user.to_string(), password.to_string()))
}

/// Credentials that passed lately, as digests (never the passwords), at most `max` of them: a full set is
/// emptied, so a flood of new users costs verifies, never memory.
pub struct Verified {
    set: Mutex<HashSet<[u8; 32]>>,
    max: usize,
}

impl Verified {
    pub fn new(max: usize) -> Verified {
        Verified { set: Mutex::new(HashSet::new()), max: max.max(1) }
    }

    fn key(user: &str, password: &str) -> [u8; 32] {
        let mut h = sha2::Sha256::new();
        h.update((user.len() as u64).to_le_bytes());
        h.update(user.as_bytes());
        h.update(password.as_bytes());
        h.finalize().into()
    }

    pub fn contains(&self, user: &str, password: &str) -> bool {
        let key = Self::key(user, password);
        self.set.lock().unwrap_or_else(|e| e.into_inner()).contains(&key)
    }

    pub fn insert(&self, user: &str, password: &str) {
        let key = Self::key(user, password);
        let mut set = self.set.lock().unwrap_or_else(|e| e.into_inner());
        if set.len() >= self.max {
            set.clear();
        }
        set.insert(key);
    }

    pub fn len(&self) -> usize {
        self.set.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(s))
    }

    #[test]
    fn argon2_and_bcrypt_hashes_verify_their_password_only() {
        let a = Hash::parse(&hash_password(b"s3cret").unwrap()).unwrap();
        assert!(matches!(a, Hash::Argon2(_)));
        assert!(a.verify(b"s3cret") && !a.verify(b"s3cret ") && !a.verify(b""));
        let b = Hash::parse(&bcrypt::hash("hunter2", 4).unwrap()).unwrap();
        assert!(matches!(b, Hash::Bcrypt(_)));
        assert!(b.verify(b"hunter2") && !b.verify(b"hunter3"));
        // htpasswd -B writes $2y$.
        let y = bcrypt::hash_with_result("pw", 4).unwrap().format_for_version(bcrypt::Version::TwoY);
        assert!(Hash::parse(&y).unwrap().verify(b"pw"));
    }

    #[test]
    fn weak_or_clear_passwords_are_refused_with_a_way_out() {
        for (s, want) in [
            ("$apr1$abc$def", "Apache's MD5"),
            ("{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "unsalted SHA-1"),
            ("$6$salt$hash", "crypt(3)"),
            ("hunter2", "in the clear"),
            ("$argon2id$v=19$broken", "not a valid argon2"),
            ("$2b$10$short", "not a valid bcrypt"),
        ] {
            let e = Hash::parse(s).unwrap_err();
            assert!(e.contains(want), "{s}: {e}");
        }
        assert!(Hash::parse("hunter2").unwrap_err().contains("nonstop hash-password"));
    }

    #[test]
    fn users_verify_and_an_unknown_user_is_refused() {
        assert!(Hash::parse(NOBODY).is_ok(), "the stand-in hash is a real one, so that it takes a verify's time");
        let mut u = Users::default();
        u.insert("alice".into(), Hash::parse(&bcrypt::hash("pw", 4).unwrap()).unwrap());
        assert!(u.verify("alice", "pw"));
        assert!(!u.verify("alice", "wrong") && !u.verify("bob", "pw"));
    }

    #[test]
    fn htpasswd_lines_parse_and_bad_lines_are_numbered() {
        let good = bcrypt::hash("pw", 4).unwrap();
        let text = format!("# users\nalice:{good}\n\nbob:$apr1$x$y\nnocolon\n:{good}\n");
        let errs = parse_htpasswd(&text).unwrap_err();
        let lines: Vec<usize> = errs.iter().map(|(l, _)| *l).collect();
        assert_eq!(lines, [4, 5, 6], "{errs:?}");
        assert!(errs[0].1.contains("user \"bob\"") && errs[0].1.contains("MD5"), "{errs:?}");
        let ok = parse_htpasswd(&format!("alice:{good}\n")).unwrap();
        assert_eq!(ok[0].0, "alice");
    }

    #[test]
    fn credentials_are_read_from_a_basic_authorization() {
        assert_eq!(credentials(b64("alice:pa:ss").as_bytes()), Ok(("alice".into(), "pa:ss".into())));
        assert_eq!(credentials(format!("basic  {}", &b64("a:b")[6..]).as_bytes()), Ok(("a".into(), "b".into())));
        assert_eq!(credentials(b"Bearer xyz"), Err(Refusal::NotBasic));
        assert_eq!(credentials(b"Basic"), Err(Refusal::NotBasic));
        assert_eq!(credentials(b"Basic !!!"), Err(Refusal::Malformed));
        assert_eq!(credentials(b64("nocolon").as_bytes()), Err(Refusal::Malformed));
        assert_eq!(credentials(b"Basic \xff"), Err(Refusal::Malformed));
    }

    #[test]
    fn verified_credentials_are_remembered_as_digests_and_bounded() {
        let v = Verified::new(2);
        assert!(!v.contains("a", "1"));
        v.insert("a", "1");
        assert!(v.contains("a", "1") && !v.contains("a", "2") && !v.contains("a1", ""));
        v.insert("b", "2");
        v.insert("c", "3");
        assert!(v.len() <= 2, "bounded: {}", v.len());
        assert!(v.contains("c", "3"));
    }
}
