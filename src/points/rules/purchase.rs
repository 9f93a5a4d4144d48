//! A receipt as the till sends it: validated once, then earned and stored.

use chrono::{DateTime, Duration, TimeZone, Utc};
use sha2::{Digest, Sha256};

use crate::platform::money::{self, Currency};
use crate::platform::validation::Invalid;
use crate::platform::validation::{self, Violations};
use crate::programs::rules as program;

pub const MAX_LINES: usize = 500;
pub const MAX_QUANTITY: u32 = 1_000_000;
/// How far a till's clock may run ahead of ours.
pub const MAX_CLOCK_SKEW: Duration = Duration::minutes(5);

/// Receipts from before this instant are refused as a sure sign of a broken till clock.
pub fn earliest_occurred_at() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 0)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub sku: String,
    pub category: String,
    pub quantity: u32,
    pub amount_minor: i64,
}

/// What earns points: money, lines and the moment of purchase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Basket {
    pub currency: Currency,
    pub total_minor: i64,
    /// May be empty: the whole total then earns at the base rate.
    pub lines: Vec<Line>,
    /// Truncated to microseconds, the precision Postgres stores.
    pub occurred_at: DateTime<Utc>,
}

/// A validated `RecordPurchase` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Purchase {
    pub external_id: String,
    pub purchase_id: String,
    pub store_id: String,
    pub basket: Basket,
}

#[derive(Debug, Clone, Default)]
pub struct LineInput {
    pub sku: String,
    pub category: String,
    pub quantity: u32,
    pub amount_minor: i64,
}

#[derive(Debug, Clone, Default)]
pub struct PurchaseInput {
    pub external_id: String,
    pub purchase_id: String,
    pub store_id: String,
    pub occurred_at: Option<DateTime<Utc>>,
    pub currency: String,
    pub total_minor: i64,
    pub lines: Vec<LineInput>,
}

/// A validated `QuotePurchase` request: the basket, and the customer when the till knows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quote {
    pub external_id: Option<String>,
    pub basket: Basket,
}

impl Purchase {
    pub fn parse(input: PurchaseInput, now: DateTime<Utc>) -> Result<Purchase, Invalid> {
        let mut v = Violations::default();
        let external_id = v.check(validation::identifier("external_id", &input.external_id));
        let purchase_id = v.check(validation::identifier("purchase_id", &input.purchase_id));
        let store_id = v.check(validation::identifier("store_id", &input.store_id));
        if input.occurred_at.is_none() {
            v.add("occurred_at", "is required");
        }
        let basket = parse_basket(
            &mut v,
            input.occurred_at.unwrap_or(now),
            &input.currency,
            input.total_minor,
            &input.lines,
            now,
        );
        match (external_id, purchase_id, store_id, basket) {
            (Some(external_id), Some(purchase_id), Some(store_id), Some(basket))
                if v.is_empty() =>
            {
                Ok(Purchase {
                    external_id,
                    purchase_id,
                    store_id,
                    basket,
                })
            }
            _ => Err(v.into_error()),
        }
    }

    /// A digest of everything the request says, so that a retry can be told apart from a
    /// different receipt reusing the same `purchase_id`. Fields are length-prefixed so that
    /// no two different requests share an encoding.
    pub fn fingerprint(&self) -> [u8; 32] {
        let mut hash = Sha256::new();
        let mut text = |s: &str| {
            hash.update((s.len() as u64).to_be_bytes());
            hash.update(s.as_bytes());
        };
        text("purchase/v1");
        text(&self.external_id);
        text(&self.purchase_id);
        text(&self.store_id);
        text(self.basket.currency.code());
        for line in &self.basket.lines {
            text(&line.sku);
            text(&line.category);
        }
        hash.update(self.basket.occurred_at.timestamp_micros().to_be_bytes());
        hash.update(self.basket.total_minor.to_be_bytes());
        hash.update((self.basket.lines.len() as u64).to_be_bytes());
        for line in &self.basket.lines {
            hash.update(line.quantity.to_be_bytes());
            hash.update(line.amount_minor.to_be_bytes());
        }
        hash.finalize().into()
    }
}

impl Quote {
    /// `occurred_at` defaults to `now`; the customer and store are optional.
    pub fn parse(
        external_id: &str,
        store_id: &str,
        occurred_at: Option<DateTime<Utc>>,
        currency: &str,
        total_minor: i64,
        lines: &[LineInput],
        now: DateTime<Utc>,
    ) -> Result<Quote, Invalid> {
        let mut v = Violations::default();
        let external_id = if external_id.is_empty() {
            Some(None)
        } else {
            v.check(validation::identifier("external_id", external_id))
                .map(Some)
        };
        if !store_id.is_empty() {
            v.check(validation::identifier("store_id", store_id));
        }
        let basket = parse_basket(
            &mut v,
            occurred_at.unwrap_or(now),
            currency,
            total_minor,
            lines,
            now,
        );
        match (external_id, basket) {
            (Some(external_id), Some(basket)) if v.is_empty() => Ok(Quote {
                external_id,
                basket,
            }),
            _ => Err(v.into_error()),
        }
    }
}

fn parse_basket(
    v: &mut Violations,
    occurred_at: DateTime<Utc>,
    currency: &str,
    total_minor: i64,
    lines: &[LineInput],
    now: DateTime<Utc>,
) -> Option<Basket> {
    let currency = v.check(Currency::parse("currency", currency));
    let total = v.check(money::amount("total_minor", total_minor));

    if occurred_at > now + MAX_CLOCK_SKEW {
        v.add("occurred_at", "must not be in the future");
    } else if occurred_at < earliest_occurred_at() {
        v.add("occurred_at", "must not be before 2000-01-01");
    }
    // Postgres keeps microseconds; truncating here makes a retry compare equal to what we stored.
    let Some(occurred_at) = DateTime::from_timestamp_micros(occurred_at.timestamp_micros()) else {
        v.add("occurred_at", "is out of range");
        return None;
    };

    if lines.len() > MAX_LINES {
        // Validating thousands of lines one by one would only make the error longer.
        v.add(
            "lines",
            format!("at most {MAX_LINES} lines, got {}", lines.len()),
        );
        return None;
    }
    let mut parsed = Vec::with_capacity(lines.len());
    let mut sum: i128 = 0;
    for (i, line) in lines.iter().enumerate() {
        let sku = v.check(validation::identifier(
            &format!("lines[{i}].sku"),
            &line.sku,
        ));
        let category = v.check(program::category(
            &format!("lines[{i}].category"),
            &line.category,
        ));
        if line.quantity == 0 || line.quantity > MAX_QUANTITY {
            v.add(
                format!("lines[{i}].quantity"),
                format!("must be between 1 and {MAX_QUANTITY}"),
            );
        }
        let amount = v.check(money::amount(
            &format!("lines[{i}].amount_minor"),
            line.amount_minor,
        ));
        sum += i128::from(line.amount_minor);
        if let (Some(sku), Some(category), Some(amount_minor)) = (sku, category, amount) {
            parsed.push(Line {
                sku,
                category,
                quantity: line.quantity,
                amount_minor,
            });
        }
    }
    if let Some(total) = total
        && !lines.is_empty()
        && sum != i128::from(total)
    {
        v.add(
            "total_minor",
            format!("must equal the sum of the line amounts ({sum})"),
        );
    }
    match (currency, total) {
        (Some(currency), Some(total_minor)) if v.is_empty() => Some(Basket {
            currency,
            total_minor,
            lines: parsed,
            occurred_at,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 24, 12, 0, 0).unwrap()
    }

    fn line(sku: &str, amount_minor: i64) -> LineInput {
        LineInput {
            sku: sku.into(),
            category: "coffee".into(),
            quantity: 1,
            amount_minor,
        }
    }

    fn input() -> PurchaseInput {
        PurchaseInput {
            external_id: "card-1".into(),
            purchase_id: "r-1".into(),
            store_id: "s-1".into(),
            occurred_at: Some(now()),
            currency: "EUR".into(),
            total_minor: 450,
            lines: vec![line("espresso", 250), line("croissant", 200)],
        }
    }

    fn fields(result: Result<Purchase, Invalid>) -> Vec<String> {
        match result {
            Err(Invalid(v)) => v.into_iter().map(|v| v.field).collect(),
            other => panic!("expected violations, got {other:?}"),
        }
    }

    #[test]
    fn valid_purchase_parses() {
        let purchase = Purchase::parse(input(), now()).unwrap();
        assert_eq!(purchase.basket.total_minor, 450);
        assert_eq!(purchase.basket.lines.len(), 2);
    }

    #[test]
    fn a_purchase_without_lines_is_accepted() {
        let purchase = Purchase::parse(
            PurchaseInput {
                lines: vec![],
                ..input()
            },
            now(),
        )
        .unwrap();
        assert!(purchase.basket.lines.is_empty());
    }

    #[test]
    fn every_field_rule() {
        let cases: Vec<(PurchaseInput, &str)> = vec![
            (
                PurchaseInput {
                    external_id: "".into(),
                    ..input()
                },
                "external_id",
            ),
            (
                PurchaseInput {
                    external_id: "x".repeat(129),
                    ..input()
                },
                "external_id",
            ),
            (
                PurchaseInput {
                    purchase_id: "".into(),
                    ..input()
                },
                "purchase_id",
            ),
            (
                PurchaseInput {
                    store_id: "".into(),
                    ..input()
                },
                "store_id",
            ),
            (
                PurchaseInput {
                    occurred_at: None,
                    ..input()
                },
                "occurred_at",
            ),
            (
                PurchaseInput {
                    occurred_at: Some(now() + Duration::minutes(6)),
                    ..input()
                },
                "occurred_at",
            ),
            (
                PurchaseInput {
                    occurred_at: Some(Utc.with_ymd_and_hms(1999, 1, 1, 0, 0, 0).unwrap()),
                    ..input()
                },
                "occurred_at",
            ),
            (
                PurchaseInput {
                    currency: "".into(),
                    ..input()
                },
                "currency",
            ),
            (
                PurchaseInput {
                    currency: "ABC".into(),
                    ..input()
                },
                "currency",
            ),
            (
                PurchaseInput {
                    total_minor: -1,
                    ..input()
                },
                "total_minor",
            ),
            (
                PurchaseInput {
                    total_minor: 451,
                    ..input()
                },
                "total_minor",
            ),
            (
                PurchaseInput {
                    total_minor: i64::MAX,
                    lines: vec![],
                    ..input()
                },
                "total_minor",
            ),
            (
                PurchaseInput {
                    lines: vec![line("", 450)],
                    ..input()
                },
                "lines[0].sku",
            ),
            (
                PurchaseInput {
                    lines: vec![
                        line("a", 250),
                        LineInput {
                            quantity: 0,
                            ..line("b", 200)
                        },
                    ],
                    ..input()
                },
                "lines[1].quantity",
            ),
            (
                PurchaseInput {
                    lines: vec![line("a", 650), line("b", -200)],
                    ..input()
                },
                "lines[1].amount_minor",
            ),
            (
                PurchaseInput {
                    lines: vec![LineInput {
                        category: "c".repeat(65),
                        ..line("a", 450)
                    }],
                    ..input()
                },
                "lines[0].category",
            ),
            (
                PurchaseInput {
                    lines: vec![line("a", 1); MAX_LINES + 1],
                    total_minor: 501,
                    ..input()
                },
                "lines",
            ),
        ];
        for (case, field) in cases {
            let got = fields(Purchase::parse(case.clone(), now()));
            assert!(
                got.iter().any(|f| f == field),
                "expected {field} in {got:?} for {case:?}"
            );
        }
    }

    #[test]
    fn overflowing_line_sums_are_refused_not_wrapped() {
        let lines = vec![line("a", i64::MAX), line("b", i64::MAX)];
        let got = fields(Purchase::parse(
            PurchaseInput {
                total_minor: -2,
                lines,
                ..input()
            },
            now(),
        ));
        assert!(
            got.contains(&"lines[0].amount_minor".to_string()),
            "{got:?}"
        );
    }

    #[test]
    fn fingerprint_tells_content_apart() {
        let base = Purchase::parse(input(), now()).unwrap();
        assert_eq!(
            base.fingerprint(),
            Purchase::parse(input(), now()).unwrap().fingerprint()
        );
        let variants = [
            PurchaseInput {
                store_id: "s-2".into(),
                ..input()
            },
            PurchaseInput {
                external_id: "card-2".into(),
                ..input()
            },
            PurchaseInput {
                occurred_at: Some(now() - Duration::seconds(1)),
                ..input()
            },
            PurchaseInput {
                lines: vec![line("espresso", 200), line("croissant", 250)],
                ..input()
            },
            PurchaseInput {
                lines: vec![],
                ..input()
            },
        ];
        for variant in variants {
            let other = Purchase::parse(variant.clone(), now()).unwrap();
            assert_ne!(base.fingerprint(), other.fingerprint(), "{variant:?}");
        }
    }

    #[test]
    fn nanoseconds_are_truncated_to_what_postgres_keeps() {
        let with_nanos = now() + Duration::nanoseconds(1_500);
        let purchase = Purchase::parse(
            PurchaseInput {
                occurred_at: Some(with_nanos),
                ..input()
            },
            now(),
        )
        .unwrap();
        assert_eq!(
            purchase.basket.occurred_at,
            now() + Duration::microseconds(1)
        );
    }

    #[test]
    fn quote_customer_and_store_are_optional() {
        let quote = Quote::parse("", "", None, "EUR", 100, &[], now()).unwrap();
        assert_eq!(quote.external_id, None);
        assert_eq!(quote.basket.occurred_at, now());
        assert!(Quote::parse(" x", "", None, "EUR", 100, &[], now()).is_err());
    }
}
