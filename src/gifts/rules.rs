//! The pure rules of gifts: the gift code (its alphabet, check character and parsing), the
//! catalog entry and gift rule as validated values, a grant's status at an instant, when a
//! purchase rule fires, and the page tokens. No I/O; time comes in as a parameter.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Duration, Utc};
use sha2::{Digest, Sha256};

use crate::platform::validation::{self, Invalid, Violation, Violations};

/// Longest merchant-chosen id of a gift or a gift rule (like promotion ids).
pub const MAX_GIFT_ID_CHARS: usize = 64;
pub const MAX_NAME_CHARS: usize = 200;
pub const MAX_DESCRIPTION_CHARS: usize = 2000;
pub const MAX_VALIDITY_DAYS: u32 = 3650;
pub const MAX_EVERY_N: u32 = 10_000;
pub const MAX_DELAY_HOURS: u32 = 8760;
/// Prices and stock beyond this are surely mistakes (and stay far from overflow).
pub const MAX_AMOUNT: i64 = 1_000_000_000_000_000;

pub const DEFAULT_PAGE_SIZE: usize = 50;
pub const MAX_PAGE_SIZE: usize = 100;

// ---------------------------------------------------------------------------------------------
// Codes

/// Crockford's base32 alphabet: digits and letters without I, L, O and U.
pub const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
/// Random characters of a code: 16 × 5 = 80 bits.
pub const DATA_CHARS: usize = 16;
/// The data characters and the check character.
pub const CODE_CHARS: usize = DATA_CHARS + 1;
/// Longer input is not a code, whatever it holds (checked before anything else is done).
const MAX_CODE_INPUT_CHARS: usize = 64;

/// The value of a character as Crockford decodes it: case-insensitive, `O` read as `0`, `I`
/// and `L` as `1`; `U` and everything else is not a code character.
fn symbol_value(c: char) -> Option<u8> {
    let c = c.to_ascii_uppercase();
    let c = match c {
        'O' => '0',
        'I' | 'L' => '1',
        other => other,
    };
    ALPHABET
        .iter()
        .position(|&a| a as char == c)
        .map(|p| p as u8)
}

/// Multiplication by x in GF(32) (modulo x⁵ + x² + 1).
fn times_x(value: u8) -> u8 {
    let shifted = value << 1;
    if shifted & 0x20 != 0 {
        (shifted ^ 0x25) & 0x1f
    } else {
        shifted
    }
}

/// One step of a Damm check over the quasigroup `a ∘ b = x·a + b` of GF(32). It is a Latin
/// square (every single wrong character changes the result) and totally anti-symmetric
/// (`(c ∘ a) ∘ b = (c ∘ b) ∘ a` only when `a = b`: every swap of two adjacent different
/// characters changes it), so the check character catches both mistakes, and it is a symbol
/// of the same alphabet (nothing extra to type, unlike mod-37's `*~$=U`).
fn damm_step(interim: u8, symbol: u8) -> u8 {
    times_x(interim) ^ symbol
}

fn damm(symbols: &[u8]) -> u8 {
    symbols.iter().fold(0, |interim, &s| damm_step(interim, s))
}

/// The check symbol that brings the Damm check of `data` followed by it to zero.
fn check_symbol(data: &[u8]) -> u8 {
    times_x(damm(data))
}

/// A gift code: a bearer secret (whoever holds it can redeem the gift), so its `Debug` never
/// shows it and nothing logs it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct GiftCode(String);

impl fmt::Debug for GiftCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GiftCode(<redacted>)")
    }
}

impl GiftCode {
    /// A fresh code: 80 bits from the thread's CSPRNG (ChaCha, seeded by the OS).
    pub fn generate() -> GiftCode {
        use rand::RngCore;
        let mut bytes = [0u8; 10];
        rand::rng().fill_bytes(&mut bytes);
        GiftCode::from_random(bytes)
    }

    /// The code of 80 random bits.
    pub fn from_random(bytes: [u8; 10]) -> GiftCode {
        let bits = bytes
            .iter()
            .fold(0u128, |acc, &b| (acc << 8) | u128::from(b));
        let mut symbols = [0u8; CODE_CHARS];
        for (i, symbol) in symbols.iter_mut().take(DATA_CHARS).enumerate() {
            *symbol = ((bits >> (5 * (DATA_CHARS - 1 - i))) & 0x1f) as u8;
        }
        symbols[DATA_CHARS] = check_symbol(&symbols[..DATA_CHARS]);
        GiftCode(
            symbols
                .iter()
                .map(|&s| ALPHABET[s as usize] as char)
                .collect(),
        )
    }

    /// Reads a code as a person typed it: case-insensitive, dashes and spaces ignored, `O`
    /// read as `0`, `I`/`L` as `1`. A code whose check character does not match is
    /// "mistyped" (told apart from a well-formed code that does not exist).
    pub fn parse(field: &str, input: &str) -> Result<GiftCode, Violation> {
        if input.chars().count() > MAX_CODE_INPUT_CHARS {
            return Err(Violation::new(
                field,
                "is not a gift code (they look like ABCD-EFGH-JKMN-PQRS-T)",
            ));
        }
        let mut symbols = Vec::with_capacity(CODE_CHARS);
        for c in input.chars().filter(|c| !matches!(c, '-' | ' ')) {
            match symbol_value(c) {
                Some(value) => symbols.push(value),
                None => {
                    return Err(Violation::new(
                        field,
                        "holds a character that gift codes never contain (they use digits \
                         and letters without I, L, O and U)",
                    ));
                }
            }
        }
        if symbols.is_empty() {
            return Err(Violation::new(field, "must not be empty"));
        }
        if symbols.len() != CODE_CHARS {
            return Err(Violation::new(
                field,
                format!("must have {CODE_CHARS} characters (dashes and spaces aside)"),
            ));
        }
        if damm(&symbols) != 0 {
            return Err(Violation::new(
                field,
                "is mistyped: its check character does not match (a character wrong or two \
                 swapped?)",
            ));
        }
        Ok(GiftCode(
            symbols
                .iter()
                .map(|&s| ALPHABET[s as usize] as char)
                .collect(),
        ))
    }

    /// A code as stored (trusted: written by [`GiftCode::from_random`]).
    pub fn from_stored(normalized: String) -> GiftCode {
        GiftCode(normalized)
    }

    /// Upper case, without dashes: the stored form.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Grouped for people: `ABCD-EFGH-JKMN-PQRS-T`.
    pub fn display(&self) -> String {
        let mut out = String::with_capacity(CODE_CHARS + CODE_CHARS / 4);
        for (i, c) in self.0.chars().enumerate() {
            if i > 0 && i % 4 == 0 {
                out.push('-');
            }
            out.push(c);
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Names stored in the tables

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiftKind {
    Item,
    Service,
    Discount,
}

impl GiftKind {
    pub fn as_str(self) -> &'static str {
        match self {
            GiftKind::Item => "item",
            GiftKind::Service => "service",
            GiftKind::Discount => "discount",
        }
    }

    pub fn parse(value: &str) -> Option<GiftKind> {
        Some(match value {
            "item" => GiftKind::Item,
            "service" => GiftKind::Service,
            "discount" => GiftKind::Discount,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantStatus {
    Issued,
    Redeemed,
    Expired,
    Revoked,
}

impl GrantStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantStatus::Issued => "issued",
            GrantStatus::Redeemed => "redeemed",
            GrantStatus::Expired => "expired",
            GrantStatus::Revoked => "revoked",
        }
    }

    pub fn parse(value: &str) -> Option<GrantStatus> {
        Some(match value {
            "issued" => GrantStatus::Issued,
            "redeemed" => GrantStatus::Redeemed,
            "expired" => GrantStatus::Expired,
            "revoked" => GrantStatus::Revoked,
            _ => return None,
        })
    }
}

/// What made a grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantSource {
    /// Claimed with points (`MemberService.ClaimGift`); the reference is the claim key.
    Points,
    /// A gift rule; the reference is `<rule_id>:<purchase_id>` ([`rule_reference`]).
    Rule,
    /// `ProgramService.IssueGift`; the reference is the issue key.
    Manual,
    /// The birthday greeting's reward; the reference is the greeting key
    /// (`greetings::rules::GreetingKey::reference`), so one per customer and year.
    Birthday,
}

impl GrantSource {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantSource::Points => "points",
            GrantSource::Rule => "rule",
            GrantSource::Manual => "manual",
            GrantSource::Birthday => "birthday",
        }
    }

    pub fn parse(value: &str) -> Option<GrantSource> {
        Some(match value {
            "points" => GrantSource::Points,
            "rule" => GrantSource::Rule,
            "manual" => GrantSource::Manual,
            "birthday" => GrantSource::Birthday,
            _ => return None,
        })
    }
}

/// The source reference of a grant made by a rule for a purchase: each rule fires once per
/// purchase, however often the purchase is replayed. Rule ids have no ':', so two
/// (rule, purchase) pairs never share a reference.
pub fn rule_reference(rule_id: &str, purchase_id: &str) -> String {
    format!("{rule_id}:{purchase_id}")
}

/// The source reference of a tier-up grant: one per rule, customer and tier, so reaching the
/// tier again after a downgrade grants nothing twice.
pub fn tier_up_reference(rule_id: &str, customer_id: i64, tier_id: &str) -> String {
    format!("{rule_id}:tier:{customer_id}:{tier_id}")
}

// ---------------------------------------------------------------------------------------------
// The catalog

/// A catalog entry as the admin sends it (after proto decoding).
#[derive(Debug, Clone, Default)]
pub struct GiftInput {
    pub gift_id: String,
    pub name: String,
    pub description: String,
    /// `None`: unspecified.
    pub kind: Option<GiftKind>,
    pub points_price: Option<i64>,
    pub stock: Option<i64>,
    pub validity_days: u32,
    pub active: bool,
}

/// A validated catalog entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GiftSpec {
    pub gift_id: String,
    pub name: String,
    pub description: String,
    pub kind: GiftKind,
    pub points_price: Option<i64>,
    pub stock: Option<i64>,
    pub validity_days: u32,
    pub active: bool,
}

/// A catalog entry as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gift {
    pub spec: GiftSpec,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A merchant-chosen id of a gift or a rule: an identifier of at most 64 characters.
pub fn gift_id(field: &str, value: &str) -> Result<String, Violation> {
    let id = validation::identifier(field, value)?;
    if id.chars().count() > MAX_GIFT_ID_CHARS {
        return Err(Violation::new(
            field,
            format!("must be at most {MAX_GIFT_ID_CHARS} characters"),
        ));
    }
    Ok(id)
}

impl GiftSpec {
    /// Validates every field; violations are named `gift.<field>`.
    pub fn parse(input: GiftInput) -> Result<GiftSpec, Invalid> {
        let mut v = Violations::default();
        let gift_id = v.check(gift_id("gift.gift_id", &input.gift_id));
        if input.name.trim().is_empty() {
            v.add("gift.name", "must not be empty");
        }
        let name = v.check(validation::text("gift.name", &input.name, MAX_NAME_CHARS));
        let description = v.check(validation::text(
            "gift.description",
            &input.description,
            MAX_DESCRIPTION_CHARS,
        ));
        if input.kind.is_none() {
            v.add("gift.kind", "is required (item, service or discount)");
        }
        if let Some(price) = input.points_price
            && !(1..=MAX_AMOUNT).contains(&price)
        {
            v.add(
                "gift.points_price",
                format!("must be between 1 and {MAX_AMOUNT} (unset: not claimable with points)"),
            );
        }
        if let Some(stock) = input.stock
            && !(0..=MAX_AMOUNT).contains(&stock)
        {
            v.add(
                "gift.stock",
                format!("must be between 0 and {MAX_AMOUNT} (unset: unlimited)"),
            );
        }
        if !(1..=MAX_VALIDITY_DAYS).contains(&input.validity_days) {
            v.add(
                "gift.validity_days",
                format!("must be between 1 and {MAX_VALIDITY_DAYS}"),
            );
        }
        match (gift_id, name, description, input.kind) {
            (Some(gift_id), Some(name), Some(description), Some(kind)) if v.is_empty() => {
                Ok(GiftSpec {
                    gift_id,
                    name,
                    description,
                    kind,
                    points_price: input.points_price,
                    stock: input.stock,
                    validity_days: input.validity_days,
                    active: input.active,
                })
            }
            _ => Err(v.into_error()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Gift rules

/// When a rule grants its gift. Triggers to come (birthday, tier-up, complaint) are further
/// variants with their parameters, evaluated where their occasion happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// The come-back gift: the customer's first purchase grants it, for the second visit.
    FirstPurchase,
    /// Every purchase that brings the customer's count to a multiple of `n`.
    EveryNthPurchase(u32),
    /// The purchase that brings the customer up to the tier with this id; once per customer
    /// and tier ([`tier_up_reference`]).
    TierUp(String),
}

impl Trigger {
    /// The name stored in `gift_rules.trigger`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Trigger::FirstPurchase => "first_purchase",
            Trigger::EveryNthPurchase(_) => "every_nth_purchase",
            Trigger::TierUp(_) => "tier_up",
        }
    }

    /// From the stored columns.
    pub fn from_stored(
        trigger: &str,
        every_n: Option<i32>,
        tier_id: Option<&str>,
    ) -> Option<Trigger> {
        match (trigger, every_n, tier_id) {
            ("first_purchase", None, None) => Some(Trigger::FirstPurchase),
            ("every_nth_purchase", Some(n), None) if n >= 1 => {
                Some(Trigger::EveryNthPurchase(n as u32))
            }
            ("tier_up", None, Some(tier)) => Some(Trigger::TierUp(tier.to_string())),
            _ => None,
        }
    }

    pub fn every_n(&self) -> Option<u32> {
        match self {
            Trigger::FirstPurchase | Trigger::TierUp(_) => None,
            Trigger::EveryNthPurchase(n) => Some(*n),
        }
    }

    pub fn tier_id(&self) -> Option<&str> {
        match self {
            Trigger::TierUp(tier) => Some(tier),
            Trigger::FirstPurchase | Trigger::EveryNthPurchase(_) => None,
        }
    }

    /// Whether a purchase that brought the customer up to `tier_reached` fires this trigger.
    pub fn fires_on_tier_up(&self, tier_reached: &str) -> bool {
        matches!(self, Trigger::TierUp(tier) if tier == tier_reached)
    }

    /// Whether a purchase that brought the customer to `purchase_count_after` purchases
    /// fires this trigger.
    pub fn fires_on_purchase(&self, purchase_count_after: i64) -> bool {
        match *self {
            Trigger::FirstPurchase => purchase_count_after == 1,
            Trigger::EveryNthPurchase(n) => {
                n >= 1 && purchase_count_after >= 1 && purchase_count_after % i64::from(n) == 0
            }
            Trigger::TierUp(_) => false,
        }
    }
}

/// The trigger as the admin names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TriggerInput {
    Unspecified,
    FirstPurchase,
    EveryNthPurchase,
    TierUp,
}

#[derive(Debug, Clone)]
pub struct GiftRuleInput {
    pub rule_id: String,
    pub trigger: TriggerInput,
    pub every_n: u32,
    /// For TierUp: the tier reached (an id of the program's tiers; a rule naming a tier the
    /// program does not have never fires).
    pub tier_id: String,
    pub gift_id: String,
    pub delay_hours: u32,
    pub active: bool,
}

/// A validated gift rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GiftRuleSpec {
    pub rule_id: String,
    pub trigger: Trigger,
    pub gift_id: String,
    /// Hours between the purchase and the start of the grant's window.
    pub delay_hours: u32,
    pub active: bool,
}

/// A gift rule as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GiftRule {
    pub spec: GiftRuleSpec,
    pub version: i64,
    pub updated_at: DateTime<Utc>,
}

impl GiftRuleSpec {
    /// Validates every field; violations are named `rule.<field>`.
    pub fn parse(input: GiftRuleInput) -> Result<GiftRuleSpec, Invalid> {
        let mut v = Violations::default();
        let rule_id = v
            .check(gift_id("rule.rule_id", &input.rule_id))
            .filter(|id| {
                // ':' ends the rule id in the grants' source references ([`rule_reference`]).
                let clean = !id.contains(':');
                if !clean {
                    v.add("rule.rule_id", "must not contain ':'");
                }
                clean
            });
        let gift_id = v.check(gift_id("rule.gift_id", &input.gift_id));
        let trigger = match input.trigger {
            TriggerInput::Unspecified => {
                v.add(
                    "rule.trigger",
                    "is required (first_purchase or every_nth_purchase)",
                );
                None
            }
            TriggerInput::FirstPurchase => {
                if input.every_n != 0 {
                    v.add("rule.every_n", "applies only to every_nth_purchase");
                }
                Some(Trigger::FirstPurchase)
            }
            TriggerInput::EveryNthPurchase => {
                if !(1..=MAX_EVERY_N).contains(&input.every_n) {
                    v.add(
                        "rule.every_n",
                        format!("must be between 1 and {MAX_EVERY_N}"),
                    );
                }
                Some(Trigger::EveryNthPurchase(input.every_n))
            }
            TriggerInput::TierUp => {
                if input.every_n != 0 {
                    v.add("rule.every_n", "applies only to every_nth_purchase");
                }
                v.check(validation::identifier("rule.tier_id", &input.tier_id))
                    .filter(|id| {
                        let short = id.chars().count() <= crate::tiers::rules::MAX_TIER_ID_CHARS;
                        if !short {
                            v.add(
                                "rule.tier_id",
                                format!(
                                    "must be at most {} characters",
                                    crate::tiers::rules::MAX_TIER_ID_CHARS
                                ),
                            );
                        }
                        short
                    })
                    .map(Trigger::TierUp)
            }
        };
        if !matches!(input.trigger, TriggerInput::TierUp) && !input.tier_id.is_empty() {
            v.add("rule.tier_id", "applies only to tier_up");
        }
        if input.delay_hours > MAX_DELAY_HOURS {
            v.add(
                "rule.delay_hours",
                format!("must be at most {MAX_DELAY_HOURS}"),
            );
        }
        match (rule_id, gift_id, trigger) {
            (Some(rule_id), Some(gift_id), Some(trigger)) if v.is_empty() => Ok(GiftRuleSpec {
                rule_id,
                trigger,
                gift_id,
                delay_hours: input.delay_hours,
                active: input.active,
            }),
            _ => Err(v.into_error()),
        }
    }
}

/// The rules (of those given) that a purchase bringing the customer to `purchase_count_after`
/// fires: active ones whose trigger fires.
pub fn fired_rules(rules: &[GiftRuleSpec], purchase_count_after: i64) -> Vec<&GiftRuleSpec> {
    rules
        .iter()
        .filter(|r| r.active && r.trigger.fires_on_purchase(purchase_count_after))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Grants

/// One gift given to one customer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub code: GiftCode,
    pub gift_id: String,
    pub gift_name: String,
    pub gift_kind: GiftKind,
    pub external_id: String,
    /// As stored; [`Grant::status_at`] is what a reader sees.
    pub status: GrantStatus,
    pub source: GrantSource,
    pub purchase_id: Option<String>,
    pub valid_from: DateTime<Utc>,
    pub valid_until: DateTime<Utc>,
    pub redeemed_at: Option<DateTime<Utc>>,
    pub redeemed_store_id: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl Grant {
    /// The grant as it was when it was made, for the answer of the request that made it: a
    /// replay of that request gets the same answer even after the grant was redeemed since.
    pub fn as_made(&self) -> Grant {
        Grant {
            status: GrantStatus::Issued,
            redeemed_at: None,
            redeemed_store_id: None,
            ..self.clone()
        }
    }

    /// The status at `now`: an issued grant whose window has ended is expired, whether or not
    /// a sweep has written it.
    pub fn status_at(&self, now: DateTime<Utc>) -> GrantStatus {
        match self.status {
            GrantStatus::Issued if now >= self.valid_until => GrantStatus::Expired,
            other => other,
        }
    }

    /// Why this grant cannot be redeemed at `now` (for FAILED_PRECONDITION), or `None` when it
    /// can.
    pub fn refusal_at(&self, now: DateTime<Utc>) -> Option<String> {
        let stamp = |at: DateTime<Utc>| at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        match self.status_at(now) {
            GrantStatus::Redeemed => Some("the gift was redeemed already".to_string()),
            GrantStatus::Revoked => Some("the gift was revoked".to_string()),
            GrantStatus::Expired => Some(format!(
                "the gift expired: it was valid until {}",
                stamp(self.valid_until)
            )),
            GrantStatus::Issued if now < self.valid_from => Some(format!(
                "the gift is not valid yet: it is valid from {}",
                stamp(self.valid_from)
            )),
            GrantStatus::Issued => None,
        }
    }
}

/// The window of a grant made at `now` for a gift valid `validity_days`, starting
/// `delay_hours` later.
pub fn grant_window(
    now: DateTime<Utc>,
    delay_hours: u32,
    validity_days: u32,
) -> (DateTime<Utc>, DateTime<Utc>) {
    let from = now + Duration::hours(i64::from(delay_hours));
    (from, from + Duration::days(i64::from(validity_days)))
}

/// The fingerprint of a RedeemGift request's content, stored with its redemption key: a
/// replay matches it, another code or store with the same key does not.
pub fn redemption_fingerprint(code: &GiftCode, store_id: &str) -> [u8; 32] {
    let mut hash = Sha256::new();
    for part in ["redeem-gift.v1", code.as_str(), store_id] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    hash.finalize().into()
}

// ---------------------------------------------------------------------------------------------
// Pages

/// `page_size` 0 means the default; sizes over the maximum are reduced to it.
pub fn page_size(page_size: i32) -> Result<usize, Violation> {
    match page_size {
        ..0 => Err(Violation::new("page_size", "must not be negative")),
        0 => Ok(DEFAULT_PAGE_SIZE),
        n => Ok((n as usize).min(MAX_PAGE_SIZE)),
    }
}

const CATALOG_TOKEN_PREFIX: &str = "gifts.v1.";
const GRANTS_TOKEN_PREFIX: &str = "grants.v1.";

/// A page of the catalog: gifts after `after_gift_id`, by gift id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogPage {
    pub size: usize,
    pub after_gift_id: Option<String>,
}

impl CatalogPage {
    pub fn parse(size: i32, token: &str) -> Result<CatalogPage, Invalid> {
        let mut v = Violations::default();
        let size = v.check(page_size(size));
        let after_gift_id = if token.is_empty() {
            None
        } else {
            let decoded = decode(token, CATALOG_TOKEN_PREFIX).filter(|id| !id.is_empty());
            if decoded.is_none() {
                v.add("page_token", "is not a token returned by this list");
            }
            decoded
        };
        match size {
            Some(size) if v.is_empty() => Ok(CatalogPage {
                size,
                after_gift_id,
            }),
            _ => Err(v.into_error()),
        }
    }

    pub fn token_after(gift_id: &str) -> String {
        URL_SAFE_NO_PAD.encode(format!("{CATALOG_TOKEN_PREFIX}{gift_id}"))
    }
}

/// A page of a customer's grants, newest first: those before `(created_at, code)`. The token
/// holds a code of the very customer whose codes the page shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantsPage {
    pub size: usize,
    pub before: Option<(DateTime<Utc>, String)>,
}

impl GrantsPage {
    pub fn parse(size: i32, token: &str) -> Result<GrantsPage, Invalid> {
        let mut v = Violations::default();
        let size = v.check(page_size(size));
        let before = if token.is_empty() {
            None
        } else {
            let decoded = decode(token, GRANTS_TOKEN_PREFIX).and_then(|rest| {
                let (micros, code) = rest.split_once('.')?;
                let at = DateTime::from_timestamp_micros(micros.parse().ok()?)?;
                let code = GiftCode::parse("page_token", code).ok()?;
                Some((at, code.as_str().to_string()))
            });
            if decoded.is_none() {
                v.add("page_token", "is not a token returned by this list");
            }
            decoded
        };
        match size {
            Some(size) if v.is_empty() => Ok(GrantsPage { size, before }),
            _ => Err(v.into_error()),
        }
    }

    pub fn token_after(grant: &Grant) -> String {
        URL_SAFE_NO_PAD.encode(format!(
            "{GRANTS_TOKEN_PREFIX}{}.{}",
            grant.created_at.timestamp_micros(),
            grant.code.as_str()
        ))
    }
}

fn decode(token: &str, prefix: &str) -> Option<String> {
    if token.len() > 512 {
        return None;
    }
    let bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    text.strip_prefix(prefix).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn code(seed: u8) -> GiftCode {
        let mut bytes = [0u8; 10];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = seed.wrapping_mul(31).wrapping_add(i as u8 * 17);
        }
        GiftCode::from_random(bytes)
    }

    #[test]
    fn codes_use_the_alphabet_without_look_alikes_and_are_grouped() {
        let c = GiftCode::generate();
        assert_eq!(c.as_str().len(), CODE_CHARS);
        assert!(
            c.as_str()
                .chars()
                .all(|ch| ALPHABET.contains(&(ch as u8)) && !"ILOU".contains(ch))
        );
        let shown = c.display();
        assert_eq!(shown.len(), CODE_CHARS + 4);
        let groups: Vec<_> = shown.split('-').map(str::len).collect();
        assert_eq!(groups, [4, 4, 4, 4, 1]);
        assert_eq!(GiftCode::parse("code", &shown).unwrap(), c);
        assert_eq!(format!("{c:?}"), "GiftCode(<redacted>)");
    }

    #[test]
    fn all_80_bits_reach_the_code() {
        assert_eq!(
            GiftCode::from_random([0; 10]).as_str()[..16],
            *"0".repeat(16)
        );
        assert_eq!(
            GiftCode::from_random([0xff; 10]).as_str()[..16],
            *"Z".repeat(16)
        );
        let a = GiftCode::from_random([0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(&a.as_str()[..16], "0000000000000001");
        let b = GiftCode::from_random([0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b.as_str()[..16], "G000000000000000");
    }

    #[test]
    fn generated_codes_differ() {
        let codes: std::collections::HashSet<_> =
            (0..1000).map(|_| GiftCode::generate().0).collect();
        assert_eq!(codes.len(), 1000);
    }

    #[test]
    fn parsing_is_lenient_about_case_dashes_spaces_and_look_alikes() {
        // A code full of 0s and 1s, so that O/I/L have something to stand for.
        let c = GiftCode::from_random([0, 0, 0, 0, 0, 0, 0, 0, 0, 0x21]);
        let normalized = c.as_str().to_string();
        assert!(normalized.contains('1') && normalized.contains('0'));
        let typed = c
            .display()
            .to_lowercase()
            .replacen('0', "o", 3)
            .replacen('1', "l", 1)
            .replace('-', " ");
        assert_eq!(GiftCode::parse("code", &typed).unwrap(), c);
        let typed = c.display().replacen('1', "I", 1).replacen('0', "O", 1);
        assert_eq!(GiftCode::parse("code", &typed).unwrap(), c);
        assert_eq!(GiftCode::parse("code", &normalized).unwrap(), c);
        // The README's example.
        let example = GiftCode::parse("code", "7qkd 2m9v xh4t orbn 6").unwrap();
        assert_eq!(example.display(), "7QKD-2M9V-XH4T-0RBN-6");
    }

    #[test]
    fn every_single_wrong_character_is_caught_by_the_check() {
        for seed in 0..40 {
            let c = code(seed);
            let symbols: Vec<u8> = c.as_str().bytes().collect();
            for position in 0..CODE_CHARS {
                for &other in ALPHABET.iter() {
                    if other == symbols[position] {
                        continue;
                    }
                    let mut typed = symbols.clone();
                    typed[position] = other;
                    let typed = String::from_utf8(typed).unwrap();
                    let error = GiftCode::parse("code", &typed).unwrap_err();
                    assert_eq!(error.field, "code");
                    assert!(error.description.contains("mistyped"), "{error:?}");
                }
            }
        }
    }

    #[test]
    fn every_swap_of_two_neighbours_is_caught_by_the_check() {
        let mut swaps = 0;
        for seed in 0..200 {
            let symbols: Vec<u8> = code(seed).as_str().bytes().collect();
            for i in 0..CODE_CHARS - 1 {
                if symbols[i] == symbols[i + 1] {
                    continue;
                }
                let mut typed = symbols.clone();
                typed.swap(i, i + 1);
                let typed = String::from_utf8(typed).unwrap();
                let error = GiftCode::parse("code", &typed).unwrap_err();
                assert!(error.description.contains("mistyped"), "{typed}: {error:?}");
                swaps += 1;
            }
        }
        assert!(swaps > 2000);
    }

    #[test]
    fn the_quasigroup_is_a_latin_square_and_totally_anti_symmetric() {
        for a in 0..32u8 {
            let row: std::collections::HashSet<_> = (0..32).map(|b| damm_step(a, b)).collect();
            let column: std::collections::HashSet<_> = (0..32).map(|b| damm_step(b, a)).collect();
            assert_eq!((row.len(), column.len()), (32, 32));
        }
        for c in 0..32u8 {
            for a in 0..32u8 {
                for b in 0..32u8 {
                    if a != b {
                        assert_ne!(damm_step(damm_step(c, a), b), damm_step(damm_step(c, b), a));
                    }
                }
            }
        }
    }

    #[test]
    fn what_is_not_a_code_is_refused_naming_the_field() {
        for bad in [
            "",
            "---",
            "ABCD",
            "ABCD-EFGH-JKMN-PQRS-TV",
            "ABCD-EFGH-JKMN-PQRS-U",
            "ABCD_EFGH_JKMN_PQRS_T",
            "ÄBCD-EFGH-JKMN-PQRS-T",
            "ABCD\0EFGH",
            &"A".repeat(10_000),
        ] {
            let error = GiftCode::parse("code", bad).unwrap_err();
            assert_eq!(error.field, "code", "{bad:?}");
            assert!(!error.description.contains("mistyped"), "{bad:?}");
        }
    }

    #[test]
    fn first_purchase_fires_once_and_every_nth_on_multiples() {
        let first = Trigger::FirstPurchase;
        assert!(first.fires_on_purchase(1));
        for count in [0, 2, 3, 10, -1] {
            assert!(!first.fires_on_purchase(count), "{count}");
        }
        let third = Trigger::EveryNthPurchase(3);
        let fired: Vec<i64> = (0..=10).filter(|&c| third.fires_on_purchase(c)).collect();
        assert_eq!(fired, [3, 6, 9]);
        assert!(Trigger::EveryNthPurchase(1).fires_on_purchase(1));
        assert!(!Trigger::EveryNthPurchase(0).fires_on_purchase(5));
        assert!(!Trigger::EveryNthPurchase(1).fires_on_purchase(0));

        let rule = |id: &str, trigger, active| GiftRuleSpec {
            rule_id: id.into(),
            trigger,
            gift_id: "g".into(),
            delay_hours: 0,
            active,
        };
        let rules = [
            rule("come-back", first.clone(), true),
            rule("every-3", third, true),
            rule("off", first, false),
        ];
        let ids = |count| -> Vec<&str> {
            fired_rules(&rules, count)
                .iter()
                .map(|r| r.rule_id.as_str())
                .collect()
        };
        assert_eq!(ids(1), ["come-back"]);
        assert_eq!(ids(3), ["every-3"]);
        assert!(ids(4).is_empty());
    }

    #[test]
    fn triggers_round_trip_through_their_columns() {
        for trigger in [
            Trigger::FirstPurchase,
            Trigger::EveryNthPurchase(7),
            Trigger::TierUp("gold".into()),
        ] {
            let n = trigger.every_n().map(|n| n as i32);
            assert_eq!(
                Trigger::from_stored(trigger.as_str(), n, trigger.tier_id()),
                Some(trigger.clone())
            );
        }
        assert_eq!(Trigger::from_stored("birthday", None, None), None);
        assert_eq!(Trigger::from_stored("every_nth_purchase", None, None), None);
    }

    fn gift_input() -> GiftInput {
        GiftInput {
            gift_id: "free-coffee".into(),
            name: "Free coffee".into(),
            description: "Any size".into(),
            kind: Some(GiftKind::Item),
            points_price: Some(500),
            stock: Some(5),
            validity_days: 30,
            active: true,
        }
    }

    fn fields(invalid: Invalid) -> Vec<String> {
        invalid.0.into_iter().map(|v| v.field).collect()
    }

    #[test]
    fn a_valid_gift_parses_and_every_bad_field_is_named() {
        let spec = GiftSpec::parse(gift_input()).unwrap();
        assert_eq!(spec.gift_id, "free-coffee");
        let unlimited = GiftSpec::parse(GiftInput {
            points_price: None,
            stock: None,
            ..gift_input()
        })
        .unwrap();
        assert_eq!((unlimited.points_price, unlimited.stock), (None, None));
        let bad = GiftSpec::parse(GiftInput {
            gift_id: "x".repeat(65),
            name: "  ".into(),
            description: "a\u{7}b".into(),
            kind: None,
            points_price: Some(0),
            stock: Some(-1),
            validity_days: 0,
            active: true,
        })
        .unwrap_err();
        assert_eq!(
            fields(bad),
            [
                "gift.gift_id",
                "gift.name",
                "gift.description",
                "gift.kind",
                "gift.points_price",
                "gift.stock",
                "gift.validity_days"
            ]
        );
        let too_long = GiftSpec::parse(GiftInput {
            validity_days: 3651,
            ..gift_input()
        })
        .unwrap_err();
        assert_eq!(fields(too_long), ["gift.validity_days"]);
    }

    #[test]
    fn rules_need_a_trigger_and_n_only_for_every_nth() {
        let input = GiftRuleInput {
            rule_id: "come-back".into(),
            trigger: TriggerInput::FirstPurchase,
            every_n: 0,
            tier_id: String::new(),
            gift_id: "free-coffee".into(),
            delay_hours: 12,
            active: true,
        };
        assert_eq!(
            GiftRuleSpec::parse(input.clone()).unwrap().trigger,
            Trigger::FirstPurchase
        );
        let nth = GiftRuleSpec::parse(GiftRuleInput {
            trigger: TriggerInput::EveryNthPurchase,
            every_n: 10,
            ..input.clone()
        })
        .unwrap();
        assert_eq!(nth.trigger, Trigger::EveryNthPurchase(10));
        let bad = GiftRuleSpec::parse(GiftRuleInput {
            trigger: TriggerInput::EveryNthPurchase,
            every_n: 0,
            gift_id: String::new(),
            delay_hours: 9000,
            ..input.clone()
        })
        .unwrap_err();
        assert_eq!(
            fields(bad),
            ["rule.gift_id", "rule.every_n", "rule.delay_hours"]
        );
        let bad = GiftRuleSpec::parse(GiftRuleInput {
            trigger: TriggerInput::Unspecified,
            ..input.clone()
        })
        .unwrap_err();
        assert_eq!(fields(bad), ["rule.trigger"]);
        let bad = GiftRuleSpec::parse(GiftRuleInput {
            every_n: 3,
            ..input.clone()
        })
        .unwrap_err();
        assert_eq!(fields(bad), ["rule.every_n"]);
        let bad = GiftRuleSpec::parse(GiftRuleInput {
            rule_id: "xmas:2026".into(),
            ..input
        })
        .unwrap_err();
        assert_eq!(fields(bad), ["rule.rule_id"]);
    }

    fn at(hour: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 1, hour, 0, 0).unwrap()
    }

    fn grant(status: GrantStatus) -> Grant {
        Grant {
            code: code(1),
            gift_id: "g".into(),
            gift_name: "G".into(),
            gift_kind: GiftKind::Item,
            external_id: "card-1".into(),
            status,
            source: GrantSource::Manual,
            purchase_id: None,
            valid_from: at(10),
            valid_until: at(12),
            redeemed_at: None,
            redeemed_store_id: None,
            created_at: at(9),
        }
    }

    #[test]
    fn a_grant_is_redeemable_only_inside_its_window_and_only_while_issued() {
        let issued = grant(GrantStatus::Issued);
        assert!(issued.refusal_at(at(9)).unwrap().contains("not valid yet"));
        assert_eq!(issued.refusal_at(at(10)), None);
        assert_eq!(issued.refusal_at(at(11)), None);
        assert_eq!(issued.status_at(at(11)), GrantStatus::Issued);
        // The window is half open: at valid_until it has expired.
        assert_eq!(issued.status_at(at(12)), GrantStatus::Expired);
        assert!(issued.refusal_at(at(12)).unwrap().contains("expired"));
        assert!(
            grant(GrantStatus::Redeemed)
                .refusal_at(at(11))
                .unwrap()
                .contains("redeemed")
        );
        assert!(
            grant(GrantStatus::Revoked)
                .refusal_at(at(11))
                .unwrap()
                .contains("revoked")
        );
        // Redeemed and revoked grants stay so after the window.
        assert_eq!(
            grant(GrantStatus::Redeemed).status_at(at(20)),
            GrantStatus::Redeemed
        );
    }

    #[test]
    fn windows_start_after_the_delay() {
        let (from, until) = grant_window(at(1), 12, 2);
        assert_eq!(from, at(13));
        assert_eq!(until, at(13) + Duration::days(2));
    }

    #[test]
    fn fingerprints_tell_content_apart() {
        let a = redemption_fingerprint(&code(1), "store-1");
        assert_eq!(a, redemption_fingerprint(&code(1), "store-1"));
        assert_ne!(a, redemption_fingerprint(&code(2), "store-1"));
        assert_ne!(a, redemption_fingerprint(&code(1), ""));
    }

    #[test]
    fn page_tokens_round_trip_and_garbage_is_refused() {
        let page = CatalogPage::parse(0, &CatalogPage::token_after("free-coffee")).unwrap();
        assert_eq!(page.size, DEFAULT_PAGE_SIZE);
        assert_eq!(page.after_gift_id.as_deref(), Some("free-coffee"));
        let g = grant(GrantStatus::Issued);
        let page = GrantsPage::parse(500, &GrantsPage::token_after(&g)).unwrap();
        assert_eq!(page.size, MAX_PAGE_SIZE);
        assert_eq!(
            page.before,
            Some((g.created_at, g.code.as_str().to_string()))
        );
        for bad in ["x", "!!", &URL_SAFE_NO_PAD.encode("grants.v1.5.ABC")] {
            assert_eq!(
                fields(GrantsPage::parse(1, bad).unwrap_err()),
                ["page_token"]
            );
            assert_eq!(
                fields(CatalogPage::parse(1, bad).unwrap_err()),
                ["page_token"]
            );
        }
        assert_eq!(
            fields(CatalogPage::parse(-1, "").unwrap_err()),
            ["page_size"]
        );
    }
}
