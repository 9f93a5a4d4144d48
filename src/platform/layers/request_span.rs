//! The outermost layer: it resolves the request's method once (the [`Route`] the inner layers
//! read), and runs the RPC in a `rpc` span carrying its method, a request id and, once the
//! auth layer knows them, the merchant and key id, so every log line written while the
//! request is handled carries them too (and OTLP exports the span when configured).
//!
//! The request id is the caller's `x-request-id` when it sends a usable one, a fresh random id
//! otherwise; it is returned in the response metadata either way, so a caller can quote it.
//! Failures are logged where they happen, with their cause (a database error, an internal
//! error), inside this span; here every failed request gets one line at debug level, except a
//! deadline the server itself enforced, which nothing deeper logs: that one is a warning,
//! rate-limited.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use http::HeaderValue;
use tonic::Code;
use tonic::body::Body;
use tower::{Layer, Service};
use tracing::Instrument;

use crate::platform::layers::metrics::status_code;
use crate::platform::service::MethodTable;
use crate::telemetry::code_name;
use crate::telemetry::throttle::LogThrottle;

/// The metadata key of the request id, both ways.
pub const REQUEST_ID: &str = "x-request-id";

/// Longest request id taken from a caller; a longer one is replaced by a fresh id.
const MAX_REQUEST_ID_CHARS: usize = 128;

static DEADLINES_EXCEEDED: LogThrottle = LogThrottle::per_minute(60);

#[derive(Clone)]
pub struct RequestSpanLayer {
    methods: Arc<MethodTable>,
}

impl RequestSpanLayer {
    pub fn new(methods: Arc<MethodTable>) -> RequestSpanLayer {
        RequestSpanLayer { methods }
    }
}

impl<S> Layer<S> for RequestSpanLayer {
    type Service = RequestSpan<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestSpan {
            inner,
            methods: self.methods.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RequestSpan<S> {
    inner: S,
    methods: Arc<MethodTable>,
}

/// The caller's request id if it is one we can log and echo safely.
fn callers_request_id(headers: &http::HeaderMap) -> Option<HeaderValue> {
    let value = headers.get(REQUEST_ID)?;
    let text = value.to_str().ok()?;
    let usable = !text.is_empty()
        && text.len() <= MAX_REQUEST_ID_CHARS
        && text.bytes().all(|b| b.is_ascii_graphic());
    usable.then(|| value.clone())
}

/// 64 random bits in hex: unique enough to find one request in a day of logs.
fn fresh_request_id() -> HeaderValue {
    let id = format!("{:016x}", rand::random::<u64>());
    HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

impl<S> Service<http::Request<Body>> for RequestSpan<S>
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

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let route = self.methods.route(request.uri().path());
        request.extensions_mut().insert(route);
        let request_id = callers_request_id(request.headers()).unwrap_or_else(fresh_request_id);
        let span = tracing::info_span!(
            "rpc",
            method = request.uri().path(),
            request_id = request_id.to_str().unwrap_or_default(),
            merchant = tracing::field::Empty,
            key_id = tracing::field::Empty,
        );
        let future = span.in_scope(|| self.inner.call(request));
        Box::pin(
            async move {
                let mut response = future.await?;
                if let Some(code) = status_code(response.headers()) {
                    log_failure(code);
                }
                response.headers_mut().insert(REQUEST_ID, request_id);
                Ok(response)
            }
            .instrument(span),
        )
    }
}

/// Logs a request that failed (its status known from the response headers).
fn log_failure(code: Code) {
    match code {
        Code::Ok => {}
        Code::DeadlineExceeded => {
            if let Some(suppressed) = DEADLINES_EXCEEDED.admit() {
                tracing::warn!(code = code_name(code), suppressed, "request failed");
            }
        }
        _ => tracing::debug!(code = code_name(code), "request failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_callers_request_id_is_kept_only_when_safe_to_echo() {
        let mut headers = http::HeaderMap::new();
        assert!(callers_request_id(&headers).is_none());
        headers.insert(REQUEST_ID, HeaderValue::from_static("till-7/receipt-42"));
        assert_eq!(
            callers_request_id(&headers).unwrap(),
            HeaderValue::from_static("till-7/receipt-42")
        );
        for bad in ["", "with space", &"x".repeat(MAX_REQUEST_ID_CHARS + 1)] {
            headers.insert(REQUEST_ID, HeaderValue::from_str(bad).unwrap());
            assert!(callers_request_id(&headers).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn fresh_ids_differ() {
        assert_ne!(fresh_request_id(), fresh_request_id());
        assert_eq!(fresh_request_id().len(), 16);
    }
}
