//! Command line and environment. Every flag has a `LOYALTY_*` (or the conventional
//! `DATABASE_URL` / `REDIS_URL`) environment fallback and a default that works on a developer
//! machine. Values are validated, never clamped: one out of range is a start-up error naming
//! the variable, its value and the range.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::events::EventsConfig;
use crate::platform::cache::CacheConfig;
use crate::platform::rate_limit::RateLimit;
use crate::platform::store::DatabaseConfig;
use crate::platform::tls::{self, ServerTls};
use crate::telemetry::LogFormat;

/// Checks that a setting lies in `min..=max`; the error names its environment variable.
fn within<T: PartialOrd + std::fmt::Display>(
    variable: &str,
    value: T,
    min: T,
    max: T,
) -> Result<T, String> {
    if value < min || value > max {
        Err(format!(
            "{variable}={value} is out of range: it must be between {min} and {max}"
        ))
    } else {
        Ok(value)
    }
}

fn millis(variable: &str, value: u64, min: u64, max: u64) -> Result<Duration, String> {
    within(variable, value, min, max).map(Duration::from_millis)
}

fn secs(variable: &str, value: u64, min: u64, max: u64) -> Result<Duration, String> {
    within(variable, value, min, max).map(Duration::from_secs)
}

#[derive(Debug, Parser)]
#[command(
    name = "loyalty",
    version,
    about = "Loyalty and retention engine (gRPC)"
)]
pub struct Cli {
    /// Log format: text for people, json for log pipelines.
    #[arg(
        long,
        env = "LOYALTY_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC server (applies migrations first).
    Serve(Box<ServeArgs>),
    /// Apply database migrations and exit.
    Migrate(DatabaseArgs),
    /// Manage merchants.
    Merchant {
        #[command(subcommand)]
        command: MerchantCommand,
    },
    /// Manage API keys.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Ask a running server for its health (exit 0 when SERVING); for container health checks.
    Health {
        /// The server's gRPC endpoint.
        #[arg(
            long,
            env = "LOYALTY_HEALTH_ENDPOINT",
            default_value = "http://127.0.0.1:50051"
        )]
        endpoint: String,
        /// The service to ask about; empty means the server as a whole.
        #[arg(long, default_value = "")]
        service: String,
        /// For an https:// endpoint: PEM file with the CA of the server's certificate (the
        /// system's roots otherwise).
        #[arg(long, env = "LOYALTY_HEALTH_CA_CERT")]
        ca_cert: Option<String>,
        /// For an https:// endpoint: the name the server's certificate is issued for, when
        /// the endpoint's host is not it (e.g. 127.0.0.1 in a container).
        #[arg(long, env = "LOYALTY_HEALTH_TLS_DOMAIN")]
        tls_domain: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum MerchantCommand {
    /// Create a merchant with its program; prints its id and a new admin API key (once).
    Create {
        /// Display name of the merchant.
        name: String,
        /// ISO 4217 currency of the program.
        #[arg(long)]
        currency: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create an API key; prints it once.
    Create {
        #[arg(long)]
        merchant: i64,
        /// pos (checkout + member), app (member reads), scheduler (engagement), admin (all).
        #[arg(long)]
        scope: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Revoke an API key; servers stop accepting it within the key cache TTL.
    Revoke {
        key_id: i64,
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// Postgres connection URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/loyalty"
    )]
    pub database_url: String,

    /// Size of the connection pool.
    #[arg(long, env = "LOYALTY_DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub db_max_connections: u32,

    /// How long a request waits for a pooled connection before failing with UNAVAILABLE.
    #[arg(long, env = "LOYALTY_DB_ACQUIRE_TIMEOUT_MS", default_value_t = 1000)]
    pub db_acquire_timeout_ms: u64,

    /// Server-side limit for a single statement.
    #[arg(long, env = "LOYALTY_DB_STATEMENT_TIMEOUT_MS", default_value_t = 5000)]
    pub db_statement_timeout_ms: u64,
}

impl DatabaseArgs {
    pub fn config(&self) -> Result<DatabaseConfig, String> {
        Ok(DatabaseConfig {
            url: self.database_url.clone(),
            max_connections: within(
                "LOYALTY_DB_MAX_CONNECTIONS",
                self.db_max_connections,
                1,
                10_000,
            )?,
            acquire_timeout: millis(
                "LOYALTY_DB_ACQUIRE_TIMEOUT_MS",
                self.db_acquire_timeout_ms,
                1,
                600_000,
            )?,
            // 0 would mean "no limit" to PostgreSQL; a hung statement must not hold a
            // connection for ever.
            statement_timeout: millis(
                "LOYALTY_DB_STATEMENT_TIMEOUT_MS",
                self.db_statement_timeout_ms,
                1,
                3_600_000,
            )?,
            outbox: true,
        })
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// gRPC listen address.
    #[arg(long, env = "LOYALTY_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// PEM file with the server's certificate chain; with LOYALTY_TLS_KEY the server speaks
    /// TLS only. Unset (the default): plaintext, meant for loopback or behind a TLS proxy.
    #[arg(long, env = "LOYALTY_TLS_CERT")]
    pub tls_cert: Option<String>,

    /// PEM file with the private key of LOYALTY_TLS_CERT.
    #[arg(long, env = "LOYALTY_TLS_KEY")]
    pub tls_key: Option<String>,

    /// PEM file with the CA(s) of client certificates. When set, internal callers (the keys of
    /// LOYALTY_TLS_CLIENT_CERT_SCOPES) must connect with a certificate it signed.
    #[arg(long, env = "LOYALTY_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<String>,

    /// Key scopes that need a client certificate when LOYALTY_TLS_CLIENT_CA is set
    /// (comma-separated; empty: none).
    #[arg(
        long,
        env = "LOYALTY_TLS_CLIENT_CERT_SCOPES",
        default_value = tls::DEFAULT_CLIENT_CERT_SCOPES
    )]
    pub tls_client_cert_scopes: String,

    /// Prometheus /metrics listen address; empty disables it.
    #[arg(long, env = "LOYALTY_METRICS_LISTEN", default_value = "127.0.0.1:9464")]
    pub metrics_listen: String,

    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Redis URL of the cache; empty disables the cache.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,

    /// PEM file with the CA(s) that sign the certificate of a `rediss://` Redis, when the
    /// system's roots do not.
    #[arg(long, env = "LOYALTY_REDIS_CA_CERT")]
    pub redis_ca_cert: Option<String>,

    /// Prefix of every Redis key (to share a Redis between deployments).
    #[arg(long, env = "LOYALTY_REDIS_PREFIX", default_value = "loyalty")]
    pub redis_prefix: String,

    /// Lifetime of a cached customer state.
    #[arg(long, env = "LOYALTY_CACHE_TTL_SECS", default_value_t = 300)]
    pub cache_ttl_secs: u64,

    /// Per-operation Redis timeout; a slower Redis is treated as down.
    #[arg(long, env = "LOYALTY_REDIS_TIMEOUT_MS", default_value_t = 100)]
    pub redis_timeout_ms: u64,

    /// After a Redis error, the cache is skipped for this long.
    #[arg(long, env = "LOYALTY_REDIS_COOL_DOWN_MS", default_value_t = 1000)]
    pub redis_cool_down_ms: u64,

    /// How long a verified API key is trusted without asking Postgres (revocation delay).
    #[arg(long, env = "LOYALTY_KEY_CACHE_TTL_MS", default_value_t = 5000)]
    pub key_cache_ttl_ms: u64,

    /// Requests per second allowed per API key (per server); 0 disables the limit.
    #[arg(long, env = "LOYALTY_RATE_LIMIT_RPS", default_value_t = 2000)]
    pub rate_limit_rps: u32,

    /// Burst size of the per-key rate limit.
    #[arg(long, env = "LOYALTY_RATE_LIMIT_BURST", default_value_t = 4000)]
    pub rate_limit_burst: u32,

    /// Lookups of unknown API keys allowed per second from one peer address (per server);
    /// beyond it, keys the server has not verified before are refused from that address
    /// without a lookup. Keys already verified keep working.
    #[arg(long, env = "LOYALTY_FAILED_AUTH_RPS", default_value_t = 5)]
    pub failed_auth_rps: u32,

    /// Burst size of the per-peer budget of failed key lookups.
    #[arg(long, env = "LOYALTY_FAILED_AUTH_BURST", default_value_t = 50)]
    pub failed_auth_burst: u32,

    /// Requests handled at once; beyond it requests wait up to the queue timeout, then are shed.
    #[arg(long, env = "LOYALTY_MAX_IN_FLIGHT", default_value_t = 256)]
    pub max_in_flight: usize,

    /// Streams open at once (health watches, reflection, event streams), in a pool of their
    /// own; beyond it a new stream is refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "LOYALTY_MAX_STREAMS", default_value_t = 1000)]
    pub max_streams: usize,

    /// Unary calls to the public services (health, reflection) handled at once, in a pool of
    /// their own so that callers without a key cannot take the slots of the loyalty API.
    #[arg(long, env = "LOYALTY_MAX_PUBLIC_IN_FLIGHT", default_value_t = 16)]
    pub max_public_in_flight: usize,

    /// Public streams (health watches, reflection) open at once, in a pool of their own.
    #[arg(long, env = "LOYALTY_MAX_PUBLIC_STREAMS", default_value_t = 100)]
    pub max_public_streams: usize,

    /// TCP connections open at once; one more is accepted and closed at once.
    #[arg(long, env = "LOYALTY_MAX_CONNECTIONS", default_value_t = 512)]
    pub max_connections: usize,

    /// TCP connections open at once from one remote address (so one client cannot take every
    /// slot; clients behind one NAT address share it).
    #[arg(long, env = "LOYALTY_MAX_CONNECTIONS_PER_PEER", default_value_t = 128)]
    pub max_connections_per_peer: usize,

    /// HTTP/2 streams (calls) one connection may have open at once.
    #[arg(
        long,
        env = "LOYALTY_MAX_STREAMS_PER_CONNECTION",
        default_value_t = 100
    )]
    pub max_streams_per_connection: u32,

    /// How long a request may wait for a free slot before RESOURCE_EXHAUSTED.
    #[arg(long, env = "LOYALTY_QUEUE_TIMEOUT_MS", default_value_t = 250)]
    pub queue_timeout_ms: u64,

    /// The longest a request may run (a shorter client deadline wins).
    #[arg(long, env = "LOYALTY_REQUEST_TIMEOUT_MS", default_value_t = 10_000)]
    pub request_timeout_ms: u64,

    /// Largest accepted request message.
    #[arg(long, env = "LOYALTY_MAX_MESSAGE_BYTES", default_value_t = 1024 * 1024)]
    pub max_message_bytes: usize,

    /// How often Postgres is probed for the health service.
    #[arg(long, env = "LOYALTY_HEALTH_INTERVAL_MS", default_value_t = 1000)]
    pub health_interval_ms: u64,

    /// How often the points sweep runs (matures pending points, expires due ones, releases
    /// holds past their ttl), and the standing sweep (time-driven status changes, tier
    /// warnings and downgrades; it visits only customers due, by an index); 0 turns both off
    /// on this replica (another must run them).
    #[arg(long, env = "LOYALTY_SWEEP_INTERVAL_MS", default_value_t = 1000)]
    pub sweep_interval_ms: u64,

    /// How often the event sequencer looks for committed events to number (every replica
    /// runs one; one at a time numbers). The event stream's delay from a commit to its
    /// delivery is about this at most, plus one read.
    #[arg(long, env = "LOYALTY_EVENT_POLL_MS", default_value_t = 20)]
    pub event_poll_ms: u64,

    /// `off`: nothing is written to the event outbox, and WatchEvents answers
    /// FAILED_PRECONDITION. For a deployment that nobody follows: it saves the event rows,
    /// their index entries and the sequencer's work on every write. Every replica of a
    /// deployment needs the same value; events written while it was off do not exist.
    #[arg(long, env = "LOYALTY_EVENTS_OUTBOX", default_value = "on", value_parser = ["on", "off"])]
    pub events_outbox: String,

    /// How long events are kept for WatchEvents; a cursor of events pruned since is
    /// OUT_OF_RANGE.
    #[arg(long, env = "LOYALTY_EVENT_RETENTION_HOURS", default_value_t = 168)]
    pub event_retention_hours: u64,

    /// How often this replica prunes events past the retention; 0 turns it off here (another
    /// replica must run it).
    #[arg(long, env = "LOYALTY_EVENT_PRUNE_INTERVAL_SECS", default_value_t = 60)]
    pub event_prune_interval_secs: u64,

    /// How often this replica writes the points_expiring warnings that are due; 0 turns it
    /// off here (another replica must run it).
    #[arg(
        long,
        env = "LOYALTY_EXPIRY_WARNING_INTERVAL_SECS",
        default_value_t = 60
    )]
    pub expiry_warning_interval_secs: u64,

    /// How often the greeting job runs (makes the greetings due on each consenting customer's
    /// local day, with the birthday rewards); 0 turns it off on this replica. Safe on every
    /// replica at once.
    #[arg(long, env = "LOYALTY_GREETING_INTERVAL_MS", default_value_t = 60_000)]
    pub greeting_interval_ms: u64,

    /// How long in-flight requests get to finish after SIGTERM.
    #[arg(long, env = "LOYALTY_SHUTDOWN_GRACE_SECS", default_value_t = 20)]
    pub shutdown_grace_secs: u64,

    /// How long start-up waits for Postgres to apply migrations.
    #[arg(long, env = "LOYALTY_STARTUP_TIMEOUT_SECS", default_value_t = 30)]
    pub startup_timeout_secs: u64,
}

/// Everything the server needs, as plain values (tests build it directly).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// `None`: plaintext.
    pub tls: Option<ServerTls>,
    pub metrics_listen: Option<SocketAddr>,
    pub database: DatabaseConfig,
    pub cache: CacheConfig,
    pub key_cache_ttl: Duration,
    pub rate_limit: Option<RateLimit>,
    /// Per peer address: lookups of keys that turn out unknown.
    pub failed_auth_limit: RateLimit,
    pub max_in_flight: usize,
    pub max_streams: usize,
    pub max_public_in_flight: usize,
    pub max_public_streams: usize,
    pub max_connections: usize,
    pub max_connections_per_peer: usize,
    pub max_streams_per_connection: u32,
    pub queue_timeout: Duration,
    pub request_timeout: Duration,
    pub max_message_bytes: usize,
    pub health_interval: Duration,
    /// `None`: this replica runs no points sweep.
    pub sweep_interval: Option<Duration>,
    /// The event stream: sequencer, retention, pruning and expiry warnings.
    pub events: EventsConfig,
    /// `None`: this replica runs no greeting job.
    pub greeting_interval: Option<Duration>,
    pub shutdown_grace: Duration,
    pub startup_timeout: Duration,
    /// Apply migrations at start-up.
    pub migrate: bool,
}

/// An optional path setting; an empty value counts as unset (as for `REDIS_URL`).
fn path_setting(path: &Option<String>) -> Option<&Path> {
    path.as_deref().filter(|p| !p.is_empty()).map(Path::new)
}

impl ServeArgs {
    /// Server TLS from the settings: certificate and key go together, client certificates
    /// need both; the files are read and checked now, so a bad one stops start-up.
    fn tls(&self) -> Result<Option<ServerTls>, String> {
        let client_ca = path_setting(&self.tls_client_ca);
        let scopes = tls::parse_scopes(&self.tls_client_cert_scopes)?;
        match (path_setting(&self.tls_cert), path_setting(&self.tls_key)) {
            (Some(cert), Some(key)) => ServerTls::load(cert, key, client_ca, scopes).map(Some),
            (Some(_), None) => Err(format!(
                "{} is set but {} is not: the certificate needs its key",
                tls::CERT_VARIABLE,
                tls::KEY_VARIABLE
            )),
            (None, Some(_)) => Err(format!(
                "{} is set but {} is not: the key needs its certificate",
                tls::KEY_VARIABLE,
                tls::CERT_VARIABLE
            )),
            (None, None) if client_ca.is_some() => Err(format!(
                "{} needs {} and {}: client certificates only exist over TLS",
                tls::CLIENT_CA_VARIABLE,
                tls::CERT_VARIABLE,
                tls::KEY_VARIABLE
            )),
            (None, None) => Ok(None),
        }
    }

    /// The CA of a `rediss://` Redis, checked; refused with a plaintext `redis://` URL,
    /// where it would suggest an encryption that does not happen.
    fn redis_ca(&self) -> Result<Option<Vec<u8>>, String> {
        let Some(path) = path_setting(&self.redis_ca_cert) else {
            return Ok(None);
        };
        if !self.redis_url.trim().starts_with("rediss://") {
            return Err(
                "LOYALTY_REDIS_CA_CERT is set but REDIS_URL is not a rediss:// (TLS) URL"
                    .to_string(),
            );
        }
        let pem = tls::read_setting_file("LOYALTY_REDIS_CA_CERT", path)?;
        tls::root_store("LOYALTY_REDIS_CA_CERT", &pem)?;
        Ok(Some(pem))
    }

    pub fn config(&self) -> Result<ServerConfig, String> {
        let metrics_listen =
            if self.metrics_listen.trim().is_empty() {
                None
            } else {
                Some(self.metrics_listen.parse().map_err(|e| {
                    format!("LOYALTY_METRICS_LISTEN {:?}: {e}", self.metrics_listen)
                })?)
            };
        let rate_limit = match within("LOYALTY_RATE_LIMIT_RPS", self.rate_limit_rps, 0, 10_000_000)?
        {
            0 => None,
            per_second => Some(RateLimit {
                per_second,
                burst: within(
                    "LOYALTY_RATE_LIMIT_BURST",
                    self.rate_limit_burst,
                    1,
                    100_000_000,
                )?,
            }),
        };
        Ok(ServerConfig {
            listen: self.listen,
            tls: self.tls()?,
            metrics_listen,
            database: DatabaseConfig {
                outbox: self.events_outbox == "on",
                ..self.database.config()?
            },
            cache: CacheConfig {
                url: Some(self.redis_url.clone()).filter(|u| !u.trim().is_empty()),
                ca_cert_pem: self.redis_ca()?,
                key_prefix: self.redis_prefix.clone(),
                ttl: secs(
                    "LOYALTY_CACHE_TTL_SECS",
                    self.cache_ttl_secs,
                    1,
                    30 * 86_400,
                )?,
                timeout: millis("LOYALTY_REDIS_TIMEOUT_MS", self.redis_timeout_ms, 1, 60_000)?,
                cool_down: millis(
                    "LOYALTY_REDIS_COOL_DOWN_MS",
                    self.redis_cool_down_ms,
                    0,
                    600_000,
                )?,
            },
            key_cache_ttl: millis(
                "LOYALTY_KEY_CACHE_TTL_MS",
                self.key_cache_ttl_ms,
                0,
                3_600_000,
            )?,
            rate_limit,
            failed_auth_limit: RateLimit {
                per_second: within(
                    "LOYALTY_FAILED_AUTH_RPS",
                    self.failed_auth_rps,
                    1,
                    1_000_000,
                )?,
                burst: within(
                    "LOYALTY_FAILED_AUTH_BURST",
                    self.failed_auth_burst,
                    1,
                    10_000_000,
                )?,
            },
            max_in_flight: within("LOYALTY_MAX_IN_FLIGHT", self.max_in_flight, 1, 1_000_000)?,
            max_streams: within("LOYALTY_MAX_STREAMS", self.max_streams, 1, 1_000_000)?,
            max_public_in_flight: within(
                "LOYALTY_MAX_PUBLIC_IN_FLIGHT",
                self.max_public_in_flight,
                1,
                100_000,
            )?,
            max_public_streams: within(
                "LOYALTY_MAX_PUBLIC_STREAMS",
                self.max_public_streams,
                1,
                1_000_000,
            )?,
            max_connections: within(
                "LOYALTY_MAX_CONNECTIONS",
                self.max_connections,
                1,
                1_000_000,
            )?,
            max_connections_per_peer: within(
                "LOYALTY_MAX_CONNECTIONS_PER_PEER",
                self.max_connections_per_peer,
                1,
                1_000_000,
            )?,
            max_streams_per_connection: within(
                "LOYALTY_MAX_STREAMS_PER_CONNECTION",
                self.max_streams_per_connection,
                1,
                100_000,
            )?,
            queue_timeout: millis("LOYALTY_QUEUE_TIMEOUT_MS", self.queue_timeout_ms, 0, 60_000)?,
            request_timeout: millis(
                "LOYALTY_REQUEST_TIMEOUT_MS",
                self.request_timeout_ms,
                1,
                3_600_000,
            )?,
            max_message_bytes: within(
                "LOYALTY_MAX_MESSAGE_BYTES",
                self.max_message_bytes,
                1024,
                64 * 1024 * 1024,
            )?,
            health_interval: millis(
                "LOYALTY_HEALTH_INTERVAL_MS",
                self.health_interval_ms,
                10,
                600_000,
            )?,
            sweep_interval: match self.sweep_interval_ms {
                0 => None,
                ms => Some(millis("LOYALTY_SWEEP_INTERVAL_MS", ms, 10, 3_600_000)?),
            },
            events: EventsConfig {
                poll_interval: millis("LOYALTY_EVENT_POLL_MS", self.event_poll_ms, 1, 10_000)?,
                retention: secs(
                    "LOYALTY_EVENT_RETENTION_HOURS",
                    self.event_retention_hours,
                    1,
                    24 * 3650,
                )?
                .saturating_mul(3600),
                prune_interval: match self.event_prune_interval_secs {
                    0 => None,
                    s => Some(secs("LOYALTY_EVENT_PRUNE_INTERVAL_SECS", s, 1, 86_400)?),
                },
                warning_interval: match self.expiry_warning_interval_secs {
                    0 => None,
                    s => Some(secs("LOYALTY_EXPIRY_WARNING_INTERVAL_SECS", s, 1, 86_400)?),
                },
            },
            greeting_interval: match self.greeting_interval_ms {
                0 => None,
                ms => Some(millis("LOYALTY_GREETING_INTERVAL_MS", ms, 10, 86_400_000)?),
            },
            shutdown_grace: secs(
                "LOYALTY_SHUTDOWN_GRACE_SECS",
                self.shutdown_grace_secs,
                0,
                3600,
            )?,
            startup_timeout: secs(
                "LOYALTY_STARTUP_TIMEOUT_SECS",
                self.startup_timeout_secs,
                0,
                3600,
            )?,
            migrate: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::caller::Scope;

    #[test]
    fn defaults_parse() {
        let cli = Cli::try_parse_from(["loyalty", "serve"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        let config = args.config().unwrap();
        if std::env::var_os("LOYALTY_LISTEN").is_none() {
            assert_eq!(config.listen.to_string(), "127.0.0.1:50051");
        }
        assert!(config.max_in_flight >= 1);
    }

    #[test]
    fn empty_urls_disable_optional_parts() {
        let cli = Cli::try_parse_from([
            "loyalty",
            "serve",
            "--redis-url",
            "",
            "--metrics-listen",
            "",
            "--rate-limit-rps",
            "0",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        let config = args.config().unwrap();
        assert!(config.cache.url.is_none());
        assert!(config.metrics_listen.is_none());
        assert!(config.rate_limit.is_none());
    }

    fn serve_args(extra: &[&str]) -> Box<ServeArgs> {
        let cli = Cli::try_parse_from(["loyalty", "serve"].iter().chain(extra)).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        args
    }

    #[test]
    fn out_of_range_values_are_errors_naming_the_variable_not_clamped() {
        for (flag, value, variable) in [
            ("--max-message-bytes", "100", "LOYALTY_MAX_MESSAGE_BYTES"),
            ("--db-max-connections", "0", "LOYALTY_DB_MAX_CONNECTIONS"),
            (
                "--db-statement-timeout-ms",
                "0",
                "LOYALTY_DB_STATEMENT_TIMEOUT_MS",
            ),
            ("--cache-ttl-secs", "0", "LOYALTY_CACHE_TTL_SECS"),
            ("--max-in-flight", "0", "LOYALTY_MAX_IN_FLIGHT"),
            ("--max-streams", "0", "LOYALTY_MAX_STREAMS"),
            ("--max-public-streams", "0", "LOYALTY_MAX_PUBLIC_STREAMS"),
            (
                "--max-public-in-flight",
                "0",
                "LOYALTY_MAX_PUBLIC_IN_FLIGHT",
            ),
            ("--max-connections", "0", "LOYALTY_MAX_CONNECTIONS"),
            (
                "--max-connections-per-peer",
                "0",
                "LOYALTY_MAX_CONNECTIONS_PER_PEER",
            ),
            (
                "--max-streams-per-connection",
                "0",
                "LOYALTY_MAX_STREAMS_PER_CONNECTION",
            ),
            ("--request-timeout-ms", "0", "LOYALTY_REQUEST_TIMEOUT_MS"),
            ("--health-interval-ms", "1", "LOYALTY_HEALTH_INTERVAL_MS"),
            ("--rate-limit-burst", "0", "LOYALTY_RATE_LIMIT_BURST"),
        ] {
            let error = serve_args(&[flag, value]).config().unwrap_err();
            assert!(
                error.starts_with(&format!("{variable}={value} is out of range")),
                "{flag} {value}: {error}"
            );
        }
        let config = serve_args(&["--max-message-bytes", "1024"])
            .config()
            .unwrap();
        assert_eq!(config.max_message_bytes, 1024);
    }

    /// Certificate files for the TLS settings: a CA, a server certificate and key, and a
    /// key of another pair, in a directory of their own.
    fn pem_files(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("loyalty-config-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        for (file, pem) in [
            ("ca.pem", ca_cert.pem()),
            ("server.crt", cert.pem()),
            ("server.key", key.serialize_pem()),
            ("other.key", other.serialize_pem()),
            ("garbage.pem", "not a certificate\n".to_string()),
        ] {
            std::fs::write(dir.join(file), pem).unwrap();
        }
        dir
    }

    fn arg(dir: &Path, file: &str) -> String {
        dir.join(file).display().to_string()
    }

    #[test]
    fn tls_is_off_by_default_and_loads_with_client_certificates() {
        let config = serve_args(&[]).config().unwrap();
        assert!(config.tls.is_none());
        let dir = pem_files("valid");
        let config = serve_args(&[
            "--tls-cert",
            &arg(&dir, "server.crt"),
            "--tls-key",
            &arg(&dir, "server.key"),
        ])
        .config()
        .unwrap();
        let tls = config.tls.expect("TLS configured");
        assert!(tls.client_certificates().is_none());
        let config = serve_args(&[
            "--tls-cert",
            &arg(&dir, "server.crt"),
            "--tls-key",
            &arg(&dir, "server.key"),
            "--tls-client-ca",
            &arg(&dir, "ca.pem"),
        ])
        .config()
        .unwrap();
        let tls = config.tls.expect("TLS configured");
        let client = tls.client_certificates().expect("client certificates");
        assert_eq!(
            client.scopes(),
            [Scope::Pos, Scope::Admin, Scope::Scheduler]
        );
        assert!(!client.required_for(Scope::App));
        // The key never shows up in a debug print of the configuration.
        let key = std::fs::read_to_string(dir.join("server.key")).unwrap();
        let printed = format!("{tls:?}");
        let body = key.lines().nth(1).unwrap();
        assert!(!printed.contains(body), "{printed}");
        // Empty values count as unset (an empty variable in a compose file).
        let config = serve_args(&["--tls-cert", "", "--tls-key", ""])
            .config()
            .unwrap();
        assert!(config.tls.is_none());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn bad_tls_settings_are_start_up_errors_naming_the_variable() {
        let dir = pem_files("bad");
        let (cert, key, ca) = (
            arg(&dir, "server.crt"),
            arg(&dir, "server.key"),
            arg(&dir, "ca.pem"),
        );
        let (other, garbage) = (arg(&dir, "other.key"), arg(&dir, "garbage.pem"));
        let missing = arg(&dir, "missing.pem");
        for (args, expected) in [
            (
                vec!["--tls-cert", &cert],
                "LOYALTY_TLS_CERT is set but LOYALTY_TLS_KEY is not",
            ),
            (
                vec!["--tls-key", &key],
                "LOYALTY_TLS_KEY is set but LOYALTY_TLS_CERT is not",
            ),
            (
                vec!["--tls-client-ca", &ca],
                "LOYALTY_TLS_CLIENT_CA needs LOYALTY_TLS_CERT and LOYALTY_TLS_KEY",
            ),
            (
                vec!["--tls-cert", &missing, "--tls-key", &key],
                "LOYALTY_TLS_CERT=",
            ),
            (
                vec!["--tls-cert", &garbage, "--tls-key", &key],
                "LOYALTY_TLS_CERT: no certificate in it",
            ),
            (
                vec!["--tls-cert", &cert, "--tls-key", &garbage],
                "LOYALTY_TLS_KEY: no usable private key",
            ),
            (
                vec!["--tls-cert", &cert, "--tls-key", &other],
                "LOYALTY_TLS_KEY does not fit LOYALTY_TLS_CERT",
            ),
            (
                vec![
                    "--tls-cert",
                    &cert,
                    "--tls-key",
                    &key,
                    "--tls-client-ca",
                    &garbage,
                ],
                "LOYALTY_TLS_CLIENT_CA: no certificate in it",
            ),
            (
                vec!["--tls-client-cert-scopes", "pos,root"],
                "LOYALTY_TLS_CLIENT_CERT_SCOPES=\"pos,root\": unknown scope \"root\"",
            ),
            (
                vec!["--redis-ca-cert", &ca],
                "LOYALTY_REDIS_CA_CERT is set but REDIS_URL is not a rediss://",
            ),
            (
                vec![
                    "--redis-url",
                    "rediss://cache:6380",
                    "--redis-ca-cert",
                    &garbage,
                ],
                "LOYALTY_REDIS_CA_CERT: no certificate in it",
            ),
        ] {
            let error = serve_args(&args).config().unwrap_err();
            assert!(error.starts_with(expected), "{args:?}: {error}");
        }
        let missing_error = serve_args(&["--tls-cert", &missing, "--tls-key", &key])
            .config()
            .unwrap_err();
        assert!(missing_error.contains("cannot read it"), "{missing_error}");
        let config = serve_args(&["--redis-url", "rediss://cache:6380", "--redis-ca-cert", &ca])
            .config()
            .unwrap();
        assert!(config.cache.ca_cert_pem.is_some());
        let _ = std::fs::remove_dir_all(dir);
    }
}
