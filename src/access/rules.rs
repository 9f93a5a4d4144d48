//! API keys: random secrets shown once, stored only as a SHA-256 hash, each with one scope.
//!
//! A plain (fast) hash is right here: keys carry 256 random bits, so there is nothing to
//! brute-force, and verifying must be cheap because it happens on every RPC.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use sha2::{Digest, Sha256};

const KEY_PREFIX: &str = "lk_";
/// 32 bytes in unpadded base64url.
const KEY_SECRET_CHARS: usize = 43;

/// A key in clear text. Exists only between generation and printing, or while a request is
/// being authenticated. `Debug` never shows it.
pub struct SecretKey(String);

impl SecretKey {
    /// 256 random bits from the operating system's generator.
    pub fn generate() -> SecretKey {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        SecretKey(format!("{KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes)))
    }

    pub fn from_header(value: &str) -> SecretKey {
        SecretKey(value.to_string())
    }

    /// Whether `value` has the shape of a key we issue (`lk_` and 43 base64url characters).
    /// Anything else cannot be a key, and is refused without asking the database.
    pub fn is_well_formed(value: &str) -> bool {
        value.strip_prefix(KEY_PREFIX).is_some_and(|secret| {
            secret.len() == KEY_SECRET_CHARS
                && secret
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn hash(&self) -> KeyHash {
        KeyHash(Sha256::digest(self.0.as_bytes()).into())
    }

    /// The first characters, enough to recognise a key in a listing, useless to an attacker.
    pub fn display_prefix(&self) -> String {
        self.0.chars().take(KEY_PREFIX.len() + 6).collect()
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// What is stored and looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash(pub [u8; 32]);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_long_random_and_hidden_from_debug() {
        let a = SecretKey::generate();
        let b = SecretKey::generate();
        assert_ne!(a.expose(), b.expose());
        assert!(a.expose().starts_with("lk_"));
        assert_eq!(a.expose().len(), 3 + 43);
        assert_eq!(format!("{a:?}"), "SecretKey(<redacted>)");
        assert_eq!(a.hash(), SecretKey::from_header(a.expose()).hash());
        assert_ne!(a.hash(), b.hash());
        assert_eq!(a.display_prefix().len(), 9);
    }

    #[test]
    fn only_keys_of_our_shape_are_well_formed() {
        let key = SecretKey::generate();
        assert!(SecretKey::is_well_formed(key.expose()));
        let secret = &key.expose()[3..];
        for bad in [
            String::new(),
            "lk_".to_string(),
            "lk_not-a-real-key".to_string(),
            secret.to_string(),
            format!("xx_{secret}"),
            format!("lk_{secret}A"),
            format!("lk_{}", &secret[1..]),
            format!("lk_{}+", &secret[1..]),
            format!("lk_{}=", &secret[1..]),
            format!("lk_{}é", &secret[2..]),
        ] {
            assert!(!SecretKey::is_well_formed(&bad), "{bad}");
        }
    }
}
