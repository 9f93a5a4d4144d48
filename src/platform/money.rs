//! Money is an integer count of minor units plus an ISO 4217 code. No floats, anywhere.

use std::fmt;

use crate::platform::validation::Violation;

/// Largest purchase total we accept, in minor units (10^14: a trillion euros in cents).
/// Bounding it keeps every points computation exact in 128-bit integers.
pub const MAX_AMOUNT_MINOR: i64 = 100_000_000_000_000;

/// An active ISO 4217 currency that has minor units (funds and metals such as XAU are refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Currency {
    code: iso_currency::Currency,
    exponent: u32,
}

impl Currency {
    pub fn parse(field: &str, code: &str) -> Result<Currency, Violation> {
        if code.is_empty() {
            return Err(Violation::new(field, "must not be empty"));
        }
        let Some(currency) = iso_currency::Currency::from_code(code) else {
            // The input is not echoed: it may be arbitrarily long.
            return Err(Violation::new(field, "is not an ISO 4217 currency code"));
        };
        let Some(exponent) = currency.exponent().filter(|_| !currency.is_fund()) else {
            return Err(Violation::new(
                field,
                format!("{code} is not a spendable currency"),
            ));
        };
        Ok(Currency {
            code: currency,
            exponent: u32::from(exponent),
        })
    }

    pub fn code(&self) -> &'static str {
        self.code.code()
    }

    /// Minor units per whole unit: 100 for EUR, 1 for JPY, 1000 for BHD.
    pub fn minor_per_unit(&self) -> i128 {
        10_i128.pow(self.exponent)
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A non-negative amount in minor units, at most [`MAX_AMOUNT_MINOR`].
pub fn amount(field: &str, value: i64) -> Result<i64, Violation> {
    if value < 0 {
        return Err(Violation::new(field, "must not be negative"));
    }
    if value > MAX_AMOUNT_MINOR {
        return Err(Violation::new(
            field,
            format!("must be at most {MAX_AMOUNT_MINOR}"),
        ));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn currencies_know_their_minor_units() {
        assert_eq!(Currency::parse("c", "EUR").unwrap().minor_per_unit(), 100);
        assert_eq!(Currency::parse("c", "JPY").unwrap().minor_per_unit(), 1);
        assert_eq!(Currency::parse("c", "BHD").unwrap().minor_per_unit(), 1000);
        assert_eq!(Currency::parse("c", "EUR").unwrap().code(), "EUR");
    }

    #[test]
    fn unknown_or_unitless_currencies_are_refused() {
        for bad in ["", "eur", "EURO", "XXX", "ZZZ", "XAU"] {
            assert_eq!(
                Currency::parse("currency", bad).unwrap_err().field,
                "currency",
                "{bad}"
            );
        }
    }

    #[test]
    fn amounts_are_bounded() {
        assert_eq!(amount("a", 0), Ok(0));
        assert_eq!(amount("a", MAX_AMOUNT_MINOR), Ok(MAX_AMOUNT_MINOR));
        assert!(amount("a", -1).is_err());
        assert!(amount("a", MAX_AMOUNT_MINOR + 1).is_err());
        assert!(amount("a", i64::MAX).is_err());
    }
}
