//! Customer tokens: short-lived credentials bound to one customer, for mobile apps.
//!
//! A key shipped inside an app is public, so an app must not hold a key that reads every
//! customer. Instead the merchant's backend (with its `app`, `pos` or `admin` key) mints a
//! token for the customer who signed in to the app; the token reads only that customer.
//!
//! Shape: `lct_<payload>.<mac>`, both unpadded base64url. The payload is
//! `v1|<merchant id>|<key id>|<expiry, unix seconds>|<external_id>`; the MAC is HMAC-SHA256 of
//! `lct_<payload>` under the signing secret of the key that minted it (a random secret per key,
//! kept in its row). So a token needs no table of its own, every replica verifies it, and
//! revoking the key that minted it revokes all its tokens.
//!
//! Pure: no I/O; time comes in as a parameter.

use std::fmt;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use crate::platform::caller::MerchantId;
use crate::platform::validation::Violation;

pub const TOKEN_PREFIX: &str = "lct_";
const PAYLOAD_VERSION: &str = "v1";
/// Longer than any token we mint (an external id is at most a few hundred bytes).
const MAX_TOKEN_CHARS: usize = 2048;

pub const DEFAULT_TTL: Duration = Duration::from_secs(15 * 60);
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

type HmacSha256 = Hmac<Sha256>;

/// A key's signing secret: 256 random bits. `Debug` never shows it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SigningSecret(pub [u8; 32]);

impl SigningSecret {
    pub fn generate() -> SigningSecret {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        SigningSecret(bytes)
    }

    /// From its stored form; `None` unless it is 32 bytes.
    pub fn from_stored(bytes: &[u8]) -> Option<SigningSecret> {
        bytes.try_into().ok().map(SigningSecret)
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC pads a key shorter than the hash's block (64 bytes) with zeros; padding it here
        // gives the same MAC through the constructor that cannot fail.
        let mut key = [0u8; 64];
        key[..32].copy_from_slice(&self.0);
        <HmacSha256 as KeyInit>::new(&key.into())
    }
}

impl fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningSecret(<redacted>)")
    }
}

/// What a token says: who minted it, for which customer, until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub merchant: MerchantId,
    pub key_id: i64,
    pub external_id: String,
    pub expires_at: DateTime<Utc>,
}

impl Claims {
    /// The token, signed with the minting key's secret.
    pub fn sign(&self, secret: &SigningSecret) -> String {
        let payload = format!(
            "{PAYLOAD_VERSION}|{}|{}|{}|{}",
            self.merchant.0,
            self.key_id,
            self.expires_at.timestamp(),
            self.external_id
        );
        let signed = format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(payload));
        let mut mac = secret.mac();
        mac.update(signed.as_bytes());
        let tag = mac.finalize().into_bytes();
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag))
    }
}

/// A token read but not yet verified: its claims say which key must verify it.
pub struct Unverified<'a> {
    pub claims: Claims,
    signed: &'a str,
    tag: Vec<u8>,
}

impl fmt::Debug for Unverified<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Unverified")
            .field("merchant", &self.claims.merchant)
            .field("key_id", &self.claims.key_id)
            .finish_non_exhaustive()
    }
}

impl<'a> Unverified<'a> {
    /// Reads a token's claims; `None` for anything not shaped like one of ours.
    pub fn parse(token: &'a str) -> Option<Unverified<'a>> {
        if token.len() > MAX_TOKEN_CHARS {
            return None;
        }
        let (signed, tag) = token.rsplit_once('.')?;
        let payload = URL_SAFE_NO_PAD
            .decode(signed.strip_prefix(TOKEN_PREFIX)?)
            .ok()?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        let payload = String::from_utf8(payload).ok()?;
        let mut parts = payload.splitn(5, '|');
        if parts.next()? != PAYLOAD_VERSION {
            return None;
        }
        let merchant = parts.next()?.parse().ok()?;
        let key_id = parts.next()?.parse().ok()?;
        let expires_at = DateTime::from_timestamp(parts.next()?.parse().ok()?, 0)?;
        let external_id = parts.next()?.to_string();
        Some(Unverified {
            claims: Claims {
                merchant: MerchantId(merchant),
                key_id,
                external_id,
                expires_at,
            },
            signed,
            tag,
        })
    }

    /// Whether the token is still valid at `now` (checked before anything is looked up).
    pub fn is_live(&self, now: DateTime<Utc>) -> bool {
        now < self.claims.expires_at
    }

    /// The claims, if the MAC is that of `secret` (compared in constant time).
    pub fn verify(self, secret: &SigningSecret) -> Option<Claims> {
        let mut mac = secret.mac();
        mac.update(self.signed.as_bytes());
        mac.verify_slice(&self.tag).ok().map(|()| self.claims)
    }
}

/// The lifetime a caller asked for: 0 means the default (15 minutes), at most 24 hours.
pub fn ttl(field: &str, seconds: u32) -> Result<Duration, Violation> {
    match u64::from(seconds) {
        0 => Ok(DEFAULT_TTL),
        s if s > MAX_TTL.as_secs() => Err(Violation::new(
            field,
            format!("must be at most {} seconds (24 hours)", MAX_TTL.as_secs()),
        )),
        s => Ok(Duration::from_secs(s)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn claims() -> Claims {
        Claims {
            merchant: MerchantId(42),
            key_id: 7,
            external_id: "card|1 ü".into(),
            expires_at: Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0).unwrap(),
        }
    }

    #[test]
    fn a_signed_token_verifies_with_its_secret_only() {
        let secret = SigningSecret::generate();
        let token = claims().sign(&secret);
        assert!(token.starts_with(TOKEN_PREFIX));
        let read = Unverified::parse(&token).unwrap();
        assert_eq!(read.claims, claims());
        assert_eq!(read.verify(&secret), Some(claims()));
        let other = SigningSecret::generate();
        assert_eq!(Unverified::parse(&token).unwrap().verify(&other), None);
        assert_eq!(format!("{secret:?}"), "SigningSecret(<redacted>)");
    }

    #[test]
    fn the_padded_key_gives_the_standard_hmac() {
        let secret = SigningSecret([7; 32]);
        let mut padded = secret.mac();
        padded.update(b"message");
        let mut standard = <HmacSha256 as Mac>::new_from_slice(&[7; 32]).unwrap();
        standard.update(b"message");
        assert_eq!(
            padded.finalize().into_bytes(),
            standard.finalize().into_bytes()
        );
    }

    #[test]
    fn a_changed_claim_breaks_the_signature() {
        let secret = SigningSecret::generate();
        let token = claims().sign(&secret);
        let (_, tag) = token.rsplit_once('.').unwrap();
        let forged = Claims {
            external_id: "card-2".into(),
            ..claims()
        }
        .sign(&SigningSecret::generate());
        let (forged_signed, _) = forged.rsplit_once('.').unwrap();
        let spliced = format!("{forged_signed}.{tag}");
        assert_eq!(Unverified::parse(&spliced).unwrap().verify(&secret), None);
    }

    #[test]
    fn expiry_is_exclusive() {
        let token = claims().sign(&SigningSecret::generate());
        let read = Unverified::parse(&token).unwrap();
        let expires_at = claims().expires_at;
        assert!(read.is_live(expires_at - chrono::Duration::seconds(1)));
        assert!(!read.is_live(expires_at));
    }

    #[test]
    fn garbage_is_not_a_token() {
        for bad in [
            "",
            "lct_",
            "lct_.",
            "lct_!!!.abc",
            "lk_abc.def",
            &format!("lct_{}.AAAA", URL_SAFE_NO_PAD.encode("v2|1|2|3|x")),
            &format!("lct_{}.AAAA", URL_SAFE_NO_PAD.encode("v1|1|2|x|x")),
            &format!("lct_{}.AAAA", URL_SAFE_NO_PAD.encode("v1|1|2|3")),
            &"lct_A".repeat(1000),
        ] {
            assert!(Unverified::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn ttl_defaults_and_bounds() {
        assert_eq!(ttl("ttl_seconds", 0), Ok(DEFAULT_TTL));
        assert_eq!(ttl("ttl_seconds", 60), Ok(Duration::from_secs(60)));
        assert_eq!(ttl("ttl_seconds", 86_400), Ok(MAX_TTL));
        assert_eq!(ttl("ttl_seconds", 86_401).unwrap_err().field, "ttl_seconds");
    }
}
