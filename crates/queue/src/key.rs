//! A queued request's key: 128 random bits from the operating system's generator, written as 32 lower-case hex
//! digits. It is unique forever and everywhere (across nodes, restarts and wiped stores), so it serves as the
//! Idempotency-Key of every delivery of the request, and it is unguessable, so it is the id a client reads its
//! request's status by.

use std::fmt;

/// The key of one queued request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(pub u128);

/// Hex digits of a written key.
pub const KEY_DIGITS: usize = 32;

impl Key {
    /// A fresh random key. Fails only when the operating system's random source does.
    pub fn random() -> Result<Key, getrandom::Error> {
        let mut b = [0u8; 16];
        getrandom::fill(&mut b)?;
        Ok(Key(u128::from_le_bytes(b)))
    }

    /// Reads a key written by [`fmt::Display`]: exactly 32 lower-case hex digits.
    pub fn parse(s: &str) -> Option<Key> {
        if s.len() != KEY_DIGITS || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return None;
        }
        u128::from_str_radix(s, 16).ok().map(Key)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_as_32_hex_digits_and_read_back() {
        for k in [Key(0), Key(1), Key(u128::MAX), Key(0x0123_4567_89ab_cdef_0011_2233_4455_6677)] {
            let s = k.to_string();
            assert_eq!(s.len(), KEY_DIGITS, "{s}");
            assert_eq!(Key::parse(&s), Some(k));
        }
        assert_eq!(Key(1).to_string(), "00000000000000000000000000000001");
    }

    #[test]
    fn anything_else_is_not_a_key() {
        for bad in [
            "",
            "1",
            "42",
            "0000000000000000000000000000000G",
            "0000000000000000000000000000000A",
            "+0000000000000000000000000000001",
            "000000000000000000000000000000001",
        ] {
            assert_eq!(Key::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn random_keys_differ() {
        let keys: std::collections::HashSet<Key> = (0..1000).map(|_| Key::random().unwrap()).collect();
        assert_eq!(keys.len(), 1000);
        assert!(keys.iter().any(|k| k.0 >> 64 != 0) && keys.iter().any(|k| k.0 as u64 != 0), "128 bits are used");
    }
}
