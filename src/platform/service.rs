//! How a feature declares its gRPC service, once: the service's name, every method with the
//! scopes that may call it and its kind (unary or streaming), and the server itself. `app.rs`
//! registers services, health statuses, the scope table and the limits from these
//! declarations in one loop; nothing else repeats a service or method name.
//!
//! The outermost layer resolves a request's path once into a [`Route`] and attaches it to the
//! request; the inner layers read it with [`route_of`].

use std::collections::HashMap;
use std::convert::Infallible;

use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;

use crate::platform::caller::Scope;

/// Tills and checkouts (and admins).
pub const POS: Access = Access::Scopes(&[Scope::Pos, Scope::Admin]);
/// Anything with a key: apps, tills, admins (not schedulers).
pub const READ: Access = Access::Scopes(&[Scope::App, Scope::Pos, Scope::Admin]);
/// Reads of one customer: every key that reads, and customer tokens (for their own customer
/// only: the use case checks `Caller::may_read`).
pub const CUSTOMER_READ: Access =
    Access::Scopes(&[Scope::App, Scope::Pos, Scope::Admin, Scope::Customer]);
/// Internal schedulers (and admins).
pub const SCHEDULER: Access = Access::Scopes(&[Scope::Scheduler, Scope::Admin]);
/// Admins only.
pub const ADMIN: Access = Access::Scopes(&[Scope::Admin]);

/// Who may call a method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No key needed (health, reflection).
    Public,
    /// A key with one of these scopes.
    Scopes(&'static [Scope]),
}

/// How a method answers; it decides which limits apply (see `platform::layers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One request, one response: runs under the unary deadline and the unary slot pool.
    Unary,
    /// A response stream (server- or bidi-streaming): holds a slot of the stream pool for as
    /// long as it is open, is not cut by the unary deadline, and ends on shutdown.
    Streaming,
}

/// One method of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Method {
    pub name: &'static str,
    pub access: Access,
    pub kind: Kind,
}

impl Method {
    pub const fn unary(name: &'static str, access: Access) -> Method {
        Method {
            name,
            access,
            kind: Kind::Unary,
        }
    }

    pub const fn streaming(name: &'static str, access: Access) -> Method {
        Method {
            name,
            access,
            kind: Kind::Streaming,
        }
    }
}

/// What a feature declares of its service.
#[derive(Debug, Clone, Copy)]
pub struct Declaration {
    /// The full proto name, e.g. `loyalty.v1.CheckoutService` (the generated `SERVICE_NAME`).
    pub name: &'static str,
    pub methods: &'static [Method],
}

/// A declared service, ready to be added to the server.
pub struct Service {
    pub declaration: Declaration,
    add: Box<dyn FnOnce(&mut RoutesBuilder) + Send>,
}

impl Service {
    /// Pairs a declaration with the generated server that implements it.
    pub fn new<S>(declaration: Declaration, server: S) -> Service
    where
        S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        // A wrong name would leave the real paths undeclared; checked once, at start-up.
        assert_eq!(
            declaration.name,
            S::NAME,
            "declaration of the wrong service"
        );
        Service {
            declaration,
            add: Box::new(move |routes| {
                routes.add_service(server);
            }),
        }
    }

    pub fn add_to(self, routes: &mut RoutesBuilder) {
        (self.add)(routes);
    }
}

/// What the layers need to know of a request's method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// Whether the server declares the method (metrics label the rest "unknown").
    pub known: bool,
    pub kind: Kind,
    pub access: Access,
}

impl Route {
    /// An undeclared path: it answers once (UNIMPLEMENTED), and only to an admin key, so a
    /// service whose declaration went missing fails closed, never open.
    pub const UNKNOWN: Route = Route {
        known: false,
        kind: Kind::Unary,
        access: ADMIN,
    };
}

/// The route the outermost layer attached to the request; [`Route::UNKNOWN`] if none was
/// (fail closed).
pub fn route_of<B>(request: &http::Request<B>) -> Route {
    request
        .extensions()
        .get::<Route>()
        .copied()
        .unwrap_or(Route::UNKNOWN)
}

/// Every method path the server knows, with its access and kind: the scope table of the auth
/// layer and the method table of the limits. Built from the declarations.
#[derive(Debug, Default)]
pub struct MethodTable {
    methods: HashMap<String, Method>,
}

impl MethodTable {
    /// Panics (at start-up) if two declarations name the same method.
    pub fn new<'a>(declarations: impl IntoIterator<Item = &'a Declaration>) -> MethodTable {
        let mut methods = HashMap::new();
        for declaration in declarations {
            for method in declaration.methods {
                let path = format!("/{}/{}", declaration.name, method.name);
                let earlier = methods.insert(path.clone(), *method);
                assert!(earlier.is_none(), "{path} is declared twice");
            }
        }
        MethodTable { methods }
    }

    /// The route of a request path.
    pub fn route(&self, path: &str) -> Route {
        match self.methods.get(path) {
            Some(method) => Route {
                known: true,
                kind: method.kind,
                access: method.access,
            },
            None => Route::UNKNOWN,
        }
    }
}
