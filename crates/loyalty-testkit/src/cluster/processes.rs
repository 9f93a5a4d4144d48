//! The processes of a scenario: a private PostgreSQL cluster, a private Redis and the real
//! `loyalty serve` binary, each started, crashed and restarted on its own port.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use loyalty::{DatabaseConfig, MerchantId, Scope, Store};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tonic::transport::Endpoint;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

use super::*;
use crate::proxy::Proxy;

/// The service database in every private cluster.
pub const DATABASE: &str = "loyalty";

/// A call that has not answered this long after its deadline is a hang, whatever it returns.
pub const HANG_GRACE: Duration = Duration::from_millis(500);

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn scratch_dir(kind: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "loyalty-reliability-{kind}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The PostgreSQL server binaries, as scripts/lib.sh finds them: the newest
/// `/usr/lib/postgresql/*/bin` that has `initdb`, else the directory of an `initdb` on PATH.
fn pg_bindir() -> PathBuf {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let version = e.file_name().to_str()?.parse::<u32>().ok()?;
                    Some((version, e.path().join("bin")))
                })
                .filter(|(_, bin)| bin.join("initdb").exists())
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    if let Some((_, dir)) = dirs.pop() {
        return dir;
    }
    std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).find(|dir| dir.join("initdb").exists()))
        .expect("PostgreSQL server binaries (initdb) under /usr/lib/postgresql/*/bin or on PATH")
}

/// Runs `command`; panics with its output when it fails.
fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Waits until something accepts TCP connections on `port`.
pub fn wait_for_port(port: u16, within: Duration) {
    let deadline = Instant::now() + within;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last `lines` lines of a text.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A PostgreSQL cluster of our own: `initdb` into a fresh temporary directory, served on a free
/// loopback port (its socket in the same directory), with the service database created.
/// PostgreSQL refuses to run as root, so as root the tools run as the `postgres` user.
pub struct PrivatePostgres {
    bindir: PathBuf,
    root: PathBuf,
    data: PathBuf,
    pub port: u16,
    as_postgres: bool,
}

impl PrivatePostgres {
    /// Creates, starts and prepares a cluster (blocking: a few seconds).
    pub fn start() -> PrivatePostgres {
        Self::start_with(None)
    }

    /// A cluster that speaks TLS only, with `pki`'s server certificate (for `127.0.0.1` and
    /// `localhost`): `ssl = on`, and `pg_hba.conf` admits `hostssl` connections and rejects
    /// every `hostnossl` one.
    pub fn start_tls(pki: &crate::tls::TestPki) -> PrivatePostgres {
        Self::start_with(Some(pki))
    }

    fn start_with(tls: Option<&crate::tls::TestPki>) -> PrivatePostgres {
        let root = scratch_dir("pg");
        let data = root.join("data");
        std::fs::create_dir_all(&data).unwrap();
        let as_postgres = is_root();
        if as_postgres {
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&root));
        }
        let pg = PrivatePostgres {
            bindir: pg_bindir(),
            root,
            data,
            port: free_port(),
            as_postgres,
        };
        run(pg
            .tool("initdb", true)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&pg.data));
        if let Some(pki) = tls {
            pg.require_tls(pki);
        }
        pg.start_server(true);
        run(pg.tool("createdb", false).args([
            "-h",
            "127.0.0.1",
            "-p",
            &pg.port.to_string(),
            "-U",
            "postgres",
            DATABASE,
        ]));
        pg
    }

    fn require_tls(&self, pki: &crate::tls::TestPki) {
        let key = self.data.join("server.key");
        std::fs::write(self.data.join("server.crt"), &pki.server_cert_pem).unwrap();
        std::fs::write(&key, &pki.server_key_pem).unwrap();
        // PostgreSQL refuses a key that others can read, or that is not its own.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        if self.as_postgres {
            run(Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&key)
                .arg(self.data.join("server.crt")));
        }
        let conf = self.data.join("postgresql.conf");
        let mut settings = std::fs::read_to_string(&conf).unwrap();
        settings
            .push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        std::fs::write(&conf, settings).unwrap();
        std::fs::write(
            self.data.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all all 127.0.0.1/32 trust\n\
             hostssl all all ::1/128 trust\n\
             hostnossl all all all reject\n",
        )
        .unwrap();
    }

    /// A PostgreSQL tool; `as_owner` runs it as the cluster's owner.
    fn tool(&self, program: &str, as_owner: bool) -> Command {
        let binary = self.bindir.join(program);
        let mut command = if as_owner && self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(binary);
            c
        } else {
            Command::new(binary)
        };
        // The postgres user may not be allowed into the test's working directory.
        command.current_dir(&self.root).stdin(Stdio::null());
        command
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The URL of the service database.
    pub fn database_url(&self) -> String {
        self.url(DATABASE)
    }

    /// `pg_ctl start`; with `wait`, returns once the server accepts connections (after crash
    /// recovery, if it needs one).
    pub fn start_server(&self, wait: bool) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c max_connections=100",
            self.port,
            self.root.display()
        );
        run(self
            .tool("pg_ctl", true)
            .arg(if wait { "-w" } else { "-W" })
            .args(["-t", "60", "-D"])
            .arg(&self.data)
            .arg("-l")
            .arg(self.root.join("server.log"))
            .args(["-o", &options, "start"])
            // pg_ctl leaves the postmaster running with our pipes open if we capture them.
            .stdout(Stdio::null())
            .stderr(Stdio::null()));
    }

    /// A clean shutdown (`-m fast`).
    pub fn stop(&self) {
        run(self
            .tool("pg_ctl", true)
            .args(["-w", "-m", "fast", "-D"])
            .arg(&self.data)
            .arg("stop"));
    }

    /// A crash: `pg_ctl -m immediate stop` (no shutdown checkpoint, every client cut off), so
    /// the next start runs crash recovery from the WAL.
    pub fn stop_immediate(&self) {
        run(self
            .tool("pg_ctl", true)
            .args(["-w", "-m", "immediate", "-D"])
            .arg(&self.data)
            .arg("stop"));
    }

    /// Crash, stay down for `down`, start again and wait until it accepts connections.
    /// Returns the instant it did.
    pub fn restart_immediate(&self, down: Duration) -> Instant {
        self.stop_immediate();
        std::thread::sleep(down);
        self.start_server(true);
        Instant::now()
    }

    /// What the cluster logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("server.log")).unwrap_or_default()
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self
            .tool("pg_ctl", true)
            .args(["-w", "-m", "immediate", "-D"])
            .arg(&self.data)
            .arg("stop")
            .output();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A Redis of our own as a child process, without persistence (so it comes back empty after a
/// restart), stoppable and startable again on the same port.
pub struct PrivateRedis {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// Serves TLS only on `port`, with these certificate files (cert, key, CA).
    tls: Option<[PathBuf; 3]>,
}

impl PrivateRedis {
    pub fn launch() -> PrivateRedis {
        Self::launch_with(None)
    }

    /// A Redis that speaks TLS only (`rediss://`), with `pki`'s server certificate; clients
    /// need no certificate of their own.
    pub fn launch_tls(pki: &crate::tls::TestPki) -> PrivateRedis {
        Self::launch_with(Some([
            pki.server_cert_path(),
            pki.server_key_path(),
            pki.ca_path(),
        ]))
    }

    fn launch_with(tls: Option<[PathBuf; 3]>) -> PrivateRedis {
        let mut redis = PrivateRedis {
            port: free_port(),
            dir: scratch_dir("redis"),
            child: None,
            tls,
        };
        redis.start();
        redis
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Starts it (again) on its port and waits until it accepts connections.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "redis is already running");
        let mut command = Command::new("redis-server");
        match &self.tls {
            None => command.args(["--port", &self.port.to_string()]),
            Some([cert, key, ca]) => command
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key)
                .arg("--tls-ca-cert-file")
                .arg(ca)
                .args(["--tls-auth-clients", "no"]),
        };
        let child = command
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (is it installed?)");
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(10));
    }

    /// Kills it and waits for it to be gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes it (SIGSTOP): connections stay open but nothing answers.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws it (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("redis is running");
        run(Command::new("kill").arg(signal).arg(child.id().to_string()));
    }

    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the private redis")
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A paused Redis must be thawed to die promptly.
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .output();
        }
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The real `loyalty serve` as a child process on a fixed loopback port (restarts reuse it),
/// its stderr (JSON logs) appended to a file.
pub struct ServerProcess {
    pub port: u16,
    env: Vec<(String, String)>,
    dir: PathBuf,
    child: Option<Child>,
    /// How many times the process was started.
    pub starts: u32,
}

impl ServerProcess {
    /// Starts the server (does not wait for it: see [`ServerProcess::wait_serving`]).
    pub fn spawn(database_url: &str, redis_url: &str, key_prefix: &str) -> ServerProcess {
        Self::spawn_with(database_url, redis_url, key_prefix, &[])
    }

    /// Like [`ServerProcess::spawn`], with settings of the test's own (`RUST_LOG`, a limit...)
    /// that replace the defaults.
    pub fn spawn_with(
        database_url: &str,
        redis_url: &str,
        key_prefix: &str,
        settings: &[(&str, &str)],
    ) -> ServerProcess {
        let port = free_port();
        let env = [
            ("DATABASE_URL", database_url),
            ("REDIS_URL", redis_url),
            ("LOYALTY_REDIS_PREFIX", key_prefix),
            ("LOYALTY_LISTEN", &format!("127.0.0.1:{port}")),
            ("LOYALTY_METRICS_LISTEN", ""),
            ("LOYALTY_RATE_LIMIT_RPS", "0"),
            ("LOYALTY_HEALTH_INTERVAL_MS", "200"),
            ("LOYALTY_REDIS_TIMEOUT_MS", "100"),
            ("LOYALTY_REDIS_COOL_DOWN_MS", "200"),
            ("LOYALTY_DB_ACQUIRE_TIMEOUT_MS", "500"),
            // The greeting job every 500 ms (not every minute), so the birthdays that a
            // scenario's greeting workers wait for are made at once, and made again (as a
            // no-op) by the restarted server.
            ("LOYALTY_GREETING_INTERVAL_MS", "500"),
            ("LOYALTY_LOG_FORMAT", "json"),
            ("RUST_LOG", "warn"),
        ]
        .into_iter()
        .filter(|(name, _)| !settings.iter().any(|(own, _)| own == name))
        .chain(settings.iter().copied())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let mut server = ServerProcess {
            port,
            env,
            dir: scratch_dir("server"),
            child: None,
            starts: 0,
        };
        server.start();
        server
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The running process's id (to read its memory use, say).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|child| child.id())
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// Starts the process (again), on the same port.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "the server is already running");
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut command = Command::new(crate::loyalty_binary());
        command.arg("serve");
        // Only our settings: nothing inherited from the developer's or CI's environment.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("LOYALTY_")
                || name == "DATABASE_URL"
                || name == "REDIS_URL"
                || name == "RUST_LOG"
            {
                command.env_remove(name.as_ref());
            }
        }
        let child = command
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start loyalty serve");
        self.child = Some(child);
    }

    /// Polls grpc.health until the server reports SERVING. Returns how long that took.
    pub async fn wait_serving(&mut self, within: Duration) -> Duration {
        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "loyalty serve exited ({status}) before serving:\n{}",
                    tail(&self.log(), 40)
                );
            }
            if health(&self.endpoint()).await == Some(ServingStatus::Serving) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < within,
                "loyalty serve not SERVING after {within:?}:\n{}",
                tail(&self.log(), 40)
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// SIGKILL (`kill -KILL <pid>`): no graceful shutdown, in-flight requests are cut off.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let killed = Command::new("kill")
                .args(["-KILL", &child.id().to_string()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !killed {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }

    /// Everything the server logged, over all its starts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill9();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The overall health the server at `endpoint` reports, if it answers within a second.
pub async fn health(endpoint: &str) -> Option<ServingStatus> {
    let channel = Endpoint::from_shared(endpoint.to_string())
        .ok()?
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(1))
        .connect()
        .await
        .ok()?;
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .ok()?;
    ServingStatus::try_from(reply.into_inner().status).ok()
}

/// Everything one scenario runs against: its own PostgreSQL, Redis and server, a merchant and
/// its point-of-sale key.
pub struct Cluster {
    pub name: String,
    pub postgres: PrivatePostgres,
    pub redis: PrivateRedis,
    /// Between the server and Redis, when started with one.
    pub redis_proxy: Option<Proxy>,
    pub server: ServerProcess,
    pub merchant: MerchantId,
    pub pos_key: String,
    /// The merchant's admin key (for the catalog).
    pub admin_key: String,
    /// The merchant's scheduler key (event watchers and greeting workers; the rig serves
    /// plaintext, so no client certificate is asked for).
    pub scheduler_key: String,
    pub key_prefix: String,
}

impl Cluster {
    /// Needs a multi-thread runtime (the process tools run in `block_in_place`).
    pub async fn start(name: &str) -> Cluster {
        Self::start_with(name, false).await
    }

    /// With `redis_proxy`, the server reaches Redis through a [`Proxy`] the test can cut (a
    /// network partition between the server and Redis, with Redis itself unharmed).
    pub async fn start_with(name: &str, redis_proxy: bool) -> Cluster {
        let (postgres, redis) =
            tokio::task::block_in_place(|| (PrivatePostgres::start(), PrivateRedis::launch()));
        let redis_proxy = if redis_proxy {
            Some(Proxy::start(([127, 0, 0, 1], redis.port).into()).await)
        } else {
            None
        };
        let redis_url = match &redis_proxy {
            Some(proxy) => format!("redis://{}", proxy.addr),
            None => redis.url(),
        };
        let key_prefix = format!("rel-{name}");
        let mut server = ServerProcess::spawn(&postgres.database_url(), &redis_url, &key_prefix);
        // SERVING implies the migrations ran: the health service starts after them.
        server.wait_serving(Duration::from_secs(60)).await;
        let store = Store::connect_lazy(&DatabaseConfig {
            url: postgres.database_url(),
            max_connections: 2,
            acquire_timeout: Duration::from_secs(10),
            statement_timeout: Duration::from_secs(10),
            outbox: true,
        })
        .unwrap();
        let (merchant, admin) = loyalty::create_merchant(&store, "Reliability shop", "EUR")
            .await
            .expect("merchant created");
        let admin_key = admin.secret.expose().to_string();
        let pos_key = loyalty::create_key(&store, merchant, Scope::Pos)
            .await
            .expect("key created")
            .secret
            .expose()
            .to_string();
        let scheduler_key = loyalty::create_key(&store, merchant, Scope::Scheduler)
            .await
            .expect("scheduler key created")
            .secret
            .expose()
            .to_string();
        store.close().await;
        Cluster {
            name: name.to_string(),
            postgres,
            redis,
            redis_proxy,
            server,
            merchant,
            pos_key,
            admin_key,
            scheduler_key,
            key_prefix,
        }
    }

    pub fn endpoint(&self) -> String {
        self.server.endpoint()
    }

    /// A fresh pool on the service database (fresh, so no connection predates a crash).
    pub async fn pool(&self) -> PgPool {
        PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(10))
            .connect(&self.postgres.database_url())
            .await
            .expect("audit pool")
    }

    /// The Redis key of a customer's cached state on the Redis `redis` reaches (see
    /// src/platform/cache.rs; our external ids need no escaping).
    pub async fn cache_key(
        &self,
        redis: &mut redis::aio::MultiplexedConnection,
        external_id: &str,
    ) -> String {
        format!(
            "{}:{}:{{m{}:c{}}}:state",
            self.key_prefix,
            crate::redis_server_name_of(redis).await,
            self.merchant.0,
            external_id
        )
    }

    /// A client of the server with the merchant's point-of-sale key.
    pub fn client(&self, record: &Shared, deadline: Duration) -> Client {
        Client::new(&self.endpoint(), &self.pos_key, record.clone(), deadline)
    }

    /// Puts `gift` in the merchant's catalog (CreateGift is idempotent on gift_id).
    pub async fn create_gift(&self, gift: &CatalogGift) {
        let channel = Endpoint::from_shared(self.endpoint())
            .unwrap()
            .connect()
            .await
            .expect("connect to the server");
        let mut program = loyalty::pb::program_service_client::ProgramServiceClient::new(channel);
        let mut request = tonic::Request::new(loyalty::pb::CreateGiftRequest {
            gift: Some(loyalty::pb::Gift {
                gift_id: gift.gift_id.clone(),
                name: format!("Gift {}", gift.gift_id),
                kind: loyalty::pb::GiftKind::Item.into(),
                points_price: Some(gift.points_price),
                stock: Some(gift.stock),
                validity_days: 30,
                active: true,
                ..Default::default()
            }),
        });
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", self.admin_key).parse().unwrap(),
        );
        program.create_gift(request).await.expect("gift created");
    }

    /// What to print when a scenario fails: the tails of the server's and PostgreSQL's logs.
    pub fn diagnostics(&self) -> String {
        format!(
            "--- loyalty serve (last 40 lines) ---\n{}\n--- postgres (last 20 lines) ---\n{}",
            tail(&self.server.log(), 40),
            tail(&self.postgres.log(), 20)
        )
    }

    /// Every panic the server logged, as a violation.
    pub fn server_panics(&self) -> Vec<String> {
        self.server
            .log()
            .lines()
            .filter(|line| line.contains("panicked"))
            .map(|line| format!("the server panicked: {line}"))
            .collect()
    }
}
