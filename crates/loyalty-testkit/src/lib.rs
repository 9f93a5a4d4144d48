//! The test kit of the loyalty service, shared by its integration tests (`tests/`) and usable by
//! anyone testing against it: a fresh database per test (cloned from a migrated template), a unique Redis
//! key prefix per test, a real server on an ephemeral port, and generated tonic clients that
//! send an API key.
//!
//! Environment: `TEST_DATABASE_URL` (a Postgres server's maintenance database, default
//! `postgres://postgres@127.0.0.1:5432/postgres`) and `TEST_REDIS_URL` (default
//! `redis://127.0.0.1:6379`). `scripts/test.sh` sets both.
#![allow(dead_code)]

pub mod cluster;
pub mod probe;
pub mod proxy;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use loyalty::platform::clock::Clock;
use loyalty::{
    Application, Cache, CacheConfig, DatabaseConfig, MIGRATOR, MerchantId, Metrics, Publisher,
    Scope, ServerConfig, Store, pb,
};
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};
use tokio::sync::oneshot;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig};

pub fn admin_database_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string())
}

/// `url` with its database name replaced.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let server = match base.rfind('/') {
        Some(slash) if slash > "postgres://".len() => &base[..slash],
        _ => base,
    };
    match query {
        Some(query) => format!("{server}/{database}?{query}"),
        None => format!("{server}/{database}"),
    }
}

/// The `host:port` a URL points at.
pub fn socket_addr_of(url: &str) -> SocketAddr {
    let authority = url
        .split("://")
        .nth(1)
        .unwrap_or(url)
        .split(['/', '?'])
        .next()
        .unwrap();
    let host_port = authority.rsplit('@').next().unwrap();
    use std::net::ToSocketAddrs;
    host_port
        .to_socket_addrs()
        .expect("host:port")
        .next()
        .expect("an address")
}

/// `url` pointing at `addr` instead of its own host and port.
pub fn with_host(url: &str, addr: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL with a scheme");
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let userinfo = authority
        .rsplit_once('@')
        .map(|(u, _)| format!("{u}@"))
        .unwrap_or_default();
    format!("{scheme}://{userinfo}{addr}{tail}")
}

/// A database of our own, cloned from a migrated template.
pub struct TestDb {
    pub name: String,
    pub url: String,
    admin_url: String,
}

impl TestDb {
    /// An existing database (e.g. an empty one the server is to migrate), dropped like a
    /// cloned one.
    pub fn existing(admin_url: &str, name: &str) -> TestDb {
        TestDb {
            name: name.to_string(),
            url: with_database(admin_url, name),
            admin_url: admin_url.to_string(),
        }
    }

    pub async fn create() -> TestDb {
        Self::create_on(&admin_database_url()).await
    }

    /// On the Postgres server whose maintenance database is `admin_url`.
    pub async fn create_on(admin_url: &str) -> TestDb {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let mut admin = PgConnection::connect(admin_url).await.unwrap_or_else(|e| {
            panic!("cannot connect to {admin_url}: {e} (set TEST_DATABASE_URL)")
        });
        let template = ensure_template(&mut admin, admin_url).await;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let name = format!(
            "loyalty_t_{now}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        // Several test processes may clone the template at the same moment; Postgres refuses
        // a clone while another session is connected to the template, so retry briefly.
        let mut attempt = 0;
        loop {
            let created = sqlx::raw_sql(AssertSqlSafe(format!(
                "CREATE DATABASE {name} TEMPLATE {template}"
            )))
            .execute(&mut admin)
            .await;
            match created {
                Ok(_) => break,
                Err(e) if attempt < 50 => {
                    attempt += 1;
                    tracing_hint(&e);
                    tokio::time::sleep(Duration::from_millis(50 + 20 * attempt)).await;
                }
                Err(e) => panic!("cannot create test database {name}: {e}"),
            }
        }
        let _ = admin.close().await;
        TestDb {
            url: with_database(admin_url, &name),
            name,
            admin_url: admin_url.to_string(),
        }
    }

    pub async fn pool(&self) -> PgPool {
        PgPoolOptions::new()
            .max_connections(8)
            .connect(&self.url)
            .await
            .expect("test pool")
    }

    /// Drops the database (best effort; leftovers are removed by later runs).
    pub async fn drop_database(&self) {
        if let Ok(mut admin) = PgConnection::connect(&self.admin_url).await {
            let _ = sqlx::raw_sql(AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .execute(&mut admin)
            .await;
        }
    }
}

fn tracing_hint(_error: &sqlx::Error) {}

/// The migrated template for the current set of migrations, created once per server.
/// Also removes test databases left behind by runs more than two hours old.
async fn ensure_template(admin: &mut PgConnection, admin_url: &str) -> String {
    let mut fingerprint: u64 = 1469598103934665603;
    for migration in MIGRATOR.iter() {
        for byte in migration
            .checksum
            .iter()
            .chain(migration.version.to_be_bytes().iter())
        {
            fingerprint = (fingerprint ^ u64::from(*byte)).wrapping_mul(1099511628211);
        }
    }
    let template = format!("loyalty_tpl_{:016x}", fingerprint);
    sqlx::query("SELECT pg_advisory_lock(774411)")
        .execute(&mut *admin)
        .await
        .unwrap();
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&template)
            .fetch_one(&mut *admin)
            .await
            .unwrap();
    if !exists {
        let building = format!("{template}_building");
        sqlx::raw_sql(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {building}")))
            .execute(&mut *admin)
            .await
            .unwrap();
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {building}")))
            .execute(&mut *admin)
            .await
            .unwrap();
        {
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .connect(&with_database(admin_url, &building))
                .await
                .unwrap();
            MIGRATOR
                .run(&pool)
                .await
                .expect("migrations apply to an empty database");
            pool.close().await;
        }
        sqlx::raw_sql(AssertSqlSafe(format!(
            "ALTER DATABASE {building} RENAME TO {template}"
        )))
        .execute(&mut *admin)
        .await
        .unwrap();
        let cutoff = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            - 7200;
        let stale: Vec<String> = sqlx::query_scalar(
            "SELECT datname FROM pg_database
              WHERE datname LIKE 'loyalty\\_t\\_%' AND split_part(datname, '_', 3)::bigint < $1",
        )
        .bind(cutoff as i64)
        .fetch_all(&mut *admin)
        .await
        .unwrap_or_default();
        for name in stale {
            let _ = sqlx::raw_sql(AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&mut *admin)
            .await;
        }
    }
    sqlx::query("SELECT pg_advisory_unlock(774411)")
        .execute(&mut *admin)
        .await
        .unwrap();
    template
}

/// Sends `authorization: Bearer <key>` with every call.
#[derive(Clone)]
pub struct Bearer(pub MetadataValue<tonic::metadata::Ascii>);

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

pub type Authed = InterceptedService<Channel, Bearer>;
pub type CheckoutClient = pb::checkout_service_client::CheckoutServiceClient<Authed>;
pub type MemberClient = pb::member_service_client::MemberServiceClient<Authed>;
pub type ProgramClient = pb::program_service_client::ProgramServiceClient<Authed>;
pub type EngagementClient = pb::engagement_service_client::EngagementServiceClient<Authed>;

/// A merchant of the test server with its admin key.
#[derive(Clone)]
pub struct Merchant {
    pub id: MerchantId,
    pub admin_key: String,
}

/// Server settings a test may change before spawning.
pub struct Options {
    pub redis_url: Option<String>,
    /// The CA of a `rediss://` Redis (PEM), instead of the system's roots.
    pub redis_ca_cert_pem: Option<Vec<u8>>,
    /// Serve over TLS (see [`tls::TestPki::server_tls`]); `None`: plaintext.
    pub tls: Option<loyalty::ServerTls>,
    pub database_url: Option<String>,
    pub rate_limit: Option<loyalty::RateLimit>,
    /// Per peer address: lookups of keys that turn out unknown.
    pub failed_auth_limit: loyalty::RateLimit,
    pub max_in_flight: usize,
    /// Streams open at once (their own pool, apart from `max_in_flight`).
    pub max_streams: usize,
    pub max_public_in_flight: usize,
    pub max_public_streams: usize,
    pub max_connections: usize,
    pub max_connections_per_peer: usize,
    pub max_streams_per_connection: u32,
    /// Serve the test kit's streaming probe ([`probe`]) beside the loyalty API.
    pub streaming_probe: bool,
    pub queue_timeout: Duration,
    pub request_timeout: Duration,
    pub max_message_bytes: usize,
    pub key_cache_ttl: Duration,
    /// How long one Redis operation may take before the cache counts as down.
    pub cache_timeout: Duration,
    pub health_interval: Duration,
    /// The background points sweep; `None` (the default) leaves it to the test, which runs
    /// passes by hand through `TestApp::points`.
    pub sweep_interval: Option<Duration>,
    /// The event stream's settings. By default the sequencer runs (every 20 ms) and pruning
    /// and expiry warnings are left to the test, which runs passes by hand through
    /// `TestApp::events`.
    pub events: loyalty::events::EventsConfig,
    /// Whether the server's sessions write the event outbox (`LOYALTY_EVENTS_OUTBOX`); on by
    /// default.
    pub outbox: bool,
    /// The background greeting job; `None` (the default) leaves it to the test, which runs
    /// passes by hand through `TestApp::greetings`.
    pub greeting_interval: Option<Duration>,
    pub db_max_connections: u32,
    /// How long a request waits for a pooled connection (e.g. while Postgres is down).
    pub db_acquire_timeout: Duration,
    /// Share another server's Redis keys (its `TestApp::key_prefix`) instead of our own.
    pub key_prefix: Option<String>,
    /// Reach Postgres through this address (a [`proxy::Proxy`]) instead of directly.
    pub database_via: Option<SocketAddr>,
    /// The server's clock (e.g. a [`ShiftedClock`] a test moves forward); the system clock
    /// when `None`.
    pub clock: Option<Arc<dyn Clock>>,
}

/// The system clock moved by an offset a test can change while the server runs.
#[derive(Debug, Default)]
pub struct ShiftedClock {
    offset_seconds: AtomicI64,
}

impl ShiftedClock {
    pub fn advance(&self, by: Duration) {
        self.offset_seconds
            .fetch_add(by.as_secs() as i64, Ordering::SeqCst);
    }
}

impl Clock for ShiftedClock {
    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::Utc::now() + chrono::Duration::seconds(self.offset_seconds.load(Ordering::SeqCst))
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            redis_url: Some(redis_url()),
            redis_ca_cert_pem: None,
            tls: None,
            database_url: None,
            rate_limit: None,
            failed_auth_limit: loyalty::RateLimit {
                per_second: 1000,
                burst: 1000,
            },
            max_in_flight: 256,
            max_streams: 1000,
            max_public_in_flight: 16,
            max_public_streams: 100,
            max_connections: 512,
            max_connections_per_peer: 128,
            max_streams_per_connection: 100,
            streaming_probe: false,
            queue_timeout: Duration::from_millis(250),
            request_timeout: Duration::from_secs(10),
            max_message_bytes: 1024 * 1024,
            key_cache_ttl: Duration::from_millis(200),
            cache_timeout: Duration::from_millis(200),
            health_interval: Duration::from_millis(100),
            sweep_interval: None,
            events: loyalty::events::EventsConfig {
                prune_interval: None,
                warning_interval: None,
                ..loyalty::events::EventsConfig::default()
            },
            outbox: true,
            greeting_interval: None,
            db_max_connections: 16,
            db_acquire_timeout: Duration::from_secs(2),
            database_via: None,
            key_prefix: None,
            clock: None,
        }
    }
}

/// The name the service gives the Redis server `redis` reaches (a segment of its cache keys).
pub async fn redis_server_name_of(redis: &mut redis::aio::MultiplexedConnection) -> String {
    let server: String = redis::cmd("INFO")
        .arg("server")
        .query_async(redis)
        .await
        .expect("INFO server");
    let replication: String = redis::cmd("INFO")
        .arg("replication")
        .query_async(redis)
        .await
        .expect("INFO replication");
    loyalty::redis_server_name(&server, &replication).expect("a primary")
}

/// Logs go through the test harness's capture (shown only for failing tests). `RUST_LOG`
/// overrides the default level.
pub fn init_test_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,h2=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A child process's piped stdout and stderr, read to the end on threads of their own while
/// it runs. A child whose output nobody reads blocks on its next write once a pipe buffer
/// (64 KiB) is full: a server logging at trace level gets there within seconds, and then
/// cannot even finish its shutdown after SIGTERM.
pub struct DrainedOutput {
    stdout: std::thread::JoinHandle<Vec<u8>>,
    stderr: std::thread::JoinHandle<Vec<u8>>,
}

impl DrainedOutput {
    /// Starts reading; the child must have been spawned with both piped.
    pub fn of(child: &mut std::process::Child) -> DrainedOutput {
        fn read_all(
            mut pipe: impl std::io::Read + Send + 'static,
        ) -> std::thread::JoinHandle<Vec<u8>> {
            std::thread::spawn(move || {
                let mut all = Vec::new();
                let _ = pipe.read_to_end(&mut all);
                all
            })
        }
        DrainedOutput {
            stdout: read_all(child.stdout.take().expect("stdout is piped")),
            stderr: read_all(child.stderr.take().expect("stderr is piped")),
        }
    }

    /// Everything the child wrote, (stdout, stderr); returns once it closed both (exited).
    pub fn finish(self) -> (Vec<u8>, Vec<u8>) {
        (
            self.stdout.join().expect("stdout reader"),
            self.stderr.join().expect("stderr reader"),
        )
    }
}

/// The `loyalty` binary of this build: `LOYALTY_BIN` when set, else the one cargo built next to
/// the running test (`target/<profile>/loyalty`, the test itself being in `deps/`).
pub fn loyalty_binary() -> std::path::PathBuf {
    if let Some(path) = std::env::var_os("LOYALTY_BIN") {
        return path.into();
    }
    let exe = std::env::current_exe().expect("the test knows its own path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("tests run from target/<profile>/deps");
    profile_dir.join("loyalty")
}

/// A running server on its own database.
pub struct TestApp {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub db: TestDb,
    pub cache: Cache,
    /// Publishes to the cache and repairs it (a test runs a repair pass by hand).
    pub publisher: Publisher,
    pub metrics: Metrics,
    pub store: Store,
    /// The server's points use cases (a test runs sweep passes by hand).
    pub points: loyalty::points::Points,
    /// The server's event use cases (a test runs pruning and warning passes by hand).
    pub events: loyalty::events::Events,
    /// The server's greeting use cases (a test runs job passes by hand).
    pub greetings: loyalty::greetings::Greetings,
    pub pool: PgPool,
    pub key_prefix: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), loyalty::Error>>>,
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(Options::default()).await
    }

    pub async fn spawn_with(options: Options) -> TestApp {
        let db = TestDb::create().await;
        Self::spawn_on(db, options).await
    }

    /// A server on an existing database (the reliability suite brings its own Postgres).
    pub async fn spawn_on(db: TestDb, options: Options) -> TestApp {
        init_test_tracing();
        let key_prefix = options
            .key_prefix
            .clone()
            .unwrap_or_else(|| format!("test:{}", db.name));
        let config = ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            tls: options.tls.clone(),
            metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
            database: DatabaseConfig {
                url: {
                    let url = options
                        .database_url
                        .clone()
                        .unwrap_or_else(|| db.url.clone());
                    match options.database_via {
                        Some(addr) => with_host(&url, addr),
                        None => url,
                    }
                },
                max_connections: options.db_max_connections,
                acquire_timeout: options.db_acquire_timeout,
                statement_timeout: Duration::from_secs(5),
                outbox: options.outbox,
            },
            cache: CacheConfig {
                url: options.redis_url.clone(),
                ca_cert_pem: options.redis_ca_cert_pem.clone(),
                key_prefix: key_prefix.clone(),
                ttl: Duration::from_secs(300),
                timeout: options.cache_timeout,
                cool_down: Duration::from_millis(200),
            },
            key_cache_ttl: options.key_cache_ttl,
            rate_limit: options.rate_limit,
            failed_auth_limit: options.failed_auth_limit,
            max_in_flight: options.max_in_flight,
            max_streams: options.max_streams,
            max_public_in_flight: options.max_public_in_flight,
            max_public_streams: options.max_public_streams,
            max_connections: options.max_connections,
            max_connections_per_peer: options.max_connections_per_peer,
            max_streams_per_connection: options.max_streams_per_connection,
            queue_timeout: options.queue_timeout,
            request_timeout: options.request_timeout,
            max_message_bytes: options.max_message_bytes,
            health_interval: options.health_interval,
            sweep_interval: options.sweep_interval,
            events: options.events,
            greeting_interval: options.greeting_interval,
            shutdown_grace: Duration::from_secs(5),
            startup_timeout: Duration::from_secs(10),
            migrate: true,
        };
        let mut app = match options.clock.clone() {
            Some(clock) => Application::build_with_clock(config, clock).await,
            None => Application::build(config).await,
        }
        .expect("server builds");
        if options.streaming_probe {
            app = app.with_service(probe::service());
        }
        let addr = app.grpc_addr();
        let metrics_addr = app.metrics_addr().expect("metrics listener");
        let cache = app.cache().clone();
        let publisher = app.publisher().clone();
        let metrics = app.metrics().clone();
        let store = app.store().clone();
        let points = app.points();
        let events = app.events();
        let greetings = app.greetings();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(app.run_until(async move {
            let _ = stopped.await;
        }));
        let pool = db.pool().await;
        TestApp {
            addr,
            metrics_addr,
            db,
            cache,
            publisher,
            metrics,
            store,
            points,
            events,
            greetings,
            pool,
            key_prefix,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops the server (gracefully), keeping the database.
    pub async fn shutdown_server(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }

    /// Stops the server gracefully and drops the database.
    pub async fn stop(mut self) {
        self.shutdown_server().await;
        self.pool.close().await;
        self.db.drop_database().await;
    }

    /// A new merchant (with the default EUR program) and its admin key.
    /// A transaction holding the account row of `external_id` (of any merchant) FOR UPDATE,
    /// as a long write of another request would: purchases for that customer wait until it
    /// ends (commit or drop).
    pub async fn hold_account(
        &self,
        external_id: &str,
    ) -> sqlx::Transaction<'static, sqlx::Postgres> {
        let mut holder = self.pool.begin().await.unwrap();
        sqlx::query(
            "SELECT a.version FROM accounts a JOIN customers c
                ON c.merchant_id = a.merchant_id AND c.id = a.customer_id
             WHERE c.external_id = $1 FOR UPDATE OF a",
        )
        .bind(external_id)
        .execute(&mut *holder)
        .await
        .unwrap();
        holder
    }

    pub async fn merchant(&self) -> Merchant {
        self.merchant_in("EUR").await
    }

    pub async fn merchant_in(&self, currency: &str) -> Merchant {
        let (id, key) = loyalty::create_merchant(&self.store, "Test merchant", currency)
            .await
            .expect("merchant created");
        Merchant {
            id,
            admin_key: key.secret.expose().to_string(),
        }
    }

    pub async fn key(&self, merchant: &Merchant, scope: Scope) -> String {
        loyalty::create_key(&self.store, merchant.id, scope)
            .await
            .expect("key created")
            .secret
            .expose()
            .to_string()
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .expect("connect to test server")
    }

    /// A plaintext channel, or the error connecting (e.g. to a server that speaks TLS).
    pub async fn try_channel(&self) -> Result<Channel, tonic::transport::Error> {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
    }

    /// A channel over TLS (the server must serve with [`Options::tls`]); an error when the
    /// handshake fails.
    pub async fn tls_channel(
        &self,
        tls: ClientTlsConfig,
    ) -> Result<Channel, tonic::transport::Error> {
        Channel::from_shared(format!("https://{}", self.addr))
            .unwrap()
            .tls_config(tls)?
            .connect()
            .await
    }

    pub fn bearer(key: &str) -> Bearer {
        Bearer(format!("Bearer {key}").parse().expect("ascii key"))
    }

    pub async fn checkout(&self, key: &str) -> CheckoutClient {
        pb::checkout_service_client::CheckoutServiceClient::with_interceptor(
            self.channel().await,
            Self::bearer(key),
        )
    }

    pub async fn member(&self, key: &str) -> MemberClient {
        pb::member_service_client::MemberServiceClient::with_interceptor(
            self.channel().await,
            Self::bearer(key),
        )
    }

    /// A customer token for `external_id`, minted with `key` (app, pos or admin).
    pub async fn customer_token(&self, key: &str, external_id: &str) -> String {
        self.member(key)
            .await
            .issue_customer_token(pb::IssueCustomerTokenRequest {
                external_id: external_id.to_string(),
                ttl_seconds: 0,
            })
            .await
            .expect("token issued")
            .into_inner()
            .token
    }

    pub async fn program(&self, key: &str) -> ProgramClient {
        pb::program_service_client::ProgramServiceClient::with_interceptor(
            self.channel().await,
            Self::bearer(key),
        )
    }

    pub async fn engagement(&self, key: &str) -> EngagementClient {
        pb::engagement_service_client::EngagementServiceClient::with_interceptor(
            self.channel().await,
            Self::bearer(key),
        )
    }

    /// A client of the streaming probe (served with `Options::streaming_probe`).
    pub async fn probe(&self, key: &str) -> probe::ProbeClient<Authed> {
        probe::ProbeClient::with_interceptor(self.channel().await, Self::bearer(key))
    }

    /// The Prometheus text of the server.
    pub async fn metrics_text(&self) -> String {
        http_get(self.metrics_addr, "/metrics").await
    }

    /// Row counts of the tables a write touches, to prove a refused write wrote nothing.
    pub async fn row_counts(&self) -> RowCounts {
        let count = |table: &'static str| {
            let pool = self.pool.clone();
            async move {
                sqlx::query_scalar::<_, i64>(AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
                    .fetch_one(&pool)
                    .await
                    .unwrap()
            }
        };
        RowCounts {
            customers: count("customers").await,
            purchases: count("purchases").await,
            purchase_lines: count("purchase_lines").await,
            ledger_entries: count("ledger_entries").await,
            account_version_sum: sqlx::query_scalar::<_, Option<i64>>(
                "SELECT sum(version)::bigint FROM accounts",
            )
            .fetch_one(&self.pool)
            .await
            .unwrap()
            .unwrap_or(0),
            programs_version_sum: sqlx::query_scalar::<_, Option<i64>>(
                "SELECT sum(version)::bigint FROM programs",
            )
            .fetch_one(&self.pool)
            .await
            .unwrap()
            .unwrap_or(0),
            lifecycle_rows: count("point_lots").await
                + count("lot_movements").await
                + count("redemptions").await
                + count("reservations").await
                + count("purchase_returns").await
                + count("adjustments").await,
        }
    }

    /// Checks rule 1 for every customer: available + pending == Σ ledger points.
    pub async fn assert_ledger_invariant(&self) {
        let broken: Vec<(i64, i64, i64, i64)> = sqlx::query_as(
            "SELECT a.customer_id, a.available, a.pending, COALESCE(sum(e.points), 0)::bigint
               FROM accounts a
               LEFT JOIN ledger_entries e ON e.merchant_id = a.merchant_id AND e.customer_id = a.customer_id
              GROUP BY a.merchant_id, a.customer_id, a.available, a.pending
             HAVING a.available + a.pending <> COALESCE(sum(e.points), 0)",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap();
        assert!(
            broken.is_empty(),
            "accounts disagree with their ledger: {broken:?}"
        );
        self.assert_lots_invariant().await;
    }

    /// Checks that every account agrees with its lots: spendable lots hold exactly the
    /// available points (none while a return's debt is open), pending lots the pending
    /// points, and the debt is exactly what available is below zero.
    pub async fn assert_lots_invariant(&self) {
        let broken: Vec<(i64, i64, i64, i64, i64, i64)> = sqlx::query_as(
            "SELECT a.customer_id, a.available, a.pending, a.debt,
                    COALESCE(sum(l.remaining) FILTER (WHERE l.matured), 0)::bigint AS spendable,
                    COALESCE(sum(l.remaining) FILTER (WHERE NOT l.matured), 0)::bigint AS held
               FROM accounts a
               LEFT JOIN point_lots l ON l.merchant_id = a.merchant_id AND l.customer_id = a.customer_id
              GROUP BY a.merchant_id, a.customer_id, a.available, a.pending, a.debt
             HAVING greatest(a.available, 0) <> COALESCE(sum(l.remaining) FILTER (WHERE l.matured), 0)
                 OR a.pending <> COALESCE(sum(l.remaining) FILTER (WHERE NOT l.matured), 0)
                 OR a.debt <> greatest(-a.available, 0)",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap();
        assert!(
            broken.is_empty(),
            "accounts disagree with their lots (customer, available, pending, debt, spendable \
             lots, pending lots): {broken:?}"
        );
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowCounts {
    pub customers: i64,
    pub purchases: i64,
    pub purchase_lines: i64,
    pub ledger_entries: i64,
    pub account_version_sum: i64,
    pub programs_version_sum: i64,
    /// Lots, lot movements and the rows of redemptions, holds, returns and adjustments.
    pub lifecycle_rows: i64,
}

/// A minimal HTTP/1.1 GET (the metrics endpoint is plain HTTP).
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

/// The value of a Prometheus sample whose line starts with `prefix` (name and labels).
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(name) && !line.starts_with('#'))
        .filter(|line| {
            labels
                .iter()
                .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A valid purchase of `total` cents in two lines.
pub fn purchase(external_id: &str, purchase_id: &str, total: i64) -> pb::RecordPurchaseRequest {
    let first = total / 2;
    pb::RecordPurchaseRequest {
        external_id: external_id.to_string(),
        purchase_id: purchase_id.to_string(),
        store_id: "store-1".to_string(),
        occurred_at: Some(now_timestamp()),
        currency: "EUR".to_string(),
        total_minor: total,
        lines: vec![
            pb::PurchaseLine {
                sku: "espresso".into(),
                category: "coffee".into(),
                quantity: 1,
                amount_minor: first,
            },
            pb::PurchaseLine {
                sku: "croissant".into(),
                category: "bakery".into(),
                quantity: 2,
                amount_minor: total - first,
            },
        ],
    }
}

pub fn now_timestamp() -> prost_types::Timestamp {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    prost_types::Timestamp {
        seconds: now.as_secs() as i64,
        nanos: 0,
    }
}

pub fn timestamp_in(seconds_from_now: i64) -> prost_types::Timestamp {
    let now = now_timestamp();
    prost_types::Timestamp {
        seconds: now.seconds + seconds_from_now,
        nanos: 0,
    }
}

/// The fields named by an INVALID_ARGUMENT's BadRequest details.
pub fn violated_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// Records the figures of a reliability scenario: `target/reliability/<scenario>.json` (quoted
/// by RELIABILITY.md) and one summary line on stdout.
pub fn report(scenario: &str, figures: serde_json::Value) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target")
        .join("reliability");
    let _ = std::fs::create_dir_all(&dir);
    let mut figures = figures;
    if let Some(map) = figures.as_object_mut() {
        map.insert("scenario".into(), scenario.into());
        map.insert(
            "finished_at".into(),
            chrono::Utc::now()
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                .into(),
        );
    }
    let _ = std::fs::write(dir.join(format!("{scenario}.json")), format!("{figures}\n"));
    println!("RELIABILITY {figures}");
}
