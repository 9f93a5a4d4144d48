//! Deadlines and overload shedding.
//!
//! * Every request gets a deadline: the client's `grpc-timeout`, capped by the server's own
//!   maximum. When it passes, the handler is dropped (its transaction rolls back) and the
//!   client gets DEADLINE_EXCEEDED.
//! * At most `max_in_flight` requests run at once. A request that finds no room within
//!   `queue_timeout` is refused with RESOURCE_EXHAUSTED at once, so an overloaded server sheds
//!   load instead of queueing without bound.
//! * A request message over the size limit is refused with RESOURCE_EXHAUSTED, the code gRPC
//!   specifies for it (tonic itself answers OUT_OF_RANGE).

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::Semaphore;
use tonic::Status;
use tonic::body::Body;
use tower::{Layer, Service};

/// Parses a `grpc-timeout` header value: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.checked_mul(3600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[derive(Clone)]
pub struct DeadlineLayer {
    max: Duration,
}

impl DeadlineLayer {
    pub fn new(max: Duration) -> DeadlineLayer {
        DeadlineLayer { max }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadline {
            inner,
            max: self.max,
        }
    }
}

#[derive(Clone)]
pub struct Deadline<S> {
    inner: S,
    max: Duration,
}

impl<S> Service<http::Request<Body>> for Deadline<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let requested = request
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout);
        let deadline = requested.map_or(self.max, |d| d.min(self.max));
        let future = self.inner.call(request);
        Box::pin(async move {
            match tokio::time::timeout(deadline, future).await {
                Ok(result) => result,
                Err(_) => Ok(Status::deadline_exceeded("deadline exceeded").into_http()),
            }
        })
    }
}

#[derive(Clone)]
pub struct ShedLayer {
    permits: Arc<Semaphore>,
    queue_timeout: Duration,
}

impl ShedLayer {
    pub fn new(max_in_flight: usize, queue_timeout: Duration) -> ShedLayer {
        ShedLayer {
            permits: Arc::new(Semaphore::new(max_in_flight.max(1))),
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
            queue_timeout: self.queue_timeout,
        }
    }
}

#[derive(Clone)]
pub struct Shed<S> {
    inner: S,
    permits: Arc<Semaphore>,
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
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let permits = self.permits.clone();
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

/// Rewrites tonic's answers to request messages it could not read into the codes callers
/// expect, keeping tonic's message:
/// * an oversized message (tonic: OUT_OF_RANGE) becomes RESOURCE_EXHAUSTED, the code the gRPC
///   specification gives it;
/// * a message that is not valid protobuf (tonic-prost: INTERNAL, which reads as a fault of
///   ours and would page someone) becomes INVALID_ARGUMENT: bad input is the caller's to fix.
///
/// Used as `tower::util::MapResponseLayer::new(unreadable_request_status)`.
pub fn unreadable_request_status(response: http::Response<Body>) -> http::Response<Body> {
    let Some(status) = Status::from_header_map(response.headers()) else {
        return response;
    };
    match status.code() {
        tonic::Code::OutOfRange if status.message().contains("message length too large") => {
            Status::resource_exhausted(status.message().to_string()).into_http()
        }
        tonic::Code::Internal
            if status
                .message()
                .starts_with("failed to decode Protobuf message") =>
        {
            Status::invalid_argument(status.message().to_string()).into_http()
        }
        _ => response,
    }
}

#[cfg(test)]
mod tests {
    use super::parse_grpc_timeout;
    use std::time::Duration;

    #[test]
    fn grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "m", "10", "10x", "123456789S", "-1S", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }
}
