//! Who is calling: the tenant, the key and what the key may do. Every feature's handlers get a
//! [`Caller`] from the authentication layer; every query is filtered by its merchant.

use std::fmt;

/// Identifies a tenant. Every query is filtered by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MerchantId(pub i64);

impl fmt::Display for MerchantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Who is calling: resolved from the API key by `access::Authenticator`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub merchant: MerchantId,
    pub key_id: i64,
    pub scope: Scope,
}

impl Caller {
    /// How the audit log names this caller.
    pub fn actor(&self) -> String {
        format!("key:{}", self.key_id)
    }
}

/// What a key may call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Tills and checkouts: CheckoutService and MemberService.
    Pos,
    /// Apps: MemberService reads.
    App,
    /// Internal schedulers: greetings and events (their service is still to come).
    Scheduler,
    /// Everything, including ProgramService.
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Scope::Pos, Scope::App, Scope::Scheduler, Scope::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Pos => "pos",
            Scope::App => "app",
            Scope::Scheduler => "scheduler",
            Scope::Admin => "admin",
        }
    }

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
    }
}
