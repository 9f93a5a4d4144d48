//! Code generated from `proto/loyalty/v1/*.proto`, plus the redacting `Debug` impls of the
//! messages that carry personal contact data or a credential (their derived `Debug` is switched off in
//! `build.rs`, so an accidental `{:?}` can never put an e-mail or phone number into a log).

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
}
