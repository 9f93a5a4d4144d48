//! Ledger entries and the paging of a customer's history.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};

use crate::platform::validation::Violation;

pub const DEFAULT_PAGE_SIZE: usize = 50;
pub const MAX_PAGE_SIZE: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Earn,
    Redeem,
    Reserve,
    Release,
    ReturnClawback,
    Expire,
    Adjust,
    Bonus,
    /// Points spent on a purchase that was returned, given back.
    RedeemRefund,
}

impl EntryKind {
    /// The name stored in the `ledger_entries.kind` column.
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Earn => "earn",
            EntryKind::Redeem => "redeem",
            EntryKind::Reserve => "reserve",
            EntryKind::Release => "release",
            EntryKind::ReturnClawback => "return_clawback",
            EntryKind::Expire => "expire",
            EntryKind::Adjust => "adjust",
            EntryKind::Bonus => "bonus",
            EntryKind::RedeemRefund => "redeem_refund",
        }
    }

    pub fn parse(value: &str) -> Option<EntryKind> {
        Some(match value {
            "earn" => EntryKind::Earn,
            "redeem" => EntryKind::Redeem,
            "reserve" => EntryKind::Reserve,
            "release" => EntryKind::Release,
            "return_clawback" => EntryKind::ReturnClawback,
            "expire" => EntryKind::Expire,
            "adjust" => EntryKind::Adjust,
            "bonus" => EntryKind::Bonus,
            "redeem_refund" => EntryKind::RedeemRefund,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    /// Numbers the customer's own entries 1, 2, 3, ... (the account version the entry
    /// produced): it says nothing about other customers or merchants.
    pub entry_id: i64,
    pub kind: EntryKind,
    pub points: i64,
    pub reference: String,
    pub occurred_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}

/// Which page of a customer's ledger to read: entries older than `before_entry_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    pub size: usize,
    pub before_entry_id: Option<i64>,
}

/// v2: the cursor is the customer's entry sequence. (v1 tokens held a table-wide id; they are
/// refused rather than misread.)
const TOKEN_PREFIX: &str = "ledger.v2.";

impl PageRequest {
    /// `page_size` 0 means the default; sizes over the maximum are reduced to it (AIP-158).
    pub fn parse(page_size: i32, page_token: &str) -> Result<PageRequest, Violation> {
        let size = match page_size {
            ..0 => return Err(Violation::new("page_size", "must not be negative")),
            0 => DEFAULT_PAGE_SIZE,
            n => (n as usize).min(MAX_PAGE_SIZE),
        };
        let before_entry_id = if page_token.is_empty() {
            None
        } else {
            Some(decode_token(page_token).ok_or_else(|| {
                Violation::new("page_token", "is not a token returned by ListLedger")
            })?)
        };
        Ok(PageRequest {
            size,
            before_entry_id,
        })
    }
}

/// The opaque token that continues after `last_entry_id`.
pub fn encode_token(last_entry_id: i64) -> String {
    URL_SAFE_NO_PAD.encode(format!("{TOKEN_PREFIX}{last_entry_id}"))
}

fn decode_token(token: &str) -> Option<i64> {
    let bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
    let text = std::str::from_utf8(&bytes).ok()?;
    let id: i64 = text.strip_prefix(TOKEN_PREFIX)?.parse().ok()?;
    (id > 0).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip() {
        for kind in [
            EntryKind::Earn,
            EntryKind::Redeem,
            EntryKind::Reserve,
            EntryKind::Release,
            EntryKind::ReturnClawback,
            EntryKind::Expire,
            EntryKind::Adjust,
            EntryKind::Bonus,
            EntryKind::RedeemRefund,
        ] {
            assert_eq!(EntryKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(EntryKind::parse("gift"), None);
    }

    #[test]
    fn page_sizes() {
        assert_eq!(PageRequest::parse(0, "").unwrap().size, DEFAULT_PAGE_SIZE);
        assert_eq!(PageRequest::parse(7, "").unwrap().size, 7);
        assert_eq!(PageRequest::parse(1000, "").unwrap().size, MAX_PAGE_SIZE);
        assert_eq!(PageRequest::parse(-1, "").unwrap_err().field, "page_size");
    }

    #[test]
    fn tokens_round_trip_and_garbage_is_refused() {
        let token = encode_token(42);
        assert_eq!(
            PageRequest::parse(10, &token).unwrap().before_entry_id,
            Some(42)
        );
        for bad in [
            "x",
            "!!!",
            &URL_SAFE_NO_PAD.encode("ledger.v2.-5"),
            &URL_SAFE_NO_PAD.encode("ledger.v1.5"),
            &URL_SAFE_NO_PAD.encode("other.1"),
        ] {
            assert_eq!(
                PageRequest::parse(10, bad).unwrap_err().field,
                "page_token",
                "{bad}"
            );
        }
    }
}
