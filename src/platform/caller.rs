//! Who is calling: the tenant, the key and what the key may do. Every feature's handlers get a
//! [`Caller`] from the authentication layer; every query is filtered by its merchant.

use std::fmt;
use std::sync::Arc;

use crate::error::Error;

/// Identifies a tenant. Every query is filtered by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MerchantId(pub i64);

impl fmt::Display for MerchantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Who is calling: resolved from the API key (or customer token) by `access::Authenticator`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub merchant: MerchantId,
    /// The API key, or for a customer token the key that minted it.
    pub key_id: i64,
    pub scope: Scope,
    /// The one customer (external_id) a customer token may read; `None` for API keys.
    pub customer: Option<Arc<str>>,
}

impl Caller {
    /// A caller with an API key.
    pub fn with_key(merchant: MerchantId, key_id: i64, scope: Scope) -> Caller {
        Caller {
            merchant,
            key_id,
            scope,
            customer: None,
        }
    }

    /// How the audit log names this caller.
    pub fn actor(&self) -> String {
        match &self.customer {
            None => format!("key:{}", self.key_id),
            Some(_) => format!("customer-token-of-key:{}", self.key_id),
        }
    }

    /// Whether the caller may read this customer of its merchant: an API key reads every
    /// customer of its merchant, a customer token only its own. Every use case that reads a
    /// customer asks this first, before anything is looked up, so a token learns nothing of
    /// other customers (not even whether they exist).
    pub fn may_read(&self, external_id: &str) -> Result<(), Error> {
        match &self.customer {
            Some(own) if **own != *external_id => Err(Error::PermissionDenied(
                "a customer token reads only the customer it was issued for".to_string(),
            )),
            _ => Ok(()),
        }
    }
}

/// What a key may call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Tills and checkouts: CheckoutService and MemberService.
    Pos,
    /// Apps: MemberService reads.
    App,
    /// Internal schedulers: greetings and events (EngagementService).
    Scheduler,
    /// Everything, including ProgramService.
    Admin,
    /// A customer token (minted by an app, pos or admin key): the balance, profile and ledger
    /// of one customer. Never the scope of an API key.
    Customer,
}

impl Scope {
    /// The scopes an API key may have.
    pub const ALL: [Scope; 4] = [Scope::Pos, Scope::App, Scope::Scheduler, Scope::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Pos => "pos",
            Scope::App => "app",
            Scope::Scheduler => "scheduler",
            Scope::Admin => "admin",
            Scope::Customer => "customer",
        }
    }

    /// The scope of an API key by its name (never [`Scope::Customer`]).
    pub fn parse(value: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|s| s.as_str() == value)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_round_trip() {
        for scope in Scope::ALL {
            assert_eq!(Scope::parse(scope.as_str()), Some(scope));
        }
        assert_eq!(Scope::parse("root"), None);
        assert_eq!(Scope::parse("customer"), None);
    }

    #[test]
    fn a_customer_token_reads_only_its_customer() {
        let key = Caller::with_key(MerchantId(1), 2, Scope::App);
        assert!(key.may_read("card-1").is_ok());
        assert!(key.may_read("card-2").is_ok());
        let token = Caller {
            scope: Scope::Customer,
            customer: Some("card-1".into()),
            ..key
        };
        assert!(token.may_read("card-1").is_ok());
        assert!(matches!(
            token.may_read("card-2"),
            Err(Error::PermissionDenied(_))
        ));
        assert!(matches!(
            token.may_read("card-1 "),
            Err(Error::PermissionDenied(_))
        ));
    }
}
