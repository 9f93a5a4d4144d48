//! A member's profile: who they are, when their birthday is, where they live (time zone) and
//! how they may be contacted. Contact data is personal: it never appears in logs (see the
//! redacting `Debug` impls).

use std::fmt;

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use chrono_tz::Tz;

use crate::platform::validation::Invalid;
use crate::platform::validation::{self, Violation, Violations};

pub const MAX_NAME_CHARS: usize = 200;
pub const MAX_EMAIL_CHARS: usize = 254;
pub const EARLIEST_BIRTH_YEAR: i32 = 1900;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Birthday {
    pub month: u32,
    pub day: u32,
    pub year: Option<i32>,
}

impl Birthday {
    /// A real calendar date: February 29 only without a year or in a leap year, and not in
    /// the future.
    pub fn parse(
        month: u32,
        day: u32,
        year: Option<u32>,
        today: NaiveDate,
    ) -> Result<Birthday, Violation> {
        if !(1..=12).contains(&month) {
            return Err(Violation::new("birthday.month", "must be between 1 and 12"));
        }
        let year = match year {
            None => None,
            Some(y) => {
                let y = i32::try_from(y).unwrap_or(i32::MAX);
                if y < EARLIEST_BIRTH_YEAR || y > today.year() {
                    return Err(Violation::new(
                        "birthday.year",
                        format!("must be between {EARLIEST_BIRTH_YEAR} and {}", today.year()),
                    ));
                }
                Some(y)
            }
        };
        // 2024 is a leap year, so a year-less February 29 is accepted.
        let Some(date) = NaiveDate::from_ymd_opt(year.unwrap_or(2024), month, day) else {
            return Err(Violation::new(
                "birthday.day",
                format!("{month}/{day} is not a date"),
            ));
        };
        if year.is_some() && date > today {
            return Err(Violation::new("birthday", "must not be in the future"));
        }
        Ok(Birthday { month, day, year })
    }
}

/// Personal data of one customer. `Debug` is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct Profile {
    pub display_name: String,
    pub birthday: Option<Birthday>,
    pub time_zone: Tz,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub marketing_consent: bool,
}

impl fmt::Debug for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Profile")
            .field("time_zone", &self.time_zone)
            .field("marketing_consent", &self.marketing_consent)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Default)]
pub struct BirthdayInput {
    pub month: u32,
    pub day: u32,
    pub year: Option<u32>,
}

/// A stored customer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Customer {
    pub external_id: String,
    pub profile: Profile,
    pub enrolled_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// An `EnrollCustomer` request as the caller sent it.
#[derive(Clone, Default)]
pub struct EnrollmentInput {
    pub external_id: String,
    pub display_name: String,
    pub birthday: Option<BirthdayInput>,
    pub time_zone: String,
    pub email: String,
    pub phone: String,
    pub marketing_consent: bool,
}

/// A validated `EnrollCustomer` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrollment {
    pub external_id: String,
    pub profile: Profile,
}

impl Enrollment {
    pub fn parse(input: EnrollmentInput, now: DateTime<Utc>) -> Result<Enrollment, Invalid> {
        let mut v = Violations::default();
        let external_id = v.check(validation::identifier("external_id", &input.external_id));
        let display_name = v.check(validation::text(
            "display_name",
            &input.display_name,
            MAX_NAME_CHARS,
        ));
        let birthday = match input.birthday {
            None => Some(None),
            Some(b) => v
                .check(Birthday::parse(b.month, b.day, b.year, now.date_naive()))
                .map(Some),
        };
        let time_zone = v.check(time_zone("time_zone", &input.time_zone));
        let email = v.check(email("email", &input.email));
        let phone = v.check(phone("phone", &input.phone));
        match (external_id, display_name, birthday, time_zone, email, phone) {
            (
                Some(external_id),
                Some(display_name),
                Some(birthday),
                Some(time_zone),
                Some(email),
                Some(phone),
            ) if v.is_empty() => Ok(Enrollment {
                external_id,
                profile: Profile {
                    display_name,
                    birthday,
                    time_zone,
                    email,
                    phone,
                    marketing_consent: input.marketing_consent,
                },
            }),
            _ => Err(v.into_error()),
        }
    }
}

/// An IANA time zone name; empty means UTC.
pub fn time_zone(field: &str, value: &str) -> Result<Tz, Violation> {
    if value.is_empty() {
        return Ok(Tz::UTC);
    }
    value.parse::<Tz>().map_err(|_| {
        Violation::new(
            field,
            "must be an IANA time zone name such as Europe/Berlin",
        )
    })
}

/// A plausible e-mail address (one `@`, a dotted domain, no spaces); empty means none.
/// Whether it really receives mail is for the sender to find out.
pub fn email(field: &str, value: &str) -> Result<Option<String>, Violation> {
    if value.is_empty() {
        return Ok(None);
    }
    let invalid = || Violation::new(field, "must be an e-mail address such as name@example.com");
    if value.chars().count() > MAX_EMAIL_CHARS {
        return Err(Violation::new(
            field,
            format!("must be at most {MAX_EMAIL_CHARS} characters"),
        ));
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid());
    }
    let (local, domain) = value.split_once('@').ok_or_else(invalid)?;
    if local.is_empty()
        || domain.contains('@')
        || !domain.contains('.')
        || domain.starts_with('.')
        || domain.ends_with('.')
    {
        return Err(invalid());
    }
    Ok(Some(value.to_string()))
}

/// An E.164 phone number (`+` then 8 to 15 digits, no leading zero); empty means none.
pub fn phone(field: &str, value: &str) -> Result<Option<String>, Violation> {
    if value.is_empty() {
        return Ok(None);
    }
    let digits = value.strip_prefix('+').unwrap_or("");
    let valid = (8..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0');
    if valid {
        Ok(Some(value.to_string()))
    } else {
        Err(Violation::new(
            field,
            "must be in E.164 format such as +4915112345678",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 24, 12, 0, 0).unwrap()
    }

    fn today() -> NaiveDate {
        now().date_naive()
    }

    #[test]
    fn birthdays() {
        assert!(Birthday::parse(2, 29, None, today()).is_ok());
        assert!(Birthday::parse(2, 29, Some(2000), today()).is_ok());
        assert_eq!(
            Birthday::parse(2, 29, Some(2001), today())
                .unwrap_err()
                .field,
            "birthday.day"
        );
        assert_eq!(
            Birthday::parse(4, 31, None, today()).unwrap_err().field,
            "birthday.day"
        );
        assert_eq!(
            Birthday::parse(0, 1, None, today()).unwrap_err().field,
            "birthday.month"
        );
        assert_eq!(
            Birthday::parse(13, 1, None, today()).unwrap_err().field,
            "birthday.month"
        );
        assert_eq!(
            Birthday::parse(1, 0, None, today()).unwrap_err().field,
            "birthday.day"
        );
        assert_eq!(
            Birthday::parse(1, 1, Some(1899), today())
                .unwrap_err()
                .field,
            "birthday.year"
        );
        assert_eq!(
            Birthday::parse(1, 1, Some(u32::MAX), today())
                .unwrap_err()
                .field,
            "birthday.year"
        );
        assert_eq!(
            Birthday::parse(12, 24, Some(2026), today())
                .unwrap_err()
                .field,
            "birthday"
        );
        assert!(Birthday::parse(11, 24, Some(2026), today()).is_ok());
    }

    #[test]
    fn time_zones() {
        assert_eq!(time_zone("tz", "").unwrap(), Tz::UTC);
        assert_eq!(
            time_zone("tz", "Europe/Berlin").unwrap(),
            Tz::Europe__Berlin
        );
        assert!(time_zone("tz", "Mars/Olympus").is_err());
        assert!(time_zone("tz", "europe/berlin ").is_err());
    }

    #[test]
    fn emails() {
        assert_eq!(email("e", "").unwrap(), None);
        assert!(email("e", "ada@example.com").unwrap().is_some());
        for bad in [
            "ada",
            "@example.com",
            "ada@example",
            "ada@@example.com",
            "a da@example.com",
            "ada@.com",
        ] {
            assert!(email("e", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn phones() {
        assert_eq!(phone("p", "").unwrap(), None);
        assert!(phone("p", "+4915112345678").unwrap().is_some());
        for bad in [
            "4915112345678",
            "+0151123456",
            "+49 151 123",
            "+1234567",
            "+1234567890123456",
            "+49a5112345678",
        ] {
            assert!(phone("p", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn enrollment_collects_every_violation() {
        let input = EnrollmentInput {
            external_id: "".into(),
            display_name: "x".repeat(201),
            birthday: Some(BirthdayInput {
                month: 2,
                day: 30,
                year: None,
            }),
            time_zone: "Nowhere".into(),
            email: "nope".into(),
            phone: "123".into(),
            marketing_consent: true,
        };
        match Enrollment::parse(input, now()) {
            Err(Invalid(v)) => {
                let fields: Vec<_> = v.iter().map(|v| v.field.as_str()).collect();
                assert_eq!(
                    fields,
                    [
                        "external_id",
                        "display_name",
                        "birthday.day",
                        "time_zone",
                        "email",
                        "phone"
                    ]
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn profile_debug_hides_contact_data() {
        let enrollment = Enrollment::parse(
            EnrollmentInput {
                external_id: "c1".into(),
                display_name: "Grace Hopper".into(),
                email: "grace@example.com".into(),
                phone: "+12025550123".into(),
                ..Default::default()
            },
            now(),
        )
        .unwrap();
        let printed = format!("{enrollment:?}");
        assert!(printed.contains("c1"));
        assert!(
            !printed.contains("Grace") && !printed.contains("grace@") && !printed.contains("+1202")
        );
    }
}
