//! Overload shedding of unary calls: at most `max_in_flight` run at once. A request that
//! finds no room within `queue_timeout` is refused with RESOURCE_EXHAUSTED at once, so an
//! overloaded server sheds load instead of queueing without bound. Streams have a pool of their
//! own (`streams.rs`), so open streams can never take the slots of unary calls.
//!
//! Public methods (health, reflection: no key needed) have a small pool of their own, so
//! unauthenticated callers can never take the slots of the loyalty API. A request only gets
//! here once its body is in (`read_body.rs`): a slot is held while the request is handled,
//! never while the server waits for a client.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::Semaphore;
use tonic::Status;
use tonic::body::Body;
use tower::{Layer, Service};

use crate::platform::service::{Access, Kind, route_of};

#[derive(Clone)]
pub struct ShedLayer {
    permits: Arc<Semaphore>,
    public_permits: Arc<Semaphore>,
    queue_timeout: Duration,
}

impl ShedLayer {
    pub fn new(max_in_flight: usize, max_public_in_flight: usize, queue_timeout: Duration) -> Self {
        ShedLayer {
            permits: Arc::new(Semaphore::new(max_in_flight)),
            public_permits: Arc::new(Semaphore::new(max_public_in_flight)),
            queue_timeout,
        }
    }
}

impl<S> Layer<S> for ShedLayer {
    type Service = Shed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Shed {
            inner,
            permits: self.permits.clone(),
            public_permits: self.public_permits.clone(),
            queue_timeout: self.queue_timeout,
        }
    }
}

#[derive(Clone)]
pub struct Shed<S> {
    inner: S,
    permits: Arc<Semaphore>,
    public_permits: Arc<Semaphore>,
    queue_timeout: Duration,
}

impl<S> Service<http::Request<Body>> for Shed<S>
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

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let route = route_of(&request);
        if route.kind == Kind::Streaming {
            return Box::pin(self.inner.call(request));
        }
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let permits = match route.access {
            Access::Public => self.public_permits.clone(),
            Access::Scopes(_) => self.permits.clone(),
        };
        let queue_timeout = self.queue_timeout;
        Box::pin(async move {
            let permit = match permits.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    match tokio::time::timeout(queue_timeout, permits.acquire_owned()).await {
                        Ok(Ok(permit)) => permit,
                        _ => {
                            return Ok(Status::resource_exhausted(
                                "server overloaded, retry with backoff",
                            )
                            .into_http());
                        }
                    }
                }
            };
            let response = inner.call(request).await;
            drop(permit);
            response
        })
    }
}
