//! The authentication layer: every `/loyalty.*` request must carry `authorization: Bearer
//! <key>`; the key's scope must allow the method; the key's rate limit must have room. The
//! resolved [`Caller`] is attached to the request for the handler. Health and reflection are
//! public.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tonic::Status;
use tonic::body::Body;
use tower::{Layer, Service};

use crate::domain::api_key::Scope;
use crate::error::Error;
use crate::service::auth::Authenticator;

/// Which scopes may call a method. `None`: public.
pub fn allowed_scopes(path: &str) -> Option<&'static [Scope]> {
    const POS: &[Scope] = &[Scope::Pos, Scope::Admin];
    const READ: &[Scope] = &[Scope::App, Scope::Pos, Scope::Admin];
    const SCHEDULER: &[Scope] = &[Scope::Scheduler, Scope::Admin];
    const ADMIN: &[Scope] = &[Scope::Admin];

    let method = path.strip_prefix("/loyalty.")?;
    let (service, rpc) = method.split_once('/').unwrap_or((method, ""));
    Some(match (service, rpc) {
        ("v1.CheckoutService", _) => POS,
        ("v1.MemberService", "GetCustomer" | "GetBalance" | "ListLedger") => READ,
        ("v1.MemberService", _) => POS,
        ("v1.EngagementService", _) => SCHEDULER,
        // ProgramService, and anything unknown: only an admin gets as far as UNIMPLEMENTED.
        _ => ADMIN,
    })
}

#[derive(Clone)]
pub struct AuthLayer {
    authenticator: Arc<Authenticator>,
}

impl AuthLayer {
    pub fn new(authenticator: Arc<Authenticator>) -> AuthLayer {
        AuthLayer { authenticator }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            authenticator: self.authenticator.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    authenticator: Arc<Authenticator>,
}

impl<S> Service<http::Request<Body>> for AuthService<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let Some(scopes) = allowed_scopes(request.uri().path()) else {
            return Box::pin(self.inner.call(request));
        };
        // The clone that was not polled ready stays here; the ready one serves this request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let authenticator = self.authenticator.clone();
        Box::pin(async move {
            let header = request
                .headers()
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            let checked = async {
                let caller = authenticator.authenticate(header).await?;
                if !scopes.contains(&caller.scope) {
                    return Err(Error::PermissionDenied(format!(
                        "an API key with scope {} cannot call this method",
                        caller.scope
                    )));
                }
                authenticator.check_rate(&caller)?;
                Ok(caller)
            }
            .await;
            match checked {
                Ok(caller) => {
                    request.extensions_mut().insert(caller);
                    inner.call(request).await
                }
                Err(error) => Ok(Status::from(error).into_http()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_by_method() {
        let allows = |path: &str, scope: Scope| allowed_scopes(path).unwrap().contains(&scope);
        assert!(allowed_scopes("/grpc.health.v1.Health/Check").is_none());
        assert!(
            allowed_scopes("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo").is_none()
        );
        assert!(allows(
            "/loyalty.v1.CheckoutService/RecordPurchase",
            Scope::Pos
        ));
        assert!(!allows(
            "/loyalty.v1.CheckoutService/RecordPurchase",
            Scope::App
        ));
        assert!(allows("/loyalty.v1.MemberService/GetBalance", Scope::App));
        assert!(!allows(
            "/loyalty.v1.MemberService/EnrollCustomer",
            Scope::App
        ));
        assert!(allows(
            "/loyalty.v1.MemberService/EnrollCustomer",
            Scope::Pos
        ));
        assert!(!allows(
            "/loyalty.v1.ProgramService/UpdateProgram",
            Scope::Pos
        ));
        assert!(allows(
            "/loyalty.v1.ProgramService/UpdateProgram",
            Scope::Admin
        ));
        assert!(!allows(
            "/loyalty.v1.CheckoutService/RecordPurchase",
            Scope::Scheduler
        ));
        assert!(allows("/loyalty.v2.Anything/Else", Scope::Admin));
        assert!(!allows("/loyalty.v2.Anything/Else", Scope::Pos));
    }
}
