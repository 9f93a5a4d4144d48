//! Assembles the server: the shared parts, every feature's service from its declaration,
//! health, reflection, the layers, the metrics endpoint and the background jobs; runs it until
//! a shutdown future fires.
//!
//! `Application::build` binds the listeners first (port 0 works), so tests and the benchmark
//! know the addresses before the server runs.
//!
//! Adding a service: a feature folder that declares it (see `points/mod.rs`), and one line in
//! [`loyalty_services`]. Its health status, scope table entries, limits and metrics labels all
//! follow from the declaration.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::RoutesBuilder;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use crate::access::Authenticator;
use crate::config::ServerConfig;
use crate::error::Error;
use crate::events::{Events, EventsConfig, Hub};
use crate::platform::Parts;
use crate::platform::cache::Cache;
use crate::platform::cache_repair::Publisher;
use crate::platform::clock::{Clock, SystemClock};
use crate::platform::connections::{ConnectionLimits, accept_within};
use crate::platform::layers::auth::AuthLayer;
use crate::platform::layers::deadline::DeadlineLayer;
use crate::platform::layers::metrics::MetricsLayer;
use crate::platform::layers::read_body::ReadBodyLayer;
use crate::platform::layers::request_span::RequestSpanLayer;
use crate::platform::layers::shed::ShedLayer;
use crate::platform::layers::streams::StreamsLayer;
use crate::platform::layers::unreadable::unreadable_request_status;
use crate::platform::service::{Access, Declaration, Method, MethodTable, Service};
use crate::platform::store::Store;
use crate::programs::ProgramCache;
use crate::telemetry::Metrics;
use crate::{engagement, jobs, members, pb, points, programs};

/// HTTP/2 flow-control windows: the request bytes a connection may send before the server
/// reads them (hyper's defaults, set here because the memory bound in RELIABILITY.md rests on
/// them).
const CONNECTION_WINDOW_BYTES: u32 = 1024 * 1024;
const STREAM_WINDOW_BYTES: u32 = 1024 * 1024;

/// Every service of the loyalty API, built from the shared parts. Adding a service: a
/// feature folder, and one line here.
fn loyalty_services(
    parts: &Parts,
    program_cache: &ProgramCache,
    hub: &Hub,
    events: &EventsConfig,
) -> Vec<Service> {
    vec![
        points::service(parts, program_cache),
        members::service(parts, program_cache),
        programs::service(parts, program_cache),
        engagement::service(parts, hub, events),
    ]
}

/// gRPC health: public; `Watch` is a stream.
const HEALTH: Declaration = Declaration {
    name: tonic_health::pb::health_server::SERVICE_NAME,
    methods: &[
        Method::unary("Check", Access::Public),
        Method::streaming("Watch", Access::Public),
    ],
};

/// gRPC reflection, both versions in use: public streams.
const REFLECTION_V1: Declaration = Declaration {
    name: tonic_reflection::pb::v1::server_reflection_server::SERVICE_NAME,
    methods: &[Method::streaming("ServerReflectionInfo", Access::Public)],
};
const REFLECTION_V1ALPHA: Declaration = Declaration {
    name: tonic_reflection::pb::v1alpha::server_reflection_server::SERVICE_NAME,
    methods: &[Method::streaming("ServerReflectionInfo", Access::Public)],
};

/// Health and reflection, declared and capped like every other service.
fn public_services(
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    max_message: usize,
) -> Result<Vec<Service>, Error> {
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    Ok(vec![
        Service::new(HEALTH, health.max_decoding_message_size(max_message)),
        Service::new(
            REFLECTION_V1,
            reflection()
                .build_v1()
                .map_err(Error::internal)?
                .max_decoding_message_size(max_message),
        ),
        Service::new(
            REFLECTION_V1ALPHA,
            reflection()
                .build_v1alpha()
                .map_err(Error::internal)?
                .max_decoding_message_size(max_message),
        ),
    ])
}

pub struct Application {
    config: ServerConfig,
    grpc_listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    parts: Parts,
    program_cache: ProgramCache,
    metrics: Metrics,
    authenticator: Arc<Authenticator>,
    /// Services added by the embedder (the test kit's streaming probe).
    extra_services: Vec<Service>,
    /// The shared reader of the event stream (started by `run_until`).
    hub: Hub,
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
        crate::platform::tls::install_crypto_provider();
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
            metrics.clone(),
            clock.clone(),
            config.key_cache_ttl,
            config.rate_limit,
            config.failed_auth_limit,
        ));
        let parts = Parts {
            publisher: Publisher::new(store.clone(), cache),
            store,
            clock,
            max_message_bytes: config.max_message_bytes,
        };
        Ok(Application {
            config,
            grpc_listener,
            metrics_listener,
            parts,
            program_cache: ProgramCache::default(),
            metrics,
            authenticator,
            extra_services: Vec::new(),
            hub: Hub::new(),
        })
    }

    /// Serves `service` beside the loyalty API, under the same layers (for tests: a
    /// streaming probe).
    pub fn with_service(mut self, service: Service) -> Application {
        self.extra_services.push(service);
        self
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

    pub fn store(&self) -> &Store {
        &self.parts.store
    }

    pub fn cache(&self) -> &Cache {
        self.parts.publisher.cache()
    }

    /// The points use cases, sweep included (tests run sweep passes by hand).
    pub fn points(&self) -> crate::points::Points {
        crate::points::Points::new(&self.parts, &self.program_cache)
    }

    /// The event use cases: tests run sequencer, pruning and warning passes by hand. They
    /// share this server's reader.
    pub fn events(&self) -> Events {
        Events::new(&self.parts, &self.hub, &self.config.events)
    }

    /// The greeting use cases, the job's pass included (tests run passes by hand).
    pub fn greetings(&self) -> crate::greetings::Greetings {
        crate::greetings::Greetings::new(&self.parts)
    }

    /// The cache's publisher and repairer (tests run a repair pass by hand).
    pub fn publisher(&self) -> &Publisher {
        &self.parts.publisher
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
            parts,
            program_cache,
            metrics,
            authenticator,
            extra_services,
            hub,
        } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let (draining_tx, draining_rx) = watch::channel(false);
        let mut background = Vec::new();

        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        let mut services = loyalty_services(&parts, &program_cache, &hub, &config.events);
        let probe = HealthProbe {
            store: parts.store.clone(),
            reporter: health_reporter,
            metrics: metrics.clone(),
            max_connections: config.database.max_connections,
            services: services.iter().map(|s| s.declaration.name).collect(),
        };
        services.extend(extra_services);
        services.extend(public_services(health_service, config.max_message_bytes)?);
        let methods = Arc::new(MethodTable::new(services.iter().map(|s| &s.declaration)));
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
        background.push(jobs::cache_repair(parts.publisher.clone(), stop_rx.clone()));
        // With the outbox off nothing is written for the stream's jobs to work on.
        if parts.store.writes_outbox() {
            background.extend(hub.start(parts.store.clone(), stop_rx.clone()));
            let events = Events::new(&parts, &hub, &config.events);
            background.push(jobs::event_sequencer(
                events.clone(),
                config.events.poll_interval,
                stop_rx.clone(),
            ));
            if let Some(interval) = config.events.prune_interval {
                background.push(jobs::event_pruning(
                    events.clone(),
                    interval,
                    stop_rx.clone(),
                ));
            }
            if let Some(interval) = config.events.warning_interval {
                background.push(jobs::expiry_warnings(events, interval, stop_rx.clone()));
            }
        }
        if let Some(interval) = config.sweep_interval {
            let points = crate::points::Points::new(&parts, &program_cache);
            background.push(jobs::points_sweep(
                points.clone(),
                interval,
                stop_rx.clone(),
            ));
            background.push(jobs::standing_sweep(points, interval, stop_rx.clone()));
        }
        if let Some(interval) = config.greeting_interval {
            let greetings = crate::greetings::Greetings::new(&parts);
            background.push(jobs::greetings(greetings, interval, stop_rx.clone()));
        }

        if let Some(listener) = metrics_listener {
            background.push(serve_metrics(listener, metrics.clone(), stop_rx.clone()));
        }

        let mut routes = RoutesBuilder::default();
        for service in services {
            service.add_to(&mut routes);
        }

        let addr = grpc_listener.local_addr().map_err(Error::internal)?;
        let incoming = accept_within(
            grpc_listener,
            ConnectionLimits {
                max_connections: config.max_connections,
                max_connections_per_peer: config.max_connections_per_peer,
                body_budget_bytes: config.max_message_bytes + 5,
            },
        );
        let mut server = Server::builder();
        if let Some(tls) = &config.tls {
            server = server
                .tls_config(tls.server_config())
                .map_err(|e| Error::internal(format!("TLS configuration: {e}")))?;
        } else if !addr.ip().is_loopback() {
            tracing::warn!(
                %addr,
                "serving plaintext gRPC beyond loopback: set LOYALTY_TLS_CERT and LOYALTY_TLS_KEY \
                 unless a TLS-terminating proxy is in front"
            );
        }
        let client_certificates = config
            .tls
            .as_ref()
            .and_then(|tls| tls.client_certificates())
            .cloned();
        let router = server
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .max_concurrent_streams(Some(config.max_streams_per_connection))
            // What a connection may have sent and we not yet read: bounds memory per connection.
            .initial_connection_window_size(Some(CONNECTION_WINDOW_BYTES))
            .initial_stream_window_size(Some(STREAM_WINDOW_BYTES))
            .layer(RequestSpanLayer::new(methods))
            .layer(MetricsLayer::new(metrics.clone()))
            .layer(tower::util::MapResponseLayer::new(
                unreadable_request_status,
            ))
            .layer(DeadlineLayer::new(config.request_timeout))
            .layer(ReadBodyLayer::new(config.max_message_bytes))
            .layer(ShedLayer::new(
                config.max_in_flight,
                config.max_public_in_flight,
                config.queue_timeout,
            ))
            .layer(AuthLayer::new(authenticator).client_certificates(client_certificates))
            .layer(StreamsLayer::new(
                config.max_streams,
                config.max_public_streams,
                draining_rx.clone(),
            ))
            .add_routes(routes.routes());

        tracing::info!(
            %addr,
            tls = config.tls.is_some(),
            client_certificates = ?config
                .tls
                .as_ref()
                .and_then(|tls| tls.client_certificates())
                .map(|c| c.scopes()),
            cache = parts.publisher.cache().is_enabled(),
            "serving gRPC"
        );
        let mut draining = draining_rx;
        let signal = async move {
            shutdown.await;
            let _ = draining_tx.send(true);
        };
        let serve = router.serve_with_incoming_shutdown(incoming, signal);
        let grace = config.shutdown_grace;
        let result = tokio::select! {
            result = serve => result.map_err(Error::internal),
            _ = async {
                let _ = draining.wait_for(|draining| *draining).await;
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
        parts.store.close().await;
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
    /// The services that report a status, besides the overall "" entry.
    services: Vec<&'static str>,
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
        for service in std::iter::once("").chain(self.services.iter().copied()) {
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use prost::Message;

    use super::*;
    use crate::platform::caller::Scope;
    use crate::platform::store::DatabaseConfig;

    /// The services as `run_until` builds them (no connection is made).
    fn services() -> Vec<Service> {
        let store = Store::connect_lazy(&DatabaseConfig {
            url: "postgres://nobody@127.0.0.1:1/none".into(),
            max_connections: 1,
            acquire_timeout: Duration::from_millis(10),
            statement_timeout: Duration::from_millis(10),
            outbox: true,
        })
        .unwrap();
        let parts = Parts {
            publisher: Publisher::new(store.clone(), Cache::disabled()),
            store,
            clock: Arc::new(SystemClock),
            max_message_bytes: 1024,
        };
        loyalty_services(
            &parts,
            &ProgramCache::default(),
            &Hub::new(),
            &EventsConfig::default(),
        )
    }

    #[tokio::test]
    async fn scopes_by_method() {
        let services = services();
        let declarations = services.iter().map(|s| &s.declaration);
        let table = MethodTable::new(declarations.chain([&HEALTH, &REFLECTION_V1]));
        let allows = |path: &str, scope: Scope| match table.route(path).access {
            Access::Scopes(scopes) => scopes.contains(&scope),
            Access::Public => panic!("{path} is public"),
        };
        assert_eq!(
            table.route("/grpc.health.v1.Health/Check").access,
            Access::Public
        );
        assert_eq!(
            table
                .route("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
                .access,
            Access::Public
        );
        assert!(allows(
            "/loyalty.v1.CheckoutService/RecordPurchase",
            Scope::Pos
        ));
        assert!(!allows(
            "/loyalty.v1.CheckoutService/RecordPurchase",
            Scope::App
        ));
        assert!(allows("/loyalty.v1.MemberService/GetBalance", Scope::App));
        assert!(!allows(
            "/loyalty.v1.MemberService/EnrollCustomer",
            Scope::App
        ));
        assert!(allows(
            "/loyalty.v1.MemberService/EnrollCustomer",
            Scope::Pos
        ));
        assert!(!allows(
            "/loyalty.v1.ProgramService/UpdateProgram",
            Scope::Pos
        ));
        assert!(allows(
            "/loyalty.v1.ProgramService/UpdateProgram",
            Scope::Admin
        ));
        assert!(!allows(
            "/loyalty.v1.CheckoutService/RecordPurchase",
            Scope::Scheduler
        ));
        assert!(allows("/loyalty.v2.Anything/Else", Scope::Admin));
        assert!(!allows("/loyalty.v2.Anything/Else", Scope::Pos));
        // Undeclared paths fail closed, wherever they point.
        assert!(!allows("/grpc.health.v1.Health/Unknown", Scope::Pos));
        assert!(allows("/other.Service/Method", Scope::Admin));
    }

    /// A method added to a proto but not to its feature's declaration would get no scopes;
    /// this keeps the two equal (a method declared twice would show up twice here).
    #[tokio::test]
    async fn every_rpc_of_the_api_is_declared_once_with_its_kind() {
        let set = prost_types::FileDescriptorSet::decode(pb::FILE_DESCRIPTOR_SET).unwrap();
        let mut in_proto = BTreeSet::new();
        for file in set.file {
            let package = file.package.unwrap_or_default();
            for service in file.service {
                for method in &service.method {
                    let streaming = method.server_streaming() || method.client_streaming();
                    in_proto.insert((
                        format!("{package}.{}", service.name()),
                        method.name().to_string(),
                        streaming,
                    ));
                }
            }
        }
        let mut declared: Vec<_> = services()
            .iter()
            .flat_map(|service| {
                let name = service.declaration.name;
                service.declaration.methods.iter().map(move |method| {
                    (
                        name.to_string(),
                        method.name.to_string(),
                        method.kind == crate::platform::service::Kind::Streaming,
                    )
                })
            })
            .collect();
        declared.sort();
        assert_eq!(declared, in_proto.into_iter().collect::<Vec<_>>());
    }
}
