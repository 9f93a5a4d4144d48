//! Logs (tracing, text or JSON) and Prometheus metrics.
//!
//! Logs never carry API keys or contact data: requests are not logged as a whole, keys are a
//! redacting type, and messages with contact data have a redacting `Debug`.

pub mod otlp;
pub mod throttle;

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tracing_subscriber::layer::{Layered, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber once (later calls are no-ops): logs to stderr, and spans to
/// an OTLP collector when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (keep the guard until the end of
/// `main`, then shut it down). `RUST_LOG` overrides the default filter.
pub fn init_tracing(format: LogFormat) -> Option<otlp::OtlpGuard> {
    type Filtered = Layered<EnvFilter, tracing_subscriber::Registry>;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,h2=warn,tower=warn,hyper=warn"));
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let mut layers: Vec<Box<dyn Layer<Filtered> + Send + Sync>> = vec![match format {
        LogFormat::Json => logs.json().flatten_event(true).boxed(),
        LogFormat::Text => logs.boxed(),
    }];
    let mut guard = None;
    match otlp::layer::<Filtered>() {
        Ok(Some((spans, otlp_guard))) => {
            layers.push(spans.boxed());
            guard = Some(otlp_guard);
        }
        Ok(None) => {}
        Err(error) => eprintln!("warning: {error}; spans are not exported"),
    }
    tracing_subscriber::registry()
        .with(filter)
        .with(layers)
        .try_init()
        .ok()
        .and(guard)
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: String,
    code: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    op: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuthLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    state: &'static str,
}

fn latency_histogram() -> Histogram {
    // 0.1 ms .. ~13 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// The service's metrics. Cheap to clone; each server instance has its own registry.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    rpc_requests: Family<RpcLabels, Counter>,
    rpc_duration: Family<RpcLabels, Histogram, fn() -> Histogram>,
    cache_operations: Family<CacheLabels, Counter>,
    credential_lookups: Family<AuthLabels, Counter>,
    db_connections: Family<PoolLabels, Gauge>,
    resident_memory: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("loyalty");
        let rpc_requests = Family::<RpcLabels, Counter>::default();
        registry.register(
            "rpc_requests",
            "gRPC requests handled, by method and status code",
            rpc_requests.clone(),
        );
        let rpc_duration: Family<RpcLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "rpc_duration_seconds",
            "gRPC request latency, by method and status code",
            rpc_duration.clone(),
        );
        let cache_operations = Family::<CacheLabels, Counter>::default();
        registry.register(
            "cache_operations",
            "Redis cache operations by outcome (hit, partial: a copy without a standing, miss, stored, older, error, skipped)",
            cache_operations.clone(),
        );
        let credential_lookups = Family::<AuthLabels, Counter>::default();
        registry.register(
            "credential_lookups",
            "Postgres lookups of API keys (and of the keys that signed customer tokens), by \
             outcome (found, unknown); a refused credential that needed no lookup is not counted",
            credential_lookups.clone(),
        );
        let db_connections = Family::<PoolLabels, Gauge>::default();
        registry.register(
            "db_pool_connections",
            "Postgres pool connections by state (open, idle, max)",
            db_connections.clone(),
        );
        let resident_memory = Gauge::default();
        registry.register(
            "process_resident_memory_bytes",
            "Resident set size of the server process",
            resident_memory.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                registry,
                rpc_requests,
                rpc_duration,
                cache_operations,
                credential_lookups,
                db_connections,
                resident_memory,
            }),
        }
    }

    pub fn rpc(&self, method: &str, code: tonic::Code, seconds: f64) {
        let labels = RpcLabels {
            method: method.to_string(),
            code: code_name(code).to_string(),
        };
        self.inner.rpc_requests.get_or_create(&labels).inc();
        self.inner
            .rpc_duration
            .get_or_create(&labels)
            .observe(seconds);
    }

    pub fn cache_op(&self, op: &'static str, outcome: &'static str) {
        self.inner
            .cache_operations
            .get_or_create(&CacheLabels { op, outcome })
            .inc();
    }

    /// How many cache operations ended with `outcome` (for tests and the benchmark).
    pub fn cache_op_count(&self, op: &'static str, outcome: &'static str) -> u64 {
        self.inner
            .cache_operations
            .get_or_create(&CacheLabels { op, outcome })
            .get()
    }

    /// One Postgres lookup of a credential, `found` or `unknown`.
    pub fn credential_lookup(&self, outcome: &'static str) {
        self.inner
            .credential_lookups
            .get_or_create(&AuthLabels { outcome })
            .inc();
    }

    /// How many credential lookups ended with `outcome` (for tests).
    pub fn credential_lookup_count(&self, outcome: &'static str) -> u64 {
        self.inner
            .credential_lookups
            .get_or_create(&AuthLabels { outcome })
            .get()
    }

    pub fn db_pool(&self, open: u32, idle: usize, max: u32) {
        let set = |state, value: i64| {
            self.inner
                .db_connections
                .get_or_create(&PoolLabels { state })
                .set(value);
        };
        set("open", i64::from(open));
        set("idle", idle as i64);
        set("max", i64::from(max));
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        if let Some(rss) = resident_memory_bytes() {
            self.inner.resident_memory.set(rss as i64);
        }
        let mut out = String::new();
        if let Err(error) =
            prometheus_client::encoding::text::encode(&mut out, &self.inner.registry)
        {
            tracing::error!(%error, "could not encode metrics");
        }
        out
    }
}

/// The gRPC name of a status code, as used in metrics labels.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Resident set size from /proc (Linux); `None` elsewhere.
pub fn resident_memory_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}
