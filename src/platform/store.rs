//! Postgres, the truth: the pool, the migrations and the mapping of database failures onto
//! [`Error`]. The SQL itself lives with each feature (`<feature>/store.rs`).
//!
//! Who opens a transaction: the use case, always (`Store::begin`, then `commit`). Store
//! functions take `&mut PgConnection` and never begin or commit, so several of them, of one
//! feature or of several, compose into one transaction.

use std::time::Duration;

use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgSslMode};
use sqlx::{Postgres, Transaction};

use crate::error::Error;
use crate::telemetry::throttle::LogThrottle;

/// During an outage every request fails the same way; a few lines a minute tell the story.
static DATABASE_UNAVAILABLE: LogThrottle = LogThrottle::per_minute(10);

fn log_unavailable(error: &sqlx::Error) {
    if let Some(suppressed) = DATABASE_UNAVAILABLE.admit() {
        tracing::warn!(%error, suppressed, "database unavailable");
    }
}

/// The embedded migrations of `migrations/`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    pub url: String,
    pub max_connections: u32,
    /// How long an RPC waits for a free connection before it fails with UNAVAILABLE.
    pub acquire_timeout: Duration,
    /// Server-side limit for any one statement.
    pub statement_timeout: Duration,
    /// Whether this process's sessions write the event outbox: `false` opens every session
    /// with `loyalty.outbox = off`, which the `outbox_on()` guard of every insert into
    /// `events` reads (migration `20261203100700_outbox_switch`).
    pub outbox: bool,
}

/// Whether the URL (or `PGSSLMODE`) says how to use TLS.
fn names_ssl_mode(url: &str) -> bool {
    std::env::var_os("PGSSLMODE").is_some()
        || url.split_once('?').is_some_and(|(_, query)| {
            query.split('&').any(|pair| {
                let key = pair.split('=').next().unwrap_or_default();
                key == "sslmode" || key == "ssl-mode"
            })
        })
}

/// Without an `sslmode`, sqlx (like libpq) tries TLS first (`prefer`). On loopback that
/// buys nothing and costs every statement, so there the default stays plaintext, as it was
/// before TLS was built in; anywhere else, and whenever `sslmode` is given, it is obeyed.
fn plaintext_on_loopback(options: PgConnectOptions, url: &str) -> PgConnectOptions {
    let host = options.get_host();
    let loopback = host == "localhost"
        || host.starts_with('/')
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback && !names_ssl_mode(url) {
        options.ssl_mode(PgSslMode::Disable)
    } else {
        options
    }
}

/// The Postgres side of storage. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    /// Whether the sessions write the event outbox (`DatabaseConfig::outbox`): the one place
    /// that decides it, read by the event stream's jobs and WatchEvents.
    outbox: bool,
    pool: PgPool,
    /// One connection of its own for the health probe: a pool drained by requests waiting on
    /// one hot customer's row lock is a busy database, not a dead one, and must not turn the
    /// service NOT_SERVING (which would take the replica out of its load balancer).
    health: PgPool,
}

impl Store {
    /// Builds the pool without connecting, so the server starts (and reports NOT_SERVING)
    /// even while Postgres is down, and recovers by itself when it comes back.
    pub fn connect_lazy(config: &DatabaseConfig) -> Result<Store, Error> {
        let options: PgConnectOptions = config
            .url
            .parse::<PgConnectOptions>()
            .map_err(|e| Error::internal(format!("invalid DATABASE_URL: {e}")))?;
        let mut options = plaintext_on_loopback(options, &config.url)
            .application_name("loyalty")
            .options([(
                "statement_timeout",
                config.statement_timeout.as_millis().to_string(),
            )]);
        if !config.outbox {
            options = options.options([("loyalty.outbox", "off")]);
        }
        let options = options
            .log_statements(tracing::log::LevelFilter::Trace)
            .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_millis(500));
        let health = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .acquire_timeout(config.acquire_timeout)
            .idle_timeout(Duration::from_secs(300))
            .test_before_acquire(false)
            .connect_lazy_with(options.clone());
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .min_connections(0)
            .acquire_timeout(config.acquire_timeout)
            .idle_timeout(Duration::from_secs(300))
            // sqlx pings on every acquire by default; that is a round trip per query. Only a
            // connection that sat idle for a while is checked; a dead busy one fails its query
            // with UNAVAILABLE and is dropped.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for > Duration::from_secs(10) {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            })
            .connect_lazy_with(options);
        Ok(Store {
            outbox: config.outbox,
            pool,
            health,
        })
    }

    /// A store on an existing pool (tests); the health probe shares it.
    pub fn from_pool(pool: PgPool) -> Store {
        Store {
            outbox: true,
            health: pool.clone(),
            pool,
        }
    }

    /// Whether this store's sessions write the event outbox (`LOYALTY_EVENTS_OUTBOX`).
    pub fn writes_outbox(&self) -> bool {
        self.outbox
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// One connection for the statements of one use case.
    pub async fn acquire(&self) -> Result<sqlx::pool::PoolConnection<Postgres>, Error> {
        self.pool.acquire().await.map_err(db_error)
    }

    /// A transaction for the writes of one use case; [`commit`] it.
    pub async fn begin(&self) -> Result<Transaction<'static, Postgres>, Error> {
        self.pool.begin().await.map_err(db_error)
    }

    /// Applies the embedded migrations (idempotent; concurrent callers are serialised by an
    /// advisory lock inside sqlx).
    pub async fn migrate(&self) -> Result<(), Error> {
        MIGRATOR.run(&self.pool).await.map_err(|e| match e {
            sqlx::migrate::MigrateError::Execute(inner) => db_error(inner),
            other => Error::internal(other),
        })
    }

    /// A cheap round trip on the health probe's own connection.
    pub async fn ping(&self) -> Result<(), Error> {
        sqlx::query("SELECT 1")
            .execute(&self.health)
            .await
            .map_err(db_error)?;
        Ok(())
    }

    /// Connections open / idle, for the metrics.
    pub fn pool_usage(&self) -> (u32, usize) {
        (self.pool.size(), self.pool.num_idle())
    }

    pub async fn close(&self) {
        self.pool.close().await;
        self.health.close().await;
    }
}

/// Commits a transaction of [`Store::begin`] (or one begun on a connection).
pub async fn commit(tx: Transaction<'_, Postgres>) -> Result<(), Error> {
    tx.commit().await.map_err(db_error)
}

/// SQLSTATE of a unique violation.
const UNIQUE_VIOLATION: &str = "23505";

/// The name of the unique constraint a statement violated, if that is what failed.
pub(crate) fn violated_unique_constraint(error: &sqlx::Error) -> Option<String> {
    match error {
        sqlx::Error::Database(db) if db.code().as_deref() == Some(UNIQUE_VIOLATION) => {
            Some(db.constraint().unwrap_or_default().to_string())
        }
        _ => None,
    }
}

/// Maps a database failure onto the domain error. Connection trouble is UNAVAILABLE (the
/// caller retries with the same key, which is always safe); anything else is INTERNAL and
/// its text, which may quote SQL, is only logged.
pub(crate) fn db_error(error: sqlx::Error) -> Error {
    match &error {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_)
        | sqlx::Error::BeginFailed => {
            log_unavailable(&error);
            Error::Unavailable("database unavailable, retry with backoff".into())
        }
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            match code.as_ref() {
                // connection exceptions, shutdown, too many connections, serialization/deadlock
                c if c.starts_with("08")
                    || c.starts_with("57P")
                    || c == "53300"
                    || c == "40001"
                    || c == "40P01" =>
                {
                    log_unavailable(&error);
                    Error::Unavailable("database unavailable, retry with backoff".into())
                }
                // statement_timeout or a cancelled query
                "57014" => Error::Unavailable("database too slow, retry with backoff".into()),
                "22003" => Error::FailedPrecondition("a points total would overflow".into()),
                _ => Error::internal(error),
            }
        }
        _ => Error::internal(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(url: &str) -> PgSslMode {
        plaintext_on_loopback(url.parse().unwrap(), url).get_ssl_mode()
    }

    #[test]
    fn loopback_stays_plaintext_unless_the_url_asks_for_tls() {
        if std::env::var_os("PGSSLMODE").is_some() {
            return; // the environment decides, by design
        }
        assert!(matches!(
            mode("postgres://postgres@127.0.0.1:5432/loyalty"),
            PgSslMode::Disable
        ));
        assert!(matches!(
            mode("postgres://postgres@localhost/loyalty"),
            PgSslMode::Disable
        ));
        assert!(matches!(
            mode("postgres://postgres@[::1]:5432/loyalty"),
            PgSslMode::Disable
        ));
        assert!(matches!(
            mode("postgres://postgres@127.0.0.1/loyalty?sslmode=require"),
            PgSslMode::Require
        ));
        assert!(matches!(
            mode("postgres://postgres@db.internal/loyalty?application_name=x&sslmode=verify-full"),
            PgSslMode::VerifyFull
        ));
        // Elsewhere sqlx's own default (prefer: TLS when offered) applies.
        assert!(matches!(
            mode("postgres://postgres@db.internal/loyalty"),
            PgSslMode::Prefer
        ));
    }
}
