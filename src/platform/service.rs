//! How a feature declares its gRPC service, once: the service's name, every method with the
//! scopes that may call it and its kind (unary or streaming), and the server itself. `app.rs`
//! registers services, health statuses, the scope table and the limits from these
//! declarations in one loop; nothing else repeats a service or method name.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;

use crate::platform::caller::Scope;

/// Tills and checkouts (and admins).
pub const POS: Access = Access::Scopes(&[Scope::Pos, Scope::Admin]);
/// Anything with a key: apps, tills, admins (not schedulers).
pub const READ: Access = Access::Scopes(&[Scope::App, Scope::Pos, Scope::Admin]);
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
    /// The full proto name, e.g. `loyalty.v1.CheckoutService` (from the generated code).
    pub name: &'static str,
    pub methods: &'static [Method],
    /// Whether the health service reports a status for it (every loyalty service does).
    pub reports_health: bool,
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
        debug_assert_eq!(
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

/// Every method path the server knows, with its access and kind: the scope table of the auth
/// layer and the method table of the limits. Built from the declarations.
#[derive(Debug, Default)]
pub struct MethodTable {
    methods: HashMap<String, Method>,
}

/// Looked up by the layers; shared.
pub type Methods = Arc<MethodTable>;

impl MethodTable {
    pub fn new<'a>(declarations: impl IntoIterator<Item = &'a Declaration>) -> MethodTable {
        let mut methods = HashMap::new();
        for declaration in declarations {
            for method in declaration.methods {
                methods.insert(format!("/{}/{}", declaration.name, method.name), *method);
            }
        }
        MethodTable { methods }
    }

    /// The method at a request path, if the server knows it.
    pub fn get(&self, path: &str) -> Option<&Method> {
        self.methods.get(path)
    }

    /// Who may call the method at `path`. An unknown path under our own package needs an
    /// admin key (only an admin gets as far as UNIMPLEMENTED); any other unknown path is left
    /// to the router (UNIMPLEMENTED for everyone).
    pub fn access(&self, path: &str) -> Access {
        match self.methods.get(path) {
            Some(method) => method.access,
            None if path.starts_with("/loyalty.") => ADMIN,
            None => Access::Public,
        }
    }

    /// How the method at `path` answers; unknown methods answer once (UNIMPLEMENTED).
    pub fn kind(&self, path: &str) -> Kind {
        self.methods.get(path).map_or(Kind::Unary, |m| m.kind)
    }

    /// Whether `path` is one of the server's methods (metrics label the rest "unknown").
    pub fn knows(&self, path: &str) -> bool {
        self.methods.contains_key(path)
    }
}
