//! Checkout: quoting a basket and recording a purchase.

use sqlx::Connection;

use crate::domain::account::PurchaseReceipt;
use crate::domain::earn::{self, Earn};
use crate::domain::purchase::{Purchase, Quote};
use crate::error::Error;
use crate::service::{Caller, Loyalty};
use crate::storage::purchases::{self, RecordOutcome, StoredPurchase};
use crate::storage::{MerchantId, customers, programs};

impl Loyalty {
    /// The points a basket would earn now. Reads the program, writes nothing.
    pub async fn quote_purchase(&self, caller: &Caller, quote: &Quote) -> Result<Earn, Error> {
        let mut conn = self.store.acquire().await?;
        let version = programs::version(&mut conn, caller.merchant)
            .await?
            .ok_or(Error::NotFound("program"))?;
        let program = self
            .programs
            .get(&mut conn, caller.merchant, version)
            .await?;
        earn::earn(&program.rules, &quote.basket)
    }

    /// Records a purchase and earns its points, at most once per `purchase_id`.
    ///
    /// A known customer costs two round trips: the context read and one atomic statement.
    /// A new customer is enrolled in the same transaction as their first purchase, so a
    /// refused purchase leaves no customer behind.
    pub async fn record_purchase(
        &self,
        caller: &Caller,
        purchase: &Purchase,
    ) -> Result<PurchaseReceipt, Error> {
        let merchant = caller.merchant;
        let mut conn = self.store.acquire().await?;
        let (program_version, customer_id) =
            customers::checkout_context(&mut conn, merchant, &purchase.external_id)
                .await?
                .ok_or(Error::NotFound("program"))?;
        let program = self
            .programs
            .get(&mut conn, merchant, program_version)
            .await?;
        let earned = match earn::earn(&program.rules, &purchase.basket) {
            Ok(earned) => earned,
            // A retry gets its original answer even if the program has changed since in a
            // way that this basket cannot earn under any more (rule 3).
            Err(refused) => {
                return match purchases::find(&mut conn, merchant, &purchase.purchase_id).await? {
                    Some(stored) => {
                        drop(conn);
                        self.answer_replay(merchant, purchase, stored).await
                    }
                    None => Err(refused),
                };
            }
        };

        let outcome = match customer_id {
            Some(customer_id) => {
                purchases::record(&mut conn, merchant, customer_id, purchase, earned.points).await?
            }
            None => {
                let mut tx = conn.begin().await.map_err(crate::storage::db_error)?;
                let customer_id =
                    customers::enroll_on_purchase(&mut tx, merchant, &purchase.external_id).await?;
                let outcome =
                    purchases::record(&mut tx, merchant, customer_id, purchase, earned.points)
                        .await?;
                match outcome {
                    RecordOutcome::Recorded(_) => tx.commit().await,
                    RecordOutcome::AlreadyTaken => tx.rollback().await,
                }
                .map_err(crate::storage::db_error)?;
                outcome
            }
        };

        match outcome {
            RecordOutcome::Recorded(account) => {
                drop(conn);
                self.publish(merchant, &purchase.external_id, &account)
                    .await;
                Ok(PurchaseReceipt {
                    purchase_id: purchase.purchase_id.clone(),
                    external_id: purchase.external_id.clone(),
                    points_earned: earned.points,
                    account,
                })
            }
            RecordOutcome::AlreadyTaken => {
                let stored = purchases::find(&mut conn, merchant, &purchase.purchase_id)
                    .await?
                    .ok_or_else(|| Error::internal("a purchase that conflicted cannot be found"))?;
                drop(conn);
                self.answer_replay(merchant, purchase, stored).await
            }
        }
    }

    /// The answer to a purchase_id that is already taken: the stored receipt, or
    /// ALREADY_EXISTS for other content.
    async fn answer_replay(
        &self,
        merchant: MerchantId,
        purchase: &Purchase,
        stored: StoredPurchase,
    ) -> Result<PurchaseReceipt, Error> {
        let receipt = replay(purchase, stored)?;
        // The first attempt may have died between its commit and its cache update (a till
        // retries exactly then): publish the customer's current state. (Not the state in the
        // receipt: into an empty cache slot that could be older than purchases made since.)
        if let Some(current) =
            customers::account(self.store.pool(), merchant, &receipt.external_id).await?
        {
            self.publish(merchant, &receipt.external_id, &current).await;
        }
        Ok(receipt)
    }
}

/// The answer to a retry: the original response if the content is the same, ALREADY_EXISTS
/// if the purchase_id was used for a different receipt.
fn replay(purchase: &Purchase, stored: StoredPurchase) -> Result<PurchaseReceipt, Error> {
    if stored.request_hash != purchase.fingerprint() {
        return Err(Error::AlreadyExists(format!(
            "purchase_id {:?} was already recorded with different content",
            purchase.purchase_id
        )));
    }
    Ok(PurchaseReceipt {
        purchase_id: purchase.purchase_id.clone(),
        external_id: stored.external_id,
        points_earned: stored.points_earned,
        account: stored.account_after,
    })
}
