//! What the greeting RPCs and the greeting job do.

use chrono::{DateTime, Datelike, Utc};
use chrono_tz::Tz;

use crate::error::Error;
use crate::events::{
    self,
    rules::{EventKind, NewEvent},
};
use crate::gifts::rules::GrantSource;
use crate::gifts::store::{GrantRequest, Granted};
use crate::greetings::Greetings;
use crate::greetings::rules::{
    self, AckVerdict, ClaimRequest, CustomerOccasions, DEFAULT_CATCH_UP_DAYS, GreetingConsent,
    Occasion, Occurrence, Outcome, Upcoming, UpcomingCursor, UpcomingRequest, UpcomingToken,
};
use crate::greetings::store::{self, Candidate, ClaimedRow, Filter, MerchantOccasions};
use crate::members::rules::Birthday;
use crate::platform::account::{self, AccountState};
use crate::platform::caller::Caller;
use crate::platform::store::commit;
use crate::points::lifecycle::{LockedAccount, credit_bonus, lock_account};
use crate::telemetry::throttle::LogThrottle;

/// Customers one candidate query reads.
const CANDIDATE_BATCH: i64 = 1000;
/// Merchants one page of the job reads.
const MERCHANT_BATCH: i64 = 100;

/// A gift that cannot be granted (sold out, deactivated) is skipped on every birthday.
static GIFT_SKIPPED: LogThrottle = LogThrottle::per_minute(6);
static BAD_TIME_ZONE: LogThrottle = LogThrottle::per_minute(6);

/// One page of ListUpcomingOccasions.
#[derive(Debug)]
pub struct UpcomingPage {
    /// With the customer's display name (contact data: never logged).
    pub entries: Vec<(Upcoming, String)>,
    pub next: Option<UpcomingToken>,
}

/// What one job pass made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobReport {
    pub greetings: u64,
    pub gifts: u64,
    pub bonuses: u64,
}

/// The customer's occasions from their stored profile; `None` for a time zone that is not
/// IANA's (validated on enrolment, so only a defect could store one).
fn occasions_of(c: &Candidate) -> Option<CustomerOccasions> {
    let time_zone: Tz = c.time_zone.parse().ok()?;
    let birthday = match (c.birth_month, c.birth_day) {
        (Some(month), Some(day)) => Some(Birthday {
            month: u32::try_from(month).ok()?,
            day: u32::try_from(day).ok()?,
            year: c.birth_year.map(i32::from),
        }),
        _ => None,
    };
    Some(CustomerOccasions {
        time_zone,
        birthday,
        enrolled_at: c.enrolled_at,
    })
}

impl Greetings {
    /// Who has an occasion in the window, soonest first, paged. Only customers who consented
    /// to marketing contact (greetings go only to them).
    pub async fn list_upcoming(
        &self,
        caller: &Caller,
        request: &UpcomingRequest,
    ) -> Result<UpcomingPage, Error> {
        let merchant = caller.merchant;
        let mut conn = self.store.acquire().await?;
        let program = store::occasions_of(&mut conn, merchant)
            .await?
            .ok_or(Error::NotFound("program"))?;
        let first = request
            .from
            .date_naive()
            .pred_opt()
            .unwrap_or(request.from.date_naive());
        let window: Vec<_> = first.iter_days().take(request.days as usize + 3).collect();
        let month_days = rules::candidate_month_days(&window);
        let filter = if rules::holiday_among(&program, &window) || month_days.len() >= 360 {
            Filter::Everyone
        } else if program.birthdays || program.anniversaries {
            Filter::MonthDays(&month_days)
        } else {
            return Ok(UpcomingPage {
                entries: Vec::new(),
                next: None,
            });
        };
        let limit = request.page_size as usize;
        let mut page: Vec<Upcoming> = Vec::new();
        let mut names = std::collections::HashMap::new();
        let mut after_id = 0;
        loop {
            let batch =
                store::candidates(&mut conn, merchant, after_id, CANDIDATE_BATCH, &filter).await?;
            let Some(last) = batch.last() else { break };
            after_id = last.id;
            let full = batch.len() as i64 == CANDIDATE_BATCH;
            for c in batch {
                let Some(customer) = occasions_of(&c) else {
                    continue;
                };
                let entries = rules::upcoming_entries(
                    &program,
                    &customer,
                    &c.external_id,
                    request.from,
                    request.days,
                );
                if !entries.is_empty() {
                    rules::merge_page(&mut page, entries, request.after.as_ref(), limit + 1);
                    names.insert(c.external_id, c.display_name);
                }
            }
            // Only the names of entries still on the page are kept.
            names.retain(|id, _| page.iter().any(|e| e.cursor.external_id == *id));
            if !full {
                break;
            }
        }
        let next = (page.len() > limit).then(|| {
            page.truncate(limit);
            UpcomingToken {
                from: request.from,
                days: request.days,
                after: page
                    .last()
                    .map(|e| e.cursor.clone())
                    .unwrap_or_else(|| UpcomingCursor {
                        starts_at: request.from,
                        external_id: String::new(),
                        occasion: String::new(),
                    }),
            }
        });
        let entries = page
            .into_iter()
            .map(|entry| {
                let name = names
                    .get(&entry.cursor.external_id)
                    .cloned()
                    .unwrap_or_default();
                (entry, name)
            })
            .collect();
        Ok(UpcomingPage { entries, next })
    }

    /// Hands out due greetings under a lease (one statement: see `sql/claim.sql`).
    pub async fn claim(
        &self,
        caller: &Caller,
        request: ClaimRequest,
    ) -> Result<Vec<ClaimedRow>, Error> {
        let now = self.clock.now();
        let mut conn = self.store.acquire().await?;
        let claimed = store::claim(
            &mut conn,
            caller.merchant,
            now,
            request.limit,
            request.lease_seconds,
        )
        .await?;
        if !claimed.is_empty() {
            tracing::info!(merchant = %caller.merchant, greetings = claimed.len(), "greetings claimed");
        }
        Ok(claimed)
    }

    /// The sender's outcome for a greeting it holds: applied only with the current lease's
    /// token; a replay of the ack that ended the lease answers OK.
    pub async fn ack(
        &self,
        caller: &Caller,
        greeting_id: &str,
        outcome: Outcome,
        lease_token: &str,
    ) -> Result<(), Error> {
        let merchant = caller.merchant;
        let now = self.clock.now();
        let mut tx = self.store.begin().await?;
        let (id, state) = store::lock_greeting(&mut tx, merchant, greeting_id)
            .await?
            .ok_or(Error::NotFound("greeting"))?;
        match rules::judge_ack(&state, lease_token, outcome) {
            AckVerdict::Apply(outcome) => {
                let next = (outcome == Outcome::RetryLater)
                    .then(|| now + rules::retry_delay(state.attempts));
                store::settle(&mut tx, merchant, id, lease_token, outcome, next, now).await?;
                commit(tx).await?;
                tracing::info!(%merchant, outcome = outcome.as_str(), "greeting acknowledged");
                Ok(())
            }
            AckVerdict::Replay => Ok(()),
            AckVerdict::Conflict(earlier) => Err(Error::FailedPrecondition(format!(
                "this lease was already acknowledged as {}",
                earlier.as_str()
            ))),
            AckVerdict::Stale => Err(Error::FailedPrecondition(
                "lease_token is not the greeting's current lease: it ran out and the greeting \
                 was handed out again (or was never this greeting's)"
                    .to_string(),
            )),
        }
    }

    /// One pass of the greeting job at the clock's now: for every merchant, the greetings due
    /// on each consenting customer's local day (and the day before, caught up), each made once
    /// (the unique key), with the birthday's gift and bonus and a `greeting_due` event in the
    /// same transaction. Safe on many replicas at once.
    pub async fn run_due(&self) -> Result<JobReport, Error> {
        let now = self.clock.now();
        let dates = rules::dates_somewhere(now, DEFAULT_CATCH_UP_DAYS);
        let month_days = rules::candidate_month_days(&dates);
        let mut report = JobReport::default();
        let mut after = 0;
        loop {
            let merchants = {
                let mut conn = self.store.acquire().await?;
                store::merchants_page(&mut conn, after, MERCHANT_BATCH).await?
            };
            let Some(last) = merchants.last() else { break };
            after = last.merchant.0;
            let full = merchants.len() as i64 == MERCHANT_BATCH;
            for merchant in &merchants {
                let program = &merchant.occasions;
                if !rules::greets_anything(program) {
                    continue;
                }
                let filter = if rules::holiday_among(program, &dates) {
                    Filter::Everyone
                } else if program.birthdays || program.anniversaries {
                    Filter::MonthDays(&month_days)
                } else {
                    continue;
                };
                self.greet_merchant(merchant, &filter, now, &mut report)
                    .await?;
            }
            if !full {
                break;
            }
        }
        Ok(report)
    }

    async fn greet_merchant(
        &self,
        merchant: &MerchantOccasions,
        filter: &Filter<'_>,
        now: DateTime<Utc>,
        report: &mut JobReport,
    ) -> Result<(), Error> {
        let min_year = now.year() - 1;
        let mut after = 0;
        loop {
            let (batch, existing) = {
                let mut conn = self.store.acquire().await?;
                let batch =
                    store::candidates(&mut conn, merchant.merchant, after, CANDIDATE_BATCH, filter)
                        .await?;
                let ids: Vec<i64> = batch.iter().map(|c| c.id).collect();
                let existing =
                    store::existing_keys(&mut conn, merchant.merchant, &ids, min_year).await?;
                (batch, existing)
            };
            let Some(last) = batch.last() else { break };
            after = last.id;
            let full = batch.len() as i64 == CANDIDATE_BATCH;
            for c in &batch {
                let Some(customer) = occasions_of(c) else {
                    if let Some(suppressed) = BAD_TIME_ZONE.admit() {
                        tracing::warn!(merchant = %merchant.merchant, customer = c.id, suppressed,
                            "stored time zone is not an IANA name; no greetings");
                    }
                    continue;
                };
                // The candidates are consenting customers (the query's condition).
                let consent = GreetingConsent {
                    marketing_consent: true,
                };
                let due: Vec<Occurrence> = rules::greetings_due(
                    &merchant.occasions,
                    &customer,
                    consent,
                    now,
                    DEFAULT_CATCH_UP_DAYS,
                )
                .into_iter()
                .filter(|o| {
                    let key = o.greeting_key(c.id);
                    !existing.contains(&(key.customer_id, key.occasion, key.year))
                })
                .collect();
                if !due.is_empty() {
                    self.make_greetings(merchant, c, &due, now, report).await?;
                }
            }
            if !full {
                break;
            }
        }
        Ok(())
    }

    /// The customer's due greetings in one transaction under their account lock (the lock
    /// order of every movement): each greeting made unless its key exists, a birthday's
    /// reward granted with it, and its event.
    async fn make_greetings(
        &self,
        merchant: &MerchantOccasions,
        c: &Candidate,
        due: &[Occurrence],
        now: DateTime<Utc>,
        report: &mut JobReport,
    ) -> Result<(), Error> {
        let m = merchant.merchant;
        let mut tx = self.store.begin().await?;
        let Some(mut account) = lock_account(&mut tx, m, c.id).await? else {
            return Ok(());
        };
        let mut credited: Option<AccountState> = None;
        let mut current: Option<AccountState> = None;
        let mut made = JobReport::default();
        for occurrence in due {
            let key = occurrence.greeting_key(c.id);
            let new = store::NewGreeting {
                customer_id: c.id,
                occasion: &key.occasion,
                year: key.year,
                kind: occurrence.occasion.kind().as_str(),
                occasion_name: occurrence.occasion.name(),
                local_date: occurrence.date,
                now,
            };
            let Some((id, greeting_id)) = store::insert_greeting(&mut tx, m, &new).await? else {
                continue;
            };
            made.greetings += 1;
            let mut gift_id = None;
            let mut bonus = 0;
            let reward = &merchant.occasions.birthday_reward;
            if occurrence.occasion == Occasion::Birthday && !reward.is_empty() {
                let reference = key.reference();
                if let Some(gift) = &reward.gift_id {
                    let request = GrantRequest {
                        customer_id: c.id,
                        gift_id: gift,
                        source: GrantSource::Birthday,
                        source_reference: &reference,
                        purchase_id: None,
                        now,
                        delay_hours: 0,
                    };
                    match crate::gifts::store::try_grant(&mut tx, m, &request).await? {
                        Granted::Created(_) | Granted::Replayed(_) => {
                            gift_id = Some(gift.clone());
                            made.gifts += 1;
                        }
                        Granted::NoSuchGift | Granted::Inactive | Granted::SoldOut => {
                            if let Some(suppressed) = GIFT_SKIPPED.admit() {
                                tracing::warn!(merchant = %m, gift_id = %gift, suppressed,
                                    "birthday gift missing, inactive or sold out: not granted");
                            }
                        }
                    }
                }
                if reward.bonus_points > 0 {
                    let state = credit_bonus(
                        &mut tx,
                        m,
                        &account,
                        reward.bonus_points,
                        &reference,
                        merchant.lifecycle.expiry,
                        now,
                    )
                    .await?;
                    account = LockedAccount {
                        available: state.available,
                        version: state.version,
                        ..account
                    };
                    bonus = reward.bonus_points;
                    made.bonuses += 1;
                    current = Some(state.clone());
                    credited = Some(state);
                }
                let gift_reference = gift_id.as_ref().map(|_| reference.as_str());
                store::set_reward(&mut tx, m, id, gift_reference, bonus).await?;
            }
            let state = match &current {
                Some(state) => state.clone(),
                None => {
                    let state = account::load(&mut tx, m, &c.external_id)
                        .await?
                        .ok_or_else(|| Error::internal("a locked account did not load"))?;
                    current = Some(state.clone());
                    state
                }
            };
            let event = NewEvent {
                kind: EventKind::GreetingDue,
                details: serde_json::json!({
                    "greeting_id": greeting_id,
                    "occasion": key.occasion,
                    "kind": occurrence.occasion.kind().as_str(),
                    "holiday_id": occurrence.occasion.holiday_id(),
                    "local_date": occurrence.date.to_string(),
                    "year": key.year,
                    "gift_id": gift_id,
                    "bonus_points": bonus,
                }),
            };
            events::store::append(&mut tx, m, c.id, &event, now, &state).await?;
        }
        commit(tx).await?;
        if let Some(state) = credited {
            self.publisher.publish(m, &c.external_id, &state).await;
        }
        report.greetings += made.greetings;
        report.gifts += made.gifts;
        report.bonuses += made.bonuses;
        Ok(())
    }
}
