//! The lifecycle requests as validated values: redemptions, holds, returns and adjustments.
//! Each parses into a domain value or every violation with its field, and has a fingerprint
//! of its content, so a retry is told apart from another request under the same key.

use chrono::Duration;
use sha2::{Digest, Sha256};

use crate::platform::validation::{self, Invalid, Violations};

/// The most points one request may move (the most one purchase may earn).
pub const MAX_POINTS: i64 = crate::points::rules::earn::MAX_POINTS_PER_PURCHASE;
pub const DEFAULT_HOLD: Duration = Duration::minutes(15);
pub const MAX_HOLD_SECONDS: u32 = 86_400;
pub const MAX_REASON_CHARS: usize = 500;

/// Hashes the fields of a request, each length-prefixed so no two contents collide.
fn fingerprint(kind: &str, texts: &[&str], numbers: &[i64]) -> [u8; 32] {
    let mut hash = Sha256::new();
    for text in std::iter::once(&kind).chain(texts) {
        hash.update((text.len() as u64).to_be_bytes());
        hash.update(text.as_bytes());
    }
    for n in numbers {
        hash.update(n.to_be_bytes());
    }
    hash.finalize().into()
}

fn points(v: &mut Violations, field: &str, value: i64) {
    if value <= 0 {
        v.add(field, "must be positive");
    } else if value > MAX_POINTS {
        v.add(field, format!("must be at most {MAX_POINTS}"));
    }
}

/// An optional purchase id: empty means none.
fn optional_id(v: &mut Violations, field: &str, value: &str) -> Option<String> {
    if value.is_empty() {
        return None;
    }
    v.check(validation::identifier(field, value))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redemption {
    pub external_id: String,
    pub redemption_id: String,
    pub points: i64,
    pub purchase_id: Option<String>,
}

impl Redemption {
    pub fn parse(
        external_id: &str,
        redemption_id: &str,
        points_: i64,
        purchase_id: &str,
    ) -> Result<Redemption, Invalid> {
        let mut v = Violations::default();
        let external_id = v.check(validation::identifier("external_id", external_id));
        let redemption_id = v.check(validation::identifier("redemption_id", redemption_id));
        points(&mut v, "points", points_);
        let purchase_id = optional_id(&mut v, "purchase_id", purchase_id);
        match (external_id, redemption_id) {
            (Some(external_id), Some(redemption_id)) if v.is_empty() => Ok(Redemption {
                external_id,
                redemption_id,
                points: points_,
                purchase_id,
            }),
            _ => Err(v.into_error()),
        }
    }

    pub fn fingerprint(&self) -> [u8; 32] {
        fingerprint(
            "redemption/v1",
            &[
                &self.external_id,
                &self.redemption_id,
                self.purchase_id.as_deref().unwrap_or(""),
            ],
            &[self.points],
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub external_id: String,
    pub reservation_id: String,
    pub points: i64,
    pub ttl: Duration,
    pub purchase_id: Option<String>,
}

impl Hold {
    pub fn parse(
        external_id: &str,
        reservation_id: &str,
        points_: i64,
        ttl_seconds: u32,
        purchase_id: &str,
    ) -> Result<Hold, Invalid> {
        let mut v = Violations::default();
        let external_id = v.check(validation::identifier("external_id", external_id));
        let reservation_id = v.check(validation::identifier("reservation_id", reservation_id));
        points(&mut v, "points", points_);
        let ttl = match ttl_seconds {
            0 => DEFAULT_HOLD,
            s if s > MAX_HOLD_SECONDS => {
                v.add(
                    "ttl_seconds",
                    format!("must be at most {MAX_HOLD_SECONDS} (24 hours)"),
                );
                DEFAULT_HOLD
            }
            s => Duration::seconds(i64::from(s)),
        };
        let purchase_id = optional_id(&mut v, "purchase_id", purchase_id);
        match (external_id, reservation_id) {
            (Some(external_id), Some(reservation_id)) if v.is_empty() => Ok(Hold {
                external_id,
                reservation_id,
                points: points_,
                ttl,
                purchase_id,
            }),
            _ => Err(v.into_error()),
        }
    }

    pub fn fingerprint(&self) -> [u8; 32] {
        fingerprint(
            "hold/v1",
            &[
                &self.external_id,
                &self.reservation_id,
                self.purchase_id.as_deref().unwrap_or(""),
            ],
            &[self.points, self.ttl.num_seconds()],
        )
    }
}

/// What comes back: given lines (1-based numbers, amounts) or an amount to spread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Returned {
    Lines(Vec<(u32, i64)>),
    Amount(i64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReturnRequest {
    pub purchase_id: String,
    pub return_id: String,
    pub returned: Returned,
}

impl ReturnRequest {
    pub fn parse(
        purchase_id: &str,
        return_id: &str,
        lines: &[(u32, i64)],
        amount_minor: i64,
    ) -> Result<ReturnRequest, Invalid> {
        let mut v = Violations::default();
        let purchase_id = v.check(validation::identifier("purchase_id", purchase_id));
        let return_id = v.check(validation::identifier("return_id", return_id));
        let returned = match (lines.is_empty(), amount_minor) {
            (true, 0) => {
                v.add("lines", "give the returned lines or amount_minor");
                None
            }
            (false, a) if a != 0 => {
                v.add(
                    "amount_minor",
                    "give either lines or amount_minor, not both",
                );
                None
            }
            (true, a) => {
                if a < 0 {
                    v.add("amount_minor", "must be positive");
                }
                Some(Returned::Amount(a))
            }
            (false, _) => {
                let mut seen = std::collections::HashSet::new();
                for (i, (line_no, amount)) in lines.iter().enumerate() {
                    if *line_no == 0 {
                        v.add(format!("lines[{i}].line_no"), "must be at least 1");
                    } else if !seen.insert(*line_no) {
                        v.add(format!("lines[{i}].line_no"), "is listed twice");
                    }
                    if *amount <= 0 {
                        v.add(format!("lines[{i}].amount_minor"), "must be positive");
                    }
                }
                if lines.len() > crate::points::rules::purchase::MAX_LINES {
                    v.add("lines", "at most 500 entries");
                }
                Some(Returned::Lines(lines.to_vec()))
            }
        };
        match (purchase_id, return_id, returned) {
            (Some(purchase_id), Some(return_id), Some(returned)) if v.is_empty() => {
                Ok(ReturnRequest {
                    purchase_id,
                    return_id,
                    returned,
                })
            }
            _ => Err(v.into_error()),
        }
    }

    pub fn fingerprint(&self) -> [u8; 32] {
        let numbers: Vec<i64> = match &self.returned {
            Returned::Amount(a) => vec![0, *a],
            Returned::Lines(lines) => std::iter::once(1)
                .chain(lines.iter().flat_map(|(n, a)| [i64::from(*n), *a]))
                .collect(),
        };
        fingerprint("return/v1", &[&self.purchase_id, &self.return_id], &numbers)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adjustment {
    pub external_id: String,
    pub adjustment_key: String,
    /// Non-zero: positive adds, negative removes.
    pub points: i64,
    pub reason: String,
}

impl Adjustment {
    pub fn parse(
        external_id: &str,
        adjustment_key: &str,
        points_: i64,
        reason: &str,
    ) -> Result<Adjustment, Invalid> {
        let mut v = Violations::default();
        let external_id = v.check(validation::identifier("external_id", external_id));
        let adjustment_key = v.check(validation::identifier("adjustment_key", adjustment_key));
        if points_ == 0 {
            v.add("points", "must not be zero");
        } else if points_.unsigned_abs() > MAX_POINTS as u64 {
            v.add(
                "points",
                format!("must be between -{MAX_POINTS} and {MAX_POINTS}"),
            );
        }
        let reason_text = reason.trim();
        if reason_text.is_empty() {
            v.add("reason", "is required");
        } else if reason_text.chars().count() > MAX_REASON_CHARS {
            v.add(
                "reason",
                format!("must be at most {MAX_REASON_CHARS} characters"),
            );
        } else if reason_text.chars().any(char::is_control) {
            v.add("reason", "must not contain control characters");
        }
        match (external_id, adjustment_key) {
            (Some(external_id), Some(adjustment_key)) if v.is_empty() => Ok(Adjustment {
                external_id,
                adjustment_key,
                points: points_,
                reason: reason_text.to_string(),
            }),
            _ => Err(v.into_error()),
        }
    }

    pub fn fingerprint(&self) -> [u8; 32] {
        fingerprint(
            "adjustment/v1",
            &[&self.external_id, &self.adjustment_key, &self.reason],
            &[self.points],
        )
    }
}

/// A gift claimed with points (`MemberService.ClaimGift`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub external_id: String,
    pub gift_id: String,
    pub claim_key: String,
}

impl Claim {
    pub fn parse(external_id: &str, gift_id: &str, claim_key: &str) -> Result<Claim, Invalid> {
        let mut v = Violations::default();
        let external_id = v.check(validation::identifier("external_id", external_id));
        let gift_id = v.check(crate::gifts::rules::gift_id("gift_id", gift_id));
        let claim_key = v.check(validation::identifier("claim_key", claim_key));
        match (external_id, gift_id, claim_key) {
            (Some(external_id), Some(gift_id), Some(claim_key)) => Ok(Claim {
                external_id,
                gift_id,
                claim_key,
            }),
            _ => Err(v.into_error()),
        }
    }

    pub fn fingerprint(&self) -> [u8; 32] {
        fingerprint(
            "claim/v1",
            &[&self.external_id, &self.gift_id, &self.claim_key],
            &[],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(result: Result<impl std::fmt::Debug, Invalid>) -> Vec<String> {
        match result {
            Err(Invalid(v)) => v.into_iter().map(|v| v.field).collect(),
            Ok(ok) => panic!("expected violations, got {ok:?}"),
        }
    }

    #[test]
    fn bad_requests_name_every_field() {
        assert_eq!(
            fields(Redemption::parse("", " r", 0, "\u{7}")),
            ["external_id", "redemption_id", "points", "purchase_id"]
        );
        assert_eq!(
            fields(Hold::parse("c", "h", MAX_POINTS + 1, 86_401, "")),
            ["points", "ttl_seconds"]
        );
        assert_eq!(fields(ReturnRequest::parse("p", "r", &[], 0)), ["lines"]);
        assert_eq!(
            fields(ReturnRequest::parse("p", "r", &[(1, 5)], 5)),
            ["amount_minor"]
        );
        assert_eq!(
            fields(ReturnRequest::parse("p", "r", &[(0, 5), (2, 0), (2, 1)], 0)),
            [
                "lines[0].line_no",
                "lines[1].amount_minor",
                "lines[2].line_no"
            ]
        );
        assert_eq!(
            fields(ReturnRequest::parse("p", "r", &[], -3)),
            ["amount_minor"]
        );
        assert_eq!(
            fields(Adjustment::parse("c", "k", 0, "  ")),
            ["points", "reason"]
        );
        assert_eq!(
            fields(Adjustment::parse("c", "k", i64::MIN, &"x".repeat(501))),
            ["points", "reason"]
        );
    }

    #[test]
    fn holds_default_to_a_quarter_hour_and_fingerprints_tell_content_apart() {
        let hold = Hold::parse("c", "h", 10, 0, "").unwrap();
        assert_eq!(hold.ttl, DEFAULT_HOLD);
        let longer = Hold::parse("c", "h", 10, 60, "").unwrap();
        assert_ne!(hold.fingerprint(), longer.fingerprint());
        let a = Redemption::parse("c", "r", 10, "").unwrap();
        let b = Redemption::parse("c", "r", 10, "p-1").unwrap();
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(
            a.fingerprint(),
            Redemption::parse("c", "r", 10, "").unwrap().fingerprint()
        );
        let lines = ReturnRequest::parse("p", "r", &[(1, 5)], 0).unwrap();
        let amount = ReturnRequest::parse("p", "r", &[], 5).unwrap();
        assert_ne!(lines.fingerprint(), amount.fingerprint());
        let add = Adjustment::parse("c", "k", 5, "goodwill").unwrap();
        let remove = Adjustment::parse("c", "k", -5, "goodwill").unwrap();
        assert_ne!(add.fingerprint(), remove.fingerprint());
    }
}
