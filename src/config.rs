//! Command line and environment. Every flag has a `LOYALTY_*` (or the conventional
//! `DATABASE_URL` / `REDIS_URL`) environment fallback and a default that works on a developer
//! machine.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::domain::rate_limit::RateLimit;
use crate::storage::DatabaseConfig;
use crate::storage::cache::CacheConfig;
use crate::telemetry::LogFormat;

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
    pub fn config(&self) -> DatabaseConfig {
        DatabaseConfig {
            url: self.database_url.clone(),
            max_connections: self.db_max_connections.max(1),
            acquire_timeout: Duration::from_millis(self.db_acquire_timeout_ms),
            statement_timeout: Duration::from_millis(self.db_statement_timeout_ms),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// gRPC listen address.
    #[arg(long, env = "LOYALTY_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Prometheus /metrics listen address; empty disables it.
    #[arg(long, env = "LOYALTY_METRICS_LISTEN", default_value = "127.0.0.1:9464")]
    pub metrics_listen: String,

    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Redis URL of the cache; empty disables the cache.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,

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

    /// Requests handled at once; beyond it requests wait up to the queue timeout, then are shed.
    #[arg(long, env = "LOYALTY_MAX_IN_FLIGHT", default_value_t = 256)]
    pub max_in_flight: usize,

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
    pub metrics_listen: Option<SocketAddr>,
    pub database: DatabaseConfig,
    pub cache: CacheConfig,
    pub key_cache_ttl: Duration,
    pub rate_limit: Option<RateLimit>,
    pub max_in_flight: usize,
    pub queue_timeout: Duration,
    pub request_timeout: Duration,
    pub max_message_bytes: usize,
    pub health_interval: Duration,
    pub shutdown_grace: Duration,
    pub startup_timeout: Duration,
    /// Apply migrations at start-up.
    pub migrate: bool,
}

impl ServeArgs {
    pub fn config(&self) -> Result<ServerConfig, String> {
        let metrics_listen =
            if self.metrics_listen.trim().is_empty() {
                None
            } else {
                Some(self.metrics_listen.parse().map_err(|e| {
                    format!("LOYALTY_METRICS_LISTEN {:?}: {e}", self.metrics_listen)
                })?)
            };
        Ok(ServerConfig {
            listen: self.listen,
            metrics_listen,
            database: self.database.config(),
            cache: CacheConfig {
                url: Some(self.redis_url.clone()).filter(|u| !u.trim().is_empty()),
                key_prefix: self.redis_prefix.clone(),
                ttl: Duration::from_secs(self.cache_ttl_secs.max(1)),
                timeout: Duration::from_millis(self.redis_timeout_ms.max(1)),
                cool_down: Duration::from_millis(self.redis_cool_down_ms),
            },
            key_cache_ttl: Duration::from_millis(self.key_cache_ttl_ms),
            rate_limit: (self.rate_limit_rps > 0).then_some(RateLimit {
                per_second: self.rate_limit_rps,
                burst: self.rate_limit_burst.max(1),
            }),
            max_in_flight: self.max_in_flight.max(1),
            queue_timeout: Duration::from_millis(self.queue_timeout_ms),
            request_timeout: Duration::from_millis(self.request_timeout_ms.max(1)),
            max_message_bytes: self.max_message_bytes.max(1024),
            health_interval: Duration::from_millis(self.health_interval_ms.max(10)),
            shutdown_grace: Duration::from_secs(self.shutdown_grace_secs),
            startup_timeout: Duration::from_secs(self.startup_timeout_secs),
            migrate: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
