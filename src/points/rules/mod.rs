//! The pure rules of points: what a basket earns, what a purchase is, how the ledger reads.
//! No I/O; time comes in as a parameter.

pub mod earn;
pub mod ledger;
pub mod lots;
pub mod purchase;
pub mod requests;

use crate::platform::account::AccountState;

/// The outcome of recording a purchase: what the till shows. A retry gets exactly this back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurchaseReceipt {
    pub purchase_id: String,
    pub external_id: String,
    pub points_earned: i64,
    /// The account right after this purchase.
    pub account: AccountState,
    /// The gifts the purchase's rules granted, as they were granted.
    pub gifts: Vec<crate::gifts::rules::Grant>,
}
