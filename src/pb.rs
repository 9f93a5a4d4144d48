//! Code generated from `proto/loyalty/v1/*.proto`, plus the redacting `Debug` impls of the
//! messages that carry personal contact data, a credential or a gift code (their derived
//! `Debug` is switched off in `build.rs`, so an accidental `{:?}` can never put an e-mail,
//! a phone number or a gift code into a log).

use std::fmt;

#[allow(clippy::all, missing_docs)]
mod generated {
    tonic::include_proto!("loyalty.v1");
}
pub use generated::*;

/// The encoded file descriptor set, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("loyalty_descriptor");

fn redacted(value: &str) -> &'static str {
    if value.is_empty() { "" } else { "<redacted>" }
}

impl fmt::Debug for Customer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Customer")
            .field("external_id", &self.external_id)
            .field("display_name", &redacted(&self.display_name))
            .field("birthday", &self.birthday.as_ref().map(|_| "<redacted>"))
            .field("time_zone", &self.time_zone)
            .field("email", &redacted(&self.email))
            .field("phone", &redacted(&self.phone))
            .field("marketing_consent", &self.marketing_consent)
            .field("enrolled_at", &self.enrolled_at)
            .field("updated_at", &self.updated_at)
            .finish()
    }
}

impl fmt::Debug for EnrollCustomerRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnrollCustomerRequest")
            .field("external_id", &self.external_id)
            .field("display_name", &redacted(&self.display_name))
            .field("birthday", &self.birthday.as_ref().map(|_| "<redacted>"))
            .field("time_zone", &self.time_zone)
            .field("email", &redacted(&self.email))
            .field("phone", &redacted(&self.phone))
            .field("marketing_consent", &self.marketing_consent)
            .finish()
    }
}

impl fmt::Debug for IssueCustomerTokenResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssueCustomerTokenResponse")
            .field("token", &redacted(&self.token))
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// A gift code (a bearer secret) shows only whether it is there.
impl fmt::Debug for GiftGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GiftGrant")
            .field("code", &redacted(&self.code))
            .field("gift_id", &self.gift_id)
            .field("gift_name", &self.gift_name)
            .field("gift_kind", &self.gift_kind)
            .field("external_id", &self.external_id)
            .field("status", &self.status)
            .field("source", &self.source)
            .field("purchase_id", &self.purchase_id)
            .field("valid_from", &self.valid_from)
            .field("valid_until", &self.valid_until)
            .field("redeemed_at", &self.redeemed_at)
            .field("redeemed_store_id", &self.redeemed_store_id)
            .field("created_at", &self.created_at)
            .finish()
    }
}

impl fmt::Debug for RedeemGiftRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedeemGiftRequest")
            .field("code", &redacted(&self.code))
            .field("redemption_key", &self.redemption_key)
            .field("store_id", &self.store_id)
            .finish()
    }
}

/// Its page token holds a code of the customer.
impl fmt::Debug for ListCustomerGiftsRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListCustomerGiftsRequest")
            .field("external_id", &self.external_id)
            .field("page_size", &self.page_size)
            .field("page_token", &redacted(&self.page_token))
            .finish()
    }
}

impl fmt::Debug for ListCustomerGiftsResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListCustomerGiftsResponse")
            .field("grants", &self.grants)
            .field("next_page_token", &redacted(&self.next_page_token))
            .finish()
    }
}

/// A greeting names its customer, their addresses, maybe a gift code, and the lease token.
impl fmt::Debug for Greeting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Greeting")
            .field("greeting_id", &self.greeting_id)
            .field("external_id", &self.external_id)
            .field("display_name", &redacted(&self.display_name))
            .field("occasion", &self.occasion)
            .field("local_date", &self.local_date)
            .field("channels", &self.channels)
            .field("gift_code", &redacted(&self.gift_code))
            .field("bonus_points", &self.bonus_points)
            .field("attempts", &self.attempts)
            .field("lease_expires_at", &self.lease_expires_at)
            .field("lease_token", &redacted(&self.lease_token))
            .finish()
    }
}

impl fmt::Debug for ContactPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContactPoint")
            .field("channel", &self.channel)
            .field("address", &redacted(&self.address))
            .finish()
    }
}

impl fmt::Debug for UpcomingOccasion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpcomingOccasion")
            .field("external_id", &self.external_id)
            .field("display_name", &redacted(&self.display_name))
            .field("occasion", &self.occasion)
            .field("local_date", &self.local_date)
            .field("starts_at", &self.starts_at)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_contains_contact_data() {
        let request = EnrollCustomerRequest {
            external_id: "card-1".into(),
            display_name: "Ada Lovelace".into(),
            birthday: Some(Birthday {
                month: 12,
                day: 10,
                year: Some(1815),
            }),
            time_zone: "Europe/London".into(),
            email: "ada@example.com".into(),
            phone: "+441234567890".into(),
            marketing_consent: true,
        };
        let printed = format!("{request:?}");
        assert!(printed.contains("card-1"));
        for secret in ["Ada", "ada@example.com", "+441234567890", "1815"] {
            assert!(!printed.contains(secret), "{secret} leaked into {printed}");
        }
        let customer = Customer {
            external_id: "card-1".into(),
            email: "ada@example.com".into(),
            phone: "+441234567890".into(),
            ..Default::default()
        };
        let printed = format!("{customer:?}");
        assert!(
            !printed.contains("ada@") && !printed.contains("+4412"),
            "{printed}"
        );
    }

    #[test]
    fn debug_output_never_contains_gift_codes() {
        let code = "ABCD-EFGH-JKMN-PQRS-T";
        let grant = GiftGrant {
            code: code.into(),
            gift_id: "free-coffee".into(),
            ..Default::default()
        };
        let response = ListCustomerGiftsResponse {
            grants: vec![grant.clone()],
            next_page_token: "Z3JhbnRzLnYxLjEuQUJDRA".into(),
        };
        let request = RedeemGiftRequest {
            code: code.into(),
            redemption_key: "till-1-42".into(),
            store_id: String::new(),
        };
        let listing = ListCustomerGiftsRequest {
            external_id: "card-1".into(),
            page_size: 1,
            page_token: "Z3JhbnRzLnYxLjEuQUJDRA".into(),
        };
        for printed in [
            format!("{grant:?}"),
            format!("{response:?}"),
            format!("{request:?}"),
            format!("{listing:?}"),
        ] {
            assert!(
                !printed.contains("ABCD") && !printed.contains("Z3JhbnRz"),
                "{printed}"
            );
        }
        assert!(format!("{grant:?}").contains("free-coffee"));
    }

    #[test]
    fn debug_output_of_greetings_never_contains_contact_data_codes_or_leases() {
        let response = ClaimGreetingsResponse {
            greetings: vec![Greeting {
                greeting_id: "g-1".into(),
                display_name: "Ada Lovelace".into(),
                channels: vec![ContactPoint {
                    channel: ContactChannel::Email as i32,
                    address: "ada@example.com".into(),
                }],
                gift_code: "ABCDEFGHJKMNPQRST".into(),
                lease_token: "0123456789abcdef".into(),
                ..Default::default()
            }],
        };
        let upcoming = ListUpcomingOccasionsResponse {
            occasions: vec![UpcomingOccasion {
                external_id: "card-1".into(),
                display_name: "Ada Lovelace".into(),
                ..Default::default()
            }],
            next_page_token: String::new(),
        };
        for printed in [format!("{response:?}"), format!("{upcoming:?}")] {
            for secret in ["Ada", "ada@", "ABCDEFGH", "0123456789"] {
                assert!(!printed.contains(secret), "{secret} leaked into {printed}");
            }
        }
        assert!(format!("{response:?}").contains("g-1"));
    }
}
