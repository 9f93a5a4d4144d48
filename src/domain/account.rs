//! A customer's account: the projection of their ledger that checkout and apps read.

/// The hot state of one customer, as stored in Postgres and cached in Redis.
/// `version` grows on every change, so two copies can always be ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AccountState {
    pub available: i64,
    pub pending: i64,
    pub lifetime_earned: i64,
    pub lifetime_redeemed: i64,
    pub purchase_count: i64,
    pub version: i64,
}

/// The outcome of recording a purchase: what the till shows. A retry gets exactly this back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurchaseReceipt {
    pub purchase_id: String,
    pub external_id: String,
    pub points_earned: i64,
    /// The account right after this purchase.
    pub account: AccountState,
}
