//! Assembles the server: storage, cache, use cases, gRPC services and layers, health,
//! reflection, metrics endpoint and background jobs; runs it until a shutdown future fires.
//!
//! `Application::build` binds the listeners first (port 0 works), so tests and the benchmark
//! know the addresses before the server runs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::config::ServerConfig;
use crate::domain::{Clock, SystemClock};
use crate::error::Error;
use crate::grpc::auth::AuthLayer;
use crate::grpc::limits::{DeadlineLayer, ShedLayer, unreadable_request_status};
use crate::grpc::metrics::MetricsLayer;
use crate::grpc::{CheckoutApi, MemberApi, ProgramApi};
use crate::pb::checkout_service_server::CheckoutServiceServer;
use crate::pb::member_service_server::MemberServiceServer;
use crate::pb::program_service_server::ProgramServiceServer;
use crate::service::Loyalty;
use crate::service::auth::Authenticator;
use crate::storage::Store;
use crate::storage::cache::Cache;
use crate::telemetry::Metrics;
use crate::{jobs, pb};

/// The services the health endpoint reports on, besides the overall "" entry.
const HEALTH_SERVICES: &[&str] = &[
    "loyalty.v1.CheckoutService",
    "loyalty.v1.MemberService",
    "loyalty.v1.ProgramService",
];

pub struct Application {
    config: ServerConfig,
    grpc_listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    loyalty: Loyalty,
    metrics: Metrics,
    authenticator: Arc<Authenticator>,
}

impl Application {
    /// Binds the listeners, builds the pools (without waiting for Redis) and applies the
    /// migrations, waiting up to `startup_timeout` for Postgres.
    pub async fn build(config: ServerConfig) -> Result<Application, Error> {
        Self::build_with_clock(config, Arc::new(SystemClock)).await
    }

    pub async fn build_with_clock(
        config: ServerConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Application, Error> {
        let grpc_listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| Error::internal(format!("cannot listen on {}: {e}", config.listen)))?;
        let metrics_listener = match config.metrics_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|e| Error::internal(format!("cannot listen on {addr}: {e}")))?,
            ),
            None => None,
        };
        let metrics = Metrics::new();
        let store = Store::connect_lazy(&config.database)?;
        if config.migrate {
            migrate_with_retry(&store, config.startup_timeout).await?;
        }
        let cache = Cache::new(config.cache.clone(), metrics.clone())?;
        let authenticator = Arc::new(Authenticator::new(
            store.clone(),
            config.key_cache_ttl,
            config.rate_limit,
        ));
        let loyalty = Loyalty::new(store, cache, clock);
        Ok(Application {
            config,
            grpc_listener,
            metrics_listener,
            loyalty,
            metrics,
            authenticator,
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_listener
            .local_addr()
            .unwrap_or(self.config.listen)
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    pub fn loyalty(&self) -> &Loyalty {
        &self.loyalty
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Serves until `shutdown` completes, then stops accepting, lets in-flight requests finish
    /// (up to the grace period), stops the background jobs and closes the pool.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let Application {
            config,
            grpc_listener,
            metrics_listener,
            loyalty,
            metrics,
            authenticator,
        } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut background = Vec::new();

        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        let probe = HealthProbe {
            store: loyalty.store().clone(),
            reporter: health_reporter,
            metrics: metrics.clone(),
            max_connections: config.database.max_connections,
        };
        // Every service has a status before the first request can arrive.
        probe.run().await;
        background.push(jobs::health_probe(
            config.health_interval,
            stop_rx.clone(),
            move || {
                let probe = probe.clone();
                async move { probe.run().await }
            },
        ));
        background.push(jobs::cache_repair(loyalty.clone(), stop_rx.clone()));

        if let Some(listener) = metrics_listener {
            background.push(serve_metrics(listener, metrics.clone(), stop_rx.clone()));
        }

        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(Error::internal)?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(Error::internal)?;

        let max_message = config.max_message_bytes;
        let checkout = CheckoutServiceServer::new(CheckoutApi {
            loyalty: loyalty.clone(),
        })
        .max_decoding_message_size(max_message);
        let member = MemberServiceServer::new(MemberApi {
            loyalty: loyalty.clone(),
        })
        .max_decoding_message_size(max_message);
        let program = ProgramServiceServer::new(ProgramApi {
            loyalty: loyalty.clone(),
        })
        .max_decoding_message_size(max_message);

        let addr = grpc_listener.local_addr().map_err(Error::internal)?;
        let incoming = TcpIncoming::from(grpc_listener).with_nodelay(Some(true));
        let router = Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .max_concurrent_streams(Some(1024))
            .layer(MetricsLayer::new(metrics.clone()))
            .layer(tower::util::MapResponseLayer::new(
                unreadable_request_status,
            ))
            .layer(DeadlineLayer::new(config.request_timeout))
            .layer(ShedLayer::new(config.max_in_flight, config.queue_timeout))
            .layer(AuthLayer::new(authenticator))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(checkout)
            .add_service(member)
            .add_service(program);

        tracing::info!(%addr, cache = loyalty.cache().is_enabled(), "serving gRPC");
        let (draining_tx, mut draining_rx) = watch::channel(false);
        let signal = async move {
            shutdown.await;
            let _ = draining_tx.send(true);
        };
        let serve = router.serve_with_incoming_shutdown(incoming, signal);
        let grace = config.shutdown_grace;
        let result = tokio::select! {
            result = serve => result.map_err(Error::internal),
            _ = async {
                let _ = draining_rx.wait_for(|draining| *draining).await;
                tokio::time::sleep(grace).await;
            } => {
                tracing::warn!(?grace, "in-flight requests did not finish within the grace period");
                Ok(())
            }
        };

        let _ = stop_tx.send(true);
        for task in background {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        loyalty.store().close().await;
        tracing::info!("stopped");
        result
    }
}

/// Probes Postgres and publishes the result to the health service and the pool metrics.
/// Redis is not part of health: the service works without it.
#[derive(Clone)]
struct HealthProbe {
    store: Store,
    reporter: tonic_health::server::HealthReporter,
    metrics: Metrics,
    max_connections: u32,
}

impl HealthProbe {
    async fn run(&self) {
        let healthy = matches!(
            tokio::time::timeout(Duration::from_secs(1), self.store.ping()).await,
            Ok(Ok(()))
        );
        let status = if healthy {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for service in std::iter::once("").chain(HEALTH_SERVICES.iter().copied()) {
            self.reporter.set_service_status(service, status).await;
        }
        let (open, idle) = self.store.pool_usage();
        self.metrics.db_pool(open, idle, self.max_connections);
    }
}

async fn migrate_with_retry(store: &Store, timeout: Duration) -> Result<(), Error> {
    let started = Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        match store.migrate().await {
            Ok(()) => return Ok(()),
            Err(Error::Unavailable(reason)) if started.elapsed() < timeout => {
                tracing::warn!(%reason, "postgres not reachable yet; retrying migrations");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(error) => return Err(error),
        }
    }
}

/// Serves `GET /metrics` in the Prometheus text format.
fn serve_metrics(
    listener: TcpListener,
    metrics: Metrics,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    metrics.render(),
                )
            }
        }),
    );
    tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
        };
        if let Err(error) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(%error, "metrics endpoint failed");
        }
    })
}
