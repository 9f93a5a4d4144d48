//! Optional span export over OTLP/gRPC, on only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set; when
//! it is not, nothing is built and the request spans cost what any unexported span costs.
//!
//! The usual OpenTelemetry variables are read by the exporter itself:
//! `OTEL_EXPORTER_OTLP_{,TRACES_}ENDPOINT`, `_HEADERS`, `_TIMEOUT`, `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_TRACES_SAMPLER(_ARG)`, `OTEL_BSP_*`; `OTEL_SERVICE_NAME` here (default "loyalty").
//! Plain `http://` endpoints only (an `https://` one is refused at start-up with a warning).
//!
//! Build it inside the tokio runtime, and shut the guard down before the runtime ends, or the
//! last batch of spans is lost.

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::SpanExporter;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::registry::LookupSpan;

const DEFAULT_SERVICE_NAME: &str = "loyalty";
/// The longest shutdown waits for the final flush.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3);

/// Flushes and stops the span pipeline on `shutdown()` or drop.
pub struct OtlpGuard {
    provider: Option<SdkTracerProvider>,
}

impl OtlpGuard {
    pub fn shutdown(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT)
        {
            eprintln!("warning: otlp shutdown: {error}");
        }
    }
}

impl Drop for OtlpGuard {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn non_empty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// `Ok(None)` when `OTEL_EXPORTER_OTLP_ENDPOINT` is unset or empty.
pub fn layer<S>() -> Result<Option<(impl tracing_subscriber::Layer<S>, OtlpGuard)>, String>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    if non_empty("OTEL_EXPORTER_OTLP_ENDPOINT").is_none() {
        return Ok(None);
    }
    if tokio::runtime::Handle::try_current().is_err() {
        return Err("OTLP export needs a tokio runtime".into());
    }
    let exporter = SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|e| format!("OTLP exporter: {e}"))?;
    let service_name =
        non_empty("OTEL_SERVICE_NAME").unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_string());
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(service_name).build())
        .build();
    let tracer = provider.tracer("loyalty");
    let layer = tracing_opentelemetry::layer().with_tracer(tracer);
    Ok(Some((
        layer,
        OtlpGuard {
            provider: Some(provider),
        },
    )))
}
