//! The pure rules of occasions and greetings. No I/O; time comes in as a parameter.
//!
//! - **Local days.** Every occasion falls on a date of the customer's own calendar: "today" is
//!   the date at `now` in their time zone, an IANA name (`chrono_tz::Tz`, as the member profile
//!   already stores and validates it with `members::rules::time_zone`). A fixed offset needs no
//!   type of its own: IANA has them (`Etc/GMT-14` is UTC+14; the sign is POSIX's, inverted).
//!   At one UTC instant a customer in Pacific/Kiritimati (UTC+14) may be a day ahead of one in
//!   Pacific/Pago_Pago (UTC−11): New Year comes to them 25 hours apart.
//! - **29 February** falls on 28 February in other years, for birthdays, enrolment
//!   anniversaries (the enrolment's local date) and yearly holidays alike.
//! - **Years.** An occasion's year is the local year of its date: the Kiritimati customer's
//!   New Year greeting of 2027 is made while it is still 2026 in UTC. A greeting exists once
//!   per (customer, occasion, year): [`GreetingKey`].
//! - **Consent.** Greetings go only to customers who consented to marketing contact
//!   ([`GreetingConsent::allows_greetings`]); [`greetings_due`] applies it, so the job cannot
//!   forget it.

use std::collections::HashSet;

use chrono::{DateTime, Datelike, Days, NaiveDate, Offset, TimeZone, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use crate::members::rules::Birthday;
use crate::platform::validation::{self, Violation, Violations};

pub const MAX_HOLIDAYS: usize = 100;
pub const MAX_HOLIDAY_ID_CHARS: usize = 64;
pub const MAX_HOLIDAY_NAME_CHARS: usize = 100;
/// ListUpcomingOccasions looks at most a year (and a day) ahead.
pub const MAX_UPCOMING_DAYS: u32 = 366;
/// How many past local days the daily job still greets: a run missed, or a day skipped when a
/// clock change moves the job's hour across local midnight, is caught up once (the greeting
/// key keeps it single).
pub const DEFAULT_CATCH_UP_DAYS: u32 = 1;

/// The date of a program holiday.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "repeat", rename_all = "snake_case")]
pub enum HolidayDate {
    /// Every year on this month and day (29 February: on 28 February in other years).
    Yearly { month: u32, day: u32 },
    /// Once, on this date.
    Once { date: NaiveDate },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holiday {
    /// Stable key, part of the greeting key: a holiday can be renamed without greeting twice.
    pub id: String,
    /// "New Year", "Women's Day".
    pub name: String,
    pub date: HolidayDate,
}

/// Which occasions a program greets. Stored as one JSON column (`programs.occasions`); a
/// program written before occasions existed reads as the default: birthdays and anniversaries,
/// no holidays.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct OccasionProgram {
    pub birthdays: bool,
    pub anniversaries: bool,
    pub holidays: Vec<Holiday>,
    /// Granted with each birthday greeting.
    pub birthday_reward: BirthdayReward,
}

impl Default for OccasionProgram {
    fn default() -> Self {
        OccasionProgram {
            birthdays: true,
            anniversaries: true,
            holidays: Vec::new(),
            birthday_reward: BirthdayReward::default(),
        }
    }
}

/// The most bonus points one birthday may bring.
pub const MAX_BIRTHDAY_BONUS_POINTS: i64 = 1_000_000;

/// What a birthday greeting brings: a gift of the catalog and/or bonus points, granted in the
/// greeting's transaction, so exactly once per customer and year.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct BirthdayReward {
    /// A `gifts.gift_id` of the merchant (that it exists is checked when the program is
    /// written; an inactive or sold-out gift is skipped on the day).
    pub gift_id: Option<String>,
    /// 0: none.
    pub bonus_points: i64,
}

impl BirthdayReward {
    pub fn is_empty(&self) -> bool {
        self.gift_id.is_none() && self.bonus_points == 0
    }

    fn check(&self, v: &mut Violations) {
        if let Some(gift_id) = &self.gift_id {
            let field = "program.occasions.birthday_reward.gift_id";
            if let Some(id) = v.check(validation::identifier(field, gift_id))
                && id.chars().count() > 64
            {
                v.add(field, "must be at most 64 characters");
            }
        }
        if !(0..=MAX_BIRTHDAY_BONUS_POINTS).contains(&self.bonus_points) {
            v.add(
                "program.occasions.birthday_reward.bonus_points",
                format!("must be between 0 and {MAX_BIRTHDAY_BONUS_POINTS}"),
            );
        }
    }
}

impl OccasionProgram {
    /// Checks the holidays and the birthday reward, naming fields of `loyalty.v1.Program`
    /// (`program.occasions.*`).
    pub fn check(&self, v: &mut Violations) {
        self.birthday_reward.check(v);
        if self.holidays.len() > MAX_HOLIDAYS {
            v.add(
                "program.occasions.holidays",
                format!("at most {MAX_HOLIDAYS} entries"),
            );
        }
        let mut ids = HashSet::new();
        for (i, holiday) in self.holidays.iter().enumerate().take(MAX_HOLIDAYS) {
            let field = format!("program.occasions.holidays[{i}]");
            let id_field = format!("{field}.id");
            if let Some(id) = v.check(validation::identifier(&id_field, &holiday.id)) {
                if id.chars().count() > MAX_HOLIDAY_ID_CHARS {
                    v.add(
                        id_field,
                        format!("must be at most {MAX_HOLIDAY_ID_CHARS} characters"),
                    );
                } else if !ids.insert(id) {
                    v.add(id_field, "is used by another holiday");
                }
            }
            let name_field = format!("{field}.name");
            if let Some(name) = v.check(validation::text(
                &name_field,
                &holiday.name,
                MAX_HOLIDAY_NAME_CHARS,
            )) && name.trim().is_empty()
            {
                v.add(name_field, "must not be empty");
            }
            if let HolidayDate::Yearly { month, day } = holiday.date {
                v.check(month_day(&format!("{field}.date"), month, day));
            }
        }
    }
}

/// A month and day that exist in some year (29 February does).
pub fn month_day(field: &str, month: u32, day: u32) -> Result<(u32, u32), Violation> {
    if !(1..=12).contains(&month) {
        return Err(Violation::new(
            format!("{field}.month"),
            "must be between 1 and 12",
        ));
    }
    // 2024 is a leap year: 29 February is a valid yearly date.
    if NaiveDate::from_ymd_opt(2024, month, day).is_none() {
        return Err(Violation::new(
            format!("{field}.day"),
            format!("{month}/{day} is not a date"),
        ));
    }
    Ok((month, day))
}

/// This month and day in `year`: 29 February on 28 February outside leap years. `None` for a
/// month and day that are no date (or a year beyond chrono's range).
pub fn yearly_date(month: u32, day: u32, year: i32) -> Option<NaiveDate> {
    NaiveDate::from_ymd_opt(year, month, day).or_else(|| {
        (month == 2 && day == 29)
            .then(|| NaiveDate::from_ymd_opt(year, 2, 28))
            .flatten()
    })
}

/// The date at `now` in `time_zone`.
pub fn local_date(time_zone: Tz, now: DateTime<Utc>) -> NaiveDate {
    let utc = now.naive_utc();
    let offset = time_zone.offset_from_utc_datetime(&utc).fix();
    // `with_timezone(..).date_naive()` panics within a day of chrono's range ends; there
    // the UTC date will do.
    utc.checked_add_offset(offset)
        .map_or(utc.date(), |local| local.date())
}

/// What one customer brings to occasions (from their profile).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CustomerOccasions {
    pub time_zone: Tz,
    pub birthday: Option<Birthday>,
    pub enrolled_at: DateTime<Utc>,
}

impl CustomerOccasions {
    /// The local date the customer enrolled on: their anniversaries' month and day.
    pub fn enrolled_on(&self) -> NaiveDate {
        local_date(self.time_zone, self.enrolled_at)
    }
}

/// The consent greetings depend on (the profile's `marketing_consent`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GreetingConsent {
    pub marketing_consent: bool,
}

impl GreetingConsent {
    /// A greeting is a marketing contact: only with consent. The sender checks again when it
    /// sends (consent withdrawn in between wins).
    pub fn allows_greetings(&self) -> bool {
        self.marketing_consent
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OccasionKind {
    Birthday,
    Anniversary,
    Holiday,
}

impl OccasionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OccasionKind::Birthday => "birthday",
            OccasionKind::Anniversary => "anniversary",
            OccasionKind::Holiday => "holiday",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Occasion {
    Birthday,
    /// Of enrolment.
    Anniversary,
    Holiday {
        id: String,
        name: String,
    },
}

impl Occasion {
    pub fn kind(&self) -> OccasionKind {
        match self {
            Occasion::Birthday => OccasionKind::Birthday,
            Occasion::Anniversary => OccasionKind::Anniversary,
            Occasion::Holiday { .. } => OccasionKind::Holiday,
        }
    }

    /// The occasion in the greeting key: `birthday`, `anniversary`, `holiday:<id>`.
    pub fn key(&self) -> String {
        match self {
            Occasion::Holiday { id, .. } => format!("holiday:{id}"),
            other => other.kind().as_str().to_string(),
        }
    }
}

/// One occasion of one customer on one of their local dates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Occurrence {
    pub occasion: Occasion,
    /// In the customer's calendar.
    pub date: NaiveDate,
    /// The age a birthday brings (when the birth year is known), the years an anniversary
    /// marks.
    pub years: Option<u32>,
}

/// A greeting exists once per (customer, occasion, year); `year` is the local year of the
/// occasion's date.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GreetingKey {
    pub customer_id: i64,
    pub occasion: String,
    pub year: i32,
}

impl Occurrence {
    pub fn greeting_key(&self, customer_id: i64) -> GreetingKey {
        GreetingKey {
            customer_id,
            occasion: self.occasion.key(),
            year: self.date.year(),
        }
    }

    /// Whether this occurrence is today for a customer in `time_zone`, at `now`.
    pub fn is_today(&self, time_zone: Tz, now: DateTime<Utc>) -> bool {
        self.date == local_date(time_zone, now)
    }
}

/// The customer's occasions in the local calendar year `year`, by date.
pub fn occasions_in_year(
    program: &OccasionProgram,
    customer: &CustomerOccasions,
    year: i32,
) -> Vec<Occurrence> {
    let mut found = Vec::new();
    if program.birthdays
        && let Some(birthday) = customer.birthday
    {
        // Known birth year: from the first birthday on (not the day of birth), with the age.
        let age = match birthday.year {
            None => Some(None),
            Some(born) => year
                .checked_sub(born)
                .filter(|age| *age >= 1)
                .and_then(|age| u32::try_from(age).ok())
                .map(Some),
        };
        if let Some(years) = age
            && let Some(date) = yearly_date(birthday.month, birthday.day, year)
        {
            found.push(Occurrence {
                occasion: Occasion::Birthday,
                date,
                years,
            });
        }
    }
    if program.anniversaries {
        let enrolled = customer.enrolled_on();
        if let Some(years) = year
            .checked_sub(enrolled.year())
            .filter(|y| *y >= 1)
            .and_then(|y| u32::try_from(y).ok())
            && let Some(date) = yearly_date(enrolled.month(), enrolled.day(), year)
        {
            found.push(Occurrence {
                occasion: Occasion::Anniversary,
                date,
                years: Some(years),
            });
        }
    }
    for holiday in &program.holidays {
        let date = match holiday.date {
            HolidayDate::Yearly { month, day } => yearly_date(month, day, year),
            HolidayDate::Once { date } => (date.year() == year).then_some(date),
        };
        if let Some(date) = date {
            found.push(Occurrence {
                occasion: Occasion::Holiday {
                    id: holiday.id.clone(),
                    name: holiday.name.clone(),
                },
                date,
                years: None,
            });
        }
    }
    found.sort_by_key(|o| o.date);
    found
}

/// The customer's occasions on one of their local dates.
pub fn occasions_on(
    program: &OccasionProgram,
    customer: &CustomerOccasions,
    date: NaiveDate,
) -> Vec<Occurrence> {
    occasions_in_year(program, customer, date.year())
        .into_iter()
        .filter(|o| o.date == date)
        .collect()
}

/// The customer's occasions today, in their time zone at `now`.
pub fn occasions_today(
    program: &OccasionProgram,
    customer: &CustomerOccasions,
    now: DateTime<Utc>,
) -> Vec<Occurrence> {
    occasions_on(program, customer, local_date(customer.time_zone, now))
}

/// The `days` of ListUpcomingOccasions: 1 to [`MAX_UPCOMING_DAYS`].
pub fn upcoming_days(field: &str, days: u32) -> Result<u32, Violation> {
    if (1..=MAX_UPCOMING_DAYS).contains(&days) {
        Ok(days)
    } else {
        Err(Violation::new(
            field,
            format!("must be between 1 and {MAX_UPCOMING_DAYS}"),
        ))
    }
}

/// The customer's occasions on the `days` local dates (at most [`MAX_UPCOMING_DAYS`]) starting with their date at `from`
/// (`from`'s day included, `from + days` excluded), across a year's end, by date.
pub fn upcoming(
    program: &OccasionProgram,
    customer: &CustomerOccasions,
    from: DateTime<Utc>,
    days: u32,
) -> Vec<Occurrence> {
    let first = local_date(customer.time_zone, from);
    let end = first
        .checked_add_days(Days::new(u64::from(days.min(MAX_UPCOMING_DAYS))))
        .unwrap_or(NaiveDate::MAX);
    let mut found: Vec<Occurrence> = (first.year()..=end.year())
        .flat_map(|year| occasions_in_year(program, customer, year))
        .filter(|o| o.date >= first && o.date < end)
        .collect();
    found.sort_by_key(|o| o.date);
    found
}

/// The greetings the daily job creates at `now`: the customer's occasions of today and of the
/// `catch_up_days` before it (at most [`MAX_UPCOMING_DAYS`]), in their time zone, none from before they enrolled, and none at
/// all without consent. Each is created under its [`GreetingKey`]; one made already is skipped.
pub fn greetings_due(
    program: &OccasionProgram,
    customer: &CustomerOccasions,
    consent: GreetingConsent,
    now: DateTime<Utc>,
    catch_up_days: u32,
) -> Vec<Occurrence> {
    if !consent.allows_greetings() {
        return Vec::new();
    }
    let today = local_date(customer.time_zone, now);
    let first = today
        .checked_sub_days(Days::new(u64::from(catch_up_days.min(MAX_UPCOMING_DAYS))))
        .unwrap_or(NaiveDate::MIN)
        .max(customer.enrolled_on());
    let mut found: Vec<Occurrence> = (first.year()..=today.year())
        .flat_map(|year| occasions_in_year(program, customer, year))
        .filter(|o| o.date >= first && o.date <= today)
        .collect();
    found.sort_by_key(|o| o.date);
    found
}

impl Occasion {
    /// The name a sender shows: "Birthday", "Enrollment anniversary", the holiday's name.
    pub fn name(&self) -> &str {
        match self {
            Occasion::Birthday => "Birthday",
            Occasion::Anniversary => "Enrollment anniversary",
            Occasion::Holiday { name, .. } => name,
        }
    }

    /// The holiday's id; empty for the others.
    pub fn holiday_id(&self) -> &str {
        match self {
            Occasion::Holiday { id, .. } => id,
            _ => "",
        }
    }
}

impl GreetingKey {
    /// The key as one string, `<customer_id>:<occasion>:<year>`: the source reference of the
    /// birthday gift and of the BONUS ledger entry, unique within the merchant (holiday ids
    /// may hold ':', but the customer id and the year at both ends keep two keys apart).
    pub fn reference(&self) -> String {
        format!("{}:{}:{}", self.customer_id, self.occasion, self.year)
    }
}

/// The instant `date` begins in `time_zone` (the first local minute that exists, when a clock
/// change skips midnight); `None` only beyond chrono's range.
pub fn day_starts_at(time_zone: Tz, date: NaiveDate) -> Option<DateTime<Utc>> {
    let midnight = date.and_hms_opt(0, 0, 0)?;
    (0..=24 * 60).step_by(15).find_map(|minutes| {
        let local = midnight.checked_add_signed(chrono::TimeDelta::minutes(minutes))?;
        time_zone
            .from_local_datetime(&local)
            .earliest()
            .map(|at| at.with_timezone(&Utc))
    })
}

/// Local dates are at most 14 hours ahead of UTC and 12 behind: the dates that are "today"
/// somewhere at `now`, and the `catch_up_days` before them.
pub fn dates_somewhere(now: DateTime<Utc>, catch_up_days: u32) -> Vec<NaiveDate> {
    let utc = now.date_naive();
    let last = utc.succ_opt().unwrap_or(utc);
    let first = utc
        .checked_sub_days(Days::new(
            1 + u64::from(catch_up_days.min(MAX_UPCOMING_DAYS)),
        ))
        .unwrap_or(utc);
    first.iter_days().take_while(|d| *d <= last).collect()
}

/// The months and days a stored birthday or (UTC) enrolment date may have for an occasion on
/// one of `dates`: each date one day either side (the enrolment's local date may differ from
/// its UTC date by one), and 29 February wherever 28 February of a common year is among them.
pub fn candidate_month_days(dates: &[NaiveDate]) -> Vec<(u32, u32)> {
    let mut found = Vec::new();
    for date in dates {
        for d in [date.pred_opt(), Some(*date), date.succ_opt()]
            .into_iter()
            .flatten()
        {
            found.push((d.month(), d.day()));
            if d.month() == 2 && d.day() == 28 && NaiveDate::from_ymd_opt(d.year(), 2, 29).is_none()
            {
                found.push((2, 29));
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

/// Whether one of the program's holidays falls on one of `dates` (then every consenting
/// customer is a candidate).
pub fn holiday_among(program: &OccasionProgram, dates: &[NaiveDate]) -> bool {
    program.holidays.iter().any(|holiday| {
        dates.iter().any(|date| match holiday.date {
            HolidayDate::Yearly { month, day } => {
                yearly_date(month, day, date.year()) == Some(*date)
            }
            HolidayDate::Once { date: once } => once == *date,
        })
    })
}

/// Whether the program greets anything at all.
pub fn greets_anything(program: &OccasionProgram) -> bool {
    program.birthdays || program.anniversaries || !program.holidays.is_empty()
}

// ---------------------------------------------------------------------------------------------
// Hand-out and acknowledgement

/// Claim limits: `limit` 1..500 (0 means 50), `lease_seconds` 1..3600 (0 means 300).
pub const DEFAULT_CLAIM_LIMIT: u32 = 50;
pub const MAX_CLAIM_LIMIT: u32 = 500;
pub const DEFAULT_LEASE_SECONDS: u32 = 300;
pub const MAX_LEASE_SECONDS: u32 = 3600;

/// A validated ClaimGreetings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimRequest {
    pub limit: u32,
    pub lease_seconds: u32,
}

impl ClaimRequest {
    pub fn parse(
        limit: u32,
        lease_seconds: u32,
    ) -> Result<ClaimRequest, crate::platform::validation::Invalid> {
        let mut v = Violations::default();
        let limit = match limit {
            0 => DEFAULT_CLAIM_LIMIT,
            n if n <= MAX_CLAIM_LIMIT => n,
            _ => {
                v.add("limit", format!("must be at most {MAX_CLAIM_LIMIT}"));
                0
            }
        };
        let lease_seconds = match lease_seconds {
            0 => DEFAULT_LEASE_SECONDS,
            n if n <= MAX_LEASE_SECONDS => n,
            _ => {
                v.add(
                    "lease_seconds",
                    format!("must be at most {MAX_LEASE_SECONDS}"),
                );
                0
            }
        };
        v.finish()?;
        Ok(ClaimRequest {
            limit,
            lease_seconds,
        })
    }
}

/// A sender's outcome for a greeting it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Sent,
    FailedPermanently,
    RetryLater,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Sent => "sent",
            Outcome::FailedPermanently => "failed_permanently",
            Outcome::RetryLater => "retry_later",
        }
    }

    pub fn parse(value: &str) -> Option<Outcome> {
        [
            Outcome::Sent,
            Outcome::FailedPermanently,
            Outcome::RetryLater,
        ]
        .into_iter()
        .find(|o| o.as_str() == value)
    }

    /// The greeting's status after this outcome.
    pub fn status(self) -> GreetingStatus {
        match self {
            Outcome::Sent => GreetingStatus::Sent,
            Outcome::FailedPermanently => GreetingStatus::Failed,
            Outcome::RetryLater => GreetingStatus::RetryLater,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GreetingStatus {
    Due,
    Leased,
    RetryLater,
    Sent,
    Failed,
}

impl GreetingStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            GreetingStatus::Due => "due",
            GreetingStatus::Leased => "leased",
            GreetingStatus::RetryLater => "retry_later",
            GreetingStatus::Sent => "sent",
            GreetingStatus::Failed => "failed",
        }
    }

    pub fn parse(value: &str) -> Option<GreetingStatus> {
        [
            GreetingStatus::Due,
            GreetingStatus::Leased,
            GreetingStatus::RetryLater,
            GreetingStatus::Sent,
            GreetingStatus::Failed,
        ]
        .into_iter()
        .find(|s| s.as_str() == value)
    }
}

/// What a greeting is when an ack arrives (read under its row lock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseState {
    pub status: GreetingStatus,
    /// The current lease's token (only while leased).
    pub lease_token: Option<String>,
    /// The ack that ended the last lease.
    pub acked: Option<(String, Outcome)>,
    /// Hand-outs so far.
    pub attempts: u32,
}

/// What to do with an ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckVerdict {
    /// The current lease holder's outcome: apply it.
    Apply(Outcome),
    /// The very ack that ended the last lease, again: answer OK, change nothing.
    Replay,
    /// That lease's ack came with another outcome: refused, nothing changes.
    Conflict(Outcome),
    /// Not the current lease (it expired and the greeting was handed out again, or the token
    /// is unknown): refused, nothing changes.
    Stale,
}

/// Only the current lease's token counts (even after its lease ran out, as long as nobody
/// was handed the greeting since); a replay of the ack that ended a lease answers the same.
pub fn judge_ack(state: &LeaseState, lease_token: &str, outcome: Outcome) -> AckVerdict {
    if state.status == GreetingStatus::Leased && state.lease_token.as_deref() == Some(lease_token) {
        return AckVerdict::Apply(outcome);
    }
    match &state.acked {
        Some((token, earlier)) if token == lease_token => {
            if *earlier == outcome {
                AckVerdict::Replay
            } else {
                AckVerdict::Conflict(*earlier)
            }
        }
        _ => AckVerdict::Stale,
    }
}

/// The back-off before a greeting the sender asked to retry is offered again: one minute after
/// the first hand-out, doubling with each, at most six hours.
pub fn retry_delay(attempts: u32) -> chrono::TimeDelta {
    let minutes = 1i64 << attempts.saturating_sub(1).min(9);
    chrono::TimeDelta::minutes(minutes.min(6 * 60))
}

// ---------------------------------------------------------------------------------------------
// ListUpcomingOccasions

pub const DEFAULT_UPCOMING_DAYS: u32 = 30;
pub const DEFAULT_UPCOMING_PAGE: u32 = 100;
pub const MAX_UPCOMING_PAGE: u32 = 500;

/// Where a page of upcoming occasions starts: after this (start of the local day, external id,
/// occasion key), in a window fixed by the first request.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct UpcomingCursor {
    pub starts_at: DateTime<Utc>,
    pub external_id: String,
    pub occasion: String,
}

/// A page token: the window and the last entry of the page before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpcomingToken {
    pub from: DateTime<Utc>,
    pub days: u32,
    pub after: UpcomingCursor,
}

/// A validated ListUpcomingOccasions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpcomingRequest {
    pub from: DateTime<Utc>,
    pub days: u32,
    pub page_size: u32,
    pub after: Option<UpcomingCursor>,
}

impl UpcomingRequest {
    /// `from` (unset: `now`), `days` (0: 30), `page_size` (0: 100), `page_token` (it carries
    /// the window of the first page, which then wins).
    pub fn parse(
        from: Option<DateTime<Utc>>,
        days: u32,
        page_size: u32,
        page_token: &str,
        now: DateTime<Utc>,
    ) -> Result<UpcomingRequest, crate::platform::validation::Invalid> {
        let mut v = Violations::default();
        let days = match days {
            0 => DEFAULT_UPCOMING_DAYS,
            n => v.check(upcoming_days("days", n)).unwrap_or(0),
        };
        let page_size = match page_size {
            0 => DEFAULT_UPCOMING_PAGE,
            n if n <= MAX_UPCOMING_PAGE => n,
            _ => {
                v.add("page_size", format!("must be at most {MAX_UPCOMING_PAGE}"));
                0
            }
        };
        let token = if page_token.is_empty() {
            None
        } else {
            let decoded = decode_token(page_token);
            if decoded.is_none() {
                v.add("page_token", "is not a token of this listing");
            }
            decoded
        };
        v.finish()?;
        Ok(match token {
            Some(token) => UpcomingRequest {
                from: token.from,
                days: token.days,
                page_size,
                after: Some(token.after),
            },
            None => UpcomingRequest {
                from: from.unwrap_or(now),
                days,
                page_size,
                after: None,
            },
        })
    }
}

const TOKEN_PREFIX: &str = "upcoming.v1.";

pub fn encode_token(token: &UpcomingToken) -> String {
    use base64::Engine;
    let json = serde_json::to_vec(token).unwrap_or_default();
    format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
    )
}

fn decode_token(value: &str) -> Option<UpcomingToken> {
    use base64::Engine;
    let body = value.strip_prefix(TOKEN_PREFIX)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(body)
        .ok()?;
    let token: UpcomingToken = serde_json::from_slice(&json).ok()?;
    upcoming_days("days", token.days).ok()?;
    Some(token)
}

/// One customer's upcoming occasion, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upcoming {
    pub cursor: UpcomingCursor,
    pub occurrence: Occurrence,
}

/// The customer's entries of the window, with their sort key (soonest local day start first,
/// then external id, then occasion key).
pub fn upcoming_entries(
    program: &OccasionProgram,
    customer: &CustomerOccasions,
    external_id: &str,
    from: DateTime<Utc>,
    days: u32,
) -> Vec<Upcoming> {
    upcoming(program, customer, from, days)
        .into_iter()
        .filter_map(|occurrence| {
            let starts_at = day_starts_at(customer.time_zone, occurrence.date)?;
            Some(Upcoming {
                cursor: UpcomingCursor {
                    starts_at,
                    external_id: external_id.to_string(),
                    occasion: occurrence.occasion.key(),
                },
                occurrence,
            })
        })
        .collect()
}

/// Keeps the first `limit` entries after `after` among `page` and `more` (a page built up
/// over batches of customers), sorted.
pub fn merge_page(
    page: &mut Vec<Upcoming>,
    more: Vec<Upcoming>,
    after: Option<&UpcomingCursor>,
    limit: usize,
) {
    page.extend(
        more.into_iter()
            .filter(|entry| after.is_none_or(|after| entry.cursor > *after)),
    );
    page.sort_by(|a, b| a.cursor.cmp(&b.cursor));
    page.truncate(limit);
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeDelta, TimeZone};

    const KIRITIMATI: Tz = Tz::Pacific__Kiritimati; // UTC+14
    const PAGO_PAGO: Tz = Tz::Pacific__Pago_Pago; // UTC−11

    fn utc(y: i32, m: u32, d: u32, h: u32, min: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, h, min, 0).unwrap()
    }

    fn date(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).unwrap()
    }

    fn born(month: u32, day: u32, year: Option<i32>) -> Option<Birthday> {
        Some(Birthday { month, day, year })
    }

    fn customer(time_zone: Tz, birthday: Option<Birthday>) -> CustomerOccasions {
        CustomerOccasions {
            time_zone,
            birthday,
            enrolled_at: utc(2020, 6, 15, 12, 0),
        }
    }

    fn new_year() -> Holiday {
        Holiday {
            id: "new-year".into(),
            name: "New Year".into(),
            date: HolidayDate::Yearly { month: 1, day: 1 },
        }
    }

    fn holidays(list: Vec<Holiday>) -> OccasionProgram {
        OccasionProgram {
            holidays: list,
            ..OccasionProgram::default()
        }
    }

    fn reward(gift_id: Option<&str>, bonus_points: i64) -> OccasionProgram {
        OccasionProgram {
            birthday_reward: BirthdayReward {
                gift_id: gift_id.map(str::to_string),
                bonus_points,
            },
            ..OccasionProgram::default()
        }
    }

    fn keys(found: &[Occurrence]) -> Vec<(String, NaiveDate)> {
        found.iter().map(|o| (o.occasion.key(), o.date)).collect()
    }

    fn fields(program: OccasionProgram) -> Vec<String> {
        let mut v = Violations::default();
        program.check(&mut v);
        v.into_error().0.into_iter().map(|v| v.field).collect()
    }

    #[test]
    fn an_empty_object_greets_birthdays_and_anniversaries_and_the_stored_form_reads_back() {
        let default: OccasionProgram = serde_json::from_str("{}").unwrap();
        assert_eq!(default, OccasionProgram::default());
        assert!(default.birthdays && default.anniversaries && default.holidays.is_empty());
        let program = OccasionProgram {
            birthdays: false,
            anniversaries: true,
            birthday_reward: BirthdayReward {
                gift_id: Some("cake".into()),
                bonus_points: 100,
            },
            holidays: vec![
                new_year(),
                Holiday {
                    id: "opening".into(),
                    name: "Our 10th year".into(),
                    date: HolidayDate::Once {
                        date: date(2027, 5, 1),
                    },
                },
            ],
        };
        let json = serde_json::to_string(&program).unwrap();
        assert!(
            json.contains(r#"{"repeat":"yearly","month":1,"day":1}"#),
            "{json}"
        );
        assert!(
            json.contains(r#"{"repeat":"once","date":"2027-05-01"}"#),
            "{json}"
        );
        assert_eq!(
            serde_json::from_str::<OccasionProgram>(&json).unwrap(),
            program
        );
        assert!(fields(program).is_empty());
    }

    #[test]
    fn holidays_name_their_bad_fields() {
        let bad = holidays(vec![
            Holiday {
                date: HolidayDate::Yearly { month: 2, day: 30 },
                ..new_year()
            },
            Holiday {
                name: " ".into(),
                date: HolidayDate::Yearly { month: 13, day: 1 },
                ..new_year()
            },
            Holiday {
                id: "".into(),
                name: "x".repeat(MAX_HOLIDAY_NAME_CHARS + 1),
                date: HolidayDate::Yearly { month: 4, day: 31 },
            },
            Holiday {
                id: "leap".into(),
                name: "Leap day".into(),
                date: HolidayDate::Yearly { month: 2, day: 29 },
            },
        ]);
        assert_eq!(
            fields(bad),
            [
                "program.occasions.holidays[0].date.day",
                "program.occasions.holidays[1].id",
                "program.occasions.holidays[1].name",
                "program.occasions.holidays[1].date.month",
                "program.occasions.holidays[2].id",
                "program.occasions.holidays[2].name",
                "program.occasions.holidays[2].date.day",
            ]
        );
        let many = holidays(
            (0..=MAX_HOLIDAYS)
                .map(|i| Holiday {
                    id: format!("h{i}"),
                    ..new_year()
                })
                .collect(),
        );
        assert_eq!(fields(many), ["program.occasions.holidays"]);
        assert_eq!(upcoming_days("days", 0).unwrap_err().field, "days");
        assert!(upcoming_days("days", MAX_UPCOMING_DAYS + 1).is_err());
        assert_eq!(upcoming_days("days", 30), Ok(30));
    }

    #[test]
    fn the_29th_of_february_falls_on_the_28th_in_other_years() {
        assert_eq!(yearly_date(2, 29, 2027), Some(date(2027, 2, 28)));
        assert_eq!(yearly_date(2, 29, 2028), Some(date(2028, 2, 29)));
        assert_eq!(
            yearly_date(2, 29, 2100),
            Some(date(2100, 2, 28)),
            "not a leap year"
        );
        assert_eq!(yearly_date(2, 29, 2000), Some(date(2000, 2, 29)));
        assert_eq!(yearly_date(4, 31, 2027), None);
        assert_eq!(yearly_date(12, 31, 2027), Some(date(2027, 12, 31)));

        let leapling = customer(Tz::UTC, born(2, 29, Some(2000)));
        let program = OccasionProgram::default();
        let on_28 = occasions_on(&program, &leapling, date(2027, 2, 28));
        assert_eq!(
            on_28,
            [Occurrence {
                occasion: Occasion::Birthday,
                date: date(2027, 2, 28),
                years: Some(27),
            }]
        );
        assert!(occasions_on(&program, &leapling, date(2027, 3, 1)).is_empty());
        assert!(occasions_on(&program, &leapling, date(2028, 2, 28)).is_empty());
        assert_eq!(
            occasions_on(&program, &leapling, date(2028, 2, 29)).len(),
            1
        );

        // Enrolled on 29 February (local): anniversaries on the 28th, and the 29th in leap
        // years.
        let mut enrolled_on_leap_day = customer(Tz::UTC, None);
        enrolled_on_leap_day.enrolled_at = utc(2028, 2, 29, 9, 0);
        let first = occasions_in_year(&program, &enrolled_on_leap_day, 2029);
        assert_eq!(
            keys(&first),
            [("anniversary".to_string(), date(2029, 2, 28))]
        );
        assert_eq!(first[0].years, Some(1));
        assert_eq!(
            occasions_in_year(&program, &enrolled_on_leap_day, 2032)[0].date,
            date(2032, 2, 29)
        );
        assert!(occasions_in_year(&program, &enrolled_on_leap_day, 2028).is_empty());
        // The same UTC instant is still 28 February in Pago Pago: the anniversary is the 28th.
        enrolled_on_leap_day.time_zone = PAGO_PAGO;
        assert_eq!(enrolled_on_leap_day.enrolled_on(), date(2028, 2, 28));
        assert_eq!(
            occasions_in_year(&program, &enrolled_on_leap_day, 2032)[0].date,
            date(2032, 2, 28)
        );
    }

    #[test]
    fn kiritimati_and_pago_pago_at_the_same_utc_instant() {
        let program = holidays(vec![new_year()]);
        let east = customer(KIRITIMATI, born(3, 1, None));
        let west = customer(PAGO_PAGO, born(3, 1, None));

        // 31 December 2026, 10:30 UTC: already 00:30 on 1 January 2027 in Kiritimati, still
        // 23:30 on 30 December in Pago Pago.
        let instant = utc(2026, 12, 31, 10, 30);
        assert_eq!(local_date(KIRITIMATI, instant), date(2027, 1, 1));
        assert_eq!(local_date(PAGO_PAGO, instant), date(2026, 12, 30));
        let east_today = occasions_today(&program, &east, instant);
        assert_eq!(
            keys(&east_today),
            [("holiday:new-year".to_string(), date(2027, 1, 1))]
        );
        assert!(east_today[0].is_today(KIRITIMATI, instant));
        assert!(!east_today[0].is_today(PAGO_PAGO, instant));
        assert!(occasions_today(&program, &west, instant).is_empty());
        // The greeting belongs to the local year 2027, though it is 2026 in UTC.
        assert_eq!(
            east_today[0].greeting_key(7),
            GreetingKey {
                customer_id: 7,
                occasion: "holiday:new-year".into(),
                year: 2027
            }
        );

        // 1 January 2027, 10:00 UTC: over in Kiritimati (2 January), not yet in Pago Pago.
        let instant = utc(2027, 1, 1, 10, 0);
        assert!(occasions_today(&program, &east, instant).is_empty());
        assert!(occasions_today(&program, &west, instant).is_empty());
        // A minute before and the hour after: the edges of each local day.
        assert_eq!(
            occasions_today(&program, &east, instant - TimeDelta::minutes(1)).len(),
            1
        );
        assert!(occasions_today(&program, &west, utc(2027, 1, 1, 10, 59)).is_empty());
        assert_eq!(
            occasions_today(&program, &west, utc(2027, 1, 1, 11, 0)).len(),
            1
        );
        assert_eq!(
            occasions_today(&program, &west, utc(2027, 1, 2, 10, 59)).len(),
            1
        );
        assert!(occasions_today(&program, &west, utc(2027, 1, 2, 11, 0)).is_empty());

        // A birthday on 1 March: the same instant is the birthday in Kiritimati only.
        let instant = utc(2027, 2, 28, 10, 0);
        assert_eq!(
            keys(&occasions_today(&program, &east, instant)),
            [("birthday".to_string(), date(2027, 3, 1))]
        );
        assert!(occasions_today(&program, &west, instant).is_empty());
    }

    #[test]
    fn upcoming_occasions_wrap_the_year() {
        let program = holidays(vec![
            new_year(),
            Holiday {
                id: "womens-day".into(),
                name: "Women's Day".into(),
                date: HolidayDate::Yearly { month: 3, day: 8 },
            },
            Holiday {
                id: "launch".into(),
                name: "Launch".into(),
                date: HolidayDate::Once {
                    date: date(2027, 1, 10),
                },
            },
        ]);
        let c = customer(Tz::UTC, born(1, 15, None));
        // 20 December + 30 days: 20 December 2026 to 18 January 2027.
        let found = upcoming(&program, &c, utc(2026, 12, 20, 0, 0), 30);
        assert_eq!(
            keys(&found),
            [
                ("holiday:new-year".to_string(), date(2027, 1, 1)),
                ("holiday:launch".to_string(), date(2027, 1, 10)),
                ("birthday".to_string(), date(2027, 1, 15)),
            ]
        );
        // The first day is included, the day `days` later is not.
        let on_19th = customer(Tz::UTC, born(1, 19, None));
        assert!(upcoming(&holidays(vec![]), &on_19th, utc(2026, 12, 20, 0, 0), 30).is_empty());
        let on_20th = customer(Tz::UTC, born(12, 20, None));
        assert_eq!(
            upcoming(&holidays(vec![]), &on_20th, utc(2026, 12, 20, 23, 59), 1).len(),
            1
        );
        // 366 days from 1 January 2027 reach 1 January 2028: two New Years, two keys.
        let year = upcoming(&holidays(vec![new_year()]), &c, utc(2027, 1, 1, 0, 0), 366);
        let new_years: Vec<GreetingKey> = year
            .iter()
            .filter(|o| o.occasion.kind() == OccasionKind::Holiday)
            .map(|o| o.greeting_key(1))
            .collect();
        assert_eq!(
            new_years.iter().map(|k| k.year).collect::<Vec<_>>(),
            [2027, 2028]
        );
        // From's day is the customer's: in Kiritimati 31 December 10:30 UTC is 1 January.
        let east = customer(KIRITIMATI, None);
        let from = utc(2026, 12, 31, 10, 30);
        assert_eq!(
            upcoming(&holidays(vec![new_year()]), &east, from, 1).len(),
            1
        );
        let west = customer(PAGO_PAGO, None);
        assert!(upcoming(&holidays(vec![new_year()]), &west, from, 2).is_empty());
        assert_eq!(
            upcoming(&holidays(vec![new_year()]), &west, from, 3).len(),
            1
        );
    }

    #[test]
    fn anniversaries_and_ages_count_from_the_first_year() {
        let program = OccasionProgram::default();
        let c = customer(Tz::UTC, born(6, 15, Some(1990)));
        let in_2026 = occasions_in_year(&program, &c, 2026);
        assert_eq!(
            in_2026
                .iter()
                .map(|o| (o.occasion.key(), o.years))
                .collect::<Vec<_>>(),
            [
                ("birthday".to_string(), Some(36)),
                ("anniversary".to_string(), Some(6))
            ]
        );
        // No anniversary in the year of enrolment, no birthday in the year of birth.
        assert!(
            occasions_in_year(&program, &c, 2020)
                .iter()
                .all(|o| o.occasion != Occasion::Anniversary)
        );
        assert!(
            occasions_in_year(&program, &customer(Tz::UTC, born(6, 15, Some(2020))), 2020)
                .iter()
                .all(|o| o.occasion != Occasion::Birthday)
        );
        // A program that greets neither.
        let quiet = OccasionProgram {
            birthdays: false,
            anniversaries: false,
            holidays: vec![],
            birthday_reward: BirthdayReward::default(),
        };
        assert!(occasions_in_year(&quiet, &c, 2026).is_empty());
    }

    #[test]
    fn greetings_only_with_consent_once_per_occasion_and_year() {
        let program = holidays(vec![new_year()]);
        let c = customer(KIRITIMATI, born(1, 1, None));
        let consented = GreetingConsent {
            marketing_consent: true,
        };
        let instant = utc(2026, 12, 31, 10, 30);
        let due = greetings_due(&program, &c, consented, instant, 0);
        let mut due_keys: Vec<GreetingKey> = due.iter().map(|o| o.greeting_key(9)).collect();
        due_keys.sort();
        assert_eq!(
            due_keys,
            [
                GreetingKey {
                    customer_id: 9,
                    occasion: "birthday".into(),
                    year: 2027
                },
                GreetingKey {
                    customer_id: 9,
                    occasion: "holiday:new-year".into(),
                    year: 2027
                },
            ]
        );
        // No consent: nothing, on the very same day.
        assert!(!GreetingConsent::default().allows_greetings());
        assert!(greetings_due(&program, &c, GreetingConsent::default(), instant, 1).is_empty());
        // A later run on the same local day, or the next day catching up, yields the same
        // keys (the store keeps one); two days later it is past.
        let later = greetings_due(&program, &c, consented, instant + TimeDelta::hours(20), 0);
        assert_eq!(later, due);
        let next_day = greetings_due(&program, &c, consented, instant + TimeDelta::days(1), 1);
        assert_eq!(next_day, due);
        assert!(greetings_due(&program, &c, consented, instant + TimeDelta::days(2), 1).is_empty());
    }

    #[test]
    fn no_greeting_for_an_occasion_before_enrolment() {
        let program = OccasionProgram::default();
        let mut c = customer(Tz::UTC, born(3, 9, None));
        c.enrolled_at = utc(2027, 3, 10, 8, 0);
        let consent = GreetingConsent {
            marketing_consent: true,
        };
        // Enrolled the day after their birthday: the catch-up does not reach back before it.
        assert!(greetings_due(&program, &c, consent, utc(2027, 3, 10, 9, 0), 1).is_empty());
        // Enrolled on the birthday itself: greeted.
        c.enrolled_at = utc(2027, 3, 9, 8, 0);
        assert_eq!(
            greetings_due(&program, &c, consent, utc(2027, 3, 9, 9, 0), 1).len(),
            1
        );
    }

    #[test]
    fn no_input_makes_the_rules_panic() {
        let program = holidays(vec![
            new_year(),
            Holiday {
                id: "bad".into(),
                name: "Unchecked".into(),
                date: HolidayDate::Yearly { month: 13, day: 40 },
            },
            Holiday {
                id: "edge".into(),
                name: "Edge".into(),
                date: HolidayDate::Once {
                    date: NaiveDate::MAX,
                },
            },
        ]);
        let instants = [
            DateTime::<Utc>::MIN_UTC,
            DateTime::<Utc>::MAX_UTC,
            utc(2026, 1, 1, 0, 0),
        ];
        let birthdays = [
            None,
            born(2, 31, None),
            born(0, 0, Some(i32::MIN)),
            born(2, 29, Some(i32::MAX)),
        ];
        for time_zone in [KIRITIMATI, PAGO_PAGO, Tz::UTC] {
            for enrolled_at in instants {
                for birthday in birthdays {
                    let c = CustomerOccasions {
                        time_zone,
                        birthday,
                        enrolled_at,
                    };
                    for now in instants {
                        let _ = occasions_today(&program, &c, now);
                        let _ = upcoming(&program, &c, now, u32::MAX);
                        let consent = GreetingConsent {
                            marketing_consent: true,
                        };
                        let _ = greetings_due(&program, &c, consent, now, u32::MAX);
                    }
                }
            }
        }
    }

    #[test]
    fn the_birthday_reward_names_its_bad_fields() {
        assert!(fields(reward(Some("cake"), 100)).is_empty());
        assert!(fields(reward(None, 0)).is_empty());
        assert!(reward(None, 0).birthday_reward.is_empty());
        assert_eq!(
            fields(reward(Some(""), -1)),
            [
                "program.occasions.birthday_reward.gift_id",
                "program.occasions.birthday_reward.bonus_points"
            ]
        );
        assert_eq!(
            fields(reward(Some(&"g".repeat(65)), MAX_BIRTHDAY_BONUS_POINTS + 1)),
            [
                "program.occasions.birthday_reward.gift_id",
                "program.occasions.birthday_reward.bonus_points"
            ]
        );
        // A stored program without a reward reads as none.
        let stored: OccasionProgram = serde_json::from_str(r#"{"birthdays": true}"#).unwrap();
        assert!(stored.birthday_reward.is_empty());
    }

    #[test]
    fn candidates_cover_every_local_day_on_earth_and_the_leap_day() {
        // 31 December 2026, 10:30 UTC: 30 December in Pago Pago, 1 January in Kiritimati.
        let dates = dates_somewhere(utc(2026, 12, 31, 10, 30), 1);
        assert_eq!(
            dates,
            [
                date(2026, 12, 29),
                date(2026, 12, 30),
                date(2026, 12, 31),
                date(2027, 1, 1)
            ]
        );
        for zone in [KIRITIMATI, PAGO_PAGO, Tz::UTC] {
            assert!(dates.contains(&local_date(zone, utc(2026, 12, 31, 10, 30))));
        }
        let month_days = candidate_month_days(&dates);
        assert!(month_days.contains(&(1, 2)) && month_days.contains(&(12, 28)));
        assert!(!month_days.contains(&(2, 29)));
        // 28 February of a common year brings the leaplings; of a leap year it does not.
        let common = candidate_month_days(&[date(2027, 2, 28)]);
        assert_eq!(common, [(2, 27), (2, 28), (2, 29), (3, 1)]);
        let leap = candidate_month_days(&[date(2028, 2, 28)]);
        assert_eq!(leap, [(2, 27), (2, 28), (2, 29)]);
        assert!(holiday_among(&holidays(vec![new_year()]), &dates));
        assert!(!holiday_among(&holidays(vec![new_year()]), &dates[..3]));
        assert!(greets_anything(&OccasionProgram::default()));
    }

    #[test]
    fn only_the_current_lease_acks_and_a_replay_answers_the_same() {
        let leased = LeaseState {
            status: GreetingStatus::Leased,
            lease_token: Some("t2".into()),
            acked: Some(("t1".into(), Outcome::RetryLater)),
            attempts: 2,
        };
        assert_eq!(
            judge_ack(&leased, "t2", Outcome::Sent),
            AckVerdict::Apply(Outcome::Sent)
        );
        // The older lease's token: its own ack replays, anything else is stale.
        assert_eq!(
            judge_ack(&leased, "t1", Outcome::RetryLater),
            AckVerdict::Replay
        );
        assert_eq!(
            judge_ack(&leased, "t1", Outcome::Sent),
            AckVerdict::Conflict(Outcome::RetryLater)
        );
        assert_eq!(judge_ack(&leased, "t0", Outcome::Sent), AckVerdict::Stale);
        let sent = LeaseState {
            status: GreetingStatus::Sent,
            lease_token: None,
            acked: Some(("t2".into(), Outcome::Sent)),
            attempts: 2,
        };
        assert_eq!(judge_ack(&sent, "t2", Outcome::Sent), AckVerdict::Replay);
        assert_eq!(
            judge_ack(&sent, "t2", Outcome::RetryLater),
            AckVerdict::Conflict(Outcome::Sent)
        );
        let due = LeaseState {
            status: GreetingStatus::Due,
            lease_token: None,
            acked: None,
            attempts: 0,
        };
        assert_eq!(judge_ack(&due, "", Outcome::Sent), AckVerdict::Stale);
        for o in [
            Outcome::Sent,
            Outcome::FailedPermanently,
            Outcome::RetryLater,
        ] {
            assert_eq!(Outcome::parse(o.as_str()), Some(o));
        }
        assert_eq!(retry_delay(1), TimeDelta::minutes(1));
        assert_eq!(retry_delay(3), TimeDelta::minutes(4));
        assert_eq!(retry_delay(u32::MAX), TimeDelta::hours(6));
        assert_eq!(retry_delay(0), TimeDelta::minutes(1));
    }

    #[test]
    fn claim_and_listing_requests_name_their_bad_fields() {
        assert_eq!(
            ClaimRequest::parse(0, 0),
            Ok(ClaimRequest {
                limit: DEFAULT_CLAIM_LIMIT,
                lease_seconds: DEFAULT_LEASE_SECONDS
            })
        );
        let bad = ClaimRequest::parse(MAX_CLAIM_LIMIT + 1, MAX_LEASE_SECONDS + 1).unwrap_err();
        assert_eq!(
            bad.0.iter().map(|v| v.field.as_str()).collect::<Vec<_>>(),
            ["limit", "lease_seconds"]
        );
        let now = utc(2026, 12, 1, 0, 0);
        let first = UpcomingRequest::parse(None, 0, 0, "", now).unwrap();
        assert_eq!((first.from, first.days, first.page_size), (now, 30, 100));
        let bad = UpcomingRequest::parse(None, 367, 501, "nope", now).unwrap_err();
        assert_eq!(
            bad.0.iter().map(|v| v.field.as_str()).collect::<Vec<_>>(),
            ["days", "page_size", "page_token"]
        );
        // A token carries its window: the next page keeps the first request's `from`.
        let token = UpcomingToken {
            from: utc(2026, 11, 30, 12, 0),
            days: 7,
            after: UpcomingCursor {
                starts_at: utc(2026, 12, 2, 0, 0),
                external_id: "card-1".into(),
                occasion: "birthday".into(),
            },
        };
        let next = UpcomingRequest::parse(Some(now), 30, 10, &encode_token(&token), now).unwrap();
        assert_eq!(next.from, token.from);
        assert_eq!(next.days, 7);
        assert_eq!(next.after, Some(token.after));
    }

    #[test]
    fn pages_of_upcoming_occasions_are_soonest_first_and_resume_after_the_cursor() {
        let from = utc(2026, 12, 20, 0, 0);
        let program = holidays(vec![new_year()]);
        let east = customer(KIRITIMATI, born(12, 25, None));
        let west = customer(PAGO_PAGO, born(12, 25, None));
        let mut page = Vec::new();
        merge_page(
            &mut page,
            upcoming_entries(&program, &west, "w", from, 30),
            None,
            10,
        );
        merge_page(
            &mut page,
            upcoming_entries(&program, &east, "e", from, 30),
            None,
            10,
        );
        let order: Vec<(String, String)> = page
            .iter()
            .map(|e| (e.cursor.external_id.clone(), e.cursor.occasion.clone()))
            .collect();
        // Kiritimati's days start 25 hours before Pago Pago's.
        assert_eq!(
            order,
            [
                ("e".to_string(), "birthday".to_string()),
                ("w".to_string(), "birthday".to_string()),
                ("e".to_string(), "holiday:new-year".to_string()),
                ("w".to_string(), "holiday:new-year".to_string()),
            ]
        );
        assert_eq!(
            page[0].cursor.starts_at,
            utc(2026, 12, 24, 10, 0),
            "25 December starts at 10:00 UTC the day before in UTC+14"
        );
        let after = page[1].cursor.clone();
        let mut rest = Vec::new();
        merge_page(
            &mut rest,
            upcoming_entries(&program, &east, "e", from, 30),
            Some(&after),
            1,
        );
        merge_page(
            &mut rest,
            upcoming_entries(&program, &west, "w", from, 30),
            Some(&after),
            1,
        );
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].cursor, page[2].cursor);
        assert_eq!(
            GreetingKey {
                customer_id: 7,
                occasion: "holiday:a:b".into(),
                year: 2027
            }
            .reference(),
            "7:holiday:a:b:2027"
        );
    }
}
