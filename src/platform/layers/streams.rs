//! Limits of streaming methods (declared `Kind::Streaming`: health's `Watch`, reflection, and
//! the event stream, `EngagementService.WatchEvents`). A stream may stay open for hours, so the unary limits do not fit:
//!
//! * it takes a slot of its own pool (`max_streams`) and holds it until the stream ends, so
//!   watchers can never starve unary calls, nor unary calls watchers; when the pool is full a
//!   new stream is refused with RESOURCE_EXHAUSTED at once. Public streams (health `Watch`,
//!   reflection: no key needed) have a pool of their own (`max_public_streams`), so
//!   unauthenticated watchers can never take the slots of authenticated ones;
//! * it is not cut by the server's unary deadline; a deadline the client sent (`grpc-timeout`)
//!   still ends it, with DEADLINE_EXCEEDED;
//! * it ends cleanly with UNAVAILABLE when the server starts to shut down, so a graceful
//!   shutdown never waits its whole grace period for watchers that would never hang up (a
//!   client that stops reading is only ended when hyper next polls the stream, at the latest
//!   when the grace period is over);
//! * the handler's set-up before the first message runs under the same two bounds; a stream
//!   refused at once (its status in the headers) is passed through as it is.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::{BoxFuture, Either};
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tonic::Status;
use tonic::body::Body;
use tower::{Layer, Service};

use crate::platform::layers::deadline::client_timeout;
use crate::platform::layers::metrics::status_code;
use crate::platform::service::{Access, Kind, route_of};

#[derive(Clone)]
pub struct StreamsLayer {
    permits: Arc<Semaphore>,
    public_permits: Arc<Semaphore>,
    draining: watch::Receiver<bool>,
}

impl StreamsLayer {
    /// `draining` turns true when the server starts to shut down.
    pub fn new(
        max_streams: usize,
        max_public_streams: usize,
        draining: watch::Receiver<bool>,
    ) -> Self {
        StreamsLayer {
            permits: Arc::new(Semaphore::new(max_streams)),
            public_permits: Arc::new(Semaphore::new(max_public_streams)),
            draining,
        }
    }
}

impl<S> Layer<S> for StreamsLayer {
    type Service = Streams<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Streams {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Streams<S> {
    inner: S,
    layer: StreamsLayer,
}

impl<S> Service<http::Request<Body>> for Streams<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    /// Unary calls pass straight through, without a box of their own.
    type Future = Either<S::Future, BoxFuture<'static, Result<Self::Response, Self::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let route = route_of(&request);
        if route.kind != Kind::Streaming {
            return Either::Left(self.inner.call(request));
        }
        if *self.layer.draining.borrow() {
            return Either::Right(Box::pin(async { Ok(shutting_down().into_http()) }));
        }
        let pool = match route.access {
            Access::Public => &self.layer.public_permits,
            Access::Scopes(_) => &self.layer.permits,
        };
        let Ok(permit) = pool.clone().try_acquire_owned() else {
            return Either::Right(Box::pin(async {
                Ok(Status::resource_exhausted("too many open streams, retry later").into_http())
            }));
        };
        let mut deadline = client_timeout(&request).map(|d| Box::pin(tokio::time::sleep(d)));
        let mut draining = self.layer.draining.clone();
        let future = self.inner.call(request);
        Either::Right(Box::pin(async move {
            let mut draining: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(async move {
                // A dropped sender (server gone) counts as draining too.
                let _ = draining.wait_for(|draining| *draining).await;
            });
            // The handler's own set-up runs under the same bounds as its stream.
            let response = tokio::select! {
                response = future => response?,
                () = &mut draining => return Ok(shutting_down().into_http()),
                () = passed(&mut deadline) => return Ok(deadline_exceeded().into_http()),
            };
            // Refused at once (the status is in the headers): nothing left to guard.
            if status_code(response.headers()).is_some() {
                return Ok(response);
            }
            let (parts, body) = response.into_parts();
            let guarded = GuardedBody {
                inner: body,
                _permit: permit,
                draining,
                deadline,
                ended: false,
            };
            Ok(http::Response::from_parts(parts, Body::new(guarded)))
        }))
    }
}

/// Completes when the client's deadline, if it sent one, has passed.
async fn passed(deadline: &mut Option<Pin<Box<tokio::time::Sleep>>>) {
    match deadline {
        Some(sleep) => sleep.as_mut().await,
        None => std::future::pending().await,
    }
}

fn deadline_exceeded() -> Status {
    Status::deadline_exceeded("deadline exceeded")
}

fn shutting_down() -> Status {
    Status::unavailable("server shutting down, reconnect")
}

/// A stream's body: holds the pool slot until it ends, and ends it early (with the status in
/// the trailers) on shutdown or at the client's deadline.
struct GuardedBody {
    inner: Body,
    _permit: OwnedSemaphorePermit,
    draining: Pin<Box<dyn Future<Output = ()> + Send>>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    ended: bool,
}

impl GuardedBody {
    fn end_with(&mut self, status: Status) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.ended = true;
        let mut trailers = HeaderMap::new();
        // Our own fixed messages: encoding them cannot fail.
        let _ = status.add_header(&mut trailers);
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }
}

impl HttpBody for GuardedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if self.draining.as_mut().poll(cx).is_ready() {
            return self.end_with(shutting_down());
        }
        if let Some(deadline) = self.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            return self.end_with(deadline_exceeded());
        }
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        match &frame {
            Poll::Ready(None) => self.ended = true,
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => self.ended = true,
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
