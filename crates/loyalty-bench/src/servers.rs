//! `loyalty serve` child processes on free ports, and the scraping of their memory use.
//!
//! The server runs as a separate process (not in the bench's runtime) so that its RSS and CPU
//! are its own, as in production. Children are killed when dropped, so an error or Ctrl-C in
//! the bench never leaves a server behind.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The metric that carries the server's resident set size.
const RSS_METRIC: &str = "loyalty_process_resident_memory_bytes";

/// The `loyalty` binary: `explicit`, else the one next to this executable (cargo builds both
/// into the same directory).
pub fn locate_server(explicit: Option<PathBuf>) -> Result<PathBuf> {
    let path = match explicit {
        Some(path) => path,
        None => std::env::current_exe()
            .context("cannot find the bench's own executable")?
            .with_file_name("loyalty"),
    };
    if !path.is_file() {
        bail!(
            "no server binary at {} (build it with `cargo build --release --bins`, or pass \
             --server-bin)",
            path.display()
        );
    }
    Ok(path)
}

/// What every server of a run shares.
pub struct ServerSettings {
    pub binary: PathBuf,
    pub database_url: String,
    pub redis_prefix: String,
    /// Pool size: the closed loop's concurrency, the same as pgbench's clients.
    pub db_max_connections: u32,
    /// Above anything the bench sends at once, so the server never sheds the bench's load.
    pub max_in_flight: u32,
    pub log_dir: PathBuf,
}

pub struct Server {
    pub name: String,
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
    pub log: PathBuf,
    /// For CPU accounting.
    pub pid: Option<u32>,
    child: Child,
}

impl Server {
    /// Starts `loyalty serve` and waits until it reports SERVING. `redis_url: None` runs it
    /// without a cache.
    pub async fn start(
        settings: &ServerSettings,
        name: &str,
        redis_url: Option<&str>,
    ) -> Result<Server> {
        Server::start_with(settings, name, redis_url, &[]).await
    }

    /// As `start`, with `extra` settings of the server's (e.g. `LOYALTY_EVENTS_OUTBOX=off`).
    pub async fn start_with(
        settings: &ServerSettings,
        name: &str,
        redis_url: Option<&str>,
        extra: &[(&str, &str)],
    ) -> Result<Server> {
        let grpc = free_port()?;
        let metrics = free_port()?;
        let log = settings.log_dir.join(format!("server-{name}.log"));
        let log_file = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let mut command = Command::new(&settings.binary);
        command.arg("serve");
        // Only the settings below count: nothing the caller's shell exports for its own server.
        for (key, _) in std::env::vars_os() {
            if let Some(key) = key.to_str()
                && (key.starts_with("LOYALTY_")
                    || key == "DATABASE_URL"
                    || key == "REDIS_URL"
                    || key == "RUST_LOG")
            {
                command.env_remove(key);
            }
        }
        command
            .env("LOYALTY_LISTEN", grpc.to_string())
            .env("LOYALTY_METRICS_LISTEN", metrics.to_string())
            .env("DATABASE_URL", &settings.database_url)
            .env("REDIS_URL", redis_url.unwrap_or(""))
            .env("LOYALTY_REDIS_PREFIX", &settings.redis_prefix)
            .env(
                "LOYALTY_CACHE_TTL_SECS",
                crate::cache::TTL.as_secs().to_string(),
            )
            .env(
                "LOYALTY_DB_MAX_CONNECTIONS",
                settings.db_max_connections.to_string(),
            )
            .env("LOYALTY_MAX_IN_FLIGHT", settings.max_in_flight.to_string())
            .env("LOYALTY_RATE_LIMIT_RPS", "0")
            .env("LOYALTY_SHUTDOWN_GRACE_SECS", "2")
            .env("LOYALTY_LOG_FORMAT", "json")
            .env("RUST_LOG", "warn")
            .envs(extra.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file))
            .kill_on_drop(true);
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {}", settings.binary.display()))?;
        let mut server = Server {
            name: name.to_string(),
            grpc,
            metrics,
            log,
            pid: child.id(),
            child,
        };
        server.wait_serving(Duration::from_secs(60)).await?;
        Ok(server)
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.grpc)
    }

    async fn wait_serving(&mut self, limit: Duration) -> Result<()> {
        let started = Instant::now();
        let mut last_error = String::from("no answer yet");
        while started.elapsed() < limit {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "server {} exited with {status} during start-up; its log ({}):\n{}",
                    self.name,
                    self.log.display(),
                    tail(&self.log, 20)
                );
            }
            match health_check(&self.endpoint()).await {
                Ok(true) => return Ok(()),
                Ok(false) => last_error = "NOT_SERVING".into(),
                Err(e) => last_error = format!("{e:#}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(anyhow!(
            "server {} not SERVING after {limit:?} ({last_error}); its log ({}):\n{}",
            self.name,
            self.log.display(),
            tail(&self.log, 20)
        ))
    }

    /// SIGTERM (the server drains and closes its pool), then SIGKILL after a few seconds.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let terminated = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if terminated
                && tokio::time::timeout(Duration::from_secs(5), self.child.wait())
                    .await
                    .is_ok()
            {
                return;
            }
        }
        let _ = self.child.kill().await;
    }
}

/// A port nobody listens on right now (the kernel picks it; the race until the server binds
/// it is harmless on a bench machine).
fn free_port() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(listener.local_addr()?)
}

async fn health_check(endpoint: &str) -> Result<bool> {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(1))
        .connect()
        .await?;
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner();
    Ok(reply.status == ServingStatus::Serving as i32)
}

/// The last `lines` lines of a log file, for error messages.
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The server's resident set size from its `/metrics`, in bytes.
pub async fn rss_bytes(metrics: SocketAddr) -> Result<u64> {
    let body = http_get(metrics, "/metrics").await?;
    parse_rss(&body).ok_or_else(|| anyhow!("{RSS_METRIC} missing from /metrics"))
}

/// A minimal HTTP/1.1 GET (the metrics endpoint is plain HTTP; no client crate needed).
async fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        anyhow::Ok(String::from_utf8_lossy(&response).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(2), fetch)
        .await
        .map_err(|_| anyhow!("GET {path} from {addr} timed out"))?
}

/// The value of the RSS gauge in a Prometheus text exposition.
fn parse_rss(text: &str) -> Option<u64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (name, value) = line.split_once(' ')?;
            // `name` or `name{labels}`, never a longer metric with the same prefix.
            let bare = name.split('{').next()?;
            (bare == RSS_METRIC).then(|| value.trim().parse::<f64>().ok())?
        })
        .map(|v| v as u64)
}

/// The server's cache reads so far, by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheReads {
    pub hit: u64,
    pub miss: u64,
    /// Disabled, cooling down after an error, or a suspect key: Postgres answered.
    pub skipped: u64,
}

impl CacheReads {
    pub async fn scrape(metrics: SocketAddr) -> Option<CacheReads> {
        Some(parse_cache_reads(
            &http_get(metrics, "/metrics").await.ok()?,
        ))
    }

    /// Share of the reads since `before` that the cache answered; `None` without reads.
    pub fn hit_ratio_since(&self, before: &CacheReads) -> Option<f64> {
        let hit = self.hit.saturating_sub(before.hit);
        let all = hit
            + self.miss.saturating_sub(before.miss)
            + self.skipped.saturating_sub(before.skipped);
        (all > 0).then(|| hit as f64 / all as f64)
    }
}

fn parse_cache_reads(text: &str) -> CacheReads {
    let mut reads = CacheReads::default();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("loyalty_cache_operations_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        if !labels.split(',').any(|l| l == "op=\"get\"") {
            continue;
        }
        let value = value.trim().parse::<f64>().unwrap_or(0.0) as u64;
        for label in labels.split(',') {
            match label {
                "outcome=\"hit\"" => reads.hit += value,
                // A copy without a standing: the server read Postgres.
                "outcome=\"miss\"" | "outcome=\"partial\"" => reads.miss += value,
                "outcome=\"skipped\"" | "outcome=\"error\"" => reads.skipped += value,
                _ => {}
            }
        }
    }
    reads
}

/// Samples a server's RSS every second while a scenario runs; keeps the maximum.
pub struct RssSampler {
    stop: watch::Sender<bool>,
    task: JoinHandle<Option<u64>>,
}

impl RssSampler {
    pub fn start(metrics: SocketAddr) -> RssSampler {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut max: Option<u64> = None;
            loop {
                if let Ok(rss) = rss_bytes(metrics).await {
                    max = Some(max.map_or(rss, |m| m.max(rss)));
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stopped.changed() => break,
                }
            }
            // One last look at the end of the load.
            if let Ok(rss) = rss_bytes(metrics).await {
                max = Some(max.map_or(rss, |m| m.max(rss)));
            }
            max
        });
        RssSampler { stop, task }
    }

    /// The largest RSS seen, in bytes.
    pub async fn finish(self) -> Option<u64> {
        let _ = self.stop.send(true);
        self.task.await.ok().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_reads_are_counted_by_outcome() {
        let text = "# TYPE loyalty_cache_operations counter\n\
                    loyalty_cache_operations_total{op=\"get\",outcome=\"hit\"} 90\n\
                    loyalty_cache_operations_total{op=\"get\",outcome=\"miss\"} 4\n\
                    loyalty_cache_operations_total{op=\"get\",outcome=\"partial\"} 2\n\
                    loyalty_cache_operations_total{op=\"get\",outcome=\"skipped\"} 4\n\
                    loyalty_cache_operations_total{op=\"put\",outcome=\"stored\"} 6\n";
        let now = parse_cache_reads(text);
        assert_eq!(
            now,
            CacheReads {
                hit: 90,
                miss: 6,
                skipped: 4
            }
        );
        assert_eq!(now.hit_ratio_since(&CacheReads::default()), Some(0.9));
        let before = CacheReads {
            hit: 10,
            miss: 6,
            skipped: 4,
        };
        assert_eq!(now.hit_ratio_since(&before), Some(1.0));
        assert_eq!(now.hit_ratio_since(&now), None);
    }

    #[test]
    fn rss_is_read_from_the_exposition() {
        let text = "# HELP loyalty_process_resident_memory_bytes Resident set size\n\
                    # TYPE loyalty_process_resident_memory_bytes gauge\n\
                    loyalty_process_resident_memory_bytes_total 1\n\
                    loyalty_process_resident_memory_bytes 31457280\n\
                    loyalty_rpc_requests_total{method=\"x\",code=\"OK\"} 5\n";
        assert_eq!(parse_rss(text), Some(31_457_280));
        assert_eq!(parse_rss("loyalty_rpc_requests_total 3\n"), None);
        assert_eq!(
            parse_rss("HTTP/1.1 200 OK\r\n\r\nloyalty_process_resident_memory_bytes 1.5e7\n"),
            Some(15_000_000)
        );
    }
}
