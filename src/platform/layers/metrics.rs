//! Counts every request and times it, by method and final gRPC status code. The code comes
//! from the response headers (trailers-only errors) or from the trailers at the end of the body.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body::{Body as HttpBody, Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::body::Body;
use tonic::{Code, Status};
use tower::{Layer, Service};

use crate::platform::service::route_of;
use crate::telemetry::Metrics;

#[derive(Clone)]
pub struct MetricsLayer {
    metrics: Metrics,
}

impl MetricsLayer {
    /// Methods the server does not declare are counted as "unknown", so probes cannot blow
    /// up the label cardinality.
    pub fn new(metrics: Metrics) -> MetricsLayer {
        MetricsLayer { metrics }
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct MetricsService<S> {
    inner: S,
    metrics: Metrics,
}

/// Records one request when its status becomes known. A request abandoned before that (the
/// client cancelled or went away, so the server dropped the work) counts as CANCELLED.
struct Recorder {
    metrics: Metrics,
    method: String,
    started: Instant,
    recorded: bool,
}

impl Recorder {
    fn finish(mut self, code: Code) {
        self.record(code);
    }

    fn record(&mut self, code: Code) {
        if !self.recorded {
            self.recorded = true;
            self.metrics
                .rpc(&self.method, code, self.started.elapsed().as_secs_f64());
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.record(Code::Cancelled);
    }
}

/// The gRPC status in response headers (a trailers-only answer) or trailers.
pub(crate) fn status_code(headers: &http::HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    Some(Code::from_i32(value.parse().ok()?))
}

impl<S> Service<http::Request<Body>> for MetricsService<S>
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
        let method = if route_of(&request).known {
            request.uri().path().to_string()
        } else {
            "unknown".to_string()
        };
        let recorder = Recorder {
            metrics: self.metrics.clone(),
            method,
            started: Instant::now(),
            recorded: false,
        };
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await?;
            if let Some(code) = status_code(response.headers()) {
                recorder.finish(code);
                return Ok(response);
            }
            Ok(response.map(|body| {
                Body::new(RecordingBody {
                    inner: body,
                    recorder: Some(recorder),
                })
            }))
        })
    }
}

pin_project! {
    /// Passes the response body through and records the status found in its trailers.
    struct RecordingBody {
        #[pin]
        inner: Body,
        recorder: Option<Recorder>,
    }
}

impl HttpBody for RecordingBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        let code = match &frame {
            Some(Ok(frame)) => frame
                .trailers_ref()
                .map(|t| status_code(t).unwrap_or(Code::Unknown)),
            Some(Err(status)) => Some(status.code()),
            None => Some(Code::Unknown),
        };
        if let Some(code) = code
            && let Some(recorder) = this.recorder.take()
        {
            recorder.finish(code);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
