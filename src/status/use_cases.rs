//! The use cases of standings outside checkout: a return's reassessment (in the return's
//! transaction) and the sweep of time-driven changes (AT_RISK, LAPSED, a slower rhythm, LOYAL
//! after M days, the tier's downgrade warning and its downgrade after the grace).
//!
//! The sweep is safe on many replicas at once: it reads the due accounts (`review_at <= now`,
//! a partial index), then claims each in its own transaction with `FOR UPDATE SKIP LOCKED`
//! re-checking that it is still due, so two sweeps never look at one customer at once and the
//! second finds the first's new `review_at`. A customer a till holds is left to the next pass.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use crate::error::Error;
use crate::platform::account::AccountState;
use crate::platform::caller::MerchantId;
use crate::platform::store::commit;
use crate::points::Points;
use crate::programs::rules::Program;
use crate::status::rules::Trigger;
use crate::status::standing::evaluate;
use crate::status::store;

/// What one sweep pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StandingSweepReport {
    /// Customers looked at (claimed and due).
    pub looked_at: u64,
    pub status_changes: u64,
    pub tier_changes: u64,
    pub warnings: u64,
}

impl Points {
    /// Reassesses a customer in the transaction of a change that is not a purchase (a return),
    /// after that change, and writes it with its history rows and events. The caller holds the
    /// account's lock; `versions` is what the write adds to the account's version (0 when the
    /// caller's change counted its own). Returns the account as committed by the caller.
    pub(crate) async fn reassess(
        &self,
        conn: &mut PgConnection,
        merchant: MerchantId,
        customer_id: i64,
        program: &Program,
        trigger: Trigger,
        now: DateTime<Utc>,
    ) -> Result<AccountState, Error> {
        let row = store::facts(conn, merchant, customer_id, now)
            .await?
            .ok_or(Error::NotFound("customer"))?;
        let facts = row.facts(now)?;
        let evaluation = evaluate(&program.rules, &facts, None, trigger, now);
        store::write_standing(conn, merchant, customer_id, &evaluation, 0, now)
            .await?
            .ok_or(Error::NotFound("customer"))
    }

    /// One pass of the standing sweep over at most `batch` due customers.
    pub async fn standing_sweep(&self, batch: i64) -> Result<StandingSweepReport, Error> {
        let now = self.clock.now();
        let mut conn = self.store.acquire().await?;
        let due = store::due_accounts(&mut conn, now, batch).await?;
        drop(conn);
        let mut report = StandingSweepReport::default();
        for (merchant, customer_id, external_id) in due {
            self.sweep_standing(merchant, customer_id, &external_id, now, &mut report)
                .await?;
        }
        Ok(report)
    }

    async fn sweep_standing(
        &self,
        merchant: MerchantId,
        customer_id: i64,
        external_id: &str,
        now: DateTime<Utc>,
        report: &mut StandingSweepReport,
    ) -> Result<(), Error> {
        let mut tx = self.store.begin().await?;
        if !store::claim_due(&mut tx, merchant, customer_id, now).await? {
            return Ok(());
        }
        report.looked_at += 1;
        let program = self.program(&mut tx, merchant).await?;
        let row = store::facts(&mut tx, merchant, customer_id, now)
            .await?
            .ok_or(Error::NotFound("customer"))?;
        let facts = row.facts(now)?;
        let evaluation = evaluate(&program.rules, &facts, None, Trigger::Sweep, now);
        if !evaluation.differs_from(&facts, row.standing.as_ref().map(|s| &s.0)) {
            // Nothing shown changes: only the next look moves, the version stays.
            store::set_review_at(&mut tx, merchant, customer_id, evaluation.review_at).await?;
            return commit(tx).await;
        }
        // What reads show changed: a new version, so the cache takes it.
        let state = store::write_standing(&mut tx, merchant, customer_id, &evaluation, 1, now)
            .await?
            .ok_or(Error::NotFound("customer"))?;
        commit(tx).await?;
        report.status_changes += u64::from(evaluation.status_change.is_some());
        report.tier_changes += u64::from(evaluation.tier_change.is_some());
        report.warnings += u64::from(evaluation.warning.is_some());
        self.publisher.publish(merchant, external_id, &state).await;
        Ok(())
    }
}
