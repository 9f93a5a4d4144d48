//! A customer's standing: their repeat status and tier assessed together, as one purchase,
//! return or sweep sees them. Pure: the store passes in what it read ([`Facts`]), the clock's
//! instant comes in as a parameter, and the result ([`Evaluation`]) is what the store writes in
//! the same statement or transaction: the account's status and tier columns, the history rows
//! and events of a change, the sweep's next look (`review_at`) and what reads show
//! ([`Standing`]).
//!
//! Choices made here:
//!
//! - The purchase being recorded is assessed as if already stored ([`PurchaseFact`] added to the
//!   facts): its instant (capped at now) counts as a visit, its spend, visit or points count
//!   for the tier.
//! - The purchase that reaches a tier earns at the tier held *before* it (the rules' choice, see
//!   `tiers::rules`): the earn multiplier comes from [`Facts::tier`], the upgrade lands with the
//!   purchase, the next purchase (and quote) earns at the new tier.
//! - The store reads at most [`MAX_FACTS`] of the customer's most recent purchases within the
//!   program's look-back (`ProgramRules::look_back_days`). The status thresholds never ask for
//!   more (`MAX_PURCHASES`); a tier metric over more than that many purchases in its window is
//!   summed over the most recent ones (a lower bound: such a customer is usually at the top tier
//!   already, and the bound keeps checkout's read at one bounded index range).
//! - What reads show is computed here, at the write, with the program of that moment: tier name
//!   and perks, progress, the next-status hint. Instants are stored, not durations: the read
//!   counts the days left with its own clock ([`Standing::at`]). The hint's deadline is one of
//!   the instants the sweep looks again at, so a hint whose oldest purchase left the window is
//!   refreshed by the sweep (until then a read says "before <deadline>").

use chrono::{DateTime, SubsecRound, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::programs::rules::ProgramRules;
use crate::status::rules::{
    self, Assessment, NextStatusHint, PurchaseHistory, RepeatStatus, StatusChange, Trigger,
};
use crate::tiers::rules::{
    self as tiers, Contribution, DowngradeWarning, TierEvent, TierMetric, TierProgram,
    TierProgress, TierStanding, TierTrigger,
};

/// The most purchases one assessment reads (see the module doc).
pub const MAX_FACTS: i64 = 1_000;

/// One stored purchase as the assessment needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PurchaseFact {
    pub at: DateTime<Utc>,
    /// Total less what was returned.
    pub spend: i64,
    /// Points earned less what returns clawed back.
    pub points: i64,
    /// Not returned in full: a visit.
    pub counted: bool,
}

/// What the store read about one customer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    pub status: RepeatStatus,
    pub status_since: Option<DateTime<Utc>>,
    pub regular_since: Option<DateTime<Utc>>,
    pub tier: TierStanding,
    /// The `below_since` of the grace whose warning was sent.
    pub tier_warned_for: Option<DateTime<Utc>>,
    /// The most recent purchases within the look-back (at most [`MAX_FACTS`]), any order.
    pub purchases: Vec<PurchaseFact>,
    /// Counted purchases before the look-back, up to 2 (enough to tell NEW from RETURNING).
    pub older_counted: i64,
}

impl Facts {
    /// A customer with no purchase and no stored standing.
    pub fn new_customer(now: DateTime<Utc>) -> Facts {
        Facts {
            status: RepeatStatus::New,
            status_since: None,
            regular_since: None,
            tier: TierStanding::untiered(now),
            tier_warned_for: None,
            purchases: Vec::new(),
            older_counted: 0,
        }
    }

    fn history(&self) -> PurchaseHistory {
        let recent: Vec<DateTime<Utc>> = self
            .purchases
            .iter()
            .filter(|p| p.counted)
            .map(|p| p.at)
            .collect();
        PurchaseHistory {
            counted_purchases: recent.len() as u64 + self.older_counted.max(0) as u64,
            recent,
        }
    }

    fn contributions(&self, metric: TierMetric) -> Vec<Contribution> {
        self.purchases
            .iter()
            .map(|p| Contribution {
                at: p.at,
                amount: match metric {
                    TierMetric::Spend => p.spend,
                    TierMetric::Visits => i64::from(p.counted),
                    TierMetric::PointsEarned => p.points,
                },
            })
            .collect()
    }
}

/// The tier as reads show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierView {
    pub id: String,
    pub name: String,
    pub perks: Vec<String>,
    pub earn_multiplier_bp: u32,
    pub since: DateTime<Utc>,
    /// In the grace: the downgrade comes then unless the customer qualifies again.
    pub downgrade_at: Option<DateTime<Utc>>,
}

/// What GetBalance and GetCustomer show about a customer's status and tier; stored on the
/// account (`accounts.standing`) and cached with the balance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Standing {
    pub status: RepeatStatus,
    pub status_since: Option<DateTime<Utc>>,
    pub hint: Option<NextStatusHint>,
    pub tier: Option<TierView>,
    pub progress: Option<TierProgress>,
    /// When this was computed (the tier metric's value is as of then).
    pub as_of: DateTime<Utc>,
}

impl Standing {
    /// A customer never assessed (no purchase yet).
    pub fn initial(program: &ProgramRules, now: DateTime<Utc>) -> Standing {
        evaluate(
            program,
            &Facts::new_customer(now),
            None,
            Trigger::Purchase,
            now,
        )
        .standing
    }

    /// Whether reads would show the same (the instant computed and the hint's days left,
    /// which reads count from now, aside).
    pub fn shows_the_same_as(&self, other: &Standing) -> bool {
        let undated = |hint: Option<NextStatusHint>| {
            hint.map(|h| NextStatusHint {
                within_days: h.deadline.map_or(h.within_days, |_| None),
                ..h
            })
        };
        self.status == other.status
            && self.status_since == other.status_since
            && undated(self.hint) == undated(other.hint)
            && self.tier == other.tier
            && self.progress == other.progress
    }

    /// As seen at `now`: the hint's days counted from now.
    pub fn at(self, now: DateTime<Utc>) -> Standing {
        Standing {
            hint: self.hint.map(|h| h.at(now)),
            ..self
        }
    }
}

/// A change of tier (a history row and a `tier_changed` event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierChange {
    pub from: Option<String>,
    pub to: Option<String>,
    /// upgraded, downgraded or replaced.
    pub change: &'static str,
    pub trigger: Trigger,
    pub metric: TierMetric,
    pub value: i64,
    pub at: DateTime<Utc>,
}

impl TierChange {
    /// The history row's reason and the event's details.
    pub fn reason(&self) -> serde_json::Value {
        json!({ "metric": self.metric.as_str(), "value": self.value })
    }

    pub fn details(&self) -> serde_json::Value {
        json!({
            "from": self.from,
            "to": self.to,
            "change": self.change,
            "trigger": self.trigger.as_str(),
            "reason": self.reason(),
        })
    }
}

/// The details of a status change (history reason and event).
pub fn status_details(change: &StatusChange) -> serde_json::Value {
    json!({
        "from": change.from.as_str(),
        "to": change.to.as_str(),
        "direction": match change.direction {
            rules::Direction::Up => "up",
            rules::Direction::Down => "down",
        },
        "trigger": change.trigger.as_str(),
        "reason": change.reason,
    })
}

/// The details of a downgrade warning's event: what it takes to keep the tier.
pub fn warning_details(warning: &DowngradeWarning) -> serde_json::Value {
    json!({
        "tier_id": warning.tier_id,
        "below_since": warning.below_since,
        "downgrade_at": warning.downgrade_at,
        "falls_to": warning.falls_to,
        "metric": warning.keep.metric.as_str(),
        "needed": warning.keep.needed,
    })
}

/// What to store after a look at the customer.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub status: RepeatStatus,
    pub status_since: Option<DateTime<Utc>>,
    pub regular_since: Option<DateTime<Utc>>,
    pub tier: TierStanding,
    /// When the sweep must look again; `None`: only a purchase or return changes anything.
    pub review_at: Option<DateTime<Utc>>,
    pub standing: Standing,
    pub status_change: Option<StatusChange>,
    pub tier_change: Option<TierChange>,
    /// A downgrade warning to send now (the sweep only; once per grace).
    pub warning: Option<DowngradeWarning>,
}

impl Evaluation {
    /// The tier this look brought the customer up to (a tier-up gift's occasion).
    pub fn tier_reached(&self) -> Option<&str> {
        self.tier_change
            .as_ref()
            .filter(|c| c.change == "upgraded")
            .and_then(|c| c.to.as_deref())
    }

    /// Whether anything stored differs from `facts` (the sweep writes only then).
    pub fn differs_from(&self, facts: &Facts, stored: Option<&Standing>) -> bool {
        self.status_change.is_some()
            || self.tier_change.is_some()
            || self.warning.is_some()
            || self.regular_since != facts.regular_since
            || self.tier != facts.tier
            || !stored.is_some_and(|stored| stored.shows_the_same_as(&self.standing))
    }
}

/// The customer's standing at `now`, with `adding` (the purchase being recorded) counted as
/// stored.
pub fn evaluate(
    program: &ProgramRules,
    facts: &Facts,
    adding: Option<PurchaseFact>,
    trigger: Trigger,
    now: DateTime<Utc>,
) -> Evaluation {
    // Instants at the database's precision (microseconds): what this writes into the
    // standing's JSON must equal what the columns give back to the next assessment, or a sweep
    // that changes nothing would see "status_since changed" and write a new version.
    let now = now.trunc_subsecs(6);
    let mut facts_now = facts.clone();
    if let Some(purchase) = adding {
        facts_now.purchases.push(PurchaseFact {
            at: purchase.at.trunc_subsecs(6).min(now),
            ..purchase
        });
    }
    let thresholds = &program.status;
    let history = facts_now.history();
    let assessment: Assessment = rules::assess(thresholds, &history, facts.regular_since, now);
    let status_change = rules::status_change(facts.status, &assessment, trigger, now);
    let status_since = if status_change.is_some() {
        Some(now)
    } else {
        facts.status_since.or(Some(now))
    };
    let hint = rules::next_status_hint(thresholds, &history, &assessment, now);

    let tiers_program: &TierProgram = &program.tiers;
    let contributions = facts_now.contributions(tiers_program.metric);
    let value = tiers::metric_value(tiers_program, &contributions, now);
    let tier_trigger = match trigger {
        Trigger::Purchase => TierTrigger::Purchase,
        Trigger::Return => TierTrigger::Return,
        Trigger::Sweep => TierTrigger::Sweep,
    };
    let decision = tiers::next_standing(tiers_program, &facts.tier, value, tier_trigger, now);
    let tier_change = decision.event.as_ref().and_then(|event| {
        let (from, to, change) = match event {
            TierEvent::Upgraded { from, to } => (from.clone(), Some(to.clone()), "upgraded"),
            TierEvent::Downgraded { from, to } => (Some(from.clone()), to.clone(), "downgraded"),
            TierEvent::Replaced { from, to } => (Some(from.clone()), to.clone(), "replaced"),
            TierEvent::GraceStarted { .. } | TierEvent::Requalified { .. } => return None,
        };
        Some(TierChange {
            from,
            to,
            change,
            trigger,
            metric: tiers_program.metric,
            value,
            at: now,
        })
    });
    let tier = decision.standing;
    let warning = match trigger {
        Trigger::Sweep => tiers::downgrade_warning(tiers_program, &tier, value, now)
            .filter(|w| facts.tier_warned_for != Some(w.below_since)),
        Trigger::Purchase | Trigger::Return => None,
    };

    // When to look again: the status's next time-driven change, the hint's deadline, the
    // tier's warning (unless sent for this grace), downgrade or end of qualification.
    // A warning sent is past its instant, so `review_at` gives the downgrade next.
    let tier_review = tiers::review_at(tiers_program, &tier, &contributions, now);
    let candidates = [
        assessment.review_at,
        hint.and_then(|h| h.deadline).filter(|d| *d > now),
        tier_review,
    ];
    let mut review_at = candidates.into_iter().flatten().min();
    // An overdue downgrade is the sweep's to make; after the sweep's own look nothing is due
    // at once (a second visit in the same pass would find the same).
    if trigger == Trigger::Sweep && review_at.is_some_and(|t| t <= now) {
        review_at = now.checked_add_signed(TimeDelta::minutes(1));
    }

    let tier_view = tiers_program.held_tier(&tier).map(|held| TierView {
        id: held.id.clone(),
        name: held.name.clone(),
        perks: held.perks.clone(),
        earn_multiplier_bp: held.earn_multiplier_bp,
        since: tier.since,
        downgrade_at: tiers_program.downgrade_at(&tier),
    });
    let standing = Standing {
        status: assessment.status,
        status_since,
        hint,
        tier: tier_view,
        progress: tiers::progress(tiers_program, &tier, value),
        as_of: now,
    };
    Evaluation {
        status: assessment.status,
        status_since,
        regular_since: assessment.regular_since,
        tier,
        review_at,
        standing,
        status_change,
        tier_change,
        warning,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::money::Currency;
    use crate::tiers::rules::Tier;
    use chrono::TimeZone;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap()
    }

    fn day(n: i64) -> DateTime<Utc> {
        t0() + TimeDelta::days(n)
    }

    fn program() -> ProgramRules {
        let mut rules = ProgramRules::default_for(Currency::parse("c", "EUR").unwrap());
        rules.tiers = TierProgram {
            metric: TierMetric::Spend,
            window_days: 365,
            grace_days: 30,
            warning_days: 7,
            levels: vec![
                tier("silver", "Silver", 10_000, 12_500),
                tier("gold", "Gold", 50_000, 20_000),
            ],
        };
        rules
    }

    fn tier(id: &str, name: &str, threshold: i64, bp: u32) -> Tier {
        Tier {
            id: id.into(),
            name: name.into(),
            threshold,
            earn_multiplier_bp: bp,
            perks: vec![format!("{name} perk")],
        }
    }

    fn buy(at: DateTime<Utc>, spend: i64) -> PurchaseFact {
        PurchaseFact {
            at,
            spend,
            points: spend / 100,
            counted: true,
        }
    }

    /// Stores what an evaluation says, as the store does.
    fn stored(mut facts: Facts, e: &Evaluation, adding: Option<PurchaseFact>) -> Facts {
        facts.purchases.extend(adding);
        facts.status = e.status;
        facts.status_since = e.status_since;
        facts.regular_since = e.regular_since;
        facts.tier = e.tier.clone();
        if let Some(w) = &e.warning {
            facts.tier_warned_for = Some(w.below_since);
        }
        facts
    }

    /// A clock with nanoseconds: what the standing shows is at the columns' microseconds, so
    /// a sweep reading the stored facts back finds nothing changed.
    #[test]
    fn instants_are_kept_at_the_databases_microseconds() {
        let program = program();
        let now = day(10) + TimeDelta::nanoseconds(123_456_789);
        let facts = stored(
            Facts::new_customer(t0()),
            &evaluate(
                &program,
                &Facts::new_customer(t0()),
                Some(buy(t0(), 1_000)),
                Trigger::Purchase,
                t0(),
            ),
            Some(buy(t0(), 1_000)),
        );
        let second = evaluate(
            &program,
            &facts,
            Some(buy(now, 1_000)),
            Trigger::Purchase,
            now,
        );
        let micros = day(10) + TimeDelta::microseconds(123_456);
        assert_eq!(second.status_since, Some(micros));
        assert_eq!(second.standing.as_of, micros);
        let facts = stored(facts, &second, Some(buy(micros, 1_000)));
        let look = evaluate(&program, &facts, None, Trigger::Sweep, day(11));
        assert!(!look.differs_from(&facts, Some(&second.standing)));
    }

    #[test]
    fn the_second_purchase_makes_returning_and_the_hint_points_to_regular() {
        let program = program();
        let facts = Facts::new_customer(t0());
        let first = evaluate(
            &program,
            &facts,
            Some(buy(t0(), 1_000)),
            Trigger::Purchase,
            t0(),
        );
        assert_eq!(first.status, RepeatStatus::New);
        assert!(first.status_change.is_none());
        assert_eq!(
            first.standing.hint.unwrap().sentence(),
            "1 more purchase to become RETURNING"
        );
        let facts = stored(facts, &first, Some(buy(t0(), 1_000)));
        let second = evaluate(
            &program,
            &facts,
            Some(buy(day(10), 1_000)),
            Trigger::Purchase,
            day(10),
        );
        assert_eq!(second.status, RepeatStatus::Returning);
        let change = second.status_change.unwrap();
        assert_eq!(
            (change.from, change.to),
            (RepeatStatus::New, RepeatStatus::Returning)
        );
        assert_eq!(
            status_details(&change)["reason"]["code"],
            "repeat_purchases"
        );
        assert_eq!(second.status_since, Some(day(10)));
        // 2 of 4 within 180 days: the first leaves the window on day 180.
        assert_eq!(
            second.standing.hint.unwrap().sentence(),
            "2 more purchases within 170 days to become REGULAR"
        );
        assert_eq!(
            second
                .standing
                .clone()
                .at(day(100))
                .hint
                .unwrap()
                .within_days,
            Some(80)
        );
        // The sweep looks again when AT_RISK could come (30-day floor × ... the 2× gap of 10
        // days is under the floor).
        assert_eq!(second.review_at, Some(day(40)));
    }

    #[test]
    fn the_purchase_that_reaches_a_tier_upgrades_at_once_and_a_return_only_starts_the_grace() {
        let program = program();
        let mut facts = Facts::new_customer(t0());
        facts.purchases.push(buy(t0(), 6_000));
        let up = evaluate(
            &program,
            &facts,
            Some(buy(day(1), 5_000)),
            Trigger::Purchase,
            day(1),
        );
        let change = up.tier_change.clone().unwrap();
        assert_eq!(
            (change.from, change.to.as_deref(), change.change),
            (None, Some("silver"), "upgraded")
        );
        assert_eq!(up.standing.tier.as_ref().unwrap().name, "Silver");
        let progress = up.standing.progress.clone().unwrap();
        assert_eq!(
            (progress.next_tier_id.as_str(), progress.needed),
            ("gold", 39_000)
        );
        // The multiplier for the next purchase is Silver's.
        assert_eq!(program.tiers.earn_multiplier_bp(&up.tier), 12_500);

        let mut facts = stored(facts, &up, Some(buy(day(1), 5_000)));
        // A return takes 5,000 back: below Silver, but only the grace starts.
        facts.purchases[1].spend = 0;
        facts.purchases[1].counted = false;
        let ret = evaluate(&program, &facts, None, Trigger::Return, day(2));
        assert!(ret.tier_change.is_none());
        assert_eq!(ret.tier.tier_id.as_deref(), Some("silver"));
        assert_eq!(ret.tier.below_since, Some(day(2)));
        // The warning is due 7 days before the downgrade: the sweep's next look.
        assert_eq!(ret.review_at, Some(day(25)));
        let facts = stored(facts, &ret, None);

        let warned = evaluate(&program, &facts, None, Trigger::Sweep, day(25));
        let warning = warned.warning.clone().unwrap();
        assert_eq!(warning_details(&warning)["needed"], 4_000);
        assert!(warned.tier_change.is_none());
        // Next: AT_RISK on day 30 (the one visit left, 30 days of quiet), then the downgrade.
        assert_eq!(warned.review_at, Some(day(30)));
        let facts = stored(facts, &warned, None);
        // Once per grace.
        let again = evaluate(&program, &facts, None, Trigger::Sweep, day(26));
        assert!(again.warning.is_none());
        let later = evaluate(&program, &facts, None, Trigger::Sweep, day(31));
        assert!(later.warning.is_none());
        assert_eq!(later.review_at, Some(day(32)));

        let down = evaluate(&program, &facts, None, Trigger::Sweep, day(32));
        let change = down.tier_change.unwrap();
        assert_eq!(
            (change.from.as_deref(), change.to, change.change),
            (Some("silver"), None, "downgraded")
        );
        assert!(down.standing.tier.is_none());
    }

    #[test]
    fn with_the_points_metric_only_points_earned_count() {
        let mut program = program();
        program.tiers.metric = TierMetric::PointsEarned;
        program.tiers.levels = vec![tier("silver", "Silver", 100, 15_000)];
        let mut facts = Facts::new_customer(t0());
        facts.purchases.push(buy(t0(), 9_000));
        let e = evaluate(
            &program,
            &facts,
            Some(buy(day(1), 1_000)),
            Trigger::Purchase,
            day(1),
        );
        assert_eq!(e.tier.tier_id.as_deref(), Some("silver"));
        assert_eq!(e.tier_change.unwrap().reason()["value"], 100);
    }

    #[test]
    fn a_sweep_after_its_own_look_finds_nothing_due_at_once() {
        let program = program();
        let mut facts = Facts::new_customer(t0());
        facts.purchases.push(buy(t0(), 1_000));
        facts.purchases.push(buy(day(5), 1_000));
        facts.status = RepeatStatus::Returning;
        let e = evaluate(&program, &facts, None, Trigger::Sweep, day(200));
        assert_eq!(e.status, RepeatStatus::Lapsed);
        assert!(e.review_at.is_none_or(|t| t > day(200)));
        let e = evaluate(&program, &facts, None, Trigger::Sweep, day(60));
        assert_eq!(e.status, RepeatStatus::AtRisk);
        assert_eq!(e.review_at, Some(day(185)));
    }
}
