//! The pure rules of repeat-purchase status. No I/O; time comes in as a parameter.
//!
//! A customer's status at `now` is a function of their counted purchases (see
//! [`PurchaseHistory`]) and one stored instant, `regular_since`:
//!
//! - **NEW**: no purchase yet, or one.
//! - **RETURNING**: two purchases or more, not REGULAR.
//! - **REGULAR**: at least N purchases in the last W days.
//! - **LOYAL**: REGULAR without a break for at least M days, or at least K purchases in the last
//!   365 days.
//! - **AT_RISK**: no purchase for F × the customer's own median gap between purchases, and never
//!   less than the program's floor (a customer without a rhythm yet, one purchase, gets the
//!   floor).
//! - **LAPSED**: no purchase for D days.
//!
//! Precedence: LAPSED over AT_RISK over the status the purchases give (the *standing*: NEW,
//! RETURNING, REGULAR or LOYAL). A purchase clears AT_RISK and LAPSED at once, so the standing is
//! what the customer comes back to.
//!
//! Choices made here:
//!
//! - A purchase counts as a visit from its instant for exactly W days: in the window
//!   `(now - W, now]`. The same for the 365 days of K. A purchase dated after `now` (a till's
//!   clock a little ahead) counts as made at `now`.
//! - A fully returned purchase is not a visit: the store leaves it out of the history, and the
//!   return's transaction recomputes the status (which may step down, e.g. RETURNING → NEW). A
//!   partly returned purchase still counts.
//! - AT_RISK and LAPSED switch at the instant the threshold is reached (60 days of quiet with a
//!   60-day threshold is AT_RISK), so the instant the sweep must look again is exact.
//! - Windows are durations (a day is 24 hours, UTC), not calendar days: status is not about the
//!   customer's local day.
//! - "REGULAR for M days" needs the start of the current unbroken run of regularity, which may
//!   lie before any purchase the store still passes in: that is `regular_since`, stored with the
//!   status. The rules recompute it from the purchases wherever they can see (a break in the
//!   run is found even if no sweep ran while it lasted) and trust the stored value only before
//!   that; [`StatusThresholds::look_back_days`] keeps a break visible for at least
//!   [`BREAK_VISIBILITY_DAYS`].
//! - The status describes the current rhythm: a LOYAL or REGULAR customer whose purchases thin
//!   out steps down to RETURNING, without a purchase. Besides AT_RISK and LAPSED these are the
//!   time-driven changes the sweep finds; [`Assessment::review_at`] says when to look.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use chrono::{DateTime, Datelike, TimeDelta, Timelike, Utc};
use serde::{Deserialize, Serialize};

use crate::platform::validation::Violations;
use crate::programs::rules::BASE_MULTIPLIER_BP;

/// The window of K (LOYAL by purchases in a year).
pub const YEAR_DAYS: u32 = 365;
/// Ten years: the longest window or period a threshold may name.
pub const MAX_DAYS: u32 = 3_650;
/// The most purchases N or K may ask for.
pub const MAX_PURCHASES: u32 = 1_000;
/// F may not be below 1× (a customer is not at risk before their usual gap has passed) ...
pub const MIN_GAP_FACTOR_BP: u32 = BASE_MULTIPLIER_BP;
/// ... nor above 10×.
pub const MAX_GAP_FACTOR_BP: u32 = 100_000;
/// How long a break in a customer's regularity stays visible in the purchases passed in, so a
/// sweep late by up to this many days still ends the run.
pub const BREAK_VISIBILITY_DAYS: u32 = 30;

pub const DEFAULT_REGULAR_PURCHASES: u32 = 4;
pub const DEFAULT_REGULAR_WINDOW_DAYS: u32 = 180;
pub const DEFAULT_LOYAL_AFTER_REGULAR_DAYS: u32 = 180;
pub const DEFAULT_LOYAL_PURCHASES_PER_YEAR: u32 = 10;
/// 2×, in basis points.
pub const DEFAULT_AT_RISK_GAP_FACTOR_BP: u32 = 20_000;
pub const DEFAULT_AT_RISK_FLOOR_DAYS: u32 = 30;
pub const DEFAULT_LAPSED_AFTER_DAYS: u32 = 180;

/// The program's status thresholds. Stored as one JSON column (`programs.status`); a missing
/// field, or a program written before statuses existed, reads as the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StatusThresholds {
    /// N: purchases within the window that make a customer REGULAR.
    pub regular_purchases: u32,
    /// W, in days.
    pub regular_window_days: u32,
    /// M: days of unbroken regularity that make a REGULAR customer LOYAL.
    pub loyal_after_regular_days: u32,
    /// K: purchases within 365 days that make a customer LOYAL.
    pub loyal_purchases_per_year: u32,
    /// F, in basis points (20,000 = 2×): quiet for F × their median gap puts a customer AT_RISK.
    pub at_risk_gap_factor_bp: u32,
    /// The shortest quiet, in days, that makes a customer AT_RISK, whatever their rhythm.
    pub at_risk_floor_days: u32,
    /// D: days without a purchase that make a customer LAPSED.
    pub lapsed_after_days: u32,
}

impl Default for StatusThresholds {
    fn default() -> Self {
        StatusThresholds {
            regular_purchases: DEFAULT_REGULAR_PURCHASES,
            regular_window_days: DEFAULT_REGULAR_WINDOW_DAYS,
            loyal_after_regular_days: DEFAULT_LOYAL_AFTER_REGULAR_DAYS,
            loyal_purchases_per_year: DEFAULT_LOYAL_PURCHASES_PER_YEAR,
            at_risk_gap_factor_bp: DEFAULT_AT_RISK_GAP_FACTOR_BP,
            at_risk_floor_days: DEFAULT_AT_RISK_FLOOR_DAYS,
            lapsed_after_days: DEFAULT_LAPSED_AFTER_DAYS,
        }
    }
}

impl StatusThresholds {
    /// Checks the bounds, naming fields of `loyalty.v1.Program` (`program.status.*`).
    pub fn check(&self, v: &mut Violations) {
        // The second purchase makes RETURNING; REGULAR has to ask for more.
        if !(3..=MAX_PURCHASES).contains(&self.regular_purchases) {
            v.add(
                "program.status.regular_purchases",
                format!("must be between 3 and {MAX_PURCHASES}"),
            );
        }
        for (field, days) in [
            (
                "program.status.regular_window_days",
                self.regular_window_days,
            ),
            (
                "program.status.loyal_after_regular_days",
                self.loyal_after_regular_days,
            ),
        ] {
            if !(1..=MAX_DAYS).contains(&days) {
                v.add(field, format!("must be between 1 and {MAX_DAYS}"));
            }
        }
        // Fewer would make every REGULAR customer LOYAL at once.
        if self.loyal_purchases_per_year <= self.regular_purchases
            || self.loyal_purchases_per_year > MAX_PURCHASES
        {
            v.add(
                "program.status.loyal_purchases_per_year",
                format!("must be more than regular_purchases and at most {MAX_PURCHASES}"),
            );
        }
        if !(MIN_GAP_FACTOR_BP..=MAX_GAP_FACTOR_BP).contains(&self.at_risk_gap_factor_bp) {
            v.add(
                "program.status.at_risk_gap_factor_bp",
                format!("must be between {MIN_GAP_FACTOR_BP} (1×) and {MAX_GAP_FACTOR_BP} (10×)"),
            );
        }
        if !(2..=MAX_DAYS).contains(&self.lapsed_after_days) {
            v.add(
                "program.status.lapsed_after_days",
                format!("must be between 2 and {MAX_DAYS}"),
            );
        }
        // At the floor or later a customer would be LAPSED already: AT_RISK could never show.
        if self.at_risk_floor_days == 0 || self.at_risk_floor_days >= self.lapsed_after_days {
            v.add(
                "program.status.at_risk_floor_days",
                "must be at least 1 and less than lapsed_after_days",
            );
        }
    }

    /// How far back the store must pass a customer's purchases ([`PurchaseHistory::recent`]):
    /// the year of K, the D days of LAPSED, and the window W with room to see a break in it.
    pub fn look_back_days(&self) -> u32 {
        YEAR_DAYS.max(self.lapsed_after_days).max(
            self.regular_window_days
                .saturating_add(BREAK_VISIBILITY_DAYS),
        )
    }

    /// The quiet that makes a customer with this median gap AT_RISK: F × the gap, never less
    /// than the floor (a customer with no gap yet gets the floor).
    pub fn at_risk_after(&self, median_gap: Option<TimeDelta>) -> TimeDelta {
        let floor = days(self.at_risk_floor_days);
        let Some(gap) = median_gap else {
            return floor;
        };
        let scaled = i128::from(gap.num_seconds().max(0)) * i128::from(self.at_risk_gap_factor_bp)
            / i128::from(BASE_MULTIPLIER_BP);
        let scaled = i64::try_from(scaled)
            .ok()
            .and_then(TimeDelta::try_seconds)
            .unwrap_or(TimeDelta::MAX);
        scaled.max(floor)
    }
}

/// A customer's repeat-purchase status. Stored by [`RepeatStatus::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RepeatStatus {
    New,
    Returning,
    Regular,
    Loyal,
    AtRisk,
    Lapsed,
}

impl RepeatStatus {
    pub const ALL: [RepeatStatus; 6] = [
        RepeatStatus::New,
        RepeatStatus::Returning,
        RepeatStatus::Regular,
        RepeatStatus::Loyal,
        RepeatStatus::AtRisk,
        RepeatStatus::Lapsed,
    ];

    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            RepeatStatus::New => "new",
            RepeatStatus::Returning => "returning",
            RepeatStatus::Regular => "regular",
            RepeatStatus::Loyal => "loyal",
            RepeatStatus::AtRisk => "at_risk",
            RepeatStatus::Lapsed => "lapsed",
        }
    }

    pub fn parse(value: &str) -> Option<RepeatStatus> {
        RepeatStatus::ALL.into_iter().find(|s| s.as_str() == value)
    }

    /// The name shown to people: `REGULAR`, `AT_RISK`.
    pub fn label(self) -> &'static str {
        match self {
            RepeatStatus::New => "NEW",
            RepeatStatus::Returning => "RETURNING",
            RepeatStatus::Regular => "REGULAR",
            RepeatStatus::Loyal => "LOYAL",
            RepeatStatus::AtRisk => "AT_RISK",
            RepeatStatus::Lapsed => "LAPSED",
        }
    }

    /// The rung of the ladder a customer climbs by coming back; `None` for AT_RISK and LAPSED,
    /// which are off the ladder.
    fn rung(self) -> Option<u8> {
        match self {
            RepeatStatus::New => Some(0),
            RepeatStatus::Returning => Some(1),
            RepeatStatus::Regular => Some(2),
            RepeatStatus::Loyal => Some(3),
            RepeatStatus::AtRisk | RepeatStatus::Lapsed => None,
        }
    }
}

/// What the store passes in about one customer's purchases. Only *counted* purchases: a fully
/// returned purchase is left out (it was no visit); a partly returned one stays.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PurchaseHistory {
    /// Counted purchases ever (tells NEW from RETURNING, and a LAPSED customer from one who
    /// never bought).
    pub counted_purchases: u64,
    /// The instants of the counted purchases of the last
    /// [`StatusThresholds::look_back_days`], in any order. Older ones are ignored.
    pub recent: Vec<DateTime<Utc>>,
}

/// Why a customer has the status they have: the basis of the status, stored with every change
/// of the history (`code` and the numbers, as JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "code", rename_all = "snake_case")]
pub enum StatusReason {
    /// NEW: no counted purchase.
    NoPurchaseYet,
    /// NEW: one counted purchase.
    FirstPurchase,
    /// RETURNING: two counted purchases or more, fewer than N within the window.
    RepeatPurchases {
        purchases_in_window: u32,
        needed: u32,
        window_days: u32,
    },
    /// REGULAR: at least N purchases within the window.
    PurchasesInWindow { purchases: u32, window_days: u32 },
    /// LOYAL: REGULAR without a break for `days` (at least M).
    RegularFor { days: u32 },
    /// LOYAL: at least K purchases within 365 days.
    PurchasesInYear { purchases: u32 },
    /// AT_RISK: `quiet_days` without a purchase, past the threshold of `threshold_days` (the
    /// floor when `floor_applied`, otherwise F × the median gap).
    QuietBeyondRhythm {
        quiet_days: u32,
        threshold_days: u32,
        median_gap_days: Option<u32>,
        floor_applied: bool,
    },
    /// LAPSED: no purchase for `days` (for a customer with no purchase in the look-back, at
    /// least that many).
    NoPurchaseFor { days: u32 },
}

impl StatusReason {
    /// A stable name, for the history table and events.
    pub fn code(&self) -> &'static str {
        match self {
            StatusReason::NoPurchaseYet => "no_purchase_yet",
            StatusReason::FirstPurchase => "first_purchase",
            StatusReason::RepeatPurchases { .. } => "repeat_purchases",
            StatusReason::PurchasesInWindow { .. } => "purchases_in_window",
            StatusReason::RegularFor { .. } => "regular_for",
            StatusReason::PurchasesInYear { .. } => "purchases_in_year",
            StatusReason::QuietBeyondRhythm { .. } => "quiet_beyond_rhythm",
            StatusReason::NoPurchaseFor { .. } => "no_purchase_for",
        }
    }
}

/// A customer's status at an instant, and what to store with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assessment {
    pub status: RepeatStatus,
    pub reason: StatusReason,
    /// What the purchases alone make the customer (NEW, RETURNING, REGULAR or LOYAL): the
    /// status they come back to with their next purchase. Equal to `status` unless that is
    /// AT_RISK or LAPSED.
    pub standing: RepeatStatus,
    /// The start of the customer's unbroken run of regularity; `None` when not REGULAR by
    /// count now. Stored, and passed back in next time.
    pub regular_since: Option<DateTime<Utc>>,
    /// The earliest instant the status may change with no purchase or return (the sweep's
    /// `WHERE status_review_at <= now`); `None`: only a purchase changes it (NEW without
    /// purchases, LAPSED). Looking earlier or later is harmless; it only costs a visit.
    pub review_at: Option<DateTime<Utc>>,
}

/// What made the service look at a customer's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    Purchase,
    Return,
    /// The daily sweep (time-driven changes).
    Sweep,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Purchase => "purchase",
            Trigger::Return => "return",
            Trigger::Sweep => "sweep",
        }
    }
}

/// Up: the customer came back or climbed; down: they slowed, went quiet or returned a visit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Up,
    Down,
}

/// One entry of the status history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusChange {
    pub from: RepeatStatus,
    pub to: RepeatStatus,
    pub direction: Direction,
    pub trigger: Trigger,
    /// The basis of the new status.
    pub reason: StatusReason,
    pub at: DateTime<Utc>,
}

/// The change from the stored status to the assessed one, if it is one. A customer with no
/// stored status yet is NEW.
pub fn status_change(
    previous: RepeatStatus,
    assessment: &Assessment,
    trigger: Trigger,
    now: DateTime<Utc>,
) -> Option<StatusChange> {
    let to = assessment.status;
    if to == previous {
        return None;
    }
    let direction = match (previous.rung(), to.rung()) {
        (Some(from), Some(to)) if to > from => Direction::Up,
        (Some(_), Some(_)) | (Some(_), None) => Direction::Down,
        // Back from AT_RISK or LAPSED.
        (None, Some(_)) => Direction::Up,
        (None, None) if to == RepeatStatus::Lapsed => Direction::Down,
        (None, None) => Direction::Up,
    };
    Some(StatusChange {
        from: previous,
        to,
        direction,
        trigger,
        reason: assessment.reason,
        at: now,
    })
}

/// The status of a customer at `now`, given their purchases and the `regular_since` stored
/// with their previous assessment.
pub fn assess(
    thresholds: &StatusThresholds,
    history: &PurchaseHistory,
    regular_since: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Assessment {
    let timeline = Timeline::new(thresholds, history, now);
    let window = days(thresholds.regular_window_days);
    let in_window = timeline.within(window);
    let in_year = timeline.within(days(YEAR_DAYS));
    let regular_since = timeline.regular_since(thresholds, regular_since);
    let regular_for = regular_since.map(|since| now.signed_duration_since(since));
    let loyal_after = days(thresholds.loyal_after_regular_days);

    let (standing, standing_reason) = if let Some(run) = regular_for.filter(|r| *r >= loyal_after) {
        (
            RepeatStatus::Loyal,
            StatusReason::RegularFor {
                days: whole_days(run),
            },
        )
    } else if count(in_year) >= thresholds.loyal_purchases_per_year {
        (
            RepeatStatus::Loyal,
            StatusReason::PurchasesInYear {
                purchases: count(in_year),
            },
        )
    } else if regular_since.is_some() {
        (
            RepeatStatus::Regular,
            StatusReason::PurchasesInWindow {
                purchases: count(in_window),
                window_days: thresholds.regular_window_days,
            },
        )
    } else if timeline.counted >= 2 {
        (
            RepeatStatus::Returning,
            StatusReason::RepeatPurchases {
                purchases_in_window: count(in_window),
                needed: thresholds.regular_purchases,
                window_days: thresholds.regular_window_days,
            },
        )
    } else if timeline.counted == 1 {
        (RepeatStatus::New, StatusReason::FirstPurchase)
    } else {
        (RepeatStatus::New, StatusReason::NoPurchaseYet)
    };

    let lapse_after = days(thresholds.lapsed_after_days);
    let median_gap = gaps_median(&timeline.instants);
    let at_risk_after = thresholds.at_risk_after(median_gap);
    let (status, reason) = match timeline.last() {
        None if timeline.counted == 0 => (standing, standing_reason),
        // Purchases, but none within the look-back: quiet for longer than D.
        None => (
            RepeatStatus::Lapsed,
            StatusReason::NoPurchaseFor {
                days: thresholds.look_back_days(),
            },
        ),
        Some(last) => {
            let quiet = now.signed_duration_since(last);
            if quiet >= lapse_after {
                (
                    RepeatStatus::Lapsed,
                    StatusReason::NoPurchaseFor {
                        days: whole_days(quiet),
                    },
                )
            } else if quiet >= at_risk_after {
                let floor = days(thresholds.at_risk_floor_days);
                (
                    RepeatStatus::AtRisk,
                    StatusReason::QuietBeyondRhythm {
                        quiet_days: whole_days(quiet),
                        threshold_days: whole_days(at_risk_after),
                        median_gap_days: median_gap.map(whole_days),
                        floor_applied: at_risk_after == floor,
                    },
                )
            } else {
                (standing, standing_reason)
            }
        }
    };

    // The instants at which, with nothing new, something above would come out differently.
    let mut review = Vec::new();
    if status != RepeatStatus::Lapsed {
        if let Some(last) = timeline.last() {
            review.push(last.checked_add_signed(lapse_after));
            if status != RepeatStatus::AtRisk {
                review.push(last.checked_add_signed(at_risk_after));
            }
        }
        if regular_since.is_some() {
            // The purchase whose leaving takes the window below N.
            let n = thresholds.regular_purchases as usize;
            if let Some(p) = in_window.len().checked_sub(n).map(|i| in_window[i]) {
                review.push(p.checked_add_signed(window));
            }
        }
        if let Some(since) = regular_since
            && regular_for.is_some_and(|r| r < loyal_after)
        {
            review.push(since.checked_add_signed(loyal_after));
        }
        let k = thresholds.loyal_purchases_per_year as usize;
        if k > 0
            && let Some(p) = in_year.len().checked_sub(k).map(|i| in_year[i])
        {
            review.push(p.checked_add_signed(days(YEAR_DAYS)));
        }
    }
    let review_at = review.into_iter().flatten().filter(|t| *t > now).min();

    Assessment {
        status,
        reason,
        standing,
        regular_since,
        review_at,
    }
}

/// The median gap between consecutive purchases (any order), `None` with fewer than two. With
/// an even number of gaps, the mean of the middle two.
pub fn median_gap(instants: &[DateTime<Utc>]) -> Option<TimeDelta> {
    let mut sorted = instants.to_vec();
    sorted.sort_unstable();
    gaps_median(&sorted)
}

/// [`median_gap`] of instants sorted already.
fn gaps_median(sorted: &[DateTime<Utc>]) -> Option<TimeDelta> {
    let mut gaps: Vec<i64> = sorted
        .windows(2)
        .map(|pair| pair[1].signed_duration_since(pair[0]).num_seconds())
        .collect();
    if gaps.is_empty() {
        return None;
    }
    gaps.sort_unstable();
    let mid = gaps.len() / 2;
    let seconds = if gaps.len() % 2 == 1 {
        gaps[mid]
    } else {
        let (low, high) = (gaps[mid - 1], gaps[mid]);
        low + (high - low) / 2
    };
    TimeDelta::try_seconds(seconds)
}

/// How the customer reaches the next status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HintRoute {
    /// NEW → RETURNING: purchases, whenever.
    MorePurchases,
    /// N purchases within W days (REGULAR), or K within 365 (LOYAL).
    PurchasesInWindow,
    /// Stay REGULAR without a break until `arrives_at` (LOYAL).
    StayRegular,
    /// AT_RISK or LAPSED: one purchase brings the customer back to `target`.
    ComeBack,
}

/// What a customer needs for their next status: "1 more purchase within 23 days to become
/// REGULAR". Structured for apps that word it themselves; [`NextStatusHint::sentence`] is the
/// English one. Stored with the customer's standing (instants only); [`NextStatusHint::at`]
/// makes it relative to the moment it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NextStatusHint {
    pub target: RepeatStatus,
    pub route: HintRoute,
    pub purchases_needed: u32,
    /// The needed purchases count only if made before this instant: then the oldest purchase
    /// still counting leaves the window. For [`HintRoute::StayRegular`], the next purchase is
    /// due before it (later ones come later).
    pub deadline: Option<DateTime<Utc>>,
    /// Whole days left before `deadline` (rounded down); or, when no purchase counts yet, the
    /// window the needed purchases must fit in.
    pub within_days: Option<u32>,
    /// For [`HintRoute::StayRegular`]: when LOYAL comes if the customer stays REGULAR.
    pub arrives_at: Option<DateTime<Utc>>,
}

impl NextStatusHint {
    /// The hint as seen at `now`: the days left before its deadline counted from `now` (a
    /// hint computed at a write and read later). A hint without a deadline is unchanged.
    pub fn at(self, now: DateTime<Utc>) -> NextStatusHint {
        match self.deadline {
            Some(deadline) => NextStatusHint {
                within_days: Some(whole_days(deadline.signed_duration_since(now))),
                ..self
            },
            None => self,
        }
    }

    /// The hint in English, e.g. "1 more purchase within 23 days to become REGULAR".
    ///
    /// Made on every GetBalance and GetCustomer (the days left change as time passes), so it
    /// is written into one string, dates by hand rather than through a strftime pattern that
    /// would be parsed anew each time.
    pub fn sentence(&self) -> String {
        let mut out = String::with_capacity(96);
        let target = self.target.label();
        match (self.route, self.arrives_at) {
            (HintRoute::StayRegular, Some(arrives_at)) => {
                if self.purchases_needed > 0 && self.has_when() {
                    self.write_purchases(&mut out);
                    out.push_str(" to stay REGULAR until ");
                    write_date(&mut out, arrives_at);
                    out.push_str(" and become ");
                    out.push_str(target);
                    out.push_str(", the next ");
                    self.write_when(&mut out);
                } else {
                    out.push_str("stay REGULAR until ");
                    write_date(&mut out, arrives_at);
                    out.push_str(" to become ");
                    out.push_str(target);
                }
            }
            (HintRoute::ComeBack, _) => {
                self.write_purchases(&mut out);
                out.push_str(" to become ");
                out.push_str(target);
                out.push_str(" again");
            }
            _ => {
                self.write_purchases(&mut out);
                if self.has_when() {
                    out.push(' ');
                    self.write_when(&mut out);
                }
                out.push_str(" to become ");
                out.push_str(target);
            }
        }
        out
    }

    fn has_when(&self) -> bool {
        self.deadline.is_some() || self.within_days.is_some()
    }

    /// "1 more purchase", "3 more purchases".
    fn write_purchases(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = match self.purchases_needed {
            1 => write!(out, "1 more purchase"),
            n => write!(out, "{n} more purchases"),
        };
    }

    /// "within 23 days", or the exact instant when less than a day is left (nothing when the
    /// hint has neither: see `has_when`).
    fn write_when(&self, out: &mut String) {
        use std::fmt::Write;
        match (self.deadline, self.within_days) {
            (Some(deadline), Some(0) | None) => {
                out.push_str("before ");
                write_date(out, deadline);
                let _ = write!(out, " {:02}:{:02} UTC", deadline.hour(), deadline.minute());
            }
            (_, Some(1)) => out.push_str("within 1 day"),
            (_, Some(days)) => {
                let _ = write!(out, "within {days} days");
            }
            (None, None) => {}
        }
    }
}

/// `2026-06-30` (the UTC date).
fn write_date(out: &mut String, at: DateTime<Utc>) {
    use std::fmt::Write;
    let _ = write!(out, "{:04}-{:02}-{:02}", at.year(), at.month(), at.day());
}

/// What the customer needs for the status above `assessment.status`; `None` at LOYAL (the top)
/// or when nothing can be said (thresholds out of bounds).
pub fn next_status_hint(
    thresholds: &StatusThresholds,
    history: &PurchaseHistory,
    assessment: &Assessment,
    now: DateTime<Utc>,
) -> Option<NextStatusHint> {
    let timeline = Timeline::new(thresholds, history, now);
    match assessment.status {
        RepeatStatus::Loyal => None,
        RepeatStatus::AtRisk | RepeatStatus::Lapsed => {
            // Where one purchase now would bring them.
            let mut with_one = PurchaseHistory {
                counted_purchases: timeline.counted.saturating_add(1),
                recent: timeline.instants.clone(),
            };
            with_one.recent.push(now);
            let back = assess(thresholds, &with_one, assessment.regular_since, now);
            Some(NextStatusHint {
                target: back.status,
                route: HintRoute::ComeBack,
                purchases_needed: 1,
                deadline: None,
                within_days: None,
                arrives_at: None,
            })
        }
        RepeatStatus::New => Some(NextStatusHint {
            target: RepeatStatus::Returning,
            route: HintRoute::MorePurchases,
            purchases_needed: u32::try_from(2u64.saturating_sub(timeline.counted)).unwrap_or(2),
            deadline: None,
            within_days: None,
            arrives_at: None,
        }),
        RepeatStatus::Returning => {
            let regular = window_route(
                &timeline,
                RepeatStatus::Regular,
                thresholds.regular_purchases,
                thresholds.regular_window_days,
            );
            let loyal = window_route(
                &timeline,
                RepeatStatus::Loyal,
                thresholds.loyal_purchases_per_year,
                YEAR_DAYS,
            );
            // The fewest purchases; on a tie, the higher status (the same effort gets more).
            Some(if loyal.purchases_needed <= regular.purchases_needed {
                loyal
            } else {
                regular
            })
        }
        RepeatStatus::Regular => {
            let by_count = window_route(
                &timeline,
                RepeatStatus::Loyal,
                thresholds.loyal_purchases_per_year,
                YEAR_DAYS,
            );
            match stay_regular_route(thresholds, &timeline, assessment.regular_since) {
                // On a tie the count: it can come at once, staying regular takes time.
                Some(stay) if stay.purchases_needed < by_count.purchases_needed => Some(stay),
                _ => Some(by_count),
            }
        }
    }
}

/// `needed` purchases within `window_days` make `target`: the ones still counting, and the
/// rest before the oldest of them leaves the window.
fn window_route(
    timeline: &Timeline,
    target: RepeatStatus,
    needed: u32,
    window_days: u32,
) -> NextStatusHint {
    let counting = timeline.within(days(window_days));
    let purchases_needed = needed.saturating_sub(count(counting)).max(1);
    let deadline = counting
        .first()
        .and_then(|oldest| oldest.checked_add_signed(days(window_days)));
    let within_days = match deadline {
        Some(deadline) => Some(whole_days(deadline.signed_duration_since(timeline.now))),
        None => Some(window_days),
    };
    NextStatusHint {
        target,
        route: HintRoute::PurchasesInWindow,
        purchases_needed,
        deadline,
        within_days,
        arrives_at: None,
    }
}

/// LOYAL by staying REGULAR until `regular_since + M`: the fewest purchases that keep N in
/// the window at every instant until then. Each time a purchase leaving the window would take
/// the count below N, one more purchase is needed, at the latest at that instant (when it, in
/// turn, starts counting for W days). `None` when not regular or past any bound.
fn stay_regular_route(
    thresholds: &StatusThresholds,
    timeline: &Timeline,
    regular_since: Option<DateTime<Utc>>,
) -> Option<NextStatusHint> {
    let arrives_at =
        regular_since?.checked_add_signed(days(thresholds.loyal_after_regular_days))?;
    let window = days(thresholds.regular_window_days);
    let counting = timeline.within(window);
    let mut in_window = count(counting);
    let mut leaving: BinaryHeap<Reverse<DateTime<Utc>>> = counting
        .iter()
        .filter_map(|p| p.checked_add_signed(window))
        .map(Reverse)
        .collect();
    let mut purchases_needed: u32 = 0;
    let mut deadline = None;
    while let Some(Reverse(at)) = leaving.pop() {
        if at > arrives_at {
            break;
        }
        in_window = in_window.saturating_sub(1);
        if in_window < thresholds.regular_purchases {
            purchases_needed = purchases_needed.checked_add(1)?;
            // A run this long asks for more purchases than any threshold: say nothing.
            if purchases_needed > MAX_PURCHASES.saturating_mul(2) {
                return None;
            }
            deadline = deadline.or(Some(at));
            in_window += 1;
            if let Some(next) = at.checked_add_signed(window) {
                leaving.push(Reverse(next));
            }
        }
    }
    Some(NextStatusHint {
        target: RepeatStatus::Loyal,
        route: HintRoute::StayRegular,
        purchases_needed,
        deadline,
        within_days: deadline.map(|d| whole_days(d.signed_duration_since(timeline.now))),
        arrives_at: Some(arrives_at),
    })
}

/// The purchases of one assessment: counted, within the look-back, sorted, none after `now`.
struct Timeline {
    instants: Vec<DateTime<Utc>>,
    counted: u64,
    /// Purchases before this are not passed in.
    horizon: DateTime<Utc>,
    now: DateTime<Utc>,
}

impl Timeline {
    fn new(
        thresholds: &StatusThresholds,
        history: &PurchaseHistory,
        now: DateTime<Utc>,
    ) -> Timeline {
        let horizon = earlier(now, days(thresholds.look_back_days()));
        let mut instants: Vec<DateTime<Utc>> = history
            .recent
            .iter()
            .map(|p| (*p).min(now))
            .filter(|p| *p > horizon)
            .collect();
        instants.sort_unstable();
        let counted = history.counted_purchases.max(instants.len() as u64);
        Timeline {
            instants,
            counted,
            horizon,
            now,
        }
    }

    fn last(&self) -> Option<DateTime<Utc>> {
        self.instants.last().copied()
    }

    /// The purchases counting in the window `(now - window, now]`, oldest first.
    fn within(&self, window: TimeDelta) -> &[DateTime<Utc>] {
        self.in_window_at(self.now, window)
    }

    /// The purchases counting at instant `t` in a window of `window`: `(t - window, t]`.
    fn in_window_at(&self, t: DateTime<Utc>, window: TimeDelta) -> &[DateTime<Utc>] {
        let start = earlier(t, window);
        let from = self.instants.partition_point(|p| *p <= start);
        let to = self.instants.partition_point(|p| *p <= t);
        &self.instants[from..to.max(from)]
    }

    /// The start of the unbroken run of regularity that reaches `now`, or `None` when the
    /// customer is not regular now. The count in the window falls only when a purchase leaves
    /// it, so a break can only begin at such an instant: the latest one where the count is
    /// below N ends any earlier run, and the run starts at the purchase that brought the count
    /// back to N. The count is exact only from `horizon + W` on (before, older purchases are
    /// missing); a run unbroken since then started at `stored` if that is earlier, or then.
    fn regular_since(
        &self,
        thresholds: &StatusThresholds,
        stored: Option<DateTime<Utc>>,
    ) -> Option<DateTime<Utc>> {
        let window = days(thresholds.regular_window_days);
        let needed = thresholds.regular_purchases.max(1);
        if count(self.within(window)) < needed {
            return None;
        }
        let exact_from = self
            .horizon
            .checked_add_signed(window)
            .map_or(self.now, |t| t.min(self.now));
        let below = |t: DateTime<Utc>| count(self.in_window_at(t, window)) < needed;
        let last_break = self
            .instants
            .iter()
            .filter_map(|p| p.checked_add_signed(window))
            .chain([exact_from])
            .filter(|t| *t >= exact_from && *t <= self.now && below(*t))
            .max();
        match last_break {
            Some(broken_at) => self
                .instants
                .iter()
                .copied()
                .find(|p| *p > broken_at && !below(*p)),
            None => Some(stored.map_or(exact_from, |since| since.min(exact_from))),
        }
    }
}

/// `n` days; saturates rather than fails (a `u32` of days is far inside chrono's range).
fn days(n: u32) -> TimeDelta {
    TimeDelta::try_days(i64::from(n)).unwrap_or(TimeDelta::MAX)
}

/// `t - span`, or the earliest instant chrono knows.
fn earlier(t: DateTime<Utc>, span: TimeDelta) -> DateTime<Utc> {
    t.checked_sub_signed(span)
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// Whole days in `span`, rounded down; 0 for a negative span.
fn whole_days(span: TimeDelta) -> u32 {
    u32::try_from(span.num_days().max(0)).unwrap_or(u32::MAX)
}

fn count(purchases: &[DateTime<Utc>]) -> u32 {
    u32::try_from(purchases.len()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    /// Day `n` of the tests' calendar, at noon: day 0 is 1 January 2026.
    fn day(n: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap() + TimeDelta::days(n)
    }

    fn bought_on(days: &[i64]) -> PurchaseHistory {
        PurchaseHistory {
            counted_purchases: days.len() as u64,
            recent: days.iter().map(|n| day(*n)).collect(),
        }
    }

    fn defaults() -> StatusThresholds {
        StatusThresholds::default()
    }

    fn status_on(history: &PurchaseHistory, now: DateTime<Utc>) -> RepeatStatus {
        assess(&defaults(), history, None, now).status
    }

    fn fields(thresholds: StatusThresholds) -> Vec<String> {
        let mut v = Violations::default();
        thresholds.check(&mut v);
        v.into_error().0.into_iter().map(|v| v.field).collect()
    }

    #[test]
    fn defaults_are_the_issue_s_and_an_empty_object_reads_as_them() {
        let t = defaults();
        assert_eq!(
            (
                t.regular_purchases,
                t.regular_window_days,
                t.loyal_after_regular_days,
                t.loyal_purchases_per_year,
                t.at_risk_gap_factor_bp,
                t.at_risk_floor_days,
                t.lapsed_after_days
            ),
            (4, 180, 180, 10, 20_000, 30, 180)
        );
        assert!(fields(t).is_empty());
        assert_eq!(serde_json::from_str::<StatusThresholds>("{}").unwrap(), t);
        let partial: StatusThresholds =
            serde_json::from_str(r#"{"regular_purchases": 5}"#).unwrap();
        assert_eq!(
            partial,
            StatusThresholds {
                regular_purchases: 5,
                ..t
            }
        );
        let custom = StatusThresholds {
            at_risk_gap_factor_bp: 15_000,
            lapsed_after_days: 365,
            ..t
        };
        let json = serde_json::to_string(&custom).unwrap();
        assert_eq!(
            serde_json::from_str::<StatusThresholds>(&json).unwrap(),
            custom
        );
        assert_eq!(t.look_back_days(), 365);
        assert_eq!(
            StatusThresholds {
                regular_window_days: 360,
                ..t
            }
            .look_back_days(),
            390
        );
    }

    #[test]
    fn bounds_name_their_fields() {
        assert_eq!(
            fields(StatusThresholds {
                regular_purchases: 2,
                regular_window_days: 0,
                loyal_after_regular_days: MAX_DAYS + 1,
                loyal_purchases_per_year: 2,
                at_risk_gap_factor_bp: 9_999,
                at_risk_floor_days: 180,
                lapsed_after_days: 180,
            }),
            [
                "program.status.regular_purchases",
                "program.status.regular_window_days",
                "program.status.loyal_after_regular_days",
                "program.status.loyal_purchases_per_year",
                "program.status.at_risk_gap_factor_bp",
                "program.status.at_risk_floor_days",
            ]
        );
        assert_eq!(
            fields(StatusThresholds {
                at_risk_floor_days: 0,
                lapsed_after_days: 1,
                at_risk_gap_factor_bp: MAX_GAP_FACTOR_BP + 1,
                ..defaults()
            }),
            [
                "program.status.at_risk_gap_factor_bp",
                "program.status.lapsed_after_days",
                "program.status.at_risk_floor_days",
            ]
        );
    }

    #[test]
    fn statuses_are_stored_by_name() {
        for status in RepeatStatus::ALL {
            assert_eq!(RepeatStatus::parse(status.as_str()), Some(status));
        }
        assert_eq!(RepeatStatus::parse("vip"), None);
        assert_eq!(RepeatStatus::AtRisk.label(), "AT_RISK");
        let reason = StatusReason::PurchasesInWindow {
            purchases: 4,
            window_days: 180,
        };
        assert_eq!(
            serde_json::to_string(&reason).unwrap(),
            r#"{"code":"purchases_in_window","purchases":4,"window_days":180}"#
        );
        assert_eq!(reason.code(), "purchases_in_window");
    }

    #[test]
    fn the_ladder_new_returning_regular() {
        let none = assess(&defaults(), &PurchaseHistory::default(), None, day(0));
        assert_eq!(none.status, RepeatStatus::New);
        assert_eq!(none.reason, StatusReason::NoPurchaseYet);
        assert_eq!(
            none.review_at, None,
            "only a purchase changes a NEW customer"
        );

        let one = assess(&defaults(), &bought_on(&[0]), None, day(0));
        assert_eq!(
            (one.status, one.reason),
            (RepeatStatus::New, StatusReason::FirstPurchase)
        );
        let two = assess(&defaults(), &bought_on(&[0, 10]), None, day(10));
        assert_eq!(two.status, RepeatStatus::Returning);
        assert_eq!(
            two.reason,
            StatusReason::RepeatPurchases {
                purchases_in_window: 2,
                needed: 4,
                window_days: 180
            }
        );
        let four = assess(&defaults(), &bought_on(&[0, 10, 20, 30]), None, day(30));
        assert_eq!(four.status, RepeatStatus::Regular);
        assert_eq!(four.regular_since, Some(day(30)));
        assert_eq!(
            four.reason,
            StatusReason::PurchasesInWindow {
                purchases: 4,
                window_days: 180
            }
        );
    }

    #[test]
    fn a_purchase_counts_for_exactly_the_window() {
        // Every 50 days: REGULAR on the fourth. Day 0 leaves the window at day 180 exactly.
        let history = bought_on(&[0, 50, 100, 150]);
        let second_before = day(180) - TimeDelta::seconds(1);
        let before = assess(&defaults(), &history, Some(day(150)), second_before);
        assert_eq!(before.status, RepeatStatus::Regular);
        assert_eq!(before.review_at, Some(day(180)));
        let after = assess(&defaults(), &history, before.regular_since, day(180));
        assert_eq!(after.status, RepeatStatus::Returning);
        assert_eq!(after.regular_since, None);
        let change = status_change(before.status, &after, Trigger::Sweep, day(180)).unwrap();
        assert_eq!(change.direction, Direction::Down);
        assert_eq!(
            change.reason,
            StatusReason::RepeatPurchases {
                purchases_in_window: 3,
                needed: 4,
                window_days: 180
            }
        );
    }

    #[test]
    fn loyal_after_regular_for_m_days_without_a_break() {
        // Every 40 days: REGULAR from day 120, and each purchase leaving the window is
        // replaced in time. M = 180: LOYAL at day 300 exactly.
        let history = bought_on(&[0, 40, 80, 120, 160, 200, 240, 280]);
        let regular = assess(&defaults(), &history, Some(day(120)), day(299));
        assert_eq!(regular.status, RepeatStatus::Regular);
        assert_eq!(regular.regular_since, Some(day(120)));
        assert_eq!(regular.review_at, Some(day(300)));
        let loyal = assess(&defaults(), &history, Some(day(120)), day(300));
        assert_eq!(loyal.status, RepeatStatus::Loyal);
        assert_eq!(loyal.reason, StatusReason::RegularFor { days: 180 });
        // The run is found in the purchases even when nothing was stored.
        assert_eq!(
            assess(&defaults(), &history, None, day(300)).regular_since,
            Some(day(120))
        );
        // Within a second of the edge.
        assert_eq!(
            status_on(&history, day(300) - TimeDelta::seconds(1)),
            RepeatStatus::Regular
        );
    }

    #[test]
    fn a_break_in_regularity_restarts_the_run_even_if_no_sweep_saw_it() {
        // Day 0 leaves at 180 before the next purchase (200); day 40 leaves at 220 before
        // 240: the count was 3 at 220, and the run starts again at 240.
        let history = bought_on(&[0, 40, 80, 120, 200, 240, 260, 280]);
        let a = assess(&defaults(), &history, Some(day(120)), day(300));
        assert_eq!(a.status, RepeatStatus::Regular);
        assert_eq!(a.regular_since, Some(day(240)));
    }

    #[test]
    fn a_run_older_than_the_purchases_passed_in_is_taken_from_the_stored_start() {
        let long_run = StatusThresholds {
            loyal_after_regular_days: 400,
            loyal_purchases_per_year: 1_000,
            ..defaults()
        };
        let every_40: Vec<i64> = (0..=14).map(|i| i * 40).collect();
        let history = bought_on(&every_40);
        // The purchases show an unbroken run back to day 375 only (365 - 180 days ago).
        let unknown = assess(&long_run, &history, None, day(560));
        assert_eq!(unknown.regular_since, Some(day(375)));
        assert_eq!(unknown.status, RepeatStatus::Regular);
        let stored = assess(&long_run, &history, Some(day(120)), day(560));
        assert_eq!(stored.regular_since, Some(day(120)));
        assert_eq!(stored.status, RepeatStatus::Loyal);
        assert_eq!(stored.reason, StatusReason::RegularFor { days: 440 });
    }

    #[test]
    fn loyal_by_purchases_in_a_year() {
        // Weekly: the tenth purchase within 365 days makes LOYAL long before M days.
        let weekly: Vec<i64> = (0..10).map(|i| i * 7).collect();
        let a = assess(&defaults(), &bought_on(&weekly), None, day(63));
        assert_eq!(a.status, RepeatStatus::Loyal);
        assert_eq!(a.reason, StatusReason::PurchasesInYear { purchases: 10 });
        assert_eq!(
            status_on(&bought_on(&weekly[..9]), day(56)),
            RepeatStatus::Regular
        );
        // The first of the ten leaves the year at day 365: LOYAL by count ends then.
        assert!(a.review_at.unwrap() <= day(365));
    }

    #[test]
    fn at_risk_follows_the_customer_s_own_rhythm_above_the_floor() {
        // Every 20 days: quiet for 2 × 20 = 40 days is AT_RISK (above the 30-day floor).
        let every_20 = bought_on(&[0, 20, 40, 60]);
        let before = assess(
            &defaults(),
            &every_20,
            None,
            day(100) - TimeDelta::seconds(1),
        );
        assert_eq!(before.status, RepeatStatus::Regular);
        assert_eq!(before.review_at, Some(day(100)));
        let at_risk = assess(&defaults(), &every_20, None, day(100));
        assert_eq!(at_risk.status, RepeatStatus::AtRisk);
        assert_eq!(at_risk.standing, RepeatStatus::Regular);
        assert_eq!(
            at_risk.reason,
            StatusReason::QuietBeyondRhythm {
                quiet_days: 40,
                threshold_days: 40,
                median_gap_days: Some(20),
                floor_applied: false
            }
        );
        // Next: day 0 leaves the window (the standing drops to RETURNING), then LAPSED.
        assert_eq!(at_risk.review_at, Some(day(180)));
        let later = assess(&defaults(), &every_20, None, day(180));
        assert_eq!(
            (later.status, later.standing, later.review_at),
            (
                RepeatStatus::AtRisk,
                RepeatStatus::Returning,
                Some(day(240))
            )
        );

        // Every 5 days: 2 × 5 = 10 days is under the floor; 30 days of quiet it is.
        let every_5 = bought_on(&[0, 5, 10, 15]);
        assert_eq!(
            status_on(&every_5, day(45) - TimeDelta::seconds(1)),
            RepeatStatus::Regular
        );
        let floor = assess(&defaults(), &every_5, None, day(45));
        assert_eq!(floor.status, RepeatStatus::AtRisk);
        assert_eq!(
            floor.reason,
            StatusReason::QuietBeyondRhythm {
                quiet_days: 30,
                threshold_days: 30,
                median_gap_days: Some(5),
                floor_applied: true
            }
        );
        // The same 35 days of quiet: at risk for the frequent customer, not for the other.
        assert_eq!(status_on(&every_5, day(50)), RepeatStatus::AtRisk);
        assert_eq!(status_on(&every_20, day(95)), RepeatStatus::Regular);

        // One purchase: no rhythm yet, the floor.
        let once = assess(&defaults(), &bought_on(&[0]), None, day(30));
        assert_eq!(once.status, RepeatStatus::AtRisk);
        assert_eq!(once.standing, RepeatStatus::New);
        assert_eq!(
            assess(&defaults(), &bought_on(&[0]), None, day(29)).review_at,
            Some(day(30))
        );
    }

    #[test]
    fn the_median_gap_is_the_middle_one_in_any_order() {
        assert_eq!(median_gap(&[]), None);
        assert_eq!(median_gap(&[day(3)]), None);
        // Gaps 10 and 30: the mean of the middle two.
        assert_eq!(
            median_gap(&[day(40), day(0), day(10)]),
            Some(TimeDelta::days(20))
        );
        // Gaps 1, 1, 50: one long absence does not move the median.
        assert_eq!(
            median_gap(&[day(0), day(1), day(2), day(52)]),
            Some(TimeDelta::days(1))
        );
        // 1.5 × a 25-day gap is 37.5 days.
        let t = StatusThresholds {
            at_risk_gap_factor_bp: 15_000,
            ..defaults()
        };
        assert_eq!(
            t.at_risk_after(Some(TimeDelta::days(25))),
            TimeDelta::hours(900)
        );
        assert_eq!(t.at_risk_after(None), TimeDelta::days(30));
        assert_eq!(t.at_risk_after(Some(TimeDelta::MAX)), TimeDelta::MAX);
    }

    #[test]
    fn lapsed_takes_precedence_over_at_risk() {
        let history = bought_on(&[0, 20, 40, 60]);
        assert_eq!(
            status_on(&history, day(240) - TimeDelta::seconds(1)),
            RepeatStatus::AtRisk
        );
        let lapsed = assess(&defaults(), &history, None, day(240));
        assert_eq!(lapsed.status, RepeatStatus::Lapsed);
        assert_eq!(lapsed.reason, StatusReason::NoPurchaseFor { days: 180 });
        assert_eq!(lapsed.review_at, None, "only a purchase ends LAPSED");
        // A slow rhythm whose 2× passes D is never AT_RISK: LAPSED at D.
        let slow = bought_on(&[0, 100, 200]);
        assert_eq!(status_on(&slow, day(379)), RepeatStatus::Returning);
        assert_eq!(status_on(&slow, day(380)), RepeatStatus::Lapsed);
        // Purchases, none of them within the look-back.
        let old = PurchaseHistory {
            counted_purchases: 7,
            recent: vec![],
        };
        let a = assess(&defaults(), &old, None, day(900));
        assert_eq!(a.status, RepeatStatus::Lapsed);
        assert_eq!(a.reason, StatusReason::NoPurchaseFor { days: 365 });
        // ... and purchases passed in beyond the look-back are ignored the same way.
        assert_eq!(
            status_on(&bought_on(&[0, 1, 2]), day(900)),
            RepeatStatus::Lapsed
        );
    }

    #[test]
    fn a_purchase_brings_an_at_risk_or_lapsed_customer_back() {
        let at_risk = assess(&defaults(), &bought_on(&[0, 20, 40, 60]), None, day(100));
        let back = assess(
            &defaults(),
            &bought_on(&[0, 20, 40, 60, 100]),
            at_risk.regular_since,
            day(100),
        );
        assert_eq!(back.status, RepeatStatus::Regular);
        let change = status_change(at_risk.status, &back, Trigger::Purchase, day(100)).unwrap();
        assert_eq!(
            (change.from, change.to, change.direction),
            (RepeatStatus::AtRisk, RepeatStatus::Regular, Direction::Up)
        );
        let lapsed = assess(&defaults(), &bought_on(&[0, 20]), None, day(400));
        assert_eq!(lapsed.status, RepeatStatus::Lapsed);
        let back = assess(&defaults(), &bought_on(&[0, 20, 400]), None, day(400));
        assert_eq!(back.status, RepeatStatus::Returning);
    }

    #[test]
    fn a_fully_returned_purchase_is_no_visit() {
        let before = assess(&defaults(), &bought_on(&[0, 10]), None, day(10));
        assert_eq!(before.status, RepeatStatus::Returning);
        // The second purchase is returned in full: the store passes only the first.
        let after = assess(&defaults(), &bought_on(&[0]), None, day(12));
        assert_eq!(after.status, RepeatStatus::New);
        let change = status_change(before.status, &after, Trigger::Return, day(12)).unwrap();
        assert_eq!(
            change,
            StatusChange {
                from: RepeatStatus::Returning,
                to: RepeatStatus::New,
                direction: Direction::Down,
                trigger: Trigger::Return,
                reason: StatusReason::FirstPurchase,
                at: day(12),
            }
        );
        // A REGULAR customer's fourth purchase returned: back to RETURNING.
        let regular = assess(&defaults(), &bought_on(&[0, 10, 20, 30]), None, day(30));
        let returned = assess(
            &defaults(),
            &bought_on(&[0, 10, 20]),
            regular.regular_since,
            day(31),
        );
        assert_eq!(returned.status, RepeatStatus::Returning);
        assert_eq!(returned.regular_since, None);
    }

    #[test]
    fn a_change_is_reported_only_when_the_status_changes() {
        let a = assess(&defaults(), &bought_on(&[0, 10]), None, day(10));
        assert_eq!(
            status_change(RepeatStatus::Returning, &a, Trigger::Purchase, day(10)),
            None
        );
        let up = status_change(RepeatStatus::New, &a, Trigger::Purchase, day(10)).unwrap();
        assert_eq!(up.direction, Direction::Up);
        let lapsed = assess(&defaults(), &bought_on(&[0, 10]), None, day(190));
        let down = status_change(RepeatStatus::AtRisk, &lapsed, Trigger::Sweep, day(190)).unwrap();
        assert_eq!(
            (down.to, down.direction, down.trigger.as_str()),
            (RepeatStatus::Lapsed, Direction::Down, "sweep")
        );
        let at_risk = assess(&defaults(), &bought_on(&[0, 10]), None, day(60));
        let down = status_change(RepeatStatus::Loyal, &at_risk, Trigger::Sweep, day(60)).unwrap();
        assert_eq!(down.direction, Direction::Down);
    }

    #[test]
    fn review_at_is_the_next_time_driven_change() {
        // REGULAR at day 150 (every 50 days): day 0 leaves the window first, at 180.
        let a = assess(&defaults(), &bought_on(&[0, 50, 100, 150]), None, day(150));
        assert_eq!(a.review_at, Some(day(180)));
        // With five in the window, the second oldest's leaving breaks it.
        let a = assess(
            &defaults(),
            &bought_on(&[0, 30, 60, 90, 120]),
            None,
            day(120),
        );
        assert_eq!(
            a.review_at,
            Some(day(180)),
            "2×30 = 60 days of quiet come first"
        );
        let a = assess(
            &defaults(),
            &bought_on(&[0, 1, 2, 3, 4]),
            None,
            day(4) + TimeDelta::hours(1),
        );
        assert_eq!(a.review_at, Some(day(34)), "the floor: 30 days after day 4");
        // A sweep at the review instant finds the change.
        let every_20 = bought_on(&[0, 20, 40, 60]);
        let a = assess(&defaults(), &every_20, None, day(60));
        let later = assess(
            &defaults(),
            &every_20,
            a.regular_since,
            a.review_at.unwrap(),
        );
        assert_eq!(later.status, RepeatStatus::AtRisk);
    }

    #[test]
    fn purchases_dated_ahead_of_now_count_as_now() {
        let mut history = bought_on(&[0, 10]);
        history.recent.push(day(20) + TimeDelta::minutes(5));
        history.counted_purchases = 3;
        let a = assess(&defaults(), &history, None, day(20));
        assert_eq!(a.status, RepeatStatus::Returning);
        assert_eq!(
            a.reason,
            StatusReason::RepeatPurchases {
                purchases_in_window: 3,
                needed: 4,
                window_days: 180
            }
        );
    }

    fn hint(
        thresholds: &StatusThresholds,
        history: &PurchaseHistory,
        now: DateTime<Utc>,
    ) -> Option<NextStatusHint> {
        let a = assess(thresholds, history, None, now);
        next_status_hint(thresholds, history, &a, now)
    }

    #[test]
    fn the_hint_of_the_issue() {
        // Three purchases in the window, the oldest 157 days ago: one more within 23 days.
        let h = hint(&defaults(), &bought_on(&[0, 100, 150]), day(157)).unwrap();
        assert_eq!(
            h,
            NextStatusHint {
                target: RepeatStatus::Regular,
                route: HintRoute::PurchasesInWindow,
                purchases_needed: 1,
                deadline: Some(day(180)),
                within_days: Some(23),
                arrives_at: None,
            }
        );
        assert_eq!(
            h.sentence(),
            "1 more purchase within 23 days to become REGULAR"
        );
        // Less than a day left: the instant.
        let h = hint(
            &defaults(),
            &bought_on(&[0, 100, 150]),
            day(179) + TimeDelta::hours(1),
        )
        .unwrap();
        assert_eq!(h.within_days, Some(0));
        assert_eq!(
            h.sentence(),
            "1 more purchase before 2026-06-30 12:00 UTC to become REGULAR"
        );
    }

    #[test]
    fn new_customers_need_their_second_purchase() {
        let h = hint(&defaults(), &PurchaseHistory::default(), day(0)).unwrap();
        assert_eq!(h.sentence(), "2 more purchases to become RETURNING");
        let h = hint(&defaults(), &bought_on(&[0]), day(3)).unwrap();
        assert_eq!((h.target, h.purchases_needed), (RepeatStatus::Returning, 1));
        assert_eq!(h.sentence(), "1 more purchase to become RETURNING");
    }

    #[test]
    fn with_no_purchase_in_the_window_the_whole_window_is_left() {
        let short = StatusThresholds {
            regular_window_days: 30,
            at_risk_floor_days: 100,
            ..defaults()
        };
        let h = hint(&short, &bought_on(&[0, 10]), day(50)).unwrap();
        assert_eq!(h.deadline, None);
        assert_eq!(
            h.sentence(),
            "4 more purchases within 30 days to become REGULAR"
        );
    }

    #[test]
    fn the_nearest_of_regular_and_loyal_is_hinted() {
        // Four purchases in the year, one in a 30-day window: one more makes LOYAL (K = 5)
        // before three more would make REGULAR.
        let t = StatusThresholds {
            regular_window_days: 30,
            loyal_purchases_per_year: 5,
            ..defaults()
        };
        let h = hint(&t, &bought_on(&[0, 60, 120, 180]), day(185)).unwrap();
        assert_eq!((h.target, h.purchases_needed), (RepeatStatus::Loyal, 1));
        assert_eq!(h.deadline, Some(day(365)));
        assert_eq!(
            h.sentence(),
            "1 more purchase within 180 days to become LOYAL"
        );
    }

    #[test]
    fn regular_customers_are_told_how_to_stay_regular_until_loyal() {
        // REGULAR from day 120; LOYAL at 300 if regular until then. All four purchases leave
        // the window by then (at 180, 220, 260 and 300): four more, the first by day 180.
        let h = hint(&defaults(), &bought_on(&[0, 40, 80, 120]), day(120)).unwrap();
        assert_eq!(
            h,
            NextStatusHint {
                target: RepeatStatus::Loyal,
                route: HintRoute::StayRegular,
                purchases_needed: 4,
                deadline: Some(day(180)),
                within_days: Some(60),
                arrives_at: Some(day(300)),
            }
        );
        assert_eq!(
            h.sentence(),
            "4 more purchases to stay REGULAR until 2026-10-28 and become LOYAL, the next within 60 days"
        );
        // Daily purchases: nothing leaves the window before M = 30 days have passed.
        let t = StatusThresholds {
            loyal_after_regular_days: 30,
            loyal_purchases_per_year: 100,
            ..defaults()
        };
        let h = hint(&t, &bought_on(&[0, 1, 2, 3, 4, 5, 6, 7]), day(7)).unwrap();
        assert_eq!((h.route, h.purchases_needed), (HintRoute::StayRegular, 0));
        assert_eq!(
            h.sentence(),
            "stay REGULAR until 2026-02-03 to become LOYAL"
        );
        // Nine weekly purchases keep four in the window until day 201 (M after day 21): none
        // needed, fewer than the one more that reaches K = 10.
        let weekly: Vec<i64> = (0..9).map(|i| i * 7).collect();
        let h = hint(&defaults(), &bought_on(&weekly), day(56)).unwrap();
        assert_eq!(
            (h.route, h.purchases_needed, h.arrives_at),
            (HintRoute::StayRegular, 0, Some(day(201)))
        );
        // With M = 365 staying regular takes four more (from day 215 on): the tenth
        // purchase is nearer.
        let t = StatusThresholds {
            loyal_after_regular_days: 365,
            ..defaults()
        };
        let h = hint(&t, &bought_on(&weekly), day(56)).unwrap();
        assert_eq!(
            (h.route, h.purchases_needed, h.target),
            (HintRoute::PurchasesInWindow, 1, RepeatStatus::Loyal)
        );
        assert_eq!(
            h.sentence(),
            "1 more purchase within 309 days to become LOYAL"
        );
    }

    #[test]
    fn at_risk_and_lapsed_customers_are_told_where_one_purchase_brings_them() {
        let h = hint(&defaults(), &bought_on(&[0, 20, 40, 60]), day(100)).unwrap();
        assert_eq!(
            (h.route, h.target),
            (HintRoute::ComeBack, RepeatStatus::Regular)
        );
        assert_eq!(h.sentence(), "1 more purchase to become REGULAR again");
        let h = hint(&defaults(), &bought_on(&[0, 20]), day(400)).unwrap();
        assert_eq!(h.target, RepeatStatus::Returning);
        let h = hint(&defaults(), &bought_on(&[0]), day(200)).unwrap();
        assert_eq!(h.target, RepeatStatus::Returning);
        // LOYAL is the top.
        let weekly: Vec<i64> = (0..10).map(|i| i * 7).collect();
        assert_eq!(hint(&defaults(), &bought_on(&weekly), day(63)), None);
    }

    #[test]
    fn no_input_makes_the_rules_panic() {
        let extremes = [DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MAX_UTC, day(0)];
        let thresholds = [
            defaults(),
            StatusThresholds {
                regular_purchases: 0,
                regular_window_days: 0,
                loyal_after_regular_days: 0,
                loyal_purchases_per_year: 0,
                at_risk_gap_factor_bp: 0,
                at_risk_floor_days: 0,
                lapsed_after_days: 0,
            },
            StatusThresholds {
                regular_purchases: u32::MAX,
                regular_window_days: u32::MAX,
                loyal_after_regular_days: u32::MAX,
                loyal_purchases_per_year: u32::MAX,
                at_risk_gap_factor_bp: u32::MAX,
                at_risk_floor_days: u32::MAX,
                lapsed_after_days: u32::MAX,
            },
            StatusThresholds {
                regular_purchases: 1,
                regular_window_days: 0,
                loyal_after_regular_days: MAX_DAYS,
                loyal_purchases_per_year: u32::MAX,
                ..defaults()
            },
        ];
        for t in &thresholds {
            for now in extremes {
                for stored in [
                    None,
                    Some(DateTime::<Utc>::MIN_UTC),
                    Some(DateTime::<Utc>::MAX_UTC),
                ] {
                    let history = PurchaseHistory {
                        counted_purchases: u64::MAX,
                        recent: extremes.iter().chain(extremes.iter()).copied().collect(),
                    };
                    let a = assess(t, &history, stored, now);
                    let _ = next_status_hint(t, &history, &a, now).map(|h| h.sentence());
                    let _ = status_change(RepeatStatus::Lapsed, &a, Trigger::Sweep, now);
                }
            }
        }
    }

    #[test]
    fn a_stored_hint_counts_its_days_from_the_moment_it_is_read() {
        let written = Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap();
        let hint = NextStatusHint {
            target: RepeatStatus::Regular,
            route: HintRoute::PurchasesInWindow,
            purchases_needed: 1,
            deadline: Some(written + TimeDelta::days(23)),
            within_days: Some(23),
            arrives_at: None,
        };
        let json = serde_json::to_string(&hint).unwrap();
        let stored: NextStatusHint = serde_json::from_str(&json).unwrap();
        assert_eq!(stored, hint);
        assert_eq!(
            stored.at(written + TimeDelta::days(3)).sentence(),
            "1 more purchase within 20 days to become REGULAR"
        );
        assert_eq!(
            stored
                .at(written + TimeDelta::days(23) - TimeDelta::hours(2))
                .sentence(),
            "1 more purchase before 2026-01-24 12:00 UTC to become REGULAR"
        );
        let undated = NextStatusHint {
            deadline: None,
            within_days: Some(180),
            ..hint
        };
        assert_eq!(undated.at(written + TimeDelta::days(50)), undated);
    }
}
