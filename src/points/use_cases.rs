//! The use cases of points: quoting a basket, recording a purchase, reading a balance and
//! paging the ledger.

use chrono::{DateTime, Utc};
use sqlx::Connection;

use crate::error::Error;
use crate::gifts;
use crate::gifts::rules::{Grant, GrantSource};
use crate::platform::account::{self, AccountState};
use crate::platform::cache::CacheRead;
use crate::platform::caller::{Caller, MerchantId};
use crate::platform::detach::detach;
use crate::platform::store::{commit, db_error};
use crate::platform::validation::Invalid;
use crate::points::Points;
use crate::points::rules::PurchaseReceipt;
use crate::points::rules::earn::{self, Earn};
use crate::points::rules::ledger::{self, LedgerEntry, PageRequest};
use crate::points::rules::lots::LotTerms;
use crate::points::rules::purchase::{Basket, Purchase, Quote};
use crate::points::store::lifecycle as lifecycle_store;
use crate::points::store::{self, RecordOutcome, StandingWrite, StoredPurchase};
use crate::programs;
use crate::programs::rules::Program;
use crate::status::rules::Trigger;
use crate::status::standing::{PurchaseFact, Standing, evaluate};
use crate::tiers::rules::TierStanding;
use std::sync::Arc;

/// A quote: what the basket earns and what the customer could spend on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quoted {
    pub earn: Earn,
    pub redeemable_points: i64,
    pub redeemable_discount_minor: i64,
}

/// One page of a customer's ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerPage {
    pub entries: Vec<LedgerEntry>,
    pub next_page_token: Option<String>,
}

impl Points {
    /// The points a basket would earn now, and (for a known customer) what they could spend
    /// on it. Reads the program, writes nothing.
    pub async fn quote_purchase(&self, caller: &Caller, quote: &Quote) -> Result<Quoted, Error> {
        let mut conn = self.store.acquire().await?;
        let version = programs::store::version(&mut conn, caller.merchant)
            .await?
            .ok_or(Error::NotFound("program"))?;
        let program = self
            .programs
            .get(&mut conn, caller.merchant, version)
            .await?;
        let at = program
            .rules
            .receipt_age
            .earning_instant(quote.basket.occurred_at, self.clock.now())?;
        let account = match &quote.external_id {
            Some(external_id) => account::load(&mut conn, caller.merchant, external_id).await?,
            None => None,
        };
        let available = account.as_ref().map_or(0, |a| a.available);
        // The tier held now earns its multiplier, as RecordPurchase applies it.
        let held = TierStanding {
            tier_id: account
                .as_ref()
                .and_then(|a| a.standing.as_ref())
                .and_then(|s| s.tier.as_ref())
                .map(|t| t.id.clone()),
            since: at,
            below_since: None,
        };
        let tier_multiplier = program.rules.tiers.earn_multiplier_bp(&held);
        drop(conn);
        let rules = &program.rules;
        let redemption = rules.lifecycle.redemption;
        let redeemable_points =
            redemption.redeemable_points(quote.basket.total_minor, available, rules.currency);
        let redeemable_discount_minor =
            redemption.discount_minor(redeemable_points, rules.currency);
        let earn = self
            .earn_off_workers(caller.merchant, program, &quote.basket, at, tier_multiplier)
            .await?;
        Ok(Quoted {
            earn,
            redeemable_points,
            redeemable_discount_minor,
        })
    }

    /// Records a purchase and earns its points, at most once per `purchase_id`.
    ///
    /// A known customer costs two round trips: the context read and one atomic statement.
    /// A new customer is enrolled in the same transaction as their first purchase, so a
    /// refused purchase leaves no customer behind. Runs to the end even if the request is
    /// abandoned (`platform::detach`): a commit always reaches the cache or its repair.
    pub async fn record_purchase(
        &self,
        caller: &Caller,
        purchase: Purchase,
    ) -> Result<PurchaseReceipt, Error> {
        let points = self.clone();
        let caller = caller.clone();
        detach(async move { points.record_purchase_attached(&caller, &purchase).await }).await
    }

    async fn record_purchase_attached(
        &self,
        caller: &Caller,
        purchase: &Purchase,
    ) -> Result<PurchaseReceipt, Error> {
        for attempt in 1..=OPTIMISTIC_ATTEMPTS + 1 {
            let locked = attempt > OPTIMISTIC_ATTEMPTS;
            match self.try_record_purchase(caller, purchase, locked).await? {
                Attempt::Answered(receipt) => return Ok(receipt),
                Attempt::VersionMoved => {
                    tracing::debug!(attempt, locked, "the account moved under a purchase");
                }
            }
        }
        Err(Error::internal(
            "a purchase found its customer's account moved under the account's own lock",
        ))
    }

    /// One attempt at recording a purchase: read the context (with the customer's standing),
    /// earn at the tier held, assess the standing with the purchase added, and write all of it
    /// in one statement conditional on the account version read. `locked`: in a transaction
    /// that first locks the account (`SELECT ... FOR UPDATE`), so the version cannot move; the
    /// fallback after [`OPTIMISTIC_ATTEMPTS`] lost races.
    async fn try_record_purchase(
        &self,
        caller: &Caller,
        purchase: &Purchase,
        locked: bool,
    ) -> Result<Attempt, Error> {
        let merchant = caller.merchant;
        // The fallback's transaction, or the one connection of the optimistic path (never
        // both: a request holds one pool connection at a time).
        let (mut tx, mut conn) = if locked {
            let mut tx = self.store.begin().await?;
            let customer_id =
                store::enroll_on_purchase(&mut tx, merchant, &purchase.external_id).await?;
            lifecycle_store::lock_account_by_id(&mut tx, merchant, customer_id, false).await?;
            (Some(tx), None)
        } else {
            (None, Some(self.store.acquire().await?))
        };
        let now = self.clock.now();
        let context = store::checkout_context(
            conn_of(&mut tx, &mut conn)?,
            merchant,
            &purchase.external_id,
            now,
        )
        .await?
        .ok_or(Error::NotFound("program"))?;
        let program = self
            .programs
            .get(
                conn_of(&mut tx, &mut conn)?,
                merchant,
                context.program_version,
            )
            .await?;
        let facts = context.standing.facts(now)?;
        let basket = &purchase.basket;
        let lifecycle = program.rules.lifecycle;
        let tier_multiplier = program.rules.tiers.earn_multiplier_bp(&facts.tier);
        let at = program
            .rules
            .receipt_age
            .earning_instant(basket.occurred_at, now);
        let earned = match at {
            Ok(at) => {
                self.earn_off_workers(merchant, program.clone(), basket, at, tier_multiplier)
                    .await
            }
            Err(refused) => Err(refused.into()),
        };
        let earned = match earned {
            Ok(earned) => earned,
            // A retry gets its original answer even if the program has changed since in a
            // way that this basket cannot earn under any more, or the receipt has grown too
            // old in the meantime (rule 3).
            Err(refused) => {
                drop(tx);
                let mut conn = match conn {
                    Some(conn) => conn,
                    None => self.store.acquire().await?,
                };
                return match store::find(&mut conn, merchant, &purchase.purchase_id).await? {
                    Some(stored) => {
                        drop(conn);
                        self.answer_replay(merchant, purchase, stored)
                            .await
                            .map(Attempt::Answered)
                    }
                    None => Err(refused),
                };
            }
        };

        let lot = LotTerms::of_purchase(&lifecycle, basket.occurred_at, now);
        // The purchase assessed as if stored: its instant, spend, visit and points count.
        let evaluation = evaluate(
            &program.rules,
            &facts,
            Some(PurchaseFact {
                at: basket.occurred_at,
                spend: basket.total_minor,
                points: earned.points,
                counted: true,
            }),
            Trigger::Purchase,
            now,
        );
        let standing = StandingWrite {
            expected_version: context.account_version(),
            evaluation: &evaluation,
            at: now,
        };
        let write = PurchaseWrite {
            merchant,
            purchase,
            earned: &earned,
            lot: &lot,
            standing: &standing,
            now,
        };
        let (outcome, gifts) = match (tx, context.customer_id, context.has_gift_rules) {
            // The hot path: a known customer and no gift rule to fire, one statement.
            (None, Some(customer_id), false) => {
                let outcome = write
                    .record(conn_of(&mut None, &mut conn)?, customer_id)
                    .await?;
                (outcome, Vec::new())
            }
            // A new customer is enrolled in the transaction of their first purchase, and the
            // gifts a purchase fires are granted in its transaction.
            (Some(tx), customer_id, has_gift_rules) => {
                write
                    .in_transaction(tx, customer_id, has_gift_rules)
                    .await?
            }
            (None, customer_id, has_gift_rules) => {
                let conn = conn
                    .as_mut()
                    .ok_or_else(|| Error::internal("a purchase attempt holds no connection"))?;
                let tx = conn.begin().await.map_err(db_error)?;
                write
                    .in_transaction(tx, customer_id, has_gift_rules)
                    .await?
            }
        };

        match outcome {
            RecordOutcome::Recorded(account) => {
                drop(conn);
                self.publisher
                    .publish(merchant, &purchase.external_id, &account)
                    .await;
                Ok(Attempt::Answered(PurchaseReceipt {
                    purchase_id: purchase.purchase_id.clone(),
                    external_id: purchase.external_id.clone(),
                    points_earned: earned.points,
                    account,
                    gifts,
                }))
            }
            RecordOutcome::AlreadyTaken | RecordOutcome::NotWritten => {
                let mut conn = match conn {
                    Some(conn) => conn,
                    None => self.store.acquire().await?,
                };
                match store::find(&mut conn, merchant, &purchase.purchase_id).await? {
                    Some(stored) => {
                        drop(conn);
                        self.answer_replay(merchant, purchase, stored)
                            .await
                            .map(Attempt::Answered)
                    }
                    None => {
                        let currency = programs::store::currency(&mut conn, merchant)
                            .await?
                            .ok_or(Error::NotFound("program"))?;
                        // The statement wrote nothing because the program's currency changed
                        // after the points were computed ...
                        if currency != basket.currency.code() {
                            return Err(Invalid::field(
                                "currency",
                                format!("must be the program currency {currency}"),
                            )
                            .into());
                        }
                        // ... or because the account moved since the context was read: read
                        // it again (the standing was computed from the old one).
                        Ok(Attempt::VersionMoved)
                    }
                }
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
        let mut receipt = replay(purchase, stored)?;
        // The first attempt may have died between its commit and its cache update (a till
        // retries exactly then): publish the customer's current state. (Not the state in the
        // receipt: into an empty cache slot that could be older than purchases made since.)
        let mut conn = self.store.acquire().await?;
        receipt.gifts =
            gifts::store::grants_of_purchase(&mut conn, merchant, &purchase.purchase_id)
                .await?
                .into_iter()
                .filter(|grant| grant.source == GrantSource::Rule)
                .collect();
        if let Some(current) = account::load(&mut conn, merchant, &receipt.external_id).await? {
            drop(conn);
            self.publisher
                .publish(merchant, &receipt.external_id, &current)
                .await;
        }
        Ok(receipt)
    }

    /// The balance, from the cache when it holds a copy at least as new as `min_version`,
    /// otherwise from Postgres (and the cache is refreshed).
    pub async fn get_balance(
        &self,
        caller: &Caller,
        external_id: &str,
        min_version: i64,
    ) -> Result<AccountState, Error> {
        caller.may_read(external_id)?;
        let cache = self.publisher.cache();
        // A copy without a standing (cached by a writer that had none) is read again.
        if let CacheRead::Hit(state) = cache.get(caller.merchant, external_id).await
            && state.version >= min_version
            && state.standing.is_some()
        {
            return Ok(state);
        }
        let mut conn = self.store.acquire().await?;
        let mut state = account::load(&mut conn, caller.merchant, external_id)
            .await?
            .ok_or(Error::NotFound("customer"))?;
        if state.standing.is_none() {
            // Never assessed (no purchase yet): NEW, and the tiers' progress from zero.
            let program = self.program(&mut conn, caller.merchant).await?;
            state.standing = Some(Box::new(Standing::initial(
                &program.rules,
                self.clock.now(),
            )));
        }
        drop(conn);
        cache.put(caller.merchant, external_id, &state).await;
        // Postgres holds the latest committed version: an older balance would break the
        // promise of `min_version`, so say why none can be given.
        if state.version < min_version {
            return Err(Error::FailedPrecondition(format!(
                "min_version {min_version} is above the latest committed version {} of this \
                 customer: no write returned it here (a token from another deployment, or \
                 writes lost in a database failover)",
                state.version
            )));
        }
        Ok(state)
    }

    pub async fn list_ledger(
        &self,
        caller: &Caller,
        external_id: &str,
        page: PageRequest,
    ) -> Result<LedgerPage, Error> {
        caller.may_read(external_id)?;
        let mut conn = self.store.acquire().await?;
        let customer_id = store::customer_id(&mut conn, caller.merchant, external_id)
            .await?
            .ok_or(Error::NotFound("customer"))?;
        let mut entries = store::ledger_page(&mut conn, caller.merchant, customer_id, page).await?;
        let next_page_token = if entries.len() > page.size {
            entries.truncate(page.size);
            entries
                .last()
                .map(|last| ledger::encode_token(last.entry_id))
        } else {
            None
        };
        Ok(LedgerPage {
            entries,
            next_page_token,
        })
    }
}

/// Optimistic attempts of a purchase (context read, then the conditional write) before it
/// falls back to locking the account: each lost attempt means another write of this very
/// customer committed in between, so a third loss in a row is a customer hammered by tills.
const OPTIMISTIC_ATTEMPTS: u32 = 3;

/// What one attempt writes.
struct PurchaseWrite<'a> {
    merchant: MerchantId,
    purchase: &'a Purchase,
    earned: &'a Earn,
    lot: &'a LotTerms,
    standing: &'a StandingWrite<'a>,
    now: DateTime<Utc>,
}

impl PurchaseWrite<'_> {
    async fn record(
        &self,
        conn: &mut sqlx::PgConnection,
        customer_id: i64,
    ) -> Result<RecordOutcome, Error> {
        store::record(
            conn,
            self.merchant,
            customer_id,
            self.purchase,
            self.earned,
            self.lot,
            self.standing,
        )
        .await
    }

    /// The purchase in `tx`: the customer enrolled if new, the gifts it fires granted;
    /// committed if recorded, rolled back otherwise.
    async fn in_transaction(
        &self,
        mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
        customer_id: Option<i64>,
        has_gift_rules: bool,
    ) -> Result<(RecordOutcome, Vec<Grant>), Error> {
        let customer_id = match customer_id {
            Some(id) => id,
            None => {
                store::enroll_on_purchase(&mut tx, self.merchant, &self.purchase.external_id)
                    .await?
            }
        };
        let outcome = self.record(&mut tx, customer_id).await?;
        let gifts = match &outcome {
            RecordOutcome::Recorded(account) if has_gift_rules => {
                gifts::store::grants_for_purchase_rules(
                    &mut tx,
                    self.merchant,
                    customer_id,
                    &self.purchase.purchase_id,
                    account.purchase_count,
                    self.standing.evaluation.tier_reached(),
                    self.now,
                )
                .await?
            }
            _ => Vec::new(),
        };
        match outcome {
            RecordOutcome::Recorded(_) => commit(tx).await?,
            RecordOutcome::AlreadyTaken | RecordOutcome::NotWritten => {
                tx.rollback().await.map_err(db_error)?
            }
        }
        Ok((outcome, gifts))
    }
}

/// How one attempt at a purchase ended.
enum Attempt {
    Answered(PurchaseReceipt),
    /// Another write of this customer committed between the read and the write.
    VersionMoved,
}

/// The connection of the open transaction, or the plain one.
fn conn_of<'a>(
    tx: &'a mut Option<sqlx::Transaction<'static, sqlx::Postgres>>,
    conn: &'a mut Option<sqlx::pool::PoolConnection<sqlx::Postgres>>,
) -> Result<&'a mut sqlx::PgConnection, Error> {
    match (tx, conn) {
        (Some(tx), _) => Ok(tx),
        (None, Some(conn)) => Ok(conn),
        (None, None) => Err(Error::internal("a purchase attempt holds no connection")),
    }
}

/// Baskets up to this many lines are earned on the async worker: they take microseconds.
const EARN_INLINE_LINES: usize = 32;

impl Points {
    /// Earns a basket. A large one (up to 500 lines, each against up to 100 promotions:
    /// about 1.5 ms in a debug build) is earned on the blocking pool, one at a time per
    /// merchant: the operating system shares the cores between it and the async workers, so a
    /// merchant sending the largest baskets its program allows slows itself, not the short
    /// requests of everyone else.
    async fn earn_off_workers(
        &self,
        merchant: MerchantId,
        program: Arc<Program>,
        basket: &Basket,
        at: DateTime<Utc>,
        tier_multiplier_bp: u32,
    ) -> Result<Earn, Error> {
        if basket.lines.len() <= EARN_INLINE_LINES {
            return Ok(earn::earn_at_tier(
                &program,
                basket,
                at,
                tier_multiplier_bp,
            )?);
        }
        let turn = self
            .large_baskets
            .of(merchant)
            .acquire_owned()
            .await
            .map_err(|_| Error::internal("the large-basket turns were closed"))?;
        let basket = basket.clone();
        let earning = tokio::task::spawn_blocking(move || {
            let earned = earn::earn_at_tier(&program, &basket, at, tier_multiplier_bp);
            drop(turn);
            earned
        });
        match earning.await {
            Ok(earned) => Ok(earned?),
            Err(error) => Err(Error::internal(format!("earning a basket failed: {error}"))),
        }
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
        gifts: Vec::new(),
    })
}
