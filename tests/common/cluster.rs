//! The rig of the fault-injection scenarios (`tests/reliability.rs`): a throwaway PostgreSQL
//! cluster that can be crashed with `pg_ctl -m immediate`, a Redis that can be stopped and
//! started again on its port, the real `loyalty serve` binary as a process that can be
//! SIGKILLed and restarted on its port, a workload driver whose clients retry the identical
//! request as a till does, and the audit every scenario ends with.
//!
//! Loopback only, and nothing here touches the shared PostgreSQL or Redis: every scenario gets
//! its own cluster, Redis and server, all removed when they are dropped.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use loyalty::domain::api_key::Scope;
use loyalty::pb;
use loyalty::service::admin;
use loyalty::storage::{DatabaseConfig, MerchantId, Store};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

use super::proxy::Proxy;

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
}

impl PrivateRedis {
    pub fn launch() -> PrivateRedis {
        let mut redis = PrivateRedis {
            port: free_port(),
            dir: scratch_dir("redis"),
            child: None,
        };
        redis.start();
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it (again) on its port and waits until it accepts connections.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "redis is already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
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
            ("LOYALTY_LOG_FORMAT", "json"),
            ("RUST_LOG", "warn"),
        ]
        .into_iter()
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
        let mut command = Command::new(env!("CARGO_BIN_EXE_loyalty"));
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
        })
        .unwrap();
        let (merchant, _admin) = admin::create_merchant(&store, "Reliability shop", "EUR")
            .await
            .expect("merchant created");
        let pos_key = admin::create_key(&store, merchant, Scope::Pos)
            .await
            .expect("key created")
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

    /// The Redis key of a customer's cached state (see src/storage/cache.rs; our external ids
    /// need no escaping).
    pub fn cache_key(&self, external_id: &str) -> String {
        format!(
            "{}:{{m{}:c{}}}:state",
            self.key_prefix, self.merchant.0, external_id
        )
    }

    /// A client of the server with the merchant's point-of-sale key.
    pub fn client(&self, record: &Shared, deadline: Duration) -> Client {
        Client::new(&self.endpoint(), &self.pos_key, record.clone(), deadline)
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

// ---------------------------------------------------------------------------------------------
// The workload.

/// What a workload client does.
///
/// Only earning (`RecordPurchase`) and enrolling (`EnrollCustomer`) write today; `Balance` is a
/// read-your-writes probe. Redeem, Return and Reserve have no RPCs yet (a later issue adds
/// them). Each will join as a variant here with its own request in [`Call`]: it carries a client
/// key, so [`Client::call`] retries it identically like `Earn`, its acknowledgement goes into
/// [`Record`] next to `acknowledged`, and [`audit`] gets its checks where it says so (one ledger
/// entry per key, no overdraft, every reservation committed or released exactly once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Earn,
    Enroll,
    Balance,
}

/// Relative weights of the operations.
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    pub earn: u32,
    pub enroll: u32,
    pub balance: u32,
}

impl Mix {
    fn pick(&self, rng: &mut StdRng) -> Op {
        let roll = rng.random_range(0..self.earn + self.enroll + self.balance);
        if roll < self.earn {
            Op::Earn
        } else if roll < self.earn + self.enroll {
            Op::Enroll
        } else {
            Op::Balance
        }
    }
}

/// One RPC, as sent (every retry sends exactly this again).
#[derive(Debug, Clone)]
pub enum Call {
    Earn(pb::RecordPurchaseRequest),
    Enroll(pb::EnrollCustomerRequest),
    Balance(pb::GetBalanceRequest),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Earn(pb::RecordPurchaseResponse),
    Enroll(pb::EnrollCustomerResponse),
    Balance(pb::GetBalanceResponse),
}

/// The first acknowledgement of a purchase.
#[derive(Debug, Clone)]
pub struct Ack {
    pub external_id: String,
    pub response: pb::RecordPurchaseResponse,
}

/// What the clients of a scenario saw.
#[derive(Debug, Default)]
pub struct Record {
    /// RPCs sent, retries and deliberate replays included.
    pub attempts: u64,
    /// Attempts that repeated a failed attempt.
    pub retries: u64,
    /// Deliberate extra copies of an acknowledged write.
    pub replays: u64,
    pub reads: u64,
    /// Failed attempts by code (each one retried), e.g. `Unavailable`, `Unknown(transport)`.
    pub failures: BTreeMap<String, u64>,
    /// When each failed attempt ended, how long it took, and its label.
    pub failed: Vec<(Instant, Duration, String)>,
    pub max_failed_latency: Duration,
    pub max_latency: Duration,
    /// When each write (first acknowledgement of a purchase, or an enrolment) succeeded.
    pub write_acks: Vec<Instant>,
    /// purchase_id → its first acknowledgement.
    pub acknowledged: HashMap<String, Ack>,
    /// external_id → how many enrolments answered `created`.
    pub enrolled: HashMap<String, u32>,
    /// Customers an enrolment or a purchase was acknowledged for.
    pub customers: HashSet<String>,
    /// Purchases abandoned by their client after the give-up time, still failing.
    pub gave_up: Vec<String>,
    pub violations: Vec<String>,
}

pub type Shared = Arc<Mutex<Record>>;

impl Record {
    pub fn shared() -> Shared {
        Arc::default()
    }

    /// Books the acknowledgement of a purchase; every answer for one purchase_id must be the
    /// same.
    pub fn ack_purchase(
        &mut self,
        request: &pb::RecordPurchaseRequest,
        response: &pb::RecordPurchaseResponse,
    ) {
        if response.purchase_id != request.purchase_id
            || response.external_id != request.external_id
        {
            self.violations.push(format!(
                "{}: answered for {}/{}",
                request.purchase_id, response.external_id, response.purchase_id
            ));
        }
        match self.acknowledged.get(&request.purchase_id) {
            Some(first) if first.response != *response => self.violations.push(format!(
                "{}: two different answers: {:?} then {:?}",
                request.purchase_id, first.response, response
            )),
            Some(_) => {}
            None => {
                self.acknowledged.insert(
                    request.purchase_id.clone(),
                    Ack {
                        external_id: request.external_id.clone(),
                        response: response.clone(),
                    },
                );
                self.write_acks.push(Instant::now());
                self.customers.insert(request.external_id.clone());
            }
        }
    }

    /// Books an enrolment: the stored profile is the one sent, and a customer is created once.
    pub fn ack_enroll(
        &mut self,
        request: &pb::EnrollCustomerRequest,
        response: &pb::EnrollCustomerResponse,
    ) {
        let customer = response.customer.clone().unwrap_or_default();
        if customer.external_id != request.external_id
            || customer.display_name != request.display_name
            || customer.time_zone != request.time_zone
        {
            self.violations.push(format!(
                "enrolment of {} answered {customer:?}",
                request.external_id
            ));
        }
        let created = self
            .enrolled
            .entry(request.external_id.clone())
            .or_default();
        if response.created {
            *created += 1;
            if *created > 1 {
                self.violations.push(format!(
                    "{} was created {} times",
                    request.external_id, created
                ));
            }
        }
        self.write_acks.push(Instant::now());
        self.customers.insert(request.external_id.clone());
    }

    /// The first write acknowledged after `t`.
    pub fn first_write_after(&self, t: Instant) -> Option<Instant> {
        self.write_acks.iter().copied().filter(|a| *a > t).min()
    }

    /// Writes first acknowledged in `[from, to]`.
    pub fn writes_between(&self, from: Instant, to: Instant) -> usize {
        self.write_acks
            .iter()
            .filter(|at| **at >= from && **at <= to)
            .count()
    }

    /// Failed attempts that ended in `[from, to]`.
    pub fn failures_between(&self, from: Instant, to: Instant) -> usize {
        self.failed
            .iter()
            .filter(|(at, _, _)| *at >= from && *at <= to)
            .count()
    }

    pub fn failed_attempts(&self) -> u64 {
        self.failures.values().sum()
    }
}

/// How a failed attempt is counted, and whether a till would retry it.
pub fn classify(status: &Status) -> (String, bool) {
    let message = status.message();
    let transport = message.contains("transport error")
        || message.contains("h2 protocol error")
        || message.contains("tcp connect error")
        || message.contains("connection");
    let code = status.code();
    let label = if code == Code::Cancelled && message.contains("Timeout expired") {
        // tonic's own client-side deadline.
        "DeadlineExceeded(client)".to_string()
    } else if transport {
        format!("{code:?}(transport)")
    } else {
        format!("{code:?}")
    };
    let retryable = match code {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::ResourceExhausted
        | Code::Unknown => true,
        // A reset connection (the server was killed) surfaces as an h2 INTERNAL error; the
        // server's own INTERNAL ("internal error") is a bug, never retried.
        Code::Internal => transport,
        _ => false,
    };
    (label, retryable)
}

/// A till: a connection of its own to the server, the merchant's key, a deadline on every call,
/// and the identical request sent again after a retryable failure.
#[derive(Clone)]
pub struct Client {
    endpoint: String,
    key: MetadataValue<Ascii>,
    checkout: pb::checkout_service_client::CheckoutServiceClient<Channel>,
    member: pb::member_service_client::MemberServiceClient<Channel>,
    pub record: Shared,
    pub deadline: Duration,
    pub backoff: Duration,
}

impl Client {
    pub fn new(endpoint: &str, key: &str, record: Shared, deadline: Duration) -> Client {
        let channel = Self::channel(endpoint);
        Client {
            endpoint: endpoint.to_string(),
            key: format!("Bearer {key}").parse().unwrap(),
            checkout: pb::checkout_service_client::CheckoutServiceClient::new(channel.clone()),
            member: pb::member_service_client::MemberServiceClient::new(channel),
            record,
            deadline,
            backoff: Duration::from_millis(50),
        }
    }

    fn channel(endpoint: &str) -> Channel {
        Endpoint::from_shared(endpoint.to_string())
            .unwrap()
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .connect_lazy()
    }

    /// A new connection (after the old one broke).
    pub fn reconnect(&mut self) {
        let channel = Self::channel(&self.endpoint);
        self.checkout = pb::checkout_service_client::CheckoutServiceClient::new(channel.clone());
        self.member = pb::member_service_client::MemberServiceClient::new(channel);
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request
            .metadata_mut()
            .insert("authorization", self.key.clone());
        request.set_timeout(self.deadline);
        request
    }

    /// One attempt.
    pub async fn send(&mut self, call: &Call) -> Result<Reply, Status> {
        match call {
            Call::Earn(r) => {
                let request = self.request(r.clone());
                self.checkout
                    .record_purchase(request)
                    .await
                    .map(|r| Reply::Earn(r.into_inner()))
            }
            Call::Enroll(r) => {
                let request = self.request(r.clone());
                self.member
                    .enroll_customer(request)
                    .await
                    .map(|r| Reply::Enroll(r.into_inner()))
            }
            Call::Balance(r) => {
                let request = self.request(r.clone());
                self.member
                    .get_balance(request)
                    .await
                    .map(|r| Reply::Balance(r.into_inner()))
            }
        }
    }

    /// Sends `call` until it succeeds, retrying the identical request after retryable failures
    /// (with a short backoff, on a new connection after repeated failures), until `give_up`.
    /// A non-retryable answer is returned as is (the caller decides whether it is expected).
    /// `Err(None)` means the client gave up.
    pub async fn call(&mut self, call: &Call, give_up: Instant) -> Result<Reply, Option<Status>> {
        let mut failures_in_a_row = 0u32;
        loop {
            let started = Instant::now();
            let answer = tokio::time::timeout(self.deadline + HANG_GRACE, self.send(call)).await;
            let latency = started.elapsed();
            let result = match answer {
                Ok(result) => result,
                Err(_) => {
                    self.record.lock().unwrap().violations.push(format!(
                        "a call hung for {latency:?} (deadline {:?}): {call:?}",
                        self.deadline
                    ));
                    Err(Status::deadline_exceeded("client hang"))
                }
            };
            {
                let mut record = self.record.lock().unwrap();
                record.attempts += 1;
                if failures_in_a_row > 0 {
                    record.retries += 1;
                }
                record.max_latency = record.max_latency.max(latency);
                if let Call::Balance(_) = call {
                    record.reads += 1;
                }
                let status = match result {
                    Ok(reply) => return Ok(reply),
                    Err(status) => status,
                };
                let (label, retryable) = classify(&status);
                if !retryable {
                    return Err(Some(status));
                }
                *record.failures.entry(label.clone()).or_default() += 1;
                record.failed.push((Instant::now(), latency, label));
                record.max_failed_latency = record.max_failed_latency.max(latency);
            }
            if Instant::now() >= give_up {
                return Err(None);
            }
            failures_in_a_row += 1;
            if failures_in_a_row >= 2 {
                self.reconnect();
            }
            tokio::time::sleep(self.backoff).await;
        }
    }

    /// Records a purchase until acknowledged; books the acknowledgement (or the violation).
    pub async fn earn(
        &mut self,
        request: &pb::RecordPurchaseRequest,
        give_up: Instant,
    ) -> Option<pb::RecordPurchaseResponse> {
        match self.call(&Call::Earn(request.clone()), give_up).await {
            Ok(Reply::Earn(response)) => {
                self.record.lock().unwrap().ack_purchase(request, &response);
                Some(response)
            }
            Ok(other) => unreachable!("{other:?}"),
            Err(Some(status)) => {
                self.record.lock().unwrap().violations.push(format!(
                    "{}: {:?} {} (a retried identical request must succeed)",
                    request.purchase_id,
                    status.code(),
                    status.message()
                ));
                None
            }
            Err(None) => {
                let mut record = self.record.lock().unwrap();
                record.gave_up.push(request.purchase_id.clone());
                None
            }
        }
    }

    /// Enrolls until acknowledged; books the acknowledgement (or the violation).
    pub async fn enroll(
        &mut self,
        request: &pb::EnrollCustomerRequest,
        give_up: Instant,
    ) -> Option<pb::EnrollCustomerResponse> {
        match self.call(&Call::Enroll(request.clone()), give_up).await {
            Ok(Reply::Enroll(response)) => {
                self.record.lock().unwrap().ack_enroll(request, &response);
                Some(response)
            }
            Ok(other) => unreachable!("{other:?}"),
            Err(Some(status)) => {
                self.record.lock().unwrap().violations.push(format!(
                    "enrolment of {}: {:?} {}",
                    request.external_id,
                    status.code(),
                    status.message()
                ));
                None
            }
            Err(None) => {
                self.record
                    .lock()
                    .unwrap()
                    .gave_up
                    .push(format!("enrolment of {}", request.external_id));
                None
            }
        }
    }
}

/// A receipt of `total` cents (1–3 lines adding up to it) from one of a few stores.
pub fn receipt(
    rng: &mut StdRng,
    external_id: &str,
    purchase_id: &str,
) -> pb::RecordPurchaseRequest {
    let total = rng.random_range(100..10_000);
    let mut request = super::purchase(external_id, purchase_id, total);
    request.store_id = format!("store-{}", rng.random_range(1..4));
    if rng.random_ratio(1, 3) {
        request.lines.truncate(1);
        request.lines[0].amount_minor = total;
    }
    request
}

/// The profile every enrolment of `external_id` sends (the same each time, so copies are
/// identical).
pub fn profile(external_id: &str) -> pb::EnrollCustomerRequest {
    pb::EnrollCustomerRequest {
        external_id: external_id.to_string(),
        display_name: format!("Member {external_id}"),
        time_zone: "Europe/Berlin".into(),
        marketing_consent: true,
        ..Default::default()
    }
}

/// Concurrent clients driving a mix of operations against a few hot and some cold customers.
#[derive(Debug, Clone)]
pub struct Workload {
    pub hot: Vec<String>,
    pub cold: Vec<String>,
    /// Share of operations on the hot customers, in percent.
    pub hot_percent: u32,
    /// Share of purchases by a brand-new customer (enrolled by that purchase), in percent.
    pub new_customer_percent: u32,
    pub workers: usize,
    pub mix: Mix,
    /// Share of acknowledged writes sent again (1–3 more copies), in percent.
    pub replay_percent: u32,
    pub deadline: Duration,
    /// A request still failing this long after it was first sent is abandoned (and reported).
    pub give_up_after: Duration,
    pub seed: u64,
}

impl Workload {
    pub fn new(workers: usize) -> Workload {
        Workload {
            hot: (1..=4).map(|i| format!("hot-{i}")).collect(),
            cold: (1..=12).map(|i| format!("cold-{i}")).collect(),
            hot_percent: 80,
            new_customer_percent: 3,
            workers,
            mix: Mix {
                earn: 80,
                enroll: 5,
                balance: 15,
            },
            replay_percent: 10,
            deadline: Duration::from_secs(2),
            give_up_after: Duration::from_secs(30),
            seed: std::env::var("LOYALTY_RELIABILITY_SEED")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| {
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_nanos() as u64
                }),
        }
    }

    /// Starts the clients against `cluster`; they run until [`Running::stop`].
    pub fn start(&self, cluster: &Cluster) -> Running {
        let record = Record::shared();
        let (stop, stopped) = watch::channel(false);
        let tasks = (0..self.workers)
            .map(|worker| {
                let workload = self.clone();
                let client = cluster.client(&record, self.deadline);
                let stopped = stopped.clone();
                tokio::spawn(async move { workload.worker(worker, client, stopped).await })
            })
            .collect();
        Running {
            stop,
            tasks,
            record,
            started: Instant::now(),
        }
    }

    async fn worker(self, worker: usize, mut client: Client, stop: watch::Receiver<bool>) {
        let mut rng = StdRng::seed_from_u64(self.seed.wrapping_add(worker as u64 * 7919));
        // The highest version of each customer this till has seen acknowledged or read.
        let mut seen: HashMap<String, i64> = HashMap::new();
        let mut n = 0u64;
        while !*stop.borrow() {
            n += 1;
            let customer = if self.cold.is_empty() || rng.random_range(0..100) < self.hot_percent {
                &self.hot[rng.random_range(0..self.hot.len())]
            } else {
                &self.cold[rng.random_range(0..self.cold.len())]
            };
            let give_up = Instant::now() + self.give_up_after;
            match self.mix.pick(&mut rng) {
                Op::Earn => {
                    let newcomer;
                    let customer = if rng.random_range(0..100) < self.new_customer_percent {
                        newcomer = format!("new-w{worker}-{n}");
                        &newcomer
                    } else {
                        customer
                    };
                    let request = receipt(&mut rng, customer, &format!("w{worker}-{n}"));
                    let before = seen.get(customer).copied().unwrap_or(0);
                    let Some(first) = client.earn(&request, give_up).await else {
                        continue;
                    };
                    let version = first.balance.as_ref().map_or(0, |b| b.version);
                    if version <= before {
                        client.record.lock().unwrap().violations.push(format!(
                            "{}: new purchase acknowledged at version {version}, but version \
                             {before} of {customer} was seen before it was sent",
                            request.purchase_id
                        ));
                    }
                    seen.insert(customer.clone(), version.max(before));
                    if rng.random_range(0..100) < self.replay_percent {
                        let copies = rng.random_range(1..=3);
                        let concurrent = rng.random_bool(0.5);
                        replay(&client, &request, copies, concurrent, give_up).await;
                    }
                }
                Op::Enroll => {
                    let request = profile(customer);
                    client.enroll(&request, give_up).await;
                }
                Op::Balance => {
                    let min_version = seen.get(customer).copied().unwrap_or(0);
                    let call = Call::Balance(pb::GetBalanceRequest {
                        external_id: customer.clone(),
                        min_version,
                    });
                    match client.call(&call, give_up).await {
                        Ok(Reply::Balance(reply)) => {
                            let balance = reply.balance.unwrap_or_default();
                            if balance.version < min_version {
                                client.record.lock().unwrap().violations.push(format!(
                                    "{customer}: read version {} after asking for at least \
                                     {min_version}",
                                    balance.version
                                ));
                            }
                            seen.insert(customer.clone(), balance.version.max(min_version));
                        }
                        Ok(other) => unreachable!("{other:?}"),
                        // Not enrolled yet: fine, unless this till saw it acknowledged.
                        Err(Some(status))
                            if status.code() == Code::NotFound && min_version == 0 => {}
                        Err(Some(status)) => {
                            client.record.lock().unwrap().violations.push(format!(
                                "balance of {customer} (min_version {min_version}): {:?} {}",
                                status.code(),
                                status.message()
                            ));
                        }
                        Err(None) => {}
                    }
                }
            }
        }
    }
}

/// Sends `copies` more identical copies of an acknowledged purchase, one after the other or all
/// at once; each must get the first answer (checked by [`Record::ack_purchase`]).
pub async fn replay(
    client: &Client,
    request: &pb::RecordPurchaseRequest,
    copies: usize,
    concurrent: bool,
    give_up: Instant,
) -> Vec<Option<pb::RecordPurchaseResponse>> {
    client.record.lock().unwrap().replays += copies as u64;
    if concurrent {
        let calls = (0..copies).map(|_| {
            let mut client = client.clone();
            let request = request.clone();
            tokio::spawn(async move { client.earn(&request, give_up).await })
        });
        futures::future::join_all(calls)
            .await
            .into_iter()
            .map(|r| r.expect("replay task"))
            .collect()
    } else {
        let mut client = client.clone();
        let mut answers = Vec::new();
        for _ in 0..copies {
            answers.push(client.earn(request, give_up).await);
        }
        answers
    }
}

/// A workload in progress.
pub struct Running {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    pub record: Shared,
    pub started: Instant,
}

impl Running {
    /// Waits (up to `within`) for the first write acknowledged after `t`; returns its delay.
    pub async fn first_write_after(&self, t: Instant, within: Duration) -> Option<Duration> {
        loop {
            if let Some(at) = self.record.lock().unwrap().first_write_after(t) {
                return Some(at - t);
            }
            if t.elapsed() > within {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the clients (each finishes its current operation, retries included) and returns
    /// what they saw.
    pub async fn stop(self) -> (Record, Duration) {
        let _ = self.stop.send(true);
        let ran = self.started.elapsed();
        for task in self.tasks {
            match tokio::time::timeout(Duration::from_secs(60), task).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => self
                    .record
                    .lock()
                    .unwrap()
                    .violations
                    .push(format!("a client task failed: {e}")),
                Err(_) => self
                    .record
                    .lock()
                    .unwrap()
                    .violations
                    .push("a client did not finish within 60 s of the stop".into()),
            }
        }
        let record = std::mem::take(&mut *self.record.lock().unwrap());
        (record, ran)
    }
}

// ---------------------------------------------------------------------------------------------
// The audit.

/// The committed state of one customer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    pub available: i64,
    pub pending: i64,
    pub lifetime_earned: i64,
    pub lifetime_redeemed: i64,
    pub purchase_count: i64,
    pub version: i64,
}

/// What the audit found.
#[derive(Debug, Default)]
pub struct Audit {
    pub customers: usize,
    pub purchases: usize,
    pub ledger_entries: i64,
    /// Purchases stored although no client was told they were (given up); 0 or 1 effect each.
    pub unacknowledged_purchases: usize,
    /// How long the cache took to hold only committed states (or nothing) per customer.
    pub cache_converged_after: Option<Duration>,
    pub cache_entries: usize,
    pub violations: Vec<String>,
}

/// The audit every scenario ends with, once the load has stopped. For every customer of the
/// merchant:
///
/// * `available + pending == Σ ledger points` (rule 1), `available >= 0` and `pending >= 0`
///   (rule 2: no clawbacks exist yet, so nothing may be negative);
/// * every acknowledged purchase has exactly one purchase row (for the acknowledged customer,
///   points and version) and exactly one `earn` entry with the acknowledged points (rule 3); no
///   `earn` entry lacks its purchase; no purchase was stored that no client was told about
///   (unless its client gave up); each purchase's lines add up to its total;
/// * the account is the projection of exactly its purchases: purchase_count and
///   lifetime_earned match them (one effect each);
/// * the cache holds, within `cache_within`, either nothing or exactly the committed state
///   (rules 7 and 9), and a fresh `GetBalance` shows the committed state.
pub async fn audit(cluster: &Cluster, record: &Record, cache_within: Duration) -> Audit {
    let pool = cluster.pool().await;
    let merchant = cluster.merchant.0;
    let mut audit = Audit {
        violations: record.violations.clone(),
        ..Audit::default()
    };
    let v = &mut audit.violations;
    if !record.gave_up.is_empty() {
        v.push(format!(
            "{} requests never completed (retries gave up): {:?}",
            record.gave_up.len(),
            &record.gave_up[..record.gave_up.len().min(10)]
        ));
    }

    // Accounts against their ledger and purchases.
    #[derive(sqlx::FromRow, Debug)]
    struct AccountRow {
        external_id: String,
        has_account: bool,
        available: i64,
        pending: i64,
        lifetime_earned: i64,
        lifetime_redeemed: i64,
        purchase_count: i64,
        version: i64,
        ledger_total: i64,
        ledger_earned: i64,
        ledger_entries: i64,
        other_entries: i64,
        purchases: i64,
        purchased_points: i64,
    }
    let accounts: Vec<AccountRow> = sqlx::query_as(
        "SELECT c.external_id, a.customer_id IS NOT NULL AS has_account,
                COALESCE(a.available, 0) AS available, COALESCE(a.pending, 0) AS pending,
                COALESCE(a.lifetime_earned, 0) AS lifetime_earned,
                COALESCE(a.lifetime_redeemed, 0) AS lifetime_redeemed,
                COALESCE(a.purchase_count, 0) AS purchase_count,
                COALESCE(a.version, 0) AS version,
                COALESCE(l.total, 0)::bigint AS ledger_total,
                COALESCE(l.earned, 0)::bigint AS ledger_earned,
                COALESCE(l.entries, 0)::bigint AS ledger_entries,
                COALESCE(l.other, 0)::bigint AS other_entries,
                COALESCE(p.n, 0)::bigint AS purchases,
                COALESCE(p.points, 0)::bigint AS purchased_points
           FROM customers c
           LEFT JOIN accounts a ON a.merchant_id = c.merchant_id AND a.customer_id = c.id
           LEFT JOIN (SELECT customer_id, sum(points) AS total,
                             sum(points) FILTER (WHERE kind = 'earn') AS earned,
                             count(*) AS entries,
                             count(*) FILTER (WHERE kind <> 'earn') AS other
                        FROM ledger_entries WHERE merchant_id = $1 GROUP BY customer_id) l
                  ON l.customer_id = c.id
           LEFT JOIN (SELECT customer_id, count(*) AS n, sum(points_earned) AS points
                        FROM purchases WHERE merchant_id = $1 GROUP BY customer_id) p
                  ON p.customer_id = c.id
          WHERE c.merchant_id = $1
          ORDER BY c.external_id",
    )
    .bind(merchant)
    .fetch_all(&pool)
    .await
    .expect("audit: accounts");
    audit.customers = accounts.len();
    let mut committed: HashMap<String, Committed> = HashMap::new();
    for a in &accounts {
        let who = &a.external_id;
        audit.ledger_entries += a.ledger_entries;
        if !a.has_account {
            v.push(format!("{who}: a customer without an account"));
            continue;
        }
        if a.available + a.pending != a.ledger_total {
            v.push(format!(
                "{who}: available {} + pending {} != Σ ledger {}",
                a.available, a.pending, a.ledger_total
            ));
        }
        // Rule 2. When returns exist: negative only with a return_clawback entry.
        if a.available < 0 || a.pending < 0 {
            v.push(format!(
                "{who}: overdraft: available {}, pending {}",
                a.available, a.pending
            ));
        }
        // Only earning exists today. Redeem, Return and Reserve add their entry kinds here:
        // one entry per client key, lifetime_redeemed == -Σ redeem entries, and every
        // reservation either committed or released exactly once (rule 4).
        if a.other_entries != 0 {
            v.push(format!(
                "{who}: {} ledger entries of kinds no RPC writes yet",
                a.other_entries
            ));
        }
        if a.purchase_count != a.purchases
            || a.lifetime_earned != a.ledger_earned
            || a.lifetime_earned != a.purchased_points
            || a.lifetime_redeemed != 0
            || a.version < a.purchase_count
        {
            v.push(format!(
                "{who}: the account is not the projection of its purchases: {a:?}"
            ));
        }
        committed.insert(
            who.clone(),
            Committed {
                available: a.available,
                pending: a.pending,
                lifetime_earned: a.lifetime_earned,
                lifetime_redeemed: a.lifetime_redeemed,
                purchase_count: a.purchase_count,
                version: a.version,
            },
        );
    }
    for customer in &record.customers {
        if !committed.contains_key(customer) {
            v.push(format!("{customer}: acknowledged, but not stored"));
        }
    }

    // Purchases against their earn entries and lines.
    #[derive(sqlx::FromRow)]
    struct PurchaseRow {
        purchase_id: String,
        external_id: String,
        points_earned: i64,
        version_after: i64,
        total_minor: i64,
        earn_entries: i64,
        earn_points: i64,
        earn_other_customer: i64,
        lines: i64,
        lines_total: i64,
    }
    let purchases: Vec<PurchaseRow> = sqlx::query_as(
        "SELECT p.purchase_id, c.external_id, p.points_earned, p.version_after, p.total_minor,
                (SELECT count(*) FROM ledger_entries e WHERE e.merchant_id = p.merchant_id
                    AND e.kind = 'earn' AND e.reference = p.purchase_id) AS earn_entries,
                (SELECT COALESCE(sum(e.points), 0)::bigint FROM ledger_entries e
                  WHERE e.merchant_id = p.merchant_id AND e.kind = 'earn'
                    AND e.reference = p.purchase_id) AS earn_points,
                (SELECT count(*) FROM ledger_entries e WHERE e.merchant_id = p.merchant_id
                    AND e.kind = 'earn' AND e.reference = p.purchase_id
                    AND e.customer_id <> p.customer_id) AS earn_other_customer,
                (SELECT count(*) FROM purchase_lines l WHERE l.merchant_id = p.merchant_id
                    AND l.purchase_id = p.purchase_id) AS lines,
                (SELECT COALESCE(sum(l.amount_minor), 0)::bigint FROM purchase_lines l
                  WHERE l.merchant_id = p.merchant_id AND l.purchase_id = p.purchase_id)
                    AS lines_total
           FROM purchases p
           JOIN customers c ON c.merchant_id = p.merchant_id AND c.id = p.customer_id
          WHERE p.merchant_id = $1",
    )
    .bind(merchant)
    .fetch_all(&pool)
    .await
    .expect("audit: purchases");
    audit.purchases = purchases.len();
    let gave_up: HashSet<&String> = record.gave_up.iter().collect();
    let mut stored = HashSet::new();
    for p in &purchases {
        let id = &p.purchase_id;
        stored.insert(id.clone());
        if p.earn_entries != 1 || p.earn_points != p.points_earned || p.earn_other_customer != 0 {
            v.push(format!(
                "{id}: {} earn entries worth {} (other customer: {}) for {} points",
                p.earn_entries, p.earn_points, p.earn_other_customer, p.points_earned
            ));
        }
        if p.lines == 0 || p.lines_total != p.total_minor {
            v.push(format!(
                "{id}: half written: {} lines worth {} of {}",
                p.lines, p.lines_total, p.total_minor
            ));
        }
        match record.acknowledged.get(id) {
            Some(ack) => {
                let balance = ack.response.balance.unwrap_or_default();
                if ack.external_id != p.external_id
                    || ack.response.points_earned != p.points_earned
                    || balance.version != p.version_after
                {
                    v.push(format!(
                        "{id}: acknowledged ({}, {} points, v{}), stored ({}, {} points, v{})",
                        ack.external_id,
                        ack.response.points_earned,
                        balance.version,
                        p.external_id,
                        p.points_earned,
                        p.version_after
                    ));
                }
            }
            None if gave_up.contains(id) => audit.unacknowledged_purchases += 1,
            None => v.push(format!("{id}: stored, but no client was ever told")),
        }
    }
    for id in record.acknowledged.keys() {
        if !stored.contains(id) {
            v.push(format!("{id}: acknowledged, but lost"));
        }
    }
    let orphans: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ledger_entries e
          WHERE e.merchant_id = $1 AND e.kind = 'earn'
            AND NOT EXISTS (SELECT 1 FROM purchases p
                             WHERE p.merchant_id = e.merchant_id AND p.purchase_id = e.reference)",
    )
    .bind(merchant)
    .fetch_one(&pool)
    .await
    .expect("audit: orphans");
    if orphans != 0 {
        v.push(format!("{orphans} earn entries without a purchase"));
    }
    pool.close().await;

    // The cache converges: every entry absent or exactly the committed state.
    let mut redis = cluster.redis.connection().await;
    let started = Instant::now();
    let mut stale = loop {
        let stale = stale_cache_entries(cluster, &mut redis, &committed).await;
        if stale.is_empty() {
            audit.cache_converged_after = Some(started.elapsed());
            break stale;
        }
        if started.elapsed() > cache_within {
            break stale;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    v.append(&mut stale);

    // What customers are shown: a fresh GetBalance equals Postgres. Then the cache, which
    // those reads refilled, must hold exactly the committed state.
    let mut client = cluster.client(&Record::shared(), Duration::from_secs(5));
    for (customer, state) in &committed {
        let call = Call::Balance(pb::GetBalanceRequest {
            external_id: customer.clone(),
            min_version: 0,
        });
        match client
            .call(&call, Instant::now() + Duration::from_secs(10))
            .await
        {
            Ok(Reply::Balance(reply)) => {
                let b = reply.balance.unwrap_or_default();
                let shown = Committed {
                    available: b.available,
                    pending: b.pending,
                    lifetime_earned: b.lifetime_earned,
                    lifetime_redeemed: b.lifetime_redeemed,
                    purchase_count: reply.purchase_count,
                    version: b.version,
                };
                if shown != *state {
                    v.push(format!(
                        "{customer}: GetBalance shows {shown:?}, committed {state:?}"
                    ));
                }
            }
            other => v.push(format!("{customer}: GetBalance failed: {other:?}")),
        }
    }
    let mut stale = stale_cache_entries(cluster, &mut redis, &committed).await;
    v.append(&mut stale);
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*", cluster.key_prefix))
        .query_async(&mut redis)
        .await
        .unwrap_or_default();
    audit.cache_entries = keys.len();
    audit
}

/// Customers whose cache entry exists and differs from the committed state.
async fn stale_cache_entries(
    cluster: &Cluster,
    redis: &mut redis::aio::MultiplexedConnection,
    committed: &HashMap<String, Committed>,
) -> Vec<String> {
    let mut stale = Vec::new();
    for (customer, state) in committed {
        let fields: HashMap<String, i64> = match redis::cmd("HGETALL")
            .arg(cluster.cache_key(customer))
            .query_async(redis)
            .await
        {
            Ok(fields) => fields,
            Err(e) => {
                stale.push(format!("{customer}: cache unreadable: {e}"));
                continue;
            }
        };
        if fields.is_empty() {
            continue;
        }
        let field = |name: &str| fields.get(name).copied();
        let cached = (
            field("v"),
            field("a"),
            field("p"),
            field("le"),
            field("lr"),
            field("pc"),
        );
        let expected = (
            Some(state.version),
            Some(state.available),
            Some(state.pending),
            Some(state.lifetime_earned),
            Some(state.lifetime_redeemed),
            Some(state.purchase_count),
        );
        if cached != expected {
            stale.push(format!(
                "{customer}: cache holds (v, a, p, le, lr, pc) = {cached:?}, committed {expected:?}"
            ));
        }
    }
    stale.sort();
    stale
}

/// The figures every scenario reports, plus its own.
pub fn figures(
    record: &Record,
    audit: &Audit,
    ran: Duration,
    extra: serde_json::Value,
) -> serde_json::Value {
    let acknowledged = record.acknowledged.len();
    let mut value = serde_json::json!({
        "load_seconds": (ran.as_secs_f64() * 10.0).round() / 10.0,
        "requests": record.attempts,
        "retries": record.retries,
        "replays": record.replays,
        "reads": record.reads,
        "failed_attempts": record.failed_attempts(),
        "failed_attempts_by_code": record.failures,
        "max_failed_call_ms": record.max_failed_latency.as_millis() as u64,
        "max_call_ms": record.max_latency.as_millis() as u64,
        "acknowledged_purchases": acknowledged,
        "acknowledged_writes": record.write_acks.len(),
        "acknowledged_writes_per_second": (record.write_acks.len() as f64 / ran.as_secs_f64().max(0.001)).round(),
        "gave_up": record.gave_up.len(),
        "customers": audit.customers,
        "purchases_stored": audit.purchases,
        "ledger_entries": audit.ledger_entries,
        "cache_entries": audit.cache_entries,
        "cache_converged_ms": audit.cache_converged_after.map(|d| d.as_millis() as u64),
        "violations": audit.violations.len(),
        "violation_samples": &audit.violations[..audit.violations.len().min(5)],
    });
    if let (Some(map), Some(more)) = (value.as_object_mut(), extra.as_object()) {
        for (k, v) in more {
            map.insert(k.clone(), v.clone());
        }
    }
    value
}
