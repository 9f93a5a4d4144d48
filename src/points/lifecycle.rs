//! The use cases of the points lifecycle: redeeming, holding (and committing or releasing),
//! returning, adjusting, and the sweep that matures and expires lots and releases holds.
//!
//! Every write runs in one transaction that first locks the customer's account row, then
//! its lots, then its own row (the one lock order of `store::lifecycle`). Each is idempotent
//! by its client key: a replay gets the stored answer, the same key with other content is
//! ALREADY_EXISTS. Each runs to its end even if the request is abandoned (`detach`), and
//! publishes the committed account through the versioned cache path.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, Postgres, Transaction};

use crate::error::Error;
use crate::events::rules::NewEvent;
use crate::gifts;
use crate::gifts::rules::{Grant, GrantSource};
use crate::gifts::store::{GrantRequest, Granted};
use crate::platform::account::AccountState;
use crate::platform::audit;
use crate::platform::cache_repair::Publisher;
use crate::platform::caller::{Caller, MerchantId};
use crate::platform::detach::detach;
use crate::platform::store::commit;
use crate::platform::validation::Invalid;
use crate::points::Points;
use crate::points::rules::earn::shares;
use crate::points::rules::ledger::EntryKind;
use crate::points::rules::lots::{
    LotTerms, ReturnableLine, clawback_for, plan_clawback, refund_for, spread_amount,
};
use crate::points::rules::requests::{
    Adjustment, Claim, Hold, Redemption, ReturnRequest, Returned,
};
use crate::points::store::lifecycle::{
    self as store, AccountChange, Entry, OperationTable, ReservationRow, Stored,
};
use crate::programs;
use crate::programs::lifecycle::ReturnPolicy;
use crate::programs::rules::Program;
use crate::status::rules::Trigger;

/// The answer of a redemption (and what a replay gets back).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spent {
    pub points: i64,
    pub discount_minor: i64,
    pub account: AccountState,
}

/// The answer of a hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    pub points: i64,
    pub discount_minor: i64,
    pub expires_at: DateTime<Utc>,
    pub account: AccountState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Settlement {
    Committed,
    Released,
    /// Released by the sweep when the hold's ttl passed.
    Expired,
}

impl Settlement {
    fn as_str(self) -> &'static str {
        match self {
            Settlement::Committed => "committed",
            Settlement::Released => "released",
            Settlement::Expired => "expired",
        }
    }
}

/// The answer of a commit or release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settled {
    pub status: Settlement,
    pub points: i64,
    pub discount_minor: i64,
    pub account: AccountState,
}

/// The answer of a return.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReturnOutcome {
    pub purchase_id: String,
    pub external_id: String,
    pub returned_minor: i64,
    pub points_clawed_back: i64,
    pub points_written_off: i64,
    pub points_refunded: i64,
    /// Gifts the purchase granted, still unredeemed, revoked because all of it came back.
    #[serde(default)]
    pub gifts_revoked: u64,
    pub account: AccountState,
}

/// The answer of an adjustment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Adjusted {
    pub points: i64,
    pub account: AccountState,
}

/// The answer of a gift claim: the grant and the balance after its price.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    pub grant: Grant,
    pub account: AccountState,
}

/// What a claim stores besides its grant (which gift_grants keeps).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ClaimAnswer {
    account: AccountState,
}

/// A spend of points for a discount (a redemption or a hold), as `Points::spend` runs it.
struct Spending<'a> {
    external_id: &'a str,
    /// The idempotency table of the client key, and the key's request field.
    table: OperationTable,
    key_field: &'static str,
    key: &'a str,
    fingerprint: [u8; 32],
    points: i64,
    kind: EntryKind,
    change: AccountChange,
    /// Whether the spend is final (a redemption: its points_redeemed event is written with
    /// the account); a hold writes none (its commit does).
    redeemed_event: bool,
}

enum Spend<T> {
    /// The key was used before with this content: its stored answer.
    Replayed(T),
    Taken(Taken),
}

/// Points taken and the account written, in a transaction still open for the caller's row.
struct Taken {
    tx: Transaction<'static, Postgres>,
    customer_id: i64,
    /// The ledger entry of the debit.
    seq: i64,
    state: AccountState,
    discount_minor: i64,
}

impl Taken {
    async fn commit(
        self,
        publisher: &Publisher,
        merchant: MerchantId,
        external_id: &str,
    ) -> Result<(), Error> {
        commit(self.tx).await?;
        publisher.publish(merchant, external_id, &self.state).await;
        Ok(())
    }
}

/// What one sweep pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub holds_released: u64,
    pub lots_matured: u64,
    pub lots_expired: u64,
    pub points_expired: i64,
}

/// The stored answer of a key, or ALREADY_EXISTS if the key was used for other content.
fn replay<T>(stored: Stored<T>, fingerprint: [u8; 32], field: &str, key: &str) -> Result<T, Error> {
    if stored.request_hash != fingerprint {
        return Err(Error::AlreadyExists(format!(
            "{field} {key:?} was already used with different content"
        )));
    }
    Ok(stored.answer)
}

/// A debit must find its points in the lots; if they hold less than `available` says, the
/// projection is broken and nothing is written.
fn all_taken(taken: i64, points: i64) -> Result<(), Error> {
    if taken != points {
        return Err(Error::internal(format!(
            "the lots hold {taken} of the {points} available points being spent"
        )));
    }
    Ok(())
}

/// What of a credit of `points` stays in a lot: a negative balance (a return's debt) is
/// repaid first.
fn kept_after_debt(available: i64, points: i64) -> i64 {
    (available + points).max(0) - available.max(0)
}

pub use crate::points::store::lifecycle::LockedAccount;

/// Locks a customer's account (by internal id) in the caller's transaction, waiting for a
/// writer that holds it: the first lock of a movement another feature makes (the greeting
/// job, before it credits a birthday's bonus). `None` if the customer has no account.
pub async fn lock_account(
    conn: &mut PgConnection,
    merchant: MerchantId,
    customer_id: i64,
) -> Result<Option<LockedAccount>, Error> {
    store::lock_account_by_id(conn, merchant, customer_id, false).await
}

/// Credits `points` (> 0) as a BONUS to an account the caller's transaction has locked
/// ([`lock_account`]): the ledger entry (reference: the caller's key, unique per merchant, so
/// a second credit under one key fails instead of paying twice), a lot under the program's
/// expiry (a debt is repaid first), and the account. Returns the account as it will commit;
/// the caller publishes it to the cache after its commit. It writes no event: the caller's
/// own event (e.g. greeting_due) carries the balance after the bonus.
pub async fn credit_bonus(
    conn: &mut PgConnection,
    merchant: MerchantId,
    account: &LockedAccount,
    points: i64,
    reference: &str,
    expiry: programs::lifecycle::ExpiryPolicy,
    now: DateTime<Utc>,
) -> Result<AccountState, Error> {
    if points <= 0 {
        return Err(Error::internal(format!("a bonus of {points} points")));
    }
    let customer = account.customer_id;
    store::insert_entry(
        conn,
        merchant,
        customer,
        &Entry {
            seq: account.version + 1,
            kind: EntryKind::Bonus,
            points,
            reference,
            occurred_at: now,
        },
    )
    .await?;
    let terms = LotTerms::of_credit(expiry, account.last_purchase_at, now);
    store::insert_lot(
        conn,
        merchant,
        customer,
        EntryKind::Bonus.as_str(),
        reference,
        points,
        kept_after_debt(account.available, points),
        now,
        &terms,
    )
    .await?;
    let change = AccountChange {
        available: points,
        versions: 1,
        ..AccountChange::default()
    };
    store::write_account(conn, merchant, customer, change, None)
        .await?
        .ok_or_else(|| Error::internal("a credited account was not written"))
}

impl Points {
    /// The merchant's program as it is now (its version read, the rules from the cache).
    pub(crate) async fn program(
        &self,
        conn: &mut PgConnection,
        merchant: MerchantId,
    ) -> Result<Arc<Program>, Error> {
        let version = programs::store::version(conn, merchant)
            .await?
            .ok_or(Error::NotFound("program"))?;
        self.programs.get(conn, merchant, version).await
    }

    /// Spends points for a discount, soonest-expiring first.
    pub async fn redeem(&self, caller: &Caller, redemption: Redemption) -> Result<Spent, Error> {
        let points = self.clone();
        let merchant = caller.merchant;
        detach(async move { points.redeem_attached(merchant, &redemption).await }).await
    }

    async fn redeem_attached(&self, merchant: MerchantId, r: &Redemption) -> Result<Spent, Error> {
        let spend = Spending {
            external_id: &r.external_id,
            table: OperationTable::Redemptions,
            key_field: "redemption_id",
            key: &r.redemption_id,
            fingerprint: r.fingerprint(),
            points: r.points,
            kind: EntryKind::Redeem,
            // A redemption is spent for good: one entry, and the points count as redeemed.
            change: AccountChange {
                available: -r.points,
                lifetime_redeemed: r.points,
                versions: 1,
                debit: true,
                ..AccountChange::default()
            },
            redeemed_event: true,
        };
        let mut taken = match self.spend(merchant, &spend).await? {
            Spend::Replayed(answer) => return Ok(answer),
            Spend::Taken(taken) => taken,
        };
        let answer = Spent {
            points: r.points,
            discount_minor: taken.discount_minor,
            account: taken.state.clone(),
        };
        store::insert_redemption(
            &mut taken.tx,
            merchant,
            &store::RedemptionRow {
                redemption_id: &r.redemption_id,
                customer_id: taken.customer_id,
                points: r.points,
                discount_minor: answer.discount_minor,
                purchase_id: r.purchase_id.as_deref(),
                request_hash: &spend.fingerprint,
                answer: &answer,
            },
        )
        .await?;
        taken
            .commit(&self.publisher, merchant, &r.external_id)
            .await?;
        Ok(answer)
    }

    /// Holds points while the till takes payment.
    pub async fn reserve(&self, caller: &Caller, hold: Hold) -> Result<Held, Error> {
        let points = self.clone();
        let merchant = caller.merchant;
        detach(async move { points.reserve_attached(merchant, &hold).await }).await
    }

    async fn reserve_attached(&self, merchant: MerchantId, h: &Hold) -> Result<Held, Error> {
        let now = self.clock.now();
        let spend = Spending {
            external_id: &h.external_id,
            table: OperationTable::Reservations,
            key_field: "reservation_id",
            key: &h.reservation_id,
            fingerprint: h.fingerprint(),
            points: h.points,
            kind: EntryKind::Reserve,
            // Held points leave `available` at once; they count as redeemed only on commit.
            change: AccountChange {
                available: -h.points,
                versions: 1,
                debit: true,
                ..AccountChange::default()
            },
            redeemed_event: false,
        };
        let mut taken = match self.spend(merchant, &spend).await? {
            Spend::Replayed(answer) => return Ok(answer),
            Spend::Taken(taken) => taken,
        };
        let answer = Held {
            points: h.points,
            discount_minor: taken.discount_minor,
            expires_at: now + h.ttl,
            account: taken.state.clone(),
        };
        store::insert_reservation(
            &mut taken.tx,
            merchant,
            &store::HoldRow {
                reservation_id: &h.reservation_id,
                customer_id: taken.customer_id,
                points: h.points,
                discount_minor: answer.discount_minor,
                purchase_id: h.purchase_id.as_deref(),
                request_hash: &spend.fingerprint,
                expires_at: answer.expires_at,
                hold_seq: taken.seq,
                answer: &answer,
            },
        )
        .await?;
        taken
            .commit(&self.publisher, merchant, &h.external_id)
            .await?;
        Ok(answer)
    }

    /// What redeeming and holding share, up to their own row: the account locked, a replay
    /// answered from the stored row, the program's minimum checked, the points taken from the
    /// lots (`debit`) and the account written. The caller inserts its row and commits.
    async fn spend<T: DeserializeOwned + Send + Unpin + 'static>(
        &self,
        merchant: MerchantId,
        spend: &Spending<'_>,
    ) -> Result<Spend<T>, Error> {
        let mut tx = self.store.begin().await?;
        let program = self.program(&mut tx, merchant).await?;
        let account = store::lock_account(&mut tx, merchant, spend.external_id)
            .await?
            .ok_or(Error::NotFound("customer"))?;
        if let Some(stored) =
            store::find_operation(&mut tx, spend.table, merchant, spend.key).await?
        {
            let answer = replay(stored, spend.fingerprint, spend.key_field, spend.key)?;
            return Ok(Spend::Replayed(answer));
        }
        let rule = program.rules.lifecycle.redemption;
        check_minimum(spend.points, rule.minimum_points)?;
        let seq = self
            .debit(
                &mut tx,
                merchant,
                &account,
                spend.points,
                spend.kind,
                spend.key,
            )
            .await?;
        let discount_minor = rule.discount_minor(spend.points, program.rules.currency);
        let event = spend
            .redeemed_event
            .then(|| NewEvent::points_redeemed(spend.key, spend.points, discount_minor));
        let state = self
            .write_with(&mut tx, merchant, &account, spend.change, event.as_ref())
            .await?;
        Ok(Spend::Taken(Taken {
            tx,
            customer_id: account.customer_id,
            seq,
            state,
            discount_minor,
        }))
    }

    /// Turns a hold into a redemption, once.
    pub async fn commit_reservation(
        &self,
        caller: &Caller,
        reservation_id: String,
    ) -> Result<Settled, Error> {
        let points = self.clone();
        let merchant = caller.merchant;
        detach(async move {
            points
                .settle(merchant, &reservation_id, Settlement::Committed)
                .await
        })
        .await
    }

    /// Gives a hold back, once.
    pub async fn release_reservation(
        &self,
        caller: &Caller,
        reservation_id: String,
    ) -> Result<Settled, Error> {
        let points = self.clone();
        let merchant = caller.merchant;
        detach(async move {
            points
                .settle(merchant, &reservation_id, Settlement::Released)
                .await
        })
        .await
    }

    async fn settle(
        &self,
        merchant: MerchantId,
        reservation_id: &str,
        wanted: Settlement,
    ) -> Result<Settled, Error> {
        let now = self.clock.now();
        let mut tx = self.store.begin().await?;
        let account = store::lock_reservation_account(&mut tx, merchant, reservation_id)
            .await?
            .ok_or(Error::NotFound("reservation"))?;
        let hold = store::lock_reservation(&mut tx, merchant, reservation_id)
            .await?
            .ok_or(Error::NotFound("reservation"))?;
        match (hold.status.as_str(), wanted) {
            ("held", Settlement::Committed) if hold.expires_at <= now => {
                Err(Error::FailedPrecondition(format!(
                    "reservation {reservation_id:?} expired at {}; its points are released \
                     and it cannot be committed",
                    hold.expires_at.to_rfc3339()
                )))
            }
            ("held", _) => {
                let settled = self
                    .settle_held(
                        &mut tx,
                        merchant,
                        &account,
                        reservation_id,
                        &hold,
                        wanted,
                        now,
                    )
                    .await?;
                commit(tx).await?;
                self.publisher
                    .publish(merchant, &hold.external_id, &settled.account)
                    .await;
                Ok(settled)
            }
            ("committed", Settlement::Committed)
            | ("released" | "expired", Settlement::Released) => stored_settlement(&hold),
            (status, _) => Err(Error::FailedPrecondition(format!(
                "reservation {reservation_id:?} is {status} already; it cannot be {}",
                wanted.as_str()
            ))),
        }
    }

    /// Commits or releases a held reservation whose account and row the caller has locked.
    #[allow(clippy::too_many_arguments)]
    async fn settle_held(
        &self,
        conn: &mut PgConnection,
        merchant: MerchantId,
        account: &LockedAccount,
        reservation_id: &str,
        hold: &ReservationRow,
        settlement: Settlement,
        now: DateTime<Utc>,
    ) -> Result<Settled, Error> {
        let customer = account.customer_id;
        let release = Entry {
            seq: account.version + 1,
            kind: EntryKind::Release,
            points: hold.points,
            reference: reservation_id,
            occurred_at: now,
        };
        store::insert_entry(conn, merchant, customer, &release).await?;
        let change = match settlement {
            Settlement::Committed => {
                // The held points leave their lots for good: the hold took them already.
                store::insert_entry(
                    conn,
                    merchant,
                    customer,
                    &Entry {
                        seq: account.version + 2,
                        kind: EntryKind::Redeem,
                        points: -hold.points,
                        ..release
                    },
                )
                .await?;
                AccountChange {
                    lifetime_redeemed: hold.points,
                    versions: 2,
                    ..AccountChange::default()
                }
            }
            Settlement::Released | Settlement::Expired => {
                // Back into the very lots held (an expired lot then expires at the next
                // sweep), less what repays a debt a return left meanwhile.
                let mut left = kept_after_debt(account.available, hold.points);
                let mut back = Vec::new();
                for (lot, held) in
                    store::movements_of(conn, merchant, customer, hold.hold_seq).await?
                {
                    let give = held.min(left);
                    if give > 0 {
                        back.push((lot, -give));
                        left -= give;
                    }
                }
                store::move_lot_points(conn, merchant, customer, Some(release.seq), &back).await?;
                AccountChange {
                    available: hold.points,
                    versions: 1,
                    ..AccountChange::default()
                }
            }
        };
        let event = (settlement == Settlement::Committed).then(|| {
            NewEvent::reservation_committed(reservation_id, hold.points, hold.discount_minor)
        });
        let state = self
            .write_with(conn, merchant, account, change, event.as_ref())
            .await?;
        let settled = Settled {
            status: settlement,
            points: hold.points,
            discount_minor: hold.discount_minor,
            account: state,
        };
        if !store::settle_reservation(
            conn,
            merchant,
            reservation_id,
            settlement.as_str(),
            &settled,
            now,
        )
        .await?
        {
            return Err(Error::internal(
                "a locked held reservation was settled meanwhile",
            ));
        }
        Ok(settled)
    }

    /// Takes back what the returned part of a purchase earned, and gives back pro rata the
    /// points spent on it.
    pub async fn return_purchase(
        &self,
        caller: &Caller,
        request: ReturnRequest,
    ) -> Result<ReturnOutcome, Error> {
        let points = self.clone();
        let merchant = caller.merchant;
        detach(async move { points.return_attached(merchant, &request).await }).await
    }

    async fn return_attached(
        &self,
        merchant: MerchantId,
        r: &ReturnRequest,
    ) -> Result<ReturnOutcome, Error> {
        let now = self.clock.now();
        let mut tx = self.store.begin().await?;
        let program = self.program(&mut tx, merchant).await?;
        let customer_id = store::purchase_customer(&mut tx, merchant, &r.purchase_id)
            .await?
            .ok_or(Error::NotFound("purchase"))?;
        let account = store::lock_account_by_id(&mut tx, merchant, customer_id, false)
            .await?
            .ok_or(Error::NotFound("purchase"))?;
        if let Some(stored) =
            store::find_operation(&mut tx, OperationTable::Returns, merchant, &r.return_id).await?
        {
            return replay(stored, r.fingerprint(), "return_id", &r.return_id);
        }
        let purchase = store::lock_purchase(&mut tx, merchant, &r.purchase_id)
            .await?
            .ok_or(Error::NotFound("purchase"))?;
        let stored_lines = store::purchase_lines(&mut tx, merchant, &r.purchase_id).await?;
        let lines = returnable_lines(&purchase, &stored_lines);
        let now_returned = returned_now(&lines, &r.returned, stored_lines.is_empty())?;
        let after: Vec<i64> = lines
            .iter()
            .zip(&now_returned)
            .map(|(line, now)| line.returned_minor + now)
            .collect();
        let returned_minor: i64 = now_returned.iter().sum();
        let clawback = (clawback_for(&lines, &after) - purchase.points_clawed_back).max(0);
        let redeemed = store::redeemed_for_purchase(&mut tx, merchant, &r.purchase_id).await?;
        let refund = (refund_for(
            redeemed,
            purchase.returned_minor + returned_minor,
            purchase.total_minor,
        ) - purchase.redeemed_refunded)
            .max(0);

        // The clawback: the purchase's own lot first, then the other lots.
        let customer = account.customer_id;
        let own = store::lot_of_purchase(&mut tx, merchant, customer, &r.purchase_id).await?;
        let spendable = store::open_lots(&mut tx, merchant, customer, true).await?;
        let pending = store::open_lots(&mut tx, merchant, customer, false).await?;
        let plan = plan_clawback(own.map(|(lot, _)| lot), &spendable, &pending, clawback);
        let pending_ids: Vec<i64> = pending.iter().map(|l| l.id).collect();
        let from_pending: i64 = plan
            .from_lots
            .iter()
            .filter(|(id, _)| pending_ids.contains(id))
            .map(|(_, p)| p)
            .sum();
        let from_spendable: i64 = plan.from_lots.iter().map(|(_, p)| p).sum::<i64>() - from_pending;
        let (debt, written_off) = match program.rules.lifecycle.returns {
            ReturnPolicy::Debt => (plan.shortfall, 0),
            ReturnPolicy::CapAtBalance => (0, plan.shortfall),
        };
        let clawed_back = clawback - written_off;

        let mut seq = account.version;
        if clawed_back > 0 {
            seq += 1;
            store::insert_entry(
                &mut tx,
                merchant,
                customer,
                &Entry {
                    seq,
                    kind: EntryKind::ReturnClawback,
                    points: -clawed_back,
                    reference: &r.return_id,
                    occurred_at: now,
                },
            )
            .await?;
            store::move_lot_points(&mut tx, merchant, customer, Some(seq), &plan.from_lots).await?;
        }
        let available_before_refund = account.available - from_spendable - debt;
        if refund > 0 {
            seq += 1;
            store::insert_entry(
                &mut tx,
                merchant,
                customer,
                &Entry {
                    seq,
                    kind: EntryKind::RedeemRefund,
                    points: refund,
                    reference: &r.return_id,
                    occurred_at: now,
                },
            )
            .await?;
            let terms = LotTerms::of_credit(
                program.rules.lifecycle.expiry,
                account.last_purchase_at,
                now,
            );
            store::insert_lot(
                &mut tx,
                merchant,
                customer,
                EntryKind::RedeemRefund.as_str(),
                &r.return_id,
                refund,
                kept_after_debt(available_before_refund, refund),
                now,
                &terms,
            )
            .await?;
        }
        let event = NewEvent::points_returned(
            &r.purchase_id,
            &r.return_id,
            returned_minor,
            clawed_back,
            written_off,
            refund,
        );
        let state = self
            .write_with(
                &mut tx,
                merchant,
                &account,
                AccountChange {
                    available: -from_spendable - debt + refund,
                    pending: -from_pending,
                    lifetime_redeemed: -refund,
                    versions: (seq - account.version).max(1),
                    ..AccountChange::default()
                },
                Some(&event),
            )
            .await?;
        // A purchase returned in full takes back the gifts it fired (those not redeemed yet).
        let fully_returned = purchase.returned_minor + returned_minor == purchase.total_minor;
        let gifts_revoked = if fully_returned {
            gifts::store::revoke_for_purchase(&mut tx, merchant, &r.purchase_id, now).await?
        } else {
            0
        };
        let answer = ReturnOutcome {
            gifts_revoked,
            purchase_id: r.purchase_id.clone(),
            external_id: purchase.external_id.clone(),
            returned_minor,
            points_clawed_back: clawed_back,
            points_written_off: written_off,
            points_refunded: refund,
            account: state.clone(),
        };
        let line_returns = if stored_lines.is_empty() {
            Vec::new()
        } else {
            now_returned
        };
        store::record_return(
            &mut tx,
            merchant,
            &store::ReturnRecord {
                return_id: &r.return_id,
                purchase_id: &r.purchase_id,
                customer_id: customer,
                line_returns: &line_returns,
                returned_minor,
                clawed_back: clawback,
                refunded: refund,
                request_hash: &r.fingerprint(),
                answer: &answer,
            },
        )
        .await?;
        // The return may cost a visit or tier qualification: the status is reassessed now
        // (a tier only starts its grace; the sweep downgrades after it).
        let state = self
            .reassess(&mut tx, merchant, customer, &program, Trigger::Return, now)
            .await?;
        commit(tx).await?;
        self.publisher
            .publish(merchant, &purchase.external_id, &state)
            .await;
        Ok(answer)
    }

    /// Adds or removes points by hand, with its reason in the audit log.
    pub async fn adjust(&self, caller: &Caller, adjustment: Adjustment) -> Result<Adjusted, Error> {
        let points = self.clone();
        let caller = caller.clone();
        detach(async move { points.adjust_attached(&caller, &adjustment).await }).await
    }

    async fn adjust_attached(&self, caller: &Caller, a: &Adjustment) -> Result<Adjusted, Error> {
        let merchant = caller.merchant;
        let now = self.clock.now();
        let mut tx = self.store.begin().await?;
        let program = self.program(&mut tx, merchant).await?;
        let account = store::lock_account(&mut tx, merchant, &a.external_id)
            .await?
            .ok_or(Error::NotFound("customer"))?;
        let table = OperationTable::Adjustments;
        if let Some(stored) =
            store::find_operation(&mut tx, table, merchant, &a.adjustment_key).await?
        {
            return replay(stored, a.fingerprint(), "adjustment_key", &a.adjustment_key);
        }
        let customer = account.customer_id;
        let change = if a.points > 0 {
            store::insert_entry(
                &mut tx,
                merchant,
                customer,
                &Entry {
                    seq: account.version + 1,
                    kind: EntryKind::Adjust,
                    points: a.points,
                    reference: &a.adjustment_key,
                    occurred_at: now,
                },
            )
            .await?;
            let terms = LotTerms::of_credit(
                program.rules.lifecycle.expiry,
                account.last_purchase_at,
                now,
            );
            store::insert_lot(
                &mut tx,
                merchant,
                customer,
                EntryKind::Adjust.as_str(),
                &a.adjustment_key,
                a.points,
                kept_after_debt(account.available, a.points),
                now,
                &terms,
            )
            .await?;
            AccountChange {
                available: a.points,
                versions: 1,
                ..AccountChange::default()
            }
        } else {
            let removed = -a.points;
            self.debit(
                &mut tx,
                merchant,
                &account,
                removed,
                EntryKind::Adjust,
                &a.adjustment_key,
            )
            .await?;
            AccountChange {
                available: a.points,
                versions: 1,
                debit: true,
                ..AccountChange::default()
            }
        };
        let state = self.write(&mut tx, merchant, &account, change).await?;
        let answer = Adjusted {
            points: a.points,
            account: state.clone(),
        };
        let actor = caller.actor();
        store::insert_adjustment(
            &mut tx,
            merchant,
            &store::AdjustmentRow {
                adjustment_key: &a.adjustment_key,
                customer_id: customer,
                points: a.points,
                reason: &a.reason,
                actor: &actor,
                request_hash: &a.fingerprint(),
                answer: &answer,
            },
        )
        .await?;
        audit::record(
            &mut tx,
            merchant,
            &actor,
            "points.adjust",
            serde_json::json!({
                "adjustment_key": a.adjustment_key,
                "external_id": a.external_id,
                "points": a.points,
                "reason": a.reason,
            }),
        )
        .await?;
        commit(tx).await?;
        self.publisher
            .publish(merchant, &a.external_id, &state)
            .await;
        tracing::info!(%merchant, points = a.points, "points adjusted");
        Ok(answer)
    }

    /// Claims a gift with points: the points debit, the stock and the grant in one
    /// transaction, so a claim never oversells and never takes points without a grant.
    pub async fn claim_gift(&self, caller: &Caller, claim: Claim) -> Result<Claimed, Error> {
        caller.may_read(&claim.external_id)?;
        let points = self.clone();
        let merchant = caller.merchant;
        detach(async move { points.claim_attached(merchant, &claim).await }).await
    }

    async fn claim_attached(&self, merchant: MerchantId, c: &Claim) -> Result<Claimed, Error> {
        let now = self.clock.now();
        let mut tx = self.store.begin().await?;
        let account = store::lock_account(&mut tx, merchant, &c.external_id)
            .await?
            .ok_or(Error::NotFound("customer"))?;
        let table = OperationTable::GiftClaims;
        if let Some(stored) = store::find_operation(&mut tx, table, merchant, &c.claim_key).await? {
            let answer: ClaimAnswer = replay(stored, c.fingerprint(), "claim_key", &c.claim_key)?;
            let grant =
                gifts::store::find_grant(&mut tx, merchant, GrantSource::Points, &c.claim_key)
                    .await?
                    .ok_or_else(|| Error::internal("a stored gift claim has no grant"))?;
            return Ok(Claimed {
                grant: grant.as_made(),
                account: answer.account,
            });
        }
        let gift = gifts::store::load_gift(&mut tx, merchant, &c.gift_id)
            .await?
            .ok_or(Error::NotFound("gift"))?;
        let Some(price) = gift.spec.points_price else {
            return Err(Error::FailedPrecondition(format!(
                "gift {:?} cannot be claimed with points",
                c.gift_id
            )));
        };
        self.debit(
            &mut tx,
            merchant,
            &account,
            price,
            EntryKind::Redeem,
            &c.claim_key,
        )
        .await?;
        // The account before the grant: the grant's gift_issued event (written by the
        // grant's statement) carries the balance after the price.
        let state = self
            .write(
                &mut tx,
                merchant,
                &account,
                AccountChange {
                    available: -price,
                    lifetime_redeemed: price,
                    versions: 1,
                    debit: true,
                    ..AccountChange::default()
                },
            )
            .await?;
        let request = GrantRequest {
            customer_id: account.customer_id,
            gift_id: &c.gift_id,
            source: GrantSource::Points,
            source_reference: &c.claim_key,
            purchase_id: None,
            now,
            delay_hours: 0,
        };
        // Nothing granted: the transaction (and its debit) is dropped.
        let grant = match gifts::store::try_grant(&mut tx, merchant, &request).await? {
            Granted::Created(grant) => grant,
            Granted::Replayed(_) => {
                return Err(Error::internal("a claim key granted without its claim row"));
            }
            Granted::NoSuchGift => return Err(Error::NotFound("gift")),
            Granted::Inactive => {
                return Err(Error::FailedPrecondition("the gift is not active".into()));
            }
            Granted::SoldOut => {
                return Err(Error::FailedPrecondition("the gift is out of stock".into()));
            }
        };
        store::insert_claim(
            &mut tx,
            merchant,
            &store::ClaimRow {
                claim_key: &c.claim_key,
                customer_id: account.customer_id,
                gift_id: &c.gift_id,
                points: price,
                request_hash: &c.fingerprint(),
                answer: &ClaimAnswer {
                    account: state.clone(),
                },
            },
        )
        .await?;
        commit(tx).await?;
        self.publisher
            .publish(merchant, &c.external_id, &state)
            .await;
        Ok(Claimed {
            grant,
            account: state,
        })
    }

    /// Takes `points` from the customer's spendable lots, soonest-expiring first, as ledger
    /// entry `version + 1` of `kind`; FAILED_PRECONDITION when fewer are available. Returns
    /// the entry's seq.
    async fn debit(
        &self,
        conn: &mut PgConnection,
        merchant: MerchantId,
        account: &LockedAccount,
        points: i64,
        kind: EntryKind,
        reference: &str,
    ) -> Result<i64, Error> {
        if account.available < points {
            return Err(Error::InsufficientPoints {
                requested: points,
                available: account.available,
            });
        }
        let seq = account.version + 1;
        let entry = Entry {
            seq,
            kind,
            points: -points,
            reference,
            occurred_at: self.clock.now(),
        };
        let taken = store::take_points(conn, merchant, account.customer_id, &entry).await?;
        all_taken(taken, points)?;
        Ok(seq)
    }

    /// Writes the account change; a debit the account cannot pay is refused by the database.
    async fn write(
        &self,
        conn: &mut PgConnection,
        merchant: MerchantId,
        account: &LockedAccount,
        change: AccountChange,
    ) -> Result<AccountState, Error> {
        self.write_with(conn, merchant, account, change, None).await
    }

    /// [`Points::write`] and the change's event, in one statement.
    async fn write_with(
        &self,
        conn: &mut PgConnection,
        merchant: MerchantId,
        account: &LockedAccount,
        change: AccountChange,
        event: Option<&NewEvent>,
    ) -> Result<AccountState, Error> {
        store::write_account(conn, merchant, account.customer_id, change, event)
            .await?
            .ok_or(Error::InsufficientPoints {
                requested: -change.available,
                available: account.available,
            })
    }
}

fn check_minimum(points: i64, minimum: i64) -> Result<(), Error> {
    if points < minimum {
        return Err(Invalid::field(
            "points",
            format!("must be at least {minimum}, the program's minimum redemption"),
        )
        .into());
    }
    Ok(())
}

/// A settled reservation's stored answer.
fn stored_settlement(hold: &ReservationRow) -> Result<Settled, Error> {
    let answer = hold
        .settled_answer
        .as_ref()
        .ok_or_else(|| Error::internal("a settled reservation has no stored answer"))?;
    decode(answer.0.clone())
}

fn decode<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, Error> {
    serde_json::from_value(value)
        .map_err(|e| Error::internal(format!("a stored answer does not decode: {e}")))
}

/// The purchase's lines as a return sees them: a purchase without lines is one line of its
/// total; lines recorded before lines kept their share get shares by amount.
fn returnable_lines(
    purchase: &store::ReturnablePurchase,
    stored: &[(i64, Option<i64>, i64)],
) -> Vec<ReturnableLine> {
    if stored.is_empty() {
        return vec![ReturnableLine {
            amount_minor: purchase.total_minor,
            points: purchase.points_earned,
            returned_minor: purchase.returned_minor,
        }];
    }
    let by_amount = if stored.iter().any(|(_, points, _)| points.is_none()) {
        let weights: Vec<i128> = stored.iter().map(|(a, _, _)| i128::from(*a)).collect();
        Some(shares(purchase.points_earned, &weights))
    } else {
        None
    };
    stored
        .iter()
        .enumerate()
        .map(|(i, (amount, points, returned))| ReturnableLine {
            amount_minor: *amount,
            points: match &by_amount {
                Some(shares) => shares[i],
                None => points.unwrap_or(0),
            },
            returned_minor: *returned,
        })
        .collect()
}

/// How much of each line comes back now; INVALID_ARGUMENT for more than is left to return.
fn returned_now(
    lines: &[ReturnableLine],
    returned: &Returned,
    no_lines: bool,
) -> Result<Vec<i64>, Error> {
    match returned {
        Returned::Amount(amount) => spread_amount(lines, *amount).ok_or_else(|| {
            let left: i64 = lines
                .iter()
                .map(|l| l.amount_minor - l.returned_minor)
                .sum();
            Invalid::field(
                "amount_minor",
                format!("is more than the {left} left to return of this purchase"),
            )
            .into()
        }),
        Returned::Lines(_) if no_lines => Err(Invalid::field(
            "lines",
            "the purchase was recorded without lines: return an amount_minor",
        )
        .into()),
        Returned::Lines(given) => {
            let mut now = vec![0; lines.len()];
            let mut v = crate::platform::validation::Violations::default();
            for (i, (line_no, amount)) in given.iter().enumerate() {
                let Some(line) = lines.get(*line_no as usize - 1) else {
                    v.add(
                        format!("lines[{i}].line_no"),
                        format!("the purchase has {} lines", lines.len()),
                    );
                    continue;
                };
                let left = line.amount_minor - line.returned_minor;
                if *amount > left {
                    v.add(
                        format!("lines[{i}].amount_minor"),
                        format!("is more than the {left} left to return of line {line_no}"),
                    );
                } else {
                    now[*line_no as usize - 1] = *amount;
                }
            }
            v.finish()?;
            Ok(now)
        }
    }
}

/// The sweep's work, one customer per transaction: holds past their ttl are released, lots
/// past their pending period mature, lots past their expiry expire. Safe on many replicas
/// at once: for its lots, a customer whose account another transaction holds is skipped
/// (`SKIP LOCKED`) and left to the next pass; a due hold waits for its account; every change
/// is re-checked under the lock, so each lot expires once and each hold is released once.
impl Points {
    pub async fn sweep(&self, batch: i64) -> Result<SweepReport, Error> {
        let now = self.clock.now();
        let mut report = SweepReport::default();
        let mut conn = self.store.acquire().await?;
        let holds = store::due_holds(&mut conn, now, batch).await?;
        let customers = store::due_customers(&mut conn, now, batch).await?;
        drop(conn);
        for (merchant, reservation_id) in holds {
            if self.expire_hold(merchant, &reservation_id, now).await? {
                report.holds_released += 1;
            }
        }
        for (merchant, customer_id, external_id) in customers {
            let (matured, expired, points) = self
                .sweep_lots(merchant, customer_id, &external_id, now)
                .await?;
            report.lots_matured += matured;
            report.lots_expired += expired;
            report.points_expired += points;
        }
        Ok(report)
    }

    async fn expire_hold(
        &self,
        merchant: MerchantId,
        reservation_id: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, Error> {
        let mut tx = self.store.begin().await?;
        // Wait for the account rather than skip it: a hot customer's row is locked by one
        // till after another, so a pass that skipped locked rows left the hold held for
        // seconds. A till's transaction is short (and bounded by the statement timeout), and
        // the re-check below makes a second replica's wait harmless.
        let Some(account) =
            store::lock_reservation_account(&mut tx, merchant, reservation_id).await?
        else {
            return Ok(false);
        };
        let Some(hold) = store::lock_reservation(&mut tx, merchant, reservation_id).await? else {
            return Ok(false);
        };
        if hold.status != "held" || hold.expires_at > now {
            return Ok(false);
        }
        let settled = self
            .settle_held(
                &mut tx,
                merchant,
                &account,
                reservation_id,
                &hold,
                Settlement::Expired,
                now,
            )
            .await?;
        commit(tx).await?;
        self.publisher
            .publish(merchant, &hold.external_id, &settled.account)
            .await;
        Ok(true)
    }

    /// Matures and expires the due lots of one customer: (matured, expired, points expired).
    async fn sweep_lots(
        &self,
        merchant: MerchantId,
        customer: i64,
        external_id: &str,
        now: DateTime<Utc>,
    ) -> Result<(u64, u64, i64), Error> {
        let mut tx = self.store.begin().await?;
        let Some(account) = store::lock_account_by_id(&mut tx, merchant, customer, true).await?
        else {
            return Ok((0, 0, 0));
        };
        let maturing = store::maturing_lots(&mut tx, merchant, customer, now).await?;
        let mut available = account.available;
        let mut matured_points = 0;
        for (lot, remaining) in &maturing {
            // Points becoming available repay a return's debt first.
            let kept = kept_after_debt(available, *remaining);
            store::mature_lot(&mut tx, merchant, customer, *lot, *remaining - kept).await?;
            available += remaining;
            matured_points += remaining;
        }
        let expiring = store::expiring_lots(&mut tx, merchant, customer, now).await?;
        let mut seq = account.version;
        let mut expired_points = 0;
        for lot in &expiring {
            seq += 1;
            let reference = lot.expiry_reference();
            store::insert_entry(
                &mut tx,
                merchant,
                customer,
                &Entry {
                    seq,
                    kind: EntryKind::Expire,
                    points: -lot.remaining,
                    reference: &reference,
                    occurred_at: now,
                },
            )
            .await?;
            store::move_lot_points(
                &mut tx,
                merchant,
                customer,
                Some(seq),
                &[(lot.id, lot.remaining)],
            )
            .await?;
            store::count_expiry(&mut tx, merchant, customer, lot.id).await?;
            expired_points += lot.remaining;
        }
        if maturing.is_empty() && expiring.is_empty() {
            return Ok((0, 0, 0));
        }
        let state = self
            .write(
                &mut tx,
                merchant,
                &account,
                AccountChange {
                    available: matured_points - expired_points,
                    pending: -matured_points,
                    versions: (seq - account.version).max(1),
                    ..AccountChange::default()
                },
            )
            .await?;
        commit(tx).await?;
        self.publisher.publish(merchant, external_id, &state).await;
        Ok((maturing.len() as u64, expiring.len() as u64, expired_points))
    }
}
