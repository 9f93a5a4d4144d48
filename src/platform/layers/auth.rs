//! The authentication layer: every request to a method that is not public must carry
//! `authorization: Bearer <key>`; the key's scope must allow the method (the scope table is
//! built from the features' declarations); the key's rate limit must have room. The resolved
//! [`Caller`] is attached to the request for the handler, and its merchant and key id to the
//! request's span. Health and reflection are public.
//!
//! With client certificates configured (`LOYALTY_TLS_CLIENT_CA`), the keys of internal scopes
//! are a first factor only: they are accepted over a connection that presented a certificate
//! the TLS handshake verified against that CA, and refused with UNAUTHENTICATED otherwise. A
//! stolen till key is then useless without the till's certificate.

use std::net::IpAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tonic::Status;
use tonic::body::Body;
use tonic::transport::server::TlsConnectInfo;
use tower::{Layer, Service};

use crate::error::Error;
use crate::platform::caller::{Caller, Scope};
use crate::platform::connections::{ConnectionInfo, connection_of};
use crate::platform::service::{Access, route_of};
use crate::platform::tls::ClientCertificates;

/// What the layer asks of whoever knows the keys (`access::Authenticator`).
pub trait Authenticate: Send + Sync + 'static {
    /// Resolves the value of an `authorization` header (`Bearer <key>`), sent from `peer`
    /// (the remote address, when the connection has one), to the caller.
    fn authenticate(
        &self,
        authorization: Option<&str>,
        peer: Option<IpAddr>,
    ) -> impl Future<Output = Result<Caller, Error>> + Send;

    /// Takes one request from the caller's budget.
    fn check_rate(&self, caller: &Caller) -> Result<(), Error>;
}

pub struct AuthLayer<A> {
    authenticator: Arc<A>,
    client_certificates: Option<Arc<ClientCertificates>>,
}

impl<A> AuthLayer<A> {
    pub fn new(authenticator: Arc<A>) -> AuthLayer<A> {
        AuthLayer {
            authenticator,
            client_certificates: None,
        }
    }

    /// Requires a verified client certificate for the keys of the configured scopes.
    pub fn client_certificates(mut self, policy: Option<ClientCertificates>) -> AuthLayer<A> {
        self.client_certificates = policy.map(Arc::new);
        self
    }
}

impl<A> Clone for AuthLayer<A> {
    fn clone(&self) -> Self {
        AuthLayer {
            authenticator: self.authenticator.clone(),
            client_certificates: self.client_certificates.clone(),
        }
    }
}

/// Whether the request's connection presented a client certificate. tonic records the peer's
/// chain only after the handshake verified it against the client CA (a chain that does not
/// verify fails the handshake), so presence means verified. Any other transport counts as
/// no certificate: the check fails closed.
fn has_client_certificate<B>(request: &http::Request<B>) -> bool {
    request
        .extensions()
        .get::<TlsConnectInfo<ConnectionInfo>>()
        .and_then(|info| info.peer_certs())
        .is_some_and(|chain| !chain.is_empty())
}

/// The refusal names what is missing; the scope is known, the key is not repeated.
fn certificate_required(scope: Scope) -> &'static str {
    match scope {
        Scope::Pos => "an API key with scope pos needs a client certificate (mutual TLS) here",
        Scope::App => "an API key with scope app needs a client certificate (mutual TLS) here",
        Scope::Scheduler => {
            "an API key with scope scheduler needs a client certificate (mutual TLS) here"
        }
        Scope::Admin => "an API key with scope admin needs a client certificate (mutual TLS) here",
        Scope::Customer => "a customer token needs a client certificate (mutual TLS) here",
    }
}

impl<S, A> Layer<S> for AuthLayer<A> {
    type Service = AuthService<S, A>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            authenticator: self.authenticator.clone(),
            client_certificates: self.client_certificates.clone(),
        }
    }
}

pub struct AuthService<S, A> {
    inner: S,
    authenticator: Arc<A>,
    client_certificates: Option<Arc<ClientCertificates>>,
}

impl<S: Clone, A> Clone for AuthService<S, A> {
    fn clone(&self) -> Self {
        AuthService {
            inner: self.inner.clone(),
            authenticator: self.authenticator.clone(),
            client_certificates: self.client_certificates.clone(),
        }
    }
}

impl<S, A> Service<http::Request<Body>> for AuthService<S, A>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    A: Authenticate,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let Access::Scopes(scopes) = route_of(&request).access else {
            return Box::pin(self.inner.call(request));
        };
        // The clone that was not polled ready stays here; the ready one serves this request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let authenticator = self.authenticator.clone();
        let client_certificates = self.client_certificates.clone();
        let has_certificate = has_client_certificate(&request);
        Box::pin(async move {
            let header = request
                .headers()
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            let peer = peer_ip(&request);
            let checked = async {
                let caller = authenticator.authenticate(header, peer).await?;
                if let Some(policy) = &client_certificates
                    && policy.required_for(caller.scope)
                    && !has_certificate
                {
                    return Err(Error::Unauthenticated(certificate_required(caller.scope)));
                }
                if !scopes.contains(&caller.scope) {
                    return Err(Error::PermissionDenied(match caller.scope {
                        Scope::Customer => "a customer token cannot call this method".to_string(),
                        scope => format!("an API key with scope {scope} cannot call this method"),
                    }));
                }
                authenticator.check_rate(&caller)?;
                Ok(caller)
            }
            .await;
            match checked {
                Ok(caller) => {
                    let span = tracing::Span::current();
                    span.record("merchant", caller.merchant.0);
                    span.record("key_id", caller.key_id);
                    request.extensions_mut().insert(caller);
                    inner.call(request).await
                }
                Err(error) => Ok(Status::from(error).into_http()),
            }
        })
    }
}

/// The remote address of the connection the request came on, if it has one. Plain TCP is read
/// directly; anything else (TLS wraps the TCP info in its own type, present only when a TLS
/// feature of tonic is on) goes through tonic's own `remote_addr`, which knows every kind.
fn peer_ip<B>(request: &http::Request<B>) -> Option<IpAddr> {
    connection_of(request)
        .and_then(|connection| connection.remote_addr)
        .map(|addr| addr.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peer_is_the_remote_address_of_the_connection() {
        let mut request = http::Request::new(());
        assert_eq!(peer_ip(&request), None);
        request.extensions_mut().insert(ConnectionInfo {
            local_addr: Some("127.0.0.1:50051".parse().unwrap()),
            remote_addr: Some("203.0.113.9:40000".parse().unwrap()),
            body_budget: Arc::new(tokio::sync::Semaphore::new(1)),
        });
        assert_eq!(peer_ip(&request), Some("203.0.113.9".parse().unwrap()));
    }
}
